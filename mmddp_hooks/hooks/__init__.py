from .data_partition_check_hook import DataPartitionCheckHook
from .ddp_autotune_hook import DDPAutoTuneHook
from .dist_debug_level_hook import DistDebugLevelHook
from .double_wrap_check_hook import DoubleWrapCheckHook
from .grad_layout_hook import GradLayoutHook
from .hang_watchdog_hook import HangWatchdogHook
from .replica_consistency_hook import ReplicaConsistencyHook
from .trainable_schedule_hook import TrainableScheduleHook

__all__ = ['DataPartitionCheckHook', 'DDPAutoTuneHook', 'DistDebugLevelHook', 'DoubleWrapCheckHook',
           'GradLayoutHook', 'HangWatchdogHook', 'ReplicaConsistencyHook',
           'TrainableScheduleHook']
