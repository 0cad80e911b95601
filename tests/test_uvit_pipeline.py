"""The authors' U-ViT pipeline folder (tiny, in their layout): it is recognised, checked before
loading, samples with their text2img procedure, keeps each sample independent of its batch-mates,
and `.bin` folders load and convert to safetensors with the same output."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.utils.torch_utils import randn_tensor

from dataset import get_dataset_info
from models.pipelines import check_pipeline, load_pipeline, pipeline_backbone
from tests.fixtures_uvit_pipeline import write_authors_pipeline_folder
from utils.precision import cpu_generators

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["a photo of circle", "square on background", "star and ring"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_authors_pipeline_folder(tmp_path_factory.mktemp("uvit") / "pipe", num_labels=6)


@pytest.fixture(scope="module")
def pipe(folder):
    return load_pipeline(str(folder), torch.float32, "cpu")


def test_the_folder_is_recognised_and_checked_as_a_uvit_pipeline(folder, pipe):
    assert pipeline_backbone(folder) == "uvit" and check_pipeline(str(folder), get_dataset_info("toy")) == "uvit"
    assert type(pipe.unet).__name__ == "JoDiffusionUViT" and type(pipe.label_vae).__name__ == "AuthorsLabelVAE"
    out = pipe(PROMPTS[:2], num_inference_steps=3, generator=cpu_generators([0, 1]))
    assert out.images.shape == (2, 16, 16, 3) and out.images.dtype == np.uint8
    assert out.masks.shape == (2, 16, 16) and np.isin(out.masks, list(range(6)) + [255]).all()
    assert ((out.masks == 255) == (out.confidence < 0.5)).all()


def reference_text2img(pipe, prompts, seeds, steps, scale):
    """Their text2img written out step by step from METHOD.md §8, on the pipeline's parts."""
    unet, sched, cfg = pipe.unet, pipe.scheduler, pipe.unet.config
    gens = cpu_generators(seeds)
    side, c, clip_dim = cfg.sample_size, cfg.in_channels, cfg.clip_img_dim
    n = c * side * side
    ids = pipe.clip_tokenizer(prompts, padding="max_length", max_length=cfg.num_text_tokens, truncation=True,
                              return_tensors="pt").input_ids
    text = pipe.text_encoder(ids)[0]
    state = randn_tensor((len(prompts), 2 * n + clip_dim), generator=gens)  # [image | clip | label]
    sched.set_timesteps(steps)
    for t in sched.timesteps:
        img, clip, label = state[:, :n].reshape(-1, c, side, side), state[:, n:n + clip_dim].reshape(-1, 1, clip_dim), \
            state[:, n + clip_dim:].reshape(-1, c, side, side)
        b = len(prompts)
        cond = unet(text, img, clip, label, torch.full((b,), int(t)), torch.zeros(b, dtype=torch.long), data_type=1)
        noise_text = randn_tensor(text.shape, generator=gens)  # a fresh Gaussian text each step
        uncond = unet(noise_text, img, clip, label, torch.full((b,), int(t)), torch.full((b,), 1000), data_type=1)
        flat = [torch.cat([o[1].flatten(1), o[2].flatten(1), o[3].flatten(1)], 1) for o in (cond, uncond)]
        state = sched.step(scale * flat[0] + (1 - scale) * flat[1], t, state).prev_sample
    return state[:, :n].reshape(-1, c, side, side), state[:, n + clip_dim:].reshape(-1, c, side, side)


@torch.no_grad()
def test_sampling_is_their_text2img_procedure(pipe):
    out = pipe(PROMPTS[:2], num_inference_steps=3, guidance_scale=8.0, generator=cpu_generators([5, 6]),
               output_type="latent")
    img, label = reference_text2img(pipe, PROMPTS[:2], [5, 6], steps=3, scale=8.0)
    torch.testing.assert_close(out.images, img, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.masks, label, rtol=1e-4, atol=1e-5)
    unguided = pipe(PROMPTS[:2], num_inference_steps=3, guidance_scale=1.0, generator=cpu_generators([5, 6]),
                    output_type="latent")
    assert not torch.allclose(unguided.images, out.images)  # guidance is applied


