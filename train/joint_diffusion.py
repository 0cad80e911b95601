"""Stage 2: train the joint image + label diffusion UNet (or, with ``--mode image``, a plain SD UNet).

    accelerate launch --multi_gpu --num_processes 4 -m train.joint_diffusion --config configs/joint_diffusion/voc.yaml \
        --data_root data/VOCdevkit/VOC2012 --pretrained_model runs/voc/jodiffusion_init --output_dir runs/voc/joint_5e5

``--pretrained_model`` is the folder ``inference.jodiffusion`` writes (weight initialisation), or an
SD folder / hub id plus ``--label_vae`` (the UNet is widened here); or a U-ViT folder (the authors'
backbone: ``inference.uvit_init`` writes its step 0, ``configs/joint_diffusion/*_uvit.yaml``). The
folder decides the backbone (``models.pipelines.TRAINING``), and the backbone the loss and its inputs
(``joint_loss`` below); the loop is the same. Frozen: image VAE, label VAE, text encoder (and the
U-ViT's CLIP image encoder). Defaults are the authors' recipe (METHOD.md §3).
The run folder gets ``config.yaml``, ``log.txt``, ``metrics.jsonl``, ``checkpoint-N/``,
``validation/step-N.png`` and ``pipeline/`` (EMA weights with ``--use_ema``): a JoDiffusionPipeline,
or in image mode a StableDiffusionPipeline for ``inference.jodiffusion`` to widen. Data order, noise
and timesteps depend only on (seed, step): a run resumed with ``--resume_from_checkpoint latest``
ends with the same weights.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch
from tqdm import tqdm

from dataset import get_dataset_info
from dataset.latents import AUGMENT_VIEWS, LatentBatches, build_latent_source, num_views
from dataset.segmentation import DatasetError, SegmentationDataset
from models.label_vae import encode_masks
from models.pipelines import TRAINING, TRAINING_FOLDER_PARTS, training_backbone
from models.uvit_training import clip_image_embeds
from utils.checkpoints import (BadFiles, SkippedSteps, close_trackers, log_step, resume_step, save_checkpoint,
                               unet_checkpoint_hooks)
from utils.config import die, error_line, parse_config
from utils.io import RunDir
from utils.precision import weight_dtype
from utils.training import (LossWindow, backward_step, check_8bit_adam, check_model_folders, ema_weights, exit_launched_process,
                            freeze, make_adamw, make_lr_scheduler, prepare_held, start_run, trainable_unet, validation_grid)
from utils.visualize import plot_curves


@dataclass
class JointDiffusionConfig:
    """Joint (image + label) latent diffusion training; ``--mode image`` trains a plain text-to-image UNet."""

    mode: str = field(default="joint", metadata={"help": "joint (image + label latents) or image (image only)",
                                                      "choices": ("joint", "image")})
    pretrained_model: str = field(default="runs/ade20k/jodiffusion_init",
                                  metadata={"help": "pipeline folder from inference.jodiffusion, or an SD folder / hub id"})
    label_vae: str | None = field(default=None, metadata={"help": "label VAE folder (default: <pretrained_model>/label_vae)"})
    dataset: str = field(default="ade20k", metadata={"help": "dataset name (dataset/<name>_semantic.py)"})
    data_root: str | None = field(default=None, metadata={"help": "override the dataset's data_root"})
    split: str = field(default="train", metadata={"help": "split to train on"})
    captions: str = field(default="auto", metadata={"help": "auto, file or class_names"})
    output_dir: str = field(default="runs/ade20k/joint_diffusion", metadata={"help": "run folder"})
    resolution: int = field(default=512, metadata={"help": "training resolution (paper: 512)"})
    augment: bool = field(default=True, metadata={"help": "random crop + flip (with --cache_latents: centre crop, both flips cached)"})
    augment_views: str = field(default="flip", metadata={
        "help": "with --augment: flip (horizontal flips, for photos) or dihedral (the 8 rotations and flips, "
                "for data with no up or down such as the toy shapes; --cache_latents caches all 8)",
        "choices": AUGMENT_VIEWS})
    train_batch_size: int = field(default=8, metadata={"help": "per-device batch (paper: 8 x 4 GPUs = 32)"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "micro-batches per optimiser step"})
    num_train_epochs: int = field(default=100, metadata={"help": "epochs (paper: 100 ADE20K/VOC, 20 COCO)"})
    max_train_steps: int = field(default=0, metadata={"help": "optimiser steps; 0 = from num_train_epochs"})
    learning_rate: float = field(default=5e-5, metadata={"help": "paper: 5e-5"})
    lr_scheduler: str = field(default="constant", metadata={"help": "diffusers get_scheduler name (paper: constant)"})
    lr_warmup_steps: int = field(default=0, metadata={"help": "warm-up steps"})
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    use_8bit_adam: bool = field(default=True, metadata={"help": "bitsandbytes AdamW8bit (CUDA only; paper: on)"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping (paper: 1)"})
    mixed_precision: str = field(default="fp16", metadata={"help": "no, fp16 or bf16 (paper: fp16; fp16 needs a GPU)"})
    gradient_checkpointing: bool = field(default=True, metadata={"help": "trade compute for UNet activation memory"})
    allow_tf32: bool = field(default=True, metadata={"help": "TF32 matmuls on Ampere+ GPUs"})
    caption_dropout: float = field(default=0.1, metadata={"help": "probability of the empty prompt (classifier-free guidance)"})
    label_loss_weight: float = field(default=1.0, metadata={"help": "w in (image_loss + w label_loss)/(1+w); 1 = plain mean (authors)"})
    text_loss_weight: float = field(default=1.0, metadata={"help": "U-ViT only: weight of the text part's squared errors in "
                                    "the flat MSE (1 = the authors' loss; the text is ~64%% of the elements at 512 px)"})
    snr_gamma: float | None = field(default=None, metadata={"help": "Min-SNR-gamma loss weighting (e.g. 5; the logged losses are then weighted too); unset = plain mean (authors)"})
    use_ema: bool = field(default=False, metadata={"help": "keep EMA weights (exported instead of the raw ones)"})
    ema_decay: float = field(default=0.9999, metadata={"help": "EMA decay (diffusers EMAModel, warm-up (1+n)/(10+n))"})
    cache_latents: bool = field(default=False, metadata={
        "help": "encode the training set once with both VAEs and reuse; read from disk through memory maps, "
                "so the processes of a node share one copy in the page cache"})
    cache_dir: str | None = field(default=None, metadata={"help": "latent cache folder (default: <output_dir>/latent_cache)"})
    cache_batch_size: int = field(default=32, metadata={"help": "batch size when filling the latent cache"})
    dataloader_num_workers: int = field(default=4, metadata={"help": "data loading workers (uncached)"})
    max_bad_fraction: float = field(default=0.01, metadata={
        "help": "share of training files that may turn out corrupt mid-run (each is skipped, named in the log "
                "and counted as bad_files in metrics.jsonl) before the run stops"})
    checkpointing_steps: int = field(default=1000, metadata={"help": "save a resumable checkpoint every N steps (0 = never)"})
    checkpoints_total_limit: int = field(default=0, metadata={"help": "keep only the newest N checkpoints (0 = all)"})
    resume_from_checkpoint: str | None = field(default=None, metadata={"help": "checkpoint-N folder or 'latest'"})
    validation_prompts: list[str] = field(default_factory=list, metadata={"help": "prompts (default: the first training captions)"})
    num_validation_images: int = field(default=4, metadata={"help": "samples in the validation grid (0 = no validation)"})
    validation_steps: int = field(default=0, metadata={"help": "validate every N steps (0 = only at the end)"})
    validation_inference_steps: int = field(default=50, metadata={"help": "DPM-Solver++ steps (authors: 50)"})
    guidance_scale: float = field(default=8.0, metadata={"help": "classifier-free guidance (authors: 8)"})
    logging_steps: int = field(default=10, metadata={"help": "write a metrics line every N steps"})
    seed: int = field(default=0, metadata={"help": "seed of data order, noise and timesteps"})


def main(argv=None) -> None:
    cfg = parse_config(JointDiffusionConfig, argv, description=__doc__)
    try:
        train(cfg)
    except DatasetError as e:  # a missing folder before the first step, or too many bad files mid-run
        die(error_line(e))  # from a DataLoader worker the message arrives inside its traceback


def train(cfg: JointDiffusionConfig) -> None:
    """Parse -> build (run folder, models, data, optimiser) -> ``fit`` -> export the pipeline."""
    try:
        check_8bit_adam(cfg.use_8bit_adam)
    except ValueError as e:
        die(str(e))
    # fp16 autocast needs a GPU; reported in the log below
    mixed = "no" if cfg.mixed_precision == "fp16" and not torch.cuda.is_available() else cfg.mixed_precision
    accelerator, run = start_run(cfg, mixed, cfg.gradient_accumulation_steps)
    if mixed != cfg.mixed_precision:
        run.log("no CUDA device: fp16 mixed precision is off, training in fp32")
    if cfg.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    backbone = training_backbone(cfg.pretrained_model)
    try:
        info = get_dataset_info(cfg.dataset, cfg.data_root)
        check_model_folders(cfg.pretrained_model, label_vae_path(cfg) if cfg.mode == "joint" else None,
                            TRAINING_FOLDER_PARTS[backbone])
    except ValueError as e:
        die(str(e))

    r = build_models(cfg, info, accelerator, run, mixed, backbone)
    r.data, r.batches, r.bad_files, max_steps, updates_per_epoch = build_data(cfg, info, r.models, accelerator, run)
    r.empty_ids = r.data.empty_ids.to(accelerator.device)
    try:
        optimizer = make_adamw(r.unet.parameters(), cfg.learning_rate, cfg.use_8bit_adam, (cfg.adam_beta1, cfg.adam_beta2),
                               cfg.adam_weight_decay, cfg.adam_epsilon)
    except ValueError as e:
        die(str(e))
    lr_scheduler = make_lr_scheduler(cfg.lr_scheduler, optimizer, cfg.lr_warmup_steps, max_steps, accelerator.num_processes)
    r.unet, r.optimizer, r.lr_scheduler = prepare_held(accelerator, r.unet, optimizer, lr_scheduler)
    global_step = resume_step(accelerator, run, run.path, cfg.resume_from_checkpoint)

    r.prompts = (list(cfg.validation_prompts) or r.data.preview_captions)[: max(cfg.num_validation_images, 0)]
    if r.prompts and r.backbone.pipeline is None:
        run.log(f"no validation grids: {cfg.pretrained_model} is not a generation pipeline")
        r.prompts = []
    run.log(f"{len(r.data)} training items, {max_steps} steps of {cfg.train_batch_size} x {accelerator.num_processes} "
            f"x {cfg.gradient_accumulation_steps} = {cfg.train_batch_size * accelerator.num_processes * cfg.gradient_accumulation_steps}"
            f" ({max_steps / updates_per_epoch:.1f} epochs)")
    global_step = fit(cfg, accelerator, run, r, global_step, max_steps)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        export(cfg, accelerator, run, r, global_step)
    accelerator.end_training()
    run.close()


def joint_loss(cfg: JointDiffusionConfig, r, latents: torch.Tensor, ids: torch.Tensor, clip, gen: torch.Generator):
    """The loss of one micro-batch, as the backbone defines it (``models.pipelines.TRAINING``): the
    widened UNet's (``models.joint_unet.unet_joint_loss``: one timestep for both latent halves,
    caption dropout) or the authors' U-ViT objective (``models.uvit_training.uvit_joint_loss``).
    Returns (loss, [each of ``r.loss_parts``])."""
    loss, parts = r.backbone.loss(r.unet, r.noise_scheduler, r.models, latents, ids, clip, gen,
                                  image_channels=r.image_channels, empty_ids=r.empty_ids, caption_dropout=cfg.caption_dropout,
                                  label_loss_weight=cfg.label_loss_weight, snr_gamma=cfg.snr_gamma,
                                  text_loss_weight=cfg.text_loss_weight)
    return loss, [parts[k] for k in r.loss_parts]


def fit(cfg: JointDiffusionConfig, accelerator, run: RunDir, r, global_step: int, max_steps: int) -> int:
    """The accelerate loop from ``global_step`` to ``max_steps``: a metrics line every
    ``logging_steps``, checkpoints, validation grids. Returns the last step."""
    window, skipped = LossWindow(1 + len(r.loss_parts), accelerator.device), SkippedSteps()  # loss, then each part
    # closed (its line ended) also when a bad file stops the run, so the error line starts a line
    with tqdm(total=max_steps, initial=global_step, desc=f"{cfg.mode} diffusion", dynamic_ncols=True,
              disable=not accelerator.is_main_process) as bar:
        for micro, batch in r.batches.iterate(global_step * cfg.gradient_accumulation_steps):
            if global_step >= max_steps:
                break
            if isinstance(batch, dict):  # images read this step (a cached batch is rows of the cache)
                r.bad_files.add(batch)
            with accelerator.accumulate(r.unet):
                gen = r.batches.step_generator(micro, accelerator.device)
                latents, ids, clip = r.data.latents(batch, gen, accelerator.device, r.weight_dtype)
                loss, parts = joint_loss(cfg, r, latents, ids, clip, gen)
                backward_step(accelerator, loss, r.unet, r.optimizer, r.lr_scheduler, cfg.max_grad_norm)
            window.add(loss, *parts)
            if not accelerator.sync_gradients:
                continue
            skipped.update(accelerator)
            if r.ema_unet is not None:
                r.ema_unet.step(r.unet.parameters())
            global_step += 1
            bar.update(1)
            if global_step % cfg.logging_steps == 0 or global_step == max_steps:
                means, sec = window.read(accelerator, cfg.gradient_accumulation_steps)
                row = dict(step=global_step, loss=means[0], **{f"{k}_loss": m for k, m in zip(r.loss_parts, means[1:])},
                           lr=r.lr_scheduler.get_last_lr()[0], sec_per_step=sec)
                log_step(run, row, skipped, r.bad_files)
                bar.set_postfix(loss=f"{means[0]:.4f}")
            if cfg.checkpointing_steps > 0 and global_step % cfg.checkpointing_steps == 0:
                save_checkpoint(accelerator, run.path, global_step, cfg.checkpoints_total_limit, log=run.log)
            if cfg.validation_steps > 0 and global_step % cfg.validation_steps == 0 and global_step < max_steps:
                validate(cfg, accelerator, run, r, accelerator.unwrap_model(r.unet), global_step, ema=r.ema_unet)
    close_trackers(run, global_step, skipped, r.bad_files)
    return global_step


def build_models(cfg: JointDiffusionConfig, info, accelerator, run: RunDir, mixed: str, backbone: str) -> SimpleNamespace:
    """The backbone the folder holds (``models.pipelines.TRAINING``): its frozen parts (cast to the
    weight dtype), the trained denoiser and its EMA."""
    try:
        models, unet, noise_scheduler = TRAINING[backbone].load(
            cfg.pretrained_model, label_vae_path(cfg) if cfg.mode == "joint" else None, info)
    except ValueError as e:
        die(str(e))
    dtype = weight_dtype(mixed)
    freeze([models.get(k) for k in ("vae", "label_vae", "text_encoder", "image_encoder", "text_decoder")],
           accelerator.device, dtype)
    if "image_encoder" in models:  # the U-ViT's third stream: CLIP image embeddings of the training images
        models["encode_clip"] = lambda images: clip_image_embeds(models["image_encoder"], models["clip_processor"], images)
    try:
        ema_unet = trainable_unet(unet, cfg.gradient_checkpointing, cfg.ema_decay if cfg.use_ema else None, accelerator.device)
    except ValueError as e:  # a model without it (diffusers' UniDiffuserModel)
        die(f"--gradient_checkpointing true: {error_line(e)}")
    unet_checkpoint_hooks(accelerator, ema_unet, type(unet))
    attn = sorted({type(m.processor).__name__ for m in unet.modules() if hasattr(m, "processor")})
    run.log(f"{backbone} {type(unet).__name__} {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M params, "
            f"attention {', '.join(attn)} (PyTorch SDPA), mixed precision {mixed}")
    loss_parts = tuple(k for k in TRAINING[backbone].parts if cfg.mode == "joint" or k != "label")
    return SimpleNamespace(models=models, unet=unet, ema_unet=ema_unet, noise_scheduler=noise_scheduler, info=info,
                           weight_dtype=dtype, image_channels=models["vae"].config.latent_channels,
                           backbone=TRAINING[backbone], loss_parts=loss_parts)


def build_data(cfg: JointDiffusionConfig, info, models: dict, accelerator, run: RunDir):
    """The training items (``dataset.latents``), each process's batches, and the step counts."""
    try:
        dataset = SegmentationDataset(info, cfg.split, size=cfg.resolution, augment=cfg.augment and not cfg.cache_latents,
                                      captions=cfg.captions, seed=cfg.seed, max_bad_fraction=cfg.max_bad_fraction)
    except ValueError as e:  # DatasetError included
        die(str(e))
    bad_files = BadFiles(accelerator.num_processes)
    data = build_latent_source(cfg, info, dataset, models, encode_masks, accelerator, run, bad_files)
    batches = LatentBatches(data, cfg.train_batch_size, accelerator.num_processes, accelerator.process_index,
                            cfg.seed, num_views(cfg))
    if batches.steps_per_epoch == 0:
        die(f"{cfg.dataset}/{cfg.split}: {len(data)} items is fewer than one global batch "
            f"({cfg.train_batch_size} x {accelerator.num_processes} processes)")
    updates_per_epoch = math.ceil(batches.steps_per_epoch / cfg.gradient_accumulation_steps)
    return data, batches, bad_files, cfg.max_train_steps or cfg.num_train_epochs * updates_per_epoch, updates_per_epoch


