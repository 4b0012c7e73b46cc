"""Scaling-law ladder: train small models at several sizes and token budgets, fit
``L(N, D) = E + A / N**alpha + B / D**beta`` and predict the big runs' final loss.

The fit is Chinchilla's approach 3 (Hoffmann et al. 2022, appendix D.2): minimise the Huber loss
(delta = 1e-3) between ``log L`` and ``LSE(a - alpha log N, b - beta log D, e)`` (``A = e**a``, ``B = e**b``,
``E = e**e``) with L-BFGS from a grid of starting points, keeping the best. ``N`` counts non-embedding
parameters (Kaplan et al. 2020: with a 30k vocabulary, embeddings are most of a small model and follow no
power law), ``D`` training tokens. The fit reports its leave-one-out error on the ladder (refit without each
point, predict it) and predicts ``1.3b``...``12.8b`` at Polyglot-Ko's token budgets (``polyko.plan.PAPER_TOKENS``)
with a bootstrap interval over the ladder points.

A ladder point is one single-process training run (each fits one device) of the same GPT-NeoX, data, sampler,
AdamW and WSD schedule as pretraining, executed as a Ray task (``num_gpus=1`` on GPUs), so the ladder spreads
over a cluster. ``run_ladder`` logs the points, the fit, the predictions and a PNG plot (loss vs compute, the
ladder points, the fitted compute-optimal frontier) to one MLflow run in ``polyko-sweep``.

CPU: ``fit_scaling_law(points)`` on ``LadderPoint`` values; ``python jobs/sweep.py --ladder --data DIR
--tokenizer TOK`` (3 widths x 3 budgets of about a minute each on 2 cores).
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from polyko.train.config import PretrainConfig

HUBER_DELTA = 1e-3  # Chinchilla's value, on log-loss


@dataclass(frozen=True)
class LadderPoint:
    params: float          # N: non-embedding parameters
    tokens: float          # D: training tokens
    loss: float            # final training loss (mean over the last steps)
    hidden_size: int = 0
    num_layers: int = 0


@dataclass(frozen=True)
class ScalingFit:
    E: float
    A: float
    alpha: float
    B: float
    beta: float
    huber: float           # objective at the optimum

    def predict(self, n: float | np.ndarray, d: float | np.ndarray) -> float | np.ndarray:
        return self.E + self.A / np.power(n, self.alpha) + self.B / np.power(d, self.beta)

    def optimal_split(self, compute: float) -> tuple[float, float]:
        """Compute-optimal ``(N, D)`` for ``C = 6 N D`` FLOPs (Chinchilla eq. 4)."""
        # N_opt = G (C/6)^a with a = beta / (alpha + beta); D_opt = (C/6) / N_opt follows from C = 6 N D.
        a = self.beta / (self.alpha + self.beta)
        g = (self.alpha * self.A / (self.beta * self.B)) ** (1 / (self.alpha + self.beta))
        n = g * (compute / 6) ** a
        return n, (compute / 6) / n

    def as_dict(self) -> dict[str, float]:
        return {"E": self.E, "A": self.A, "alpha": self.alpha, "B": self.B, "beta": self.beta, "huber": self.huber}


def _objective(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray) -> tuple[float, np.ndarray]:
    a, b, e, alpha, beta = theta
    t = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])
    m = t.max(axis=0)
    w = np.exp(t - m)
    s = w.sum(axis=0)
    pred = m + np.log(s)
    r = pred - log_l
    small = np.abs(r) <= HUBER_DELTA
    loss = np.where(small, 0.5 * r ** 2, HUBER_DELTA * (np.abs(r) - 0.5 * HUBER_DELTA))
    dr = np.where(small, r, HUBER_DELTA * np.sign(r))
    p = w / s  # softmax weights: d pred / d t_k
    grad = np.array([(dr * p[0]).sum(), (dr * p[1]).sum(), (dr * p[2]).sum(),
                     (dr * p[0] * -log_n).sum(), (dr * p[1] * -log_d).sum()])
    return float(loss.sum()), grad


def fit_scaling_law(points: list[LadderPoint], *, starts: list[np.ndarray] | None = None) -> ScalingFit:
    """Chinchilla approach 3 on ``points`` (at least 5: the law has 5 parameters)."""
    from scipy.optimize import minimize

    if len(points) < 5:
        raise ValueError(f"a scaling-law fit needs at least 5 ladder points, got {len(points)}")
    n = np.array([p.params for p in points], dtype=np.float64)
    d = np.array([p.tokens for p in points], dtype=np.float64)
    l_ = np.array([p.loss for p in points], dtype=np.float64)
    if not (np.all(n > 0) and np.all(d > 0) and np.all(np.isfinite(l_)) and np.all(l_ > 0)):
        raise ValueError("ladder points need N > 0, D > 0 and a finite positive loss")
    args = (np.log(n), np.log(d), np.log(l_))
    if starts is None:
        starts = _grid_starts(*args)
    best = None
    bounds = [(None, None), (None, None), (None, None), (0.0, 3.0), (0.0, 3.0)]
    for x0 in starts:
        r = minimize(_objective, x0, args=args, jac=True, method="L-BFGS-B", bounds=bounds,
                     options={"maxiter": 500, "gtol": 1e-10})
        if best is None or r.fun < best.fun:
            best = r
    a, b, e, alpha, beta = best.x
    return ScalingFit(E=math.exp(e), A=math.exp(a), alpha=float(alpha), B=math.exp(b), beta=float(beta),
                      huber=float(best.fun))


def _grid_starts(log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray, keep: int = 64) -> list[np.ndarray]:
    """Chinchilla's initialisation grid (a, b in 0..25 step 5, e in -1..1 step .5, alpha, beta in 0..2 step .5),
    scored in one vectorised pass; L-BFGS then starts from the ``keep`` best grid points only (running it from
    all 4,500 finds the same optimum, ~100x slower)."""
    g = np.array(list(itertools.product(np.arange(0, 26, 5.0), np.arange(0, 26, 5.0), np.arange(-1, 1.01, 0.5),
                                        np.arange(0, 2.01, 0.5), np.arange(0, 2.01, 0.5))))
    t = np.stack([g[:, :1] - g[:, 3:4] * log_n, g[:, 1:2] - g[:, 4:5] * log_d,
                  np.repeat(g[:, 2:3], len(log_n), axis=1)])
    r = np.logaddexp.reduce(t, axis=0) - log_l
    huber = np.where(np.abs(r) <= HUBER_DELTA, 0.5 * r ** 2, HUBER_DELTA * (np.abs(r) - 0.5 * HUBER_DELTA)).sum(1)
    return [g[i] for i in np.argsort(huber)[:keep]]


def _start(fit: ScalingFit) -> np.ndarray:
    return np.array([math.log(fit.A), math.log(fit.B), math.log(fit.E), fit.alpha, fit.beta])


def leave_one_out(points: list[LadderPoint], fit: ScalingFit) -> list[float]:
    """Relative error of each point's loss predicted by a fit without it (refits start from ``fit``)."""
    errs = []
    for i, p in enumerate(points):
        rest = points[:i] + points[i + 1:]
        f = fit_scaling_law(rest, starts=_starts_near(fit))
        errs.append(float(abs(f.predict(p.params, p.tokens) - p.loss) / p.loss))
    return errs


