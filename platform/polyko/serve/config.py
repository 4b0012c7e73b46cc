"""Configuration of the OpenAI-style serving app (:mod:`polyko.serve.app`).

One :class:`ServeConfig` describes the whole service: which checkpoints it may serve (by name;
a request can only choose among these names, never a path), where it listens, the request
limits that keep a replica bounded, the batching engine and the Serve autoscaling policy.
``jobs/serve.py`` builds it from flags; ``cluster/serve.yaml`` passes it as the ``args`` of
``polyko.serve.app:app_builder`` (the same nested dict, checked by ``polyko.config.from_dict``).

CPU quickstart::

    python jobs/serve.py --model tiny=work/quickstart/pretrain/hf          # http://127.0.0.1:8000/v1/completions
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

REGISTRY_SCHEMES = ("models:/", "runs:/")


@dataclass
class ModelSpec:
    """A checkpoint the service may load. ``source`` is an HF checkpoint directory (safetensors
    weights + tokenizer) or an MLflow model URI (``models:/name@alias``, ``models:/name/N``,
    ``runs:/...``) resolved by ``polyko.registry.resolve_model`` on the replica that loads it."""

    name: str
    source: str

    @staticmethod
    def parse(arg: str) -> "ModelSpec":
        """``--model`` syntax: ``PATH``, ``models:/name@alias`` or ``NAME=SOURCE``.
        The served name defaults to the directory name or the registered model name."""
        arg = arg.strip()
        if not arg:
            raise ValueError("--model needs a checkpoint directory or a models:/ URI")
        name, source = None, arg
        head = arg.split("=", 1)[0]
        if "=" in arg and "/" not in head and ":" not in head:
            name, source = (s.strip() for s in arg.split("=", 1))
        if name is None:
            if source.startswith("models:/"):
                # models:/name@alias or models:/name/3 -> name
                name = source[len("models:/"):].split("@", 1)[0].split("/", 1)[0]
            elif source.startswith("runs:/"):
                name = source.rstrip("/").rsplit("/", 1)[-1]
            else:
                name = Path(source).resolve().name
        return ModelSpec(name=name, source=source)

    @property
    def is_registry_uri(self) -> bool:
        return self.source.startswith(REGISTRY_SCHEMES)

    @property
    def alias(self) -> tuple[str, str] | None:
        """``(registered name, alias)`` for a ``models:/name@alias`` source (followed while
        serving, see ``ServeConfig.follow_interval_s``), else None."""
        m = re.fullmatch(r"models:/([^/@]+)@([^/]+)/?", self.source)
        return (m[1], m[2]) if m else None


@dataclass
class LimitsConfig:
    """Bounds on one request. Everything outside them is a 400 naming the field, so a client can
    never make a replica spend unbounded time or memory."""

    # Default when a request omits max_tokens (OpenAI's legacy completions default is 16).
    default_max_tokens: int = 16
    # Upper bound for max_tokens; prompt + max_tokens must also fit the model's context.
    max_tokens_limit: int = 1024
    # Prompts per request (a list of strings or of token-id lists); each is one sequence in a batch.
    max_prompts: int = 64
    # Characters of one string prompt before tokenizing (a cheap bound against huge bodies).
    max_prompt_chars: int = 200_000
    # OpenAI allows logprobs up to 5; lm-eval uses 1. Each costs a JSON entry per token in the response.
    max_logprobs: int = 5
    max_stop: int = 4
    max_body_bytes: int = 4_000_000
    # A request (queue wait + generation) that takes longer is cancelled and answered 503.
    request_timeout_s: float = 120.0


@dataclass
class EngineConfig:
    """The batched generation engine of one model on one replica (:mod:`polyko.serve.engine`)."""

    # "hf": transformers forward passes with a KV cache (CPU or one GPU). "vllm" is reserved for
    # a vLLM engine behind the same interface on GPU nodes.
    kind: str = "hf"
    # Sequences in one forward pass. On a CPU, 32 keeps a 50M model's step under ~100 ms.
    max_batch_size: int = 32
    # Bound on batch size x (longest prompt + max_tokens) of one batch, i.e. on KV-cache and
    # activation memory: 32 sequences of 1,024 tokens. A single longer sequence still runs alone.
    max_batch_tokens: int = 32768
    # How long the loop waits for more requests before starting a batch that is not full (ms).
    # Costs at most this much latency at low load; fills batches at high load.
    batch_wait_ms: float = 5.0
    # Sequences waiting for a batch, per model; beyond this the request gets 503 + Retry-After.
    max_queued: int = 512
    # "auto": cuda when available, else cpu.
    device: str = "auto"
    # "auto": bfloat16 on GPU, float32 on CPU (bf16 matmuls are slow on most CPUs).
    dtype: str = "auto"
    # torch intra-op threads per replica (0 = the replica's num_cpus).
    torch_threads: int = 0
    # Seconds between glibc ``malloc_trim(0)`` calls while the engine is busy (and once whenever
    # it goes idle); 0 = never. Every decode step reallocates each layer's KV cache one column
    # longer, and glibc keeps the freed chunks in its arenas instead of returning them: a 50m
    # replica at concurrency 32 held ~300 MB in use and ~500 MB free-but-resident, its RSS
    # climbing with no object holding the memory. Measured on one CPU (50m, 32 rows): a trim
    # takes ~30 ms of the engine thread, ~1.5 % of its time at 2 s, with no slower decode steps
    # from re-faulting the returned pages; RSS ~950 MB instead of ~1,400 MB.
    malloc_trim_interval_s: float = 2.0


@dataclass
class AutoscalingConfig:
    """Serve autoscaling of the model deployment (replicas scale by ongoing requests)."""

    min_replicas: int = 1
    max_replicas: int = 2
    # Ongoing requests per replica the autoscaler aims for: one full batch.
    target_ongoing_requests: int = 32
    upscale_delay_s: float = 10.0
    downscale_delay_s: float = 120.0


@dataclass
class ServeConfig:
    """The whole service. ``models`` are the only checkpoints a request can name."""

    models: list[ModelSpec] = field(default_factory=list)
    # Loopback by default: exposing the API is an explicit decision (--host 0.0.0.0).
    host: str = "127.0.0.1"
    port: int = 8000
    # Name of an environment variable holding a bearer API key (read on the ingress replicas);
    # empty = no authentication. The key itself never goes into the config.
    api_key_env: str = ""
    # Models resident per replica (Serve multiplexing, LRU eviction beyond this).
    max_resident: int = 2
    app_name: str = "polyko"
    route_prefix: str = "/"
    # Requests one model replica takes at once (batched by the engine); Serve queues the rest in
    # the router up to max_queued_requests and then answers 503.
    max_ongoing_requests: int = 64
    max_queued_requests: int = 512
    # Seconds between registry polls of each ``models:/name@alias`` model resident on a replica.
    # When the alias moves, the replica loads the new version beside the old one, sends new
    # requests to it once loaded, lets requests on the old one finish, then unloads it.
    # 0 = resolve the alias once, at load. One poll is one small registry call.
    follow_interval_s: float = 30.0
    # CPUs (and GPUs) reserved per model replica.
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    autoscaling: AutoscalingConfig = field(default_factory=AutoscalingConfig)

    def __post_init__(self) -> None:
        names = [m.name for m in self.models]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"served model names must be unique, got duplicates {dup}; use --model NAME=PATH")
        if self.max_resident < 1:
            raise ValueError(f"max_resident must be >= 1, got {self.max_resident}")
        if self.engine.kind not in ("hf", "vllm"):
            raise ValueError(f"engine.kind must be 'hf' or 'vllm', got {self.engine.kind!r}")
        if self.engine.malloc_trim_interval_s < 0:
            raise ValueError(f"engine.malloc_trim_interval_s must be >= 0 (0 = never trim), "
                             f"got {self.engine.malloc_trim_interval_s}")
        if self.follow_interval_s < 0:
            raise ValueError(f"follow_interval_s must be >= 0 (0 = never re-resolve), got {self.follow_interval_s}")
        if self.max_ongoing_requests < self.autoscaling.target_ongoing_requests:
            raise ValueError("max_ongoing_requests must be >= autoscaling.target_ongoing_requests")

    def model(self, name: str) -> ModelSpec | None:
        for m in self.models:
            if m.name == name:
                return m
        return None
