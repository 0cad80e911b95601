"""GPU figures (issue #19): one training step and one generated pair at 512 px, the authors' U-ViT
beside our widened SD UNet, with time and peak GPU memory.

    python -m bench.gpu_backbones                   # on a CUDA machine (~5 min on an H100)
    python -m bench.gpu_backbones --tiny true --device cpu --output /tmp/gpu_backbones.json   # plumbing, CPU, < 1 min

Both denoisers at their real sizes with random weights (speed and memory do not depend on them), on
the same frozen parts: SD 1.5's widened UNet (``bench.gpu_smoke``'s SD 1.5 components, conv_in /
conv_out 4 -> 8 channels, 859.5M) and the JoDiffusion U-ViT (``PAPER_UVIT_CONFIG``, METHOD.md §8,
~0.95B), the CLIP ViT-L/14-size text encoder, SD's image VAE and the paper's label VAE.

1. **Training step**, as ``train.joint_diffusion`` runs it with each backbone's recipe
   (``--unet_recipe`` / ``--uvit_recipe``, default the VOC ones): the backbone's own loss
   (``models.pipelines.TRAINING``: caption dropout for the UNet, the authors' objective for the
   U-ViT), the recipe's per-GPU batch, mixed precision (accelerate's autocast, fp32 master weights,
   frozen parts in the weight dtype), gradient checkpointing, AdamW (bitsandbytes' 8-bit one where
   the recipe asks and it imports; the record says which ran), gradient clipping, EMA when the recipe
   keeps one. The recipes train from the latent cache, so the inputs are cached latents (random here);
   the text encoder runs in the step. Seconds per step: median of ``--timed_steps`` after 2 warm-up
   steps; peak memory: ``torch.cuda.max_memory_allocated`` over the whole step (weights, gradients,
   optimizer state, activations).
2. **Generated pair**: the pipeline in the weight dtype, one prompt, the generation config's sampler
   steps and guidance (DPM-Solver++, 50 steps, guidance 8: two passes per step), decoding and the
   mask argmax included. Seconds: fastest of ``--gen_repeats`` after a warm-up call; peak memory as
   above. The pair is checked: image and mask at the resolution, labels valid, image not constant.

Every loss must be finite and the weights must move, or the run fails (exit 1). Prints a side-by-side
table and saves ``bench/results/gpu_backbones.json`` atomically (``--output``). Without a CUDA
device it stops with a message, unless ``--device cpu --tiny true`` (tiny sizes, 32 px: the same
code, to check it anywhere).
"""
from __future__ import annotations

import gc
import importlib.util
import math
import statistics
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from bench.bench_generation import time_call
from bench.gpu_smoke import build_components, count, host_versions
from models.joint_unet import widen_unet_for_labels
from models.joint_uvit import PAPER_UVIT_CONFIG, JoDiffusionUViT
from models.pipeline_jodiffusion import build_jodiffusion_pipeline, make_scheduler
from models.pipeline_uvit import JoDiffusionUViTPipeline
from models.tiny_kit import words_from_texts
from utils.config import config_to_dict, die, parse_config
from utils.io import atomic_write_json
from utils.precision import cpu_generators, weight_dtype
from utils.training import freeze, make_adamw, trainable_unet

PROMPT = "a photo of circle, square"
BACKBONES = ("widened_unet", "uvit")
TRAINING_NAME = {"widened_unet": "unet", "uvit": "uvit"}  # models.pipelines.TRAINING keys
# a U-ViT on the tiny kit's parts (text 32 wide, 32 tokens; tiny VAE: 32 px -> 8 x 8 latents)
TINY_UVIT_CONFIG = dict(PAPER_UVIT_CONFIG, text_dim=32, inner_text_dim=16, clip_img_dim=32, num_text_tokens=32,
                        num_attention_heads=2, attention_head_dim=16, num_layers=3, sample_size=8)


