"""The joint denoiser: a Stable Diffusion UNet widened to denoise [image latent ; label latent].

    from diffusers import UNet2DConditionModel
    from models.joint_unet import widen_unet_for_labels
    unet = UNet2DConditionModel.from_pretrained("runs/toy/base_image", subfolder="unet")
    joint_unet = widen_unet_for_labels(unet, label_channels=4)   # 4 -> 8 input/output channels

The surgery touches only the first and last convolutions, so every pretrained weight in between
is reused as is (the instruct-pix2pix precedent for widening ``conv_in``). The training loss of
both halves lives here too, so the training script and the benchmark compute the same thing.
"""
from __future__ import annotations

import torch
import torch.nn as nn


def _like(conv: nn.Conv2d, in_channels: int, out_channels: int) -> nn.Conv2d:
    """A conv with ``conv``'s geometry, device and dtype but other channel counts."""
    return nn.Conv2d(
        in_channels, out_channels, kernel_size=conv.kernel_size, stride=conv.stride,
        padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
        bias=conv.bias is not None, padding_mode=conv.padding_mode,
        device=conv.weight.device, dtype=conv.weight.dtype,
    )


def widen_unet_for_labels(unet, label_channels: int = 4):
    """Widen a diffusers ``UNet2DConditionModel`` in place to also denoise a label latent.

    - ``conv_in`` takes ``in_channels + label_channels`` channels: [image latent ; label latent].
      The pretrained weights are copied to the image channels and the new label-channel weights
      start at **zero**, so at initialisation the network ignores the label latent and the image
      half of its output equals the base UNet's output exactly.
    - ``conv_out`` predicts ``out_channels + label_channels`` channels: [image noise ; label noise].
      The image rows keep the pretrained weights; the new label rows start as a **copy** of the
      image rows (cycled if the channel counts differ), as the authors initialise the label
      output head from the image one. The copy gives the label half the pretrained output scale
      from the first step (a zero head would start from predicting no noise at all); it cannot
      disturb the image half, whose rows are untouched.
    - ``register_to_config`` records the new channel counts, so the widened UNet round-trips
      through ``save_pretrained`` / ``from_pretrained`` with no extra code.

    Works on any device, including ``meta`` (no values are read then). Returns ``unet``.
    """
    if label_channels < 1:
        raise ValueError(f"label_channels must be >= 1, got {label_channels}")
    in_ch, out_ch = unet.config.in_channels, unet.config.out_channels
    old_in, old_out = unet.conv_in, unet.conv_out
    if old_in.in_channels != in_ch or old_out.out_channels != out_ch:
        raise ValueError(f"UNet config says {in_ch} -> {out_ch} channels but conv_in/conv_out have "
                         f"{old_in.in_channels} -> {old_out.out_channels}")

    new_in = _like(old_in, in_ch + label_channels, old_in.out_channels)
    new_out = _like(old_out, old_out.in_channels, out_ch + label_channels)
    copy_rows = torch.arange(label_channels, device="cpu") % out_ch
    with torch.no_grad():
        new_in.weight.zero_()
        new_in.weight[:, :in_ch].copy_(old_in.weight)
        if old_in.bias is not None:
            new_in.bias.copy_(old_in.bias)
        new_out.weight[:out_ch].copy_(old_out.weight)
        new_out.weight[out_ch:].copy_(old_out.weight[copy_rows.to(old_out.weight.device)])
        if old_out.bias is not None:
            new_out.bias[:out_ch].copy_(old_out.bias)
            new_out.bias[out_ch:].copy_(old_out.bias[copy_rows.to(old_out.bias.device)])
    new_in.weight.requires_grad_(old_in.weight.requires_grad)
    new_out.weight.requires_grad_(old_out.weight.requires_grad)
    unet.conv_in, unet.conv_out = new_in, new_out
    unet.register_to_config(in_channels=in_ch + label_channels, out_channels=out_ch + label_channels)
    return unet


def label_channels_of(unet, image_channels: int = 4) -> int:
    """How many label-latent channels a (possibly widened) UNet carries; 0 for a plain one."""
    return int(unet.config.in_channels) - int(image_channels)


