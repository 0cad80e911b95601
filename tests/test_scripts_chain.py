"""The real recipes chain by default (issue 16, point 5).

Each real script (scripts/{ae,ldm,gen,optim,seg,diffumask}) runs here with fake ``accelerate``,
``torchrun`` and ``python`` on PATH that only record their argv, so the shell's own expansion of
the ``VAR=${VAR:-default}`` lines is what gets checked. Each recorded command is then resolved the
way its entry point resolves it (``utils.config.parse_config`` on the entry point's config class;
``train.segmenter``'s argument parser and mmseg config loader for the segmenters), and the test
checks, for every dataset, that one stage's default output is the next stage's default input, with
only DATA_ROOT set by the user.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import subprocess
from pathlib import Path

import pytest

from dataset import get_dataset_info
from models.segmenter import load_seg_config
from train.segmenter import parse_args as parse_segmenter_args
from utils.config import parse_config

REPO = Path(__file__).resolve().parents[1]
DATASETS = ("voc", "ade20k", "coco")
SEGMENTERS = ("deeplabv3plus_r101", "mask2former_r50", "deeplabv3plus_r101_mix")
SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
OLD_SD15 = "runwayml" + "/stable-diffusion-v1-5"  # split so this file does not match itself
# entry point -> its config dataclass (what parse_config builds from the command line)
CONFIG_CLASSES = {
    "train.label_vae": ("train.label_vae", "LabelVAETrainConfig"),
    "inference.jodiffusion": ("inference.jodiffusion", "InitConfig"),
    "train.joint_diffusion": ("train.joint_diffusion", "JointDiffusionConfig"),
    "train.toy_base_model": ("train.toy_base_model", "ToyBaseModelConfig"),
    "inference.generate": ("inference.generate", "GenerateConfig"),
    "inference.optimize_masks": ("inference.optimize_masks", "OptimizeMasksConfig"),
    "inference.diffumask": ("inference.diffumask", "DiffuMaskConfig"),
    "inference.diffumask_noise_filter": ("inference.diffumask_noise_filter", "NoiseFilterConfig"),
    "inference.uvit_init": ("inference.uvit_init", "UViTInitConfig"),
    "inference.fetch_weights": ("inference.fetch_weights", "FetchConfig"),
}
# what the trainers write inside their --output_dir (train/label_vae.py, train/joint_diffusion.py)
LABEL_VAE_SUBDIR, PIPELINE_SUBDIR = "label_vae", "pipeline"
SENTINEL = "--end-of-call--"
FAKE_LAUNCHER = f"""#!/usr/bin/env bash
printf '%s\\0' "$(basename "$0")" "$@" {SENTINEL} >> "$ARGV_LOG"
"""


@pytest.fixture
def run_script(tmp_path):
    """Run a script with recording launchers; return [(launcher, module, args), ...] in call order."""
    fake = tmp_path / "bin"
    fake.mkdir()
    for name in ("accelerate", "torchrun", "python"):
        (fake / name).write_text(FAKE_LAUNCHER)
        (fake / name).chmod(0o755)
    cwd = tmp_path / "cwd"
    cwd.mkdir()

    def run(script: str, *args: str, **env) -> list[tuple[str, str, list[str]]]:
        log = tmp_path / "argv.log"
        log.unlink(missing_ok=True)
        full_env = {"PATH": f"{fake}{os.pathsep}{os.environ['PATH']}", "HOME": str(tmp_path),
                    "ARGV_LOG": str(log), **env}
        subprocess.run(["bash", str(REPO / script), *args], cwd=cwd, env=full_env, check=True,
                       capture_output=True, timeout=60)
        return _split_calls(log.read_bytes()) if log.exists() else []

    run.cwd = cwd
    return run


def _split_calls(raw: bytes) -> list[tuple[str, str, list[str]]]:
    calls, current = [], []
    for token in raw.decode().split("\0")[:-1]:
        if token == SENTINEL:
            calls.append(_module_call(current))
            current = []
        else:
            current.append(token)
    return calls


def _module_call(argv: list[str]) -> tuple[str, str, list[str]]:
    """(launcher, module, module args) of ``accelerate launch ... -m M``, ``torchrun ... -m M``, ``python -m M``."""
    i = argv.index("-m")
    return argv[0], argv[i + 1], argv[i + 2:]


def resolve(module: str, args: list[str]):
    """The settings the entry point would run with (its YAML --config is read from the repo root)."""
    mod, cls = CONFIG_CLASSES[module]
    with contextlib.chdir(REPO):
        return parse_config(getattr(importlib.import_module(mod), cls), args)


def resolve_seg(args: list[str]):
    ns = parse_segmenter_args(args)
    return load_seg_config(REPO / ns.config, ns.cfg_options, ns.work_dir)


def one_call(calls, module: str):
    found = [c for c in calls if c[1] == module]
    assert len(found) == 1, f"expected one {module} call, got {[c[1] for c in calls]}"
    return found[0]


def train_parts(cfg) -> dict:
    """{source: dataset settings} of a segmenter's training set (one dataset or a ConcatDataset's parts)."""
    ds = cfg.train_dataloader.dataset
    return {p.source: p for p in (ds.datasets if ds.type == "ConcatDataset" else [ds])}


def same(a, b) -> bool:
    return Path(a) == Path(b)


def jodiffusion_chain(run_script, d: str, env: dict) -> dict:
    """Run the five JoDiffusion scripts of one dataset; return each stage's resolved settings."""
    ae = resolve(*one_call(run_script(f"scripts/ae/{d}_light.sh", **env), "train.label_vae")[1:])
    ldm_calls = run_script(f"scripts/ldm/{d}_light_joint_5e5.sh", **env)
    assert [c[1] for c in ldm_calls] == ["inference.jodiffusion", "train.joint_diffusion"]
    init, joint = (resolve(*c[1:]) for c in ldm_calls)
    gen = resolve(*one_call(run_script(f"scripts/gen/{d}_light.sh", **env), "inference.generate")[1:])
    optim = resolve(*one_call(run_script(f"scripts/optim/{d}_light.sh", **env), "inference.optimize_masks")[1:])
    segs = {m: resolve_seg(one_call(run_script(f"scripts/seg/{d}_{m}.sh", **env), "train.segmenter")[2])
            for m in SEGMENTERS}
    return dict(ae=ae, init=init, joint=joint, gen=gen, optim=optim, segs=segs)


