"""The loss-spike / NaN guard: statistics and action ladder on synthetic loss streams, exact state round
trips, checkpoint health and retention, and ``skip_step`` on a real DeepSpeed engine (CPU, gloo world of 1)
at ZeRO 0 and 2, fp32 and bf16, compared bitwise."""

from __future__ import annotations

import copy
import json
import math
import random

import pytest

from polyko.train.guard import (METRIC_ANOMALIES, METRIC_ROLLBACKS, METRIC_SKIPPED, Guard, GuardConfig,
                                GuardStopped, is_rollback_target, retention, rollback_target, z_loss_term)

GB = 8  # global batch (samples per step) of the synthetic runs


def noisy(n: int, seed: int = 0, base: float = 3.0) -> list[float]:
    """A slowly falling loss with ~1% noise, like a real run's."""
    rng = random.Random(seed)
    return [base - 0.002 * i + rng.gauss(0, 0.03) for i in range(n)]


def feed(g: Guard, losses, start: int = 0, gnorm: float = 1.0):
    return [g.observe(start + i, x, gnorm) for i, x in enumerate(losses)]


def test_z_loss_term():
    import torch

    logits = torch.tensor([[[0.0, 0.0], [math.log(3.0), math.log(1.0)]]])  # logsumexp = log 2, log 4
    assert float(z_loss_term(logits, 1e-4)) == pytest.approx(1e-4 * (math.log(2) ** 2 + math.log(4) ** 2) / 2)


def test_config_validation():
    with pytest.raises(ValueError, match="sigma"):
        GuardConfig(sigma=0)
    with pytest.raises(ValueError, match="warmup"):
        GuardConfig(window=16, warmup=32)
    with pytest.raises(ValueError, match="skip_margin"):
        GuardConfig(skip_margin=-1)
    with pytest.raises(ValueError, match="global_batch"):
        Guard(GuardConfig(), 0)


def test_clean_stream_has_no_anomaly_and_spike_is_skipped():
    g = Guard(GuardConfig(window=32, warmup=10), GB)
    assert all(d.action == "step" for d in feed(g, noisy(200)))
    assert g.anomalies == 0 and g.metrics() == {METRIC_ANOMALIES: 0.0, METRIC_SKIPPED: 0.0, METRIC_ROLLBACKS: 0.0}
    d = g.observe(200, 6.0, 1.0)  # a loss spike
    assert (d.action, d.anomaly) == ("skip", "spike_loss") and d.statistic > 6
    assert g.events[-1]["samples"] == [200 * GB, 201 * GB]
    # The spike did not enter the window: the next normal step is healthy and ends the streak.
    assert g.observe(201, 2.6, 1.0).action == "step" and g.streak == 0
    # Grad-norm spike with a normal loss.
    d = g.observe(202, 2.6, 50.0)
    assert (d.action, d.anomaly) == ("skip", "spike_grad_norm")
    assert g.metrics()[METRIC_ANOMALIES] == 2 and g.metrics()[METRIC_SKIPPED] == 2


def test_warmup_and_nonfinite():
    g = Guard(GuardConfig(window=32, warmup=10), GB)
    # Before the window holds `warmup` values, a large jump is not a spike ...
    assert [d.action for d in feed(g, [10.0, 9.0, 30.0, 8.0])] == ["step"] * 4
    # ... but a non-finite loss or grad norm always is.
    assert g.observe(4, float("nan"), 1.0).anomaly == "nonfinite_loss"
    assert g.observe(5, 2.0, float("inf")).anomaly == "nonfinite_grad_norm"
    assert g.observe(6, 2.0, 1.0, params_nonfinite=3).action == "rollback"  # NaN weights: straight to rollback
    assert json.loads(json.dumps(g.events, allow_nan=False))[0]["loss"] == "nan"  # strict JSON


def test_tensor_inputs_are_read_once():
    import torch

    g = Guard(GuardConfig(window=8, warmup=4), GB)
    d = g.observe(0, torch.tensor(2.5, dtype=torch.float64), torch.tensor(1.25), torch.tensor(0))
    assert (d.action, d.loss, d.grad_norm) == ("step", 2.5, 1.25)
    off = Guard(GuardConfig(enabled=False), GB)
    assert off.observe(0, torch.tensor(float("nan")), 1.0).action == "step"


