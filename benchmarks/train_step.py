"""Overhead of Ray Train + DeepSpeed over a plain PyTorch loop, per optimizer step, on CPU.

For each model size (tiny, 50m) the same model, global batch, micro-batch and thread count run
(1) as a plain single-process loop (torch AdamW, grad clipping, same token shards) and
(2) through ``polyko.train.pretrain`` (1 Ray Train worker, DeepSpeed ZeRO-2 engine, metrics to MLflow,
Ray gauges and metrics.jsonl every step). Step time = median wall time between consecutive steps
(excluding the first steps and checkpoint steps); the baseline runs before and after the Ray run
and the faster of its two medians is used. Prints ONE JSON line; goal: overhead <= 15%.

    python benchmarks/train_step.py [--steps 8] [--threads 2] [--sizes tiny,50m]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("POLYKO_SHARED_DATA", REPO.parent / "shared" / "data"))
SHAPES = {"tiny": dict(seq_len=128, global_batch=16, micro=16), "50m": dict(seq_len=128, global_batch=4, micro=4)}
WARMUP = 2


def make_tokens(out: Path, tokenizer_dir: Path, seq_len: int, n: int = 512) -> Path:
    from polyko.data.shards import token_dtype, write_manifest, write_shard
    from polyko.train.data import tokenizer_hash, tokenizer_size

    vocab = tokenizer_size(str(tokenizer_dir))
    arr = np.random.default_rng(0).integers(4, vocab, size=(n, seq_len)).astype(token_dtype(vocab))
    write_manifest(out, [write_shard(out, 0, arr)], seq_len=seq_len, dtype=arr.dtype,
                   tokenizer_hash=tokenizer_hash(str(tokenizer_dir)))
    return out


def plain_loop(size: str, tokens: Path, tokenizer_dir: Path, shape: dict, steps: int, threads: int) -> list[float]:
    import torch

    from polyko.model import PRESETS, build_config, build_model, padded_vocab, param_groups
    from polyko.train.data import GlobalSampler, tokenizer_size
    from polyko.data.shards import TokenShards

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = build_config(size, vocab_size=padded_vocab(tokenizer_size(str(tokenizer_dir))),
                       max_position_embeddings=max(shape["seq_len"], PRESETS[size].max_position_embeddings))
    model = build_model(cfg).train()
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-4, betas=(0.9, 0.95))  # the same recipe as the job
    data = TokenShards(tokens)
    sampler = GlobalSampler(len(data), seed=0)
    g, m = shape["global_batch"], shape["micro"]
    stamps = []
    for step in range(steps):
        stamps.append(time.perf_counter())
        idx = sampler.indices(step * g, g)
        for a in range(g // m):
            x = torch.from_numpy(data.batch(idx[a * m:(a + 1) * m]))
            loss = model(input_ids=x, labels=x).loss / (g // m)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        _ = loss.item()
    stamps.append(time.perf_counter())
    return [b - a for a, b in zip(stamps[WARMUP:], stamps[WARMUP + 1:])]


def ray_loop(size: str, tokens: Path, tokenizer_dir: Path, shape: dict, steps: int, threads: int, out: Path,
             zero_stage: int) -> list[float]:
    from polyko.train import pretrain
    from polyko.train.config import (BatchConfig, CheckpointConfig, DataConfig, DeepSpeedConfig, ModelConfig,
                                     OptimConfig, PretrainConfig, ScalingConfig)
    from polyko.train.metrics import read_jsonl

    cfg = PretrainConfig(model=ModelConfig(size=size), data=DataConfig(path=str(tokens), tokenizer=str(tokenizer_dir)),
                         optim=OptimConfig(lr=1e-4, warmup_steps=1),
                         batch=BatchConfig(global_batch_tokens=shape["global_batch"] * shape["seq_len"],
                                           micro_batch=shape["micro"]),
                         deepspeed=DeepSpeedConfig(zero_stage=zero_stage), checkpoint=CheckpointConfig(every_steps=10**6, keep=1),
                         scaling=ScalingConfig(num_workers=1, cpus_per_worker=threads),
                         steps=steps, output=str(out), export=False)
    pretrain(cfg)
    hist = read_jsonl(out / "metrics.jsonl")
    t = [hist[s]["time"] for s in sorted(hist)]
    # time between consecutive step ends, excluding the warmup and the final (checkpoint) step
    return [b - a for a, b in zip(t[WARMUP - 1:-2], t[WARMUP:-1])]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sizes", default="tiny,50m")
    p.add_argument("--zero-stage", type=int, default=2, help="ZeRO stage of the Ray Train + DeepSpeed run")
    a = p.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    tokenizer_dir = SHARED / "reference" / "polyglot-ko-tokenizer"
    tmp = Path(tempfile.mkdtemp(prefix="polyko-bench-"))
    os.environ.setdefault("POLYKO_WORK_DIR", str(tmp / "work"))
    os.environ.pop("MLFLOW_TRACKING_URI", None)

    import ray

    from polyko.cluster import init_ray

    # Progress (ours and the workers') goes to stderr: stdout carries only the JSON line.
    init_ray(num_cpus=a.threads, log_to_driver=False)
    result: dict = {"benchmark": "train_step", "device": "cpu", "threads": a.threads, "steps": a.steps,
                    "zero_stage": a.zero_stage}
    try:
        for size in a.sizes.split(","):
            shape = SHAPES[size]
            tokens = make_tokens(tmp / f"tokens-{size}", tokenizer_dir, shape["seq_len"])
            base1 = plain_loop(size, tokens, tokenizer_dir, shape, a.steps, a.threads)
            with contextlib.redirect_stdout(sys.stderr):
                ray_t = ray_loop(size, tokens, tokenizer_dir, shape, a.steps + 2, a.threads, tmp / f"run-{size}",
                                 a.zero_stage)
            base2 = plain_loop(size, tokens, tokenizer_dir, shape, a.steps, a.threads)
            plain = min(statistics.median(base1), statistics.median(base2))
            ds = statistics.median(ray_t)
            result[size] = {"tokens_per_step": shape["global_batch"] * shape["seq_len"],
                            "plain_step_s": round(plain, 4), "ray_deepspeed_step_s": round(ds, 4),
                            "overhead_ratio": round(ds / plain - 1, 4), "goal_le": 0.15}
    finally:
        ray.shutdown()
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    sys.exit(main())
