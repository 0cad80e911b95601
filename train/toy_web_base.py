"""Make the pretrained toy base model from scratch: the toy world's "Stable Diffusion".

    nohup nice -n 19 python -m train.toy_web_base --output_dir runs/toy_web_base > runs/toy_web_base.out 2>&1 &

The defaults are the shipped base's recipe (``assets/toy_base``). Measured alone on the 2-core CPU:
corpus ~3 min, VAE ~13, latent cache ~2, UNet 8000 steps of 32 at ~0.43 s (~58 min): ~75 minutes,
several times that beside other jobs.

Three stages, each a subprocess writing its own run folder under ``output_dir``:

1. ``corpus/``: the toy "web" corpus (``dataset/toy_web.py``): captioned pictures of 13 shape
   kinds, no masks, seeds apart from the segmentation set's;
2. ``base_init/``: ``train.toy_base_model`` on that corpus: the image VAE, a tokenizer whose
   vocabulary covers the web captions and the segmentation toy captions, the frozen random text
   encoder and an untrained UNet (SD layout);
3. ``image_diffusion/``: ``train.joint_diffusion --mode image`` trains the UNet on the corpus.

Then ``model/`` is the shipped base: the SD folder (``StableDiffusionPipeline.from_pretrained``
loads it) with ``config.yaml`` (this command's settings and both stages' resolved configs),
``metrics.jsonl`` + ``training_curve.png`` (UNet), ``vae_metrics.jsonl``, ``samples.png`` and
``sha256.txt`` (every weights file). Rerunning the same command resumes: the corpus and the
VAE are kept, the UNet continues from its latest checkpoint (a larger ``--max_train_steps``
trains longer).

``--backbone uvit`` makes the U-ViT's counterpart of that base, for a side-by-side at equal
pretraining (``bench.toy_benchmark --pretrained_uvit_base``):

    python -m train.toy_web_base --backbone uvit --output_dir runs/toy_web_uvit_base

the same corpus (same seed and size), stage 2 is ``train.toy_unidiffuser_base`` on ``--sd_base``
(the UniDiffuser shares that base's image VAE, text encoder and tokenizer, byte for byte), and
stage 3 pretrains its U-ViT with UniDiffuser's objective on the same budget: steps, batch, rate
and schedule. ``model/`` is then a UniDiffuser folder (no samples: it draws pictures only after
``inference.uvit_init``). A U-ViT image step took 0.45 s here on 2026-12-02's first run and
0.66-0.76 s on a slower day: 8000 steps are 1-1.7 hours, more than a session holds beside the chain.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from dataset.toy_web import MAX_OBJECTS, vocabulary_captions, write_web_corpus
from utils.config import config_to_dict, die, parse_config
from utils.io import RunDir, atomic_write_text, read_jsonl
from utils.visualize import plot_curves

# stage 3's profile per backbone: the same budget (batch 32, rate 2e-3, cosine), each with its own objective
IMAGE_DIFFUSION_CONFIGS = {"unet": "configs/joint_diffusion/toy_image_bench.yaml",
                           "uvit": "configs/joint_diffusion/toy_unidiffuser_image.yaml"}


@dataclass
class ToyWebBaseConfig:
    """Build the pretrained toy base model: web corpus -> image VAE + text parts -> image-only UNet."""

    output_dir: str = field(default="runs/toy_web_base", metadata={"help": "run folder (the base lands in model/)"})
    backbone: str = field(default="unet", metadata={
        "help": "unet: the SD-layout base (assets/toy_base); uvit: a toy UniDiffuser pretrained the same way",
        "choices": tuple(IMAGE_DIFFUSION_CONFIGS)})
    sd_base: str = field(default="assets/toy_base", metadata={
        "help": "backbone uvit: the SD base whose image VAE, text encoder and tokenizer the UniDiffuser shares"})
    corpus_dir: str | None = field(default=None, metadata={"help": "corpus folder (default: <output_dir>/corpus)"})
    # 20000 pictures x 2 flips: ~13 epochs of the UNet's 8000 steps of 32
    num_images: int = field(default=20000, metadata={"help": "pictures in the web corpus"})
    max_objects: int = field(default=MAX_OBJECTS, metadata={"help": "at most this many shapes per picture"})
    resolution: int = field(default=32, metadata={"help": "image side in pixels"})
    seed: int = field(default=0, metadata={"help": "seed of the corpus and of both training stages"})
    base_model_config: str = field(default="configs/toy_base_model/web.yaml",
                                   metadata={"help": "train.toy_base_model profile (VAE, text encoder, UNet shape)"})
    base_model_args: list[str] = field(default_factory=list, metadata={"help": "extra flags for that stage"})
    image_diffusion_config: str = field(default="", metadata={
        "help": "train.joint_diffusion profile (run with --mode image); '' = the backbone's: "
                + ", ".join(f"{k} {v}" for k, v in IMAGE_DIFFUSION_CONFIGS.items())})
    image_diffusion_args: list[str] = field(
        default_factory=lambda: ["--lr_warmup_steps", "200", "--checkpointing_steps", "500", "--logging_steps", "50"],
        metadata={"help": "extra flags for that stage"})
    max_train_steps: int = field(default=8000, metadata={
        "help": "UNet steps (the cosine rate spans them); rerun with more to train longer"})


_DISTRIBUTED_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                          "GROUP_RANK", "ROLE_RANK", "ACCELERATE_USE_CPU")


def run_stage(run: RunDir, name: str, module: str, args: list[str], folder: Path) -> None:
    """``python -m module args`` with this interpreter; a failure stops here naming its log."""
    run.log(f"stage {name}: python -m {module} {' '.join(args)}")
    # one process per stage: no launcher's rank variables leak in (a stage would wait for its peers)
    env = {k: v for k, v in os.environ.items() if k not in _DISTRIBUTED_VARIABLES}
    proc = subprocess.Popen([sys.executable, "-m", module, *args], env=env)
    try:
        code = proc.wait()
    finally:  # stopped (SIGTERM / Ctrl-C): stop the stage too, it would run on orphaned
        if proc.poll() is None:
            proc.terminate()
            proc.wait()
    if code != 0:
        die(f"stage {name} failed (exit {code}); see {folder / 'log.txt'}")


def sha256_lines(folder: Path) -> str:
    """``<sha256>  <relative path>`` for every weights file under ``folder`` (sha256sum format)."""
    lines = []
    for path in sorted(folder.rglob("*.safetensors")):
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        lines.append(f"{digest}  {path.relative_to(folder).as_posix()}")
    return "\n".join(lines) + "\n"


def last_row_per_step(metrics: Path) -> str:
    """A metrics.jsonl as one curve: a run resumed from a checkpoint logs the steps after it twice;
    the later row (the run that went on) is kept, rows without a step (events) stay in order."""
    rows = read_jsonl(metrics)
    by_step = {int(r["step"]): r for r in rows if "step" in r}
    events = [r for r in rows if "step" not in r]
    return "".join(json.dumps(r) + "\n" for r in [*(by_step[k] for k in sorted(by_step)), *events])


def export_model(cfg: ToyWebBaseConfig, argv: list[str], out: Path) -> Path:
    """``model/``: the trained pipeline plus what documents it (configs, curves, samples, hashes)."""
    base_init, unet_run, model = out / "base_init", out / "image_diffusion", out / "model"
    if model.exists():
        shutil.rmtree(model)
    shutil.copytree(unet_run / "pipeline", model)
    # only the UNet's stage 2 trains (the VAE); the UniDiffuser writer's settings are this command's
    trained_init = cfg.backbone == "unet"
    configs = {"command": " ".join(["python -m train.toy_web_base", *argv]),
               "toy_web_base": config_to_dict(cfg),
               "base_model": yaml.safe_load((base_init / "config.yaml").read_text()) if trained_init else None,
               "image_diffusion": yaml.safe_load((unet_run / "config.yaml").read_text())}
    atomic_write_text(model / "config.yaml", yaml.safe_dump(configs, sort_keys=False))
    atomic_write_text(model / "metrics.jsonl", last_row_per_step(unet_run / "metrics.jsonl"))
    if trained_init:
        shutil.copy(base_init / "metrics.jsonl", model / "vae_metrics.jsonl")
    denoiser = {"unet": "UNet", "uvit": "U-ViT (UniDiffuser objective)"}[cfg.backbone]
    plot_curves(model / "metrics.jsonl", model / "training_curve.png", keys=("loss",), smooth=5,
                title=f"toy web base: image-only {denoiser} loss")
    grids = sorted((unet_run / "validation").glob("step-*.png"), key=lambda p: int(p.stem.split("-")[1]))
    if grids:
        shutil.copy(grids[-1], model / "samples.png")
    atomic_write_text(model / "sha256.txt", sha256_lines(model))
    return model


def main(argv=None) -> None:
    cfg = parse_config(ToyWebBaseConfig, argv, description=__doc__)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so run_stage's cleanup runs on `kill`
    out = Path(cfg.output_dir)
    run = RunDir(out)
    run.save_config(cfg)
    corpus = Path(cfg.corpus_dir or out / "corpus")
    try:
        report = write_web_corpus(corpus, cfg.resolution, cfg.num_images, cfg.seed, cfg.max_objects)
    except ValueError as e:
        die(str(e))
    run.log(f"web corpus {corpus}: {report['written']} pictures written, {report['skipped']} kept")
    vocabulary = corpus / "vocabulary.txt"
    atomic_write_text(vocabulary, "\n".join(vocabulary_captions()) + "\n")
    common = ["--dataset", "toy_web", "--data_root", str(corpus), "--resolution", str(cfg.resolution),
              "--seed", str(cfg.seed)]

    base_init = out / "base_init"
    if (base_init / "model_index.json").exists():
        run.log(f"reusing the VAE and text parts in {base_init}")
    else:
        if base_init.exists():  # a stage cut short: its folder holds no model yet, start it again
            shutil.rmtree(base_init)
        if cfg.backbone == "uvit":
            run_stage(run, "base_model", "train.toy_unidiffuser_base",
                      ["--sd_base", cfg.sd_base, "--output_dir", str(base_init), "--seed", str(cfg.seed)], base_init)
        else:
            run_stage(run, "base_model", "train.toy_base_model",
                      ["--config", cfg.base_model_config, *common, "--vocabulary_file", str(vocabulary),
                       "--output_dir", str(base_init), *cfg.base_model_args], base_init)

    unet_run = out / "image_diffusion"
    image_config = cfg.image_diffusion_config or IMAGE_DIFFUSION_CONFIGS[cfg.backbone]
    run_stage(run, "image_diffusion", "train.joint_diffusion",
              ["--config", image_config, "--mode", "image", *common, "--pretrained_model",
               str(base_init), "--output_dir", str(unet_run), "--resume_from_checkpoint", "latest",
               *cfg.image_diffusion_args, "--max_train_steps", str(cfg.max_train_steps)], unet_run)

    model = export_model(cfg, list(sys.argv[1:] if argv is None else argv), out)
    size = sum(p.stat().st_size for p in model.rglob("*.safetensors"))
    if cfg.backbone == "uvit":
        run.log(f"wrote the U-ViT base to {model} ({size / 2**20:.1f} MiB of weights); the toy benchmark "
                f"starts its U-ViT there with --pretrained_uvit_base {model}")
    else:
        run.log(f"wrote the base model to {model} ({size / 2**20:.1f} MiB of weights; load it with "
                f"StableDiffusionPipeline.from_pretrained); copy it to assets/toy_base/ to ship it")
    run.close()


if __name__ == "__main__":
    main()
