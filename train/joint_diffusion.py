"""Stage 2: train the joint image + label diffusion UNet (or, with ``--mode image``, a plain SD UNet).

    accelerate launch --multi_gpu --num_processes 4 -m train.joint_diffusion \
        --dataset ade20k --pretrained_model runs/ade20k/jodiffusion_init --output_dir runs/ade20k/joint

``--pretrained_model`` is a JoDiffusion pipeline folder written by ``inference.jodiffusion`` (the
weight-initialisation step), or any SD folder / hub id plus ``--label_vae`` (the UNet is then
widened here). Frozen: image VAE, label VAE, text encoder (cast to the weight dtype). Trained: the
UNet, epsilon loss in fp32 over both latent halves, one shared timestep, captions dropped to the
empty prompt with probability ``caption_dropout`` for classifier-free guidance. Attention runs
through PyTorch SDPA (diffusers' default ``AttnProcessor2_0``; no xformers needed).

Defaults are the authors' recipe (METHOD.md §3): 512 px, lr 5e-5 constant, batch 8 per GPU x 4
GPUs = 32, fp16, 8-bit AdamW, grad clip 1, 100 epochs, a checkpoint every 1000 steps.
The run folder gets ``config.yaml``, ``log.txt``, ``metrics.jsonl``, ``checkpoint-N/``,
``validation/step-N.png`` and, at the end, ``pipeline/`` (``save_pretrained`` layout, EMA weights
when ``--use_ema``): a JoDiffusionPipeline, or in image mode a StableDiffusionPipeline that
``inference.jodiffusion --base_model <output_dir>/pipeline`` widens next. Data order, noise and timesteps depend only on (seed, step), so a run
stopped and resumed with ``--resume_from_checkpoint latest`` ends with the same weights.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from models.joint_unet import joint_epsilon_loss, min_snr_weights, widen_unet_for_labels
from utils.config import die, error_line, parse_config
from utils.checkpoints import (
    BadFiles,
    SkippedSteps,
    checkpoint_step,
    find_checkpoint,
    load_training_state,
    map_safetensors,
    save_checkpoint,
)
from utils.io import RunDir, check_pipeline_folder, check_weights_file


@dataclass
class JointDiffusionConfig:
    """Joint (image + label) latent diffusion training; ``--mode image`` trains a plain text-to-image UNet."""

    mode: str = field(default="joint", metadata={"help": "joint (image + label latents) or image (image only)"})
    pretrained_model: str = field(default="runs/ade20k/jodiffusion_init",
                                  metadata={"help": "pipeline folder from inference.jodiffusion, or an SD folder / hub id"})
    label_vae: str | None = field(default=None, metadata={"help": "label VAE folder (default: <pretrained_model>/label_vae)"})
    dataset: str = field(default="ade20k", metadata={"help": "dataset name (dataset/<name>_semantic.py)"})
    data_root: str | None = field(default=None, metadata={"help": "override the dataset's data_root"})
    split: str = field(default="train", metadata={"help": "split to train on"})
    captions: str = field(default="auto", metadata={"help": "auto, file or class_names"})
    output_dir: str = field(default="runs/ade20k/joint_diffusion", metadata={"help": "run folder"})
    resolution: int = field(default=512, metadata={"help": "training resolution (paper: 512)"})
    augment: bool = field(default=True, metadata={"help": "random crop + flip (with --cache_latents: centre crop, both flips cached)"})
    augment_views: str = field(default="flip", metadata={
        "help": "with --augment: flip (horizontal flips, for photos) or dihedral (the 8 rotations and flips, "
                "for data with no up or down such as the toy shapes; --cache_latents caches all 8)"})
    train_batch_size: int = field(default=8, metadata={"help": "per-device batch (paper: 8 x 4 GPUs = 32)"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "micro-batches per optimiser step"})
    num_train_epochs: int = field(default=100, metadata={"help": "epochs (paper: 100 ADE20K/VOC, 20 COCO)"})
    max_train_steps: int = field(default=0, metadata={"help": "optimiser steps; 0 = from num_train_epochs"})
    learning_rate: float = field(default=5e-5, metadata={"help": "paper: 5e-5"})
    lr_scheduler: str = field(default="constant", metadata={"help": "diffusers get_scheduler name (paper: constant)"})
    lr_warmup_steps: int = field(default=0, metadata={"help": "warm-up steps"})
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    use_8bit_adam: bool = field(default=True, metadata={"help": "bitsandbytes AdamW8bit (CUDA only; paper: on)"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping (paper: 1)"})
    mixed_precision: str = field(default="fp16", metadata={"help": "no, fp16 or bf16 (paper: fp16; fp16 needs a GPU)"})
    gradient_checkpointing: bool = field(default=True, metadata={"help": "trade compute for UNet activation memory"})
    allow_tf32: bool = field(default=True, metadata={"help": "TF32 matmuls on Ampere+ GPUs"})
    caption_dropout: float = field(default=0.1, metadata={"help": "probability of the empty prompt (classifier-free guidance)"})
    label_loss_weight: float = field(default=1.0, metadata={"help": "w in (image_loss + w label_loss)/(1+w); 1 = plain mean (authors)"})
    snr_gamma: float | None = field(default=None, metadata={"help": "Min-SNR-gamma loss weighting (e.g. 5; the logged losses are then weighted too); unset = plain mean (authors)"})
    use_ema: bool = field(default=False, metadata={"help": "keep EMA weights (exported instead of the raw ones)"})
    ema_decay: float = field(default=0.9999, metadata={"help": "EMA decay (diffusers EMAModel, warm-up (1+n)/(10+n))"})
    cache_latents: bool = field(default=False, metadata={
        "help": "encode the training set once with both VAEs and reuse; read from disk through memory maps, "
                "so the processes of a node share one copy in the page cache"})
    cache_dir: str | None = field(default=None, metadata={"help": "latent cache folder (default: <output_dir>/latent_cache)"})
    cache_batch_size: int = field(default=32, metadata={"help": "batch size when filling the latent cache"})
    dataloader_num_workers: int = field(default=4, metadata={"help": "data loading workers (uncached)"})
    max_bad_fraction: float = field(default=0.01, metadata={
        "help": "share of training files that may turn out corrupt mid-run (each is skipped, named in the log "
                "and counted as bad_files in metrics.jsonl) before the run stops"})
    checkpointing_steps: int = field(default=1000, metadata={"help": "save a resumable checkpoint every N steps (0 = never)"})
    checkpoints_total_limit: int = field(default=0, metadata={"help": "keep only the newest N checkpoints (0 = all)"})
    resume_from_checkpoint: str | None = field(default=None, metadata={"help": "checkpoint-N folder or 'latest'"})
    validation_prompts: list[str] = field(default_factory=list, metadata={"help": "prompts (default: the first training captions)"})
    num_validation_images: int = field(default=4, metadata={"help": "samples in the validation grid (0 = no validation)"})
    validation_steps: int = field(default=0, metadata={"help": "validate every N steps (0 = only at the end)"})
    validation_inference_steps: int = field(default=50, metadata={"help": "DPM-Solver++ steps (authors: 50)"})
    guidance_scale: float = field(default=8.0, metadata={"help": "classifier-free guidance (authors: 8)"})
    logging_steps: int = field(default=10, metadata={"help": "write a metrics line every N steps"})
    seed: int = field(default=0, metadata={"help": "seed of data order, noise and timesteps"})


# ---- data: what a training item becomes (cached latents or images encoded on the fly) ----------

CACHE_VERSION = 1
CACHE_SHARD_ITEMS = 1024
AUGMENT_VIEWS = ("flip", "dihedral")


def dihedral_view(x: torch.Tensor, k: int) -> torch.Tensor:
    """View ``k`` (0-7) of the dihedral group on the last two dims: ``k % 4`` quarter turns, then a
    horizontal flip when ``k >= 4`` (view 4 is the plain flip)."""
    x = torch.rot90(x, k % 4, dims=(-2, -1)) if k % 4 else x
    return (x.flip(-1) if k >= 4 else x).contiguous()  # a strided view would slow the VAE's convs ~2x


def num_views(cfg) -> int:
    """Cached copies of each item: 1 without augmentation, 2 with flips, 8 with dihedral views."""
    return len(_cached_views(cfg))


def _cached_views(cfg) -> list[tuple[str, int]]:
    """(cache-key suffix, ``dihedral_view`` index) of each cached copy, in row order."""
    if not cfg.augment:
        return [("", 0)]
    return [("", 0), ("_flip", 4)] if cfg.augment_views == "flip" else [("", 0)] + [(f"_d{k}", k) for k in range(1, 8)]


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(list(captions), padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


def _mix(*parts: int) -> int:
    """A 63-bit seed from integers (independent streams per (seed, what, step, rank))."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> 1)


