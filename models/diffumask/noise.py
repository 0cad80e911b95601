"""DiffuMask noise learning: k-fold cross-validation with a segmenter, keep the best-agreeing pairs.

    source = ResizedPairs.build(PairFiles(folder, records, size=64, num_labels=21), cache_dir)
    scores, fold = kfold_agreement(source, num_labels=21, fit=make_small_segmenter(), folds=3)
    kept = source.good[keep_best(scores[source.good], keep_fraction=0.7)]

Each fold's pairs are predicted by a segmenter trained on the other folds; a pair's score is the
IoU between its mask and that prediction (foreground classes present in either). Pairs whose
mask disagrees with what the rest of the set teaches are the noisy ones.

Nothing holds the set in memory (held whole, pairs at 512 px cost ~7 MB each as decoded and
float images: hundreds of GB for a VOC-sized set of 60k). ``PairFiles`` is a torch Dataset over the file list that decodes and resizes one pair
on load; ``ResizedPairs.build`` runs it once over the set and writes the working-size tensors
to two memory-mapped files (~3 GB for 60k pairs at 64 px), from which every fold's training and
scoring read a batch at a time. Decoding every file anew for each of 30 epochs x 2 folds would
cost ~60x the reads (hours on one core for VOC), so the files are decoded once.

The segmenter is pluggable: ``fit(source, train_indices, num_labels, seed) -> predict``, and
``predict(indices)`` yields ``(index, mask at the pair's own size)``; the default is a few-layer
conv net that trains on CPU in seconds (the mmseg segmenter can be wrapped the same way, reading
``source.records`` for the file paths).
"""
from __future__ import annotations

import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from models.diffumask.data import load_pair, load_pair_mask
from models.diffumask.masks import foreground_iou

Predictor = Callable[[Sequence[int]], Iterator[tuple[int, np.ndarray]]]
Fitter = Callable[["ResizedPairs", np.ndarray, int, int], Predictor]
PREDICT_BATCH = 64  # scoring batch; kept fixed so the held-out logits match batch for batch


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


def resize_image(image: np.ndarray, size: int) -> torch.Tensor:
    """HxWx3 uint8 -> 3 x size x size float in [-1, 1] (antialiased bilinear)."""
    x = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)[None].float() / 127.5 - 1.0
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x[0]


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """HxW labels -> size x size uint8 (nearest)."""
    y = torch.from_numpy(np.asarray(mask).astype(np.int64))[None, None].float()
    return F.interpolate(y, size=(size, size), mode="nearest")[0, 0].numpy().astype(np.uint8)


class PairFiles(Dataset):
    """The pairs of a synthetic set, decoded and resized one at a time.

    Item i: ``(image 3xSxS float32, mask SxS uint8, (H, W), problem)``. A file that cannot be
    decoded, a mask of another size or with labels outside 0..num_labels-1 (other than
    ``ignore_index``) gives zeros and ``problem`` = "<file>: <what>" instead of raising, so one
    bad file among 60k is named and skipped rather than ending the run.
    """

    def __init__(self, folder: str | Path, records: Sequence[dict], size: int, num_labels: int,
                 ignore_index: int = 255):
        self.folder, self.records, self.size = Path(folder), list(records), int(size)
        self.num_labels, self.ignore_index = int(num_labels), int(ignore_index)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        rec, s = self.records[i], self.size
        try:
            image, mask = load_pair(self.folder, rec)
        except (OSError, ValueError, SyntaxError) as e:  # PIL raises all three for broken files
            return np.zeros((3, s, s), np.float32), np.zeros((s, s), np.uint8), (0, 0), str(e)
        problem = ""
        if mask.shape != image.shape[:2]:
            problem = f"{self.folder / rec['mask']}: mask is {mask.shape}, image is {image.shape[:2]}"
        else:
            bad = [int(v) for v in np.unique(mask) if v >= self.num_labels and v != self.ignore_index]
            if bad:
                problem = (f"{self.folder / rec['mask']}: labels {bad[:10]} outside 0..{self.num_labels - 1} "
                           f"and not the ignore label {self.ignore_index}")
        if problem:
            return np.zeros((3, s, s), np.float32), np.zeros((s, s), np.uint8), (0, 0), problem
        return resize_image(image, s).numpy(), resize_mask(mask, s), image.shape[:2], ""


def _open_memmap(path: Path, shape, dtype, mode: str) -> np.ndarray:
    return np.lib.format.open_memmap(str(path), mode=mode, dtype=dtype, shape=shape)


