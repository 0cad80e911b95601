"""The toy benchmark's own logic: its metrics, its resumable stage runner, its stage wiring and its report."""
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import bench.toy_benchmark as toy_benchmark
from bench.toy_benchmark import (
    Chain,
    ToyBenchmarkConfig,
    image_mask_consistency,
    prompt_mask_agreement,
    real_val_confusion,
    render_markdown,
    run_chain,
    write_report,
)
from dataset import get_dataset_info
from utils.config import config_to_dict, parse_config
from utils.io import RunDir, save_image_atomic

REPO = Path(__file__).resolve().parents[1]
# the UNet branch's stages as run folders written before the U-ViT branch name them (they must resume)
UNET_STAGES = ["toy_data", "label_vae", "base_model", "image_unet", "init_jodiffusion", "joint", "generate",
               "optimize_masks"]


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


# ------------------------------------------------------------------ backbones: config, stage wiring


def _fake_base(tmp_path) -> Path:
    """An SD folder as the chain checks it (model_index.json, each part, weights where weights belong)."""
    base = tmp_path / "toy_base"
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        (base / part).mkdir(parents=True)
        if part in ("unet", "vae", "text_encoder"):
            save_file({"w": torch.zeros(1)}, str(base / part / "model.safetensors"))
    (base / "model_index.json").write_text("{}")
    return base


def _profile(name: str, tmp_path, *flags) -> ToyBenchmarkConfig:
    """A profile's settings with a stand-in for the shipped base (the chain's wiring, not its weights, is under test)."""
    base = tmp_path / "toy_base" if (tmp_path / "toy_base").exists() else _fake_base(tmp_path)
    return parse_config(ToyBenchmarkConfig, ["--config", str(REPO / f"configs/toy_benchmark/{name}.yaml"),
                                             "--output_dir", str(tmp_path / "run"), "--pretrained_base", str(base),
                                             *flags])


