"""Load benchmark of the completions service against the two servers a Ray user would otherwise
write, plus a sustained run that checks the service holds up under steady traffic.

All run in the same private Ray cluster, on the same random-init checkpoint, each as ONE Serve
replica with the same CPUs and torch threads, behind Serve's HTTP proxy on 127.0.0.1:

* ``ours``: ``polyko.serve`` (continuous batching: requests join and leave a running batch at
  every decode step, KV cache bounded by the longest live row);
* ``naive``: a minimal deployment that runs ``model.generate`` once per request (in a thread, so
  requests overlap but are never batched);
* ``serve_batch``: Ray Serve's own static batching, ``@serve.batch(max_batch_size=32)`` around
  one left-padded ``model.generate`` per batch (what the Ray Serve docs show; ten lines).

Phase 1, for concurrency 1, 8 and 32: a bounded number of requests per system (stops issuing after
a time cap), the same prompt length and ``max_tokens`` (eos ignored), greedy. Requests/s,
generated tokens/s, p50/p99 latency, and the ratios ours/naive and ours/serve_batch.

Phase 2 (``ours`` only): a sustained run of ``--sustained-requests`` requests at concurrency 32,
distinct real Korean prompts (shared data corpus) of mixed lengths and mixed ``max_tokens``.
The replica's mean decode-step time (wall, and CPU time of the engine thread, which excludes
waiting for a core on a shared machine) and RSS in the last tenth of the run over the first tenth
(a leak shows as a ratio that grows with the run's length), the count of 5xx answers, and the
engine's ``malloc_trim`` calls with their share of the run's wall time (what keeps glibc from
holding the freed KV-cache buffers: see ``EngineConfig.malloc_trim_interval_s``).

Prints ONE JSON line.

    python benchmarks/serve_load.py                      # 50m model, max_tokens 32, 2,000 sustained requests
    python benchmarks/serve_load.py --quick              # smoke run: tiny model, few requests (~2 min)
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import random
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


def serve_batch_deployment(ckpt: str, threads: int, max_batch_size: int):
    """Ray Serve's ``@serve.batch``: concurrent requests grouped (up to ``max_batch_size`` or
    10 ms, Serve's default wait) into one left-padded ``generate``; a batch runs to its longest."""
    from ray import serve

    @serve.deployment(name="ServeBatchGenerate", num_replicas=1, max_ongoing_requests=64,
                      ray_actor_options={"num_cpus": 1})
    class ServeBatchGenerate:
        def __init__(self):
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer

            torch.set_num_threads(threads)
            self.torch = torch
            self.tok = AutoTokenizer.from_pretrained(ckpt, padding_side="left")
            self.model = AutoModelForCausalLM.from_pretrained(ckpt, use_safetensors=True).eval()

        def _generate(self, bodies: list[dict]) -> list[dict]:
            enc = self.tok([b["prompt"] for b in bodies], return_tensors="pt", padding=True, add_special_tokens=False)
            n = max(int(b["max_tokens"]) for b in bodies)
            with self.torch.inference_mode():
                out = self.model.generate(**enc, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                          pad_token_id=self.tok.pad_token_id)
            res = []
            for b, row, mask in zip(bodies, out, enc["attention_mask"]):
                gen = row[enc["input_ids"].shape[1]:][:int(b["max_tokens"])].tolist()
                p = int(mask.sum())
                res.append({"choices": [{"index": 0, "text": self.tok.decode(gen), "finish_reason": "length"}],
                            "usage": {"prompt_tokens": p, "completion_tokens": len(gen), "total_tokens": p + len(gen)}})
            return res

        @serve.batch(max_batch_size=max_batch_size, batch_wait_timeout_s=0.01)
        async def _batched(self, bodies: list[dict]) -> list[dict]:
            import asyncio

            return await asyncio.to_thread(self._generate, bodies)

        async def __call__(self, request):
            return await self._batched(await request.json())

    return ServeBatchGenerate.bind()


def real_prompts(shared_data: Path, n: int, seed: int = 0) -> list[str]:
    """``n`` distinct documents of the shared Korean corpus, cut to mixed lengths (8-240 chars)."""
    rng = random.Random(seed)
    docs: list[str] = []
    seen: set[str] = set()
    for f in sorted((shared_data / "corpus").glob("*/*.jsonl")):
        with open(f, encoding="utf-8") as fh:
            for line in fh:
                t = json.loads(line).get("text", "").strip()
                if len(t) >= 8 and t not in seen:
                    seen.add(t)
                    docs.append(t)
    if len(docs) < n:
        raise ValueError(f"only {len(docs)} distinct corpus documents under {shared_data}; need {n}")
    rng.shuffle(docs)
    return [d[:rng.randint(8, 240)] for d in docs[:n]]


