"""The one place a generation backbone is chosen: a pipeline folder is either ours (a Stable
Diffusion UNet widened with label channels, ``models.pipeline_jodiffusion``) or the authors'
(UniDiffuser's U-ViT with a label token stream, ``models.pipeline_uvit``). Both pipelines take
the same call and return the same output, so ``inference.generate`` never branches on the backbone.

    from models.pipelines import check_pipeline, load_pipeline, pipeline_backbone
    check_pipeline(folder, info)                               # no model loaded; ValueError naming the file
    pipe = load_pipeline(folder, torch.float32, "cpu")         # either backbone
    out = pipe(prompts, generator=cpu_generators(seeds))       # out.images, out.masks

A new backbone registers its folder test, check and loader in ``BACKBONES``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, NamedTuple

import torch

from models.pipeline_jodiffusion import check_jodiffusion_folder, load_jodiffusion_pipeline
from models.pipeline_uvit import check_uvit_folder, is_uvit_folder, load_uvit_pipeline


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
