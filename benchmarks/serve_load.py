"""Load benchmark of the completions service against a naive per-request ``generate`` server.

Both run in the same private Ray cluster, on the same random-init checkpoint, each as ONE Serve
replica with the same CPUs and torch threads, behind Serve's HTTP proxy on 127.0.0.1:

* ``ours``: ``polyko.serve`` (engine loop batching concurrent requests into shared forward
  passes with a KV cache);
* ``baseline``: a minimal Serve deployment that runs ``model.generate`` once per request
  (in a thread, so requests overlap but are never batched).

For concurrency 1, 8 and 32 it sends a bounded number of requests (and stops issuing after a
time cap), every one with the same prompt length and ``max_tokens`` (eos ignored), greedy.
Prints ONE JSON line: requests/s, generated tokens/s, p50/p99 latency per system and
concurrency, and the ratios ours/baseline at each concurrency.

    python benchmarks/serve_load.py                      # 50m model, max_tokens 32 (~5 min on 2 CPUs)
    python benchmarks/serve_load.py --size tiny --max-tokens 16 --requests-per-client 2
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def make_checkpoint(out: Path, size: str, tokenizer_dir: Path) -> Path:
    import torch
    from transformers import AutoTokenizer

    from polyko.model import build_config, build_model

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    tok.eos_token, tok.pad_token = "<|endoftext|>", "<pad>"
    torch.manual_seed(0)
    model = build_model(build_config(size))
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def naive_deployment(ckpt: str, threads: int):
    """One ``generate`` per request, no batching (what a first FastAPI/Serve wrapper looks like)."""
    from ray import serve

    @serve.deployment(name="NaiveGenerate", num_replicas=1, max_ongoing_requests=64,
                      ray_actor_options={"num_cpus": 1})
    class NaiveGenerate:
        def __init__(self):
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer

            torch.set_num_threads(threads)
            self.torch = torch
            self.tok = AutoTokenizer.from_pretrained(ckpt)
            self.model = AutoModelForCausalLM.from_pretrained(ckpt, use_safetensors=True).eval()

        def _generate(self, body: dict) -> dict:
            ids = self.tok.encode(body["prompt"], add_special_tokens=False)
            n = int(body["max_tokens"])
            with self.torch.inference_mode():
                out = self.model.generate(self.torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n,
                                          do_sample=False, pad_token_id=self.tok.pad_token_id)
            gen = out[0, len(ids):].tolist()
            return {"choices": [{"index": 0, "text": self.tok.decode(gen), "finish_reason": "length"}],
                    "usage": {"prompt_tokens": len(ids), "completion_tokens": len(gen),
                              "total_tokens": len(ids) + len(gen)}}

        async def __call__(self, request):
            import asyncio

            body = await request.json()
            return await asyncio.to_thread(self._generate, body)

    return NaiveGenerate.bind()


def load(url: str, body: dict, concurrency: int, n_requests: int, time_cap_s: float) -> dict:
    """``n_requests`` requests from ``concurrency`` client threads (stop issuing after the cap)."""
    import requests

    lat: list[float] = []
    tokens = [0]
    errors = [0]
    lock = threading.Lock()
    issued = [0]
    t_start = time.perf_counter()

    def client():
        s = requests.Session()
        while True:
            with lock:
                if issued[0] >= n_requests or time.perf_counter() - t_start > time_cap_s:
                    return
                issued[0] += 1
            t0 = time.perf_counter()
            try:
                r = s.post(url, json=body, timeout=600)
                ok = r.status_code == 200
                ntok = r.json()["usage"]["completion_tokens"] if ok else 0
            except Exception:
                ok, ntok = False, 0
            dt = time.perf_counter() - t0
            with lock:
                if ok:
                    lat.append(dt)
                    tokens[0] += ntok
                else:
                    errors[0] += 1

    with cf.ThreadPoolExecutor(concurrency) as ex:
        for f in [ex.submit(client) for _ in range(concurrency)]:
            f.result()
    wall = time.perf_counter() - t_start
    lat.sort()

    def pct(p):
        return lat[min(len(lat) - 1, int(round(p / 100 * (len(lat) - 1))))] if lat else None

    return {"requests": len(lat), "errors": errors[0], "seconds": round(wall, 3),
            "requests_per_s": round(len(lat) / wall, 3), "tokens_per_s": round(tokens[0] / wall, 2),
            "p50_s": round(pct(50), 4) if lat else None, "p99_s": round(pct(99), 4) if lat else None,
            "mean_s": round(statistics.fmean(lat), 4) if lat else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="50m", help="polyko.model preset (random init)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--requests-per-client", type=int, default=3, help="requests = max(8, this x concurrency)")
    p.add_argument("--time-cap-s", type=float, default=90.0, help="per system and concurrency")
    p.add_argument("--shared-data", default=os.environ.get("POLYKO_SHARED_DATA", str(REPO.parent / "shared" / "data")))
    a = p.parse_args()
    # stdout carries exactly one JSON line: everything else (Ray, DeepSpeed banners) goes to stderr.
    json_out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import ray
    from ray import serve

    from polyko.cluster import free_port, init_ray
    from polyko.serve.app import build_app
    from polyko.serve.config import AutoscalingConfig, EngineConfig, ModelSpec, ServeConfig

    levels = [int(c) for c in a.concurrency.split(",")]
    with tempfile.TemporaryDirectory(prefix="polyko-serve-bench-") as tmp:
        ckpt = make_checkpoint(Path(tmp) / a.size, a.size, Path(a.shared_data) / "reference" / "polyglot-ko-tokenizer")
        port = free_port()
        # One replica each, 1 CPU and 1 torch thread each: the comparison is per replica.
        cfg = ServeConfig(models=[ModelSpec(name="bench", source=str(ckpt))], port=port, num_cpus=1,
                          max_ongoing_requests=64,
                          engine=EngineConfig(max_batch_size=32, torch_threads=1),
                          autoscaling=AutoscalingConfig(min_replicas=1, max_replicas=1, target_ongoing_requests=32))
        init_ray(num_cpus=3, log_to_driver=False)
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            serve.run(build_app(cfg), name="polyko", route_prefix="/")
            serve.run(naive_deployment(str(ckpt), 1), name="naive", route_prefix="/naive")
            base = f"http://127.0.0.1:{port}"
            prompt = "한국어 언어 모델의 서빙 성능을 측정합니다. " * 2
            bodies = {
                "ours": (base + "/v1/completions", {"model": "bench", "prompt": prompt, "max_tokens": a.max_tokens,
                                                    "temperature": 0, "ignore_eos": True}),
                "baseline": (base + "/naive", {"prompt": prompt, "max_tokens": a.max_tokens}),
            }
            for url, body in bodies.values():   # warm up: load, first forward passes
                load(url, body, 2, 4, 120)
            results: dict = {"ours": {}, "baseline": {}}
            for c in levels:
                n = max(8, a.requests_per_client * c)
                for name, (url, body) in bodies.items():
                    results[name][f"c{c}"] = load(url, body, c, n, a.time_cap_s)
                    print(f"[serve_load] {name} c={c}: {results[name][f'c{c}']}", file=sys.stderr, flush=True)
        finally:
            serve.shutdown()
            ray.shutdown()
    ratios = {}
    for c in levels:
        o, b = results["ours"][f"c{c}"], results["baseline"][f"c{c}"]
        ratios[f"c{c}"] = {
            "tokens_per_s_x": round(o["tokens_per_s"] / b["tokens_per_s"], 2) if b["tokens_per_s"] else None,
            "p99_ours_over_baseline": round(o["p99_s"] / b["p99_s"], 3) if o["p99_s"] and b["p99_s"] else None,
        }
    print(json.dumps({"benchmark": "serve_load", "model": a.size, "max_tokens": a.max_tokens,
                      "replicas": 1, "cpus_per_replica": 1, "results": results,
                      "ours_vs_baseline": ratios}), file=json_out, flush=True)


if __name__ == "__main__":
    main()
