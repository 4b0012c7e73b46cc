"""Run health: the loss-spike / NaN guard of the pretraining loop, as a component the loop calls once per
optimizer step, between the last micro-batch's backward and the optimizer step.

What counts as an **anomaly**: a non-finite loss or gradient norm, or a loss or gradient-norm z-score above
``sigma`` over a rolling window of the last ``window`` healthy steps (the test is off until the window holds
``warmup`` values). Anomalous values never enter the window, so a spike does not widen the band that should
catch the next one (OLMo-core and Levanter use the same 6-sigma / 128-step rule).

The action **ladder**:

1. ``skip``: no parameter or optimizer-state update (:func:`skip_step`); the step's samples are consumed and
   recorded in the event log.
2. ``rollback``: after ``max_consecutive`` anomalies in a row, or as soon as a parameter is non-finite: reload
   the newest *healthy* checkpoint (:func:`rollback_target`), skip the data window from that checkpoint's
   position to the end of the first anomalous batch plus ``skip_margin`` samples (exact, in global sample
   positions: :meth:`Guard.sample_offset` is added to every step's position from then on), and re-warm the
   learning rate over ``rewarmup_steps`` (:meth:`Guard.lr_scale`). PaLM's team did this by hand, restarting
   ~100 steps before a spike and skipping 200-500 batches (arXiv 2204.02311, section 5.1).
3. ``stop``: the rollback after ``max_rollbacks`` is not taken; the run ends with :meth:`Guard.report`.

Cost: :meth:`Guard.observe` takes the loss and gradient norm as (device) tensors and reads them with ONE
``tolist()``, which replaces the loop's own ``loss.item()``: no host-device synchronisation is added. The
statistics are a few hundred floats on the host. :func:`grad_norm` reads every gradient once (what clipping
does anyway), ~1 ms for 1.3B parameters on a current GPU.

State (:meth:`Guard.state_dict`) is plain JSON and restores exactly, so a resumed guarded run makes the same
decisions as an uninterrupted one; :meth:`Guard.checkpoint_meta` is what a checkpoint's metadata records as
its health. On a CPU everything here runs as is (tests/test_guard.py drives a real DeepSpeed engine).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

STATE_VERSION = 1
# MLflow metric names (cumulative counts, logged at the training step).
METRIC_ANOMALIES = "guard/anomalies"
METRIC_SKIPPED = "guard/skipped_steps"
METRIC_ROLLBACKS = "guard/rollbacks"
EVENTS_FILE = "guard_events.json"
# Reported with every checkpoint: Ray Train's retention keeps the ``num_to_keep`` checkpoints with the highest
# score (and always the latest), so ranking by this keeps the newest healthy ones through any bad streak.
RETENTION_SCORE = "guard_health_score"

ACTIONS = ("step", "skip", "rollback", "stop")


@dataclass
class GuardConfig:
    """Loss-spike / NaN guard (see module doc). Units: steps are optimizer steps, samples are sequences."""

    # Off: every step is applied and nothing is checked (observe() still returns the host values).
    enabled: bool = True
    # z-score (standard deviations above the rolling mean) of loss or grad norm that is an anomaly.
    sigma: float = 6.0
    # Healthy steps in the rolling window the mean and standard deviation are taken over.
    window: int = 128
    # The z-score test is off until the window holds this many healthy steps (non-finite values count always).
    warmup: int = 20
    # Anomalies in a row that turn skipping into a rollback.
    max_consecutive: int = 3
    # Samples skipped after the first anomalous batch, on top of the window from the rollback checkpoint to
    # the end of that batch (PaLM skipped 200-500 batches: skip_margin = 200 * global batch).
    skip_margin: int = 0
    # Steps over which the learning rate climbs linearly back to the schedule after a rollback (0 = none).
    rewarmup_steps: int = 20
    # Rollbacks a run may take; the next one stops the run with a report.
    max_rollbacks: int = 3
    # z-loss coefficient (PaLM, OLMo: 1e-4): adds coef * mean(logsumexp(logits)^2) to the loss, keeping the
    # softmax normaliser near 0. Polyglot-Ko (GPT-NeoX recipe) trained without it, hence 0 = off.
    z_loss: float = 0.0

    def __post_init__(self) -> None:
        if not self.sigma > 0:
            raise ValueError(f"guard.sigma must be > 0, got {self.sigma}")
        if self.window < 2:
            raise ValueError(f"guard.window must be >= 2 steps, got {self.window}")
        if not 2 <= self.warmup <= self.window:
            raise ValueError(f"guard.warmup must be in [2, guard.window={self.window}], got {self.warmup}")
        if self.max_consecutive < 1:
            raise ValueError(f"guard.max_consecutive must be >= 1, got {self.max_consecutive}")
        if self.skip_margin < 0 or self.rewarmup_steps < 0 or self.max_rollbacks < 0:
            raise ValueError("guard.skip_margin, guard.rewarmup_steps and guard.max_rollbacks must be >= 0, got "
                             f"{self.skip_margin}, {self.rewarmup_steps}, {self.max_rollbacks}")
        if self.z_loss < 0:
            raise ValueError(f"guard.z_loss must be >= 0, got {self.z_loss}")


@dataclass(frozen=True)
class Decision:
    """What the loop does with this step. ``loss``/``grad_norm`` are the host values (log them)."""

    action: str  # "step" | "skip" | "rollback" | "stop"
    loss: float
    grad_norm: float
    anomaly: str | None = None  # spike_loss, spike_grad_norm, nonfinite_loss, nonfinite_grad_norm, nonfinite_params
    statistic: float | None = None  # the z-score of a spike, else the offending value


@dataclass(frozen=True)
class RollbackPlan:
    """Where a rollback resumes: checkpoint ``step``; global sample positions ``[skip_start, skip_end)`` are
    never trained on; from ``step`` on, step ``s`` reads positions from ``s * global_batch + sample_offset``."""

    step: int
    skip_start: int
    skip_end: int
    sample_offset: int


class GuardStopped(RuntimeError):
    """The run hit ``max_rollbacks`` (or had nothing healthy to roll back to). ``report`` lists every event."""

    def __init__(self, report: dict[str, Any]):
        super().__init__(report["reason"])
        self.report = report


def _num(v: float) -> float | str:
    """A JSON-safe float: non-finite values as strings ("nan", "inf") so the files stay strict JSON."""
    return v if math.isfinite(v) else str(v)


def _host_values(*xs: Any) -> list[float]:
    """Host floats of tensors and numbers, with one device->host copy for all the tensors together."""
    tensors = [(i, x) for i, x in enumerate(xs) if hasattr(x, "detach")]
    out = [float(x) if not hasattr(x, "detach") else 0.0 for x in xs]
    if tensors:
        import torch

        vals = torch.stack([x.detach().reshape(()).to(torch.float64) for _, x in tensors]).tolist()  # the one sync
        for (i, _), v in zip(tensors, vals):
            out[i] = v
    return out


class _Window:
    """The last ``n`` healthy values, in order; mean and standard deviation summed in that order
    (deterministic: the same values give the same bits)."""

    def __init__(self, n: int, values: Sequence[float] = ()):
        self.n = n
        self.values = list(values)[-n:]

    def push(self, v: float) -> None:
        self.values.append(v)
        if len(self.values) > self.n:
            del self.values[0]

    def z(self, v: float) -> float:
        k = len(self.values)
        mean = sum(self.values) / k
        std = math.sqrt(sum((x - mean) ** 2 for x in self.values) / (k - 1))
        # Floor: a flat stream (std ~ 0) must not make a 0.1% rise a 6-sigma event.
        return (v - mean) / max(std, 1e-3 * abs(mean), 1e-12)


class Guard:
    """The guard's state machine. One per training process; every rank sees the same all-reduced loss and
    global grad norm, so every rank takes the same decision without communicating."""

    def __init__(self, cfg: GuardConfig, global_batch: int):
        if global_batch < 1:
            raise ValueError(f"global_batch must be >= 1, got {global_batch}")
        self.cfg = cfg
        self.global_batch = global_batch
        self._loss = _Window(cfg.window)
        self._gnorm = _Window(cfg.window)
        self.streak = 0  # anomalies in a row
        self.streak_first_end: int | None = None  # sample position just after the streak's first batch
        self.anomalies = 0
        self.skipped_steps = 0
        self.rollbacks = 0
        self.sample_offset = 0
        self.rewarm_from: int | None = None
        self.skip_ranges: list[list[int]] = []
        self.events: list[dict[str, Any]] = []

    # --- per step ----------------------------------------------------------------------------------------
    def position(self, step: int) -> int:
        """Global sample position where optimizer step ``step`` starts reading."""
        return step * self.global_batch + self.sample_offset

    def lr_scale(self, step: int) -> float:
        """Factor on the scheduled learning rate: linear re-warmup after a rollback, else 1."""
        if self.rewarm_from is None or self.cfg.rewarmup_steps == 0 or step < self.rewarm_from:
            return 1.0
        return min(1.0, (step - self.rewarm_from + 1) / self.cfg.rewarmup_steps)

    def observe(self, step: int, loss: Any, grad_norm: Any, params_nonfinite: Any = 0) -> Decision:
        """Decide step ``step`` (0-based) from its mean loss, global grad norm (before clipping) and the
        count of non-finite parameter values (tensors or numbers; read with one host copy)."""
        loss_v, gn_v, bad_params = _host_values(loss, grad_norm, params_nonfinite)
        if not self.cfg.enabled:
            return Decision("step", loss_v, gn_v)
        kind, stat = None, None
        if bad_params != 0:
            kind, stat = "nonfinite_params", bad_params
        elif not math.isfinite(loss_v):
            kind, stat = "nonfinite_loss", loss_v
        elif not math.isfinite(gn_v):
            kind, stat = "nonfinite_grad_norm", gn_v
        elif len(self._loss.values) >= self.cfg.warmup:
            z_loss, z_gn = self._loss.z(loss_v), self._gnorm.z(gn_v)
            if z_loss > self.cfg.sigma:
                kind, stat = "spike_loss", z_loss
            elif z_gn > self.cfg.sigma:
                kind, stat = "spike_grad_norm", z_gn
        if kind is None:
            self._loss.push(loss_v)
            self._gnorm.push(gn_v)
            self.streak, self.streak_first_end = 0, None
            return Decision("step", loss_v, gn_v)

        self.anomalies += 1
        self.streak += 1
        start = self.position(step)
        if self.streak_first_end is None:
            self.streak_first_end = start + self.global_batch
        if kind == "nonfinite_params" or self.streak >= self.cfg.max_consecutive:
            action = "rollback" if self.rollbacks < self.cfg.max_rollbacks else "stop"
        else:
            action = "skip"
            self.skipped_steps += 1
        self.events.append({"step": step, "kind": kind, "statistic": _num(stat), "loss": _num(loss_v),
                            "grad_norm": _num(gn_v), "action": action, "samples": [start, start + self.global_batch],
                            "streak": self.streak})
        return Decision(action, loss_v, gn_v, kind, stat)

    # --- rollback / stop ---------------------------------------------------------------------------------
    def on_rollback(self, target_meta: dict[str, Any]) -> RollbackPlan:
        """Switch to the checkpoint ``target_meta`` (the metadata of :func:`rollback_target`'s choice) after a
        ``rollback`` decision. Statistics come back from the checkpoint; counts, events and skipped ranges
        stay. Returns where to resume and which positions are skipped."""
        assert self.streak_first_end is not None, "on_rollback() without a rollback decision"
        target = _guard_state(target_meta)
        step = int(target_meta["step"])
        skip_start = step * self.global_batch + int(target.get("sample_offset", 0))
        skip_end = max(skip_start, self.streak_first_end + self.cfg.skip_margin)
        self._loss = _Window(self.cfg.window, target.get("window_loss", ()))
        self._gnorm = _Window(self.cfg.window, target.get("window_grad_norm", ()))
        self.streak, self.streak_first_end = 0, None
        self.rollbacks += 1
        self.sample_offset = skip_end - step * self.global_batch
        self.rewarm_from = step
        self.skip_ranges.append([skip_start, skip_end])
        self.events[-1].update({"rollback_to": step, "skipped_range": [skip_start, skip_end]})
        for e in self.events:  # steps after the target are undone: their batches are skipped or re-read
            if e["step"] >= step:
                e.setdefault("undone_by_rollback", len(self.skip_ranges))
        return RollbackPlan(step, skip_start, skip_end, self.sample_offset)

    def not_trained_on(self) -> list[list[int]]:
        """Sorted, merged ``[start, end)`` sample-position ranges the weights never learnt from: every rollback
        window and every skipped step's batch that no rollback undid (an undone step's batch lies in the
        window or is read again after it)."""
        spans = sorted([list(r) for r in self.skip_ranges] +
                       [list(e["samples"]) for e in self.events if "undone_by_rollback" not in e])
        merged: list[list[int]] = []
        for a, b in spans:
            if merged and a <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], b)
            else:
                merged.append([a, b])
        return merged

    def report(self, reason: str) -> dict[str, Any]:
        """Everything that happened: counts, rollback windows, what was never trained on, every event."""
        return {"reason": reason, "anomalies": self.anomalies, "skipped_steps": self.skipped_steps,
                "rollbacks": self.rollbacks, "skip_ranges": [list(r) for r in self.skip_ranges],
                "not_trained_on": self.not_trained_on(), "events": [dict(e) for e in self.events],
                "config": asdict(self.cfg)}

    def stop(self, reason: str) -> GuardStopped:
        """The exception to end the run with (write :meth:`report` first; do not let Ray retry it)."""
        return GuardStopped(self.report(reason))

    # --- logging -----------------------------------------------------------------------------------------
    def metrics(self) -> dict[str, float]:
        """Cumulative counts under their MLflow names, for the step's metrics."""
        return {METRIC_ANOMALIES: float(self.anomalies), METRIC_SKIPPED: float(self.skipped_steps),
                METRIC_ROLLBACKS: float(self.rollbacks)}

    def write_events(self, path: str | os.PathLike, reason: str = "running") -> Path:
        """The event log as a JSON file (atomic replace), e.g. ``<run>/guard_events.json``; log it to MLflow
        as an artifact."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.tmp")
        tmp.write_text(json.dumps(self.report(reason), indent=2, allow_nan=False))
        tmp.replace(p)
        return p

    # --- state -------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Plain JSON (floats round-trip exactly through ``json``)."""
        return {"version": STATE_VERSION, "global_batch": self.global_batch,
                "window_loss": list(self._loss.values), "window_grad_norm": list(self._gnorm.values),
                "streak": self.streak, "streak_first_end": self.streak_first_end, "anomalies": self.anomalies,
                "skipped_steps": self.skipped_steps, "rollbacks": self.rollbacks,
                "sample_offset": self.sample_offset, "rewarm_from": self.rewarm_from,
                "skip_ranges": [list(r) for r in self.skip_ranges], "events": [dict(e) for e in self.events]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"guard state version {state.get('version')!r}, expected {STATE_VERSION}")
        if state["global_batch"] != self.global_batch:
            # Positions are counted in samples, so another global batch would shift every later step.
            raise ValueError(f"guard state was saved at global batch {state['global_batch']}, now "
                             f"{self.global_batch}: the skipped sample ranges would not line up")
        self._loss = _Window(self.cfg.window, state["window_loss"])
        self._gnorm = _Window(self.cfg.window, state["window_grad_norm"])
        self.streak, self.streak_first_end = state["streak"], state["streak_first_end"]
        self.anomalies, self.skipped_steps = state["anomalies"], state["skipped_steps"]
        self.rollbacks, self.sample_offset = state["rollbacks"], state["sample_offset"]
        self.rewarm_from = state["rewarm_from"]
        self.skip_ranges = [list(r) for r in state["skip_ranges"]]
        self.events = [dict(e) for e in state["events"]]

    def checkpoint_meta(self, params_finite: bool) -> dict[str, Any]:
        """The ``guard`` entry of a checkpoint's metadata: its health at save time and the state to resume.
        Healthy = every parameter finite and no anomaly streak open."""
        return {"healthy": bool(params_finite) and self.streak == 0, "streak": self.streak,
                "params_finite": bool(params_finite), "state": self.state_dict()}


