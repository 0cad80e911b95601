"""DiffuMask baseline: a synthetic segmentation set from Stable Diffusion's cross-attention maps.

    python -m inference.diffumask --config configs/diffumask/toy.yaml --base_model runs/toy/base_model \\
        --output_dir data/diffumask/toy

Writes the same layout and manifest as JoDiffusion's generator (``dataset/synthetic.py``), plus
``attention/`` (the class maps), ``config.yaml``, ``log.txt``, ``metrics.jsonl`` and
``summary.json`` (pairs/s). Multi-GPU: ``accelerate launch -m inference.diffumask ...``; each
process refines its masks in ``--crf_workers`` CPU processes beside generation.
Rerunning the same command resumes: three passes over the pair indices, each resumable:
1. generate: per batch, the image and the aggregated class maps (``attention/{name}.npy``,
   uint8, at most 128 px; the image is staged beside it as ``attention/{name}.png``);
2. (``affinity: learned``) train the affinity net on the staged pairs -> ``affinity_net.safetensors``;
3. refine: per pair, the mask (adaptive gamma, dense CRF) -> ``SyntheticWriter``; the staged
   image is then removed. This is CPU work and runs in ``crf_workers`` CPU processes
   (``models/diffumask/refine.py``); when the affinities are known before generation (colour
   affinities, one gamma, or a resumed run whose affinity net exists) it runs beside pass 1, so
   the GPU never waits for the CRF.

``generate_diffumask_dataset(cfg)`` is the in-process entry; the parts it runs (settings,
checks, one batch's maps, the stage) are ``models/diffumask/generate.py``.

Bad input stops the run before anything is loaded, with one line naming the file: a base-model
folder without ``model_index.json`` or a component, a truncated weights file, an empty or broken
sub-class file, an unknown class or dataset.
"""
from __future__ import annotations

import contextlib
import time
from pathlib import Path

from accelerate import PartialState
from tqdm import tqdm

from dataset import get_dataset_info
from dataset.synthetic import SyntheticWriter, batches, pair_seed, shard
from models.diffumask.affinity import train_affinity_net
from models.diffumask.attention import ClassWordError
from models.diffumask.generate import (EXECUTION_SETTINGS, DiffuMaskConfig, MaskStats, affinity_samples,
                                       check_config, check_inputs, crf_workers_auto, generate_with_maps,
                                       is_staged, load_pipeline, refine_spec, run_summary, stage_pair,
                                       walk_params)
from models.diffumask.prompts import PromptPlan
from models.diffumask.refine import RefineJob, RefinePool
from utils.config import die, parse_config
from utils.io import RunDir, atomic_write_json


def main(argv=None) -> dict:
    cfg = parse_config(DiffuMaskConfig, argv, description=__doc__)
    try:
        check_inputs(cfg)
    except ValueError as e:
        die(str(e))
    run = RunDir(cfg.output_dir, is_main=PartialState().is_main_process, name="diffumask")
    run.save_config(cfg)
    run.log(f"diffumask: dataset {cfg.dataset}, base model {cfg.base_model}")
    try:
        summary = generate_diffumask_dataset(cfg, run=run)
    except ClassWordError as e:  # the sub-class file or template gives a prompt without the class word
        die(f"{cfg.subclass_file or 'prompt_template'}: {e}")
    except ValueError as e:  # the base model does not load; pairs missing at the end
        die(str(e))
    if run.is_main:
        atomic_write_json(Path(cfg.output_dir) / "summary.json", {k: v for k, v in summary.items()
                                                                   if k != "dataset_json"})
    run.close()
    return summary


def generate_diffumask_dataset(cfg: DiffuMaskConfig, run=None, progress: bool = True) -> dict:
    """Make (or finish) the DiffuMask synthetic set in ``cfg.output_dir``; returns a summary dict."""
    check_config(cfg)
    t_start = time.time()
    log = run.log if run is not None else (lambda m: None)
    state = PartialState()
    info = get_dataset_info(cfg.dataset)
    plan = PromptPlan.from_dataset(cfg.dataset, cfg.subclass_file or None, cfg.prompt_template, cfg.classes)
    num_pairs = cfg.num_pairs or cfg.images_per_class * len(plan.classes)
    writer = SyntheticWriter(cfg.output_dir, cfg.dataset, img_suffix=cfg.img_suffix)
    (writer.out / "attention").mkdir(parents=True, exist_ok=True)
    prompts = {i: plan.prompt_for(i, cfg.images_per_class, cfg.seed, cfg.classes_per_image)
               for i in range(num_pairs)}
    jobs = {i: RefineJob(i, prompt, tuple(words), tuple(labels), pair_seed(cfg.seed, i))
            for i, (prompt, words, labels) in prompts.items()}
    my_batches = shard(batches(range(num_pairs), cfg.batch_size), state.process_index, state.num_processes)
    generated, t_gen, stats = _make_pairs(cfg, state, writer, my_batches, prompts, jobs, run, log, progress)
    state.wait_for_everyone()

    meta, records = {}, []
    if state.is_main_process:
        settings = {k: v for k, v in vars(cfg).items() if k not in EXECUTION_SETTINGS}
        try:
            meta = writer.finalize(info, "diffumask", settings, expected=num_pairs)
        except RuntimeError as e:  # pairs missing: staged files that could not be read were dropped
            raise ValueError(str(e)) from None
        records = writer.records()
    seconds = time.time() - t_start
    summary = run_summary(writer.out, num_pairs, generated, t_gen, stats, seconds, records, meta)
    log(f"diffumask: {summary['written_this_run']} pairs written in {seconds:.1f}s "
        f"({summary['pairs_per_s']} pairs/s)")
    return summary


