"""Slow resharding/export tests (``pytest -m slow tests/test_reshard_slow.py``).

* A conversion slower than ``fault.hang_timeout_s`` completes without a restart loop: a 1-worker
  ZeRO-2 checkpoint is resumed by a 2-worker group on a real local Ray cluster while a conversion
  of it, started ahead and slowed by a chaos delay to 3x the hang timeout, is still running. The ranks
  wait for it through its lease (no collective), load the universal checkpoint and continue the
  uninterrupted run's losses; exactly one conversion happened.
* Exporting ``50m`` from a 2-worker ZeRO-3 checkpoint holds at most 0.6x the model's fp32 bytes on top of
  the process's imports, and writes exactly DeepSpeed's consolidated weights.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from polyko.train import checkpoint as ckpt_io
from polyko.train.config import (BatchConfig, CheckpointConfig, DataConfig, DeepSpeedConfig, FaultConfig,
                                 OptimConfig, PretrainConfig, ScalingConfig)
from polyko.train.metrics import read_jsonl

from test_train import tokens_dir  # noqa: F401  (fixture)
from train_helpers import make_checkpoint

pytestmark = pytest.mark.slow
HANG_S = 15
DELAY_S = 45


def test_reshard_slower_than_hang_timeout_completes(tokens_dir, polyglot_tokenizer_dir, tmp_path, mlflow_server,  # noqa: F811
                                                    module_work_dir, ray_local):  # noqa: F811
    from polyko.train import pretrain

    last = make_checkpoint(tmp_path / "ref", tokens_dir, polyglot_tokenizer_dir, workers=1, zero_stage=2, steps=4,
                           every_steps=2)
    ref_h = read_jsonl(tmp_path / "ref" / "run" / "metrics.jsonl")
    ckpt = tmp_path / "from" / "step_000002"
    shutil.copytree(last.parent / "step_000002", ckpt)
    uni = ckpt / ckpt_io.UNIVERSAL
    code = ("import sys; from polyko.train.checkpoint import reshard; "
            f"reshard(sys.argv[1], timeout_s=900, chaos_delay_s={DELAY_S})")
    slow = subprocess.Popen([sys.executable, "-c", code, str(ckpt)], stdout=open(tmp_path / "slow.log", "w"),
                            stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and (ckpt_io.latest_lease(uni)[1] or {}).get("state") != "converting":
            assert slow.poll() is None, (tmp_path / "slow.log").read_text()
            time.sleep(0.5)

        out = tmp_path / "resumed"
        cfg = PretrainConfig(
            data=DataConfig(path=str(tokens_dir), tokenizer=str(polyglot_tokenizer_dir)),
            optim=OptimConfig(lr=3e-3, warmup_steps=1), batch=BatchConfig(global_batch_tokens=4 * 64, micro_batch=2),
            deepspeed=DeepSpeedConfig(zero_stage=2),
            checkpoint=CheckpointConfig(every_steps=2, keep=1, resume_from=str(ckpt)),
            fault=FaultConfig(max_failures=2, hang_timeout_s=HANG_S), scaling=ScalingConfig(num_workers=2),
            steps=4, output=str(out), run_name="slow-reshard", export=False)
        t0 = time.time()
        res = pretrain(cfg)
        waited = time.time() - t0
        assert slow.wait(120) == 0
    finally:
        if slow.poll() is None:
            slow.kill()
    assert res.steps == 4
    lines = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert lines == [3, 4], lines                     # no restart: every step ran once
    h = read_jsonl(out / "metrics.jsonl")
    assert h[3]["world_size"] == 2
    for s in (3, 4):                                  # the uninterrupted 1-worker run's losses, continued on 2
        assert h[s]["loss"] == pytest.approx(ref_h[s]["loss"], rel=1e-4)
    gen, lease = ckpt_io.latest_lease(uni)
    assert gen == 1 and lease["state"] == "done"      # exactly one conversion, the one started ahead
    assert waited > HANG_S and (uni / ckpt_io.DONE).is_file()


CHILD = r"""
import json, resource, sys
import torch, transformers, deepspeed.utils.zero_to_fp32
from transformers import AutoTokenizer, GPTNeoXForCausalLM
from polyko.train.export import export_hf
base = int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()
export_hf(sys.argv[1], sys.argv[2], link_run=False)
print(json.dumps({"base": base, "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def test_export_50m_zero3_in_bounded_memory(tokens_dir, polyglot_tokenizer_dir, tmp_path):  # noqa: F811
    from safetensors.torch import load_file

    from polyko.train.export import consolidated_state_dict

    ckpt = make_checkpoint(tmp_path / "z3", tokens_dir, polyglot_tokenizer_dir, workers=2, zero_stage=3, size="50m",
                           steps=1)
    out = tmp_path / "hf"
    r = subprocess.run([sys.executable, "-c", CHILD, str(ckpt), str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads(r.stdout.strip().splitlines()[-1])
    ref = consolidated_state_dict(ckpt)
    fp32 = sum(v.numel() * 4 for v in ref.values())
    assert fp32 > 200e6
    assert (m["peak"] - m["base"]) / fp32 <= 0.6, m
    got = {}
    for f in sorted(Path(out).glob("*.safetensors")):
        got.update(load_file(f))
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
