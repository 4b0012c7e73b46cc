"""Model registry round trip against a real MLflow server: register an HF checkpoint, alias it,
resolve the alias back to a local dir, load it with transformers, same weights."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from polyko import registry

REPO = Path(__file__).resolve().parents[1]


def _same_weights(a_dir: Path, b_dir: Path) -> bool:
    import torch
    from transformers import AutoModelForCausalLM

    a = AutoModelForCausalLM.from_pretrained(a_dir).state_dict()
    b = AutoModelForCausalLM.from_pretrained(b_dir).state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_register_alias_resolve_roundtrip(mlflow_server, tiny_hf_checkpoint, tmp_path):
    from mlflow import MlflowClient

    cache = tmp_path / "cache"
    v1 = registry.register_checkpoint(tiny_hf_checkpoint, "reg-test-tiny", alias="candidate")
    got = registry.resolve_model("models:/reg-test-tiny@candidate", cache_dir=cache)
    assert got.is_dir() and got.is_relative_to(cache.resolve())
    assert _same_weights(tiny_hf_checkpoint, got)
    assert (got / "tokenizer.json").read_bytes() == (tiny_hf_checkpoint / "tokenizer.json").read_bytes()
    # Cached: resolving again (by version) gives the same dir without a new download.
    mtime = (got / "model.safetensors").stat().st_mtime_ns
    again = registry.resolve_model(f"models:/reg-test-tiny/{v1}", cache_dir=cache)
    assert again == got and (again / "model.safetensors").stat().st_mtime_ns == mtime

    client = MlflowClient()
    mv = client.get_model_version("reg-test-tiny", v1)
    assert mv.source.endswith("/hf_model") and mv.tags["polyko.source_dir"] == str(tiny_hf_checkpoint.resolve())
    run = client.get_run(mv.run_id)
    assert run.data.tags["polyko.stage"] == "checkpoint"
    # runs:/ URIs resolve to the same files.
    via_run = registry.resolve_model(f"runs:/{mv.run_id}/hf_model", cache_dir=cache)
    assert (via_run / "model.safetensors").read_bytes() == (got / "model.safetensors").read_bytes()

    # Second version, then promote v1 to production with the CLI (a rollback-style alias move).
    v2 = registry.register_checkpoint(tiny_hf_checkpoint, "reg-test-tiny", alias="candidate", run_id=mv.run_id)
    assert int(v2) == int(v1) + 1
    assert client.get_model_version("reg-test-tiny", v2).source == mv.source  # same run: no re-upload
    p = subprocess.run([sys.executable, str(REPO / "jobs" / "register.py"), "--name", "reg-test-tiny",
                        "--alias", "production", "--version", v1], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert client.get_model_version_by_alias("reg-test-tiny", "production").version == v1
    assert client.get_model_version_by_alias("reg-test-tiny", "candidate").version == v2
    assert registry.resolve_model("models:/reg-test-tiny@candidate", cache_dir=cache).name == f"v{v2}"


def test_register_links_to_producing_run(mlflow_server, tiny_hf_checkpoint, tmp_path):
    """A checkpoint dir carrying polyko_run.json gets its files logged under that run."""
    import shutil

    from polyko import tracking

    ckpt = tmp_path / "export"
    shutil.copytree(tiny_hf_checkpoint, ckpt)
    with tracking.start_run("checkpoint", {"export": str(ckpt)}, output=ckpt) as run:
        pass
    v = registry.register_checkpoint(ckpt, "reg-test-linked")
    from mlflow import MlflowClient

    mv = MlflowClient().get_model_version("reg-test-linked", v)
    assert mv.run_id == run.info.run_id
    got = registry.resolve_model("models:/reg-test-linked", cache_dir=tmp_path / "cache")
    assert json.loads((got / "polyko_run.json").read_text())["run_id"] == run.info.run_id  # lineage travels


def test_registry_errors(mlflow_server, tmp_path, tiny_hf_checkpoint):
    with pytest.raises(ValueError, match="no config.json"):
        registry.register_checkpoint(tmp_path, "reg-test-bad")
    with pytest.raises(ValueError, match="model name"):
        registry.register_checkpoint(tiny_hf_checkpoint, "bad name!")
    with pytest.raises(ValueError, match="cannot resolve"):
        registry.resolve_model("models:/no-such-model@candidate", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="neither a directory"):
        registry.resolve_model("s3-bucket/whatever", cache_dir=tmp_path)
    assert registry.resolve_model(str(tiny_hf_checkpoint)) == tiny_hf_checkpoint.resolve()
