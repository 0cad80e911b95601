"""Resumable ``checkpoint-N/`` folders of the accelerate-based trainers (label VAE, joint diffusion).

A checkpoint appears complete or not at all (written to a temporary name, then renamed), only the
newest ``limit`` are kept, ``latest`` finds the newest, and resuming from a checkpoint written with
other model sizes stops with one line instead of a traceback. ``SkippedSteps`` is the two trainers'
count of optimiser steps that fp16 loss scaling skipped, ``BadFiles`` their count of training files
the dataset found corrupt mid-run, and ``map_safetensors`` reads a saved tensor file as memory maps
(the joint trainer's latent cache) instead of loading it. ``resume_step`` is both trainers'
``--resume_from_checkpoint``; ``unet_checkpoint_hooks`` makes ``save_state`` write a diffusers UNet
(and its EMA) in ``save_pretrained`` format.
"""
from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
from accelerate.utils import gather_object

from utils.config import die
from utils.io import check_weights_file


def list_checkpoints(output_dir: Path) -> list[Path]:
    """The run's complete ``checkpoint-N`` folders, oldest first."""
    found = [p for p in Path(output_dir).glob("checkpoint-*") if p.is_dir() and p.name[11:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[11:]))


def find_checkpoint(output_dir: Path, which: str) -> Path | None:
    """``which`` = ``latest`` (None when the run has none yet) or a ``checkpoint-N`` folder."""
    if which == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(which)
    if not (path.is_dir() and path.name[11:].isdigit() and path.name.startswith("checkpoint-")):
        die(f"{path}: not a checkpoint-N folder")
    return path


def checkpoint_step(path: Path) -> int:
    return int(Path(path).name[11:])


def save_checkpoint(accelerator, output_dir: Path, step: int, limit: int | None, log=None) -> Path:
    """``accelerator.save_state`` into ``checkpoint-<step>``, atomically; keep the newest ``limit`` (0/None = all)."""
    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f".checkpoint-{step}.tmp"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        if limit:
            for old in list_checkpoints(output_dir)[:-limit]:
                shutil.rmtree(old)
        if log is not None:
            log(f"saved {final}")
    accelerator.wait_for_everyone()
    return final


def load_training_state(accelerator, ckpt: Path) -> None:
    """``accelerator.load_state`` with a clear error when the checkpoint was written by a model of
    other sizes (e.g. a toy profile changed since the run folder was made)."""
    try:
        accelerator.load_state(str(ckpt))
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        die(f"{ckpt}: cannot resume: its weights do not fit the model built from the current settings "
            f"({first}). It was written with other settings; use a new --output_dir or delete the run's "
            "checkpoint-* folders.")


class SkippedSteps:
    """Optimiser steps that fp16 loss scaling skipped (the GradScaler found inf/nan gradients and
    lowered its scale): counted per logging window and in all."""

    def __init__(self):
        self.window = self.total = 0

    def update(self, accelerator) -> None:
        """Call once per optimiser step (after ``optimizer.step()``, when gradients were synced)."""
        if accelerator.optimizer_step_was_skipped:
            self.window += 1
            self.total += 1

    def flush(self, row: dict, run, step: int) -> None:
        """Add ``skipped_steps`` to a metrics row (and a line to the run log) when the window had any."""
        if self.window:
            row["skipped_steps"] = self.window
            run.log(f"step {step}: {self.window} optimiser step(s) since the last log line were skipped "
                    "(inf/nan gradients under fp16 loss scaling)")
            self.window = 0

    def summary(self, run) -> None:
        if self.total:
            run.log(f"{self.total} optimiser steps in all were skipped by fp16 loss scaling; a few at the start are "
                    "normal (the scale is being found), many later mean the loss overflows fp16: try bf16")


class BadFiles:
    """Training files the dataset found corrupt mid-run and replaced by the next good item
    (``item["skipped"] = "<path>: <problem>"``; good items carry ``""``), counted per logging
    window and in all, over every process."""

    def __init__(self, num_processes: int):
        self.num_processes, self.window, self.total, self.distinct = num_processes, [], 0, set()

    def add(self, batch: dict) -> None:
        """Call with every collated batch (a list of ``skipped`` strings, one per item)."""
        self.window += [s for s in batch.get("skipped", ()) if s]

    def flush(self, row: dict, run, step: int) -> None:
        """Add ``bad_files`` to a metrics row and name the files in the log. Collective: every
        process calls it at the same steps (the files each process met are gathered)."""
        names = gather_object(self.window) if self.num_processes > 1 else self.window
        self.window = []
        if names:
            row["bad_files"] = len(names)
            self.total += len(names)
            self.distinct.update(names)
            run.log(f"step {step}: skipped {len(names)} bad training file(s), each replaced by the next "
                    "good one: " + "; ".join(sorted(set(names))))

    def summary(self, run) -> None:
        if self.total:  # a bad file is met again every epoch
            run.log(f"{len(self.distinct)} bad training file(s) skipped, {self.total} time(s) in all; the run "
                    "went on: " + "; ".join(sorted(self.distinct)))


