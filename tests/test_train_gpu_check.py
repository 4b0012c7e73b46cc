"""``benchmarks/gpu_check.sh --dry-run``: the GPU check's whole path on a CPU (tiny model, fp32, gloo): the
production train loop in a plain torch.distributed world, a resume from its own checkpoint, an HF export
loaded back, and a bare eager loop; one JSON line. Slow (~1-2 min): ``pytest -m slow tests/test_train_gpu_check.py``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run():
    r = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--dry-run"], capture_output=True,
                       text=True, timeout=900, env={**os.environ, "PYTHON": sys.executable})
    assert r.returncode == 0, r.stderr[-4000:]
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1, r.stdout[-2000:]
    res = json.loads(lines[0])
    prod = res["production"]
    assert prod["status"] == "ok" and prod["group"] == "production" and prod["ckpt"] is True
    assert prod["resumed_steps"] == [5, 6] and prod["checkpoint_step"] == 6       # 1 warm-up + 3 timed, +2 resumed
    assert prod["tokens_per_s"] > 0 and prod["export_gib"] > 0
    assert abs(prod["export_loss"] - prod["resumed_loss"]) < 1.0                   # the export holds the trained weights
    assert res["production_vs_eager"] > 0 and "error" not in res
