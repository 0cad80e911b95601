"""The label VAE (stage 1): class-index masks <-> 4-channel latents shaped like the image VAE's.

A mask of label values 0..K (255 = ignore) is bit-encoded (one channel per bit, mapped to
[-1, 1]; ignore pixels are the all-zero code no class can produce), encoded by a small conv
net to a diagonal Gaussian at 1/8 resolution, and decoded by transposed convs to K + 1 logits.
Every later stage goes through four functions: ``bit_encode``, ``encode_masks``,
``decode_latents_to_masks`` and ``load_label_vae``; they work for both model types.

    from models.label_vae import load_label_vae, encode_masks, decode_latents_to_masks
    vae = load_label_vae("runs/label_vae_toy")              # or runs/label_vae_toy/label_vae
    z = encode_masks(vae, masks)                             # B x 4 x H/8 x W/8, scaled
    masks, confidence = decode_latents_to_masks(vae, z)     # low confidence -> 255

Two model types share that API: ``LabelVAE`` (the authors' lightweight net, ~15M parameters
at the paper's widths) and ``LabelAutoencoderKL`` (a diffusers ``AutoencoderKL`` in the SD-1.5
configuration with ``in_channels = num_bits`` and ``out_channels = K + 1``). A third,
``AuthorsLabelVAE``, loads the authors' released weights (their keys and config) and maps their
label convention to ours inside those functions (docs/label_conventions.md).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import AutoencoderKL, ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
from diffusers.models.modeling_outputs import AutoencoderKLOutput

from utils.metrics import IoUAccumulator
from utils.visualize import colorize, error_map, save_grid

# The authors' latent scaling factor for the label latent (METHOD.md §2).
PAPER_SCALING_FACTOR = 0.2

MODEL_TYPES = ("label_vae", "autoencoder_kl")


def bits_for_labels(num_labels: int) -> int:
    """Bits needed for label values 0..num_labels-1 (VOC 21 -> 5, COCO 81 -> 7, ADE20K 151 -> 8).

    The paper writes ceil(log2 K); counting the values 0..K instead is the same for its three
    datasets and stays right when K is a power of two.
    """
    if num_labels < 2:
        raise ValueError(f"num_labels must be >= 2, got {num_labels}")
    return max(1, (num_labels - 1).bit_length())


def bit_encode(mask: torch.Tensor, num_bits: int, ignore_index: int = 255) -> torch.Tensor:
    """B x H x W integer labels -> B x num_bits x H x W float in {-1, 0, 1}.

    Channel i holds bit i of the label as -1/+1; ignore pixels are 0 in every channel (the
    paper's 0.5 before the 2x-1 mapping), a code no class can produce.
    """
    if mask.dim() != 3:
        raise ValueError(f"bit_encode expects B x H x W labels, got shape {tuple(mask.shape)}")
    mask = mask.long()
    ignore = mask == ignore_index
    valid = mask.masked_fill(ignore, 0)
    if valid.numel() and (int(valid.min()) < 0 or int(valid.max()) >= 2**num_bits):
        raise ValueError(f"labels must lie in [0, {2**num_bits}) or equal {ignore_index}; "
                         f"got values {int(valid.min())}..{int(valid.max())}")
    shifts = torch.arange(num_bits, device=mask.device).view(1, num_bits, 1, 1)
    bits = ((valid.unsqueeze(1) >> shifts) & 1).float() * 2 - 1
    return bits.masked_fill(ignore.unsqueeze(1), 0.0)


def bit_decode(bits: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """Inverse of ``bit_encode`` (thresholds at 0; the all-zero code -> ignore). For tests and checks."""
    ignore = (bits == 0).all(dim=1)
    weights = (2 ** torch.arange(bits.shape[1], device=bits.device)).view(1, -1, 1, 1)
    labels = ((bits > 0).long() * weights).sum(1)
    return labels.masked_fill(ignore, ignore_index)


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channel dimension of an NCHW tensor (per pixel)."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.norm = nn.LayerNorm(channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _reconstruct(model, x: torch.Tensor, sample_posterior: bool, generator) -> torch.Tensor:
    """Encode, take a posterior sample (or its mode), decode to logits: both lightweight VAEs' forward."""
    posterior = model.encode(x).latent_dist
    z = posterior.sample(generator) if sample_posterior else posterior.mode()
    return model.decode(z).sample


class LabelVAE(ModelMixin, ConfigMixin):
    """The authors' lightweight label VAE (METHOD.md §2); defaults are the paper's widths.

    ``encoder_channels = (c0, c1, ..., cn)``: a stem conv to c0, then n stages (conv3x3 to c_i,
    stride-2 conv3x3, SiLU), so the latent is at 1/2**n resolution. ``decoder_channels`` has the
    same length: a conv from the latent to d0, then n x (ConvTranspose k2 s2, channel LayerNorm,
    SiLU). The toy profile uses one stage (32 px masks -> 16 x 16 latents).
    """

    @register_to_config
    def __init__(
        self,
        num_labels: int = 151,
        ignore_index: int = 255,
        num_bits: int | None = None,
        latent_channels: int = 4,
        encoder_channels: Sequence[int] = (128, 256, 512, 512),
        decoder_channels: Sequence[int] = (512, 512, 512, 512),
        norm_num_groups: int = 32,
        scaling_factor: float = PAPER_SCALING_FACTOR,
    ):
        super().__init__()
        if num_bits is None:
            num_bits = bits_for_labels(num_labels)
            self.register_to_config(num_bits=num_bits)
        enc, dec = list(encoder_channels), list(decoder_channels)
        if len(enc) < 1 or len(enc) != len(dec):
            raise ValueError(f"encoder_channels {enc} and decoder_channels {dec} need the same "
                             "length (one up stage per down stage)")
        for c in (enc[-1], dec[-1]):
            if c % norm_num_groups:
                raise ValueError(f"{c} channels are not divisible by norm_num_groups={norm_num_groups}")

        self.encoder = nn.Sequential(
            nn.Conv2d(num_bits, enc[0], 3, padding=1), nn.SiLU(),
            *[nn.Sequential(nn.Conv2d(enc[i], enc[i + 1], 3, padding=1),
                            nn.Conv2d(enc[i + 1], enc[i + 1], 3, stride=2, padding=1), nn.SiLU())
              for i in range(len(enc) - 1)],
            nn.Conv2d(enc[-1], enc[-1], 3, padding=1),
            nn.GroupNorm(norm_num_groups, enc[-1], eps=1e-6), nn.SiLU(),
            nn.Conv2d(enc[-1], 2 * latent_channels, 3, padding=1),
        )
        self.decoder = nn.Sequential(
            nn.Conv2d(latent_channels, dec[0], 3, padding=1),
            *[nn.Sequential(nn.ConvTranspose2d(dec[i], dec[i + 1], 2, stride=2),
                            ChannelLayerNorm(dec[i + 1]), nn.SiLU())
              for i in range(len(dec) - 1)],
            nn.GroupNorm(norm_num_groups, dec[-1], eps=1e-6), nn.SiLU(),
            nn.Conv2d(dec[-1], num_labels, 3, padding=1),
        )

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.config.encoder_channels) - 1)

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        posterior = DiagonalGaussianDistribution(self.encoder(x))
        return AutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)

    def decode(self, z: torch.Tensor, return_dict: bool = True):
        logits = self.decoder(z)
        return DecoderOutput(sample=logits) if return_dict else (logits,)

    def forward(self, x: torch.Tensor, sample_posterior: bool = True,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """Bit-encoded masks -> K + 1 logits (training path)."""
        return _reconstruct(self, x, sample_posterior, generator)


class LabelAutoencoderKL(AutoencoderKL):
    """The heavier alternative: diffusers' ``AutoencoderKL`` in the SD-1.5 configuration.

    Only the label-specific settings are this class's own; the SD-1.5 layout (four
    Down/UpDecoderBlock2D stages, two layers each, 128-256-512-512) is fixed by the defaults.
    """

    @register_to_config
    def __init__(
        self,
        num_labels: int = 151,
        ignore_index: int = 255,
        num_bits: int | None = None,
        block_out_channels: Sequence[int] = (128, 256, 512, 512),
        layers_per_block: int = 2,
        latent_channels: int = 4,
        norm_num_groups: int = 32,
        sample_size: int = 512,
        scaling_factor: float = PAPER_SCALING_FACTOR,
        use_quant_conv: bool = True,
        use_post_quant_conv: bool = True,
    ):
        num_bits = num_bits or bits_for_labels(num_labels)
        n = len(block_out_channels)
        super().__init__(
            in_channels=num_bits, out_channels=num_labels,
            down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
            block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block,
            act_fn="silu", latent_channels=latent_channels, norm_num_groups=norm_num_groups,
            sample_size=sample_size, scaling_factor=scaling_factor,
            use_quant_conv=use_quant_conv, use_post_quant_conv=use_post_quant_conv,
        )
        # AutoencoderKL.__init__ registered its own keys; keep only ours so from_pretrained
        # round-trips without "unexpected config attributes" warnings.
        self._internal_dict = type(self._internal_dict)(
            {k: v for k, v in self._internal_dict.items() if k in _LABEL_AKL_KEYS or k.startswith("_")})
        self.register_to_config(num_bits=num_bits)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.config.block_out_channels) - 1)

    def forward(self, x: torch.Tensor, sample_posterior: bool = True,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """Bit-encoded masks -> K + 1 logits, as ``LabelVAE.forward`` (the trainer calls either the
        same way; AutoencoderKL's own forward returns a ``DecoderOutput`` and defaults to the mean)."""
        posterior = self.encode(x).latent_dist
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z).sample


