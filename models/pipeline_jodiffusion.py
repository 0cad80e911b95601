"""JoDiffusionPipeline: a prompt -> an image and its class-index mask, from one joint latent.

    from models.pipeline_jodiffusion import JoDiffusionPipeline
    pipe = JoDiffusionPipeline.from_pretrained("runs/toy/jodiffusion").to("cuda", torch.float16)
    out = pipe(["a red circle on a striped background"], num_inference_steps=50, guidance_scale=8.0,
               generator=[torch.Generator().manual_seed(0)])
    out.images[0]      # H x W x 3 uint8
    out.masks[0]       # H x W uint8 class indices (255 where the label decoder is unsure)
    out.confidence[0]  # H x W float, the label decoder's top softmax probability

The joint latent is ``[image latent ; label latent]`` along channels (4 + 4 = 8 for SD): one
noise level, one UNet (``models.joint_unet.widen_unet_for_labels``) that predicts the noise of
both halves (METHOD.md §3-4). The image half is decoded by ``vae`` (after dividing by its
scaling factor), the label half by ``models.label_vae.decode_latents_to_masks``.

It is an ordinary diffusers ``DiffusionPipeline``: ``save_pretrained`` writes
``model_index.json`` with ``label_vae: ["models.label_vae", "<class>"]``, so
``from_pretrained`` re-imports the label VAE from this repository (run from the repo root);
``.to()``, ``set_progress_bar_config`` and scheduler swapping
(``pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)``) work as usual.
``utils.io.check_pipeline_folder(folder)`` checks a folder before loading it (missing component,
config or weights; truncated safetensors) and raises ValueError naming the file.

Reproducibility: pass ``generator`` as a list, one ``torch.Generator`` per sample. Each
sample's initial noise (and any noise a stochastic scheduler adds) is then drawn from its own
generator, so a sample does not depend on the others in its batch, up to float rounding:
kernels may round differently for another batch shape (measured on CPU: the VAE decoder differs
by ~4e-6 between batch 1 and 2, enough to flip a uint8 now and then). For identical bytes, keep
the batch composition fixed, as ``inference.generate`` does.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from models.label_vae import (check_label_vae_dataset, decode_latents_to_masks, model_num_labels,
                              read_label_vae_num_labels)
from utils.io import check_pipeline_folder
from utils.training import first_line

# The authors' sampling settings (METHOD.md §4).
DEFAULT_STEPS = 50
DEFAULT_GUIDANCE = 8.0


@dataclass
class JoDiffusionPipelineOutput(BaseOutput):
    """``output_type="np"``: images uint8 BxHxWx3, masks uint8 BxHxW, confidence float32 BxHxW.
    ``"pt"``: images float Bx3xHxW in [0, 1], masks int64 BxHxW, confidence float BxHxW.
    ``"latent"``: images = the image latents, masks = the label latents (both scaled), confidence None.
    """

    images: np.ndarray | torch.Tensor
    masks: np.ndarray | torch.Tensor
    confidence: np.ndarray | torch.Tensor | None


def load_sd_components(source: str, parts=("vae", "text_encoder", "tokenizer", "unet")) -> dict:
    """The base model's ``vae``, ``text_encoder``, ``tokenizer`` and ``unet`` (or only ``parts``) from
    a Stable Diffusion folder or hub id (the same subfolders a JoDiffusion folder has). Raises
    OSError / ValueError when a part is missing or unreadable."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    classes = dict(vae=AutoencoderKL, text_encoder=CLIPTextModel, tokenizer=CLIPTokenizer, unet=UNet2DConditionModel)
    return {name: classes[name].from_pretrained(source, subfolder=name) for name in parts}


def default_scheduler_config() -> dict:
    """DPM-Solver++ (multistep, order 2), the authors' sampler, on SD's training schedule."""
    return dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                algorithm_type="dpmsolver++", solver_order=2, timestep_spacing="trailing", steps_offset=1)


# What SD's own scheduler configs say for latents. A DPM-Solver++ config does not hold these keys,
# and DDIM / DDPM built from it with ``from_config`` would take their own defaults: clip_sample=True
# clips each predicted latent to [-1, 1] (SD's latents are not in that range) and the samples come
# out as noise (measured on the toy benchmark's model: prompt-mask agreement 0.00 with DDIM vs 0.91
# with DPM-Solver++).
LATENT_SAMPLER_DEFAULTS = dict(clip_sample=False, set_alpha_to_one=False)


