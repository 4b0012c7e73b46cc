"""A table of MLflow runs side by side: run name, the params that DIFFER across the runs, and the
chosen metrics, sorted by the first metric. The same view as selecting the runs in the MLflow UI
and pressing "Compare", in a terminal.

    python jobs/compare.py --experiment polyko-eval --metric 'kobest/f1_avg/*' --max-runs 20
    python jobs/compare.py --experiment eval --metric kobest_copa/f1/5shot

``--metric`` takes exact names or shell patterns; without it the ``kobest/f1_avg/*`` metrics are
shown when the runs have them, else every metric (at most ``MAX_DEFAULT_METRICS``).

When a column is a KoBEST macro-F1 (``<task>/f1/<N>shot`` or ``kobest/f1_avg/<N>shot``), the table ends
with one ``published`` row per Polyglot-Ko size and baseline (``polyko.eval.table``), so runs read
against the paper's numbers at the same shot count.
"""

from __future__ import annotations

import fnmatch
import math
from typing import Any

from polyko import tracking

MAX_DEFAULT_METRICS = 8
# Params that are the same for every run of a stage by construction, or noise in a diff.
_IGNORED_PARAMS = {"output"}


def _experiment_name(name: str) -> str:
    return tracking.experiment_name(name) if name in tracking.STAGES else name


def fetch_runs(experiment: str, max_runs: int = 50) -> list[Any]:
    """The newest ``max_runs`` finished-or-running runs of ``experiment`` (a name or a stage)."""
    import mlflow
    from mlflow import MlflowClient

    if max_runs < 1:
        raise ValueError(f"max_runs must be >= 1, got {max_runs}")
    client = MlflowClient(tracking_uri=tracking.tracking_uri())
    exp = client.get_experiment_by_name(_experiment_name(experiment))
    if exp is None:
        names = [e.name for e in client.search_experiments()]
        raise ValueError(f"no experiment {_experiment_name(experiment)!r} at {tracking.tracking_uri()}; have {names}")
    return client.search_runs([exp.experiment_id], max_results=max_runs,
                              order_by=["attributes.start_time DESC"],
                              run_view_type=mlflow.entities.ViewType.ACTIVE_ONLY)


def choose_metrics(runs: list[Any], patterns: list[str] | None) -> list[str]:
    names = sorted({k for r in runs for k in r.data.metrics})
    if patterns:
        chosen: list[str] = []
        for pat in patterns:
            hits = [n for n in names if fnmatch.fnmatchcase(n, pat)]
            if not hits:
                raise ValueError(f"no run has a metric matching {pat!r}; metrics: {names[:20]}")
            chosen += [h for h in hits if h not in chosen]
        return chosen
    avg = [n for n in names if n.startswith("kobest/f1_avg/")]
    return sorted(avg, key=_shot_key) if avg else names[:MAX_DEFAULT_METRICS]


def _shot_key(name: str) -> tuple[str, int]:
    last = name.rsplit("/", 1)[-1]
    return (name.rsplit("/", 1)[0], int(last[:-4]) if last.endswith("shot") and last[:-4].isdigit() else -1)


def published_rows(cols: list[str]) -> list[tuple[str, list[float | None]]]:
    """``[(model, value per column)]`` for the published models, when any column is a KoBEST F1."""
    from polyko.eval.table import PUBLISHED_ORDER, published_f1

    keys: list[tuple[str, int] | None] = []
    for c in cols:
        head, _, shot = c.rpartition("/")
        s = int(shot[:-4]) if shot.endswith("shot") and shot[:-4].isdigit() else None
        task = "average" if head == "kobest/f1_avg" else head[:-3] if head.endswith("/f1") else None
        keys.append((task, s) if task is not None and s is not None else None)
    if not any(keys):
        return []
    rows = [(m, [published_f1(m, *k) if k else None for k in keys]) for m in PUBLISHED_ORDER]
    return [(m, vals) for m, vals in rows if any(v is not None for v in vals)]


def differing_params(runs: list[Any]) -> list[str]:
    keys = sorted({k for r in runs for k in r.data.params} - _IGNORED_PARAMS)
    return [k for k in keys if len({r.data.params.get(k) for r in runs}) > 1]


def _fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4f}"
    s = str(v)
    return s if len(s) <= 40 else s[:37] + "..."


def compare_runs(experiment: str, metrics: list[str] | None = None, max_runs: int = 50,
                 sort_by: str | None = None, ascending: bool = False, published: bool = True) -> str:
    """Markdown table of the runs (see module doc). ``sort_by`` defaults to the first metric;
    runs without it go last. ``published`` appends the published KoBEST rows (see module doc)."""
    runs = fetch_runs(experiment, max_runs)
    if not runs:
        return f"experiment {_experiment_name(experiment)!r} has no runs\n"
    cols = choose_metrics(runs, metrics)
    params = differing_params(runs)
    key = sort_by or (cols[0] if cols else None)

    def order(r: Any) -> tuple[int, float]:
        v = r.data.metrics.get(key) if key else None
        if v is None:
            return (1, 0.0)
        return (0, v if ascending else -v)

    runs = sorted(runs, key=order)
    head = ["run", "run id"] + params + cols
    lines = [f"Experiment {_experiment_name(experiment)!r} at {tracking.tracking_uri()}: {len(runs)} run(s), "
             f"sorted by {key or 'start time'} ({'ascending' if ascending else 'descending'}); "
             f"params shown: those that differ across runs.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in runs:
        row = [r.info.run_name or "", r.info.run_id[:8]] + [_fmt(r.data.params.get(p)) for p in params] \
              + [_fmt(r.data.metrics.get(m)) for m in cols]
        lines.append("| " + " | ".join(row) + " |")
    pub = published_rows(cols) if published else []
    for model, vals in pub:
        lines.append("| " + " | ".join(["published", model] + ["—"] * len(params) + [_fmt(v) for v in vals]) + " |")
    if pub:
        lines += ["", "published: the Polyglot-Ko model cards' KoBEST macro-F1 (polyko/eval/published_kobest.json); "
                  "'average' is the mean of the five task F1s."]
    lines += ["", f"Open the same runs in the MLflow UI: {tracking.ui_command()}"]
    return "\n".join(lines) + "\n"
