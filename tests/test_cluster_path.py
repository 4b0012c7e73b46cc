"""The driver's side of the cluster path: inputs default to what the user prepared, the run's identity, and the
decisions taken from what a real Ray cluster reports (GPUs, accelerator type, memory) before any worker starts.

The GPU decisions run on a real one-node local Ray cluster whose node declares 8 simulated H100s the way
``polyko.simcluster`` nodes do (Ray's ``accelerator_type:H100`` resource plus the simulated marker); the driver
itself has no GPU. The full multi-node versions (a CPU head, ``ray job submit``, node loss) are in
``tests/test_simcluster.py`` (slow).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from polyko.train.config import (BatchConfig, CheckpointConfig, DataConfig, DeepSpeedConfig, FaultConfig,
                                 ModelConfig, OptimConfig, PretrainConfig, ScalingConfig)
from polyko.train.trainer import default_data, deploy, preflight, resolve_inputs, run_paths

from train_helpers import make_work_dir


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, polyglot_tokenizer_dir, corpus_dir) -> Path:
    """A work dir laid out as `jobs/prepare_data.py --output <work dir>/data --tokenizer ...` leaves it."""
    return make_work_dir(tmp_path_factory.mktemp("work"), polyglot_tokenizer_dir, corpus_dir, max_sequences=64)


def test_data_and_tokenizer_default_to_the_prepared_tokens(prepared, polyglot_tokenizer_dir, shared_data,
                                                           tmp_path, monkeypatch):
    monkeypatch.delenv("POLYKO_DATA", raising=False)
    monkeypatch.setenv("POLYKO_WORK_DIR", str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="no packed tokens found.*prepare_data.py"):
        resolve_inputs(PretrainConfig())
    monkeypatch.setenv("POLYKO_WORK_DIR", str(prepared))
    cfg = resolve_inputs(PretrainConfig())
    assert cfg.data.path == str(prepared / "data" / "tokens")
    assert cfg.data.tokenizer == str(polyglot_tokenizer_dir.resolve())  # what the manifest records
    assert preflight(cfg.resolved()) == 64
    # POLYKO_DATA names the data once for every run (a dir or its parent with tokens/).
    monkeypatch.setenv("POLYKO_WORK_DIR", str(tmp_path / "empty"))
    monkeypatch.setenv("POLYKO_DATA", str(prepared / "data"))
    assert default_data() == str(prepared / "data" / "tokens")
    # A --tokenizer given is a check against the manifest, not a requirement.
    other = shared_data / "reference" / "polyglot-ko-tokenizer" / "variant-MBBPE-2022-07-24"
    bad = resolve_inputs(PretrainConfig(data=DataConfig(tokenizer=str(other))))
    with pytest.raises(ValueError, match="was made with tokenizer"):
        preflight(bad.resolved())
    # Two token datasets under the work dir and none at the default place: ambiguous, say which.
    monkeypatch.delenv("POLYKO_DATA")
    two = tmp_path / "two"
    for name in ("a", "b"):
        (two / name / "tokens").mkdir(parents=True)
        (two / name / "tokens" / "manifest.json").write_text((prepared / "data" / "tokens" / "manifest.json").read_text())
    monkeypatch.setenv("POLYKO_WORK_DIR", str(two))
    with pytest.raises(ValueError, match="several token datasets"):
        default_data()


def test_run_identity_is_the_trajectory_not_the_scaling(prepared, monkeypatch):
    """More steps, other worker counts, checkpoint cadence, fault settings, ZeRO stage or micro-batch continue
    the same run directory; model, data order, optimizer, batch and seed start another."""
    monkeypatch.setenv("POLYKO_WORK_DIR", str(prepared))
    base = resolve_inputs(PretrainConfig(steps=100))
    out, name = run_paths(base)
    assert out.parent == prepared / "pretrain" and name.endswith(out.name)
    same = [replace(base, steps=400),
            replace(base, scaling=ScalingConfig(num_workers=1)),
            replace(base, scaling=ScalingConfig(min_workers=3, max_workers=7, use_gpu=False)),
            replace(base, checkpoint=CheckpointConfig(every_steps=7, keep=5)),
            replace(base, fault=FaultConfig(max_failures=9, hang_timeout_s=30)),
            replace(base, deepspeed=DeepSpeedConfig(zero_stage=3), batch=BatchConfig(micro_batch=2)),
            replace(base, model=replace(base.model, activation_checkpointing=True))]
    for cfg in same:
        assert run_paths(cfg) == (out, name), cfg
    other = [replace(base, seed=1), replace(base, optim=OptimConfig(lr=1e-2)),
             replace(base, batch=BatchConfig(global_batch_tokens=64 * 64)), replace(base, model=ModelConfig(size="50m")),
             replace(base, data=replace(base.data, shuffle=False)),
             replace(base, deepspeed=DeepSpeedConfig(precision="bf16"))]
    assert len({run_paths(cfg)[0] for cfg in other} | {out}) == len(other) + 1


@pytest.fixture(scope="module")
def gpu_node():
    """A real local Ray cluster of one node that declares 8 simulated H100s (no GPU anywhere)."""
    import ray

    from polyko.cluster import SIMULATED_RESOURCE, init_ray

    ray.shutdown()
    mp = pytest.MonkeyPatch()
    mp.setenv("RAY_raylet_start_wait_time_s", "180")  # a busy machine can miss the 30 s raylet registration
    init_ray(num_cpus=8, num_gpus=8, resources={"accelerator_type:H100": 1, SIMULATED_RESOURCE: 8})
    yield ray
    ray.shutdown()
    mp.undo()


def test_gpus_the_plan_and_the_worker_count_come_from_the_cluster(gpu_node, prepared, monkeypatch):
    import torch

    monkeypatch.setenv("POLYKO_WORK_DIR", str(prepared))
    assert not torch.cuda.is_available()  # the driver has no GPU: everything below comes from the cluster
    d = deploy(PretrainConfig(model=ModelConfig(size="12.8b")), place=True)
    assert d.cfg.scaling.use_gpu is True and d.gpu == "h100" and d.accelerator == "H100"
    assert d.workers == (8, 8) and d.plan.gpus == 8 and d.plan.fits          # one worker per GPU
    assert d.cfg.deepspeed.zero_stage == d.plan.zero_stage and d.cfg.batch.micro_batch == d.plan.micro_batch
    assert d.cfg.deepspeed.precision == "bf16" and d.placement and sum(d.placement.values()) == 8
    text = d.render()
    for needle in ("12.8b on 8 x h100", "checkpoint", "resharding", "workers per node", "accumulation"):
        assert needle in text, needle
    # Two GPUs cannot hold 12.8b: refused with the plan before any worker exists.
    with pytest.raises(ValueError, match="does not fit on 2 workers x h100") as err:
        deploy(PretrainConfig(model=ModelConfig(size="12.8b"), scaling=ScalingConfig(num_workers=2)))
    assert "memory per GPU" in str(err.value)
    # Elastic: planned at the smallest worker count, not the largest.
    with pytest.raises(ValueError, match="the smallest of the elastic range"):
        deploy(PretrainConfig(model=ModelConfig(size="12.8b"), scaling=ScalingConfig(min_workers=2)))
    # --gpu TYPE (a plan key or Ray's name) must match the cluster's; an explicit ZeRO stage is honoured.
    d = deploy(PretrainConfig(model=ModelConfig(size="1.3b"), deepspeed=DeepSpeedConfig(zero_stage=3),
                              scaling=ScalingConfig(gpu_type="H100", num_workers=4)))
    assert d.gpu == "h100" and d.cfg.deepspeed.zero_stage == 3 and d.workers == (4, 4)
    with pytest.raises(ValueError, match="GPU nodes are H100"):
        deploy(PretrainConfig(scaling=ScalingConfig(gpu_type="a100-80gb")))


def test_cpu_runs_pick_the_cheapest_zero_stage_and_refuse_billions(gpu_node, prepared, monkeypatch):
    """CPU workers (``--cpu``; a cluster without GPUs does the same unasked): the plan picks the ZeRO stage
    from host RAM per worker, and a billion-parameter size is refused with that plan."""
    monkeypatch.setenv("POLYKO_WORK_DIR", str(prepared))
    cpu = ScalingConfig(use_gpu=False)
    d = deploy(PretrainConfig(scaling=cpu))
    assert d.cfg.scaling.use_gpu is False and d.workers == (2, 2) and d.gpu is None
    assert d.cfg.deepspeed.zero_stage == 0 == d.plan.zero_stage          # plain data parallelism fits
    assert deploy(PretrainConfig(scaling=cpu, deepspeed=DeepSpeedConfig(zero_stage=2))).cfg.deepspeed.zero_stage == 2
    with pytest.raises(ValueError, match="trains on GPUs, not on CPU workers") as err:
        deploy(PretrainConfig(model=ModelConfig(size="12.8b"), scaling=cpu))
    assert "polyko CPU plan: 12.8b" in str(err.value)


def test_simulated_gpus_never_run_silently(gpu_node, prepared, monkeypatch):
    from polyko.train import pretrain

    monkeypatch.setenv("POLYKO_WORK_DIR", str(prepared))
    # The plan fits, but these GPUs are simulated: training without the switch is refused, with the plan.
    with pytest.raises(ValueError, match="simulated.*--simulated-gpus"):
        pretrain(PretrainConfig(model=ModelConfig(size="12.8b")))
    d = deploy(PretrainConfig(scaling=ScalingConfig(simulate_gpus=True, num_workers=3),
                              deepspeed=DeepSpeedConfig(precision="fp32")))
    # Reserves GPUs from Ray, computes on CPU (what the workers' loop reads).
    assert d.cfg.scaling.simulate_gpus and d.cfg.scaling.use_gpu is False and d.gpu == "h100"
