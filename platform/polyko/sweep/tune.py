"""``sweep(cfg)``: a Ray Tune hyperparameter sweep whose every trial is a real Ray Train pretraining run.

Each trial is the same code as ``jobs/pretrain.py``: a Tune function trainable (:func:`run_trial`) builds a
``TorchTrainer(polyko.train.loop.train_loop)`` for the trial's ``PretrainConfig`` and calls ``fit()``; the loop's
``ray.train.report`` at every checkpoint reaches Tune through ``TuneReportCallback`` (the Ray 2.60 Train V2
pattern; ``Tuner(trainer)`` is deprecated). The checkpoint cadence of a trial is the scheduler's rung interval,
so ASHA sees a loss exactly at each rung.

* **Schedulers**: ``asha`` (asynchronous successive halving on the step count, rungs ``grace * rf**k``; a
  running trial is also stopped once it falls out of the top ``1/rf`` of the highest rung it reached, as later
  trials arrive there: :mod:`polyko.sweep.asha`) or ``fifo`` (every trial to the end). Sweeps default to the
  WSD learning-rate schedule (``optim.schedule=wsd``):
  rungs placed in its stable phase compare configurations at the same constant lr, where cosine's mid-run
  losses rank them differently from its final ones (rungs that fall in the decay phase are warned about).
* **Resources**: a trial driver needs no CPU (``{"CPU": 0}``): it only waits on its workers, so drivers never
  hold the CPUs their own workers need; ``max_concurrent_trials`` = how many trials' workers fit the cluster.
  Trial actors are reused (``TuneConfig.reuse_actors``): a trial that ends -- completed, or stopped by ASHA,
  whose workers then end their loop at the report it was stopped on -- hands its actor, with Ray Train and
  torch already imported, to the next trial.
* **Failures are data**: a non-finite loss (divergence), an out-of-memory error, a config that does not
  resolve or any other trial error marks that trial ``failed`` with its reason (``trials/<id>/failure.json``,
  MLflow tag ``polyko.failure``) and the sweep goes on. Trials restart nothing by default
  (``trial_max_failures=0``): a deterministic failure would only fail again.
* **Resume**: the sweep lives in ``<output>/tune``; running the same command again restores it
  (``Tuner.restore``): finished trials are not rerun (they also leave ``trials/<id>/final.json``, so even a
  trial finished after Tune's last state save is only re-reported), interrupted ones continue from their
  last Train checkpoint.
* **MLflow** (experiment ``polyko-sweep``): one parent run (the sweep config flattened: search space,
  scheduler, budget; at the end the best trial, its loss and config, ``best.json`` and ``trials.json``) and
  one child run per trial (tag ``mlflow.parentRunId``; params = the trial's full resolved config; the loop
  logs its loss curve there; tag ``polyko.trial_status`` = completed | pruned | failed). Both link to the data
  and tokenizer runs (``polyko.parent.*``).
* **Output**: ``best.json`` = the best completed trial's full ``PretrainConfig`` (the user's base config with
  the winning values; none of the sweep's per-trial bookkeeping), ready for ``jobs/pretrain.py --config``.

CPU: ``sweep(SweepConfig(base=PretrainConfig(data=DataConfig(path=..., tokenizer=...), steps=8),
search=["optim.lr=loguniform:1e-4:3e-2"], trials=6))`` or ``python jobs/sweep.py --size tiny --data DIR
--tokenizer TOK --trials 6 --max-steps 8 --search optim.lr=loguniform:1e-4:3e-2``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from polyko import tracking
from polyko.config import config_hash, flatten, from_dict, to_dict
from polyko.sweep.space import Dimension, apply_values, param_space, parse_search
from polyko.train.config import PretrainConfig, lr_at

STAGE = "sweep"                     # MLflow experiment polyko-sweep
FAILURE_FILE = "failure.json"       # trials/<id>/: why a trial failed
FINAL_FILE = "final.json"           # trials/<id>/: a finished trial's last metrics (never retrained)
# trials/<id>/: {"step": n, "stop": bool} once the scheduler decided on the trial's report of step n. Under
# ASHA the trial's workers wait for it after each report (polyko.train.loop.await_decision), so a trial ASHA
# stops trains no step past the report it was judged on (without the wait it trains on for the ~1-3 s a report
# takes to reach Tune -- Ray Train's 2 s worker poll, then Tune's loop); on "stop" its loop ends and fit()
# returns, so Tune can hand the trial's actor to the next trial instead of killing it.
DECISION_FILE = "decision.json"
# Tune reuses a trial actor for the next trial (TuneConfig.reuse_actors) only if the previous trial's function
# has returned within TUNE_FUNCTION_THREAD_TIMEOUT_S (Ray's default: 2 s) of Tune resetting the actor; a failed
# reset errors the NEW trial (Ray 2.60 TuneController._on_trial_reset). A stopped trial's fit() returns once
# Ray Train's controller has seen its workers end and torn their group down: seconds, more on a loaded node.
REUSE_WAIT_S = 60
# A reused actor saves the next trial a process start and the imports of Ray Train's torch integration and of
# torch (~5 CPU-s on a 2-core node, per trial; benchmarks/sweep.py).
REUSE_ACTORS = True
# A trial driver only waits on its Train workers: it takes no CPU (a CPU per driver would leave a 2-CPU node
# with one trial's worker and a blocked driver). Tune refuses an empty bundle, so it asks for 1 byte of memory.
TRIAL_DRIVER_RESOURCES = {"CPU": 0, "memory": 1}


@dataclass
class SchedulerConfig:
    kind: str = "asha"                 # asha | fifo
    grace_period: int | None = None    # asha: steps before the first rung; None: steps // reduction_factor**2 (>= 1)
    reduction_factor: int = 3          # asha: keep the best 1/rf of trials at each rung; rungs at grace * rf**k
    # asha: also stop a running trial once it leaves the top 1/rf of the highest rung it reached, as more trials
    # get there (polyko.sweep.asha); False: Ray's ASHA, which decides once, on arrival, so early trials go on
    recheck: bool = True


@dataclass
class SweepConfig:
    base: PretrainConfig = field(default_factory=PretrainConfig)  # every trial starts from it (steps = trial length)
    search: list[str] = field(default_factory=list)  # "optim.lr=loguniform:1e-4:3e-2" ... (polyko.sweep.space)
    trials: int = 16                   # sampled configurations (times the grid size, if any grid: dimension)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    metric: str = "loss"               # minimised; reported by the train loop at each checkpoint
    max_concurrent: int | None = None  # None: as many trials as the cluster fits at once
    trial_max_failures: int = 0        # worker-group restarts inside one trial
    seed: int = 0                      # search sampling
    keep_checkpoints: bool = False     # keep finished trials' last checkpoints (else deleted when a trial ends)
    output: str | None = None          # sweep dir; None: <work dir>/sweep/<config hash>
    name: str | None = None            # MLflow parent run / Tune experiment name; None: sweep-<size>-<hash>


def default_config() -> SweepConfig:
    """A sweep's defaults: WSD schedule (comparable intermediate losses), 200 steps, one ZeRO-0 worker per
    trial (ZeRO's partitioning buys nothing on one worker and costs step time)."""
    cfg = SweepConfig()
    cfg.base.optim.schedule = "wsd"
    cfg.base.deepspeed.zero_stage = 0
    cfg.base.scaling.num_workers = 1
    cfg.base.steps = 200
    return cfg


def load_sweep_file(path: str | Path) -> SweepConfig:
    """A YAML/JSON sweep file over :func:`default_config` (the file's keys win; unknown keys are errors)."""
    from polyko.config import read_config_data

    def merge(base: dict, top: dict) -> dict:
        return {**base, **{k: merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
                           for k, v in top.items()}}

    data = merge(to_dict(default_config()), read_config_data(path))
    try:
        return from_dict(SweepConfig, data)
    except ValueError as e:
        raise ValueError(f"sweep file {path}: {e}") from None


@dataclass
class TrialSummary:
    trial_id: str
    status: str                        # completed | pruned | failed | pending
    steps: int                         # optimizer steps trained (last report)
    loss: float | None                 # metric at the last report
    values: dict[str, Any]             # the searched values
    reason: str | None = None          # failed: why
    run_id: str | None = None          # MLflow child run
    curve: dict[int, float] = field(default_factory=dict)  # step -> metric at each report


@dataclass
class SweepResult:
    output: Path
    run_id: str                        # MLflow parent run
    best: TrialSummary | None
    best_config: Path | None           # best.json
    trials: list[TrialSummary]

    @property
    def steps_used(self) -> int:
        return sum(t.steps for t in self.trials)


# ---------------------------------------------------------------------------------------------------------------
# Planning (driver side, before anything starts)


@dataclass
class _Plan:
    """What every trial needs, shipped to the trial actors with ``tune.with_parameters``."""
    base: dict[str, Any]               # the user's base PretrainConfig (to_dict)
    output: str                        # sweep dir
    name: str
    parent_run_id: str
    tracking_uri: str
    experiment_id: str
    report_every: int                  # checkpoint/report cadence (the rung interval)
    max_failures: int
    metric: str
    parents: dict[str, str]            # lineage: data/tokenizer runs
    await_decisions: bool = False      # workers wait for the scheduler's decision after each report (asha)


def sweep_paths(cfg: SweepConfig) -> tuple[Path, str]:
    """``(sweep dir, name)``, both from the config hash unless given."""
    h = config_hash(replace(cfg, output=None, name=None))
    out = Path(cfg.output) if cfg.output else tracking.work_dir() / "sweep" / h
    return out.resolve(), cfg.name or f"sweep-{cfg.base.model.size}-{h}"


def rungs(cfg: SweepConfig) -> list[int]:
    """ASHA's rung steps (ascending, below the trial length), as Tune computes them; [] for fifo."""
    sc = cfg.scheduler
    if sc.kind != "asha":
        return []
    g = grace_period(cfg)
    out, k = [], 0
    while g * sc.reduction_factor ** k < cfg.base.steps:
        out.append(g * sc.reduction_factor ** k)
        k += 1
    return out


def grace_period(cfg: SweepConfig) -> int:
    sc = cfg.scheduler
    return sc.grace_period or max(1, cfg.base.steps // sc.reduction_factor ** 2)


def validate(cfg: SweepConfig) -> list[Dimension]:
    """Every check that needs no cluster (``ValueError`` naming the problem); returns the parsed space."""
    dims = parse_search(cfg.search)
    if cfg.trials < 1:
        raise ValueError(f"trials must be >= 1, got {cfg.trials}")
    sc = cfg.scheduler
    if sc.kind not in ("asha", "fifo"):
        raise ValueError(f"scheduler.kind must be asha or fifo, got {sc.kind!r}")
    if sc.kind == "asha":
        if sc.reduction_factor < 2:
            raise ValueError(f"scheduler.reduction_factor must be >= 2, got {sc.reduction_factor}")
        if sc.grace_period is not None and not 1 <= sc.grace_period < cfg.base.steps:
            raise ValueError(f"scheduler.grace_period must be in [1, steps={cfg.base.steps}), got {sc.grace_period}")
    if cfg.max_concurrent is not None and cfg.max_concurrent < 1:
        raise ValueError(f"max_concurrent must be >= 1, got {cfg.max_concurrent}")
    if cfg.metric != "loss":
        raise ValueError(f"metric must be 'loss' (what the train loop reports), got {cfg.metric!r}")
    # Every candidate value must give a config that resolves and schedules (a whole sweep of
    # trials failing one by one on a typo is what this check prevents).
    from polyko.train.trainer import preflight

    for d in dims:
        cands = d.args if d.kind in ("choice", "grid") else d.args[:2]
        for v in cands:
            try:
                c = apply_values(cfg.base, {d.path: v}).resolved()
                lr_at(c, 0), lr_at(c, c.steps - 1)
                if c.data.path and d.path.startswith(("batch.", "scaling.", "data.", "model.")):
                    preflight(c)  # the batch splits over the workers, the data fits the model
            except ValueError as e:
                raise ValueError(f"search {d.spec()!r}: value {v!r} gives an invalid config: {e}") from None
    base = cfg.base.resolved()
    if base.optim.schedule == "wsd":
        decay_start = base.steps - max(1, round(base.steps * base.optim.decay_fraction))
        late = [r for r in rungs(cfg) if r > decay_start]
        if late:
            print(f"[polyko] WARNING: ASHA rungs {late} fall in the WSD decay phase (from step {decay_start}); "
                  "lower scheduler.grace_period or optim.decay_fraction so rungs compare stable-phase losses",
                  flush=True)
    elif sc.kind == "asha":
        print("[polyko] WARNING: ASHA with a cosine schedule compares mid-decay losses, which can rank "
              "configurations differently from their final losses; --set optim.schedule=wsd avoids it", flush=True)
    return dims


def trial_config(base: PretrainConfig, values: dict[str, Any], *, output: Path, run_name: str, report_every: int,
                 max_failures: int) -> PretrainConfig:
    """A trial's config: the base with the searched values, plus the sweep's per-trial bookkeeping."""
    cfg = apply_values(base, values)
    return replace(cfg, output=str(output), run_name=run_name, export=False,
                   checkpoint=replace(cfg.checkpoint, every_steps=report_every, keep=1, resume_from=None),
                   fault=replace(cfg.fault, max_failures=max_failures))


def best_config(base: PretrainConfig, values: dict[str, Any]) -> PretrainConfig:
    """What ``best.json`` holds: the user's base config with the winning values (no sweep bookkeeping)."""
    return replace(apply_values(base, values), output=None, run_name=None)


def concurrency(cfg: SweepConfig) -> int:
    """Trials whose workers fit the cluster at once (capped by ``max_concurrent`` and ``trials``)."""
    import ray

    res = ray.cluster_resources()
    sc = cfg.base.scaling
    workers = sc.ray_num_workers()
    n = workers[0] if isinstance(workers, tuple) else workers
    fit = int(res.get("CPU", 0) // max(1, n * sc.cpus_per_worker))
    if sc.use_gpu:
        fit = min(fit, int(res.get("GPU", 0) // n))
    if fit < 1:
        raise ValueError(f"one trial needs {n} worker(s) x {sc.cpus_per_worker} CPU{' + 1 GPU' if sc.use_gpu else ''}; "
                         f"the cluster has {res.get('CPU', 0):g} CPU, {res.get('GPU', 0):g} GPU")
    return max(1, min(fit, cfg.max_concurrent or fit, total_trials(cfg)))


def total_trials(cfg: SweepConfig) -> int:
    """Trials a sweep runs: ``trials`` samples of each point of the grid dimensions."""
    n = cfg.trials
    for d in parse_search(cfg.search):
        if d.kind == "grid":
            n *= len(d.args)
    return n


# ---------------------------------------------------------------------------------------------------------------
# The trial (runs in a Tune trial actor)


class TrialDiverged(RuntimeError):
    """The training loss became non-finite."""


def _trial_guard(out: Path, steps: int):
    """A Train callback (runs on the trial's Train controller, before ``TuneReportCallback``):

    * a report with a non-finite loss fails the run at once (a non-retryable controller error) instead of
      training on NaNs to the end;
    * the report of the last step is written to ``final.json`` before Tune sees it: Tune stops a trial as soon
      as it reports ``max_t``, so the trial function may never return from ``fit()``.
    """
    from ray.train.v2.api.callback import UserCallback

    class TrialGuard(UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            m = dict(metrics[0]) if metrics else {}
            loss = m.get("loss")
            if loss is not None and not math.isfinite(float(loss)):
                raise TrialDiverged(f"loss {loss} at step {m.get('step')}")
            if int(m.get("step", 0)) >= steps:
                final = out / FINAL_FILE
                tmp = final.with_suffix(".tmp")
                tmp.write_text(json.dumps(m))
                tmp.replace(final)

    return TrialGuard()


def classify_failure(error: BaseException) -> tuple[str, str]:
    """``(kind, message)`` for a trial's exception: diverged | oom | bad_config | error."""
    from ray.train import ControllerError, WorkerGroupError

    root: BaseException = error
    if isinstance(error, ControllerError):
        root = error.controller_failure
    elif isinstance(error, WorkerGroupError) and error.worker_failures:
        root = next(iter(error.worker_failures.values()))
    text = f"{type(root).__name__}: {root}"
    if isinstance(root, TrialDiverged) or "TrialDiverged" in text or "GuardStopped" in text:
        return "diverged", str(root).split("\n")[0][:500]
    low = text.lower()
    oom = (isinstance(root, MemoryError) or "OutOfMemory" in type(root).__name__ or "out of memory" in low
           or "low on memory" in low)  # torch/CUDA OOM, or Ray's memory monitor killing the worker
    if oom:
        return "oom", text.split("\n")[0][:500]
    if isinstance(root, ValueError):
        return "bad_config", text.split("\n")[0][:500]
    return "error", text.split("\n")[0][:500]


def _child_run(plan: _Plan, out: Path, trial_id: str, cfg: PretrainConfig, client=None) -> str:
    """The trial's MLflow child run (params = ``cfg`` flattened): created once, found again (``polyko_run.json``
    in the trial dir) on a restart. The sweep's driver creates it when Tune starts the trial (before the trial
    function runs), with the MLflow client it already has; the trial actor then only reads the marker."""
    from mlflow.tracking import MlflowClient

    client = client or MlflowClient(tracking_uri=plan.tracking_uri)
    marker = out / tracking.RUN_MARKER
    if marker.is_file():
        rid = json.loads(marker.read_text())["run_id"]
        client.update_run(rid, status="RUNNING")
        return rid
    tags = {"mlflow.parentRunId": plan.parent_run_id, "polyko.stage": STAGE, "polyko.trial_id": trial_id,
            "polyko.sweep": plan.name, "polyko.config_hash": config_hash(cfg), "polyko.output": str(out),
            "polyko.trial_status": "running", **{f"polyko.parent.{s}": r for s, r in plan.parents.items()}}
    run = client.create_run(plan.experiment_id, run_name=f"{plan.name}-{trial_id}", tags=tags)
    tracking.log_params(flatten(cfg), client=client, run_id=run.info.run_id)
    tracking.write_marker(out, STAGE, run.info.run_id, {**plan.parents, "sweep": plan.parent_run_id}, config_hash(cfg))
    return run.info.run_id


def _plan_trial_config(plan: _Plan, base: PretrainConfig, trial_id: str, values: dict[str, Any]) -> PretrainConfig:
    """The config trial ``trial_id`` of the sweep ``plan`` runs (not yet resolved)."""
    return trial_config(base, values, output=Path(plan.output) / "trials" / trial_id,
                        run_name=f"{plan.name}-{trial_id}", report_every=plan.report_every,
                        max_failures=plan.max_failures)


def _trial_run_config(plan: _Plan, base: PretrainConfig, trial_id: str, values: dict[str, Any]) -> PretrainConfig:
    """The config a trial runs (resolved), or as given when it does not resolve (recorded as ``bad_config``)."""
    cfg = _plan_trial_config(plan, base, trial_id, values)
    try:
        return cfg.resolved()
    except ValueError:
        return cfg


def run_trial(values: dict[str, Any], plan: _Plan) -> None:
    """Tune function trainable: one real Ray Train + DeepSpeed pretraining run of the trial's config."""
    import ray.train
    from ray import tune
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from polyko.train.loop import train_loop
    from polyko.train.trainer import preflight

    # Read by Tune in this process when it resets this actor for the next trial (see REUSE_WAIT_S).
    os.environ.setdefault("TUNE_FUNCTION_THREAD_TIMEOUT_S", str(REUSE_WAIT_S))
    trial_id = tune.get_context().get_trial_id()
    out = Path(plan.output) / "trials" / trial_id
    out.mkdir(parents=True, exist_ok=True)
    final = out / FINAL_FILE
    if final.is_file():  # finished before the sweep's driver died: report it again, train nothing
        tune.report(json.loads(final.read_text()))
        return
    # A restarted trial reports its steps again: the decisions on the earlier run's reports do not count.
    (out / DECISION_FILE).unlink(missing_ok=True)
    cfg = _plan_trial_config(plan, from_dict(PretrainConfig, plan.base), trial_id, values)
    run_name = cfg.run_name
    # The child run: made by the driver's callback as Tune started this trial (a trial run by another driver,
    # without it, makes its own).
    marker = _read_json(out / tracking.RUN_MARKER)
    try:
        cfg = cfg.resolved()
        preflight(cfg)
    except ValueError as e:
        if not marker:
            _child_run(plan, out, trial_id, cfg)  # recorded with the config as given
        _fail(out, "bad_config", str(e))
    run_id = marker["run_id"] if marker else _child_run(plan, out, trial_id, cfg)
    sc = cfg.scaling
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"config": to_dict(cfg), "output": str(out), "run_name": run_name, "run_id": run_id,
                           "tracking_uri": plan.tracking_uri,
                           **({"await_decision": str(out / DECISION_FILE)} if plan.await_decisions else {})},
        torch_config=TorchConfig(backend="nccl" if sc.use_gpu else "gloo", timeout_s=cfg.fault.hang_timeout_s),
        scaling_config=ray.train.ScalingConfig(num_workers=sc.ray_num_workers(), use_gpu=sc.use_gpu,
                                               resources_per_worker={"CPU": sc.cpus_per_worker}),
        run_config=ray.train.RunConfig(
            name=run_name, storage_path=str(out / "ray"),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.checkpoint.keep),
            failure_config=ray.train.FailureConfig(max_failures=cfg.fault.max_failures),
            # The guard first: a NaN report fails the run before it reaches Tune.
            callbacks=[_trial_guard(out, cfg.steps), TuneReportCallback()]),
    )
    try:
        trainer.fit()
    except Exception as e:  # noqa: BLE001 - every trial error becomes data
        if final.is_file():  # finished: the error is Tune stopping the trial after its last report
            return
        kind, msg = classify_failure(e)
        _fail(out, kind, msg)
    if final.is_file() or stopped_by_scheduler(out):  # finished, or the scheduler stopped it (pruned)
        return
    # The run ended before its last step without an error: the loop's guard stopped it.
    _fail(out, "diverged", guard_stop_reason(out) or "training ended before its last step")


def stopped_by_scheduler(out: Path) -> bool:
    """Whether the sweep's scheduler stopped the trial in ``out`` at a report (its decision file says so)."""
    return bool((_read_json(out / DECISION_FILE) or {}).get("stop"))


def guard_stop_reason(out: Path) -> str | None:
    """Why the training loop's spike/NaN guard stopped the run in ``out`` (its ``guard_events.json``), e.g.
    ``stopped at step 4: no healthy checkpoint to roll back to (first anomaly: nonfinite_loss at step 1)``."""
    from polyko.train.guard import EVENTS_FILE

    ev = _read_json(out / EVENTS_FILE)
    if not ev or not ev.get("reason") or ev["reason"] == "running":
        return None
    first = (ev.get("events") or [{}])[0]
    more = f" (first anomaly: {first['kind']} at step {first['step']})" if "kind" in first else ""
    return f"{ev['reason']}{more}"[:500]


def _fail(out: Path, kind: str, message: str) -> None:
    (out / FAILURE_FILE).write_text(json.dumps({"kind": kind, "message": message}))
    raise RuntimeError(f"trial failed ({kind}): {message}")


# ---------------------------------------------------------------------------------------------------------------
# The driver: MLflow bookkeeping and the live table


def _read_json(p: Path) -> dict[str, Any] | None:
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def release_orphaned_placement_groups() -> int:
    """Remove this job's placement groups whose creating actor is dead; returns how many.

    When Tune kills a trial actor (a trial it stops whose actor it does not reuse, a failed trial, the end of a
    sweep), it kills the trial's Train controller with it, and the controller never removes its workers'
    placement group. Train V2 leaves
    that to a detached ``PlacementGroupCleaner``, which finds the cluster through Ray's address discovery and
    fails on a host running more than one Ray cluster ("Found multiple active Ray instances"): the dead trial's
    CPUs/GPUs then stay reserved and the next trials wait forever. A placement group whose non-detached
    creator actor is dead can never be used again, so removing it here is always safe (a no-op when the
    cleaner did its job). Placement groups created by the driver itself (Tune's trial bundles) have no creator
    actor and are never touched."""
    import ray
    from ray._private.state import state
    from ray.core.generated import gcs_pb2
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    ray.util.placement_group_table()  # connects the global state accessor
    job = ray.get_runtime_context().get_job_id()
    removed = 0
    for blob in state._global_state_accessor.get_placement_group_table():
        pg = gcs_pb2.PlacementGroupTableData.FromString(blob)
        creator = pg.creator_actor_id
        if (pg.is_detached or not pg.creator_actor_dead or not creator or creator == b"\xff" * len(creator)
                or pg.creator_job_id.hex() != job or pg.state == gcs_pb2.PlacementGroupTableData.REMOVED):
            continue
        remove_placement_group(PlacementGroup(ray.PlacementGroupID(pg.placement_group_id)))
        removed += 1
    return removed


def _make_callback(plan: _Plan, steps: int, keys: list[str], keep_checkpoints: bool):
    from mlflow.tracking import MlflowClient
    from ray.tune import Callback

    out, tracking_uri, release = Path(plan.output), plan.tracking_uri, plan.await_decisions
    base = from_dict(PretrainConfig, plan.base)

    class SweepCallback(Callback):
        """Driver side: opens each trial's child run as it starts and closes it with its status, lets a trial
        ASHA keeps go on past its report (:data:`DECISION_FILE`), prints the live trial table."""

        def __init__(self):
            self.last_print = self.last_release = 0.0
            self._client = None

        @property
        def client(self) -> MlflowClient:  # one store connection for the whole sweep, made on first use
            if self._client is None:
                self._client = MlflowClient(tracking_uri=tracking_uri)
            return self._client

        def __getstate__(self):  # Tune pickles its callbacks with the sweep's state: not the connection
            return {**self.__dict__, "_client": None}

        def on_trial_start(self, iteration, trials, trial, **info):
            # Here, not in the trial actor: Tune calls this before it runs the trial function, and this process
            # already holds MLflow (an import and a store connection less per trial).
            if (out / "trials" / trial.trial_id / FINAL_FILE).is_file():
                return  # finished before a restart: only re-reported
            cfg = _trial_run_config(plan, base, trial.trial_id, trial.config)
            _child_run(plan, out / "trials" / trial.trial_id, trial.trial_id, cfg, client=self.client)

        def _finish(self, trial, status: str, reason: dict | None = None) -> None:
            marker = _read_json(out / "trials" / trial.trial_id / tracking.RUN_MARKER)
            if not marker:
                return
            client, rid = self.client, marker["run_id"]
            client.set_tag(rid, "polyko.trial_status", status)
            if reason:
                client.set_tag(rid, "polyko.failure", f"{reason['kind']}: {reason['message']}"[:5000])
            last = trial.last_result or {}
            if "step" in last:
                client.log_metric(rid, "trial_steps", float(last["step"]))
            client.set_terminated(rid, status={"completed": "FINISHED", "pruned": "KILLED"}.get(status, "FAILED"))
            if not keep_checkpoints:  # a finished trial never resumes: its ~16 B/param checkpoint is dead weight
                shutil.rmtree(out / "trials" / trial.trial_id / "ray", ignore_errors=True)

        def on_step_end(self, iteration, trials, **info):
            if time.time() - self.last_release > 2:
                self.last_release = time.time()
                release_orphaned_placement_groups()

        def on_trial_result(self, iteration, trials, trial, result, **info):
            # Tune calls this after its scheduler decided on the result, with done=True when it stops the
            # trial (or the trial reached its last step, where its workers do not wait): a trial that goes on
            # is let past its report, a stopped one ends its loop there.
            if release and "step" in result:
                d = out / "trials" / trial.trial_id
                tmp = d / (DECISION_FILE + ".tmp")
                tmp.write_text(json.dumps({"step": int(result["step"]), "stop": bool(result.get("done"))}))
                tmp.replace(d / DECISION_FILE)
            if time.time() - self.last_print > 10:
                self.last_print = time.time()
                rows = [_summary(t, out, steps, result if t is trial else None) for t in trials]
                print(render_table(rows, keys), flush=True)

        def on_trial_complete(self, iteration, trials, trial, **info):
            step = (trial.last_result or {}).get("step", 0)
            self._finish(trial, "completed" if step >= steps else "pruned")

        def on_trial_error(self, iteration, trials, trial, **info):
            reason = _read_json(out / "trials" / trial.trial_id / FAILURE_FILE) or \
                {"kind": "error", "message": str(getattr(trial, "error_msg", "") or "trial actor died")[:500]}
            self._finish(trial, "failed", reason)
            print(f"[polyko] trial {trial.trial_id} failed ({reason['kind']}): {reason['message']}", flush=True)

    return SweepCallback()


def _summary(trial_or_result, out: Path, steps: int, latest: dict | None = None) -> TrialSummary:
    """A row of the trial table from a live Tune ``Trial`` (``latest``: a result it has not stored yet) or a
    finished ``tune.Result``."""
    if hasattr(trial_or_result, "trial_id"):  # Trial
        t = trial_or_result
        tid, last, values, state = t.trial_id, latest or t.last_result or {}, t.config, t.status
        failed = state == "ERROR"
    else:  # Result
        r = trial_or_result
        last, values = r.metrics or {}, r.config or {}  # no config: a trial an interrupted sweep never started
        tid = Path(r.path).name  # trial_dirname_creator: the trial id
        failed, state = r.error is not None, "TERMINATED"
    step = int(last.get("step", 0) or 0)
    loss = last.get("loss")
    d = out / "trials" / tid
    if failed:
        status = "failed"
    elif state == "TERMINATED":
        status = "completed" if step >= steps else "pruned"
    else:
        status = state.lower()
    fail = _read_json(d / FAILURE_FILE) if failed else None
    marker = _read_json(d / tracking.RUN_MARKER)
    return TrialSummary(trial_id=tid, status=status, steps=step, loss=None if loss is None else float(loss),
                        values={k: values.get(k) for k in values},
                        reason=f"{fail['kind']}: {fail['message']}" if fail else None,
                        run_id=marker["run_id"] if marker else None)


def render_table(rows: list[TrialSummary], keys: list[str]) -> str:
    head = ["trial", "state", "steps", "loss"] + keys
    lines = [" | ".join(head)]
    for r in sorted(rows, key=lambda r: (r.loss is None or not math.isfinite(r.loss), r.loss or 0.0)):
        vals = [f"{r.values.get(k):.4g}" if isinstance(r.values.get(k), float) else str(r.values.get(k))
                for k in keys]
        loss = "—" if r.loss is None else f"{r.loss:.4f}"
        state = r.status + (f" ({r.reason[:60]})" if r.reason else "")
        lines.append(" | ".join([r.trial_id, state, str(r.steps), loss] + vals))
    return "\n".join(lines)


def _parent_run(cfg: SweepConfig, out: Path, name: str, parents: dict[str, str]):
    """The sweep's MLflow parent run: created once, resumed (same id) when the sweep is rerun."""
    import mlflow

    exp_id = tracking.get_or_create_experiment(tracking.experiment_name(STAGE))
    marker = _read_json(out / tracking.RUN_MARKER)
    if marker and marker.get("stage") == STAGE:
        run = mlflow.start_run(run_id=marker["run_id"])
        return run, exp_id
    tags = {"polyko.stage": STAGE, "polyko.config_hash": config_hash(cfg), "polyko.output": str(out),
            **{f"polyko.parent.{s}": r for s, r in parents.items()}}
    if parents:
        tags["mlflow.note.content"] = "Produced from: " + ", ".join(f"{s} run {r}" for s, r in sorted(parents.items()))
    run = mlflow.start_run(experiment_id=exp_id, run_name=name, tags=tags)
    tracking.log_params(flatten(cfg))
    tracking.write_marker(out, STAGE, run.info.run_id, parents, config_hash(cfg))
    return run, exp_id


def sweep(cfg: SweepConfig, *, ray_address: str | None = None) -> SweepResult:
    """Run (or resume) a sweep; see the module docstring. Joins ``ray_address``/``$RAY_ADDRESS`` or starts a
    local cluster. Bad specs are a ``ValueError`` before any trial starts."""
    dims = validate(cfg)
    from polyko.train.data import resolve_tokens_dir
    from polyko.train.trainer import preflight

    preflight(cfg.base.resolved())   # data and tokenizer exist and match, batch splits
    out, name = sweep_paths(cfg)
    out.mkdir(parents=True, exist_ok=True)
    # Tune saves its experiment state at most this often; short, so a killed driver loses little.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")
    # Tune's default loggers, less TensorBoard's: the CSV/JSON results are what its result grid reads (passed
    # below); TensorBoard event files duplicate the MLflow curves and cost a tensorboardX import and a write
    # per report.
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")

    import mlflow
    from ray import tune

    from polyko.cluster import init_ray

    init_ray(ray_address)
    k = concurrency(cfg)
    steps = cfg.base.steps
    report_every = grace_period(cfg) if cfg.scheduler.kind == "asha" else min(cfg.base.checkpoint.every_steps, steps)
    parents = tracking.lineage(resolve_tokens_dir(cfg.base.data.path), cfg.base.data.tokenizer)
    keys = [d.path for d in dims]
    run, exp_id = _parent_run(cfg, out, name, parents)
    try:
        print(f"[polyko] sweep {name}: {total_trials(cfg)} trials, {cfg.scheduler.kind}"
              f"{' rungs ' + str(rungs(cfg)) if cfg.scheduler.kind == 'asha' else ''}, {k} at a time; "
              f"{tracking.run_url(run)}; output {out}", flush=True)
        plan = _Plan(base=to_dict(cfg.base), output=str(out), name=name, parent_run_id=run.info.run_id,
                     tracking_uri=tracking.tracking_uri(), experiment_id=exp_id, report_every=report_every,
                     max_failures=cfg.trial_max_failures, metric=cfg.metric, parents=parents,
                     await_decisions=cfg.scheduler.kind == "asha")
        trainable = tune.with_resources(tune.with_parameters(run_trial, plan=plan), TRIAL_DRIVER_RESOURCES)
        storage = out / "tune"
        callback = _make_callback(plan, steps, keys, cfg.keep_checkpoints)
        if tune.Tuner.can_restore(str(storage)):
            print(f"[polyko] resuming sweep from {storage}", flush=True)
            tuner = tune.Tuner.restore(str(storage), trainable=trainable, resume_unfinished=True,
                                       resume_errored=False, restart_errored=False)
        else:
            if cfg.scheduler.kind == "asha":
                from polyko.sweep.asha import RecheckedASHA

                asha = RecheckedASHA if cfg.scheduler.recheck else tune.schedulers.ASHAScheduler
                scheduler = asha(time_attr="step", max_t=steps, grace_period=grace_period(cfg),
                                 reduction_factor=cfg.scheduler.reduction_factor)
            else:
                scheduler = tune.schedulers.FIFOScheduler()
            tuner = tune.Tuner(
                trainable, param_space=param_space(dims),
                tune_config=tune.TuneConfig(
                    metric=cfg.metric, mode="min", scheduler=scheduler, num_samples=cfg.trials,
                    trial_dirname_creator=_trial_dirname, reuse_actors=REUSE_ACTORS,
                    # (max_concurrent_trials is ignored with a generator: the limit goes here)
                    search_alg=tune.search.BasicVariantGenerator(random_state=cfg.seed, max_concurrent=k)),
                run_config=tune.RunConfig(
                    name="tune", storage_path=str(out), verbose=0, failure_config=tune.FailureConfig(max_failures=0),
                    callbacks=[callback, tune.logger.CSVLoggerCallback(), tune.logger.JsonLoggerCallback()]))
        grid = tuner.fit()
        trials = [_summary(r, out, steps) for r in grid]
        for t in trials:
            t.curve = _curve(out / "trials" / t.trial_id)
        done = [t for t in trials if t.status == "completed" and t.loss is not None and math.isfinite(t.loss)]
        best = min(done, key=lambda t: t.loss) if done else None
        print(render_table(trials, keys), flush=True)
        best_path = None
        counts = {s: sum(t.status == s for t in trials) for s in ("completed", "pruned", "failed")}
        mlflow.log_metrics({f"trials_{s}": float(n) for s, n in counts.items()})
        mlflow.log_metric("steps_used", float(sum(t.steps for t in trials)))
        (out / "trials.json").write_text(json.dumps([t.__dict__ for t in trials], indent=2, default=str))
        mlflow.log_artifact(str(out / "trials.json"))
        if best is not None:
            best_cfg = best_config(cfg.base, best.values)
            best_path = out / "best.json"
            best_path.write_text(json.dumps(to_dict(best_cfg), indent=2))
            mlflow.log_metric("best_loss", best.loss)
            mlflow.set_tags({"polyko.best_trial": best.trial_id, "polyko.best_run": best.run_id or "",
                             **{f"polyko.best.{k}": str(v) for k, v in best.values.items()}})
            mlflow.log_artifact(str(best_path))
            print(f"[polyko] best trial {best.trial_id}: loss {best.loss:.4f} with "
                  f"{', '.join(f'{k}={v}' for k, v in best.values.items())}; full config {best_path}", flush=True)
        else:
            print("[polyko] no trial completed: no best.json", flush=True)
    except BaseException:
        mlflow.end_run("FAILED")  # the rerun resumes it (same run id)
        raise
    mlflow.end_run()
    return SweepResult(output=out, run_id=run.info.run_id, best=best, best_config=best_path, trials=trials)


def _trial_dirname(trial) -> str:
    return trial.trial_id


def _curve(trial_dir: Path) -> dict[int, float]:
    from polyko.train.metrics import read_jsonl

    return {s: m["loss"] for s, m in read_jsonl(trial_dir / "metrics.jsonl").items() if "loss" in m}
