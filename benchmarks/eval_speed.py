"""KoBEST evaluation throughput: lm-eval requests per second on the full KoBEST test sets, 0-shot,
for a small model run directly (lm-eval's ``hf`` model in this process) and through our
OpenAI-style server (``jobs/serve.py`` + lm-eval's ``local-completions``), in the same command.
Prints ONE JSON line; the endpoint figure is a ratio against the direct baseline, and the two
runs' per-task macro-F1 must agree (same model, same requests).

    python benchmarks/eval_speed.py                      # tiny preset, all 10,122 requests (~3 + ~4 min on 2 idle CPUs)
    python benchmarks/eval_speed.py --limit 50           # quick look
    python benchmarks/eval_speed.py --model DIR --skip-serve

Data: --kobest-dir, else $POLYKO_KOBEST_DIR, else ../shared/data/kobest beside the repo.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("POLYKO_SHARED_DATA", REPO.parent / "shared" / "data"))
CHOICES = {"kobest_boolq": 2, "kobest_copa": 2, "kobest_hellaswag": 4, "kobest_sentineg": 2, "kobest_wic": 2}


def tiny_checkpoint(out: Path) -> Path:
    """The tiny preset with seeded random weights and the real Polyglot-Ko tokenizer."""
    import torch
    from transformers import AutoTokenizer

    from polyko.model import build_config, build_model

    tok = AutoTokenizer.from_pretrained(str(SHARED / "reference" / "polyglot-ko-tokenizer"))
    tok.eos_token, tok.pad_token = "<|endoftext|>", "<pad>"
    torch.manual_seed(0)
    model = build_model(build_config("tiny"))
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def timed_pass(model: str, model_args: dict, data, limit: int, batch_size: int, device: str | None) -> tuple[float, dict]:
    from polyko.eval import KOBEST_TASKS, kobest

    t = time.perf_counter()
    res = kobest.run_lm_eval(model=model, model_args=model_args, tasks=list(KOBEST_TASKS), data=data, shots=0,
                             limit=limit, batch_size=batch_size, device=device, seed=1234, log_samples=False)
    return time.perf_counter() - t, res


def n_requests(res: dict) -> int:
    return sum(v["effective"] * CHOICES[t] for t, v in res["n-samples"].items())


def f1s(res: dict) -> dict[str, float]:
    return {t: res["results"][t]["f1,none"] for t in CHOICES}


def start_server(model_dir: Path, log_path: Path) -> tuple[subprocess.Popen, str]:
    from polyko.cluster import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, str(REPO / "jobs" / "serve.py"), "--model", f"tiny={model_dir}",
                             "--port", str(port)], stdout=open(log_path, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True, cwd=REPO)
    import requests

    base = f"http://127.0.0.1:{port}/v1"
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"jobs/serve.py exited: {log_path.read_text()[-2000:]}")
        try:
            if requests.get(f"{base}/models", timeout=2).ok:
                return proc, base
        except requests.RequestException:
            pass
        time.sleep(1)
    stop_server(proc)
    raise RuntimeError("server did not come up in 300 s")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)  # jobs/serve.py shuts Serve and its private Ray down on Ctrl-C
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="", help="HF checkpoint dir (default: a fresh tiny-preset model)")
    ap.add_argument("--kobest-dir", default=os.environ.get("POLYKO_KOBEST_DIR", str(SHARED / "kobest")))
    ap.add_argument("--limit", type=int, default=0, help="docs per task (0 = full test sets)")
    ap.add_argument("--batch-size", type=int, default=8, help="direct run's batch (on a CPU 8 beats 32 ~2.5x)")
    ap.add_argument("--num-concurrent", type=int, default=4)
    ap.add_argument("--skip-serve", action="store_true")
    a = ap.parse_args()

    import torch

    from polyko.eval import KOBEST_TASKS, kobest

    tmp = Path(tempfile.mkdtemp(prefix="polyko-eval-bench-"))
    model_dir = Path(a.model) if a.model else tiny_checkpoint(tmp / "tiny")
    data = kobest.resolve_data(a.kobest_dir, list(KOBEST_TASKS))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = "float32" if device == "cpu" else "auto"
    secs, res = timed_pass("hf", {"pretrained": str(model_dir), "dtype": dtype}, data, a.limit, a.batch_size, device)
    n = n_requests(res)
    out = {"benchmark": "eval_speed", "model": "tiny" if not a.model else str(model_dir), "device": device,
           "threads": torch.get_num_threads(), "docs": sum(v["effective"] for v in res["n-samples"].values()),
           "requests": n, "direct_seconds": round(secs, 2), "direct_requests_per_s": round(n / secs, 1),
           "direct_f1_avg": round(sum(f1s(res).values()) / 5, 4)}
    try:
        import polyko.serve.app  # noqa: F401  (the serving app; absent -> direct only)
        have_serve = True
    except ImportError as e:
        have_serve, out["endpoint"] = False, f"skipped: polyko.serve not importable ({e})"
    if have_serve and not a.skip_serve:
        proc, base = start_server(model_dir, tmp / "serve.log")
        try:
            args = {"base_url": f"{base}/completions", "model": "tiny", "tokenizer": str(model_dir),
                    "tokenizer_backend": "huggingface", "tokenized_requests": True,
                    "num_concurrent": a.num_concurrent, "max_retries": 3,
                    "max_length": json.loads((model_dir / "config.json").read_text())["max_position_embeddings"]}
            esecs, eres = timed_pass("local-completions", args, data, a.limit, 8, None)
        finally:
            stop_server(proc)
        assert n_requests(eres) == n
        diff = max(abs(f1s(res)[t] - f1s(eres)[t]) for t in CHOICES)
        out.update({"endpoint_seconds": round(esecs, 2), "endpoint_requests_per_s": round(n / esecs, 1),
                    "endpoint_vs_direct": round(secs / esecs, 3), "endpoint_num_concurrent": a.num_concurrent,
                    "max_abs_f1_diff_endpoint_vs_direct": round(diff, 6)})
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
