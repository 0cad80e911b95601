"""The UNet surgery: the image half is untouched at initialisation, shapes, config round-trip."""
import copy

import pytest
import torch
from diffusers import UNet2DConditionModel

from models.joint_unet import joint_epsilon_loss, label_channels_of, min_snr_weights, widen_unet_for_labels

# Stable Diffusion 1.5's unet/config.json, written out (no download).
SD15_UNET_CONFIG = dict(
    act_fn="silu", attention_head_dim=8, block_out_channels=[320, 640, 1280, 1280],
    center_input_sample=False, cross_attention_dim=768,
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"], downsample_padding=1,
    flip_sin_to_cos=True, freq_shift=0, in_channels=4, layers_per_block=2, mid_block_scale_factor=1,
    norm_eps=1e-5, norm_num_groups=32, out_channels=4, sample_size=64,
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
)


def tiny_unet(seed=0):
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
        attention_head_dim=8, norm_num_groups=8,
    ).eval()


def test_image_half_equals_base_unet_at_init():
    base = tiny_unet()
    joint = widen_unet_for_labels(copy.deepcopy(base), label_channels=4)
    image_latent, text = torch.randn(3, 4, 8, 8), torch.randn(3, 5, 16)
    label_latent = torch.randn(3, 4, 8, 8) * 3  # random label latents must not leak in
    t = torch.tensor([1, 500, 999])
    with torch.no_grad():
        ref = base(image_latent, t, text).sample
        out = joint(torch.cat([image_latent, label_latent], 1), t, text).sample
    assert out.shape == (3, 8, 8, 8)
    assert (out[:, :4] - ref).abs().max().item() <= 1e-5
    # the label head starts as a copy of the image head, so the label half is not zero either
    assert out[:, 4:].abs().mean() > 0


def test_widened_unet_learns_from_label_channels():
    """Zero-initialised label input weights still get gradients (they are not dead)."""
    joint = widen_unet_for_labels(tiny_unet(), label_channels=4).train()
    x = torch.randn(2, 8, 8, 8)
    joint(x, torch.tensor([10, 20]), torch.randn(2, 5, 16)).sample.pow(2).mean().backward()
    assert joint.conv_in.weight.grad[:, 4:].abs().sum() > 0


def test_round_trip_through_save_pretrained(tmp_path):
    joint = widen_unet_for_labels(tiny_unet(), label_channels=4)
    joint.save_pretrained(tmp_path / "unet", safe_serialization=True)
    assert (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = UNet2DConditionModel.from_pretrained(tmp_path / "unet").eval()
    assert loaded.config.in_channels == 8 and loaded.config.out_channels == 8
    assert label_channels_of(loaded) == 4
    x, t, text = torch.randn(1, 8, 8, 8), torch.tensor([300]), torch.randn(1, 5, 16)
    with torch.no_grad():
        assert torch.equal(joint(x, t, text).sample, loaded(x, t, text).sample)


def test_sd15_configuration_widens_on_meta_device():
    from accelerate import init_empty_weights

    with init_empty_weights():
        unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
    base_params = sum(p.numel() for p in unet.parameters())
    assert base_params == 859_520_964  # SD-1.5's published 859.5M
    widen_unet_for_labels(unet, label_channels=4)
    assert unet.conv_in.weight.shape == (320, 8, 3, 3) and unet.conv_out.weight.shape == (8, 320, 3, 3)
    assert unet.conv_in.weight.device.type == "meta"
    # 4x320x3x3 new input weights + 4x320x3x3 new output weights + 4 output biases
    assert sum(p.numel() for p in unet.parameters()) - base_params == 2 * 4 * 320 * 9 + 4
    assert unet.config.in_channels == 8 and unet.config.out_channels == 8


def test_bad_label_channels_are_refused():
    with pytest.raises(ValueError):
        widen_unet_for_labels(tiny_unet(), label_channels=0)


def test_joint_loss_default_is_plain_mean_over_all_channels():
    pred, noise = torch.randn(2, 8, 4, 4), torch.randn(2, 8, 4, 4)
    loss, image_loss, label_loss = joint_epsilon_loss(pred, noise, image_channels=4)
    assert torch.allclose(loss, (pred - noise).pow(2).mean())
    assert torch.allclose(image_loss, (pred[:, :4] - noise[:, :4]).pow(2).mean())
    weighted, _, _ = joint_epsilon_loss(pred, noise, 4, label_loss_weight=3.0)
    assert torch.allclose(weighted, (image_loss + 3 * label_loss) / 4)
    only_image, _, none = joint_epsilon_loss(pred[:, :4], noise[:, :4], 4)
    assert none is None and torch.allclose(only_image, image_loss)


def test_min_snr_weights_turn_down_only_the_nearly_clean_timesteps():
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    t = torch.tensor([0, 50, 400, 999])
    w = min_snr_weights(sched.alphas_cumprod, t, gamma=5.0)
    ac = sched.alphas_cumprod[t]
    snr = ac / (1 - ac)
    assert torch.allclose(w[:2], 5.0 / snr[:2])  # SNR > 5: weight gamma / SNR < 1
    assert w[0] < w[1] < 1.0
    assert torch.allclose(w[2:], torch.ones(2))  # noisy timesteps keep weight 1
    v = min_snr_weights(sched.alphas_cumprod, t, gamma=5.0, prediction_type="v_prediction")
    assert torch.allclose(v, torch.clamp(snr, max=5.0) / (snr + 1))
    with pytest.raises(ValueError):
        min_snr_weights(sched.alphas_cumprod, t, gamma=0.0)


def test_joint_loss_sample_weights_scale_each_sample():
    pred, noise = torch.randn(2, 8, 4, 4), torch.randn(2, 8, 4, 4)
    plain, _, _ = joint_epsilon_loss(pred, noise, 4)
    ones, _, _ = joint_epsilon_loss(pred, noise, 4, sample_weights=torch.ones(2))
    assert torch.allclose(plain, ones)
    only_first, image_loss, _ = joint_epsilon_loss(pred, noise, 4, sample_weights=torch.tensor([2.0, 0.0]))
    assert torch.allclose(only_first, (pred[0] - noise[0]).pow(2).mean())  # 2 * half of the batch mean
    assert torch.allclose(image_loss, (pred[0, :4] - noise[0, :4]).pow(2).mean())