def test_backbones_rejects_an_unknown_name_in_one_line(tmp_path, capsys):
    assert _profile("demo", tmp_path).backbones == ["unet"]
    assert _profile("bench", tmp_path).backbones == ["unet"]
    with pytest.raises(SystemExit):
        _profile("bench", tmp_path, "--backbones", "unet", "dit")
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "backbones" in lines[0] and "'dit'" in lines[0] and "uvit" in lines[0], lines
    bad = tmp_path / "bad.yaml"
    bad.write_text("backbones: [uvit, transformer]\n")
    with pytest.raises(SystemExit):
        parse_config(ToyBenchmarkConfig, ["--config", str(bad)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and str(bad) in lines[0] and "'transformer'" in lines[0], lines


def _record_stages(monkeypatch) -> dict[str, list[str]]:
    """Run the chain's stages as recorded argv (no process starts): stage name -> argv."""
    calls = {}
    real_run = toy_benchmark.subprocess.run

    def fake_run(argv, **kwargs):
        if not hasattr(kwargs.get("stdout"), "name"):  # not a stage: matplotlib's first import asks fc-list
            return real_run(argv, **kwargs)
        log = Path(kwargs["stdout"].name)
        calls[log.stem] = [str(a) for a in argv]
        return SimpleNamespace(returncode=0)

    monkeypatch.setattr(toy_benchmark.subprocess, "run", fake_run)
    return calls


def _run_recorded(cfg: ToyBenchmarkConfig, monkeypatch) -> dict[str, list[str]]:
    """The whole chain of ``cfg`` with its stages recorded (``_record_stages``), not run."""
    calls = _record_stages(monkeypatch)
    run = RunDir(cfg.output_dir)
    run_chain(cfg, run)
    run.close()
    return calls


def _flag(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def test_both_profiles_start_from_the_shipped_base(tmp_path, monkeypatch):
    assert ToyBenchmarkConfig().pretrained_base == "assets/toy_base"
    for name in ("demo", "bench"):
        assert parse_config(ToyBenchmarkConfig, ["--config", str(REPO / f"configs/toy_benchmark/{name}.yaml")]
                            ).pretrained_base == "assets/toy_base"
    cfg = _profile("bench", tmp_path, "--diffumask", "true")
    calls = _run_recorded(cfg, monkeypatch)
    # no base is trained: label VAE -> init from the base -> joint fine-tune -> generation -> ...
    assert list(calls)[:5] == ["toy_data", "label_vae", "init_jodiffusion", "joint", "generate"]
    assert "base_model" not in calls and "image_unet" not in calls
    base = cfg.pretrained_base
    assert _flag(calls["init_jodiffusion"], "--base_model") == base
    assert _flag(calls["diffumask"], "--base_model") == base  # the baseline samples the same base
    assert _flag(calls["joint"], "--pretrained_model") == _flag(calls["init_jodiffusion"], "--output_dir")
    # a rerun after a cut continues each training stage from its latest checkpoint
    for name in ("label_vae", "joint"):
        assert _flag(calls[name], "--resume_from_checkpoint") == "latest"


def test_a_pretrained_base_without_weights_is_named_before_any_stage_runs(tmp_path, monkeypatch, capsys):
    base = _fake_base(tmp_path)
    for f in (base / "unet").glob("*.safetensors"):
        f.unlink()
    cfg = _profile("demo", tmp_path)
    calls = _record_stages(monkeypatch)
    run = RunDir(cfg.output_dir)
    with pytest.raises(SystemExit):
        run_chain(cfg, run)
    run.close()
    err = capsys.readouterr().err
    assert str(base) in err and "unet" in err and "train.toy_web_base" in err
    assert calls == {}  # refused before the first stage
    with pytest.raises(SystemExit):
        run_chain(_profile("demo", tmp_path, "--pretrained_base", str(tmp_path / "nowhere")), RunDir(cfg.output_dir))
    assert "model_index.json" in capsys.readouterr().err


def test_demo_profile_runs_the_unet_branch_under_its_old_stage_names(tmp_path, monkeypatch):
    cfg = _profile("demo", tmp_path, "--pretrained_base", "", "--diffumask", "true")
    calls = _record_stages(monkeypatch)
    run = RunDir(cfg.output_dir)
    res = run_chain(cfg, run)
    run.close()
    assert list(calls) == UNET_STAGES + ["diffumask", "seg_real", "seg_jodiffusion", "seg_diffumask"]
    assert not any("uvit" in a for argv in calls.values() for a in argv)
    assert set(res["train_sets"]) == {"real", "jodiffusion", "diffumask"}


def test_uvit_branch_shares_data_label_vae_base_seed_and_generation_settings(tmp_path, monkeypatch):
    cfg = _profile("bench", tmp_path, "--seed", "7", "--backbones", "unet", "uvit")
    calls = _record_stages(monkeypatch)
    run = RunDir(cfg.output_dir)
    res = run_chain(cfg, run)
    run.close()
    out, p = Path(cfg.output_dir), res["paths"]
    uvit = ["uvit_base", "uvit_image", "uvit_init", "uvit_joint", "uvit_generate", "uvit_optimize_masks"]
    assert [n for n in calls if n.startswith("uvit_")] == uvit
    assert {"seg_jodiffusion_uvit", "seg_jodiffusion_uvit_optim50", "seg_jodiffusion_optim50"} <= set(calls)
    # each stage reads what the one before it wrote
    assert _flag(calls["uvit_base"], "--sd_base") == cfg.pretrained_base  # the shipped VAE + text encoder
    assert _flag(calls["uvit_image"], "--pretrained_model") == _flag(calls["uvit_base"], "--output_dir")
    assert _flag(calls["uvit_image"], "--mode") == "image"
    assert _flag(calls["uvit_init"], "--unidiffuser") == str(Path(_flag(calls["uvit_image"], "--output_dir")) / "pipeline")
    assert _flag(calls["uvit_init"], "--label_vae") == _flag(calls["init_jodiffusion"], "--label_vae")
    assert _flag(calls["uvit_joint"], "--pretrained_model") == _flag(calls["uvit_init"], "--output_dir")
    assert _flag(calls["uvit_joint"], "--config").endswith("toy_uvit_bench.yaml")
    assert _flag(calls["uvit_generate"], "--pipeline") == str(Path(_flag(calls["uvit_joint"], "--output_dir")) / "pipeline")
    assert _flag(calls["uvit_optimize_masks"], "--input") == _flag(calls["uvit_generate"], "--output_dir")
    # the same toy data and seed everywhere; the same generation and mask optimization as the UNet's
    for name in ("uvit_image", "uvit_joint", "joint", "uvit_generate"):
        assert _flag(calls[name], "--data_root") == str(p["toy"]) and _flag(calls[name], "--seed") == "7"
    swap = {_flag(calls["generate"], "--pipeline"): "PIPELINE", _flag(calls["generate"], "--output_dir"): "OUT",
            _flag(calls["uvit_generate"], "--pipeline"): "PIPELINE", _flag(calls["uvit_generate"], "--output_dir"): "OUT"}
    assert [swap.get(a, a) for a in calls["uvit_generate"]] == [swap.get(a, a) for a in calls["generate"]]
    assert calls["uvit_optimize_masks"][5:] == calls["optimize_masks"][5:]  # after "python -m module --input DIR"
    seg = calls["seg_jodiffusion_uvit"]
    assert f"train_dataloader.dataset.data_root={_flag(calls['uvit_generate'], '--output_dir')}" in seg
    assert [a for a in seg if "data_root" not in a and "segmenters" not in a] == \
        [a for a in calls["seg_jodiffusion"] if "data_root" not in a and "segmenters" not in a]
    assert all(str(out) in _flag(argv, "--output_dir") for n, argv in calls.items() if "--output_dir" in argv)


def test_a_finished_unet_run_folder_resumes_and_runs_only_the_uvit_stages(tmp_path, monkeypatch):
    cfg = _profile("bench", tmp_path, "--pretrained_base", "", "--backbones", "unet", "uvit", "--diffumask", "false")
    stages = Path(cfg.output_dir) / "stages"
    stages.mkdir(parents=True)
    for name in UNET_STAGES + ["seg_real", "seg_jodiffusion", "seg_jodiffusion_optim50"]:
        (stages / f"{name}.json").write_text(json.dumps({"seconds": 1.0, "argv": []}))
    calls = _record_stages(monkeypatch)
    run = RunDir(cfg.output_dir)
    res = run_chain(cfg, run)
    run.close()
    assert list(calls) == ["uvit_base", "uvit_image", "uvit_init", "uvit_joint", "uvit_generate",
                           "uvit_optimize_masks", "seg_jodiffusion_uvit", "seg_jodiffusion_uvit_optim50"]
    assert res["times"]["joint"] == 1.0  # the finished stages keep their recorded time


def test_uvit_text_weight_profile_trains_only_the_uvit_with_the_weight_it_is_given(tmp_path, monkeypatch):
    from inference.generate import GenerateConfig
    from train.joint_diffusion import JointDiffusionConfig

    runs = {}
    for weight in ("1", "0.1"):
        cfg = _profile("uvit_text_weight", tmp_path / weight, "--uvit_text_loss_weight", weight)
        calls = _record_stages(monkeypatch)
        run = RunDir(cfg.output_dir)
        run_chain(cfg, run)
        run.close()
        runs[weight] = (cfg, calls)
    cfg, calls = runs["0.1"]
    assert list(calls) == ["toy_data", "label_vae", "uvit_base", "uvit_image", "uvit_init", "uvit_joint",
                           "uvit_generate", "uvit_optimize_masks", "seg_real", "seg_jodiffusion_uvit"]
    # what the stages will read from their argv: the weight, the cut budget, 1000 pairs
    joint = parse_config(JointDiffusionConfig, calls["uvit_joint"][3:])
    assert (joint.text_loss_weight, joint.max_train_steps) == (0.1, 1500)
    assert parse_config(JointDiffusionConfig, runs["1"][1]["uvit_joint"][3:]).text_loss_weight == 1.0
    assert parse_config(GenerateConfig, calls["uvit_generate"][3:]).num_pairs == 1000
    # the two runs differ only in that weight and their folders
    other = runs["1"][1]
    for name in calls:
        a = [x.replace(str(tmp_path / "0.1"), "RUN") for x in calls[name]]
        b = [x.replace(str(tmp_path / "1"), "RUN") for x in other[name]]
        assert a == b or (name == "uvit_joint" and [x for x in a if x != "0.1"] == [x for x in b if x != "1.0"])
    assert toy_benchmark.published_name(cfg) == "toy_benchmark_uvit_text_weight_text0.1"
    assert toy_benchmark.published_name(runs["1"][0]) == "toy_benchmark_uvit_text_weight"
    # the widened UNet beside it, resumed in the weight-1 folder: its stages only, the same cut budget
    folder = Path(runs["1"][0].output_dir)
    for name in runs["1"][1]:
        (folder / "stages" / f"{name}.json").write_text(json.dumps({"seconds": 1.0, "argv": []}))
    both = _profile("uvit_text_weight", tmp_path / "1", "--backbones", "unet", "uvit")
    calls = _record_stages(monkeypatch)
    run = RunDir(both.output_dir)
    run_chain(both, run)
    run.close()
    assert list(calls) == ["init_jodiffusion", "joint", "generate", "optimize_masks", "seg_jodiffusion"]
    assert parse_config(JointDiffusionConfig, calls["joint"][3:]).max_train_steps == joint.max_train_steps
    assert parse_config(GenerateConfig, calls["generate"][3:]).num_pairs == 1000


def _fake_uvit_base(tmp_path, base: Path) -> Path:
    """A pretrained toy UniDiffuser folder as the chain checks it: UniDiffuser's model_index.json, the
    SD base's VAE, text encoder and tokenizer copied (as ``train.toy_unidiffuser_base`` does), a U-ViT."""
    import shutil

    from models.toy_unidiffuser import COPIED_FROM_SD_BASE

    folder = tmp_path / "uvit_web_base"
    for sd_part, ours in COPIED_FROM_SD_BASE.items():
        shutil.copytree(base / sd_part, folder / ours)
    (folder / "unet").mkdir()
    save_file({"w": torch.ones(2)}, str(folder / "unet" / "diffusion_pytorch_model.safetensors"))
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "UniDiffuserPipeline"}))
    return folder


