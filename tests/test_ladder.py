"""Scaling-law ladder: Chinchilla approach 3 recovers a known law from synthetic points, and a real tiny ladder
(Ray tasks training GPT-NeoX on the real Korean token data) fits, predicts the released sizes, plots and logs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from polyko.sweep.ladder import (LadderConfig, LadderPoint, bootstrap, fit_scaling_law, leave_one_out,
                                 paper_targets, predicted_loss_line, run_ladder)

from train_helpers import make_tokens

CHINCHILLA = dict(E=1.69, A=406.4, alpha=0.34, B=410.7, beta=0.28)  # Hoffmann et al. 2022, eq. 10


def synthetic(noise: float, seed: int = 0) -> list[LadderPoint]:
    rng = np.random.default_rng(seed)
    c = CHINCHILLA
    pts = []
    for n in (2e5, 5e5, 1e6, 3e6, 1e7):
        for d in (1e6, 4e6, 1.6e7, 6.4e7):
            loss = c["E"] + c["A"] / n ** c["alpha"] + c["B"] / d ** c["beta"]
            pts.append(LadderPoint(n, d, loss * float(np.exp(rng.normal(0, noise)))))
    return pts


def test_fit_recovers_known_exponents_from_synthetic_points():
    exact = fit_scaling_law(synthetic(0.0))
    for k, v in CHINCHILLA.items():
        assert getattr(exact, k) == pytest.approx(v, rel=1e-3), k
    noisy_pts = synthetic(0.003)
    noisy = fit_scaling_law(noisy_pts)
    assert noisy.alpha == pytest.approx(0.34, abs=0.05) and noisy.beta == pytest.approx(0.28, abs=0.03)
    loo = leave_one_out(noisy_pts, noisy)
    assert len(loo) == 20 and np.mean(loo) < 0.01  # within noise
    # A law fitted on a ladder extrapolates: predict a 10x bigger model 10x longer.
    truth = CHINCHILLA["E"] + CHINCHILLA["A"] / 1e8 ** 0.34 + CHINCHILLA["B"] / 6.4e8 ** 0.28
    assert noisy.predict(1e8, 6.4e8) == pytest.approx(truth, rel=0.02)
    band = bootstrap(noisy_pts, noisy, {"big": (1e8, 6.4e8)}, samples=10)
    assert band["big"][0] <= truth * 1.02 and band["big"][1] >= truth * 0.98
    with pytest.raises(ValueError, match="at least 5"):
        fit_scaling_law(noisy_pts[:4])


def test_paper_targets_are_the_released_sizes_at_their_token_budgets():
    from polyko.model import build_config, count_params
    from polyko.sweep.ladder import non_embedding_params

    c = build_config("tiny")
    assert non_embedding_params(c) == count_params(c) - 2 * c.vocab_size * c.hidden_size
    t = paper_targets()
    assert list(t) == ["1.3b", "3.8b", "5.8b", "12.8b"]
    assert t["1.3b"][1] == 213e9 and t["12.8b"][1] == 167e9
    assert 1.1e9 < t["1.3b"][0] < 1.3e9 and 1.2e10 < t["12.8b"][0] < 1.3e10  # non-embedding


@pytest.mark.slow
def test_real_tiny_ladder_fits_predicts_plots_and_logs(tmp_path, polyglot_tokenizer_dir, corpus_dir, ray_local,
                                                       mlflow_server, work_dir):
    from mlflow.tracking import MlflowClient

    tokens = make_tokens(tmp_path / "tokens", polyglot_tokenizer_dir, corpus_dir, max_sequences=256)
    cfg = LadderConfig(widths=[16, 32, 64], steps=[6, 12, 24], loss_window=3, output=str(tmp_path / "ladder"))
    cfg.base.data.path, cfg.base.data.tokenizer = str(tokens), str(polyglot_tokenizer_dir)
    cfg.base.batch.global_batch_tokens, cfg.base.batch.micro_batch = 8 * 64, 8
    cfg.base.optim.lr, cfg.base.optim.warmup_steps, cfg.base.optim.schedule = 3e-3, 2, "wsd"
    r = run_ladder(cfg)
    assert len(r.points) == 9 and len({p.params for p in r.points}) == 3
    for n in {p.params for p in r.points}:  # more tokens, lower loss, at every width
        losses = [p.loss for p in sorted((p for p in r.points if p.params == n), key=lambda p: p.tokens)]
        assert losses[0] > losses[-1]
    assert np.isfinite([r.fit.E, r.fit.A, r.fit.alpha, r.fit.B, r.fit.beta]).all()
    assert len(r.loo) == 9 and np.isfinite(r.loo).all()
    assert set(r.predictions) == {"1.3b", "3.8b", "5.8b", "12.8b"}
    for p in r.predictions.values():
        assert np.isfinite(p["loss"]) and p["low"] <= p["high"]
    assert (r.output / "ladder.png").stat().st_size > 10_000
    saved = json.loads((r.output / "ladder.json").read_text())
    assert saved["fit"]["alpha"] == pytest.approx(r.fit.alpha)
    assert "predicted final loss" in predicted_loss_line("12.8b", r.output / "ladder.json")
    run = MlflowClient(tracking_uri=mlflow_server).get_run(r.run_id)
    assert run.data.metrics["predicted_loss/1.3b"] == pytest.approx(r.predictions["1.3b"]["loss"])
    assert "loo_error_mean" in run.data.metrics and "fit_alpha" in run.data.metrics
    print(r.report())


def test_plan_prints_the_ladder_prediction_beside_the_days(tmp_path, capsys):
    """``jobs/pretrain.py --plan --ladder ladder.json``: the fit's predicted final loss for the planned size and
    token budget, with the bootstrap interval, right after the plan's time (a ladder.json made by the same code
    as ``run_ladder``, from noisy points of a known law)."""
    import importlib.util
    from pathlib import Path

    from polyko import plan as P
    from polyko.model import build_config
    from polyko.sweep.ladder import non_embedding_params, predict_from_ladder, summarize

    path = tmp_path / "ladder.json"
    path.write_text(json.dumps(summarize(synthetic(0.003), samples=10)))
    c = CHINCHILLA
    n = non_embedding_params(build_config("1.3b"))
    truth = c["E"] + c["A"] / n ** c["alpha"] + c["B"] / 213e9 ** c["beta"]
    p = predict_from_ladder(path, "1.3b")
    assert p["tokens"] == 213e9 and p["low"] < p["loss"] < p["high"] and p["high"] - p["low"] < 0.5
    assert p["loss"] == pytest.approx(truth, rel=0.06)  # 100x past the ladder's largest model, 0.3 % noise

    spec = importlib.util.spec_from_file_location("pretrain_job", Path(__file__).resolve().parents[1] / "jobs" / "pretrain.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    assert job.main(["--plan", "--size", "1.3b", "--gpus", "64", "--gpu", "h100", "--ladder", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    at = next(i for i, line in enumerate(lines) if line.strip().startswith("time"))
    assert lines[at + 1].split()[:3] == ["predicted", "final", "loss"], lines
    assert f"{p['loss']:.3f} (90% {p['low']:.3f}-{p['high']:.3f}) at 213.0B tokens" in lines[at + 1]
    # Another token budget (python -m polyko.plan --tokens): the law at that budget, not the paper's.
    assert P.main(["--size", "1.3b", "--gpus", "64", "--gpu", "h100", "--tokens", "26e9", "--ladder", str(path)]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if "predicted final loss" in x)
    q = predict_from_ladder(path, "1.3b", 26e9)
    assert q["loss"] > p["loss"] and f"{q['loss']:.3f}" in line and "26.0B tokens" in line
    bad = tmp_path / "not-a-ladder.json"
    bad.write_text("{}")
    with pytest.raises(SystemExit) as e:
        job.main(["--plan", "--size", "1.3b", "--ladder", str(bad)])
    assert e.value.code == 2 and "not a ladder.json" in capsys.readouterr().err
