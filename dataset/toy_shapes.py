"""The procedural "shapes" dataset: coloured shapes on textured backgrounds, with exact masks.

    python -m utils.make_toy_dataset --out data/toy --size 32 --num_train 4000 --num_val 500

Each sample comes from its seed alone (one ``numpy.random.Generator``), so any image can be
re-made on its own and a rerun writes the same bytes. The classes are those of
``dataset/toy_semantic.py``; ring vs circle and star vs square differ only by geometry, so a
generator has to read the caption to know which to draw. Shape colours are independent of the
class, and the caption names exactly the shapes that are visible: for every sample
``caption_labels(caption) == set(np.unique(mask)) - {0}``.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from dataset.toy_semantic import CLASSES, INFO

# Named colours for shapes, far apart so "red" and "orange" stay tellable at 32 px.
SHAPE_COLORS = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 230),
    "yellow": (245, 225, 30),
    "orange": (250, 135, 20),
    "purple": (135, 40, 175),
    "cyan": (40, 210, 225),
    "pink": (250, 125, 185),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
}
BACKGROUNDS = ("striped", "checkered", "noisy", "gradient")

# Shape size as a fraction of the image side (radius-like "r"): 0.16..0.30 gives shapes about
# 10-19 px across at the 32 px benchmark size, large enough for a ring's hole to show.
MIN_RADIUS, MAX_RADIUS = 0.16, 0.30
# A shape's farthest point from its centre, in units of r (keeps every shape inside the image).
_EXTENT = {"circle": 1.0, "ring": 1.0, "square": 1.2, "triangle": 1.25, "star": 1.25}
MIN_VISIBLE = 0.65  # a shape hidden more than 35% by a later one is re-placed: it must stay recognisable
MIN_BG_DISTANCE = 90.0  # RGB distance between a shape's colour and every background colour
GENERATOR_VERSION = "toy_shapes-1"  # bump when the pictures change, so old folders are not resumed


def _polygon_inside(dx, dy, radii, angle0):
    """Inside test for a polygon that is star-shaped about the origin, vertices at equal angles.

    Vertex k sits at angle ``angle0 + 2*pi*k/n`` and distance ``radii[k]``. A point lies inside
    iff it is left of the edge that spans its angular sector (vertices counter-clockwise).
    """
    radii = np.asarray(radii, dtype=np.float64)
    n = len(radii)
    step = 2 * np.pi / n
    phi = np.mod(np.arctan2(dy, dx) - angle0, 2 * np.pi)
    k = np.minimum((phi // step).astype(np.int64), n - 1)
    a0, a1 = k * step, (k + 1) * step
    r0, r1 = radii[k], radii[(k + 1) % n]
    x0, y0 = r0 * np.cos(a0), r0 * np.sin(a0)
    x1, y1 = r1 * np.cos(a1), r1 * np.sin(a1)
    # the point in the same rotated frame as the vertices
    rho = np.hypot(dx, dy)
    px, py = rho * np.cos(phi), rho * np.sin(phi)
    return (x1 - x0) * (py - y0) - (y1 - y0) * (px - x0) >= 0


def shape_mask(kind: str, size: int, cx: float, cy: float, r: float, angle: float,
               hole: float = 0.55) -> np.ndarray:
    """Boolean HxW mask of one shape (pixel centres sampled, no anti-aliasing)."""
    coords = np.arange(size, dtype=np.float64) + 0.5
    dx = coords[None, :] - cx
    dy = coords[:, None] - cy
    if kind == "circle":
        return dx * dx + dy * dy <= r * r
    if kind == "ring":
        d2 = dx * dx + dy * dy
        return (d2 <= r * r) & (d2 >= (hole * r) ** 2)
    if kind == "square":
        return _polygon_inside(dx, dy, [_EXTENT["square"] * r] * 4, angle + np.pi / 4)
    if kind == "triangle":
        return _polygon_inside(dx, dy, [_EXTENT["triangle"] * r] * 3, angle + np.pi / 2)
    if kind == "star":
        outer = _EXTENT["star"] * r
        return _polygon_inside(dx, dy, [outer, 0.45 * outer] * 5, angle + np.pi / 2)
    raise ValueError(f"unknown shape {kind!r}")


def _smooth_noise(rng: np.random.Generator, size: int) -> np.ndarray:
    """Blotchy noise in [0, 1]: a coarse random grid upsampled bilinearly plus a little grain."""
    cells = int(rng.integers(3, 7))
    grid = rng.random((cells + 1, cells + 1))
    pos = (np.arange(size) + 0.5) / size * cells
    i = np.minimum(pos.astype(np.int64), cells - 1)
    f = pos - i
    rows = grid[i] * (1 - f)[:, None] + grid[i + 1] * f[:, None]  # (size, cells+1)
    field = rows[:, i] * (1 - f)[None, :] + rows[:, i + 1] * f[None, :]
    field = 0.8 * field + 0.2 * rng.random((size, size))
    lo, hi = field.min(), field.max()
    return (field - lo) / max(hi - lo, 1e-6)


def _texture(rng: np.random.Generator, kind: str, size: int) -> np.ndarray:
    """Blend weights t in [0, 1] (HxW) between the two background colours."""
    coords = np.arange(size, dtype=np.float64) + 0.5
    x, y = coords[None, :], coords[:, None]
    if kind == "striped":
        period = size * rng.uniform(0.12, 0.3)
        theta = rng.uniform(0, np.pi)
        phase = rng.uniform(0, 1)
        u = (x * np.cos(theta) + y * np.sin(theta)) / period + phase
        return (np.mod(u, 1.0) < 0.5).astype(np.float64)
    if kind == "checkered":
        cell = size * rng.uniform(0.1, 0.25)
        ox, oy = rng.uniform(0, cell, size=2)
        return np.mod(np.floor((x + ox) / cell) + np.floor((y + oy) / cell), 2).astype(np.float64)
    if kind == "noisy":
        return _smooth_noise(rng, size)
    if kind == "gradient":
        theta = rng.uniform(0, 2 * np.pi)
        u = (x - size / 2) * np.cos(theta) + (y - size / 2) * np.sin(theta)
        return np.broadcast_to((u - u.min()) / max(u.max() - u.min(), 1e-6), (size, size))
    raise ValueError(f"unknown background {kind!r}")


def _segment_distance(p: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """Distance from colour p to the colour segment a-b (every background pixel lies on it)."""
    ab = b - a
    t = float(np.clip(np.dot(p - a, ab) / max(np.dot(ab, ab), 1e-9), 0.0, 1.0))
    return float(np.linalg.norm(p - (a + t * ab)))


def _background_colors(rng: np.random.Generator, shape_rgbs: list[np.ndarray]):
    """Two random background colours that every shape colour stands out from."""
    best, best_d = None, -1.0
    for _ in range(64):
        a, b = rng.integers(0, 256, size=(2, 3)).astype(np.float64)
        d = min(_segment_distance(c, a, b) for c in shape_rgbs)
        if d >= MIN_BG_DISTANCE:
            return a, b
        if d > best_d:
            best, best_d = (a, b), d
    return best


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def make_caption(shapes: list[tuple[str, str]], background: str) -> str:
    """'a red circle and an orange star on a striped background' (shapes in drawing order)."""
    parts = [f"{_article(color)} {color} {kind}" for color, kind in shapes]
    if len(parts) == 1:
        body = parts[0]
    else:
        body = ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"{body} on {_article(background)} {background} background"


def render_toy_sample(seed: int, size: int = 32, max_shapes: int = 2):
    """One sample from its seed alone.

    Returns ``(image uint8 HxWx3, mask uint8 HxW, caption, labels)``; ``labels`` are the class
    values of the shapes in drawing order (later shapes lie on top; repeats possible).
    """
    if size < 8:
        raise ValueError(f"toy images need size >= 8, got {size}")
    if max_shapes < 1:
        raise ValueError(f"max_shapes must be >= 1, got {max_shapes}")
    rng = np.random.default_rng(seed)
    num_shapes = int(rng.integers(1, max_shapes + 1))
    color_names = list(SHAPE_COLORS)
    picked = rng.choice(len(color_names), size=min(num_shapes, len(color_names)), replace=False)
    colors = [color_names[int(i)] for i in picked]
    while len(colors) < num_shapes:  # more shapes than named colours: allow repeats
        colors.append(color_names[int(rng.integers(len(color_names)))])

    instance = np.zeros((size, size), dtype=np.int64)  # 0 = background, i+1 = shape i
    areas: list[int] = []
    placed: list[tuple[str, str]] = []
    for color in colors:
        kind = CLASSES[int(rng.integers(1, len(CLASSES)))]
        for _attempt in range(20):
            r = rng.uniform(MIN_RADIUS, MAX_RADIUS) * size
            ext = min(_EXTENT[kind] * r, size / 2)
            cx, cy = rng.uniform(ext, size - ext, size=2)
            m = shape_mask(kind, size, cx, cy, r, rng.uniform(0, 2 * np.pi))
            trial = np.where(m, len(placed) + 1, instance)
            visible = np.bincount(trial.ravel(), minlength=len(placed) + 2)[1:]
            if all(visible[i] >= MIN_VISIBLE * areas[i] for i in range(len(placed))) and m.sum() > 0:
                instance = trial
                areas.append(int(m.sum()))
                placed.append((color, kind))
                break
        # a shape that cannot be placed without hiding an earlier one is simply left out

    background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    shape_rgbs = [np.asarray(SHAPE_COLORS[c], dtype=np.float64) for c, _ in placed]
    bg_a, bg_b = _background_colors(rng, shape_rgbs)
    t = _texture(rng, background, size)[..., None]
    image = (1 - t) * bg_a + t * bg_b

    class_of = np.array([0] + [CLASSES.index(k) for _, k in placed], dtype=np.uint8)
    rgb_of = np.concatenate([np.zeros((1, 3)), np.stack(shape_rgbs)]) if placed else np.zeros((1, 3))
    fg = instance > 0
    image[fg] = rgb_of[instance[fg]]
    mask = class_of[instance]
    # every placed shape kept >= MIN_VISIBLE of its pixels, so all of them are visible and named
    caption = make_caption(placed, background)
    labels = tuple(int(v) for v in class_of[1:])
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), mask, caption, labels


def caption_labels(caption: str, info=None) -> set[int]:
    """The class labels a caption names (background excluded): the inverse of the captioner.

    Works for any dataset's class names (longest names first, so 'coffee table' is not also
    read as 'table'); plural forms count. Defaults to the toy classes.
    """
    classes = (info or INFO).classes
    text = " " + re.sub(r"[^a-z0-9]+", " ", caption.lower()) + " "
    found: set[int] = set()
    order = sorted(range(1, len(classes)), key=lambda i: -len(classes[i]))
    for label in order:
        name = re.sub(r"[^a-z0-9]+", " ", classes[label].lower()).strip()
        pattern = re.compile(r" " + re.escape(name) + r"(?:s|es)? ")
        # a match consumes its words, so a shorter name inside a longer one is not read twice
        while True:
            m = pattern.search(text)
            if m is None:
                break
            found.add(label)
            text = text[: m.start()] + " | " + text[m.end():]
    return found


def toy_sample_seed(base_seed: int, split: str, index: int) -> int:
    """The seed of sample ``index`` of ``split``: train and val seeds never coincide.

    The split and base seed take the high bits and the index the low 32 bits, so seeds are
    distinct across splits and base seeds by construction, not by hashing luck.
    """
    if base_seed < 0 or not 0 <= index < 2**32:
        raise ValueError("base_seed must be >= 0 and index in [0, 2**32)")
    split_code = {"train": 0, "val": 1}[split]
    return ((base_seed * 2 + split_code) << 32) | index


def _settings(size: int, num_train: int, num_val: int, seed: int, max_shapes: int) -> dict:
    return {"generator": GENERATOR_VERSION, "size": size, "num_train": num_train,
            "num_val": num_val, "seed": seed, "max_shapes": max_shapes}


def write_toy_dataset(out, size: int, num_train: int, num_val: int, seed: int = 0,
                      max_shapes: int = 2, progress: bool = True) -> dict:
    """Write the mmseg layout of ``dataset/toy_semantic.py`` under ``out``; resumable.

    Each file is written atomically, so a file that exists is complete; a rerun renders only
    what is missing (same seeds, same bytes) and the caption JSON of a split is written last.
    ``out/toy.json`` records the settings; resuming with other settings is refused.
    Returns ``{"train": {"written": n, "skipped": m}, "val": {...}}``.
    """
    from tqdm import tqdm

    from utils.io import atomic_write_json, encode_image, atomic_write_bytes

    out = Path(out)
    settings = _settings(size, num_train, num_val, seed, max_shapes)
    meta_path = out / "toy.json"
    if meta_path.exists():
        try:
            old = json.loads(meta_path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{meta_path}: not valid JSON ({e}); delete the folder and rerun") from None
        if old != settings:
            diff = ", ".join(f"{k}={old.get(k)!r} (now {v!r})" for k, v in settings.items() if old.get(k) != v)
            raise ValueError(f"{meta_path}: folder was made with other settings: {diff}; "
                             "use another --out or delete the folder")
    else:
        atomic_write_json(meta_path, settings)

    report = {}
    total = num_train + num_val
    bar = tqdm(total=total, desc="toy dataset", unit="img", disable=not progress)
    for split, count in (("train", num_train), ("val", num_val)):
        spec = INFO.splits[split]
        img_dir, ann_dir = out / spec.img_dir, out / spec.ann_dir
        cap_path = out / spec.caption_file
        img_dir.mkdir(parents=True, exist_ok=True)
        ann_dir.mkdir(parents=True, exist_ok=True)
        have_img = {p.name for p in img_dir.iterdir()}
        have_ann = {p.name for p in ann_dir.iterdir()}
        written = skipped = 0
        captions = {}
        for index in range(count):
            name = f"{index:06d}"
            img_name, ann_name = name + INFO.img_suffix, name + INFO.seg_map_suffix
            image, mask, caption, _ = render_toy_sample(toy_sample_seed(seed, split, index), size, max_shapes)
            captions[name] = caption
            if img_name in have_img and ann_name in have_ann:
                skipped += 1
            else:
                atomic_write_bytes(img_dir / img_name, encode_image(image, "PNG"))
                atomic_write_bytes(ann_dir / ann_name, encode_image(mask, "PNG"))
                written += 1
            bar.update(1)
        if not cap_path.exists() or json.loads(cap_path.read_text()) != captions:
            atomic_write_json(cap_path, captions)
        report[split] = {"written": written, "skipped": skipped}
    bar.close()
    return report