@pytest.mark.parametrize("d", DATASETS)
def test_each_stage_reads_what_the_previous_one_writes(run_script, d):
    real = f"/datasets/{d}-real"
    s = jodiffusion_chain(run_script, d, {"DATA_ROOT": real})
    ae, init, joint, gen, optim = s["ae"], s["init"], s["joint"], s["gen"], s["optim"]
    assert ae.dataset == d and ae.scaling_factor == "auto"
    assert same(init.label_vae, Path(ae.output_dir) / LABEL_VAE_SUBDIR)
    assert init.base_model == SD15
    assert joint.dataset == d and joint.mode == "joint" and joint.use_8bit_adam
    assert same(joint.pretrained_model, init.output_dir)
    assert same(gen.pipeline, Path(joint.output_dir) / PIPELINE_SUBDIR)
    assert gen.dataset == d
    assert same(optim.input, gen.output_dir) and optim.output_root is None and 20 in optim.thresholds
    optim20 = Path(optim.input).parent / f"{Path(optim.input).name}_optim20"
    for model, cfg in s["segs"].items():
        parts = train_parts(cfg)
        assert sorted(parts) == (["real", "synthetic"] if model.endswith("_mix") else ["synthetic"]), model
        assert same(parts["synthetic"].data_root, optim20), model
        assert {p.dataset_name for p in parts.values()} == {d}, model
    # every stage that reads real data reads DATA_ROOT
    for stage in (ae, joint, gen):
        assert stage.data_root == real
    for model, cfg in s["segs"].items():
        real_roots = [cfg.val_dataloader.dataset.data_root, cfg.test_dataloader.dataset.data_root]
        if "real" in train_parts(cfg):
            real_roots.append(train_parts(cfg)["real"].data_root)
        assert real_roots == [real] * len(real_roots), model


@pytest.mark.parametrize("d", DATASETS)
def test_data_root_defaults_are_the_dataset_modules(run_script, d):
    """Without DATA_ROOT the scripts use dataset/<d>_semantic.py's data_root, the one source of truth."""
    s = jodiffusion_chain(run_script, d, {})
    default = get_dataset_info(d).data_root
    assert [st.data_root for st in (s["ae"], s["joint"], s["gen"])] == [default] * 3
    for cfg in s["segs"].values():
        assert cfg.val_dataloader.dataset.data_root == default
        assert train_parts(cfg).get("real", cfg.val_dataloader.dataset).data_root == default


@pytest.mark.parametrize("d", DATASETS)
def test_weight_init_runs_once(run_script, d):
    """The ldm script initialises $INIT only while it has no model_index.json (written last)."""
    init = resolve(*run_script(f"scripts/ldm/{d}_light_joint_5e5.sh")[0][1:])
    (run_script.cwd / init.output_dir).mkdir(parents=True)
    (run_script.cwd / init.output_dir / "model_index.json").write_text("{}")
    calls = run_script(f"scripts/ldm/{d}_light_joint_5e5.sh")
    assert [c[1] for c in calls] == ["train.joint_diffusion"]


