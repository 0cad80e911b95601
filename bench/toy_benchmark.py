"""The toy benchmark: the whole JoDiffusion chain (and the DiffuMask baseline) on the built-in toy
dataset, ending in a report of how good the synthetic data is.

    python -m bench.toy_benchmark --config configs/toy_benchmark/demo.yaml    # scripts/demo.sh, <= 15 min
    python -m bench.toy_benchmark --config configs/toy_benchmark/bench.yaml   # scripts/toy_benchmark.sh, <= 60 min

The paper's regime: the chain starts from a pretrained text-to-image model, the shipped toy base
``assets/toy_base`` (made once by ``train.toy_web_base`` on a captioned toy "web" corpus, never
the segmentation data; loaded with ``from_pretrained`` like Stable Diffusion), and learns only the
label stream and the alignment on the target data. Chain: toy dataset -> label VAE -> weight init
from the base -> joint fine-tune -> generation -> mask optimization -> DiffuMask on the same base ->
one mmseg segmenter per training set (real, JoDiffusion, JoDiffusion + mask optimization,
DiffuMask), all with the same number of pairs and the same schedule, evaluated on the real toy val
split. ``--pretrained_base ''`` runs the older chain that trains a tiny base inside the run (image
VAE + text encoder, then an image-only UNet on the toy data).
With ``backbones: [unet, uvit]`` the authors' backbone runs beside it on the same toy data, label
VAE, base VAE + text encoder, budget, seed and generation settings: a tiny UniDiffuser
(``train.toy_unidiffuser_base``) -> image-only pretraining -> ``inference.uvit_init`` -> joint
training -> generation -> mask optimization -> its segmenters; the report puts both side by side.
``--pretrained_uvit_base`` starts the U-ViT from a toy UniDiffuser pretrained the way the shipped
base was (``train.toy_web_base --backbone uvit``: the same web corpus and image steps) instead:
the side-by-side at equal pretraining (``configs/toy_benchmark/equal_pretraining.yaml``).

Every stage runs as its own process (the real entry points, exactly as a user runs them), logs
to ``<output_dir>/logs/<stage>.log`` and leaves ``<output_dir>/stages/<stage>.json`` when it
finished: an interrupted benchmark rerun with the same command resumes at the first unfinished
stage, and a training stage cut short continues from its latest checkpoint. The report is
``<output_dir>/report.md`` + ``report.json`` with pictures beside them; only ``--publish true`` also copies the figures to the tracked ``bench/results/`` (a maintainer's
step: a user's run never modifies tracked files).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
from safetensors import safe_open

from utils.config import die, parse_config
from utils.io import RunDir, atomic_path, atomic_write_json, atomic_write_text, read_jsonl


@dataclass
class ToyBenchmarkConfig:
    """Run the toy chain end to end and write the report (defaults: the benchmark profile)."""

    output_dir: str = field(default="runs/toy_benchmark", metadata={"help": "everything goes here"})
    profile: str = field(default="benchmark", metadata={"help": "name printed on the report"})
    seed: int = field(default=0, metadata={"help": "seed of the toy data and every stage"})
    backbones: list[str] = field(default_factory=lambda: ["unet", "uvit"], metadata={
        "help": "joint denoisers to train and compare: the widened SD UNet, the authors' U-ViT",
        "choices": ("unet", "uvit")})
    publish: bool = field(default=False, metadata={
        "help": "also write the figures to bench/results/toy_benchmark_<profile>[_seed<N>].json and its sample "
                "pairs picture beside it (tracked; maintainers only)"})
    # data
    size: int = field(default=32, metadata={"help": "toy image side (px)"})
    num_train: int = field(default=4000, metadata={"help": "real training pairs"})
    num_generated: int = field(default=0, metadata={
        "help": "pairs each generator writes (JoDiffusion per backbone, DiffuMask); 0 = num_train, as many as real"})
    num_val: int = field(default=500, metadata={"help": "real val pairs (the evaluation set)"})
    pretrained_base: str = field(default="assets/toy_base", metadata={
        "help": "the pretrained text-to-image model (an SD folder) the chain starts from; '' trains a tiny "
                "base inside the chain instead (base_model_* and image_unet_* stages)"})
    # stages: each takes its YAML profile plus extra flags
    label_vae_config: str = field(default="configs/label_vae/toy.yaml")
    label_vae_args: list[str] = field(default_factory=list)
    base_model_config: str = field(default="configs/toy_base_model/toy_bench.yaml")
    base_model_args: list[str] = field(default_factory=list)
    image_unet_config: str = field(default="configs/joint_diffusion/toy_image_bench.yaml")
    image_unet_args: list[str] = field(default_factory=list)
    joint_config: str = field(default="configs/joint_diffusion/toy_bench.yaml")
    joint_args: list[str] = field(default_factory=list)
    # the U-ViT branch: a tiny UniDiffuser on the base model's VAE + text encoder, the same budget
    pretrained_uvit_base: str = field(default="", metadata={
        "help": "a pretrained toy UniDiffuser folder the U-ViT starts from (runs/toy_web_uvit_base/model, made by "
                "`python -m train.toy_web_base --backbone uvit` like the shipped base), skipping uvit_base and "
                "uvit_image; '' pretrains one inside the chain on the toy data"})
    uvit_base_args: list[str] = field(default_factory=list)
    uvit_image_config: str = field(default="configs/joint_diffusion/toy_unidiffuser_image.yaml")
    uvit_image_args: list[str] = field(default_factory=list)
    uvit_joint_config: str = field(default="configs/joint_diffusion/toy_uvit_bench.yaml")
    uvit_joint_args: list[str] = field(default_factory=list)
    uvit_text_loss_weight: float = field(default=1.0, metadata={
        "help": "weight of the text part in the U-ViT's loss (1 = the authors' objective); the ablation of "
                "configs/toy_benchmark/uvit_text_weight.yaml"})
    generate_config: str = field(default="configs/generate/toy.yaml")
    generate_args: list[str] = field(default_factory=list)
    optim_thresholds: list[int] = field(default_factory=lambda: [20, 50, 100],
                                        metadata={"help": "mask optimization thresholds (px at reference_size)"})
    optim_reference_size: int = field(default=128, metadata={
        "help": "side the thresholds refer to; 128 (not the paper's 512) so they still mean a few px at 32 px"})
    ablation_thresholds: list[int] = field(default_factory=lambda: [50], metadata={
        "help": "thresholds whose optimized masks also train a segmenter"})
    diffumask: bool = field(default=True, metadata={"help": "run the DiffuMask baseline too"})
    diffumask_config: str = field(default="configs/diffumask/toy.yaml")
    diffumask_args: list[str] = field(default_factory=list)
    seg_config: str = field(default="configs/seg/toy_unet_fcn.py")
    seg_iters: int = field(default=3000, metadata={"help": "segmenter iterations (same for every training set)"})
    seg_args: list[str] = field(default_factory=list, metadata={"help": "extra --cfg-options k=v"})
    cpu_threads: int = field(default=2, metadata={"help": "torch threads per stage"})


# ---------------------------------------------------------------------------------------- stages


class Chain:
    """Runs stages as subprocesses, skipping those that already finished."""

    def __init__(self, cfg: ToyBenchmarkConfig, run: RunDir):
        self.cfg, self.run = cfg, run
        self.out = Path(cfg.output_dir)
        (self.out / "stages").mkdir(parents=True, exist_ok=True)
        (self.out / "logs").mkdir(parents=True, exist_ok=True)
        self.times: dict[str, float] = {}

    def done(self, name: str) -> dict | None:
        p = self.out / "stages" / f"{name}.json"
        return json.loads(p.read_text()) if p.exists() else None

    def stage(self, name: str, argv: list[str], env: dict | None = None) -> None:
        prev = self.done(name)
        if prev is not None:
            self.times[name] = prev["seconds"]
            self.run.log(f"[{name}] already done ({prev['seconds']:.0f} s), skipped")
            return
        log_path = self.out / "logs" / f"{name}.log"
        self.run.log(f"[{name}] {' '.join(argv)}  (log: {log_path})")
        full_env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                        OMP_NUM_THREADS=str(self.cfg.cpu_threads), PYTHONUNBUFFERED="1",
                        **(env or {}))
        t0 = time.time()
        with open(log_path, "a") as log:
            proc = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, env=full_env)
        seconds = time.time() - t0
        if proc.returncode != 0:
            tail = "\n".join(log_path.read_text().splitlines()[-15:])
            die(f"stage '{name}' failed (exit {proc.returncode}) after {seconds:.0f} s; "
                f"last lines of {log_path}:\n{tail}\nFix it and rerun the same command to resume.")
        self.times[name] = seconds
        atomic_write_json(self.out / "stages" / f"{name}.json", {"seconds": seconds, "argv": argv})
        self.run.log(f"[{name}] done in {seconds:.0f} s")

    def py(self, module: str, *args) -> list[str]:
        return [sys.executable, "-m", module, *[str(a) for a in args]]


def generated_pairs(cfg: ToyBenchmarkConfig) -> int:
    """Pairs each generator writes: ``num_generated``, or as many as the real training set."""
    return cfg.num_generated or cfg.num_train


# every training stage continues from its latest checkpoint when the chain is rerun after a cut
# (a stage without one starts from scratch; resumed runs draw the same data and noise per step)
RESUME = ("--resume_from_checkpoint", "latest")


class Branch(NamedTuple):
    """Where one backbone's stages leave their results (keys of ``run_chain``'s paths)."""

    train_set: str  # its synthetic training set: also its generator's and segmenter's name
    joint_run: str
    gen: str
    generate_stage: str


# The UNet's names predate the U-ViT branch and stay as they were, so an existing run folder resumes.
BRANCHES = {"unet": Branch("jodiffusion", "joint_run", "gen", "generate"),
            "uvit": Branch("jodiffusion_uvit", "uvit_joint_run", "gen_uvit", "uvit_generate")}


def chain_paths(cfg: ToyBenchmarkConfig) -> dict[str, Path]:
    out = Path(cfg.output_dir)
    paths = dict(
        toy=out / "data" / "toy",
        label_vae_run=out / "label_vae",
        base_model=out / "base_model",
        image_unet_run=out / "image_unet",
        jodiffusion_init=out / "jodiffusion_init",
        joint_run=out / "joint",
        gen=out / "synthetic" / "jodiffusion",
        diffumask=out / "synthetic" / "diffumask",
        uvit_base=out / "uvit_base",
        uvit_image_run=out / "uvit_image",
        uvit_init=out / "uvit_init",
        uvit_joint_run=out / "uvit_joint",
        gen_uvit=out / "synthetic" / "jodiffusion_uvit",
        seg=out / "segmenters",
    )
    if cfg.pretrained_base:  # the shipped base is both the base model and the image-drawing pipeline
        paths.update(base_model=Path(cfg.pretrained_base), image_pipeline=Path(cfg.pretrained_base))
    else:
        paths["image_pipeline"] = paths["image_unet_run"] / "pipeline"
    # the image-pretrained UniDiffuser the U-ViT's step 0 starts from
    paths["uvit_pretrained"] = Path(cfg.pretrained_uvit_base or paths["uvit_image_run"] / "pipeline")
    return paths


def run_chain(cfg: ToyBenchmarkConfig, run: RunDir) -> dict:
    if cfg.pretrained_base:
        check_pretrained_base(Path(cfg.pretrained_base))
    if cfg.pretrained_uvit_base and "uvit" in cfg.backbones:
        check_pretrained_uvit_base(Path(cfg.pretrained_uvit_base), cfg.pretrained_base)
    ch = Chain(cfg, run)
    paths = chain_paths(cfg)
    _shared_stages(cfg, ch, paths)
    if not cfg.pretrained_base and ("unet" in cfg.backbones or cfg.diffumask):
        _image_unet_stage(cfg, ch, paths)  # DiffuMask and the widened UNet start from the image-only UNet
    if "unet" in cfg.backbones:
        _unet_branch(cfg, ch, paths)
    if cfg.diffumask:
        _diffumask_stage(cfg, ch, paths)
    if "uvit" in cfg.backbones:
        _uvit_branch(cfg, ch, paths)
    train_sets = _segmenter_train_sets(cfg, paths)
    _segmenter_stages(cfg, ch, paths, train_sets)
    return dict(paths=paths, train_sets=train_sets, times=ch.times)


def _shared_stages(cfg: ToyBenchmarkConfig, ch: Chain, paths: dict[str, Path]) -> None:
    """What every backbone builds on: the toy data, the label VAE, the base model (shipped, or trained here)."""
    toy = paths["toy"]
    ch.stage("toy_data", ch.py("utils.make_toy_dataset", "--out", toy, "--size", cfg.size,
                               "--num_train", cfg.num_train, "--num_val", cfg.num_val, "--seed", cfg.seed))
    ch.stage("label_vae", ch.py("train.label_vae", "--config", cfg.label_vae_config, "--dataset", "toy",
                                "--data_root", toy, "--output_dir", paths["label_vae_run"],
                                "--seed", cfg.seed, *RESUME, *cfg.label_vae_args))
    if cfg.pretrained_base:
        return
    ch.stage("base_model", ch.py("train.toy_base_model", "--config", cfg.base_model_config,
                                 "--data_root", toy, "--output_dir", paths["base_model"],
                                 "--seed", cfg.seed, *cfg.base_model_args))


def check_pretrained_base(base: Path) -> None:
    """A clear error, before any stage runs, when the pretrained base folder is not a usable SD folder."""
    if not (base / "model_index.json").is_file():
        die(f"{base}: no model_index.json; pretrained_base must be a Stable Diffusion folder (the shipped "
            "toy base is assets/toy_base; --pretrained_base '' trains a tiny base inside the chain)")
    missing = [part for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
               if not (base / part).is_dir()
               or (part in ("unet", "vae", "text_encoder") and not any((base / part).glob("*.safetensors")))]
    if missing:
        die(f"{base}: no weights for {', '.join(missing)}; make the toy base with `python -m train.toy_web_base` "
            f"and copy runs/toy_web_base/model/ there, or pass --pretrained_base '' to train one in the chain")


def _same_files(a: Path, b: Path) -> bool:
    """Whether folders ``a`` and ``b`` hold the same files (relative paths) with the same bytes."""
    import filecmp

    files = sorted(f.relative_to(a).as_posix() for f in a.rglob("*") if f.is_file())
    return files == sorted(f.relative_to(b).as_posix() for f in b.rglob("*") if f.is_file()) and \
        filecmp.cmpfiles(a, b, files, shallow=False)[0] == files


def check_pretrained_uvit_base(folder: Path, sd_base: str) -> None:
    """A clear error, before any stage runs, unless ``folder`` is a UniDiffuser folder sharing the SD
    base's image VAE, text encoder and tokenizer byte for byte (what the side-by-side claims)."""
    how = f"make it with `python -m train.toy_web_base --backbone uvit --sd_base {sd_base or '<the SD base>'}`"
    index = folder / "model_index.json"
    if not index.is_file() or json.loads(index.read_text()).get("_class_name") != "UniDiffuserPipeline":
        die(f"{folder}: not a UniDiffuser folder (no model_index.json naming UniDiffuserPipeline); "
            f"pretrained_uvit_base must be one: {how}")
    if not sd_base:
        die(f"pretrained_uvit_base {folder}: needs a pretrained_base whose image VAE and text encoder it shares; "
            "the base trained inside the chain is not the one it was made from")
    from models.toy_unidiffuser import COPIED_FROM_SD_BASE  # SD base part -> UniDiffuser part

    shared = {sd: ours for sd, ours in COPIED_FROM_SD_BASE.items() if sd != "scheduler"}
    differ = [ours for sd, ours in shared.items() if not _same_files(folder / ours, Path(sd_base) / sd)]
    if differ:
        die(f"{folder}: its {', '.join(differ)} differ from {sd_base}'s, so the backbones would not share them; {how}")