def _guard_state(meta: dict[str, Any]) -> dict[str, Any]:
    return (meta.get("guard") or {}).get("state") or {}


def is_rollback_target(meta: dict[str, Any]) -> bool:
    """A checkpoint the guard may roll back to: saved healthy. One without guard metadata (guard off)
    counts as healthy when its recorded loss is finite."""
    g = meta.get("guard")
    if g is not None:
        return bool(g.get("healthy"))
    loss = meta.get("loss")
    return isinstance(loss, (int, float)) and math.isfinite(loss)


def rollback_target(checkpoints: Iterable[tuple[Any, dict[str, Any]]], before_step: int | None = None
                    ) -> tuple[Any, dict[str, Any]] | None:
    """The newest healthy checkpoint (at or before ``before_step``) of ``(path, meta)`` pairs, or None."""
    ok = [(p, m) for p, m in checkpoints if is_rollback_target(m) and (before_step is None or m["step"] <= before_step)]
    return max(ok, key=lambda pm: pm[1]["step"]) if ok else None


def health_score(step: int, healthy: bool) -> float:
    """Value of :data:`RETENTION_SCORE` for a checkpoint: its step when healthy, else -1 (ranked last).
    For ``CheckpointConfig(num_to_keep=keep, checkpoint_score_attribute=RETENTION_SCORE,
    checkpoint_score_order="max")``."""
    return float(step) if healthy else -1.0


