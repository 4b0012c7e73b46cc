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
          "step")


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

            self.gauges = {k: Gauge(f"polyko_train_{k}", description=f"pretraining {k.replace('_', ' ')}",
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
        shown = " ".join(f"{k}={_fmt(v)}" for k, v in values.items() if k != "step")
        print(f"[polyko] step {step} {shown}", flush=True)


    def close(self) -> None:
        """Wait until every queued MLflow write has reached the server."""
        if self.client is not None:
            import mlflow

            mlflow.flush_async_logging()


def _fmt(v: float) -> str:
    return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"


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
