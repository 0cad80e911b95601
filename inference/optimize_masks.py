"""Stage 4: remove small noisy blobs from generated masks, one sibling dataset per threshold.

    python -m inference.optimize_masks --input data/gen/toy --thresholds 20 50 100 --reference_size 512

Writes ``data/gen/toy_optim20``, ``_optim50``, ``_optim100`` (next to the input, or under
``--output_root``) in the same layout as the input: images hard-linked (copied where links
are impossible), masks replaced, manifest/captions/dataset.json carried over, plus
``mask_optimization.json`` (pixels and components changed) and ``preview.png`` (the same sheet
in each: image | input mask | the mask after each threshold | overlay). The input is
never modified. Thresholds are in pixels at ``reference_size``² and scale with the mask area;
every threshold is computed from one labelling of each mask (``utils.mask_optimization``).
A rerun skips masks already done (each output's ``optim_parts.jsonl`` gets a mask's record
after its files are in place).

Bad input stops the run before any mask is written, with one line naming the file: no
``dataset.json`` or ``manifest.jsonl``, a manifest shorter than ``dataset.json`` says, a listed
mask or image missing, a header that does not read, a colour mask, a mask whose size differs
from its image. A mask that turns out corrupt when decoded (truncated, labels outside the
dataset's classes other than its ignore value) is named, skipped and counted: its pair is left
out of the outputs (manifest, captions and ``mask_optimization.json`` say which), and the run
goes on unless more than ``--max_bad_fraction`` of the masks are bad.
"""
from __future__ import annotations

import contextlib
import functools
import json
import multiprocessing as mp
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import cv2
from tqdm import tqdm

from dataset.optimized_set import (PARTS, check_pairs, finalize_output, load_parts, load_source,
                                   optimize_mask_file, remove_temporaries, write_previews)
from utils.config import die, parse_config, save_config


@dataclass
class OptimizeMasksConfig:
    """Relabel small connected components of generated masks (METHOD.md §5)."""

    input: str = field(default="", metadata={"help": "generated dataset folder (inference.generate output)"})
    thresholds: list[int] = field(default_factory=lambda: [20, 50, 100], metadata={
        "help": "area thresholds in pixels at reference_size² (paper: 20 50 100 at 512²)"})
    reference_size: int = field(default=512, metadata={"help": "side the thresholds refer to"})
    output_root: str | None = field(default=None, metadata={"help": "where <input name>_optim<T> go (default: beside the input)"})
    num_workers: int = field(default=0, metadata={"help": "processes (0 = all CPU cores)"})
    link_images: bool = field(default=True, metadata={"help": "hard-link images instead of copying"})
    stop_after: int | None = field(default=None, metadata={"help": "stop after this many masks (split a long job)"})
    max_bad_fraction: float = field(default=0.01, metadata={
        "help": "share of masks that may turn out corrupt (skipped) before the run stops; at least one"})


