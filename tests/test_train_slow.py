"""Slow pretraining tests (``pytest -m slow tests/test_train_slow.py``): a hung worker is detected and the
group restarted; ``ray job submit`` end to end against a ``ray start`` cluster on non-default ports; a
killed worker node on a two-node cluster is survived by elastic training on fewer workers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from polyko.cluster import free_port, stop_process_group
from polyko.train.config import FaultConfig, ScalingConfig
from polyko.train.metrics import read_jsonl

from test_train import base_config, tokens_dir  # noqa: F401  (fixture)

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def test_hung_worker_is_detected_and_restarted(tokens_dir, polyglot_tokenizer_dir, tmp_path, module_work_dir,  # noqa: F811
                                               ray_local):
    """Rank 1 blocks forever before step 3: rank 0's ZeRO all-reduce times out after hang_timeout_s (not gloo's
    default 30 minutes), Ray Train restarts the group from the step-2 checkpoint and the run finishes."""
    from polyko.train import pretrain

    out = tmp_path / "hang"
    cfg = base_config(tokens_dir, polyglot_tokenizer_dir, out, steps=6, export=False,
                      fault=FaultConfig(max_failures=1, hang_timeout_s=20, inject="hang@3:1"))
    t0 = time.time()
    res = pretrain(cfg)
    assert (out / "fault-fired-hang-3-1").exists()
    assert res.steps == 6 and sorted(read_jsonl(out / "metrics.jsonl")) == list(range(1, 7))
    assert time.time() - t0 < 600


def _ray_start(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    """``ray start ... --block`` in its own process group (killing the group stops exactly this node)."""
    return subprocess.Popen([str(BIN / "ray"), "start", "--block", "--disable-usage-stats", *args],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _node_ports() -> list[str]:
    # Every node on one machine needs its own agent/metrics ports (the defaults would clash).
    return [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}"]



@pytest.fixture(scope="module")
def two_node_cluster(tmp_path_factory):
    """A head with no CPUs plus two 1-CPU worker nodes (separate raylets), all on non-default ports."""
    import ray

    ray.shutdown()  # this test module drives its own cluster
    root = Path(tempfile_dir := f"/tmp/pk{os.getpid()}")
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir()
    env = dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}", RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S="20",
               RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="1", PYTHONUNBUFFERED="1",
               # `ray start --head` turns token auth on by default in Ray 2.60; nodes, drivers and `ray job`
               # would then all need the token. A private test cluster on 127.0.0.1 opts out.
               RAY_AUTH_MODE="disabled")
    env.pop("RAY_ADDRESS", None)
    port, dash = free_port(), free_port()
    head = _ray_start(["--head", "--num-cpus=0", f"--port={port}", f"--dashboard-port={dash}",
                       "--dashboard-host=127.0.0.1", f"--ray-client-server-port={free_port()}",
                       f"--temp-dir={tempfile_dir}", *_node_ports()], env, root / "head.log")
    workers: list[subprocess.Popen] = []

    def cpus() -> str:
        r = subprocess.run([str(BIN / "ray"), "status", f"--address=127.0.0.1:{port}"], capture_output=True,
                           text=True, env=env)
        return r.stdout

    deadline = time.time() + 180
    while time.time() < deadline and "Node status" not in cpus():  # the head (GCS) is up
        assert head.poll() is None, (root / "head.log").read_text()[-3000:]
        time.sleep(3)
    # Worker raylets must register within Ray's fixed 30 s; on a loaded machine a start can miss it: retry.
    for i in range(2):
        for attempt in range(4):
            # A temp dir per node: nodes sharing one would share runtime_resources/, and one node's runtime-env
            # agent re-extracting the job's working_dir pulls it from under the others' processes.
            w = _ray_start([f"--address=127.0.0.1:{port}", "--num-cpus=1", f"--temp-dir={root}/w{i}", *_node_ports()],
                           env, root / f"w{i}-{attempt}.log")
            deadline = time.time() + 150
            while time.time() < deadline and w.poll() is None and f"/{i + 1}.0 CPU" not in cpus():
                time.sleep(3)
            if w.poll() is None and f"/{i + 1}.0 CPU" in cpus():
                workers.append(w)
                break
            stop_process_group(w)
        else:
            for p in [head, *workers]:
                stop_process_group(p)
            pytest.fail(f"worker node {i} did not come up: {cpus()}")
    yield {"gcs": f"127.0.0.1:{port}", "dashboard": f"http://127.0.0.1:{dash}", "env": env, "head": head,
           "workers": workers}
    for p in [*workers, head]:
        stop_process_group(p)
    shutil.rmtree(root, ignore_errors=True)


def test_ray_job_submit_end_to_end(two_node_cluster, tokens_dir, polyglot_tokenizer_dir, tmp_path):  # noqa: F811
    c = two_node_cluster
    out = tmp_path / "job"
    runtime_env = {"env_vars": {"POLYKO_WORK_DIR": str(tmp_path / "work"), "HF_HUB_OFFLINE": "1",
                                "TRANSFORMERS_OFFLINE": "1", "DS_ACCELERATOR": "cpu"}}
    cmd = [str(BIN / "ray"), "job", "submit", "--address", c["dashboard"], "--working-dir", str(REPO),
           "--runtime-env-json", json.dumps(runtime_env), "--",
           "python", "jobs/pretrain.py", "--size", "tiny", "--data", str(tokens_dir), "--tokenizer",
           str(polyglot_tokenizer_dir), "--steps", "4", "--num-workers", "2", "--output", str(out),
           "--set", "batch.global_batch_tokens=1024", "--set", "checkpoint.every_steps=2"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=c["env"], timeout=900)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-5000:]
    assert "[polyko] step 4/4 " in log and "succeeded" in log          # progress streamed to the job log
    assert (out / "hf" / "model.safetensors").is_file()
    assert sorted(read_jsonl(out / "metrics.jsonl")) == [1, 2, 3, 4]


def test_killed_node_is_survived_elastically(two_node_cluster, tokens_dir, polyglot_tokenizer_dir, tmp_path):  # noqa: F811
    """Elastic 1..2 workers on two 1-CPU nodes; one node is killed mid-run: Ray Train restarts on the
    surviving node with 1 worker, reshards the 2-worker ZeRO-2 checkpoint and finishes all steps."""
    c = two_node_cluster
    out = tmp_path / "elastic"
    steps = 14
    cmd = [sys.executable, str(REPO / "jobs" / "pretrain.py"), "--size", "tiny", "--data", str(tokens_dir),
           "--tokenizer", str(polyglot_tokenizer_dir), "--steps", str(steps), "--min-workers", "1",
           "--max-workers", "2", "--output", str(out), "--ray-address", c["gcs"],
           "--set", "batch.global_batch_tokens=1024", "--set", "checkpoint.every_steps=2",
           "--set", "fault.max_failures=3"]
    env = dict(c["env"], POLYKO_WORK_DIR=str(tmp_path / "work"))
    driver = subprocess.Popen(cmd, stdout=open(tmp_path / "driver.log", "w"), stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.time() + 600
        while time.time() < deadline and max(read_jsonl(out / "metrics.jsonl") or {0: 0}) < 4:
            assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-5000:]
            time.sleep(1)
        assert read_jsonl(out / "metrics.jsonl")[4]["world_size"] == 2
        stop_process_group(c["workers"][1])                                     # a whole node dies
        assert driver.wait(900) == 0, (tmp_path / "driver.log").read_text()[-5000:]
    finally:
        if driver.poll() is None:
            driver.kill()
    h = read_jsonl(out / "metrics.jsonl")
    assert sorted(h) == list(range(1, steps + 1))
    assert h[steps]["world_size"] == 1 and h[steps]["loss"] < h[1]["loss"]
    assert "resharding" in (tmp_path / "driver.log").read_text()
