"""Configuration of a KoBEST evaluation (:func:`polyko.eval.evaluate`).

One :class:`EvalConfig` says what to evaluate (a checkpoint directory, a registered MLflow model or
a running completions server), on which KoBEST tasks and shot counts, on which data, and where the
outputs go. ``jobs/evaluate.py`` builds it from flags; ``--set endpoint.num_concurrent=8`` reaches
any nested field.

CPU quickstart (a tiny model, 20 documents per task, zero-shot)::

    python jobs/evaluate.py --model work/quickstart/pretrain/hf --shots 0 --limit 20
"""

from __future__ import annotations

from dataclasses import dataclass, field

KOBEST_TASKS = ("kobest_boolq", "kobest_copa", "kobest_hellaswag", "kobest_sentineg", "kobest_wic")
URL_SCHEMES = ("http://", "https://")
REGISTRY_SCHEMES = ("models:/", "runs:/")


@dataclass
class EndpointConfig:
    """How lm-eval's ``local-completions`` model talks to an OpenAI-style server (``--model http://...``)."""

    # Model name sent in every request; "" = ask the server's GET /v1/models and use its only model.
    model_name: str = ""
    # Local HF tokenizer (directory or models:/ URI) lm-eval uses to count context tokens; required
    # for a URL because lm-eval splits context/continuation by token ids and sends ids.
    tokenizer: str = ""
    # Requests in flight at once. A CPU replica batches them; 4 keeps two cores busy.
    num_concurrent: int = 4
    # Retries of a failed request (tenacity, exponential back-off inside lm-eval).
    max_retries: int = 3
    # Prompts per request (the server batches them into one forward pass).
    batch_size: int = 8
    # Seconds before one request is abandoned.
    timeout_s: int = 300
    # Context the server's model accepts; 0 = read max_position_embeddings from the tokenizer
    # directory's config.json (a checkpoint dir has one), else lm-eval's default 2048.
    max_length: int = 0


@dataclass
class EvalConfig:
    """One evaluation: ``model`` on ``tasks`` at each shot count in ``shots``."""

    # An HF checkpoint directory, an MLflow model URI (models:/name@alias, models:/name/N,
    # runs:/<run id>/<path>) or the base URL of an OpenAI-style server (http://host:port/v1).
    model: str = ""
    # "kobest" = all five tasks, or any of KOBEST_TASKS (short names "copa" work too).
    tasks: list[str] = field(default_factory=lambda: ["kobest"])
    # Few-shot counts; each is one lm-eval pass. The Polyglot-Ko cards report 0/5/10/50
    # (the superseded 2022 card 1/5/10/50/100).
    shots: list[int] = field(default_factory=lambda: [0, 5, 10, 50])
    # Documents per task (quick runs; numbers are then NOT comparable to published ones). 0 = all.
    limit: int = 0
    # Local KoBEST copy laid out <task>/<split>.jsonl; "" = $POLYKO_KOBEST_DIR, else the HF hub
    # dataset skt/kobest_v1 (needs network; with HF_HUB_OFFLINE/HF_DATASETS_OFFLINE set it is an error).
    kobest_dir: str = ""
    # Output directory; "" = <work dir>/eval/<config hash>.
    output: str = ""
    # Sequences per forward pass for a local model; 0 = lm-eval's automatic search (use it on a GPU).
    # On a CPU 8 beats 32 by ~2.5x (benchmarks/eval_speed.py): lm-eval pads a batch to its longest
    # request and log-softmaxes the full 30k vocabulary at every position.
    batch_size: int = 8
    # "auto" = cuda when available, else cpu.
    device: str = "auto"
    # "auto" = float32 on CPU (bf16 matmuls are slow there), the checkpoint's dtype on GPU.
    dtype: str = "auto"
    # Seeds for python/numpy/torch and the few-shot sampler (lm-eval's defaults): same checkpoint,
    # same config -> same numbers.
    seed: int = 1234
    # Also write every request and its log-likelihoods (samples_<task>_<shots>shot.jsonl).
    log_samples: bool = False
    # After evaluating, register the checkpoint under this MLflow model name ("" = do not).
    register_name: str = ""
    # Alias given to that version (e.g. "candidate"); "" = none.
    register_alias: str = ""
    run_name: str = ""
    # Published model the table and the ``*_vs_ref`` metrics compare with: a Polyglot-Ko size
    # ("1.3b", "3.8b", "5.8b", "12.8b") or a published model name; "" = the Polyglot-Ko size nearest
    # the model's parameter count (1.3b for smaller models).
    compare_to: str = ""
    endpoint: EndpointConfig = field(default_factory=EndpointConfig)

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("EvalConfig.model is empty: give a checkpoint dir, models:/ URI or http(s):// URL")
        self.tasks = normalize_tasks(self.tasks)
        if not self.shots:
            raise ValueError("EvalConfig.shots is empty; e.g. --shots 0,5")
        bad = [s for s in self.shots if int(s) < 0]
        if bad:
            raise ValueError(f"shot counts must be >= 0, got {bad}")
        self.shots = sorted({int(s) for s in self.shots})
        if self.limit < 0:
            raise ValueError(f"limit must be >= 0 (0 = all documents), got {self.limit}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be auto, cpu or cuda[:N], got {self.device!r}")
        if self.register_alias and not self.register_name:
            raise ValueError("register_alias needs register_name (--register NAME --alias ALIAS)")
        if self.compare_to:
            from polyko.eval.table import reference_model

            reference_model(None, self.compare_to)  # ValueError naming the choices
        if self.is_endpoint and self.register_name:
            raise ValueError("cannot register a model served at a URL; register its checkpoint directory")

    @property
    def is_endpoint(self) -> bool:
        return self.model.startswith(URL_SCHEMES)


def normalize_tasks(tasks: list[str]) -> list[str]:
    """``["kobest"]`` -> all five; ``copa`` -> ``kobest_copa``; unknown names are a ValueError."""
    out: list[str] = []
    for t in tasks:
        t = t.strip()
        if not t:
            continue
        if t == "kobest":
            out.extend(KOBEST_TASKS)
            continue
        name = t if t.startswith("kobest_") else f"kobest_{t}"
        if name not in KOBEST_TASKS:
            raise ValueError(f"unknown task {t!r}; choose 'kobest' or some of {list(KOBEST_TASKS)}")
        out.append(name)
    if not out:
        raise ValueError("no tasks given; use --tasks kobest")
    return [t for t in KOBEST_TASKS if t in out]  # canonical order, no duplicates
