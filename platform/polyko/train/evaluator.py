"""Downstream scores per checkpoint, off the training path: a KoBEST subset on each checkpoint's weights,
logged to the *pretrain* MLflow run at the checkpoint's step, so MLflow draws KoBEST-vs-step curves.

It runs on Ray Train V2's checkpoint validation (``ray.train.v2.api.validation_config``, alpha in Ray 2.60),
which does exactly what this needs:

* the training loop reports a checkpoint with ``ray.train.report(..., checkpoint=ckpt, validation=True)``
  and goes on: the Train controller starts :func:`validate_checkpoint` as a separate Ray task (its own CPU
  slot, ``num_cpus``) on the persisted checkpoint; nothing on the training side waits for it;
* a failed evaluation is retried (``ray_remote_kwargs``: ``max_retries`` + ``retry_exceptions``);
* the pending queue is part of the controller's checkpoint-manager snapshot in the run's storage
  directory (``<run>/ray/<name>/``): evaluations pending when a run is aborted are started again by the
  next ``fit()`` of the same run (same storage path and name), and checkpoint retention keeps a checkpoint
  until its evaluation is done;
* ``trainer.fit()`` returns after the last evaluation finished.

One evaluation = :func:`polyko.train.export.export_hf` to a temporary HF directory, then the same lm-eval path
as ``jobs/evaluate.py`` (``polyko.eval.kobest``), default the five KoBEST tasks, 0-shot, first 200 test
documents each. Logged at the checkpoint's step: ``kobest_<task>/<acc|f1>/<N>shot``, ``kobest/f1_avg/<N>shot``,
the published reference (``published/...``) and ``..._vs_ref`` (``polyko.eval.table``), ``kobest/eval_seconds``;
and ``kobest/step_XXXXXX/table.md`` as an artifact.

Wiring (trainer and loop)::

    from polyko.train import evaluator
    vc = evaluator.validation_config(cfg.evaluate, run_id=run.info.run_id, tracking_uri=tracking.tracking_uri())
    TorchTrainer(..., validation_config=vc)                       # None when cfg.evaluate.enabled is False
    ray.train.report(metrics, checkpoint=..., checkpoint_dir_name=...,
                     validation=evaluator.wants(cfg.evaluate, step, cfg.checkpoint.every_steps))

On a CPU: ``limit=20`` and one task take ~20 s per checkpoint for the ``tiny`` model.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from polyko.eval.config import normalize_tasks

log = logging.getLogger(__name__)


@dataclass
class CheckpointEvalConfig:
    """KoBEST on every ``every``-th checkpoint during pretraining (see module doc)."""

    # None (pretraining's default): on when KoBEST data is at hand, decided by the driver (:func:`resolve_enabled`).
    enabled: bool | None = True
    # "kobest" = all five, or some of boolq, copa, hellaswag, sentineg, wic.
    tasks: list[str] = field(default_factory=lambda: ["kobest"])
    shots: list[int] = field(default_factory=lambda: [0])
    # Test documents per task (0 = all; the full five-task set takes ~1.5 min for a tiny model on a CPU).
    limit: int = 200
    # Local KoBEST copy (<task>/<split>.jsonl); "" = $POLYKO_KOBEST_DIR, else the HF hub.
    kobest_dir: str = ""
    # Evaluate every N-th checkpoint (1 = each one); the last checkpoint of a run always.
    every: int = 1
    # Resources of the evaluation task: its own slot, so training keeps its CPUs/GPUs.
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    # Sequences per forward pass (8 suits a CPU; 0 = lm-eval's automatic search on a GPU).
    batch_size: int = 8
    # Retries of a failed evaluation (any exception), then it is recorded as failed; training goes on.
    max_retries: int = 2
    # Seconds before an evaluation is cancelled (0 = no limit).
    timeout_s: float = 3600.0
    # Published reference for the *_vs_ref metrics: "" = nearest Polyglot-Ko size, or 1.3b/3.8b/5.8b/12.8b.
    compare_to: str = ""
    seed: int = 1234

    def __post_init__(self) -> None:
        self.tasks = normalize_tasks(self.tasks)
        if not self.shots or any(int(s) < 0 for s in self.shots):
            raise ValueError(f"evaluate.shots must be a non-empty list of counts >= 0, got {self.shots}")
        self.shots = sorted({int(s) for s in self.shots})
        if self.limit < 0 or self.every < 1 or self.max_retries < 0 or self.timeout_s < 0:
            raise ValueError("evaluate.limit >= 0, evaluate.every >= 1, evaluate.max_retries >= 0 and "
                             f"evaluate.timeout_s >= 0 required, got {self.limit}, {self.every}, "
                             f"{self.max_retries}, {self.timeout_s}")


def resolve_enabled(cfg: CheckpointEvalConfig) -> tuple[CheckpointEvalConfig, str | None]:
    """``enabled`` decided on the driver: None becomes True when KoBEST data resolves (a local copy, or the
    hub when online), else False with the reason (a note for the user); True with no data is a ValueError."""
    from dataclasses import replace

    from polyko.eval import kobest

    if cfg.enabled is False:
        return cfg, None
    try:
        kobest.resolve_data(cfg.kobest_dir, cfg.tasks)
    except ValueError as e:
        if cfg.enabled:
            raise ValueError(f"eval.kobest: {e}") from None
        return replace(cfg, enabled=False), (f"KoBEST during training is off: {e} (eval.kobest.kobest_dir=DIR "
                                             "turns it on; eval.kobest.enabled=false silences this)")
    return replace(cfg, enabled=True), None


def wants(cfg: CheckpointEvalConfig, step: int, every_steps: int, last_step: int | None = None) -> bool:
    """Whether the checkpoint saved after optimizer step ``step`` (1-based count of steps done) is evaluated."""
    if not cfg.enabled:
        return False
    if last_step is not None and step == last_step:
        return True
    return (step // max(1, every_steps)) % cfg.every == 0


def validation_config(cfg: CheckpointEvalConfig, *, run_id: str | None, tracking_uri: str):
    """The ``ValidationConfig`` for ``TorchTrainer(validation_config=...)``; None when disabled."""
    if not cfg.enabled:
        return None
    from ray.train.v2.api.validation_config import ValidationConfig, ValidationTaskConfig

    from polyko.config import to_dict

    remote: dict[str, Any] = {"num_cpus": cfg.num_cpus, "max_retries": cfg.max_retries, "retry_exceptions": True}
    if cfg.num_gpus:
        remote["num_gpus"] = cfg.num_gpus
    kwargs = {"run_id": run_id, "tracking_uri": tracking_uri, "config": to_dict(cfg)}
    return ValidationConfig(fn=validate_checkpoint,
                            task_config=ValidationTaskConfig(fn_kwargs=kwargs, timeout_s=cfg.timeout_s or None),
                            ray_remote_kwargs=remote)


def _metric_batch(metrics: dict[str, float], step: int) -> list[Any]:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(key=k, value=float(v), timestamp=now, step=step) for k, v in sorted(metrics.items())]


def evaluate_checkpoint(checkpoint_dir: str | Path, cfg: CheckpointEvalConfig, *, run_id: str | None = None,
                        tracking_uri: str | None = None) -> dict[str, float]:
    """Export checkpoint ``checkpoint_dir`` (a ``step_XXXXXX`` dir), score it and log the scores to MLflow
    run ``run_id`` (default: the pretrain run recorded in the checkpoint) at the checkpoint's step. Returns
    the logged metrics. Raises on any failure (the caller's retry decides)."""
    from mlflow import MlflowClient

    from polyko import tracking
    from polyko.eval import kobest, table
    from polyko.eval.config import EvalConfig
    from polyko.eval.runner import model_params, model_spec
    from polyko.train import checkpoint as ckpt_io
    from polyko.train.export import export_hf

    t0 = time.time()
    checkpoint_dir = Path(checkpoint_dir)
    meta = ckpt_io.validate(checkpoint_dir)
    step = int(meta["step"])
    run_id = run_id or meta.get("run_id")
    if not run_id:
        raise ValueError(f"{checkpoint_dir}: no MLflow run to log to (none given, none in the checkpoint)")
    data = kobest.resolve_data(cfg.kobest_dir, cfg.tasks)  # a bad data dir fails before the export
    work = Path(tempfile.mkdtemp(prefix=f"polyko-ckpt-eval-{step}-"))
    try:
        hf = export_hf(checkpoint_dir, work / "hf", link_run=False)
        ecfg = EvalConfig(model=str(hf), tasks=cfg.tasks, shots=cfg.shots, limit=cfg.limit,
                          kobest_dir=cfg.kobest_dir, output=str(work / "eval"), batch_size=cfg.batch_size,
                          seed=cfg.seed, compare_to=cfg.compare_to)
        lm_type, model_args, model_dir = model_spec(ecfg)
        reference = table.reference_model(model_params(model_dir), cfg.compare_to)
        device = "cuda" if cfg.num_gpus else "cpu"
        metrics: dict[str, float] = {}
        for shots in cfg.shots:
            res = kobest.run_lm_eval(model=lm_type, model_args=model_args, tasks=cfg.tasks, data=data, shots=shots,
                                     limit=cfg.limit, batch_size=cfg.batch_size or "auto", device=device,
                                     seed=cfg.seed, log_samples=False)
            metrics.update(kobest.extract_metrics(res, shots))
        metrics.update(table.comparison_metrics(metrics, reference))
        metrics["kobest/eval_seconds"] = time.time() - t0
        client = MlflowClient(tracking_uri=tracking_uri or tracking.tracking_uri())
        client.log_batch(run_id, metrics=_metric_batch(metrics, step))
        md = table.render_table(metrics, shots=cfg.shots, tasks=cfg.tasks, model=f"{checkpoint_dir.name}",
                                limit=cfg.limit, reference=reference)
        (work / "table.md").write_text(md, encoding="utf-8")
        client.log_artifact(run_id, str(work / "table.md"), artifact_path=f"kobest/{ckpt_io.step_dir_name(step)}")
        log.info("KoBEST at step %d of %s: %s", step, run_id, {k: round(v, 4) for k, v in metrics.items()
                                                              if "/f1/" in k or "f1_avg/" in k})
        return metrics
    finally:
        shutil.rmtree(work, ignore_errors=True)


def validate_checkpoint(checkpoint: Any, *, run_id: str | None = None, tracking_uri: str | None = None,
                        config: dict[str, Any] | None = None) -> dict[str, float]:
    """Ray Train's ``ValidationFn``: ``checkpoint`` is the reported ``ray.train.Checkpoint`` (or a local
    directory). Runs in the validation task, never in a training worker."""
    from polyko.config import from_dict

    cfg = from_dict(CheckpointEvalConfig, config or {})
    if isinstance(checkpoint, (str, Path)):
        return evaluate_checkpoint(checkpoint, cfg, run_id=run_id, tracking_uri=tracking_uri)
    with checkpoint.as_directory() as d:  # local storage: the directory itself; remote: a download
        return evaluate_checkpoint(Path(d), cfg, run_id=run_id, tracking_uri=tracking_uri)
