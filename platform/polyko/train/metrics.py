"""Per-step training metrics, written by rank 0 to three places:

* MLflow (the pretrain run, through an explicit tracking URI -- a worker has no active run),
* Ray metrics gauges (``polyko_train_*``; Prometheus sees them with a ``ray_`` prefix; tags run, size),
* ``<output>/metrics.jsonl`` (one JSON object per step; after a restart a step can appear twice, the
  later line wins) and a progress line on stdout (the ``ray job`` log).

Model FLOPs use ``polyko.plan.flops_per_token`` (6N + attention); MFU divides the per-worker TFLOP/s by
the accelerator's bf16 dense peak (``polyko.plan.detect_accelerator``); on a CPU there is no peak, so
MFU is not reported.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

GAUGES = ("loss", "lr", "grad_norm", "tokens_per_second", "tflops", "mfu", "step_seconds", "checkpoint_seconds",
          "step", "guard/anomalies", "guard/skipped_steps", "guard/rollbacks", "val/loss", "val/bpb")
# Seconds between two progress lines (and always on a checkpoint, a guard event, the first and last step).
PROGRESS_EVERY_S = 10.0


def gauge_name(key: str) -> str:
    """Ray metric name of a metric key: ``guard/rollbacks`` -> ``polyko_train_guard_rollbacks``."""
    return "polyko_train_" + key.replace("/", "_")


def flops_per_token(model_config, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward)."""
    try:
        from polyko.plan import flops_per_token as f
    except ImportError:  # same convention as polyko.plan: 6N (non-embedding) + 12 * layers * hidden * seq
        from polyko.model import count_params

        n = count_params(model_config) - model_config.vocab_size * model_config.hidden_size  # input embedding
        return 6.0 * n + 12.0 * model_config.num_hidden_layers * model_config.hidden_size * seq_len
    return float(f(model_config, seq_len))


def accelerator_peak(use_gpu: bool) -> tuple[str, float | None]:
    if not use_gpu:
        return "cpu", None
    try:
        from polyko.plan import detect_accelerator
    except ImportError:
        return "gpu", None
    return detect_accelerator()


class MetricsSink:
    """Rank 0's writer. ``log(step, metrics)`` fans out to MLflow, Ray gauges, jsonl and stdout."""

    def __init__(self, *, run_id: str | None, tracking_uri: str | None, run_name: str, size: str,
                 jsonl: str | Path | None, gauges: bool = True):
        self.run_id = run_id
        self.client = None
        if run_id and tracking_uri:
            from mlflow.tracking import MlflowClient

            self.client = MlflowClient(tracking_uri=tracking_uri)
        self.tags = {"run": run_name, "size": size}
        self.gauges = {}
        if gauges:  # off outside Ray (the loop in a plain torch.distributed world)
            from ray.util.metrics import Gauge

            self.gauges = {k: Gauge(gauge_name(k), description=f"pretraining {k.replace('_', ' ')}",
                                    tag_keys=("run", "size")) for k in GAUGES}
        self.jsonl = Path(jsonl) if jsonl else None
        if self.jsonl:
            self.jsonl.parent.mkdir(parents=True, exist_ok=True)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        values = {k: float(v) for k, v in metrics.items() if v is not None}
        for k, v in values.items():
            if k in self.gauges:
                self.gauges[k].set(v, tags=self.tags)
        if self.client is not None:
            from mlflow.entities import Metric

            ts = int(time.time() * 1000)
            # Asynchronous: the step never waits on the tracking server (flushed in close()).
            self.client.log_batch(self.run_id, metrics=[Metric(k, v, ts, step) for k, v in values.items()],
                                  synchronous=False)
        if self.jsonl:
            with self.jsonl.open("a") as f:
                f.write(json.dumps({**values, "step": step, "time": time.time()}) + "\n")

    def artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a file (e.g. the guard's event log) to the run; a failure is logged, never raised."""
        if self.client is None:
            return
        try:
            self.client.log_artifact(self.run_id, str(path), artifact_path=artifact_path)
        except Exception as e:  # noqa: BLE001 - the tracking server being down must not stop training
            print(f"[polyko] WARNING could not upload {path} to MLflow: {e}", flush=True)

    def close(self) -> None:
        """Wait until every queued MLflow write has reached the server."""
        if self.client is not None:
            import mlflow

            mlflow.flush_async_logging()


class Progress:
    """Rank 0's one live line per run: step / total, loss, tokens/s, MFU (or TFLOP/s on a CPU), ETA, last
    checkpoint, guard events and validation loss, at most every :data:`PROGRESS_EVERY_S` seconds. Per-step
    detail is in ``metrics.jsonl``, MLflow and the Ray metrics."""

    def __init__(self, total: int, start: int):
        self.total, self.start = total, start
        self.t0 = self.last = time.time()
        self.shown_events = 0

    def show(self, step: int, m: dict[str, Any], last_ckpt: int | None, guard) -> None:
        now = time.time()
        events = guard.anomalies + guard.rollbacks
        force = step in (self.start + 1, self.total) or m.get("checkpoint_seconds") is not None and \
            last_ckpt == step or events != self.shown_events or "val/loss" in m
        if not force and now - self.last < PROGRESS_EVERY_S:
            return
        self.last, self.shown_events = now, events
        rate = (now - self.t0) / max(1, step - self.start)  # seconds per step over this attempt
        eta = _duration(rate * (self.total - step))
        speed = f"MFU {m['mfu']:.1%}" if m.get("mfu") else f"{m.get('tflops', 0):.3g} TFLOP/s/worker"
        parts = [f"step {step}/{self.total}", f"loss {m['loss']:.4f}", f"{m['tokens_per_second']:,.0f} tok/s", speed,
                 f"ETA {eta}", f"ckpt {last_ckpt if last_ckpt is not None else '-'}"]
        if "val/loss" in m:
            parts.append(f"val {m['val/loss']:.4f}" + (f" ({m['val/bpb']:.3f} bpb)" if "val/bpb" in m else ""))
        if guard.anomalies or guard.rollbacks:
            parts.append(f"guard {guard.anomalies} anomalies, {guard.skipped_steps} skipped, "
                         f"{guard.rollbacks} rollbacks")
        print("[polyko] " + " | ".join(parts), flush=True)


def _duration(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def read_jsonl(path: str | Path) -> dict[int, dict[str, Any]]:
    """``{step: metrics}`` from a metrics.jsonl (a step logged twice after a restart: the later wins)."""
    out: dict[int, dict[str, Any]] = {}
    p = Path(path)
    if p.is_file():
        for line in p.read_text().splitlines():
            if line.strip():
                d = json.loads(line)
                out[int(d["step"])] = d
    return out
