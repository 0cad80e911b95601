"""Stage 3: generate a synthetic segmentation dataset (image + mask pairs) with a JoDiffusion pipeline.

    python -m inference.generate --pipeline runs/toy/jodiffusion --dataset toy --num_pairs 2000 \\
        --output_dir data/gen/toy
    accelerate launch --num_processes 4 -m inference.generate --pipeline runs/voc/joint_5e5/pipeline \\
        --dataset voc --num_pairs 40000 --output_dir data/synthetic/voc/jodiffusion

The pipeline is either backbone (``models.pipelines``): ours (the widened SD UNet) or the authors'
U-ViT folder (``scripts/gen/<dataset>_uvit.sh``); both write the same dataset.
Writes the mmseg layout of ``dataset/synthetic.py`` plus ``config.yaml`` and ``log.txt``.
Pair ``i`` is seeded from ``pair_seed(seed, i)`` and computed in a batch fixed by the global
index list, so the same seed gives the same bytes with any number of processes (same hardware
and library versions). On CPU the thread count matters too: CPU kernels split their float
reductions by thread, and 1 vs 2 threads flip pixels by a grey level. Launchers pick it from the
process count (torchrun sets OMP_NUM_THREADS=1 for 2+ processes; one process, and accelerate's
multi-CPU state when OMP_NUM_THREADS is unset, take every core), so on CPU this entry point sets
torch's threads itself to ``--cpu_threads`` (default 1), after the launcher's state is built and
before any model work. ``--cpu_threads 0`` keeps the launcher's choice: faster on many cores,
but the bytes then depend on the process count. GPU runs are unaffected.
A rerun of the same command skips finished pairs; ``--stop_after K`` stops each process after
K new pairs (to split a long job, or to test resuming).

Bad input (a missing or incomplete pipeline folder, a truncated weights file, a label VAE made
for another dataset, an empty prompt file, a broken caption file) stops with one line naming the
file before anything is loaded or written.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from accelerate import PartialState
from accelerate.utils import parse_flag_from_env
from tqdm import tqdm

from dataset import DATASET_NAMES, get_dataset_info
from dataset.synthetic import SyntheticWriter, batches, pair_seed, prompt_pool, repeat_shuffled, shard
from models.pipeline_jodiffusion import SCHEDULER_CLASSES, make_scheduler
from models.pipelines import check_pipeline, load_pipeline
from utils.config import config_to_dict, die, parse_config
from utils.io import RunDir
from utils.precision import PRECISIONS, cpu_generators, resolve_precision, weight_dtype


@dataclass
class GenerateConfig:
    """Generate image + mask pairs from prompts with a JoDiffusion pipeline."""

    pipeline: str = field(default="", metadata={"help": "pipeline folder: ours (widened UNet, save_pretrained) or "
                                                     "the authors' U-ViT layout (image_vae/, unet/, label_vae/, ...)"})
    output_dir: str = field(default="", metadata={"help": "where the synthetic dataset goes"})
    dataset: str = field(default="toy", metadata={"help": "dataset name", "choices": DATASET_NAMES})
    data_root: str | None = field(default=None, metadata={"help": "override the dataset's data_root"})
    num_pairs: int = field(default=40000, metadata={"help": "pairs to generate (paper: 40k ADE20K/VOC, 80k COCO)"})
    prompt_source: str = field(default="captions", metadata={
        "help": "captions (training captions, repeated and shuffled), class_names (one class per prompt), "
                "or file (--prompt_file, one prompt per line)"})
    prompt_file: str | None = field(default=None, metadata={"help": "prompts, one per line (prompt_source=file)"})
    caption_split: str = field(default="train", metadata={"help": "split whose captions are the prompts"})
    seed: int = field(default=0, metadata={"help": "base seed: prompt order and every pair's noise"})
    num_inference_steps: int = field(default=50, metadata={"help": "sampling steps (paper: 50)"})
    guidance_scale: float = field(default=8.0, metadata={"help": "classifier-free guidance (paper: 8)"})
    scheduler: str = field(default="dpmsolver++", metadata={"help": f"one of {', '.join(SCHEDULER_CLASSES)}"})
    batch_size: int = field(default=8, metadata={"help": "pairs per forward pass (part of the settings: it fixes batch composition)"})
    height: int | None = field(default=None, metadata={"help": "image height (default: the model's)"})
    width: int | None = field(default=None, metadata={"help": "image width (default: the model's)"})
    confidence_threshold: float = field(default=0.5, metadata={"help": "mask pixels less confident than this are low-confidence"})
    low_confidence_label: int = field(default=255, metadata={"help": "label written for low-confidence pixels (255 = ignore)"})
    image_format: str = field(default="png", metadata={"help": "png or jpg"})
    mixed_precision: str = field(default="auto", metadata={"help": "auto (fp16 on GPU, fp32 on CPU), no, fp16, bf16"})
    stop_after: int | None = field(default=None, metadata={"help": "each process stops after this many new pairs"})
    cpu_threads: int = field(default=1, metadata={
        "help": "torch threads per process on CPU, whatever the launcher set: the bytes depend on the "
                "thread count, so a fixed count gives the same bytes with any number of processes; "
                "0 = keep the launcher's choice (faster on many cores, bytes depend on the process count)"})
    preview_count: int = field(default=8, metadata={"help": "pairs shown in preview.png"})


def _or_die(fn, *args):
    """``fn(*args)``; a ValueError (its message names the file or option) stops with that one line."""
    try:
        return fn(*args)
    except ValueError as e:
        die(str(e))


def make_prompts(cfg: GenerateConfig, info) -> list[str]:
    """The ``num_pairs`` prompts, identical on every process (they depend only on the config)."""
    pool = _or_die(prompt_pool, info, cfg.prompt_source, cfg.prompt_file, cfg.caption_split)
    return repeat_shuffled(pool, cfg.num_pairs, cfg.seed)


def settings_of(cfg: GenerateConfig, dtype: torch.dtype) -> dict:
    """What decides a pair's bytes (no process count, no paths of this run)."""
    keep = ("dataset", "num_pairs", "prompt_source", "seed", "num_inference_steps", "guidance_scale",
            "scheduler", "batch_size", "height", "width", "confidence_threshold", "low_confidence_label",
            "image_format")
    out = {k: v for k, v in config_to_dict(cfg).items() if k in keep}
    out.update(checkpoint=cfg.pipeline, dtype=str(dtype).replace("torch.", ""))
    return out


