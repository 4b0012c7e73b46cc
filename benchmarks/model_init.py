"""Worker model-construction memory: peak RSS while building the model ÷ the model's fp32 bytes.

Each figure is measured in a fresh process (after imports and, for ZeRO-3, after the process group is
up): Linux's peak-RSS counter (``VmHWM``) is reset through ``/proc/self/clear_refs`` just before the build,
and the figure is ``(VmHWM - RSS before) / (4 bytes x parameters)``.

  baseline  ``GPTNeoXForCausalLM(config)``: what a training script would otherwise write (transformers'
            init on a fully materialised fp32 model)
  zero012   ``polyko.model.build_model``: meta build, one allocation in place, chunked GPT-NeoX init --
            what the workers do at ZeRO 0-2 (goal <= 1.1)
  zero3     ``build_model(zero3=zero3_context(...))`` on ``--workers`` real DeepSpeed ranks (gloo): each
            rank's peak; the worst rank is reported (goal <= 1 / workers + 0.1)

    python benchmarks/model_init.py [--size 50m] [--workers 2]

Prints ONE JSON line. CPU only; 50m takes ~10 s per process.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def child(mode: str, size: str) -> None:
    import importlib
    import time

    import torch
    from transformers import GPTNeoXForCausalLM

    from polyko.model import build_config, build_model, count_params, zero3_context

    config = build_config(size)
    ctx = None
    if mode == "zero3":
        import deepspeed
        import torch.distributed as dist

        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
        deepspeed.init_distributed("gloo", verbose=False)
        ds = {"train_batch_size": dist.get_world_size(), "train_micro_batch_size_per_gpu": 1,
              "zero_optimization": {"stage": 3}}
        ctx = zero3_context(ds)
    torch.manual_seed(0)
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _status("VmRSS")
    t0 = time.perf_counter()
    if mode == "baseline":
        model = GPTNeoXForCausalLM(config)
    else:
        model = build_model(config, seed=0, zero3=ctx)
    seconds = time.perf_counter() - t0
    peak = _status("VmHWM")
    n = count_params(config)
    print(json.dumps({"mode": mode, "peak_over_fp32": round((peak - before) / (4 * n), 3),
                      "seconds": round(seconds, 2), "params": n}), flush=True)
    del model


def run(mode: str, size: str, workers: int = 1) -> list[dict]:
    from polyko.cluster import free_port

    env = dict(os.environ, DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
               WORLD_SIZE=str(workers), CUDA_VISIBLE_DEVICES="")
    procs = [subprocess.Popen([sys.executable, __file__, "--child", mode, "--size", size], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=dict(env, RANK=str(r), LOCAL_RANK=str(r)))
             for r in range(workers)]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=900)
        if p.returncode != 0:
            raise RuntimeError(f"{mode} child failed:\n{stderr[-2000:]}")
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="50m")
    ap.add_argument("--workers", type=int, default=2, help="ZeRO-3 ranks")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a.child, a.size)
        return 0
    base = run("baseline", a.size)[0]
    ours = run("zero012", a.size)[0]
    z3 = run("zero3", a.size, a.workers)
    worst = max(z3, key=lambda r: r["peak_over_fp32"])
    print(json.dumps({
        "benchmark": "model_init", "size": a.size, "params": base["params"],
        "baseline_peak_over_fp32": base["peak_over_fp32"], "baseline_seconds": base["seconds"],
        "zero012_peak_over_fp32": ours["peak_over_fp32"], "zero012_seconds": ours["seconds"], "zero012_goal_le": 1.1,
        "zero3_workers": a.workers, "zero3_peak_over_fp32": worst["peak_over_fp32"],
        "zero3_per_rank": [r["peak_over_fp32"] for r in z3], "zero3_goal_le": round(1 / a.workers + 0.1, 3),
        "zero012_vs_baseline": round(ours["peak_over_fp32"] / base["peak_over_fp32"], 3)}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
