"""Random-walk refinement of class maps over pixel affinities (in the spirit of AffinityNet).

    walker = ColourAffinity()                        # training-free fallback
    walker = LearnedAffinity(AffinityNet.from_file("affinity.safetensors"))  # or learned
    refined = random_walk_refine(image, maps, walker)         # (C, H, W), max 1 per class

Affinities live on a local neighbourhood (all offsets within ``radius``) at a reduced
resolution ``walk_size`` (AffinityNet works at stride 8: 64x64 for 512 px). The transition
matrix is the row-normalised affinity raised to ``beta``; the maps are propagated ``iterations``
times, upsampled back and re-normalised so a class map's max is 1 again (the threshold gamma
keeps its meaning). Affinities are computed as per-offset tensors, never as an N x N matrix.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def neighbour_offsets(radius: int) -> list[tuple[int, int]]:
    r = int(radius)
    return [(dy, dx) for dy in range(-r, r + 1) for dx in range(-r, r + 1) if dy * dy + dx * dx <= r * r]


def _shifted(x: torch.Tensor, offsets, radius: int) -> torch.Tensor:
    """(..., H, W) -> (..., n_off, H, W): value at (y+dy, x+dx), zero outside the image."""
    h, w = x.shape[-2:]
    p = F.pad(x, (radius, radius, radius, radius))
    return torch.stack([p[..., radius + dy:radius + dy + h, radius + dx:radius + dx + w]
                        for dy, dx in offsets], dim=-3)


def _valid(h: int, w: int, offsets, radius: int) -> torch.Tensor:
    return _shifted(torch.ones(1, h, w), offsets, radius)[0]  # (n_off, H, W)


@dataclass
class WalkParams:
    walk_size: int = 64
    radius: int = 5
    beta: float = 8.0
    iterations: int = 30


class ColourAffinity:
    """exp(-|I_p - I_q|^2 / 2 sigma^2) on RGB in [0, 1]: the training-free fallback."""

    def __init__(self, sigma: float = 0.1):
        self.sigma = sigma

    def __call__(self, image: torch.Tensor, offsets, radius: int) -> torch.Tensor:
        """image (3, h, w) in [0, 1] -> affinities (n_off, h, w) in [0, 1]."""
        d2 = ((_shifted(image, offsets, radius) - image[:, None]) ** 2).sum(0)
        return torch.exp(-d2 / (2 * self.sigma ** 2))


class AffinityNet(nn.Module):
    """A small conv net whose feature distances give affinities: a = exp(-mean |f_p - f_q|)."""

    def __init__(self, width: int = 32, feature_dim: int = 16):
        super().__init__()
        self.width, self.feature_dim = width, feature_dim
        self.body = nn.Sequential(
            nn.Conv2d(5, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=2, dilation=2), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=4, dilation=4), nn.ReLU(),
            nn.Conv2d(width, feature_dim, 1),
        )

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, h, w) in [0, 1] -> (B, D, h, w); pixel coordinates are appended so the
        net can tell far-apart pixels of the same colour."""
        b, _, h, w = images.shape
        ys = torch.linspace(-1, 1, h, device=images.device).view(1, 1, h, 1).expand(b, 1, h, w)
        xs = torch.linspace(-1, 1, w, device=images.device).view(1, 1, 1, w).expand(b, 1, h, w)
        return self.body(torch.cat([images, ys, xs], dim=1))

    def affinities(self, images: torch.Tensor, offsets, radius: int) -> torch.Tensor:
        f = self.features(images)  # (B, D, h, w)
        d = (_shifted(f, offsets, radius) - f[:, :, None]).abs().mean(1)  # (B, n_off, h, w)
        return torch.exp(-d)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.features(images)

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        from utils.io import atomic_path

        with atomic_path(path) as tmp:
            save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(tmp),
                      metadata={"width": str(self.width), "feature_dim": str(self.feature_dim)})

    @classmethod
    def from_file(cls, path: str | Path) -> "AffinityNet":
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        net = cls(int(meta.get("width", 32)), int(meta.get("feature_dim", 16)))
        net.load_state_dict(load_file(str(path)))
        return net.eval()


class LearnedAffinity:
    """Wraps a trained AffinityNet as an affinity function ``(image, offsets, radius)``."""

    def __init__(self, net: AffinityNet):
        self.net = net.eval()

    @torch.no_grad()
    def __call__(self, image: torch.Tensor, offsets, radius: int) -> torch.Tensor:
        return self.net.affinities(image[None], offsets, radius)[0]


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x[None], size=size, mode="area" if x.shape[-1] > size[1] else "bilinear",
                         **({} if x.shape[-1] > size[1] else {"align_corners": False}))[0]


def _walk_grid(h: int, w: int, walk_size: int) -> tuple[int, int]:
    s = min(walk_size / max(h, w), 1.0)
    return max(1, round(h * s)), max(1, round(w * s))