@pytest.mark.parametrize("d", DATASETS)
def test_diffumask_feeds_the_same_segmenter_scripts(run_script, d):
    calls = run_script(f"scripts/diffumask/{d}.sh")
    dm = resolve(*one_call(calls, "inference.diffumask")[1:])
    assert dm.dataset == d and dm.base_model == "CompVis/stable-diffusion-v1-4"  # DiffuMask's SD 1.4
    noise = resolve(*one_call(calls, "inference.diffumask_noise_filter")[1:])
    assert [c[1] for c in calls] == ["inference.diffumask", "inference.diffumask_noise_filter"]
    assert same(noise.data_dir, dm.output_dir) and noise.output_dir is None
    kept = f"{dm.output_dir}_kept"  # the noise filter's default output (inference/diffumask_noise_filter.py)
    work_dirs = set()
    for m in SEGMENTERS:
        args = one_call(run_script(f"scripts/seg/{d}_{m}.sh", SYNTH=kept), "train.segmenter")[2]
        cfg = resolve_seg(args)
        assert same(train_parts(cfg)["synthetic"].data_root, kept)
        work_dirs.add(cfg.work_dir)
        jodiffusion_args = one_call(run_script(f"scripts/seg/{d}_{m}.sh"), "train.segmenter")[2]
        work_dirs.add(resolve_seg(jodiffusion_args).work_dir)
    assert len(work_dirs) == 2 * len(SEGMENTERS), "runs on different synthetic sets must not share a folder"


@pytest.mark.parametrize("d", DATASETS)
def test_the_authors_model_chain_generates_optimizes_and_scores(run_script, d):
    """README's three commands: fetch (not a script), scripts/gen/D_uvit.sh, then the same mask
    optimization and segmenter scripts on its output."""
    gen = resolve(*one_call(run_script(f"scripts/gen/{d}_uvit.sh", PIPELINE="/w/jod"), "inference.generate")[1:])
    assert gen.dataset == d and gen.pipeline == "/w/jod" and gen.num_inference_steps == 50 and gen.guidance_scale == 8
    assert same(gen.data_root, get_dataset_info(d).data_root) and Path(gen.output_dir).name == "jodiffusion_uvit"
    optim = resolve(*one_call(run_script(f"scripts/optim/{d}_light.sh", IN=gen.output_dir), "inference.optimize_masks")[1:])
    assert same(optim.input, gen.output_dir)
    synth = f"{gen.output_dir}_optim20"
    cfg = resolve_seg(one_call(run_script(f"scripts/seg/{d}_deeplabv3plus_r101.sh", SYNTH=synth), "train.segmenter")[2])
    assert same(train_parts(cfg)["synthetic"].data_root, synth) and Path(cfg.work_dir).name.endswith("jodiffusion_uvit_optim20")


def test_extra_cfg_options_override_the_scripts(run_script):
    """A user's own --cfg-options (a second occurrence, after the script's) wins; the rest stays."""
    calls = run_script("scripts/seg/voc_mask2former_r50.sh", "--cfg-options",
                       "train_dataloader.dataset.data_root=/elsewhere", "train_cfg.max_iters=10")
    cfg = resolve_seg(one_call(calls, "train.segmenter")[2])
    assert cfg.train_dataloader.dataset.data_root == "/elsewhere" and cfg.train_cfg.max_iters == 10
    assert cfg.val_dataloader.dataset.data_root == get_dataset_info("voc").data_root


def test_every_script_flag_is_known_to_its_entry_point(run_script):
    """Each command every script launches (toy ones included) parses with its entry point's options."""
    scripts = sorted(p.relative_to(REPO) for p in (REPO / "scripts").glob("*/*.sh"))
    checked = 0
    for script in scripts:
        for _, module, args in run_script(str(script)):
            if module == "train.segmenter":
                resolve_seg(args)
            else:
                resolve(module, args)
            checked += 1
    assert checked >= len(scripts)


def _text_files(root: Path):
    skip = {".git", ".venv", "runs", "data", "__pycache__", ".pytest_cache", "node_modules"}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [n for n in dirnames if n not in skip]
        for n in filenames:
            if n.endswith((".py", ".sh", ".md", ".yaml", ".yml", ".txt", ".json", ".cfg", ".toml")):
                yield Path(dirpath) / n


def test_no_file_names_the_removed_base_model():
    hits = [str(p.relative_to(REPO)) for p in _text_files(REPO) if OLD_SD15 in p.read_text(errors="ignore")]
    assert hits == [], f"{OLD_SD15} was removed from the hub; use {SD15} in: {', '.join(hits)}"
