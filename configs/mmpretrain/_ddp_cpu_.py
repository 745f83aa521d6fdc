# What every config here adds to its mmpretrain base: this package, the wrapper and the hooks (the
# configs set randomness themselves: mmpretrain's default_runtime has the key too).
custom_imports = dict(imports=['mmddp_hooks'], allow_failed_imports=False)
model_wrapper_cfg = dict(type='ReconfigurableDDP', find_unused_parameters=False)
custom_hooks = [dict(type='DDPAutoTuneHook', probe_iters=2), dict(type='ReplicaConsistencyHook')]
