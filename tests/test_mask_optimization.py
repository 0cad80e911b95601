"""Mask optimization: exactly the small blobs change, to their ring's majority; the entry point."""
import json

import numpy as np
import pytest
from PIL import Image

from utils.mask_optimization import optimize_mask, scaled_threshold


def test_small_blobs_take_the_ring_majority_and_large_ones_stay():
    m = np.zeros((20, 20), np.uint8)
    m[:, 10:] = 2                   # big region of class 2 (200 px)
    m[3:5, 3:5] = 1                 # 4 px blob of 1 inside background -> 0
    m[12:15, 13:16] = 3             # 9 px blob of 3 inside class 2 -> 2
    m[12:18, 2:8] = 4               # 36 px blob of 4: above the threshold, kept
    m[8, 9:11] = 5                  # 2 px blob on the 0/2 border (a tie, see below)
    out, stats = optimize_mask(m, area_threshold=10)
    expect = m.copy()
    expect[3:5, 3:5] = 0
    expect[12:15, 13:16] = 2
    # ring of the border blob (rows 7-9, cols 8-11 minus itself): five 0s, five 2s: a tie -> smaller label
    expect[8, 9:11] = 0
    np.testing.assert_array_equal(out, expect)
    assert stats["changed_components"] == 3 and stats["changed_pixels"] == 4 + 9 + 2
    assert stats["small_components"] == 3
    assert out is not m and m[3, 3] == 1  # input untouched


def test_four_connectivity_diagonal_pixels_are_separate_components():
    m = np.zeros((9, 9), np.uint8)
    m[2, 2] = m[3, 3] = m[4, 4] = 1  # a diagonal line: three 1-px components under 4-connectivity
    out, stats = optimize_mask(m, area_threshold=2)
    assert stats["small_components"] == 3
    # each pixel's ring holds 2 diagonal neighbours of class 1 at most and 6+ background: -> 0
    assert (out == 0).all()


def test_ring_majority_of_own_class_keeps_the_component():
    m = np.zeros((7, 7), np.uint8)
    # a 1-px blob of 1 whose four diagonal neighbours are 1 too (separate 4-components)
    m[3, 3] = 1
    for dy, dx in ((-1, -1), (-1, 1), (1, -1), (1, 1)):
        m[3 + dy, 3 + dx] = 1
    m[2, 3] = m[4, 3] = 255
    m[3, 2] = m[3, 4] = 255  # ignore does not vote: the ring is 4 x "1", 4 x ignore
    out, stats = optimize_mask(m, area_threshold=2)
    assert out[3, 3] == 1
    assert (out[m == 255] == 255).all()  # ignore regions are never relabelled


def test_ring_all_ignore_keeps_the_component_and_threshold_is_strict():
    m = np.full((6, 6), 255, np.uint8)
    m[2:4, 2:4] = 3
    out, stats = optimize_mask(m, area_threshold=100)
    np.testing.assert_array_equal(out, m)
    assert stats["small_components"] == 1 and stats["changed_components"] == 0
    m2 = np.zeros((6, 6), np.uint8)
    m2[2:4, 2:4] = 3  # exactly 4 px: "smaller than 4" is false
    assert optimize_mask(m2, area_threshold=4)[1]["changed_pixels"] == 0
    assert optimize_mask(m2, area_threshold=5)[1]["changed_pixels"] == 4


def test_threshold_scales_with_area():
    assert scaled_threshold(100, 512, 512) == 100
    assert scaled_threshold(100, 256, 256) == 25
    assert scaled_threshold(20, 32, 32, reference_size=512) == pytest.approx(20 / 256)


