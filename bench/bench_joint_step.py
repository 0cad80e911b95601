"""Benchmark: what the label half costs: a joint training step against an image-only one, same UNet.

    python -m bench.bench_joint_step                      # the toy UNet (32, 64) on 8x8 latents, CPU
    python -m bench.bench_joint_step --unet_channels 64 128 --batch_size 64

One training step = forward, epsilon loss (``models.joint_unet.joint_epsilon_loss``), backward,
AdamW (foreach) update. The image step runs the base UNet on 4-channel latents; the joint step
runs the *same* UNet widened by ``widen_unet_for_labels`` (identical weights apart from conv_in /
conv_out) on 8-channel latents. Both are timed in one process, alternating step by step so that
load from other jobs on a shared machine hits both alike. The headline ratio joint / image uses
the fastest step of each (other jobs only ever add time); the median of the per-pair ratios is
saved too (target <= 1.05).

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` around the steps. On CPU each mode runs
in its own fresh subprocess and reports its peak RSS during three steps (``VmHWM`` of
``/proc/self/status``, reset just before the steps by writing 5 to ``/proc/self/clear_refs``;
Linux only) and that peak minus the RSS before the first step: the extra memory training needs
on top of the model (activations, gradients, optimiser state). tracemalloc cannot see torch's C++
allocations and ``ru_maxrss`` inherits the parent's high-water mark, so neither is used. Prints and saves ``bench/results/joint_step.json``.
"""
from __future__ import annotations

import json
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

import torch

from utils.config import parse_config
from utils.io import atomic_write_json


@dataclass
class BenchJointStepConfig:
    """Joint vs image-only UNet training step: time ratio and peak memory."""

    unet_channels: list[int] = field(default_factory=lambda: [32, 64], metadata={"help": "UNet block widths"})
    latent_size: int = field(default=8, metadata={"help": "latent side (toy: 32 px / 4)"})
    batch_size: int = field(default=64, metadata={"help": "latents per step"})
    text_hidden: int = field(default=32, metadata={"help": "cross-attention width"})
    text_length: int = field(default=32, metadata={"help": "tokens per prompt"})
    label_channels: int = field(default=4, metadata={"help": "label-latent channels added"})
    pairs: int = field(default=20, metadata={"help": "timed (image, joint) step pairs, alternating order"})
    warmup: int = field(default=3, metadata={"help": "untimed steps per mode first"})
    device: str = field(default="cpu", metadata={"help": "cpu or cuda"})
    cpu_threads: int = field(default=2, metadata={"help": "torch threads on CPU"})
    seed: int = field(default=0, metadata={"help": "weights and inputs"})
    memory_only: str | None = field(default=None, metadata={"help": "internal: measure one mode's memory and print JSON"})
    output: str = field(default="bench/results/joint_step.json", metadata={"help": "where the JSON goes"})


def build(cfg: BenchJointStepConfig, joint: bool):
    """The UNet (widened when ``joint``), its optimiser and a fixed batch."""
    from diffusers import UNet2DConditionModel

    from models.joint_unet import widen_unet_for_labels

    torch.manual_seed(cfg.seed)
    n = len(cfg.unet_channels)
    unet = UNet2DConditionModel(
        sample_size=cfg.latent_size, in_channels=4, out_channels=4, block_out_channels=tuple(cfg.unet_channels),
        layers_per_block=1, down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1), cross_attention_dim=cfg.text_hidden,
        attention_head_dim=8, norm_num_groups=8,
    )
    if joint:
        widen_unet_for_labels(unet, cfg.label_channels)
    unet.to(cfg.device).train()
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4, foreach=True)
    c = unet.config.in_channels
    g = torch.Generator().manual_seed(cfg.seed + 1)
    batch = dict(
        latents=torch.randn(cfg.batch_size, c, cfg.latent_size, cfg.latent_size, generator=g).to(cfg.device),
        noise=torch.randn(cfg.batch_size, c, cfg.latent_size, cfg.latent_size, generator=g).to(cfg.device),
        t=torch.randint(0, 1000, (cfg.batch_size,), generator=g).to(cfg.device),
        text=torch.randn(cfg.batch_size, cfg.text_length, cfg.text_hidden, generator=g).to(cfg.device),
    )
    return unet, opt, batch


def train_step(unet, opt, batch) -> float:
    from models.joint_unet import joint_epsilon_loss

    noisy = batch["latents"] * 0.7 + batch["noise"] * 0.7  # the add_noise arithmetic, same for both modes
    pred = unet(noisy, batch["t"], batch["text"]).sample
    loss, _, _ = joint_epsilon_loss(pred, batch["noise"], image_channels=4)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
    opt.step()
    return loss.item()  # synchronises, so the step is really finished when timed