def retention(checkpoints: Iterable[tuple[Any, dict[str, Any]]], keep: int) -> list[Any]:
    """Paths retention may delete: all but the ``keep`` newest AND the newest healthy one (a run that has
    gone bad keeps something to roll back to however many poisoned checkpoints follow)."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    ordered = sorted(checkpoints, key=lambda pm: pm[1]["step"], reverse=True)
    kept = {id(pm) for pm in ordered[:keep]}
    healthy = next((pm for pm in ordered if is_rollback_target(pm[1])), None)
    if healthy is not None:
        kept.add(id(healthy))
    return [p for pm in ordered if id(pm) not in kept for p in (pm[0],)]


# --- model-side pieces (torch / DeepSpeed; imported lazily) -------------------------------------------------
def z_loss_term(logits: Any, coef: float) -> Any:
    """``coef * mean(logsumexp(logits, -1) ** 2)`` (PaLM's auxiliary loss), in fp32."""
    import torch

    return coef * torch.logsumexp(logits.float(), dim=-1).pow(2).mean()


def grad_norm(engine) -> Any:
    """Global L2 norm (device tensor, before clipping) of the gradients the next ``engine.step()`` applies.
    Call at the gradient-accumulation boundary, after the last ``engine.backward``: the gradients are
    reduced then. The same number DeepSpeed computes inside the step (tested at ZeRO 0 and 2)."""
    import torch

    opt = engine.optimizer
    cls = _optimizer_kind(opt)
    if cls == "zero12":
        # ZeRO-1/2: this rank's reduced partition; DeepSpeed's own helper all-reduces the squares.
        return opt.scaled_global_norm() / opt.loss_scale
    if cls == "zero3":
        from deepspeed.runtime.utils import combine_grad_norm_groups

        return combine_grad_norm_groups(opt._get_norm_groups()) / opt.loss_scale
    if cls == "bf16":
        from deepspeed.runtime.utils import get_global_norm_of_tensors

        n = get_global_norm_of_tensors(opt.get_grads_for_norm()[0], mpu=opt.mpu)
        n = n if torch.is_tensor(n) else torch.tensor(float(n))
        return torch.where(n >= 0, n, torch.full_like(n, math.inf))  # DeepSpeed reports a non-finite norm as -1
    # ZeRO-0: every rank holds the whole all-reduced gradient on the module's parameters.
    grads = [p.grad.detach() for p in engine.module.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros((), dtype=torch.float32)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))