def joint_epsilon_loss(noise_pred: torch.Tensor, noise: torch.Tensor, image_channels: int,
                       label_loss_weight: float = 1.0, sample_weights: torch.Tensor | None = None,
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Epsilon-prediction MSE over both halves, in fp32: ``(loss, image_loss, label_loss)``.

    ``loss = (image_loss + w * label_loss) / (1 + w)`` where each half is its own mean squared
    error. With the default ``w = 1`` and equally wide halves this is exactly the plain mean over
    all channels, the authors' loss. Image-only tensors (no label half) give ``label_loss=None``.
    ``sample_weights`` (shape ``(B,)``, e.g. :func:`min_snr_weights`) weight each sample's error
    before the batch mean; ``None`` is the plain mean.
    """
    err = (noise_pred.float() - noise.float()).pow(2)
    if sample_weights is not None:
        err = err * sample_weights.float().view(-1, *([1] * (err.dim() - 1)))
    image_loss = err[:, :image_channels].mean()
    if err.shape[1] == image_channels:
        return image_loss, image_loss, None
    label_loss = err[:, image_channels:].mean()
    loss = (image_loss + label_loss_weight * label_loss) / (1.0 + label_loss_weight)
    return loss, image_loss, label_loss


def min_snr_weights(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, gamma: float,
                    prediction_type: str = "epsilon") -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al., 2023): ``min(SNR(t), gamma) / SNR(t)`` for epsilon
    prediction (``/ (SNR(t) + 1)`` for v-prediction), one per timestep.

    They leave the noisy timesteps (SNR < gamma) at weight 1 and turn down the nearly clean ones,
    whose epsilon error is large but shapes little of a sample; the paper measured ~3x faster
    convergence with gamma = 5.
    """
    if gamma <= 0:
        raise ValueError(f"snr_gamma must be > 0, got {gamma}")
    ac = alphas_cumprod.to(timesteps.device)[timesteps].float()
    snr = ac / (1.0 - ac)
    clipped = torch.clamp(snr, max=gamma)
    return clipped / (snr + 1.0) if prediction_type == "v_prediction" else clipped / snr


def unet_joint_loss(unet, noise_scheduler, text_encoder, latents: torch.Tensor, ids: torch.Tensor,
                    empty_ids: torch.Tensor, gen: torch.Generator, caption_dropout: float, image_channels: int,
                    label_loss_weight: float = 1.0, snr_gamma: float | None = None):
    """The widened UNet's training loss on one micro-batch (METHOD.md §3): noise, one timestep
    shared by the image and label halves, captions dropped to ``empty_ids`` with probability
    ``caption_dropout`` (classifier-free guidance), epsilon (or v) MSE in fp32
    (``joint_epsilon_loss``). Returns (loss, image_loss, label_loss or None)."""
    noise = torch.randn(latents.shape, generator=gen, device=latents.device, dtype=latents.dtype)
    t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), generator=gen,
                      device=latents.device)
    drop = torch.rand(latents.shape[0], generator=gen, device=latents.device) < caption_dropout
    ids = torch.where(drop[:, None], empty_ids, ids)
    with torch.no_grad():
        text = text_encoder(ids)[0]
    noisy = noise_scheduler.add_noise(latents, noise, t)  # one t for image and label halves
    prediction_type = noise_scheduler.config.prediction_type
    target = noise if prediction_type == "epsilon" else noise_scheduler.get_velocity(latents, noise, t)
    pred = unet(noisy, t, text).sample
    weights = None if not snr_gamma else min_snr_weights(noise_scheduler.alphas_cumprod, t, snr_gamma, prediction_type)
    return joint_epsilon_loss(pred, target, image_channels, label_loss_weight, sample_weights=weights)


def unet_batch_loss(unet, noise_scheduler, models: dict, latents: torch.Tensor, ids: torch.Tensor, clip, gen,
                    image_channels: int, empty_ids: torch.Tensor, caption_dropout: float, label_loss_weight: float = 1.0,
                    snr_gamma: float | None = None, **_):
    """The trainer's call (``clip`` unused): ``unet_joint_loss``, as (loss, {part: loss})."""
    loss, image_loss, label_loss = unet_joint_loss(unet, noise_scheduler, models["text_encoder"], latents, ids, empty_ids,
                                                   gen, caption_dropout, image_channels, label_loss_weight, snr_gamma)
    return loss, {"image": image_loss} | ({"label": label_loss} if label_loss is not None else {})
