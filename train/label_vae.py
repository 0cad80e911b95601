"""Stage 1: train the label VAE (masks -> 4-channel latents -> K + 1 logits).

    python -m train.label_vae --dataset toy --config configs/label_vae/toy.yaml --output_dir runs/label_vae_toy

Multi-GPU: ``accelerate launch --num_processes 8 -m train.label_vae --dataset ade20k ...``; each
process trains on its own share of every epoch. Two CPU processes (what the tests run):
``ACCELERATE_USE_CPU=true torchrun --standalone --nproc_per_node 2 -m train.label_vae ...``.
Writes ``config.yaml``, ``log.txt``, ``metrics.jsonl``, ``checkpoint-N/`` (resumable with
``--resume_from_checkpoint latest``), ``validation/step_N.png`` (mask | reconstruction |
errors), ``latent_stats.json`` and the final model in ``label_vae/`` (save_pretrained).
"""
from __future__ import annotations

import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from dataset import DATASET_NAMES, get_dataset_info
from models.label_vae import (MODEL_TYPES, PAPER_SCALING_FACTOR, bit_encode, build_label_vae,
                              decode_latents_to_masks, encode_masks, measure_latent_stats)
from utils.config import die, error_line, parse_config
from utils.checkpoints import (
    BadFiles,
    SkippedSteps,
    checkpoint_step,
    find_checkpoint,
    load_training_state,
    save_checkpoint,
)
from utils.io import RunDir, atomic_write_json, check_weights_file
from utils.metrics import IoUAccumulator
from utils.visualize import colorize, error_map, save_grid


@dataclass
class LabelVAETrainConfig:
    """Train the label VAE. Defaults are the paper's recipe (METHOD.md §2: ADE20K, 512 px,
    AdamW wd 0.05, lr 1e-4, effective batch 32, fp16, grad clip 3, 100 epochs), except the
    latent scale: measured ('auto') instead of the authors' fixed 0.2, which stays selectable."""

    dataset: str = field(default="ade20k", metadata={"help": f"one of {', '.join(DATASET_NAMES)}"})
    data_root: str | None = field(default=None, metadata={"help": "override the dataset's data_root"})
    output_dir: str = field(default="runs/label_vae", metadata={"help": "run folder"})
    model_type: str = field(default="label_vae", metadata={"help": f"one of {', '.join(MODEL_TYPES)}"})
    encoder_channels: list[int] = field(default_factory=lambda: [128, 256, 512, 512],
                                        metadata={"help": "stem width then one width per down stage "
                                                  "(autoencoder_kl: its block_out_channels)"})
    decoder_channels: list[int] = field(default_factory=lambda: [512, 512, 512, 512],
                                        metadata={"help": "same length as encoder_channels (label_vae "
                                                  "only; autoencoder_kl mirrors its encoder)"})
    norm_num_groups: int = field(default=32, metadata={"help": "GroupNorm groups"})
    scaling_factor: str = field(default="auto", metadata={"help": (
        "latent scale stored with the model: 'auto' = 1/std of the latents measured at the end of "
        "training over latent_stats_samples training masks spread evenly over the set (without a "
        f"KL term the scale is arbitrary), or a number: {PAPER_SCALING_FACTOR} is the authors' "
        "fixed value (METHOD.md §2)")})
    resolution: int = field(default=512, metadata={"help": "training crop size"})
    train_batch_size: int = field(default=8, metadata={"help": "per device"})
    total_batch_size: int = field(default=32, metadata={"help": "effective batch; accumulation = "
                                  "total / (train_batch_size x processes)"})
    learning_rate: float = field(default=1e-4, metadata={"help": "AdamW, constant (paper: VOC 1e-5)"})
    lr_scheduler: str = field(default="constant", metadata={"help": "constant (paper) or cosine (decays to 0)"})
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
    latent_stats_samples: int = field(default=1000, metadata={"help": "training masks for the latent std, "
                                      "evenly spaced over the training set (0 = all)"})
    logging_steps: int = field(default=10, metadata={"help": "metrics.jsonl line every N steps"})


