"""The toy "web" corpus: captioned 32 px pictures of many shapes, to pretrain the toy base model.

    python -m train.toy_web_base --config configs/toy_base_model/web.yaml --output_dir runs/toy_web_base

It stands to the segmentation toy set (``dataset/toy_shapes.py``) as LAION stands to VOC: broader,
captions only, no masks. Each picture holds 1-4 objects of 13 kinds (the 5 segmentation classes,
drawn by the same geometry, sharp corners included, plus 8 others), colours independent of the
kind, sizes from small to large, occlusion, flat or textured shapes (stripes, checks, dots, noise,
gradients) on flat or textured backgrounds. Captions follow the segmentation captions' style and
words ("a red circle and an orange star on a striped background"), with size and texture words
added now and then, so every segmentation caption is in distribution.

Seeds live in their own space: sample ``i`` comes from ``numpy.random.default_rng([WEB_SALT,
seed, i])``, never from the integer seeds of ``toy_shapes``, so no picture repeats a
segmentation train or val image. The corpus is written in the toy folder layout so that
``train.joint_diffusion --mode image --dataset toy_web`` reads it; there are no masks, so every
``ann_dir`` file is all ignore (255).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

from dataset import toy_semantic, toy_shapes
from dataset.base import DatasetInfo, SplitSpec, make_palette
from utils.io import atomic_write_bytes, atomic_write_json, encode_image

SEGMENTATION_KINDS = toy_semantic.CLASSES[1:]  # circle, square, triangle, ring, star
OTHER_KINDS = ("hexagon", "pentagon", "diamond", "cross", "heart", "ellipse", "crescent", "arrow")
KINDS = SEGMENTATION_KINDS + OTHER_KINDS
# the segmentation colours plus a few more; a colour name always names the shape's main colour
COLORS = dict(toy_shapes.SHAPE_COLORS, brown=(130, 75, 30), gray=(128, 128, 128))
SHAPE_TEXTURES = ("flat", "striped", "checkered", "dotted", "noisy", "gradient")
BACKGROUNDS = toy_shapes.BACKGROUNDS + ("dotted", "plain")
SIZE_WORDS = {"small": (0.10, 0.15), "": (0.15, 0.30), "large": (0.30, 0.38)}  # radius / image side
MAX_OBJECTS = 4
MIN_VISIBLE = 0.5  # a shape hidden more than half by later ones is re-placed (it is named, so it must show)
WEB_SALT = 0x7E6  # first word of every seed: web seeds are sequences, toy_shapes seeds plain integers
GENERATOR_VERSION = "toy_web-1"  # bump when the pictures change, so old folders are not resumed
_EXTENT = {"hexagon": 1.1, "pentagon": 1.15, "diamond": 1.3, "cross": 1.2, "heart": 1.2, "ellipse": 1.3,
           "crescent": 1.0, "arrow": 1.3}

INFO = DatasetInfo(
    name="toy_web",
    classes=("background",) + KINDS,  # the kinds drawn; the corpus has no masks (all ignore)
    palette=make_palette(len(KINDS) + 1),
    data_root="data/toy_web",
    splits={"train": SplitSpec("img_dir/train", "ann_dir/train", None, "captions/train.json")},
    img_suffix=".png",
    caption_source="toy",
    default_size=32,
)


def _rotated(dx, dy, angle):
    c, s = np.cos(angle), np.sin(angle)
    return dx * c + dy * s, -dx * s + dy * c


def web_shape_mask(kind: str, size: int, cx: float, cy: float, r: float, angle: float) -> np.ndarray:
    """Boolean HxW mask of one shape; the segmentation kinds use ``toy_shapes.shape_mask`` itself."""
    if kind in SEGMENTATION_KINDS:
        return toy_shapes.shape_mask(kind, size, cx, cy, r, angle)
    coords = np.arange(size, dtype=np.float64) + 0.5
    dx, dy = coords[None, :] - cx, coords[:, None] - cy
    u, v = _rotated(dx, dy, angle)
    if kind == "hexagon":
        return toy_shapes._polygon_inside(dx, dy, [1.1 * r] * 6, angle)
    if kind == "pentagon":
        return toy_shapes._polygon_inside(dx, dy, [1.15 * r] * 5, angle + np.pi / 2)
    if kind == "diamond":  # a rhombus, long axis 1.3 r, short 0.8 r
        return toy_shapes._polygon_inside(dx, dy, [1.3 * r, 0.8 * r] * 2, angle)
    if kind == "cross":  # a plus sign, arms 0.35 r wide
        w, ext = 0.35 * r, 1.2 * r / np.sqrt(1 + 0.35 ** 2)
        return ((np.abs(u) <= ext) & (np.abs(v) <= w)) | ((np.abs(v) <= ext) & (np.abs(u) <= w))
    if kind == "heart":  # (x^2 + y^2 - 1)^3 <= x^2 y^3, upright in the rotated frame
        x, y = u / (0.95 * r), -v / (0.95 * r) + 0.1
        return (x * x + y * y - 1) ** 3 <= x * x * y ** 3
    if kind == "ellipse":
        return (u / (1.3 * r)) ** 2 + (v / (0.65 * r)) ** 2 <= 1
    if kind == "crescent":
        return (u * u + v * v <= r * r) & ((u - 0.45 * r) ** 2 + v * v > (0.8 * r) ** 2)
    if kind == "arrow":  # a shaft and a triangular head pointing along +u
        shaft = (u >= -1.3 * r) & (u <= 0.2 * r) & (np.abs(v) <= 0.25 * r)
        head = (u >= 0.2 * r) & (u <= 1.3 * r) & (np.abs(v) <= 0.7 * (1.3 * r - u) / 1.1)
        return shaft | head
    raise ValueError(f"unknown shape {kind!r}")


def _extent(kind: str) -> float:
    return toy_shapes._EXTENT.get(kind) or _EXTENT[kind]


def _pattern(rng: np.random.Generator, kind: str, size: int) -> np.ndarray:
    """Blend weights in [0, 1] (HxW): the toy backgrounds' textures plus dots and flat."""
    if kind in ("flat", "plain"):
        return np.zeros((size, size))
    if kind == "dotted":
        coords = np.arange(size, dtype=np.float64) + 0.5
        cell = size * rng.uniform(0.12, 0.22)
        ox, oy = rng.uniform(0, cell, size=2)
        fx = np.mod(coords[None, :] + ox, cell) - cell / 2
        fy = np.mod(coords[:, None] + oy, cell) - cell / 2
        return (fx * fx + fy * fy <= (0.3 * cell) ** 2).astype(np.float64)
    return np.array(toy_shapes._texture(rng, kind, size), dtype=np.float64)


