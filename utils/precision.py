"""Precision and seeding: the one place both trainers, generation and DiffuMask pick a dtype or
make per-sample generators.

    dtype = weight_dtype(resolve_precision("auto", device))   # fp16 on CUDA, float32 on CPU
    gens = cpu_generators([seed + i for i in range(4)])       # one generator per sample
    torch.Generator().manual_seed(derive_seed(seed, epoch, step, rank))  # one stream per key tuple
"""
from __future__ import annotations

from typing import Iterable

import numpy as np
import torch

# accelerate's mixed_precision names -> the dtype frozen weights and inference run in
PRECISIONS = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_precision(value: str, device: torch.device | str) -> str:
    """``auto`` -> fp16 on a CUDA device, ``no`` elsewhere; other values pass through (checked)."""
    if value == "auto":
        return "fp16" if torch.device(device).type == "cuda" else "no"
    if value not in PRECISIONS:
        raise ValueError(f"mixed precision must be auto, {', '.join(PRECISIONS)}; got {value!r}")
    return value


def weight_dtype(mixed_precision: str) -> torch.dtype:
    """The dtype of frozen weights (and of inference) under an accelerate mixed-precision name."""
    return PRECISIONS.get(mixed_precision, torch.float32)


def cpu_generators(seeds: Iterable[int]) -> list[torch.Generator]:
    """One CPU generator per sample: the noise of sample ``i`` depends on its seed alone, on any
    device, batch or process count (CPU draws, then moved to the device)."""
    return [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]


def derive_seed(*keys: int, bits: int = 63) -> int:
    """A seed from integers through numpy's ``SeedSequence`` hash: independent streams for each
    (seed, what, epoch, step, rank) tuple, so a resumed or re-sharded run draws the same noise.
    ``bits=63``: the top 63 bits of the first 64-bit word (a torch seed); ``bits=32``: its low
    32-bit word, the label VAE trainer's width, kept so its earlier runs reproduce bit for bit."""
    if bits not in (32, 63):
        raise ValueError(f"bits must be 32 or 63, got {bits}")
    word = int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, np.uint64)[0])
    return word >> 1 if bits == 63 else word & 0xFFFFFFFF
