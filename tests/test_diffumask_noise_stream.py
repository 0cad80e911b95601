"""DiffuMask noise filter: streamed from disk, same scores as the in-memory filter, bad files."""
from __future__ import annotations

import json
import math
import tracemalloc

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dataset import get_dataset_info
from dataset.synthetic import SyntheticWriter
from inference.diffumask_noise_filter import main as noise_main
from models.diffumask.data import read_synthetic
from models.diffumask.masks import foreground_iou
from models.diffumask.noise import (PairFiles, ResizedPairs, SmallSegNet, fold_of, kfold_agreement,
                                    make_small_segmenter)


def _square_set(folder, n, size, seed=0, planted=()):
    """n pairs of a bright square on a flat background; ``planted`` pairs get a shifted mask."""
    rng = np.random.default_rng(seed)
    writer = SyntheticWriter(folder, "toy")
    side = size * 10 // 24
    for i in range(n):
        image = np.empty((size, size, 3), np.uint8)
        image[:] = rng.integers(0, 90, 3)
        y, x = rng.integers(2, size - side - 2, 2)
        image[y:y + side, x:x + side] = rng.integers(170, 256, 3)
        mask = np.zeros((size, size), np.uint8)
        mask[y:y + side, x:x + side] = 1
        if i in planted:
            mask = np.roll(mask, (size // 2, size // 2), axis=(0, 1))
        writer.write_pair(i, image, mask, {"prompt": "a square"})
    writer.finalize(get_dataset_info("toy"), "test", {})
    return folder


# --- the filter as it was before streaming: every image in memory (the reference) -------------
def _to_tensor_in_memory(images, size):
    x = torch.from_numpy(np.stack([np.array(im, dtype=np.uint8) for im in images])).permute(0, 3, 1, 2).float()
    x = x / 127.5 - 1.0
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x


def _in_memory_kfold(images, masks, num_labels, epochs, batch_size, lr, train_size, width, folds, seed):
    fold = fold_of(len(images), folds, seed)
    scores = np.zeros(len(images))
    for k in range(folds):
        train, held = np.flatnonzero(fold != k), np.flatnonzero(fold == k)
        torch.manual_seed(seed + k)
        g = torch.Generator().manual_seed(seed + k)
        size = min(train_size, images[0].shape[0])
        x = _to_tensor_in_memory([images[i] for i in train], size)
        y = torch.from_numpy(np.stack([masks[i] for i in train]).astype(np.int64))[:, None].float()
        y = F.interpolate(y, size=(size, size), mode="nearest")[:, 0].long()
        net = SmallSegNet(num_labels, width)
        opt = torch.optim.Adam(net.parameters(), lr=lr)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * math.ceil(len(x) / batch_size))
        for _ in range(epochs):
            order = torch.randperm(len(x), generator=g)
            for s in range(0, len(order), batch_size):
                idx = order[s:s + batch_size]
                if len(idx) < 2:
                    continue
                flip = torch.rand(1, generator=g).item() < 0.5
                xb, yb = (x[idx].flip(-1), y[idx].flip(-1)) if flip else (x[idx], y[idx])
                loss = F.cross_entropy(net(xb), yb, ignore_index=255)
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
        net.eval()
        with torch.no_grad():
            for s in range(0, len(held), 64):
                chunk = held[s:s + 64]
                h, w = images[chunk[0]].shape[:2]
                logits = net(_to_tensor_in_memory([images[i] for i in chunk], size))
                preds = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False).argmax(1)
                for i, p in zip(chunk, preds.numpy().astype(np.uint8)):
                    scores[i] = foreground_iou(masks[i], p)
    return scores, fold


def _load_all(folder):
    _, rows = read_synthetic(folder)
    images = [np.array(Image.open(folder / r["image"]).convert("RGB")) for r in rows]
    return rows, images, [np.array(Image.open(folder / r["mask"])) for r in rows]


def _streamed(folder, rows, size, cache, **fit_kw):
    source = ResizedPairs.build(PairFiles(folder, rows, size, num_labels=6), cache, batch_size=7)
    try:
        return kfold_agreement(source, 6, make_small_segmenter(train_size=size, **fit_kw), folds=3, seed=2)
    finally:
        source.remove_files()