SCHEDULER_CLASSES = {"dpmsolver++": "DPMSolverMultistepScheduler", "ddim": "DDIMScheduler",
                     "euler": "EulerDiscreteScheduler", "euler_ancestral": "EulerAncestralDiscreteScheduler",
                     "unipc": "UniPCMultistepScheduler", "pndm": "PNDMScheduler"}


def make_scheduler(name: str = "dpmsolver++", config=None):
    """The one place a sampler is built: ``name`` (``SCHEDULER_CLASSES``) on ``config`` (a
    pipeline's or a training noise schedule's; default: ``default_scheduler_config()``).
    DPM-Solver++ is multistep order 2 (the authors'); every config gets
    ``LATENT_SAMPLER_DEFAULTS`` (those the class takes) where it lacks them, so DDIM and DDPM
    never clip latents."""
    import diffusers

    if name not in SCHEDULER_CLASSES:
        raise ValueError(f"scheduler must be one of {', '.join(SCHEDULER_CLASSES)}, got {name!r}")
    cls = getattr(diffusers, SCHEDULER_CLASSES[name])
    accepted = inspect.signature(cls.__init__).parameters  # a key the class lacks would only be stored
    defaults = {k: v for k, v in LATENT_SAMPLER_DEFAULTS.items() if k in accepted}
    config = {**defaults, **dict(default_scheduler_config() if config is None else config)}
    extra = {"algorithm_type": "dpmsolver++", "solver_order": 2} if name == "dpmsolver++" else {}
    return cls.from_config(config, **extra)


def check_latent_factors(vae, label_vae) -> None:
    """ValueError unless the image VAE and the label VAE downsample by the same factor."""
    image_factor = vae_scale_factor(vae)
    label_factor = getattr(label_vae, "downsample_factor", image_factor)
    if label_factor != image_factor:
        raise ValueError(f"the image VAE downsamples by {image_factor} but the label VAE by "
                         f"{label_factor}: their latents would not line up")


