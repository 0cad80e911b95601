"""DiffuMask generation: images from Stable Diffusion, masks from its own cross-attention.

    python -m inference.diffumask --config configs/diffumask/toy.yaml --output_dir data/diffumask/toy

Three passes over the pair indices, each resumable:
1. generate: per batch, the image and the aggregated class maps (``attention/{name}.npy``,
   uint8, at most 128 px; the image is staged beside it as ``attention/{name}.png``);
2. (``affinity: learned``) train the affinity net on the staged pairs -> ``affinity_net.safetensors``;
3. refine: per pair, the mask (adaptive gamma, dense CRF) -> ``SyntheticWriter`` (the same
   layout and manifest as JoDiffusion's generator); the staged image is then removed. This is
   CPU work and runs in ``crf_workers`` CPU processes (``models/diffumask/refine.py``); when the
   affinities are known before generation (colour affinities, one gamma, or a resumed run whose
   affinity net exists) it runs beside pass 1, so the GPU never waits for the CRF.

``generate_diffumask_dataset(cfg)`` is the in-process entry (benchmarks call it); defaults are
the paper's settings (SD 1.4, 512 px, 50 steps, guidance 7, 3000 images per class, one class
per image).
"""
from __future__ import annotations

import contextlib
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from models.diffumask.refine import RefineJob, RefinePool, RefineResult, RefineSpec, load_maps
from utils.io import check_pipeline_folder

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
    from dataset import get_dataset_info
    from models.diffumask.prompts import PromptPlan

    _check(cfg)
    get_dataset_info(cfg.dataset)
    PromptPlan.from_dataset(cfg.dataset, cfg.subclass_file or None, cfg.prompt_template, cfg.classes)
    check_base_model(cfg.base_model)


def load_pipeline(base_model: str, device: torch.device, mixed_precision: str = "no"):
    from diffusers import StableDiffusionPipeline

    dtype = torch.float16 if (mixed_precision == "fp16" and device.type == "cuda") else torch.float32
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


def _save_npy(path: Path, array: np.ndarray) -> None:
    import io

    from utils.io import atomic_write_bytes

    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    atomic_write_bytes(path, buf.getvalue())


class _MaskStats:
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


def _refine_spec(cfg: DiffuMaskConfig, net_path: Path | None) -> RefineSpec:
    from models.diffumask.affinity import WalkParams
    from models.diffumask.masks import CRFParams

    return RefineSpec(
        out_dir=str(cfg.output_dir), dataset=cfg.dataset, img_suffix=cfg.img_suffix,
        resolution=cfg.resolution, gammas=tuple(float(g) for g in cfg.gammas), refine=cfg.refine,
        affinity_net=str(net_path) if net_path is not None else "",
        walk=WalkParams(cfg.walk_size, cfg.walk_radius, cfg.walk_beta, cfg.walk_iterations),
        crf=CRFParams(bilateral_sxy=cfg.crf_bilateral_sxy, bilateral_srgb=cfg.crf_bilateral_srgb,
                      bilateral_compat=cfg.crf_bilateral_compat, iterations=cfg.crf_iterations),
        base_model=cfg.base_model)


def generate_diffumask_dataset(cfg: DiffuMaskConfig, run=None, progress: bool = True) -> dict:
    """Make (or finish) the DiffuMask synthetic set in ``cfg.output_dir``; returns a summary dict."""
    from accelerate import PartialState
    from tqdm import tqdm

    from dataset import get_dataset_info
    from dataset.synthetic import SyntheticWriter, batches, pair_seed, shard
    from models.diffumask.prompts import PromptPlan

    _check(cfg)
    t_start = time.time()
    log = run.log if run is not None else (lambda m: None)
    state = PartialState()
    main = state.is_main_process
    info = get_dataset_info(cfg.dataset)
    plan = PromptPlan.from_dataset(cfg.dataset, cfg.subclass_file or None, cfg.prompt_template, cfg.classes)
    num_pairs = cfg.num_pairs or cfg.images_per_class * len(plan.classes)
    out = Path(cfg.output_dir)
    writer = SyntheticWriter(out, cfg.dataset, img_suffix=cfg.img_suffix)
    (out / "attention").mkdir(parents=True, exist_ok=True)
    prompts = {i: plan.prompt_for(i, cfg.images_per_class, cfg.seed, cfg.classes_per_image)
               for i in range(num_pairs)}

    def job(i: int) -> RefineJob:
        prompt, words, labels = prompts[i]
        return RefineJob(i, prompt, tuple(words), tuple(labels), pair_seed(cfg.seed, i))

    my_batches = shard(batches(range(num_pairs), cfg.batch_size), state.process_index, state.num_processes)
    workers = cfg.crf_workers if cfg.crf_workers >= 0 else crf_workers_auto(state.num_processes)
    log(f"masks in {workers} CPU worker processes (0: inline)")
    net_path = out / "affinity_net.safetensors"
    learned = len(cfg.gammas) > 1 and cfg.affinity == "learned"
    todo_masks = sum(not writer.is_done(i) for b in my_batches for i in b)
    stats = _MaskStats(log)
    with contextlib.ExitStack() as stack:
        pool = None
        if workers > 0 and (not learned or net_path.is_file()):  # masks beside generation
            pool = stack.enter_context(RefinePool(_refine_spec(cfg, net_path if learned else None),
                                                  workers, stats))
        generated, t_gen = _generate_pass(cfg, state, my_batches, prompts, writer, pool, job, run, progress)
        if learned:
            _train_affinity_pass(cfg, state, writer, num_pairs, net_path, log)
        if pool is None:
            pool = stack.enter_context(RefinePool(_refine_spec(cfg, net_path if learned else None),
                                                  workers, stats))
        stats.bar = stack.enter_context(tqdm(total=todo_masks, initial=stats.written + len(stats.skipped),
                                             desc="diffumask masks", disable=not (progress and main)))
        for i in [i for b in my_batches for i in b if not writer.is_done(i) and i not in pool.submitted]:
            pool.submit(job(i))
    state.wait_for_everyone()

    meta = {}
    settings = {k: v for k, v in vars(cfg).items() if k not in EXECUTION_SETTINGS}
    if main:
        try:
            meta = writer.finalize(info, "diffumask", settings, expected=num_pairs)
        except RuntimeError as e:  # pairs missing: staged files that could not be read were dropped
            raise ValueError(str(e)) from None
    seconds = time.time() - t_start
    records = writer.records() if main else []
    summary = {
        "output_dir": str(out), "num_pairs": num_pairs, "generated_this_run": generated,
        "written_this_run": stats.written, "bad_files": len(stats.skipped), "seconds": round(seconds, 3),
        "seconds_generation": round(t_gen, 3), "seconds_masks": round(stats.seconds, 3),
        "pairs_per_s": round(stats.written / seconds, 4) if stats.written and seconds > 0 else None,
        "mean_gamma": float(np.mean([r["gamma"] for r in records])) if records else None,
        "mean_agreement": float(np.mean([r["agreement"] for r in records])) if records else None,
        "dataset_json": meta,
    }
    log(f"diffumask: {summary['written_this_run']} pairs written in {seconds:.1f}s "
        f"({summary['pairs_per_s']} pairs/s)")
    return summary


