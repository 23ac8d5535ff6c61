"""YAML configs with ``key.sub=value`` command-line overrides.

A job's configuration is built in three layers: the recipe's default YAML in ``configs/``, an
optional user YAML (``--config FILE``) merged over it, and ``key.sub=value`` overrides on the
command line. Override values are parsed as YAML scalars (``2`` is an int, ``false`` a bool,
``null`` None, ``[1,2]`` a list). Keys must exist in the defaults, so a typo is an error rather
than a silently ignored setting.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]


def _config_dir() -> Path:
    """``configs/`` of the source tree (a clone, an editable install, ``ray job submit
    --working-dir .``), else the copy a wheel installs as the ``cat_clip_configs`` package."""
    in_tree = REPO_ROOT / "configs"
    if in_tree.is_dir():
        return in_tree
    from importlib.util import find_spec

    spec = find_spec("cat_clip_configs")  # a namespace package: data files only
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("no configs/: neither a source tree nor an installed cat-clip wheel")
    return Path(list(spec.submodule_search_locations)[0])


CONFIG_DIR = _config_dir()


class ConfigError(ValueError):
    """A config file or override that cannot be applied."""


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must contain a mapping at the top level")
    return data


def deep_merge(base: Mapping, update: Mapping, *, strict: bool = True, _prefix: str = "") -> dict:
    """Return ``base`` updated recursively with ``update``.

    With ``strict``, keys of ``update`` that ``base`` lacks raise :class:`ConfigError`, except
    below a key whose default value is ``None`` or an empty mapping (free-form sections).
    """
    out = copy.deepcopy(dict(base))
    for key, value in update.items():
        name = f"{_prefix}{key}"
        if key not in out:
            if strict:
                raise ConfigError(f"unknown config key '{name}'")
            out[key] = copy.deepcopy(value)
        elif isinstance(out[key], dict) and isinstance(value, Mapping):
            free = not out[key]
            out[key] = deep_merge(out[key], value, strict=strict and not free, _prefix=name + ".")
        else:
            if strict:
                value = check_type(name, out[key], value)
            out[key] = copy.deepcopy(value)
    return out


def check_type(name: str, default: Any, value: Any) -> Any:
    """``value`` if it fits the default's type, else :class:`ConfigError`: a number where the
    default is a number (an integer default takes a fraction too, e.g. ``train.epochs=0.5``;
    ``1e-3``, which YAML reads as a string, becomes a float), a bool where it is a bool,
    ``null`` always; other defaults (strings such as ``auto``, lists, null) take any value."""
    if value is None:
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false (default {str(default).lower()}), got {value!r}")
    elif isinstance(default, (int, float)):
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            kind = "an integer" if isinstance(default, int) else "a number"
            raise ConfigError(f"{name} must be {kind} (default {default}), got {value!r}")
    return value


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"cannot parse value of override '{text}': {exc}") from exc
    return key.split("."), value


def apply_overrides(config: Mapping, overrides: Iterable[str]) -> dict:
    """Apply ``key.sub=value`` overrides (later ones win). They are gathered first and merged
    once, so several overrides may fill the same free-form section (e.g. ``storage_options``)."""
    gathered: dict = {}
    for text in overrides:
        path, value = parse_override(text)
        nested: Any = value
        for part in reversed(path):
            nested = {part: nested}
        gathered = deep_merge(gathered, nested, strict=False)
    return deep_merge(copy.deepcopy(dict(config)), gathered)


def build_config(default: str | Path, user_file: str | Path | None = None,
                 overrides: Iterable[str] = ()) -> dict:
    """Defaults, then the user's YAML, then ``key=value`` overrides."""
    config = load_yaml(default)
    if user_file:
        config = deep_merge(config, load_yaml(user_file))
    return apply_overrides(config, overrides)


def parse_cli(argv: list[str] | None, default: str | Path, description: str) -> dict:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", help="YAML file merged over the defaults in " + str(default))
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help="config overrides, e.g. filters.complexity.min=2")
    args = parser.parse_args(argv)
    try:
        return build_config(default, args.config, args.overrides)
    except ConfigError as exc:
        user_error(exc)


def user_error(exc) -> None:
    """Exit for a user mistake: ``error: ...`` in one line on stderr, exit code 2 (as argparse)."""
    print(f"error: {exc}", file=sys.stderr)
    raise SystemExit(2) from None


# --- typed views ---------------------------------------------------------------------------------
#
# A job parses its merged config once into a tree of frozen dataclasses (``typed_view``) and reads
# attributes from then on. The dataclasses declare names and types only, never defaults: the YAML in
# configs/ is the one place a default lives, so every field must be present in the mapping (a key
# the YAML lacks is a bug in the YAML, reported by its dotted name).


def typed_view(cls: type, data: Mapping | None, name: str = "") -> Any:
    """``data`` as the dataclass ``cls``: every field present, no unknown key, each value of its
    annotated type (nested dataclasses, ``X | None``, ``Literal[...]`` choices, ``list[X]``/
    ``tuple[X, ...]`` (stored as tuples), ``dict`` (a free-form mapping), ``Any``). An ``int`` field
    takes an integral float (``2.0``), a ``float`` field any number (``1e-3``, which YAML reads as
    a string, too). Mistakes raise :class:`ConfigError` naming the dotted key."""
    import dataclasses
    import typing

    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{name or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown config key '{_dotted(name, unknown[0])}'")
    values = {}
    for key, field in fields.items():
        dotted = _dotted(name, key)
        if key not in data:
            if field.default is not dataclasses.MISSING or field.default_factory is not dataclasses.MISSING:
                continue  # a derived field (set by the view itself, not by the YAML)
            raise ConfigError(f"missing config key '{dotted}'")
        values[key] = _coerce(hints[key], data[key], dotted)
    return cls(**values)


def _dotted(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


def _coerce(tp: Any, value: Any, name: str) -> Any:
    import dataclasses
    import types
    import typing

    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return copy.deepcopy(value)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(option, value, name)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else
                          f"{name} must be one of {_describe(tp)}, got {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{name} must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return typed_view(tp, value, name)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, got {value!r}")
        return value
    if tp in (int, float):
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name} must be {'an integer' if tp is int else 'a number'}, got {value!r}")
        if tp is int:
            if float(value) != int(value):
                raise ConfigError(f"{name} must be an integer, got {value!r}")
            return int(value)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name} must be a string, got {value!r}")
        return value
    if tp is dict or origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{name} must be a mapping, got {value!r}")
        return copy.deepcopy(dict(value))
    if tp in (list, tuple) or origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        item = args[0] if args else Any
        return tuple(_coerce(item, v, f"{name}[{i}]") for i, v in enumerate(value))
    raise TypeError(f"typed_view: unsupported annotation {tp!r} for {name}")


def _describe(tp: Any) -> str:
    import typing

    parts = []
    for a in typing.get_args(tp):
        if typing.get_origin(a) is typing.Literal:
            parts.extend(repr(x) for x in typing.get_args(a))
        else:
            parts.append("null" if a is type(None) else getattr(a, "__name__", str(a)))
    return ", ".join(parts)


def as_dict(view: Any) -> dict:
    """A typed view back as plain YAML-shaped data (tuples as lists), e.g. for ``summary.json``."""
    import dataclasses

    def plain(value):
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, Mapping):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(view)
