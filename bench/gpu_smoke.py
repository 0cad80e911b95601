"""GPU smoke test: the whole JoDiffusion chain at Stable Diffusion 1.5's real sizes, random weights.

    python -m bench.gpu_smoke                                  # on a CUDA machine
    python -m bench.gpu_smoke --mixed_precision bf16           # the same in bf16
    python -m bench.gpu_smoke --dry_run true                   # no GPU needed: build the real sizes on
                                                               # the meta device, print them, exit
    python -m bench.gpu_smoke --tiny --device cpu --out /tmp/gpu_smoke_tiny   # plumbing only, CPU, < 1 min

What CPU tests cannot check: the real configuration on CUDA. No download and no model hub
(``HF_HUB_OFFLINE=1`` here and in every subprocess): the components are made here with random
weights, in the on-disk layout ``from_pretrained`` loads (``unet/ vae/ text_encoder/ tokenizer/
scheduler/ model_index.json``), through ``models.tiny_kit`` at SD 1.5's sizes:

- UNet: SD 1.5's ``unet/config.json`` (320-640-1280-1280, 2 layers per block, cross-attention 768;
  859.5M parameters); image VAE: SD's ``AutoencoderKL`` (128-256-512-512, 4 latent channels,
  scaling 0.18215); text encoder: CLIP ViT-L/14 text size (768 wide, 12 layers, 12 heads, MLP
  3072, 77 positions) over a tokenizer built offline from the toy captions' words (max length 77);
  scheduler: SD's training schedule (DDPM, scaled_linear 0.00085-0.012, 1000 steps);
- label VAE: the paper's ``LabelVAE`` widths (factor 8, ~15M parameters) for the toy classes.

Then, each through the project's real entry point, started with this same Python:

1. ``utils.make_toy_dataset``: a 512 px toy dataset (64 train / 16 val pairs);
2. ``inference.jodiffusion``: widening (conv_in/conv_out 4 -> 8 channels);
3. ``train.joint_diffusion``: 20 joint steps at 512 px, batch 2, fp16 (or ``--mixed_precision
   bf16``), gradient checkpointing, no validation images, one checkpoint (at the last step);
   then the same command with ``--resume_from_checkpoint latest`` and 10 more steps;
4. ``inference.generate``: 8 pairs, 10 DPM-Solver++ steps, batch 2, on CUDA.

Checks (any failure: exit code 1, with the failures listed and saved): every logged loss (total,
image, label) is finite; steps 1..30 were each logged once and the log says the second run
resumed at step 20; the exported pipeline's UNet takes and predicts 8 channels and its VAE, text
encoder and label VAE are the widened model's, bit for bit (not rounded to fp16/bf16); every generated
image and mask has the training resolution, no image and no mask is constant (a NaN decode
comes out constant too: NaN turns to 0 in uint8 and to label 0 in the argmax), masks hold only
valid labels, and not all images are identical. Generation runs with ``--confidence_threshold 0``:
a random label decoder is never 50% sure of anything, so the default threshold would turn every
pixel into 255.

Figures, printed as a table and saved atomically to ``bench/results/gpu_smoke.json`` (``--tiny``:
``<out>/gpu_smoke.json``; ``--results`` sets another path): device, torch / CUDA / library versions;
joint training s/step (the trainer's own ``sec_per_step`` in ``metrics.jsonl``, logged every step,
median without the first two steps of each run); the UNet training step measured here (the
trained widened UNet, batch 2, the same autocast dtype, gradient checkpointing, AdamW, timed
with ``torch.cuda.synchronize``) and its peak GPU memory (``torch.cuda.max_memory_allocated``:
UNet weights, gradients, AdamW state and activations; the trainer does not report it); and
generation pairs/s (from the times the pairs' manifest records were written, after the first
batch, so model loading and warm-up are left out), plus each stage's wall time.

Everything goes under ``--out`` (default ``runs/gpu_smoke``; roughly 22 GB at the real sizes: base
model, widened model, one checkpoint with its AdamW state, the exported pipeline). A rerun
deletes this script's own run folders there first (the toy dataset is kept and reused).
Without a CUDA device the script stops with a message, unless ``--device cpu --tiny`` is given.
``--tiny`` uses the ``models.tiny_kit`` defaults (32 px) and 2 + 1 training steps: the same
chain, to check the plumbing anywhere.
"""
from __future__ import annotations