def _choose(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def describe(obj: dict) -> str:
    """'a small striped red hexagon': size and texture words only when not medium / flat."""
    words = [w for w in (obj["size_word"], "" if obj["texture"] == "flat" else obj["texture"], obj["color"],
                         obj["kind"]) if w]
    return f"{toy_shapes._article(words[0])} {' '.join(words)}"


def make_web_caption(objects: list[dict], background: str) -> str:
    parts = [describe(o) for o in objects]
    body = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"{body} on {toy_shapes._article(background)} {background} background"


def render_web_sample(seed: int, index: int, size: int = 32, max_objects: int = MAX_OBJECTS):
    """Sample ``index`` of the corpus with base seed ``seed``: ``(image uint8 HxWx3, caption, objects)``.

    ``objects`` lists the drawn shapes in drawing order (later ones on top), each a dict of
    kind, color, texture and size_word; every one of them stays at least half visible.
    """
    if size < 8 or not 1 <= max_objects <= MAX_OBJECTS:
        raise ValueError(f"toy_web: need size >= 8 and max_objects in 1..{MAX_OBJECTS}, got {size}, {max_objects}")
    rng = np.random.default_rng([WEB_SALT, seed, index])
    instance = np.zeros((size, size), dtype=np.int64)
    layers, areas, objects = [], [], []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        kind, color = _choose(rng, KINDS), _choose(rng, tuple(COLORS))
        size_word = _choose(rng, ("small", "", "", "large"))
        texture = _choose(rng, ("flat", "flat") + SHAPE_TEXTURES[1:])
        for _attempt in range(20):
            r = rng.uniform(*SIZE_WORDS[size_word]) * size
            ext = min(_extent(kind) * r, size / 2)
            cx, cy = rng.uniform(ext, size - ext, size=2)
            m = web_shape_mask(kind, size, cx, cy, r, rng.uniform(0, 2 * np.pi))
            trial = np.where(m, len(objects) + 1, instance)
            visible = np.bincount(trial.ravel(), minlength=len(objects) + 2)[1:]
            if m.sum() >= 4 and all(visible[i] >= MIN_VISIBLE * areas[i] for i in range(len(objects))):
                instance = trial
                areas.append(int(m.sum()))
                objects.append(dict(kind=kind, color=color, texture=texture, size_word=size_word))
                # a textured shape blends its colour with a darker shade of it, so the name still holds
                rgb = np.asarray(COLORS[color], dtype=np.float64)
                layers.append((rgb, 0.5 * rgb + 20, _pattern(rng, texture, size)[..., None]))
                break
    background = _choose(rng, BACKGROUNDS)
    bg_a, bg_b = toy_shapes._background_colors(rng, [np.asarray(COLORS[o["color"]], float) for o in objects])
    t = _pattern(rng, background, size)[..., None]
    image = (1 - t) * bg_a + t * bg_b
    for i, (rgb, shade, pattern) in enumerate(layers):
        image = np.where((instance == i + 1)[..., None], (1 - pattern) * rgb + pattern * shade, image)
    caption = make_web_caption(objects, background)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), caption, objects


