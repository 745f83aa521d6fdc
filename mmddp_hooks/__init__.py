"""mmddp_hooks: name DDP's unused parameters and pick the fastest correct DDP settings.

Importing the package (``custom_imports = dict(imports=['mmddp_hooks'])``) registers its hooks, model
wrapper and losses in MMEngine's root registries, so configs with any ``default_scope`` find them.
"""
from . import dist  # noqa: F401
from .contrastive import GlobalInBatchInfoNCE
from .hooks import DDPAutoTuneHook, ReplicaConsistencyHook
from .plan import DDPPlan, choose_plan
from .version import __version__
from .wrapper import ReconfigurableDDP

__all__ = ['__version__', 'dist', 'DDPAutoTuneHook', 'DDPPlan', 'GlobalInBatchInfoNCE',
           'ReconfigurableDDP', 'ReplicaConsistencyHook', 'choose_plan']