def _image_unet_stage(cfg: ToyBenchmarkConfig, ch: Chain, paths: dict[str, Path]) -> None:
    """Image-only UNet pretraining on the base model (stands in for Stable Diffusion's pretraining)."""
    ch.stage("image_unet", ch.py("train.joint_diffusion", "--config", cfg.image_unet_config, "--mode", "image",
                                 "--dataset", "toy", "--data_root", paths["toy"],
                                 "--pretrained_model", paths["base_model"],
                                 "--output_dir", paths["image_unet_run"], "--seed", cfg.seed,
                                 *RESUME, *cfg.image_unet_args))


def _unet_branch(cfg: ToyBenchmarkConfig, ch: Chain, paths: dict[str, Path]) -> None:
    """The widened SD UNet: widen the image-pretrained base model, train jointly, generate."""
    label_vae = paths["label_vae_run"] / "label_vae"
    ch.stage("init_jodiffusion", ch.py("inference.jodiffusion", "--base_model", paths["image_pipeline"],
                                       "--label_vae", label_vae, "--output_dir", paths["jodiffusion_init"]))
    ch.stage("joint", ch.py("train.joint_diffusion", "--config", cfg.joint_config, "--mode", "joint",
                            "--dataset", "toy", "--data_root", paths["toy"],
                            "--pretrained_model", paths["jodiffusion_init"],
                            "--output_dir", paths["joint_run"], "--seed", cfg.seed, *RESUME, *cfg.joint_args))
    generate_and_optimize(cfg, ch, paths["joint_run"] / "pipeline", paths["gen"], "")