def vocabulary_captions() -> list[str]:
    """Texts holding every word a web caption or a segmentation toy caption can use (a tokenizer
    built from them reads both), including the toy class-name fallback caption."""
    toy = toy_semantic.INFO
    return [" ".join(KINDS + tuple(COLORS) + SHAPE_TEXTURES + BACKGROUNDS + tuple(SIZE_WORDS)),
            make_web_caption([dict(kind="ellipse", color="gray", texture="dotted", size_word="small"),
                              dict(kind="arrow", color="orange", texture="flat", size_word="")], "plain"),
            toy_shapes.make_caption([("red", "circle"), ("orange", "star"), ("blue", "ring")], "striped"),
            toy.class_name_caption(range(toy.num_labels)), INFO.class_name_caption(range(INFO.num_labels))]


def write_web_corpus(out, size: int = 32, num_images: int = 30000, seed: int = 0,
                     max_objects: int = MAX_OBJECTS, progress: bool = True) -> dict:
    """Write ``num_images`` samples in the layout of ``INFO`` under ``out``; resumable.

    Files are written atomically and a rerun renders only what is missing (same bytes); the
    caption JSON is written last. ``out/toy_web.json`` holds the settings: resuming with other
    settings is refused. Returns ``{"written": n, "skipped": m}``.
    """
    out = Path(out)
    settings = {"generator": GENERATOR_VERSION, "size": size, "num_images": num_images, "seed": seed,
                "max_objects": max_objects}
    meta_path = out / "toy_web.json"
    if meta_path.exists():
        old = json.loads(meta_path.read_text())
        if old != settings:
            raise ValueError(f"{meta_path}: corpus was made with other settings {old}; use another folder")
    else:
        atomic_write_json(meta_path, settings)
    spec = INFO.splits["train"]
    img_dir, ann_dir = out / spec.img_dir, out / spec.ann_dir
    img_dir.mkdir(parents=True, exist_ok=True)
    ann_dir.mkdir(parents=True, exist_ok=True)
    have = {p.name for p in img_dir.iterdir()} & {p.name for p in ann_dir.iterdir()}
    ignore = encode_image(np.full((size, size), INFO.ignore_index, dtype=np.uint8), "PNG")
    captions, written = {}, 0
    for index in tqdm(range(num_images), desc="toy web corpus", unit="img", disable=not progress):
        name = f"{index:06d}"
        image, captions[name], _ = render_web_sample(seed, index, size, max_objects)
        if name + ".png" not in have:
            atomic_write_bytes(img_dir / f"{name}.png", encode_image(image, "PNG"))
            atomic_write_bytes(ann_dir / f"{name}.png", ignore)
            written += 1
    cap_path = out / spec.caption_file
    if not cap_path.exists() or json.loads(cap_path.read_text()) != captions:
        atomic_write_json(cap_path, captions)
    return {"written": written, "skipped": num_images - written}