import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from models.tiny_kit import TinySDSpec, build_tiny_sd, tiny_components, words_from_texts
from utils.config import config_to_dict, die, parse_config
from utils.io import atomic_write_json, read_jsonl

REPO = Path(__file__).resolve().parents[1]

# Stable Diffusion 1.5 in models.tiny_kit's terms (the other UNet keys of SD 1.5's
# unet/config.json are diffusers' defaults; the VAE's sample_size comes out as 64 * 8 = 512).
SD15_SPEC = TinySDSpec(
    sample_size=64, unet_channels=(320, 640, 1280, 1280), unet_layers_per_block=2, unet_attention=None,
    attention_head_dim=8, vae_channels=(128, 256, 512, 512), vae_layers_per_block=2, latent_channels=4,
    text_hidden=768, text_layers=12, text_heads=12, max_length=77, norm_num_groups=32,
)
SD_VAE_SCALING = 0.18215
SD15_UNET_PARAMS = 859_520_964  # SD 1.5's published UNet size (tests/test_joint_unet.py checks it too)
# the tiny label VAE must downsample like the tiny image VAE (factor 4: three widths)
TINY_LABEL_VAE = dict(encoder_channels=(8, 8, 8), decoder_channels=(8, 8, 8), norm_num_groups=8)
RUN_FOLDERS = ("base_model", "label_vae", "init", "joint", "gen", "logs")


@dataclass
class GpuSmokeConfig:
    """The JoDiffusion chain at SD 1.5 sizes (random weights) on CUDA: init, train + resume, generate."""

    out: str = field(default="runs/gpu_smoke", metadata={"help": "folder for everything this run writes"})
    device: str = field(default="cuda", metadata={"help": "cuda, or cpu (only with --tiny)"})
    tiny: bool = field(default=False, metadata={"help": "tiny_kit sizes (32 px), 2 + 1 steps: check the plumbing"})
    dry_run: bool = field(default=False, metadata={"help": "build the components on the meta device, print sizes, exit"})
    mixed_precision: str = field(default="fp16", metadata={"help": "fp16 or bf16 (no on CPU)"})
    num_train: int = field(default=64, metadata={"help": "toy training pairs"})
    num_val: int = field(default=16, metadata={"help": "toy validation pairs"})
    batch_size: int = field(default=2, metadata={"help": "training batch"})
    train_steps: int | None = field(default=None, metadata={"help": "steps of the first run, checkpointed at its end (default 20; --tiny 2)"})
    resume_steps: int | None = field(default=None, metadata={"help": "further steps of the resumed run (default 10; --tiny 1)"})
    learning_rate: float = field(default=5e-5, metadata={"help": "the paper's"})
    use_8bit_adam: bool = field(default=False, metadata={"help": "bitsandbytes AdamW8bit (must be installed)"})
    num_workers: int | None = field(default=None, metadata={"help": "data loader workers (default 4; --tiny 0)"})
    gen_pairs: int | None = field(default=None, metadata={"help": "pairs to generate (default 8; --tiny 4)"})
    gen_batch_size: int = field(default=2, metadata={"help": "pairs per generation batch"})
    gen_steps: int | None = field(default=None, metadata={"help": "DPM-Solver++ steps (default 10; --tiny 2)"})
    timed_steps: int = field(default=5, metadata={"help": "UNet training steps timed here (after 2 warm-up steps)"})
    seed: int = field(default=0, metadata={"help": "weights, data order, noise"})
    results: str | None = field(default=None, metadata={"help": "JSON path (default bench/results/gpu_smoke.json; --tiny: <out>/gpu_smoke.json)"})


