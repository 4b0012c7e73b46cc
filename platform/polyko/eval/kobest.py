"""KoBEST through lm-eval's OWN kobest tasks, online (HF hub) or offline (a local copy).

lm-eval 0.4.13 ships ``kobest_boolq/copa/hellaswag/sentineg/wic`` (prompts, choices, acc and
sklearn macro-F1) reading ``skt/kobest_v1`` from the hub. Offline we keep those task definitions
untouched and only point their data at local JSONL: a group YAML, written into a private
``include_path`` directory, lists the built-in tasks by name and overrides ``dataset_path: json``,
``dataset_name: null`` and ``dataset_kwargs.data_files`` per split. Files are named explicitly, so
``sentineg/test_originated.jsonl`` (the un-negated SentiNeg test set) is never merged into ``test``
(letting ``datasets`` infer splits from the folder would do that: 794 test docs instead of 397).

Run on a CPU (tiny model, 20 docs per task)::

    python jobs/evaluate.py --model work/quickstart/pretrain/hf --shots 0 --limit 20 --kobest-dir ../shared/data/kobest

Cost: the TaskManager indexes only lm-eval's kobest folder and ours (the whole tree would take ~9 s).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from polyko.eval.config import KOBEST_TASKS

log = logging.getLogger(__name__)

HUB_DATASET = "skt/kobest_v1"
SPLITS = ("train", "validation", "test")  # train feeds the few-shot examples; test is scored
# Metrics lm-eval reports per kobest task (hellaswag adds acc_norm); stderr of f1 is "N/A".
METRICS = ("acc", "f1", "acc_norm")


@dataclass(frozen=True)
class KobestData:
    """Where the documents come from: ``local_dir`` (offline) or the hub (``local_dir is None``)."""

    local_dir: Path | None

    def describe(self) -> str:
        return str(self.local_dir) if self.local_dir else f"hf://datasets/{HUB_DATASET}"


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def hub_offline() -> bool:
    return _truthy("HF_HUB_OFFLINE") or _truthy("HF_DATASETS_OFFLINE")


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    """One TCP connect to the hub (no HTTP retries: lm-eval/datasets would retry for minutes)."""
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout_s):
            return True
    except OSError:
        return False


def resolve_data(kobest_dir: str, tasks: list[str]) -> KobestData:
    """Pick the data source: ``kobest_dir``, else ``$POLYKO_KOBEST_DIR``, else the hub when it is
    allowed and reachable. A missing local file is a ValueError naming it (never a silent hub call)."""
    local = kobest_dir or os.environ.get("POLYKO_KOBEST_DIR", "")
    if not local:
        if hub_offline():
            raise ValueError("HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set and no local KoBEST copy was given: "
                             "pass --kobest-dir DIR (layout <task>/<split>.jsonl) or set POLYKO_KOBEST_DIR")
        if not _hub_reachable():
            raise ValueError(f"huggingface.co is unreachable and no local KoBEST copy was given: "
                             f"pass --kobest-dir DIR or set POLYKO_KOBEST_DIR (hub dataset {HUB_DATASET})")
        return KobestData(None)
    root = Path(local).expanduser().resolve()
    missing = [str(root / t.removeprefix("kobest_") / f"{s}.jsonl") for t in tasks for s in SPLITS
               if not (root / t.removeprefix("kobest_") / f"{s}.jsonl").is_file()]
    if missing:
        raise ValueError(f"KoBEST dir {root} lacks {len(missing)} file(s), e.g. {missing[:3]}; "
                         f"expected <task>/<split>.jsonl for tasks {tasks} and splits {list(SPLITS)}")
    return KobestData(root)


def group_name(tasks: list[str]) -> str:
    """``kobest`` (replacing lm-eval's own group, so outputs look like upstream's) for all five."""
    return "kobest" if list(tasks) == list(KOBEST_TASKS) else "kobest_subset"


def write_group_yaml(include_dir: Path, tasks: list[str], data: KobestData) -> str:
    """Write the group YAML that selects ``tasks`` (and, offline, points them at local files);
    return the group's name. JSON is valid YAML, so no YAML writer is needed."""
    members: list[Any] = []
    for t in tasks:
        if data.local_dir is None:
            members.append(t)
        else:
            sub = data.local_dir / t.removeprefix("kobest_")
            members.append({"task": t, "dataset_kwargs": {
                "data_files": {s: str(sub / f"{s}.jsonl") for s in SPLITS}}})
    name = group_name(tasks)
    group: dict[str, Any] = {"group": name, "task": members}
    if data.local_dir is not None:
        # Group-level task overrides apply to every member; dataset_name must be null for json.
        group["dataset_path"] = "json"
        group["dataset_name"] = None
    # Same aggregation as lm-eval's kobest group (size-weighted means). Our table's "average" is
    # instead the card's unweighted mean of the task F1s (see polyko.eval.table).
    group["aggregate_metric_list"] = [{"metric": m, "aggregation": "mean", "weight_by_size": True}
                                      for m in ("acc", "f1")]
    group["metadata"] = {"version": 1.0}
    include_dir.mkdir(parents=True, exist_ok=True)
    # Atomic (tmp + rename): concurrent evaluations may share the directory.
    tmp = include_dir / f".{name}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(group, ensure_ascii=False, indent=2) + "\n")
    tmp.replace(include_dir / f"{name}.yaml")
    return name


