"""From normalised class maps to label masks: fixed or adaptive threshold, dense CRF.

    mask, gamma = extract_mask(image, maps, labels, gammas=(0.35, 0.4, 0.45, 0.5, 0.55))

``maps`` is (C, H, W) in [0, 1] (one map per class word, max 1), ``labels`` the C annotation
values. A pixel takes the class with the highest score; it is background (0) when that score is
below gamma. With several gammas the per-image gamma is the one whose dense-CRF mask agrees best
(IoU) with the random-walk mask (DiffuMask's AffinityNet check); the CRF mask at that gamma is
returned.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np


@dataclass
class CRFParams:
    """DiffuMask's dense-CRF settings at 512 px (METHOD.md §7); ``sxy`` scales with image size."""

    gaussian_sxy: float = 3.0
    gaussian_compat: float = 3.0
    bilateral_sxy: float = 80.0
    bilateral_srgb: float = 13.0
    bilateral_compat: float = 10.0
    iterations: int = 10
    reference_size: int = 512


def scores_with_background(maps: np.ndarray, gamma: float) -> np.ndarray:
    """(C+1, H, W): a constant gamma background score in front of the class maps."""
    maps = np.asarray(maps, dtype=np.float32)
    bg = np.full((1,) + maps.shape[1:], gamma, dtype=np.float32)
    return np.concatenate([bg, maps], axis=0)


def labels_from_scores(scores: np.ndarray, labels: Sequence[int]) -> np.ndarray:
    """argmax over [background, classes] -> uint8 mask in annotation values."""
    lut = np.asarray([0] + [int(l) for l in labels], dtype=np.uint8)
    return lut[np.argmax(scores, axis=0)]


def threshold_mask(maps: np.ndarray, labels: Sequence[int], gamma: float) -> np.ndarray:
    """The plain rule: best class where its score >= gamma, else background."""
    return labels_from_scores(scores_with_background(maps, gamma), labels)


def dense_crf(image: np.ndarray, maps: np.ndarray, labels: Sequence[int], gamma: float,
              params: CRFParams | None = None) -> np.ndarray:
    """Dense-CRF refined mask. Unary: -log of the [gamma, maps] scores normalised per pixel, so
    before any pairwise term the CRF's argmax is exactly ``threshold_mask``."""
    import pydensecrf.densecrf as dcrf

    p = params or CRFParams()
    h, w = image.shape[:2]
    scale = max(h, w) / p.reference_size
    probs = scores_with_background(maps, gamma)
    probs = np.clip(probs, 1e-5, None)
    probs = probs / probs.sum(0, keepdims=True)
    n = probs.shape[0]
    crf = dcrf.DenseCRF2D(w, h, n)
    crf.setUnaryEnergy(np.ascontiguousarray(-np.log(probs).reshape(n, -1), dtype=np.float32))
    crf.addPairwiseGaussian(sxy=max(p.gaussian_sxy * scale, 0.5), compat=p.gaussian_compat)
    crf.addPairwiseBilateral(sxy=max(p.bilateral_sxy * scale, 1.0), srgb=p.bilateral_srgb,
                             rgbim=np.array(image, dtype=np.uint8, order="C"), compat=p.bilateral_compat)
    q = np.asarray(crf.inference(p.iterations), dtype=np.float32).reshape(n, h, w)
    lut = np.asarray([0] + [int(l) for l in labels], dtype=np.uint8)
    return lut[np.argmax(q, axis=0)]


def mask_iou(a: np.ndarray, b: np.ndarray, ignore_index: int = 255) -> float:
    """Mean IoU over the labels present in either mask (background included); 1.0 if both empty."""
    valid = (a != ignore_index) & (b != ignore_index)
    present = np.union1d(np.unique(a[valid]), np.unique(b[valid]))
    if present.size == 0:
        return 1.0
    ious = []
    for c in present:
        x, y = (a == c) & valid, (b == c) & valid
        union = np.logical_or(x, y).sum()
        ious.append(np.logical_and(x, y).sum() / union if union else 1.0)
    return float(np.mean(ious))


def foreground_iou(a: np.ndarray, b: np.ndarray, ignore_index: int = 255) -> float:
    """Mean IoU over the foreground labels present in either mask; background only counts when
    neither has foreground (then 1.0)."""
    valid = (a != ignore_index) & (b != ignore_index)
    present = [c for c in np.union1d(np.unique(a[valid]), np.unique(b[valid])) if c != 0]
    if not present:
        return 1.0
    ious = []
    for c in present:
        x, y = (a == c) & valid, (b == c) & valid
        ious.append(np.logical_and(x, y).sum() / max(np.logical_or(x, y).sum(), 1))
    return float(np.mean(ious))


def extract_mask(image: np.ndarray, maps: np.ndarray, labels: Sequence[int],
                 gammas: Sequence[float], refine: str = "crf",
                 random_walk: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
                 crf_params: CRFParams | None = None) -> tuple[np.ndarray, float, dict]:
    """Mask of one image from its class maps.

    ``refine``: "none" (threshold), "crf" (dense CRF). With more than one gamma, ``random_walk``
    (image, maps -> refined maps) must be given: each gamma's mask is compared with the
    random-walk mask at the same gamma and the best-agreeing gamma wins. Returns
    ``(mask uint8 HxW, gamma, info)``; ``info["agreement"]`` is that IoU (1.0 with one gamma).
    """
    gammas = [float(g) for g in gammas]
    if not gammas:
        raise ValueError("at least one gamma is needed")
    if refine not in ("none", "crf"):
        raise ValueError(f"refine must be 'none' or 'crf', got {refine!r}")

    def make(g):
        return dense_crf(image, maps, labels, g, crf_params) if refine == "crf" else threshold_mask(maps, labels, g)

    if len(gammas) == 1:
        return make(gammas[0]), gammas[0], {"agreement": 1.0}
    if random_walk is None:
        raise ValueError("an adaptive gamma needs a random-walk refinement to agree with")
    walked = random_walk(image, maps)
    best = None
    for g in gammas:
        m = make(g)
        score = foreground_iou(m, threshold_mask(walked, labels, g))
        if best is None or score > best[2] + 1e-9:  # ties keep the smaller gamma
            best = (m, g, score)
    return best[0], best[1], {"agreement": best[2]}