def test_streamed_scores_equal_the_in_memory_filter(tmp_path):
    folder = _square_set(tmp_path / "set", 21, 40, planted={4, 9})
    rows, images, masks = _load_all(folder)
    kw = dict(epochs=6, batch_size=6, lr=3e-3, width=8)
    ref_scores, ref_fold = _in_memory_kfold(images, masks, 6, train_size=24, folds=3, seed=2, **kw)
    scores, fold = _streamed(folder, rows, 24, tmp_path / "cache", **kw)
    assert ref_scores.std() > 0.05  # the segmenter learned something: scores tell pairs apart
    np.testing.assert_array_equal(fold, ref_fold)
    np.testing.assert_array_equal(scores, ref_scores)  # bit for bit, not approximately
    assert not list((tmp_path / "cache").iterdir())  # the cache files are gone


def _peak_bytes(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_is_bounded_by_a_batch_not_the_set(tmp_path):
    small = _square_set(tmp_path / "small", 8, 96)
    large = _square_set(tmp_path / "large", 40, 96, seed=1)
    kw = dict(epochs=1, batch_size=16, width=4)

    def streamed(folder):
        _, rows = read_synthetic(folder)
        return lambda: _streamed(folder, rows, 8, tmp_path / "cache", **kw)

    def in_memory(folder):
        def run():
            _, images, masks = _load_all(folder)
            _in_memory_kfold(images, masks, 6, lr=3e-3, train_size=8, folds=3, seed=2, **kw)
        return run

    whole_set = 40 * 96 * 96 * 3  # the large set's images as uint8
    streamed(small)()  # first calls allocate for good (lazy imports, caches): not part of the run
    ref_small, ref_large = _peak_bytes(in_memory(small)), _peak_bytes(in_memory(large))
    assert ref_large > ref_small + whole_set // 2  # what the measurement sees when the set is held
    peak_small, peak_large = _peak_bytes(streamed(small)), _peak_bytes(streamed(large))
    assert peak_large < peak_small + whole_set // 8, (peak_small, peak_large)


def test_noise_filter_stops_on_missing_or_unreadable_files(tmp_path, capsys):
    folder = _square_set(tmp_path / "set", 9, 24)
    for damage, expect in [
        (lambda: None, "data folder not found"),
        (lambda: (folder / "ann_dir/train/000003.png").unlink(), "ann_dir/train/000003.png: mask file not found"),
        (lambda: (folder / "img_dir/train/000005.png").write_bytes(b"not a png"), "000005.png: cannot read image"),
        (lambda: Image.new("L", (20, 24)).save(folder / "ann_dir/train/000006.png"), "000006.png: mask is 20x24"),
    ]:
        damage()
        data = tmp_path / "nowhere" if expect == "data folder not found" else folder
        with pytest.raises(SystemExit) as e:
            noise_main(["--data_dir", str(data), "--epochs", "1", "--num_workers", "0"])
        err = capsys.readouterr().err.strip()
        assert e.value.code != 0 and len(err.splitlines()) == 1 and err.startswith("error: ")
        assert expect in err, err
        assert not (folder / "noise_filter").exists()  # stopped before any work
        _square_set(folder, 9, 24)  # repair for the next case


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_corrupt_files_are_skipped_counted_and_bounded(tmp_path, capsys):
    folder = _square_set(tmp_path / "set", 30, 24)
    _truncate(folder / "img_dir/train/000007.png")  # the header reads; decoding fails
    args = ["--data_dir", str(folder), "--epochs", "1", "--width", "4", "--num_workers", "0", "--keep_fraction", "0.5"]
    summary = noise_main(args)
    rows = [json.loads(line) for line in (folder / "scores.jsonl").read_text().splitlines()]
    assert summary["bad_files"] == 1 and summary["kept"] == 15  # half of the 29 good pairs
    assert rows[7]["score"] is None and not rows[7]["kept"] and "000007.png" in rows[7]["skipped"]
    assert all(r["score"] is not None and r["skipped"] == "" for k, r in enumerate(rows) if k != 7)
    assert "000007" not in (folder / "kept.txt").read_text().split()
    assert "skipped" in (folder / "noise_filter/log.txt").read_text()

    bad = np.zeros((24, 24), np.uint8)
    bad[3, 3] = 9  # a label the toy classes (0..5) do not have
    Image.fromarray(bad).save(folder / "ann_dir/train/000011.png")  # second bad file: over 1% of 30
    with pytest.raises(SystemExit):
        noise_main(args)
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # the lines before it are the run's log
    assert "Traceback" not in err and last.startswith("error: ")
    assert "2 of 30 pairs bad" in last and "max_bad_fraction" in last and "000007.png" in last
    assert noise_main(args + ["--max_bad_fraction", "0.1"])["bad_files"] == 2
    assert not list((folder / "noise_filter").glob(".resized.*"))  # no cache left behind