def _make_pairs(cfg, state, writer, my_batches, prompts, jobs, run, log, progress) -> tuple[int, float, MaskStats]:
    """This process's pairs through the three passes. The refine pool starts before pass 1 when
    the affinities are known then (so masks are made beside generation), else after pass 2."""
    workers = cfg.crf_workers if cfg.crf_workers >= 0 else crf_workers_auto(state.num_processes)
    log(f"masks in {workers} CPU worker processes (0: inline)")
    net_path = writer.out / "affinity_net.safetensors"
    learned = len(cfg.gammas) > 1 and cfg.affinity == "learned"
    spec = refine_spec(cfg, net_path if learned else None)
    todo_masks = sum(not writer.is_done(i) for b in my_batches for i in b)
    stats = MaskStats(log)
    with contextlib.ExitStack() as stack:
        pool = None
        if workers > 0 and (not learned or net_path.is_file()):  # masks beside generation
            pool = stack.enter_context(RefinePool(spec, workers, stats))
        generated, t_gen = _generate_pass(cfg, state, my_batches, prompts, writer, pool, jobs, run, progress)
        if learned:
            _train_affinity_pass(cfg, state, writer, len(prompts), net_path, log)
        if pool is None:
            pool = stack.enter_context(RefinePool(spec, workers, stats))
        stats.bar = stack.enter_context(tqdm(total=todo_masks, initial=stats.written + len(stats.skipped),
                                             desc="diffumask masks",
                                             disable=not (progress and state.is_main_process)))
        for i in [i for b in my_batches for i in b if not writer.is_done(i) and i not in pool.submitted]:
            pool.submit(jobs[i])
    return generated, t_gen, stats


def _generate_pass(cfg, state, my_batches, prompts, writer, pool, jobs, run, progress) -> tuple[int, float]:
    """Pass 1: images and attention maps; a batch is redone whole so its pairs match a clean run.
    Each newly staged pair is offered to ``pool`` (if any), which refines it beside generation."""
    todo = [b for b in my_batches if not all(is_staged(writer, i) for i in b)]
    generated, t_gen = 0, 0.0
    if todo:
        pipe = load_pipeline(cfg.base_model, state.device, cfg.mixed_precision)
        for batch in tqdm(todo, desc="diffumask generate", disable=not (progress and state.is_main_process)):
            t0 = time.time()
            images, maps = generate_with_maps(pipe, [prompts[i][0] for i in batch], [prompts[i][1] for i in batch],
                                              [pair_seed(cfg.seed, i) for i in batch], cfg)
            for j, i in enumerate(batch):
                if is_staged(writer, i):
                    continue
                stage_pair(writer, i, images[j], maps[j])
                generated += 1
                if pool is not None:
                    pool.offer(jobs[i])
            t_gen += time.time() - t0
            if run is not None:
                run.log_metrics(stage="generate", pairs=generated, seconds=round(t_gen, 3))
        del pipe
    state.wait_for_everyone()
    return generated, t_gen


def _train_affinity_pass(cfg, state, writer, num_pairs: int, net_path: Path, log) -> None:
    """Pass 2 (main process): the AffinityNet, on staged pairs spread over the whole set."""
    if state.is_main_process and not net_path.is_file():
        samples = affinity_samples(writer, num_pairs, cfg.affinity_max_images, cfg.resolution, log)
        t0 = time.time()
        net = train_affinity_net(samples, walk_params(cfg), cfg.affinity_high, cfg.affinity_low,
                                 epochs=cfg.affinity_epochs, seed=cfg.seed, device=str(state.device), log=log)
        net.save(net_path)
        log(f"affinity net trained on {len(samples)} images in {time.time() - t0:.1f}s")
    state.wait_for_everyone()


if __name__ == "__main__":
    main()
