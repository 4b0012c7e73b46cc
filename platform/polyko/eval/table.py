"""The paper-style KoBEST table: macro-F1 per task and shot count, our model next to the numbers
EleutherAI published for the four Polyglot-Ko sizes and their three baselines (``published_kobest.json``,
transcribed with its sources from the Polyglot-Ko model cards).

The comparison names one **reference**: the Polyglot-Ko size nearest the evaluated model's parameter
count (log scale; ``EvalConfig.compare_to`` overrides it), so a user evaluating a 1.3b sees
``ours - polyglot-ko-1.3b`` at the same shot count, and the larger sizes next to it.

    >>> from polyko.eval.table import render_table, reference_model
    >>> ref = reference_model(1_300_000_000)          # 'EleutherAI/polyglot-ko-1.3b'
    >>> md = render_table({"kobest_copa/f1/5shot": 0.71}, shots=[5], tasks=["kobest_copa"], model="ours")

MLflow names (:func:`comparison_metrics`): ``published/<task>/f1/<N>shot`` is the reference's published
F1 (logged next to ours so a chart shows both lines) and ``<task>/f1_vs_ref/<N>shot`` = ours - published;
``kobest/f1_avg`` gets both when all five tasks ran.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import Any

from polyko.eval.config import KOBEST_TASKS

PUBLISHED_FILE = Path(__file__).with_name("published_kobest.json")
POLYGLOT_SIZES = {"1.3b": "EleutherAI/polyglot-ko-1.3b", "3.8b": "EleutherAI/polyglot-ko-3.8b",
                  "5.8b": "EleutherAI/polyglot-ko-5.8b", "12.8b": "EleutherAI/polyglot-ko-12.8b"}
# Columns of the comparison: the four Polyglot-Ko sizes, then the cards' baselines.
PUBLISHED_ORDER = (*POLYGLOT_SIZES.values(), "kakaobrain/kogpt", "skt/ko-gpt-trinity-1.2B-v0.5",
                   "facebook/xglm-7.5B")
# The 2022 card (superseded) is the only source of 1- and 100-shot numbers; three models.
SUPERSEDED_ORDER = ("EleutherAI/polyglot-ko-1.3b", "kakaobrain/kogpt", "skt/ko-gpt-trinity-1.2B-v0.5")


@functools.lru_cache(maxsize=1)
def load_published() -> dict[str, Any]:
    """The transcribed table: ``{"sources", "notes", "transcribed_from", "models": {name: {"params",
    "f1": {shots: {task: f1}}, "source": {task: source id}}}, "superseded_2022_card": {...}}``."""
    return json.loads(PUBLISHED_FILE.read_text(encoding="utf-8"))


def _mean(vals: list[float | None]) -> float | None:
    return None if any(v is None for v in vals) else sum(vals) / len(vals)  # type: ignore[arg-type]


def published_f1(model: str, task: str, shots: int, *, superseded: bool = False) -> float | None:
    """Published macro-F1 of ``model`` on ``task`` (``"average"`` = unweighted mean of the five) at
    ``shots``; ``None`` where the source has no number. ``superseded`` reads the 2022 card."""
    pub = load_published()
    models = pub["superseded_2022_card"]["models"] if superseded else pub["models"]
    by_shot = models.get(model, {}).get("f1", {}).get(str(shots))
    if by_shot is None:
        return None
    if task == "average" and "average" not in by_shot:
        return _mean([by_shot.get(t) for t in KOBEST_TASKS])
    return by_shot.get(task)


def published_shots(superseded: bool = False) -> list[int]:
    pub = load_published()
    models = pub["superseded_2022_card"]["models"] if superseded else pub["models"]
    return sorted({int(s) for m in models.values() for s in m["f1"]})


def reference_model(n_params: int | None, compare_to: str = "") -> str:
    """The published model ours is compared with: ``compare_to`` (a Polyglot-Ko size such as ``3.8b``
    or any published model name), else the Polyglot-Ko size nearest ``n_params`` in log scale
    (1.3b for anything smaller, and when the size is unknown)."""
    if compare_to:
        name = POLYGLOT_SIZES.get(compare_to.lower(), compare_to)
        if name not in load_published()["models"]:
            raise ValueError(f"compare_to={compare_to!r}: no published numbers for it; choose one of "
                             f"{list(POLYGLOT_SIZES)} or {list(load_published()['models'])}")
        return name
    if not n_params or n_params <= 0:
        return POLYGLOT_SIZES["1.3b"]
    from polyko.model import RELEASED_PARAMS

    size = min(RELEASED_PARAMS, key=lambda s: abs(math.log(RELEASED_PARAMS[s] / n_params)))
    return POLYGLOT_SIZES[size]


def short_name(model: str) -> str:
    return model.rsplit("/", 1)[-1]


def _ours(metrics: dict[str, float], task: str, s: int, metric: str = "f1") -> float | None:
    if task == "average":
        return metrics.get(f"kobest/{metric}_avg/{s}shot")
    return metrics.get(f"{task}/{metric}/{s}shot")


def comparison_metrics(metrics: dict[str, float], reference: str) -> dict[str, float]:
    """For every ``<task>/f1/<N>shot`` (and ``kobest/f1_avg/<N>shot``) in ``metrics`` that the
    reference has a published number for: ``published/<same name>`` = that number and
    ``<task>/f1_vs_ref/<N>shot`` = ours - published (positive = better than the reference)."""
    out: dict[str, float] = {}
    for name, v in metrics.items():
        head, _, shot = name.rpartition("/")
        if not shot.endswith("shot") or not shot[:-4].isdigit():
            continue
        s = int(shot[:-4])
        if head == "kobest/f1_avg":
            task, delta_name = "average", f"kobest/f1_avg_vs_ref/{shot}"
        elif head.endswith("/f1") and head[:-3] in KOBEST_TASKS:
            task, delta_name = head[:-3], f"{head[:-3]}/f1_vs_ref/{shot}"
        else:
            continue
        pub = published_f1(reference, task, s)
        if pub is None:
            continue
        out[f"published/{name}"] = pub
        out[delta_name] = v - pub
    return out


def _fmt(v: float | None) -> str:
    return "—" if v is None else f"{v:.4f}"


def _signed(v: float | None) -> str:
    return "—" if v is None else f"{v:+.4f}"


def render_table(metrics: dict[str, float], *, shots: list[int], tasks: list[str], model: str,
                 limit: int = 0, split_sizes: dict[str, int] | None = None, reference: str | None = None) -> str:
    """Markdown: (1) ours, rows = tasks (+ average), columns = shots, macro-F1 and accuracy;
    (2) per shot count the cards report, ours, ours - reference, and every published model;
    (3) for 1/100 shots, the superseded 2022 card's three models."""
    pub = load_published()
    reference = reference or POLYGLOT_SIZES["1.3b"]
    rows = list(tasks) + (["average"] if list(tasks) == list(KOBEST_TASKS) else [])

    out = [f"# KoBEST — {model}", ""]
    if limit:
        out += [f"> **--limit {limit}**: only the first {limit} test documents per task were scored. These numbers "
                "are for smoke tests and are NOT comparable with the published ones.", ""]
    out += ["## Macro-F1 (test split)", "",
            "| task | " + " | ".join(f"{s}-shot" for s in shots) + " |",
            "|---|" + "---:|" * len(shots)]
    for t in rows:
        out.append(f"| {t.removeprefix('kobest_')} | " + " | ".join(_fmt(_ours(metrics, t, s)) for s in shots) + " |")
    out += ["", "## Accuracy (test split)", "",
            "| task | " + " | ".join(f"{s}-shot" for s in shots) + " |",
            "|---|" + "---:|" * len(shots)]
    for t in tasks:
        out.append(f"| {t.removeprefix('kobest_')} | "
                   + " | ".join(_fmt(_ours(metrics, t, s, 'acc')) for s in shots) + " |")

    card = next(s for s in pub["sources"] if s["id"] == pub["primary_source"])
    out += ["", "## Compared with published macro-F1", "",
            f"Published: the Polyglot-Ko model cards ({card['url']}), all four sizes and the cards' baselines, "
            f"transcribed with their sources in `polyko/eval/published_kobest.json` (sha256 of the transcribed "
            f"file `{pub['transcribed_from']['sha256'][:12]}`). Reference: **{reference}** "
            f"(Δ = ours − reference). The cards have no average column: 'average' is the unweighted mean of the "
            f"five task F1s. " + pub["caveat"], ""]
    cur = [s for s in shots if s in published_shots()]
    if cur:
        models = [m for m in PUBLISHED_ORDER if m in pub["models"]]
        head = [f"ours ({model})", f"Δ vs {short_name(reference)}"] + \
               [f"{short_name(m)} ({pub['models'][m]['params']})" for m in models]
        out += ["| task | shots | " + " | ".join(head) + " |", "|---|---:|" + "---:|" * len(head)]
        for s in cur:
            for t in rows:
                ours, ref = _ours(metrics, t, s), published_f1(reference, t, s)
                vals = [_fmt(ours), _signed(None if ours is None or ref is None else ours - ref)] + \
                       [_fmt(published_f1(m, t, s)) for m in models]
                out.append(f"| {t.removeprefix('kobest_')} | {s} | " + " | ".join(vals) + " |")
    old = [s for s in shots if s not in cur and s in published_shots(superseded=True)]
    if old:
        sup = pub["superseded_2022_card"]
        src = sup["source"]
        out += ["", f"Shots {old}: the current cards report 0/5/10/50 only; these numbers are from the superseded "
                f"2022 card (`{src['repository']}` @ `{src['commit'][:12]}` `{src['path']}`, three models, different "
                "BoolQ/WiC/SentiNeg/HellaSwag values than the current cards).", ""]
        head = [f"ours ({model})"] + [f"{short_name(m)} ({sup['models'][m]['params']})" for m in SUPERSEDED_ORDER]
        out += ["| task | shots | " + " | ".join(head) + " |", "|---|---:|" + "---:|" * len(head)]
        for s in old:
            for t in rows:
                vals = [_ours(metrics, t, s)] + [published_f1(m, t, s, superseded=True) for m in SUPERSEDED_ORDER]
                out.append(f"| {t.removeprefix('kobest_')} | {s} | " + " | ".join(_fmt(v) for v in vals) + " |")
    missing = [s for s in shots if s not in cur and s not in old]
    if missing:
        out += ["", f"No published numbers at {missing} shots (the cards report {published_shots()}); "
                "run with one of those --shots to compare."]
    if split_sizes:
        out += ["", "Test documents loaded per task (before --limit): "
                + ", ".join(f"{t.removeprefix('kobest_')} {n}" for t, n in split_sizes.items()) + "."]
    return "\n".join(out) + "\n"