class SmokeFailure(Exception):
    """A stage failed or a check did not hold; the message says which."""


# ---- the components ------------------------------------------------------------------------

def sd_training_scheduler():
    """SD's training schedule (scaled_linear 0.00085-0.012 over 1000 steps) as a DDPM scheduler."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False, steps_offset=1)


def build_components(words, tiny: bool, num_labels: int, seed: int) -> tuple[dict, object]:
    """(SD components, label VAE) with random weights; at SD 1.5's sizes unless ``tiny``."""
    from models.label_vae import build_label_vae

    comps = tiny_components(words, TinySDSpec() if tiny else SD15_SPEC, seed=seed)
    comps["scheduler"] = sd_training_scheduler()
    comps["vae"].register_to_config(scaling_factor=SD_VAE_SCALING)
    torch.manual_seed(seed + 1)
    label_vae = build_label_vae("label_vae", num_labels, **(TINY_LABEL_VAE if tiny else {}))
    return comps, label_vae


def count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def toy_words(info) -> list[str]:
    """Every word of the toy captions (all splits) and of the class-name fallback captions."""
    from dataset.latents import vocabulary_texts

    return words_from_texts(vocabulary_texts(info))


def dry_run(cfg: GpuSmokeConfig) -> None:
    """Build the components on the meta device (no weights, no memory) and print their sizes."""
    from accelerate import init_empty_weights

    from dataset.toy_semantic import INFO

    with init_empty_weights():
        comps, label_vae = build_components(toy_words(INFO), cfg.tiny, INFO.num_labels, cfg.seed)
    unet, vae, text = comps["unet"], comps["vae"], comps["text_encoder"]
    sched = comps["scheduler"].config
    print(f"{'tiny' if cfg.tiny else 'SD 1.5'} sizes, random weights (meta device, nothing allocated):")
    print(f"  unet          {count(unet) / 1e6:8.2f}M  {list(unet.config.block_out_channels)}, "
          f"{unet.config.layers_per_block} layers/block, cross-attention {unet.config.cross_attention_dim}, "
          f"sample {unet.config.sample_size}")
    print(f"  vae           {count(vae) / 1e6:8.2f}M  {list(vae.config.block_out_channels)}, latent "
          f"{vae.config.latent_channels}, scaling {vae.config.scaling_factor}, sample {vae.config.sample_size}")
    tc = text.config
    print(f"  text_encoder  {count(text) / 1e6:8.2f}M  hidden {tc.hidden_size}, {tc.num_hidden_layers} layers, "
          f"{tc.num_attention_heads} heads, MLP {tc.intermediate_size}, positions {tc.max_position_embeddings}, "
          f"vocab {tc.vocab_size}; tokenizer max_length {comps['tokenizer'].model_max_length}")
    print(f"  label_vae     {count(label_vae) / 1e6:8.2f}M  factor {label_vae.downsample_factor}, "
          f"{label_vae.config.num_labels} labels, scaling {label_vae.config.scaling_factor}")
    print(f"  scheduler     {type(comps['scheduler']).__name__} {sched.beta_schedule} {sched.beta_start}-"
          f"{sched.beta_end}, {sched.num_train_timesteps} steps")
    if not cfg.tiny and count(unet) != SD15_UNET_PARAMS:
        die(f"the UNet has {count(unet):,} parameters, not SD 1.5's {SD15_UNET_PARAMS:,}")


# ---- running the entry points ---------------------------------------------------------------

