"""Step 0 of the authors' JoDiffusion: their U-ViT initialised from UniDiffuser-v1 (METHOD.md §8).

    from models.uvit_init import write_uvit_pipeline_folder
    write_uvit_pipeline_folder("downloads/unidiffuser-v1", "runs/voc/label_vae_run", "runs/voc/uvit_init")

Every module of UniDiffuser-v1's U-ViT is copied under its own name; the text bottleneck
``pre_text`` / ``post_text`` is its caption decoder's ``encode_prefix`` / ``decode_prefix``
(768 -> 64 -> 768); the label stream starts as a copy of the image stream: ``vae_label_in`` =
``vae_img_in``, ``label_out`` = ``vae_img_out``, and the label position rows = the image position
rows (UniDiffuser's last N rows). With the label latent equal to the image latent, the label
prediction therefore equals the image prediction at step 0.

``write_uvit_pipeline_folder`` turns a UniDiffuser pipeline folder (as diffusers saves it) plus a
trained label VAE into a whole U-ViT pipeline folder (``models.pipeline_uvit`` layout) that
``models.pipelines.load_pipeline`` loads and training can start from.
"""
from __future__ import annotations

import inspect
import json
import shutil
from pathlib import Path

import diffusers
import torch
from diffusers.pipelines.deprecated.unidiffuser.modeling_text_decoder import UniDiffuserTextDecoder
from diffusers.pipelines.deprecated.unidiffuser.modeling_uvit import UniDiffuserModel

from models.joint_uvit import PAPER_UVIT_CONFIG, JoDiffusionUViT, num_patches
from models.label_vae import load_label_vae
from utils.io import atomic_folder, check_pipeline_folder, read_json_object
from utils.weights import convert_folder

# The settings that make a UniDiffuser U-ViT the authors' layout; sizes (widths, depth, number of
# text tokens, sample size) may differ, these may not.
REQUIRED_UNIDIFFUSER_SETTINGS = {key: PAPER_UVIT_CONFIG[key] for key in (
    "patch_size", "block_type", "pre_layer_norm", "use_timestep_embedding", "use_patch_pos_embed",
    "use_data_type_embedding", "cross_attention_dim", "num_vector_embeds", "norm_type")}

# UniDiffuser folder name -> ours; each is copied as is (a .bin rewritten as safetensors).
COPIED_COMPONENTS = {"vae": "image_vae", "text_encoder": "text_encoder", "clip_tokenizer": "clip_tokenizer",
                     "image_encoder": "image_encoder", "clip_image_processor": "clip_image_processor",
                     "scheduler": "scheduler"}
UNIDIFFUSER_COMPONENTS = (*COPIED_COMPONENTS, "unet", "text_decoder")
# weights in formats we never load (not copied, not downloaded); a .bin beside a safetensors
# file is the same weights again
FOREIGN_WEIGHTS = ("*.msgpack", "*.h5", "*.onnx", "*.ckpt")


def _unidiffuser_defaults() -> dict:
    """UniDiffuserModel's own defaults, for keys a config.json leaves out."""
    params = inspect.signature(UniDiffuserModel.__init__).parameters
    return {k: p.default for k, p in params.items() if k != "self"}


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())[:300]


def uvit_config_from_unidiffuser(unidiffuser_unet_config: dict, text_dim: int,
                                 where: str = "UniDiffuser unet config") -> dict:
    """Our ``JoDiffusionUViT`` config (the authors' keys) for a UniDiffuser U-ViT config.

    Every UniDiffuser key carries over; its ``text_dim`` (the caption-decoder prefix width, 64 for
    v1) becomes ``inner_text_dim``, and ``text_dim`` is the CLIP text width (768 for v1).
    ValueError (starting with ``where``) naming the key for a config that is not the authors' layout.
    """
    if isinstance(text_dim, bool) or not isinstance(text_dim, int) or text_dim < 1:
        raise ValueError(f"{where}: text_dim (the CLIP text width) must be a positive int, got {text_dim!r}")
    config = dict(_unidiffuser_defaults())
    for key, value in dict(unidiffuser_unet_config).items():
        if key.startswith("_"):  # _class_name, _diffusers_version, _name_or_path
            continue
        if key not in config:
            raise ValueError(f"{where}: unknown key '{key}' (diffusers {diffusers.__version__}'s "
                             "UniDiffuserModel has no such setting)")
        config[key] = value
    for key, required in REQUIRED_UNIDIFFUSER_SETTINGS.items():
        if config[key] != required:
            raise ValueError(f"{where}: '{key}' is {config[key]!r}, the authors' U-ViT needs {required!r}")
    if config["sample_size"] is None or config["in_channels"] is None:
        raise ValueError(f"{where}: 'sample_size' and 'in_channels' must be set")
    out_channels = config["out_channels"] if config["out_channels"] is not None else config["in_channels"]
    if out_channels != config["in_channels"]:
        raise ValueError(f"{where}: 'out_channels' is {out_channels} but 'in_channels' {config['in_channels']}; "
                         "the label stream copies the image stream, so they must be equal")
    if config["sample_size"] % config["patch_size"]:
        raise ValueError(f"{where}: 'sample_size' {config['sample_size']} is not a multiple of "
                         f"'patch_size' {config['patch_size']}")
    config["out_channels"] = out_channels
    config["inner_text_dim"] = config.pop("text_dim")
    config["text_dim"] = text_dim
    return config


