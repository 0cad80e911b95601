"""JoDiffusionPipeline: outputs a user can use, per-sample seeding, save/load round trip."""
import json

import numpy as np
import pytest
import torch

from dataset.toy_semantic import CLASSES
from models.joint_unet import widen_unet_for_labels
from models.label_vae import LabelVAE
from models.pipeline_jodiffusion import JoDiffusionPipeline, build_jodiffusion_pipeline
from models.tiny_kit import TinySDSpec, tiny_components

WORDS = list(CLASSES) + ["a", "and", "red", "blue", "on", "striped", "background"]
NUM_LABELS = len(CLASSES)


def make_tiny_pipeline(seed: int = 0) -> JoDiffusionPipeline:
    """32 px images, 8x8 latents, random weights: the smallest real pipeline."""
    comps = tiny_components(WORDS, TinySDSpec(), seed=seed)
    torch.manual_seed(seed + 1)
    label_vae = LabelVAE(num_labels=NUM_LABELS, encoder_channels=(16, 32, 32),
                         decoder_channels=(32, 32, 32), norm_num_groups=8)
    # random weights decode to near-uniform logits; sharpen them so masks are not all "unsure"
    with torch.no_grad():
        label_vae.decoder[-1].weight.mul_(20)
    pipe = build_jodiffusion_pipeline(comps, label_vae, widen_unet_for_labels(comps["unet"]),
                                      scheduler=comps["scheduler"])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def gens(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


@pytest.fixture(scope="module")
def pipe():
    return make_tiny_pipeline()


def test_outputs_shapes_and_ranges(pipe):
    out = pipe(["a red circle", "a blue square on a striped background"], num_inference_steps=3,
               guidance_scale=8.0, generator=gens(1, 2))
    assert out.images.shape == (2, 32, 32, 3) and out.images.dtype == np.uint8
    assert out.masks.shape == (2, 32, 32) and out.masks.dtype == np.uint8
    assert out.confidence.shape == (2, 32, 32)
    assert out.confidence.min() >= 0 and out.confidence.max() <= 1
    valid = (out.masks < NUM_LABELS) | (out.masks == 255)
    assert valid.all()
    # exactly the pixels under the threshold are ignore
    assert ((out.confidence < 0.5) == (out.masks == 255)).all()
    assert out.images.std() > 0


def test_batch_mates_do_not_change_a_sample(pipe):
    # same noise, same result up to float rounding: conv kernels may round differently with
    # another batch shape (measured: VAE decode differs by ~4e-6), which is why inference.generate
    # fixes batch composition to get identical bytes
    both = pipe(["a red circle", "a blue square"], num_inference_steps=3, generator=gens(11, 12), output_type="pt")
    alone = pipe(["a blue square"], num_inference_steps=3, generator=gens(12), output_type="pt")
    torch.testing.assert_close(both.images[1], alone.images[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(both.confidence[1], alone.confidence[0], atol=1e-4, rtol=0)
    other = pipe(["a blue square"], num_inference_steps=3, generator=gens(13), output_type="pt")
    assert (other.images[0] - alone.images[0]).abs().max() > 0.01


def test_stochastic_scheduler_swap_keeps_per_sample_seeding(pipe):
    from diffusers import EulerAncestralDiscreteScheduler

    p = JoDiffusionPipeline(**pipe.components)
    p.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    p.set_progress_bar_config(disable=True)
    # the ancestral sampler adds fresh noise every step: it must come from each sample's generator
    both = p(["a ring", "a star"], num_inference_steps=3, generator=gens(5, 6), output_type="latent")
    alone = p(["a star"], num_inference_steps=3, generator=gens(6), output_type="latent")
    other = p(["a star"], num_inference_steps=3, generator=gens(7), output_type="latent")
    # this sampler's latents are sigma-scaled (|x| ~ 60 here), so float rounding is relative to that
    # (measured: 1.2e-4 between batch 2 and 1); another seed differs by ~60
    rounding = 1e-5 * alone.images.abs().max().item()
    torch.testing.assert_close(both.images[1], alone.images[0], atol=rounding, rtol=0)
    torch.testing.assert_close(both.masks[1], alone.masks[0], atol=rounding, rtol=0)
    assert (other.images[0] - alone.images[0]).abs().max() > 1000 * rounding
    assert p.config.scheduler[1] == "EulerAncestralDiscreteScheduler"


def test_no_guidance_and_pt_output(pipe):
    out = pipe("a triangle", num_inference_steps=2, guidance_scale=1.0, generator=gens(3), output_type="pt")
    assert out.images.shape == (1, 3, 32, 32) and out.images.min() >= 0 and out.images.max() <= 1
    assert out.masks.dtype == torch.int64


def test_unwidened_unet_is_a_clear_error():
    comps = tiny_components(WORDS, TinySDSpec())
    lv = LabelVAE(num_labels=NUM_LABELS, encoder_channels=(16, 32, 32), decoder_channels=(32, 32, 32),
                  norm_num_groups=8)
    p = build_jodiffusion_pipeline(comps, lv, comps["unet"])
    with pytest.raises(ValueError, match="widen"):
        p("a circle", num_inference_steps=2)


def test_save_pretrained_round_trip(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "pipe", safe_serialization=True)
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    assert index["_class_name"] == "JoDiffusionPipeline"
    assert index["label_vae"] == ["models.label_vae", "LabelVAE"]
    assert not list((tmp_path / "pipe").rglob("*.bin"))
    loaded = JoDiffusionPipeline.from_pretrained(tmp_path / "pipe")
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.label_vae, LabelVAE)
    a = pipe(["a red circle"], num_inference_steps=3, generator=gens(7))
    b = loaded(["a red circle"], num_inference_steps=3, generator=gens(7))
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.masks, b.masks)


@pytest.mark.parametrize("force_upcast", [True, False])
def test_fp16_vae_with_force_upcast_decodes_in_float32(force_upcast):
    # SD 1.5's VAE config sets force_upcast: in fp16 its decoder overflows (black / NaN images)
    pipe = make_tiny_pipeline()
    pipe.vae.to(torch.float16)
    pipe.vae.register_to_config(force_upcast=force_upcast)
    seen = []
    hook = pipe.vae.decoder.conv_in.register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    latents = torch.randn(2, pipe.unet.config.in_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    try:
        images, masks, _ = pipe.decode_latents(latents)
    except RuntimeError as e:  # a CPU build without fp16 convolutions can only test the upcast
        if force_upcast:
            raise
        pytest.skip(f"fp16 convolution on this CPU: {e}")
    finally:
        hook.remove()
    assert seen == [torch.float32 if force_upcast else torch.float16]
    assert pipe.vae.dtype == torch.float16  # the pipeline's VAE goes back to the dtype it was given
    assert images.dtype == torch.float32 and torch.isfinite(images).all()
    assert masks.shape == (2, 32, 32)


def test_ddim_swapped_in_from_the_config_does_not_clip_the_latents(tmp_path):
    """DDIM's own default clips each predicted latent to [-1, 1], which turned a trained model's
    samples into noise. A pipeline's scheduler config (saved and reloaded) carries SD's no-clipping
    settings, so ``DDIMScheduler.from_config(pipe.scheduler.config)`` samples the same ODE as
    DPM-Solver++, and ``inference.generate --scheduler ddim`` adds them for older pipelines too."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    from models.pipeline_jodiffusion import make_scheduler

    pipe = make_tiny_pipeline()
    pipe.save_pretrained(tmp_path / "pipe", safe_serialization=True)
    pipe = JoDiffusionPipeline.from_pretrained(tmp_path / "pipe")
    pipe.set_progress_bar_config(disable=True)
    ddim = DDIMScheduler.from_config(pipe.scheduler.config)
    assert ddim.config.clip_sample is False
    old = {k: v for k, v in pipe.scheduler.config.items() if k not in ("clip_sample", "set_alpha_to_one")}
    assert DDIMScheduler.from_config(old).config.clip_sample is True  # what went wrong before
    assert make_scheduler("ddim", old).config.clip_sample is False

    def draw(scheduler):
        pipe.scheduler = scheduler
        return pipe(["a red circle"], num_inference_steps=40, guidance_scale=3.0, generator=gens(3),
                    output_type="pt").images

    dpm = draw(DPMSolverMultistepScheduler.from_config(pipe.scheduler.config))
    no_clip = (draw(ddim) - dpm).abs().mean().item()
    clipped = (draw(DDIMScheduler.from_config(old)) - dpm).abs().mean().item()
    assert no_clip < clipped / 2, (no_clip, clipped)
