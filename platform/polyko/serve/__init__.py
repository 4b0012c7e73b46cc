"""Serving polyko checkpoints with Ray Serve: an OpenAI-style ``/v1/completions`` API with
batching, several checkpoints per endpoint (multiplexing), registry-following deployments and safe
defaults.

Modules: :mod:`~polyko.serve.config` (``ServeConfig``), :mod:`~polyko.serve.engine` (continuous
batching with a bounded KV cache), :mod:`~polyko.serve.api` (the pydantic schema, OpenAI shapes),
:mod:`~polyko.serve.app` (Serve deployments, ``build_app``, ``run_service``),
:mod:`~polyko.serve.metrics` (Prometheus). Entry point: ``jobs/serve.py``.
"""

from polyko.serve.config import AutoscalingConfig, EngineConfig, LimitsConfig, ModelSpec, ServeConfig

__all__ = ["ServeConfig", "ModelSpec", "LimitsConfig", "EngineConfig", "AutoscalingConfig"]
