"""``evaluate(cfg)``: KoBEST on a checkpoint, a registered model or a completions server, with the
outputs (``results.json``, ``table.md``) and one MLflow run in ``polyko-eval`` linked to the runs
that produced the checkpoint.

CPU run (tiny model, 20 docs per task, zero-shot, ~30 s)::

    python jobs/evaluate.py --model work/quickstart/pretrain/hf --shots 0 --limit 20

What a run records: params = the flattened EvalConfig; metrics ``<task>/<acc|f1|acc_norm>/<N>shot``
(e.g. ``kobest_copa/f1/5shot``) and ``kobest/f1_avg/<N>shot`` (unweighted mean of the five); against the
reference Polyglot-Ko size (tag ``polyko.eval.reference``, see ``polyko.eval.table``)
``published/<task>/f1/<N>shot`` and ``<task>/f1_vs_ref/<N>shot`` (ours - published); tags
``polyko.checkpoint`` (the model as given), ``polyko.checkpoint_dir`` (the local dir evaluated),
``polyko.parent.*`` (from the checkpoint's ``polyko_run.json``); artifacts ``table.md`` and
``results.json``. Metrics are logged after each shot count, so a long run shows progress in the UI.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from polyko import tracking
from polyko.config import config_hash, to_dict
from polyko.eval import kobest, table
from polyko.eval.config import EvalConfig

log = logging.getLogger(__name__)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def _device(cfg: EvalConfig) -> str:
    if cfg.device != "auto":
        return cfg.device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _served_model_name(base_url: str, timeout_s: float = 10.0) -> str:
    """The only model a server lists at GET /v1/models (OpenAI format)."""
    import requests

    url = base_url.rstrip("/") + "/models"
    try:
        r = requests.get(url, timeout=timeout_s, headers=_auth_header())
        r.raise_for_status()
        names = [m["id"] for m in r.json().get("data", [])]
    except (requests.RequestException, ValueError, KeyError) as e:
        raise ValueError(f"cannot list models at {url} ({e}); pass --served-model NAME") from None
    if len(names) != 1:
        raise ValueError(f"{url} serves {names}; choose one with --served-model NAME")
    return names[0]


def _auth_header() -> dict[str, str]:
    key = os.environ.get("OPENAI_API_KEY", "")
    return {"Authorization": f"Bearer {key}"} if key else {}


def model_spec(cfg: EvalConfig) -> tuple[str, dict[str, Any], Path | None]:
    """``(lm-eval model type, model_args, local checkpoint dir or None)`` for ``cfg.model``."""
    from polyko.registry import resolve_model

    if cfg.is_endpoint:
        ep = cfg.endpoint
        if not ep.tokenizer:
            raise ValueError("evaluating a URL needs the model's tokenizer: --tokenizer DIR (an HF dir or models:/ URI); "
                             "lm-eval counts context tokens locally and sends token ids")
        tok_dir = resolve_model(ep.tokenizer) if ep.tokenizer.startswith(("models:/", "runs:/")) else Path(ep.tokenizer)
        if not (tok_dir / "tokenizer.json").is_file() and not (tok_dir / "tokenizer_config.json").is_file():
            raise ValueError(f"{tok_dir} holds no HF tokenizer (tokenizer.json / tokenizer_config.json)")
        base = cfg.model.rstrip("/")
        if base.endswith("/completions"):
            base = base[: -len("/completions")]
        max_length = ep.max_length
        if not max_length and (tok_dir / "config.json").is_file():
            max_length = int(json.loads((tok_dir / "config.json").read_text()).get("max_position_embeddings", 0))
        args: dict[str, Any] = {
            "base_url": f"{base}/completions",
            "model": ep.model_name or _served_model_name(base),
            "tokenizer": str(tok_dir.resolve()),
            "tokenizer_backend": "huggingface",
            "tokenized_requests": True,
            "num_concurrent": ep.num_concurrent,
            "max_retries": ep.max_retries,
            "timeout": ep.timeout_s,
            "seed": cfg.seed,
        }
        if max_length:
            args["max_length"] = max_length
        return "local-completions", args, tok_dir.resolve() if (tok_dir / "config.json").is_file() else None
    model_dir = resolve_model(cfg.model)
    if not any(model_dir.glob("tokenizer*.json")):
        raise ValueError(f"{model_dir} has no tokenizer files; export the checkpoint with its tokenizer")
    dtype = cfg.dtype
    if dtype == "auto":
        dtype = "float32" if _device(cfg) == "cpu" else "auto"
    return "hf", {"pretrained": str(model_dir), "dtype": dtype}, model_dir


def model_params(model_dir: Path | None) -> int | None:
    """Parameter count of the HF model in ``model_dir`` (from its config.json, nothing loaded)."""
    if model_dir is None or not (model_dir / "config.json").is_file():
        return None
    from transformers import AutoConfig

    from polyko.model import count_params

    try:
        return count_params(AutoConfig.from_pretrained(str(model_dir)))
    except (ValueError, OSError, TypeError, AttributeError):
        return None  # not a GPT-NeoX config: the table compares with the default reference


def default_output(cfg: EvalConfig) -> Path:
    return tracking.work_dir() / "eval" / config_hash(cfg)


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    """Run KoBEST for every shot count in ``cfg.shots``; write ``results.json`` and ``table.md``
    into the output dir; record one MLflow run. Returns ``{"output", "run_id", "metrics",
    "split_sizes", "table", "registered_version", "seconds"}``."""
    from lm_eval.utils import handle_non_serializable

    out = Path(cfg.output).expanduser().resolve() if cfg.output else default_output(cfg)
    data = kobest.resolve_data(cfg.kobest_dir, cfg.tasks)  # fail on bad data before loading a model
    lm_type, model_args, model_dir = model_spec(cfg)
    device = None if cfg.is_endpoint else _device(cfg)
    # lm-eval passes batch_size next to model_args (a duplicate key would be a TypeError); for a
    # URL it is the prompts per request.
    batch_size = cfg.endpoint.batch_size if cfg.is_endpoint else (cfg.batch_size or "auto")
    out.mkdir(parents=True, exist_ok=True)
    reference = table.reference_model(model_params(model_dir), cfg.compare_to)
    tags = {"polyko.checkpoint": cfg.model, "polyko.eval.data": data.describe(), "polyko.eval.reference": reference}
    if model_dir is not None:
        # For a URL the local dir is the tokenizer's (a checkpoint dir when it has config.json).
        tags["polyko.tokenizer_dir" if cfg.is_endpoint else "polyko.checkpoint_dir"] = str(model_dir)
    if cfg.limit:
        tags["polyko.eval.limited"] = f"first {cfg.limit} docs per task: not comparable to published numbers"

    t0 = time.time()
    metrics: dict[str, float] = {}
    per_shot: dict[str, Any] = {}
    sizes: dict[str, int] = {}
    with tracking.start_run("eval", cfg, output=out, parents=tracking.lineage(model_dir),
                            run_name=cfg.run_name or None, tags=tags) as run:
        import mlflow

        for shots in cfg.shots:
            log.info("KoBEST %s at %d-shot on %s (%s)", cfg.tasks, shots, cfg.model, data.describe())
            res = kobest.run_lm_eval(model=lm_type, model_args=model_args, tasks=cfg.tasks, data=data,
                                     shots=shots, limit=cfg.limit, batch_size=batch_size,
                                     device=device, seed=cfg.seed, log_samples=cfg.log_samples)
            samples = res.pop("samples", None)
            if samples:
                for task, rows in samples.items():
                    with open(out / f"samples_{task}_{shots}shot.jsonl", "w", encoding="utf-8") as f:
                        for row in rows:
                            f.write(json.dumps(row, default=handle_non_serializable, ensure_ascii=False) + "\n")
            shot_metrics = kobest.extract_metrics(res, shots)
            metrics.update(shot_metrics)
            sizes.update(kobest.split_sizes(res))
            per_shot[str(shots)] = res
            mlflow.log_metrics({**shot_metrics, **table.comparison_metrics(shot_metrics, reference)})
        md = table.render_table(metrics, shots=cfg.shots, tasks=cfg.tasks, model=_display_name(cfg),
                                limit=cfg.limit, split_sizes=sizes, reference=reference)
        summary = {
            "config": to_dict(cfg), "model_dir": str(model_dir) if model_dir else None,
            "lm_eval_model": lm_type, "model_args": model_args, "data": data.describe(),
            "metrics": metrics, "split_sizes": sizes, "mlflow_run_id": run.info.run_id,
            "reference": reference, "vs_reference": table.comparison_metrics(metrics, reference),
            "seconds": round(time.time() - t0, 1),
        }
        results = {"polyko": summary, "lm_eval": per_shot}
        _atomic_write(out / "results.json",
                      json.dumps(results, default=handle_non_serializable, ensure_ascii=False, indent=2))
        _atomic_write(out / "table.md", md)
        mlflow.log_artifact(str(out / "table.md"))
        mlflow.log_artifact(str(out / "results.json"))
        version = None
        if cfg.register_name:
            from polyko.registry import register_checkpoint

            assert model_dir is not None
            version = register_checkpoint(model_dir, cfg.register_name, alias=cfg.register_alias or None,
                                          run_id=run.info.run_id)
            mlflow.set_tag("polyko.registered", f"models:/{cfg.register_name}/{version}")
        print(f"MLflow run: {tracking.run_url(run)}", flush=True)
    return {"output": str(out), "run_id": run.info.run_id, "metrics": metrics, "split_sizes": sizes,
            "reference": reference, "table": md, "registered_version": version, "seconds": round(time.time() - t0, 1)}


def _display_name(cfg: EvalConfig) -> str:
    if cfg.model.startswith(("models:/", "runs:/", "http://", "https://")):
        return cfg.model
    return Path(cfg.model).name or cfg.model
