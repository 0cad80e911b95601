"""DiffuMask generation parts: the settings, their checks, one batch's images and class maps,
and the staged files between the passes (the loop over the passes is ``inference/diffumask.py``).

    images, maps = generate_with_maps(load_pipeline(cfg.base_model, device), prompts, words, seeds, cfg)
    save_npy(stage / "000000.npy", store_maps(maps[0]))        # uint8, at most MAP_STORE_SIZE px

``DiffuMaskConfig`` defaults are the paper's settings (SD 1.4, 512 px, 50 steps, guidance 7, 3000
images per class, one class per image).
"""
from __future__ import annotations

import io
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dataset import get_dataset_info
from models.diffumask.affinity import WalkParams
from models.diffumask.attention import AttentionStore, capture_cross_attention, token_weights
from models.diffumask.masks import CRFParams
from models.diffumask.prompts import PromptPlan
from models.diffumask.refine import RefineResult, RefineSpec, load_maps
from utils.io import atomic_write_bytes, check_pipeline_folder, save_image_atomic
from utils.precision import cpu_generators, weight_dtype

MAP_STORE_SIZE = 128  # attention maps come from <= 64x64 grids: 128 px keeps them intact


@dataclass
class DiffuMaskConfig:
    """DiffuMask: masks from Stable Diffusion's cross-attention maps (defaults: the paper's settings)."""

    dataset: str = field(default="voc", metadata={"help": "dataset whose classes to generate"})
    base_model: str = field(default="CompVis/stable-diffusion-v1-4",
                            metadata={"help": "SD hub id or local folder (StableDiffusionPipeline layout)"})
    output_dir: str = field(default="data/synthetic/voc/diffumask", metadata={"help": "where the synthetic set is written"})
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
    crf_workers: int = field(default=-1, metadata={
        "help": "CPU processes per generating process that compute the masks (random walk, dense CRF) "
                "beside generation; -1 = the CPU cores / generating processes, less one; 0 = in the "
                "generating process, one pair at a time. Same bytes either way"})


# settings that change how a run is carried out, not what it writes (left out of dataset.json)
EXECUTION_SETTINGS = ("output_dir", "crf_workers")
BASE_MODEL_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def check_config(cfg: DiffuMaskConfig) -> None:
    """The settings' own ranges and choices; ValueError naming the setting."""
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
    if cfg.num_pairs < 0 or cfg.crf_workers < -1:
        raise ValueError("num_pairs must be >= 0 and crf_workers >= -1")
    if cfg.resolution % 8:
        raise ValueError(f"resolution must be a multiple of 8, got {cfg.resolution}")


def _is_local_path(name: str) -> bool:
    """A hub id is "owner/name"; anything else (absolute, ./, more than one /) is a folder."""
    return Path(name).exists() or not re.fullmatch(r"[\w.-]+/[\w.-]+", name) or name.startswith(".")


def check_base_model(base_model: str) -> None:
    """Cheap checks of a local base-model folder (the files, the weights' headers); ValueError
    "<file>: <problem>". A hub id is left to ``load_pipeline``."""
    if _is_local_path(base_model):
        check_pipeline_folder(base_model, BASE_MODEL_COMPONENTS)


def check_inputs(cfg: DiffuMaskConfig) -> None:
    """Everything that can be checked before a model is loaded or a file written."""
    check_config(cfg)
    get_dataset_info(cfg.dataset)
    PromptPlan.from_dataset(cfg.dataset, cfg.subclass_file or None, cfg.prompt_template, cfg.classes)
    check_base_model(cfg.base_model)


def load_pipeline(base_model: str, device: torch.device, mixed_precision: str = "no"):
    """The base model on ``device`` (fp16 on a GPU when asked, float32 otherwise); ValueError naming it."""
    from diffusers import StableDiffusionPipeline  # here: a slow import, and checks must stay fast

    dtype = weight_dtype("fp16" if mixed_precision == "fp16" and device.type == "cuda" else "no")
    try:
        pipe = StableDiffusionPipeline.from_pretrained(base_model, dtype=dtype, safety_checker=None,
                                                       requires_safety_checker=False)
    except (OSError, ValueError, RuntimeError, KeyError) as e:  # no such folder or hub id, a broken file
        detail = (str(e).strip().splitlines() or [type(e).__name__])[0]
        where = "" if _is_local_path(base_model) else (
            "not a local folder, and the hub (or its local cache, when offline) does not have it; ")
        raise ValueError(f"{base_model}: cannot load the base model ({where}{detail})") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


@torch.no_grad()
def generate_with_maps(pipe, prompts, words, seeds, cfg: DiffuMaskConfig):
    """(images uint8 BxHxWx3, maps float32 BxCxHxW in [0, 1]) for one batch of prompts."""
    weights = token_weights(pipe.tokenizer, prompts, words)
    store = AttentionStore(weights, (cfg.resolution, cfg.resolution), cfg.attention_resolutions,
                           cfg.attention_steps or None, normalization=cfg.map_normalization)
    gens = cpu_generators(seeds)
    with capture_cross_attention(pipe.unet, store):
        out = pipe(list(prompts), num_inference_steps=cfg.num_inference_steps,
                   guidance_scale=cfg.guidance_scale, generator=gens, height=cfg.resolution,
                   width=cfg.resolution, output_type="np")
    images = np.clip(np.rint(np.asarray(out.images) * 255), 0, 255).astype(np.uint8)
    return images, store.maps().numpy()


