"""Mask optimization (stage 4): small blobs of a generated mask take the label around them.

    python -m inference.optimize_masks --input data/gen/toy --thresholds 20 50 100 --reference_size 512

The rule (METHOD.md §5): for each class present, find its 4-connected components; every
component smaller than ``area_threshold`` pixels takes the most common label of its ring
(its 3x3 dilation minus itself). The edge cases, decided here:

* **Labels are read from the input mask**, not from a mask being rewritten, so the result does
  not depend on the order classes or components are visited (two touching small blobs each see
  the other's original label).
* **Ignore pixels do not vote.** A ring that is all ignore (or empty: a component covering the
  whole image) gives no evidence of another label, so the component is **kept**.
* **Ties** go to the smallest label value (deterministic).
* **The ring's majority may be the component's own class** (same-class pixels touching it only
  diagonally, which 4-connectivity separates): the component then keeps its label, and it
  counts as small but unchanged.
* **Ignore regions themselves are not components** (ignore is not a class): they stay ignore.

How it is computed. Because labels are read from the input, a component's ring and the ring's
majority depend neither on the threshold nor on which other components change; the threshold
only decides which components are small. So ``optimize_mask_thresholds`` labels a mask once
(one OpenCV connected-components call for all classes, see ``label_components``), finds the
ring majority of every component below the largest threshold at once (each of their pixels'
8 neighbours, vectorised: no loop over components), and each threshold then only selects what
changes. The result is
the same, pixel for pixel, as relabelling each component in turn (the test keeps that slow
reference implementation and compares).
"""
from __future__ import annotations

import threading

import cv2
import numpy as np

STAT_KEYS = ("components", "small_components", "changed_components", "changed_pixels")
NEIGHBOURS_8 = tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx)  # the 3x3 ring


def scaled_threshold(area_threshold: float, height: int, width: int, reference_size: int = 512) -> float:
    """A threshold given in pixels at ``reference_size``² scaled to an HxW mask (area scales with H*W)."""
    return float(area_threshold) * (height * width) / float(reference_size * reference_size)


_buffers = threading.local()


