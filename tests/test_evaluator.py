"""KoBEST per checkpoint, off the training path: a real polyko (DeepSpeed) checkpoint of a tiny model, exported
and scored by real lm-eval on the real KoBEST data (a few documents), logged to a real MLflow server at the
checkpoint's step; and (slow) the same through Ray Train V2's checkpoint validation beside a training loop."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from polyko.train.evaluator import CheckpointEvalConfig, validation_config, validate_checkpoint, wants
from train_helpers import make_checkpoint, make_tokens

LIMIT = 4


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, polyglot_tokenizer_dir, corpus_dir) -> list[Path]:
    """``[step_000001, step_000002]`` of a real 2-step tiny run (the production loop, ZeRO-2, one worker)."""
    root = tmp_path_factory.mktemp("evaluator")
    tokens = make_tokens(root / "tokens", polyglot_tokenizer_dir, corpus_dir, max_sequences=64)
    (root / "ckpt").mkdir()
    last = make_checkpoint(root / "ckpt", tokens, polyglot_tokenizer_dir, workers=1, zero_stage=2, steps=2,
                           every_steps=1)
    return [last.parent / "step_000001", last]


def _pretrain_run(name: str) -> str:
    import mlflow

    from polyko import tracking

    exp = tracking.get_or_create_experiment("pretrain")
    client = mlflow.MlflowClient()
    return client.create_run(exp, run_name=name).info.run_id


def test_config_and_schedule():
    cfg = CheckpointEvalConfig()
    assert cfg.tasks == ["kobest_boolq", "kobest_copa", "kobest_hellaswag", "kobest_sentineg", "kobest_wic"]
    assert (cfg.shots, cfg.limit) == ([0], 200)
    every2 = CheckpointEvalConfig(every=2)
    assert [s for s in (10, 20, 30, 40, 45) if wants(every2, s, 10, last_step=45)] == [20, 40, 45]
    assert not wants(CheckpointEvalConfig(enabled=False), 10, 10)
    assert validation_config(CheckpointEvalConfig(enabled=False), run_id="x", tracking_uri="y") is None
    vc = validation_config(CheckpointEvalConfig(max_retries=4), run_id="r", tracking_uri="http://t")
    assert vc.ray_remote_kwargs == {"num_cpus": 1.0, "max_retries": 4, "retry_exceptions": True}
    assert vc.task_config.fn_kwargs["run_id"] == "r" and vc.fn is validate_checkpoint
    with pytest.raises(ValueError, match="unknown task"):
        CheckpointEvalConfig(tasks=["klue"])
    with pytest.raises(ValueError, match="every"):
        CheckpointEvalConfig(every=0)


def test_checkpoint_scores_land_in_the_pretrain_run_at_its_step(checkpoints, mlflow_server, kobest_dir, tmp_path):
    from mlflow import MlflowClient

    run_id = _pretrain_run("evaluator-direct")
    ckpt = checkpoints[1]
    cfg = {"tasks": ["copa"], "limit": LIMIT, "kobest_dir": str(kobest_dir)}
    got = validate_checkpoint(str(ckpt), run_id=run_id, config=cfg)
    client = MlflowClient()
    for key in ("kobest_copa/f1/0shot", "kobest_copa/acc/0shot", "published/kobest_copa/f1/0shot",
                "kobest_copa/f1_vs_ref/0shot"):
        hist = client.get_metric_history(run_id, key)
        assert [(m.step, m.value) for m in hist] == [(2, pytest.approx(got[key]))], key
    assert got["published/kobest_copa/f1/0shot"] == 0.7196  # polyglot-ko-1.3b, the nearest published size
    assert 0.0 <= got["kobest_copa/f1/0shot"] <= 1.0
    arts = [a.path for a in client.list_artifacts(run_id, "kobest/step_000002")]
    assert arts == ["kobest/step_000002/table.md"]
    # A bad data dir is an exception (what Ray's retry sees), not a silent empty result.
    with pytest.raises(ValueError, match="lacks"):
        validate_checkpoint(str(ckpt), run_id=run_id, config={**cfg, "kobest_dir": str(tmp_path)})
    with pytest.raises(ValueError, match="no MLflow run"):  # this run's loop had no MLflow run to record
        validate_checkpoint(str(ckpt), config=cfg)


@pytest.mark.slow
def test_validation_runs_beside_training(ray_local, mlflow_server, kobest_dir, checkpoints, tmp_path):
    """Ray Train V2 ``validation_config``: the loop reports 2 checkpoints and finishes long before their
    evaluations do; both land in the pretrain run at steps 1 and 2; a first failed attempt is retried."""
    import ray.train
    from mlflow import MlflowClient
    from ray.train.torch import TorchTrainer

    from polyko import tracking

    run_id = _pretrain_run("evaluator-ray")
    cfg = CheckpointEvalConfig(tasks=["copa"], limit=LIMIT, kobest_dir=str(kobest_dir), max_retries=1)
    flaky = tmp_path / "fail-once"
    flaky.write_text("")

    def loop(c):  # reports the two checkpoints as the train loop does, then ends
        import shutil as sh
        from pathlib import Path as P

        import ray.train as rt

        from polyko.train import checkpoint as ckpt_io

        times = []
        for step, src in zip((1, 2), c["ckpts"]):
            local = P(c["tmp"]) / f"w{step}"
            sh.copytree(src, local)
            t = time.time()
            rt.report({"step": step}, checkpoint=rt.Checkpoint.from_directory(str(local)),
                      checkpoint_dir_name=ckpt_io.step_dir_name(step), validation=True)
            times.append(time.time() - t)
        P(c["tmp"], "loop_done").write_text(f"{time.time()} {max(times)}")

    vc = validation_config(cfg, run_id=run_id, tracking_uri=tracking.tracking_uri())
    real_fn, marker = vc.fn, str(flaky)

    def fails_once(checkpoint, **kw):  # the first evaluation attempt dies, as a preempted task would
        import os

        if os.path.exists(marker):
            os.remove(marker)
            raise RuntimeError("evaluation attempt failed")
        return real_fn(checkpoint, **kw)

    vc.fn = fails_once
    trainer = TorchTrainer(
        loop, train_loop_config={"tmp": str(tmp_path), "ckpts": [str(c) for c in checkpoints]},
        scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
        run_config=ray.train.RunConfig(name="evaluator", storage_path=str(tmp_path / "ray")),
        validation_config=vc)
    result = trainer.fit()
    assert result.error is None
    loop_end = float((tmp_path / "loop_done").read_text().split()[0])
    client = MlflowClient()
    hist = client.get_metric_history(run_id, "kobest_copa/f1/0shot")
    assert sorted(m.step for m in hist) == [1, 2]
    # The loop had finished before the first score was logged: it never waited for an evaluation.
    assert min(m.timestamp for m in hist) / 1000 > loop_end
    assert not flaky.exists()  # the failing first attempt happened, and was retried


_DRIVER = r'''
import json, sys, time
from pathlib import Path
import ray, ray.train
from ray.train.torch import TorchTrainer
from polyko.train.evaluator import CheckpointEvalConfig, validation_config
args = json.loads(sys.argv[1])
ray.init(address=args["address"])
cfg = CheckpointEvalConfig(tasks=["copa"], limit=args["limit"], kobest_dir=args["kobest"], max_retries=0)
vc = validation_config(cfg, run_id=args["run_id"], tracking_uri=args["tracking"])
real, stall = vc.fn, args["stall"]

def evaluate(checkpoint, **kw):  # while the marker exists the evaluation is still running when the run dies
    import os, time
    Path(stall).with_name(f"attempt-{os.getpid()}").write_text("")
    while os.path.exists(stall):
        time.sleep(0.5)
    return real(checkpoint, **kw)

vc.fn = evaluate

def loop(c):
    import shutil
    import ray.train as rt
    from polyko.train import checkpoint as ckpt_io
    if rt.get_checkpoint() is not None:
        return  # the restarted run: training is done, only the evaluation is left
    local = Path(c["tmp"]) / "w"
    shutil.copytree(c["ckpt"], local)
    rt.report({"step": 1}, checkpoint=rt.Checkpoint.from_directory(str(local)),
              checkpoint_dir_name=ckpt_io.step_dir_name(1), validation=True)
    time.sleep(600)  # killed before this ends

TorchTrainer(loop, train_loop_config={"tmp": args["tmp"], "ckpt": args["ckpt"]},
             scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
             run_config=ray.train.RunConfig(name="requeue", storage_path=args["storage"]),
             validation_config=vc).fit()
print("FIT DONE", flush=True)
'''


@pytest.mark.slow
def test_pending_evaluation_is_requeued_after_restart(ray_local, mlflow_server, kobest_dir, checkpoints, tmp_path):
    """The driver dies while a checkpoint's evaluation is still running; the next ``fit()`` of the same run
    (same storage and name) runs that evaluation again, and its scores land at the checkpoint's step."""
    import json
    import os
    import signal
    import subprocess
    import sys

    import ray
    from mlflow import MlflowClient

    run_id = _pretrain_run("evaluator-requeue")
    stall = tmp_path / "stall"
    stall.write_text("")
    args = {"address": ray.get_runtime_context().gcs_address, "limit": LIMIT, "kobest": str(kobest_dir),
            "run_id": run_id, "tracking": mlflow_server, "stall": str(stall), "tmp": str(tmp_path),
            "ckpt": str(checkpoints[0]), "storage": str(tmp_path / "ray")}
    script = tmp_path / "driver.py"
    script.write_text(_DRIVER)
    snapshot = tmp_path / "ray" / "requeue" / "checkpoint_manager_snapshot.json"
    first = subprocess.Popen([sys.executable, str(script), json.dumps(args)], start_new_session=True,
                             stdout=open(tmp_path / "first.log", "w"), stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while time.time() < deadline and not (snapshot.is_file() and "step_000001" in snapshot.read_text()):
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        time.sleep(1)
    assert snapshot.is_file(), "the first run never registered its checkpoint"
    time.sleep(3)  # the evaluation task has started and is stalled
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    attempts = list(tmp_path.glob("attempt-*"))
    assert len(attempts) == 1, "the evaluation of the first run had not started"
    pid = int(attempts[0].name.split("-")[1])
    deadline = time.time() + 60
    while time.time() < deadline and Path(f"/proc/{pid}").exists():  # Ray ends the dead driver's tasks
        time.sleep(1)
    assert not Path(f"/proc/{pid}").exists(), "the first run's evaluation outlived its driver"
    assert MlflowClient().get_metric_history(run_id, "kobest_copa/f1/0shot") == []
    stall.unlink()
    second = subprocess.run([sys.executable, str(script), json.dumps(args)], capture_output=True, text=True,
                            timeout=600)
    assert second.returncode == 0 and "FIT DONE" in second.stdout, (second.stdout + second.stderr)[-4000:]
    hist = MlflowClient().get_metric_history(run_id, "kobest_copa/f1/0shot")
    assert [m.step for m in hist] == [1]
    assert len(list(tmp_path.glob("attempt-*"))) == 2  # scored by the re-queued attempt of the second run
