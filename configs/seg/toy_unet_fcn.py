# Toy segmenter: UNet + FCN head on the 32 px toy dataset, CPU friendly (the benchmark's config).
#   python -m train.segmenter configs/seg/toy_unet_fcn.py --work-dir runs/seg/toy_unet_fcn
# Train on generated pairs instead of data/toy:
#   --cfg-options train_dataloader.dataset.data_root=runs/generate/toy
# Profiles: benchmark = as written (3000 iterations, batch 32);
#   demo = --cfg-options train_cfg.max_iters=300
_base_ = [
    "./_base_/models/toy_unet_fcn.py",
    "./_base_/datasets/toy.py",
    "./_base_/schedules/toy_adamw_3k.py",
    "./_base_/default_runtime.py",
]
