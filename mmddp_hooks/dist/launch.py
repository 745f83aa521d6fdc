"""Start and end a distributed run: the default group from torchrun's (or slurm's) variables, and a
teardown that joins gloo's threads while Python is alive. MMEngine's ``init_dist`` calls
``torch.cuda.set_device`` unconditionally, which fails on a CPU-only machine."""
import datetime
import gc
import os
import subprocess
import time
from typing import Dict, Optional

import torch
import torch.distributed as dist

from .control import barrier, drop_groups
from .groups import default_backend, is_dist

_ENV_KEYS = ('RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT')


def slurm_env(environ: Dict[str, str]) -> Dict[str, str]:
    """The torchrun-style variables of an ``srun`` task, as MMEngine's slurm init derives them.

    RANK from SLURM_PROCID, WORLD_SIZE from SLURM_NTASKS, LOCAL_RANK from SLURM_LOCALID;
    MASTER_ADDR (where unset) is the first host of SLURM_NODELIST (``scontrol show hostname``),
    MASTER_PORT (where unset) 29500, torch's default: only those two keep a value already set.
    """
    missing = [k for k in ('SLURM_PROCID', 'SLURM_NTASKS', 'SLURM_NODELIST') if k not in environ]
    if missing:
        raise RuntimeError(f'--launcher slurm: {", ".join(missing)} not set; start the job with '
                           'srun (tools/slurm_train.sh does)')
    env = dict(RANK=environ['SLURM_PROCID'], WORLD_SIZE=environ['SLURM_NTASKS'],
               LOCAL_RANK=environ.get('SLURM_LOCALID', '0'),
               MASTER_PORT=environ.get('MASTER_PORT', '29500'))
    env['MASTER_ADDR'] = environ.get('MASTER_ADDR') or subprocess.run(
        ['scontrol', 'show', 'hostname', environ['SLURM_NODELIST']], capture_output=True,
        text=True, check=True).stdout.split()[0]
    return env


def init_dist_if_needed(backend: Optional[str] = None,
                        timeout_s: Optional[float] = None, launcher: str = 'pytorch') -> bool:
    """Initialise the default process group from torchrun-style (or slurm) environment variables.

    Idempotent: returns True at once when a group already exists. Returns False, and does nothing,
    when the environment does not describe a distributed launch (no RANK/WORLD_SIZE), so the same
    entry point runs single-process. CUDA APIs are only touched for the nccl backend.

    Args:
        backend: 'gloo', 'nccl' or None to pick :func:`default_backend`.
        timeout_s: collective timeout in seconds (torch's default when None).
        launcher: 'pytorch' (torchrun's variables) or 'slurm' (an ``srun`` task's, turned into
            those by :func:`slurm_env`; MMEngine's own slurm init calls ``torch.cuda.set_device``
            even without a GPU).
    """
    if is_dist():
        return True
    if launcher == 'slurm':
        os.environ.update(slurm_env(dict(os.environ)))
    if 'RANK' not in os.environ or 'WORLD_SIZE' not in os.environ:
        return False
    missing = [k for k in _ENV_KEYS if k not in os.environ]
    if missing:
        raise RuntimeError(
            f'init_dist_if_needed: RANK and WORLD_SIZE are set but {", ".join(missing)} '
            f'{"is" if len(missing) == 1 else "are"} not; launch with torchrun or set them all.')
    backend = backend or default_backend()
    rank = int(os.environ['RANK'])
    world_size = int(os.environ['WORLD_SIZE'])
    local_rank = int(os.environ.get('LOCAL_RANK', rank))
    if backend == 'nccl':
        torch.cuda.set_device(local_rank)
    kwargs = {}
    if timeout_s is not None:
        kwargs['timeout'] = datetime.timedelta(seconds=timeout_s)
    dist.init_process_group(backend=backend, rank=rank, world_size=world_size, **kwargs)
    return True


def teardown() -> None:
    """Destroy every process group after a barrier, and join its threads before the process exits.

    ``destroy_process_group`` only unregisters a group that something still references, and a
    finished Runner does (its DDP wrapper's reducer, in a reference cycle). The group's gloo worker
    threads then live on into interpreter shutdown, where one that drops the last reference to a
    Python-owned tensor must take the GIL, is ended by the finalising interpreter, and aborts the
    rank ("terminate called without an active exception") after its work was done. Collecting that
    garbage here destroys the group while Python is alive: its threads are joined first. Callers drop
    their own references (``del runner``) before calling this.

    Before torch 2.8 a group's destructor joins those threads *holding* the GIL (pytorch#154976).
    A worker that finished a collective just before the barrier, and drops that collective's
    Python-owned tensor right after, waits for the GIL: the destructor then waits for it for ever
    (seen on torch 2.1.2: a rank stuck in ``destroy_process_group`` after its peer had exited). The
    short sleep after the barrier releases the GIL, so such a worker can finish before any group
    is destroyed: it narrows that window, it cannot close it (only torch's fix does).
    """
    if not is_dist():
        return
    try:
        barrier()  # on the control plane: the default group may not serve CPU tensors
        time.sleep(_WORKER_DRAIN_S)
    finally:
        drop_groups()
        dist.destroy_process_group()
        gc.collect()


_WORKER_DRAIN_S = 0.02