def load(url: str, body, concurrency: int, n_requests: int, time_cap_s: float, issued: list[int] | None = None) -> dict:
    """``n_requests`` requests from ``concurrency`` client threads (stop issuing after the cap).
    ``body`` is a dict or ``body(i)`` for the i-th request; ``issued[0]`` counts requests sent."""
    import requests

    lat: list[float] = []
    tokens = [0]
    errors = [0]
    status_5xx = [0]
    lock = threading.Lock()
    issued = issued if issued is not None else [0]
    t_start = time.perf_counter()

    def client():
        s = requests.Session()
        while True:
            with lock:
                if issued[0] >= n_requests or time.perf_counter() - t_start > time_cap_s:
                    return
                i = issued[0]
                issued[0] += 1
            t0 = time.perf_counter()
            code = 0
            try:
                r = s.post(url, json=body(i) if callable(body) else body, timeout=600)
                code = r.status_code
                ok = code == 200
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
                    status_5xx[0] += code >= 500 or code == 0

    with cf.ThreadPoolExecutor(concurrency) as ex:
        for f in [ex.submit(client) for _ in range(concurrency)]:
            f.result()
    wall = time.perf_counter() - t_start
    lat.sort()

    def pct(p):
        return lat[min(len(lat) - 1, int(round(p / 100 * (len(lat) - 1))))] if lat else None

    return {"requests": len(lat), "errors": errors[0], "errors_5xx": status_5xx[0], "seconds": round(wall, 3),
            "requests_per_s": round(len(lat) / wall, 3), "tokens_per_s": round(tokens[0] / wall, 2),
            "p50_s": round(pct(50), 4) if lat else None, "p99_s": round(pct(99), 4) if lat else None,
            "mean_s": round(statistics.fmean(lat), 4) if lat else None}


