"""MLflow conventions shared by every polyko job, so a user can click from an evaluation back to the
checkpoint, the pretraining run, the tokenizer and the data that produced it.

Convention (documented in README "Tracking"):
  * experiment per stage: ``polyko-data``, ``polyko-tokenizer``, ``polyko-pretrain``, ``polyko-eval``
    (``polyko-serve`` for serving, ``polyko-sweep`` for sweeps). ``POLYKO_EXPERIMENT_PREFIX`` changes
    the ``polyko`` prefix (one prefix per project or user).
  * run name: ``<stage>-<config hash>`` unless the job is given ``--run-name``.
  * params: the job's whole config, flattened (``dedup.threshold``, ``optim.lr`` ...).
  * tags: ``polyko.stage``, ``polyko.config_hash``, ``polyko.output`` (the output path) and one
    ``polyko.parent.<stage>`` = run id per ancestor (data, tokenizer, pretrain ...).
  * every output directory gets ``polyko_run.json`` (the run's id, URI and ancestors), written when
    the run starts, so the next job that reads that directory links itself to its parents.

Where runs go: ``MLFLOW_TRACKING_URI`` when set (a real server, e.g. ``http://mlflow:5000``);
otherwise an embedded sqlite store ``<work dir>/mlflow.db`` with artifacts in
``<work dir>/mlartifacts``; the work dir is ``POLYKO_WORK_DIR`` or ``./work``.
Open it with the command :func:`ui_command` prints.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path
from typing import Any, Iterator

from polyko.config import config_hash, flatten

RUN_MARKER = "polyko_run.json"
STAGES = ("data", "tokenizer", "pretrain", "checkpoint", "eval", "serve", "sweep")
_MAX_PARAM_LEN = 6000  # MLflow 3 limit on a param value, characters


def work_dir() -> Path:
    return Path(os.environ.get("POLYKO_WORK_DIR", "work")).resolve()


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` or the embedded sqlite store in the work dir (created on demand)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    wd = work_dir()
    wd.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{wd / 'mlflow.db'}"


def ui_command(uri: str | None = None) -> str:
    """The command that opens the runs in the MLflow UI."""
    uri = uri or tracking_uri()
    if uri.startswith("sqlite:"):
        return f"mlflow ui --backend-store-uri {uri} --port 5000"
    return f"open {uri} in a browser"


def experiment_name(stage: str) -> str:
    prefix = os.environ.get("POLYKO_EXPERIMENT_PREFIX", "polyko")
    return f"{prefix}-{stage}"


def metric_name(name: str) -> str:
    """A valid MLflow metric/param key: lm-eval's ``acc,none`` becomes ``acc_none``."""
    return re.sub(r"[^0-9A-Za-z_\-. /:]", "_", name)


def get_or_create_experiment(stage_or_name: str) -> str:
    """Experiment id for a stage (``"eval"``) or a full experiment name."""
    import mlflow

    name = experiment_name(stage_or_name) if stage_or_name in STAGES else stage_or_name
    mlflow.set_tracking_uri(tracking_uri())
    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    artifact_location = None
    if tracking_uri().startswith("sqlite:"):
        # Without this, sqlite stores put artifacts under ./mlruns of whatever cwd the job had.
        artifact_location = (work_dir() / "mlartifacts" / name).as_uri()
    try:
        return mlflow.create_experiment(name, artifact_location=artifact_location)
    except Exception:  # created concurrently by another job: use theirs
        exp = mlflow.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def read_marker(path: str | os.PathLike) -> dict[str, Any] | None:
    """The ``polyko_run.json`` of an output directory, looking in ``path`` and its parents (so
    ``DIR/tokens`` finds ``DIR/polyko_run.json``). ``None`` when there is none."""
    p = Path(path).resolve()
    for cand in [p, *p.parents][:4]:
        f = cand / RUN_MARKER
        if f.is_file():
            return json.loads(f.read_text())
    return None


def lineage(*paths: str | os.PathLike | None) -> dict[str, str]:
    """``{stage: run_id}`` for the runs that produced ``paths`` and all of their ancestors."""
    out: dict[str, str] = {}
    for path in paths:
        if path is None:
            continue
        m = read_marker(path)
        if m:
            out.update(m.get("parents", {}))
            out[m["stage"]] = m["run_id"]
    return out


def write_marker(out_dir: str | os.PathLike, stage: str, run_id: str, parents: dict[str, str],
                 cfg_hash: str | None = None) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    marker = {"stage": stage, "run_id": run_id, "tracking_uri": tracking_uri(),
              "experiment": experiment_name(stage), "config_hash": cfg_hash, "parents": parents}
    tmp = out / (RUN_MARKER + ".tmp")
    tmp.write_text(json.dumps(marker, indent=2))
    tmp.replace(out / RUN_MARKER)


def log_params(params: dict[str, Any], *, client: Any = None, run_id: str | None = None) -> None:
    """Log ``params`` (names sanitised, values cut to MLflow's limit) to the active run, or with ``client``
    (an ``MlflowClient``) to ``run_id`` without making it the active run."""
    import mlflow

    clean = {metric_name(k): (str(v)[:_MAX_PARAM_LEN] if v is not None else "None") for k, v in params.items()}
    items = list(clean.items())
    for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
        if client is None:
            mlflow.log_params(dict(items[i:i + 100]))
        else:
            from mlflow.entities import Param

            client.log_batch(run_id, params=[Param(k, v) for k, v in items[i:i + 100]])


@contextlib.contextmanager
def start_run(stage: str, config: Any, *, output: str | os.PathLike | None = None,
              parents: dict[str, str] | None = None, run_name: str | None = None,
              tags: dict[str, str] | None = None) -> Iterator[Any]:
    """Start the MLflow run of a job, following the convention above. Yields the active run.

    ``config`` is the job's dataclass config (or a dict); ``output`` its output directory (gets
    ``polyko_run.json``); ``parents`` the ``{stage: run_id}`` of its inputs (see :func:`lineage`).
    """
    import mlflow

    assert stage in STAGES, f"unknown stage {stage!r}"
    parents = dict(parents or {})
    h = config_hash(config)
    exp_id = get_or_create_experiment(stage)
    all_tags = {"polyko.stage": stage, "polyko.config_hash": h}
    if output is not None:
        all_tags["polyko.output"] = str(Path(output).resolve())
    for s, rid in parents.items():
        all_tags[f"polyko.parent.{s}"] = rid
    if parents:
        all_tags["mlflow.note.content"] = "Produced from: " + ", ".join(
            f"{s} run {rid}" for s, rid in sorted(parents.items()))
    all_tags.update(tags or {})
    with mlflow.start_run(experiment_id=exp_id, run_name=run_name or f"{stage}-{h}", tags=all_tags) as run:
        log_params(flatten(config))
        if output is not None:
            write_marker(output, stage, run.info.run_id, parents, h)
        yield run


def run_url(run: Any) -> str:
    """Where a user finds a run: the server's page, or the ui command plus ids for sqlite."""
    uri = tracking_uri()
    exp, rid = run.info.experiment_id, run.info.run_id
    if uri.startswith("http"):
        return f"{uri.rstrip('/')}/#/experiments/{exp}/runs/{rid}"
    return f"experiment {exp}, run {rid} (open with: {ui_command(uri)})"
