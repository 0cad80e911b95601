"""Cross-attention capture for any ``UNet2DConditionModel`` text-to-image pipeline (DiffuMask).

    store = AttentionStore(token_weights, image_size=(512, 512), resolutions=(16, 32, 64))
    with capture_cross_attention(pipe.unet, store):
        out = pipe(prompts, num_inference_steps=50, guidance_scale=7.0)
    maps = store.maps()  # (B, C, H, W) float32 in [0, 1], each class map's max is 1

Aggregation (METHOD.md §7): per step and per resolution, the class-token attention
probabilities of the conditional half are averaged over heads and layers, upsampled to the image
size and divided by their max; resolutions are averaged, then steps. Only running sums per
resolution (this step) and one image-size sum over steps are kept, so memory does not grow with
the number of steps. The UNet's own outputs are untouched: the original processor still
computes every layer's output, the probabilities are recomputed beside it.
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F


class ClassWordError(ValueError):
    """A class word that the prompt does not contain (or that was cut off by truncation)."""


def class_token_positions(tokenizer, prompt: str, word: str) -> list[int]:
    """Positions, in the encoder sequence of ``prompt``, of the tokens of ``word`` (last occurrence).

    Sub-word pieces are all returned (the caller averages them). Raises ``ClassWordError`` when
    the word is absent, including when it falls beyond the tokenizer's max length.
    """
    ids = tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length).input_ids
    pieces = tokenizer(word, add_special_tokens=False).input_ids
    if not pieces:
        raise ClassWordError(f"class word {word!r} has no tokens")
    n = len(pieces)
    for start in range(len(ids) - n, -1, -1):
        if ids[start:start + n] == pieces:
            return list(range(start, start + n))
    raise ClassWordError(f"class word {word!r} is not in prompt {prompt!r} "
                         f"(or lies beyond the {tokenizer.model_max_length}-token limit)")


def token_weights(tokenizer, prompts: Sequence[str], words_per_prompt: Sequence[Sequence[str]],
                  seq_len: int | None = None) -> torch.Tensor:
    """(B, C_max, L) weights: 1/n on the n pieces of class word c of prompt b, 0 elsewhere.

    Rows of prompts with fewer classes than C_max stay zero (their maps come out zero).
    """
    seq_len = seq_len or tokenizer.model_max_length
    c_max = max((len(w) for w in words_per_prompt), default=0)
    if c_max == 0:
        raise ClassWordError("no class words given")
    weights = torch.zeros(len(prompts), c_max, seq_len)
    for b, (prompt, words) in enumerate(zip(prompts, words_per_prompt)):
        for c, word in enumerate(words):
            pos = class_token_positions(tokenizer, prompt, word)
            weights[b, c, pos] = 1.0 / len(pos)
    return weights


class AttentionStore:
    """Running sums of class-word cross-attention; one object per pipeline call.

    ``resolutions``: latent-grid sides to use (SD at 512 px has 64, 32, 16, 8); empty = all.
    ``steps``: denoising step indices to use (0-based); None = all.
    """

    def __init__(self, token_weights: torch.Tensor, image_size: tuple[int, int],
                 resolutions: Sequence[int] = (), steps: Sequence[int] | None = None,
                 normalization: str = "max"):
        if normalization not in ("max", "minmax"):
            raise ValueError(f"normalization must be 'max' or 'minmax', not {normalization!r}")
        # "max" is DiffuMask's (each map / its max). "minmax" also subtracts the map's minimum:
        # for a model whose class-token attention sits on a high floor everywhere (the tiny toy
        # model: min ~0.6 of max), x / max leaves every pixel above every gamma in 0.35-0.55.
        self.normalization = normalization
        self.weights = token_weights.float()
        self.batch_size = token_weights.shape[0]
        self.image_size = tuple(image_size)
        self.resolutions = tuple(int(r) for r in resolutions)
        self.steps = None if steps is None else set(int(s) for s in steps)
        self.num_layers = 0  # set by capture_cross_attention
        self.calls = 0
        self.seen_resolutions: set[int] = set()
        self._step_sums: dict[int, torch.Tensor] = {}
        self._step_counts: dict[int, int] = {}
        self._total: torch.Tensor | None = None
        self.num_steps_recorded = 0

    @property
    def step(self) -> int:
        return self.calls // max(self.num_layers, 1)

    def wants(self, side: int) -> bool:
        self.seen_resolutions.add(side)
        if self.steps is not None and self.step not in self.steps:
            return False
        return not self.resolutions or side in self.resolutions

    def add(self, side: int, probs: torch.Tensor) -> None:
        """``probs``: (B, Q, L) head-averaged probabilities of the conditional half."""
        w = self.weights.to(probs.device, probs.dtype)
        maps = torch.einsum("bql,bcl->bcq", probs, w).float()
        if side in self._step_sums:
            self._step_sums[side] += maps
            self._step_counts[side] += 1
        else:
            self._step_sums[side] = maps
            self._step_counts[side] = 1

    def layer_done(self) -> None:
        self.calls += 1
        if self.num_layers and self.calls % self.num_layers == 0:
            self._end_step()

    def _end_step(self) -> None:
        if not self._step_sums:
            return
        h_img, w_img = self.image_size
        step_map = None
        for side, total in self._step_sums.items():
            b, c, q = total.shape
            w_lat = q // side
            m = (total / self._step_counts[side]).reshape(b, c, side, w_lat)
            m = F.interpolate(m, size=(h_img, w_img), mode="bilinear", align_corners=False)
            m = m / m.amax(dim=(2, 3), keepdim=True).clamp_min(1e-12)
            step_map = m if step_map is None else step_map + m
        step_map = step_map / len(self._step_sums)
        self._total = step_map if self._total is None else self._total + step_map
        self.num_steps_recorded += 1
        self._step_sums.clear()
        self._step_counts.clear()

    def maps(self) -> torch.Tensor:
        """(B, C, H, W) float32 on CPU, each class map scaled to max 1 (``normalization``), in [0, 1]."""
        missing = [r for r in self.resolutions if r not in self.seen_resolutions]
        if missing:
            raise ValueError(f"attention resolution(s) {missing} do not exist in this UNet; "
                             f"available: {sorted(self.seen_resolutions)}")
        if self._total is None:
            raise ValueError("no cross-attention was recorded (check the steps/resolutions settings)")
        m = self._total / self.num_steps_recorded
        if self.normalization == "minmax":
            m = m - m.amin(dim=(2, 3), keepdim=True)
        m = m / m.amax(dim=(2, 3), keepdim=True).clamp_min(1e-12)
        return m.clamp(0, 1).cpu()


class CrossAttentionCapture:
    """attn2 processor: runs the original processor, records the class-token probabilities."""

    def __init__(self, original, store: AttentionStore, latent_hw: tuple[int, int]):
        self.original = original
        self.store = store
        self.latent_hw = latent_hw

    def _side(self, num_queries: int) -> int:
        h, w = self.latent_hw
        return max(1, round(math.sqrt(num_queries * h / w)))

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, *args, **kwargs):
        out = self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        try:
            if encoder_hidden_states is not None:
                self._record(attn, hidden_states, encoder_hidden_states, temb)
        finally:
            self.store.layer_done()
        return out

    @torch.no_grad()
    def _record(self, attn, hidden_states, encoder_hidden_states, temb) -> None:
        x = hidden_states
        if attn.spatial_norm is not None:
            x = attn.spatial_norm(x, temb)
        if x.ndim == 4:
            n, ch, h, w = x.shape
            x = x.view(n, ch, h * w).transpose(1, 2)
        side = self._side(x.shape[1])
        if not self.store.wants(side):
            return
        b = self.store.batch_size
        if x.shape[0] == 2 * b:  # classifier-free guidance: the uncond half comes first
            x, ctx = x[b:], encoder_hidden_states[b:]
        elif x.shape[0] == b:
            ctx = encoder_hidden_states
        else:
            raise ValueError(f"UNet batch {x.shape[0]} is neither {b} prompts nor {2 * b} (with CFG)")
        if attn.group_norm is not None:
            x = attn.group_norm(x.transpose(1, 2)).transpose(1, 2)
        if attn.norm_cross:
            ctx = attn.norm_encoder_hidden_states(ctx)
        query = attn.head_to_batch_dim(attn.to_q(x))
        key = attn.head_to_batch_dim(attn.to_k(ctx))
        probs = attn.get_attention_scores(query, key, None)  # (b*heads, Q, L)
        probs = probs.reshape(b, -1, probs.shape[1], probs.shape[2]).mean(1)
        self.store.add(side, probs)


@contextlib.contextmanager
def capture_cross_attention(unet, store: AttentionStore, latent_hw: tuple[int, int] | None = None
                            ) -> Iterator[AttentionStore]:
    """Install capturing processors on every attn2 (cross-attention) layer; restore on exit."""
    originals = dict(unet.attn_processors)
    cross = [k for k in originals if k.endswith("attn2.processor")]
    if not cross:
        raise ValueError("this UNet has no cross-attention (attn2) layers")
    if latent_hw is None:
        h, w = store.image_size
        latent_hw = (h, w)  # only the aspect ratio matters for telling a layer's side
    store.num_layers = len(cross)
    procs = {k: (CrossAttentionCapture(p, store, latent_hw) if k in cross else p) for k, p in originals.items()}
    unet.set_attn_processor(procs)
    try:
        yield store
    finally:
        unet.set_attn_processor(originals)
