"""The tiny SD-layout model kit: built offline, loads back through diffusers like a real SD folder."""
import json

import numpy as np
import torch

from models.tiny_kit import TinySDSpec, build_tiny_sd, build_tokenizer, words_from_texts


def test_prompt_tokenizes_to_the_expected_word_ids(tmp_path):
    words = words_from_texts(["a red circle and a blue star on a striped background"])
    tok = build_tokenizer(words, out_dir=tmp_path / "tok")
    vocab = tok.get_vocab()
    ids = tok("a red circle and a blue star").input_ids
    expected = [tok.bos_token_id] + [vocab[w + "</w>"] for w in "a red circle and a blue star".split()] + [tok.eos_token_id]
    assert ids == expected
    # unknown words fall back to characters instead of failing
    assert len(tok("zebra").input_ids) == 2 + len("zebra")
    from transformers import CLIPTokenizer

    again = CLIPTokenizer.from_pretrained(tmp_path / "tok")
    assert again("a red circle").input_ids == tok("a red circle").input_ids


def test_tiny_sd_folder_round_trips_through_from_pretrained(tmp_path):
    from diffusers import StableDiffusionPipeline

    words = ["a", "red", "circle"]
    out = build_tiny_sd(tmp_path / "sd", words, TinySDSpec(), seed=0)
    index = json.loads((out / "model_index.json").read_text())
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert part in index and (out / part).is_dir()
    assert list(out.rglob("*.safetensors")) and not list(out.rglob("*.bin"))
    pipe = StableDiffusionPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.vae.config.block_out_channels == [32, 64, 64]  # factor 4: 32 px -> 8x8 latents
    g = torch.Generator().manual_seed(3)
    a = pipe("a red circle", num_inference_steps=2, height=32, width=32, output_type="np", generator=g).images
    g = torch.Generator().manual_seed(3)
    b = pipe("a red circle", num_inference_steps=2, height=32, width=32, output_type="np", generator=g).images
    assert a.shape == (1, 32, 32, 3) and np.array_equal(a, b)


def test_unet_attention_flags_choose_the_cross_attention_levels():
    import pytest

    from models.tiny_kit import tiny_components

    # the toy profiles' layout: 16x16 latents, no attention at full resolution, cross-attention at 8x8
    spec = TinySDSpec(sample_size=16, unet_channels=(32, 64, 64), unet_attention=(False, True, False),
                      vae_channels=(32, 64))
    comps = tiny_components(["a", "red", "circle"], spec, seed=0)
    unet = comps["unet"]
    assert unet.config.down_block_types == ("DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
    assert unet.config.up_block_types == ("UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
    latents = torch.randn(2, 4, 16, 16)
    text = torch.randn(2, 5, spec.text_hidden)
    assert unet(latents, 10, text).sample.shape == latents.shape
    # the VAE of this spec is factor 2: 32 px -> 16x16
    assert comps["vae"].encode(torch.zeros(1, 3, 32, 32)).latent_dist.mean.shape == (1, 4, 16, 16)
    # the default stays SD's: attention everywhere but the deepest level
    default = tiny_components(["a"], TinySDSpec(), seed=0)["unet"]
    assert default.config.down_block_types == ("CrossAttnDownBlock2D", "DownBlock2D")
    with pytest.raises(ValueError, match="one flag per UNet level"):
        tiny_components(["a"], TinySDSpec(unet_attention=(True,)), seed=0)


def test_random_text_encoder_tells_the_class_words_apart():
    """A frozen random encoder stands in for CLIP: the class word, not its position, must decide
    the token's output, or the UNet cannot read which shapes a caption asks for."""
    from models.tiny_kit import tiny_components

    caps = [f"a red {shape} and a blue circle on a striped background" for shape in ("star", "square", "ring")]
    comps = tiny_components(words_from_texts(caps), TinySDSpec(), seed=0)
    tok, te = comps["tokenizer"], comps["text_encoder"].eval()
    ids = tok(caps, padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
    with torch.no_grad():
        h = torch.nn.functional.normalize(te(ids)[0][:, 3], dim=-1)  # the first shape word's output
    cos = h @ h.T
    assert float(cos[0, 1]) < 0.8 and float(cos[0, 2]) < 0.8 and float(cos[1, 2]) < 0.8
    # CLIP's own initialisation (std 0.02) is what this guards against: there the words blur together
    small = tiny_components(words_from_texts(caps), TinySDSpec(token_embedding_std=0.02), seed=0)
    with torch.no_grad():
        h2 = torch.nn.functional.normalize(small["text_encoder"].eval()(ids)[0][:, 3], dim=-1)
    assert float((h2 @ h2.T)[0, 1]) > float(cos[0, 1])
