"""Shared fixtures: the real shared data, a private local Ray cluster, a real MLflow server.

Nothing here is mocked. Hubs are off (HF_HUB_OFFLINE=1): every test runs on local data only.
Set POLYKO_SHARED_DATA to point at the data if it is not at ../shared/data beside the repo.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# Keep runs made by tests out of the user's ./work: tests that need MLflow use the mlflow_server fixture.
os.environ.pop("MLFLOW_TRACKING_URI", None)

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("POLYKO_SHARED_DATA", REPO.parent / "shared" / "data")).resolve()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data``: KoBEST, the real Korean corpus, the Polyglot-Ko tokenizer and configs."""
    if not (SHARED / "README.md").is_file():
        pytest.fail(f"shared data not found at {SHARED}; set POLYKO_SHARED_DATA")
    return SHARED


@pytest.fixture(scope="session")
def corpus_dir(shared_data) -> Path:
    return shared_data / "corpus"


@pytest.fixture(scope="session")
def kobest_dir(shared_data) -> Path:
    return shared_data / "kobest"


@pytest.fixture(scope="session")
def polyglot_tokenizer_dir(shared_data) -> Path:
    """The released Polyglot-Ko tokenizer files (tokenizer.json + special tokens)."""
    return shared_data / "reference" / "polyglot-ko-tokenizer"


@pytest.fixture()
def ray_local():
    """A private local Ray cluster (2 CPUs), reused across tests: started on first use, and again
    after a test that shut it down (tests needing a multi-node cluster call ``ray.shutdown()``)."""
    import ray

    from polyko.cluster import init_ray

    if not ray.is_initialized():
        init_ray(num_cpus=2)
    yield ray


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real ``mlflow server`` on 127.0.0.1 with a sqlite backend; sets MLFLOW_TRACKING_URI for the
    session (Ray workers started afterwards inherit it). Yields the URI."""
    root = tmp_path_factory.mktemp("mlflow")
    from polyko.cluster import free_port

    port = free_port()
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    mlflow_bin = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or "mlflow"
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(
        [mlflow_bin, "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    import requests

    deadline = time.time() + 90
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited: {(root / 'server.log').read_text()[-2000:]}")
        try:
            if requests.get(uri + "/health", timeout=2).ok:
                break
        except requests.RequestException:
            pass
        time.sleep(0.5)
    else:
        proc.kill()
        raise RuntimeError("mlflow server did not come up in 90 s")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        yield uri
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        os.killpg(proc.pid, 15)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)


@pytest.fixture()
def work_dir(tmp_path, monkeypatch):
    """A private POLYKO_WORK_DIR (embedded sqlite MLflow store lands here when no server is set)."""
    monkeypatch.setenv("POLYKO_WORK_DIR", str(tmp_path / "work"))
    return tmp_path / "work"


@pytest.fixture(scope="module")
def gloo_world():
    """torch.distributed with gloo, world size 1, in this process (what a single Ray Train worker has), for the
    tests of one module that drive a real DeepSpeed engine in-process."""
    import importlib

    import torch.distributed as dist

    from polyko.cluster import free_port

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None  # no JIT of an unused op
    import deepspeed
    import deepspeed.utils.groups as ds_groups

    if dist.is_initialized():
        yield
        return
    saved = dict(os.environ)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    deepspeed.init_distributed(dist_backend="gloo")
    try:
        yield
    finally:
        # Leave no world behind: a later subprocess (lm-eval, accelerate) would read these and join it. DeepSpeed
        # caches its clone of the world group: a later world must not be handed this one's.
        dist.destroy_process_group()
        ds_groups._WORLD_GROUP = None
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture(scope="module")
def module_work_dir(tmp_path_factory):
    """A private POLYKO_WORK_DIR shared by the tests of one module (runs named by their config land here)."""
    mp = pytest.MonkeyPatch()
    wd = tmp_path_factory.mktemp("work")
    mp.setenv("POLYKO_WORK_DIR", str(wd))
    yield wd
    mp.undo()


@pytest.fixture(scope="session")
def make_tiny_checkpoint(tmp_path_factory, polyglot_tokenizer_dir):
    """``make(seed) -> Path``: a small HF-format GPT-NeoX checkpoint (``tiny`` preset, random weights
    seeded by ``seed``, safetensors) with the real Polyglot-Ko tokenizer, ``<|endoftext|>`` (id 2) as
    eos. For eval/serve tests that need a real model and a real Korean tokenizer but not a trained one."""

    def make(seed: int = 0) -> Path:
        import torch
        from transformers import AutoTokenizer

        from polyko.model import build_config, build_model

        out = tmp_path_factory.mktemp(f"tiny_hf_seed{seed}")
        tok = AutoTokenizer.from_pretrained(str(polyglot_tokenizer_dir))
        tok.eos_token = "<|endoftext|>"
        tok.pad_token = "<pad>"
        torch.manual_seed(seed)
        model = build_model(build_config("tiny"))
        model.generation_config.eos_token_id = tok.eos_token_id
        model.generation_config.pad_token_id = tok.pad_token_id
        model.save_pretrained(out, safe_serialization=True)
        tok.save_pretrained(out)
        return out

    return make


@pytest.fixture(scope="session")
def tiny_hf_checkpoint(make_tiny_checkpoint) -> Path:
    """The seed-0 checkpoint of :func:`make_tiny_checkpoint`, shared by the whole session."""
    return make_tiny_checkpoint(0)
