"""Helpers for the pretraining tests: a real packed-token dataset built from the shared Korean corpus
with the released Polyglot-Ko tokenizer, written through ``polyko.data.shards`` (the format the data
pipeline's ``pack_corpus`` writes), and a run of ``pretrain`` with small test settings."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from polyko.data.shards import token_dtype, write_manifest, write_shard
from polyko.model import ENDOFTEXT_ID


def make_work_dir(root: Path, tokenizer_dir: Path, corpus_dir: Path, *, max_sequences: int) -> Path:
    """``root`` laid out as `jobs/prepare_data.py --output <root>/data --tokenizer ...` leaves it (tokens at
    ``<root>/data/tokens``: what ``--data``/``--tokenizer`` default to with ``POLYKO_WORK_DIR=<root>``)."""
    (root / "data" / "tokens").mkdir(parents=True)
    make_tokens(root / "data" / "tokens", tokenizer_dir, corpus_dir, max_sequences=max_sequences)
    return root


def make_tokens(out: Path, tokenizer_dir: Path, corpus_dir: Path, *, seq_len: int = 64, max_sequences: int = 384,
                sequences_per_shard: int = 100) -> Path:
    """Tokenize news documents, append ``<|endoftext|>`` per document, pack into ``seq_len`` rows."""
    from tokenizers import Tokenizer

    from polyko.train.data import tokenizer_hash

    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    files = sorted((corpus_dir / "soynlp_news_sample").glob("*.jsonl")) + \
        sorted((corpus_dir / "klue_dev_sentences").glob("*.jsonl"))
    stream: list[int] = []
    need = seq_len * max_sequences
    for f in files:
        with f.open() as fh:
            for line in fh:
                text = json.loads(line).get("text") or ""
                if text.strip():
                    stream.extend(tok.encode(text).ids)
                    stream.append(ENDOFTEXT_ID)
                if len(stream) >= need:
                    break
        if len(stream) >= need:
            break
    n = min(max_sequences, len(stream) // seq_len)
    assert n >= 32, n
    vocab = tok.get_vocab_size()
    arr = np.asarray(stream[:n * seq_len], dtype=token_dtype(vocab)).reshape(n, seq_len)
    shards = [write_shard(out, i, arr[s:s + sequences_per_shard])
              for i, s in enumerate(range(0, n, sequences_per_shard))]
    write_manifest(out, shards, seq_len=seq_len, dtype=arr.dtype, tokenizer_hash=tokenizer_hash(str(tokenizer_dir)),
                   tokenizer_dir=str(Path(tokenizer_dir).resolve()), vocab_size=vocab, max_token_id=int(arr.max()))
    return out


def make_source_data(root: Path, tokenizer_dir: Path, corpus_dir: Path, *, seq_len: int = 64,
                     docs: dict[str, int] | None = None, validation_share: float = 0.05) -> Path:
    """``root/data`` as `jobs/prepare_data.py` packs it: per-source shards at ``root/data/tokens`` and the
    held-out validation set at ``root/data/validation``, through the pipeline's own ``pack_corpus`` (in this
    process), from two real sources of the shared corpus: KLUE sentences ("klue") and NSMC movie reviews
    ("nsmc"), ``docs`` documents each. Returns ``root/data``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from polyko.data.pack import pack_corpus

    docs = docs or {"klue": 3000, "nsmc": 3000}
    files = {"klue": "klue_dev_sentences/klue_dev_sentences.jsonl", "nsmc": "nsmc_raw_sample/nsmc_raw_sample.part00.jsonl"}
    rows = []
    for name, n in docs.items():
        with open(corpus_dir / files[name], encoding="utf-8") as f:
            for i, line in zip(range(n), f):
                text = json.loads(line).get("text") or ""
                if text.strip():
                    rows.append({"key": f"{name}:{i}", "text": text, "source": name})
    (root / "cleaned").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), root / "cleaned" / "part-0.parquet")
    data = root / "data"
    pack_corpus(root / "cleaned", tokenizer_dir, data / "tokens", seq_len=seq_len, shard_tokens=seq_len * 100,
                workers=0, validation_dir=data / "validation", validation_share=validation_share,
                validation_min_docs=200)
    return data


def run_local(cfg, *, workers: int, timeout_s: float = 900) -> list[Path]:
    """Run the production train loop of ``cfg`` (``cfg.output`` set) in ``workers`` plain torch.distributed
    processes (``LocalContext``, gloo, no Ray); returns the per-rank log files. Asserts every rank exits 0."""
    import os
    import subprocess
    import sys

    from polyko.cluster import free_port
    from polyko.config import to_dict

    run = Path(cfg.output)
    code = ("import json, sys; from polyko.train.loop import train_loop, LocalContext; "
            "c = json.loads(sys.argv[1]); train_loop(c, LocalContext(c['output'], keep=c['keep']))")
    arg = json.dumps({"config": to_dict(cfg.resolved()), "output": str(run), "run_name": run.name,
                      "keep": cfg.checkpoint.keep})
    env = dict(os.environ, DS_ACCELERATOR="cpu", WORLD_SIZE=str(workers), MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()))
    run.mkdir(parents=True, exist_ok=True)
    logs = [run / f"rank{r}.log" for r in range(workers)]
    procs = [subprocess.Popen([sys.executable, "-c", code, arg], stdout=open(logs[r], "w"), stderr=subprocess.STDOUT,
                              env=dict(env, RANK=str(r), LOCAL_RANK=str(r))) for r in range(workers)]
    assert all(p.wait(timeout_s) == 0 for p in procs), "\n".join(f.read_text()[-3000:] for f in logs)
    return logs


def make_checkpoint(out: Path, tokens_dir: Path, tokenizer_dir: Path, *, workers: int = 2, zero_stage: int = 3,
                    size: str = "tiny", steps: int = 2, every_steps: int | None = None, seq_len: int = 64) -> Path:
    """A real DeepSpeed checkpoint (``out/run/checkpoints/step_XXXXXX``) written by the production train loop
    in ``workers`` plain torch.distributed processes (``LocalContext``, gloo, no Ray): ``steps`` optimizer
    steps of ``size`` at ZeRO ``zero_stage``, 4 sequences per step, checkpointed every ``every_steps`` (default:
    at the end; the newest two kept). Losses in ``out/run/metrics.jsonl``. Returns the newest step directory."""
    from polyko.train import checkpoint as ckpt_io
    from polyko.train.config import (BatchConfig, CheckpointConfig, DataConfig, DeepSpeedConfig, ModelConfig,
                                     OptimConfig, PretrainConfig, ScalingConfig)

    run = out / "run"
    cfg = PretrainConfig(model=ModelConfig(size=size), data=DataConfig(path=str(tokens_dir), tokenizer=str(tokenizer_dir)),
                         optim=OptimConfig(lr=3e-3, warmup_steps=1),
                         batch=BatchConfig(global_batch_tokens=4 * seq_len, micro_batch=2),
                         deepspeed=DeepSpeedConfig(zero_stage=zero_stage),
                         checkpoint=CheckpointConfig(every_steps=every_steps or steps, keep=2),
                         scaling=ScalingConfig(num_workers=workers), steps=steps, output=str(run), export=False)
    run_local(cfg, workers=workers)
    return ckpt_io.list_checkpoints(run / "checkpoints")[0]
