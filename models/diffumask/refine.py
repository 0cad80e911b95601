"""Masks of staged DiffuMask pairs (random walk, dense CRF per gamma), in CPU worker processes.

    with RefinePool(spec, workers=4, on_result=count) as pool:
        pool.offer(job)    # while generating: never waits; queues when the workers are busy
        pool.submit(job)   # afterwards: waits while ``max_pending`` jobs are in flight
    # leaving the block drains the queue: every pair offered or submitted is written

The dense CRF and the random walk are CPU work (~2.6 s per pair on one core at 512 px with five
gammas); run inside the generating process they leave its GPU idle for most of the run. Here a job names a
pair; a worker reads its staged image and maps (``attention/{name}.png`` / ``.npy``, the maps
as stored, so the result does not depend on who computes it), writes the pair with
``SyntheticWriter`` (atomic, record last, one file per pair, so results land by name in any
order) and removes the staged image. ``workers=0`` does the same inline, in the calling
process. Torch runs single-threaded for this work in both modes, so the files are the same
bytes with any number of workers and any thread count. A killed run leaves each pair either
written or still staged; the rerun refines what is still staged. Workers are spawned, not forked
(the parent holds CUDA), so a script that starts a pool needs ``if __name__ == "__main__":``.
"""
from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from PIL import Image

from dataset.synthetic import SyntheticWriter
from models.diffumask.affinity import AffinityNet, ColourAffinity, LearnedAffinity, RandomWalker, WalkParams
from models.diffumask.masks import CRFParams, extract_mask


@dataclass(frozen=True)
class RefineSpec:
    """Everything a worker needs to turn a staged pair into a written one (picklable)."""

    out_dir: str
    dataset: str
    img_suffix: str
    resolution: int
    gammas: tuple[float, ...]
    refine: str
    affinity_net: str  # path of the trained AffinityNet; "" = colour affinities
    walk: WalkParams
    crf: CRFParams
    base_model: str


@dataclass(frozen=True)
class RefineJob:
    index: int
    prompt: str
    words: tuple[str, ...]
    labels: tuple[int, ...]
    seed: int


@dataclass(frozen=True)
class RefineResult:
    index: int
    gamma: float | None
    agreement: float | None
    seconds: float
    skipped: str = ""  # "<file>: <problem>" when a staged file could not be read


def load_maps(path: Path, size: int) -> np.ndarray:
    """Stored uint8 maps -> (C, size, size) float32 in [0, 1] with max 1 per class."""
    t = torch.from_numpy(np.load(path, allow_pickle=False).astype(np.float32) / 255.0)[None]
    if t.shape[-1] != size:
        t = torch.nn.functional.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)
    t = t[0] / t[0].amax(dim=(1, 2), keepdim=True).clamp_min(1e-12)
    return t.clamp(0, 1).numpy()


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class PairRefiner:
    """``job -> RefineResult``: staged image + maps -> mask -> the written pair."""

    def __init__(self, spec: RefineSpec):
        self.spec = spec
        self.writer = SyntheticWriter(spec.out_dir, spec.dataset, img_suffix=spec.img_suffix)
        self.stage = Path(spec.out_dir) / "attention"
        affinity = LearnedAffinity(AffinityNet.from_file(spec.affinity_net)) if spec.affinity_net else ColourAffinity()
        self.walker = RandomWalker(affinity, spec.walk)

    def __call__(self, job: RefineJob) -> RefineResult:
        t0 = time.time()
        s, name = self.spec, SyntheticWriter.name(job.index)
        png, npy = self.stage / f"{name}.png", self.stage / f"{name}.npy"
        try:
            with Image.open(png) as im:
                image = np.array(im.convert("RGB"))
            maps = load_maps(npy, s.resolution)
        except (OSError, ValueError, SyntaxError) as e:
            # unreadable stage (a disk that filled up, a copy cut short): drop it, so the rerun
            # that finalize asks for generates this pair again
            png.unlink(missing_ok=True)
            npy.unlink(missing_ok=True)
            return RefineResult(job.index, None, None, time.time() - t0, f"{png.parent / name}: {e}")
        with torch_threads(1):
            mask, gamma, extra = extract_mask(image, maps, list(job.labels), s.gammas, s.refine, self.walker, s.crf)
        self.writer.write_pair(job.index, image, mask, {
            "prompt": job.prompt, "seed": job.seed, "class_words": list(job.words),
            "class_labels": list(job.labels), "gamma": gamma, "agreement": round(extra["agreement"], 6),
            "generator": "diffumask", "base_model": s.base_model,
        })
        png.unlink()  # the same bytes now live in img_dir/
        return RefineResult(job.index, gamma, extra["agreement"], time.time() - t0)


_refiner: PairRefiner | None = None  # one per worker process


def _init_worker(spec: RefineSpec) -> None:
    global _refiner
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    torch.set_num_threads(1)  # workers share the CPUs; one thread each
    _refiner = PairRefiner(spec)


def _work(job: RefineJob) -> RefineResult:
    return _refiner(job)


class RefinePool:
    """Refines pairs in ``workers`` spawned CPU processes (0 = inline); see the module docstring.

    ``on_result(RefineResult)`` is called in this process for each finished pair. At most
    ``max_pending`` (default 2 x workers) jobs are handed to the workers at a time; the rest wait
    here as small job records.
    """

    def __init__(self, spec: RefineSpec, workers: int, on_result: Callable[[RefineResult], None],
                 max_pending: int | None = None):
        if workers < 0:
            raise ValueError(f"crf_workers must be >= 0, got {workers}")
        workers = min(workers, len(os.sched_getaffinity(0)))  # more would only queue for a core
        self.on_result, self.workers = on_result, workers
        self.max_pending = max_pending or 2 * max(workers, 1)
        self.pending: set[Future] = set()
        self.backlog: deque[RefineJob] = deque()
        self.submitted: set[int] = set()
        self.inline = PairRefiner(spec) if workers == 0 else None
        # spawn: the parent holds CUDA and torch thread pools, which forked children must not inherit
        self.executor = None if workers == 0 else ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker, initargs=(spec,))

    def offer(self, job: RefineJob) -> None:
        """Queue a job without waiting (inline mode: leave it for ``submit`` later)."""
        if self.inline is not None:
            return
        self.submitted.add(job.index)
        self.backlog.append(job)
        self._reap(block=False)
        self._fill()

    def submit(self, job: RefineJob) -> None:
        """Queue a job, waiting while the workers are full (inline mode: refine it now)."""
        self.submitted.add(job.index)
        if self.inline is not None:
            self.on_result(self.inline(job))
            return
        self.backlog.append(job)
        self._fill()
        while self.backlog:
            self._reap(block=True)
            self._fill()

    def drain(self) -> None:
        while self.backlog or self.pending:
            self._fill()
            self._reap(block=True)

    def _fill(self) -> None:
        while self.backlog and len(self.pending) < self.max_pending:
            self.pending.add(self.executor.submit(_work, self.backlog.popleft()))

    def _reap(self, block: bool) -> None:
        if not self.pending:
            return
        done, _ = wait(self.pending, timeout=None if block else 0, return_when=FIRST_COMPLETED)
        for f in sorted(done, key=lambda f: f.result().index):
            self.pending.discard(f)
            self.on_result(f.result())

    def close(self, cancel: bool = False) -> None:
        """Stop the workers; ``cancel`` drops queued jobs (pairs being refined still finish)."""
        if self.executor is not None:
            self.executor.shutdown(wait=True, cancel_futures=cancel)
            self.executor = None

    def __enter__(self) -> "RefinePool":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.drain()
        self.close(cancel=exc_type is not None)