def vae_scale_factor(vae) -> int:
    """How much an SD-layout autoencoder downsamples: 2 per stage after the first (SD: 8)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def with_latent_sampler_defaults(scheduler):
    """Write ``LATENT_SAMPLER_DEFAULTS`` into a scheduler's config where it has no such key, so that
    a scheduler swapped in with ``from_config`` (and a saved pipeline's config) carries them."""
    missing = {k: v for k, v in LATENT_SAMPLER_DEFAULTS.items() if k not in scheduler.config}
    if missing:
        scheduler.register_to_config(**missing)
    return scheduler


class JoDiffusionPipeline(DiffusionPipeline):
    """Joint image + mask generation with classifier-free guidance and any diffusers scheduler."""

    model_cpu_offload_seq = "text_encoder->unet->vae->label_vae"
    _optional_components: list[str] = []

    def __init__(self, vae, label_vae, text_encoder, tokenizer, unet, scheduler):
        super().__init__()
        with_latent_sampler_defaults(scheduler)
        self.register_modules(vae=vae, label_vae=label_vae, text_encoder=text_encoder,
                              tokenizer=tokenizer, unet=unet, scheduler=scheduler)

    # -- sizes -------------------------------------------------------------------------------
    @property
    def vae_scale_factor(self) -> int:
        return vae_scale_factor(self.vae)

    @property
    def image_latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def label_latent_channels(self) -> int:
        return int(self.label_vae.config.latent_channels)

    def check_components(self) -> None:
        """Clear errors for mismatched parts (a UNet not widened, VAEs at different factors)."""
        want = self.image_latent_channels + self.label_latent_channels
        if self.unet.config.in_channels != want or self.unet.config.out_channels != want:
            raise ValueError(
                f"the UNet takes {self.unet.config.in_channels} and predicts {self.unet.config.out_channels} "
                f"channels, but the joint latent has {want} (image {self.image_latent_channels} + label "
                f"{self.label_latent_channels}); widen it with models.joint_unet.widen_unet_for_labels")
        check_latent_factors(self.vae, self.label_vae)

    # -- text --------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompt(self, prompts: list[str], device) -> torch.Tensor:
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        return self.text_encoder(ids.to(device))[0]

    # -- decoding ----------------------------------------------------------------------------
    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor, confidence_threshold: float = 0.5):
        """Joint latents -> (images float Bx3xHxW in [0, 1], masks int64, confidence float32)."""
        c = self.image_latent_channels
        return decode_pairs(self.vae, self.label_vae, latents[:, :c], latents[:, c:], confidence_threshold)

    # -- sampling ----------------------------------------------------------------------------
    def prepare_latents(self, batch_size: int, height: int, width: int, dtype, device, generator):
        shape = (batch_size, self.image_latent_channels + self.label_latent_channels,
                 height // self.vae_scale_factor, width // self.vae_scale_factor)
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"got {len(generator)} generators for {batch_size} samples; pass one per sample")
        # randn_tensor draws each sample from its own generator when given a list: that is what
        # makes a sample independent of its batch-mates
        latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        return latents * self.scheduler.init_noise_sigma

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        num_inference_steps: int = DEFAULT_STEPS,
        guidance_scale: float = DEFAULT_GUIDANCE,
        generator: torch.Generator | list[torch.Generator] | None = None,
        height: int | None = None,
        width: int | None = None,
        confidence_threshold: float = 0.5,
        output_type: str = "np",
        negative_prompt: str | list[str] | None = None,
        latents: torch.Tensor | None = None,
        callback_on_step_end: Callable[[int, int, torch.Tensor], None] | None = None,
        return_dict: bool = True,
    ):
        """Generate ``len(prompt)`` pairs.

        ``guidance_scale`` <= 1 disables classifier-free guidance (one UNet pass per step).
        ``confidence_threshold``: mask pixels whose label probability is below it become 255.
        ``latents``: start from these (B x 8 x h x w, already scaled by ``init_noise_sigma``)
        instead of drawing noise.
        """
        if output_type not in ("np", "pt", "latent"):
            raise ValueError(f"output_type must be 'np', 'pt' or 'latent', got {output_type!r}")
        self.check_components()
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        batch = len(prompts)
        if batch == 0:
            raise ValueError("no prompts given")
        height = height or self.unet.config.sample_size * self.vae_scale_factor
        width = width or self.unet.config.sample_size * self.vae_scale_factor
        if height % self.vae_scale_factor or width % self.vae_scale_factor:
            raise ValueError(f"height and width must be multiples of {self.vae_scale_factor}, got {height}x{width}")
        device = self._execution_device
        do_cfg = guidance_scale > 1.0

        text = self._text_embeddings(prompts, negative_prompt, do_cfg, device)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        if latents is None:
            latents = self.prepare_latents(batch, height, width, torch.float32, device, generator)
        else:
            latents = latents.to(device=device, dtype=torch.float32)
        # the solver state stays in fp32 even when the UNet runs in fp16/bf16: its multistep
        # updates subtract nearly equal numbers
        extra = {"generator": generator} if "generator" in _step_params(self.scheduler) else {}

        latents = self._denoise(latents, text, guidance_scale, extra, callback_on_step_end)
        out = self._output(latents, output_type, confidence_threshold)
        self.maybe_free_model_hooks()
        return out if return_dict else (out.images, out.masks, out.confidence)


    def _text_embeddings(self, prompts: list[str], negative_prompt, do_cfg: bool, device) -> torch.Tensor:
        """The prompts' embeddings in the UNet's dtype, after the negatives' when guiding."""
        cond = self.encode_prompt(prompts, device)
        if do_cfg:
            batch = len(prompts)
            negatives = negative_prompt if negative_prompt is not None else ""
            negatives = [negatives] * batch if isinstance(negatives, str) else list(negatives)
            if len(negatives) != batch:
                raise ValueError(f"{len(negatives)} negative prompts for {batch} prompts")
            text = torch.cat([self.encode_prompt(negatives, device), cond])
        else:
            text = cond
        return text.to(self.unet.dtype)

    def _denoise(self, latents: torch.Tensor, text: torch.Tensor, guidance_scale: float, extra: dict,
                 callback_on_step_end) -> torch.Tensor:
        """The scheduler's timesteps from ``latents`` (fp32), guided when ``text`` holds the negatives."""
        do_cfg = guidance_scale > 1.0
        unet_dtype = self.unet.dtype
        timesteps = self.scheduler.timesteps
        with self.progress_bar(total=len(timesteps)) as bar:
            for i, t in enumerate(timesteps):
                model_in = torch.cat([latents] * 2) if do_cfg else latents
                model_in = self.scheduler.scale_model_input(model_in, t)
                noise = self.unet(model_in.to(unet_dtype), t, encoder_hidden_states=text).sample.float()
                if do_cfg:
                    uncond, cond_noise = noise.chunk(2)
                    noise = uncond + guidance_scale * (cond_noise - uncond)
                latents = self.scheduler.step(noise, t, latents, **extra).prev_sample
                if callback_on_step_end is not None:
                    callback_on_step_end(i, int(t), latents)
                bar.update()
        return latents

    def _output(self, latents: torch.Tensor, output_type: str, confidence_threshold: float):
        """Final joint latents -> ``JoDiffusionPipelineOutput`` of ``output_type``."""
        c = self.image_latent_channels
        return pairs_output(self.vae, self.label_vae, latents[:, :c], latents[:, c:], output_type, confidence_threshold)


