# A model whose rank 1 sleeps for ever in forward at iteration 6 (tests/hang_cases.py): the doctor's
# verdict must be HANGS, naming that line. Run with --real-data (this config's own vectors).
custom_imports = dict(imports=['hang_cases'], allow_failed_imports=False)
model = dict(type='SleepsInForward')
train_dataloader = dict(dataset=dict(type='HangCaseVectors', n=64), batch_size=2, num_workers=0,
                        sampler=dict(type='DefaultSampler', shuffle=True),
                        collate_fn=dict(type='default_collate'))
optim_wrapper = dict(optimizer=dict(type='SGD', lr=0.05, momentum=0.9))
env_cfg = dict(dist_cfg=dict(backend='gloo'))  # mmengine < 0.10 has no default for it
