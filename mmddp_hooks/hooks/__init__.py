from .ddp_autotune_hook import DDPAutoTuneHook
from .replica_consistency_hook import ReplicaConsistencyHook

__all__ = ['DDPAutoTuneHook', 'ReplicaConsistencyHook']
