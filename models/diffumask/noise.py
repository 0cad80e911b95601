"""DiffuMask noise learning: k-fold cross-validation with a segmenter, keep the best-agreeing pairs.

    scores = kfold_agreement(images, masks, num_labels, fit=fit_small_segmenter, folds=3)
    kept = keep_best(scores, keep_fraction=0.7)

Each fold's pairs are predicted by a segmenter trained on the other folds; a pair's score is the
IoU between its mask and that prediction (foreground classes present in either). Pairs whose
mask disagrees with what the rest of the set teaches are the noisy ones. The segmenter is
pluggable: ``fit(images, masks, num_labels, seed) -> predict(images) -> masks``; the default is a
few-layer conv net that trains on CPU in seconds (the mmseg segmenter can be wrapped the same way).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from models.diffumask.masks import foreground_iou

Predictor = Callable[[Sequence[np.ndarray]], list[np.ndarray]]
Fitter = Callable[[Sequence[np.ndarray], Sequence[np.ndarray], int, int], Predictor]


class SmallSegNet(nn.Module):
    """Conv net with growing dilation (receptive field ~30 px at the working size)."""

    def __init__(self, num_labels: int, width: int = 32):
        super().__init__()
        layers, c_in = [], 3
        for d in (1, 1, 2, 4, 8):
            layers += [nn.Conv2d(c_in, width, 3, padding=d, dilation=d), nn.BatchNorm2d(width), nn.ReLU()]
            c_in = width
        self.body = nn.Sequential(*layers)
        self.head = nn.Conv2d(width, num_labels, 1)

    def forward(self, x):
        return self.head(self.body(x))


def _to_tensor(images: Sequence[np.ndarray], size: int) -> torch.Tensor:
    x = torch.from_numpy(np.stack([np.array(im, dtype=np.uint8) for im in images])).permute(0, 3, 1, 2).float()
    x = x / 127.5 - 1.0
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x


def make_small_segmenter(epochs: int = 30, batch_size: int = 16, lr: float = 3e-3, train_size: int = 64,
                         width: int = 32, ignore_index: int = 255, device: str = "cpu") -> Fitter:
    """The default ``fit`` for ``kfold_agreement``: trains a SmallSegNet from scratch."""

    def fit(images, masks, num_labels, seed):
        torch.manual_seed(seed)
        g = torch.Generator().manual_seed(seed)
        size = min(train_size, images[0].shape[0])
        x = _to_tensor(images, size)
        y = torch.from_numpy(np.stack([np.asarray(m) for m in masks]).astype(np.int64))[:, None].float()
        y = F.interpolate(y, size=(size, size), mode="nearest")[:, 0].long()
        net = SmallSegNet(num_labels, width).to(device)
        opt = torch.optim.Adam(net.parameters(), lr=lr)
        steps = epochs * math.ceil(len(x) / batch_size)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1))
        net.train()
        for _ in range(epochs):
            order = torch.randperm(len(x), generator=g)
            for s in range(0, len(order), batch_size):
                idx = order[s:s + batch_size]
                if len(idx) < 2:  # BatchNorm needs more than one sample
                    continue
                flip = torch.rand(1, generator=g).item() < 0.5
                xb, yb = x[idx].to(device), y[idx].to(device)
                if flip:
                    xb, yb = xb.flip(-1), yb.flip(-1)
                loss = F.cross_entropy(net(xb), yb, ignore_index=ignore_index)
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
        net.eval()

        @torch.no_grad()
        def predict(imgs):
            out = []
            for s in range(0, len(imgs), 64):
                chunk = imgs[s:s + 64]
                h, w = chunk[0].shape[:2]
                logits = net(_to_tensor(chunk, size).to(device))
                logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
                out += [p.astype(np.uint8) for p in logits.argmax(1).cpu().numpy()]
            return out

        return predict

    return fit


def fold_of(n: int, folds: int, seed: int) -> np.ndarray:
    """Fold index of each of n pairs: a seeded permutation dealt round-robin (sizes differ by <= 1)."""
    if folds < 2:
        raise ValueError(f"cross-validation needs at least 2 folds, got {folds}")
    if n < folds:
        raise ValueError(f"{n} pairs cannot be split into {folds} folds")
    order = np.random.default_rng(seed).permutation(n)
    fold = np.empty(n, dtype=np.int64)
    fold[order] = np.arange(n) % folds
    return fold


def kfold_agreement(images: Sequence[np.ndarray], masks: Sequence[np.ndarray], num_labels: int,
                    fit: Fitter | None = None, folds: int = 3, seed: int = 0,
                    ignore_index: int = 255, log=None) -> tuple[np.ndarray, np.ndarray]:
    """(scores, fold) per pair: IoU between the pair's mask and the held-out prediction."""
    fit = fit or make_small_segmenter(ignore_index=ignore_index)
    fold = fold_of(len(images), folds, seed)
    scores = np.zeros(len(images), dtype=np.float64)
    for k in range(folds):
        train = np.flatnonzero(fold != k)
        held = np.flatnonzero(fold == k)
        predict = fit([images[i] for i in train], [masks[i] for i in train], num_labels, seed + k)
        preds = predict([images[i] for i in held])
        for i, p in zip(held, preds):
            scores[i] = foreground_iou(np.asarray(masks[i]), p, ignore_index)
        if log is not None:
            log(f"fold {k + 1}/{folds}: trained on {len(train)}, mean IoU of held-out {scores[held].mean():.4f}")
    return scores, fold


def keep_best(scores: Sequence[float], keep_fraction: float) -> np.ndarray:
    """Indices of the ceil(fraction * n) best scores (ties broken by index), sorted."""
    if not 0 < keep_fraction <= 1:
        raise ValueError(f"keep_fraction must be in (0, 1], got {keep_fraction}")
    scores = np.asarray(scores, dtype=np.float64)
    n_keep = math.ceil(keep_fraction * len(scores) - 1e-9)
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return np.sort(np.asarray(order[:n_keep], dtype=np.int64))