def _diffumask_stage(cfg: ToyBenchmarkConfig, ch: Chain, paths: dict[str, Path]) -> None:
    """The DiffuMask baseline on the same image-drawing base model as the widened UNet's."""
    ch.stage("diffumask", ch.py("inference.diffumask", "--config", cfg.diffumask_config,
                                "--base_model", paths["image_pipeline"], "--output_dir", paths["diffumask"],
                                "--num_pairs", generated_pairs(cfg), "--seed", cfg.seed, *cfg.diffumask_args))


def _uvit_branch(cfg: ToyBenchmarkConfig, ch: Chain, paths: dict[str, Path]) -> None:
    """The authors' U-ViT: a tiny UniDiffuser sharing the base model's image VAE and text encoder,
    pretrained image-only like the UNet, then given the label stream by the authors' step 0."""
    toy, label_vae = paths["toy"], paths["label_vae_run"] / "label_vae"
    if not cfg.pretrained_uvit_base:
        ch.stage("uvit_base", ch.py("train.toy_unidiffuser_base", "--sd_base", paths["base_model"],
                                    "--output_dir", paths["uvit_base"], "--seed", cfg.seed, *cfg.uvit_base_args))
        ch.stage("uvit_image", ch.py("train.joint_diffusion", "--config", cfg.uvit_image_config, "--mode", "image",
                                     "--dataset", "toy", "--data_root", toy, "--pretrained_model", paths["uvit_base"],
                                     "--output_dir", paths["uvit_image_run"], "--seed", cfg.seed,
                                     *RESUME, *cfg.uvit_image_args))
    ch.stage("uvit_init", ch.py("inference.uvit_init", "--unidiffuser", paths["uvit_pretrained"],
                                "--label_vae", label_vae, "--output_dir", paths["uvit_init"]))
    ch.stage("uvit_joint", ch.py("train.joint_diffusion", "--config", cfg.uvit_joint_config, "--mode", "joint",
                                 "--dataset", "toy", "--data_root", toy, "--pretrained_model", paths["uvit_init"],
                                 "--output_dir", paths["uvit_joint_run"], "--seed", cfg.seed,
                                 "--text_loss_weight", cfg.uvit_text_loss_weight, *RESUME, *cfg.uvit_joint_args))
    generate_and_optimize(cfg, ch, paths["uvit_joint_run"] / "pipeline", paths["gen_uvit"], "uvit_")


