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
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

FOUR_CONNECTED = ndimage.generate_binary_structure(2, 1)  # the cross: up, down, left, right
RING_STRUCTURE = np.ones((3, 3), dtype=bool)  # 3x3 dilation: the ring includes diagonal neighbours


def scaled_threshold(area_threshold: float, height: int, width: int, reference_size: int = 512) -> float:
    """A threshold given in pixels at ``reference_size``² scaled to an HxW mask (area scales with H*W)."""
    return float(area_threshold) * (height * width) / float(reference_size * reference_size)


def optimize_mask(mask: np.ndarray, area_threshold: float, ignore_index: int = 255) -> tuple[np.ndarray, dict]:
    """Relabel every 4-connected component smaller than ``area_threshold`` pixels by its ring's majority.

    Returns ``(new_mask, stats)``; ``mask`` is not modified. ``stats``: ``components`` (all
    components of all classes), ``small_components`` (under the threshold),
    ``changed_components`` and ``changed_pixels``.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"optimize_mask expects an HxW mask, got shape {mask.shape}")
    out = mask.copy()
    stats = {"components": 0, "small_components": 0, "changed_components": 0, "changed_pixels": 0}
    h, w = mask.shape
    for cls in np.unique(mask):
        if cls == ignore_index:
            continue
        labeled, n = ndimage.label(mask == cls, structure=FOUR_CONNECTED)
        stats["components"] += n
        if n == 0:
            continue
        sizes = np.bincount(labeled.ravel(), minlength=n + 1)
        for comp_id, box in enumerate(ndimage.find_objects(labeled), start=1):
            if sizes[comp_id] >= area_threshold:
                continue
            stats["small_components"] += 1
            # work in the component's bounding box grown by one pixel: the ring lives there
            ys = slice(max(box[0].start - 1, 0), min(box[0].stop + 1, h))
            xs = slice(max(box[1].start - 1, 0), min(box[1].stop + 1, w))
            comp = labeled[ys, xs] == comp_id
            ring = ndimage.binary_dilation(comp, structure=RING_STRUCTURE) & ~comp
            votes = mask[ys, xs][ring]
            votes = votes[votes != ignore_index]
            if votes.size == 0:
                continue
            new = np.bincount(votes.astype(np.int64)).argmax()
            if new == cls:
                continue
            out[ys, xs][comp] = new
            stats["changed_components"] += 1
            stats["changed_pixels"] += int(sizes[comp_id])
    return out, stats
