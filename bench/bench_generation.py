"""Benchmark: what a generated pair costs next to an image, and how fast masks are optimized.

    python -m bench.bench_generation                      # tiny model, CPU, ~1 minute
    python -m bench.bench_generation --device cuda --unet_channels 320 640 1280 1280 --latent_size 64

1. Joint generation (``JoDiffusionPipeline``, widened UNet) against image-only generation with
   the **unwidened base UNet of the same widths** through diffusers' ``StableDiffusionPipeline``:
   same text encoder, VAE, scheduler (DPM-Solver++), steps, guidance and batch. Both include
   decoding (the joint run decodes the mask too). Reported: pairs/s, images/s and
   ``pair_cost_ratio = images/s / pairs/s`` (target <= 1.05: a pair should cost one image).
   Runs alternate; the ratio uses the fastest of ``--repeats`` calls (on a shared machine
   other jobs only ever add time, so the minimum is the best estimate of the cost itself);
   medians are reported too.
2. ``optimize_mask`` on 512 px masks (a few large regions plus speckle), masks/s per threshold.

Prints and saves ``bench/results/generation.json``.
"""
from __future__ import annotations

import json
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from utils.config import parse_config
from utils.io import atomic_write_json


@dataclass
class BenchGenerationConfig:
    """Joint vs image-only generation speed; mask optimization speed."""

    device: str = field(default="cpu", metadata={"help": "cpu or cuda"})
    dtype: str = field(default="auto", metadata={"help": "auto (fp16 on cuda, fp32 on cpu), fp32, fp16, bf16"})
    unet_channels: list[int] = field(default_factory=lambda: [32, 64], metadata={"help": "UNet block widths"})
    latent_size: int = field(default=8, metadata={"help": "latent side (image side = 4x with the tiny VAE)"})
    batch_size: int = field(default=8, metadata={"help": "prompts per call"})
    steps: int = field(default=10, metadata={"help": "DPM-Solver++ steps"})
    guidance_scale: float = field(default=8.0, metadata={"help": "classifier-free guidance"})
    repeats: int = field(default=9, metadata={"help": "timed calls per pipeline (fastest kept)"})
    mask_size: int = field(default=512, metadata={"help": "mask side for the optimization benchmark"})
    num_masks: int = field(default=20, metadata={"help": "masks timed per threshold"})
    thresholds: list[int] = field(default_factory=lambda: [20, 50, 100], metadata={"help": "area thresholds (px)"})
    cpu_threads: int | None = field(default=None, metadata={"help": "torch threads (default: torch's choice)"})
    output: str = field(default="bench/results/generation.json", metadata={"help": "where the JSON goes"})


def build_pipelines(cfg: BenchGenerationConfig, device, dtype):
    from diffusers import StableDiffusionPipeline

    from dataset.toy_semantic import CLASSES
    from models.joint_unet import widen_unet_for_labels
    from models.label_vae import LabelVAE
    from models.pipeline_jodiffusion import build_jodiffusion_pipeline
    from models.tiny_kit import TinySDSpec, tiny_components

    spec = TinySDSpec(sample_size=cfg.latent_size, unet_channels=tuple(cfg.unet_channels),
                      attention_head_dim=8, norm_num_groups=min(32, min(cfg.unet_channels)))
    comps = tiny_components(list(CLASSES) + ["a", "and", "on"], spec)
    image_pipe = StableDiffusionPipeline(**comps, safety_checker=None, feature_extractor=None,
                                         requires_safety_checker=False)
    joint_unet = type(comps["unet"]).from_config(comps["unet"].config)
    joint_unet.load_state_dict(comps["unet"].state_dict())
    widen_unet_for_labels(joint_unet)
    label_vae = LabelVAE(num_labels=len(CLASSES), encoder_channels=(32, 64, 64), decoder_channels=(64, 64, 64),
                         norm_num_groups=8)
    joint_pipe = build_jodiffusion_pipeline(comps, label_vae, joint_unet, scheduler=comps["scheduler"])
    for p in (image_pipe, joint_pipe):
        p.to(device, dtype)
        p.set_progress_bar_config(disable=True)
    return image_pipe, joint_pipe