@functools.lru_cache(maxsize=4)
def _task_manager(include_dir: str):
    # Index only lm-eval's kobest folder, then ours (later paths override earlier ones, so our
    # group replaces lm-eval's "kobest" group): indexing the whole task tree costs ~9 s.
    import lm_eval.tasks
    from lm_eval.tasks import TaskManager

    builtin = Path(lm_eval.tasks.__file__).parent / "kobest"
    assert builtin.is_dir(), f"lm-eval has no kobest tasks at {builtin}"
    return TaskManager(include_path=[str(builtin), include_dir], include_defaults=False)


def task_manager_for(tasks: list[str], data: KobestData):
    """A TaskManager whose include path holds the group YAML for ``tasks`` on ``data``."""
    key = json.dumps([tasks, data.describe()])
    import hashlib

    d = Path(tempfile.gettempdir()) / f"polyko-kobest-{os.getuid()}-{hashlib.sha1(key.encode()).hexdigest()[:12]}"
    name = write_group_yaml(d, tasks, data)
    return _task_manager(str(d)), name


def run_lm_eval(*, model: str, model_args: dict[str, Any], tasks: list[str], data: KobestData,
                shots: int, limit: int, batch_size: int | str, device: str | None, seed: int,
                log_samples: bool) -> dict[str, Any]:
    """One ``lm_eval.simple_evaluate`` pass at ``shots`` few-shot examples; lm-eval's full result."""
    import lm_eval

    tm, group = task_manager_for(tasks, data)
    res = lm_eval.simple_evaluate(
        model=model, model_args=model_args, tasks=[group], num_fewshot=shots,
        limit=limit or None, batch_size=batch_size, device=device, task_manager=tm,
        log_samples=log_samples, random_seed=seed, numpy_random_seed=seed,
        torch_random_seed=seed, fewshot_random_seed=seed)
    assert res is not None, "lm-eval returned no result on rank 0"
    return res


def extract_metrics(result: dict[str, Any], shots: int) -> dict[str, float]:
    """lm-eval's ``{"kobest_copa": {"acc,none": ..}}`` -> ``{"kobest_copa/acc/5shot": ..}`` (valid
    MLflow names; ``,none`` filter suffix dropped; "N/A" stderrs skipped)."""
    out: dict[str, float] = {}
    for task, vals in result.get("results", {}).items():
        for key, v in vals.items():
            if "," not in key or not isinstance(v, (int, float)) or isinstance(v, bool):
                continue
            metric, filt = key.split(",", 1)
            if filt != "none" or not math.isfinite(float(v)):
                continue
            out[f"{task}/{metric}/{shots}shot"] = float(v)
    f1s = [out.get(f"{t}/f1/{shots}shot") for t in KOBEST_TASKS]
    if all(v is not None for v in f1s):
        # The Polyglot-Ko card's "average" column: unweighted mean of the five macro-F1s.
        out[f"kobest/f1_avg/{shots}shot"] = sum(f1s) / len(f1s)  # type: ignore[arg-type]
    return out


def split_sizes(result: dict[str, Any]) -> dict[str, int]:
    """Documents lm-eval loaded per task's test split (before --limit): sentineg must be 397."""
    return {t: int(v["original"]) for t, v in result.get("n-samples", {}).items()}
