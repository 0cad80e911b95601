"""DiffuMask entry points on bad input: one line naming the file, a non-zero exit, no traceback."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from inference.diffumask import main as diffumask_main
from inference.diffumask_mosaic import main as mosaic_main
from models.tiny_kit import build_tiny_sd
from tests.test_diffumask_noise_stream import _square_set, _truncate


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return build_tiny_sd(tmp_path_factory.mktemp("kit") / "base", ["a", "red", "circle", "square"])


def _error(capsys, fn, argv) -> str:
    with pytest.raises(SystemExit) as e:
        fn(argv)
    err = capsys.readouterr().err
    assert e.value.code != 0 and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ")
    return last


def _args(base, out, *extra):
    return ["--config", "configs/diffumask/toy.yaml", "--base_model", str(base), "--output_dir", str(out),
            "--classes", "circle", "--images_per_class", "1", "--num_inference_steps", "1", *extra]


def _broken_copy(base, tmp_path, damage):
    copy = tmp_path / "broken"
    shutil.copytree(base, copy)
    damage(copy)
    return copy


@pytest.mark.parametrize("damage, expect", [
    (lambda b: (b / "model_index.json").unlink(), "model_index.json: missing"),
    (lambda b: shutil.rmtree(b / "unet"), "unet: component folder 'unet'"),
    (lambda b: _truncate(b / "unet/diffusion_pytorch_model.safetensors"),
     "unet/diffusion_pytorch_model.safetensors: truncated"),
    (lambda b: shutil.rmtree(b), "pipeline folder not found"),
])
def test_broken_base_model_folder_stops_before_any_work(base, tmp_path, capsys, damage, expect):
    broken = _broken_copy(base, tmp_path, damage)
    line = _error(capsys, diffumask_main, _args(broken, tmp_path / "out"))
    assert expect in line and str(broken) in line
    assert not (tmp_path / "out").exists()


def test_base_model_that_cannot_be_loaded_is_one_line(tmp_path, capsys):
    line = _error(capsys, diffumask_main, _args("nobody/no-such-model", tmp_path / "out"))
    assert line.startswith("error: nobody/no-such-model: cannot load the base model")


@pytest.mark.parametrize("content, extra, expect", [
    ("", (), "sub-class file is empty"),
    ("{}", (), "sub-class file is empty"),
    ('{"circle": []}', (), "class 'circle' has an empty sub-class list"),
    ('{"circle": ["red"', (), "not valid JSON"),
    ('{"hexagon": ["red"]}', (), "unknown class name(s) ['hexagon']"),
    ('{"circle": ["red"]}', ("--classes", "hexagon"), "unknown class(es) ['hexagon']"),
    ('{"circle": ["red"]}', ("--prompt_template", "a {colour} {word}"), "prompt template 'a {colour} {word}'"),
])
def test_bad_prompts_stop_before_any_work(base, tmp_path, capsys, content, extra, expect):
    subclasses = tmp_path / "subclasses.json"
    subclasses.write_text(content)
    line = _error(capsys, diffumask_main, _args(base, tmp_path / "out", "--subclass_file", str(subclasses), *extra))
    assert expect in line
    assert not (tmp_path / "out").exists()


def test_mosaic_checks_headers_first_and_replaces_a_corrupt_source(tmp_path, capsys):
    folder = _square_set(tmp_path / "set", 12, 24)
    args = ["--data_dir", str(folder), "--num_mosaics", "6", "--layouts", "2x2"]
    (folder / "ann_dir/train/000004.png").unlink()
    line = _error(capsys, mosaic_main, args + ["--output_dir", str(tmp_path / "m0")])
    assert "ann_dir/train/000004.png: mask file not found" in line and not (tmp_path / "m0").exists()

    _square_set(folder, 12, 24)
    _truncate(folder / "img_dir/train/000004.png")
    meta = mosaic_main(args + ["--output_dir", str(tmp_path / "m1")])
    rows = [json.loads(x) for x in (tmp_path / "m1/manifest.jsonl").read_text().splitlines()]
    assert meta["num_pairs"] == 6 and not any("000004" in r["sources"] for r in rows)
    log = (tmp_path / "m1/log.txt").read_text()
    assert "000004.png" in log and "1 bad source files skipped" in log

    noise = np.random.default_rng(0).integers(0, 256, (24, 24, 3), dtype=np.uint8)  # a long file:
    Image.fromarray(noise).save(folder / "img_dir/train/000007.png")  # its header survives the cut
    _truncate(folder / "img_dir/train/000007.png")  # a second corrupt source: more than 1% of 12
    line = _error(capsys, mosaic_main, args + ["--output_dir", str(tmp_path / "m2")])
    assert "2 of 12 source pairs bad" in line