def _run(todo: list[tuple[str, list[int]]], work, workers: int, outs: list[Path], parts: list[dict],
         max_bad_fraction: float, num_masks: int, mask_dir: Path) -> dict[str, str]:
    """Process ``todo`` here or in a pool; append each finished mask's records to its outputs'
    PARTS; return the bad masks ({name: problem}), stopping with one line once more than
    ``max_bad_fraction`` of the ``num_masks`` (at least one) are bad."""
    bad: dict[str, str] = {}
    allowed_bad = max(1, int(max_bad_fraction * num_masks))
    bar = tqdm(total=len(todo), unit="mask", desc="optimize masks", dynamic_ncols=True)
    with contextlib.ExitStack() as stack:
        logs = [stack.enter_context(open(out / PARTS, "a")) for out in outs]
        if workers == 1 or len(todo) <= 1:
            results = map(work, todo)
        else:
            pool = stack.enter_context(mp.get_context("spawn").Pool(
                min(workers, len(todo)), initializer=cv2.setNumThreads, initargs=(1,)))
            results = pool.imap_unordered(work, todo, chunksize=max(1, min(64, len(todo) // (4 * workers))))
        for name, problem, records in results:
            for i, rec in records:
                logs[i].write(json.dumps(rec, sort_keys=True) + "\n")
                logs[i].flush()
                parts[i][name] = rec
            bar.update()
            if problem:
                bad[name] = problem
                tqdm.write(f"skipped: {problem}", file=sys.stderr)
                if len(bad) > allowed_bad:
                    bar.close()
                    die(f"{mask_dir}: {len(bad)} of {num_masks} masks bad, more than the allowed share "
                        f"(max_bad_fraction={max_bad_fraction}); latest {problem}")
    bar.close()
    return bad


def main(argv=None) -> None:
    cfg = parse_config(OptimizeMasksConfig, argv, description=__doc__)
    if not cfg.input:
        die("--input: not given; pass the generated dataset folder")
    src = Path(cfg.input)
    try:
        meta, names = load_source(src)
    except ValueError as e:
        die(str(e))
    if "mask_optimization" in meta:
        print(f"note: {src} is itself an optimized dataset; optimizing again", file=sys.stderr)
    split, img_suffix = meta.get("split", "train"), meta.get("img_suffix", ".png")
    ignore_index = int(meta.get("ignore_index", 255))
    num_labels = len(meta["classes"]) if isinstance(meta.get("classes"), list) else None
    if not cfg.thresholds or any(t <= 0 for t in cfg.thresholds) or cfg.reference_size <= 0:
        die("--thresholds and --reference_size must be positive")
    if not 0.0 <= cfg.max_bad_fraction <= 1.0:
        die(f"--max_bad_fraction must be in [0, 1], got {cfg.max_bad_fraction}")

    root = Path(cfg.output_root) if cfg.output_root else src.resolve().parent
    thresholds = list(dict.fromkeys(cfg.thresholds))
    outs = [root / f"{src.resolve().name}_optim{t}" for t in thresholds]
    for out in outs:
        if out.resolve() == src.resolve():
            die(f"{out}: output would overwrite the input; pass another --output_root")
    parts = [load_parts(out) for out in outs]
    todo = [(n, [i for i, p in enumerate(parts) if n not in p]) for n in names]
    todo = [t for t in todo if t[1]][: cfg.stop_after]
    try:
        check_pairs(src, [n for n, _ in todo], split, img_suffix)
    except ValueError as e:
        die(str(e))
    for out in outs:
        for d in ("img_dir/" + split, "ann_dir/" + split):
            (out / d).mkdir(parents=True, exist_ok=True)
        remove_temporaries(out)
        save_config(cfg, out / "config.yaml")

    workers = cfg.num_workers or os.cpu_count() or 1
    cv2.setNumThreads(1)  # one thread per process: --num_workers sets the parallelism
    work = functools.partial(optimize_mask_file, src=str(src), outs=[str(o) for o in outs], thresholds=thresholds,
                             reference_size=cfg.reference_size, ignore_index=ignore_index, num_labels=num_labels,
                             split=split, img_suffix=img_suffix, link=cfg.link_images)
    print(f"{len(names)} masks, {len(todo)} to do, thresholds {thresholds} at {cfg.reference_size}², "
          f"{workers} process(es)", file=sys.stderr)
    bad = _run(todo, work, workers, outs, parts, cfg.max_bad_fraction, len(names), src / "ann_dir" / split)

    _finish(cfg, src, meta, names, outs, thresholds, parts, bad)


def _finish(cfg, src: Path, meta: dict, names: list[str], outs: list[Path], thresholds: list[int],
            parts: list[dict], bad: dict[str, str]) -> None:
    """Once every mask is done or bad: each output's listings, report and preview."""
    done = [n for n in names if all(n in p for p in parts)]
    if len(done) + len(bad) < len(names):
        print("stopped before the end; rerun the same command to finish", file=sys.stderr)
        return
    if bad:
        print(f"{len(bad)} bad mask(s) skipped and left out of the outputs: "
              f"{', '.join(sorted(bad))} (listed in mask_optimization.json)", file=sys.stderr)
    for out, thr, out_parts in zip(outs, thresholds, parts):
        r = finalize_output(src, out, done, out_parts, bad, meta, thr, cfg.reference_size)
        print(f"threshold {thr}: {r['changed_components']} of {r['components']} components and "
              f"{r['changed_pixels']} pixels ({100 * r['changed_pixel_fraction']:.3f}%) changed in "
              f"{r['masks_changed']} of {r['num_masks']} masks -> {out}", file=sys.stderr)
    if "palette" in meta:
        write_previews(src, outs, done, meta, meta.get("split", "train"), meta.get("img_suffix", ".png"))

if __name__ == "__main__":
    main()