def label_vae_path(cfg: JointDiffusionConfig) -> str:
    return cfg.label_vae or str(Path(cfg.pretrained_model) / "label_vae")


def export(cfg: JointDiffusionConfig, accelerator, run: RunDir, r, global_step: int) -> None:
    """``pipeline/`` (EMA weights with ``--use_ema``), the last validation grid and ``loss.png``.
    The frozen parts are saved as loaded (float32): with mixed precision they are loaded again,
    as saving the cast copies would round the base model's VAE, text encoder and label VAE."""
    model = accelerator.unwrap_model(r.unet)
    if r.ema_unet is not None:
        r.ema_unet.copy_to(model.parameters())
    model.eval()
    parts = r.models
    if r.weight_dtype != torch.float32:
        parts = dict(parts, **r.backbone.reload_frozen(cfg.pretrained_model,
                                                       label_vae_path(cfg) if parts["label_vae"] is not None else None))
    r.backbone.export(parts, model, r.noise_scheduler, run.path / "pipeline", cfg.pretrained_model)
    run.log(f"exported the {'EMA ' if r.ema_unet is not None else ''}pipeline to {run.path / 'pipeline'}")
    validate(cfg, accelerator, run, r, model, global_step)
    keys = ("loss",) + tuple(f"{k}_loss" for k in r.loss_parts)
    if (run.path / "metrics.jsonl").exists():
        plot_curves(run.path / "metrics.jsonl", run.path / "loss.png", keys=keys, smooth=5)


def validate(cfg: JointDiffusionConfig, accelerator, run: RunDir, r, model, step: int, ema=None) -> None:
    """``validation/step-N.png`` from the main process: the samples of the validation prompts (seeds
    ``seed + i``) with the UNet ``model`` in eval mode, holding the ``ema`` weights when given."""
    if not r.prompts or not accelerator.is_main_process:
        return
    with ema_weights(ema, model):
        model.eval()
        validation_grid(r.backbone.pipeline(r.models, model, r.noise_scheduler), r.prompts,
                        [cfg.seed + i for i in range(len(r.prompts))], run.path / "validation" / f"step-{step}.png",
                        accelerator.autocast, info=None if cfg.mode == "image" else r.info,
                        num_inference_steps=cfg.validation_inference_steps, guidance_scale=cfg.guidance_scale)
        model.train()


if __name__ == "__main__":
    main()
    exit_launched_process()  # torchrun ranks: without freeing what prepare_held holds