def _starts_near(fit: ScalingFit) -> list[np.ndarray]:
    x = _start(fit)
    return [x, x + np.array([1.0, 1.0, 0.0, 0.1, 0.1]), x - np.array([1.0, 1.0, 0.0, 0.1, 0.1])]


def bootstrap_fits(points: list[LadderPoint], fit: ScalingFit, *, samples: int = 50, seed: int = 0) -> list[ScalingFit]:
    """Fits to ``samples`` resampled ladders (points drawn with replacement; draws with fewer than 5 distinct
    points are redrawn), each started from ``fit``."""
    rng = np.random.default_rng(seed)
    fits = []
    for _ in range(samples):
        while True:
            idx = rng.integers(0, len(points), len(points))
            if len(set(idx.tolist())) >= 5:
                break
        fits.append(fit_scaling_law([points[i] for i in idx], starts=_starts_near(fit)))
    return fits


def interval(fits: list[ScalingFit], n: float, d: float) -> tuple[float, float]:
    """5th and 95th percentile of the loss ``fits`` predict at ``(n, d)``."""
    preds = [float(f.predict(n, d)) for f in fits]
    return float(np.percentile(preds, 5)), float(np.percentile(preds, 95))


def bootstrap(points: list[LadderPoint], fit: ScalingFit, targets: dict[str, tuple[float, float]], *,
              samples: int = 50, seed: int = 0) -> dict[str, tuple[float, float]]:
    """``{name: (5th, 95th percentile)}`` of the predicted loss at ``targets`` ``{name: (N, D)}`` over
    :func:`bootstrap_fits`."""
    fits = bootstrap_fits(points, fit, samples=samples, seed=seed)
    return {k: interval(fits, n, d) for k, (n, d) in targets.items()}


