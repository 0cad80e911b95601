"""Mask optimization: exactly the small blobs change, to their ring's majority; the same output as
the per-component implementation it replaced; the entry point, and what it does with bad files."""
import json

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from utils.mask_optimization import optimize_mask, optimize_mask_thresholds, scaled_threshold


def reference_optimize_mask(mask, area_threshold, ignore_index=255):
    """The implementation before the vectorised one (one component at a time), kept as the reference."""
    four_connected = ndimage.generate_binary_structure(2, 1)
    ring_structure = np.ones((3, 3), dtype=bool)
    mask = np.asarray(mask)
    out = mask.copy()
    stats = {"components": 0, "small_components": 0, "changed_components": 0, "changed_pixels": 0}
    h, w = mask.shape
    for cls in np.unique(mask):
        if cls == ignore_index:
            continue
        labeled, n = ndimage.label(mask == cls, structure=four_connected)
        stats["components"] += n
        if n == 0:
            continue
        sizes = np.bincount(labeled.ravel(), minlength=n + 1)
        for comp_id, box in enumerate(ndimage.find_objects(labeled), start=1):
            if sizes[comp_id] >= area_threshold:
                continue
            stats["small_components"] += 1
            ys = slice(max(box[0].start - 1, 0), min(box[0].stop + 1, h))
            xs = slice(max(box[1].start - 1, 0), min(box[1].stop + 1, w))
            comp = labeled[ys, xs] == comp_id
            ring = ndimage.binary_dilation(comp, structure=ring_structure) & ~comp
            votes = mask[ys, xs][ring]
            votes = votes[votes != ignore_index]
            if votes.size == 0:
                continue
            new = np.bincount(votes.astype(np.int64)).argmax()
            if new == cls:
                continue
            out[ys, xs][comp] = new
            stats["changed_components"] += 1
            stats["changed_pixels"] += int(sizes[comp_id])
    return out, stats