def measure_memory(cfg: BenchJointStepConfig, mode: str) -> dict:
    """Peak memory of training steps in this (fresh) process."""
    unet, opt, batch = build(cfg, joint=(mode == "joint"))
    if cfg.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        for _ in range(3):
            train_step(unet, opt, batch)
        peak = torch.cuda.max_memory_allocated()
        return dict(method="torch.cuda.max_memory_allocated", peak_mb=peak / 2**20, step_extra_mb=(peak - before) / 2**20)
    def status_bytes(key: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        raise KeyError(key)

    # ru_maxrss would not do: Linux carries the parent's high-water mark into a child across
    # fork + exec. VmHWM belongs to this process's memory map, and writing 5 to clear_refs
    # resets it to the current RSS, so what it shows after the steps is their peak.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status_bytes("VmRSS")
    for _ in range(3):
        train_step(unet, opt, batch)
    peak = status_bytes("VmHWM")
    return dict(method="/proc/self/status VmHWM reset by clear_refs (fresh subprocess per mode)",
                peak_mb=peak / 2**20, step_extra_mb=(peak - before) / 2**20)


def main(argv=None) -> dict:
    cfg = parse_config(BenchJointStepConfig, argv, description=__doc__)
    if cfg.device == "cpu" and cfg.cpu_threads:
        torch.set_num_threads(cfg.cpu_threads)
    if cfg.memory_only:
        print(json.dumps(measure_memory(cfg, cfg.memory_only)))
        return {}

    models = {mode: build(cfg, joint=(mode == "joint")) for mode in ("image", "joint")}
    params = {mode: sum(p.numel() for p in m[0].parameters()) for mode, m in models.items()}
    for mode, m in models.items():
        for _ in range(cfg.warmup):
            train_step(*m)
    times: dict[str, list[float]] = {"image": [], "joint": []}
    for i in range(cfg.pairs):
        for mode in (("image", "joint") if i % 2 == 0 else ("joint", "image")):
            if cfg.device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            train_step(*models[mode])
            times[mode].append(time.perf_counter() - t0)
    best = {mode: min(v) for mode, v in times.items()}
    med = {mode: statistics.median(v) for mode, v in times.items()}
    pair_ratio = statistics.median(j / i for i, j in zip(times["image"], times["joint"]))

    base_args = ["--unet_channels", *map(str, cfg.unet_channels), "--latent_size", str(cfg.latent_size),
                 "--batch_size", str(cfg.batch_size), "--text_hidden", str(cfg.text_hidden),
                 "--text_length", str(cfg.text_length), "--label_channels", str(cfg.label_channels),
                 "--device", cfg.device, "--cpu_threads", str(cfg.cpu_threads), "--seed", str(cfg.seed)]
    memory = {}
    for mode in ("image", "joint"):
        proc = subprocess.run([sys.executable, "-m", "bench.bench_joint_step", *base_args, "--memory_only", mode],
                              capture_output=True, text=True, check=True)
        memory[mode] = json.loads(proc.stdout.strip().splitlines()[-1])

    result = dict(
        config={k: v for k, v in asdict(cfg).items() if k not in ("memory_only", "output")},
        device=cfg.device if cfg.device != "cuda" else torch.cuda.get_device_name(),
        host=dict(platform=platform.platform(), python=platform.python_version(), torch=torch.__version__,
                  threads=torch.get_num_threads()),
        params=params,
        step_seconds_min=best,
        step_seconds_median=med,
        joint_over_image=best["joint"] / best["image"],
        joint_over_image_median_of_pairs=pair_ratio,
        target_ratio=1.05,
        peak_memory=memory,
        memory_ratio=memory["joint"]["step_extra_mb"] / max(1e-9, memory["image"]["step_extra_mb"]),
    )
    print(f"UNet {cfg.unet_channels} on {cfg.latent_size}x{cfg.latent_size}, batch {cfg.batch_size}, {result['device']}")
    print(f"  params: image {params['image']:,}  joint {params['joint']:,} (+{params['joint'] - params['image']:,})")
    print(f"  step (fastest of {cfg.pairs}): image {best['image'] * 1e3:.1f} ms  joint {best['joint'] * 1e3:.1f} ms"
          f"  ratio {result['joint_over_image']:.3f} (target <= 1.05); median of pair ratios {pair_ratio:.3f}")
    print(f"  step (median): image {med['image'] * 1e3:.1f} ms  joint {med['joint'] * 1e3:.1f} ms")
    for mode in ("image", "joint"):
        m = memory[mode]
        print(f"  memory {mode}: peak {m['peak_mb']:.1f} MB, step extra {m['step_extra_mb']:.1f} MB ({m['method']})")
    atomic_write_json(cfg.output, result)
    print(f"saved {cfg.output}")
    return result


if __name__ == "__main__":
    main()