def _segmenter_train_sets(cfg: ToyBenchmarkConfig, paths: dict[str, Path]) -> dict[str, Path]:
    """Segmenter training set name -> data root: real, each backbone's pairs (raw and optimized), DiffuMask."""
    train_sets = {"real": paths["toy"]}
    for backbone in cfg.backbones:
        b = BRANCHES[backbone]
        if b.train_set in train_sets:
            continue
        train_sets[b.train_set] = paths[b.gen]
        for t in cfg.ablation_thresholds:
            train_sets[f"{b.train_set}_optim{t}"] = Path(f"{paths[b.gen]}_optim{t}")
    if cfg.diffumask:
        train_sets["diffumask"] = paths["diffumask"]
    return train_sets


def _segmenter_stages(cfg: ToyBenchmarkConfig, ch: Chain, paths: dict[str, Path],
                      train_sets: dict[str, Path]) -> None:
    """Same config, same iterations, same number of pairs; only the training set differs."""
    toy = paths["toy"]
    for name, root in train_sets.items():
        source = "real" if name == "real" else "synthetic"
        opts = [f"train_cfg.max_iters={cfg.seg_iters}", f"randomness.seed={cfg.seed}",
                f"train_dataloader.dataset.data_root={root}", f"train_dataloader.dataset.source={source}",
                f"val_dataloader.dataset.data_root={toy}", f"test_dataloader.dataset.data_root={toy}",
                *cfg.seg_args]
        ch.stage(f"seg_{name}", ch.py("train.segmenter", cfg.seg_config,
                                      "--work-dir", paths["seg"] / name, "--cfg-options", *opts))


def generate_and_optimize(cfg: ToyBenchmarkConfig, ch: Chain, pipeline: Path, gen: Path, prefix: str) -> None:
    """One backbone's pairs: the same generation settings and mask optimization for every backbone."""
    toy = chain_paths(cfg)["toy"]
    ch.stage(f"{prefix}generate", ch.py("inference.generate", "--config", cfg.generate_config,
                                        "--pipeline", pipeline, "--dataset", "toy", "--data_root", toy,
                                        "--num_pairs", generated_pairs(cfg), "--output_dir", gen,
                                        "--seed", cfg.seed, "--cpu_threads", cfg.cpu_threads, *cfg.generate_args))
    ch.stage(f"{prefix}optimize_masks", ch.py("inference.optimize_masks", "--input", gen,
                                              "--thresholds", *cfg.optim_thresholds,
                                              "--reference_size", cfg.optim_reference_size))


# ---------------------------------------------------------------------------------------- report


def _toy_info(root=None):
    from dataset import get_dataset_info

    return get_dataset_info("toy", data_root=root)


def _read_mask(path: Path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path))


def prompt_mask_agreement(gen_dir: Path) -> dict:
    """Share of pairs whose mask holds exactly the classes its prompt names (background and
    ignore aside), how often each way it fails, and the share per number of named classes
    (one-shape prompts vs compositions)."""
    from dataset.toy_shapes import caption_labels

    rows = read_jsonl(gen_dir / "manifest.jsonl")
    exact = missing = extra = 0
    by_count: dict[int, list[int]] = {}
    for r in rows:
        named = set(caption_labels(r["prompt"]))
        mask = _read_mask(gen_dir / "ann_dir" / "train" / f"{r['name']}.png")
        present = {int(v) for v in np.unique(mask) if 0 < v < 255}
        exact += present == named
        missing += bool(named - present)
        extra += bool(present - named)
        tally = by_count.setdefault(len(named), [0, 0])
        tally[0] += present == named
        tally[1] += 1
    n = max(len(rows), 1)
    return {"pairs": len(rows), "agreement": exact / n, "missing_a_named_class": missing / n,
            "has_an_unnamed_class": extra / n,
            "by_named_classes": {str(k): {"pairs": v[1], "agreement": v[0] / v[1]} for k, v in sorted(by_count.items())}}


def _last_checkpoint(work_dir: Path) -> Path:
    marker = work_dir / "last_checkpoint"
    if marker.exists():
        return Path(marker.read_text().strip())
    ckpts = sorted(work_dir.glob("iter_*.pth"), key=lambda p: int(p.stem.split("_")[1]))
    if not ckpts:
        raise FileNotFoundError(f"no checkpoint in {work_dir}")
    return ckpts[-1]


def image_mask_consistency(gen_dir: Path, seg_config: str, seg_work_dir: Path, max_pairs: int = 1000) -> dict:
    """mIoU between generated masks and the real-trained segmenter's prediction on the generated
    images: does the mask describe what the image shows?"""
    from PIL import Image

    from dataset.toy_shapes import caption_labels
    from models.segmenter import predict
    from utils.metrics import IoUAccumulator

    info = _toy_info()
    rows = read_jsonl(gen_dir / "manifest.jsonl")[:max_pairs]
    img_dir = gen_dir / "img_dir" / "train"
    images = []
    for r in rows:
        p = next(img_dir.glob(f"{r['name']}.*"))
        images.append(np.asarray(Image.open(p).convert("RGB")))
    preds = predict(seg_config, _last_checkpoint(seg_work_dir), images)
    acc = IoUAccumulator(info.num_labels, info.ignore_index)
    by_count: dict[int, list] = {}  # number of classes the prompt names -> [accumulator, pairs]
    for r, pred in zip(rows, preds):
        mask = _read_mask(gen_dir / "ann_dir" / "train" / f"{r['name']}.png")
        acc.update(pred, mask)
        tally = by_count.setdefault(len(caption_labels(r["prompt"])),
                                    [IoUAccumulator(info.num_labels, info.ignore_index), 0])
        tally[0].update(pred, mask)
        tally[1] += 1
    r = acc.result()
    return {"pairs": len(rows), "mIoU": r["mIoU"], "per_class_IoU": r["per_class_IoU"],
            "by_named_classes": {str(k): {"pairs": v[1], "mIoU": v[0].result()["mIoU"]}
                                 for k, v in sorted(by_count.items())}}


def real_val_confusion(toy_root: Path, seg_config: str, seg_work_dir: Path, top: int = 3) -> dict:
    """What a segmenter calls each class on the real val split: the share of each true class's
    pixels given each label (rows: truth, columns: prediction) and the largest confusions."""
    from PIL import Image

    from models.segmenter import predict

    info = _toy_info()
    masks = sorted((toy_root / "ann_dir" / "val").glob("*.png"))
    images = [np.asarray(Image.open(next((toy_root / "img_dir" / "val").glob(f"{m.stem}.*"))).convert("RGB"))
              for m in masks]
    preds = predict(seg_config, _last_checkpoint(seg_work_dir), images)
    k = info.num_labels
    counts = np.zeros((k, k), np.int64)
    for m, pred in zip(masks, preds):
        truth = _read_mask(m).astype(np.int64)
        keep = truth != info.ignore_index
        np.add.at(counts, (truth[keep], np.asarray(pred, np.int64)[keep]), 1)
    shares = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    names = list(info.seg_classes)
    pairs = sorted(((shares[i, j], i, j) for i in range(1, k) for j in range(k) if i != j), reverse=True)[:top]
    return {"classes": names, "share_of_true_pixels": shares.round(4).tolist(),
            "largest": [{"truth": names[i], "predicted": names[j], "share": float(v)} for v, i, j in pairs]}