class ResizedPairs:
    """A synthetic set at the segmenter's working size, in memory-mapped files on disk.

    ``x`` (N, 3, S, S) float32, ``y`` (N, S, S) uint8, ``hw`` (N, 2) original sizes, ``problems``
    (one string per pair, "" when good), ``good`` (indices of the good pairs). Reading ``x[idx]``
    copies one batch; the page cache, not the process, holds the rest.
    """

    def __init__(self, files: PairFiles, x: np.ndarray, y: np.ndarray, hw: np.ndarray, problems: list[str]):
        self.files, self.records, self.folder = files, files.records, files.folder
        self.x, self.y, self.hw, self.problems = x, y, hw, problems
        self.good = np.asarray([i for i, p in enumerate(problems) if not p], dtype=np.int64)

    @classmethod
    def build(cls, files: PairFiles, cache_dir: str | Path, batch_size: int = 64, num_workers: int = 0,
              log=None) -> "ResizedPairs":
        """Decode every pair once (``num_workers`` loader processes) into ``cache_dir``."""
        cache_dir = Path(cache_dir)
        cache_dir.mkdir(parents=True, exist_ok=True)
        for stale in cache_dir.glob(".resized.*"):  # left by a killed run
            shutil.rmtree(stale, ignore_errors=True)
        n, s = len(files), files.size
        tmp = Path(tempfile.mkdtemp(prefix=".resized.", dir=cache_dir))
        x = _open_memmap(tmp / "x.npy", (n, 3, s, s), np.float32, "w+")
        y = _open_memmap(tmp / "y.npy", (n, s, s), np.uint8, "w+")
        hw, problems = np.zeros((n, 2), np.int64), [""] * n
        loader = DataLoader(files, batch_size=batch_size, num_workers=num_workers, collate_fn=list)
        start = 0
        for batch in loader:
            for j, (xi, yi, size, problem) in enumerate(batch):
                x[start + j], y[start + j], hw[start + j], problems[start + j] = xi, yi, size, problem
                if problem and log is not None:
                    log(f"skipped {problem}")
            start += len(batch)
        x.flush()
        y.flush()
        del x, y
        return cls(files, _open_memmap(tmp / "x.npy", None, None, "r"),
                   _open_memmap(tmp / "y.npy", None, None, "r"), hw, problems)

    def remove_files(self) -> None:
        """Delete the cache files (the arrays stay readable until released on POSIX)."""
        folder = Path(self.x.filename).parent
        for name in ("x.npy", "y.npy"):
            if (folder / name).exists():
                os.unlink(folder / name)
        os.rmdir(folder)

    def batch(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(images Bx3xSxS channels-last, masks BxSxS int64) of the pairs ``indices``, in that order."""
        idx = np.asarray(indices, dtype=np.int64)
        # channels-last, the layout images decoded as HxWx3 have: conv kernels round differently
        # per layout, and this one gives the scores of the earlier in-memory filter bit for bit
        x = torch.from_numpy(np.ascontiguousarray(self.x[idx])).contiguous(memory_format=torch.channels_last)
        return x, torch.from_numpy(self.y[idx].astype(np.int64))

    def mask(self, i: int) -> np.ndarray:
        """The full-size mask of pair i, read from its file."""
        return load_pair_mask(self.folder, self.records[i])


def make_small_segmenter(epochs: int = 30, batch_size: int = 16, lr: float = 3e-3, train_size: int = 64,
                         width: int = 32, ignore_index: int = 255, device: str = "cpu") -> Fitter:
    """The default ``fit`` for ``kfold_agreement``: trains a SmallSegNet from scratch at the
    source's working size (``train_size`` is what ``PairFiles`` is built with)."""

    def fit(source: ResizedPairs, train: np.ndarray, num_labels: int, seed: int) -> Predictor:
        torch.manual_seed(seed)
        g = torch.Generator().manual_seed(seed)
        net = SmallSegNet(num_labels, width).to(device)
        opt = torch.optim.Adam(net.parameters(), lr=lr)
        steps = epochs * math.ceil(len(train) / batch_size)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1))
        net.train()
        for _ in range(epochs):
            order = torch.randperm(len(train), generator=g)
            for s in range(0, len(order), batch_size):
                idx = order[s:s + batch_size]
                if len(idx) < 2:  # BatchNorm needs more than one sample
                    continue
                flip = torch.rand(1, generator=g).item() < 0.5
                xb, yb = source.batch(train[idx.numpy()])
                xb, yb = xb.to(device), yb.to(device)
                if flip:
                    xb, yb = xb.flip(-1), yb.flip(-1)
                loss = F.cross_entropy(net(xb), yb, ignore_index=ignore_index)
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
        net.eval()

        @torch.no_grad()
        def predict(indices: Sequence[int]) -> Iterator[tuple[int, np.ndarray]]:
            for s in range(0, len(indices), PREDICT_BATCH):
                chunk = list(indices[s:s + PREDICT_BATCH])
                logits = net(source.batch(chunk)[0].to(device))
                for j, i in enumerate(chunk):  # one at a time: full-size logits of 64 pairs are GBs
                    h, w = (int(v) for v in source.hw[i])
                    full = F.interpolate(logits[j:j + 1], size=(h, w), mode="bilinear", align_corners=False)
                    yield i, full[0].argmax(0).cpu().numpy().astype(np.uint8)

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


def kfold_agreement(source: ResizedPairs, num_labels: int, fit: Fitter | None = None, folds: int = 3,
                    seed: int = 0, ignore_index: int = 255, log=None) -> tuple[np.ndarray, np.ndarray]:
    """(scores, fold) per pair of the source: IoU between the pair's mask and the held-out
    prediction. Pairs with a problem take no part: score NaN, fold -1."""
    fit = fit or make_small_segmenter(ignore_index=ignore_index)
    good = source.good
    fold = np.full(len(source.records), -1, dtype=np.int64)
    fold[good] = fold_of(len(good), folds, seed)
    scores = np.full(len(source.records), np.nan, dtype=np.float64)
    for k in range(folds):
        train = good[fold[good] != k]
        held = good[fold[good] == k]
        predict = fit(source, train, num_labels, seed + k)
        for i, p in predict(held):
            scores[i] = foreground_iou(source.mask(i), p, ignore_index)
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