def test_equal_pretraining_profile_starts_the_uvit_from_its_web_base_at_the_unets_budget(tmp_path, monkeypatch):
    from inference.generate import GenerateConfig
    from train.joint_diffusion import JointDiffusionConfig

    shipped = parse_config(ToyBenchmarkConfig, ["--config", str(REPO / "configs/toy_benchmark/equal_pretraining.yaml")])
    assert shipped.pretrained_base == "assets/toy_base" and shipped.backbones == ["unet", "uvit"]
    # the profile looks where the command its header gives writes the base
    header = (REPO / "configs/toy_benchmark/equal_pretraining.yaml").read_text()
    assert "python -m train.toy_web_base --backbone uvit --output_dir runs/toy_web_uvit_base" in header
    assert shipped.pretrained_uvit_base == "runs/toy_web_uvit_base/model"

    uvit = _fake_uvit_base(tmp_path, _fake_base(tmp_path))
    cfg = _profile("equal_pretraining", tmp_path, "--pretrained_uvit_base", str(uvit))
    calls = _run_recorded(cfg, monkeypatch)
    # nothing pretrains inside the chain: both backbones start from their web-pretrained bases
    assert list(calls) == ["toy_data", "label_vae", "init_jodiffusion", "joint", "generate", "optimize_masks",
                           "uvit_init", "uvit_joint", "uvit_generate", "uvit_optimize_masks",
                           "seg_real", "seg_jodiffusion", "seg_jodiffusion_uvit"]
    assert _flag(calls["uvit_init"], "--unidiffuser") == str(uvit)
    assert _flag(calls["init_jodiffusion"], "--base_model") == cfg.pretrained_base
    joint, uvit_joint = (parse_config(JointDiffusionConfig, calls[n][3:]) for n in ("joint", "uvit_joint"))
    assert joint.max_train_steps == uvit_joint.max_train_steps == 1500 and joint.seed == uvit_joint.seed == 0
    assert {parse_config(GenerateConfig, calls[n][3:]).num_pairs for n in ("generate", "uvit_generate")} == {1000}