@torch.no_grad()
def test_a_sample_depends_on_its_seed_not_on_its_batch_mates(pipe):
    a = pipe([PROMPTS[0], PROMPTS[1]], num_inference_steps=3, generator=cpu_generators([11, 12]), output_type="latent")
    b = pipe([PROMPTS[0], PROMPTS[2], PROMPTS[1]], num_inference_steps=3, generator=cpu_generators([11, 99, 13]),
             output_type="latent")
    torch.testing.assert_close(a.images[0], b.images[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a.masks[0], b.masks[0], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(a.images[1], b.images[2])  # same prompt, other seed


def test_bad_folders_stop_with_a_line_naming_the_file(folder, tmp_path):
    import shutil

    info = get_dataset_info("toy")
    broken = tmp_path / "no_unet"
    shutil.copytree(folder, broken)
    (broken / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"unet.*no weights file"):
        check_pipeline(str(broken), info)
    other = write_authors_pipeline_folder(tmp_path / "voc_like", num_labels=21)
    with pytest.raises(ValueError, match=r"label_vae.*'toy'"):
        check_pipeline(str(other), info)


def test_bin_folder_loads_and_converts_to_the_same_output(folder, tmp_path):
    from safetensors.torch import load_file

    bin_folder = write_authors_pipeline_folder(tmp_path / "bin", num_labels=6, fmt="bin")
    assert (bin_folder / "unet" / "diffusion_pytorch_model.bin").is_file()
    gens = lambda: cpu_generators([3])  # noqa: E731
    ref = load_pipeline(str(folder), torch.float32, "cpu")(PROMPTS[:1], num_inference_steps=2, generator=gens())
    direct = load_pipeline(str(bin_folder), torch.float32, "cpu")(PROMPTS[:1], num_inference_steps=2, generator=gens())
    assert np.array_equal(ref.images, direct.images) and np.array_equal(ref.masks, direct.masks)

    from inference.fetch_weights import main

    out = main(["--source", str(bin_folder), "--output_dir", str(tmp_path / "converted"), "--dataset", "toy"])
    assert not list(out.rglob("*.bin")) and (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert load_file(out / "unet" / "diffusion_pytorch_model.safetensors").keys() == \
        torch.load(bin_folder / "unet" / "diffusion_pytorch_model.bin", weights_only=True).keys()
    conv = load_pipeline(str(out), torch.float32, "cpu")(PROMPTS[:1], num_inference_steps=2, generator=gens())
    assert np.array_equal(ref.images, conv.images) and np.array_equal(ref.masks, conv.masks)


def test_a_bin_that_is_not_a_plain_tensor_dict_is_refused_in_one_line(tmp_path):
    src = tmp_path / "src" / "unet"
    src.mkdir(parents=True)
    torch.save({"weight": torch.zeros(2), "note": {"epoch": 3}}, src / "diffusion_pytorch_model.bin")
    proc = subprocess.run([sys.executable, "-m", "inference.fetch_weights", "--source", str(tmp_path / "src"),
                           "--output_dir", str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "diffusion_pytorch_model.bin" in proc.stderr and "flat dict of named tensors" in proc.stderr
    assert not (tmp_path / "out").exists()  # nothing that looks complete


def test_a_hub_id_that_cannot_be_reached_is_one_line(tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "inference.fetch_weights", "--source", "0why0/JoDiffusion",
                           "--output_dir", str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True, env=env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "0why0/JoDiffusion: download failed" in proc.stderr and not (tmp_path / "out").exists()


def test_speed_benchmark_runs_both_backbones_at_toy_size(tmp_path):
    import json

    from bench.bench_uvit import main

    main(["--real", "false", "--repeats", "1", "--steps", "2", "--output", str(tmp_path / "speed.json")])
    toy = json.loads((tmp_path / "speed.json").read_text())["toy"]
    for name in ("uvit", "widened_unet"):
        assert toy[name]["params_M"] > 0 and toy[name]["forward"]["best_s"] > 0 and toy[name]["pair"]["best_s"] > 0
    assert toy["uvit_tokens"] == 3 + 32 + 1 + 2 * 64  # 16 x 16 latents in 2 x 2 patches, image and label