class Stages:
    """Runs each entry point as ``sys.executable -m module`` and keeps wall times and logs."""

    def __init__(self, out: Path, device: str):
        self.logs = out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.wall: dict[str, float] = {}
        self.env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
        if device == "cpu":  # keep accelerate (trainer, generator) off any GPU
            self.env.update(CUDA_VISIBLE_DEVICES="", ACCELERATE_USE_CPU="1")

    def run(self, name: str, module: str, *args) -> Path:
        cmd = [sys.executable, "-m", module, *map(str, args)]
        log = self.logs / f"{name}.log"
        print(f"[{name}] python -m {module} {' '.join(map(str, args))}", flush=True)
        t0 = time.perf_counter()
        with open(log, "w") as f:
            rc = subprocess.run(cmd, check=False, cwd=REPO, env=self.env, stdout=f, stderr=subprocess.STDOUT).returncode
        self.wall[name] = time.perf_counter() - t0
        if rc != 0:
            tail = "\n".join("    " + line for line in log.read_text(errors="replace").splitlines()[-25:])
            raise SmokeFailure(f"{name} failed (exit {rc}); the end of {log}:\n{tail}")
        return log

    def timed(self, name: str, fn, *args):
        print(f"[{name}]", flush=True)
        t0 = time.perf_counter()
        result = fn(*args)
        self.wall[name] = time.perf_counter() - t0
        return result


def write_base_model(toy: Path, out: Path, tiny: bool, seed: int) -> dict:
    """The random-weight base SD folder and label VAE folder; returns their parameter counts."""
    from dataset import get_dataset_info

    info = get_dataset_info("toy", str(toy))
    comps, label_vae = build_components(toy_words(info), tiny, info.num_labels, seed)
    params = dict(unet=count(comps["unet"]), vae=count(comps["vae"]), text_encoder=count(comps["text_encoder"]),
                  label_vae=count(label_vae))
    build_tiny_sd(out / "base_model", [], components=comps)
    label_vae.save_pretrained(out / "label_vae", safe_serialization=True)
    return params


def measure_unet_step(unet_dir: Path, device: torch.device, precision: str, batch: int, text_len: int,
                      image_channels: int, lr: float, timed_steps: int, seed: int) -> dict:
    """A training step of the widened UNet, as the trainer runs it: autocast, gradient checkpointing,
    AdamW, grad clipping (and fp16 loss scaling). Seconds per step and, on CUDA, the peak memory."""
    from diffusers import UNet2DConditionModel

    from models.joint_unet import joint_epsilon_loss

    unet = UNet2DConditionModel.from_pretrained(unet_dir).to(device).train()
    unet.enable_gradient_checkpointing()
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, foreach=True)
    amp_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
    # a low initial loss scale: a step skipped for inf gradients would leave AdamW's state unallocated
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0**10) if precision == "fp16" else None
    gen = torch.Generator(device=device).manual_seed(seed)
    c, s = unet.config.in_channels, unet.config.sample_size
    latents = torch.randn(batch, c, s, s, generator=gen, device=device)
    noise = torch.randn(batch, c, s, s, generator=gen, device=device)
    t = torch.randint(0, 1000, (batch,), generator=gen, device=device)
    text = torch.randn(batch, text_len, unet.config.cross_attention_dim, generator=gen, device=device)
    cuda = device.type == "cuda"

    def step() -> float:
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            pred = unet(latents * 0.7 + noise * 0.7, t, text).sample
        loss = joint_epsilon_loss(pred, noise, image_channels)[0]
        if scaler is None:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
            scaler.step(opt)
            scaler.update()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        weights = torch.cuda.memory_allocated(device)
    losses, times = [], []
    for i in range(2 + timed_steps):
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        losses.append(step())
        if cuda:
            torch.cuda.synchronize(device)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    result = dict(sec_per_step=statistics.median(times), sec_per_step_min=min(times), timed_steps=timed_steps,
                  losses_finite=all(math.isfinite(x) for x in losses), optimizer_state_allocated=len(opt.state) > 0)
    if cuda:
        result.update(peak_memory_gib=torch.cuda.max_memory_allocated(device) / 2**30,
                      weights_memory_gib=weights / 2**30, memory_method="torch.cuda.max_memory_allocated")
    return result  # the UNet and its optimiser state are freed with this frame