def check_inputs(cfg: GenerateConfig):
    """Every check that needs no model, before anything is loaded or written: bad options, the
    pipeline folder (files and weight headers), its label VAE against the dataset, the prompts.
    Returns (dataset info, prompts, backbone)."""
    if not cfg.output_dir:
        die("--output_dir is required")
    if cfg.image_format not in ("png", "jpg"):
        die(f"--image_format must be png or jpg, got {cfg.image_format!r}")
    if cfg.num_pairs < 1 or cfg.batch_size < 1:
        die("--num_pairs and --batch_size must be >= 1")
    if cfg.cpu_threads < 0:
        die("--cpu_threads must be >= 1, or 0 for the launcher's choice")
    if cfg.mixed_precision not in ("auto", *PRECISIONS):
        die(f"--mixed_precision must be auto, no, fp16 or bf16, got {cfg.mixed_precision!r}")
    try:
        make_scheduler(cfg.scheduler)  # the name, checked where samplers are built
    except ValueError as e:
        die(f"--{e}")
    info = _or_die(get_dataset_info, cfg.dataset, cfg.data_root)
    if not (0 <= cfg.low_confidence_label < info.num_labels or cfg.low_confidence_label == info.ignore_index):
        die(f"--low_confidence_label must be a label 0..{info.num_labels - 1} or {info.ignore_index}")
    if not cfg.pipeline:
        die("--pipeline is required: a JoDiffusion pipeline folder (train.joint_diffusion writes <output_dir>/pipeline)")
    backbone = _or_die(check_pipeline, cfg.pipeline, info)
    return info, make_prompts(cfg, info), backbone


