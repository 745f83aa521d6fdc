"""Known bugs of the OpenMMLab releases we support that stop a dry run for reasons DDP has no part in.

Inside :func:`dry_run_fixes` (the DDP doctor's runs, never training) each bug is worked around and,
where the workaround acted, named: the user learns that the real run hits it too, and the doctor
still answers the DDP question.
"""
import contextlib
from typing import Iterator, List

MMSEG_CLASS_WEIGHT = (
    "mmseg 1.2.2's cross_entropy with a class_weight indexes the weights by every label, the "
    'ignore label (255, also what the data preprocessor pads crops with) too, and raises IndexError '
    '(open-mmlab/mmsegmentation#3734). The dry run gave ignored pixels weight 0, as PyTorch does; a '
    'real run of this config raises there whenever a label map has ignored or padded pixels.')


@contextlib.contextmanager
def dry_run_fixes() -> Iterator[List[str]]:
    """Work around the known bugs while inside; yields the list of those that acted (filled as the
    run goes)."""
    acted: List[str] = []
    with contextlib.ExitStack() as stack:
        try:
            from mmseg.models.losses import cross_entropy_loss as ce
        except ImportError:
            ce = None
        if ce is not None:
            original = ce.cross_entropy

            def cross_entropy(pred, label, weight=None, class_weight=None, reduction='mean',
                              avg_factor=None, ignore_index=-100, avg_non_ignore=False):
                ignored = label == ignore_index
                if class_weight is None or avg_factor is not None or reduction != 'mean' or \
                        not ignored.any():
                    return original(pred, label, weight, class_weight, reduction, avg_factor,
                                    ignore_index, avg_non_ignore)
                if MMSEG_CLASS_WEIGHT not in acted:
                    acted.append(MMSEG_CLASS_WEIGHT)
                label_weights = class_weight[label.masked_fill(ignored, 0)].masked_fill(ignored, 0)
                return original(pred, label, weight, class_weight, reduction,
                                label_weights.sum(), ignore_index, avg_non_ignore)

            ce.cross_entropy = cross_entropy
            stack.callback(setattr, ce, 'cross_entropy', original)
        yield acted
