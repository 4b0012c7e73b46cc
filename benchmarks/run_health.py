"""What watching a run costs, on CPU: the loss-spike / NaN guard, and evaluation during training.

1. Guard: the production loop (``polyko.train.loop``, one process, ``LocalContext``, DeepSpeed ZeRO-2) on the
   same real tokens with ``guard.enabled`` on and off, alternated (off, on, off, on, ...); step time = median
   wall time between consecutive step ends (first steps and checkpoint steps excluded); the ratio is taken per
   pair and the median of the pairs reported. Goal: on / off <= 1.02.
2. Evaluation: ``pretrain`` on a real local Ray cluster (1 training worker) with KoBEST on every checkpoint in
   its own Ray task on a second CPU slot (``eval.kobest``, COPA, ``--limit`` docs) and validation loss per
   source every ``--val-every`` steps, against the same run with both off. Reported: training tokens/s on / off
   (goal >= 0.95), the seconds the loop spent blocked at checkpoint steps beyond the run without evaluation
   (``checkpoint_seconds``: the report that queues the evaluation), and the in-worker validation seconds.

Data: the shared corpus (KLUE sentences and NSMC reviews, distinct documents) packed by the pipeline's own
``pack_corpus`` into per-source shards with a validation split, tokenized by the Polyglot-Ko tokenizer.
Prints ONE JSON line.

    python benchmarks/run_health.py [--steps 30] [--pairs 3] [--sizes tiny,50m] [--eval-steps 60] [--val-every 20]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("POLYKO_SHARED_DATA", REPO.parent / "shared" / "data"))
SEQ = 128
BATCH = {"tiny": 16, "50m": 4}  # sequences per step (micro-batch = all of them: one micro-step)
WARMUP = 3
EVERY = 10  # checkpoint every N steps


def pack(root: Path, tokenizer_dir: Path, docs: int = 6000) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from polyko.data.pack import pack_corpus

    files = {"klue": "klue_dev_sentences/klue_dev_sentences.jsonl", "nsmc": "nsmc_raw_sample/nsmc_raw_sample.part00.jsonl"}
    rows = []
    for name, rel in files.items():
        with open(SHARED / "corpus" / rel, encoding="utf-8") as f:
            for i, line in zip(range(docs), f):
                text = json.loads(line).get("text") or ""
                if text.strip():
                    rows.append({"key": f"{name}:{i}", "text": text, "source": name})
    (root / "cleaned").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), root / "cleaned" / "part-0.parquet")
    pack_corpus(root / "cleaned", tokenizer_dir, root / "data" / "tokens", seq_len=SEQ, shard_tokens=SEQ * 1000,
                workers=0, validation_dir=root / "data" / "validation", validation_share=0.02)
    return root / "data"


def config(size: str, data: Path, tokenizer_dir: Path, out: Path, steps: int, *, guard: bool = True,
           val_every: int = 0, kobest=None):
    from polyko.train.config import (BatchConfig, CheckpointConfig, DataConfig, DeepSpeedConfig, TrainEvalConfig,
                                     ModelConfig, OptimConfig, PretrainConfig, ScalingConfig)
    from polyko.train.evaluator import CheckpointEvalConfig
    from polyko.train.guard import GuardConfig

    return PretrainConfig(
        model=ModelConfig(size=size), data=DataConfig(path=str(data / "tokens"), tokenizer=str(tokenizer_dir)),
        optim=OptimConfig(lr=1e-3, warmup_steps=2),
        batch=BatchConfig(global_batch_tokens=BATCH[size] * SEQ, micro_batch=BATCH[size]),
        deepspeed=DeepSpeedConfig(zero_stage=2), checkpoint=CheckpointConfig(every_steps=EVERY, keep=1),
        scaling=ScalingConfig(num_workers=1, cpus_per_worker=1), guard=GuardConfig(enabled=guard, warmup=5),
        eval=TrainEvalConfig(every_steps=val_every, rows_per_source=32,
                        kobest=kobest or CheckpointEvalConfig(enabled=False)),
        steps=steps, output=str(out), run_name=out.name, export=False)


def step_times(out: Path, steps: int) -> list[float]:
    from polyko.train.metrics import read_jsonl

    h = read_jsonl(out / "metrics.jsonl")
    t = {s: h[s]["time"] for s in h}
    # between consecutive step ends; a step that checkpoints (or validates) is excluded with the one after it
    return [t[s] - t[s - 1] for s in range(WARMUP + 1, steps + 1) if s in t and s - 1 in t and (s - 1) % EVERY]


def local_run(cfg) -> None:
    """The production loop in a fresh process (no Ray): what guard on/off changes, and nothing else."""
    from polyko.config import to_dict

    out = Path(cfg.output)
    arg = json.dumps({"config": to_dict(cfg.resolved()), "output": str(out), "run_name": out.name})
    code = ("import json, sys; from polyko.train.loop import train_loop, LocalContext; "
            "c = json.loads(sys.argv[1]); train_loop(c, LocalContext(c['output'], keep=1))")
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    subprocess.run([sys.executable, "-c", code, arg], check=True, env=env, stdout=sys.stderr, stderr=sys.stderr)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=30, help="steps per guard on/off run")
    p.add_argument("--pairs", type=int, default=3, help="guard off/on pairs per size")
    p.add_argument("--sizes", default="tiny,50m")
    p.add_argument("--eval-steps", type=int, default=60, help="steps of the evaluation on/off runs (tiny)")
    p.add_argument("--limit", type=int, default=40, help="KoBEST COPA documents per checkpoint evaluation")
    p.add_argument("--val-every", type=int, default=20)
    a = p.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    tmp = Path(tempfile.mkdtemp(prefix="polyko-bench-health-"))
    os.environ.setdefault("POLYKO_WORK_DIR", str(tmp / "work"))
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    tokenizer_dir = SHARED / "reference" / "polyglot-ko-tokenizer"
    result: dict = {"benchmark": "run_health", "device": "cpu", "seq_len": SEQ}
    with contextlib.redirect_stdout(sys.stderr):
        data = pack(tmp / "corpus", tokenizer_dir)

    # 1. guard on / off ------------------------------------------------------------------------------
    for size in a.sizes.split(","):
        ratios, on_s, off_s = [], [], []
        for i in range(a.pairs):
            med = {}
            for guard in (False, True):
                out = tmp / f"guard-{size}-{i}-{'on' if guard else 'off'}"
                local_run(config(size, data, tokenizer_dir, out, a.steps, guard=guard))
                med[guard] = statistics.median(step_times(out, a.steps))
            ratios.append(med[True] / med[False])
            on_s.append(med[True])
            off_s.append(med[False])
        result[f"guard_{size}"] = {"step_s_on": round(statistics.median(on_s), 4),
                                   "step_s_off": round(statistics.median(off_s), 4),
                                   "on_over_off": round(statistics.median(ratios), 4),
                                   "pair_ratios": [round(r, 4) for r in ratios], "goal_le": 1.02}

    # 2. evaluation during training on / off (Ray) --------------------------------------------------
    import ray

    from polyko.cluster import init_ray
    from polyko.train import pretrain
    from polyko.train.evaluator import CheckpointEvalConfig
    from polyko.train.metrics import read_jsonl

    init_ray(num_cpus=2, log_to_driver=False)  # 1 training worker + 1 evaluation slot
    try:
        runs = {}
        for on in (False, True):
            kob = CheckpointEvalConfig(enabled=True, tasks=["copa"], limit=a.limit, kobest_dir=str(SHARED / "kobest"),
                                       every=1) if on else None
            out = tmp / f"eval-{'on' if on else 'off'}"
            cfg = config("tiny", data, tokenizer_dir, out, a.eval_steps, val_every=a.val_every if on else 0,
                         kobest=kob)
            with contextlib.redirect_stdout(sys.stderr):
                pretrain(cfg)
            h = read_jsonl(out / "metrics.jsonl")
            plain = [h[s]["tokens_per_second"] for s in h if s > WARMUP and s % EVERY]
            ck = [h[s]["checkpoint_seconds"] for s in h if s % EVERY == 0 and h[s].get("checkpoint_seconds")]
            val = [h[s]["val/seconds"] for s in h if "val/seconds" in h[s]]
            # wall time of the training steps (step ends), the same steps in both runs
            wall = h[a.eval_steps]["time"] - h[WARMUP]["time"]
            runs[on] = {"tokens_per_s": statistics.median(plain), "checkpoint_s": ck, "val_s": val, "wall_s": wall}
        on, off = runs[True], runs[False]
        blocked = sum(on["checkpoint_s"]) - statistics.median(off["checkpoint_s"]) * len(on["checkpoint_s"])
        result["eval_tiny"] = {
            "tokens_per_s_on": round(on["tokens_per_s"], 1), "tokens_per_s_off": round(off["tokens_per_s"], 1),
            "on_over_off": round(on["tokens_per_s"] / off["tokens_per_s"], 4),
            "wall_throughput_on_over_off": round(off["wall_s"] / on["wall_s"], 4),
            # the same without the in-worker validation forwards (their cost is eval.every_steps' choice)
            "wall_throughput_on_over_off_excl_validation": round(off["wall_s"] / (on["wall_s"] - sum(on["val_s"])), 4),
            "blocked_by_kobest_s": round(max(0.0, blocked), 3), "checkpoints": len(on["checkpoint_s"]),
            "validation_s_total": round(sum(on["val_s"]), 3), "goal_ge": 0.95}
    finally:
        ray.shutdown()
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    sys.exit(main())
