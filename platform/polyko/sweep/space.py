"""Search spaces over ``PretrainConfig``: parsed, type-checked and validated before any trial starts.

A search dimension is written like a ``--set`` override whose value is a distribution::

    optim.lr=loguniform:1e-4:3e-2          log-uniform float in [low, high)
    optim.weight_decay=uniform:0:0.2       uniform float in [low, high)
    optim.warmup_steps=randint:10:200      integer in [low, high)
    optim.warmup_steps=choice:10,50,200    one of the values (numbers, strings, true/false)
    optim.schedule=grid:cosine,wsd         every value, each with ``trials`` samples of the rest

Keys are the dotted paths of ``PretrainConfig`` (the same as ``--set``). An unknown key, a malformed or
empty distribution, a value that does not fit the field's type (``randint`` on a float field, ``choice:a``
on an int field), a key given twice or an empty space is a ``ValueError`` naming it.

    >>> dims = parse_search(["optim.lr=loguniform:1e-4:3e-2", "optim.warmup_steps=choice:10,50,200"])
    >>> apply_values(PretrainConfig(), {"optim.lr": 1e-3}).optim.lr
    0.001
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, TypeVar

from polyko.config import flatten, from_dict, to_dict
from polyko.train.config import PretrainConfig

T = TypeVar("T")

KINDS = ("uniform", "loguniform", "randint", "choice", "grid")
# Run bookkeeping the sweep owns for every trial: searching them makes no sense.
UNSEARCHABLE = ("output", "run_name", "data.path", "data.tokenizer", "export", "checkpoint.resume_from",
                "fault.inject", "deepspeed.extra_json", "steps")


@dataclass(frozen=True)
class Dimension:
    """One searched config field: ``path`` (dotted), ``kind`` (one of ``KINDS``) and its arguments
    (``(low, high)`` for ranges, the candidate values for choice/grid)."""
    path: str
    kind: str
    args: tuple[Any, ...]

    def to_tune(self):
        """The Ray Tune search-space object."""
        from ray import tune

        if self.kind == "uniform":
            return tune.uniform(*self.args)
        if self.kind == "loguniform":
            return tune.loguniform(*self.args)
        if self.kind == "randint":
            return tune.randint(*self.args)
        if self.kind == "choice":
            return tune.choice(list(self.args))
        return tune.grid_search(list(self.args))

    def spec(self) -> str:
        sep = ":" if self.kind in ("uniform", "loguniform", "randint") else ","
        return f"{self.path}={self.kind}:{sep.join(str(a) for a in self.args)}"


def field_types(cls: type = PretrainConfig, prefix: str = "") -> dict[str, Any]:
    """``{dotted path: annotated type}`` for every leaf field of a nested dataclass."""
    out: dict[str, Any] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        inner = _strip_optional(tp)
        if dataclasses.is_dataclass(inner):
            out.update(field_types(inner, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = inner
    return out


def _strip_optional(tp: Any) -> Any:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0]
    return tp


def _number(raw: str, where: str) -> float:
    try:
        v = float(raw)
    except ValueError:
        raise ValueError(f"{where}: {raw!r} is not a number") from None
    if not math.isfinite(v):
        raise ValueError(f"{where}: {raw!r} is not a finite number")
    return v


def _scalar(raw: str) -> Any:
    raw = raw.strip()
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def parse_dimension(spec: str, cls: type = PretrainConfig) -> Dimension:
    """One ``path=kind:args`` string as a checked :class:`Dimension` (``ValueError`` naming the problem)."""
    if "=" not in spec:
        raise ValueError(f"search {spec!r} must look like key.sub=kind:args, e.g. optim.lr=loguniform:1e-4:3e-2")
    path, dist = (s.strip() for s in spec.split("=", 1))
    types_ = field_types(cls)
    if path not in types_:
        section = path.rpartition(".")[0]
        near = sorted(k for k in types_ if k.rpartition(".")[0] == section) or sorted(types_)
        raise ValueError(f"search {spec!r}: unknown config key {path!r}; known keys here: {near}")
    if path in UNSEARCHABLE:
        raise ValueError(f"search {spec!r}: {path} is set by the sweep for every trial and cannot be searched "
                         "(use --max-steps for the trial length)")
    kind, sep, rest = dist.partition(":")
    kind = kind.strip()
    if kind not in KINDS or not sep:
        raise ValueError(f"search {spec!r}: distribution must be one of {', '.join(k + ':...' for k in KINDS)}")
    tp = types_[path]
    where = f"search {spec!r}"
    if kind in ("uniform", "loguniform", "randint"):
        parts = rest.split(":")
        if len(parts) != 2 or not all(p.strip() for p in parts):
            raise ValueError(f"{where}: {kind} needs exactly two bounds, {kind}:LOW:HIGH")
        lo, hi = (_number(p, where) for p in parts)
        if not lo < hi:
            raise ValueError(f"{where}: empty range, need LOW < HIGH (got {lo:g}, {hi:g})")
        if kind == "loguniform" and lo <= 0:
            raise ValueError(f"{where}: loguniform needs LOW > 0 (got {lo:g})")
        if tp not in (int, float):
            raise ValueError(f"{where}: {path} is a {getattr(tp, '__name__', tp)} field; use choice:... for it")
        if kind == "randint":
            if tp is not int or lo != int(lo) or hi != int(hi):
                raise ValueError(f"{where}: randint needs an int field and integer bounds")
            args: tuple[Any, ...] = (int(lo), int(hi))
        else:
            if tp is int:
                raise ValueError(f"{where}: {path} is an int field; use randint:LOW:HIGH or choice:...")
            args = (lo, hi)
    else:
        values = [_scalar(v) for v in rest.split(",") if v.strip()]
        if not values:
            raise ValueError(f"{where}: {kind} needs at least one value, {kind}:A,B,C")
        if len({json.dumps(v) for v in values}) != len(values):
            raise ValueError(f"{where}: repeated values")
        args = tuple(values)
    dim = Dimension(path, kind, args)
    # Every candidate (range ends, listed values) must build a config: this catches type mismatches
    # (choice:abc on an int field) with from_dict's own message.
    for v in args:
        try:
            built = apply_values(cls(), {path: v})
            if hasattr(built, "resolved"):
                built.resolved()  # per-field checks (model.size, zero stage, precision ...)
        except ValueError as e:
            raise ValueError(f"{where}: value {v!r} does not fit {path}: {e}") from None
    return dim


def parse_search(specs: list[str] | tuple[str, ...] | dict[str, str], cls: type = PretrainConfig) -> list[Dimension]:
    """Parse a whole space (``--search`` strings, or ``{key: "kind:args"}`` from a sweep file)."""
    if isinstance(specs, dict):
        specs = [f"{k}={v}" for k, v in specs.items()]
    if not specs:
        raise ValueError("the search space is empty: give at least one --search key=kind:args "
                         "(e.g. --search optim.lr=loguniform:1e-4:3e-2)")
    dims = [parse_dimension(s, cls) for s in specs]
    seen: set[str] = set()
    for d in dims:
        if d.path in seen:
            raise ValueError(f"search key {d.path!r} is given twice")
        seen.add(d.path)
    return dims


def param_space(dims: list[Dimension]) -> dict[str, Any]:
    """Tune's ``param_space``: flat dotted keys (they are also the MLflow param names)."""
    return {d.path: d.to_tune() for d in dims}


def apply_values(cfg: T, values: dict[str, Any]) -> T:
    """``cfg`` with dotted-path values set, rebuilt through ``from_dict`` (type-checked)."""
    d = to_dict(cfg)
    for path, v in values.items():
        node = d
        parts = path.split(".")
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                raise ValueError(f"{path!r}: {p!r} is not a config section")
            node = node[p]
        if parts[-1] not in node:
            raise ValueError(f"{path!r}: unknown field {parts[-1]!r}")
        node[parts[-1]] = v
    return from_dict(type(cfg), d)


def changed_fields(base: Any, cfg: Any) -> dict[str, Any]:
    """Flattened fields of ``cfg`` that differ from ``base`` (what a trial changed)."""
    a, b = flatten(base), flatten(cfg)
    return {k: v for k, v in b.items() if a.get(k) != v}