def test_ladder_escalates_to_rollback_then_stop():
    cfg = GuardConfig(window=32, warmup=10, max_consecutive=3, max_rollbacks=2, skip_margin=5, rewarmup_steps=4)
    g = Guard(cfg, GB)
    feed(g, noisy(50))
    ckpt = {"step": 40, "guard": g.checkpoint_meta(params_finite=True)}  # pretend saved at step 40 ...
    ckpt["guard"]["state"]["window_loss"] = g.state_dict()["window_loss"][:-10]  # (its own, older window)
    acts = [d.action for d in feed(g, [9.0, 9.0, 9.0], start=50)]
    assert acts == ["skip", "skip", "rollback"]
    plan = g.on_rollback(ckpt)
    # Skip window: from the checkpoint's position to the end of the FIRST anomalous batch + skip_margin.
    assert (plan.step, plan.skip_start, plan.skip_end) == (40, 40 * GB, 51 * GB + 5)
    assert g.position(40) == 51 * GB + 5 and g.position(41) == 52 * GB + 5
    assert g.state_dict()["window_loss"] == ckpt["guard"]["state"]["window_loss"]  # statistics from the checkpoint
    assert [g.lr_scale(s) for s in (39, 40, 41, 43, 44)] == [1.0, 0.25, 0.5, 1.0, 1.0]
    assert g.events[-1]["rollback_to"] == 40 and g.events[-1]["skipped_range"] == [320, 413]
    # Second streak -> second rollback (max_rollbacks=2) -> the third is a stop.
    feed(g, noisy(20, seed=1), start=40)
    assert [d.action for d in feed(g, [9.0] * 3, start=60)][-1] == "rollback"
    g.on_rollback(ckpt)
    feed(g, noisy(20, seed=2), start=40)
    assert [d.action for d in feed(g, [9.0] * 3, start=60)][-1] == "stop"
    err = g.stop("guard.max_rollbacks=2 reached")
    assert isinstance(err, GuardStopped) and err.report["rollbacks"] == 2
    assert [e["action"] for e in err.report["events"]].count("rollback") == 2
    # Both rollbacks went to the same checkpoint: the union of their windows is what the model never saw.
    assert err.report["skip_ranges"] == [[320, 413], [320, 60 * GB + 93 + GB + 5]]
    assert err.report["not_trained_on"] == [[320, 60 * GB + 93 + GB + 5], [60 * GB + 266, 63 * GB + 266]]


def test_state_round_trip_is_exact(tmp_path):
    """Serialised mid-streak and after a rollback, a restored guard decides the rest identically."""
    cfg = GuardConfig(window=16, warmup=5, max_consecutive=2)
    stream = noisy(110)
    stream[80], stream[100], stream[101] = 9.0, float("nan"), 9.0  # skip; skip, then rollback (2 in a row)
    a = Guard(cfg, GB)
    da = feed(a, stream[:60])
    ckpt = {"step": 60, "guard": a.checkpoint_meta(True)}
    meta = json.loads(json.dumps(ckpt))  # through the checkpoint metadata file
    b = Guard(cfg, GB)
    b.load_state_dict(meta["guard"]["state"])
    rest_a, rest_b = feed(a, stream[60:], 60), feed(b, stream[60:], 60)
    assert rest_a == rest_b and a.state_dict() == b.state_dict()
    assert [d.action for d in da + rest_a].count("rollback") == 1
    a.write_events(tmp_path / "guard_events.json")
    assert json.loads((tmp_path / "guard_events.json").read_text())["events"] == a.events
    with pytest.raises(ValueError, match="global batch"):
        Guard(cfg, GB * 2).load_state_dict(a.state_dict())