@torch.no_grad()
def encode_images(vae, images: torch.Tensor, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled posterior (mean, std); a latent is ``mean + std * eps`` as ``latent_dist.sample()`` draws it."""
    post = vae.encode(images.to(device, dtype)).latent_dist
    sf = vae.config.scaling_factor
    return post.mean * sf, post.std * sf


class ImageSource:
    """Images and masks read and encoded every step (the VAEs run each epoch)."""

    def __init__(self, dataset, models: dict, num_workers: int, dihedral: bool = False):
        self.dataset, self.models, self.num_workers, self.dihedral = dataset, models, num_workers, dihedral
        tok = models["tokenizer"]
        self.empty_ids = tokenize(tok, [""])
        self.preview_captions = [dataset.caption(i) for i in range(min(16, len(dataset)))]

    def __len__(self) -> int:
        return len(self.dataset)

    def _collate(self, items):
        return dict(image=torch.stack([it["image"] for it in items]), mask=torch.stack([it["mask"] for it in items]),
                    input_ids=tokenize(self.models["tokenizer"], [it["caption"] for it in items]),
                    skipped=[it.get("skipped", "") for it in items])  # "<path>: <problem>" of a replaced bad file

    def batches(self, epoch: int, index_batches: list[list[int]], flips):
        self.dataset.set_epoch(epoch)  # crops and flips come from (seed, epoch, index): resumable
        if not index_batches:
            return iter(())
        return iter(torch.utils.data.DataLoader(self.dataset, batch_sampler=index_batches, collate_fn=self._collate,
                                                num_workers=self.num_workers, pin_memory=torch.cuda.is_available()))

    def latents(self, batch, gen, device, dtype):
        from models.label_vae import encode_masks

        if self.dihedral:  # the dataset already flipped at random; add a random number of quarter turns
            turns = torch.randint(0, 4, (len(batch["image"]),), generator=gen, device=gen.device).tolist()
            batch = dict(batch, image=torch.stack([dihedral_view(x, k) for x, k in zip(batch["image"], turns)]),
                         mask=torch.stack([dihedral_view(x, k) for x, k in zip(batch["mask"], turns)]))
        mean, std = encode_images(self.models["vae"], batch["image"], device, dtype)
        z = mean.float() + std.float() * torch.randn(mean.shape, generator=gen, device=device)
        if self.models["label_vae"] is not None:
            with torch.no_grad():
                z = torch.cat([z, encode_masks(self.models["label_vae"], batch["mask"].to(device)).float()], 1)
        return z, batch["input_ids"].to(device)


class MappedRows:
    """Row-indexable like the concatenation of ``parts`` (memory maps of the cache shards), without
    concatenating them: indexing reads only the rows asked for (a batch), as ``torch.cat(parts)[rows]``
    would give them."""

    def __init__(self, parts: list[np.ndarray], bfloat16: bool = False):
        self.parts, self.bfloat16 = parts, bfloat16
        self.starts = np.cumsum([0] + [len(p) for p in parts])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, rows) -> torch.Tensor:
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        part = np.searchsorted(self.starts, rows, side="right") - 1
        out = torch.from_numpy(np.stack([self.parts[p][r - self.starts[p]] for p, r in zip(part, rows)]))
        return out.view(torch.bfloat16) if self.bfloat16 else out


class CachedSource:
    """Latents encoded once (``--cache_latents``); row ``v * N + i`` holds view ``v`` of item ``i``
    (view 1 = flipped with ``--augment_views flip``; views 1-7 = ``dihedral_view`` with ``dihedral``).
    ``tensors`` maps each key to its rows: ``MappedRows`` over the shard files (``open_latent_cache``)."""

    def __init__(self, tensors: dict, num_items: int, empty_ids, preview_captions):
        self.t, self.n = tensors, num_items
        self.empty_ids, self.preview_captions = empty_ids, preview_captions

    def __len__(self) -> int:
        return self.n

    def batches(self, epoch: int, index_batches: list[list[int]], views):
        for idx in index_batches:
            idx = torch.as_tensor(idx)
            yield idx + self.n * views[idx] if views is not None else idx

    def latents(self, rows, gen, device, dtype):
        mean = self.t["image_mean"][rows].to(device, torch.float32)
        std = self.t["image_std"][rows].to(device, torch.float32)
        z = mean + std * torch.randn(mean.shape, generator=gen, device=device)
        if "label" in self.t:
            z = torch.cat([z, self.t["label"][rows].to(device, torch.float32)], 1)
        return z, self.t["input_ids"][rows].to(device, torch.long)


def _weights_checksum(model) -> float:
    return float(sum(p.detach().double().sum().item() for p in model.parameters()))


def _cache_fingerprint(cfg, info, dataset, models: dict, dtype) -> str:
    """Everything the cached tensors depend on; a cache made with other inputs is rebuilt."""
    desc = dict(version=CACHE_VERSION, mode=cfg.mode, dataset=info.name, data_root=str(info.root().resolve()),
                split=cfg.split, resolution=cfg.resolution, captions=cfg.captions, flips=cfg.augment,
                ids=hashlib.sha1("\n".join(dataset.ids).encode()).hexdigest(), dtype=str(dtype),
                vae=_weights_checksum(models["vae"]), scaling=models["vae"].config.scaling_factor,
                text=len(models["tokenizer"].get_vocab()), max_length=models["tokenizer"].model_max_length)
    if models["label_vae"] is not None:
        desc.update(label_vae=_weights_checksum(models["label_vae"]), label_scaling=models["label_vae"].config.scaling_factor)
    if cfg.augment and cfg.augment_views != "flip":  # caches made before there was a choice keep their fingerprint
        desc.update(views=cfg.augment_views)
    return hashlib.sha1(json.dumps(desc, sort_keys=True, default=str).encode()).hexdigest()


@torch.no_grad()
def _encode_shard(dataset, start: int, stop: int, cfg, models: dict, device, dtype, bad_files: BadFiles) -> dict:
    from models.label_vae import encode_masks

    parts: dict[str, list] = {}
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, range(start, stop)),
                                         batch_size=cfg.cache_batch_size, num_workers=cfg.dataloader_num_workers)
    for batch in loader:
        bad_files.add(batch)
        for suffix, k in _cached_views(cfg):
            image, mask = dihedral_view(batch["image"], k), dihedral_view(batch["mask"], k)
            mean, std = encode_images(models["vae"], image, device, dtype)
            parts.setdefault("image_mean" + suffix, []).append(mean.to(dtype).cpu())
            parts.setdefault("image_std" + suffix, []).append(std.to(dtype).cpu())
            if models["label_vae"] is not None:
                label = encode_masks(models["label_vae"], mask.to(device))
                parts.setdefault("label" + suffix, []).append(label.to(dtype).cpu())
        parts.setdefault("input_ids", []).append(tokenize(models["tokenizer"], batch["caption"]).to(torch.int32))
    return {k: torch.cat(v).contiguous() for k, v in parts.items()}


def open_latent_cache(cache_dir: Path, num_shards: int, suffixes: list[str]) -> dict[str, MappedRows]:
    """The cache's columns as ``MappedRows`` over memory maps of its shards, in row order
    (``CachedSource``): every view of every item, nothing read into memory yet."""
    maps = [map_safetensors(Path(cache_dir) / f"shard-{k:05d}.safetensors")[:2] for k in range(num_shards)]
    columns = {}
    for key in ("image_mean", "image_std", "label", "input_ids"):
        if key not in maps[0][0]:
            continue
        names = [key] * len(suffixes) if key == "input_ids" else [key + suffix for suffix in suffixes]
        parts = [(arrays[name], dtypes[name]) for name in names for arrays, dtypes in maps]
        columns[key] = MappedRows([a for a, _ in parts], bfloat16=parts[0][1] == "BF16")
    return columns


def _shard_fingerprint(path: Path) -> str | None:
    try:
        return map_safetensors(path)[2].get("fingerprint")
    except ValueError:  # absent, or cut short (a full disk): encoded again
        return None


def build_latent_source(cfg, info, models: dict, accelerator, run: RunDir, bad_files: BadFiles):
    """The training data: a ``CachedSource`` (filled or reused on disk, read through memory maps)
    or an ``ImageSource``."""
    from safetensors.torch import save

    from dataset.segmentation import DatasetError, SegmentationDataset
    from utils.io import atomic_write_bytes

    try:
        dataset = SegmentationDataset(info, cfg.split, size=cfg.resolution, augment=cfg.augment and not cfg.cache_latents,
                                      captions=cfg.captions, seed=cfg.seed, max_bad_fraction=cfg.max_bad_fraction)
    except (DatasetError, ValueError) as e:
        die(str(e))
    if not cfg.cache_latents:
        return ImageSource(dataset, models, cfg.dataloader_num_workers, dihedral=cfg.augment and cfg.augment_views == "dihedral")

    dtype = next(models["vae"].parameters()).dtype
    cache_dir = Path(cfg.cache_dir or Path(cfg.output_dir) / "latent_cache")
    fingerprint = _cache_fingerprint(cfg, info, dataset, models, dtype)
    n = len(dataset)
    shards = [(k, s, min(s + CACHE_SHARD_ITEMS, n)) for k, s in enumerate(range(0, n, CACHE_SHARD_ITEMS))]
    todo = [s for s in shards[accelerator.process_index::accelerator.num_processes]
            if _shard_fingerprint(cache_dir / f"shard-{s[0]:05d}.safetensors") != fingerprint]
    if todo:
        copies = {1: "", 2: " (+ flipped copies)", 8: " (+ 7 rotated / flipped copies)"}[num_views(cfg)]
        run.log(f"caching latents of {n} items{copies} in {cache_dir}")
    t0 = time.time()
    for k, start, stop in tqdm(todo, desc="latent cache", disable=not accelerator.is_main_process or not todo):
        tensors = _encode_shard(dataset, start, stop, cfg, models, accelerator.device, dtype, bad_files)
        meta = {"fingerprint": fingerprint, "start": str(start), "stop": str(stop)}
        atomic_write_bytes(cache_dir / f"shard-{k:05d}.safetensors", save(tensors, metadata=meta))
    accelerator.wait_for_everyone()
    bad_files.flush({}, run, 0)  # collective: the files every process replaced while encoding (step 0)
    if todo:
        run.log(f"latent cache filled in {time.time() - t0:.0f}s")
    else:
        run.log(f"reusing the latent cache in {cache_dir}")
    columns = open_latent_cache(cache_dir, len(shards), [suffix for suffix, _ in _cached_views(cfg)])
    preview = [dataset.caption(i) for i in range(min(16, n))]
    return CachedSource(columns, n, tokenize(models["tokenizer"], [""]), preview)


class LatentBatches:
    """Which items each process sees at each micro-step, from (seed, epoch) alone: resumable anywhere."""

    def __init__(self, source, batch_size: int, world: int, rank: int, seed: int, views: int):
        self.source, self.batch_size, self.world, self.rank, self.seed = source, batch_size, world, rank, seed
        self.views = views if isinstance(source, CachedSource) and views > 1 else 0
        self.steps_per_epoch = len(source) // (batch_size * world)  # the last partial batch is dropped

    def _epoch(self, epoch: int):
        gen = torch.Generator().manual_seed(_mix(self.seed, 1, epoch))
        n, g = len(self.source), self.batch_size * self.world
        perm = torch.randperm(n, generator=gen)[: self.steps_per_epoch * g].view(self.steps_per_epoch, g)
        mine = perm[:, self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        views = torch.randint(0, self.views, (n,), generator=gen) if self.views else None  # a view per item
        return mine, views

    def iterate(self, start_micro: int = 0):
        """Yield ``(micro_step, batch)`` forever, starting at ``start_micro``."""
        micro = start_micro
        while True:
            epoch, offset = divmod(micro, self.steps_per_epoch)
            mine, views = self._epoch(epoch)
            for batch in self.source.batches(epoch, mine[offset:].tolist(), views):
                yield micro, batch
                micro += 1

    def step_generator(self, micro: int, device) -> torch.Generator:
        """Noise, timesteps and caption dropout of one micro-step on this process."""
        return torch.Generator(device=device).manual_seed(_mix(self.seed, 2, micro, self.rank))


def label_vae_path(cfg: JointDiffusionConfig) -> str:
    return cfg.label_vae or str(Path(cfg.pretrained_model) / "label_vae")


_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")  # "org/name": a hub id rather than a local folder
_BASE_PARTS = ("vae", "text_encoder", "tokenizer", "unet", "scheduler")


def check_model_folders(cfg: JointDiffusionConfig) -> None:
    """Before anything loads: the base model folder has every part with complete weights, and the
    label VAE folder (joint mode) has a complete weights file; one line naming the file otherwise."""
    src = Path(cfg.pretrained_model)
    if not src.exists() and not _HUB_ID.fullmatch(cfg.pretrained_model):
        die(f"{src}: --pretrained_model folder not found (the pipeline folder written by inference.jodiffusion, "
            "or a Stable Diffusion folder / hub id)")
    try:
        if src.exists():
            check_pipeline_folder(src, _BASE_PARTS)
        if cfg.mode == "joint" and Path(label_vae_path(cfg)).is_dir():
            folder = Path(label_vae_path(cfg))
            folder = folder / "label_vae" if not (folder / "config.json").is_file() else folder
            for weights in sorted(folder.glob("*.safetensors")):
                check_weights_file(weights)
    except ValueError as e:
        die(str(e))


def _first_line(e: Exception) -> str:
    return " ".join(str(e).strip().splitlines()[:1]) or type(e).__name__


def load_models(cfg: JointDiffusionConfig, info):
    """Base components from ``pretrained_model``; the UNet widened here when it is not yet joint."""
    from diffusers import DDPMScheduler
    from safetensors import SafetensorError

    from models.label_vae import load_label_vae
    from models.pipeline_jodiffusion import load_sd_components

    src = cfg.pretrained_model
    try:
        vae, text_encoder, tokenizer, unet = load_sd_components(src).values()
        # the training schedule is the base model's (scaled_linear for SD), sampled with DDPM's add_noise
        noise_scheduler = DDPMScheduler.from_pretrained(src, subfolder="scheduler")
    except (OSError, ValueError, SafetensorError) as e:
        die(f"{src}: cannot load the base model ({_first_line(e)})")
    c = vae.config.latent_channels
    label_vae = None
    if cfg.mode == "image":
        if unet.config.in_channels != c:
            die(f"{src}: --mode image needs a plain UNet but this one takes {unet.config.in_channels} channels")
        return vae, label_vae, text_encoder, tokenizer, unet, noise_scheduler
    lv_path = label_vae_path(cfg)
    try:
        label_vae = load_label_vae(lv_path)
    except (OSError, ValueError, SafetensorError) as e:
        die(f"{lv_path}: cannot load the label VAE ({_first_line(e)}); pass --label_vae or run inference.jodiffusion first")
    if label_vae.config.num_labels != info.num_labels:
        die(f"{lv_path}: this label VAE was trained for {label_vae.config.num_labels} labels, but dataset "
            f"'{info.name}' has {info.num_labels} (background + classes): it belongs to another dataset")
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if label_vae.downsample_factor != factor:
        die(f"{lv_path}: the label VAE downsamples by {label_vae.downsample_factor}, the image VAE by {factor}")
    if unet.config.in_channels == c:
        widen_unet_for_labels(unet, label_vae.config.latent_channels)
    elif unet.config.in_channels != c + label_vae.config.latent_channels:
        die(f"{src}: the UNet takes {unet.config.in_channels} channels, not {c} image + "
            f"{label_vae.config.latent_channels} label")
    return vae, label_vae, text_encoder, tokenizer, unet, noise_scheduler


def check_8bit_adam(cfg: JointDiffusionConfig) -> None:
    """``--use_8bit_adam`` needs bitsandbytes and a CUDA GPU: checked first, not after the models
    are loaded and the latent cache is filled."""
    if not cfg.use_8bit_adam:
        return
    if importlib.util.find_spec("bitsandbytes") is None:
        die("--use_8bit_adam needs bitsandbytes, which is not installed: pip install bitsandbytes "
            "(CUDA GPUs only), or pass --use_8bit_adam false")
    if not torch.cuda.is_available():
        die("--use_8bit_adam needs a CUDA GPU (bitsandbytes' 8-bit AdamW); on CPU pass --use_8bit_adam false")


def make_optimizer(cfg: JointDiffusionConfig, params):
    if cfg.use_8bit_adam:
        try:
            import bitsandbytes as bnb  # optional (CUDA only): checked by check_8bit_adam
        except (ImportError, RuntimeError) as e:
            die(f"--use_8bit_adam: bitsandbytes does not import ({_first_line(e)}); pass --use_8bit_adam false")
        extra, opt_cls = {}, bnb.optim.AdamW8bit
    else:
        # foreach: one kernel per op over all parameters, not one per tensor (matters for small UNets)
        extra, opt_cls = {"foreach": True}, torch.optim.AdamW
    return opt_cls(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                   weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon, **extra)


def checkpoint_hooks(accelerator, ema_unet):
    """save_state writes the UNet as ``unet/`` (save_pretrained, safetensors) and the EMA as ``unet_ema/``."""
    from diffusers import UNet2DConditionModel
    from diffusers.training_utils import EMAModel

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            for model in models:
                accelerator.unwrap_model(model).save_pretrained(Path(output_dir) / "unet", safe_serialization=True)
            if ema_unet is not None:
                ema_unet.save_pretrained(str(Path(output_dir) / "unet_ema"))
        while weights:
            weights.pop()  # written above; keep accelerate from writing the same weights again

    def load_hook(models, input_dir):
        if ema_unet is not None:
            loaded = EMAModel.from_pretrained(str(Path(input_dir) / "unet_ema"), UNet2DConditionModel, foreach=True)
            ema_unet.load_state_dict(loaded.state_dict())
            ema_unet.to(accelerator.device)
        while models:
            model = models.pop()
            loaded = UNet2DConditionModel.from_pretrained(input_dir, subfolder="unet")
            model.load_state_dict(loaded.state_dict())

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def sampling_scheduler(noise_scheduler):
    """DPM-Solver++ multistep (the authors' sampler) on the training schedule."""
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler.from_config(noise_scheduler.config, algorithm_type="dpmsolver++", solver_order=2)


def build_pipeline(models: dict, unet, noise_scheduler):
    """The exported pipeline: JoDiffusionPipeline in joint mode, StableDiffusionPipeline in image mode."""
    if models["label_vae"] is None:
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline(vae=models["vae"], text_encoder=models["text_encoder"], tokenizer=models["tokenizer"],
                                       unet=unet, scheduler=sampling_scheduler(noise_scheduler), safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
    from models.pipeline_jodiffusion import JoDiffusionPipeline

    return JoDiffusionPipeline(vae=models["vae"], label_vae=models["label_vae"], text_encoder=models["text_encoder"],
                               tokenizer=models["tokenizer"], unet=unet, scheduler=sampling_scheduler(noise_scheduler))


def export_components(cfg: JointDiffusionConfig, models: dict, weight_dtype: torch.dtype) -> dict:
    """The frozen components for the exported pipeline, as they were loaded (float32). Training casts
    them to the mixed-precision dtype; saving that cast would silently round the base model's VAE,
    text encoder and label VAE to fp16/bf16, so with mixed precision they are loaded again (the
    UNet is not: it trains in float32 and is exported from memory)."""
    from models.label_vae import load_label_vae
    from models.pipeline_jodiffusion import load_sd_components

    if weight_dtype == torch.float32:
        return models
    fresh = load_sd_components(cfg.pretrained_model, parts=("vae", "text_encoder"))
    label_vae = load_label_vae(label_vae_path(cfg)) if models["label_vae"] is not None else None
    return dict(models, **fresh, label_vae=label_vae)


@torch.no_grad()
def validate(pipe, prompts: list[str], cfg: JointDiffusionConfig, info, path: Path, accelerator) -> None:
    """A grid: one row per prompt with the image, its mask and the mask over the image (dataset palette)."""
    import numpy as np

    from utils.visualize import colorize, overlay, save_grid

    pipe.set_progress_bar_config(disable=True)
    # CPU generators, as inference.generate uses: the grid shows the samples generation would give
    # for these seeds, on any device (a CUDA generator draws other noise from the same seed)
    gens = [torch.Generator("cpu").manual_seed(cfg.seed + i) for i in range(len(prompts))]
    kw = dict(num_inference_steps=cfg.validation_inference_steps, guidance_scale=cfg.guidance_scale, generator=gens)
    with accelerator.autocast():
        if cfg.mode == "image":
            images = pipe(prompts, output_type="np", **kw).images
            rows = [[(np.asarray(im) * 255).round().astype(np.uint8)] for im in images]
        else:
            out = pipe(prompts, output_type="np", **kw)
            rows = [[im, colorize(m, info.palette, info.ignore_index), overlay(im, m, info.palette, ignore_index=info.ignore_index)]
                    for im, m in zip(out.images, out.masks)]
    save_grid(path, rows, scale=max(1, 128 // rows[0][0].shape[0]))


def main(argv=None) -> None:
    from dataset.segmentation import DatasetError

    cfg = parse_config(JointDiffusionConfig, argv, description=__doc__)
    try:
        train(cfg)
    except DatasetError as e:  # a missing folder before the first step, or too many bad files mid-run
        die(error_line(e))  # from a DataLoader worker the message arrives inside its traceback


def train(cfg: JointDiffusionConfig) -> None:
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    from dataset import get_dataset_info

    if cfg.mode not in ("joint", "image"):
        die(f"--mode must be joint or image, got {cfg.mode!r}")
    if cfg.augment_views not in AUGMENT_VIEWS:
        die(f"--augment_views must be one of {', '.join(AUGMENT_VIEWS)}, got {cfg.augment_views!r}")
    check_8bit_adam(cfg)
    mixed = cfg.mixed_precision
    if mixed == "fp16" and not torch.cuda.is_available():
        mixed = "no"  # fp16 autocast needs a GPU; reported in the log below
    accelerator = Accelerator(mixed_precision=mixed, gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                              project_config=ProjectConfiguration(project_dir=cfg.output_dir))
    run = RunDir(cfg.output_dir, is_main=accelerator.is_main_process)
    run.save_config(cfg)
    if mixed != cfg.mixed_precision:
        run.log("no CUDA device: fp16 mixed precision is off, training in fp32")
    set_seed(cfg.seed)
    if cfg.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    try:
        info = get_dataset_info(cfg.dataset, cfg.data_root)
    except ValueError as e:
        die(str(e))

    check_model_folders(cfg)
    vae, label_vae, text_encoder, tokenizer, unet, noise_scheduler = load_models(cfg, info)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed, torch.float32)
    for frozen in (vae, label_vae, text_encoder):
        if frozen is not None:
            frozen.requires_grad_(False).eval().to(accelerator.device, dtype=weight_dtype)
    models = dict(vae=vae, label_vae=label_vae, text_encoder=text_encoder, tokenizer=tokenizer)
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    ema_unet = None
    if cfg.use_ema:
        ema_unet = EMAModel(unet.parameters(), decay=cfg.ema_decay, model_cls=type(unet), model_config=unet.config,
                            foreach=True)
        ema_unet.to(accelerator.device)
    checkpoint_hooks(accelerator, ema_unet)
    attn = sorted({type(p).__name__ for p in unet.attn_processors.values()})
    run.log(f"UNet {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M params, {unet.config.in_channels} -> "
            f"{unet.config.out_channels} channels, attention {', '.join(attn)} (PyTorch SDPA), mixed precision {mixed}")

    bad_files = BadFiles(accelerator.num_processes)
    data = build_latent_source(cfg, info, models, accelerator, run, bad_files)
    batches = LatentBatches(data, cfg.train_batch_size, accelerator.num_processes, accelerator.process_index,
                            cfg.seed, num_views(cfg))
    if batches.steps_per_epoch == 0:
        die(f"{cfg.dataset}/{cfg.split}: {len(data)} items is fewer than one global batch "
            f"({cfg.train_batch_size} x {accelerator.num_processes} processes)")
    updates_per_epoch = math.ceil(batches.steps_per_epoch / cfg.gradient_accumulation_steps)
    max_steps = cfg.max_train_steps or cfg.num_train_epochs * updates_per_epoch

    optimizer = make_optimizer(cfg, unet.parameters())
    lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=max_steps * accelerator.num_processes)
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)

    global_step = 0
    if cfg.resume_from_checkpoint:
        ckpt = find_checkpoint(run.path, cfg.resume_from_checkpoint)
        if ckpt is None:
            run.log("no checkpoint to resume from: starting fresh")
        else:
            load_training_state(accelerator, ckpt)
            global_step = checkpoint_step(ckpt)
            run.log(f"resumed from {ckpt} at step {global_step}")

    prompts = list(cfg.validation_prompts) or data.preview_captions[: cfg.num_validation_images]
    prompts = prompts[: cfg.num_validation_images] if cfg.num_validation_images > 0 else []
    image_channels = vae.config.latent_channels
    empty_ids = data.empty_ids.to(accelerator.device)
    run.log(f"{len(data)} training items, {max_steps} steps of {cfg.train_batch_size} x {accelerator.num_processes} "
            f"x {cfg.gradient_accumulation_steps} = {cfg.train_batch_size * accelerator.num_processes * cfg.gradient_accumulation_steps}"
            f" ({max_steps / updates_per_epoch:.1f} epochs)")

    def run_validation(step: int) -> None:
        if not prompts or not accelerator.is_main_process:
            return
        model = accelerator.unwrap_model(unet)
        if ema_unet is not None:
            ema_unet.store(model.parameters())
            ema_unet.copy_to(model.parameters())
        model.eval()
        validate(build_pipeline(models, model, noise_scheduler), prompts, cfg, info,
                 run.path / "validation" / f"step-{step}.png", accelerator)
        model.train()
        if ema_unet is not None:
            ema_unet.restore(model.parameters())

    sums = torch.zeros(3, device=accelerator.device)  # loss, image_loss, label_loss since the last log line
    skipped = SkippedSteps()
    count, t_log = 0, time.time()
    # closed (its line ended) also when a bad file stops the run, so the error line starts a line
    with tqdm(total=max_steps, initial=global_step, desc=f"{cfg.mode} diffusion", dynamic_ncols=True,
              disable=not accelerator.is_main_process) as bar:
        for micro, batch in batches.iterate(global_step * cfg.gradient_accumulation_steps):
            if global_step >= max_steps:
                break
            if isinstance(batch, dict):  # images read this step (a cached batch is rows of the cache)
                bad_files.add(batch)
            with accelerator.accumulate(unet):
                gen = batches.step_generator(micro, accelerator.device)
                latents, ids = data.latents(batch, gen, accelerator.device, weight_dtype)
                noise = torch.randn(latents.shape, generator=gen, device=latents.device, dtype=latents.dtype)
                t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                                  generator=gen, device=latents.device)
                drop = torch.rand(latents.shape[0], generator=gen, device=latents.device) < cfg.caption_dropout
                ids = torch.where(drop[:, None], empty_ids, ids)
                with torch.no_grad():
                    text = text_encoder(ids)[0]
                noisy = noise_scheduler.add_noise(latents, noise, t)  # one t for image and label halves
                target = noise if noise_scheduler.config.prediction_type == "epsilon" else \
                    noise_scheduler.get_velocity(latents, noise, t)
                pred = unet(noisy, t, text).sample
                weights = None if not cfg.snr_gamma else min_snr_weights(
                    noise_scheduler.alphas_cumprod, t, cfg.snr_gamma, noise_scheduler.config.prediction_type)
                loss, image_loss, label_loss = joint_epsilon_loss(pred, target, image_channels, cfg.label_loss_weight,
                                                                  sample_weights=weights)
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(unet.parameters(), cfg.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            sums += torch.stack([loss.detach(), image_loss.detach(),
                                 (label_loss if label_loss is not None else image_loss).detach()])
            count += 1
            if not accelerator.sync_gradients:
                continue
            skipped.update(accelerator)
            if ema_unet is not None:
                ema_unet.step(unet.parameters())
            global_step += 1
            bar.update(1)
            if global_step % cfg.logging_steps == 0 or global_step == max_steps:
                means = (accelerator.reduce(sums, reduction="mean") / count).tolist()
                row = dict(step=global_step, loss=means[0], image_loss=means[1], lr=lr_scheduler.get_last_lr()[0],
                           sec_per_step=(time.time() - t_log) / max(1, count / cfg.gradient_accumulation_steps))
                if cfg.mode == "joint":
                    row["label_loss"] = means[2]
                skipped.flush(row, run, global_step)
                bad_files.flush(row, run, global_step)
                run.log_metrics(**row)
                bar.set_postfix(loss=f"{means[0]:.4f}")
                sums.zero_()
                count, t_log = 0, time.time()
            if cfg.checkpointing_steps > 0 and global_step % cfg.checkpointing_steps == 0:
                save_checkpoint(accelerator, run.path, global_step, cfg.checkpoints_total_limit, log=run.log)
            if cfg.validation_steps > 0 and global_step % cfg.validation_steps == 0 and global_step < max_steps:
                run_validation(global_step)
    skipped.summary(run)
    bad_files.summary(run)

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(unet)
        if ema_unet is not None:
            ema_unet.copy_to(model.parameters())
        model.eval()
        build_pipeline(export_components(cfg, models, weight_dtype), model, noise_scheduler).save_pretrained(
            str(run.path / "pipeline"), safe_serialization=True)
        run.log(f"exported the {'EMA ' if ema_unet is not None else ''}pipeline to {run.path / 'pipeline'}")
        if prompts:
            validate(build_pipeline(models, model, noise_scheduler), prompts, cfg, info,
                     run.path / "validation" / f"step-{global_step}.png", accelerator)
        from utils.visualize import plot_curves

        keys = ("loss", "image_loss", "label_loss") if cfg.mode == "joint" else ("loss",)
        if (run.path / "metrics.jsonl").exists():
            plot_curves(run.path / "metrics.jsonl", run.path / "loss.png", keys=keys, smooth=5)
    accelerator.end_training()
    run.close()


if __name__ == "__main__":
    main()
