"""DiffuMask prompts: "Photo of a {sub-class} {class}", sub-classes from a JSON file.

    plan = PromptPlan.from_dataset("voc", "configs/diffumask/subclasses_voc.json")
    prompt, words, labels = plan.prompt_for(index=7, images_per_class=3000, seed=0)

The file maps a class name (as in ``dataset/<name>_semantic.py``) to either a list of
sub-classes or ``{"word": "potted plant", "subclasses": [...]}`` when the class name is not a
phrase the text encoder knows ("pottedplant"). Classes missing from the file use their own name
and no sub-class. Everything is drawn from ``pair_seed(seed, index)``, so a pair's prompt does
not depend on the batch or the process that makes it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

DEFAULT_TEMPLATE = "Photo of a {subclass} {word}"


@dataclass
class ClassPrompt:
    label: int
    word: str  # the words in the prompt that name the class (their tokens give its attention map)
    subclasses: list[str] = field(default_factory=list)


def load_subclasses(path: str | Path | None) -> dict:
    if path is None or str(path) == "":
        return {}
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: sub-class file not found")
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if text.strip() else None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not data:
        raise ValueError(f"{path}: sub-class file is empty; give each class a list of sub-classes, or "
                         "leave subclass_file empty to prompt with the class names alone")
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected an object mapping class names to sub-class lists")
    for name, entry in data.items():
        subs = entry.get("subclasses") if isinstance(entry, dict) else entry
        if isinstance(subs, list) and (not subs or not all(isinstance(x, str) and x.strip() for x in subs)):
            raise ValueError(f"{path}: class {name!r} has an empty sub-class list or an empty sub-class; "
                             "remove the entry to prompt with the class name alone")
    return data


class PromptPlan:
    """Which class(es) and prompt each pair index gets."""

    def __init__(self, classes: Sequence[str], subclasses: dict | None = None,
                 template: str = DEFAULT_TEMPLATE, class_labels: Sequence[int] | None = None,
                 source: str = "sub-class file", known: Sequence[str] | None = None):
        subclasses = subclasses or {}
        unknown = sorted(set(subclasses) - set(known if known is not None else classes))
        if unknown:
            raise ValueError(f"{source}: unknown class name(s) {unknown}; classes: {list(classes)}")
        if "{word}" not in template:
            raise ValueError(f"prompt template {template!r} must contain {{word}}")
        try:
            template.format(subclass="", word="")
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"prompt template {template!r}: only {{subclass}} and {{word}} may be "
                             f"filled in ({type(e).__name__}: {e})") from None
        labels = list(class_labels) if class_labels is not None else list(range(1, len(classes) + 1))
        self.template = template
        self.classes: list[ClassPrompt] = []
        for label, name in zip(labels, classes):
            entry = subclasses.get(name, [])
            if isinstance(entry, dict):
                word, subs = str(entry.get("word", name)), list(entry.get("subclasses", []))
            elif isinstance(entry, list):
                word, subs = name, list(entry)
            else:
                raise ValueError(f"{source}: entry for {name!r} must be a list or an object")
            self.classes.append(ClassPrompt(int(label), word, [str(s) for s in subs]))

    @classmethod
    def from_dataset(cls, dataset: str, subclass_file: str | Path | None = None,
                     template: str = DEFAULT_TEMPLATE, only: Sequence[str] = ()) -> "PromptPlan":
        from dataset import get_dataset_info

        info = get_dataset_info(dataset)
        names = all_names = list(info.classes[1:])
        labels = list(range(1, info.num_labels))
        if only:
            bad = [c for c in only if c not in names]
            if bad:
                raise ValueError(f"unknown class(es) {bad} for dataset {dataset}; classes: {names}")
            labels = [labels[names.index(c)] for c in only]
            names = list(only)
        return cls(names, load_subclasses(subclass_file), template, labels, source=str(subclass_file),
                   known=all_names)

    def phrase(self, cp: ClassPrompt, rng: np.random.Generator) -> str:
        sub = cp.subclasses[int(rng.integers(len(cp.subclasses)))] if cp.subclasses else ""
        return " ".join(self.template.format(subclass=sub, word=cp.word).split())

    def prompt_for(self, index: int, images_per_class: int, seed: int, classes_per_image: int = 1
                   ) -> tuple[str, list[str], list[int]]:
        """(prompt, class words, labels) for pair ``index``: the first class is
        ``index // images_per_class``; extra classes (``classes_per_image > 1``) are drawn at random
        and joined with "and" ("Photo of a tabby cat and photo of a ..." reads badly, so extra
        classes use "a {subclass} {word}")."""
        from dataset.synthetic import pair_seed

        rng = np.random.default_rng(pair_seed(seed, index) ^ 0x5EED)
        first = self.classes[(index // images_per_class) % len(self.classes)]
        chosen = [first]
        if classes_per_image > 1:
            others = [c for c in self.classes if c is not first]
            k = min(classes_per_image - 1, len(others))
            chosen += [others[int(j)] for j in rng.choice(len(others), size=k, replace=False)]
        parts = [self.phrase(chosen[0], rng)]
        for cp in chosen[1:]:
            sub = cp.subclasses[int(rng.integers(len(cp.subclasses)))] if cp.subclasses else ""
            parts.append(" ".join(f"a {sub} {cp.word}".split()))
        return " and ".join(parts), [c.word for c in chosen], [c.label for c in chosen]
