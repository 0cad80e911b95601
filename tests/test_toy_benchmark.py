"""The toy benchmark's own logic: its metrics, its resumable stage runner and its report."""
import json
import sys

import numpy as np
import pytest

from bench.toy_benchmark import (
    Chain,
    ToyBenchmarkConfig,
    image_mask_consistency,
    prompt_mask_agreement,
    real_val_confusion,
    render_markdown,
)
from dataset import get_dataset_info
from utils.io import RunDir, save_image_atomic


def _generated_folder(root, pairs):
    """A folder in the generator's layout: (prompt, mask) per pair."""
    with open(root / "manifest.jsonl", "w") as f:
        for i, (prompt, mask) in enumerate(pairs):
            name = f"{i:06d}"
            save_image_atomic(root / "ann_dir" / "train" / f"{name}.png", mask.astype(np.uint8))
            f.write(json.dumps({"name": name, "prompt": prompt}) + "\n")
    return root


def test_prompt_mask_agreement_counts_exact_missing_and_extra(tmp_path):
    m = np.zeros((8, 8), np.uint8)
    exact = m.copy(); exact[1:3, 1:3] = 1; exact[5:7, 5:7] = 5  # circle + star
    missing = m.copy(); missing[1:3, 1:3] = 1  # star missing
    extra = m.copy(); extra[0, 0] = 2; extra[4, 4] = 255  # square present, ring named; ignore is no class
    gen = _generated_folder(tmp_path, [
        ("a red circle and a blue star on a striped background", exact),
        ("a red circle and a blue star on a striped background", missing),
        ("a green square on a checkered background", extra),
        ("a green ring on a checkered background", extra),
    ])
    r = prompt_mask_agreement(gen)
    assert r["pairs"] == 4
    assert r["agreement"] == pytest.approx(2 / 4)
    assert r["missing_a_named_class"] == pytest.approx(2 / 4)  # missing star; missing ring
    assert r["has_an_unnamed_class"] == pytest.approx(1 / 4)  # square not named
    # one-shape prompts vs two-shape compositions, scored apart
    assert r["by_named_classes"] == {"1": {"pairs": 2, "agreement": 0.5}, "2": {"pairs": 2, "agreement": 0.5}}


def test_stages_resume_and_a_failing_stage_names_its_log(tmp_path, capsys):
    cfg = ToyBenchmarkConfig(output_dir=str(tmp_path / "bench"))
    run = RunDir(cfg.output_dir)
    chain = Chain(cfg, run)
    counter = tmp_path / "count.txt"
    cmd = [sys.executable, "-c", f"p='{counter}'; import os; n=int(open(p).read()) if os.path.exists(p) else 0; open(p,'w').write(str(n+1))"]
    chain.stage("first", cmd)
    chain.stage("first", cmd)  # finished: skipped, not run again
    assert counter.read_text() == "1"
    assert Chain(cfg, run).done("first")["argv"] == cmd
    with pytest.raises(SystemExit):
        chain.stage("broken", [sys.executable, "-c", "print('boom'); raise SystemExit(3)"])
    err = capsys.readouterr().err
    assert "broken" in err and "broken.log" in err and "boom" in err
    assert chain.done("broken") is None  # no marker: a rerun tries it again
    run.close()


def test_report_flags_a_real_segmenter_that_did_not_learn():
    info = get_dataset_info("toy")
    per_class = {c: 0.5 for c in info.seg_classes}
    report = {
        "profile": "demo", "toy_figures_note": "Toy figures.",
        "settings": {"size": 32, "num_train_pairs": 10, "num_val": 5, "segmenter": "x.py",
                     "segmenter_iters": 3, "seed": 0},
        "segmentation": {"real": {"mIoU": 0.4, "ratio_to_real": 1.0, "per_class_IoU": per_class},
                         "jodiffusion": {"mIoU": 0.3, "ratio_to_real": 0.75, "per_class_IoU": per_class}},
        "prompt_mask_agreement": {"jodiffusion": {"agreement": 0.5}},
        "image_mask_consistency": {"jodiffusion": {"mIoU": 0.25}},
        "generation": {"jodiffusion": {"pairs_per_s": 10.0}},
        "mask_optimization": {"threshold_50": {"changed_pixels": 7, "changed_components": 2,
                                               "prompt_mask_agreement": 0.6}},
        "pictures": [], "loss_curves": {}, "stage_seconds": {"a": 1.0},
    }
    report["image_mask_consistency"]["jodiffusion"]["by_named_classes"] = {"1": {"pairs": 3, "mIoU": 0.5}}
    report["real_val_confusion"] = {"jodiffusion": {"largest": [{"truth": "triangle", "predicted": "star",
                                                                 "share": 0.25}]}}
    md = render_markdown(report, info)
    assert "- jodiffusion: triangle -> star 25%" in md
    assert "jodiffusion consistency by prompt: 1 named class: 0.500 (3 pairs)." in md
    assert "| jodiffusion | 0.300 | 0.750 |" in md
    assert "Caution" in md and "0.400" in md
    assert "| 50 | 7 | 2 | 0.600 |" in md
    report["segmentation"]["real"]["mIoU"] = 0.9
    assert "Caution" not in render_markdown(report, info)