def test_checkpoint_health_and_retention():
    g = Guard(GuardConfig(window=16, warmup=5), GB)
    feed(g, noisy(30))
    healthy = {"step": 30, "guard": g.checkpoint_meta(params_finite=True)}
    assert is_rollback_target(healthy)
    assert not is_rollback_target({"step": 31, "guard": g.checkpoint_meta(params_finite=False)})
    g.observe(30, 50.0, 1.0)
    streak = {"step": 31, "guard": g.checkpoint_meta(params_finite=True)}
    assert not is_rollback_target(streak)  # saved inside an anomaly streak
    assert is_rollback_target({"step": 5, "loss": 2.0}) and not is_rollback_target({"step": 5, "loss": math.nan})
    cks = [("s10", {"step": 10, "loss": 3.0}), ("s30", healthy), ("s31", streak),
           ("s40", {"step": 40, "guard": {"healthy": False}}), ("s50", {"step": 50, "guard": {"healthy": False}})]
    assert rollback_target(cks)[0] == "s30" and rollback_target(cks, before_step=20)[0] == "s10"
    assert rollback_target(cks[2:]) is None
    # keep=2 keeps s50, s40 and the last healthy s30 (never deleted), deletes s31 and s10.
    assert retention(cks, keep=2) == ["s31", "s10"]
    assert retention(cks, keep=4) == ["s10"]
    # Ray Train's score-based retention ranks the same way: healthy newest first, unhealthy last.
    from polyko.train.guard import health_score

    order = sorted(cks, key=lambda pm: -health_score(pm[1]["step"], is_rollback_target(pm[1])))
    assert [p for p, _ in order[:2]] == ["s30", "s10"]


# --- skip_step on a real DeepSpeed engine --------------------------------------------------------------------
def _engine(stage: int, precision: str, world: int = 1):
    import deepspeed
    import torch

    from polyko.model import build_config, build_model

    torch.manual_seed(0)
    model = build_model(build_config("tiny", vocab_size=512, max_position_embeddings=64))
    cfg = {"train_batch_size": 4 * world, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2,
           "gradient_clipping": 1.0, "steps_per_print": 10**9,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.1, "torch_adam": True}},
           "zero_optimization": {"stage": stage}, "bf16": {"enabled": precision.startswith("bf16")}}
    if precision == "bf16-fp32acc":  # what makes DeepSpeed pick its BF16_Optimizer (at ZeRO-1)
        cfg["data_types"] = {"grad_accum_dtype": "fp32"}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    return engine


def _snapshot(engine):
    """Everything a step may change: module weights and the optimizer wrapper's full state (fp32 master
    partitions, Adam moments and step counts, loss scaler), as CPU clones."""
    import torch

    def clone(x):
        if torch.is_tensor(x):
            return x.detach().clone()
        if isinstance(x, dict):
            return {k: clone(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(clone(v) for v in x)
        return copy.deepcopy(x)

    return {"module": clone(engine.module.state_dict()), "optim": clone(engine.optimizer.state_dict())}


def _same(a, b, path="") -> list[str]:
    import torch

    if torch.is_tensor(a):
        return [] if torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b) else [path]
    if isinstance(a, dict):
        return [p for k in a for p in _same(a[k], b.get(k), f"{path}.{k}")] + \
            ([f"{path}: keys"] if set(a) != set(b) else [])
    if isinstance(a, (list, tuple)):
        return [p for i, (x, y) in enumerate(zip(a, b)) for p in _same(x, y, f"{path}[{i}]")] + \
            ([f"{path}: len"] if len(a) != len(b) else [])
    if hasattr(a, "__dict__") and type(a) is type(b) and not isinstance(a, type):  # e.g. the loss scaler
        return _same(vars(a), vars(b), path)
    return [] if a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b)) else [path]


def _micro_batches(seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, 512, (2, 32), generator=g) for _ in range(2)]


def _train_step(engine, seed: int, *, poison: bool = False, skip: bool = False, guard=None, step: int = 0):
    """One optimizer step of 2 micro-batches; returns the pre-step grad norm (or, with ``guard``, the
    guard's decision). ``poison`` makes the loss (and every gradient) NaN, like a step the guard must refuse."""
    import torch

    from polyko.train.guard import boundary_step, grad_norm, skip_step

    total = torch.zeros((), dtype=torch.float64)
    for i, x in enumerate(_micro_batches(seed)):
        loss = engine(input_ids=x, labels=x).loss
        engine.backward(loss * float("nan") if poison else loss)
        total += loss.detach().double() * (float("nan") if poison else 1.0)
        if i == 0:
            engine.step()  # not a boundary: DeepSpeed only counts the micro-step
    if guard is not None:
        return boundary_step(guard, engine, step, total / 2)
    norm = grad_norm(engine)
    skip_step(engine) if skip else engine.step()
    return norm