def log_step(run, row: dict, *trackers) -> None:
    """One metrics line: ``row`` plus what each tracker (``SkippedSteps``, ``BadFiles``) met since
    the last line. Collective when a ``BadFiles`` is among the trackers."""
    for tracker in trackers:
        tracker.flush(row, run, row["step"])
    run.log_metrics(**row)


def close_trackers(run, step: int, skipped: SkippedSteps, bad_files: BadFiles) -> None:
    """At the end of a run: a last metrics line for bad files met since the last one, then both
    trackers' summaries. Collective (``BadFiles.flush``)."""
    row = dict(step=step)
    bad_files.flush(row, run, step)
    if "bad_files" in row:
        run.log_metrics(**row)
    skipped.summary(run)
    bad_files.summary(run)


# safetensors dtype -> numpy dtype of the same width; bfloat16, which numpy lacks, maps as its bits
_NUMPY_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.int16, "I64": np.int64,
                 "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def map_safetensors(path: str | Path) -> tuple[dict[str, np.memmap], dict[str, str], dict[str, str]]:
    """The tensors of a safetensors file as read-only memory maps, without reading their data.

    Pages are read from disk when rows are used and stay in the page cache, which every process
    mapping the same file shares: N processes on a node hold one copy, not N. Returns (arrays,
    safetensors dtype of each, the file's metadata); ``BF16`` arrays hold the bits as int16 (view
    them as ``torch.bfloat16``). Raises ValueError naming the file when it is incomplete.
    """
    check_weights_file(path)  # the header is sound and the file is as long as it says
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        table = json.loads(f.read(n).decode("utf-8"))
    metadata = table.pop("__metadata__", None) or {}
    whole = np.memmap(path, dtype=np.uint8, mode="r")  # one mapping per file; each tensor is a view of it
    arrays, dtypes = {}, {}
    for name, t in table.items():
        if t["dtype"] not in _NUMPY_DTYPES:
            raise ValueError(f"{path}: tensor {name} has dtype {t['dtype']}, which cannot be memory-mapped")
        begin, end = (8 + n + int(o) for o in t["data_offsets"])
        arrays[name] = whole[begin:end].view(_NUMPY_DTYPES[t["dtype"]]).reshape(t["shape"])
        dtypes[name] = t["dtype"]
    return arrays, dtypes, metadata


def resume_step(accelerator, run, output_dir: Path, which: str | None) -> int:
    """Load ``which`` (``latest`` or a checkpoint-N folder) into the prepared objects and return its
    step; 0 when there is nothing to resume. A checkpoint with a cut-short weights file (a copy or
    a save interrupted) stops with one line."""
    ckpt = find_checkpoint(output_dir, which) if which else None
    if ckpt is None:
        if which:
            run.log(f"no checkpoint in {output_dir}; starting from scratch")
        return 0
    for weights in sorted(ckpt.glob("*.safetensors")):
        try:
            check_weights_file(weights)
        except ValueError as e:
            die(f"{e}; resume from an earlier checkpoint-N (--resume_from_checkpoint) or delete this one")
    load_training_state(accelerator, ckpt)
    run.log(f"resumed from {ckpt} at step {checkpoint_step(ckpt)}")
    return checkpoint_step(ckpt)


def unet_checkpoint_hooks(accelerator, ema_unet=None, model_cls=None) -> None:
    """``save_state`` writes the trained denoiser (``model_cls``, default the SD UNet; the U-ViT
    too) as ``unet/`` (save_pretrained, safetensors) and the EMA weights as ``unet_ema/``;
    ``load_state`` reads them back."""
    from diffusers import UNet2DConditionModel
    from diffusers.training_utils import EMAModel

    model_cls = model_cls or UNet2DConditionModel

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
            loaded = EMAModel.from_pretrained(str(Path(input_dir) / "unet_ema"), model_cls, foreach=True)
            ema_unet.load_state_dict(loaded.state_dict())
            ema_unet.to(accelerator.device)
        while models:
            model = models.pop()
            loaded = model_cls.from_pretrained(input_dir, subfolder="unet")
            model.load_state_dict(loaded.state_dict())

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