@dataclass
class GpuBackbonesConfig:
    """One 512 px training step and one generated pair per backbone (U-ViT, widened UNet): time and memory."""

    device: str = field(default="cuda", metadata={"help": "cuda, or cpu (only with --tiny true)"})
    tiny: bool = field(default=False, metadata={"help": "tiny sizes (32 px): check the plumbing anywhere"})
    unet_recipe: str = field(default="configs/joint_diffusion/voc.yaml", metadata={"help": "the widened UNet's training config"})
    uvit_recipe: str = field(default="configs/joint_diffusion/voc_uvit.yaml", metadata={"help": "the U-ViT's training config"})
    generate_config: str = field(default="configs/generate/voc.yaml", metadata={"help": "sampler steps and guidance"})
    batch_size: int = field(default=0, metadata={"help": "per-GPU training batch; 0 = each recipe's train_batch_size"})
    timed_steps: int = field(default=5, metadata={"help": "training steps timed (after 2 warm-up steps)"})
    gen_steps: int = field(default=0, metadata={"help": "sampler steps per pair; 0 = the generation config's"})
    gen_repeats: int = field(default=3, metadata={"help": "timed pairs (fastest kept, after a warm-up pair)"})
    seed: int = field(default=0, metadata={"help": "weights, inputs, noise"})
    output: str = field(default="bench/results/gpu_backbones.json", metadata={"help": "where the JSON goes"})


def read_recipes(cfg: GpuBackbonesConfig) -> tuple[dict, object]:
    """({backbone: its JointDiffusionConfig}, the GenerateConfig)."""
    from inference.generate import GenerateConfig
    from train.joint_diffusion import JointDiffusionConfig

    recipes = {"widened_unet": parse_config(JointDiffusionConfig, ["--config", cfg.unet_recipe]),
               "uvit": parse_config(JointDiffusionConfig, ["--config", cfg.uvit_recipe])}
    return recipes, parse_config(GenerateConfig, ["--config", cfg.generate_config])


def build_denoiser(name: str, comps: dict, tiny: bool, seed: int):
    torch.manual_seed(seed + 2)
    if name == "widened_unet":
        return widen_unet_for_labels(comps["unet"], comps["vae"].config.latent_channels)
    return JoDiffusionUViT(**(TINY_UVIT_CONFIG if tiny else PAPER_UVIT_CONFIG))


