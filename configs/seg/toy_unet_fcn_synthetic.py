# Toy segmenter trained on generated pairs (dataset/synthetic.py layout, source="synthetic"; an
# image without its mask, e.g. from an unfinished generation run, stops it), evaluated on the
# real toy val split.
#   python -m train.segmenter configs/seg/toy_unet_fcn_synthetic.py --work-dir runs/seg/toy_syn \
#       --cfg-options train_dataloader.dataset.data_root=runs/generate/toy
_base_ = ["./toy_unet_fcn.py"]
synthetic_root = "data/synthetic/toy"
train_dataloader = dict(dataset=dict(source="synthetic", data_root=synthetic_root))
