"""Datasets: one source of truth per dataset (``dataset/<name>_semantic.py``), used by every stage.

    from dataset import get_dataset_info
    info = get_dataset_info("voc", data_root="/data/VOCdevkit/VOC2012")
"""
from __future__ import annotations

from dataset.base import DatasetInfo, SplitSpec

DATASET_NAMES = ("ade20k", "voc", "coco", "toy", "toy_web")


def get_dataset_info(name: str, data_root: str | None = None) -> DatasetInfo:
    """The dataset's description; ``data_root`` overrides the default written in its module."""
    if name == "ade20k":
        from dataset.ade20k_semantic import INFO
    elif name == "voc":
        from dataset.voc_semantic import INFO
    elif name == "coco":
        from dataset.coco_semantic import INFO
    elif name == "toy":
        from dataset.toy_semantic import INFO
    elif name == "toy_web":  # captions only (masks all ignore): the toy base model's pretraining corpus
        from dataset.toy_web import INFO
    else:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASET_NAMES)}")
    return INFO.with_root(data_root)


__all__ = ["DatasetInfo", "SplitSpec", "DATASET_NAMES", "get_dataset_info"]
