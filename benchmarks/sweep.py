"""ASHA versus running every configuration to the end, for 16 configurations of `tiny` on real Korean text.

Both sweeps run in this process on the same private Ray cluster over the same 16 configurations (a grid:
8 learning rates x 2 warmups, WSD schedule), every trial a real Ray Train + DeepSpeed run:

* ``compute_ratio``: optimizer steps ASHA's trials trained (``metrics.jsonl``) / steps of the exhaustive sweep
  (goal <= 0.35);
* ``asha_best_within_1pct``: ASHA's best final loss is within 1% of the exhaustive sweep's best;
* ``spearman_rung_<step>``: Spearman rank correlation, over the 16 configurations of the exhaustive sweep,
  between the loss at each ASHA rung (what ASHA decides on) and the final loss; ``rung_decisions_agree``:
  share of ASHA's stop/continue decisions that the final ranking confirms (a pruned trial is not in the
  exhaustive top third, a promoted one is in the top half);
* ``overhead_per_trial``: wall time of a one-trial sweep (Tune + Train + MLflow parent/child runs) over a bare
  ``pretrain`` call of the same config on the same cluster, minus 1 (goal <= 0.10).

    python benchmarks/sweep.py [--steps 27]

Prints one JSON line. On 2 CPU cores: about 10 minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("POLYKO_SHARED_DATA", REPO.parent / "shared" / "data"))
LRS = [1e-4 * 2 ** (k * 0.8) for k in range(8)]  # 1e-4 .. ~4.8e-3
WARMUPS = [1, 6]


def real_tokens(out: Path, tokenizer_dir: Path, seq_len: int = 64, n: int = 640) -> Path:
    """Distinct news/KLUE documents tokenized with the Polyglot-Ko tokenizer, packed into ``n`` rows."""
    from tokenizers import Tokenizer

    from polyko.data.shards import token_dtype, write_manifest, write_shard
    from polyko.model import ENDOFTEXT_ID
    from polyko.train.data import tokenizer_hash

    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    stream: list[int] = []
    files = sorted((SHARED / "corpus" / "soynlp_news_sample").glob("*.jsonl")) + \
        sorted((SHARED / "corpus" / "klue_dev_sentences").glob("*.jsonl"))
    for f in files:
        for line in f.open():
            text = json.loads(line).get("text") or ""
            if text.strip():
                stream += tok.encode(text).ids + [ENDOFTEXT_ID]
            if len(stream) >= n * seq_len:
                break
        if len(stream) >= n * seq_len:
            break
    n = len(stream) // seq_len if len(stream) < n * seq_len else n
    arr = np.asarray(stream[:n * seq_len], dtype=token_dtype(tok.get_vocab_size())).reshape(n, seq_len)
    write_manifest(out, [write_shard(out, 0, arr)], seq_len=seq_len, dtype=arr.dtype,
                   tokenizer_hash=tokenizer_hash(str(tokenizer_dir)), vocab_size=tok.get_vocab_size(),
                   max_token_id=int(arr.max()))
    return out


def spearman(a: list[float], b: list[float]) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=27, help="steps of a full trial (rungs at steps/9 and steps/3)")
    a = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    tmp = Path(tempfile.mkdtemp(prefix="polyko-bench-sweep-"))
    os.environ["POLYKO_WORK_DIR"] = str(tmp / "work")  # embedded MLflow store, private

    from polyko.cluster import init_ray
    from polyko.sweep import default_config, sweep
    from polyko.sweep.tune import rungs
    from polyko.train import pretrain
    from polyko.train.metrics import read_jsonl

    tok_dir = SHARED / "reference" / "polyglot-ko-tokenizer"
    tokens = real_tokens(tmp / "tokens", tok_dir)
    init_ray(num_cpus=2)

    def config(kind: str, out: str, search: list[str]):
        cfg = default_config()
        b = cfg.base
        b.data.path, b.data.tokenizer = str(tokens), str(tok_dir)
        b.steps = a.steps
        b.batch.global_batch_tokens, b.batch.micro_batch = 16 * 64, 16
        cfg.search, cfg.trials, cfg.output = search, 1, str(tmp / out)
        cfg.scheduler.kind, cfg.scheduler.reduction_factor = kind, 3
        return cfg

    # A random order, as a random search would visit them (in ascending-lr order the worst configurations
    # would come first, and ASHA never stops the first trial to reach a rung).
    rng = np.random.default_rng(0)
    grid = ["optim.lr=grid:" + ",".join(f"{x:.6g}" for x in rng.permutation(LRS)),
            "optim.warmup_steps=grid:" + ",".join(str(w) for w in WARMUPS)]
    asha_cfg = config("asha", "asha", grid)
    rung_steps = rungs(asha_cfg)
    fifo_cfg = config("fifo", "fifo", grid)
    fifo_cfg.base.checkpoint.every_steps = rung_steps[0]  # same report cadence as ASHA (rungs are multiples)

    t0 = time.time()
    asha = sweep(asha_cfg)
    t_asha = time.time() - t0
    t0 = time.time()
    full = sweep(fifo_cfg)
    t_full = time.time() - t0

    key = lambda t: (round(t.values["optim.lr"], 12), int(t.values["optim.warmup_steps"]))  # noqa: E731
    final = {key(t): t.loss for t in full.trials}
    curves = {key(t): read_jsonl(full.output / "trials" / t.trial_id / "metrics.jsonl") for t in full.trials}
    keys = sorted(final)
    rho = {r: spearman([curves[k][r]["loss"] for k in keys], [final[k] for k in keys]) for r in rung_steps}
    order = sorted(keys, key=lambda k: final[k])
    top_third, top_half = set(order[:len(order) // 3]), set(order[:len(order) // 2])
    agree = [(key(t) not in top_third) if t.status == "pruned" else (key(t) in top_half)
             for t in asha.trials if t.status in ("pruned", "completed")]

    # Overhead of one trial under Tune + Train against a bare pretrain() of the same resolved config.
    one = config("fifo", "one", ["optim.lr=grid:1e-3"])
    t0 = time.time()
    sweep(one)
    t_trial = time.time() - t0
    bare = replace(one.base, optim=replace(one.base.optim, lr=1e-3), output=str(tmp / "bare"), export=False,
                   checkpoint=replace(one.base.checkpoint, every_steps=one.base.steps, keep=1),
                   fault=replace(one.base.fault, max_failures=0))
    t0 = time.time()
    pretrain(bare)
    t_bare = time.time() - t0

    # Steps actually trained (a pruned trial may run a little past its rung before Tune stops it).
    def trained(res) -> int:
        return sum(max(read_jsonl(res.output / "trials" / t.trial_id / "metrics.jsonl"), default=0)
                   for t in res.trials)

    asha_trained, full_trained = trained(asha), trained(full)
    best_full = min(v for v in final.values() if v is not None)
    out = {
        "benchmark": "sweep", "model": "tiny", "configurations": len(keys), "steps_per_trial": a.steps,
        "rungs": rung_steps, "schedule": "wsd",
        "asha_steps": asha_trained, "exhaustive_steps": full_trained,
        "compute_ratio": round(asha_trained / full_trained, 3),
        "asha_best_loss": round(asha.best.loss, 4), "exhaustive_best_loss": round(best_full, 4),
        "asha_best_within_1pct": bool(asha.best.loss <= best_full * 1.01),
        **{f"spearman_rung_{r}": round(v, 3) for r, v in rho.items()},
        "rung_decisions_agree": round(float(np.mean(agree)), 3),
        "asha_wall_s": round(t_asha, 1), "exhaustive_wall_s": round(t_full, 1),
        "overhead_per_trial": round(t_trial / t_bare - 1, 3), "trial_wall_s": round(t_trial, 1),
        "bare_pretrain_wall_s": round(t_bare, 1),
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