def random_walk_refine(image: np.ndarray, maps: np.ndarray, affinity, params: WalkParams | None = None
                       ) -> np.ndarray:
    """image (H, W, 3) uint8, maps (C, H, W) in [0, 1] -> refined maps (C, H, W), max 1 per class."""
    p = params or WalkParams()
    h, w = image.shape[:2]
    gh, gw = _walk_grid(h, w, p.walk_size)
    img = _resize(torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float() / 255.0, (gh, gw))
    m = _resize(torch.from_numpy(np.asarray(maps, dtype=np.float32)), (gh, gw))
    offsets = neighbour_offsets(p.radius)
    a = affinity(img, offsets, p.radius).float() * _valid(gh, gw, offsets, p.radius)
    t = a.clamp_min(0) ** p.beta
    t = t / t.sum(0, keepdim=True).clamp_min(1e-12)  # row-normalised transition (n_off, h, w)
    for _ in range(p.iterations):
        m = (t[None] * _shifted(m, offsets, p.radius)).sum(1)
    m = F.interpolate(m[None], size=(h, w), mode="bilinear", align_corners=False)[0]
    m = m / m.amax(dim=(1, 2), keepdim=True).clamp_min(1e-12)
    return m.clamp(0, 1).numpy()


class RandomWalker:
    """``(image, maps) -> refined maps`` with fixed affinity and walk settings (for extract_mask)."""

    def __init__(self, affinity, params: WalkParams | None = None):
        self.affinity, self.params = affinity, params or WalkParams()

    def __call__(self, image: np.ndarray, maps: np.ndarray) -> np.ndarray:
        return random_walk_refine(image, maps, self.affinity, self.params)


def affinity_labels(maps: torch.Tensor, high: float, low: float) -> torch.Tensor:
    """(C, h, w) maps -> (h, w) long: class index + 1 where confident, 0 confident background,
    -1 unsure (between ``low`` and ``high``)."""
    best, idx = maps.max(0)
    lab = torch.full_like(idx, -1)
    lab[best >= high] = idx[best >= high] + 1
    lab[best <= low] = 0
    return lab


def train_affinity_net(samples: Sequence[tuple[np.ndarray, np.ndarray]], params: WalkParams | None = None,
                       high: float = 0.7, low: float = 0.2, epochs: int = 3, batch_size: int = 8,
                       lr: float = 1e-3, seed: int = 0, width: int = 32, feature_dim: int = 16,
                       device: str = "cpu", log=None) -> AffinityNet:
    """Train an AffinityNet on (image uint8 HxWx3, maps CxHxW) pairs of the synthetic set.

    Pairs of pixels within ``radius`` that are both confident give labels: same label -> affinity
    1, different -> 0. AffinityNet's balanced loss: background-positive, foreground-positive and
    negative pairs are averaged separately and weighted 1/4, 1/4, 1/2.
    """
    p = params or WalkParams()
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = AffinityNet(width, feature_dim).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    offsets = neighbour_offsets(p.radius)
    imgs, labs = [], []
    for image, maps in samples:
        h, w = image.shape[:2]
        gh, gw = _walk_grid(h, w, p.walk_size)
        imgs.append(_resize(torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float() / 255.0, (gh, gw)))
        labs.append(affinity_labels(_resize(torch.from_numpy(np.asarray(maps, np.float32)), (gh, gw)), high, low))
    if not imgs:
        raise ValueError("no samples to train the affinity net on")
    imgs_t, labs_t = torch.stack(imgs), torch.stack(labs)  # one walk grid for the whole set
    valid = _valid(*labs_t.shape[-2:], offsets, p.radius).to(device)
    for epoch in range(epochs):
        order = torch.randperm(len(imgs_t), generator=g)
        total = 0.0
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            x, lab = imgs_t[idx].to(device), labs_t[idx].to(device)
            a = net.affinities(x, offsets, p.radius).clamp(1e-5, 1 - 1e-5)
            other = _shifted(lab.float(), offsets, p.radius).long()  # (B, n_off, h, w)
            both = (lab[:, None] >= 0) & (other >= 0) & (valid[None] > 0)
            same = lab[:, None] == other
            terms = []
            for sel, loss, weight in (
                (both & same & (lab[:, None] == 0), -torch.log(a), 0.25),
                (both & same & (lab[:, None] > 0), -torch.log(a), 0.25),
                (both & ~same, -torch.log(1 - a), 0.5),
            ):
                if sel.any():
                    terms.append(weight * loss[sel].mean())
            if not terms:
                continue
            loss = sum(terms)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item()
        if log is not None:
            log(f"affinity net epoch {epoch + 1}/{epochs}: loss {total:.4f}")
    return net.cpu().eval()