def boundary_step(guard: Guard, engine, step: int, loss: Any) -> Decision:
    """The loop's last ``engine.step()`` of optimizer step ``step``, under the guard: ``loss`` is the step's
    all-reduced mean loss (a device tensor, not yet read). Applies the step, or skips it for ``skip``,
    ``rollback`` and ``stop`` (the caller then rolls back or stops). One host read in all."""
    if not guard.cfg.enabled:
        engine.step()
        gn = engine.get_global_grad_norm()
        loss_v, gn_v = _host_values(loss, gn if gn is not None else math.nan)
        return Decision("step", loss_v, gn_v)
    opt = engine.optimizer
    reuse = _optimizer_kind(opt) == "zero12" and not getattr(opt, "cpu_offload", False)
    if reuse:
        # ZeRO-1/2 computes this same norm again inside the step (for overflow and clipping), from the same
        # gradients: hand it the value already computed (identical bits) instead of a second pass over them
        # (~5 % of a 50m CPU step).
        scaled = opt.scaled_global_norm()
        gn = scaled / opt.loss_scale
    else:
        gn = grad_norm(engine)
    d = guard.observe(step, loss, gn, params_nonfinite(engine))
    if d.action != "step":
        skip_step(engine)
    elif reuse:
        with _patched(opt, {"scaled_global_norm": lambda norm_type=2: scaled}):
            engine.step()
    else:
        engine.step()
    return d


