"""Pretraining on a real local Ray cluster with the real DeepSpeed engine (CPU, gloo, ZeRO-2).

One reference run (2 workers, 10 steps, checkpoint every 2) is shared by the tests that compare against
it: a run whose rank 1 is killed must reproduce it exactly, a 2 -> 1 worker resumption (universal
checkpoint) must continue it, and its export must load with transformers and generate.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from polyko.train import checkpoint as ckpt_io
from polyko.train.config import (BatchConfig, BatchLayout, CheckpointConfig, DataConfig, DeepSpeedConfig,
                                 FaultConfig, OptimConfig, PretrainConfig, ScalingConfig, deepspeed_config, lr_at)
from polyko.train.data import GlobalSampler, open_tokens, worker_positions
from polyko.train.metrics import read_jsonl

from train_helpers import make_tokens

STEPS = 10


@pytest.fixture(scope="module")
def tokens_dir(tmp_path_factory, polyglot_tokenizer_dir, corpus_dir) -> Path:
    return make_tokens(tmp_path_factory.mktemp("tokens"), polyglot_tokenizer_dir, corpus_dir)


def base_config(tokens_dir, tokenizer_dir, out: Path, **kw) -> PretrainConfig:
    cfg = PretrainConfig(
        data=DataConfig(path=str(tokens_dir), tokenizer=str(tokenizer_dir)),
        optim=OptimConfig(lr=3e-3, warmup_steps=1),
        batch=BatchConfig(global_batch_tokens=16 * 64, micro_batch=8),  # 16 sequences of 64 tokens per step
        deepspeed=DeepSpeedConfig(zero_stage=2),
        checkpoint=CheckpointConfig(every_steps=2, keep=2),
        fault=FaultConfig(max_failures=1, hang_timeout_s=120),
        scaling=ScalingConfig(num_workers=2),
        steps=STEPS, output=str(out), run_name="ref", export=True)
    return replace(cfg, **kw)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, tokens_dir, polyglot_tokenizer_dir, mlflow_server, module_work_dir):
    import ray

    from polyko.cluster import init_ray
    from polyko.train import pretrain

    if not ray.is_initialized():
        init_ray(num_cpus=2)
    cfg = base_config(tokens_dir, polyglot_tokenizer_dir, tmp_path_factory.mktemp("ref"))
    return cfg, pretrain(cfg)


def final_weights(result) -> dict[str, torch.Tensor]:
    from polyko.train.export import consolidated_state_dict

    return consolidated_state_dict(result.checkpoint_dir)


# ---------------------------------------------------------------------------------------------------
# Unit-level: sampler, batch layout, config checks (no Ray)


def test_sampler_is_a_permutation_per_epoch_and_seeded():
    s = GlobalSampler(1000, seed=7)
    e0, e1 = s.indices(0, 1000), s.indices(1000, 1000)
    assert sorted(e0.tolist()) == list(range(1000)) and sorted(e1.tolist()) == list(range(1000))
    assert not np.array_equal(e0, e1)                                  # a fresh order each epoch
    assert not np.array_equal(e0, GlobalSampler(1000, seed=8).indices(0, 1000))
    assert np.array_equal(s.indices(990, 20), np.concatenate([e0[990:], e1[:10]]))  # crossing an epoch


def test_step_samples_do_not_depend_on_worker_count():
    s, g = GlobalSampler(333, seed=1), 24
    for step in (0, 5, 40):
        per_world = []
        for world in (1, 2, 3, 4, 5, 6, 7, 24):  # dividing G or not
            idx = [s.indices(*worker_positions(step, r, g, world)) for r in range(world)]
            per_world.append(np.concatenate(idx))
        assert all(np.array_equal(per_world[0], p) for p in per_world)
    # resume = skip to step: consecutive steps tile the stream with no gap or overlap
    seen = np.concatenate([s.indices(*worker_positions(st, 0, g, 1)) for st in range(3)])
    assert np.array_equal(seen, s.indices(0, 3 * g))


def test_batch_layout_keeps_global_batch():
    for world in (1, 2, 4, 8):
        lay = BatchLayout.derive(64 * 2048, 2048, world, max_micro_batch=4)
        assert lay.global_batch == 64 and lay.micro_batch * lay.grad_accum * world == 64 and lay.micro_batch <= 4
        assert lay.even and all(lay.micro_sizes(r) == [lay.micro_batch] * lay.grad_accum for r in range(world))
    # Any worker count up to G, also one that does not divide it (an elastic run after losing a node:
    # the 12.8b preset's 256 sequences on 248 workers): the same G sequences, the same micro-steps everywhere.
    for g, world, m in [(256, 248, 2), (256, 255, 1), (16, 3, 8), (5, 2, 1), (5, 2, 2), (7, 7, 4), (100, 3, 8)]:
        lay = BatchLayout.derive(g * 64, 64, world, m)
        sizes = [lay.micro_sizes(r) for r in range(world)]
        assert sum(map(sum, sizes)) == g and all(len(s) == lay.grad_accum for s in sizes)
        assert max(map(max, sizes)) == lay.micro_batch <= m
        assert max(map(max, sizes)) - min(map(min, sizes)) <= 1                  # balanced
        assert [lay.count(r) for r in range(world)] == [worker_positions(0, r, g, world)[1] for r in range(world)]
        # the weights make the step's gradient the mean over the G sequences: sum_j scale_j / (w * acc) == 1
        total = sum(lay.loss_scale(n) for s in sizes for n in s) / (world * lay.grad_accum)
        assert total == pytest.approx(1.0)
    assert BatchLayout.derive(16 * 64, 64, 3, 8).micro_sizes(0) == [6]       # 6, 5, 5: one micro-step each
    assert BatchLayout.derive(5 * 64, 64, 2, 1).micro_sizes(1) == [1, 1, 0]  # a padded, zero-weight micro-step
    with pytest.raises(ValueError, match="multiple of the data's seq_len"):
        BatchLayout.derive(1000, 64, 1, 8)
    with pytest.raises(ValueError, match="cannot be spread over 17 workers"):
        BatchLayout.derive(16 * 64, 64, 17, 8)


def test_config_defaults_and_overrides(tmp_path):
    from polyko.config import apply_overrides

    cpu = PretrainConfig().resolved()
    assert cpu.deepspeed.precision == "fp32" and cpu.model.activation_checkpointing is False
    gpu = PretrainConfig(model=replace(PretrainConfig().model, size="12.8b"),
                         scaling=ScalingConfig(use_gpu=True)).resolved()
    assert gpu.deepspeed.precision == "bf16" and gpu.deepspeed.zero_stage == 3 and gpu.model.activation_checkpointing
    cfg = apply_overrides(PretrainConfig(), ["deepspeed.zero_stage=1", "optim.lr=0.01"]).resolved()
    assert cfg.deepspeed.zero_stage == 1 and cfg.optim.lr == 0.01
    extra = replace(cfg, deepspeed=replace(cfg.deepspeed, extra_json='{"zero_optimization": {"reduce_bucket_size": 7}}'))
    ds = deepspeed_config(extra.resolved(), BatchLayout.derive(8192, 64, 2, 16))
    assert ds["zero_optimization"] == {"stage": 1, "reduce_bucket_size": 7}
    assert ds["train_batch_size"] == 128 and ds["gradient_accumulation_steps"] * 16 * 2 == 128
    with pytest.raises(ValueError, match="train_batch_size"):
        replace(cfg, deepspeed=replace(cfg.deepspeed, extra_json='{"train_batch_size": 4}')).resolved()
    lrs = [lr_at(cfg, s) for s in range(cfg.steps)]
    assert max(lrs) == pytest.approx(0.01) and lrs[-1] == pytest.approx(0.001, rel=0.01)


def test_precision_stage_and_init_checks():
    base = PretrainConfig()
    with pytest.raises(ValueError, match="zero_stage=0 with bf16"):
        replace(base, deepspeed=DeepSpeedConfig(zero_stage=0, precision="bf16")).resolved()
    assert replace(base, deepspeed=DeepSpeedConfig(zero_stage=0, precision="fp32")).resolved().deepspeed.zero_stage == 0
    assert replace(base, deepspeed=DeepSpeedConfig(zero_stage=1, precision="bf16")).resolved().deepspeed.precision == "bf16"
    with pytest.raises(ValueError, match="model.init must be one of"):
        replace(base, model=replace(base.model, init="xavier")).resolved()
    # an uneven layout: DeepSpeed's batch keys describe the largest micro-batch (its identity must hold)
    ds = deepspeed_config(base.resolved(), BatchLayout.derive(5 * 64, 64, 2, 1))
    assert ds["train_batch_size"] == ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * 2 == 6


def test_tokenizer_mismatch_is_a_clear_error(tokens_dir, shared_data, polyglot_tokenizer_dir):
    other = shared_data / "reference" / "polyglot-ko-tokenizer" / "variant-MBBPE-2022-07-24"
    assert len(open_tokens(str(tokens_dir), str(polyglot_tokenizer_dir))) > 0
    with pytest.raises(ValueError, match="was made with tokenizer"):
        open_tokens(str(tokens_dir), str(other))


# ---------------------------------------------------------------------------------------------------
# Real runs


def test_training_lowers_loss_logs_metrics_and_exports(reference_run, mlflow_server):
    from mlflow.tracking import MlflowClient
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from polyko import tracking

    cfg, result = reference_run
    hist = read_jsonl(result.output / "metrics.jsonl")
    assert sorted(hist) == list(range(1, STEPS + 1)) and result.steps == STEPS
    first, last = hist[1]["loss"], hist[STEPS]["loss"]
    assert last < first - 0.5, (first, last)  # ~10.3 (uniform over 30k ids) falls within 10 steps
    assert result.final_loss == pytest.approx(last)
    for k in ("lr", "grad_norm", "tokens_per_second", "tflops", "step_seconds"):
        assert hist[STEPS][k] > 0, k
    # MLflow (a real server): per-step metrics on the pretrain run, the export linked to it
    client = MlflowClient(mlflow_server)
    losses = client.get_metric_history(result.run_id, "loss")
    assert sorted(m.step for m in losses) == list(range(1, STEPS + 1))
    marker = tracking.read_marker(result.export_dir)
    assert marker["stage"] == "checkpoint" and marker["parents"]["pretrain"] == result.run_id
    # the export: loads with AutoModelForCausalLM and generates Korean text with the right tokenizer
    tok = AutoTokenizer.from_pretrained(result.export_dir)
    model = AutoModelForCausalLM.from_pretrained(result.export_dir)
    ids = tok("서울 연합뉴스", return_tensors="pt")
    gen = model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert gen.shape[1] == ids["input_ids"].shape[1] + 5 and tok.eos_token_id == 2
    sd = final_weights(result)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())


def test_killed_worker_resume_is_exact(reference_run, tmp_path):
    """Rank 1 dies (os._exit) before step 6; Ray Train restarts the group from the newest checkpoint and the
    run reproduces the uninterrupted one exactly: same per-step losses, same final fp32 weights."""
    from polyko.train import pretrain

    cfg, ref = reference_run
    out = tmp_path / "killed"
    res = pretrain(replace(cfg, output=str(out), export=False, fault=replace(cfg.fault, inject="exit@5:1")))
    assert (out / "fault-fired-exit-5-1").exists()
    ref_h, h = read_jsonl(ref.output / "metrics.jsonl"), read_jsonl(out / "metrics.jsonl")
    assert [h[s]["loss"] for s in range(1, STEPS + 1)] == [ref_h[s]["loss"] for s in range(1, STEPS + 1)]
    lines = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) > STEPS, "the restart should have repeated the steps after the last checkpoint"
    a, b = final_weights(ref), final_weights(res)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # Corrupt the newest checkpoint of this run, then continue it for 2 more steps: the corrupt one is
    # skipped in favour of the previous (step 8), and training goes on from there.
    newest = ckpt_io.list_checkpoints(res.checkpoint_dir.parent)
    assert [p.name for p in newest] == ["step_000010", "step_000008"]  # keep=2
    shard = next((newest[0] / "ds").glob("*optim_states.pt"))
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(ckpt_io.CheckpointError, match="truncated"):
        ckpt_io.validate(newest[0])
    res2 = pretrain(replace(cfg, output=str(out), export=False, steps=STEPS + 2,
                            fault=replace(cfg.fault, inject="exit@5:1")))
    assert res2.steps == STEPS + 2
    steps_logged = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps_logged[-4:] == [9, 10, 11, 12], steps_logged[-6:]  # resumed at step 8, not 10


def test_incomplete_checkpoint_falls_back_to_previous(reference_run, tmp_path):
    _, ref = reference_run
    run = tmp_path / "run"
    for c in ckpt_io.list_checkpoints(ref.checkpoint_dir.parent):
        shutil.copytree(c, run / c.name)
    (run / "step_000010" / ckpt_io.META).unlink()     # crash before the metadata was committed
    path, meta = ckpt_io.select(run / "step_000010")
    assert path.name == "step_000008" and meta["step"] == 8 and meta["world_size"] == 2
    (run / "step_000008" / ckpt_io.META).write_text("{not json")
    assert ckpt_io.select(run / "step_000010") is None


def test_reshard_two_workers_to_one(reference_run, tmp_path):
    """A ZeRO-2 checkpoint saved by 2 workers resumes on 1 worker through a universal checkpoint; the global
    batch and data order are unchanged, so it continues the reference run (up to float summation order)."""
    from polyko.train import pretrain

    cfg, ref = reference_run
    step8 = ref.checkpoint_dir.parent / "step_000008"
    out = tmp_path / "one"
    res = pretrain(replace(cfg, output=str(out), run_name="one", export=False,
                           scaling=ScalingConfig(num_workers=1), batch=replace(cfg.batch, micro_batch=16),
                           checkpoint=replace(cfg.checkpoint, resume_from=str(step8))))
    h, ref_h = read_jsonl(out / "metrics.jsonl"), read_jsonl(ref.output / "metrics.jsonl")
    assert sorted(h) == [9, 10] and h[9]["world_size"] == 1
    for s in (9, 10):
        assert h[s]["loss"] == pytest.approx(ref_h[s]["loss"], rel=1e-4)
    assert ckpt_io.validate(res.checkpoint_dir)["world_size"] == 1
    a, b = final_weights(ref), final_weights(res)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-3


def test_init_from_hf_checkpoint(tiny_hf_checkpoint, tokens_dir, polyglot_tokenizer_dir, tmp_path, module_work_dir):
    """--init-from continues from HF weights: the first step's loss is the HF model's loss on that batch."""
    from transformers import AutoModelForCausalLM

    from polyko.train import pretrain

    cfg = base_config(tokens_dir, polyglot_tokenizer_dir, tmp_path / "init", steps=1, export=False,
                      scaling=ScalingConfig(num_workers=1), batch=BatchConfig(global_batch_tokens=16 * 64, micro_batch=16),
                      model=replace(PretrainConfig().model, init_from=str(tiny_hf_checkpoint)))
    pretrain(cfg)
    loss = read_jsonl(tmp_path / "init" / "metrics.jsonl")[1]["loss"]
    shards = open_tokens(str(tokens_dir), str(polyglot_tokenizer_dir))
    x = torch.from_numpy(shards.batch(GlobalSampler(len(shards), seed=0).indices(0, 16)))
    hf = AutoModelForCausalLM.from_pretrained(tiny_hf_checkpoint)
    with torch.no_grad():
        expected = hf(input_ids=x, labels=x).loss.item()
    assert loss == pytest.approx(expected, rel=1e-4)
