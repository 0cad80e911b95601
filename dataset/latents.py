"""Latent training data of the joint trainer: what a training item becomes, the latent cache,
and which items each process sees at each step.

    data = build_latent_source(cfg, info, dataset, models, encode_masks, accelerator, run, bad_files)
    batches = LatentBatches(data, batch_size, world, rank, seed, num_views(cfg))
    for micro, batch in batches.iterate(start):
        latents, ids, clip = data.latents(batch, batches.step_generator(micro, device), device, dtype)

A source is an ``ImageSource`` (images read and encoded every step) or a ``CachedSource``
(``--cache_latents``: both VAEs run once; shards in ``<cache_dir>/shard-NNNNN.safetensors`` read
through memory maps, so a node's processes share one copy in the page cache). ``cfg`` is the joint
trainer's settings (read: mode, split, resolution, captions, augment, augment_views, cache_dir,
cache_batch_size, dataloader_num_workers, output_dir, cache_latents). ``models`` holds the frozen
``vae``, ``label_vae`` (None in image mode) and ``tokenizer``, and for the U-ViT ``encode_clip``
(images in [-1, 1] -> B x 1 x D CLIP image embeddings; ``clip`` is None without it) and the
``image_encoder`` it runs; ``encode_masks(label_vae, masks)`` (``models.label_vae.encode_masks``)
and ``encode_clip`` are passed in, as this library sits below ``models/``.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from dataset.segmentation import load_captions
from utils.checkpoints import BadFiles, map_safetensors
from utils.io import RunDir, atomic_write_bytes
from utils.precision import derive_seed

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
    """Token ids padded to the tokenizer's length (what the text encoder reads)."""
    return tokenizer(list(captions), padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


def vocabulary_texts(info) -> list[str]:
    """The texts the toy tokenizer's vocabulary is built from: every stored caption of every split,
    plus the class-name fallback captions ("a photo of circle, ring"), which must tokenise too."""
    texts = []
    for split in info.splits:
        texts += list((load_captions(info, split) or {}).values())
    return texts + [info.class_name_caption(range(info.num_labels))] + list(info.classes)


@torch.no_grad()
def encode_images(vae, images: torch.Tensor, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled posterior (mean, std); a latent is ``mean + std * eps`` as ``latent_dist.sample()`` draws it."""
    post = vae.encode(images.to(device, dtype)).latent_dist
    sf = vae.config.scaling_factor
    return post.mean * sf, post.std * sf


class ImageSource:
    """Images and masks read and encoded every step (the VAEs run each epoch)."""

    def __init__(self, dataset, models: dict, encode_masks, num_workers: int, dihedral: bool = False):
        self.dataset, self.models, self.num_workers, self.dihedral = dataset, models, num_workers, dihedral
        self.encode_masks = encode_masks
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
        if self.dihedral:  # the dataset already flipped at random; add a random number of quarter turns
            turns = torch.randint(0, 4, (len(batch["image"]),), generator=gen, device=gen.device).tolist()
            batch = dict(batch, image=torch.stack([dihedral_view(x, k) for x, k in zip(batch["image"], turns)]),
                         mask=torch.stack([dihedral_view(x, k) for x, k in zip(batch["mask"], turns)]))
        mean, std = encode_images(self.models["vae"], batch["image"], device, dtype)
        z = mean.float() + std.float() * torch.randn(mean.shape, generator=gen, device=device)
        if self.models["label_vae"] is not None:
            with torch.no_grad():
                z = torch.cat([z, self.encode_masks(self.models["label_vae"], batch["mask"].to(device)).float()], 1)
        clip = self.models["encode_clip"](batch["image"]).float() if "encode_clip" in self.models else None
        return z, batch["input_ids"].to(device), clip


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
        clip = self.t["clip"][rows].to(device, torch.float32) if "clip" in self.t else None
        return z, self.t["input_ids"][rows].to(device, torch.long), clip


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
    if "encode_clip" in models:  # the U-ViT's CLIP image embeddings
        desc.update(clip=_weights_checksum(models["image_encoder"]))
    if cfg.augment and cfg.augment_views != "flip":  # caches made before there was a choice keep their fingerprint
        desc.update(views=cfg.augment_views)
    return hashlib.sha1(json.dumps(desc, sort_keys=True, default=str).encode()).hexdigest()


@torch.no_grad()
def _encode_shard(dataset, start: int, stop: int, cfg, models: dict, encode_masks, device, dtype,
                  bad_files: BadFiles) -> dict:
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
            if "encode_clip" in models:
                parts.setdefault("clip" + suffix, []).append(models["encode_clip"](image).to(dtype).cpu())
        parts.setdefault("input_ids", []).append(tokenize(models["tokenizer"], batch["caption"]).to(torch.int32))
    return {k: torch.cat(v).contiguous() for k, v in parts.items()}


def open_latent_cache(cache_dir: Path, num_shards: int, suffixes: list[str]) -> dict[str, MappedRows]:
    """The cache's columns as ``MappedRows`` over memory maps of its shards, in row order
    (``CachedSource``): every view of every item, nothing read into memory yet."""
    maps = [map_safetensors(Path(cache_dir) / f"shard-{k:05d}.safetensors")[:2] for k in range(num_shards)]
    columns = {}
    for key in ("image_mean", "image_std", "label", "clip", "input_ids"):
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


def build_latent_source(cfg, info, dataset, models: dict, encode_masks, accelerator, run: RunDir,
                        bad_files: BadFiles):
    """The training data of ``dataset`` (a ``SegmentationDataset``): a ``CachedSource`` (filled or
    reused on disk, read through memory maps) or an ``ImageSource``."""
    if not cfg.cache_latents:
        return ImageSource(dataset, models, encode_masks, cfg.dataloader_num_workers,
                           dihedral=cfg.augment and cfg.augment_views == "dihedral")
    cache_dir = Path(cfg.cache_dir or Path(cfg.output_dir) / "latent_cache")
    num_shards = fill_latent_cache(cache_dir, cfg, info, dataset, models, encode_masks, accelerator, run, bad_files)
    columns = open_latent_cache(cache_dir, num_shards, [suffix for suffix, _ in _cached_views(cfg)])
    preview = [dataset.caption(i) for i in range(min(16, len(dataset)))]
    return CachedSource(columns, len(dataset), tokenize(models["tokenizer"], [""]), preview)


def fill_latent_cache(cache_dir: Path, cfg, info, dataset, models: dict, encode_masks, accelerator, run: RunDir,
                      bad_files: BadFiles) -> int:
    """Encode the shards whose file is missing or was made from other inputs (each process its
    share); returns the number of shards."""
    from safetensors.torch import save

    dtype = next(models["vae"].parameters()).dtype
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
        tensors = _encode_shard(dataset, start, stop, cfg, models, encode_masks, accelerator.device, dtype, bad_files)
        meta = {"fingerprint": fingerprint, "start": str(start), "stop": str(stop)}
        atomic_write_bytes(cache_dir / f"shard-{k:05d}.safetensors", save(tensors, metadata=meta))
    accelerator.wait_for_everyone()
    bad_files.flush({}, run, 0)  # collective: the files every process replaced while encoding (step 0)
    if todo:
        run.log(f"latent cache filled in {time.time() - t0:.0f}s")
    else:
        run.log(f"reusing the latent cache in {cache_dir}")
    return len(shards)


class LatentBatches:
    """Which items each process sees at each micro-step, from (seed, epoch) alone: resumable anywhere."""

    def __init__(self, source, batch_size: int, world: int, rank: int, seed: int, views: int):
        self.source, self.batch_size, self.world, self.rank, self.seed = source, batch_size, world, rank, seed
        self.views = views if isinstance(source, CachedSource) and views > 1 else 0
        self.steps_per_epoch = len(source) // (batch_size * world)  # the last partial batch is dropped

    def _epoch(self, epoch: int):
        gen = torch.Generator().manual_seed(derive_seed(self.seed, 1, epoch))
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
        return torch.Generator(device=device).manual_seed(derive_seed(self.seed, 2, micro, self.rank))
