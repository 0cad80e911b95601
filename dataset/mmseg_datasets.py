"""MMSegmentation joins the project through ``custom_imports``, not a fork.

An mmseg config names this module and the dataset class below; classes, palette and
``reduce_zero_label`` come from ``dataset.get_dataset_info(dataset_name)`` (the one source of
truth), so the synthetic pairs and the real annotations are read with one definition:

    custom_imports = dict(imports=["dataset.mmseg_datasets"], allow_failed_imports=False)
    train_dataloader = dict(dataset=dict(type="JoDiffusionSegDataset", dataset_name="voc",
                                         source="synthetic", data_root="data/synthetic/voc"))

    python -m train.segmenter configs/seg/toy_unet_fcn.py --work-dir runs/seg/toy

``source="synthetic"`` reads the generated layout of ``dataset/synthetic.py``
(``img_dir/<split>/*.png`` + ``ann_dir/<split>/*.png``, uint8 class indices, same label space as
the real annotations); ``source="real"`` reads the real split described in
``dataset/<name>_semantic.py`` (image/annotation folders, optional list file, suffixes).

``JoDiffusionIoUMetric`` is mmseg's ``IoUMetric`` that also keeps the last per-class IoU (as
fractions, not percent) so ``models.segmenter.train_and_evaluate`` can return it.
"""
from __future__ import annotations

import os.path as osp
from pathlib import Path

import numpy as np
from mmseg.datasets import BaseSegDataset
from mmseg.evaluation import IoUMetric
from mmseg.registry import DATASETS, METRICS

from dataset import get_dataset_info

SOURCES = ("real", "synthetic")


def dataset_metainfo(dataset_name: str) -> dict:
    """mmseg ``metainfo`` (classes/palette the segmenter predicts) for one of our datasets."""
    info = get_dataset_info(dataset_name)
    return dict(classes=tuple(info.seg_classes), palette=[list(c) for c in info.seg_palette])


@DATASETS.register_module()
class JoDiffusionSegDataset(BaseSegDataset):
    """Real or generated pairs of one of our datasets (``ade20k``, ``voc``, ``coco``, ``toy``).

    Args:
        dataset_name: selects ``dataset.get_dataset_info(name)``.
        source: ``"real"`` (the layout in ``dataset/<name>_semantic.py``) or ``"synthetic"``
            (``img_dir/<split>/*.png``, ``ann_dir/<split>/*.png`` written by
            ``dataset/synthetic.py``).
        split: ``"train"`` or ``"val"`` (for real data, a key of ``info.splits``).
        data_root: the folder; ``None`` = the default of the dataset module (real only).
        Everything else (``pipeline``, ``test_mode``, ``indices``, ...) goes to
        ``BaseSegDataset``; classes, palette, suffixes, list file and ``reduce_zero_label`` are
        taken from the dataset info and must not be passed.
    """

    def __init__(self, dataset_name: str, source: str = "real", split: str = "train",
                 data_root: str | None = None, **kwargs):
        if source not in SOURCES:
            raise ValueError(f"JoDiffusionSegDataset: source must be one of {SOURCES}, got {source!r}")
        clash = sorted(set(kwargs) & {"metainfo", "img_suffix", "seg_map_suffix", "reduce_zero_label",
                                      "data_prefix", "ann_file", "ignore_index"})
        if clash:
            raise ValueError(f"JoDiffusionSegDataset: {', '.join(clash)} come from "
                             f"dataset/{dataset_name}_semantic.py; do not set them in the config")
        info = get_dataset_info(dataset_name, data_root)
        self.dataset_name, self.source, self.split = dataset_name, source, split
        if source == "synthetic":
            if data_root is None:
                raise ValueError("JoDiffusionSegDataset: source='synthetic' needs data_root "
                                 "(the folder dataset/synthetic.py wrote)")
            # the generator always writes PNG pairs, whatever the real images are
            img_dir, ann_dir, list_file = f"img_dir/{split}", f"ann_dir/{split}", None
            img_suffix, seg_map_suffix = ".png", ".png"
        else:
            if split not in info.splits:
                raise ValueError(f"JoDiffusionSegDataset: {dataset_name} has no split {split!r} "
                                 f"(splits: {', '.join(info.splits)})")
            spec = info.splits[split]
            img_dir, ann_dir, list_file = spec.img_dir, spec.ann_dir, spec.list_file
            img_suffix, seg_map_suffix = info.img_suffix, info.seg_map_suffix
        root = info.data_root
        for sub in (img_dir, ann_dir):
            if not (Path(root) / sub).is_dir():
                raise FileNotFoundError(
                    f"JoDiffusionSegDataset({dataset_name}, {source}, {split}): folder "
                    f"{Path(root) / sub} not found; set data_root (e.g. --cfg-options "
                    f"train_dataloader.dataset.data_root=...)")
        ann_file = ""
        if list_file:
            ann_file = list_file  # relative: BaseSegDataset joins it with data_root
            if not (Path(root) / list_file).is_file():
                raise FileNotFoundError(f"JoDiffusionSegDataset: list file {Path(root) / list_file} not found")
        super().__init__(
            ann_file=ann_file,
            img_suffix=img_suffix,
            seg_map_suffix=seg_map_suffix,
            metainfo=dataset_metainfo(dataset_name),
            data_root=root,
            data_prefix=dict(img_path=img_dir, seg_map_path=ann_dir),
            ignore_index=info.ignore_index,
            reduce_zero_label=info.reduce_zero_label,
            **kwargs,
        )

    def load_data_list(self) -> list[dict]:
        data_list = super().load_data_list()
        if self.source == "synthetic":
            # a pair whose mask is not written yet belongs to an unfinished generation run
            data_list = [d for d in data_list if osp.isfile(d["seg_map_path"])]
        else:
            missing = [d["seg_map_path"] for d in data_list if not osp.isfile(d["seg_map_path"])]
            if missing:
                raise FileNotFoundError(f"JoDiffusionSegDataset: {len(missing)} annotation(s) missing, "
                                        f"e.g. {missing[0]}")
        if not data_list:
            raise ValueError(f"JoDiffusionSegDataset({self.dataset_name}, {self.source}, {self.split}): "
                             f"no image/annotation pairs under {self.data_prefix['img_path']}")
        return data_list


@METRICS.register_module()
class JoDiffusionIoUMetric(IoUMetric):
    """``IoUMetric`` that also keeps ``last_result = {"mIoU", "per_class_IoU", "aAcc"}`` in [0, 1].

    mmseg logs per-class values only as a printed table; the benchmark needs them as numbers.
    Classes absent from both prediction and ground truth get NaN (left out of the mean), as in
    mmseg.
    """

    def __init__(self, **kwargs):
        kwargs.setdefault("iou_metrics", ["mIoU"])
        super().__init__(**kwargs)
        self.last_result: dict | None = None

    def compute_metrics(self, results: list) -> dict:
        metrics = super().compute_metrics(results)
        inter, union, _, label_area = (sum(r[i] for r in results) for i in range(4))
        inter, union = inter.double().numpy(), union.double().numpy()
        with np.errstate(invalid="ignore", divide="ignore"):
            iou = inter / union
        names = list(self.dataset_meta["classes"])
        self.last_result = {
            "mIoU": float(np.nanmean(iou)),
            "per_class_IoU": {n: (None if np.isnan(v) else float(v)) for n, v in zip(names, iou)},
            "aAcc": float(inter.sum() / max(float(label_area.sum()), 1.0)),
        }
        return metrics