# ---- checks ---------------------------------------------------------------------------------

def check_training(joint: Path, first: int, total: int, failures: list[str]) -> dict:
    """Finite losses, every step logged once, the resume really resumed; the trainer's s/step."""
    rows = [r for r in read_jsonl(joint / "metrics.jsonl") if "loss" in r]
    steps = [int(r["step"]) for r in rows]
    if sorted(steps) != list(range(1, total + 1)):
        failures.append(f"training logged steps {steps}, expected 1..{total} once each")
    bad = [(r["step"], k, r[k]) for r in rows for k in ("loss", "image_loss", "label_loss")
           if not (isinstance(r.get(k), (int, float)) and math.isfinite(r[k]))]
    if bad:
        failures.append(f"non-finite or missing losses (step, key, value): {bad[:5]}")
    log = (joint / "log.txt").read_text() if (joint / "log.txt").is_file() else ""
    if f"checkpoint-{first} at step {first}" not in log:
        failures.append(f"{joint / 'log.txt'} does not say the second run resumed from checkpoint-{first}")
    if not (joint / f"checkpoint-{first}" / "unet").is_dir():
        failures.append(f"no {joint / f'checkpoint-{first}'}/unet")
    unet_cfg = joint / "pipeline" / "unet" / "config.json"
    if not unet_cfg.is_file():
        failures.append(f"no exported pipeline ({unet_cfg} missing)")
    else:
        c = json.loads(unet_cfg.read_text())
        if (c["in_channels"], c["out_channels"]) != (8, 8):
            failures.append(f"the exported UNet maps {c['in_channels']} -> {c['out_channels']} channels, not 8 -> 8")
    # the frozen components are cast to fp16/bf16 for training; the export must hold the originals
    from safetensors.torch import load_file

    init = joint.parent / "init"
    for sub in ("vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
                "label_vae/diffusion_pytorch_model.safetensors"):
        if not (joint / "pipeline" / sub).is_file():
            failures.append(f"no {joint / 'pipeline' / sub}")
            continue
        a, b = load_file(joint / "pipeline" / sub), load_file(init / sub)
        if a.keys() != b.keys() or any(a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k]) for k in a):
            failures.append(f"the exported {sub.split('/')[0]} differs from {init / sub} (rounded to the training dtype?)")
    warm = {1, 2, first + 1, first + 2}
    secs = [r["sec_per_step"] for r in rows if r["step"] not in warm] or [r["sec_per_step"] for r in rows]
    return dict(steps=total, first_run_steps=first, resumed_at=first,
                sec_per_step=statistics.median(secs) if secs else None, sec_per_step_steps=len(secs),
                loss_first=rows[0]["loss"] if rows else None, loss_last=rows[-1]["loss"] if rows else None)


def check_generation(gen: Path, num_pairs: int, batch: int, resolution: int, num_labels: int,
                     failures: list[str]) -> dict:
    """Sizes, not constant (so not NaN), valid labels, not all identical; pairs/s after the first batch."""
    from PIL import Image

    records = read_jsonl(gen / "manifest.jsonl")
    if len(records) != num_pairs:
        failures.append(f"{gen / 'manifest.jsonl'} holds {len(records)} pairs, not {num_pairs}")
    images = []
    for r in records:
        img, mask = Image.open(gen / r["image"]), Image.open(gen / r["mask"])
        if img.size != (resolution, resolution) or img.mode != "RGB":
            failures.append(f"{r['image']}: {img.mode} {img.size}, expected RGB {resolution}x{resolution}")
        if mask.size != (resolution, resolution) or mask.mode != "L":
            failures.append(f"{r['mask']}: {mask.mode} {mask.size}, expected L {resolution}x{resolution}")
        a, m = np.asarray(img), np.asarray(mask)
        images.append(a)
        if a.min() == a.max():
            failures.append(f"{r['image']}: constant image (value {a.min()}; NaN latents decode to this)")
        values = np.unique(m)
        if len(values) < 2:
            failures.append(f"{r['mask']}: constant mask (label {values[0]})")
        if any(v >= num_labels and v != 255 for v in values):
            failures.append(f"{r['mask']}: labels {values.tolist()} outside 0..{num_labels - 1} and 255")
    if len(images) > 1 and all(np.array_equal(images[0], a) for a in images[1:]):
        failures.append("every generated image is the same")
    # pairs/s from the times the pairs' records were committed, after the first batch
    done = sorted((gen / "parts" / f"{int(r['index']):06d}.json").stat().st_mtime for r in records)
    rate = None
    if len(done) > batch:
        rate = (len(done) - batch) / max(1e-9, done[-1] - done[batch - 1])
    return dict(pairs=len(records), pairs_per_s=rate, pairs_timed=max(0, len(done) - batch))


