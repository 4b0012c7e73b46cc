"""A run that watches itself, end to end on a real local Ray cluster with the real DeepSpeed engine (CPU):
the loss-spike / NaN guard (skip, rollback with an exact skipped sample window, re-warmup), evaluation during
training (validation loss and bits per byte per source on the workers, KoBEST on checkpoints in its own Ray
task), and a 0.8/0.2 source mixture -- all logged to a real MLflow server.

Two runs are shared: a clean one (1 worker, KoBEST beside it on the second CPU) and a chaos one (2 workers)
with ``spike@25`` (a corrupt batch: skipped) and ``nan@30..32`` (three non-finite steps in a row: rolled
back to the step-30 checkpoint, the first bad batch's samples skipped).
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from polyko.train import checkpoint as ckpt_io
from polyko.train.config import (BatchConfig, CheckpointConfig, DataConfig, DeepSpeedConfig, TrainEvalConfig,
                                 FaultConfig, OptimConfig, PretrainConfig, ScalingConfig, parse_faults)
from polyko.train.evaluator import CheckpointEvalConfig
from polyko.train.guard import EVENTS_FILE, GuardConfig
from polyko.train.metrics import read_jsonl

from train_helpers import make_source_data, run_local

STEPS, G, SEQ = 60, 16, 64          # 16 sequences of 64 tokens per step
CHAOS = "spike@25,nan@30,nan@31,nan@32"
MIX = {"klue": 0.8, "nsmc": 0.2}


@pytest.fixture(scope="module")
def data(tmp_path_factory, polyglot_tokenizer_dir, corpus_dir) -> Path:
    return make_source_data(tmp_path_factory.mktemp("health"), polyglot_tokenizer_dir, corpus_dir, seq_len=SEQ)


def health_config(data: Path, tokenizer: Path, out: Path, *, workers: int, inject: str | None = None,
                  kobest: CheckpointEvalConfig | None = None, **kw) -> PretrainConfig:
    cfg = PretrainConfig(
        data=DataConfig(path=str(data / "tokens"), tokenizer=str(tokenizer), mixture=dict(MIX)),
        optim=OptimConfig(lr=3e-3, warmup_steps=5),
        batch=BatchConfig(global_batch_tokens=G * SEQ, micro_batch=8),
        deepspeed=DeepSpeedConfig(zero_stage=2),
        checkpoint=CheckpointConfig(every_steps=10, keep=2),
        fault=FaultConfig(max_failures=1, hang_timeout_s=120, inject=inject),
        scaling=ScalingConfig(num_workers=workers),
        guard=GuardConfig(warmup=10, window=20, rewarmup_steps=5),
        eval=TrainEvalConfig(every_steps=10, rows_per_source=16, kobest=kobest or CheckpointEvalConfig(enabled=False)),
        steps=STEPS, output=str(out), run_name=out.name, export=False)
    return replace(cfg, **kw)


def _pretrain(cfg):
    import ray

    from polyko.cluster import init_ray
    from polyko.train import pretrain

    if not ray.is_initialized():
        init_ray(num_cpus=2)
    return pretrain(cfg)


@pytest.fixture(scope="module")
def clean(data, polyglot_tokenizer_dir, kobest_dir, tmp_path_factory, mlflow_server, module_work_dir):
    kob = CheckpointEvalConfig(tasks=["copa"], limit=20, kobest_dir=str(kobest_dir), every=2, max_retries=1)
    cfg = health_config(data, polyglot_tokenizer_dir, tmp_path_factory.mktemp("runs") / "clean", workers=1,
                        kobest=kob)
    return cfg, _pretrain(cfg)


@pytest.fixture(scope="module")
def chaos(data, polyglot_tokenizer_dir, tmp_path_factory, mlflow_server, module_work_dir):
    cfg = health_config(data, polyglot_tokenizer_dir, tmp_path_factory.mktemp("runs") / "chaos", workers=2,
                        inject=CHAOS)
    return cfg, _pretrain(cfg)


def _history(run_id: str, key: str) -> dict[int, float]:
    from mlflow import MlflowClient

    return {m.step: m.value for m in MlflowClient().get_metric_history(run_id, key)}


def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    from polyko.train.export import consolidated_state_dict

    return consolidated_state_dict(ckpt)


# ---------------------------------------------------------------------------------------------------


def test_fault_specs_are_checked():
    assert parse_faults("spike@3, nan@4:1,crash@9") == [("spike", 3, 0), ("nan", 4, 1), ("crash", 9, 0)]
    for bad in ("boom@3", "nan", "nan@x", "nan@3:y"):
        with pytest.raises(ValueError, match="KIND@STEP"):
            parse_faults(bad)
    with pytest.raises(ValueError, match="KIND@STEP"):
        PretrainConfig(fault=FaultConfig(inject="nan@")).resolved()
    with pytest.raises(ValueError, match="parametrization"):
        PretrainConfig(model=replace(PretrainConfig().model, parametrization="ntk")).resolved()


def test_guard_recovers_from_spike_and_nan(clean, chaos):
    ccfg, cres = clean
    cfg, res = chaos
    out = Path(cfg.output)
    report = json.loads((out / EVENTS_FILE).read_text())
    assert report["reason"] == "finished"
    assert [(e["step"], e["kind"], e["action"]) for e in report["events"]] == [
        (25, "spike_loss", "skip"), (30, "nonfinite_loss", "skip"), (31, "nonfinite_loss", "skip"),
        (32, "nonfinite_loss", "rollback")]
    assert report["rollbacks"] == 1 and report["skipped_steps"] == 3 and report["anomalies"] == 4
    # Rolled back to the step-30 checkpoint: positions 480.. (step 30's batch, the first bad one) skipped.
    assert report["skip_ranges"] == [[30 * G, 31 * G]]
    assert report["not_trained_on"] == [[25 * G, 26 * G], [30 * G, 31 * G]]

    # The loop's own record of what each applied step read: with the logged skips, it tiles every position
    # consumed exactly once -- the ranges not trained on are exactly those the guard reports.
    hist = read_jsonl(out / "metrics.jsonl")
    assert sorted(hist) == list(range(1, STEPS + 1))
    trained = sorted([int(h["data_position"]), int(h["data_position"]) + G] for h in hist.values()
                     if not h["guard/skipped"])
    spans = sorted(trained + report["not_trained_on"])
    assert spans[0][0] == 0 and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert spans[-1][1] == hist[STEPS]["data_position"] + G == STEPS * G + G   # one batch skipped past the end
    assert hist[31]["lr"] < hist[36]["lr"]                                      # re-warmed after the rollback

    # Recovered: the held-out loss at the end within 2% of the clean run's over the same steps.
    clean_val = read_jsonl(Path(ccfg.output) / "metrics.jsonl")[STEPS]["val/loss"]
    assert math.isfinite(hist[STEPS]["val/loss"])
    assert abs(hist[STEPS]["val/loss"] - clean_val) / clean_val <= 0.02, (hist[STEPS]["val/loss"], clean_val)

    # MLflow: the counts at their steps, and the event log as an artifact.
    from mlflow import MlflowClient

    rollbacks = MlflowClient().get_metric_history(res.run_id, "guard/rollbacks")
    assert {m.value for m in rollbacks if m.step <= 30} == {0.0} and _history(res.run_id, "guard/rollbacks")[STEPS] == 1
    assert any(m.step == 33 and m.value == 1.0 for m in rollbacks)       # logged at the step that rolled back
    assert _history(res.run_id, "guard/skipped_steps")[STEPS] == 3.0
    assert _history(res.run_id, "guard/anomalies")[26] == 1.0
    assert EVENTS_FILE in [a.path for a in MlflowClient().list_artifacts(res.run_id)]

    # Every kept checkpoint is healthy and finite.
    kept = ckpt_io.list_checkpoints(out / "ray" / cfg.run_name)
    assert kept and ckpt_io.step_dir_name(STEPS) == kept[0].name
    for c in kept:
        meta = ckpt_io.validate(c)
        assert meta["guard"]["healthy"] and meta["guard"]["params_finite"]
        assert all(torch.isfinite(t).all() for t in _weights(c).values())


def test_validation_per_source_and_mixture_are_logged(clean):
    cfg, res = clean
    for src in MIX:
        for key in (f"val/{src}/loss", f"val/{src}/bpb"):
            h = _history(res.run_id, key)
            assert sorted(h) == list(range(10, STEPS + 1, 10)), key
            assert all(math.isfinite(v) and v > 0 for v in h.values())
        assert h[STEPS] < h[10]                                # it learns
    assert sorted(_history(res.run_id, "val/bpb")) == list(range(10, STEPS + 1, 10))
    # The 0.8/0.2 mixture: the token share seen, within 1%, and epochs per source.
    share = _history(res.run_id, "data/klue/share")[STEPS]
    assert abs(share - 0.8) <= 0.01
    assert _history(res.run_id, "data/nsmc/epochs")[STEPS] > 0


def test_kobest_scores_land_at_checkpoint_steps_while_training_goes_on(clean):
    from mlflow import MlflowClient

    cfg, res = clean
    hist = MlflowClient().get_metric_history(res.run_id, "kobest_copa/f1/0shot")
    assert sorted(m.step for m in hist) == [20, 40, 60]             # every 2nd checkpoint, and the last
    secs = {m.step: m.value for m in MlflowClient().get_metric_history(res.run_id, "kobest/eval_seconds")}
    first = min(hist, key=lambda m: m.step)
    started = first.timestamp / 1000 - secs[first.step]
    trained_until = read_jsonl(Path(cfg.output) / "metrics.jsonl")[STEPS]["time"]
    assert started < trained_until          # the step-20 evaluation ran beside training, not after it


def test_guarded_run_killed_and_resumed_is_bit_identical(chaos, tmp_path):
    """Killed (rank 1 crashes at step 35: after the rollback, before the next checkpoint), restarted by Ray
    Train from the step-30 checkpoint: the same skips, the same weights, bit for bit."""
    cfg, res = chaos
    again = replace(cfg, output=str(tmp_path / "killed"), run_name="killed",
                    fault=replace(cfg.fault, inject=CHAOS + ",crash@35:1"))
    got = _pretrain(again)
    assert (tmp_path / "killed" / "fault-fired-crash-35-1").exists()
    a, b = _weights(res.checkpoint_dir), _weights(got.checkpoint_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ra = json.loads((Path(cfg.output) / EVENTS_FILE).read_text())
    rb = json.loads((tmp_path / "killed" / EVENTS_FILE).read_text())
    assert ra["not_trained_on"] == rb["not_trained_on"] and ra["events"] == rb["events"]
    ha, hb = read_jsonl(Path(cfg.output) / "metrics.jsonl"), read_jsonl(tmp_path / "killed" / "metrics.jsonl")
    assert [ha[s]["loss"] for s in ha] == [hb[s]["loss"] for s in ha]
    assert ha[STEPS]["data/klue/share"] == hb[STEPS]["data/klue/share"]


def test_nonfinite_weights_are_never_checkpointed(data, polyglot_tokenizer_dir, tmp_path):
    """Guard off, a NaN step poisons the weights (ZeRO-0: the torch optimizer applies a non-finite gradient;
    DeepSpeed's ZeRO-1/2 optimizers would skip it themselves): no checkpoint is written from then on (the last
    finite one stays the one a restart or rollback loads)."""
    cfg = health_config(data, polyglot_tokenizer_dir, tmp_path / "unguarded", workers=1, inject="nan@2",
                        guard=GuardConfig(enabled=False), steps=6, deepspeed=DeepSpeedConfig(zero_stage=0),
                        checkpoint=CheckpointConfig(every_steps=2, keep=2), eval=TrainEvalConfig(every_steps=0))
    run_local(cfg, workers=1)
    kept = ckpt_io.list_checkpoints(tmp_path / "unguarded" / "checkpoints")
    assert [c.name for c in kept] == [ckpt_io.step_dir_name(2)]
    assert all(torch.isfinite(t).all() for t in _weights(kept[0]).values())
    hist = read_jsonl(tmp_path / "unguarded" / "metrics.jsonl")
    assert not math.isfinite(hist[3]["loss"]) and sorted(hist) == list(range(1, 7))


def test_mup_pretraining(data, polyglot_tokenizer_dir, tmp_path):
    """``model.parametrization=mup`` in the production loop: 50m (width 512 = 8x tiny's) trains with μP's
    attention scale and per-group learning rates, recorded in the checkpoint for the export to fold."""
    from polyko.train.config import ModelConfig

    cfg = health_config(data, polyglot_tokenizer_dir, tmp_path / "mup", workers=1, steps=2,
                        model=ModelConfig(size="50m", parametrization="mup"), guard=GuardConfig(enabled=False),
                        batch=BatchConfig(global_batch_tokens=4 * SEQ, micro_batch=4),
                        checkpoint=CheckpointConfig(every_steps=2, keep=1), eval=TrainEvalConfig(every_steps=0))
    run_local(cfg, workers=1)
    meta = ckpt_io.validate(ckpt_io.list_checkpoints(tmp_path / "mup" / "checkpoints")[0])
    head_dim = 512 // 8
    assert meta["model_config"]["mup_attention_scale"] == pytest.approx(16 ** 0.5 / head_dim)
    assert meta["model_config"]["mup_width_mult"] == pytest.approx(8.0)
    hist = read_jsonl(tmp_path / "mup" / "metrics.jsonl")
    assert all(math.isfinite(h["loss"]) for h in hist.values())
    # The optimizer's groups as last stepped: the scheduled lr times 1/m on hidden matrices and the readout.
    ckpt = ckpt_io.list_checkpoints(tmp_path / "mup" / "checkpoints")[0]
    state = torch.load(next((ckpt / "ds").glob("zero_pp_rank_0_*optim_states.pt")), weights_only=False)
    groups = state["optimizer_state_dict"]["base_optimizer_state"]["param_groups"]
    lr = hist[2]["lr"]
    assert {g["mup_group"]: round(g["lr"] / lr, 6) for g in groups} == {
        "input": 1.0, "vector": 1.0, "hidden": 0.125, "output": 0.125}
    with pytest.raises(ValueError, match="ZeRO-3"):
        replace(cfg, deepspeed=DeepSpeedConfig(zero_stage=3)).resolved()