def summarize(points: list[LadderPoint], *, samples: int = 50, seed: int = 0) -> dict[str, Any]:
    """What ``ladder.json`` holds: the points, the fit, its leave-one-out errors, the bootstrap fits and the
    predictions (with 90 % intervals) for the released sizes at their paper token budgets."""
    fit = fit_scaling_law(points)
    loo = leave_one_out(points, fit)
    fits = bootstrap_fits(points, fit, samples=samples, seed=seed)
    preds = {}
    for s, (n, d) in paper_targets().items():
        low, high = interval(fits, n, d)
        preds[s] = {"N": n, "tokens": d, "loss": float(fit.predict(n, d)), "low": low, "high": high}
    return {"points": [p.__dict__ for p in points], "fit": fit.as_dict(), "loo": loo,
            "bootstrap_fits": [f.as_dict() for f in fits], "predictions": preds}


def predict_from_ladder(ladder_json: str | Path, size: str, tokens: float | None = None) -> dict[str, float]:
    """``{N, tokens, loss, low, high}`` for ``size`` (a preset) trained on ``tokens`` (default: its paper
    budget), from a ``ladder.json``: the fit's prediction and the 5-95 % range of its bootstrap fits."""
    from polyko.model import PRESETS, build_config
    from polyko.plan import PAPER_TOKENS

    path = Path(ladder_json)
    try:
        data = json.loads(path.read_text())
        fit = ScalingFit(**data["fit"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is not a ladder.json (python jobs/sweep.py --ladder writes one): {e}") from None
    if size not in PRESETS:
        raise ValueError(f"unknown model size {size!r}")
    if tokens is None:
        tokens = float(PAPER_TOKENS.get(size) or 0) or None
    if not tokens:
        raise ValueError(f"{size} has no paper token budget: give the tokens to predict at")
    n = float(non_embedding_params(build_config(size)))
    fits = [ScalingFit(**f) for f in data.get("bootstrap_fits") or []]
    if fits:
        low, high = interval(fits, n, tokens)
    else:  # a ladder.json without bootstrap fits: its stored interval, at the paper budget only
        p = (data.get("predictions") or {}).get(size)
        if p is None or float(p["tokens"]) != float(tokens):
            raise ValueError(f"{path} has no bootstrap fits to give an interval for {size} at {tokens:.3g} tokens")
        low, high = p["low"], p["high"]
    return {"N": n, "tokens": float(tokens), "loss": float(fit.predict(n, tokens)), "low": low, "high": high}


def non_embedding_params(model_config) -> int:
    """Parameters of a GPT-NeoX config without the input and output embeddings (counted from the shapes:
    per layer qkv, attention out, MLP in/out with biases and two LayerNorms; the final LayerNorm)."""
    h, f, n = model_config.hidden_size, model_config.intermediate_size, model_config.num_hidden_layers
    per_layer = (3 * h * h + 3 * h) + (h * h + h) + (h * f + f) + (f * h + h) + 4 * h
    return n * per_layer + 2 * h


def paper_targets() -> dict[str, tuple[float, float]]:
    """``{size: (non-embedding N, tokens)}`` for the released sizes at Polyglot-Ko's token budgets."""
    from polyko.model import build_config
    from polyko.plan import PAPER_TOKENS

    return {s: (float(non_embedding_params(build_config(s))), float(t)) for s, t in PAPER_TOKENS.items()}


# ---------------------------------------------------------------------------------------------------------------
# Training the ladder


@dataclass
class LadderConfig:
    base: PretrainConfig = field(default_factory=PretrainConfig)  # data, batch, optimizer of every point
    widths: list[int] = field(default_factory=lambda: [32, 64, 128])   # hidden sizes (heads of 16 dims)
    depths: list[int] = field(default_factory=lambda: [2])            # layers
    steps: list[int] = field(default_factory=lambda: [20, 40, 80])    # token budgets, in optimizer steps
    loss_window: int = 5               # final loss = mean over the last N steps (one batch is noisy)
    threads: int = 1                   # CPU threads per point (a Ray task takes as many CPUs)
    output: str | None = None          # None: <work dir>/ladder/<config hash>


@dataclass
class LadderResult:
    points: list[LadderPoint]
    fit: ScalingFit
    loo: list[float]                   # leave-one-out relative errors
    predictions: dict[str, dict[str, float]]  # size -> {N, tokens, loss, low, high}
    output: Path
    run_id: str | None = None

    def report(self) -> str:
        f = self.fit
        lines = [f"L(N, D) = {f.E:.3f} + {f.A:.4g} / N^{f.alpha:.3f} + {f.B:.4g} / D^{f.beta:.3f}  "
                 f"({len(self.points)} points; leave-one-out error mean {np.mean(self.loo):.2%}, "
                 f"max {np.max(self.loo):.2%})", "size | N (non-emb.) | tokens | predicted loss | 90% interval"]
        for s, p in self.predictions.items():
            lines.append(f"{s} | {p['N']:.3g} | {p['tokens']:.3g} | {p['loss']:.3f} | {p['low']:.3f}-{p['high']:.3f}")
        return "\n".join(lines)


def ladder_model_config(width: int, depth: int, vocab_size: int, max_positions: int):
    """A GPT-NeoX of the given width/depth, otherwise the presets' shape (4x MLP, rotary on half, 16-dim heads)."""
    from transformers import GPTNeoXConfig

    from polyko.model import build_config

    c = build_config("tiny", vocab_size=vocab_size, max_position_embeddings=max_positions).to_dict()
    c.update(hidden_size=width, num_hidden_layers=depth, num_attention_heads=max(1, width // 16),
             intermediate_size=4 * width)
    return GPTNeoXConfig(**{k: v for k, v in c.items() if k not in ("transformers_version",)})


def train_point(base: dict[str, Any], width: int, depth: int, steps: int, loss_window: int, threads: int) -> dict:
    """One ladder point: a single-process run of ``steps`` optimizer steps; returns N, D and the final loss."""
    import torch

    from polyko.config import from_dict
    from polyko.model import padded_vocab
    from polyko.train.config import lr_at
    from polyko.train.data import GlobalSampler, open_tokens, tokenizer_size

    cfg = from_dict(PretrainConfig, base)
    cfg.steps = steps
    cfg = cfg.resolved()
    torch.set_num_threads(threads)
    tokens = open_tokens(cfg.data.path, cfg.data.tokenizer)
    sampler = GlobalSampler(len(tokens), seed=cfg.seed, shuffle=cfg.data.shuffle)
    g = cfg.batch.global_batch_tokens // tokens.seq_len
    mc = ladder_model_config(width, depth, padded_vocab(tokenizer_size(cfg.data.tokenizer)),
                             max(tokens.seq_len, 512))
    torch.manual_seed(cfg.seed)
    from transformers import GPTNeoXForCausalLM

    model = GPTNeoXForCausalLM(mc)
    o = cfg.optim
    opt = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                            weight_decay=o.weight_decay)
    losses = []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(cfg, step)
        idx = sampler.indices(step * g, g)
        x = torch.from_numpy(tokens.batch(idx)).long()
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        opt.step()
        losses.append(loss.item())
    return {"params": float(non_embedding_params(mc)), "tokens": float(steps * g * tokens.seq_len),
            "loss": float(np.mean(losses[-loss_window:])), "hidden_size": width, "num_layers": depth}


def run_ladder(cfg: LadderConfig, *, ray_address: str | None = None) -> LadderResult:
    """Train every (width, depth, steps) point as a Ray task, fit, predict, plot, log to MLflow."""
    import mlflow
    import ray

    from polyko import tracking
    from polyko.cluster import init_ray
    from polyko.config import config_hash, to_dict
    from polyko.train.data import resolve_tokens_dir
    from polyko.train.trainer import preflight

    if len(cfg.widths) * len(cfg.depths) * len(cfg.steps) < 5:
        raise ValueError("a ladder needs at least 5 points (widths x depths x steps)")
    base = cfg.base.resolved()
    preflight(base)
    out = Path(cfg.output) if cfg.output else tracking.work_dir() / "ladder" / config_hash(cfg)
    out.mkdir(parents=True, exist_ok=True)
    init_ray(ray_address)
    gpu = cfg.base.scaling.use_gpu
    task = ray.remote(num_cpus=cfg.threads, num_gpus=1 if gpu else 0)(train_point)
    grid = list(itertools.product(cfg.widths, cfg.depths, cfg.steps))
    refs = [task.remote(to_dict(cfg.base), w, dp, s, cfg.loss_window, cfg.threads) for w, dp, s in grid]
    points = [LadderPoint(**r) for r in ray.get(refs)]
    summary = summarize(points)
    fit, loo, preds = ScalingFit(**summary["fit"]), summary["loo"], summary["predictions"]
    (out / "ladder.json").write_text(json.dumps(summary, indent=2))
    plot(points, fit, out / "ladder.png", targets=paper_targets())
    res = LadderResult(points=points, fit=fit, loo=loo, predictions=preds, output=out)
    parents = tracking.lineage(resolve_tokens_dir(cfg.base.data.path), cfg.base.data.tokenizer)
    exp = tracking.get_or_create_experiment(tracking.experiment_name("sweep"))
    tags = {"polyko.stage": "sweep", "polyko.kind": "ladder", **{f"polyko.parent.{s}": r for s, r in parents.items()}}
    with mlflow.start_run(experiment_id=exp, run_name=f"ladder-{config_hash(cfg)}", tags=tags) as run:
        from polyko.config import flatten

        tracking.log_params(flatten(cfg))
        mlflow.log_metrics({f"fit_{k}": v for k, v in fit.as_dict().items()})
        mlflow.log_metrics({"loo_error_mean": float(np.mean(loo)), "loo_error_max": float(np.max(loo))})
        for s, p in preds.items():
            mlflow.log_metrics({f"predicted_loss/{s}": p["loss"], f"predicted_loss_low/{s}": p["low"],
                                f"predicted_loss_high/{s}": p["high"]})
        mlflow.log_artifact(str(out / "ladder.json"))
        mlflow.log_artifact(str(out / "ladder.png"))
        res.run_id = run.info.run_id
    return res


def plot(points: list[LadderPoint], fit: ScalingFit, path: Path, *, targets: dict[str, tuple[float, float]] | None = None):
    """Loss vs training compute (6 N D): the ladder points by size, each size's fitted curve, the fitted
    compute-optimal frontier and the predictions for ``targets``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    sizes = sorted({p.params for p in points})
    cmap = plt.get_cmap("viridis")
    for i, n in enumerate(sizes):
        pts = sorted((p for p in points if p.params == n), key=lambda p: p.tokens)
        color = cmap(i / max(1, len(sizes) - 1))
        ax.scatter([6 * n * p.tokens for p in pts], [p.loss for p in pts], color=color, label=f"N={n:.3g}")
        d = np.geomspace(pts[0].tokens / 2, pts[-1].tokens * 4, 50)
        ax.plot(6 * n * d, fit.predict(n, d), color=color, lw=1, alpha=0.7)
    cs = [6 * p.params * p.tokens for p in points]
    lo, hi = min(cs) / 2, max(cs) * 10
    if targets:
        hi = max(hi, max(6 * n * d for n, d in targets.values()) * 2)
    c = np.geomspace(lo, hi, 100)
    opt = [fit.optimal_split(x) for x in c]
    ax.plot(c, [fit.predict(n, d) for n, d in opt], "k--", lw=1.5, label="compute-optimal frontier")
    for name, (n, d) in (targets or {}).items():
        ax.scatter([6 * n * d], [fit.predict(n, d)], marker="*", s=120, color="crimson")
        ax.annotate(name, (6 * n * d, fit.predict(n, d)), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("training compute 6·N·D (FLOPs, N non-embedding)")
    ax.set_ylabel("loss")
    ax.set_title(f"L = {fit.E:.2f} + {fit.A:.3g}/N^{fit.alpha:.2f} + {fit.B:.3g}/D^{fit.beta:.2f}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def predicted_loss_line(size: str, ladder_json: str | Path, tokens: float | None = None) -> str:
    """One line for a capacity plan: the ladder's predicted final loss of ``size`` at ``tokens`` (default:
    its paper budget), with the bootstrap 90 % interval (``ladder_json``: the ``ladder.json`` a ladder run
    writes)."""
    p = predict_from_ladder(ladder_json, size, tokens)
    return (f"  {'predicted final loss':<26}{p['loss']:.3f} (90% {p['low']:.3f}-{p['high']:.3f}) at "
            f"{p['tokens'] / 1e9:,.1f}B tokens, from the scaling-law ladder {ladder_json}")
