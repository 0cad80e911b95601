"""JoDiffusionUViTPipeline: the authors' own JoDiffusion (UniDiffuser-v1's U-ViT with a label
token stream, METHOD.md §8) as a prompt -> image + mask pipeline with the same output as
``JoDiffusionPipeline``, so ``inference.generate`` writes the same dataset from either backbone.

    from models.pipelines import load_pipeline
    pipe = load_pipeline("weights/jodiffusion_voc", torch.float16, "cuda")   # their folder or ours
    out = pipe(["a photo of a cat on a sofa"], generator=[torch.Generator().manual_seed(0)])
    out.images[0], out.masks[0]   # H x W x 3 uint8, H x W uint8 (our label convention, 255 = unsure)

Sampling is their "text2img": the clean prompt embedding (CLIP ViT-L/14 last hidden state) at
t_text = 0; the state is the flat [image latent | CLIP image embedding | label latent], all
drawn from N(0, I); classifier-free guidance against a Gaussian text at t_text = 1000:
eps = s * eps(text, 0) + (1 - s) * eps(N(0, I), 1000), s = 8; DPM-Solver multistep, 50 steps;
data_type 1. The Gaussian text is drawn afresh at every step, as UniDiffuser does, from the
sample's own generator: a sample depends on its seed alone, never on its batch-mates or on the
number of processes (up to float rounding of the batch shape; ``inference.generate`` fixes it).

The folder layout (theirs): ``image_vae/ text_encoder/ clip_tokenizer/ label_vae/ unet/
scheduler/`` (+ ``image_encoder/ clip_image_processor/``, not needed for text2img and not
loaded). ``check_uvit_folder`` checks it without loading; ``load_uvit_pipeline`` loads it.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DiffusionPipeline
from diffusers.utils.torch_utils import randn_tensor

from models.joint_uvit import JoDiffusionUViT
from models.label_vae import check_label_vae_dataset, load_label_vae, read_label_vae_num_labels
from models.pipeline_jodiffusion import (DEFAULT_GUIDANCE, DEFAULT_STEPS, check_latent_factors, make_scheduler,
                                         pairs_output, ready_to_generate, vae_scale_factor)
from utils.io import check_pipeline_folder
from utils.training import first_line

# the folders text2img needs (their image_encoder/ and clip_image_processor/ serve img2text only)
UVIT_COMPONENTS = ("image_vae", "text_encoder", "clip_tokenizer", "label_vae", "unet", "scheduler")
UVIT_CLASS_NAMES = ("JoDiffusionModel", "JoDiffusionUViT")  # theirs, ours
UVIT_TRAINING_COMPONENTS = UVIT_COMPONENTS + ("image_encoder", "clip_image_processor")  # training embeds images


class JoDiffusionUViTPipeline(DiffusionPipeline):
    """Joint image + mask generation with the authors' U-ViT and their text2img procedure."""

    model_cpu_offload_seq = "text_encoder->unet->image_vae->label_vae"
    _optional_components: list[str] = []

    def __init__(self, image_vae, text_encoder, clip_tokenizer, label_vae, unet, scheduler):
        super().__init__()
        self.register_modules(image_vae=image_vae, text_encoder=text_encoder, clip_tokenizer=clip_tokenizer,
                              label_vae=label_vae, unet=unet, scheduler=scheduler)

    @property
    def vae_scale_factor(self) -> int:
        return vae_scale_factor(self.image_vae)

    def check_components(self) -> None:
        """Clear errors for parts that do not fit together."""
        cfg = self.unet.config
        text_dim = self.text_encoder.config.hidden_size
        if cfg.text_dim != text_dim:
            raise ValueError(f"the U-ViT takes {cfg.text_dim}-wide text tokens but the text encoder gives {text_dim}")
        if self.clip_tokenizer.model_max_length != cfg.num_text_tokens:
            raise ValueError(f"the U-ViT takes {cfg.num_text_tokens} text tokens but the tokenizer pads to "
                             f"{self.clip_tokenizer.model_max_length}")
        for name, vae in (("image VAE", self.image_vae), ("label VAE", self.label_vae)):
            if vae.config.latent_channels != cfg.in_channels:
                raise ValueError(f"the {name} has {vae.config.latent_channels} latent channels, the U-ViT {cfg.in_channels}")
        check_latent_factors(self.image_vae, self.label_vae)

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str], device) -> torch.Tensor:
        """CLIP's last hidden state (B x 77 x 768 for ViT-L/14), the text the U-ViT was trained on."""
        ids = self.clip_tokenizer(prompts, padding="max_length", max_length=self.unet.config.num_text_tokens,
                                  truncation=True, return_tensors="pt").input_ids
        return self.text_encoder(ids.to(device))[0]

    def _parts(self, state: torch.Tensor, side: int):
        """The flat state -> (image latent, CLIP image embedding, label latent)."""
        c, clip_dim = self.unet.config.in_channels, self.unet.config.clip_img_dim
        n = c * side * side
        img, clip, label = state.split((n, clip_dim, n), dim=1)
        return img.reshape(-1, c, side, side), clip.reshape(-1, 1, clip_dim), label.reshape(-1, c, side, side)

    def _epsilon(self, state, text, t, side: int, guidance_scale: float, generator) -> torch.Tensor:
        """The guided noise prediction for the flat state at timestep ``t`` (their text2img)."""
        dtype, batch = self.unet.dtype, state.shape[0]
        img, clip, label = (p.to(dtype) for p in self._parts(state, side))
        t_img = torch.full((batch,), int(t), device=state.device)
        t_text = torch.zeros(batch, dtype=torch.long, device=state.device)
        if guidance_scale != 1.0:  # the unconditional branch: a Gaussian text, fully noised
            noise_text = randn_tensor(text.shape, generator=generator, device=state.device, dtype=torch.float32)
            text = torch.cat([text, noise_text.to(dtype)])
            img, clip, label, t_img = (torch.cat([x, x]) for x in (img, clip, label, t_img))
            t_text = torch.cat([t_text, torch.full_like(t_text, self.scheduler.config.num_train_timesteps)])
        _, img_out, clip_out, label_out = self.unet(text, img, clip, label, t_img, t_text, data_type=1)
        eps = torch.cat([img_out.flatten(1), clip_out.flatten(1), label_out.flatten(1)], dim=1).float()
        if guidance_scale != 1.0:
            cond, uncond = eps.chunk(2)
            eps = guidance_scale * cond + (1.0 - guidance_scale) * uncond
        return eps

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], num_inference_steps: int = DEFAULT_STEPS,
                 guidance_scale: float = DEFAULT_GUIDANCE, generator: torch.Generator | list[torch.Generator] | None = None,
                 height: int | None = None, width: int | None = None, confidence_threshold: float = 0.5,
                 output_type: str = "np", return_dict: bool = True):
        """Generate ``len(prompt)`` pairs. ``guidance_scale`` 1 = no guidance (one pass per step).
        The U-ViT has one position row per patch, so height and width are the model's own size."""
        if output_type not in ("np", "pt", "latent"):
            raise ValueError(f"output_type must be 'np', 'pt' or 'latent', got {output_type!r}")
        self.check_components()
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise ValueError("no prompts given")
        if isinstance(generator, list) and len(generator) != len(prompts):
            raise ValueError(f"got {len(generator)} generators for {len(prompts)} samples; pass one per sample")
        side = self.unet.config.sample_size
        size = side * self.vae_scale_factor
        if (height or size) != size or (width or size) != size:
            raise ValueError(f"this U-ViT generates {size}x{size} pairs only (its position rows), got {height}x{width}")
        device = self._execution_device
        text = self.encode_prompt(prompts, device).to(self.unet.dtype)
        cfg = self.unet.config
        dim = 2 * cfg.in_channels * side * side + cfg.clip_img_dim
        # the solver state stays in fp32 whatever the U-ViT's dtype
        state = randn_tensor((len(prompts), dim), generator=generator, device=device, dtype=torch.float32)
        state = state * self.scheduler.init_noise_sigma
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        with self.progress_bar(total=len(self.scheduler.timesteps)) as bar:
            for t in self.scheduler.timesteps:
                eps = self._epsilon(state, text, t, side, guidance_scale, generator)
                state = self.scheduler.step(eps, t, state).prev_sample
                bar.update()
        img, _, label = self._parts(state, side)
        out = pairs_output(self.image_vae, self.label_vae, img, label, output_type, confidence_threshold)
        self.maybe_free_model_hooks()
        return out if return_dict else (out.images, out.masks, out.confidence)