def time_call(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def bench_generation(cfg: BenchGenerationConfig) -> dict:
    device = torch.device(cfg.device)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}.get(
        cfg.dtype, torch.float16 if device.type == "cuda" else torch.float32)
    image_pipe, joint_pipe = build_pipelines(cfg, device, dtype)
    prompts = ["a circle and a square"] * cfg.batch_size
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(cfg.batch_size)]  # noqa: E731
    kw = dict(num_inference_steps=cfg.steps, guidance_scale=cfg.guidance_scale)
    runs = {
        "image_only": lambda: image_pipe(prompts, generator=gens(), output_type="np", **kw),
        "joint": lambda: joint_pipe(prompts, generator=gens(), output_type="np", **kw),
    }
    for fn in runs.values():  # warm-up: allocator, kernel choice
        fn()
    times = {k: [] for k in runs}
    for _ in range(cfg.repeats):
        for k, fn in runs.items():
            times[k].append(time_call(fn, device))
    best = {k: min(v) for k, v in times.items()}
    med = {k: statistics.median(v) for k, v in times.items()}
    images_per_s = cfg.batch_size / best["image_only"]
    pairs_per_s = cfg.batch_size / best["joint"]
    return {
        "baseline": "diffusers StableDiffusionPipeline with the unwidened base UNet (same widths, 4 channels)",
        "device": str(device), "dtype": str(dtype).replace("torch.", ""),
        "unet_channels": cfg.unet_channels, "latent_size": cfg.latent_size,
        "image_size": cfg.latent_size * joint_pipe.vae_scale_factor,
        "unet_params": sum(p.numel() for p in joint_pipe.unet.parameters()),
        "batch_size": cfg.batch_size, "steps": cfg.steps, "guidance_scale": cfg.guidance_scale,
        "repeats": cfg.repeats, "seconds_per_call": {k: [round(t, 4) for t in v] for k, v in times.items()},
        "images_per_s": round(images_per_s, 3), "pairs_per_s": round(pairs_per_s, 3),
        "pair_cost_ratio": round(images_per_s / pairs_per_s, 4), "target_ratio": 1.05,
        "pair_cost_ratio_median": round(med["joint"] / med["image_only"], 4),
    }


def synthetic_masks(n: int, size: int, seed: int = 0) -> list[np.ndarray]:
    """Masks shaped like generated ones: ~6 large Voronoi regions, 1% speckle, a little ignore."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    out = []
    for _ in range(n):
        centers = rng.integers(0, size, (6, 2))
        labels = rng.integers(0, 21, 6)
        d = (yy[None] - centers[:, 0, None, None]) ** 2 + (xx[None] - centers[:, 1, None, None]) ** 2
        mask = labels[d.argmin(0)].astype(np.uint8)
        speckle = rng.random((size, size)) < 0.01
        mask[speckle] = rng.integers(0, 21, int(speckle.sum()))
        mask[rng.random((size, size)) < 0.002] = 255
        out.append(mask)
    return out


def bench_mask_optimization(cfg: BenchGenerationConfig) -> dict:
    from utils.mask_optimization import optimize_mask

    masks = synthetic_masks(cfg.num_masks, cfg.mask_size)
    result = {"mask_size": cfg.mask_size, "num_masks": cfg.num_masks, "processes": 1, "per_threshold": {}}
    for thr in cfg.thresholds:
        per_mask, changed = [], 0
        for m in masks:
            t0 = time.perf_counter()
            changed += optimize_mask(m, thr)[1]["changed_components"]
            per_mask.append(time.perf_counter() - t0)
        dt = statistics.median(per_mask) * cfg.num_masks  # median: robust to other jobs' bursts
        result["per_threshold"][str(thr)] = {"masks_per_s": round(cfg.num_masks / dt, 2),
                                             "changed_components_per_mask": round(changed / cfg.num_masks, 1)}
    return result


def main(argv=None) -> dict:
    cfg = parse_config(BenchGenerationConfig, argv, description=__doc__)
    if cfg.cpu_threads:
        torch.set_num_threads(cfg.cpu_threads)
    result = {
        "generation": bench_generation(cfg),
        "mask_optimization": bench_mask_optimization(cfg),
        "machine": {"platform": platform.platform(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(),
                    "gpu": torch.cuda.get_device_name() if cfg.device.startswith("cuda") else None},
    }
    print(json.dumps(result, indent=2))
    atomic_write_json(Path(cfg.output), result)
    return result


if __name__ == "__main__":
    main()
