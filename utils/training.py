"""Helpers of the accelerate trainers (``train.label_vae``, ``train.joint_diffusion``): the
learning-rate schedule, AdamW (8-bit or not), the checks made before anything loads, the
logging window, EMA weight swapping and the validation grid of a diffusion pipeline.

    optimizer = make_adamw(params, lr=5e-5, use_8bit=False, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    lr_scheduler = make_lr_scheduler("constant", optimizer, warmup_steps, max_steps, accelerator.num_processes)

Errors are ValueError with a one-line message (the entry point prints it with ``die``).
"""
from __future__ import annotations

import importlib.util
import os
import re
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from utils.io import check_pipeline_folder, check_weights_file
from utils.precision import cpu_generators, derive_seed
from utils.visualize import colorize, overlay, save_grid

_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")  # "org/name": a hub id rather than a local folder
SD_PARTS = ("vae", "text_encoder", "tokenizer", "unet", "scheduler")


def first_line(e: Exception) -> str:
    return " ".join(str(e).strip().splitlines()[:1]) or type(e).__name__


def make_lr_scheduler(name: str, optimizer, warmup_steps: int, max_steps: int, num_processes: int):
    """diffusers' ``get_scheduler``; a prepared scheduler steps once per process per optimiser step."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps * num_processes,
                         num_training_steps=max_steps * num_processes)


def check_8bit_adam(use_8bit: bool) -> None:
    """``--use_8bit_adam`` needs bitsandbytes and a CUDA GPU: checked first, not after the models
    are loaded and the latent cache is filled."""
    if not use_8bit:
        return
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError("--use_8bit_adam needs bitsandbytes, which is not installed: pip install bitsandbytes "
                         "(CUDA GPUs only), or pass --use_8bit_adam false")
    if not torch.cuda.is_available():
        raise ValueError("--use_8bit_adam needs a CUDA GPU (bitsandbytes' 8-bit AdamW); on CPU pass --use_8bit_adam false")


def make_adamw(params, lr: float, use_8bit: bool, betas, weight_decay: float, eps: float):
    """bitsandbytes' AdamW8bit (CUDA only, checked by ``check_8bit_adam``) or torch's AdamW."""
    if use_8bit:
        try:
            import bitsandbytes as bnb  # optional (CUDA only)
        except (ImportError, RuntimeError) as e:
            raise ValueError(f"--use_8bit_adam: bitsandbytes does not import ({first_line(e)}); "
                             "pass --use_8bit_adam false") from e
        extra, opt_cls = {}, bnb.optim.AdamW8bit
    else:
        # foreach: one kernel per op over all parameters, not one per tensor (matters for small UNets)
        extra, opt_cls = {"foreach": True}, torch.optim.AdamW
    return opt_cls(params, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps, **extra)


def check_model_folders(pretrained_model: str, label_vae: str | None, parts=SD_PARTS) -> None:
    """Before anything loads: the base model folder has every part with complete weights, and the
    label VAE folder (when given and present) has a complete weights file; ValueError naming the
    file otherwise."""
    src = Path(pretrained_model)
    if not src.exists() and not _HUB_ID.fullmatch(pretrained_model):
        raise ValueError(f"{src}: --pretrained_model folder not found (the pipeline folder written by "
                         "inference.jodiffusion, or a Stable Diffusion folder / hub id)")
    if src.exists():
        check_pipeline_folder(src, parts)
    if label_vae is not None and Path(label_vae).is_dir():
        folder = Path(label_vae)
        folder = folder / "label_vae" if not (folder / "config.json").is_file() else folder
        for weights in sorted(folder.glob("*.safetensors")):
            check_weights_file(weights)


class LossWindow:
    """The losses of the micro-steps since the last metrics line: summed on the device, averaged
    over micro-steps and processes when a line is written."""

    def __init__(self, size: int, device):
        self.sums, self.count, self.t0 = torch.zeros(size, device=device), 0, time.time()

    def add(self, *losses: torch.Tensor) -> None:
        self.sums += torch.stack([loss.detach() for loss in losses])
        self.count += 1

    def read(self, accelerator, micro_per_step: int) -> tuple[list[float], float]:
        """(mean of each loss, seconds per optimiser step), then a new window. Collective."""
        means = (accelerator.reduce(self.sums, reduction="mean") / self.count).tolist()
        sec = (time.time() - self.t0) / max(1, self.count / micro_per_step)
        self.sums.zero_()
        self.count, self.t0 = 0, time.time()
        return means, sec


@contextmanager
def ema_weights(ema, model):
    """``model`` holds the EMA weights inside the block (``ema`` None: unchanged), its own after."""
    if ema is not None:
        ema.store(model.parameters())
        ema.copy_to(model.parameters())
    try:
        yield model
    finally:
        if ema is not None:
            ema.restore(model.parameters())


@torch.no_grad()
def validation_grid(pipe, prompts: list[str], seeds, path: Path, autocast, info=None, **pipe_kw) -> None:
    """One row per prompt: the image, and with ``info`` (a joint pipeline) its mask and the mask
    over the image in the dataset's palette. One CPU generator per seed, as ``inference.generate``
    seeds them: the grid shows the samples generation gives for these seeds, on any device (a CUDA
    generator draws other noise from the same seed)."""
    pipe.set_progress_bar_config(disable=True)
    with autocast():
        out = pipe(prompts, output_type="np", generator=cpu_generators(seeds), **pipe_kw)
        if info is None:
            rows = [[(np.asarray(im) * 255).round().astype(np.uint8)] for im in out.images]
        else:
            rows = [[im, colorize(m, info.palette, info.ignore_index), overlay(im, m, info.palette, ignore_index=info.ignore_index)]
                    for im, m in zip(out.images, out.masks)]
    save_grid(path, rows, scale=max(1, 128 // rows[0][0].shape[0]))


class EpochPermutation(torch.utils.data.Sampler):
    """A permutation that depends only on (seed, epoch): every process and every resumed run
    sees the same order, so a run stopped at step N continues exactly where it left off."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        g = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch, bits=32))
        return iter(torch.randperm(self.n, generator=g).tolist())