def test_bench_both_profile_is_the_benchmark_with_the_uvit_beside_it(tmp_path, monkeypatch):
    """configs/toy_benchmark/bench_both.yaml: bench.yaml's every setting, plus the U-ViT from its web base."""
    from inference.generate import GenerateConfig
    from train.joint_diffusion import JointDiffusionConfig

    bench, both = (config_to_dict(parse_config(ToyBenchmarkConfig, ["--config", str(REPO / f"configs/toy_benchmark/{n}.yaml")]))
                   for n in ("bench", "bench_both"))
    differ = {k for k in bench if bench[k] != both[k]}
    assert differ == {"profile", "output_dir", "backbones", "pretrained_uvit_base"}
    assert both["backbones"] == ["unet", "uvit"] and both["pretrained_uvit_base"] == "runs/toy_web_uvit_base/model"
    assert "python -m train.toy_web_base --backbone uvit --output_dir runs/toy_web_uvit_base" in (
        REPO / "configs/toy_benchmark/bench_both.yaml").read_text()

    uvit = _fake_uvit_base(tmp_path, _fake_base(tmp_path))
    cfg = _profile("bench_both", tmp_path, "--pretrained_uvit_base", str(uvit))
    calls = _run_recorded(cfg, monkeypatch)
    assert list(calls) == ["toy_data", "label_vae", "init_jodiffusion", "joint", "generate", "optimize_masks",
                           "diffumask", "uvit_init", "uvit_joint", "uvit_generate", "uvit_optimize_masks",
                           "seg_real", "seg_jodiffusion", "seg_jodiffusion_optim50", "seg_jodiffusion_uvit",
                           "seg_jodiffusion_uvit_optim50", "seg_diffumask"]
    joint, uvit_joint = (parse_config(JointDiffusionConfig, calls[n][3:]) for n in ("joint", "uvit_joint"))
    assert joint.max_train_steps == uvit_joint.max_train_steps == 6600 and joint.seed == uvit_joint.seed == 0
    assert {parse_config(GenerateConfig, calls[n][3:]).num_pairs for n in ("generate", "uvit_generate")} == {4000}
    assert toy_benchmark.published_name(cfg) == "toy_benchmark_benchmark_both"