def _fake_predict(monkeypatch, outputs):
    """models.segmenter.predict returning fixed label maps (the metrics, not a model, are under test)."""
    import models.segmenter

    def predict(config, checkpoint, images):
        assert len(images) == len(outputs) and all(im.ndim == 3 and im.shape[2] == 3 for im in images)
        return [o.copy() for o in outputs]

    monkeypatch.setattr(models.segmenter, "predict", predict)


def test_real_val_confusion_reports_what_each_true_class_is_called(tmp_path, monkeypatch):
    root, work = tmp_path / "toy", tmp_path / "seg"
    work.mkdir()
    (work / "iter_1.pth").write_bytes(b"")  # the checkpoint _last_checkpoint finds; predict is faked
    a = np.zeros((8, 8), np.uint8); a[0:2, 0:2] = 3; a[4:6, 4:6] = 1; a[7, 7] = 255  # triangle, circle, ignore
    b = np.zeros((8, 8), np.uint8); b[2:4, 2:6] = 2  # a square of 8 px
    for name, m in (("a", a), ("b", b)):
        save_image_atomic(root / "ann_dir" / "val" / f"{name}.png", m)
        save_image_atomic(root / "img_dir" / "val" / f"{name}.png", np.full((8, 8, 3), 90, np.uint8))
    pa = a.copy(); pa[pa == 3] = 5; pa[7, 7] = 4  # every triangle pixel called star; the ignore pixel does not count
    pb = b.copy(); pb[2:4, 2:4] = 3  # half the square called triangle
    _fake_predict(monkeypatch, [pa, pb])
    r = real_val_confusion(root, "unused.py", work)
    shares = np.asarray(r["share_of_true_pixels"])
    names = r["classes"]
    tri, star, sq, circ = (names.index(c) for c in ("triangle", "star", "square", "circle"))
    assert shares[tri, star] == 1.0 and shares[sq, tri] == 0.5 and shares[circ, circ] == 1.0
    assert np.allclose(shares[[circ, sq, tri]].sum(1), 1.0)
    assert r["largest"][:2] == [{"truth": "triangle", "predicted": "star", "share": 1.0},
                                {"truth": "square", "predicted": "triangle", "share": 0.5}]


def test_image_mask_consistency_is_also_scored_by_prompt_size(tmp_path, monkeypatch):
    work, gen_dir = tmp_path / "seg", tmp_path / "gen"
    work.mkdir()
    gen_dir.mkdir()
    (work / "iter_1.pth").write_bytes(b"")
    one = np.zeros((8, 8), np.uint8); one[1:4, 1:4] = 2
    two = np.zeros((8, 8), np.uint8); two[1:4, 1:4] = 1; two[5:7, 5:7] = 5
    gen = _generated_folder(gen_dir, [("a green square on a noisy background", one),
                                               ("a red circle and a blue star on a striped background", two)])
    for name in ("000000", "000001"):
        save_image_atomic(gen / "img_dir" / "train" / f"{name}.png", np.full((8, 8, 3), 50, np.uint8))
    _fake_predict(monkeypatch, [one, np.zeros_like(two)])  # right on the one-shape pair, blind on the other
    r = image_mask_consistency(gen, "unused.py", work)
    assert r["pairs"] == 2
    assert r["by_named_classes"]["1"] == {"pairs": 1, "mIoU": 1.0}
    assert r["by_named_classes"]["2"]["pairs"] == 1 and r["by_named_classes"]["2"]["mIoU"] < 0.5
