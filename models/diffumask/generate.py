"""DiffuMask generation: images from Stable Diffusion, masks from its own cross-attention.

    python -m inference.diffumask --config configs/diffumask/toy.yaml --output_dir data/diffumask/toy

Three passes over the pair indices, each resumable:
1. generate: per batch, the image and the aggregated class maps (``attention/{name}.npy``,
   uint8, at most 128 px; the image is staged beside it as ``attention/{name}.png``);
2. (``affinity: learned``) train the affinity net on the staged pairs -> ``affinity_net.safetensors``;
3. refine: per pair, the mask (adaptive gamma, dense CRF) -> ``SyntheticWriter`` (the same
   layout and manifest as JoDiffusion's generator); the staged image is then removed.

``generate_diffumask_dataset(cfg)`` is the in-process entry (benchmarks call it); defaults are
the paper's settings (SD 1.4, 512 px, 50 steps, guidance 7, 3000 images per class, one class
per image).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

MAP_STORE_SIZE = 128  # attention maps come from <= 64x64 grids: 128 px keeps them intact


@dataclass
class DiffuMaskConfig:
    """DiffuMask: masks from Stable Diffusion's cross-attention maps (defaults: the paper's settings)."""

    dataset: str = field(default="voc", metadata={"help": "dataset whose classes to generate"})
    base_model: str = field(default="CompVis/stable-diffusion-v1-4",
                            metadata={"help": "SD hub id or local folder (StableDiffusionPipeline layout)"})
    output_dir: str = field(default="data/diffumask/voc", metadata={"help": "where the synthetic set is written"})
    subclass_file: str = field(default="", metadata={"help": "JSON: class -> sub-classes (or {word, subclasses})"})
    prompt_template: str = field(default="Photo of a {subclass} {word}", metadata={"help": "prompt template"})
    classes: list[str] = field(default_factory=list, metadata={"help": "subset of class names; empty = all"})
    images_per_class: int = field(default=3000, metadata={"help": "pairs per class (paper: 3000)"})
    num_pairs: int = field(default=0, metadata={"help": "total pairs; 0 = images_per_class x classes"})
    classes_per_image: int = field(default=1, metadata={"help": "classes named per prompt (paper: 1)"})
    resolution: int = field(default=512, metadata={"help": "image side in pixels"})
    num_inference_steps: int = field(default=50, metadata={"help": "denoising steps"})
    guidance_scale: float = field(default=7.0, metadata={"help": "classifier-free guidance scale"})
    batch_size: int = field(default=4, metadata={"help": "prompts per pipeline call"})
    seed: int = field(default=0, metadata={"help": "base seed; pair i uses pair_seed(seed, i)"})
    attention_resolutions: list[int] = field(default_factory=lambda: [16, 32, 64],
                                             metadata={"help": "latent-grid sides to average; empty = all"})
    attention_steps: list[int] = field(default_factory=list,
                                       metadata={"help": "step indices to average (0-based); empty = all"})
    map_normalization: str = field(default="max", metadata={
        "help": "final per-class map scaling: 'max' (DiffuMask: x / max) or 'minmax' ((x - min) / (max - min))"})
    gammas: list[float] = field(default_factory=lambda: [0.35, 0.4, 0.45, 0.5, 0.55],
                                metadata={"help": "threshold grid; one value = fixed threshold"})
    refine: str = field(default="crf", metadata={"help": "'crf' (dense CRF) or 'none' (threshold only)"})
    affinity: str = field(default="learned", metadata={"help": "random-walk affinities: 'learned' or 'colour'"})
    walk_size: int = field(default=64, metadata={"help": "random-walk grid side (AffinityNet: image/8)"})
    walk_radius: int = field(default=5, metadata={"help": "random-walk neighbourhood radius"})
    walk_beta: float = field(default=8.0, metadata={"help": "affinity exponent"})
    walk_iterations: int = field(default=30, metadata={"help": "random-walk propagation steps"})
    affinity_epochs: int = field(default=3, metadata={"help": "affinity-net training epochs"})
    affinity_max_images: int = field(default=2000, metadata={"help": "images the affinity net trains on"})
    affinity_high: float = field(default=0.7, metadata={"help": "map value above which a pixel is confident fg"})
    affinity_low: float = field(default=0.2, metadata={"help": "map value below which a pixel is confident bg"})
    crf_bilateral_sxy: float = field(default=80.0, metadata={"help": "CRF bilateral sxy at 512 px (scaled)"})
    crf_bilateral_srgb: float = field(default=13.0, metadata={"help": "CRF bilateral srgb"})
    crf_bilateral_compat: float = field(default=10.0, metadata={"help": "CRF bilateral compat"})
    crf_iterations: int = field(default=10, metadata={"help": "CRF mean-field iterations"})
    mixed_precision: str = field(default="fp16", metadata={"help": "'fp16' on GPU or 'no'"})
    img_suffix: str = field(default=".png", metadata={"help": ".png or .jpg"})


def _check(cfg: DiffuMaskConfig) -> None:
    if cfg.refine not in ("crf", "none"):
        raise ValueError(f"refine must be 'crf' or 'none', got {cfg.refine!r}")
    if cfg.map_normalization not in ("max", "minmax"):
        raise ValueError(f"map_normalization must be 'max' or 'minmax', got {cfg.map_normalization!r}")
    if cfg.affinity not in ("learned", "colour"):
        raise ValueError(f"affinity must be 'learned' or 'colour', got {cfg.affinity!r}")
    if not cfg.gammas or any(not 0 < g < 1 for g in cfg.gammas):
        raise ValueError(f"gammas must be values in (0, 1), got {cfg.gammas}")
    if cfg.images_per_class < 1 or cfg.batch_size < 1 or cfg.classes_per_image < 1:
        raise ValueError("images_per_class, batch_size and classes_per_image must be >= 1")
    if cfg.resolution % 8:
        raise ValueError(f"resolution must be a multiple of 8, got {cfg.resolution}")


def load_pipeline(base_model: str, device: torch.device, mixed_precision: str = "no"):
    from diffusers import StableDiffusionPipeline

    dtype = torch.float16 if (mixed_precision == "fp16" and device.type == "cuda") else torch.float32
    pipe = StableDiffusionPipeline.from_pretrained(base_model, dtype=dtype, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


@torch.no_grad()
def generate_with_maps(pipe, prompts, words, seeds, cfg: DiffuMaskConfig):
    """(images uint8 BxHxWx3, maps float32 BxCxHxW in [0, 1]) for one batch of prompts."""
    from models.diffumask.attention import AttentionStore, capture_cross_attention, token_weights

    weights = token_weights(pipe.tokenizer, prompts, words)
    store = AttentionStore(weights, (cfg.resolution, cfg.resolution), cfg.attention_resolutions,
                           cfg.attention_steps or None, normalization=cfg.map_normalization)
    gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    with capture_cross_attention(pipe.unet, store):
        out = pipe(list(prompts), num_inference_steps=cfg.num_inference_steps,
                   guidance_scale=cfg.guidance_scale, generator=gens, height=cfg.resolution,
                   width=cfg.resolution, output_type="np")
    images = np.clip(np.rint(np.asarray(out.images) * 255), 0, 255).astype(np.uint8)
    return images, store.maps().numpy()


def _store_maps(maps: np.ndarray) -> np.ndarray:
    t = torch.from_numpy(maps)[None]
    if t.shape[-1] > MAP_STORE_SIZE:
        t = torch.nn.functional.interpolate(t, size=(MAP_STORE_SIZE, MAP_STORE_SIZE), mode="area")
    return np.rint(t[0].numpy() * 255).astype(np.uint8)


def load_maps(path: Path, size: int) -> np.ndarray:
    """Stored uint8 maps -> (C, size, size) float32 in [0, 1] with max 1 per class."""
    t = torch.from_numpy(np.load(path, allow_pickle=False).astype(np.float32) / 255.0)[None]
    if t.shape[-1] != size:
        t = torch.nn.functional.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)
    t = t[0] / t[0].amax(dim=(1, 2), keepdim=True).clamp_min(1e-12)
    return t.clamp(0, 1).numpy()


def _save_npy(path: Path, array: np.ndarray) -> None:
    import io

    from utils.io import atomic_write_bytes

    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    atomic_write_bytes(path, buf.getvalue())


def generate_diffumask_dataset(cfg: DiffuMaskConfig, run=None, progress: bool = True) -> dict:
    """Make (or finish) the DiffuMask synthetic set in ``cfg.output_dir``; returns a summary dict."""
    from accelerate import PartialState
    from PIL import Image
    from tqdm import tqdm

    from dataset import get_dataset_info
    from dataset.synthetic import SyntheticWriter, batches, pair_seed, shard
    from models.diffumask.affinity import (AffinityNet, ColourAffinity, LearnedAffinity, RandomWalker,
                                           WalkParams, train_affinity_net)
    from models.diffumask.masks import CRFParams, extract_mask
    from models.diffumask.prompts import PromptPlan
    from utils.io import save_image_atomic

    _check(cfg)
    t_start = time.time()
    log = run.log if run is not None else (lambda m: None)
    state = PartialState()
    rank, world, main = state.process_index, state.num_processes, state.is_main_process
    info = get_dataset_info(cfg.dataset)
    plan = PromptPlan.from_dataset(cfg.dataset, cfg.subclass_file or None, cfg.prompt_template, cfg.classes)
    num_pairs = cfg.num_pairs or cfg.images_per_class * len(plan.classes)
    out = Path(cfg.output_dir)
    writer = SyntheticWriter(out, cfg.dataset, img_suffix=cfg.img_suffix)
    stage = out / "attention"
    stage.mkdir(parents=True, exist_ok=True)
    name = SyntheticWriter.name

    def staged(i):
        return writer.is_done(i) or ((stage / f"{name(i)}.npy").is_file() and (stage / f"{name(i)}.png").is_file())

    prompts = {i: plan.prompt_for(i, cfg.images_per_class, cfg.seed, cfg.classes_per_image)
               for i in range(num_pairs)}

    # pass 1: images and attention maps; a batch is redone whole so its pairs match a clean run
    my_batches = shard(batches(range(num_pairs), cfg.batch_size), rank, world)
    todo = [b for b in my_batches if not all(staged(i) for i in b)]
    generated, t_gen = 0, 0.0
    if todo:
        pipe = load_pipeline(cfg.base_model, state.device, cfg.mixed_precision)
        for batch in tqdm(todo, desc="diffumask generate", disable=not (progress and main)):
            t0 = time.time()
            images, maps = generate_with_maps(pipe, [prompts[i][0] for i in batch],
                                              [prompts[i][1] for i in batch],
                                              [pair_seed(cfg.seed, i) for i in batch], cfg)
            for j, i in enumerate(batch):
                if staged(i):
                    continue
                _save_npy(stage / f"{name(i)}.npy", _store_maps(maps[j]))
                save_image_atomic(stage / f"{name(i)}.png", images[j])  # last: marks the pair staged
                generated += 1
            t_gen += time.time() - t0
            if run is not None:
                run.log_metrics(stage="generate", pairs=generated, seconds=round(t_gen, 3))
        del pipe
    state.wait_for_everyone()

    # pass 2: the random-walk affinities
    walk = WalkParams(cfg.walk_size, cfg.walk_radius, cfg.walk_beta, cfg.walk_iterations)
    net_path = out / "affinity_net.safetensors"
    if len(cfg.gammas) > 1 and cfg.affinity == "learned":
        if main and not net_path.is_file():
            step = max(1, num_pairs // max(cfg.affinity_max_images, 1))
            idx = [i for i in range(0, num_pairs, step)][:cfg.affinity_max_images]
            samples = [_load_staged(out, writer, stage, i, cfg.resolution) for i in idx]
            t0 = time.time()
            net = train_affinity_net(samples, walk, cfg.affinity_high, cfg.affinity_low,
                                     epochs=cfg.affinity_epochs, seed=cfg.seed,
                                     device=str(state.device), log=log)
            net.save(net_path)
            log(f"affinity net trained on {len(samples)} images in {time.time() - t0:.1f}s")
        state.wait_for_everyone()
        affinity = LearnedAffinity(AffinityNet.from_file(net_path))
    else:
        affinity = ColourAffinity()
    walker = RandomWalker(affinity, walk)
    crf = CRFParams(bilateral_sxy=cfg.crf_bilateral_sxy, bilateral_srgb=cfg.crf_bilateral_srgb,
                    bilateral_compat=cfg.crf_bilateral_compat, iterations=cfg.crf_iterations)

    # pass 3: masks -> the shared synthetic layout
    written, t_ref = 0, 0.0
    mine = [i for b in my_batches for i in b if not writer.is_done(i)]
    for i in tqdm(mine, desc="diffumask masks", disable=not (progress and main)):
        t0 = time.time()
        with Image.open(stage / f"{name(i)}.png") as im:
            image = np.array(im.convert("RGB"))
        maps = load_maps(stage / f"{name(i)}.npy", cfg.resolution)
        prompt, words, labels = prompts[i]
        mask, gamma, extra = extract_mask(image, maps, labels, cfg.gammas, cfg.refine, walker, crf)
        writer.write_pair(i, image, mask, {
            "prompt": prompt, "seed": pair_seed(cfg.seed, i), "class_words": words,
            "class_labels": labels, "gamma": gamma, "agreement": round(extra["agreement"], 6),
            "generator": "diffumask", "base_model": cfg.base_model,
        })
        (stage / f"{name(i)}.png").unlink()  # the same bytes now live in img_dir/
        written += 1
        t_ref += time.time() - t0
    state.wait_for_everyone()

    meta = {}
    settings = {k: v for k, v in vars(cfg).items() if k != "output_dir"}
    if main:
        meta = writer.finalize(info, "diffumask", settings, expected=num_pairs)
    seconds = time.time() - t_start
    records = writer.records() if main else []
    summary = {
        "output_dir": str(out), "num_pairs": num_pairs, "generated_this_run": generated,
        "written_this_run": written, "seconds": round(seconds, 3),
        "seconds_generation": round(t_gen, 3), "seconds_masks": round(t_ref, 3),
        "pairs_per_s": round(written / seconds, 4) if written and seconds > 0 else None,
        "mean_gamma": float(np.mean([r["gamma"] for r in records])) if records else None,
        "mean_agreement": float(np.mean([r["agreement"] for r in records])) if records else None,
        "dataset_json": meta,
    }
    log(f"diffumask: {summary['written_this_run']} pairs written in {seconds:.1f}s "
        f"({summary['pairs_per_s']} pairs/s)")
    return summary


def _load_staged(out: Path, writer, stage: Path, i: int, size: int):
    """(image, maps) of pair i, from the stage or (already written pairs) from img_dir/."""
    from PIL import Image

    name = writer.name(i)
    img_path = stage / f"{name}.png"
    if not img_path.is_file():
        img_path = writer.img_dir / f"{name}{writer.img_suffix}"
    with Image.open(img_path) as im:
        image = np.array(im.convert("RGB"))
    return image, load_maps(stage / f"{name}.npy", size)