def _prefix_layers(text_decoder, inner_text_dim: int) -> tuple[torch.nn.Linear, torch.nn.Linear]:
    """The caption decoder's (encode_prefix, decode_prefix), checked against the U-ViT's text width."""
    encode, decode = text_decoder.encode_prefix, text_decoder.decode_prefix
    if not isinstance(encode, torch.nn.Linear) or not isinstance(decode, torch.nn.Linear):
        raise ValueError("text_decoder: encode_prefix / decode_prefix are not Linear layers "
                         "(prefix_hidden_dim is None); the authors' text bottleneck needs them")
    if encode.out_features != inner_text_dim or decode.in_features != inner_text_dim:
        raise ValueError(f"text_decoder: encode_prefix gives {encode.out_features} and decode_prefix takes "
                         f"{decode.in_features} features, but the UniDiffuser U-ViT's text_dim is {inner_text_dim}")
    if decode.out_features != encode.in_features:
        raise ValueError(f"text_decoder: decode_prefix gives {decode.out_features} features but encode_prefix "
                         f"takes {encode.in_features}; post_text must map back to the CLIP text width")
    return encode, decode


def uvit_state_dict(unidiffuser_unet, text_decoder) -> dict[str, torch.Tensor]:
    """The JoDiffusion U-ViT's step-0 weights, every tensor a fresh copy (the label stream is a
    copy of the image stream, not the same storage: safetensors refuses shared tensors)."""
    source = unidiffuser_unet.state_dict()
    encode, decode = _prefix_layers(text_decoder, unidiffuser_unet.config.text_dim)
    state = {key: value for key, value in source.items() if key != "pos_embed"}
    n = num_patches(unidiffuser_unet.config)
    # rows [t_img, t_text, text x T, clip, image x N] carry over; the label rows copy the image rows
    state["pos_embed"] = torch.cat([source["pos_embed"], source["pos_embed"][:, -n:]], dim=1)
    for ours, theirs in (("pre_text", encode), ("post_text", decode)):
        state[f"{ours}.weight"], state[f"{ours}.bias"] = theirs.weight, theirs.bias
    for ours, theirs in (("vae_label_in.proj", "vae_img_in.proj"), ("label_out", "vae_img_out")):
        for name in ("weight", "bias"):
            state[f"{ours}.{name}"] = source[f"{theirs}.{name}"]
    dtype = unidiffuser_unet.dtype
    return {key: value.detach().to(dtype=dtype, copy=True).contiguous() for key, value in state.items()}


def uvit_from_unidiffuser(unidiffuser_unet, text_decoder) -> JoDiffusionUViT:
    """The authors' step-0 JoDiffusion U-ViT from a loaded UniDiffuser U-ViT and caption decoder.

    The model is built on the ``meta`` device and takes its weights from one fully assembled
    state dict (``strict=True``): a key this function forgot, or one UniDiffuser lacks, is an
    error, never a randomly initialised parameter. ValueError for a model that does not fit.
    """
    encode, _ = _prefix_layers(text_decoder, unidiffuser_unet.config.text_dim)
    config = uvit_config_from_unidiffuser(dict(unidiffuser_unet.config), encode.in_features)
    state = uvit_state_dict(unidiffuser_unet, text_decoder)
    with torch.device("meta"):
        model = JoDiffusionUViT(**config)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:  # torch lists every missing/unexpected key and shape mismatch
        raise ValueError(f"UniDiffuser -> JoDiffusion U-ViT: {_one_line(e)}") from None
    return model.eval()


def _check_label_vae(label_vae, label_folder: Path, source: Path, in_channels: int) -> None:
    """The label latent must have the U-ViT's channels and the image latent's size."""
    if label_vae.config.latent_channels != in_channels:
        raise ValueError(f"{label_folder}: the label VAE has {label_vae.config.latent_channels} latent channels "
                         f"but the U-ViT in {source / 'unet'} takes {in_channels}")
    vae_blocks = read_json_object(source / "vae" / "config.json").get("block_out_channels")
    if not isinstance(vae_blocks, list) or not vae_blocks:
        raise ValueError(f"{source / 'vae' / 'config.json'}: no 'block_out_channels' list")
    image_factor = 2 ** (len(vae_blocks) - 1)
    if label_vae.downsample_factor != image_factor:
        raise ValueError(f"{label_folder}: the label VAE downsamples by {label_vae.downsample_factor} but the "
                         f"image VAE in {source / 'vae'} by {image_factor}: their latents would not line up")


