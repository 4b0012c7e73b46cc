"""Helpers for typed, nested dataclass configs.

Every concept owns its config dataclass next to its code (``polyko.data.pipeline.PipelineConfig``,
``polyko.train.config.TrainConfig`` ...). This module only converts them: to plain dicts for
JSON/MLflow, back from dicts (nested, type-checked), to a short hash that names outputs, and
applies ``--set a.b=value`` command-line overrides. No registries, no ``dict[str, Any]`` configs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import types
import typing
from typing import Any, TypeVar

T = TypeVar("T")


def to_dict(cfg: Any) -> dict[str, Any]:
    """A dataclass (nested) as a JSON-able dict. Tuples become lists, Paths strings."""
    assert dataclasses.is_dataclass(cfg), f"not a dataclass: {type(cfg)}"

    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {str(k): conv(x) for k, x in v.items()}
        if isinstance(v, (str, int, float, bool)) or v is None:
            return v
        return str(v)

    return conv(cfg)


def flatten(d: dict[str, Any] | Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}. Accepts a dataclass too. Lists stay values (JSON strings)."""
    if dataclasses.is_dataclass(d):
        d = to_dict(d)
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        elif isinstance(v, list):
            out[key] = json.dumps(v, ensure_ascii=False)
        else:
            out[key] = v
    return out


def config_hash(cfg: Any, length: int = 12) -> str:
    """Stable short hash of a config (dataclass or dict): names outputs so a changed config never
    mixes with old output, and re-running an unchanged one finds its finished work."""
    d = to_dict(cfg) if dataclasses.is_dataclass(cfg) else cfg
    blob = json.dumps(d, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:length]


def _resolve_type(tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else tp
    return tp


def _coerce(tp: Any, value: Any, where: str) -> Any:
    tp = _resolve_type(tp)
    if value is None:
        return None
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, _where=where)
    origin = typing.get_origin(tp)
    if origin is dict:
        return _coerce_dict(tp, value, where)
    if origin in (list, tuple):
        args = typing.get_args(tp)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v != ""]
        item = args[0] if args else Any
        seq = [_coerce(item, v, f"{where}[]") for v in value]
        return tuple(seq) if origin is tuple else seq
    if tp is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("1", "true", "yes", "on"):
            return True
        if str(value).lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{where}: expected a boolean, got {value!r}")
    if tp in (int, float, str):
        try:
            return tp(value)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: expected {tp.__name__}, got {value!r}") from None
    return value


def _coerce_dict(tp: Any, value: Any, where: str) -> dict:
    """A ``dict[K, V]`` field: a mapping, a JSON object string, ``@FILE`` (a JSON/YAML mapping) or
    ``k=v,k=v``; keys and values coerced to ``K``/``V``."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("@"):
            try:
                value = read_config_data(text[1:])
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
        elif text.startswith("{"):
            try:
                value = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not a JSON object: {e}") from None
        elif text == "":
            value = {}
        else:
            pairs = [p for p in text.split(",") if p.strip()]
            if not all("=" in p for p in pairs):
                raise ValueError(f"{where}: expected a mapping (JSON object, @file or k=v,k=v), got {value!r}")
            value = dict(p.split("=", 1) for p in pairs)
    if not isinstance(value, dict):
        raise ValueError(f"{where}: expected a mapping, got {value!r}")
    args = typing.get_args(tp)
    kt, vt = args if len(args) == 2 else (Any, Any)
    return {_coerce(kt, k, f"{where}.{k}"): _coerce(vt, v, f"{where}.{k}") for k, v in value.items()}


def _field_type(cls: Any, name: str) -> Any:
    """The resolved type of field ``name`` of dataclass ``cls`` (None if ``cls`` is not a dataclass)."""
    if not dataclasses.is_dataclass(cls):
        return None
    return _resolve_type(typing.get_type_hints(cls).get(name))


def from_dict(cls: type[T], d: dict[str, Any], _where: str = "") -> T:
    """Build dataclass ``cls`` from a (nested) dict; unknown keys are a ``ValueError`` naming them."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"unknown config field(s) {unknown} for {cls.__name__}{' at ' + _where if _where else ''}; "
                         f"known: {sorted(names)}")
    kwargs = {k: _coerce(hints[k], v, f"{_where}.{k}".lstrip(".")) for k, v in d.items()}
    return cls(**kwargs)


def apply_overrides(cfg: T, overrides: list[str] | tuple[str, ...]) -> T:
    """Apply ``key.sub=value`` strings (from ``--set``) to a dataclass config, returning a new one.

    A ``dict[str, V]`` field takes keys below it (``--set data.mixture.news=0.3`` adds or replaces the
    key ``news``; the rest of the dotted path is the key) or a whole mapping (``data.mixture={"news": 0.3}``,
    ``data.mixture=news=0.3,web=0.7`` or ``data.mixture=@mix.yaml``)."""
    d = to_dict(cfg)
    for ov in overrides:
        if "=" not in ov:
            raise ValueError(f"override {ov!r} must look like key.sub=value")
        key, raw = ov.split("=", 1)
        node = d
        parts = key.strip().split(".")
        cls: Any = type(cfg)
        for i, p in enumerate(parts[:-1]):
            tp = _field_type(cls, p)
            if typing.get_origin(tp) is dict and isinstance(node.get(p), dict):
                # a mapping field: everything after it is one key (source names may hold dots)
                node, parts = node[p], [*parts[:i + 1], ".".join(parts[i + 1:])]
                cls = None
                break
            if not isinstance(node.get(p), dict):
                raise ValueError(f"override {ov!r}: {p!r} is not a config section")
            node, cls = node[p], tp
        if cls is None:  # a key of a mapping field: added if new
            try:
                node[parts[-1]] = json.loads(raw)
            except json.JSONDecodeError:
                node[parts[-1]] = raw
            continue
        if parts[-1] not in node:
            raise ValueError(f"override {ov!r}: unknown field {parts[-1]!r}; known: {sorted(node)}")
        try:
            node[parts[-1]] = json.loads(raw)
        except json.JSONDecodeError:
            node[parts[-1]] = raw
    return from_dict(type(cfg), d)


def load_config_file(cls: type[T], path: str | os.PathLike) -> T:
    """A config dataclass from a JSON or YAML file (``.yaml``/``.yml``); unknown keys are a ``ValueError``.
    Used for ``best.json`` (a full ``PretrainConfig``: ``jobs/pretrain.py --config``)."""
    try:
        return from_dict(cls, read_config_data(path))
    except ValueError as e:
        raise ValueError(f"config file {path}: {e}") from None


def read_config_data(path: str | os.PathLike) -> dict[str, Any]:
    """The mapping in a JSON or YAML config file (``ValueError`` for a missing or malformed file)."""
    from pathlib import Path

    p = Path(path)
    if not p.is_file():
        raise ValueError(f"config file {p} does not exist")
    text = p.read_text()
    try:
        if p.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:  # noqa: BLE001 - any parse error is the user's file
        raise ValueError(f"config file {p} is not valid {'YAML' if p.suffix in ('.yaml', '.yml') else 'JSON'}: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {p}: expected a mapping at the top level, got {type(data).__name__}")
    return data
