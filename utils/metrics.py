"""Segmentation metrics shared by every stage (label VAE validation, benchmarks, reports)."""
from __future__ import annotations

import numpy as np


def confusion_matrix(pred, target, num_classes: int, ignore_index: int = 255) -> tuple[np.ndarray, np.ndarray]:
    """Counts over pixels whose target is a valid class.

    Returns ``(cm, missed)``: ``cm[t, p]`` counts target ``t`` predicted as ``p``; ``missed[t]``
    counts target-``t`` pixels whose prediction is outside ``[0, num_classes)`` (e.g. the ignore
    label a low-confidence decode produces): they are errors for class ``t``, no other class.
    """
    pred = np.asarray(pred).reshape(-1).astype(np.int64)
    target = np.asarray(target).reshape(-1).astype(np.int64)
    keep = (target != ignore_index) & (target >= 0) & (target < num_classes)
    pred, target = pred[keep], target[keep]
    in_range = (pred >= 0) & (pred < num_classes)
    cm = np.bincount(target[in_range] * num_classes + pred[in_range], minlength=num_classes**2)
    missed = np.bincount(target[~in_range], minlength=num_classes)
    return cm.reshape(num_classes, num_classes), missed


class IoUAccumulator:
    """Accumulate a confusion matrix over batches; ``result()`` gives mIoU and per-class IoU.

    Classes absent from both targets and predictions get IoU ``None`` and are left out of the
    mean (the usual mmseg convention).
    """

    def __init__(self, num_classes: int, ignore_index: int = 255):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.cm = np.zeros((num_classes, num_classes), dtype=np.int64)
        self.missed = np.zeros(num_classes, dtype=np.int64)

    def update(self, pred, target) -> None:
        cm, missed = confusion_matrix(pred, target, self.num_classes, self.ignore_index)
        self.cm += cm
        self.missed += missed

    def per_class_iou(self) -> np.ndarray:
        tp = np.diag(self.cm).astype(np.float64)
        union = self.cm.sum(1) + self.missed + self.cm.sum(0) - tp
        return np.where(union > 0, tp / np.maximum(union, 1), np.nan)

    def result(self) -> dict:
        iou = self.per_class_iou()
        total = self.cm.sum() + self.missed.sum()
        return {
            "mIoU": float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan"),
            "per_class_IoU": [None if np.isnan(x) else float(x) for x in iou],
            "pixel_acc": float(np.diag(self.cm).sum() / total) if total else float("nan"),
        }


def mean_iou(pred, target, num_classes: int, ignore_index: int = 255) -> dict:
    acc = IoUAccumulator(num_classes, ignore_index)
    acc.update(pred, target)
    return acc.result()
