"""Every collective of this package, with an explicit group and device (as detectron2's ``comm``).

Two planes, because NCCL serves CUDA tensors only:

* **control** (usage records, guard flags, digests, partition checks, row counts): CPU tensors and
  objects over a gloo side group made once for the ranks of the DDP wrapper's ``process_group`` and
  cached: a group of its own even where the wrapper's group is gloo, so control messages never
  queue behind DDP's bucket all-reduces. Integer reductions go up and down a tree of the ranks
  (:class:`ControlTree`): the same few messages per rank at any number of ranks. Never syncs CUDA.
* **data** (InfoNCE gathers, hand-averaged gradients, loss sums): the wrapper's ``process_group``,
  with tensors on their own device.

``group=None`` everywhere means the default group. Set-up and teardown work the same on CPU (gloo)
and GPU (nccl): MMEngine's ``init_dist`` calls ``torch.cuda.set_device`` unconditionally, which fails
on a CPU-only machine; teardown drops the side groups and their trees.

Modules: :mod:`.groups` (who this rank is), :mod:`.launch` (init, slurm, teardown), :mod:`.control`
(the gloo side group, its tree and exchanges), :mod:`.store` (the c10d store protocol), :mod:`.data`
(the data plane). Callers use this package's names (``from mmddp_hooks import dist as ddist``).
"""
from .control import (
                      GLOO_CONNECT_TIMEOUT_S,
                      ControlTree,
                      all_gather_object,
                      all_reduce_flags,
                      barrier,
                      control_group,
                      control_tree,
                      gloo_connect_message,
                      node_key,
                      row_counts,
                      tree_links,
)
from .data import all_reduce_, gather_rows, gather_with_grad
from .groups import (
                     backend_in_use,
                     default_backend,
                     get_rank,
                     get_world_size,
                     group_rank,
                     group_ranks,
                     group_size,
                     is_dist,
)
from .launch import init_dist_if_needed, slurm_env, teardown
from .store import StoreTimeout, store, store_agree

__all__ = ['GLOO_CONNECT_TIMEOUT_S', 'ControlTree', 'StoreTimeout', 'all_gather_object',
           'all_reduce_', 'all_reduce_flags', 'backend_in_use', 'barrier', 'control_group',
           'control_tree', 'default_backend', 'gather_rows', 'gather_with_grad', 'get_rank',
           'get_world_size', 'gloo_connect_message', 'group_rank', 'group_ranks', 'group_size',
           'init_dist_if_needed', 'is_dist', 'node_key', 'row_counts', 'slurm_env', 'store',
           'store_agree', 'teardown', 'tree_links']
