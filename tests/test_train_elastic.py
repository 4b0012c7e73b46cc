"""Worker-count independence on a real local Ray cluster with the real DeepSpeed engine (CPU, gloo).

A global batch of 5 sequences on 2 workers splits 3 + 2; with ``micro_batch=1`` every rank runs 3
micro-steps, rank 1's last one a zero-weight pad. That run (ZeRO-3) must take the same per-step losses
as the same config on 1 worker (ZeRO-0, micro-batch 2: 2 + 2 + 1), up to float summation order. Its
checkpoint records every process group's collective timeout (Ray's default group and DeepSpeed's own):
all must be ``fault.hang_timeout_s``. A resume on another seed or data set is refused, naming it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from polyko.config import to_dict
from polyko.train import checkpoint as ckpt_io
from polyko.train.config import (BatchConfig, CheckpointConfig, DataConfig, DeepSpeedConfig, FaultConfig,
                                 OptimConfig, PretrainConfig, ScalingConfig)
from polyko.train.loop import resume_mismatches
from polyko.train.metrics import read_jsonl

from test_train import tokens_dir  # noqa: F401  (fixture)

STEPS = 3
HANG_S = 97  # distinct from every default (gloo/NCCL 1800 s, ours 600 s)


def uneven_config(tokens, tokenizer, out: Path, **kw) -> PretrainConfig:
    cfg = PretrainConfig(
        data=DataConfig(path=str(tokens), tokenizer=str(tokenizer)),
        optim=OptimConfig(lr=3e-3, warmup_steps=1),
        batch=BatchConfig(global_batch_tokens=5 * 64, micro_batch=1),
        deepspeed=DeepSpeedConfig(zero_stage=3),
        checkpoint=CheckpointConfig(every_steps=STEPS, keep=1),
        fault=FaultConfig(max_failures=0, hang_timeout_s=HANG_S),
        scaling=ScalingConfig(num_workers=2),
        steps=STEPS, output=str(out), run_name="uneven", export=False)
    return replace(cfg, **kw)


def run_local(cfg: PretrainConfig, out: Path) -> subprocess.CompletedProcess:
    """The same train loop in a plain one-process torch.distributed world (``LocalContext``), in a child."""
    code = ("import json, sys; from polyko.train.loop import train_loop, LocalContext; "
            "c = json.loads(sys.argv[1]); train_loop(c, LocalContext(c['output']))")
    arg = json.dumps({"config": to_dict(cfg.resolved()), "output": str(out), "run_name": "local"})
    return subprocess.run([sys.executable, "-c", code, arg], capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "DS_ACCELERATOR": "cpu"})


@pytest.fixture(scope="module")
def uneven_run(tmp_path_factory, tokens_dir, polyglot_tokenizer_dir, mlflow_server, module_work_dir):  # noqa: F811
    import ray

    from polyko.cluster import init_ray
    from polyko.train import pretrain

    if not ray.is_initialized():
        init_ray(num_cpus=2)
    out = tmp_path_factory.mktemp("uneven")
    return pretrain(uneven_config(tokens_dir, polyglot_tokenizer_dir, out))


def test_uneven_worker_count_takes_the_same_steps(uneven_run, tokens_dir, polyglot_tokenizer_dir, tmp_path):  # noqa: F811
    out = tmp_path / "one"
    cfg = uneven_config(tokens_dir, polyglot_tokenizer_dir, out, scaling=ScalingConfig(num_workers=1),
                        batch=BatchConfig(global_batch_tokens=5 * 64, micro_batch=2),
                        deepspeed=DeepSpeedConfig(zero_stage=0))
    r = run_local(cfg, out)
    assert r.returncode == 0, r.stderr[-3000:]
    two, one = read_jsonl(uneven_run.output / "metrics.jsonl"), read_jsonl(out / "metrics.jsonl")
    assert sorted(two) == sorted(one) == list(range(1, STEPS + 1)) and two[1]["world_size"] == 2
    for s in range(1, STEPS + 1):
        assert two[s]["loss"] == pytest.approx(one[s]["loss"], rel=1e-5), s
        assert two[s]["tokens_seen"] == one[s]["tokens_seen"] == s * 5 * 64
    assert one[STEPS]["loss"] < one[1]["loss"]                     # the steps do train


def test_every_process_group_has_the_hang_timeout(uneven_run):
    timeouts = ckpt_io.validate(uneven_run.checkpoint_dir)["process_group_timeouts_s"]
    assert len(timeouts) >= 2, timeouts          # Ray Train's default group + DeepSpeed's data-parallel groups
    assert set(timeouts.values()) == {HANG_S}, timeouts


def test_resume_with_other_data_or_seed_is_refused(uneven_run, tokens_dir, polyglot_tokenizer_dir, tmp_path,  # noqa: F811
                                                   corpus_dir):
    from train_helpers import make_tokens

    step = uneven_run.checkpoint_dir
    meta = ckpt_io.validate(step)
    cfg = uneven_config(tokens_dir, polyglot_tokenizer_dir, tmp_path, steps=STEPS + 1).resolved()
    current = dict(data_manifest=meta["data_manifest"], global_batch=5, seq_len=64)
    assert resume_mismatches(meta, cfg, **current) == []
    assert resume_mismatches(meta, replace(cfg, seed=1), **current) == ["seed 0 != 1"]
    assert resume_mismatches(meta, cfg, **dict(current, global_batch=6)) == ["global batch 5 != 6 sequences"]
    # Another data set (fewer sequences, so another manifest) through the real loop: refused before training.
    other = make_tokens(tmp_path / "other", polyglot_tokenizer_dir, corpus_dir, max_sequences=200)
    out = tmp_path / "refused"
    bad = uneven_config(other, polyglot_tokenizer_dir, out, scaling=ScalingConfig(num_workers=1), steps=STEPS + 1,
                        seed=3, checkpoint=CheckpointConfig(every_steps=STEPS, keep=1, resume_from=str(step)))
    r = run_local(bad, out)
    assert r.returncode != 0
    assert "was trained with other settings: data manifest" in r.stderr and "seed 0 != 3" in r.stderr
    assert "checkpoint.allow_mismatch" in r.stderr and not (out / "metrics.jsonl").exists()
    # The explicit override continues it (1 worker, resharded from the 2-worker ZeRO-3 checkpoint), logged.
    ok = replace(bad, checkpoint=replace(bad.checkpoint, allow_mismatch=True))
    r = run_local(ok, out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "despite: data manifest" in r.stdout + r.stderr
    assert sorted(read_jsonl(out / "metrics.jsonl")) == [STEPS + 1]