_LABEL_AKL_KEYS = ("num_labels", "ignore_index", "num_bits", "block_out_channels", "layers_per_block",
                   "latent_channels", "norm_num_groups", "sample_size", "scaling_factor",
                   "use_quant_conv", "use_post_quant_conv")

_CLASSES = {"LabelVAE": LabelVAE, "LabelAutoencoderKL": LabelAutoencoderKL}


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of an NCHW tensor holding ``weight``/``bias`` itself: the key
    names of the authors' checkpoints (``ChannelLayerNorm`` keeps them under ``.norm``)."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.weight.shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


# What the authors' label VAE config.json may call itself (theirs; ours when saved from here).
AUTHORS_CLASS_NAMES = ("LightweightLabelVAE", "AuthorsLabelVAE")


class AuthorsLabelVAE(ModelMixin, ConfigMixin):
    """The authors' released label VAE (their ``LightweightLabelVAE``, METHOD.md §8), loadable
    from their folders: the same config keys and the same flat state-dict keys.

    Layout (ADE20K defaults; indices are ``encoder.N`` / ``decoder.N``):

    * encoder: 0 conv3x3 in->c0, 1 SiLU, per stage [conv3x3 c_i->c_i+1, stride-2 conv3x3, SiLU]
      (2-4, 5-7, 8-10), 11 conv3x3 c_last->intermediate, 12 the mid-block slot (Identity:
      ``num_mid_blocks`` 0), 13 GroupNorm (eps 1e-6), 14 SiLU, 15 conv3x3 -> 2 x latent (mean,
      logvar) for a diffusers ``DiagonalGaussianDistribution``.
    * decoder: 0 conv3x3 latent->intermediate, 1 the mid-block slot (Identity), per upscaler
      [ConvTranspose k2 s2 (intermediate, then upscale channels) -> upscale, LayerNorm2d (eps
      1e-6), SiLU] (2-4, 5-7, 8-10), 11 GroupNorm (eps 1e-5, torch's default), 12 SiLU,
      13 conv3x3 -> out_channels logits; upsampled bilinearly when the upscalers give back less
      than the encoder took (``interpolation_factor`` > 1; 1 at the released configs).

    These follow the authors' code, which also fixes the eps values. ``act_fn`` is kept in the
    config but, as in theirs, used nowhere. Unsupported: ``num_mid_blocks`` > 0 and
    ``num_latents`` != 2 (the released configs use 0 and 2).

    Label conventions are mapped at the boundary (``masks_to_bits``, ``classes_to_masks``), so
    ``encode_masks``/``decode_latents_to_masks`` take and give masks in OUR convention
    (docs/label_conventions.md). Their class c is our label c - ``label_offset``; their 0 is
    their ignore code. Offset 0 (the default) fits VOC, COCO and ADE20K as this project stores
    them (our labels 0..K are theirs; our 255 is their 0); offset 1 is for a label space that
    drops their class 0 (ADE20K read with reduce_zero_label: their 0 -> our 255, their c -> our
    c - 1). Low-confidence pixels become our 255 (theirs write 0 there). ``label_offset`` is
    not a config key (theirs has none): pass it to the constructor or set it after loading.
    """

    ignore_for_config = ["label_offset"]

    @register_to_config
    def __init__(
        self,
        in_channels: int = 8,
        out_channels: int = 151,
        block_out_channels: Sequence[int] = (128, 256, 512, 512),
        intermediate_channels: int = 512,
        latent_channels: int = 4,
        norm_num_groups: int = 32,
        scaling_factor: float = PAPER_SCALING_FACTOR,
        num_mid_blocks: int = 0,
        num_latents: int = 2,
        num_upscalers: int = 3,
        upscale_channels: int = 512,
        act_fn: str = "none",
        label_offset: int = 0,
    ):
        super().__init__()
        c = list(block_out_channels)
        if num_mid_blocks != 0:
            raise ValueError(f"num_mid_blocks={num_mid_blocks}: only 0 is supported (the released label VAEs)")
        if num_latents != 2:
            raise ValueError(f"num_latents={num_latents}: only 2 (mean and log-variance) is supported")
        if not c:
            raise ValueError("block_out_channels is empty")
        if num_upscalers < 1 or (2 ** (len(c) - 1)) % (2**num_upscalers):
            raise ValueError(f"num_upscalers={num_upscalers}: needs 1 <= 2**num_upscalers dividing the encoder's "
                             f"factor {2 ** (len(c) - 1)}")
        for key, channels in (("intermediate_channels", intermediate_channels), ("upscale_channels", upscale_channels)):
            if channels % norm_num_groups:
                raise ValueError(f"{key}={channels} is not divisible by norm_num_groups={norm_num_groups}")
        if out_channels >= 2**in_channels + 1 or out_channels < 2:
            raise ValueError(f"out_channels={out_channels}: labels 0..{out_channels - 1} do not fit "
                             f"in_channels={in_channels} bits")
        self.label_offset = label_offset

        stages = [m for i in range(len(c) - 1)
                  for m in (nn.Conv2d(c[i], c[i + 1], 3, padding=1),
                            nn.Conv2d(c[i + 1], c[i + 1], 3, stride=2, padding=1), nn.SiLU())]
        self.encoder = nn.Sequential(
            nn.Conv2d(in_channels, c[0], 3, padding=1), nn.SiLU(), *stages,
            nn.Conv2d(c[-1], intermediate_channels, 3, padding=1),
            nn.Identity(),  # the mid-block slot: keeps the indices of their checkpoints
            nn.GroupNorm(norm_num_groups, intermediate_channels, eps=1e-6), nn.SiLU(),
            nn.Conv2d(intermediate_channels, num_latents * latent_channels, 3, padding=1),
        )
        upscalers = [m for i in range(num_upscalers)
                     for m in (nn.ConvTranspose2d(intermediate_channels if i == 0 else upscale_channels,
                                                  upscale_channels, 2, stride=2),
                               LayerNorm2d(upscale_channels), nn.SiLU())]
        self.decoder = nn.Sequential(
            nn.Conv2d(latent_channels, intermediate_channels, 3, padding=1),
            nn.Identity(),  # the mid-block slot
            *upscalers,
            nn.GroupNorm(norm_num_groups, upscale_channels), nn.SiLU(),
            nn.Conv2d(upscale_channels, out_channels, 3, padding=1),
        )

    # -- what the rest of the code reads from a label VAE ------------------------------------
    @property
    def label_offset(self) -> int:
        return self._label_offset

    @label_offset.setter
    def label_offset(self, value: int) -> None:
        if value not in (0, 1):
            raise ValueError(f"label_offset={value!r}: must be 0 (their class c = our label c) or 1 "
                             "(their 0 = our ignore, their c = our c - 1)")
        if self.config.out_channels - value < 2:
            raise ValueError(f"label_offset={value} leaves fewer than 2 labels of "
                             f"out_channels={self.config.out_channels}")
        self._label_offset = int(value)

    @property
    def num_labels(self) -> int:
        """Our label values 0..num_labels-1 that this model decodes."""
        return self.config.out_channels - self.label_offset

    @property
    def ignore_index(self) -> int:
        return 255

    @property
    def num_bits(self) -> int:
        return self.config.in_channels

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.config.block_out_channels) - 1)

    @property
    def interpolation_factor(self) -> int:
        return self.downsample_factor // 2**self.config.num_upscalers

    # -- the label boundary ----------------------------------------------------------------------
    def masks_to_bits(self, masks: torch.Tensor) -> torch.Tensor:
        """Our B x H x W labels -> their bit input: bits of their label, their label 0 (our ignore,
        and whatever our label maps to 0) the all-zero code."""
        masks = masks.long()
        ignore = masks == self.ignore_index
        bad = ~ignore & ((masks < 0) | (masks >= self.num_labels))
        if bad.any():
            raise ValueError(f"labels must lie in [0, {self.num_labels}) or equal {self.ignore_index}; got "
                             f"{masks[bad].unique()[:10].tolist()}")
        theirs = (masks + self.label_offset).masked_fill(ignore, 0)
        return bit_encode(theirs, self.num_bits, ignore_index=0)

    def classes_to_masks(self, classes: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
        """Their decoded classes -> our labels (offset 1: their 0 -> ``ignore_index``)."""
        if self.label_offset == 0:
            return classes
        return (classes - self.label_offset).masked_fill(classes == 0, ignore_index)

    # -- the network ----------------------------------------------------------------------------
    def encode(self, x: torch.Tensor, return_dict: bool = True):
        posterior = DiagonalGaussianDistribution(self.encoder(x))
        return AutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)

    def decode(self, z: torch.Tensor, return_dict: bool = True):
        logits = self.decoder(z)
        if self.interpolation_factor > 1:
            logits = F.interpolate(logits, scale_factor=self.interpolation_factor, mode="bilinear",
                                   align_corners=False)
        return DecoderOutput(sample=logits) if return_dict else (logits,)

    def forward(self, x: torch.Tensor, sample_posterior: bool = True,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """Their bit input -> their out_channels logits (as ``LabelVAE.forward``)."""
        return _reconstruct(self, x, sample_posterior, generator)


def _is_authors_config(config: dict) -> bool:
    return config.get("_class_name") in AUTHORS_CLASS_NAMES or {"block_out_channels", "num_upscalers"} <= set(config)


def label_vae_num_labels(config: dict) -> int:
    """How many of our label values a label VAE's config (config.json as a dict, or a loaded
    model's ``.config``) decodes: ``num_labels`` for ours, ``out_channels`` for the authors'
    (their default label offset 0). ValueError when the config is neither."""
    if "num_labels" in config:
        return int(config["num_labels"])
    if _is_authors_config(config) and "out_channels" in config:
        return int(config["out_channels"])
    raise ValueError("label VAE config has neither num_labels (ours) nor the authors' out_channels + "
                     "num_upscalers (LightweightLabelVAE)")


def model_num_labels(label_vae) -> int:
    """How many of our label values a loaded label VAE decodes (the authors' with its label offset)."""
    return label_vae.num_labels if isinstance(label_vae, AuthorsLabelVAE) else int(label_vae.config.num_labels)


def read_label_vae_num_labels(folder: str | Path) -> int:
    """``label_vae_num_labels`` of ``folder/config.json``, without loading the model; ValueError naming the file."""
    config_file = Path(folder) / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{config_file.parent}: no label VAE here (no config.json)")
    try:
        return label_vae_num_labels(json.loads(config_file.read_text(encoding="utf-8")))
    except (UnicodeDecodeError, ValueError, TypeError) as e:
        raise ValueError(f"{config_file}: {e}") from None


def build_label_vae(model_type: str, num_labels: int, ignore_index: int = 255,
                    encoder_channels: Sequence[int] | None = None,
                    decoder_channels: Sequence[int] | None = None,
                    norm_num_groups: int = 32, scaling_factor: float = PAPER_SCALING_FACTOR,
                    sample_size: int = 512):
    """A fresh model of either type for ``sample_size`` px masks; channel lists None = the paper's widths."""
    if model_type == "label_vae":
        kw = {}
        if encoder_channels:
            kw["encoder_channels"] = tuple(encoder_channels)
        if decoder_channels:
            kw["decoder_channels"] = tuple(decoder_channels)
        model = LabelVAE(num_labels=num_labels, ignore_index=ignore_index, norm_num_groups=norm_num_groups,
                         scaling_factor=scaling_factor, **kw)
    elif model_type == "autoencoder_kl":
        kw = {"block_out_channels": tuple(encoder_channels)} if encoder_channels else {}
        model = LabelAutoencoderKL(num_labels=num_labels, ignore_index=ignore_index, norm_num_groups=norm_num_groups,
                                   scaling_factor=scaling_factor, sample_size=sample_size, **kw)
    else:
        raise ValueError(f"unknown model_type {model_type!r}; choose one of {', '.join(MODEL_TYPES)}")
    if sample_size % model.downsample_factor:
        raise ValueError(f"--resolution {sample_size} is not divisible by the latent factor {model.downsample_factor}")
    return model


def load_label_vae(path_or_folder: str | Path, torch_dtype: torch.dtype | None = None):
    """Load a saved label VAE of either of our types, or the authors' (``AuthorsLabelVAE``: their
    ``_class_name`` LightweightLabelVAE, or their config keys).

    Accepts the ``save_pretrained`` folder itself, or a training run folder holding it as
    ``label_vae/``.
    """
    folder = Path(path_or_folder)
    if not (folder / "config.json").is_file() and (folder / "label_vae" / "config.json").is_file():
        folder = folder / "label_vae"
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path_or_folder}: no label VAE here (expected config.json or "
                                "label_vae/config.json)")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_file}: not valid JSON ({e})") from None
    class_name = config.get("_class_name") if isinstance(config, dict) else None
    if class_name in _CLASSES:
        cls = _CLASSES[class_name]
    elif isinstance(config, dict) and _is_authors_config(config):
        cls = AuthorsLabelVAE
    else:
        raise ValueError(f"{config_file}: _class_name {class_name!r} is not a label VAE "
                         f"({', '.join(_CLASSES)}, or the authors' {AUTHORS_CLASS_NAMES[0]})")
    kw = {"torch_dtype": torch_dtype} if torch_dtype is not None else {}
    return cls.from_pretrained(folder, use_safetensors=True, **kw)


