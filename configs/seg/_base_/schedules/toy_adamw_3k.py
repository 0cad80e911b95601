# Toy schedule (the benchmark profile): AdamW + poly decay, 3000 iterations of batch 32
# (measured on the real toy pairs with PhotoMetricDistortion: 0.906 mIoU on the real toy val split,
# ~0.08 s/iteration on a quiet 2-core CPU; 0.85-0.91 without it, from run to run).
# Demo profile: --cfg-options train_cfg.max_iters=1500 (the LR schedule end follows max_iters
# when run through train/segmenter.py).
max_iters = 3000
optim_wrapper = dict(
    type="OptimWrapper",
    optimizer=dict(type="AdamW", lr=0.003, betas=(0.9, 0.999), weight_decay=0.0001),
    clip_grad=None,
)
param_scheduler = [
    dict(type="PolyLR", eta_min=1e-5, power=0.9, begin=0, end=max_iters, by_epoch=False),
]
train_cfg = dict(type="IterBasedTrainLoop", max_iters=max_iters, val_interval=1000)
val_cfg = dict(type="ValLoop")
test_cfg = dict(type="TestLoop")
default_hooks = dict(
    timer=dict(type="IterTimerHook"),
    logger=dict(type="LoggerHook", interval=50, log_metric_by_epoch=False),
    param_scheduler=dict(type="ParamSchedulerHook"),
    checkpoint=dict(type="CheckpointHook", by_epoch=False, interval=1000, max_keep_ckpts=2),
    sampler_seed=dict(type="DistSamplerSeedHook"),
    visualization=dict(type="SegVisualizationHook"),
)