def sustained(url: str, handle, prompts: list[str], concurrency: int, seed: int = 1) -> dict:
    """Phase 2: every prompt once, mixed max_tokens, at ``concurrency``. The replica's counters
    are sampled every 0.25 s; the steady part of the run (until the last request is issued, so
    the final drain does not count) is cut into tenths of wall time, first and last compared."""
    rng = random.Random(seed)
    max_tokens = [rng.randint(8, 64) for _ in prompts]
    n = len(prompts)
    issued = [0]
    samples: list[tuple[float, int, dict]] = []
    done = threading.Event()

    def monitor():
        while not done.is_set():
            st = handle.stats.remote().result(timeout_s=60)
            samples.append((time.monotonic(), issued[0], {"rss": st["rss_bytes"], **st["models"]["bench"]}))
            time.sleep(0.25)

    mon = threading.Thread(target=monitor, daemon=True)
    mon.start()
    res = load(url, lambda i: {"model": "bench", "prompt": prompts[i], "max_tokens": max_tokens[i],
                               "temperature": 0, "ignore_eos": True}, concurrency, n, float("inf"), issued)
    done.set()
    mon.join()
    steady = [x for x in samples if x[1] < n] or samples
    t0, t1 = steady[0][0], steady[-1][0]
    tenth = (t1 - t0) / 10

    def window(lo: float, hi: float) -> tuple[float, float, float, float]:
        """(mean decode-step seconds, per row-step, mean decode-step CPU seconds, mean RSS) between
        the samples at wall times lo and hi."""
        inside = [x[2] for x in steady if lo <= x[0] <= hi]
        if len(inside) < 2:
            raise ValueError("sustained run too short to sample: give more --sustained-requests")
        a, b = inside[0], inside[-1]
        secs = b["decode_seconds"] - a["decode_seconds"]
        steps = max(1, b["decode_steps"] - a["decode_steps"])
        return (secs / steps, secs / max(1, b["decode_rows"] - a["decode_rows"]),
                (b["decode_cpu_seconds"] - a["decode_cpu_seconds"]) / steps, statistics.fmean(st["rss"] for st in inside))

    (step_first, row_first, cpu_first, rss_first) = window(t0, t0 + tenth)
    (step_last, row_last, cpu_last, rss_last) = window(t1 - tenth, t1)
    return {"requests": n, "concurrency": concurrency, **{k: res[k] for k in ("errors", "errors_5xx", "seconds",
                                                                             "tokens_per_s", "p50_s", "p99_s")},
            "decode_step_s_first_tenth": round(step_first, 5), "decode_step_s_last_tenth": round(step_last, 5),
            "decode_step_last_over_first": round(step_last / step_first, 3) if step_first else None,
            # per row-step: the same, independent of how full the batch happened to be
            "decode_row_step_last_over_first": round(row_last / row_first, 3) if row_first else None,
            # CPU seconds of the engine thread per step: what the step costs, without the time it waited
            # for a core (wall time above includes that on a shared machine)
            "decode_step_cpu_s_first_tenth": round(cpu_first, 5), "decode_step_cpu_s_last_tenth": round(cpu_last, 5),
            "decode_step_cpu_last_over_first": round(cpu_last / cpu_first, 3) if cpu_first else None,
            "rss_mb_first_tenth": round(rss_first / 2**20, 1), "rss_mb_last_tenth": round(rss_last / 2**20, 1),
            "rss_last_over_first": round(rss_last / rss_first, 3),
            "kv_cache_columns_peak": max(x[2]["cache_len"] for x in samples),
            "decode_steps": samples[-1][2]["decode_steps"],
            # The engine's malloc_trim calls (EngineConfig.malloc_trim_interval_s) and their share of the run's wall time.
            "malloc_trims": samples[-1][2]["trims"] - samples[0][2]["trims"],
            "malloc_trim_share": round((samples[-1][2]["trim_seconds"] - samples[0][2]["trim_seconds"])
                                       / max(1e-9, samples[-1][0] - samples[0][0]), 4)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="50m", help="polyko.model preset (random init)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--requests-per-client", type=int, default=3, help="requests = max(8, this x concurrency)")
    p.add_argument("--time-cap-s", type=float, default=90.0, help="per system and concurrency")
    p.add_argument("--sustained-requests", type=int, default=2000, help="phase 2 (0 = skip)")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny model, 16 tokens, 200 sustained requests")
    p.add_argument("--shared-data", default=os.environ.get("POLYKO_SHARED_DATA", str(REPO.parent / "shared" / "data")))
    a = p.parse_args()
    if a.quick:
        a.size, a.max_tokens, a.requests_per_client, a.sustained_requests = "tiny", 16, 2, 200
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
    prompts = real_prompts(Path(a.shared_data), a.sustained_requests) if a.sustained_requests else []
    with tempfile.TemporaryDirectory(prefix="polyko-serve-bench-") as tmp:
        ckpt = make_checkpoint(Path(tmp) / a.size, a.size, Path(a.shared_data) / "reference" / "polyglot-ko-tokenizer")
        port = free_port()
        # One replica each, 1 CPU and 1 torch thread each: the comparison is per replica.
        cfg = ServeConfig(models=[ModelSpec(name="bench", source=str(ckpt))], port=port, num_cpus=1,
                          max_ongoing_requests=64,
                          engine=EngineConfig(max_batch_size=32, torch_threads=1),
                          autoscaling=AutoscalingConfig(min_replicas=1, max_replicas=1, target_ongoing_requests=32))
        init_ray(num_cpus=4, log_to_driver=False)
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            serve.run(build_app(cfg), name="polyko", route_prefix="/")
            serve.run(naive_deployment(str(ckpt), 1), name="naive", route_prefix="/naive")
            serve.run(serve_batch_deployment(str(ckpt), 1, 32), name="serve_batch", route_prefix="/serve_batch")
            base = f"http://127.0.0.1:{port}"
            prompt = "한국어 언어 모델의 서빙 성능을 측정합니다. " * 2
            plain = {"prompt": prompt, "max_tokens": a.max_tokens}
            bodies = {
                "ours": (base + "/v1/completions", {"model": "bench", "prompt": prompt, "max_tokens": a.max_tokens,
                                                    "temperature": 0, "ignore_eos": True}),
                "naive": (base + "/naive", plain),
                "serve_batch": (base + "/serve_batch", plain),
            }
            for url, body in bodies.values():   # warm up: load, first forward passes
                load(url, body, 2, 4, 120)
            results: dict = {name: {} for name in bodies}
            for c in levels:
                n = max(8, a.requests_per_client * c)
                for name, (url, body) in bodies.items():
                    results[name][f"c{c}"] = load(url, body, c, n, a.time_cap_s)
                    print(f"[serve_load] {name} c={c}: {results[name][f'c{c}']}", file=sys.stderr, flush=True)
            # Phase 2 on our service alone (the baselines' replicas are idle meanwhile).
            long_run = None
            if prompts:
                handle = serve.get_deployment_handle("PolykoModel", app_name="polyko")
                long_run = sustained(base + "/v1/completions", handle, prompts, 32)
                print(f"[serve_load] sustained: {long_run}", file=sys.stderr, flush=True)
        finally:
            serve.shutdown()
            ray.shutdown()
    ratios = {}
    for c in levels:
        o = results["ours"][f"c{c}"]
        ratios[f"c{c}"] = {}
        for base_name in ("naive", "serve_batch"):
            b = results[base_name][f"c{c}"]
            ratios[f"c{c}"][f"tokens_per_s_x_{base_name}"] = (
                round(o["tokens_per_s"] / b["tokens_per_s"], 2) if b["tokens_per_s"] else None)
            ratios[f"c{c}"][f"p99_over_{base_name}"] = (
                round(o["p99_s"] / b["p99_s"], 3) if o["p99_s"] and b["p99_s"] else None)
    print(json.dumps({"benchmark": "serve_load", "model": a.size, "max_tokens": a.max_tokens,
                      "replicas": 1, "cpus_per_replica": 1, "results": results, "ours_vs": ratios,
                      "sustained": long_run}), file=json_out, flush=True)


if __name__ == "__main__":
    main()
