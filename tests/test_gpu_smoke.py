"""bench/gpu_smoke.py: what can be checked without a GPU (the real sizes, the refusal, the tiny chain)."""
import json

import pytest
import torch

from bench import gpu_smoke
from tests.test_joint_unet import SD15_UNET_CONFIG


def test_real_size_components_are_sd15_sizes():
    from accelerate import init_empty_weights

    from dataset.toy_semantic import INFO

    with init_empty_weights():
        comps, label_vae = gpu_smoke.build_components(gpu_smoke.toy_words(INFO), False, INFO.num_labels, 0)
    unet, vae, text = comps["unet"], comps["vae"], comps["text_encoder"]
    assert gpu_smoke.count(unet) == 859_520_964  # SD 1.5's UNet
    for k, v in SD15_UNET_CONFIG.items():
        got = unet.config[k]
        assert (list(got) if isinstance(got, (list, tuple)) else got) == v, k
    assert list(vae.config.block_out_channels) == [128, 256, 512, 512] and vae.config.scaling_factor == 0.18215
    tc = text.config
    assert (tc.hidden_size, tc.num_hidden_layers, tc.max_position_embeddings) == (768, 12, 77)
    assert label_vae.downsample_factor == 8 and label_vae.config.latent_channels == vae.config.latent_channels
    sched = comps["scheduler"].config
    assert (sched.beta_schedule, sched.beta_start, sched.beta_end) == ("scaled_linear", 0.00085, 0.012)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_without_cuda_it_stops_with_a_message(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        gpu_smoke.main(["--out", str(tmp_path / "out")])
    assert e.value.code != 0
    assert "CUDA" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.slow
def test_tiny_chain_passes_on_cpu(tmp_path):
    out = tmp_path / "smoke"
    gpu_smoke.main(["--tiny", "--device", "cpu", "--out", str(out)])
    r = json.loads((out / "gpu_smoke.json").read_text())
    assert r["passed"] and not r["failures"]
    assert r["generation"]["pairs"] > 0
