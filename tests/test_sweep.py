"""Ray Tune sweeps of real Ray Train + DeepSpeed pretraining runs (CPU, gloo, ZeRO-0, `tiny`), tracked on a
real MLflow server: search-space validation, an ASHA sweep with pruned, completed and diverged trials,
``best.json`` as a full pretraining config, and a sweep whose driver is killed and rerun."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from polyko.config import to_dict
from polyko.sweep import SweepConfig, apply_values, default_config, load_config_file, load_sweep_file, parse_search
from polyko.sweep.tune import FAILURE_FILE, FINAL_FILE, best_config, rungs, sweep, validate
from polyko.train.config import PretrainConfig, lr_at

from train_helpers import make_tokens

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tokens_dir(tmp_path_factory, polyglot_tokenizer_dir, corpus_dir) -> Path:
    return make_tokens(tmp_path_factory.mktemp("tokens"), polyglot_tokenizer_dir, corpus_dir, max_sequences=128)


def small_sweep(tokens_dir, tokenizer_dir, out: Path, search: list[str], *, steps: int = 6, trials: int = 1,
                kind: str = "asha") -> SweepConfig:
    cfg = default_config()
    b = cfg.base
    b.data.path, b.data.tokenizer = str(tokens_dir), str(tokenizer_dir)
    b.steps = steps
    b.batch.global_batch_tokens, b.batch.micro_batch = 16 * 64, 16  # 16 sequences of 64 tokens per step
    b.optim.warmup_steps = 1
    b.fault.hang_timeout_s = 120
    cfg.search, cfg.trials, cfg.output = search, trials, str(out)
    cfg.scheduler.kind, cfg.scheduler.grace_period, cfg.scheduler.reduction_factor = kind, 2, 2
    return cfg


# ---------------------------------------------------------------------------------------------------
# Search specs (no cluster)


def test_search_specs_parse_to_typed_dimensions():
    dims = parse_search(["optim.lr=loguniform:1e-4:3e-2", "optim.warmup_steps=choice:10,50,200",
                         "optim.schedule=grid:cosine,wsd", "optim.weight_decay=uniform:0:0.2",
                         "batch.micro_batch=randint:1:9"])
    assert [(d.path, d.kind, d.args) for d in dims] == [
        ("optim.lr", "loguniform", (1e-4, 3e-2)), ("optim.warmup_steps", "choice", (10, 50, 200)),
        ("optim.schedule", "grid", ("cosine", "wsd")), ("optim.weight_decay", "uniform", (0.0, 0.2)),
        ("batch.micro_batch", "randint", (1, 9))]
    assert parse_search({"optim.lr": "choice:1e-3,3e-3"})[0].args == (1e-3, 3e-3)
    cfg = apply_values(PretrainConfig(), {"optim.lr": 2e-3, "optim.warmup_steps": 7})
    assert (cfg.optim.lr, cfg.optim.warmup_steps) == (2e-3, 7)


@pytest.mark.parametrize("spec, needle", [
    ("optim.lrr=loguniform:1e-4:1e-2", "unknown config key 'optim.lrr'"),
    ("optimizer.lr=loguniform:1e-4:1e-2", "unknown config key 'optimizer.lr'"),
    ("optim.lr=loguniform:0:1e-2", "loguniform needs LOW > 0"),
    ("optim.lr=loguniform:1e-2:1e-4", "empty range"),
    ("optim.lr=loguniform:1e-4", "exactly two bounds"),
    ("optim.lr=gaussian:1:2", "distribution must be one of"),
    ("optim.lr", "must look like key.sub=kind:args"),
    ("optim.lr=choice:", "needs at least one value"),
    ("optim.warmup_steps=uniform:1:10", "is an int field"),
    ("optim.warmup_steps=choice:10,abc", "value 'abc' does not fit optim.warmup_steps"),
    ("model.size=choice:tiny,2b", "unknown model size '2b'"),
    ("deepspeed.zero_stage=choice:0,7", "zero_stage must be 0..3"),
    ("steps=choice:10,20", "cannot be searched"),
])
def test_bad_search_specs_are_errors_naming_the_problem(spec, needle):
    with pytest.raises(ValueError, match=None) as e:
        parse_search([spec])
    assert needle in str(e.value) and spec.split("=")[0] in str(e.value)


def test_bad_sweeps_fail_before_any_trial_starts(tmp_path, work_dir, tokens_dir, polyglot_tokenizer_dir):
    out = tmp_path / "sweep"
    bad = [
        ([], "search space is empty"),
        (["optim.lr=loguniform:1e-4:1e-2", "optim.lr=choice:1e-3"], "given twice"),
        (["optim.schedule=choice:cosine,linear"], "optim.schedule must be cosine or wsd"),
        (["optim.decay_fraction=choice:0.2,1.5"], "decay_fraction must be in (0, 1]"),
        (["batch.global_batch_tokens=choice:1024,1000"], "not a multiple of the data's seq_len=64"),
    ]
    for search, needle in bad:
        cfg = small_sweep(tokens_dir, polyglot_tokenizer_dir, out, search)
        with pytest.raises(ValueError) as e:
            sweep(cfg)
        assert needle in str(e.value), (search, str(e.value))
    cfg = small_sweep(tokens_dir, polyglot_tokenizer_dir, out, ["optim.lr=loguniform:1e-4:1e-2"])
    cfg.base.data.path = str(tmp_path / "no-such-tokens")
    with pytest.raises(ValueError):
        sweep(cfg)
    cfg = small_sweep(tokens_dir, polyglot_tokenizer_dir, out, ["optim.lr=loguniform:1e-4:1e-2"])
    cfg.scheduler.kind = "hyperband"
    with pytest.raises(ValueError, match="scheduler.kind"):
        sweep(cfg)
    # Nothing was started or written: no sweep dir, no MLflow store.
    assert not out.exists() and not (work_dir / "mlflow.db").exists()


def test_await_decision_goes_on_stops_or_times_out(tmp_path):
    from polyko.train.loop import await_decision

    f = tmp_path / "decision.json"
    assert await_decision(f, 3, timeout_s=0.1) == "timeout"  # no decision yet: train on
    f.write_text(json.dumps({"step": 2, "stop": True}))
    assert await_decision(f, 3, timeout_s=0.1) == "timeout"  # a decision on an earlier report does not count
    f.write_text(json.dumps({"step": 3, "stop": False}))
    assert await_decision(f, 3) == "go"
    f.write_text(json.dumps({"step": 3, "stop": True}))
    assert await_decision(f, 3) == "stop"


def test_trial_failures_are_classified():
    from ray.train import ControllerError, WorkerGroupError

    from polyko.sweep.tune import TrialDiverged, classify_failure

    assert classify_failure(ControllerError(TrialDiverged("loss nan at step 2"))) == ("diverged", "loss nan at step 2")
    oom = WorkerGroupError("worker 0 failed", {0: RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")})
    assert classify_failure(oom)[0] == "oom"
    assert classify_failure(WorkerGroupError("x", {0: MemoryError()}))[0] == "oom"
    assert classify_failure(WorkerGroupError("x", {0: ValueError("vocabulary too small")})) == \
        ("bad_config", "ValueError: vocabulary too small")
    assert classify_failure(WorkerGroupError("x", {0: KeyError("k")}))[0] == "error"


def test_sweep_file_and_wsd_rungs(tmp_path):
    f = tmp_path / "sweep.yaml"
    f.write_text("trials: 4\nsearch: ['optim.lr=loguniform:1e-4:3e-2']\nscheduler: {kind: asha, reduction_factor: 2}\n"
                 "base: {steps: 64, optim: {warmup_steps: 2}}\n")
    cfg = load_sweep_file(f)
    assert (cfg.trials, cfg.base.steps, cfg.base.optim.warmup_steps) == (4, 64, 2)
    assert cfg.base.optim.schedule == "wsd" and cfg.base.deepspeed.zero_stage == 0  # sweep defaults kept
    assert rungs(cfg) == [16, 32]  # grace = 64 // 2**2; both before the WSD decay (from step 51)
    validate(cfg)
    c = cfg.base.resolved()
    assert all(lr_at(c, s) == c.optim.lr for s in range(2, 51)) and lr_at(c, 63) < 0.2 * c.optim.lr
    (tmp_path / "bad.yaml").write_text("trials: 4\nsearchh: []\n")
    with pytest.raises(ValueError, match="searchh"):
        load_sweep_file(tmp_path / "bad.yaml")


def _drive_asha(scheduler_cls, losses: list[float], *, concurrent: int = 2, rf: int = 3, grace: int = 3,
                max_t: int = 27) -> dict[int, int]:
    """Trials whose loss at step s is ``losses[i] + 1/s``, through the scheduler's real Tune hooks."""
    from polyko.sweep.asha import replay

    curves = [{s: x + 1.0 / s for s in range(1, max_t + 1)} for x in losses]
    return replay(scheduler_cls, curves, reduction_factor=rf, grace_period=grace, max_t=max_t, concurrent=concurrent)