def params_nonfinite(engine) -> Any:
    """Device tensor: 1 if any parameter value of the model is NaN/inf, else 0 (ZeRO 0-2 hold every parameter on
    every rank; at ZeRO-3 each rank checks its partition and the flags are all-reduced).

    One fp32 sum per parameter instead of an elementwise ``isfinite``: NaN and inf propagate through a sum (inf - inf
    is NaN), and a sum of finite weights cannot overflow fp32. That reads the weights once and allocates nothing
    per element: ~25 ms for 56M parameters on one CPU thread where ``isfinite(...).sum()`` took ~400 ms, and on a
    GPU a bandwidth-bound pass (~1 ms per GB of weights)."""
    import torch

    ps = list(engine.module.parameters())
    zero3 = _optimizer_kind(engine.optimizer) == "zero3"
    if not ps:
        return torch.zeros((), dtype=torch.int64)
    total = torch.stack([(p.ds_tensor if zero3 else p.detach()).sum(dtype=torch.float32) for p in ps]).sum()
    n = (~torch.isfinite(total)).to(torch.int64)
    if zero3:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.all_reduce(n)
    return n


def _optimizer_kind(opt) -> str:
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if isinstance(opt, DeepSpeedZeroOptimizer):
        return "zero12"
    if isinstance(opt, DeepSpeedZeroOptimizer_Stage3):
        return "zero3"
    if isinstance(opt, BF16_Optimizer):
        return "bf16"
    return "plain"  # a torch optimizer, or DeepSpeed's FP16_Optimizer (ZeRO-0 with bf16/fp16 weights)