# ---- main -----------------------------------------------------------------------------------

def main(argv=None) -> None:
    cfg = parse_config(GpuSmokeConfig, argv, description=__doc__)
    os.environ["HF_HUB_OFFLINE"] = "1"
    if cfg.dry_run:
        dry_run(cfg)
        return
    plan = plan_run(cfg)
    out = fresh_out_dir(cfg.out)
    stages = Stages(out, cfg.device)
    result = new_result(cfg, plan, out)
    failures: list[str] = result["failures"]
    t_start = time.perf_counter()
    try:
        run_stages(cfg, plan, out, stages, result)
    except SmokeFailure as e:
        failures.append(str(e))
    except Exception as e:  # anything unforeseen (CUDA out of memory, ...): still save what was measured
        traceback.print_exc()
        failures.append(f"{type(e).__name__}: {e}")
    finish(result, stages.wall, t_start, plan.results_path)


@dataclass
class SmokePlan:
    """The run's settings once each option left unset has taken its mode's default (real or ``--tiny``)."""

    precision: str
    train_steps: int
    resume_steps: int
    workers: int
    gen_pairs: int
    gen_steps: int
    spec: TinySDSpec
    resolution: int
    results_path: Path


def plan_run(cfg: GpuSmokeConfig) -> SmokePlan:
    """Refuse what cannot run here (with a message), then fill in the mode's defaults."""
    if cfg.device not in ("cuda", "cpu"):
        die(f"--device must be cuda or cpu, got {cfg.device!r}")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        die("no CUDA device found (torch.cuda.is_available() is False): this smoke test checks the real "
            "SD 1.5 sizes on a GPU. Run it on a CUDA machine, or check the plumbing on CPU with "
            "--device cpu --tiny (--dry_run true prints the real sizes without a GPU).")
    if cfg.device == "cpu" and not cfg.tiny:
        die("--device cpu runs only with --tiny: the real SD 1.5 sizes are far too slow on a CPU")
    if cfg.mixed_precision not in ("fp16", "bf16", "no"):
        die(f"--mixed_precision must be fp16, bf16 or no, got {cfg.mixed_precision!r}")
    precision = "no" if cfg.device == "cpu" else cfg.mixed_precision

    def pick(value, real, tiny):  # an option left unset takes the mode's default
        return value if value is not None else (tiny if cfg.tiny else real)

    train_steps, resume_steps = pick(cfg.train_steps, 20, 2), pick(cfg.resume_steps, 10, 1)
    workers, gen_pairs, gen_steps = pick(cfg.num_workers, 4, 0), pick(cfg.gen_pairs, 8, 4), pick(cfg.gen_steps, 10, 2)
    if min(train_steps, resume_steps, gen_pairs, gen_steps, cfg.batch_size, cfg.gen_batch_size) < 1:
        die("steps, pairs and batch sizes must be >= 1")
    spec = TinySDSpec() if cfg.tiny else SD15_SPEC
    resolution = spec.sample_size * 2 ** (len(spec.vae_channels) - 1)
    results_path = Path(cfg.results) if cfg.results else (
        Path(cfg.out) / "gpu_smoke.json" if cfg.tiny else REPO / "bench" / "results" / "gpu_smoke.json")
    return SmokePlan(precision, train_steps, resume_steps, workers, gen_pairs, gen_steps, spec, resolution,
                     results_path)


