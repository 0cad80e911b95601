"""Resumable ``checkpoint-N/`` folders of the accelerate-based trainers (label VAE, joint diffusion).

A checkpoint appears complete or not at all (written to a temporary name, then renamed), only the
newest ``limit`` are kept, ``latest`` finds the newest, and resuming from a checkpoint written with
other model sizes stops with one line instead of a traceback. ``SkippedSteps`` is the two trainers'
count of optimiser steps that fp16 loss scaling skipped.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from utils.config import die


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