@pytest.mark.parametrize("stage,precision", [(0, "fp32"), (2, "fp32"), (0, "bf16"), (2, "bf16"), (1, "bf16-fp32acc"),
                                             (3, "fp32")])
def test_skip_step_changes_nothing(gloo_world, stage, precision):
    """A skipped NaN step leaves weights and optimizer state bit-identical, and the next real step equals
    that of an engine that never saw the bad batch (no gradient leaks into it)."""
    import torch

    from polyko.train.guard import params_nonfinite

    from polyko.train.guard import _optimizer_kind

    a, b = _engine(stage, precision), _engine(stage, precision)
    assert _optimizer_kind(a.optimizer) == {0: "plain", 1: "bf16", 2: "zero12", 3: "zero3"}[stage]
    assert _same(_snapshot(a), _snapshot(b)) == []
    na, nb = _train_step(a, 1), _train_step(b, 1)
    if a.get_global_grad_norm() is not None:  # DeepSpeed's own (post-step) norm equals the guard's pre-step one
        assert float(na) == pytest.approx(float(a.get_global_grad_norm()), rel=1e-5)
    assert torch.equal(torch.as_tensor(na), torch.as_tensor(nb))
    before = _snapshot(b)
    steps = b.global_steps
    if stage >= 2:  # through the guard: it sees the NaN and skips by itself
        d = _train_step(b, 99, poison=True, guard=Guard(GuardConfig(), 4), step=1)
        assert (d.action, d.anomaly) == ("skip", "nonfinite_loss")
    else:
        bad = _train_step(b, 99, poison=True, skip=True)
        assert not math.isfinite(float(bad))
    # (ZeRO-3's module tensors are partition placeholders outside forward: its state is the optimizer's.)
    keys = ["optim"] if stage == 3 else ["module", "optim"]
    assert _same({k: before[k] for k in keys}, {k: _snapshot(b)[k] for k in keys}) == [], \
        "skip_step changed the engine's state"
    assert b.global_steps == steps + 1 and b.skipped_steps == 1 and int(params_nonfinite(b)) == 0
    _train_step(a, 2)
    _train_step(b, 2)
    diff = _same(_snapshot(a), _snapshot(b))
    assert diff == [], f"the step after a skip differs from a clean one: {diff[:5]}"
    assert _same(before["optim"], _snapshot(b)["optim"]) != []  # and it did train
    assert int(params_nonfinite(b)) == 0


@pytest.mark.slow
def test_skip_step_two_ranks_zero2(ray_local, tmp_path):
    """The same bitwise check with 2 data-parallel ranks at ZeRO-2 (partitioned optimizer state and gradients
    reduced across ranks), each rank on its own data, in a real Ray Train worker group."""
    import sys

    import ray.train
    from ray import cloudpickle
    from ray.train.torch import TorchTrainer

    cloudpickle.register_pickle_by_value(sys.modules[__name__])

    def loop(c):
        import importlib as il
        import json as js

        il.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
        rank = ray.train.get_context().get_world_rank()
        a, b = _engine(2, "fp32", world=2), _engine(2, "fp32", world=2)
        _train_step(a, 10 + rank)
        _train_step(b, 10 + rank)
        before = _snapshot(b)
        _train_step(b, 99 + rank, poison=True, skip=True)
        unchanged = _same(before, _snapshot(b))
        _train_step(a, 20 + rank)
        _train_step(b, 20 + rank)
        after = _same(_snapshot(a), _snapshot(b))
        with open(f"{c['out']}/rank{rank}.json", "w") as f:
            js.dump({"unchanged": unchanged, "after": after, "skipped": b.skipped_steps}, f)

    TorchTrainer(loop, train_loop_config={"out": str(tmp_path)},
                 scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
                 run_config=ray.train.RunConfig(name="skip2", storage_path=str(tmp_path / "ray"))).fit()
    for r in (0, 1):
        got = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert got == {"unchanged": [], "after": [], "skipped": 1}, (r, got)
