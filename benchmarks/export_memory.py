"""Peak host memory of exporting a checkpoint to Hugging Face format, per model fp32 byte.

Builds a real ``50m`` checkpoint at ZeRO-2 and at ZeRO-3 (the production train loop, 2 plain
torch.distributed CPU processes, 1 optimizer step on real Korean text), then exports each, every export
in a fresh subprocess:

* ``streaming``: ``polyko.train.export.export_hf`` (memory-mapped ZeRO partitions streamed tensor by
  tensor into safetensors, no model instantiated);
* ``baseline``: the usual route -- ``deepspeed.utils.zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint``,
  a fresh ``GPTNeoXForCausalLM``, ``load_state_dict``, ``save_pretrained``.

Figures: ``<stage>_<route>`` = (peak RSS - RSS after the imports) / model fp32 bytes (what the export
itself holds; goal for streaming <= 0.6), ``..._total`` = peak RSS / model fp32 bytes (including the
~0.6 GB of torch/transformers imports, which dominate at 50m), and ``<stage>_reduction`` = baseline /
streaming. Prints ONE JSON line.

    python benchmarks/export_memory.py [--size 50m] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("POLYKO_SHARED_DATA", REPO.parent / "shared" / "data"))
SEQ_LEN = 128

# Runs in a fresh interpreter: import everything first, then measure the export alone.
CHILD = r"""
import json, resource, sys
import torch, transformers, deepspeed.utils.zero_to_fp32
from transformers import AutoTokenizer, GPTNeoXConfig, GPTNeoXForCausalLM
import polyko.train.export as ex
from polyko.train import checkpoint as ckpt_io
route, ckpt, out = sys.argv[1:4]

def rss():
    return int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()

def baseline(ckpt, out):
    meta = ckpt_io.validate(ckpt)
    config = GPTNeoXConfig.from_dict(meta["model_config"])
    sd = deepspeed.utils.zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(ckpt, tag=meta["tag"])
    model = GPTNeoXForCausalLM(config)
    model.load_state_dict(sd, strict=True)
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(meta["tokenizer"]).save_pretrained(out)

base = rss()
if route == "streaming":
    ex.export_hf(ckpt, out, link_run=False)
else:
    baseline(ckpt, out)
print(json.dumps({"base": base, "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def make_tokens(out: Path, tokenizer_dir: Path, n: int = 64) -> Path:
    """``n`` packed sequences of real Korean news text (documents end with <|endoftext|>)."""
    from tokenizers import Tokenizer

    from polyko.data.shards import token_dtype, write_manifest, write_shard
    from polyko.model import ENDOFTEXT_ID
    from polyko.train.data import tokenizer_hash

    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    stream: list[int] = []
    for f in sorted((SHARED / "corpus" / "soynlp_news_sample").glob("*.jsonl")):
        for line in f.open():
            stream += tok.encode(json.loads(line).get("text") or "").ids + [ENDOFTEXT_ID]
            if len(stream) >= n * SEQ_LEN:
                break
        if len(stream) >= n * SEQ_LEN:
            break
    arr = np.asarray(stream[:n * SEQ_LEN], dtype=token_dtype(tok.get_vocab_size())).reshape(n, SEQ_LEN)
    write_manifest(out, [write_shard(out, 0, arr)], seq_len=SEQ_LEN, dtype=arr.dtype,
                   tokenizer_hash=tokenizer_hash(str(tokenizer_dir)), vocab_size=tok.get_vocab_size(),
                   max_token_id=int(arr.max()))
    return out


def make_checkpoint(root: Path, tokens: Path, tokenizer_dir: Path, size: str, stage: int, workers: int) -> Path:
    """One optimizer step of the production train loop in ``workers`` local processes, checkpointed."""
    from polyko.cluster import free_port
    from polyko.config import to_dict
    from polyko.train import checkpoint as ckpt_io
    from polyko.train.config import (BatchConfig, CheckpointConfig, DataConfig, DeepSpeedConfig, ModelConfig,
                                     PretrainConfig, ScalingConfig)

    run = root / f"zero{stage}"
    cfg = PretrainConfig(model=ModelConfig(size=size), data=DataConfig(path=str(tokens), tokenizer=str(tokenizer_dir)),
                         batch=BatchConfig(global_batch_tokens=2 * workers * SEQ_LEN, micro_batch=2),
                         deepspeed=DeepSpeedConfig(zero_stage=stage), checkpoint=CheckpointConfig(every_steps=1, keep=1),
                         scaling=ScalingConfig(num_workers=workers), steps=1, output=str(run), export=False)
    code = ("import json, sys; from polyko.train.loop import train_loop, LocalContext; "
            "c = json.loads(sys.argv[1]); train_loop(c, LocalContext(c['output']))")
    arg = json.dumps({"config": to_dict(cfg.resolved()), "output": str(run), "run_name": "bench"})
    env = dict(os.environ, DS_ACCELERATOR="cpu", WORLD_SIZE=str(workers), MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()))
    logs = [root / f"zero{stage}-rank{r}.log" for r in range(workers)]
    procs = [subprocess.Popen([sys.executable, "-c", code, arg], stdout=open(logs[r], "w"), stderr=subprocess.STDOUT,
                              env=dict(env, RANK=str(r), LOCAL_RANK=str(r))) for r in range(workers)]
    if any(p.wait() for p in procs):
        raise RuntimeError("\n".join(f.read_text()[-3000:] for f in logs))
    return ckpt_io.list_checkpoints(run / "checkpoints")[0]


def measure(route: str, ckpt: Path, out: Path) -> dict:
    r = subprocess.run([sys.executable, "-c", CHILD, route, str(ckpt), str(out)], capture_output=True, text=True,
                       env=dict(os.environ, DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1"))
    if r.returncode:
        raise RuntimeError(r.stderr[-3000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="50m")
    p.add_argument("--workers", type=int, default=2)
    a = p.parse_args()
    from transformers import GPTNeoXConfig

    from polyko.train import checkpoint as ckpt_io
    from polyko.train.export import expected_tensors

    tokenizer_dir = SHARED / "reference" / "polyglot-ko-tokenizer"
    result: dict = {"size": a.size, "workers": a.workers}
    with tempfile.TemporaryDirectory(prefix="polyko-export-bench-") as d:
        root = Path(d)
        tokens = make_tokens(root / "tokens", tokenizer_dir)
        for stage in (2, 3):
            ckpt = make_checkpoint(root, tokens, tokenizer_dir, a.size, stage, a.workers)
            shapes = expected_tensors(GPTNeoXConfig.from_dict(ckpt_io.validate(ckpt)["model_config"]))
            fp32 = 4 * sum(int(np.prod(s)) for s in shapes.values())
            result["model_fp32_bytes"] = fp32
            for route in ("baseline", "streaming"):
                m = measure(route, ckpt, root / f"hf-{stage}-{route}")
                result[f"zero{stage}_{route}"] = round((m["peak"] - m["base"]) / fp32, 3)
                result[f"zero{stage}_{route}_total"] = round(m["peak"] / fp32, 3)
            result[f"zero{stage}_reduction"] = round(result[f"zero{stage}_baseline"] / result[f"zero{stage}_streaming"], 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
