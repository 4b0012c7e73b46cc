"""The README's first command, end to end, in a fresh process: sample corpus -> clean/dedup ->
tokenizer -> packed shards -> pretrain tiny -> HF export, with MLflow lineage from the checkpoint back
to the data. Slow (a few minutes on 2 cores): run with ``pytest -m slow``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quickstart_end_to_end(tmp_path, monkeypatch):
    work = tmp_path / "qs"
    env = dict(os.environ, POLYKO_WORK_DIR=str(work))
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run([sys.executable, str(REPO / "jobs" / "quickstart.py"), "--work-dir", str(work),
                           "--steps", "10"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "mlflow ui --backend-store-uri sqlite:///" in proc.stdout

    stats = json.loads((work / "data" / "stats.json").read_text())
    assert stats["documents_out"] < stats["documents_in"]              # the sample is dirty on purpose
    assert sum(stats["duplicates_removed"].values()) > 0
    assert all(stats["pii_masked"][k] > 0 for k in ("tel", "rrn", "acc", "email"))
    assert sum(stats["bad_records"].values()) > 0                      # bad.jsonl is quarantined ...
    assert any((work / "data" / "rejected").glob("*.parquet"))          # ... not lost
    manifest = json.loads((work / "data" / "tokens" / "manifest.json").read_text())
    assert manifest["num_sequences"] > 0 and manifest["seq_len"] == 256

    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = work / "pretrain" / "hf"
    model = AutoModelForCausalLM.from_pretrained(hf)
    tok = AutoTokenizer.from_pretrained(hf)
    ids = tok("대한민국의 수도는", return_tensors="pt").input_ids
    assert model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False).shape[1] == ids.shape[1] + 4

    import mlflow

    from polyko import tracking

    os.environ["POLYKO_WORK_DIR"] = str(work)
    # the quickstart ran without MLFLOW_TRACKING_URI (its own sqlite store); a session's MLflow server
    # fixture may have set it in this process
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    try:
        mlflow.set_tracking_uri(tracking.tracking_uri())
        lineage = tracking.lineage(hf)
        assert {"data", "tokenizer", "pretrain"} <= set(lineage), lineage
        pre = mlflow.get_run(lineage["pretrain"])
        assert pre.data.tags["polyko.parent.data"] == lineage["data"]
        assert pre.data.tags["polyko.parent.tokenizer"] == lineage["tokenizer"]
        assert "loss" in pre.data.metrics
    finally:
        os.environ.pop("POLYKO_WORK_DIR", None)

    # Re-running finds every stage done and trains nothing new.
    again = subprocess.run([sys.executable, str(REPO / "jobs" / "quickstart.py"), "--work-dir", str(work),
                            "--steps", "10"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1500)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "skipped" in (again.stdout + again.stderr).lower()
