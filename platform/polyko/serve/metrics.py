"""Prometheus metrics of the serving app, through ``ray.util.metrics``.

Ray exports them on each node's metrics port with a ``ray_`` prefix
(``ray_polyko_serve_requests_total`` ...), next to Serve's own ``ray_serve_*`` series, so the
Grafana dashboards that Ray ships (and ours in ``dashboards/``) show them. Names are the project's
fixed interface (see COMMON conventions):

* counter ``polyko_serve_requests_total`` {model, status}: every HTTP request to /v1/completions,
  including refused ones (status is the HTTP code; model is ``-`` when the request named none we serve,
  which bounds the label's cardinality to the configured names).
* histogram ``polyko_serve_request_latency_seconds`` {model}: request latency (streams: to the last chunk).
* counter ``polyko_serve_generated_tokens_total`` {model}.
* gauge ``polyko_serve_resident_models`` {replica}: models loaded on each model replica.
* counter ``polyko_serve_model_switches_total`` {model}: a replica switched a ``models:/name@alias``
  model to the version the alias moved to (see ``ServeConfig.follow_interval_s``).
* gauge ``polyko_serve_model_version`` {model, replica}: the registry version each replica serves.

Objects are created lazily in the process that records (Ray metrics are per-process).
"""

from __future__ import annotations

import functools

# Seconds: from a single short completion on a GPU to a long CPU generation.
LATENCY_BOUNDARIES = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120]


class ServeMetrics:
    def __init__(self) -> None:
        from ray.util import metrics

        self.requests = metrics.Counter("polyko_serve_requests_total",
                                        description="Completion requests by model and HTTP status.",
                                        tag_keys=("model", "status"))
        self.latency = metrics.Histogram("polyko_serve_request_latency_seconds",
                                         description="Completion request latency in seconds.",
                                         boundaries=LATENCY_BOUNDARIES, tag_keys=("model",))
        self.generated = metrics.Counter("polyko_serve_generated_tokens_total",
                                         description="Tokens generated, by model.", tag_keys=("model",))

    def record(self, model: str, status: int, seconds: float, generated_tokens: int = 0) -> None:
        self.requests.inc(1, tags={"model": model, "status": str(status)})
        self.latency.observe(seconds, tags={"model": model})
        if generated_tokens:
            self.generated.inc(generated_tokens, tags={"model": model})


@functools.lru_cache(maxsize=1)
def serve_metrics() -> ServeMetrics:
    return ServeMetrics()


@functools.lru_cache(maxsize=1)
def resident_models_gauge():
    from ray.util import metrics

    return metrics.Gauge("polyko_serve_resident_models", description="Models resident on a model replica.",
                         tag_keys=("replica",))


@functools.lru_cache(maxsize=1)
def registry_metrics():
    """(switches counter, version gauge) of registry-following models, in the model replica."""
    from ray.util import metrics

    switches = metrics.Counter("polyko_serve_model_switches_total",
                               description="Switches of a registry-alias model to a newly promoted version.",
                               tag_keys=("model",))
    version = metrics.Gauge("polyko_serve_model_version", description="Registry version served, per replica.",
                            tag_keys=("model", "replica"))
    return switches, version
