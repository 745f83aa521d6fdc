"""Who this rank is, in the default group and in a subgroup (no collective)."""
from typing import List, Optional

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup


def is_dist() -> bool:
    """True when a process group is initialised (and usable)."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def backend_in_use() -> Optional[str]:
    """The default process group's backend ('nccl', 'gloo', ...), None without one."""
    return dist.get_backend() if is_dist() else None


def default_backend() -> str:
    """nccl where a GPU is visible, gloo otherwise. ``is_available`` never initialises CUDA."""
    return 'nccl' if torch.cuda.is_available() else 'gloo'


def group_size(group: Optional[ProcessGroup] = None) -> int:
    return dist.get_world_size(group) if is_dist() else 1


def group_ranks(group: Optional[ProcessGroup] = None) -> List[int]:
    """The global ranks of ``group`` (the default group's when None)."""
    return dist.get_process_group_ranks(group) if group is not None else list(range(get_world_size()))


def group_rank(group: Optional[ProcessGroup] = None) -> int:
    return dist.get_rank(group) if is_dist() else 0