def _label_vae_folder(path: Path) -> Path:
    """The label VAE's own folder: ``path`` or, for a training run folder, ``path/label_vae``."""
    if not (path / "config.json").is_file() and (path / "label_vae" / "config.json").is_file():
        return path / "label_vae"
    return path


def _copy_component(src: Path, dst: Path) -> None:
    """Copy a component folder as is; a .bin-only one has its weights rewritten as safetensors."""
    if any(src.glob("*.safetensors")):
        skipped = shutil.ignore_patterns(*FOREIGN_WEIGHTS, ".*", "*.bin", "*.bin.index.json")
        shutil.copytree(src, dst, ignore=skipped)
    else:
        convert_folder(src, dst)
        for pattern in FOREIGN_WEIGHTS:  # (convert_folder already skips dot files)
            for path in list(dst.rglob(pattern)):
                path.unlink()


def _model_index(source: Path, label_vae) -> dict:
    """model_index.json: the copied parts keep UniDiffuser's classes; unet and label_vae are ours."""
    theirs = read_json_object(source / "model_index.json")
    index = {"_class_name": "JoDiffusionUViTPipeline", "_diffusers_version": diffusers.__version__}
    for name, ours in COPIED_COMPONENTS.items():
        entry = theirs.get(name)
        if not (isinstance(entry, list) and len(entry) == 2 and entry[1]):
            raise ValueError(f"{source / 'model_index.json'}: no class for component '{name}'")
        index[ours] = entry
    index["label_vae"] = [type(label_vae).__module__, type(label_vae).__name__]
    index["unet"] = [JoDiffusionUViT.__module__, JoDiffusionUViT.__name__]
    return index


def _check_output_dir(output: Path) -> None:
    """Never replace a folder that is not a pipeline folder (a mistyped runs/voc, say)."""
    if output.exists() and (not output.is_dir() or (any(output.iterdir()) and
                                                    not (output / "model_index.json").is_file())):
        raise ValueError(f"{output}: exists and is not a pipeline folder; refusing to replace it")


def write_uvit_pipeline_folder(unidiffuser_folder: str | Path, label_vae_folder: str | Path,
                               output_dir: str | Path) -> Path:
    """Write the authors' step-0 U-ViT pipeline folder to ``output_dir`` and return it.

    ``unidiffuser_folder``: a UniDiffuser(-v1) pipeline folder as diffusers saves it (vae/,
    text_encoder/, clip_tokenizer/, image_encoder/, clip_image_processor/, scheduler/, unet/,
    text_decoder/). ``label_vae_folder``: a trained label VAE (ours or the authors'), or a run
    folder holding it as label_vae/. The parts are checked before any model is loaded; the folder
    is written under a temporary name and renamed once complete (an older one is replaced).
    """
    source, output = Path(unidiffuser_folder), Path(output_dir)
    check_pipeline_folder(source, UNIDIFFUSER_COMPONENTS)
    _check_output_dir(output)
    text_dim = read_json_object(source / "text_encoder" / "config.json").get("hidden_size")
    if not isinstance(text_dim, int):
        raise ValueError(f"{source / 'text_encoder' / 'config.json'}: no integer 'hidden_size'")
    unet_config = source / "unet" / "config.json"  # checked before its 0.95B parameters are loaded
    config = uvit_config_from_unidiffuser(read_json_object(unet_config), text_dim, where=str(unet_config))
    label_folder = _label_vae_folder(Path(label_vae_folder))
    try:
        label_vae = load_label_vae(label_folder)
    except (OSError, ValueError) as e:
        raise ValueError(f"{label_folder}: cannot load the label VAE ({_one_line(e)})") from None
    _check_label_vae(label_vae, label_folder, source, config["in_channels"])
    index = _model_index(source, label_vae)

    loaded = {}
    for name, cls in (("unet", UniDiffuserModel), ("text_decoder", UniDiffuserTextDecoder)):
        try:
            loaded[name] = cls.from_pretrained(source / name, torch_dtype=torch.float32)
        except (OSError, ValueError, RuntimeError) as e:  # a weights file that passed the header check
            raise ValueError(f"{source / name}: cannot load the {cls.__name__} ({_one_line(e)})") from None
    model = uvit_from_unidiffuser(loaded.pop("unet"), loaded.pop("text_decoder"))

    with atomic_folder(output) as tmp:
        for theirs, ours in COPIED_COMPONENTS.items():
            _copy_component(source / theirs, tmp / ours)
        _copy_component(label_folder, tmp / "label_vae")
        model.save_pretrained(str(tmp / "unet"), safe_serialization=True)
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        check_pipeline_folder(tmp, [*COPIED_COMPONENTS.values(), "label_vae", "unet"])
    return output
