"""Peak GPU memory per device of the real recipes, computed (no GPU needed).

    python -m bench.bench_memory                      # prints the table, writes bench/results/memory.json

For each training recipe the peak is the sum of
- the trained weights in fp32 (accelerate's mixed precision keeps fp32 master weights and autocasts),
  their fp32 gradients and the optimizer state (AdamW: 8 bytes a parameter; bitsandbytes' AdamW8bit:
  2 bytes a parameter, plus fp32 state for the few tensors it keeps in 32 bit, ignored here);
- the frozen models the step runs, in the weight dtype (fp16);
- the activations autograd keeps for the backward pass, **counted**, not guessed: the model runs
  forward on the ``meta`` device (shapes only, no memory, no compute) in fp16 while
  ``torch.autograd.graph.saved_tensors_hooks`` adds up every distinct tensor storage it saves.
  Attention is counted as a fused kernel (flash / memory-efficient SDPA saves q, k, v, the output and
  one float per query row, not the score matrix). With gradient checkpointing only the checkpointed
  blocks' inputs are kept, plus one block's activations while it is recomputed;
- a workspace margin (cuDNN / cuBLAS workspaces, the CUDA context, allocator fragmentation), calibrated
  on the one real measurement this project has: the SD 1.5 widened-UNet step of bench/gpu_smoke.py
  on an H100 (batch 2, fp16, AdamW, gradient checkpointing: 16.19 GiB peak, bench/results/gpu_smoke.json).

Inference recipes (generation, DiffuMask) keep no activations across layers: weights in fp16 plus the
largest single layer's working set at the batch, which is small next to the weights.
The segmenters are MMSegmentation models whose recipes come from MMSegmentation itself (DeepLabV3+
R101 and Mask2Former R50 at 512 crops, batch 4 per GPU); their documented figures are quoted, not
recomputed here.
"""
from __future__ import annotations

import argparse
import contextlib
import sys

import torch
import torch.nn.functional as F

from bench.gpu_smoke import SD15_SPEC
from models.joint_unet import widen_unet_for_labels
from models.label_vae import build_label_vae
from utils.io import atomic_write_json

GIB = 1024 ** 3
FP16 = 2
# fp32 weights + fp32 grads + optimizer state, bytes per trained parameter
PER_PARAM = {"adamw": 4 + 4 + 8, "adamw8bit": 4 + 4 + 2}
# bench/results/gpu_smoke.json: SD 1.5 widened UNet, batch 2, 512 px, fp16, AdamW, grad. checkpointing
H100_MEASURED_GIB = 16.19
# MMSegmentation's model zoo (README 'Mem (GB)' columns), 512x512 crops; batch per GPU as noted there
MMSEG_DOCUMENTED_GIB = {
    "deeplabv3plus_r50 (voc aug)": (7.6, 4, "mmseg configs/deeplabv3plus/README.md, R-50-D8 512x512 VOC aug, 4 GPUs x 4"),
    "deeplabv3plus_r101 (voc aug)": (11.0, 4, "mmseg configs/deeplabv3plus/README.md, R-101-D8 512x512 VOC aug, 4 GPUs x 4"),
    "deeplabv3plus_r50 (ade20k)": (10.6, 4, "mmseg configs/deeplabv3plus/README.md, R-50-D8 512x512 ADE20K, 4 GPUs x 4"),
    "deeplabv3plus_r101 (ade20k)": (14.1, 4, "mmseg configs/deeplabv3plus/README.md, R-101-D8 512x512 ADE20K, 4 GPUs x 4"),
    "mask2former_r50 (ade20k)": (3.385, 2, "mmseg configs/mask2former/README.md, R-50-D32 512x512 ADE20K, 8 GPUs x 2"),
}