def _item_rng_seed(*keys: int) -> int:
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0])


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
        g = torch.Generator().manual_seed(_item_rng_seed(self.seed, self.epoch))
        return iter(torch.randperm(self.n, generator=g).tolist())


@torch.no_grad()
def validate(model, loader, info, max_samples: int, num_images: int, picture: Path) -> dict:
    """Reconstruction mIoU (posterior mean, 0.5 confidence rule), a picture of the first masks and
    the validation files found corrupt (``bad_files``)."""
    acc, rows, seen, bad = IoUAccumulator(info.num_labels, info.ignore_index), [], 0, []
    was_training = model.training
    model.eval()
    for batch in loader:
        bad += [s for s in batch.get("skipped", ()) if s]
        masks = batch["mask"]
        if max_samples:
            masks = masks[: max_samples - seen]
        recon, _ = decode_latents_to_masks(model, encode_masks(model, masks), ignore_index=info.ignore_index)
        recon, masks = recon.cpu().numpy(), masks.numpy()
        acc.update(recon, masks)
        for m, r in zip(masks, recon):
            if len(rows) < num_images:
                rows.append([colorize(m, info.palette), colorize(r, info.palette), error_map(r, m)])
        seen += len(masks)
        if max_samples and seen >= max_samples:
            break
    model.train(was_training)
    if rows:
        save_grid(picture, rows, scale=max(1, 128 // rows[0][0].shape[0]))
    return dict(acc.result(), bad_files=bad)


def main(argv=None) -> Path:
    cfg = parse_config(LabelVAETrainConfig, argv, description=__doc__)
    from dataset.segmentation import DatasetError

    try:
        return train(cfg)
    except DatasetError as e:  # a missing folder before the first step, or too many bad files mid-run
        die(error_line(e))


def train(cfg: LabelVAETrainConfig) -> Path:
    from accelerate import Accelerator, PartialState
    from accelerate.utils import ProjectConfiguration, parse_flag_from_env, set_seed
    from diffusers.optimization import get_scheduler

    from dataset.segmentation import SegmentationDataset

    if cfg.model_type not in MODEL_TYPES:
        die(f"--model_type: {cfg.model_type!r} is not one of {', '.join(MODEL_TYPES)}")
    if cfg.dataset not in DATASET_NAMES:
        die(f"--dataset: {cfg.dataset!r} is not one of {', '.join(DATASET_NAMES)}")
    auto_scale = cfg.scaling_factor == "auto"
    try:
        scaling_factor = PAPER_SCALING_FACTOR if auto_scale else float(cfg.scaling_factor)
    except ValueError:
        die(f"--scaling_factor: {cfg.scaling_factor!r} is neither a number nor 'auto'")
    if cfg.lr_scheduler not in ("constant", "cosine"):
        die(f"--lr_scheduler: {cfg.lr_scheduler!r} is not one of constant, cosine")
    mixed = cfg.mixed_precision if cfg.mixed_precision != "auto" else ("fp16" if torch.cuda.is_available() else "no")
    out = Path(cfg.output_dir)
    # accelerate reads ACCELERATE_USE_CPU only in AcceleratorState; a PartialState built without it
    # pins a single-process state, and each CPU process under torchrun would train alone on everything
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    per_step = cfg.train_batch_size * state.num_processes
    if cfg.total_batch_size % per_step:
        die(f"--total_batch_size {cfg.total_batch_size} is not a multiple of train_batch_size x processes = {per_step}")
    accum = cfg.total_batch_size // per_step
    accelerator = Accelerator(mixed_precision=mixed, gradient_accumulation_steps=accum,
                              project_config=ProjectConfiguration(project_dir=str(out)))
    run = RunDir(out, is_main=accelerator.is_main_process, name="label_vae")
    run.save_config(cfg)
    info = get_dataset_info(cfg.dataset, cfg.data_root)

    set_seed(cfg.seed)
    try:
        model = build_label_vae(cfg.model_type, info.num_labels, info.ignore_index, cfg.encoder_channels,
                                cfg.decoder_channels, cfg.norm_num_groups, scaling_factor, cfg.resolution)
    except ValueError as e:
        die(f"model settings: {e}")
    if cfg.resolution % model.downsample_factor:
        die(f"--resolution {cfg.resolution} is not divisible by the latent factor {model.downsample_factor}")
    train_set = SegmentationDataset(info, "train", size=cfg.resolution, augment=True, seed=cfg.seed)
    val_set = SegmentationDataset(info, "val", size=cfg.resolution, augment=False)
    stats_set = SegmentationDataset(info, "train", size=cfg.resolution, augment=False)
    sampler = EpochPermutation(len(train_set), cfg.seed)
    loader_kw = dict(num_workers=cfg.dataloader_num_workers, pin_memory=torch.cuda.is_available())
    train_loader = torch.utils.data.DataLoader(train_set, cfg.train_batch_size, sampler=sampler, drop_last=True, **loader_kw)
    val_loader = torch.utils.data.DataLoader(val_set, cfg.validation_batch_size, **loader_kw)
    if len(train_loader) < accelerator.num_processes:
        die(f"{info.root()}: {len(train_set)} training masks are fewer than one batch of {cfg.train_batch_size} "
            f"for each of {accelerator.num_processes} process(es)")
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.adam_weight_decay)
    # the prepared loader gives each process its own share of every epoch's batches
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    steps_per_epoch = math.ceil(len(train_loader) / accum)
    max_steps = cfg.max_train_steps or cfg.num_train_epochs * steps_per_epoch
    # the prepared scheduler steps once per process per optimizer step
    lr_scheduler = get_scheduler(cfg.lr_scheduler + ("_with_warmup" if cfg.lr_scheduler == "constant" else ""),
                                 optimizer.optimizer, num_warmup_steps=cfg.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=max_steps * accelerator.num_processes)
    lr_scheduler = accelerator.prepare(lr_scheduler)
    num_epochs = math.ceil(max_steps / steps_per_epoch)
    global_step = 0
    if cfg.resume_from_checkpoint:
        ckpt = find_checkpoint(out, cfg.resume_from_checkpoint)
        if ckpt:
            for weights in sorted(ckpt.glob("*.safetensors")):  # a copy or a save cut short
                try:
                    check_weights_file(weights)
                except ValueError as e:
                    die(f"{e}; resume from an earlier checkpoint-N (--resume_from_checkpoint) or delete this one")
            load_training_state(accelerator, ckpt)
            global_step = checkpoint_step(ckpt)
            run.log(f"resumed from {ckpt} at step {global_step}")
        else:
            run.log(f"no checkpoint in {out}; starting from scratch")
    n_params = sum(p.numel() for p in model.parameters())
    run.log(f"{cfg.model_type}: {n_params / 1e6:.2f}M parameters, {info.num_labels} labels, "
            f"{len(train_set)} train / {len(val_set)} val masks, {steps_per_epoch} steps/epoch, "
            f"{max_steps} steps, batch {cfg.train_batch_size} x {accum} accum x {accelerator.num_processes} "
            f"processes = {cfg.total_batch_size} masks per step, mixed precision {mixed}")

    num_bits, rank = accelerator.unwrap_model(model).config.num_bits, accelerator.process_index
    bar = tqdm(total=max_steps, initial=global_step, desc="label VAE", disable=not accelerator.is_main_process)
    first_epoch, skip = global_step // steps_per_epoch, (global_step % steps_per_epoch) * accum
    model.train()
    skipped, bad_files = SkippedSteps(), BadFiles(accelerator.num_processes)
    try:  # a bad-data stop must not leave the progress bar on the line of its message
        for epoch in range(first_epoch, num_epochs):
            if global_step >= max_steps:
                break
            loader = accelerator.skip_first_batches(train_loader, skip) if epoch == first_epoch and skip else train_loader
            # accelerate's loader re-sets the epoch of sampler and dataset from its own counter at
            # every __iter__, and that counter restarts at 0 in a resumed run: set it explicitly
            loader.set_epoch(epoch)
            sampler.set_epoch(epoch)
            train_set.set_epoch(epoch)
            start = skip if epoch == first_epoch else 0
            loss_sum, micro = torch.zeros((), device=accelerator.device), 0
            for batch_index, batch in enumerate(loader, start=start):
                bad_files.add(batch)
                with accelerator.accumulate(model):
                    masks = batch["mask"]
                    x = bit_encode(masks, num_bits, info.ignore_index)
                    # posterior noise from (seed, epoch, batch, rank) alone: resumed runs draw the same
                    noise_gen = torch.Generator(accelerator.device).manual_seed(
                        _item_rng_seed(cfg.seed, epoch, batch_index, rank))
                    logits = model(x, sample_posterior=True, generator=noise_gen)
                    # no KL term (the authors'): the latent is only asked to reconstruct
                    loss = F.cross_entropy(logits.float(), masks, ignore_index=info.ignore_index)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                    optimizer.step()
                    lr_scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    loss_sum += loss.detach()
                    micro += 1
                if not accelerator.sync_gradients:
                    continue
                skipped.update(accelerator)
                global_step += 1
                bar.update(1)
                loss_value = accelerator.reduce(loss_sum, "mean").item() / micro
                loss_sum.zero_()
                micro = 0
                bar.set_postfix(loss=f"{loss_value:.4f}", epoch=epoch)
                if global_step % cfg.logging_steps == 0 or global_step == 1:
                    row = dict(step=global_step, epoch=epoch, loss=loss_value, lr=lr_scheduler.get_last_lr()[0])
                    skipped.flush(row, run, global_step)
                    bad_files.flush(row, run, global_step)
                    run.log_metrics(**row)
                if global_step % cfg.checkpointing_steps == 0:
                    save_checkpoint(accelerator, out, global_step, cfg.checkpoints_total_limit, log=run.log)
                if global_step % cfg.validation_steps == 0 or global_step == max_steps:
                    if accelerator.is_main_process:
                        res = validate(accelerator.unwrap_model(model), val_loader, info, cfg.validation_max_samples,
                                       cfg.num_validation_images, out / "validation" / f"step_{global_step:06d}.png")
                        run.log(f"step {global_step}: val reconstruction mIoU {res['mIoU']:.4f}, pixel acc {res['pixel_acc']:.4f}")
                        if res["bad_files"]:
                            run.log(f"step {global_step}: {len(res['bad_files'])} bad validation file(s) skipped: "
                                    + "; ".join(res["bad_files"]))
                        run.log_metrics(step=global_step, val_mIoU=res["mIoU"], val_pixel_acc=res["pixel_acc"],
                                        val_per_class_IoU=res["per_class_IoU"])
                    accelerator.wait_for_everyone()
                if global_step >= max_steps:
                    break
    finally:
        bar.close()
    row = dict(step=global_step)
    bad_files.flush(row, run, global_step)  # those met since the last log line
    if "bad_files" in row:
        run.log_metrics(**row)
    skipped.summary(run)
    bad_files.summary(run)

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        final = accelerator.unwrap_model(model)
        # a fixed, evenly spread sample of the training set: the same masks in every run
        stats = measure_latent_stats(final, stats_set, cfg.latent_stats_samples, cfg.validation_batch_size)
        stats["paper_scaling_factor"] = PAPER_SCALING_FACTOR
        stored = stats["unit_variance_scaling_factor"] if auto_scale else scaling_factor
        stats["stored_scaling_factor"] = stored
        final.register_to_config(scaling_factor=stored)
        atomic_write_json(out / "latent_stats.json", stats)
        run.log(f"latent std {stats['std']:.4f} (mean {stats['mean']:.4f}) over {stats['num_masks']} training "
                f"masks; 1/std = {stats['unit_variance_scaling_factor']:.4f}; stored scaling_factor {stored:.4f}")
        run.log_metrics(step=global_step, latent_std=stats["std"], latent_mean=stats["mean"],
                        unit_variance_scaling_factor=stats["unit_variance_scaling_factor"], scaling_factor=stored)
        tmp = out / ".label_vae.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        final.save_pretrained(tmp, safe_serialization=True)
        shutil.rmtree(out / "label_vae", ignore_errors=True)
        tmp.rename(out / "label_vae")  # only a complete export ever carries the final name
        run.log(f"saved {out / 'label_vae'}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    run.close()
    return out


if __name__ == "__main__":
    main()