def _grid_buffers(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """The grid and its label image, reused while the mask size stays the same (per thread):
    fresh megabyte-sized arrays for every mask cost as much as the labelling itself."""
    cached = getattr(_buffers, "grid", None)
    if cached is None or cached[0].shape != (2 * h - 1, 2 * w - 1):
        grid = np.zeros((2 * h - 1, 2 * w - 1), np.uint8)  # odd-odd positions are never set
        cached = _buffers.grid = (grid, np.empty(grid.shape, np.int32))
    return cached


def label_components(mask: np.ndarray, ignore_index: int = 255) -> tuple[np.ndarray, np.ndarray]:
    """4-connected components of every class at once, numbered across classes.

    Returns ``(ids, size)``: ``ids`` HxW int32 (0 on ignore pixels, 1..n components) and
    ``size[c]`` the pixel count of component ``c`` (index 0: ignore).

    One OpenCV labelling serves all classes: pixels sit at the even positions of a
    (2H-1)x(2W-1) binary grid, and the position between two 4-neighbours is set only when both
    have the same (non-ignore) label, so 4-connected regions of the grid are exactly the
    single-class components (a pass per class would label the whole image once per class).
    """
    h, w = mask.shape
    valid = mask != ignore_index
    grid, grid_ids = _grid_buffers(h, w)
    grid[::2, ::2] = valid
    grid[::2, 1::2] = (mask[:, 1:] == mask[:, :-1]) & valid[:, 1:]
    grid[1::2, ::2] = (mask[1:] == mask[:-1]) & valid[1:]
    n, grid_ids = cv2.connectedComponentsWithAlgorithm(grid, 4, cv2.CV_32S, cv2.CCL_SPAGHETTI, grid_ids)
    ids = np.ascontiguousarray(grid_ids[::2, ::2])
    return ids, np.bincount(ids.ravel(), minlength=n).astype(np.int64)


def _runs(sorted_keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct values of a sorted array and how often each occurs."""
    if sorted_keys.size == 0:
        return sorted_keys, sorted_keys
    starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
    return sorted_keys[starts], np.diff(np.r_[starts, sorted_keys.size])


def ring_majority(mask: np.ndarray, ids: np.ndarray, candidate: np.ndarray, ignore_index: int = 255) -> np.ndarray:
    """The most common non-ignore label of the ring of every component ``c`` with ``candidate[c]``.

    Returns one value per component id: the majority (ties: the smallest label), or -1 for
    components not asked about or whose ring holds no vote. Vectorised over the candidates'
    pixels: each pixel's 8 neighbours outside its own component are its component's ring.
    """
    # a one-pixel frame of id 0 / ignore around the image: neighbours need no bounds checks,
    # and a frame pixel, like an ignore pixel, is outside every component and never votes
    ids_p = np.pad(ids, 1)
    mask_p = np.pad(mask, 1, constant_values=ignore_index)
    w, n_pix = ids_p.shape[1], ids_p.size
    flat_ids, flat_mask = ids_p.ravel(), mask_p.ravel()
    majority = np.full(candidate.size, -1, np.int64)
    pixels = np.flatnonzero(candidate[flat_ids])
    own = flat_ids[pixels].astype(np.int64)
    keys = []  # component * n_pix + ring pixel, for every (component, neighbour outside it) pair
    for dy, dx in NEIGHBOURS_8:
        q = pixels + (dy * w + dx)
        ring = flat_ids[q] != own
        keys.append(own[ring] * n_pix + q[ring])
    comp, pix = np.divmod(_runs(np.sort(np.concatenate(keys)))[0], n_pix)  # each ring pixel once
    votes = flat_mask[pix].astype(np.int64)
    comp, votes = comp[votes != ignore_index], votes[votes != ignore_index]
    if comp.size == 0:
        return majority
    n_labels = int(votes.max()) + 1
    pair, count = _runs(np.sort(comp * n_labels + votes))  # by component, then label
    pc, pl = np.divmod(pair, n_labels)
    starts = np.flatnonzero(np.r_[True, pc[1:] != pc[:-1]])
    best = np.repeat(np.maximum.reduceat(count, starts), np.diff(np.r_[starts, pc.size]))
    top = np.flatnonzero(count == best)  # labels reaching their component's best count, ascending
    first = top[np.r_[True, pc[top][1:] != pc[top][:-1]]]  # the smallest such label
    majority[pc[first]] = pl[first]
    return majority


def optimize_mask_thresholds(mask: np.ndarray, thresholds, ignore_index: int = 255) -> list[tuple[np.ndarray, dict]]:
    """``optimize_mask`` for several area thresholds from one labelling of ``mask``.

    Returns one ``(new_mask, stats)`` per threshold, in order; ``mask`` is not modified.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"optimize_mask expects an HxW mask, got shape {mask.shape}")
    if mask.dtype.kind not in "ui" or (mask.dtype.kind == "i" and mask.size and mask.min() < 0):
        raise ValueError(f"optimize_mask expects non-negative integer labels, got {mask.dtype}")
    thresholds = [float(t) for t in thresholds]
    if mask.size == 0:
        return [(mask.copy(), dict.fromkeys(STAT_KEYS, 0)) for _ in thresholds]
    ids, size = label_components(mask, ignore_index)
    candidate = size < max(thresholds, default=0)
    candidate[0] = False  # id 0: ignore pixels, not a component
    majority = ring_majority(mask, ids, candidate, ignore_index)
    pixels = np.flatnonzero(candidate[ids])
    own = ids.ravel()[pixels]
    label = np.full(size.shape, -1, np.int64)  # the class of each candidate component
    label[own] = mask.ravel()[pixels]
    results = []
    for t in thresholds:
        small = (size < t) & candidate
        change = small & (majority >= 0) & (majority != label)
        out = mask.copy()
        moved = change[own]
        out.ravel()[pixels[moved]] = majority[own[moved]]
        results.append((out, {"components": len(size) - 1, "small_components": int(small.sum()),
                              "changed_components": int(change.sum()),
                              "changed_pixels": int(size[change].sum())}))
    return results


def optimize_mask(mask: np.ndarray, area_threshold: float, ignore_index: int = 255) -> tuple[np.ndarray, dict]:
    """Relabel every 4-connected component smaller than ``area_threshold`` pixels by its ring's majority.

    Returns ``(new_mask, stats)``; ``mask`` is not modified. ``stats``: ``components`` (all
    components of all classes), ``small_components`` (under the threshold),
    ``changed_components`` and ``changed_pixels``.
    """
    return optimize_mask_thresholds(mask, [area_threshold], ignore_index)[0]