def test_a_uvit_base_that_does_not_share_the_sd_bases_parts_is_refused_before_any_stage(tmp_path, monkeypatch,
                                                                                       capsys):
    base = _fake_base(tmp_path)
    uvit = _fake_uvit_base(tmp_path, base)
    save_file({"w": torch.ones(1)}, str(uvit / "vae" / "model.safetensors"))  # another image VAE
    calls = _record_stages(monkeypatch)
    for folder, said in ((uvit, "vae differ from"), (base, "not a UniDiffuser folder")):
        cfg = _profile("equal_pretraining", tmp_path, "--pretrained_uvit_base", str(folder))
        with pytest.raises(SystemExit):
            run_chain(cfg, RunDir(cfg.output_dir))
        err = capsys.readouterr().err
        assert str(folder) in err and said in err and "train.toy_web_base --backbone uvit" in err, err
    cfg = _profile("equal_pretraining", tmp_path, "--pretrained_uvit_base", str(uvit), "--pretrained_base", "")
    with pytest.raises(SystemExit):
        run_chain(cfg, RunDir(cfg.output_dir))
    assert "needs a pretrained_base" in capsys.readouterr().err
    assert calls == {}


def test_final_losses_average_each_logged_part_over_the_last_lines(tmp_path):
    rows = [{"step": 50 * (i + 1), "loss": float(i), "text_loss": 2.0 * i, "image_loss": 1.0, "lr": 0.1}
            for i in range(7)]
    rows.append({"event": "finished"})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert toy_benchmark.final_losses(tmp_path / "metrics.jsonl", rows=5) == {
        "loss": pytest.approx(4.0), "text_loss": pytest.approx(8.0), "image_loss": pytest.approx(1.0)}


# ------------------------------------------------------------------ report: side by side, nothing tracked