def _generate_pass(cfg, state, my_batches, prompts, writer, pool, job, run, progress) -> tuple[int, float]:
    """Pass 1: images and attention maps; a batch is redone whole so its pairs match a clean run.
    Each newly staged pair is offered to ``pool`` (if any), which refines it beside generation."""
    from tqdm import tqdm

    from dataset.synthetic import pair_seed
    from utils.io import save_image_atomic

    stage, name = Path(cfg.output_dir) / "attention", writer.name

    def staged(i):
        return writer.is_done(i) or ((stage / f"{name(i)}.npy").is_file() and (stage / f"{name(i)}.png").is_file())

    todo = [b for b in my_batches if not all(staged(i) for i in b)]
    generated, t_gen = 0, 0.0
    if todo:
        pipe = load_pipeline(cfg.base_model, state.device, cfg.mixed_precision)
        for batch in tqdm(todo, desc="diffumask generate", disable=not (progress and state.is_main_process)):
            t0 = time.time()
            images, maps = generate_with_maps(pipe, [prompts[i][0] for i in batch], [prompts[i][1] for i in batch],
                                              [pair_seed(cfg.seed, i) for i in batch], cfg)
            for j, i in enumerate(batch):
                if staged(i):
                    continue
                _save_npy(stage / f"{name(i)}.npy", _store_maps(maps[j]))
                save_image_atomic(stage / f"{name(i)}.png", images[j])  # last: marks the pair staged
                generated += 1
                if pool is not None:
                    pool.offer(job(i))
            t_gen += time.time() - t0
            if run is not None:
                run.log_metrics(stage="generate", pairs=generated, seconds=round(t_gen, 3))
        del pipe
    state.wait_for_everyone()
    return generated, t_gen


def _train_affinity_pass(cfg, state, writer, num_pairs: int, net_path: Path, log) -> None:
    """Pass 2 (main process): the AffinityNet, on staged pairs spread over the whole set."""
    from models.diffumask.affinity import WalkParams, train_affinity_net

    if state.is_main_process and not net_path.is_file():
        step = max(1, num_pairs // max(cfg.affinity_max_images, 1))
        idx = [i for i in range(0, num_pairs, step)][:cfg.affinity_max_images]
        samples = []
        for i in idx:
            try:
                samples.append(_load_staged(writer, i, cfg.resolution))
            except (OSError, ValueError, SyntaxError) as e:
                log(f"skipped pair {i} for the affinity net: {e}")
        t0 = time.time()
        walk = WalkParams(cfg.walk_size, cfg.walk_radius, cfg.walk_beta, cfg.walk_iterations)
        net = train_affinity_net(samples, walk, cfg.affinity_high, cfg.affinity_low, epochs=cfg.affinity_epochs,
                                 seed=cfg.seed, device=str(state.device), log=log)
        net.save(net_path)
        log(f"affinity net trained on {len(samples)} images in {time.time() - t0:.1f}s")
    state.wait_for_everyone()


def _load_staged(writer, i: int, size: int):
    """(image, maps) of pair i, from the stage or (already written pairs) from img_dir/."""
    from PIL import Image

    name, stage = writer.name(i), writer.out / "attention"
    img_path = stage / f"{name}.png"
    if not img_path.is_file():
        img_path = writer.img_dir / f"{name}{writer.img_suffix}"
    with Image.open(img_path) as im:
        image = np.array(im.convert("RGB"))
    return image, load_maps(stage / f"{name}.npy", size)