def unet_class_name(folder: str | Path) -> str | None:
    """The ``_class_name`` in ``folder/unet/config.json`` (None without a readable one): what tells
    the backbones' folders apart."""
    try:
        return json.loads((Path(folder) / "unet" / "config.json").read_text(encoding="utf-8")).get("_class_name")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return None


def is_uvit_folder(folder: str | Path) -> bool:
    """A U-ViT pipeline folder: ``unet/config.json`` names their or our U-ViT class."""
    return unet_class_name(folder) in UVIT_CLASS_NAMES


def check_uvit_folder(folder: str, info) -> None:
    """Checks that need no model: every text2img part is there with its config and complete
    weights, and the label VAE is made for the dataset ``info``. ValueError naming the part."""
    try:
        check_pipeline_folder(folder, UVIT_COMPONENTS)
    except ValueError as e:
        raise ValueError(f"{e}; a U-ViT pipeline folder holds {', '.join(UVIT_COMPONENTS)}") from None
    label_folder = Path(folder) / "label_vae"
    try:
        check_label_vae_dataset(read_label_vae_num_labels(label_folder), info, label_folder)
    except ValueError as e:
        raise ValueError(f"{e}; pass the pipeline made for '{info.name}'") from None


def load_uvit_components(folder: str | Path, dtype: torch.dtype = torch.float32, scheduler: str = "dpmsolver++") -> dict:
    """The six text2img parts of a U-ViT folder (theirs or ours) in ``dtype``, each from its subfolder;
    the sampler ``scheduler`` (``make_scheduler``) on the folder's noise schedule."""
    from transformers import CLIPTextModel, CLIPTokenizer

    folder = Path(folder)
    scheduler_config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8"))
    return dict(image_vae=AutoencoderKL.from_pretrained(folder / "image_vae", torch_dtype=dtype),
                text_encoder=CLIPTextModel.from_pretrained(folder / "text_encoder", dtype=dtype),
                clip_tokenizer=CLIPTokenizer.from_pretrained(folder / "clip_tokenizer"),
                label_vae=load_label_vae(folder / "label_vae", torch_dtype=dtype),
                unet=JoDiffusionUViT.from_pretrained(folder / "unet", torch_dtype=dtype),
                scheduler=make_scheduler(scheduler, scheduler_config))


def load_uvit_pipeline(folder: str, dtype: torch.dtype, device, scheduler: str = "dpmsolver++") -> JoDiffusionUViTPipeline:
    """A U-ViT folder on ``device`` in ``dtype``, sampling with ``scheduler`` on the folder's own noise
    schedule, progress bar off; a load error or mismatched parts are one ValueError naming the folder."""
    try:
        parts = load_uvit_components(folder, dtype, scheduler)
    except ValueError as e:  # a key mismatch already names the file
        raise ValueError(str(e)) from None
    except Exception as e:  # noqa: BLE001 -- whatever a folder that passed check_uvit_folder still hides
        raise ValueError(f"{folder}: cannot load the U-ViT pipeline ({first_line(e)})") from None
    return ready_to_generate(JoDiffusionUViTPipeline(**parts).to(device), folder)