def _fill_fake_run(res: dict, num_pairs: int, per_step: dict, params: dict) -> None:
    """What the stages would have left, tiny: toy val pairs, each generator's pairs, each segmenter's
    final metrics and a checkpoint, each joint run's metrics and exported denoiser."""
    p = res["paths"]
    info = get_dataset_info("toy")
    mask = np.zeros((8, 8), np.uint8); mask[2:5, 2:5] = 1
    for i in range(3):
        save_image_atomic(p["toy"] / "ann_dir" / "val" / f"{i}.png", mask)
        save_image_atomic(p["toy"] / "img_dir" / "val" / f"{i}.png", np.full((8, 8, 3), 60, np.uint8))
    for name, root in res["train_sets"].items():
        work = p["seg"] / name
        work.mkdir(parents=True)
        (work / "iter_1.pth").write_bytes(b"")
        miou = 0.9 if name == "real" else 0.6 if "uvit" in name else 0.72
        (work / "final_metrics.json").write_text(json.dumps(
            {"mIoU": miou, "per_class_IoU": {c: miou for c in info.seg_classes}}))
        if name == "real":
            continue
        Path(root).mkdir(parents=True)
        _generated_folder(Path(root), [("a red circle on a noisy background", mask)] * num_pairs)
        for i in range(num_pairs):
            save_image_atomic(Path(root) / "img_dir" / "train" / f"{i:06d}.png", np.full((8, 8, 3), 60, np.uint8))
    for run_key, secs in per_step.items():
        rows = [{"step": 10 * (i + 1), "loss": 1.0 / (i + 1), "sec_per_step": s} for i, s in enumerate(secs)]
        rows.append({"event": "finished"})  # a line without a step time is not counted
        (p[run_key] / "metrics.jsonl").parent.mkdir(parents=True, exist_ok=True)
        (p[run_key] / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for run_key, shapes in params.items():
        unet = p[run_key] / "pipeline" / "unet"
        unet.mkdir(parents=True)
        save_file({f"w{i}": torch.zeros(s) for i, s in enumerate(shapes)}, str(unet / "diffusion_pytorch_model.safetensors"))


def _blank_predict(monkeypatch):
    import models.segmenter

    monkeypatch.setattr(models.segmenter, "predict",
                        lambda config, checkpoint, images: [np.zeros(im.shape[:2], np.uint8) for im in images])


def _snapshot(folder: Path) -> dict:
    return {f.name: (f.read_bytes(), f.stat().st_mtime_ns) for f in sorted(folder.iterdir()) if f.is_file()}


def test_demo_report_writes_only_into_its_run_folder(tmp_path, monkeypatch):
    cfg = _profile("demo", tmp_path)
    assert cfg.publish is False
    _record_stages(monkeypatch)
    run = RunDir(cfg.output_dir)
    res = run_chain(cfg, run)
    _fill_fake_run(res, 4, {"joint_run": [0.3, 0.2]}, {"joint_run": [(3, 4)]})
    _blank_predict(monkeypatch)
    tracked = REPO / "bench" / "results"
    before = _snapshot(tracked)
    # run from a scratch folder: a relative bench/results/ would appear here, not in the repository
    monkeypatch.chdir(tmp_path)
    report = write_report(cfg, res, run)
    run.close()
    assert not (tmp_path / "bench").exists()
    assert _snapshot(tracked) == before
    assert json.loads((Path(cfg.output_dir) / "report.json").read_text()) == json.loads(json.dumps(report))
    md = (Path(cfg.output_dir) / "report.md").read_text()
    # the demo trains the UNet alone: its caption names no U-ViT and no comparison
    assert "Toy figures, one backbone: the widened SD UNet" in md and "U-ViT" not in md and "both backbones" not in md


def test_report_puts_the_backbones_side_by_side_and_publishes_only_when_asked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # bench/results/ resolves here, not in the repository
    cfg = _profile("bench", tmp_path, "--publish", "true", "--optim_thresholds", "50", "--backbones", "unet", "uvit")
    _record_stages(monkeypatch)
    run = RunDir(cfg.output_dir)
    res = run_chain(cfg, run)
    _fill_fake_run(res, 5, {"joint_run": [0.9, 0.2, 0.2, 0.3], "uvit_joint_run": [0.5, 0.4, 0.6]},
                   {"joint_run": [(3, 4), (5,)], "uvit_joint_run": [(2, 8, 8)]})
    res["times"].update(generate=10.0, uvit_generate=15.0)
    _blank_predict(monkeypatch)
    report = write_report(cfg, res, run)
    run.close()
    b = report["backbones"]
    assert list(b) == ["unet", "uvit"]
    assert b["unet"]["sec_per_training_step"] == pytest.approx(0.25)  # median of the logged step times
    assert b["uvit"]["sec_per_training_step"] == pytest.approx(0.5)
    assert b["unet"]["denoiser_parameters"] == 17 and b["uvit"]["denoiser_parameters"] == 128
    assert b["unet"]["sec_per_generated_pair"] == pytest.approx(10.0 / 5)
    assert b["uvit"]["sec_per_generated_pair"] == pytest.approx(15.0 / 5)
    assert b["uvit"]["mIoU"] == pytest.approx(0.6) and b["uvit"]["ratio_to_real"] == pytest.approx(0.6 / 0.9)
    assert b["unet"]["prompt_mask_agreement"] == report["prompt_mask_agreement"]["jodiffusion"]["agreement"]
    assert b["uvit"]["image_mask_consistency"] == report["image_mask_consistency"]["jodiffusion_uvit"]["mIoU"]
    assert set(report["mask_optimization"]) == set(report["mask_optimization_uvit"]) == {"threshold_50"}
    md = (Path(cfg.output_dir) / "report.md").read_text()
    assert "## Backbones side by side (toy figures)" in md
    assert "| U-ViT (the authors') | 0.00M | 0.500 | 3.000 | 0.600 | 0.667 |" in md
    assert "## Mask optimization (JoDiffusion U-ViT pairs)" in md
    assert "while the UNet starts from the pretrained base" in md and "so their pretraining differs" in md
    assert "| jodiffusion_uvit | 5 | " in md  # each generated set's own size
    assert b["uvit"]["final_losses"] == {"loss": pytest.approx((1 + 1 / 2 + 1 / 3) / 3)}
    assert "U-ViT (the authors'), final training losses (mean of the last 5 logged), text loss weight 1: loss 0.6111." in md
    published = tmp_path / "bench" / "results" / "toy_benchmark_benchmark.json"
    assert json.loads(published.read_text()) == json.loads((Path(cfg.output_dir) / "report.json").read_text())
    assert (tmp_path / "bench" / "results" / "toy_benchmark_benchmark_pairs.png").read_bytes() == \
        (Path(cfg.output_dir) / "report_files" / "sample_pairs.png").read_bytes()
    # a second seed is published beside the first, never over it
    cfg2 = _profile("bench", tmp_path, "--publish", "true", "--seed", "1")
    assert toy_benchmark.published_name(cfg2) == "toy_benchmark_benchmark_seed1"


def _pretraining_record(folder: Path, steps: int) -> None:
    """The config.yaml ``train.toy_web_base`` leaves in a base it made (the parts the report reads)."""
    import yaml

    (folder / "config.yaml").write_text(yaml.safe_dump({
        "toy_web_base": {"num_images": 20000, "seed": 0, "max_train_steps": steps},
        "image_diffusion": {"dataset": "toy_web", "max_train_steps": steps, "train_batch_size": 32,
                            "learning_rate": 0.002, "lr_scheduler": "cosine", "lr_warmup_steps": 200}}))


def test_report_says_whether_the_backbones_pretraining_is_equal(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = _fake_base(tmp_path)
    uvit = _fake_uvit_base(tmp_path, base)
    _pretraining_record(base, 8000)
    _pretraining_record(uvit, 8000)
    (uvit / "metrics.jsonl").write_text("".join(json.dumps({"step": 50 * i, "loss": 1 / i}) + "\n" for i in range(1, 4)))
    cfg = _profile("equal_pretraining", tmp_path, "--pretrained_uvit_base", str(uvit))
    _record_stages(monkeypatch)
    run = RunDir(cfg.output_dir)
    res = run_chain(cfg, run)
    _fill_fake_run(res, 5, {"joint_run": [0.3], "uvit_joint_run": [0.5]}, {"joint_run": [(3,)], "uvit_joint_run": [(2,)]})
    _blank_predict(monkeypatch)
    report = write_report(cfg, res, run)
    run.close()
    s = report["settings"]
    assert s["uvit_base"] == str(uvit) and s["pretraining"]["uvit"] == s["pretraining"]["unet"]
    assert s["pretraining"]["uvit"]["image_steps"] == 8000 and s["pretraining"]["uvit"]["corpus"] == "toy_web"
    md = (Path(cfg.output_dir) / "report.md").read_text()
    assert (f"starting from {uvit}, pretrained image-only like the UNet's base {base}: the same 8000 steps of 32 "
            "(rate 0.002, cosine) on the same toy web corpus (20000 pictures, seed 0), so their pretraining is equal") in md
    assert "so their pretraining differs" not in md
    # the U-ViT's image-only curve is its base's, as the UNet's is the shipped base's
    assert report["loss_curves"]["image-only U-ViT (UniDiffuser)"] == "loss_image_uvit.png"
    # a shorter U-ViT pretraining is named, never called equal
    _pretraining_record(uvit, 600)
    settings = dict(s, pretraining={"unet": toy_benchmark.pretraining_of(str(base)),
                                    "uvit": toy_benchmark.pretraining_of(str(uvit))})
    said = toy_benchmark._uvit_pretraining(settings)
    assert said.endswith("but their pretraining differs (image_steps)") and "equal" not in said
    # the U-ViT alone (as in the half-pretraining run): its caption says so, and still how it was pretrained
    alone = toy_benchmark._backbone_table({"settings": settings, "backbones": {"uvit": report["backbones"]["uvit"]}})
    assert f"Toy figures, one backbone: the U-ViT, a tiny UniDiffuser (not UniDiffuser-v1) {said}" in alone[3]


def test_report_opens_with_a_sheet_of_sample_pairs_per_method(tmp_path, monkeypatch):
    from PIL import Image

    monkeypatch.chdir(tmp_path)
    cfg = _profile("demo", tmp_path, "--diffumask", "true")  # real, the widened UNet's pairs, DiffuMask's
    _record_stages(monkeypatch)
    run = RunDir(cfg.output_dir)
    res = run_chain(cfg, run)
    _fill_fake_run(res, 5, {"joint_run": [0.3]}, {"joint_run": [(3, 4)]})
    real = res["paths"]["toy"]
    for i in range(2):  # real training pairs (the fake run has only val ones)
        m = np.zeros((8, 8), np.uint8); m[1:4, 1:4] = 2
        save_image_atomic(real / "ann_dir" / "train" / f"{i}.png", m)
        save_image_atomic(real / "img_dir" / "train" / f"{i}.png", np.full((8, 8, 3), 200, np.uint8))
    _blank_predict(monkeypatch)
    report = write_report(cfg, res, run)
    run.close()
    assert report["sample_pairs"] == "sample_pairs.png"
    sheet = np.asarray(Image.open(Path(cfg.output_dir) / "report_files" / "sample_pairs.png").convert("RGB"))
    scale = 96 // 8
    assert sheet.shape[0] == ((8 + 2) * 3 + 2) * scale  # three rows: real, JoDiffusion, DiffuMask
    # the widest row holds four pairs of three tiles (image | mask | overlay) right of the label column
    assert sheet.shape[1] == 170 + ((8 + 2) * 12 + 2) * scale
    info = get_dataset_info("toy")
    y, x = (2 + 2) * scale, 170 + (2 + (8 + 2) + 2) * scale  # first row, second tile (mask), inside the square
    assert tuple(sheet[y, x]) == tuple(info.palette[2])
    md = (Path(cfg.output_dir) / "report.md").read_text().splitlines()
    assert md[4] == "![sample pairs](report_files/sample_pairs.png)"
    assert "image | mask | overlay" in md[6] and "toy" in md[2].lower()
    assert any(line.startswith("- **ratio to real**") for line in md[:20])