def _check_size(label_vae, h: int, w: int) -> None:
    f = label_vae.downsample_factor
    if h % f or w % f:
        raise ValueError(f"mask size {h}x{w} is not divisible by the label VAE's factor {f}")


def encode_masks(label_vae, masks: torch.Tensor, generator: torch.Generator | None = None,
                 sample: bool = False) -> torch.Tensor:
    """B x H x W labels -> scaled latents (B x 4 x H/f x W/f), ready for diffusion.

    The posterior mean by default, so a mask always maps to the same latent; ``sample=True``
    draws from the posterior (with ``generator``) as training does. Masks are in our label
    convention for every model type (the authors' model maps them to theirs itself).
    """
    _check_size(label_vae, *masks.shape[-2:])
    param = next(label_vae.parameters())
    if isinstance(label_vae, AuthorsLabelVAE):
        x = label_vae.masks_to_bits(masks.to(param.device))
    else:
        x = bit_encode(masks.to(param.device), label_vae.config.num_bits, label_vae.config.ignore_index)
    posterior = label_vae.encode(x.to(param.dtype)).latent_dist
    z = posterior.sample(generator) if sample else posterior.mode()
    return z * label_vae.config.scaling_factor


def decode_latents_to_masks(label_vae, latents_scaled: torch.Tensor, threshold: float = 0.5,
                            ignore_index: int = 255) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled latents -> (masks int64 B x H x W, confidence float32 B x H x W).

    Argmax over the K + 1 logits; pixels whose top softmax probability is below ``threshold``
    get ``ignore_index`` (the paper's rule: do not trust a label the decoder is unsure of).
    Masks come out in our label convention for every model type; for the authors' model its
    classes are mapped to ours first (``AuthorsLabelVAE.classes_to_masks``).
    """
    param = next(label_vae.parameters())
    z = latents_scaled.to(device=param.device, dtype=param.dtype) / label_vae.config.scaling_factor
    logits = label_vae.decode(z).sample.float()
    if isinstance(label_vae, AuthorsLabelVAE):
        # their decode rule: argmax of the logits, confidence = the top softmax probability
        confidence = logits.softmax(dim=1).amax(dim=1)
        masks = label_vae.classes_to_masks(logits.argmax(dim=1), ignore_index)
    else:
        confidence, masks = logits.softmax(dim=1).max(dim=1)
    masks = masks.masked_fill(confidence < threshold, ignore_index)
    return masks, confidence


@torch.no_grad()
def parse_scaling_factor(value: str) -> float | None:
    """``auto`` -> None (measure 1/std after training), a number -> that fixed scale."""
    if value == "auto":
        return None
    try:
        scale = float(value)
    except ValueError:
        scale = 0.0
    if not scale > 0:
        raise ValueError(f"--scaling_factor: {value!r} is neither a positive number nor 'auto'")
    return scale


def store_latent_scale(label_vae, stats: dict, fixed: float | None) -> float:
    """Write the latent scale into ``label_vae``'s config (saved with it, read by the joint trainer
    and the pipeline): the measured 1/std, or ``fixed``. Records both in ``stats``; returns it."""
    stored = stats["unit_variance_scaling_factor"] if fixed is None else fixed
    stats.update(paper_scaling_factor=PAPER_SCALING_FACTOR, stored_scaling_factor=stored)
    label_vae.register_to_config(scaling_factor=stored)
    return stored


@torch.no_grad()
def measure_latent_stats(label_vae, dataset, max_masks: int = 1000, batch_size: int = 16) -> dict:
    """Mean and std of the unscaled posterior-mean latents over up to ``max_masks`` masks of
    ``dataset`` (items with a ``"mask"``; 0 = all), at evenly spaced indices over the whole set
    (not its first masks), so an unaugmented dataset gives the same sample and figures every time.

    ``unit_variance_scaling_factor`` = 1/std is the scale that gives the diffusion model
    unit-variance label latents (without a KL term the latent's scale is arbitrary).
    """
    n = len(dataset)
    count = min(max_masks, n) if max_masks else n
    if count == 0:
        raise ValueError("no masks to measure latent statistics on")
    indices = sorted(set(np.linspace(0, n - 1, count).round().astype(int).tolist()))
    was_training = label_vae.training
    label_vae.eval()
    s1 = s2 = None
    elems = 0
    for start in range(0, len(indices), batch_size):
        masks = torch.stack([dataset[i]["mask"] for i in indices[start:start + batch_size]])
        z = encode_masks(label_vae, masks).double() / label_vae.config.scaling_factor
        c1, c2 = z.sum(dim=(0, 2, 3)), (z * z).sum(dim=(0, 2, 3))
        s1, s2 = (c1, c2) if s1 is None else (s1 + c1, s2 + c2)
        elems += z.numel() // z.shape[1]
    label_vae.train(was_training)
    ch_mean = s1 / elems
    ch_std = (s2 / elems - ch_mean**2).clamp_min(0).sqrt()
    mean = s1.sum() / (elems * len(s1))
    std = float((s2.sum() / (elems * len(s1)) - mean**2).clamp_min(0).sqrt())
    return {
        "num_masks": len(indices),
        "mean": float(mean),
        "std": std,
        "per_channel_mean": ch_mean.tolist(),
        "per_channel_std": ch_std.tolist(),
        "unit_variance_scaling_factor": 1.0 / max(std, 1e-12),
    }


def reconstruction_loss(model, masks: torch.Tensor, num_bits: int, ignore_index: int, noise_gen) -> torch.Tensor:
    """Cross-entropy of the masks decoded from a posterior sample of their latents; no KL term (the
    authors'): the latent is only asked to reconstruct."""
    x = bit_encode(masks, num_bits, ignore_index)
    logits = model(x, sample_posterior=True, generator=noise_gen)
    return F.cross_entropy(logits.float(), masks, ignore_index=ignore_index)


@torch.no_grad()
def reconstruction_scores(model, loader, info, max_samples: int, num_images: int, picture: Path) -> dict:
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


def check_label_vae_dataset(num_labels: int | None, info, folder) -> None:
    """ValueError naming ``folder`` when a label VAE decoding ``num_labels`` labels was trained for
    another dataset than ``info``'s (toy 6, VOC 21, COCO 81 and ADE20K 151 labels all differ)."""
    if num_labels != info.num_labels:
        raise ValueError(f"{folder}: this label VAE decodes {num_labels} labels but dataset '{info.name}' has "
                         f"{info.num_labels} (background + classes): it was trained for another dataset")
