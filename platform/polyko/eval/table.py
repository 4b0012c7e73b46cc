"""The paper-style KoBEST table: macro-F1 per task and shot count, our model next to the numbers
published in the Polyglot-Ko model card (``published_kobest.json``, transcribed with its source).

    >>> from polyko.eval.table import load_published, render_table
    >>> md = render_table({"kobest_copa/f1/5shot": 0.71}, shots=[5], tasks=["kobest_copa"], model="ours")
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from polyko.eval.config import KOBEST_TASKS

PUBLISHED_FILE = Path(__file__).with_name("published_kobest.json")
# Column order of the card: its own model first, then the baselines.
PUBLISHED_ORDER = ("EleutherAI/polyglot-ko-1.3b", "kakaobrain/kogpt", "skt/ko-gpt-trinity-1.2B-v0.5")


@functools.lru_cache(maxsize=1)
def load_published() -> dict[str, Any]:
    """The transcribed card: ``{"source": {...}, "models": {name: {"params", "f1": {shots: {task: f1}}}}}``."""
    return json.loads(PUBLISHED_FILE.read_text(encoding="utf-8"))


def published_f1(model: str, task: str, shots: int) -> float | None:
    return load_published()["models"].get(model, {}).get("f1", {}).get(str(shots), {}).get(task)


def _fmt(v: float | None) -> str:
    return "—" if v is None else f"{v:.4f}"


def render_table(metrics: dict[str, float], *, shots: list[int], tasks: list[str], model: str,
                 limit: int = 0, split_sizes: dict[str, int] | None = None) -> str:
    """Markdown: (1) ours, rows = tasks (+ average), columns = shots, macro-F1 and accuracy;
    (2) per shot count the card reports, ours next to each published model."""
    pub = load_published()
    rows = list(tasks) + (["average"] if list(tasks) == list(KOBEST_TASKS) else [])

    def ours(task: str, s: int, metric: str = "f1") -> float | None:
        if task == "average":
            return metrics.get(f"kobest/{metric}_avg/{s}shot")
        return metrics.get(f"{task}/{metric}/{s}shot")

    out = [f"# KoBEST — {model}", ""]
    if limit:
        out += [f"> **--limit {limit}**: only the first {limit} test documents per task were scored. These numbers "
                "are for smoke tests and are NOT comparable with the published ones.", ""]
    out += ["## Macro-F1 (test split)", "",
            "| task | " + " | ".join(f"{s}-shot" for s in shots) + " |",
            "|---|" + "---:|" * len(shots)]
    for t in rows:
        out.append(f"| {t.removeprefix('kobest_')} | " + " | ".join(_fmt(ours(t, s)) for s in shots) + " |")
    out += ["", "## Accuracy (test split)", "",
            "| task | " + " | ".join(f"{s}-shot" for s in shots) + " |",
            "|---|" + "---:|" * len(shots)]
    for t in tasks:
        out.append(f"| {t.removeprefix('kobest_')} | " + " | ".join(_fmt(ours(t, s, 'acc')) for s in shots) + " |")

    models = [m for m in PUBLISHED_ORDER if m in pub["models"]]
    published_shots = [s for s in shots if any(str(s) in pub["models"][m]["f1"] for m in models)]
    src = pub["source"]
    out += ["", "## Compared with published macro-F1", "",
            f"Published: Polyglot-Ko 1.3B model card, `{src['repository']}` @ `{src['commit'][:12]}` "
            f"`{src['path']}` (transcribed in `polyko/eval/published_kobest.json`). " + pub["caveat"], ""]
    if not published_shots:
        card = sorted({int(s) for m in models for s in pub["models"][m]["f1"]})
        out.append(f"The card reports {card}-shot results only; run with one of those --shots to compare.")
    else:
        head = [f"ours ({model})"] + [f"{m} ({pub['models'][m]['params']})" for m in models]
        out += ["| task | shots | " + " | ".join(head) + " |", "|---|---:|" + "---:|" * len(head)]
        for s in published_shots:
            for t in rows:
                vals = [ours(t, s)] + [published_f1(m, t, s) for m in models]
                out.append(f"| {t.removeprefix('kobest_')} | {s} | " + " | ".join(_fmt(v) for v in vals) + " |")
    if split_sizes:
        out += ["", "Test documents loaded per task (before --limit): "
                + ", ".join(f"{t.removeprefix('kobest_')} {n}" for t, n in split_sizes.items()) + "."]
    return "\n".join(out) + "\n"