@torch.no_grad()
def decode_pairs(vae, label_vae, image_latents: torch.Tensor, label_latents: torch.Tensor,
                 confidence_threshold: float = 0.5):
    """Scaled image and label latents -> (images float Bx3xHxW in [0, 1], masks int64, confidence
    float32): the one decoding step of every backbone's pipeline."""
    vae_dtype = next(vae.parameters()).dtype
    # SD's VAE says force_upcast: its decoder overflows in fp16 (NaN / black images), so it
    # decodes in float32 and goes back to fp16 afterwards, as diffusers' own pipelines do
    upcast = vae_dtype == torch.float16 and bool(getattr(vae.config, "force_upcast", False))
    if upcast:
        vae.to(torch.float32)
    try:
        images = vae.decode(image_latents.to(torch.float32 if upcast else vae_dtype) / vae.config.scaling_factor).sample
    finally:
        if upcast:
            vae.to(vae_dtype)
    images = (images.float() / 2 + 0.5).clamp(0, 1)
    masks, confidence = decode_latents_to_masks(label_vae, label_latents, threshold=confidence_threshold,
                                                ignore_index=int(getattr(label_vae.config, "ignore_index", 255)))
    return images, masks, confidence.float()


def pairs_output(vae, label_vae, image_latents: torch.Tensor, label_latents: torch.Tensor, output_type: str,
                 confidence_threshold: float) -> JoDiffusionPipelineOutput:
    """Final latents -> ``JoDiffusionPipelineOutput`` of ``output_type`` (np, pt or latent)."""
    if output_type == "latent":
        return JoDiffusionPipelineOutput(images=image_latents, masks=label_latents, confidence=None)
    images, masks, confidence = decode_pairs(vae, label_vae, image_latents, label_latents, confidence_threshold)
    if output_type == "np":
        images = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        masks = masks.to(torch.uint8).cpu().numpy()
        confidence = confidence.cpu().numpy()
    return JoDiffusionPipelineOutput(images=images, masks=masks, confidence=confidence)


def _step_params(scheduler) -> set[str]:
    return set(inspect.signature(scheduler.step).parameters)


def check_jodiffusion_folder(folder: str, info) -> None:
    """Checks that need no model: ``folder`` is a complete ``save_pretrained`` JoDiffusion folder
    (files, weight headers) whose label VAE was trained for the dataset ``info``. ValueError naming the part."""
    try:
        check_pipeline_folder(folder)
    except ValueError as e:
        raise ValueError(f"{e}; pass a save_pretrained folder (train.joint_diffusion writes <output_dir>/pipeline)") from None
    label_config = Path(folder) / "label_vae" / "config.json"
    if not label_config.is_file():
        raise ValueError(f"{label_config.parent}: no label VAE in this pipeline folder; is it a JoDiffusion pipeline?")
    try:
        check_label_vae_dataset(read_label_vae_num_labels(label_config.parent), info, label_config.parent)
    except ValueError as e:
        raise ValueError(f"{e}; pass the pipeline made for '{info.name}'") from None


def load_jodiffusion_pipeline(folder: str, dtype: torch.dtype, device, scheduler: str = "dpmsolver++"):
    """A saved pipeline on ``device`` sampling with ``scheduler`` (``make_scheduler`` on its own
    config), progress bar off; a load error or mismatched parts are one ValueError naming the folder."""
    try:
        pipe = JoDiffusionPipeline.from_pretrained(folder, dtype=dtype)
    except Exception as e:  # noqa: BLE001 -- whatever a folder that passed check_pipeline_folder still hides
        raise ValueError(f"{folder}: cannot load the pipeline ({first_line(e)})") from None
    pipe = pipe.to(device)
    pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
    return ready_to_generate(pipe, folder)


def ready_to_generate(pipe, folder: str):
    """A loaded pipeline of either backbone, progress bar off, its parts checked against each other
    (ValueError naming ``folder``)."""
    pipe.set_progress_bar_config(disable=True)
    try:
        pipe.check_components()
    except ValueError as e:
        raise ValueError(f"{folder}: {e}") from None
    return pipe