def test_rechecked_asha_stops_trials_that_later_trials_beat():
    from ray.tune.schedulers import ASHAScheduler

    from polyko.sweep.asha import RecheckedASHA

    # Two trials side by side, the second better: Ray's ASHA lets the first go on (it reached the rung first);
    # the re-check stops it at its next report, once the second is recorded there.
    two = [5.0, 4.0]
    assert _drive_asha(ASHAScheduler, two, max_t=9) == {0: 9, 1: 9}
    assert _drive_asha(RecheckedASHA, two, max_t=9) == {0: 6, 1: 9}
    # rf=2 with reports at the rungs: the first's next report already reaches the next rung; it is judged at
    # the rung it stood on first, so it does not pass as the first to arrive at the new one.
    assert _drive_asha(RecheckedASHA, two, rf=2, grace=2, max_t=8) == {0: 4, 1: 8}
    assert _drive_asha(ASHAScheduler, two, rf=2, grace=2, max_t=8) == {0: 8, 1: 8}
    # 16 trials in random orders (seeded), 2 at a time, rungs at 3 and 9 of 27 steps, as the benchmark.
    rng = np.random.default_rng(0)
    losses = [6.0 - 0.1 * i for i in range(16)]
    ratio = {ASHAScheduler: [], RecheckedASHA: []}
    for _ in range(30):
        perm = [losses[j] for j in rng.permutation(16)]
        for cls in ratio:
            r = _drive_asha(cls, perm)
            assert r[int(np.argmin(perm))] == 27, (cls, perm, r)  # the best configuration always finishes
            ratio[cls].append(sum(r.values()) / (16 * 27))
    ray_mean, ours_mean = np.mean(ratio[ASHAScheduler]), np.mean(ratio[RecheckedASHA])
    assert ours_mean < 0.35 < ray_mean, (ours_mean, ray_mean)
    assert default_config().scheduler.recheck is True  # what a sweep gets unless told otherwise
    print(f"compute vs exhaustive over 30 random orders: Ray's ASHA {ray_mean:.3f}, re-checked {ours_mean:.3f}")