class Memory:
    """Peak CUDA memory of a block (GiB); None on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)

    def allocated(self) -> float | None:
        return torch.cuda.memory_allocated(self.device) / 2**30 if self.cuda else None

    def peak(self) -> float | None:
        return torch.cuda.max_memory_allocated(self.device) / 2**30 if self.cuda else None


def training_inputs(name: str, denoiser, comps: dict, batch: int, device, gen: torch.Generator):
    """Cached-latent inputs as the trainer reads them: [image ; label] latents (fp32), token ids, and
    for the U-ViT the CLIP image embeddings."""
    from dataset.latents import tokenize

    size = comps["unet"].config.sample_size
    latents = torch.randn(batch, 8, size, size, generator=gen, device=device)
    ids = tokenize(comps["tokenizer"], [PROMPT] * batch).to(device)
    clip = (torch.randn(batch, 1, denoiser.config.clip_img_dim, generator=gen, device=device)
            if name == "uvit" else None)
    return latents, ids, clip, tokenize(comps["tokenizer"], [""]).to(device)


def measure_training(name: str, denoiser, comps: dict, recipe, cfg: GpuBackbonesConfig, device) -> dict:
    """The backbone's training step under its recipe: seconds per step and peak memory."""
    from accelerate import Accelerator

    from models.pipelines import TRAINING

    mixed = recipe.mixed_precision if device.type == "cuda" else "no"
    batch = cfg.batch_size or recipe.train_batch_size
    use_8bit = bool(recipe.use_8bit_adam and device.type == "cuda" and importlib.util.find_spec("bitsandbytes"))
    accelerator = Accelerator(mixed_precision=mixed, cpu=device.type == "cpu")
    mem = Memory(device)
    freeze([comps["text_encoder"]], device, weight_dtype(mixed))
    denoiser.to(device)
    ema = trainable_unet(denoiser, recipe.gradient_checkpointing, recipe.ema_decay if recipe.use_ema else None, device)
    opt = make_adamw(denoiser.parameters(), recipe.learning_rate, use_8bit, (recipe.adam_beta1, recipe.adam_beta2),
                     recipe.adam_weight_decay, recipe.adam_epsilon)
    model, opt = accelerator.prepare(denoiser, opt)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    latents, ids, clip, empty_ids = training_inputs(name, denoiser, comps, batch, device, gen)
    scheduler = comps["scheduler"]
    before = [p.detach().float().clone() for p in list(denoiser.parameters())[:4]]

    def step() -> float:
        with accelerator.autocast():
            loss, _ = TRAINING[TRAINING_NAME[name]].loss(
                model, scheduler, {"text_encoder": comps["text_encoder"]}, latents, ids, clip, gen,
                image_channels=4, empty_ids=empty_ids, caption_dropout=recipe.caption_dropout,
                label_loss_weight=recipe.label_loss_weight, snr_gamma=recipe.snr_gamma,
                text_loss_weight=recipe.text_loss_weight)
        accelerator.backward(loss)
        if recipe.max_grad_norm > 0:
            accelerator.clip_grad_norm_(model.parameters(), recipe.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if ema is not None:
            ema.step(denoiser.parameters())
        return loss.item()

    mem.reset()
    weights = mem.allocated()
    losses, times = [], []
    for i in range(2 + cfg.timed_steps):
        seconds = time_call(lambda: losses.append(step()), device)
        if i >= 2:
            times.append(seconds)
    moved = any(not torch.equal(b, p.detach().float()) for b, p in zip(before, denoiser.parameters()))
    result = dict(batch=batch, mixed_precision=mixed, optimizer="AdamW8bit" if use_8bit else "AdamW",
                  optimizer_asked="AdamW8bit" if recipe.use_8bit_adam else "AdamW",
                  gradient_checkpointing=recipe.gradient_checkpointing, ema=recipe.use_ema,
                  caption_dropout=recipe.caption_dropout, sec_per_step=statistics.median(times),
                  sec_per_step_min=min(times), timed_steps=len(times), losses=[round(x, 5) for x in losses],
                  losses_finite=all(math.isfinite(x) for x in losses), weights_moved=moved,
                  peak_memory_gib=mem.peak(), weights_memory_gib=weights)
    accelerator.free_memory()
    return result


def measure_pair(name: str, denoiser, comps: dict, label_vae, gen_cfg, cfg: GpuBackbonesConfig, device,
                 dtype) -> dict:
    """One generated pair (batch 1): the fastest of ``gen_repeats`` and the peak memory."""
    denoiser.eval()
    if name == "widened_unet":
        pipe = build_jodiffusion_pipeline(comps, label_vae, denoiser, make_scheduler(gen_cfg.scheduler))
    else:
        pipe = JoDiffusionUViTPipeline(image_vae=comps["vae"], text_encoder=comps["text_encoder"],
                                       clip_tokenizer=comps["tokenizer"], label_vae=label_vae, unet=denoiser,
                                       scheduler=make_scheduler(gen_cfg.scheduler))
    if dtype == torch.float32:
        pipe.to(device)  # no dtype: diffusers warns on every cast
    else:
        pipe.to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    steps = cfg.gen_steps or gen_cfg.num_inference_steps
    mem = Memory(device)

    def pair():  # a random label decoder is never 50% sure: no threshold, or every pixel is 255
        return pipe([PROMPT], num_inference_steps=steps, guidance_scale=gen_cfg.guidance_scale,
                    generator=cpu_generators([cfg.seed]), confidence_threshold=0.0)

    with torch.no_grad():
        pair()  # warm-up
        mem.reset()
        outs = []
        times = [time_call(lambda: outs.append(pair()), device) for _ in range(cfg.gen_repeats)]
        out = outs[-1]
    image, mask = np.asarray(out.images[0]), np.asarray(out.masks[0])
    return dict(steps=steps, guidance_scale=gen_cfg.guidance_scale, scheduler=gen_cfg.scheduler,
                dtype=str(dtype).replace("torch.", ""), sec_per_pair=min(times),
                sec_per_pair_median=statistics.median(times), repeats=len(times), peak_memory_gib=mem.peak(),
                image_shape=list(image.shape), mask_shape=list(mask.shape),
                mask_labels_valid=bool(mask.max() < label_vae.config.num_labels),
                image_varies=bool(image.min() != image.max()))


def check(result: dict, resolution: int) -> list[str]:
    """What must hold for the figures to count."""
    failures = []
    for name in BACKBONES:
        r = result["backbones"][name]
        train, pair = r["training_step"], r["pair"]
        if not train["losses_finite"]:
            failures.append(f"{name}: a training loss is not finite ({train['losses']})")
        if not train["weights_moved"]:
            failures.append(f"{name}: the optimizer steps left the weights unchanged")
        if pair["image_shape"][:2] != [resolution, resolution] or pair["mask_shape"] != [resolution, resolution]:
            failures.append(f"{name}: the pair is {pair['image_shape']} / {pair['mask_shape']}, not {resolution} px")
        if not pair["mask_labels_valid"]:
            failures.append(f"{name}: the mask holds labels beyond the label VAE's classes")
        if not pair["image_varies"]:
            failures.append(f"{name}: the generated image is constant (a NaN decode comes out constant)")
    return failures


def host() -> dict:
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return dict(gpu=gpu, **host_versions(), bitsandbytes=importlib.util.find_spec("bitsandbytes") is not None)


def _gib(x) -> str:
    return "-" if x is None else f"{x:.1f} GiB"


def print_table(result: dict) -> None:
    rows = [("parameters", lambda r: f"{r['params_M']:.1f}M"),
            ("train batch / optimizer", lambda r: f"{r['training_step']['batch']} / {r['training_step']['optimizer']}"),
            ("s / training step", lambda r: f"{r['training_step']['sec_per_step']:.3f}"),
            ("peak memory, training", lambda r: _gib(r["training_step"]["peak_memory_gib"])),
            ("s / generated pair", lambda r: f"{r['pair']['sec_per_pair']:.2f} ({r['pair']['steps']} steps)"),
            ("peak memory, pair", lambda r: _gib(r["pair"]["peak_memory_gib"]))]
    b = result["backbones"]
    print(f"\n{result['resolution']} px on {result['host']['gpu'] or result['device']}:")
    print(f"  {'':26s} {'widened SD UNet':>22s} {'U-ViT (authors)':>22s}")
    for label, fn in rows:
        print(f"  {label:26s} {fn(b['widened_unet']):>22s} {fn(b['uvit']):>22s}")


def main(argv=None) -> dict:
    cfg = parse_config(GpuBackbonesConfig, argv, description=__doc__)
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        die("no CUDA device here: run this on a GPU machine, or check the plumbing with --device cpu --tiny true")
    if device.type == "cpu" and not cfg.tiny:
        die("--device cpu runs only with --tiny true (one real-size U-ViT step takes minutes on a CPU)")
    from dataset.toy_semantic import INFO

    recipes, gen_cfg = read_recipes(cfg)
    t_start = time.perf_counter()
    comps, label_vae = build_components(words_from_texts([PROMPT, ""]), cfg.tiny, INFO.num_labels, cfg.seed)
    resolution = comps["vae"].config.sample_size
    result = dict(device=cfg.device, resolution=resolution, mode="tiny" if cfg.tiny else "real", host=host(),
                  settings=config_to_dict(cfg), backbones={})
    for name in BACKBONES:
        print(f"[{name}] building", flush=True)
        denoiser = build_denoiser(name, comps, cfg.tiny, cfg.seed)
        entry = dict(params_M=round(count(denoiser) / 1e6, 2))
        print(f"[{name}] {entry['params_M']}M parameters: training step", flush=True)
        entry["training_step"] = measure_training(name, denoiser, comps, recipes[name], cfg, device)
        dtype = weight_dtype(recipes[name].mixed_precision if device.type == "cuda" else "no")
        print(f"[{name}] generated pair", flush=True)
        entry["pair"] = measure_pair(name, denoiser, comps, label_vae, gen_cfg, cfg, device, dtype)
        result["backbones"][name] = entry
        del denoiser
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        for part in (comps["text_encoder"], comps["vae"], label_vae):  # off the GPU; the next backbone casts
            part.to("cpu", torch.float32)
    ratio = lambda k, v: (result["backbones"]["uvit"][k][v] / result["backbones"]["widened_unet"][k][v])  # noqa: E731
    result["uvit_over_unet"] = dict(sec_per_step=round(ratio("training_step", "sec_per_step"), 3),
                                    sec_per_pair=round(ratio("pair", "sec_per_pair"), 3))
    result["failures"] = check(result, resolution)
    result["passed"] = not result["failures"]
    result["total_wall_s"] = round(time.perf_counter() - t_start, 1)
    atomic_write_json(cfg.output, result)
    print_table(result)
    print(f"saved {cfg.output}")
    if result["failures"]:
        die("failed checks:\n  " + "\n  ".join(result["failures"]))
    return result


if __name__ == "__main__":
    main()
