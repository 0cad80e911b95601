"""The toy "shapes" generator and ``python -m utils.make_toy_dataset``: determinism, captions
that agree with masks, the written layout, and resuming."""
from __future__ import annotations

import json
from itertools import combinations

import numpy as np
import pytest

import dataset.toy_shapes as toy_shapes
from dataset import get_dataset_info
from dataset.segmentation import SegmentationDataset, read_mask
from dataset.toy_semantic import CLASSES
from dataset.toy_shapes import BACKGROUNDS, caption_labels, render_toy_sample, toy_sample_seed
from utils.make_toy_dataset import main


def test_same_seed_same_bytes_and_different_seeds_differ():
    for seed in (0, 7, 123456789, toy_sample_seed(3, "val", 11)):
        a, b = render_toy_sample(seed, 32), render_toy_sample(seed, 32)
        assert a[0].tobytes() == b[0].tobytes() and a[1].tobytes() == b[1].tobytes()
        assert a[2:] == b[2:]
    images = [render_toy_sample(s, 32)[0].tobytes() for s in range(30)]
    assert all(x != y for x, y in combinations(images, 2))


@pytest.mark.parametrize("size,max_shapes,count", [(32, 2, 300), (64, 3, 60)])
def test_masks_agree_with_captions(size, max_shapes, count):
    backgrounds, classes_seen, shape_counts = set(), set(), set()
    for seed in range(count):
        image, mask, caption, labels = render_toy_sample(seed, size, max_shapes)
        assert image.shape == (size, size, 3) and image.dtype == np.uint8
        assert mask.shape == (size, size) and mask.dtype == np.uint8
        present = set(np.unique(mask).tolist())
        assert present <= set(range(len(CLASSES)))
        assert caption_labels(caption) == present - {0} == set(labels), (seed, caption)
        n = caption.count(" and ") + caption.count(", ") + 1
        assert n == len(labels) and 1 <= n <= max_shapes
        # every named shape is clearly visible: whole shapes at 32 px are ~10-20 px across
        for label in present - {0}:
            assert (mask == label).sum() >= 0.02 * size * size, (seed, caption)
        backgrounds.update(b for b in BACKGROUNDS if f" {b} background" in caption)
        classes_seen.update(labels)
        shape_counts.add(len(labels))
    assert backgrounds == set(BACKGROUNDS)
    assert classes_seen == set(range(1, len(CLASSES)))
    assert shape_counts == set(range(1, max_shapes + 1))


def test_shapes_fit_the_benchmark_size():
    spans = []
    for seed in range(100):
        _, mask, _, labels = render_toy_sample(seed, 32, max_shapes=1)
        ys, xs = np.nonzero(mask)
        spans.append(max(ys.max() - ys.min(), xs.max() - xs.min()) + 1)
    assert 8 <= min(spans) and max(spans) <= 24 and 10 <= np.median(spans) <= 20


def test_caption_labels_reads_class_words():
    assert caption_labels("a red circle and an orange star on a striped background") == {1, 5}
    assert caption_labels("two rings on a checkered background") == {4}
    assert caption_labels("a string of stars") == {5}  # 'string' is not 'ring'
    ade = get_dataset_info("ade20k")
    table, coffee_table = ade.classes.index("table"), ade.classes.index("coffee table")
    assert caption_labels("a coffee table", ade) == {coffee_table}
    assert caption_labels("a coffee table beside two tables", ade) == {coffee_table, table}
    voc = get_dataset_info("voc")
    assert caption_labels("a photo of cat, sofa", voc) == {voc.classes.index("cat"), voc.classes.index("sofa")}


def test_train_and_val_seeds_are_disjoint():
    train = {toy_sample_seed(0, "train", i) for i in range(5000)}
    val = {toy_sample_seed(0, "val", i) for i in range(5000)}
    other = {toy_sample_seed(1, "train", i) for i in range(5000)}
    assert len(train) == len(val) == 5000 and not train & val and not train & other


def _files(root):
    return {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*")) if p.is_file()}


ARGS = ["--size", "32", "--num_train", "12", "--num_val", "5", "--seed", "4", "--progress", "false"]


def test_make_toy_dataset_end_to_end(tmp_path, capsys):
    out = tmp_path / "toy"
    main(["--out", str(out), *ARGS])
    printed = capsys.readouterr().out
    assert "train: 12 pairs written" in printed and str(out) in printed
    files = _files(out)
    assert sum(k.startswith("img_dir/train/") for k in files) == 12
    assert sum(k.startswith("ann_dir/val/") for k in files) == 5
    assert {"toy.json", "preview.png", "captions/train.json", "captions/val.json"} <= set(files)
    assert not [k for k in files if ".tmp" in k]

    info = get_dataset_info("toy", data_root=str(out))
    for split, n in (("train", 12), ("val", 5)):
        ds = SegmentationDataset(info, split, captions="file")
        assert len(ds) == n
        for i in range(n):
            item = ds[i]
            assert item["image"].shape == (3, 32, 32)
            assert caption_labels(item["caption"]) == set(item["mask"].unique().tolist()) - {0}
    # the files are the samples of their seeds; no val image repeats a train image
    train_caps = json.loads((out / "captions/train.json").read_text())
    image, mask, caption, _ = render_toy_sample(toy_sample_seed(4, "train", 3), 32, 2)
    assert train_caps["000003"] == caption
    np.testing.assert_array_equal(read_mask(out / "ann_dir/train/000003.png", info), mask)
    train_imgs = {files[k].read_bytes() for k in files if k.startswith("img_dir/train/")}
    assert not train_imgs & {files[k].read_bytes() for k in files if k.startswith("img_dir/val/")}


def test_rerun_is_a_no_op(tmp_path, capsys):
    out = tmp_path / "toy"
    main(["--out", str(out), *ARGS])
    before = {k: p.stat().st_mtime_ns for k, p in _files(out).items()}
    main(["--out", str(out), *ARGS])
    assert "0 pairs written, 12 already there" in capsys.readouterr().out
    assert {k: p.stat().st_mtime_ns for k, p in _files(out).items()} == before


def test_interrupted_run_resumes_to_the_same_bytes(tmp_path, monkeypatch):
    full = tmp_path / "full"
    main(["--out", str(full), *ARGS])

    calls = {"n": 0}
    real = toy_shapes.render_toy_sample

    def dies_midway(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 7:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    part = tmp_path / "part"
    monkeypatch.setattr(toy_shapes, "render_toy_sample", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        main(["--out", str(part), *ARGS])
    monkeypatch.setattr(toy_shapes, "render_toy_sample", real)
    assert not (part / "captions/train.json").exists()  # written last, so absent after a crash
    assert len(list((part / "img_dir/train").iterdir())) == 7

    main(["--out", str(part), *ARGS])
    a, b = _files(full), _files(part)
    assert set(a) == set(b)
    assert all(a[k].read_bytes() == b[k].read_bytes() for k in a)


def test_rerun_with_other_settings_is_refused(tmp_path, capsys):
    out = tmp_path / "toy"
    main(["--out", str(out), *ARGS])
    with pytest.raises(SystemExit) as e:
        main(["--out", str(out), *ARGS, "--size", "48"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "toy.json" in err and "size=32 (now 48)" in err


def test_bad_arguments_exit_cleanly(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--out", str(tmp_path / "x"), "--size", "4"])
    assert e.value.code == 2 and "--size 4" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
