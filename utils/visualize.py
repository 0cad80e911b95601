"""Pictures people would rather look at than read: coloured masks, overlays, grids, loss curves."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from utils.io import atomic_path, save_image_atomic

IGNORE_COLOR = (255, 255, 255)


def colorize(mask: np.ndarray, palette: Sequence[Sequence[int]], ignore_index: int = 255) -> np.ndarray:
    """HxW class indices -> HxWx3 uint8 in the dataset palette; ignore (and out-of-range) -> white."""
    mask = np.asarray(mask).astype(np.int64)
    lut = np.full((256, 3), IGNORE_COLOR, dtype=np.uint8)
    pal = np.asarray(palette, dtype=np.uint8)[:256]
    lut[: len(pal)] = pal
    if 0 <= ignore_index < 256:
        lut[ignore_index] = IGNORE_COLOR
    return lut[np.clip(mask, 0, 255)]


def overlay(image: np.ndarray, mask: np.ndarray, palette, alpha: float = 0.5, ignore_index: int = 255) -> np.ndarray:
    """Blend the coloured mask over an HxWx3 uint8 image."""
    col = colorize(mask, palette, ignore_index).astype(np.float32)
    img = np.asarray(image).astype(np.float32)
    return np.clip((1 - alpha) * img + alpha * col, 0, 255).astype(np.uint8)


def error_map(pred: np.ndarray, target: np.ndarray, ignore_index: int = 255) -> np.ndarray:
    """Black where right, red where wrong, grey where the target is ignored."""
    out = np.zeros(pred.shape + (3,), dtype=np.uint8)
    out[pred != target] = (255, 0, 0)
    out[target == ignore_index] = (128, 128, 128)
    return out


def make_grid(rows: Sequence[Sequence[np.ndarray]], pad: int = 2, scale: int = 1) -> np.ndarray:
    """Tile a list of rows of HxWx3 uint8 tiles (all the same size) into one image."""
    tiles = [[np.asarray(t) for t in r] for r in rows]
    h, w = tiles[0][0].shape[:2]
    ncol = max(len(r) for r in tiles)
    grid = np.full(((h + pad) * len(tiles) + pad, (w + pad) * ncol + pad, 3), 255, dtype=np.uint8)
    for i, r in enumerate(tiles):
        for j, t in enumerate(r):
            if t.ndim == 2:
                t = np.repeat(t[..., None], 3, axis=2)
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            grid[y : y + h, x : x + w] = t[:h, :w]
    if scale > 1:
        grid = grid.repeat(scale, 0).repeat(scale, 1)
    return grid


def save_grid(path: str | Path, rows, pad: int = 2, scale: int = 1) -> None:
    save_image_atomic(path, make_grid(rows, pad=pad, scale=scale))


def plot_curves(metrics_jsonl: str | Path, out_png: str | Path, keys: Sequence[str] = ("loss",),
                x_key: str = "step", title: str | None = None, smooth: int = 1) -> bool:
    """Plot ``keys`` against ``x_key`` from a metrics.jsonl; returns False when there is nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []
    for line in Path(metrics_jsonl).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    drawn = False
    for key in keys:
        pts = [(r[x_key], r[key]) for r in rows if key in r and x_key in r and r[key] is not None]
        if not pts:
            continue
        x, y = map(np.asarray, zip(*pts))
        if smooth > 1 and len(y) >= smooth:
            y = np.convolve(y, np.ones(smooth) / smooth, mode="valid")
            x = x[smooth - 1 :]
        ax.plot(x, y, label=key)
        drawn = True
    if drawn:
        ax.set_xlabel(x_key)
        ax.set_title(title or Path(metrics_jsonl).parent.name)
        ax.legend()
        if all(k.endswith("loss") for k in keys):
            ax.set_yscale("log")
        fig.tight_layout()
        with atomic_path(out_png) as tmp:
            fig.savefig(tmp, format="png")
    plt.close(fig)
    return drawn
