# SGD + poly decay for VOC (40k iterations, batch 16).
_base_ = ["./sgd_poly_80k.py"]
max_iters = 40000
param_scheduler = [
    dict(type="PolyLR", eta_min=1e-4, power=0.9, begin=0, end=max_iters, by_epoch=False),
]
train_cfg = dict(max_iters=max_iters, val_interval=4000)
default_hooks = dict(checkpoint=dict(interval=4000))