def fresh_out_dir(out_arg: str) -> Path:
    """``--out``, resolved and created, without this script's run folders from an earlier run."""
    out = Path(out_arg).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for name in RUN_FOLDERS:  # only this script's own run folders; the toy dataset is reused
        if (out / name).exists():
            shutil.rmtree(out / name)
    return out


def host_versions() -> dict:
    """Platform, Python, torch, CUDA and the Hugging Face libraries' versions."""
    import accelerate
    import diffusers
    import transformers

    return dict(platform=platform.platform(), python=platform.python_version(), torch=torch.__version__,
                cuda=torch.version.cuda, diffusers=diffusers.__version__, transformers=transformers.__version__,
                accelerate=accelerate.__version__)


def new_result(cfg: GpuSmokeConfig, plan: SmokePlan, out: Path) -> dict:
    """The results record before any stage ran: mode, host, versions, settings (not passed yet)."""
    return dict(mode="tiny" if cfg.tiny else "sd15", passed=False, failures=[], device=cfg.device,
                host=host_versions(),
                settings=dict(config_to_dict(cfg), mixed_precision=plan.precision, resolution=plan.resolution,
                              train_steps=plan.train_steps, resume_steps=plan.resume_steps, num_workers=plan.workers,
                              gen_pairs=plan.gen_pairs, gen_steps=plan.gen_steps),
                out=str(out))


def run_stages(cfg: GpuSmokeConfig, plan: SmokePlan, out: Path, stages: Stages, result: dict) -> None:
    """The chain in order, each stage's figures and failed checks going into ``result``; a stage that
    fails raises (``SmokeFailure``, or whatever went wrong)."""
    toy, joint, gen = out / f"toy{plan.resolution}", out / "joint", out / "gen"
    stages.run("toy_dataset", "utils.make_toy_dataset", "--out", toy, "--size", plan.resolution,
               "--num_train", cfg.num_train, "--num_val", cfg.num_val, "--seed", cfg.seed,
               "--progress", "false", "--preview", 4)
    result["params"] = stages.timed("build_base_model", write_base_model, toy, out, cfg.tiny, cfg.seed)
    stages.run("widen", "inference.jodiffusion", "--base_model", out / "base_model",
               "--label_vae", out / "label_vae", "--output_dir", out / "init")
    train_and_resume(cfg, plan, stages, toy, out / "init", joint)
    result["train"] = check_training(joint, plan.train_steps, plan.train_steps + plan.resume_steps,
                                     result["failures"])
    time_unet_step(cfg, plan, stages, joint, result)
    stages.run("generate", "inference.generate", "--pipeline", joint / "pipeline", "--dataset", "toy",
               "--data_root", toy, "--output_dir", gen, "--num_pairs", plan.gen_pairs,
               "--batch_size", cfg.gen_batch_size, "--num_inference_steps", plan.gen_steps,
               "--mixed_precision", plan.precision, "--confidence_threshold", 0, "--seed", cfg.seed,
               "--preview_count", min(4, plan.gen_pairs))
    from dataset.toy_semantic import INFO

    result["generation"] = dict(check_generation(gen, plan.gen_pairs, cfg.gen_batch_size, plan.resolution,
                                                 INFO.num_labels, result["failures"]),
                                steps=plan.gen_steps, batch_size=cfg.gen_batch_size)