# ---------------------------------------------------------------------------------------------------
# Real sweeps


def test_sweep_records_a_diverged_trial_and_finishes_the_other(tmp_path, tokens_dir, polyglot_tokenizer_dir,
                                                                mlflow_server, ray_local, work_dir):
    """The default-suite sweep: two trials side by side (FIFO, 2 steps), one of which diverges."""
    from mlflow.tracking import MlflowClient

    cfg = small_sweep(tokens_dir, polyglot_tokenizer_dir, tmp_path / "sweep", ["optim.lr=grid:3e-3,1e30"], steps=2,
                      kind="fifo")
    cfg.base.checkpoint.every_steps = 1
    r = sweep(cfg)
    by_lr = {t.values["optim.lr"]: t for t in r.trials}
    assert by_lr[1e30].status == "failed" and by_lr[1e30].reason == "diverged: loss nan at step 2", by_lr[1e30]
    assert by_lr[3e-3].status == "completed" and by_lr[3e-3].steps == 2 and r.best is by_lr[3e-3]
    assert load_config_file(PretrainConfig, r.best_config).optim.lr == 3e-3
    client = MlflowClient(tracking_uri=mlflow_server)
    kids = client.search_runs([client.get_run(r.run_id).info.experiment_id],
                              f"tags.mlflow.parentRunId = '{r.run_id}'")
    assert sorted(c.info.status for c in kids) == ["FAILED", "FINISHED"]


