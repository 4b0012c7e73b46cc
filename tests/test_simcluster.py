"""The headline command on simulated GPU clusters (``polyko.simcluster``: a CPU head with no GPU, GPU nodes that
declare ``accelerator_type`` resources, separate raylets on one machine, no GPU on the driver), slow:
``pytest -m slow tests/test_simcluster.py``.

* ``ray job submit -- python jobs/pretrain.py --size 12.8b --dry-run`` on 2 x 8 H100: the driver (on the CPU head)
  reports the plan and 8 workers on each GPU node without allocating the model; the same command without
  ``--dry-run`` on too few GPUs fails fast with the plan.
* A node lost from a 3-node cluster mid-run, with a global batch no worker count in the range divides: the
  run continues on the remaining nodes with the same global batch at every step.
* Run identity: more steps and fewer workers continue the same run directory and MLflow run.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

from polyko.simcluster import SimCluster
from polyko.train.metrics import read_jsonl

from train_helpers import make_work_dir

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def work(tmp_path_factory, polyglot_tokenizer_dir, corpus_dir) -> Path:
    """A work dir with prepared tokens at <work dir>/data/tokens (the defaults of --data/--tokenizer)."""
    return make_work_dir(tmp_path_factory.mktemp("simwork"), polyglot_tokenizer_dir, corpus_dir, max_sequences=96)


def _driver(cluster: SimCluster, args: list[str], work: Path, timeout: int = 600, **env) -> subprocess.CompletedProcess:
    """``python jobs/pretrain.py ARGS`` as `ray job submit` runs it: RAY_ADDRESS set, the repository as cwd."""
    return subprocess.run([sys.executable, "jobs/pretrain.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=dict(cluster.env, RAY_ADDRESS=cluster.address,
                                                    POLYKO_WORK_DIR=str(work), **env))


@pytest.fixture(scope="module")
def h100x16():
    import ray

    ray.shutdown()
    with SimCluster() as c:
        for _ in range(2):
            c.add_node(gpus=8, accelerator="H100")
        yield c


def test_headline_command_is_gated_by_the_plan_on_a_simulated_cluster(h100x16, work):
    c = h100x16
    env = {"POLYKO_WORK_DIR": str(work), "HF_HUB_OFFLINE": "1"}
    cmd = [str(BIN / "ray"), "job", "submit", "--address", c.dashboard_url, "--working-dir", str(REPO),
           "--runtime-env-json", json.dumps({"env_vars": env, "excludes": [".git", "work", "tests"]}), "--",
           "python", "jobs/pretrain.py", "--size", "12.8b", "--dry-run"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=c.env, timeout=600)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-5000:]
    assert "polyko plan: 12.8b on 16 x h100" in log and "16 (fixed)" in log     # one worker per GPU
    # Ray placed 8 workers on each GPU node, none on the head.
    per_node = [line for line in log.splitlines() if "workers per node" in line]
    assert per_node and per_node[0].count(": 8") == 2, per_node
    for needle in ("(simulated GPUs)", "ZeRO stage", "accumulation per worker", "GB every", "s to write",
                   "resharding", "Ray accelerator_type H100"):
        assert needle in log, needle

    # The same command as a plain driver: no --dry-run, on 2 GPUs of the 16: fails fast, with the plan,
    # before any worker starts (and without building a 52 GB model: the driver stays small).
    t0 = time.time()
    r = _driver(c, ["--size", "12.8b", "--num-workers", "2"], work)
    assert r.returncode == 2, r.stdout[-3000:] + r.stderr[-3000:]
    assert "does not fit on 2 workers x h100" in r.stderr and "memory per GPU" in r.stderr
    assert time.time() - t0 < 300
    # Fits on all 16: refused only because these GPUs are simulated, with the deployment printed.
    r = _driver(c, ["--size", "12.8b"], work)
    assert r.returncode == 2 and "GPUs are simulated" in r.stderr and "--simulated-gpus" in r.stderr
    assert "polyko plan: 12.8b on 16 x h100" in r.stderr
    # Peak RSS of the largest driver child: imports and the meta-device parameter count, no 12.8b tensors.
    assert resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss < 4 * 2**20  # KiB -> < 4 GiB


def test_node_loss_with_an_uneven_worker_count_keeps_the_global_batch(work, tmp_path):
    """Three 1-GPU nodes, a global batch of 5 sequences (3 workers: 2+2+1; 2 workers: 3+2): a node is lost after
    step 4 and the run finishes elastically on 2 workers, every step with the same 5 x 64 tokens."""
    import ray

    ray.shutdown()
    steps = 10
    env = {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "20", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "1",
           "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}
    with SimCluster(env=env) as c:
        for _ in range(3):
            c.add_node(gpus=1, accelerator="A100-80G", cpus=1)
        out = tmp_path / "run"
        cmd = [sys.executable, "jobs/pretrain.py", "--size", "tiny", "--simulated-gpus", "--min-workers", "1",
               "--steps", str(steps), "--output", str(out), "--set", "batch.global_batch_tokens=320",
               "--set", "batch.micro_batch=2", "--set", "deepspeed.precision=fp32",
               "--set", "checkpoint.every_steps=2", "--set", "fault.max_failures=3", "--set", "export=false"]
        log = open(tmp_path / "driver.log", "w")
        driver = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                  env=dict(c.env, RAY_ADDRESS=c.address, POLYKO_WORK_DIR=str(work)))
        try:
            deadline = time.time() + 900
            while time.time() < deadline and max(read_jsonl(out / "metrics.jsonl") or {0: 0}) < 4:
                assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-5000:]
                time.sleep(1)
            assert read_jsonl(out / "metrics.jsonl")[4]["world_size"] == 3
            c.remove_node(2)                                   # a whole GPU node is gone
            assert driver.wait(900) == 0, (tmp_path / "driver.log").read_text()[-5000:]
        finally:
            if driver.poll() is None:
                driver.kill()
    h = read_jsonl(out / "metrics.jsonl")
    text = (tmp_path / "driver.log").read_text()
    assert "elastic 1..3" in text and "a100-80gb" in text      # the range came from the cluster's 3 GPUs
    assert sorted(h) == list(range(1, steps + 1))
    assert h[steps]["world_size"] == 2
    assert all(h[s]["tokens_seen"] == s * 5 * 64 for s in h)   # the same global batch before and after
    assert h[steps]["loss"] < h[1]["loss"]


def test_more_steps_and_fewer_workers_continue_the_same_run(work, tmp_path, mlflow_server):
    """Same trajectory, other steps and worker count: the second command continues the first one's run directory
    (from its step-2 checkpoint) and MLflow run instead of starting over."""
    import ray

    ray.shutdown()
    wd = tmp_path / "wd"
    wd.mkdir()
    (wd / "data").symlink_to(work / "data")
    base = ["--size", "tiny", "--cpu", "--set", "batch.global_batch_tokens=256", "--set", "checkpoint.every_steps=2",
            "--set", "export=false"]
    env = dict(os.environ, POLYKO_WORK_DIR=str(wd), RAY_AUTH_MODE="disabled", PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)
    runs = []
    for extra in (["--steps", "2", "--num-workers", "2"], ["--steps", "4", "--num-workers", "1"]):
        r = subprocess.run([sys.executable, "jobs/pretrain.py", *base, *extra], cwd=REPO, capture_output=True,
                           text=True, timeout=900, env=env)
        assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
        runs.append(r.stdout + r.stderr)
    dirs = list((wd / "pretrain").iterdir())
    assert len(dirs) == 1                                      # one run directory for both commands
    h = read_jsonl(dirs[0] / "metrics.jsonl")
    assert sorted(h) == [1, 2, 3, 4] and h[2]["world_size"] == 2 and h[4]["world_size"] == 1
    assert "resumed from" in runs[1] and "at step 2" in runs[1]
    from mlflow.tracking import MlflowClient

    marker = json.loads((dirs[0] / "polyko_run.json").read_text())
    run = MlflowClient(tracking_uri=mlflow_server).get_run(marker["run_id"])
    assert run.data.tags["polyko.attempts"] == "2"
    history = MlflowClient(tracking_uri=mlflow_server).get_metric_history(marker["run_id"], "loss")
    assert sorted({m.step for m in history}) == [1, 2, 3, 4]   # the second attempt logged into the same run
