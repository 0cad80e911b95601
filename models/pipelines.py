"""The one place a generation backbone is chosen: a pipeline folder is either ours (a Stable
Diffusion UNet widened with label channels, ``models.pipeline_jodiffusion``) or the authors'
(UniDiffuser's U-ViT with a label token stream, ``models.pipeline_uvit``). Both pipelines take
the same call and return the same output, so ``inference.generate`` never branches on the backbone.

    from models.pipelines import check_pipeline, load_pipeline, pipeline_backbone
    check_pipeline(folder, info)                               # no model loaded; ValueError naming the file
    pipe = load_pipeline(folder, torch.float32, "cpu")         # either backbone
    out = pipe(prompts, generator=cpu_generators(seeds))       # out.images, out.masks

A new backbone registers its folder test, check and loader in ``BACKBONES`` and, to be trained by
``train.joint_diffusion``, its loader, loss, frozen-part reload and export in ``TRAINING`` (and the
folder parts checked before loading in ``TRAINING_FOLDER_PARTS``). ``training_backbone`` also
knows a plain UniDiffuser folder (the toy U-ViT base, ``models.toy_unidiffuser``), which trains
in ``--mode image`` only and does not generate through ``load_pipeline``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, NamedTuple

import torch

from models.joint_unet import unet_batch_loss
from models.pipeline_jodiffusion import (check_jodiffusion_folder, export_unet_pipeline, load_jodiffusion_pipeline,
                                         load_unet_training_components, reload_unet_frozen_parts, training_pipeline)
from models.pipeline_uvit import (UVIT_TRAINING_COMPONENTS, check_uvit_folder, is_uvit_folder, load_uvit_pipeline,
                                  unet_class_name)
from models.uvit_init import UNIDIFFUSER_COMPONENTS
from models.uvit_training import (export_unidiffuser_pipeline, export_uvit_pipeline,
                                  load_unidiffuser_training_components, load_uvit_training_components,
                                  reload_unidiffuser_frozen_parts, reload_uvit_frozen_parts, unidiffuser_batch_loss,
                                  uvit_batch_loss, uvit_training_pipeline)
from utils.training import SD_PARTS


class Backbone(NamedTuple):
    recognises: Callable[[str | Path], bool]
    check: Callable[[str, object], None]
    load: Callable[..., object]


# tried in order; the widened UNet is the fallback (its folders have no marker of their own)
BACKBONES = {
    "uvit": Backbone(is_uvit_folder, check_uvit_folder, load_uvit_pipeline),
    "unet": Backbone(lambda folder: True, check_jodiffusion_folder, load_jodiffusion_pipeline),
}


def pipeline_backbone(folder: str | Path) -> str:
    """``uvit`` or ``unet``: which backbone the pipeline folder holds."""
    return next(name for name, b in BACKBONES.items() if b.recognises(folder))


def check_pipeline(folder: str, info) -> str:
    """Every check that needs no model (files, weight headers, label VAE vs dataset); returns the backbone."""
    name = pipeline_backbone(folder)
    BACKBONES[name].check(folder, info)
    return name


def load_pipeline(folder: str, dtype: torch.dtype, device, scheduler: str = "dpmsolver++"):
    """The folder's pipeline on ``device`` in ``dtype`` with ``scheduler``; ValueError naming the folder."""
    return BACKBONES[pipeline_backbone(folder)].load(folder, dtype, device, scheduler)


class TrainingBackbone(NamedTuple):
    """What ``train.joint_diffusion`` asks of a backbone; the loop itself is the same for all."""

    load: Callable  # (source, label_vae_path | None, info) -> (models dict, model, DDPM noise schedule)
    loss: Callable  # (model, noise_scheduler, models, latents, ids, clip, gen, **settings) -> (loss, {part: loss})
    parts: tuple  # the parts the loss reports (logged as <part>_loss), joint mode
    pipeline: Callable | None  # (models, model, noise_scheduler) -> the pipeline to validate with; None: no grid
    reload_frozen: Callable  # (source, label_vae_path) -> float32 frozen parts for the export
    export: Callable  # (models, model, noise_scheduler, out_dir, source) -> None


TRAINING = {
    "uvit": TrainingBackbone(load_uvit_training_components, uvit_batch_loss, ("image", "label", "text", "clip"),
                             uvit_training_pipeline, reload_uvit_frozen_parts, export_uvit_pipeline),
    "unet": TrainingBackbone(load_unet_training_components, unet_batch_loss, ("image", "label"), training_pipeline,
                             reload_unet_frozen_parts, export_unet_pipeline),
    "unidiffuser": TrainingBackbone(load_unidiffuser_training_components, unidiffuser_batch_loss,
                                    ("image", "text", "clip"), None, reload_unidiffuser_frozen_parts,
                                    export_unidiffuser_pipeline),
}
# what ``check_model_folders`` asks of the folder before anything loads
TRAINING_FOLDER_PARTS = {"uvit": UVIT_TRAINING_COMPONENTS, "unidiffuser": UNIDIFFUSER_COMPONENTS, "unet": SD_PARTS}


def training_backbone(folder: str | Path) -> str:
    """``uvit``, ``unidiffuser`` or ``unet``: which ``TRAINING`` entry trains from ``folder``, by its
    unet/config.json ``_class_name`` (an SD folder, ours, or a hub id: ``unet``)."""
    if is_uvit_folder(folder):
        return "uvit"
    return "unidiffuser" if unet_class_name(folder) == "UniDiffuserModel" else "unet"
