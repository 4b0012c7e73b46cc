"""Helpers for the pretraining tests: a real packed-token dataset built from the shared Korean corpus
with the released Polyglot-Ko tokenizer, written through ``polyko.data.shards`` (the format the data
pipeline's ``pack_corpus`` writes), and a run of ``pretrain`` with small test settings."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from polyko.data.shards import token_dtype, write_manifest, write_shard
from polyko.model import ENDOFTEXT_ID


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
                   vocab_size=vocab, max_token_id=int(arr.max()))
    return out