def _varied_masks(seed):
    """Speckle (touching 1-px regions), blocks with noise, ignore regions and rims, thin shapes."""
    rng = np.random.default_rng(seed)
    h, w = (int(x) for x in rng.integers(1, 48, 2))
    kind = seed % 4
    if kind == 0:  # speckle of a few labels and ignore: many touching regions, ties
        m = rng.choice(np.array([0, 1, 2, 7, 255], np.uint8), size=(h, w), p=[0.4, 0.2, 0.2, 0.1, 0.1])
    elif kind == 1:  # blocks with small blobs, some on the borders
        cell = int(rng.integers(2, 9))
        m = np.repeat(np.repeat(rng.integers(0, 5, (h // cell + 1, w // cell + 1)), cell, 0), cell, 1)[:h, :w]
        m = m.astype(np.uint8)
        for _ in range(int(rng.integers(0, 12))):
            y, x = rng.integers(0, h), rng.integers(0, w)
            m[y:y + int(rng.integers(1, 4)), x:x + int(rng.integers(1, 4))] = rng.choice([0, 3, 9, 255])
    elif kind == 2:  # large ignore areas: rings that are mostly or all ignore
        m = np.full((h, w), 255, np.uint8)
        m[rng.random((h, w)) < 0.3] = rng.integers(0, 4)
        m[rng.random((h, w)) < 0.1] = 5
    else:  # diagonal lines and checkerboards: 4- vs 8-connectivity, own-class majorities
        yy, xx = np.mgrid[0:h, 0:w]
        m = np.where((yy + xx) % int(rng.integers(2, 5)) == 0, 1, 0).astype(np.uint8)
        m[(yy // 3 + xx // 3) % 2 == 0] += 2
        m[rng.random((h, w)) < 0.05] = 255
    return m


@pytest.mark.parametrize("seed", range(48))
def test_same_output_as_the_reference_implementation(seed):
    m = _varied_masks(seed)
    thresholds = [1, 2.5, 5, 20, 50, 10 ** 6]  # fractional (scaled) ones, and one above the image area
    results = optimize_mask_thresholds(m, thresholds)
    for t, (out, stats) in zip(thresholds, results):
        ref_out, ref_stats = reference_optimize_mask(m, t)
        np.testing.assert_array_equal(out, ref_out, err_msg=f"threshold {t}, mask {m.shape}")
        assert stats == ref_stats and out.dtype == m.dtype
    assert optimize_mask(m, 5)[1] == results[2][1]


def test_same_output_on_generated_like_masks_and_other_label_types():
    from bench.bench_mask_optimization import generated_like_mask

    rng = np.random.default_rng(1)
    for _ in range(2):
        m = generated_like_mask(rng, 160, 81)
        for (out, stats), t in zip(optimize_mask_thresholds(m, [2, 5, 20]), [2, 5, 20]):
            ref = reference_optimize_mask(m, t)
            np.testing.assert_array_equal(out, ref[0])
            assert stats == ref[1] and stats["changed_components"] > 0
    wide = rng.integers(0, 400, (30, 40)).astype(np.uint16)  # labels past 255 (uint16 PNGs)
    wide[:10] = 300
    for ignore in (255, 0):  # another ignore value
        out, stats = optimize_mask(wide, 6, ignore_index=ignore)
        ref = reference_optimize_mask(wide, 6, ignore_index=ignore)
        np.testing.assert_array_equal(out, ref[0])
        assert stats == ref[1]


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
    # a crash mid-run: a temporary file and a record cut short
    (out / "gen_optim50/ann_dir/train/.000003.png.tmp1.tmp.png").write_bytes(b"half")
    with open(out / "gen_optim50/optim_parts.jsonl", "a") as f:
        f.write('{"changed_components": 1, "name": "0000')
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


# --- bad generated folders ------------------------------------------------------------------------
def _error_line(capsys, argv):
    from inference.optimize_masks import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code not in (0, None)
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(err) == 1, err
    return err[0]


def _args(src, tmp_path, *extra):
    return ["--input", str(src), "--thresholds", "2", "50", "--reference_size", "16", "--num_workers", "1",
            "--output_root", str(tmp_path / "out"), *extra]


@pytest.mark.parametrize("damage, named, problem", [
    (lambda src: (src / "manifest.jsonl").unlink(), "manifest.jsonl", "missing"),
    (lambda src: (src / "manifest.jsonl").write_text((src / "manifest.jsonl").read_text()[:-40]),
     "manifest.jsonl", "says 5 pairs"),
    (lambda src: (src / "dataset.json").write_text("{not json"), "dataset.json", "cannot read"),
    (lambda src: (src / "ann_dir/train/000002.png").unlink(), "ann_dir/train/000002.png", "mask missing"),
    (lambda src: (src / "img_dir/train/000004.png").unlink(), "img_dir/train/000004.png", "image missing"),
    (lambda src: (src / "ann_dir/train/000001.png").write_bytes(b"not a png at all"),
     "ann_dir/train/000001.png", "cannot read the mask"),
    (lambda src: Image.new("L", (16, 12)).save(src / "ann_dir/train/000003.png"),
     "ann_dir/train/000003.png", "16x12 but its image"),
    (lambda src: Image.new("RGB", (16, 16)).save(src / "ann_dir/train/000000.png"),
     "ann_dir/train/000000.png", "mode RGB"),
])
def test_bad_folder_is_one_line_naming_the_file_before_any_work(tmp_path, capsys, damage, named, problem):
    src = tmp_path / "gen"
    _fake_generated(src)
    damage(src)
    line = _error_line(capsys, _args(src, tmp_path))
    assert line.startswith(f"error: {src / named}: ") and problem in line
    assert not list((tmp_path / "out").rglob("*.png"))  # nothing written


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 30])  # header intact, pixel data cut short


def test_corrupt_mask_mid_run_is_named_skipped_and_counted(tmp_path, capsys):
    from inference.optimize_masks import main

    src = tmp_path / "gen"
    _fake_generated(src)
    _truncate(src / "ann_dir/train/000001.png")
    Image.fromarray(np.full((16, 16), 9, np.uint8)).save(src / "ann_dir/train/000003.png")  # toy: labels 0..5
    main(_args(src, tmp_path, "--max_bad_fraction", "0.4"))
    err = capsys.readouterr().err
    assert f"skipped: {src / 'ann_dir/train/000001.png'}: cannot decode mask" in err
    assert f"skipped: {src / 'ann_dir/train/000003.png'}: labels [9] outside 0..5" in err
    for thr in (2, 50):
        out = tmp_path / "out" / f"gen_optim{thr}"
        report = json.loads((out / "mask_optimization.json").read_text())
        assert report["num_masks"] == 3 and report["skipped_masks"] == 2
        assert sorted(report["skipped"]) == ["000001", "000003"]
        assert sorted(p.name for p in (out / "ann_dir/train").iterdir()) == ["000000.png", "000002.png", "000004.png"]
        assert sorted(p.name for p in (out / "img_dir/train").iterdir()) == ["000000.png", "000002.png", "000004.png"]
        assert [json.loads(l)["name"] for l in (out / "manifest.jsonl").read_text().splitlines()] == \
            ["000000", "000002", "000004"]
        assert sorted(json.loads((out / "captions/train.json").read_text())) == ["000000", "000002", "000004"]
        assert json.loads((out / "dataset.json").read_text())["num_pairs"] == 3


def test_more_bad_masks_than_allowed_stops_the_run(tmp_path, capsys):
    src = tmp_path / "gen"
    _fake_generated(src)
    _truncate(src / "ann_dir/train/000001.png")
    _truncate(src / "ann_dir/train/000002.png")
    line = _error_line(capsys, _args(src, tmp_path))  # default share: at least one bad mask is allowed
    assert line.startswith(f"error: {src / 'ann_dir/train'}: 2 of 5 masks bad, more than the allowed share "
                           "(max_bad_fraction=0.01)")
    assert "000002.png" in line
    assert not (tmp_path / "out" / "gen_optim2" / "mask_optimization.json").exists()