@contextlib.contextmanager
def _patched(obj: Any, attrs: dict[str, Any]) -> Iterator[None]:
    saved = {k: obj.__dict__[k] for k in attrs if k in obj.__dict__}
    try:
        for k, v in attrs.items():
            setattr(obj, k, v)
        yield
    finally:
        for k in attrs:
            if k in saved:
                setattr(obj, k, saved[k])
            else:
                delattr(obj, k)


def skip_step(engine) -> None:
    """Call instead of the boundary ``engine.step()``: the step is taken WITHOUT updating anything.

    Parameters, optimizer state (Adam moments and step count), loss scale and learning-rate scheduler stay
    bit-identical; the gradients and DeepSpeed's partitioned-gradient buffers are cleared exactly as after a
    real step; the engine's step counters advance and ``engine.skipped_steps`` counts it, so checkpoints
    and ``global_steps`` stay in line with the loop's step. How, per optimizer DeepSpeed built:

    * ZeRO-1/2 (``DeepSpeedZeroOptimizer``) and ZeRO-3: DeepSpeed's own fp16-overflow branch is forced
      (overflow flagged, loss-scale update suppressed): it clears the gradient partitions, the pre-flattened
      and offload buffers and the micro-step bookkeeping, and tells the engine the step was skipped. Simply
      not calling ``engine.step()`` would leave that bookkeeping and ``engine.micro_steps`` out of line (and
      at ZeRO-0 add the bad gradients into the next step's).
    * ``BF16_Optimizer`` (ZeRO-1 bf16 with fp32 gradient accumulation): the clean-up its own non-finite-norm
      branch does.
    * ZeRO-0 (the torch optimizer, or ``FP16_Optimizer`` for bf16 weights): its ``step`` is a no-op for this
      call; the engine then zeroes the gradients as after any step.
    """
    if not engine.is_gradient_accumulation_boundary():
        raise ValueError("skip_step() must replace the step at a gradient-accumulation boundary "
                         "(after the last micro-batch's backward)")
    opt = engine.optimizer
    kind = _optimizer_kind(opt)

    def flag_overflow(*_a: Any, **_k: Any) -> None:
        opt.overflow = True

    def no_scale_update(*_a: Any, **_k: Any) -> None:
        return None

    if kind == "zero12":
        patch = {"check_grad_overflow": True, "check_overflow": flag_overflow, "_update_scale": no_scale_update}
    elif kind == "zero3":
        def overflow3(update_scale: bool = True) -> bool:
            opt.overflow = True
            return True

        patch = {"_overflow_check_and_loss_scale_update": overflow3, "_update_scale": no_scale_update}
    elif kind == "bf16":
        def bf16_skip(closure: Any = None) -> None:
            opt.overflow = True
            opt._global_grad_norm = float("inf")
            opt.clear_hp_grads()
            opt.clear_lp_grads()

        patch = {"step": bf16_skip}
    else:
        patch = {"step": lambda closure=None: None}
    skipped = engine.skipped_steps
    with _patched(opt, patch):
        engine.step()
    if kind == "plain":
        engine.skipped_steps += 1  # the optimizer's step ran as a no-op: no overflow for the engine to count
    else:
        opt.overflow = False  # read by the engine already; a checkpoint would otherwise save it as True
    assert engine.skipped_steps == skipped + 1, "DeepSpeed did not take the skip path"