def accumulation_steps(total_batch_size: int, per_device: int) -> int:
    """Micro-batches per optimiser step so that per_device x processes x steps = total_batch_size
    (ValueError when it does not divide), counted before the ``Accelerator`` is built."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    # accelerate reads ACCELERATE_USE_CPU only in AcceleratorState; a PartialState built without it
    # pins a single-process state, and each CPU process under torchrun would train alone on everything
    per_step = per_device * PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU")).num_processes
    if total_batch_size % per_step:
        raise ValueError(f"--total_batch_size {total_batch_size} is not a multiple of the per-device batch x "
                         f"processes = {per_step}")
    return total_batch_size // per_step


def backward_step(accelerator, loss: torch.Tensor, model, optimizer, lr_scheduler, max_grad_norm: float) -> None:
    """Inside ``accelerator.accumulate``: backward, clip the gradients when they are synced (0 = no
    clipping), then step the optimiser and the schedule (accelerate skips both between syncs)."""
    accelerator.backward(loss)
    if accelerator.sync_gradients and max_grad_norm > 0:
        accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def epoch_batches(accelerator, loader, first_epoch: int, skip: int, num_epochs: int, *epoch_holders):
    """``(epoch, batch_index, batch)`` of a prepared ``loader`` from batch ``skip`` of ``first_epoch``
    (a resumed run) to the end of epoch ``num_epochs - 1``. accelerate's loader re-sets the epoch
    of its sampler and dataset from its own counter at every ``__iter__``, and that counter restarts
    at 0 in a resumed run: the loader and ``epoch_holders`` (sampler, dataset) are set explicitly."""
    for epoch in range(first_epoch, num_epochs):
        start = skip if epoch == first_epoch else 0
        epoch_loader = accelerator.skip_first_batches(loader, start) if start else loader
        for holder in (epoch_loader, *epoch_holders):
            holder.set_epoch(epoch)
        for batch_index, batch in enumerate(epoch_loader, start=start):
            yield epoch, batch_index, batch


_HELD_UNTIL_EXIT: list = []


def _launched() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def prepare_held(accelerator, *objects):
    """``accelerator.prepare(*objects)``; in a process started by torchrun / ``accelerate launch``
    (``WORLD_SIZE`` > 1) the prepared objects are also held until ``exit_launched_process`` ends it.

    Freeing the DDP wrapper frees its Reducer, which drops the last reference to the gloo process
    group (``end_training`` has unregistered it), and ``~ProcessGroupGloo`` joins gloo's worker
    threads while holding the GIL. A worker still releasing the last collective's work (the barrier
    keeps the ``all_gather_object`` before it) waits for that GIL, and the rank hangs forever with
    its work done (pytorch/pytorch#56297). Seen here as a rank stuck in ``~Reducer`` when ``train``
    returned, one time in a few under load: the rank that does not export reaches the free within
    microseconds of the last barrier."""
    prepared = accelerator.prepare(*objects)
    hold_until_exit(*(prepared if len(objects) > 1 else (prepared,)))
    return prepared


def hold_until_exit(*objects) -> None:
    """Keep ``objects`` referenced until ``exit_launched_process`` in a launched process (see
    ``prepare_held``); a single process holds nothing."""
    if _launched():
        _HELD_UNTIL_EXIT.extend(objects)


def exit_launched_process() -> None:
    """End a process started by torchrun / ``accelerate launch`` (``WORLD_SIZE`` > 1) without
    Python's interpreter finalization, which would free what ``prepare_held`` holds (and so
    hang as its docstring says); a single process returns and exits normally. Call it last in an
    entry point's ``__main__`` block: everything the run writes is closed by then, so the process
    flushes its streams and leaves with exit status 0."""
    if not _launched():
        return
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def start_run(cfg, mixed_precision: str, accumulation_steps: int, name: str = "jodiffusion"):
    """The ``Accelerator`` and the run folder (``cfg.output_dir``, with ``config.yaml`` written),
    and every RNG seeded from ``cfg.seed``. Returns (accelerator, run)."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed

    from utils.io import RunDir

    accelerator = Accelerator(mixed_precision=mixed_precision, gradient_accumulation_steps=accumulation_steps,
                              project_config=ProjectConfiguration(project_dir=cfg.output_dir))
    run = RunDir(cfg.output_dir, is_main=accelerator.is_main_process, name=name)
    run.save_config(cfg)
    set_seed(cfg.seed)
    return accelerator, run


def freeze(models, device, dtype) -> None:
    """Frozen parts (None skipped): no gradients, eval mode, on ``device`` in the weight ``dtype``."""
    for model in models:
        if model is not None:
            model.requires_grad_(False).eval().to(device, dtype=dtype)


def trainable_unet(unet, gradient_checkpointing: bool, ema_decay: float | None, device):
    """Put ``unet`` in training mode (with gradient checkpointing if asked); return its EMA copy
    (diffusers' ``EMAModel`` on ``device``) when ``ema_decay`` is given, else None."""
    from diffusers.training_utils import EMAModel

    if gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    if ema_decay is None:
        return None
    ema = EMAModel(unet.parameters(), decay=ema_decay, model_cls=type(unet), model_config=unet.config, foreach=True)
    ema.to(device)
    return ema
