"""The paper recipes live in configs/<stage>/<dataset>.yaml (issue 17, point 4).

The scripts used to carry each recipe as 10-15 ``--flags``; now they pass ``--config`` and only
pick GPUs and paths. ``HEAD_FLAGS`` below is what each script passed at commit d539aab (with its
default environment), written out per dataset so the paper's values can be read here: the test
resolves that command line and today's script call with the entry point's own ``parse_config`` and
requires the same settings, field by field. The README (issue 17, point 5) is checked here too:
its toy table against bench/results/*.json, its length and its links.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.test_scripts_chain import REPO, one_call, resolve, run_script  # noqa: F401  (fixture)

ROOT = {"voc": "data/VOCdevkit/VOC2012", "ade20k": "data/ade/ADEChallengeData2016", "coco": "data/coco"}
# per dataset: label-VAE lr and epochs (METHOD.md §2), joint epochs and accumulation (§3: effective
# batch 32, COCO 64 = 8 per GPU x 4 GPUs x 2), generated pairs (§4)
PAPER = {
    "voc": dict(ae_lr="1e-5", ae_epochs=50, joint_epochs=100, accum=1, pairs=40000),
    "ade20k": dict(ae_lr="1e-4", ae_epochs=100, joint_epochs=100, accum=1, pairs=40000),
    "coco": dict(ae_lr="1e-4", ae_epochs=20, joint_epochs=20, accum=2, pairs=80000),
}


def head_flags(d: str) -> dict[str, tuple[str, str]]:
    """{script: (module, the flags it passed at d539aab)} for one dataset."""
    p, root = PAPER[d], ROOT[d]
    return {
        f"scripts/ae/{d}_light.sh": ("train.label_vae", (
            f"--dataset {d} --data_root {root} --learning_rate {p['ae_lr']} --num_train_epochs {p['ae_epochs']} "
            "--resolution 512 --train_batch_size 4 --total_batch_size 32 --scaling_factor auto "
            "--mixed_precision fp16 --resume_from_checkpoint latest --checkpoints_total_limit 3 "
            f"--output_dir runs/{d}/label_vae_run")),
        f"scripts/ldm/{d}_light_joint_5e5.sh": ("train.joint_diffusion", (
            f"--mode joint --dataset {d} --data_root {root} --pretrained_model runs/{d}/jodiffusion_init "
            f"--output_dir runs/{d}/joint_5e5 --resolution 512 --learning_rate 5e-5 --lr_scheduler constant "
            f"--train_batch_size 8 --gradient_accumulation_steps {p['accum']} --num_train_epochs {p['joint_epochs']} "
            "--mixed_precision fp16 --use_8bit_adam true --max_grad_norm 1.0 --checkpointing_steps 1000 "
            "--checkpoints_total_limit 3 --resume_from_checkpoint latest")),
        f"scripts/gen/{d}_light.sh": ("inference.generate", (
            f"--pipeline runs/{d}/joint_5e5/pipeline --dataset {d} --data_root {root} --num_pairs {p['pairs']} "
            "--prompt_source captions --scheduler dpmsolver++ --num_inference_steps 50 --guidance_scale 8 "
            f"--output_dir data/synthetic/{d}/jodiffusion")),
        f"scripts/optim/{d}_light.sh": ("inference.optimize_masks", (
            f"--input data/synthetic/{d}/jodiffusion --thresholds 20 50 100 --reference_size 512")),
    }


TOY_HEAD_FLAGS = {
    "scripts/gen/toy_light.sh": ("inference.generate", (
        "--pipeline runs/toy/jodiffusion --dataset toy --num_pairs 2000 --prompt_source captions "
        "--scheduler dpmsolver++ --num_inference_steps 50 --guidance_scale 3 --batch_size 64 "
        "--cpu_threads 1 --output_dir data/gen/toy")),
    "scripts/optim/toy_light.sh": ("inference.optimize_masks", (
        "--input data/gen/toy --thresholds 20 50 100 --reference_size 128")),
}
CASES = sorted({**TOY_HEAD_FLAGS, **{k: v for d in PAPER for k, v in head_flags(d).items()}}.items())


@pytest.mark.parametrize("script, head", CASES, ids=[c[0] for c in CASES])
def test_script_resolves_to_the_same_settings_as_before(run_script, script, head):
    module, flags = head
    now = resolve(*one_call(run_script(script), module)[1:])
    before = resolve(module, flags.split())
    assert vars(now) == vars(before)


@pytest.mark.parametrize("d", sorted(PAPER))
def test_recipe_files_hold_the_paper_values(d):
    p = PAPER[d]
    ae = resolve("train.label_vae", ["--config", f"configs/label_vae/{d}.yaml"])
    assert (ae.dataset, ae.learning_rate, ae.num_train_epochs, ae.total_batch_size) == (
        d, float(p["ae_lr"]), p["ae_epochs"], 32)
    assert (ae.resolution, ae.adam_weight_decay, ae.max_grad_norm, ae.mixed_precision, ae.lr_scheduler) == (
        512, 0.05, 3.0, "fp16", "constant")
    joint = resolve("train.joint_diffusion", ["--config", f"configs/joint_diffusion/{d}.yaml"])
    assert (joint.dataset, joint.mode, joint.num_train_epochs) == (d, "joint", p["joint_epochs"])
    assert joint.train_batch_size * 4 * joint.gradient_accumulation_steps == (64 if d == "coco" else 32)
    assert (joint.learning_rate, joint.lr_scheduler, joint.mixed_precision, joint.use_8bit_adam,
            joint.max_grad_norm, joint.checkpointing_steps) == (5e-5, "constant", "fp16", True, 1.0, 1000)
    gen = resolve("inference.generate", ["--config", f"configs/generate/{d}.yaml"])
    assert (gen.dataset, gen.num_pairs, gen.scheduler, gen.num_inference_steps, gen.guidance_scale,
            gen.prompt_source) == (d, p["pairs"], "dpmsolver++", 50, 8.0, "captions")
    optim = resolve("inference.optimize_masks", ["--config", f"configs/optimize_masks/{d}.yaml"])
    assert (optim.thresholds, optim.reference_size) == ([20, 50, 100], 512)


@pytest.mark.parametrize("d", sorted(PAPER))
def test_uvit_recipe_files_hold_the_authors_values(d, run_script):
    """METHOD.md §8: fp16, 8-bit AdamW, lr 5e-5 constant, grad clip 1, effective batch 32 (COCO 64),
    512 px centre crop + flip (the latent cache's views), no caption dropout; checkpointing on."""
    uvit = resolve("train.joint_diffusion", ["--config", f"configs/joint_diffusion/{d}_uvit.yaml"])
    assert (uvit.dataset, uvit.mode, uvit.num_train_epochs, uvit.resolution) == (d, "joint", PAPER[d]["joint_epochs"], 512)
    assert uvit.train_batch_size * 4 * uvit.gradient_accumulation_steps == (64 if d == "coco" else 32)
    assert (uvit.learning_rate, uvit.lr_scheduler, uvit.mixed_precision, uvit.use_8bit_adam, uvit.max_grad_norm) == (
        5e-5, "constant", "fp16", True, 1.0)
    assert (uvit.cache_latents, uvit.augment, uvit.augment_views, uvit.caption_dropout, uvit.text_loss_weight,
            uvit.gradient_checkpointing) == (True, True, "flip", 0.0, 1.0, True)
    calls = run_script(f"scripts/ldm/{d}_uvit.sh", DATA_ROOT="/r")
    assert [c[1] for c in calls] == ["inference.uvit_init", "train.joint_diffusion"]
    init, train = (resolve(c[1], c[2]) for c in calls)
    assert init.unidiffuser == "thu-ml/unidiffuser-v1" and train.pretrained_model == init.output_dir
    assert train.output_dir == f"runs/{d}/uvit_5e5" and train.dataset == d and train.data_root == "/r"


def test_a_copied_recipe_changes_the_run(run_script, tmp_path):
    """A user copies one file, edits it and points CONFIG at it; everything else stays."""
    mine = tmp_path / "voc_lr2e-5.yaml"
    text = (REPO / "configs/label_vae/voc.yaml").read_text()
    mine.write_text(text.replace("learning_rate: 1.0e-5", "learning_rate: 2.0e-5"))
    cfg = resolve(*one_call(run_script("scripts/ae/voc_light.sh", CONFIG=str(mine)), "train.label_vae")[1:])
    default = resolve(*one_call(run_script("scripts/ae/voc_light.sh"), "train.label_vae")[1:])
    assert cfg.learning_rate == 2e-5
    assert {**vars(cfg), "learning_rate": default.learning_rate} == vars(default)


def test_a_typo_in_a_recipe_file_is_rejected_in_one_line(tmp_path):
    bad = tmp_path / "voc.yaml"
    shutil.copy(REPO / "configs/joint_diffusion/voc.yaml", bad)
    bad.write_text(bad.read_text().replace("learning_rate:", "learning_rat:"))
    proc = subprocess.run([sys.executable, "-c", "import sys; from train.joint_diffusion import JointDiffusionConfig;"
                           "from utils.config import parse_config; parse_config(JointDiffusionConfig, sys.argv[1:])",
                           "--config", str(bad)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "learning_rat" in lines[0], proc.stderr
    assert "did you mean learning_rate" in lines[0]


STAGE_MODULES = {"label_vae": "train.label_vae", "joint_diffusion": "train.joint_diffusion",
                 "generate": "inference.generate", "optimize_masks": "inference.optimize_masks",
                 "toy_base_model": "train.toy_base_model", "diffumask": "inference.diffumask"}


@pytest.mark.parametrize("path", sorted(p.relative_to(REPO) for s in STAGE_MODULES
                                        for p in (REPO / "configs" / s).glob("*.yaml")), ids=str)
def test_every_config_file_loads_with_its_entry_point(path):
    keys = set(yaml.safe_load((REPO / path).read_text()))
    cfg = resolve(STAGE_MODULES[path.parts[1]], ["--config", str(path)])
    assert keys <= set(vars(cfg))


# The README's toy table: one row per results file, every figure read from that file.
TOY_RESULTS = (("toy_benchmark_demo", "demo, shipped base"),
               ("toy_benchmark_benchmark", "benchmark, shipped base"),
               ("toy_benchmark_benchmark_2x_joint", "older chain, in-chain base, 2x joint compute"))


def _toy_row(name: str, label: str) -> str:
    d = json.loads((REPO / "bench/results" / f"{name}.json").read_text())
    seg = d["segmentation"]
    cell = lambda k: f"{seg[k]['mIoU']:.3f} ({seg[k]['ratio_to_real']:.2f})" if k in seg else "-"  # noqa: E731
    optimized = next((k for k in seg if k.startswith("jodiffusion_optim")), "")
    cells = [f"{label} (`{name}.json`)", f"{seg['real']['mIoU']:.3f}", cell("jodiffusion"), cell(optimized),
             cell("diffumask"), f"{d['prompt_mask_agreement']['jodiffusion']['agreement']:.2f}",
             f"{d['image_mask_consistency']['jodiffusion']['mIoU']:.2f}",
             f"{sum(d['stage_seconds'].values()) / 60:.1f} min"]
    return "| " + " | ".join(cells) + " |"


def test_readme_toy_table_is_the_results_files():
    readme = (REPO / "README.md").read_text()
    for name, label in TOY_RESULTS:
        assert _toy_row(name, label) in readme.splitlines(), f"README row for {name}.json: {_toy_row(name, label)}"
    assert "toy figures" in readme and "not the paper's numbers" in readme


def test_readme_is_the_front_door():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    for link in re.findall(r"\]\((docs/[^)#]+)", readme):
        assert (REPO / link).is_file(), link
    for d in PAPER:  # each stage's recipe the README points at exists
        for stage in ("label_vae", "joint_diffusion", "generate", "optimize_masks", "diffumask"):
            assert (REPO / "configs" / stage / f"{d}.yaml").is_file()
