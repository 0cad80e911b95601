"""inference.generate on bad input: one line naming the file, a non-zero exit, nothing written.

Each case breaks one thing in a copy of a good pipeline folder or toy dataset, as a user's copy
might arrive, and runs the real entry point in this process.
"""
import shutil
from pathlib import Path

import pytest

from inference.generate import main
from tests.test_pipeline import make_tiny_pipeline


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    from dataset.toy_shapes import write_toy_dataset

    root = tmp_path_factory.mktemp("bad_input")
    make_tiny_pipeline().save_pretrained(root / "pipe", safe_serialization=True)
    write_toy_dataset(root / "toy", size=32, num_train=3, num_val=1, seed=0, progress=False)
    return root


@pytest.fixture
def world(good, tmp_path):
    """A private copy of the good pipeline and dataset, to break."""
    shutil.copytree(good / "pipe", tmp_path / "pipe")
    shutil.copytree(good / "toy", tmp_path / "toy")
    return tmp_path


def run_fails(world: Path, capsys, *extra: str) -> str:
    """Run generation expecting one error line; returns it."""
    out = world / "out"
    argv = ["--pipeline", str(world / "pipe"), "--dataset", "toy", "--data_root", str(world / "toy"),
            "--num_pairs", "2", "--batch_size", "2", "--num_inference_steps", "1", "--output_dir", str(out),
            *extra]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code not in (0, None)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert not out.exists(), "nothing may be written before the inputs are checked"
    return lines[0]


def test_empty_prompt_file(world, capsys):
    prompts = world / "prompts.txt"
    prompts.write_text("\n   \n")
    line = run_fails(world, capsys, "--prompt_source", "file", "--prompt_file", str(prompts))
    assert str(prompts) in line and "no prompts" in line


def test_prompt_file_that_is_not_text(world, capsys):
    prompts = world / "prompts.txt"
    prompts.write_bytes(b"\xff\xfe\x00a circle\x80\n")
    line = run_fails(world, capsys, "--prompt_source", "file", "--prompt_file", str(prompts))
    assert str(prompts) in line


def test_missing_pipeline_folder(world, capsys):
    shutil.rmtree(world / "pipe")
    line = run_fails(world, capsys)
    assert str(world / "pipe") in line and "not found" in line


def test_folder_without_model_index(world, capsys):
    (world / "pipe" / "model_index.json").unlink()
    line = run_fails(world, capsys)
    assert str(world / "pipe") in line and "model_index.json" in line


@pytest.mark.parametrize("part", ["unet", "tokenizer", "label_vae"])
def test_missing_component_folder(world, capsys, part):
    shutil.rmtree(world / "pipe" / part)
    line = run_fails(world, capsys)
    assert str(world / "pipe" / part) in line and "missing" in line


def test_component_without_weights(world, capsys):
    (world / "pipe" / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    line = run_fails(world, capsys)
    assert str(world / "pipe" / "vae") in line and "weights" in line


def test_truncated_weights_file(world, capsys):
    weights = world / "pipe" / "unet" / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])  # an interrupted copy
    line = run_fails(world, capsys)
    assert str(weights) in line and "truncated" in line


def test_broken_component_config(world, capsys):
    config = world / "pipe" / "text_encoder" / "config.json"
    config.write_text(config.read_text()[:40])
    line = run_fails(world, capsys)
    assert str(config) in line


def test_label_vae_trained_for_another_dataset(world, capsys):
    # the toy pipeline's label VAE decodes the toy world's 6 labels; VOC has 21
    line = run_fails(world, capsys, "--dataset", "voc", "--data_root", str(world / "nowhere"),
                     "--prompt_source", "class_names")
    assert str(world / "pipe" / "label_vae") in line and "6" in line and "21" in line


def test_broken_caption_file(world, capsys):
    captions = world / "toy" / "captions" / "train.json"
    captions.write_text('{"000000": "a red circle", "000001": ')
    line = run_fails(world, capsys, "--prompt_source", "captions")
    assert str(captions) in line


def test_missing_data_root_for_captions(world, capsys):
    shutil.rmtree(world / "toy")
    line = run_fails(world, capsys, "--prompt_source", "captions")
    assert str(world / "toy") in line and "not found" in line


def test_unknown_config_key(world, capsys):
    profile = world / "generate.yaml"
    profile.write_text("guidance: 3.0\nnum_inference_steps: 1\n")
    line = run_fails(world, capsys, "--config", str(profile))
    assert str(profile) in line and "guidance" in line


def test_unknown_option(world, capsys):
    line = run_fails(world, capsys, "--guidance", "3")
    assert "--guidance" in line