def train_and_resume(cfg: GpuSmokeConfig, plan: SmokePlan, stages: Stages, toy: Path, init: Path,
                     joint: Path) -> None:
    """Joint training checkpointed at its last step, then the same command resumed from it for more steps."""
    train_args = ["--dataset", "toy", "--data_root", toy, "--pretrained_model", init, "--output_dir", joint,
                  "--resolution", plan.resolution, "--train_batch_size", cfg.batch_size,
                  "--mixed_precision", plan.precision, "--gradient_checkpointing", "true",
                  "--use_8bit_adam", str(cfg.use_8bit_adam).lower(), "--learning_rate", cfg.learning_rate,
                  "--num_validation_images", 0, "--logging_steps", 1, "--checkpointing_steps", plan.train_steps,
                  "--dataloader_num_workers", plan.workers, "--seed", cfg.seed]
    stages.run("train", "train.joint_diffusion", *train_args, "--max_train_steps", plan.train_steps)
    stages.run("train_resume", "train.joint_diffusion", *train_args,
               "--max_train_steps", plan.train_steps + plan.resume_steps, "--resume_from_checkpoint", "latest")


def time_unet_step(cfg: GpuSmokeConfig, plan: SmokePlan, stages: Stages, joint: Path, result: dict) -> None:
    """The trained UNet's training step, measured here (``result["unet_step"]``), and its checks."""
    device = torch.device(cfg.device)
    failures = result["failures"]
    if cfg.device == "cuda":
        result["device"] = torch.cuda.get_device_name(device)
    result["unet_step"] = stages.timed(
        "unet_step", measure_unet_step, joint / "pipeline" / "unet", device, plan.precision, cfg.batch_size,
        plan.spec.max_length, plan.spec.latent_channels, cfg.learning_rate, cfg.timed_steps, cfg.seed)
    if cfg.device == "cuda":
        torch.cuda.empty_cache()  # give the generator the memory back
    if not result["unet_step"]["losses_finite"]:
        failures.append("the UNet step measured here gave a non-finite loss")
    if not result["unet_step"]["optimizer_state_allocated"]:
        failures.append("every UNet step measured here was skipped (inf gradients): its memory lacks AdamW's state")


def finish(result: dict, wall: dict[str, float], t_start: float, results_path: Path) -> None:
    """Save the record atomically, print the table, and exit 1 listing the failures if there are any."""
    failures = result["failures"]
    result["stage_wall_s"] = {k: round(v, 2) for k, v in wall.items()}
    result["total_wall_s"] = round(time.perf_counter() - t_start, 2)
    result["passed"] = not failures
    atomic_write_json(results_path, result)
    print_table(result, results_path)
    if failures:
        print("FAILED:\n" + "\n".join(f"  - {f}" for f in failures), file=sys.stderr)
        raise SystemExit(1)


def print_table(r: dict, path: Path) -> None:
    def fmt(v, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    s, train, step, gen = r["settings"], r.get("train", {}), r.get("unet_step", {}), r.get("generation", {})
    print(f"\ngpu_smoke ({'tiny sizes' if r['mode'] == 'tiny' else 'SD 1.5 sizes'}, random weights) on "
          f"{r['device']}; torch {r['host']['torch']} (CUDA {r['host']['cuda']}), diffusers {r['host']['diffusers']}, "
          f"{s['mixed_precision']}, {s['resolution']} px")
    rows = [
        (f"joint training s/step (trainer, batch {s['batch_size']})", fmt(train.get("sec_per_step"), ".3f")),
        ("UNet train step s (measured here)", fmt(step.get("sec_per_step"), ".3f")),
        ("peak GPU memory, UNet step (GiB)", fmt(step.get("peak_memory_gib"), ".2f")),
        (f"generation pairs/s ({s['gen_steps']} steps, batch {s['gen_batch_size']})", fmt(gen.get("pairs_per_s"), ".3f")),
        ("loss first -> last", f"{fmt(train.get('loss_first'), '.4f')} -> {fmt(train.get('loss_last'), '.4f')}"),
    ] + [(f"wall: {k}", f"{v:.1f} s") for k, v in r["stage_wall_s"].items()]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    print(f"{'PASSED' if r['passed'] else 'FAILED'} in {r['total_wall_s']:.0f} s; saved {path}")


if __name__ == "__main__":
    main()
