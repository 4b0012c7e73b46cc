"""Tokenize a cleaned corpus and pack it into fixed-length token shards (``polyko.data.shards``).

    from polyko.data.pack import pack_corpus
    manifest = pack_corpus("work/data/cleaned", "work/tokenizer", "work/data/tokens", seq_len=2048)

(``jobs/prepare_data.py --tokenizer TOKDIR`` calls it after cleaning.) On a CPU, a few MB of text
per second per worker; ``workers=0`` runs in-process without Ray.

How (GPT-NeoX / Megatron-style packing, distributed and deterministic):

1. plan: the Parquet files of ``cleaned_dir`` (sorted by relative path) and their row groups are cut,
   from the Parquet metadata alone, into *chunks* of about ``chunk_bytes`` of uncompressed text.
   The plan depends only on the input, never on the cluster.
2. tokenize + pack: Ray Data ``map_batches`` runs a pool of ``workers`` actors, one chunk per call.
   Each actor streams its chunk's rows ``batch_size`` documents at a time through the Rust
   ``Tokenizer.encode_batch_fast``, appends ``<|endoftext|>`` (id 2) to every document,
   concatenates them into one token stream, cuts it into ``seq_len`` rows and writes part shards of
   at most ``shard_tokens`` tokens (memory per actor ~ one shard). The last ``< seq_len`` tokens of a
   chunk are dropped (``tokens_dropped``: at most seq_len-1 per chunk, ~0.003% at the defaults;
   documents are never split across chunks, so chunks need no coordination).
3. commit: the driver renames the parts to ``shard-00000.bin ...`` in chunk order and writes
   ``manifest.json`` last. Same input + tokenizer + settings -> byte-identical shards, whatever
   the worker count or scheduling. Rerunning a committed output returns its manifest; a crashed
   run's leftovers (no manifest) are removed and redone.

A document longer than ``seq_len`` continues in the next row (standard packing: no padding, no
truncation); sequence ``i`` is then one O(1) read with ``TokenShards(out_dir)[i]``.
``cleaned_dir`` and ``out_dir`` must be on storage every Ray node can reach (one machine, NFS, ...).
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from polyko.data.shards import MANIFEST, is_remote, read_manifest, shard_name, token_dtype, write_manifest, write_shard

PARTS_DIR = ".parts"
ENDOFTEXT = "<|endoftext|>"


def _parquet_files(cleaned_dir: str | os.PathLike) -> list[Path]:
    root = Path(cleaned_dir)
    if root.is_file() and root.suffix == ".parquet":
        return [root]
    if not root.is_dir():
        raise ValueError(f"cleaned corpus {cleaned_dir} does not exist (run jobs/prepare_data.py first)")
    files = sorted((f for f in root.rglob("*.parquet")
                    if not any(p.startswith((".", "_")) for p in f.relative_to(root).parts)),
                   key=lambda f: f.relative_to(root).as_posix())
    if not files:
        raise ValueError(f"no .parquet files under {cleaned_dir}")
    return files


def plan_chunks(files: list[Path], chunk_bytes: int, text_column: str) -> list[list[tuple[str, list[int]]]]:
    """Consecutive (file, row groups) runs of about ``chunk_bytes`` uncompressed bytes each."""
    import pyarrow.parquet as pq

    chunks: list[list[tuple[str, list[int]]]] = []
    cur: list[tuple[str, list[int]]] = []
    size = 0
    for f in files:
        md = pq.read_metadata(f)
        names = md.schema.to_arrow_schema().names
        if text_column not in names:
            raise ValueError(f"{f}: no {text_column!r} column (columns: {names})")
        for rg in range(md.num_row_groups):
            if md.row_group(rg).num_rows == 0:
                continue
            if cur and cur[-1][0] == str(f):
                cur[-1][1].append(rg)
            else:
                cur.append((str(f), [rg]))
            size += md.row_group(rg).total_byte_size
            if size >= chunk_bytes:
                chunks.append(cur)
                cur, size = [], 0
    if cur:
        chunks.append(cur)
    return chunks


class ChunkPacker:
    """Tokenizes and packs chunks. Built once per worker (loads the Rust tokenizer from its JSON)."""

    def __init__(self, tokenizer_dir: str, tokenizer_hash: str, parts_dir: str, seq_len: int,
                 shard_tokens: int, text_column: str, source_column: str, batch_size: int):
        # One Ray worker = one core: the Rust tokenizer must not start a thread per core as well.
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        from polyko.tokenizer.bpe import load_tokenizer
        from polyko.tokenizer.bpe import tokenizer_hash as content_hash

        # Shipped by path (workers share the filesystem anyway); the hash proves it is the same one.
        got = content_hash(tokenizer_dir)
        assert got == tokenizer_hash, f"tokenizer {tokenizer_dir} changed during packing ({got} != {tokenizer_hash})"
        self.tok = load_tokenizer(tokenizer_dir)
        self.eos = self.tok.token_to_id(ENDOFTEXT)
        assert self.eos is not None, f"tokenizer has no {ENDOFTEXT}"
        self.vocab = self.tok.get_vocab_size(with_added_tokens=True)
        self.dtype = token_dtype(self.vocab)
        self.parts_dir, self.seq_len = Path(parts_dir), seq_len
        self.rows_per_shard = max(1, shard_tokens // seq_len)
        self.text_column, self.source_column, self.batch_size = text_column, source_column, batch_size

    def pack(self, index: int, chunk: list[tuple[str, list[int]]]) -> dict[str, Any]:
        import pyarrow.parquet as pq

        out = self.parts_dir / f"chunk-{index:06d}"
        if out.exists():  # a retried task: redo the chunk from scratch
            shutil.rmtree(out)
        out.mkdir(parents=True)
        shard_len = self.rows_per_shard * self.seq_len
        pending: list[np.ndarray] = []
        n_pending = 0
        parts: list[dict[str, Any]] = []
        docs = skipped = tokens = 0
        tok_src: Counter[str] = Counter()
        doc_src: Counter[str] = Counter()

        def flush(n_rows: int) -> None:
            nonlocal pending, n_pending
            buf = np.concatenate(pending) if len(pending) > 1 else pending[0]
            take = n_rows * self.seq_len
            entry = write_shard(out, len(parts), buf[:take].reshape(n_rows, self.seq_len))
            parts.append({"file": f"{out.name}/{entry['file']}", "num_sequences": entry["num_sequences"]})
            rest = buf[take:]
            pending, n_pending = ([rest] if rest.size else []), int(rest.size)

        for path, row_groups in chunk:
            pf = pq.ParquetFile(path)
            cols = [self.text_column] + ([self.source_column] if self.source_column in pf.schema_arrow.names else [])
            for batch in pf.iter_batches(batch_size=self.batch_size, row_groups=row_groups, columns=cols):
                texts = batch.column(self.text_column).to_pylist()
                sources = (batch.column(self.source_column).to_pylist() if len(cols) > 1
                           else ["unknown"] * len(texts))
                keep = [i for i, t in enumerate(texts) if t]
                skipped += len(texts) - len(keep)
                if not keep:
                    continue
                if len(keep) < len(texts):
                    texts, sources = [texts[i] for i in keep], [sources[i] for i in keep]
                ids = [e.ids for e in self.tok.encode_batch_fast(texts, add_special_tokens=False)]
                for seq in ids:
                    seq.append(self.eos)
                lens = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
                n = int(lens.sum())
                flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=self.dtype, count=n)
                for s, ln in zip(sources, lens.tolist()):
                    tok_src[s or "unknown"] += ln
                    doc_src[s or "unknown"] += 1
                docs += len(ids)
                tokens += n
                pending.append(flat)
                n_pending += n
                while n_pending >= shard_len:
                    flush(self.rows_per_shard)
        rows = n_pending // self.seq_len
        if rows:
            flush(rows)
        return {"index": index, "files": sorted({p for p, _ in chunk}), "documents": docs,
                "documents_skipped_empty": skipped, "tokens": tokens, "tokens_dropped": n_pending,
                "num_sequences": sum(p["num_sequences"] for p in parts), "parts": parts,
                "tokens_per_source": dict(tok_src), "documents_per_source": dict(doc_src)}


class _PackActor:
    """Ray Data callable class around :class:`ChunkPacker`: one row in = one chunk packed."""

    def __init__(self, **kwargs):
        self.packer = ChunkPacker(**kwargs)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        out = [self.packer.pack(int(i), json.loads(spec)) for i, spec in zip(batch["index"], batch["chunk"])]
        return {"index": [o["index"] for o in out], "summary": [json.dumps(o) for o in out]}


def _run_ray(chunks, kwargs, workers: int | None, ray_address: str | None) -> list[dict[str, Any]]:
    import ray

    from polyko.cluster import init_ray

    started = not ray.is_initialized()
    init_ray(ray_address)
    try:
        cpus = int(ray.cluster_resources().get("CPU", 1))
        n = max(1, min(workers or cpus, cpus, len(chunks)))
        items = [{"index": i, "chunk": json.dumps(c)} for i, c in enumerate(chunks)]
        ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            _PackActor, fn_constructor_kwargs=kwargs, batch_size=1, num_cpus=1,
            # one chunk in flight per actor: a chunk is minutes of work at the default size
            compute=ray.data.ActorPoolStrategy(size=n, max_tasks_in_flight_per_actor=1))
        rows = ds.take_all()
    finally:
        if started:
            ray.shutdown()
    return [json.loads(r["summary"]) for r in rows]


def pack_corpus(cleaned_dir: str | os.PathLike, tokenizer_dir: str | os.PathLike, out_dir: str | os.PathLike,
                *, seq_len: int = 2048, chunk_bytes: int = 128 << 20, shard_tokens: int = 1 << 26,
                batch_size: int = 1024, text_column: str = "text", source_column: str = "source",
                workers: int | None = None, ray_address: str | None = None) -> dict[str, Any]:
    """Tokenize ``cleaned_dir`` (Parquet with ``text``/``source``) with ``tokenizer_dir`` and write
    packed ``seq_len`` sequences to ``out_dir``. Returns the manifest (also ``out_dir/manifest.json``).

    ``chunk_bytes``: uncompressed Parquet bytes per unit of work (parallelism and tail-drop
    granularity: 128 MiB ~ 40 M tokens). ``shard_tokens``: tokens per shard file (2**26 = 128 MiB
    of uint16). ``batch_size``: documents per ``encode_batch_fast`` call. ``workers``: Ray actors
    (default: every CPU of the cluster; 0 = in this process, no Ray). ``ray_address``: cluster to
    join when Ray is not initialised yet (else a private local one, shut down afterwards).
    """
    from polyko.config import config_hash
    from polyko.tokenizer.bpe import load_tokenizer, tokenizer_hash

    if seq_len < 2:
        raise ValueError(f"seq_len={seq_len} must be >= 2")
    if chunk_bytes < 1 or shard_tokens < seq_len or batch_size < 1:
        raise ValueError("chunk_bytes and batch_size must be >= 1 and shard_tokens >= seq_len")
    for name, p in (("cleaned_dir", cleaned_dir), ("out_dir", out_dir)):
        if is_remote(p):
            raise ValueError(f"{name} {p}: packing reads and writes local or mounted paths (NFS, FUSE); "
                             "copy the shards to object storage afterwards, TokenShards reads them there")
    cleaned_dir, out_dir = (str(p).removeprefix("file://") for p in (cleaned_dir, out_dir))
    files = _parquet_files(cleaned_dir)
    root = Path(cleaned_dir) if Path(cleaned_dir).is_dir() else Path(cleaned_dir).parent
    tok = load_tokenizer(tokenizer_dir)
    eos = tok.token_to_id(ENDOFTEXT)
    if eos is None:
        raise ValueError(f"tokenizer {tokenizer_dir} has no {ENDOFTEXT} token")
    vocab = tok.get_vocab_size(with_added_tokens=True)
    tok_hash = tokenizer_hash(tokenizer_dir)
    settings = {"seq_len": seq_len, "chunk_bytes": chunk_bytes, "shard_tokens": shard_tokens,
                "text_column": text_column, "source_column": source_column}
    key = config_hash({"tokenizer_hash": tok_hash, **settings,
                       "files": [[f.relative_to(root).as_posix(), f.stat().st_size] for f in files]})

    out = Path(out_dir)
    if (out / MANIFEST).is_file():
        m = read_manifest(out)
        if m.get("pack_key") == key:
            return m  # already packed from this very input, tokenizer and settings
        raise ValueError(f"{out} already holds a committed token dataset from other input/tokenizer/settings "
                         f"(pack_key {m.get('pack_key')} != {key}); choose another out_dir or delete it")
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("shard-*.bin"), *out.glob("shard-*.bin.tmp")]:  # uncommitted leftovers
        stale.unlink()
    parts_dir = out / PARTS_DIR
    shutil.rmtree(parts_dir, ignore_errors=True)

    chunks = plan_chunks(files, chunk_bytes, text_column)
    kwargs = {"tokenizer_dir": str(Path(tokenizer_dir).resolve()), "tokenizer_hash": tok_hash,
              "parts_dir": str(parts_dir.resolve()), "seq_len": seq_len, "shard_tokens": shard_tokens,
              "text_column": text_column, "source_column": source_column, "batch_size": batch_size}
    if workers == 0 or not chunks:
        packer = ChunkPacker(**kwargs)
        summaries = [packer.pack(i, c) for i, c in enumerate(chunks)]
    else:
        summaries = _run_ray(chunks, kwargs, workers, ray_address)
    summaries.sort(key=lambda s: s["index"])
    assert [s["index"] for s in summaries] == list(range(len(chunks))), "a chunk is missing"

    shards, tok_src, doc_src = [], Counter(), Counter()
    for s in summaries:
        for p in s.pop("parts"):
            name = shard_name(len(shards))
            os.replace(parts_dir / p["file"], out / name)
            shards.append({"file": name, "num_sequences": p["num_sequences"]})
        tok_src.update(s.pop("tokens_per_source"))
        doc_src.update(s.pop("documents_per_source"))
        s["files"] = [Path(os.path.relpath(f, root)).as_posix() for f in s["files"]]
    shutil.rmtree(parts_dir, ignore_errors=True)
    num_sequences = sum(s["num_sequences"] for s in shards)
    tokens_in = sum(s["tokens"] for s in summaries)
    return write_manifest(
        out, shards, seq_len=seq_len, dtype=token_dtype(vocab),
        tokenizer_hash=tok_hash, tokenizer_dir=str(Path(tokenizer_dir).resolve()), vocab_size=vocab,
        eos_id=eos, eos_token=ENDOFTEXT,
        documents=sum(s["documents"] for s in summaries),
        documents_skipped_empty=sum(s["documents_skipped_empty"] for s in summaries),
        documents_per_source=dict(sorted(doc_src.items())),
        tokens_total=num_sequences * seq_len, tokens_input=tokens_in,
        tokens_dropped=sum(s["tokens_dropped"] for s in summaries),
        tokens_per_source=dict(sorted(tok_src.items())),
        source_dir=str(Path(cleaned_dir).resolve()), pack=settings, pack_key=key, chunks=summaries)
