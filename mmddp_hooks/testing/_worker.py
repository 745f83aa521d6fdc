"""One rank of :func:`mmddp_hooks.testing.run_on_ranks`: init, call, teardown, write the result."""
import faulthandler
import os
import pickle
import sys
import time
import traceback


def main(spec_path: str, rank: str, result_path: str) -> int:
    from mmddp_hooks.testing.harness import STACK_DUMP_AT

    if STACK_DUMP_AT in os.environ:
        faulthandler.dump_traceback_later(max(float(os.environ[STACK_DUMP_AT]) - time.time(), 0.1),
                                          file=sys.stderr)
    from mmddp_hooks.dist import init_dist_if_needed, teardown

    try:
        with open(spec_path, 'rb') as f:
            fn, args, kwargs, backend, timeout = pickle.load(f)
        assert int(os.environ['RANK']) == int(rank)
        if backend is not None:  # None: the function initialises the process group itself
            init_dist_if_needed(backend, timeout_s=timeout)
        payload = {'value': fn(*args, **kwargs)}
        teardown()
        code = 0
    except BaseException:  # noqa: B036 - the harness reports whatever ended the rank
        payload = {'error': traceback.format_exc()}
        code = 1
    tmp = result_path + '.tmp'
    try:
        with open(tmp, 'wb') as f:
            pickle.dump(payload, f)
    except Exception:
        with open(tmp, 'wb') as f:
            pickle.dump({'error': 'return value is not picklable:\n' + traceback.format_exc()}, f)
        code = 1
    os.replace(tmp, result_path)
    faulthandler.cancel_dump_traceback_later()
    sys.stdout.flush()
    sys.stderr.flush()
    return code


if __name__ == '__main__':
    sys.exit(main(*sys.argv[1:4]))
