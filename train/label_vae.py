"""Stage 1: train the label VAE (masks -> 4-channel latents -> K + 1 logits).

    python -m train.label_vae --dataset toy --config configs/label_vae/toy.yaml --output_dir runs/label_vae_toy

Multi-GPU: ``accelerate launch --num_processes 8 -m train.label_vae ...``, each process on its own
share of every epoch (two CPU processes: ``ACCELERATE_USE_CPU=true torchrun --nproc_per_node 2 ...``).
Writes ``config.yaml``, ``log.txt``, ``metrics.jsonl``, ``checkpoint-N/`` (``--resume_from_checkpoint
latest``), ``validation/step_N.png`` (mask | reconstruction | errors), ``latent_stats.json`` and the
model in ``label_vae/`` (save_pretrained).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch
from tqdm.auto import tqdm

from dataset import DATASET_NAMES, get_dataset_info
from dataset.segmentation import DatasetError, SegmentationDataset
from models.label_vae import (MODEL_TYPES, PAPER_SCALING_FACTOR, build_label_vae, measure_latent_stats,
                              parse_scaling_factor, reconstruction_loss, reconstruction_scores, store_latent_scale)
from utils.checkpoints import BadFiles, SkippedSteps, close_trackers, log_step, resume_step, save_checkpoint
from utils.config import die, error_line, parse_config
from utils.io import RunDir, atomic_write_json, save_pretrained_atomic
from utils.precision import derive_seed, resolve_precision
from utils.training import (EpochPermutation, LossWindow, accumulation_steps, backward_step, epoch_batches,
                            exit_launched_process, make_lr_scheduler, prepare_held, start_run)


@dataclass
class LabelVAETrainConfig:
    """Train the label VAE. Defaults are the paper's recipe (METHOD.md §2: ADE20K, 512 px,
    AdamW wd 0.05, lr 1e-4, effective batch 32, fp16, grad clip 3, 100 epochs), except the
    latent scale: measured ('auto') instead of the authors' fixed 0.2, which stays selectable."""

    dataset: str = field(default="ade20k", metadata={"help": "dataset name", "choices": DATASET_NAMES})
    data_root: str | None = field(default=None, metadata={"help": "override the dataset's data_root"})
    output_dir: str = field(default="runs/label_vae", metadata={"help": "run folder"})
    model_type: str = field(default="label_vae", metadata={"help": "architecture", "choices": MODEL_TYPES})
    encoder_channels: list[int] = field(default_factory=lambda: [128, 256, 512, 512], metadata={
        "help": "stem width then one width per down stage (autoencoder_kl: its block_out_channels)"})
    decoder_channels: list[int] = field(default_factory=lambda: [512, 512, 512, 512], metadata={
        "help": "as many as encoder_channels (label_vae only; autoencoder_kl mirrors its encoder)"})
    norm_num_groups: int = field(default=32, metadata={"help": "GroupNorm groups"})
    scaling_factor: str = field(default="auto", metadata={"help": "latent scale stored with the model: 'auto' = "
        "1/std measured after training on latent_stats_samples training masks (without a KL term the scale is "
        f"arbitrary), or a number: {PAPER_SCALING_FACTOR} is the authors' fixed value (METHOD.md §2)"})
    resolution: int = field(default=512, metadata={"help": "training crop size"})
    train_batch_size: int = field(default=8, metadata={"help": "per device"})
    total_batch_size: int = field(default=32, metadata={"help": "effective batch (accumulation fills it)"})
    learning_rate: float = field(default=1e-4, metadata={"help": "AdamW, constant (paper: VOC 1e-5)"})
    lr_scheduler: str = field(default="constant", metadata={"help": "constant (paper) or cosine (decays to 0)",
                                                            "choices": ("constant", "cosine")})
    lr_warmup_steps: int = field(default=0, metadata={"help": "linear warmup steps"})
    adam_weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay"})
    max_grad_norm: float = field(default=3.0, metadata={"help": "gradient clipping"})
    num_train_epochs: int = field(default=100, metadata={"help": "epochs (ADE20K 100, VOC 50, COCO 20)"})
    max_train_steps: int | None = field(default=None, metadata={"help": "optimizer steps; overrides epochs"})
    mixed_precision: str = field(default="auto", metadata={"help": "auto (fp16 on GPU, no on CPU), no, fp16, bf16"})
    seed: int = field(default=0, metadata={"help": "seeds init, data order, crops and posterior noise"})
    dataloader_num_workers: int = field(default=4, metadata={"help": "DataLoader workers"})
    checkpointing_steps: int = field(default=1000, metadata={"help": "save checkpoint-N every N steps"})
    checkpoints_total_limit: int | None = field(default=None, metadata={"help": "keep at most this many"})
    resume_from_checkpoint: str | None = field(default=None, metadata={"help": "'latest' or a checkpoint folder"})
    validation_steps: int = field(default=1000, metadata={"help": "validate every N steps (and at the end)"})
    validation_max_samples: int = field(default=500, metadata={"help": "val masks scored (0 = all)"})
    validation_batch_size: int = field(default=16, metadata={"help": "val batch"})
    num_validation_images: int = field(default=8, metadata={"help": "rows in the validation picture"})
    latent_stats_samples: int = field(default=1000, metadata={"help": "training masks, evenly spaced, for the "
                                      "latent std (0 = all)"})
    logging_steps: int = field(default=10, metadata={"help": "metrics.jsonl line every N steps"})