@pytest.mark.slow
def test_asha_sweep_prunes_completes_and_records_a_diverged_trial(tmp_path, tokens_dir, polyglot_tokenizer_dir,
                                                                 mlflow_server, ray_local, work_dir):
    from mlflow.tracking import MlflowClient

    from polyko.eval.compare import compare_runs

    # Six trials in a fixed order (a grid): two good learning rates first set the rung cutoffs, 1e30
    # diverges (NaN at its first report), the tiny ones lose at the first rung.
    lrs = [3e-3, 1e-2, 1e-3, 1e30, 1e-4, 3e-5]
    cfg = small_sweep(tokens_dir, polyglot_tokenizer_dir, tmp_path / "sweep",
                      ["optim.lr=grid:" + ",".join(str(x) for x in lrs)])
    t0 = time.time()
    r = sweep(cfg)
    elapsed = time.time() - t0
    by_lr = {t.values["optim.lr"]: t for t in r.trials}
    assert set(by_lr) == set(lrs)
    status = {lr: t.status for lr, t in by_lr.items()}
    # NaN from its second step: the loop's guard skips the bad steps, then stops the run (no healthy checkpoint
    # to roll back to), which the sweep records as diverged.
    assert status[1e30] == "failed" and by_lr[1e30].reason.startswith("diverged: "), by_lr[1e30]
    # rf=2: each rung keeps the better half; the re-check stops the weaker of the two first trials once both
    # are recorded at the first rung, and the small learning rates lose there.
    assert sum(s == "pruned" for s in status.values()) >= 3, status
    assert sum(s == "completed" for s in status.values()) >= 1, status
    for t in r.trials:
        if t.status == "completed":
            assert t.steps == 6 and set(t.curve) == set(range(1, 7))
        if t.status == "pruned":
            assert t.steps < 6
    assert r.steps_used < 6 * len(lrs)
    assert r.best is not None and r.best.values["optim.lr"] in (3e-3, 1e-2)
    # A pruned trial's workers end their loop at the report ASHA stopped it on (no failure recorded), so its
    # Tune actor is handed to a later trial: fewer actor processes (Tune's `pid` per result) than trials.
    assert not any((r.output / "trials" / t.trial_id / FAILURE_FILE).exists() for t in r.trials if t.status != "failed")
    pids = {t.trial_id: {json.loads(x)["pid"] for x in (r.output / "tune" / t.trial_id / "result.json")
                         .read_text().splitlines()} for t in r.trials if t.status != "failed"}
    assert len(set().union(*pids.values())) < len(pids), pids

    # best.json: a full pretraining config with the winner and none of the sweep's bookkeeping,
    # which another size can start from.
    best = load_config_file(PretrainConfig, r.best_config)
    assert best.optim.lr == r.best.values["optim.lr"] and best.output is None and best.export is True
    assert best == best_config(cfg.base, r.best.values)
    big = apply_values(best, {"model.size": "1.3b", "batch.global_batch_tokens": None}).resolved()
    assert big.optim.lr == best.optim.lr and big.batch.global_batch_tokens == 2_097_152

    # MLflow: the parent run and one child per trial, with full params, loss curves and statuses.
    client = MlflowClient(tracking_uri=mlflow_server)
    parent = client.get_run(r.run_id)
    assert parent.data.params["trials"] == "1" and "optim.lr=grid" in parent.data.params["search"]
    assert parent.data.metrics["best_loss"] == pytest.approx(r.best.loss)
    assert parent.data.tags["polyko.best.optim.lr"] == str(r.best.values["optim.lr"])
    exp = client.get_experiment_by_name("polyko-sweep")
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{r.run_id}'")
    assert len(children) == len(lrs)
    kids = {float(c.data.params["optim.lr"]): c for c in children}
    assert kids[1e30].info.status == "FAILED" and kids[1e30].data.tags["polyko.trial_status"] == "failed"
    assert "diverged" in kids[1e30].data.tags["polyko.failure"]
    for lr, t in by_lr.items():
        c = kids[lr]
        assert c.data.tags["polyko.trial_status"] == t.status
        assert c.data.params["deepspeed.zero_stage"] == "0" and c.data.params["steps"] == "6"
        if t.status == "completed":  # the loss curve, one point per step (a pruned trial may log past its rung)
            hist = client.get_metric_history(c.info.run_id, "loss")
            assert sorted({m.step for m in hist}) == list(range(1, 7))
    table = compare_runs("polyko-sweep", ["loss"], sort_by="loss", ascending=True)
    assert "optim.lr" in table and table.count(r.best.run_id[:8]) == 1
    assert not any((r.output / "trials" / t.trial_id / "ray").exists() for t in r.trials)  # checkpoints freed
    print(f"6-trial ASHA sweep: {elapsed:.0f} s")