def main(argv=None) -> None:
    cfg = parse_config(GenerateConfig, argv, description=__doc__)
    info, prompts, backbone = check_inputs(cfg)
    # accelerate reads ACCELERATE_USE_CPU only in AcceleratorState; PartialState needs it passed,
    # or CPU worker processes would each think they are alone
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    if state.device.type == "cpu" and cfg.cpu_threads > 0:
        # after PartialState, which sets its own count when OMP_NUM_THREADS is unset; before any
        # model work: CPU kernels split float reductions by thread, so this fixes the bytes
        torch.set_num_threads(cfg.cpu_threads)
    precision = resolve_precision(cfg.mixed_precision, state.device)
    dtype = weight_dtype(precision)
    pipe = _or_die(load_pipeline, cfg.pipeline, dtype, state.device, cfg.scheduler)
    run = RunDir(cfg.output_dir, is_main=state.is_main_process, name="generate")
    run.save_config(cfg)
    writer = SyntheticWriter(cfg.output_dir, info.name, img_suffix="." + cfg.image_format)
    settings = settings_of(cfg, dtype)
    _or_die(writer.check_settings, settings)

    mine = shard(batches(range(cfg.num_pairs), cfg.batch_size), state.process_index, state.num_processes)
    todo = sum(1 for b in mine for i in b if not writer.is_done(i))
    threads = f", {torch.get_num_threads()} CPU thread(s)" if state.device.type == "cpu" else ""
    run.log(f"{cfg.num_pairs} pairs from the {backbone} backbone, {state.num_processes} process(es); this one has {todo} to make "
            f"({precision}{threads}, {cfg.scheduler} x {cfg.num_inference_steps}, guidance {cfg.guidance_scale})")
    generate_pairs(cfg, pipe, prompts, mine, writer, settings, show=state.is_main_process)
    state.wait_for_everyone()
    if state.is_main_process:
        finished = sum(writer.is_done(i) for i in range(cfg.num_pairs))
        if finished < cfg.num_pairs:
            run.log(f"stopped with {finished} of {cfg.num_pairs} pairs written; rerun the same command to finish")
        else:
            writer.finalize(info, "jodiffusion", settings, expected=cfg.num_pairs, preview_count=cfg.preview_count)
            run.log(f"done: {cfg.num_pairs} pairs in {cfg.output_dir} (preview.png, manifest.jsonl)")
    run.close()


def generate_pairs(cfg: GenerateConfig, pipe, prompts: list[str], mine: list[list[int]],
                   writer: SyntheticWriter, settings: dict, show: bool) -> None:
    """This process's batches, skipping finished pairs; stops after ``cfg.stop_after`` new ones."""
    todo = sum(1 for b in mine for i in b if not writer.is_done(i))
    bar = tqdm(total=todo, unit="pair", desc="generate", disable=not show, dynamic_ncols=True)
    made = 0
    for batch in mine:
        missing = [i for i in batch if not writer.is_done(i)]
        if not missing:
            continue
        if cfg.stop_after is not None and made >= cfg.stop_after:
            break
        # always the whole fixed batch, even if only some of it is missing: a pair's bytes may
        # depend on its batch-mates through floating-point kernels, never on what was done before
        seeds = [pair_seed(cfg.seed, i) for i in batch]
        out = pipe([prompts[i] for i in batch], num_inference_steps=cfg.num_inference_steps,
                   guidance_scale=cfg.guidance_scale, height=cfg.height, width=cfg.width,
                   generator=cpu_generators(seeds), confidence_threshold=cfg.confidence_threshold)
        masks = out.masks
        if cfg.low_confidence_label != 255:
            masks = masks.copy()
            masks[masks == 255] = cfg.low_confidence_label
        for j, i in enumerate(batch):
            if i not in missing:
                continue
            writer.write_pair(i, out.images[j], masks[j], {
                "prompt": prompts[i], "seed": seeds[j], "checkpoint": cfg.pipeline, "settings": settings,
                "low_confidence_fraction": round(float((out.masks[j] == 255).mean()), 6)})
            made += 1
            bar.update()
    bar.close()


if __name__ == "__main__":
    main()
