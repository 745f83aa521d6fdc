"""mmddp_hooks: name DDP's unused parameters and pick the fastest correct DDP settings.

Importing the package (``custom_imports = dict(imports=['mmddp_hooks'])``) registers its hooks, model
wrapper and losses in MMEngine's root registries, so configs with any ``default_scope`` find them.
"""
from .compat import check_torch

check_torch()  # before anything leans on DDP internals of an unsupported release

from . import dist  # noqa: F401,E402
from .contrastive import GlobalInBatchInfoNCE  # noqa: E402
from .hooks import DDPAutoTuneHook, ReplicaConsistencyHook, TrainableScheduleHook  # noqa: E402
from .plan import DDPPlan, choose_plan  # noqa: E402
from .version import __version__  # noqa: E402
from .wrapper import ReconfigurableDDP  # noqa: E402

__all__ = ['__version__', 'dist', 'DDPAutoTuneHook', 'DDPPlan', 'GlobalInBatchInfoNCE',
           'ReconfigurableDDP', 'ReplicaConsistencyHook', 'TrainableScheduleHook', 'choose_plan']