def _fake_generated(root, n=5, size=16):
    from dataset import get_dataset_info
    from dataset.synthetic import SyntheticWriter

    rng = np.random.default_rng(0)
    w = SyntheticWriter(root, "toy")
    for i in range(n):
        mask = np.zeros((size, size), np.uint8)
        mask[:, size // 2:] = 2
        ys, xs = rng.integers(0, size, 6), rng.integers(0, size, 6)
        mask[ys, xs] = rng.integers(1, 6, 6)  # speckle: 1-px blobs
        mask[0:2, 0:2] = 255
        w.write_pair(i, rng.integers(0, 255, (size, size, 3), dtype=np.uint8), mask, {"prompt": f"p{i}"})
    w.finalize(get_dataset_info("toy"), "test", {})
    return w


def test_entry_point_writes_siblings_never_edits_input(tmp_path):
    from inference.optimize_masks import main

    src = tmp_path / "gen"
    _fake_generated(src)
    before = {p: p.read_bytes() for p in src.rglob("*") if p.is_file()}
    argv = ["--input", str(src), "--thresholds", "2", "50", "--reference_size", "16", "--num_workers", "1"]
    main(argv)
    assert {p: p.read_bytes() for p in src.rglob("*") if p.is_file()} == before
    for thr in (2, 50):
        out = tmp_path / f"gen_optim{thr}"
        report = json.loads((out / "mask_optimization.json").read_text())
        assert report["num_masks"] == 5 and report["threshold"] == thr
        for i in range(5):
            name = f"{i:06d}.png"
            mask = np.asarray(Image.open(src / "ann_dir/train" / name))
            new = np.asarray(Image.open(out / "ann_dir/train" / name))
            np.testing.assert_array_equal(new, optimize_mask(mask, thr)[0])
            assert (out / "img_dir/train" / name).read_bytes() == (src / "img_dir/train" / name).read_bytes()
        assert (out / "manifest.jsonl").read_bytes() == (src / "manifest.jsonl").read_bytes()
        assert json.loads((out / "captions/train.json").read_text())["000000"] == "p0"
        meta = json.loads((out / "dataset.json").read_text())
        assert meta["mask_optimization"]["threshold"] == thr
    r2 = json.loads((tmp_path / "gen_optim2/mask_optimization.json").read_text())
    r50 = json.loads((tmp_path / "gen_optim50/mask_optimization.json").read_text())
    assert 0 < r2["changed_pixels"] <= r50["changed_pixels"]
    # rerun: everything is done, nothing changes
    snap = {p: p.read_bytes() for p in (tmp_path / "gen_optim50").rglob("*") if p.is_file()}
    main(argv)
    assert {p: p.read_bytes() for p in (tmp_path / "gen_optim50").rglob("*") if p.is_file()} == snap


def test_entry_point_resumes_and_uses_processes(tmp_path):
    from inference.optimize_masks import main

    src = tmp_path / "gen"
    _fake_generated(src)
    main(["--input", str(src), "--thresholds", "50", "--reference_size", "16", "--num_workers", "1",
          "--output_root", str(tmp_path / "ref")])
    out = tmp_path / "res"
    main(["--input", str(src), "--thresholds", "50", "--reference_size", "16", "--num_workers", "2",
          "--output_root", str(out), "--stop_after", "2"])
    assert not (out / "gen_optim50/mask_optimization.json").exists()
    (out / "gen_optim50/ann_dir/train/.000003.png.tmp1.tmp.png").write_bytes(b"half")
    main(["--input", str(src), "--thresholds", "50", "--reference_size", "16", "--num_workers", "2",
          "--output_root", str(out)])
    ref_files = {p.relative_to(tmp_path / "ref"): p.read_bytes() for p in (tmp_path / "ref").rglob("*")
                 if p.is_file() and p.name not in ("config.yaml", "log.txt")}
    got = {p.relative_to(out): p.read_bytes() for p in out.rglob("*")
           if p.is_file() and p.name not in ("config.yaml", "log.txt")}
    assert got == ref_files


def test_missing_input_is_a_clear_error(tmp_path):
    from inference.optimize_masks import main

    with pytest.raises(SystemExit):
        main(["--input", str(tmp_path / "nothing"), "--thresholds", "20"])
