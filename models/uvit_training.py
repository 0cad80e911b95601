"""Training the authors' U-ViT with their objective (METHOD.md §8, their "joint" noise type):
what ``train.joint_diffusion`` calls when its ``--pretrained_model`` is a U-ViT pipeline folder.

    models, unet, noise_scheduler = load_uvit_training_components("runs/voc/uvit_init", None, info)
    loss, parts = uvit_joint_loss(unet, noise_scheduler, text, image, clip, label, gen)

- The text embedding (the CLIP text encoder's last hidden state) is noised with its own timestep;
  the image latent, the CLIP image embedding and the label latent are noised together with one
  shared timestep; both timesteps uniform over the training schedule.
- The U-ViT predicts the noise of all four; the loss is one MSE over the flat concatenation
  [text | image | clip | label] (at 512 px text is ~64% of the elements). ``part_weights`` scales
  each part's squared errors (all 1 = their loss); the per-part MSEs are returned for the log.
- No caption dropout: the unconditional branch at sampling time is a Gaussian text at t = 1000,
  which this objective already trains (t_text covers the whole range).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler
from diffusers.pipelines.deprecated.unidiffuser.modeling_text_decoder import UniDiffuserTextDecoder
from diffusers.pipelines.deprecated.unidiffuser.modeling_uvit import UniDiffuserModel
from transformers import CLIPTextModel, CLIPTokenizer, CLIPVisionModelWithProjection

from models.label_vae import check_label_vae_dataset, load_label_vae, model_num_labels
from models.pipeline_jodiffusion import make_scheduler, vae_scale_factor
from models.pipeline_uvit import JoDiffusionUViTPipeline, load_uvit_components
from models.uvit_init import UNIDIFFUSER_COMPONENTS
from utils.io import read_json_object
from utils.training import first_line

UVIT_LOSS_PARTS = ("text", "image", "clip", "label")
UNIDIFFUSER_LOSS_PARTS = ("text", "image", "clip")  # UniDiffuser's own objective: no label stream
CLIP_PROCESSOR_CONFIG = "clip_image_processor/preprocessor_config.json"


def clip_image_embeds(image_encoder, processor: dict, images: torch.Tensor) -> torch.Tensor:
    """Training images in [-1, 1] (B x 3 x H x W, square) -> CLIP image embeddings (B x 1 x D), the
    ``CLIPImageProcessor`` recipe in torch: resize to its crop size (bicubic), its mean and std."""
    size = processor.get("crop_size", {}).get("height") or processor.get("size", {}).get("shortest_edge", 224)
    param = next(image_encoder.parameters())
    x = (images.float().to(param.device) + 1) / 2
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    mean = torch.tensor(processor.get("image_mean", [0.4815, 0.4578, 0.4082]), device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(processor.get("image_std", [0.2686, 0.2613, 0.2758]), device=x.device).view(1, 3, 1, 1)
    with torch.no_grad():
        return image_encoder(pixel_values=((x - mean) / std).to(param.dtype)).image_embeds.unsqueeze(1)


def noised_parts(noise_scheduler, clean: dict, gen: torch.Generator, dtype: torch.dtype):
    """UniDiffuser's noising (METHOD.md §8): draws t_img, t_text (uniform over the training
    schedule), then one float32 noise per part in ``clean``'s order, all from ``gen``; ``text``
    is noised at t_text, every other part at the shared t_img. Returns (t_img, t_text, noise,
    noisy parts in ``dtype``)."""
    image = clean["image"]
    batch, n = image.shape[0], noise_scheduler.config.num_train_timesteps
    t_img = torch.randint(0, n, (batch,), generator=gen, device=image.device)
    t_text = torch.randint(0, n, (batch,), generator=gen, device=image.device)
    noise = {k: torch.randn(v.shape, generator=gen, device=v.device, dtype=torch.float32) for k, v in clean.items()}
    noisy = {k: noise_scheduler.add_noise(v.float(), noise[k], t_text if k == "text" else t_img).to(dtype)
             for k, v in clean.items()}
    return t_img, t_text, noise, noisy


def flat_mse(outs: dict, noise: dict, parts: tuple, part_weights: dict | None = None):
    """One MSE over the flat concatenation of ``parts`` (in that order), each part's squared
    errors scaled by ``part_weights`` (default 1), in float32; returns (loss, {part: mse})."""
    sq = {k: (outs[k].float() - noise[k]).pow(2) for k in parts}
    w = {k: 1.0 for k in parts} | dict(part_weights or {})
    total = sum(w[k] * sq[k].sum() for k in parts)
    count = sum(w[k] * sq[k].numel() for k in parts)
    return total / count, {k: sq[k].mean().detach() for k in parts}


def uvit_joint_loss(unet, noise_scheduler, text: torch.Tensor, image: torch.Tensor, clip: torch.Tensor,
                    label: torch.Tensor, gen: torch.Generator, part_weights: dict | None = None):
    """The authors' objective on one micro-batch. Returns (loss, {part: mse}) with parts
    ``UVIT_LOSS_PARTS``; draws t_img, t_text, then the four noises from ``gen``."""
    t_img, t_text, noise, noisy = noised_parts(noise_scheduler, dict(text=text, image=image, clip=clip, label=label),
                                               gen, next(unet.parameters()).dtype)  # unet may be DDP-wrapped
    outs = unet(noisy["text"], noisy["image"], noisy["clip"], noisy["label"], t_img, t_text, data_type=1)
    return flat_mse(dict(zip(("text", "image", "clip", "label"), outs)), noise, UVIT_LOSS_PARTS, part_weights)


def load_uvit_training_components(source: str, label_vae_path: str | None, info):
    """(models dict, U-ViT, DDPM noise schedule) of the U-ViT folder ``source`` (theirs, or
    ``inference.uvit_init``'s). ``models`` holds vae (the image VAE), label_vae, text_encoder,
    tokenizer, image_encoder and clip_processor (a dict). ValueError("<path>: ...")."""
    if label_vae_path is None:
        raise ValueError(f"{source}: the U-ViT trains jointly only (no --mode image)")
    folder = Path(source)
    try:
        parts = load_uvit_components(folder)
        image_encoder = CLIPVisionModelWithProjection.from_pretrained(folder / "image_encoder")
        processor = read_json_object(folder / CLIP_PROCESSOR_CONFIG)
        noise_scheduler = DDPMScheduler.from_config(parts["scheduler"].config)
        label_vae = parts["label_vae"] if Path(label_vae_path) == folder / "label_vae" else load_label_vae(label_vae_path)
    except (OSError, ValueError) as e:
        raise ValueError(f"{source}: cannot load the U-ViT training parts ({first_line(e)})") from None
    check_label_vae_dataset(model_num_labels(label_vae), info, label_vae_path)
    if label_vae.downsample_factor != vae_scale_factor(parts["image_vae"]):
        raise ValueError(f"{label_vae_path}: the label VAE downsamples by {label_vae.downsample_factor}, the image "
                         f"VAE by {vae_scale_factor(parts['image_vae'])}")
    models = dict(vae=parts["image_vae"], label_vae=label_vae, text_encoder=parts["text_encoder"],
                  tokenizer=parts["clip_tokenizer"], image_encoder=image_encoder, clip_processor=processor)
    return models, parts["unet"], noise_scheduler


def uvit_training_pipeline(models: dict, unet, noise_scheduler) -> JoDiffusionUViTPipeline:
    """The pipeline the trainer validates with and exports (DPM-Solver++ on the training schedule)."""
    return JoDiffusionUViTPipeline(image_vae=models["vae"], text_encoder=models["text_encoder"],
                                   clip_tokenizer=models["tokenizer"], label_vae=models["label_vae"], unet=unet,
                                   scheduler=make_scheduler("dpmsolver++", noise_scheduler.config))


def uvit_batch_loss(unet, noise_scheduler, models: dict, latents: torch.Tensor, ids: torch.Tensor, clip: torch.Tensor,
                    gen: torch.Generator, image_channels: int, text_loss_weight: float = 1.0, **_):
    """The trainer's call: encode the captions (frozen CLIP text encoder), split [image ; label]
    latents, ``uvit_joint_loss``. Returns (loss, {part: mse})."""
    with torch.no_grad():
        text = models["text_encoder"](ids)[0]
    return uvit_joint_loss(unet, noise_scheduler, text, latents[:, :image_channels], clip, latents[:, image_channels:],
                           gen, part_weights={"text": text_loss_weight})


def reload_uvit_frozen_parts(source: str, label_vae_path: str | None) -> dict:
    """The frozen parts loaded again in float32 (an export saves these, not the fp16 copies); the
    U-ViT itself is not read again."""
    folder = Path(source)
    return dict(vae=AutoencoderKL.from_pretrained(folder / "image_vae"),
                text_encoder=CLIPTextModel.from_pretrained(folder / "text_encoder"),
                label_vae=load_label_vae(label_vae_path or folder / "label_vae"))


def export_uvit_pipeline(models: dict, unet, noise_scheduler, out_dir, source: str) -> None:
    """The trained pipeline folder, with the source's CLIP image encoder and processor beside it so
    that it can be fine-tuned again (text2img generation does not load them)."""
    uvit_training_pipeline(models, unet, noise_scheduler).save_pretrained(str(out_dir), safe_serialization=True)
    for name in ("image_encoder", "clip_image_processor"):
        shutil.rmtree(Path(out_dir) / name, ignore_errors=True)
        shutil.copytree(Path(source) / name, Path(out_dir) / name)


# UniDiffuser itself (the toy base, ``models.toy_unidiffuser``): trained with the same objective
# minus the label stream, in ``--mode image``; ``inference.uvit_init`` then makes the U-ViT's step 0.

def unidiffuser_loss(unet, noise_scheduler, text: torch.Tensor, image: torch.Tensor, clip: torch.Tensor,
                     gen: torch.Generator, part_weights: dict | None = None):
    """UniDiffuser's objective on one micro-batch: the text prefix noised at its own t_text, the
    image latent and CLIP image embedding at one shared t_img, epsilon-prediction, one MSE over
    the flat [text | image | clip]. Returns (loss, {part: mse}) with parts ``UNIDIFFUSER_LOSS_PARTS``."""
    t_img, t_text, noise, noisy = noised_parts(noise_scheduler, dict(text=text, image=image, clip=clip), gen,
                                               next(unet.parameters()).dtype)
    image_out, clip_out, text_out = unet(noisy["image"], noisy["clip"], noisy["text"], t_img, t_text, data_type=1)
    return flat_mse(dict(text=text_out, image=image_out, clip=clip_out), noise, UNIDIFFUSER_LOSS_PARTS, part_weights)


def unidiffuser_batch_loss(unet, noise_scheduler, models: dict, latents: torch.Tensor, ids: torch.Tensor,
                           clip: torch.Tensor, gen: torch.Generator, image_channels: int, text_loss_weight: float = 1.0,
                           **_):
    """The trainer's call: the caption's text prefix (frozen CLIP text encoder, then the caption
    decoder's ``encode_prefix``, as UniDiffuser encodes prompts), ``unidiffuser_loss``. No caption
    dropout and no Min-SNR weighting: the objective trains the unconditional text (t_text near
    1000) itself, and weights every element alike."""
    with torch.no_grad():
        text = models["text_decoder"].encode_prefix(models["text_encoder"](ids)[0])
    return unidiffuser_loss(unet, noise_scheduler, text, latents[:, :image_channels], clip, gen,
                            part_weights={"text": text_loss_weight})


def load_unidiffuser_training_components(source: str, label_vae_path: str | None, info):
    """(models dict, UniDiffuserModel, DDPM noise schedule) of the UniDiffuser folder ``source``.
    ``models`` holds vae, label_vae (None), text_encoder, tokenizer, image_encoder, clip_processor
    (a dict) and the frozen text_decoder (its prefix encoder). ValueError("<path>: ...")."""
    if label_vae_path is not None:
        raise ValueError(f"{source}: a UniDiffuser base trains in image mode only (--mode image); "
                         "inference.uvit_init turns it into the U-ViT that trains jointly")
    folder = Path(source)
    try:
        models = dict(vae=AutoencoderKL.from_pretrained(folder / "vae"), label_vae=None,
                      text_encoder=CLIPTextModel.from_pretrained(folder / "text_encoder"),
                      tokenizer=CLIPTokenizer.from_pretrained(folder / "clip_tokenizer"),
                      image_encoder=CLIPVisionModelWithProjection.from_pretrained(folder / "image_encoder"),
                      clip_processor=read_json_object(folder / CLIP_PROCESSOR_CONFIG),
                      text_decoder=UniDiffuserTextDecoder.from_pretrained(folder / "text_decoder"))
        unet = UniDiffuserModel.from_pretrained(folder / "unet")
        noise_scheduler = DDPMScheduler.from_config(DDPMScheduler.load_config(folder / "scheduler"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{source}: cannot load the UniDiffuser training parts ({first_line(e)})") from None
    if noise_scheduler.config.prediction_type != "epsilon":
        raise ValueError(f"{folder / 'scheduler'}: prediction_type {noise_scheduler.config.prediction_type!r}; "
                         "UniDiffuser's objective predicts the noise (epsilon)")
    models["text_decoder"].requires_grad_(False).eval()
    unet.transformer.pos_embed.requires_grad_(False)  # never called (as in JoDiffusionUViT): DDP needs it frozen
    return models, unet, noise_scheduler


def reload_unidiffuser_frozen_parts(source: str, label_vae_path: str | None) -> dict:
    """Nothing: the export copies the frozen parts' files from ``source``, unrounded."""
    return {}


def export_unidiffuser_pipeline(models: dict, unet, noise_scheduler, out_dir, source: str) -> None:
    """The UniDiffuser folder with the trained U-ViT: every other part (and model_index.json)
    copied from ``source`` as is, so that ``inference.uvit_init --unidiffuser`` takes it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in (n for n in UNIDIFFUSER_COMPONENTS if n != "unet"):
        shutil.rmtree(out / name, ignore_errors=True)
        shutil.copytree(Path(source) / name, out / name)
    shutil.copyfile(Path(source) / "model_index.json", out / "model_index.json")
    unet.save_pretrained(str(out / "unet"), safe_serialization=True)