def store_maps(maps: np.ndarray) -> np.ndarray:
    """Class maps in [0, 1] -> uint8, area-resized to at most ``MAP_STORE_SIZE`` px (how they are staged)."""
    t = torch.from_numpy(maps)[None]
    if t.shape[-1] > MAP_STORE_SIZE:
        t = torch.nn.functional.interpolate(t, size=(MAP_STORE_SIZE, MAP_STORE_SIZE), mode="area")
    return np.rint(t[0].numpy() * 255).astype(np.uint8)


def save_npy(path: Path, array: np.ndarray) -> None:
    """``np.save`` through a temporary name (no pickles)."""
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    atomic_write_bytes(path, buf.getvalue())


class MaskStats:
    """What the refinement of this process did: pairs written, CPU seconds, staged files skipped.
    ``bar`` (a tqdm) is set when pass 3 starts; during generation that pass's own bar shows."""

    def __init__(self, log):
        self.written, self.seconds, self.skipped, self.log, self.bar = 0, 0.0, [], log, None

    def __call__(self, r: RefineResult) -> None:
        if r.skipped:
            self.skipped.append(r.skipped)
            self.log(f"skipped pair {r.index}: {r.skipped} (rerun the command to generate it again)")
        else:
            self.written += 1
            self.seconds += r.seconds
        if self.bar is not None:
            self.bar.update(1)


def crf_workers_auto(num_processes: int) -> int:
    """This process's share of the CPU cores, less one for the process itself (at least 1)."""
    return max(1, len(os.sched_getaffinity(0)) // max(num_processes, 1) - 1)


def walk_params(cfg: DiffuMaskConfig) -> WalkParams:
    return WalkParams(cfg.walk_size, cfg.walk_radius, cfg.walk_beta, cfg.walk_iterations)


def refine_spec(cfg: DiffuMaskConfig, net_path: Path | None) -> RefineSpec:
    """What a refine worker needs of the settings (``net_path``: the learned affinity net, or None)."""
    return RefineSpec(
        out_dir=str(cfg.output_dir), dataset=cfg.dataset, img_suffix=cfg.img_suffix,
        resolution=cfg.resolution, gammas=tuple(float(g) for g in cfg.gammas), refine=cfg.refine,
        affinity_net=str(net_path) if net_path is not None else "",
        walk=walk_params(cfg),
        crf=CRFParams(bilateral_sxy=cfg.crf_bilateral_sxy, bilateral_srgb=cfg.crf_bilateral_srgb,
                      bilateral_compat=cfg.crf_bilateral_compat, iterations=cfg.crf_iterations),
        base_model=cfg.base_model)


def is_staged(writer, i: int) -> bool:
    """Pair ``i`` is written, or its maps and image are on the stage (``attention/``)."""
    stage, name = writer.out / "attention", writer.name(i)
    return writer.is_done(i) or ((stage / f"{name}.npy").is_file() and (stage / f"{name}.png").is_file())


def stage_pair(writer, i: int, image: np.ndarray, maps: np.ndarray) -> None:
    """Put pair ``i``'s class maps (``store_maps``) and image on the stage; the image last, as it
    marks the pair staged."""
    stage, name = writer.out / "attention", writer.name(i)
    save_npy(stage / f"{name}.npy", store_maps(maps))
    save_image_atomic(stage / f"{name}.png", image)


def affinity_samples(writer, num_pairs: int, max_images: int, size: int, log) -> list:
    """(image, maps) of at most ``max_images`` staged pairs spread evenly over the set; a pair that
    does not read is logged and left out."""
    step = max(1, num_pairs // max(max_images, 1))
    samples = []
    for i in [i for i in range(0, num_pairs, step)][:max_images]:
        try:
            samples.append(load_staged(writer, i, size))
        except (OSError, ValueError, SyntaxError) as e:
            log(f"skipped pair {i} for the affinity net: {e}")
    return samples


def load_staged(writer, i: int, size: int):
    """(image, maps) of pair i, from the stage or (already written pairs) from img_dir/."""
    name, stage = writer.name(i), writer.out / "attention"
    img_path = stage / f"{name}.png"
    if not img_path.is_file():
        img_path = writer.img_dir / f"{name}{writer.img_suffix}"
    with Image.open(img_path) as im:
        image = np.array(im.convert("RGB"))
    return image, load_maps(stage / f"{name}.npy", size)


def run_summary(out: Path, num_pairs: int, generated: int, t_gen: float, stats: MaskStats, seconds: float,
                records: list[dict], meta: dict) -> dict:
    """What a run did (``summary.json``, less ``dataset_json``): pairs, seconds, pairs/s, mean gamma
    and agreement of the finished set (``records``: its manifest rows)."""
    return {
        "output_dir": str(out), "num_pairs": num_pairs, "generated_this_run": generated,
        "written_this_run": stats.written, "bad_files": len(stats.skipped), "seconds": round(seconds, 3),
        "seconds_generation": round(t_gen, 3), "seconds_masks": round(stats.seconds, 3),
        "pairs_per_s": round(stats.written / seconds, 4) if stats.written and seconds > 0 else None,
        "mean_gamma": float(np.mean([r["gamma"] for r in records])) if records else None,
        "mean_agreement": float(np.mean([r["agreement"] for r in records])) if records else None,
        "dataset_json": meta,
    }