def _seg_result(work_dir: Path) -> dict:
    """What train.segmenter wrote after its final evaluation on the real val split."""
    return json.loads((work_dir / "final_metrics.json").read_text())


def _loss_curves(cfg: ToyBenchmarkConfig, res: dict, pics: Path) -> dict[str, str]:
    from utils.visualize import plot_curves

    p = res["paths"]
    base_title, base_png = (("pretrained base UNet (made once, on the toy web corpus)", "loss_pretrained_base.png")
                            if cfg.pretrained_base else ("image VAE (base model)", "loss_image_vae.png"))
    sources = {  # title -> (metrics file, keys, x axis, picture name)
        "label VAE": (p["label_vae_run"] / "metrics.jsonl", ("loss",), "step", "loss_label_vae.png"),
        base_title: (p["base_model"] / "metrics.jsonl", ("loss",), "step", base_png),
        "image-only UNet": (p["image_unet_run"] / "metrics.jsonl", ("loss",), "step", "loss_image_unet.png"),
        "joint UNet": (p["joint_run"] / "metrics.jsonl", ("loss", "image_loss", "label_loss"), "step",
                       "loss_joint_unet.png"),
        "image-only U-ViT (UniDiffuser)": (Path(cfg.pretrained_uvit_base or p["uvit_image_run"]) / "metrics.jsonl",
                                           ("loss",), "step", "loss_image_uvit.png"),
        "joint U-ViT": (p["uvit_joint_run"] / "metrics.jsonl", ("loss", "image_loss", "label_loss", "text_loss",
                                                                "clip_loss"), "step", "loss_joint_uvit.png"),
    }
    for name in res["train_sets"]:
        for s in sorted((p["seg"] / name).glob("*/vis_data/scalars.json"))[-1:]:
            sources[f"segmenter ({name})"] = (s, ("loss",), "iter", f"loss_segmenter_{name}.png")
    out = {}
    for title, (path, keys, x, png) in sources.items():
        if Path(path).exists() and plot_curves(path, pics / png, keys=keys, x_key=x, title=title,
                                               smooth=5 if x == "step" else 1):
            out[title] = png
    return out


def median_sec_per_step(metrics: Path) -> float | None:
    """The median of a training run's logged ``sec_per_step`` (robust to the first, slower window)."""
    secs = [r["sec_per_step"] for r in read_jsonl(metrics) if r.get("sec_per_step") is not None]
    return float(np.median(secs)) if secs else None


FINAL_LOSS_ROWS = 5  # metrics lines averaged into a run's final losses


def final_losses(metrics: Path, rows: int = FINAL_LOSS_ROWS) -> dict[str, float]:
    """The mean of each logged loss (``loss`` and every ``<part>_loss``) over a training run's last
    ``rows`` metrics lines: where the run ended, less noisy than its last line alone."""
    lines = [r for r in read_jsonl(metrics) if "loss" in r][-rows:]
    keys = [k for k in (lines[-1] if lines else {}) if k == "loss" or k.endswith("_loss")]
    return {k: float(np.mean([r[k] for r in lines if k in r])) for k in keys}


