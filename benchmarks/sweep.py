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
* ``overhead_per_trial``: CPU time per trial of a FIFO sweep of ``--overhead-trials`` identical trials, one
  at a time (Tune + Train + MLflow parent/child runs), over the CPU time per run of as many bare
  ``pretrain`` calls of the same config on the same cluster, minus 1 (goal <= 0.10): CPU seconds of this
  process and every process under it (the private Ray cluster, its workers, actors and Train controllers),
  which other load on a shared machine hardly changes, where it can stretch wall time by 2x. A sweep's
  fixed costs (its parent run, Tune's controller) are spread over its trials, as in a real sweep; the
  trials share one trial actor (``overhead_trial_actors_per_sweep``: actor processes each sweep started).
  ``overhead_wall`` is the same in wall time. Each is the least of ``--repeats`` groups, taken alternately
  (sweep, bare, bare, sweep, ...) so that a change of load over the benchmark weighs on both alike; the
  medians of the per-pair ratios are printed beside them.

ASHA is the sweep's default (``polyko.sweep.asha.RecheckedASHA``); ``--ray-asha`` adds a third sweep with
Ray's plain ``ASHAScheduler`` (``scheduler.recheck=false``) over the same configurations, for comparison.

    python benchmarks/sweep.py [--steps 27] [--repeats 2] [--overhead-trials 4] [--ray-asha]

Prints one JSON line. On 2 CPU cores: about 25 minutes (5 more with ``--ray-asha``).
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


class TreeCPU:
    """CPU seconds (user + system) used by this process and every process under it: the private Ray cluster
    (GCS, raylet, dashboard), its workers, trial actors and Train controllers. A thread samples each process
    every ``interval_s`` and keeps its last value after it exits, so the processes a run starts and ends are
    counted (up to their last interval). Unlike wall time this hardly moves with other load on the machine."""

    def __init__(self, interval_s: float = 0.25):
        import threading

        self.last: dict[tuple[int, float], float] = {}  # (pid, create time) -> CPU s last seen
        self.title: dict[tuple[int, float], str] = {}  # (pid, create time) -> its last non-idle process title
        self.lock = threading.Lock()
        self.interval_s = interval_s
        threading.Thread(target=self._loop, daemon=True).start()

    def sample(self) -> None:
        import psutil

        me = psutil.Process()
        for p in [me] + me.children(recursive=True):
            try:
                t = p.cpu_times()
                key = (p.pid, p.create_time())
                title = process_title(p)
            except psutil.Error:
                continue
            with self.lock:
                self.last[key] = t.user + t.system
                if title != "ray::IDLE" or key not in self.title:  # a worker's title once it hosts an actor
                    self.title[key] = title

    def _loop(self) -> None:
        while True:
            self.sample()
            time.sleep(self.interval_s)

    def snapshot(self) -> dict[tuple[int, float], float]:
        self.sample()
        with self.lock:
            return dict(self.last)

    @staticmethod
    def used(before: dict, after: dict) -> float:
        return sum(v - before.get(k, 0.0) for k, v in after.items())

    def by_title(self, before: dict, after: dict) -> dict[str, float]:
        """CPU seconds between two snapshots per process title (``ray::RayTrainWorker...``, ``raylet``, ...):
        where a run's CPU goes."""
        out: dict[str, float] = {}
        with self.lock:
            titles = dict(self.title)
        for k, v in after.items():
            name = titles.get(k, "?")
            out[name] = out.get(name, 0.0) + v - before.get(k, 0.0)
        return {n: round(c, 2) for n, c in sorted(out.items(), key=lambda kv: -kv[1]) if c >= 0.05}


def process_title(p) -> str:
    """A short name for a process of the tree: Ray's process title for its workers (``ray::<Actor>.<method>``,
    ``ray::IDLE``), else the program and its module/script (``python -m ray.util.client.server`` ...)."""
    cmd = p.cmdline()
    if not cmd:
        return p.name()
    if cmd[0].startswith("ray::"):
        return cmd[0].split(" ")[0]
    prog = Path(cmd[0]).name
    rest = [c for c in cmd[1:] if not c.startswith("-")][:1]
    if "-m" in cmd[1:3]:
        rest = [cmd[cmd.index("-m") + 1]]
    return " ".join([prog] + [Path(r).name for r in rest])[:60]


def spearman(a: list[float], b: list[float]) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=27, help="steps of a full trial (rungs at steps/9 and steps/3)")
    p.add_argument("--repeats", type=int, default=2,
                   help="overhead: sweeps of --overhead-trials trials, and as many groups of bare pretrain runs")
    p.add_argument("--overhead-trials", type=int, default=4, help="overhead: identical trials per sweep")
    p.add_argument("--ray-asha", action="store_true", help="also run Ray's plain ASHA (no re-checks)")
    p.add_argument("--overhead-only", action="store_true",
                   help="only the per-trial overhead (no 16-configuration sweeps): a few minutes")
    p.add_argument("--workdir", help="where the sweeps live (default: a new temp dir); rerun with the same dir "
                   "and the finished sweeps are restored, not trained again")
    a = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    tmp = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="polyko-bench-sweep-"))
    tmp.mkdir(parents=True, exist_ok=True)
    print(f"[bench] sweeps under {tmp}", flush=True)
    os.environ["POLYKO_WORK_DIR"] = str(tmp / "work")  # embedded MLflow store, private

    from polyko.cluster import init_ray
    from polyko.sweep import default_config, sweep
    from polyko.sweep.tune import concurrency, rungs
    from polyko.train import pretrain
    from polyko.train.metrics import read_jsonl

    tok_dir = SHARED / "reference" / "polyglot-ko-tokenizer"
    tokens = tmp / "tokens"
    if not (tokens / "manifest.json").is_file():
        real_tokens(tokens, tok_dir)
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

    def overhead() -> dict:
        # Per-trial overhead of Tune + Train: a FIFO sweep of N trials of one config, one at a time (as a bare
        # run has the cluster to itself), against N bare pretrain() calls of the same resolved config (both
        # checkpoint once, at the end), per run. Alternating order: sweep, bare, bare, sweep, sweep, bare, ...
        n = a.overhead_trials
        t_trial, t_bare, c_trial, c_bare = [], [], [], []
        split: dict[str, list[dict]] = {"trial": [], "bare": []}  # CPU s per process title, per run
        actors: list[int] = []  # trial actor processes each sweep started (1: reused for every trial)
        cpu = TreeCPU()
        stamp = int(time.time())  # fresh runs even in a reused --workdir (a rerun would only restore them)

        def measure(kind: str, run, walls: list, cpus: list) -> dict:
            t0, c0 = time.time(), cpu.snapshot()
            run()
            walls.append((time.time() - t0) / n)
            c1 = cpu.snapshot()
            cpus.append(cpu.used(c0, c1) / n)
            split[kind].append(cpu.by_title(c0, c1))
            return c1

        def trial_sweep(i: int) -> None:
            many = config("fifo", f"sweep-{stamp}-{i}", ["optim.lr=grid:1e-3"])
            many.trials, many.max_concurrent = n, 1  # N identical trials
            many.base.checkpoint.every_steps = many.base.steps
            before = set(cpu.snapshot())
            after = measure("trial", lambda: sweep(many), t_trial, c_trial)
            with cpu.lock:
                titles = dict(cpu.title)
            actors.append(sum(titles.get(k) == "ray::ImplicitFunc" for k in set(after) - before))

        def bare_runs(i: int) -> None:
            one = config("fifo", f"bare-{stamp}-{i}", [])
            b = one.base

            def runs() -> None:
                for j in range(n):
                    pretrain(replace(b, optim=replace(b.optim, lr=1e-3), output=str(tmp / f"bare-{stamp}-{i}-{j}"),
                                     export=False, checkpoint=replace(b.checkpoint, every_steps=b.steps, keep=1),
                                     fault=replace(b.fault, max_failures=0)))
            measure("bare", runs, t_bare, c_bare)

        for i in range(a.repeats):
            for run in ((trial_sweep, bare_runs) if i % 2 == 0 else (bare_runs, trial_sweep)):
                run(i)
        pair_ratio = [t / b - 1 for t, b in zip(t_trial, t_bare)]
        # Where the CPU goes, for the least run of each kind (one line each, before the JSON line).
        for kind, cs in (("trial", c_trial), ("bare", c_bare)):
            print(f"[bench] cpu by process over {n} runs, {kind} ({min(cs):.1f} s per run): "
                  f"{json.dumps(split[kind][cs.index(min(cs))])}", flush=True)
        return {
            "overhead_trials_per_sweep": n, "overhead_trial_actors_per_sweep": actors,
            "overhead_per_trial": round(min(c_trial) / min(c_bare) - 1, 3),
            "overhead_cpu_median_of_pairs": round(float(np.median([t / b - 1 for t, b in zip(c_trial, c_bare)])), 3),
            "trial_cpu_s": [round(t, 1) for t in c_trial], "bare_pretrain_cpu_s": [round(t, 1) for t in c_bare],
            "overhead_wall": round(min(t_trial) / min(t_bare) - 1, 3),
            "overhead_wall_median_of_pairs": round(float(np.median(pair_ratio)), 3),
            "trial_wall_s": [round(t, 1) for t in t_trial], "bare_pretrain_wall_s": [round(t, 1) for t in t_bare],
        }

    if a.overhead_only:
        # Unmeasured first: the one-time costs (Tune's imports in this process, the cluster's first Train
        # actors) that the full benchmark pays in its sweeps before it measures the overhead.
        warm = config("fifo", f"warmup-{int(time.time())}", ["optim.lr=grid:1e-3"])
        warm.base.steps = warm.base.checkpoint.every_steps = 2
        sweep(warm)
        print(json.dumps({"benchmark": "sweep", "model": "tiny", "steps_per_trial": a.steps, "repeats": a.repeats,
                          **overhead()}))
        return 0

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
    plain = None
    if a.ray_asha:
        plain_cfg = config("asha", "ray-asha", grid)
        plain_cfg.scheduler.recheck = False
        plain = sweep(plain_cfg)
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

    # The same schedulers replayed over the exhaustive sweep's real loss curves in many random trial orders
    # (polyko.sweep.asha.replay: Tune's scheduler hooks, trials at equal speed, as many at once as above): what
    # the compute ratio is on average, not only in the one order trained above.
    from ray.tune.schedulers import ASHAScheduler

    from polyko.sweep.asha import RecheckedASHA, replay

    per_step = {k: {s: m["loss"] for s, m in curves[k].items() if "loss" in m} for k in keys}
    conc = concurrency(asha_cfg)  # trials at once in the sweeps above (the cluster's CPUs here)
    orders = [list(rng.permutation(len(keys))) for _ in range(200)]
    replayed = {}
    for name, cls in (("rechecked", RecheckedASHA), ("ray", ASHAScheduler)):
        ratios, hits = [], []
        for order in orders:
            ks = [keys[i] for i in order]
            r = replay(cls, [per_step[k] for k in ks], reduction_factor=3, grace_period=rung_steps[0],
                       max_t=a.steps, concurrent=conc)
            ratios.append(sum(r.values()) / (len(keys) * a.steps))
            done = [final[ks[i]] for i, st in r.items() if st >= a.steps]
            hits.append(min(done) <= min(final.values()) * 1.01)
        replayed[name] = (float(np.mean(ratios)), float(np.percentile(ratios, 90)), float(np.mean(hits)))


    over = overhead()

    # Steps actually trained (a pruned trial may run a little past its rung before Tune stops it).
    def trained(res) -> int:
        return sum(max(read_jsonl(res.output / "trials" / t.trial_id / "metrics.jsonl"), default=0)
                   for t in res.trials)

    asha_trained, full_trained = trained(asha), trained(full)
    # Of those, steps stopped trials trained past the last report Tune judged them on (0: each stopped trial
    # waited for its decision; before the wait, a trial trained on until the kill arrived).
    overshoot = sum(max(read_jsonl(asha.output / "trials" / t.trial_id / "metrics.jsonl"), default=0) - t.steps
                    for t in asha.trials if t.status == "pruned")
    count = lambda res, s: sum(t.status == s for t in res.trials)  # noqa: E731
    best_full = min(v for v in final.values() if v is not None)
    out = {
        "benchmark": "sweep", "model": "tiny", "configurations": len(keys), "steps_per_trial": a.steps,
        "rungs": rung_steps, "schedule": "wsd", "scheduler": "RecheckedASHA",
        "asha_steps": asha_trained, "exhaustive_steps": full_trained,
        "compute_ratio": round(asha_trained / full_trained, 3),
        "asha_completed": count(asha, "completed"), "asha_pruned": count(asha, "pruned"),
        "asha_steps_past_stop": overshoot,
        **({"ray_asha_compute_ratio": round(trained(plain) / full_trained, 3),
            "ray_asha_completed": count(plain, "completed"),
            "ray_asha_best_within_1pct": bool(plain.best.loss <= min(final.values()) * 1.01)} if plain else {}),
        "replay_orders": len(orders), "replay_concurrent": conc,
        "replay_compute_ratio_mean": round(replayed["rechecked"][0], 3),
        "replay_compute_ratio_p90": round(replayed["rechecked"][1], 3),
        "replay_best_within_1pct_share": round(replayed["rechecked"][2], 3),
        "replay_ray_asha_compute_ratio_mean": round(replayed["ray"][0], 3),
        "replay_ray_asha_best_within_1pct_share": round(replayed["ray"][2], 3),
        "asha_best_loss": round(asha.best.loss, 4), "exhaustive_best_loss": round(best_full, 4),
        "asha_best_within_1pct": bool(asha.best.loss <= best_full * 1.01),
        **{f"spearman_rung_{r}": round(v, 3) for r, v in rho.items()},
        "rung_decisions_agree": round(float(np.mean(agree)), 3),
        "asha_wall_s": round(t_asha, 1), "exhaustive_wall_s": round(t_full, 1),
        **over,
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
