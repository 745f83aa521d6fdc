# What every config here adds to its mmdet base: this package, a fixed seed (runs compare bit for
# bit), the wrapper and the hooks.
custom_imports = dict(imports=['mmddp_hooks'], allow_failed_imports=False)
randomness = dict(seed=0)
model_wrapper_cfg = dict(type='ReconfigurableDDP', find_unused_parameters=False)
custom_hooks = [dict(type='DDPAutoTuneHook', probe_iters=2), dict(type='ReplicaConsistencyHook')]