def main(argv=None) -> Path:
    try:
        return train(parse_config(LabelVAETrainConfig, argv, description=__doc__))
    except DatasetError as e:  # a missing folder before the first step, or too many bad files mid-run
        die(error_line(e))


def train(cfg: LabelVAETrainConfig) -> Path:
    """Parse -> build (run folder, model, data, optimiser) -> ``fit`` -> measure the latent scale and export."""
    try:
        fixed_scale = parse_scaling_factor(cfg.scaling_factor)
        accum = accumulation_steps(cfg.total_batch_size, cfg.train_batch_size)
        mixed = resolve_precision(cfg.mixed_precision, "cuda" if torch.cuda.is_available() else "cpu")
        accelerator, run = start_run(cfg, mixed, accum, name="label_vae")  # seeds every RNG: before the model
        info = get_dataset_info(cfg.dataset, cfg.data_root)
        model = build_label_vae(cfg.model_type, info.num_labels, info.ignore_index, cfg.encoder_channels, cfg.decoder_channels,
                                cfg.norm_num_groups, fixed_scale or PAPER_SCALING_FACTOR, cfg.resolution)
    except ValueError as e:  # DatasetError included
        die(error_line(e))
    r = build_data(cfg, info, accelerator)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.adam_weight_decay)
    # the prepared loader gives each process its own share of every epoch's batches
    r.model, r.optimizer, r.train_loader = prepare_held(accelerator, model, optimizer, r.train_loader)
    r.steps_per_epoch, r.accum, r.info = math.ceil(len(r.train_loader) / accum), accum, info
    max_steps = cfg.max_train_steps or cfg.num_train_epochs * r.steps_per_epoch
    name = cfg.lr_scheduler + ("_with_warmup" if cfg.lr_scheduler == "constant" else "")
    r.lr_scheduler = accelerator.prepare(make_lr_scheduler(name, optimizer, cfg.lr_warmup_steps, max_steps,
                                                           accelerator.num_processes))
    global_step = resume_step(accelerator, run, run.path, cfg.resume_from_checkpoint)
    run.log(f"{cfg.model_type}: {sum(p.numel() for p in r.model.parameters()) / 1e6:.2f}M parameters, {info.num_labels} "
            f"labels, {len(r.train_set)} train / {len(r.val_set)} val masks, {r.steps_per_epoch} steps/epoch, {max_steps} steps, "
            f"batch {cfg.train_batch_size} x {accum} accum x {accelerator.num_processes} processes = {cfg.total_batch_size} "
            f"masks per step, mixed precision {mixed}")
    global_step = fit(cfg, accelerator, run, r, global_step, max_steps)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        export(cfg, run, accelerator.unwrap_model(r.model), r.stats_set, global_step, fixed_scale)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    run.close()
    return run.path


def build_data(cfg: LabelVAETrainConfig, info, accelerator) -> SimpleNamespace:
    """Training masks (random crops, an order from (seed, epoch)), validation masks, and the
    training masks the latent scale is measured on."""
    train_set = SegmentationDataset(info, "train", size=cfg.resolution, augment=True, seed=cfg.seed)
    val_set = SegmentationDataset(info, "val", size=cfg.resolution, augment=False)
    sampler = EpochPermutation(len(train_set), cfg.seed)
    loader_kw = dict(num_workers=cfg.dataloader_num_workers, pin_memory=torch.cuda.is_available())
    train_loader = torch.utils.data.DataLoader(train_set, cfg.train_batch_size, sampler=sampler, drop_last=True, **loader_kw)
    if len(train_loader) < accelerator.num_processes:
        die(f"{info.root()}: {len(train_set)} training masks are fewer than one batch of {cfg.train_batch_size} "
            f"for each of {accelerator.num_processes} process(es)")
    return SimpleNamespace(train_set=train_set, val_set=val_set, sampler=sampler, train_loader=train_loader,
                           stats_set=train_set.without_augmentation(),  # headers already checked
                           val_loader=torch.utils.data.DataLoader(val_set, cfg.validation_batch_size, **loader_kw))


