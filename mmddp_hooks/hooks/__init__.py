from .ddp_autotune_hook import DDPAutoTuneHook

__all__ = ['DDPAutoTuneHook']