def build_jodiffusion_pipeline(base: dict, label_vae, joint_unet, scheduler=None) -> JoDiffusionPipeline:
    """Assemble a pipeline from SD components (``vae``, ``text_encoder``, ``tokenizer``), a label VAE
    and a widened UNet; the scheduler defaults to DPM-Solver++ with the authors' settings."""
    scheduler = scheduler or make_scheduler()
    return JoDiffusionPipeline(vae=base["vae"], label_vae=label_vae, text_encoder=base["text_encoder"],
                               tokenizer=base["tokenizer"], unet=joint_unet, scheduler=scheduler)


def load_training_components(source: str, label_vae_path: str | None, info):
    """What the diffusion trainer trains from: (vae, label_vae, text_encoder, tokenizer, unet,
    noise_scheduler) of the SD / JoDiffusion folder ``source``. ``label_vae_path`` None = image
    mode (a plain UNet, no label VAE); otherwise the label VAE is checked against the dataset
    ``info`` and the image VAE, and a plain UNet is widened here. ValueError("<path>: ...")."""
    from diffusers import DDPMScheduler
    from safetensors import SafetensorError

    from models.joint_unet import widen_unet_for_labels
    from models.label_vae import load_label_vae

    try:
        vae, text_encoder, tokenizer, unet = load_sd_components(source).values()
        # the training schedule is the base model's (scaled_linear for SD), sampled with DDPM's add_noise
        noise_scheduler = DDPMScheduler.from_pretrained(source, subfolder="scheduler")
    except (OSError, ValueError, SafetensorError) as e:
        raise ValueError(f"{source}: cannot load the base model ({first_line(e)})") from None
    c = vae.config.latent_channels
    if label_vae_path is None:
        if unet.config.in_channels != c:
            raise ValueError(f"{source}: --mode image needs a plain UNet but this one takes "
                             f"{unet.config.in_channels} channels")
        return vae, None, text_encoder, tokenizer, unet, noise_scheduler
    try:
        label_vae = load_label_vae(label_vae_path)
    except (OSError, ValueError, SafetensorError) as e:
        raise ValueError(f"{label_vae_path}: cannot load the label VAE ({first_line(e)}); pass --label_vae or "
                         "run inference.jodiffusion first") from None
    check_label_vae_dataset(model_num_labels(label_vae), info, label_vae_path)
    if label_vae.downsample_factor != vae_scale_factor(vae):
        raise ValueError(f"{label_vae_path}: the label VAE downsamples by {label_vae.downsample_factor}, the image "
                         f"VAE by {vae_scale_factor(vae)}")
    lc = label_vae.config.latent_channels
    if unet.config.in_channels == c:
        widen_unet_for_labels(unet, lc)
    elif unet.config.in_channels != c + lc:
        raise ValueError(f"{source}: the UNet takes {unet.config.in_channels} channels, not {c} image + {lc} label")
    return vae, label_vae, text_encoder, tokenizer, unet, noise_scheduler


def load_unet_training_components(source: str, label_vae_path: str | None, info):
    """``load_training_components`` as (models dict, unet, noise_scheduler), the form every
    training backbone's loader returns (``models.pipelines.TRAINING``)."""
    vae, label_vae, text_encoder, tokenizer, unet, noise_scheduler = load_training_components(source, label_vae_path, info)
    return dict(vae=vae, label_vae=label_vae, text_encoder=text_encoder, tokenizer=tokenizer), unet, noise_scheduler


def reload_unet_frozen_parts(source: str, label_vae_path: str | None) -> dict:
    """The frozen parts loaded again in float32 (an export saves these, not the fp16 copies trained beside)."""
    from models.label_vae import load_label_vae

    parts = load_sd_components(source, parts=("vae", "text_encoder"))
    return dict(parts, label_vae=load_label_vae(label_vae_path) if label_vae_path else None)


def export_unet_pipeline(models: dict, unet, noise_scheduler, out_dir, source: str) -> None:
    training_pipeline(models, unet, noise_scheduler).save_pretrained(str(out_dir), safe_serialization=True)


def training_pipeline(models: dict, unet, noise_scheduler):
    """The pipeline a diffusion trainer exports and validates with: JoDiffusionPipeline (joint) or,
    without a label VAE, StableDiffusionPipeline; DPM-Solver++ (the authors') on the training schedule."""
    scheduler = make_scheduler("dpmsolver++", noise_scheduler.config)
    if models["label_vae"] is None:
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline(vae=models["vae"], text_encoder=models["text_encoder"],
                                       tokenizer=models["tokenizer"], unet=unet, scheduler=scheduler,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return JoDiffusionPipeline(vae=models["vae"], label_vae=models["label_vae"], text_encoder=models["text_encoder"],
                               tokenizer=models["tokenizer"], unet=unet, scheduler=scheduler)