def fit(cfg: LabelVAETrainConfig, accelerator, run: RunDir, r, global_step: int, max_steps: int) -> int:
    """The accelerate loop: cross-entropy of the reconstruction (no KL term, the authors'), a
    metrics line every ``logging_steps``, checkpoints, validation. Returns the last step."""
    num_bits, rank = accelerator.unwrap_model(r.model).config.num_bits, accelerator.process_index
    first_epoch, skip = global_step // r.steps_per_epoch, (global_step % r.steps_per_epoch) * r.accum
    window, skipped, bad_files = LossWindow(1, accelerator.device), SkippedSteps(), BadFiles(accelerator.num_processes)
    r.model.train()
    # closed also when a bad-data stop ends the run, so its message starts a line
    with tqdm(total=max_steps, initial=global_step, desc="label VAE", disable=not accelerator.is_main_process) as bar:
        for epoch, batch_index, batch in epoch_batches(accelerator, r.train_loader, first_epoch, skip,
                                                       math.ceil(max_steps / r.steps_per_epoch), r.sampler, r.train_set):
            if global_step >= max_steps:
                break
            bad_files.add(batch)
            with accelerator.accumulate(r.model):
                # posterior noise from (seed, epoch, batch, rank) alone: resumed runs draw the same
                seed = derive_seed(cfg.seed, epoch, batch_index, rank, bits=32)
                loss = reconstruction_loss(r.model, batch["mask"], num_bits, r.info.ignore_index,
                                           torch.Generator(accelerator.device).manual_seed(seed))
                backward_step(accelerator, loss, r.model, r.optimizer, r.lr_scheduler, cfg.max_grad_norm)
            window.add(loss)
            if not accelerator.sync_gradients:
                continue
            skipped.update(accelerator)
            global_step += 1
            bar.update(1)
            if global_step % cfg.logging_steps == 0 or global_step == 1:
                (loss_value,), sec = window.read(accelerator, r.accum)
                log_step(run, dict(step=global_step, epoch=epoch, loss=loss_value, lr=r.lr_scheduler.get_last_lr()[0],
                                   sec_per_step=sec), skipped, bad_files)
                bar.set_postfix(loss=f"{loss_value:.4f}", epoch=epoch)
            if global_step % cfg.checkpointing_steps == 0:
                save_checkpoint(accelerator, run.path, global_step, cfg.checkpoints_total_limit, log=run.log)
            if global_step % cfg.validation_steps == 0 or global_step == max_steps:
                validate(cfg, accelerator, run, r, global_step)
    close_trackers(run, global_step, skipped, bad_files)
    return global_step


def validate(cfg: LabelVAETrainConfig, accelerator, run: RunDir, r, step: int) -> None:
    """Validation reconstruction mIoU and ``validation/step_N.png`` (mask | reconstruction | errors)."""
    if accelerator.is_main_process:
        res = reconstruction_scores(accelerator.unwrap_model(r.model), r.val_loader, r.info, cfg.validation_max_samples,
                                    cfg.num_validation_images, run.path / "validation" / f"step_{step:06d}.png")
        bad = f"; {len(res['bad_files'])} bad file(s) skipped: " + "; ".join(res["bad_files"]) if res["bad_files"] else ""
        run.log(f"step {step}: val reconstruction mIoU {res['mIoU']:.4f}, pixel acc {res['pixel_acc']:.4f}{bad}")
        run.log_metrics(step=step, val_mIoU=res["mIoU"], val_pixel_acc=res["pixel_acc"],
                        val_per_class_IoU=res["per_class_IoU"])
    accelerator.wait_for_everyone()


def export(cfg: LabelVAETrainConfig, run: RunDir, model, stats_set, step: int, fixed_scale: float | None) -> None:
    """Measure the latent std on a fixed, evenly spread sample of the training masks (the same
    masks in every run), store the scale (``auto``: 1/std) and write ``label_vae/``."""
    stats = measure_latent_stats(model, stats_set, cfg.latent_stats_samples, cfg.validation_batch_size)
    stored = store_latent_scale(model, stats, fixed_scale)
    atomic_write_json(run.path / "latent_stats.json", stats)
    run.log(f"latent std {stats['std']:.4f} (mean {stats['mean']:.4f}) over {stats['num_masks']} training "
            f"masks; 1/std = {stats['unit_variance_scaling_factor']:.4f}; stored scaling_factor {stored:.4f}")
    run.log_metrics(step=step, latent_std=stats["std"], latent_mean=stats["mean"], scaling_factor=stored)
    run.log(f"saved {save_pretrained_atomic(model, run.path / 'label_vae')}")


if __name__ == "__main__":
    main()
    exit_launched_process()  # torchrun ranks: without freeing what prepare_held holds
