"""One config mechanism for every stage.

Each entry point declares a dataclass whose defaults are the paper's settings, then calls
``parse_config``. A YAML profile (``--config configs/label_vae/toy.yaml``) overrides the
defaults, and ``--key value`` flags override the profile. Unknown keys, in a file or on the
command line, are errors. A field's allowed values are declared with it
(``field(default="a", metadata={"choices": ("a", "b")})``): they show in ``--help`` and any other
value is a one-line error naming the field. The resolved config is saved with every run.

    cfg = parse_config(LabelVAETrainConfig, description=__doc__)

This module builds the parser; it is called only from entry points (``train/``, ``inference/``).
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any, Sequence, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """Raised for unknown keys or values that do not parse."""


def _str2bool(value: str) -> bool:
    v = str(value).strip().lower()
    if v in ("1", "true", "yes", "y", "on"):
        return True
    if v in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {value!r}")


def _base_type(tp: Any) -> tuple[Any, bool]:
    """Return (scalar type, is_list) for a field annotation."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        non_none = [a for a in args if a is not type(None)]
        if len(non_none) == 1:
            return _base_type(non_none[0])
        return str, False
    if origin in (list, tuple, Sequence):
        inner = args[0] if args else str
        return _base_type(inner)[0], True
    return tp, False


def _convert(field: dataclasses.Field, value: Any, where: str) -> Any:
    value = _convert_type(field, value, where)
    choices = (field.metadata or {}).get("choices")
    if choices is not None and value is not None:
        for v in (value if isinstance(value, list) else [value]):
            if v not in choices:
                raise ConfigError(f"{where}: '{field.name}' is {v!r}, not one of {', '.join(map(str, choices))}")
    return value


def _convert_type(field: dataclasses.Field, value: Any, where: str) -> Any:
    tp, is_list = _base_type(field.type)
    if value is None:
        return None
    try:
        if is_list:
            if isinstance(value, str):
                value = [v for v in value.replace(",", " ").split() if v]
            return [(_str2bool(v) if tp is bool else tp(v)) for v in value]
        if tp is bool:
            return value if isinstance(value, bool) else _str2bool(value)
        if tp in (int, float, str):
            if tp is int and isinstance(value, float) and not value.is_integer():
                raise ValueError("not an integer")
            return tp(value)
        return value
    except (TypeError, ValueError, argparse.ArgumentTypeError) as e:
        raise ConfigError(f"{where}: bad value {value!r} for '{field.name}' ({e})") from None


def _fields(cls) -> dict[str, dataclasses.Field]:
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        f.type = hints.get(f.name, f.type)
        out[f.name] = f
    return out


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values")
    return data


def _did_you_mean(unknown: Sequence[str], valid: Sequence[str], prefix: str = "") -> str:
    guesses = [f"{prefix}{m[0]}" for u in unknown
               for m in [difflib.get_close_matches(u.lstrip("-"), valid, n=1)] if m]
    return f" (did you mean {', '.join(guesses)}?)" if guesses else ""


class _OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line instead of usage + error."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"error: command line: {message}; see --help\n")


def build_config(cls: type[T], overrides: dict | None = None, where: str = "overrides") -> T:
    """Make a config from defaults plus a dict of overrides; unknown keys are an error."""
    fields = _fields(cls)
    overrides = dict(overrides or {})
    unknown = sorted(map(str, set(overrides) - set(fields)))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(unknown)}{_did_you_mean(unknown, list(fields))}; "
            f"valid keys: {', '.join(sorted(fields))}"
        )
    kwargs = {k: _convert(fields[k], v, where) for k, v in overrides.items()}
    return cls(**kwargs)


def parse_config(cls: type[T], argv: Sequence[str] | None = None, description: str | None = None) -> T:
    """Defaults < ``--config FILE`` (YAML) < ``--key value`` flags. Exits with a clear message on error."""
    fields = _fields(cls)
    parser = _OneLineParser(
        description=(description or cls.__doc__ or "").strip().split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("--config", default=None, help="YAML profile (e.g. configs/<stage>/toy.yaml)")
    for name, f in fields.items():
        tp, is_list = _base_type(f.type)
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        helptext = (f.metadata or {}).get("help", "")
        if (f.metadata or {}).get("choices") is not None:  # declared once, with the field
            helptext = f"{helptext}; one of {', '.join(map(str, f.metadata['choices']))}".lstrip("; ")
        kw: dict[str, Any] = dict(default=argparse.SUPPRESS, help=f"{helptext} (default: {default!r})")
        if tp is bool and not is_list:
            kw.update(nargs="?", const=True, type=_str2bool, metavar="BOOL")
        elif is_list:
            kw.update(nargs="+", type=str)
        else:
            kw.update(type=str)
        parser.add_argument(f"--{name}", **kw)
    args, extra = parser.parse_known_args(argv)
    if extra:
        flags = [a.split("=")[0] for a in extra if a.startswith("-")] or extra
        parser.error(f"unknown option(s) {' '.join(flags)}"
                     f"{_did_you_mean(flags, list(fields) + ['config'], prefix='--')}")
    values = vars(args)
    config_path = values.pop("config", None)
    try:
        merged: dict = {}
        if config_path:
            merged.update(load_yaml(config_path))
            cfg_from_file = build_config(cls, merged, where=str(config_path))  # validates file keys
            del cfg_from_file
        for k, v in values.items():
            merged[k] = v
        return build_config(cls, merged, where="command line")
    except ConfigError as e:
        parser.exit(2, f"error: {e}\n")


def config_to_dict(cfg: Any) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def save_config(cfg: Any, path: str | Path) -> None:
    from utils.io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def die(message: str, code: int = 2) -> typing.NoReturn:
    """Print a one-line error (no traceback) and exit; for entry points on bad input."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


_EXC_PREFIX = re.compile(r"^(?:\w+\.)*\w+(?:Error|Exception): ")


def error_line(exc: BaseException | str) -> str:
    """The one-line message of an error, also when a DataLoader worker re-raised it wrapped in
    its traceback ("Caught DatasetError in DataLoader worker process 0. Original Traceback ...
    dataset.segmentation.DatasetError: <message>"): ``die(error_line(e))``."""
    lines = [l for l in str(exc).splitlines() if l.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else (type(exc).__name__ if isinstance(exc, BaseException) else "")
    return _EXC_PREFIX.sub("", lines[-1].strip(), count=1)
