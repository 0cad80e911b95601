"""DiffuMask augmentation: splice 2x1, 2x2, 3x3 (or 5x5) pairs into one mosaic pair.

    image, mask = make_mosaic([(img_a, mask_a), (img_b, mask_b)], layout=(2, 1), out_size=512)

Tiles are placed row by row at their own size, then the whole sheet is resized to
``out_size`` (bilinear for the image, nearest for the mask), so image and mask stay aligned.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image


def parse_layout(text: str) -> tuple[int, int]:
    """'2x1' -> (columns 2, rows 1)."""
    try:
        cols, rows = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"layout must look like '2x2', got {text!r}") from None
    if cols < 1 or rows < 1 or cols * rows < 2:
        raise ValueError(f"layout {text!r} must splice at least 2 pairs")
    return cols, rows


def make_mosaic(pairs: Sequence[tuple[np.ndarray, np.ndarray]], layout: tuple[int, int],
                out_size: int | tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    cols, rows = layout
    if len(pairs) != cols * rows:
        raise ValueError(f"layout {cols}x{rows} needs {cols * rows} pairs, got {len(pairs)}")
    th, tw = pairs[0][0].shape[:2]
    sheet = np.zeros((rows * th, cols * tw, 3), dtype=np.uint8)
    sheet_mask = np.zeros((rows * th, cols * tw), dtype=np.uint8)
    for k, (img, mask) in enumerate(pairs):
        r, c = divmod(k, cols)
        if img.shape[:2] != (th, tw):  # sources of other sizes are fitted to the first tile
            img = np.asarray(Image.fromarray(img).resize((tw, th), Image.BILINEAR))
            mask = np.asarray(Image.fromarray(mask).resize((tw, th), Image.NEAREST))
        sheet[r * th:(r + 1) * th, c * tw:(c + 1) * tw] = img
        sheet_mask[r * th:(r + 1) * th, c * tw:(c + 1) * tw] = mask
    oh, ow = (out_size, out_size) if isinstance(out_size, int) else out_size
    image = np.asarray(Image.fromarray(sheet).resize((ow, oh), Image.BILINEAR))
    mask = np.asarray(Image.fromarray(sheet_mask).resize((ow, oh), Image.NEAREST))
    return image, mask