@pytest.mark.slow
def test_killed_sweep_resumes_without_rerunning_finished_trials(tmp_path, tokens_dir, polyglot_tokenizer_dir,
                                                               mlflow_server):
    out = tmp_path / "sweep"
    cmd = [sys.executable, str(REPO / "jobs" / "sweep.py"), "--data", str(tokens_dir),
           "--tokenizer", str(polyglot_tokenizer_dir), "--trials", "4", "--max-steps", "4", "--scheduler", "fifo",
           "--concurrent", "1", "--search", "optim.lr=loguniform:1e-3:1e-2", "--output", str(out),
           "--set", "batch.global_batch_tokens=1024", "--set", "batch.micro_batch=16", "--set", "optim.warmup_steps=1",
           "--set", "checkpoint.every_steps=1"]
    env = dict(os.environ, POLYKO_WORK_DIR=str(tmp_path / "work"))
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    finals: list[Path] = []
    deadline = time.time() + 400
    while time.time() < deadline and proc.poll() is None:
        finals = sorted(out.glob(f"trials/*/{FINAL_FILE}"))
        if finals:
            break
        time.sleep(1)
    assert finals, (tmp_path / "first.log").read_text()[-3000:]
    time.sleep(4)  # into the next trial
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the cluster it started
    proc.wait(30)
    done_first = {p.parent.name: p.stat().st_mtime for p in out.glob(f"trials/*/{FINAL_FILE}")}
    assert 1 <= len(done_first) < 4

    second = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "resuming sweep" in second.stdout
    finals = {p.parent.name: p.stat().st_mtime for p in out.glob(f"trials/*/{FINAL_FILE}")}
    assert len(finals) == 4
    for tid, mtime in done_first.items():
        assert finals[tid] == mtime  # not retrained
        lines = [json.loads(x) for x in (out / "trials" / tid / "metrics.jsonl").read_text().splitlines()]
        assert [m["step"] for m in lines] == [1, 2, 3, 4]
    trials = json.loads((out / "trials.json").read_text())
    assert sorted(t["status"] for t in trials) == ["completed"] * 4
    assert (out / "best.json").is_file()


def test_sweep_job_rejects_bad_specs_with_exit_code_2(tmp_path, tokens_dir, polyglot_tokenizer_dir, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("sweep_job", REPO / "jobs" / "sweep.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    common = ["--data", str(tokens_dir), "--tokenizer", str(polyglot_tokenizer_dir), "--output", str(tmp_path / "s")]
    assert job.main(common + ["--search", "optim.lrr=loguniform:1e-4:1e-2"]) == 2
    assert "unknown config key 'optim.lrr'" in capsys.readouterr().err
    assert job.main(common) == 2
    assert "search space is empty" in capsys.readouterr().err
    f = tmp_path / "sweep.json"
    f.write_text(json.dumps({"search": ["optim.warmup_steps=choice:1,x"], "trials": 2}))
    assert job.main(common + ["--sweep-file", str(f)]) == 2
    assert "value 'x' does not fit optim.warmup_steps" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_pretrain_starts_from_a_config_file_and_flags_override_it(tmp_path):
    """`jobs/pretrain.py --config best.json --size 1.3b`: the file is the base, a given flag wins, and a bad
    file is exit 2 naming the field (checked with --plan: no cluster needed)."""
    best = best_config(PretrainConfig(), {"optim.lr": 3e-3, "optim.schedule": "wsd"})
    good = tmp_path / "best.json"
    good.write_text(json.dumps(to_dict(best)))
    job = [sys.executable, str(REPO / "jobs" / "pretrain.py")]
    r = subprocess.run(job + ["--config", str(good), "--size", "1.3b", "--plan", "--gpus", "8"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("polyko plan: 1.3b on 8 x"), r.stdout[:200]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"optim": {"lrx": 1}}))
    r = subprocess.run(job + ["--config", str(bad), "--plan"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "lrx" in r.stderr and "bad.json" in r.stderr