def denoiser_parameters(pipeline: Path) -> int | None:
    """Parameters of a pipeline folder's denoiser (``unet/``), read from its safetensors headers."""
    files = sorted((Path(pipeline) / "unet").glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for f in files:
        with safe_open(str(f), framework="pt") as weights:
            total += sum(math.prod(weights.get_slice(k).get_shape()) for k in weights.keys())
    return total


def _optimization_entries(gen: Path, train_set: str, cfg: ToyBenchmarkConfig, rows: dict) -> dict:
    entries = {}
    for t in cfg.optim_thresholds:
        d = Path(f"{gen}_optim{t}")
        stats_file = d / "mask_optimization.json"
        entry = json.loads(stats_file.read_text()) if stats_file.exists() else {}
        entry["prompt_mask_agreement"] = prompt_mask_agreement(d)["agreement"]
        if f"{train_set}_optim{t}" in rows:
            entry["segmenter_mIoU"] = rows[f"{train_set}_optim{t}"]["mIoU"]
        entries[f"threshold_{t}"] = entry
    return entries


def write_report(cfg: ToyBenchmarkConfig, res: dict, run: RunDir) -> dict:
    out = Path(cfg.output_dir)
    pics = out / "report_files"
    pics.mkdir(exist_ok=True)
    info = _toy_info()
    p = res["paths"]
    rows = _segmentation_rows(p["seg"], res["train_sets"])
    report = _report_skeleton(cfg, rows, res["times"])
    report["backbones"] = {backbone: _backbone_entry(report, backbone, cfg, res, rows)
                           for backbone in dict.fromkeys(cfg.backbones)}
    report["real_val_confusion"] = {name: real_val_confusion(Path(p["toy"]), cfg.seg_config, p["seg"] / name)
                                    for name in res["train_sets"]}
    if cfg.diffumask:
        _add_diffumask(report, cfg, res)
    report["sample_pairs"] = _sample_pairs(res["train_sets"], pics)
    report["pictures"] = _copy_pictures(cfg, p, pics)
    report["loss_curves"] = _loss_curves(cfg, res, pics)
    atomic_write_json(out / "report.json", report)
    atomic_write_text(out / "report.md", render_markdown(report, info))
    if cfg.publish:  # the tracked figures (runs/ is not in git); a user's run leaves them alone
        publish(cfg, report, pics)
    return report


def published_name(cfg: ToyBenchmarkConfig) -> str:
    """bench/results/ file stem: one per profile, and one per further seed (seed 0 keeps the plain name)
    and U-ViT text loss weight (1 keeps the plain name)."""
    return (f"toy_benchmark_{cfg.profile}" + (f"_seed{cfg.seed}" if cfg.seed else "")
            + (f"_text{cfg.uvit_text_loss_weight:g}" if cfg.uvit_text_loss_weight != 1 else ""))


def publish(cfg: ToyBenchmarkConfig, report: dict, pics: Path) -> None:
    stem = Path("bench/results") / published_name(cfg)
    atomic_write_json(f"{stem}.json", report)
    if report.get("sample_pairs"):
        with atomic_path(f"{stem}_pairs.png") as tmp:
            shutil.copyfile(pics / report["sample_pairs"], tmp)


def _segmentation_rows(seg_dir: Path, train_sets) -> dict:
    """Each training set's segmenter on the real val split: mIoU, its ratio to real's, per-class IoU."""
    seg = {name: _seg_result(seg_dir / name) for name in train_sets}
    real = seg["real"]["mIoU"]
    rows = {}
    for name, r in seg.items():
        rows[name] = {"mIoU": r["mIoU"], "ratio_to_real": r["mIoU"] / real if real else float("nan"),
                      "per_class_IoU": r.get("per_class_IoU")}
    return rows


IN_CHAIN_BASE = "trained inside this run (no pretrained base)"  # settings.base_model without a pretrained base
IN_CHAIN_UVIT_BASE = "pretrained inside this run on the toy data (uvit_image)"  # settings.uvit_base without one


def pretraining_of(base: str) -> dict | None:
    """How a base made by ``train.toy_web_base`` was pretrained (from its ``config.yaml``): corpus,
    pictures, seed, image steps, batch, rate, schedule; None for a folder without that record."""
    import yaml

    record = Path(base) / "config.yaml" if base else None
    if record is None or not record.is_file():
        return None
    c = yaml.safe_load(record.read_text()) or {}
    web, image = c.get("toy_web_base") or {}, c.get("image_diffusion") or {}
    if not web or not image:
        return None
    return {"corpus": image.get("dataset"), "pictures": web.get("num_images"), "seed": web.get("seed"),
            "image_steps": image.get("max_train_steps"), "batch": image.get("train_batch_size"),
            "learning_rate": image.get("learning_rate"), "lr_scheduler": image.get("lr_scheduler"),
            "lr_warmup_steps": image.get("lr_warmup_steps")}


def _report_skeleton(cfg: ToyBenchmarkConfig, rows: dict, times: dict) -> dict:
    """The report's settings and segmentation rows, with the per-generator sections still empty."""
    return {
        "profile": cfg.profile,
        "toy_figures_note": "Toy figures from the built-in shapes dataset on a 2-core CPU; not the paper's numbers.",
        "settings": {"size": cfg.size, "num_train_pairs": cfg.num_train, "num_generated_pairs": generated_pairs(cfg),
                     "num_val": cfg.num_val,
                     "segmenter": cfg.seg_config, "segmenter_iters": cfg.seg_iters, "seed": cfg.seed,
                     "backbones": list(cfg.backbones),
                     **({"uvit_text_loss_weight": cfg.uvit_text_loss_weight} if "uvit" in cfg.backbones else {}),
                     "base_model": cfg.pretrained_base or IN_CHAIN_BASE,
                     **({"uvit_base": cfg.pretrained_uvit_base or IN_CHAIN_UVIT_BASE,
                         "pretraining": {"unet": pretraining_of(cfg.pretrained_base),
                                         "uvit": pretraining_of(cfg.pretrained_uvit_base)}}
                        if "uvit" in cfg.backbones else {})},
        "segmentation": rows,
        "prompt_mask_agreement": {},
        "image_mask_consistency": {},
        "mask_optimization": {},
        "generation": {},
        "stage_seconds": times,
    }


def _backbone_entry(report: dict, backbone: str, cfg: ToyBenchmarkConfig, res: dict, rows: dict) -> dict:
    """Score one backbone's pairs into ``report``'s per-generator sections; returns its side-by-side row."""
    b, p = BRANCHES[backbone], res["paths"]
    gen = p[b.gen]
    agreement = report["prompt_mask_agreement"][b.train_set] = prompt_mask_agreement(gen)
    consistency = report["image_mask_consistency"][b.train_set] = image_mask_consistency(
        gen, cfg.seg_config, p["seg"] / "real")
    # the UNet's ablation keeps its key (and the README's reading of it); the U-ViT's sits beside it
    key = "mask_optimization" if backbone == "unet" else f"mask_optimization_{backbone}"
    report[key] = _optimization_entries(gen, b.train_set, cfg, rows)
    seconds = res["times"].get(b.generate_stage)
    gen_summary = json.loads((gen / "dataset.json").read_text()) if (gen / "dataset.json").exists() else {}
    report["generation"][b.train_set] = {"seconds": seconds,
                                         "pairs_per_s": agreement["pairs"] / seconds if seconds else None,
                                         "settings": gen_summary.get("settings")}
    return {
        "training_set": b.train_set, "mIoU": rows[b.train_set]["mIoU"],
        "ratio_to_real": rows[b.train_set]["ratio_to_real"],
        "prompt_mask_agreement": agreement["agreement"], "image_mask_consistency": consistency["mIoU"],
        "sec_per_training_step": median_sec_per_step(p[b.joint_run] / "metrics.jsonl"),
        "final_losses": final_losses(p[b.joint_run] / "metrics.jsonl"),
        "sec_per_generated_pair": seconds / agreement["pairs"] if seconds and agreement["pairs"] else None,
        "denoiser_parameters": denoiser_parameters(p[b.joint_run] / "pipeline")}


def _add_diffumask(report: dict, cfg: ToyBenchmarkConfig, res: dict) -> None:
    """DiffuMask's pairs scored like the backbones', and its generation speed."""
    p = res["paths"]
    report["prompt_mask_agreement"]["diffumask"] = prompt_mask_agreement(p["diffumask"])
    report["image_mask_consistency"]["diffumask"] = image_mask_consistency(p["diffumask"], cfg.seg_config,
                                                                           p["seg"] / "real")
    summ = p["diffumask"] / "summary.json"
    dm = json.loads(summ.read_text()) if summ.exists() else {}
    report["generation"]["diffumask"] = {
        "seconds": res["times"].get("diffumask"),
        "pairs_per_s": dm.get("pairs_per_s") or (dm.get("num_pairs", 0) / res["times"]["diffumask"]
                                                 if res["times"].get("diffumask") else None)}


def _copy_pictures(cfg: ToyBenchmarkConfig, p: dict, pics: Path) -> list[str]:
    """Real pairs, generated pairs, DiffuMask pairs: each preview that exists, copied into ``pics``."""
    sources = [(p["toy"] / "preview.png", "real_pairs.png"), (p["gen"] / "preview.png", "jodiffusion_pairs.png"),
               (p["gen_uvit"] / "preview.png", "jodiffusion_uvit_pairs.png")]
    if cfg.diffumask:
        sources.append((p["diffumask"] / "preview.png", "diffumask_pairs.png"))
    copied = []
    for src, name in sources:
        if Path(src).exists():
            shutil.copyfile(src, pics / name)
            copied.append(name)
    return sorted(copied)


SHEET_LABELS = {"real": "real toy pairs", "jodiffusion": "JoDiffusion, widened UNet",
                "jodiffusion_uvit": "JoDiffusion, U-ViT", "diffumask": "DiffuMask"}


def sample_pairs_sheet(sources: dict[str, Path], out_png: Path, palette, count: int = 4, tile: int = 96) -> bool:
    """The report's opening picture: one row per source (label on the left), ``count`` pairs per row,
    each as image | coloured mask | overlay. Returns False when no source has pairs."""
    from PIL import Image, ImageDraw

    from utils.io import save_image_atomic
    from utils.visualize import colorize, make_grid, overlay

    rows, labels = [], []
    for label, root in sources.items():
        masks = sorted((Path(root) / "ann_dir" / "train").glob("*.png"))[:count]
        tiles = []
        for m in masks:
            found = sorted((Path(root) / "img_dir" / "train").glob(f"{m.stem}.*"))
            if not found:
                continue
            with Image.open(found[0]) as im:
                img = np.asarray(im.convert("RGB"))
            mask = _read_mask(m)
            if img.shape[:2] != mask.shape:
                img = np.asarray(Image.fromarray(img).resize(mask.shape[::-1], Image.BILINEAR))
            tiles += [img, colorize(mask, palette), overlay(img, mask, palette)]
        if tiles:
            rows.append(tiles)
            labels.append(label)
    if not rows:
        return False
    side = max(t.shape[0] for r in rows for t in r)
    rows = [[t if t.shape[:2] == (side, side) else np.asarray(Image.fromarray(t).resize((side, side), Image.NEAREST))
             for t in r] for r in rows]
    scale = max(1, tile // side)
    grid = make_grid(rows, pad=2, scale=scale)
    label_w = 170
    canvas = Image.new("RGB", (grid.shape[1] + label_w, grid.shape[0]), "white")
    canvas.paste(Image.fromarray(grid), (label_w, 0))
    draw = ImageDraw.Draw(canvas)
    row_h = (side + 2) * scale
    for i, label in enumerate(labels):
        draw.text((6, 2 * scale + i * row_h + row_h // 2 - 6), label, fill=(0, 0, 0))
    save_image_atomic(out_png, np.asarray(canvas))
    return True


def _sample_pairs(train_sets: dict[str, Path], pics: Path) -> str | None:
    """sample_pairs.png from the real pairs and every generator this run trained (not the optimized copies)."""
    sources = {label: train_sets[name] for name, label in SHEET_LABELS.items() if name in train_sets}
    return "sample_pairs.png" if sample_pairs_sheet(sources, pics / "sample_pairs.png", _toy_info().palette) else None


def _fmt(x, pct=False):
    if x is None or (isinstance(x, float) and np.isnan(x)):
        return "-"
    return f"{100 * x:.1f}" if pct else f"{x:.3f}"


BACKBONE_NAMES = {"unet": "widened SD UNet", "uvit": "U-ViT (the authors')"}


def _backbone_table(r: dict) -> list[str]:
    """The backbones side by side (absent from reports written before the U-ViT branch)."""
    b = r.get("backbones") or {}
    if not b:
        return []
    uvit = f"a tiny UniDiffuser (not UniDiffuser-v1) {_uvit_pretraining(r['settings'])}" if "uvit" in b else ""
    if len(b) > 1:
        caption = ("Toy figures: both backbones get the same toy data, label VAE, image VAE and text encoder, joint "
                   f"training budget, seed, generation settings and segmenter. The U-ViT is {uvit}: this compares "
                   "two toy set-ups, not the paper's models.")
    else:  # one backbone: nothing beside it to compare with
        caption = (f"Toy figures, one backbone: the U-ViT, {uvit}; not the paper's model." if uvit else
                   "Toy figures, one backbone: the widened SD UNet; not the paper's model.")
    lines = ["", "## Backbones side by side (toy figures)", "", caption, "",
             "| backbone | denoiser parameters | s / training step | s / generated pair | synthetic-only mIoU "
             "| ratio to real | prompt-mask agreement | image-mask consistency |", "|---|---|---|---|---|---|---|---|"]
    for name, v in b.items():
        params = f"{v['denoiser_parameters'] / 1e6:.2f}M" if v.get("denoiser_parameters") else "-"
        lines.append(f"| {BACKBONE_NAMES.get(name, name)} | {params} | {_fmt(v.get('sec_per_training_step'))} | "
                     f"{_fmt(v.get('sec_per_generated_pair'))} | {_fmt(v.get('mIoU'))} | {_fmt(v.get('ratio_to_real'))} | "
                     f"{_fmt(v.get('prompt_mask_agreement'))} | {_fmt(v.get('image_mask_consistency'))} |")
    for name, v in b.items():
        if v.get("final_losses"):
            weight = r["settings"].get("uvit_text_loss_weight") if name == "uvit" else None
            lines += ["", f"{BACKBONE_NAMES.get(name, name)}, final training losses (mean of the last {FINAL_LOSS_ROWS} logged)"
                      + (f", text loss weight {weight:g}" if weight is not None else "") + ": "
                      + ", ".join(f"{k} {x:.4f}" for k, x in v["final_losses"].items()) + "."]
    return lines


def _uvit_pretraining(s: dict) -> str:
    """Where the U-ViT's pretraining stands against the UNet's, for the side-by-side's caption."""
    base, uvit_base = s.get("base_model"), s.get("uvit_base", IN_CHAIN_UVIT_BASE)
    if uvit_base == IN_CHAIN_UVIT_BASE:
        return ("pretrained here" if base == IN_CHAIN_BASE else
                f"pretrained here on the toy data (uvit_image), while the UNet starts from the pretrained base "
                f"{base}, so their pretraining differs")
    ours, theirs = (s.get("pretraining") or {}).get("uvit"), (s.get("pretraining") or {}).get("unet")
    start = f"starting from {uvit_base}, pretrained image-only like the UNet's base {base}"
    if ours and ours == theirs:
        return (f"{start}: the same {ours['image_steps']} steps of {ours['batch']} (rate {ours['learning_rate']:g}, "
                f"{ours['lr_scheduler']}) on the same toy web corpus ({ours['pictures']} pictures, seed {ours['seed']}), "
                "so their pretraining is equal")
    differ = sorted(k for k in set(ours or {}) | set(theirs or {}) if (ours or {}).get(k) != (theirs or {}).get(k))
    return f"{start}, but their pretraining differs ({', '.join(differ) or 'no record of either'})"


def render_markdown(r: dict, info) -> str:
    lines = (_intro_lines(r) + _segmentation_section(r, info) + _generated_data_section(r) + _backbone_table(r)
             + _mask_optimization_sections(r) + _pictures_sections(r) + _stage_time_section(r))
    return "\n".join(lines) + "\n"


def _intro_lines(r: dict) -> list[str]:
    """Title, the toy-figures note and the settings every training set shares."""
    s = r["settings"]
    return [
        f"# Toy benchmark report ({r['profile']} profile)",
        "",
        f"> {r['toy_figures_note']}" + (" These are what the 15-minute demo buys, not converged figures."
                                        if r["profile"] == "demo" else ""),
        "",
        *([f"![sample pairs](report_files/{r['sample_pairs']})", "",
           "Each row: four pairs from one training set, each shown as image | mask | overlay.", ""]
          if r.get("sample_pairs") else []),
        "How to read the figures:",
        "- **mIoU**: a segmenter trained on that set alone, scored on the real toy val split (higher is better).",
        "- **ratio to real**: that mIoU divided by the real-trained segmenter's; 1.0 means the synthetic set "
        "is as good as real pairs.",
        "- **prompt-mask agreement**: share of generated masks holding exactly the classes their prompt names.",
        "- **image-mask consistency**: mIoU between each generated mask and what the real-trained segmenter "
        "sees in the generated image.",
        f"- **base model**: {r['settings'].get('base_model') or 'trained inside this run'}.",
        "",
        f"{s['num_train_pairs']} real training pairs"
        + (f", {s['num_generated_pairs']} generated per generator" if "num_generated_pairs" in s else "")
        + f", {s['size']} px; segmenter `{s['segmenter']}`, "
        f"{s['segmenter_iters']} iterations for every training set; evaluated on {s['num_val']} real toy val pairs.",
    ]


# below this real-only mIoU a ratio to real compares against a segmenter that has not learned the task
REAL_ONLY_FLOOR = 0.7


def _segmentation_section(r: dict, info) -> list[str]:
    """mIoU per training set on real val, the largest confusions, and a caution when real is weak."""
    lines = [
        "",
        "## Segmentation on the real val split",
        "",
        "| training set | mIoU | ratio to real | " + " | ".join(info.seg_classes) + " |",
        "|---|---|---|" + "---|" * len(info.seg_classes),
    ]
    for name, row in r["segmentation"].items():
        pcs = row.get("per_class_IoU") or {}
        vals = [pcs.get(c) if isinstance(pcs, dict) else None for c in info.seg_classes]
        lines.append(f"| {name} | {_fmt(row['mIoU'])} | {_fmt(row['ratio_to_real'])} | "
                     + " | ".join(_fmt(v) for v in vals) + " |")
    confusion = r.get("real_val_confusion") or {}
    if confusion:
        lines += ["", "Largest confusions on real val (share of the true class's pixels given another label):"]
        for name, c in confusion.items():
            lines.append(f"- {name}: " + ", ".join(f"{x['truth']} -> {x['predicted']} {100 * x['share']:.0f}%"
                                                   for x in c["largest"]))
    real = r["segmentation"].get("real", {}).get("mIoU") or 0.0
    if real < REAL_ONLY_FLOOR:
        lines += ["", f"**Caution:** the real-trained segmenter reached only {real:.3f} mIoU (< {REAL_ONLY_FLOOR}), so "
                  "it has not really learned the task and the ratios above say little. Train longer (the benchmark "
                  "profile) before reading them."]
    return lines


def _generated_data_section(r: dict) -> list[str]:
    """Each generator's agreement, consistency and speed, then both scores by prompt size."""
    lines = ["", "## Generated data", "",
             "| generator | pairs | prompt-mask agreement | image-mask consistency (mIoU) | pairs/s |",
             "|---|---|---|---|---|"]
    for g in r["prompt_mask_agreement"]:
        lines.append(f"| {g} | {r['prompt_mask_agreement'][g].get('pairs', '-')} | {_fmt(r['prompt_mask_agreement'][g]['agreement'])} | "
                     f"{_fmt(r['image_mask_consistency'][g]['mIoU'])} | "
                     f"{_fmt(r['generation'].get(g, {}).get('pairs_per_s'))} |")
    for g, a in r["prompt_mask_agreement"].items():
        parts = [f"{k} named class{'es' if k != '1' else ''}: {_fmt(v['agreement'])} ({v['pairs']} pairs)"
                 for k, v in (a.get("by_named_classes") or {}).items()]
        if parts:
            lines.append(f"\n{g} agreement by prompt: " + "; ".join(parts) + ".")
    for g, c in r["image_mask_consistency"].items():
        parts = [f"{k} named class{'es' if k != '1' else ''}: {_fmt(v['mIoU'])} ({v['pairs']} pairs)"
                 for k, v in (c.get("by_named_classes") or {}).items()]
        if parts:
            lines.append(f"\n{g} consistency by prompt: " + "; ".join(parts) + ".")
    lines += ["", "Prompt-mask agreement: share of pairs whose mask holds exactly the classes the prompt names. "
              "Image-mask consistency: mIoU between the generated mask and the real-trained segmenter's "
              "prediction on the generated image."]
    return lines


def _mask_optimization_sections(r: dict) -> list[str]:
    """One table per backbone whose pairs went through mask optimization."""
    lines = []
    for key, title in (("mask_optimization", "JoDiffusion pairs"), ("mask_optimization_uvit", "JoDiffusion U-ViT pairs")):
        if not r.get(key):
            continue
        lines += ["", f"## Mask optimization ({title})", "",
                  "| threshold (px at reference size) | pixels changed | components changed | prompt-mask agreement | segmenter mIoU |",
                  "|---|---|---|---|---|"]
        for k, v in r[key].items():
            lines.append(f"| {k.split('_')[1]} | {v.get('changed_pixels', '-')} | {v.get('changed_components', '-')} | "
                         f"{_fmt(v.get('prompt_mask_agreement'))} | {_fmt(v.get('segmenter_mIoU'))} |")
    return lines


def _pictures_sections(r: dict) -> list[str]:
    """The copied pair previews, then the loss curves."""
    lines = ["", "## Pictures", ""]
    for pic in r["pictures"]:
        lines.append(f"![{pic}](report_files/{pic})")
    lines += ["", "## Loss curves", ""]
    for title, png in r["loss_curves"].items():
        lines.append(f"![{title}](report_files/{png})")
    return lines


def _stage_time_section(r: dict) -> list[str]:
    lines = ["", "## Stage wall time (s)", "", "| stage | seconds |", "|---|---|"]
    for k, v in r["stage_seconds"].items():
        lines.append(f"| {k} | {v:.0f} |")
    lines.append(f"| total | {sum(r['stage_seconds'].values()):.0f} |")
    return lines


def main(argv=None) -> dict:
    cfg = parse_config(ToyBenchmarkConfig, argv, description=__doc__)
    if not cfg.backbones:
        die("backbones: empty; name at least one of unet, uvit")
    run = RunDir(cfg.output_dir)
    run.save_config(cfg)
    t0 = time.time()
    res = run_chain(cfg, run)
    report = write_report(cfg, res, run)
    run.log(f"toy benchmark ({cfg.profile}) finished; chain {sum(res['times'].values()):.0f} s, "
            f"this call {time.time() - t0:.0f} s")
    seg = report["segmentation"]
    run.log("mIoU on real toy val: " + ", ".join(f"{k} {v['mIoU']:.3f}" for k, v in seg.items()))
    run.log(f"report: {Path(cfg.output_dir) / 'report.md'} (+ report.json, report_files/)")
    return report


if __name__ == "__main__":
    main()