class _FusedAttention(torch.autograd.Function):
    """SDPA as a flash / memory-efficient kernel sees it: saves q, k, v, out and a logsumexp row."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty_like(q)
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):  # never called: only the forward's saved tensors are counted
        q, k, v, _, _ = ctx.saved_tensors
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)


def _fused_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
    return _FusedAttention.apply(q, k, v)


@contextlib.contextmanager
def count_saved_bytes():
    """Yields a dict whose 'bytes' is the size of the distinct storages autograd saved."""
    seen: dict[int, int] = {}
    result = {"bytes": 0}

    def pack(t):
        if not isinstance(t, torch.nn.Parameter) and not isinstance(t._base, torch.nn.Parameter):
            s = t.untyped_storage()
            seen[s._cdata] = s.nbytes()
        return t

    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _fused_sdpa
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield result
    finally:
        F.scaled_dot_product_attention = original
        result["bytes"] = sum(seen.values())


def _largest_module_bytes(modules, run) -> int:
    """Activations of the largest of ``modules`` (the units gradient checkpointing recomputes), counted
    in a run without checkpointing: what one recomputation holds during the backward pass."""
    sizes = []
    hooks = []
    for module in modules:
        state = {}

        def pre(mod, args, kwargs, state=state):
            state["ctx"] = count_saved_bytes()
            state["res"] = state["ctx"].__enter__()

        def post(mod, args, kwargs, out, state=state):
            state["ctx"].__exit__(None, None, None)
            sizes.append(state["res"]["bytes"])

        hooks += [module.register_forward_pre_hook(pre, with_kwargs=True),
                  module.register_forward_hook(post, with_kwargs=True)]
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return max(sizes) if sizes else 0


def joint_unet_activations(batch: int, resolution: int, checkpointing: bool) -> dict:
    """Saved-activation bytes of one widened SD 1.5 UNet training forward (fp16, meta device)."""
    from diffusers import UNet2DConditionModel
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    spec = SD15_SPEC
    with torch.device("meta"):
        unet = UNet2DConditionModel(
            sample_size=spec.sample_size, in_channels=4, out_channels=4, block_out_channels=spec.unet_channels,
            layers_per_block=spec.unet_layers_per_block, cross_attention_dim=spec.text_hidden,
            attention_head_dim=spec.attention_head_dim, norm_num_groups=spec.norm_num_groups)
        unet = widen_unet_for_labels(unet, label_channels=4)
    unet = unet.to(torch.float16)
    params = sum(p.numel() for p in unet.parameters())
    side = resolution // 8
    x = torch.empty(batch, unet.config.in_channels, side, side, device="meta", dtype=torch.float16)
    t = torch.zeros(batch, dtype=torch.long, device="meta")
    text = torch.empty(batch, spec.max_length, spec.text_hidden, device="meta", dtype=torch.float16)
    # diffusers checkpoints each ResNet block and each transformer block separately
    units = [m for m in unet.modules() if isinstance(m, (ResnetBlock2D, Transformer2DModel))]

    def run():
        return unet(x, t, encoder_hidden_states=text).sample

    peak_block = _largest_module_bytes(units, run) if checkpointing else 0
    if checkpointing:
        unet.enable_gradient_checkpointing()
    with count_saved_bytes() as saved:
        run()
    return {"params": params, "saved_bytes": saved["bytes"], "recompute_bytes": peak_block}


def label_vae_activations(num_labels: int, batch: int, resolution: int) -> dict:
    with torch.device("meta"):
        model = build_label_vae("label_vae", num_labels=num_labels)
    model = model.to(torch.float16)
    bits = model.config.num_bits
    x = torch.empty(batch, bits, resolution, resolution, dtype=torch.float16, device="meta")
    with count_saved_bytes() as saved:
        logits = model(x, sample_posterior=True)
        target = torch.zeros(batch, resolution, resolution, dtype=torch.long, device="meta")
        F.cross_entropy(logits.float(), target, ignore_index=255)  # the trainer's loss, on fp32 logits
    return {"params": sum(p.numel() for p in model.parameters()), "saved_bytes": saved["bytes"]}


def _gib(b: float) -> float:
    return round(b / GIB, 2)


def training_peak(params: int, saved: int, recompute: int, frozen_params: int, optimizer: str,
                  margin: float) -> dict:
    static = params * PER_PARAM[optimizer] + frozen_params * FP16
    return {"weights_grads_optimizer_gib": _gib(params * PER_PARAM[optimizer]),
            "frozen_models_gib": _gib(frozen_params * FP16), "activations_gib": _gib(saved + recompute),
            "margin_gib": round(margin, 2), "peak_gib": round((static + saved + recompute) / GIB + margin, 2)}


# frozen parts the joint step runs when latents are not cached: SD 1.5 VAE (83.7M), CLIP ViT-L text
# encoder (123.1M), the label VAE (14.7M); parameter counts from bench/results/gpu_smoke.json + CLIP-L
FROZEN_JOINT = 83_653_863 + 123_060_480 + 14_744_078


def joint_rows() -> tuple[list[dict], float]:
    """The widened-UNet recipes: batch 8 per GPU (the scripts' default) and the H100 calibration run."""
    calib = joint_unet_activations(2, 512, True)
    no_margin = training_peak(calib["params"], calib["saved_bytes"], calib["recompute_bytes"],
                              FROZEN_JOINT, "adamw", 0.0)["peak_gib"]
    margin = max(0.0, H100_MEASURED_GIB - no_margin)
    rows = [dict(recipe="calibration: gpu_smoke step (batch 2, AdamW, checkpointing)",
                 measured_gib=H100_MEASURED_GIB,
                 **training_peak(calib["params"], calib["saved_bytes"], calib["recompute_bytes"],
                                 FROZEN_JOINT, "adamw", margin))]
    for ckpt in (True, False):
        a = joint_unet_activations(8, 512, ckpt)
        rows.append(dict(recipe=f"joint UNet, batch 8/GPU, 512 px, fp16, AdamW8bit, "
                                f"gradient checkpointing {'on' if ckpt else 'off'} (scripts/ldm/*_light_joint_5e5.sh)",
                         **training_peak(a["params"], a["saved_bytes"], a["recompute_bytes"], FROZEN_JOINT,
                                         "adamw8bit", margin)))
    return rows, margin


def uvit_activations(batch: int, resolution: int, checkpointing: bool) -> dict:
    """Saved-activation bytes of one training forward of the authors' joint U-ViT (fp16, meta device)."""
    from models.joint_uvit import PAPER_UVIT_CONFIG, JoDiffusionUViT

    with torch.device("meta"):
        model = JoDiffusionUViT(**dict(PAPER_UVIT_CONFIG, sample_size=resolution // 8))
    model = model.to(torch.float16)
    cfg, side = model.config, resolution // 8
    text = torch.empty(batch, cfg.num_text_tokens, cfg.text_dim, device="meta", dtype=torch.float16)
    z = torch.empty(batch, cfg.in_channels, side, side, device="meta", dtype=torch.float16)
    clip = torch.empty(batch, 1, cfg.clip_img_dim, device="meta", dtype=torch.float16)
    t = torch.zeros(batch, dtype=torch.long, device="meta")
    body = model.transformer
    # the checkpointed units: every transformer block (JoDiffusionUViT._checkpointed_transformer)
    units = list(body.transformer_in_blocks) + [body.transformer_mid_block] + [b["block"] for b in body.transformer_out_blocks]

    def run():
        return model(text, z, clip, z, t, t)

    peak_block = _largest_module_bytes(units, run) if checkpointing else 0
    if checkpointing:
        model.enable_gradient_checkpointing()
    with count_saved_bytes() as saved:
        run()
    return {"params": sum(p.numel() for p in model.parameters()), "saved_bytes": saved["bytes"],
            "recompute_bytes": peak_block}


# frozen parts of the U-ViT step: UniDiffuser's image VAE (83.7M, SD's), CLIP ViT-L/14 text encoder
# (123.1M), CLIP ViT-B/32 image encoder with projection (87.8M), the authors' label VAE (15.4M)
FROZEN_UVIT = 83_653_863 + 123_060_480 + 87_849_216 + 15_420_000


def uvit_rows(margin: float) -> list[dict]:
    """The U-ViT recipes (scripts/ldm/*_uvit.sh): batch 8 per GPU, 512 px, fp16, AdamW8bit."""
    rows = []
    for ckpt in (True, False):
        a = uvit_activations(8, 512, ckpt)
        rows.append(dict(recipe=f"joint U-ViT, batch 8/GPU, 512 px, fp16, AdamW8bit, gradient checkpointing "
                                f"{'on' if ckpt else 'off'} (scripts/ldm/*_uvit.sh)",
                         **training_peak(a["params"], a["saved_bytes"], a["recompute_bytes"], FROZEN_UVIT,
                                         "adamw8bit", margin)))
    return rows


def label_vae_rows(margin: float) -> list[dict]:
    rows = []
    for name, labels in (("voc", 21), ("ade20k", 151), ("coco", 81)):
        for batch in (8, 4):
            a = label_vae_activations(labels, batch, 512)
            rows.append(dict(recipe=f"label VAE {name}, batch {batch}/GPU, 512 px, fp16, AdamW "
                                    f"(scripts/ae/{name}_light.sh)",
                             **training_peak(a["params"], a["saved_bytes"], 0, 0, "adamw", margin)))
    return rows


def inference_rows() -> list[dict]:
    """fp16 weights of everything loaded + one UNet forward's largest working set at the batch."""
    unet = 859_520_964 + 4 * 320 * 9  # widened conv_in adds 4 x 320 x 3 x 3 weights
    gen = unet + FROZEN_JOINT
    sd14 = 859_520_964 + 83_653_863 + 123_060_480
    rows = []
    uvit = 954_258_336 + 83_653_863 + 123_060_480 + 15_420_000  # text2img loads no CLIP image encoder
    for recipe, params, batch in (("generation, batch 8, fp16 (scripts/gen/*_light.sh)", gen, 8),
                                  ("U-ViT generation, batch 8, fp16 (scripts/gen/*_uvit.sh)", uvit, 8),
                                  ("DiffuMask, SD 1.4, batch 1, fp16 (scripts/diffumask/*.sh)", sd14, 1)):
        # classifier-free guidance doubles the batch. UNet: the largest live tensors of one forward are a
        # few 320 x 64 x 64 maps and the 64*64-token attention of the first block (fused: no score matrix);
        # U-ViT: a few 2129-token x 1536 streams (the 4x feed-forward hidden layer is the largest)
        live = 2 * batch * (6 * 2129 * 1536 if "U-ViT" in recipe else 6 * 320 * 64 * 64) * FP16
        rows.append(dict(recipe=recipe, weights_gib=_gib(params * FP16), activations_gib=_gib(live),
                         peak_gib=round((params * FP16 + live) / GIB + 1.0, 2), margin_gib=1.0))
    return rows


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench/results/memory.json")
    args = p.parse_args(argv)
    joint, margin = joint_rows()
    result = {
        "method": "computed: fp32 weights + grads + optimizer state, fp16 frozen models, activations counted "
                  "with saved_tensors_hooks on the meta device (fused attention), margin calibrated on the "
                  "H100 gpu_smoke step; see the module docstring",
        "command": "python -m bench.bench_memory",
        "margin_gib": round(margin, 2),
        "training": joint + uvit_rows(margin) + label_vae_rows(margin),
        "inference": inference_rows(),
        "segmenters_documented": {k: {"gib": v[0], "batch_per_gpu": v[1], "source": v[2]}
                                  for k, v in MMSEG_DOCUMENTED_GIB.items()},
    }
    for row in result["training"] + result["inference"]:
        extra = f" (measured {row['measured_gib']})" if "measured_gib" in row else ""
        print(f"{row['peak_gib']:7.2f} GiB{extra}  {row['recipe']}")
    for k, v in result["segmenters_documented"].items():
        print(f"{v['gib']:7.2f} GB   {k}, batch {v['batch_per_gpu']}/GPU (documented: {v['source']})")
    atomic_write_json(args.out, result)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    sys.exit(main() and 0)
