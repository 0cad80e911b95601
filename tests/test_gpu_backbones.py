"""bench/gpu_backbones.py (issue #19, GPU figures): what can be checked without a GPU."""
import copy
import json

import pytest
import torch

from bench import gpu_backbones
from train.joint_diffusion import JointDiffusionConfig
from utils.config import parse_config

TINY = ["--tiny", "true", "--device", "cpu", "--timed_steps", "1", "--gen_steps", "2", "--gen_repeats", "1"]


@pytest.fixture(scope="module")
def tiny_result(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_backbones") / "figures.json"
    returned = gpu_backbones.main(TINY + ["--output", str(out)])
    return returned, json.loads(out.read_text())


def test_tiny_run_measures_a_step_and_a_pair_per_backbone(tiny_result):
    returned, saved = tiny_result
    assert saved == json.loads(json.dumps(returned))  # what it returns is what it saved
    assert saved["passed"] and saved["failures"] == []
    assert set(saved["backbones"]) == {"widened_unet", "uvit"}
    for name, entry in saved["backbones"].items():
        step, pair = entry["training_step"], entry["pair"]
        assert len(step["losses"]) == 2 + 1 and step["losses_finite"] and step["weights_moved"], name
        assert step["sec_per_step"] > 0 and step["peak_memory_gib"] is None  # no CUDA memory on the CPU
        assert pair["image_shape"] == [32, 32, 3] and pair["mask_shape"] == [32, 32], name
        assert pair["steps"] == 2 and pair["sec_per_pair"] > 0
    assert saved["uvit_over_unet"]["sec_per_step"] > 0 and saved["uvit_over_unet"]["sec_per_pair"] > 0


def test_each_backbone_trains_under_its_own_recipe(tiny_result):
    _, saved = tiny_result
    for name, recipe_path in (("widened_unet", "configs/joint_diffusion/voc.yaml"),
                              ("uvit", "configs/joint_diffusion/voc_uvit.yaml")):
        recipe = parse_config(JointDiffusionConfig, ["--config", recipe_path])
        step = saved["backbones"][name]["training_step"]
        assert step["batch"] == recipe.train_batch_size
        assert step["caption_dropout"] == recipe.caption_dropout
        assert step["gradient_checkpointing"] == recipe.gradient_checkpointing
        assert step["optimizer_asked"] == ("AdamW8bit" if recipe.use_8bit_adam else "AdamW")
        assert step["optimizer"] == "AdamW" and step["mixed_precision"] == "no"  # 8-bit AdamW and fp16: CUDA only
    assert saved["backbones"]["uvit"]["training_step"]["caption_dropout"] == 0.0  # the authors' objective


def test_real_size_uvit_is_the_papers():
    from accelerate import init_empty_weights

    with init_empty_weights():
        uvit = gpu_backbones.build_denoiser("uvit", {}, tiny=False, seed=0)
    assert uvit.config.sample_size == 64 and uvit.config.num_text_tokens == 77
    assert 940e6 < gpu_backbones.count(uvit) < 970e6  # METHOD.md §8: ~0.95B


def test_failed_checks_name_the_backbone(tiny_result):
    _, saved = tiny_result
    assert gpu_backbones.check(saved, 32) == []
    bad = copy.deepcopy(saved)
    bad["backbones"]["uvit"]["training_step"]["losses_finite"] = False
    bad["backbones"]["widened_unet"]["pair"]["image_varies"] = False
    failures = gpu_backbones.check(bad, 32)
    assert len(failures) == 2
    assert failures[0].startswith("widened_unet: the generated image is constant")
    assert failures[1].startswith("uvit: a training loss is not finite")
    assert any("not 64 px" in f for f in gpu_backbones.check(saved, 64))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_without_cuda_it_stops_with_a_message(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        gpu_backbones.main(["--output", str(tmp_path / "x.json")])
    assert e.value.code != 0 and "CUDA" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_cpu_runs_only_tiny(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        gpu_backbones.main(["--device", "cpu", "--output", str(tmp_path / "x.json")])
    assert e.value.code != 0 and "--tiny true" in capsys.readouterr().err
