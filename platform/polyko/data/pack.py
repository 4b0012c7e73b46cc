"""Tokenize a cleaned corpus and pack it into fixed-length token shards (``polyko.data.shards``).

    from polyko.data.pack import pack_corpus
    manifest = pack_corpus("work/data/cleaned", "work/tokenizer", "work/data/tokens", seq_len=2048)

(``jobs/prepare_data.py --tokenizer TOKDIR`` calls it after cleaning.) On a CPU, a few MB of text
per second per worker; ``workers=0`` runs in-process without Ray.

How (GPT-NeoX / Megatron-style packing, distributed and deterministic):

1. plan: the Parquet files of ``cleaned_dir`` (sorted by relative path) and their row groups are cut,
   from the Parquet metadata alone, into the fewest *chunks* of at most about ``chunk_bytes`` of
   uncompressed text, all of about the same size (so the actors finish together).
   The plan depends only on the input, never on the cluster.
2. tokenize + pack: Ray Data ``map_batches`` runs a pool of ``workers`` actors, one chunk per call.
   Each actor streams its chunk's rows ``batch_size`` documents at a time through the tokenizer (the
   tiktoken run of the same BPE, :mod:`polyko.tokenizer.rankbpe`: identical ids, ~5x faster, with a
   sampled check against the Rust ``Tokenizer.encode_batch_fast``, which it falls back to; or the Rust
   one itself), appends ``<|endoftext|>`` (id 2) to every document and concatenates them into **one
   token stream per source** (the ``source`` column), cuts each into ``seq_len`` rows and writes part
   shards of at most ``shard_tokens`` tokens, each holding rows of a single source: every packed row
   belongs to exactly one source, so a sampler can weight sources (as Megatron-LM's blendable
   datasets and OLMo's per-source arrays do). Memory per actor is at most one chunk's tokens (the
   per-source buffers together never exceed the chunk). The last ``< seq_len`` tokens of each
   source's stream in a chunk are dropped (``tokens_dropped``: at most seq_len-1 per source per
   chunk, ~0.003% per source at the defaults; documents are never split across chunks, so chunks
   need no coordination).
   **Validation split** (``validation_share > 0``): a document is held out when the 64-bit hash
   of its unique ``key`` (:func:`holdout_hashes`) is below ``validation_share * 2**64`` (independent of order, cluster
   and the other documents), and -- so a source of at least ``validation_min_docs`` documents never
   ends with an empty validation set -- also the document of smallest hash of each such source
   (a driver pre-pass over the ``key``/``source`` columns only). Held-out documents go, packed the
   same way, to ``validation_dir`` and never into ``out_dir``.
3. commit: the driver renames the parts to ``shard-00000.bin ...`` in chunk order (each shard's
   manifest entry names its ``source``) and writes ``manifest.json`` last (the validation one first). Same input + tokenizer + settings -> byte-identical shards, whatever
   the worker count or scheduling. Rerunning a committed output returns its manifest; a crashed
   run's leftovers (no manifest) are removed and redone.

Per-source accounting in the manifest (training and validation alike): ``per_source[s]`` =
``documents``, ``rows``, ``tokens`` (= rows * seq_len, what the rows hold), ``tokens_input`` (document
tokens + one eos each, before the row-end drop), ``text_bytes`` (UTF-8 bytes of the documents'
``text``) and ``bytes``: the text bytes the rows cover, i.e. ``text_bytes`` pro-rated for the dropped
row-end tokens, per chunk and source: ``bytes = text_bytes * tokens / tokens_input``. Bits per byte
of a source is then ``mean_loss_nats_per_token * tokens / (ln 2 * bytes)`` (the eos tokens' loss
counts, their bytes are none; tokenizer-independent, as in the Pile and lm-eval's ``bits_per_byte``).
``rows_per_source``, ``tokens_per_source`` (input tokens) and ``documents_per_source`` summarise it.

A document longer than ``seq_len`` continues in the next row (standard packing: no padding, no
truncation); sequence ``i`` is then one O(1) read with ``TokenShards(out_dir)[i]``.
``cleaned_dir`` and ``out_dir`` must be on storage every Ray node can reach (one machine, NFS, ...).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from polyko.data.minhash import int_hashes
from polyko.data.shards import MANIFEST, is_remote, read_manifest, shard_name, token_dtype, write_manifest, write_shard
from polyko.heap import release_heap

PARTS_DIR = ".parts"
ENDOFTEXT = "<|endoftext|>"
# Bump when the packed layout changes (2: rows of one source each, optional validation split;
# 3: integer keys split by a salted splitmix64, not BLAKE2b of their text):
# it is part of pack_key, so an older cache is re-packed rather than reused.
PACK_LAYOUT = 3
_VAL_SALT = b"polyko-validation-v1"


# the salted state, copied per key: 0.5 us instead of 1.2 us for a fresh salted blake2b
_VAL_BASE = hashlib.blake2b(digest_size=8, salt=_VAL_SALT[:16])
# the salt of integer keys: the first 8 bytes of the salt's own BLAKE2b
_VAL_SALT64 = int.from_bytes(hashlib.blake2b(_VAL_SALT, digest_size=8).digest(), "little")


def holdout_hashes(keys: Any) -> np.ndarray:
    """The 64-bit hashes (uint64, one per key) that decide the documents' split. Integer keys -- the
    pipeline's (file, offset) keys -- go through splitmix64 of the key xor a salt, vectorised (~10 ns a
    key: it runs for every document in the driver's forced-holdout pre-pass and in the pack actors,
    where a BLAKE2b per key cost ~1.5 us, 10 s of serial driver time per 10M documents); any other
    key through a salted BLAKE2b of its text."""
    arr = keys.combine_chunks() if isinstance(keys, pa.ChunkedArray) else keys
    if not isinstance(arr, pa.Array):
        arr = pa.array(list(arr))
    if pa.types.is_integer(arr.type) and arr.null_count == 0:
        return int_hashes(arr, _VAL_SALT64)
    out = np.empty(len(arr), np.uint64)
    for i, k in enumerate(arr.to_pylist()):
        h = _VAL_BASE.copy()
        h.update(str(k).encode("utf-8"))
        out[i] = int.from_bytes(h.digest(), "little")
    return out


def holdout_hash(key: Any) -> int:
    """:func:`holdout_hashes` of one key."""
    return int(holdout_hashes(pa.array([key]))[0])


def holdout_threshold(share: float) -> int:
    """Documents with ``holdout_hash(key) < holdout_threshold(share)`` are validation documents."""
    return min((1 << 64) - 1, int(share * (1 << 64)))


def _source_codes(col: Any) -> tuple[np.ndarray, list[str]]:
    """(code per row, name per code) of a source column; a null or empty source is "unknown"."""
    enc = pc.dictionary_encode(col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col)
    names = [s or "unknown" for s in enc.dictionary.to_pylist()]
    codes = pc.fill_null(enc.indices, len(names)).to_numpy(zero_copy_only=False)
    return codes, names + ["unknown"]


def forced_holdouts(files: list[Path], key_column: str, source_column: str, share: float,
                    min_docs: int) -> list[str]:
    """Keys of the smallest-hash document of every source with >= ``min_docs`` documents whose hash
    rule alone held out nothing: at least one validation document for every such source. Reads only
    the key and source columns (a few bytes per document)."""
    import pyarrow.parquet as pq

    thr = np.uint64(holdout_threshold(share))
    best: dict[str, tuple[int, str]] = {}
    count: Counter[str] = Counter()
    hit: set[str] = set()
    for f in files:
        pf = pq.ParquetFile(f)
        names = pf.schema_arrow.names
        if key_column not in names:
            raise ValueError(f"{f}: no {key_column!r} column to split validation documents by (columns: {names})")
        cols = [key_column] + ([source_column] if source_column in names else [])
        for batch in pf.iter_batches(columns=cols, batch_size=65536):
            keys = batch.column(key_column)
            h = holdout_hashes(keys)
            codes, srcs = (_source_codes(batch.column(source_column)) if len(cols) > 1
                           else (np.zeros(len(h), np.int64), ["unknown"]))
            for c in np.unique(codes):
                rows = np.flatnonzero(codes == c)
                s, hs = srcs[c], h[rows]
                count[s] += rows.size
                if (hs < thr).any():
                    hit.add(s)
                lo = hs.min()
                cand = min(str(keys[int(i)].as_py()) for i in rows[hs == lo])
                b = best.get(s)
                if b is None or (int(lo), cand) < b:
                    best[s] = (int(lo), cand)
    release_heap()  # the driver runs this pass: its read buffers are not kept for the rest of the run
    return sorted(best[s][1] for s in best if count[s] >= min_docs and s not in hit)


class _SourceStreams:
    """One token stream per source, cut into ``seq_len`` rows, written as single-source part shards."""

    def __init__(self, out: Path, prefix: str, seq_len: int, rows_per_shard: int):
        # prefix: ``out`` relative to the parts dir (how the driver finds the part files)
        self.out, self.prefix, self.seq_len, self.rows_per_shard = out, prefix, seq_len, rows_per_shard
        self.pending: dict[str, list[np.ndarray]] = {}
        self.n_pending: Counter[str] = Counter()
        self.parts: list[dict[str, Any]] = []
        self.tokens: Counter[str] = Counter()     # input tokens (documents + eos)
        self.docs: Counter[str] = Counter()
        self.text_bytes: Counter[str] = Counter()
        self.rows: Counter[str] = Counter()

    def add(self, source: str, ids: np.ndarray, docs: int, text_bytes: int) -> None:
        self.pending.setdefault(source, []).append(ids)
        self.n_pending[source] += int(ids.size)
        self.tokens[source] += int(ids.size)
        self.docs[source] += docs
        self.text_bytes[source] += text_bytes
        while self.n_pending[source] >= self.rows_per_shard * self.seq_len:
            self._flush(source, self.rows_per_shard)

    def _flush(self, source: str, n_rows: int) -> None:
        pend = self.pending[source]
        buf = np.concatenate(pend) if len(pend) > 1 else pend[0]
        take = n_rows * self.seq_len
        self.out.mkdir(parents=True, exist_ok=True)
        entry = write_shard(self.out, len(self.parts), buf[:take].reshape(n_rows, self.seq_len))
        self.parts.append({"file": f"{self.prefix}/{entry['file']}", "num_sequences": entry["num_sequences"],
                           "source": source})
        self.rows[source] += n_rows
        rest = buf[take:]
        self.pending[source] = [rest] if rest.size else []
        self.n_pending[source] = int(rest.size)

    def finish(self) -> dict[str, Any]:
        for source in sorted(self.pending):   # sorted: the part order is a function of the input only
            if self.n_pending[source] >= self.seq_len:
                self._flush(source, self.n_pending[source] // self.seq_len)
        per = {}
        for s in sorted(self.tokens):
            kept = self.rows[s] * self.seq_len
            per[s] = {"documents": self.docs[s], "rows": self.rows[s], "tokens": kept,
                      "tokens_input": self.tokens[s], "text_bytes": self.text_bytes[s],
                      # bytes the kept rows cover: the text pro-rated for the dropped row-end tokens
                      "bytes": self.text_bytes[s] * kept / self.tokens[s] if self.tokens[s] else 0.0}
        return {"parts": self.parts, "per_source": per, "tokens_dropped": sum(self.n_pending.values())}


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
    """Consecutive (file, row groups) runs: the fewest chunks of at most about ``chunk_bytes``
    uncompressed bytes, all of about the same size (a row group goes to the chunk its middle byte
    falls in). Equal sizes, not ``chunk_bytes`` each and a short rest: the actors take chunks in
    turn, so a pool finishes when its fullest actor does -- at 50x the shared corpus, nine 128 MiB
    chunks and one of 24 MiB left one of two actors idle for most of a chunk's ~37 s."""
    import pyarrow.parquet as pq

    groups: list[tuple[str, int, int]] = []  # (file, row group, uncompressed bytes)
    for f in files:
        md = pq.read_metadata(f)
        names = md.schema.to_arrow_schema().names
        if text_column not in names:
            raise ValueError(f"{f}: no {text_column!r} column (columns: {names})")
        groups += [(str(f), rg, md.row_group(rg).total_byte_size)
                   for rg in range(md.num_row_groups) if md.row_group(rg).num_rows]
    total = sum(g[2] for g in groups)
    n = max(1, math.ceil(total / chunk_bytes))
    chunks: list[list[tuple[str, list[int]]]] = []
    last, before = -1, 0
    for f, rg, size in groups:
        k = min(n - 1, int((before + size / 2) * n // max(total, 1)))
        before += size
        if k != last:  # a new chunk (k only grows; a chunk a huge row group skipped over stays out)
            chunks.append([])
            last = k
        cur = chunks[-1]
        if cur and cur[-1][0] == f:
            cur[-1][1].append(rg)
        else:
            cur.append((f, [rg]))
    return chunks


class ChunkPacker:
    """Tokenizes and packs chunks. Built once per worker (loads the Rust tokenizer from its JSON)."""

    def __init__(self, tokenizer_dir: str, tokenizer_hash: str, parts_dir: str, seq_len: int,
                 shard_tokens: int, text_column: str, source_column: str, batch_size: int,
                 key_column: str = "key", validation_share: float = 0.0, forced_keys: tuple[str, ...] = (),
                 threads: int = 1, encoder: str = "auto", verify_every: int = 64):
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
        self.key_column, self.threshold = key_column, np.uint64(holdout_threshold(validation_share))
        self.split = validation_share > 0
        self.forced = pa.array(sorted(forced_keys), pa.string())
        # both encoders release the GIL: ``threads`` batches are encoded at once (the Rust pool
        # stays off, TOKENIZERS_PARALLELISM=false); results are consumed in batch order, so the
        # output does not depend on the thread count
        self.threads = max(1, min(int(threads), os.cpu_count() or 1))
        # the tiktoken run of the same BPE (polyko.tokenizer.rankbpe): same ids, ~5x the speed; every
        # `verify_every`-th document of a batch is also encoded by the Rust tokenizer and compared
        self.rank, self.verify_every = None, verify_every
        if encoder != "hf":
            from polyko.tokenizer.rankbpe import rank_encoder

            self.rank, why = rank_encoder(tokenizer_dir)
            if self.rank is None and encoder == "rank":
                raise ValueError(f"encoder='rank': tokenizer {tokenizer_dir} does not qualify: {why}")
            assert self.rank is None or self.rank.eos == self.eos, "the two encoders disagree on the eos id"

    def _hf_docs(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """The Rust tokenizer's (ids with eos after each document, tokens per document incl. eos)."""
        ids = [e.ids for e in self.tok.encode_batch_fast(texts, add_special_tokens=False)]
        counts = np.fromiter(map(len, ids), np.int64, len(ids))
        flat = np.fromiter(itertools.chain.from_iterable(ids), self.dtype, int(counts.sum()))
        return np.insert(flat, np.cumsum(counts), np.asarray(self.eos, self.dtype)), counts + 1

    def _encode_docs(self, texts: list[str], rank: bool) -> tuple[np.ndarray, np.ndarray, int]:
        """(ids with eos after each document, tokens per document incl. eos, documents verified)."""
        if not rank:
            return *self._hf_docs(texts), 0
        flat, counts = self.rank.encode_docs(texts)
        flat = flat.astype(self.dtype, copy=False)
        if not self.verify_every:
            return flat, counts, 0
        sample = range(0, len(texts), self.verify_every)
        want, _ = self._hf_docs([texts[i] for i in sample])
        starts = np.cumsum(counts) - counts
        got = np.concatenate([flat[starts[i]:starts[i] + counts[i]] for i in sample])
        if not np.array_equal(got, want):
            bad = next(i for i in sample if not np.array_equal(flat[starts[i]:starts[i] + counts[i]],
                                                               self._hf_docs([texts[i]])[0]))
            raise _RankMismatch(f"the rank encoder differed from the Rust tokenizer on {texts[bad][:60]!r}")
        return flat, counts, len(sample)

    def _encode_batches(self, batches, pool, rank: bool):
        """(batch, UTF-8 bytes of the kept documents, kept row indices, ids with eos after each
        document, tokens per document incl. eos, documents verified) in order; with a ``pool``,
        ``threads`` batches are encoded concurrently (both encoders release the GIL)."""
        def enc(b):
            col = b.column(self.text_column)
            nbytes = pc.fill_null(pc.binary_length(col), 0).to_numpy(zero_copy_only=False)  # UTF-8 bytes
            keep = np.flatnonzero(nbytes > 0)  # null and empty documents are skipped
            texts = col.to_pylist()
            if keep.size < len(texts):
                texts = [texts[i] for i in keep]
            return (b, nbytes[keep], keep, *(self._encode_docs(texts, rank) if keep.size else
                                             (np.zeros(0, self.dtype), np.zeros(0, np.int64), 0)))

        if pool is None:
            yield from map(enc, batches)
            return
        # a window of 2 x threads batches stays submitted while the caller packs the oldest one, so
        # the encoder threads never wait for the (GIL-bound) packing in between; groups of `threads`
        # submitted and drained together left them idle during it (pack wall ~2x its CPU time on
        # 2 cores). Results still come back in batch order.
        from collections import deque

        it = iter(batches)
        window = deque(pool.submit(enc, b) for b in itertools.islice(it, 2 * self.threads))
        while window:
            done = window.popleft().result()
            nxt = next(it, None)
            if nxt is not None:
                window.append(pool.submit(enc, nxt))
            yield done

    def pack(self, index: int, chunk: list[tuple[str, list[int]]]) -> dict[str, Any]:
        """Pack one chunk; with the rank encoder, a sampled difference from the Rust tokenizer re-packs
        the whole chunk with the Rust tokenizer (same output either way, so the retry is invisible but
        for ``encoder`` / ``encoder_note`` in the summary)."""
        if self.rank is None:
            return self._pack_with_pool(index, chunk, False)
        try:
            return self._pack_with_pool(index, chunk, True)
        except _RankMismatch as e:
            return {**self._pack_with_pool(index, chunk, False), "encoder_note": str(e)}

    def _pack_with_pool(self, index: int, chunk: list[tuple[str, list[int]]], rank: bool) -> dict[str, Any]:
        if self.threads == 1:
            return self._pack(index, chunk, None, rank)
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(self.threads, thread_name_prefix="pack-encode") as pool:
            return self._pack(index, chunk, pool, rank)

    def _pack(self, index: int, chunk: list[tuple[str, list[int]]], pool: Any, rank: bool) -> dict[str, Any]:
        import pyarrow.parquet as pq

        out = self.parts_dir / f"chunk-{index:06d}"
        if out.exists():  # a retried task: redo the chunk from scratch
            shutil.rmtree(out)
        out.mkdir(parents=True)
        train = _SourceStreams(out, out.name, self.seq_len, self.rows_per_shard)
        val = _SourceStreams(out / "validation", f"{out.name}/validation", self.seq_len, self.rows_per_shard)
        skipped = verified = 0

        for path, row_groups in chunk:
            pf = pq.ParquetFile(path)
            names = pf.schema_arrow.names
            has_src = self.source_column in names
            cols = [self.text_column] + ([self.source_column] if has_src else [])
            if self.split:
                if self.key_column not in names:
                    raise ValueError(f"{path}: no {self.key_column!r} column to split validation documents by")
                cols.append(self.key_column)
            batches = pf.iter_batches(batch_size=self.batch_size, row_groups=row_groups, columns=cols)
            for batch, nbytes, keep, flat, counts, checked in self._encode_batches(batches, pool, rank):
                skipped += batch.num_rows - keep.size
                verified += checked
                if not keep.size:
                    continue
                # one flat token array for the batch (eos after every document); each group below is
                # a mask over it
                codes, srcs = (_source_codes(batch.column(self.source_column).take(keep)) if has_src
                               else (np.zeros(keep.size, np.int64), ["unknown"]))
                held = np.zeros(keep.size, bool)
                if self.split:
                    kcol = batch.column(self.key_column).take(keep)
                    held = holdout_hashes(kcol) < self.threshold
                    if len(self.forced):
                        held |= pc.is_in(kcol.cast(pa.string()), value_set=self.forced).to_numpy(zero_copy_only=False)
                # group the batch's documents per (split, source), keeping their order
                groups: dict[tuple[bool, str], np.ndarray] = {}
                for g in np.unique(held * len(srcs) + codes):
                    h, c = divmod(int(g), len(srcs))
                    m = (held == bool(h)) & (codes == c)
                    key = (bool(h), srcs[c])
                    groups[key] = m if key not in groups else groups[key] | m
                for (is_held, src), m in sorted(groups.items()):
                    whole = len(groups) == 1
                    sub, n = (flat, counts) if whole else (flat[np.repeat(m, counts)], counts[m])
                    (val if is_held else train).add(src, sub, int(n.size), int(nbytes[m].sum()))
        t, v = train.finish(), val.finish()
        return {"index": index, "files": sorted({p for p, _ in chunk}),
                "encoder": "rank" if rank else "hf", "documents_verified": verified,
                "documents": sum(train.docs.values()), "documents_skipped_empty": skipped,
                "tokens": sum(train.tokens.values()),
                "tokens_dropped": t["tokens_dropped"], "num_sequences": sum(p["num_sequences"] for p in t["parts"]),
                "parts": t["parts"], "per_source": t["per_source"],
                "validation": {"parts": v["parts"], "per_source": v["per_source"], "tokens_dropped": v["tokens_dropped"]}}


class _RankMismatch(Exception):
    """The rank encoder and the Rust tokenizer gave different ids for a sampled document."""


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
        # fewer chunks than CPUs (a corpus under cpus x chunk_bytes): each actor encodes with several
        # threads and reserves as many CPUs (at most one node's), instead of leaving cores idle
        threads = 1
        if workers is None and n < cpus:
            node_cpus = max(int(nd["Resources"].get("CPU", 0)) for nd in ray.nodes() if nd.get("Alive"))
            threads = max(1, min(cpus // n, node_cpus))
        items = [{"index": i, "chunk": json.dumps(c)} for i, c in enumerate(chunks)]
        ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            _PackActor, fn_constructor_kwargs={**kwargs, "threads": threads}, batch_size=1, num_cpus=threads,
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
                key_column: str = "key", validation_dir: str | os.PathLike | None = None,
                validation_share: float = 0.0, validation_min_docs: int = 200,
                workers: int | None = None, ray_address: str | None = None, threads: int = 1,
                encoder: str = "auto", verify_every: int = 64) -> dict[str, Any]:
    """Tokenize ``cleaned_dir`` (Parquet with ``text``/``source``) with ``tokenizer_dir`` and write
    packed ``seq_len`` sequences to ``out_dir``. Returns the manifest (also ``out_dir/manifest.json``).

    ``chunk_bytes``: at most about this many uncompressed Parquet bytes per unit of work (parallelism
    and tail-drop granularity: 128 MiB ~ 40 M tokens); the chunks are of equal size.
    ``shard_tokens``: tokens per shard file (2**26 = 128 MiB of uint16). ``batch_size``: documents per
    encoder call. ``workers``: Ray actors (default: every CPU of the cluster; 0 = in this
    process, no Ray). ``ray_address``: cluster to join when Ray is not initialised yet (else a private
    local one, shut down afterwards).
    ``threads``: encoding threads with ``workers=0`` (with Ray, actors get ``cpus // actors`` threads
    on their own when there are fewer chunks than CPUs). Shards never depend on either.
    ``encoder``: ``"auto"`` (default) encodes with the tiktoken run of the same BPE
    (:mod:`polyko.tokenizer.rankbpe`: identical ids, ~5x faster) when the tokenizer qualifies and with
    the Rust tokenizer otherwise; ``"rank"`` requires it (ValueError naming why not); ``"hf"`` never
    uses it. ``verify_every``: with the rank encoder, every this-many-th document of each batch is
    also encoded by the Rust tokenizer (64: ~1.6 % of documents, ~8 % more encoding CPU); a difference
    re-packs that chunk with the Rust tokenizer and is named in the manifest's ``encoder`` entry
    (0 = no check). Shards are byte-identical whichever encoder ran, so neither is part of ``pack_key``.
    ``validation_share`` (0 = no split; e.g. 0.005): share of documents, chosen by the hash of
    ``key_column``, packed into ``validation_dir`` instead (required then); every source with at least
    ``validation_min_docs`` documents gets at least one (0 = no minimum). The training manifest's
    ``validation`` entry summarises the split.
    """
    from polyko.config import config_hash
    from polyko.tokenizer.bpe import load_tokenizer, tokenizer_hash

    if seq_len < 2:
        raise ValueError(f"seq_len={seq_len} must be >= 2")
    if chunk_bytes < 1 or shard_tokens < seq_len or batch_size < 1:
        raise ValueError("chunk_bytes and batch_size must be >= 1 and shard_tokens >= seq_len")
    if not 0.0 <= validation_share < 1.0:
        raise ValueError(f"validation_share={validation_share} must be in [0, 1)")
    if validation_min_docs < 0:
        raise ValueError(f"validation_min_docs={validation_min_docs} must be >= 0")
    if encoder not in ("auto", "rank", "hf"):
        raise ValueError(f"encoder={encoder!r} must be 'auto', 'rank' or 'hf'")
    if verify_every < 0:
        raise ValueError(f"verify_every={verify_every} must be >= 0 (0 = no check)")
    split = validation_share > 0
    if split and validation_dir is None:
        raise ValueError("validation_share > 0 needs a validation_dir to write the held-out documents to")
    for name, p in (("cleaned_dir", cleaned_dir), ("out_dir", out_dir), ("validation_dir", validation_dir)):
        if p is not None and is_remote(p):
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
    if encoder != "hf":  # decided once here, not per actor
        from polyko.tokenizer.rankbpe import rank_encoder

        qualifies, why = rank_encoder(tokenizer_dir)
        if qualifies is None and encoder == "rank":
            raise ValueError(f"encoder='rank': tokenizer {tokenizer_dir} does not qualify: {why}")
        encoder = "rank" if qualifies is not None else "hf"
    settings = {"seq_len": seq_len, "chunk_bytes": chunk_bytes, "shard_tokens": shard_tokens,
                "text_column": text_column, "source_column": source_column, "layout": PACK_LAYOUT,
                "validation_share": validation_share if split else 0.0,
                **({"key_column": key_column, "validation_min_docs": validation_min_docs} if split else {})}
    key = config_hash({"tokenizer_hash": tok_hash, **settings,
                       "files": [[f.relative_to(root).as_posix(), f.stat().st_size] for f in files]})

    out = Path(out_dir)
    vout = Path(str(validation_dir).removeprefix("file://")) if split else None
    if (out / MANIFEST).is_file():
        m = read_manifest(out)
        if m.get("pack_key") == key and (vout is None or ((vout / MANIFEST).is_file()
                                                          and read_manifest(vout).get("pack_key") == key)):
            return m  # already packed from this very input, tokenizer and settings
        if m.get("pack_key") != key:
            raise ValueError(f"{out} already holds a committed token dataset from other input/tokenizer/settings "
                             f"(pack_key {m.get('pack_key')} != {key}); choose another out_dir or delete it")
    if vout is not None and (vout / MANIFEST).is_file() and read_manifest(vout).get("pack_key") != key:
        raise ValueError(f"{vout} already holds a validation set of another packing "
                         f"(pack_key {read_manifest(vout).get('pack_key')} != {key}); choose another dir or delete it")
    for d in (out, vout):
        if d is None:
            continue
        d.mkdir(parents=True, exist_ok=True)
        (d / MANIFEST).unlink(missing_ok=True)   # re-packed below: a stale commit must not survive
        for stale in [*d.glob("shard-*.bin"), *d.glob("shard-*.bin.tmp")]:  # uncommitted leftovers
            stale.unlink()
    parts_dir = out / PARTS_DIR
    shutil.rmtree(parts_dir, ignore_errors=True)

    chunks = plan_chunks(files, chunk_bytes, text_column)
    forced = (tuple(forced_holdouts(files, key_column, source_column, validation_share, validation_min_docs))
              if split and validation_min_docs > 0 else ())
    kwargs = {"tokenizer_dir": str(Path(tokenizer_dir).resolve()), "tokenizer_hash": tok_hash,
              "parts_dir": str(parts_dir.resolve()), "seq_len": seq_len, "shard_tokens": shard_tokens,
              "text_column": text_column, "source_column": source_column, "batch_size": batch_size,
              "key_column": key_column, "validation_share": validation_share if split else 0.0,
              "forced_keys": forced, "encoder": encoder, "verify_every": verify_every}
    if workers == 0 or not chunks:
        packer = ChunkPacker(**kwargs, threads=threads)
        summaries = [packer.pack(i, c) for i, c in enumerate(chunks)]
    else:
        summaries = _run_ray(chunks, kwargs, workers, ray_address)
    summaries.sort(key=lambda s: s["index"])
    assert [s["index"] for s in summaries] == list(range(len(chunks))), "a chunk is missing"

    common = dict(seq_len=seq_len, dtype=token_dtype(vocab), tokenizer_hash=tok_hash,
                  tokenizer_dir=str(Path(tokenizer_dir).resolve()), vocab_size=vocab, eos_id=eos,
                  eos_token=ENDOFTEXT, source_dir=str(Path(cleaned_dir).resolve()), pack=settings, pack_key=key)
    val_summary = None
    if vout is not None:
        vs = [s["validation"] for s in summaries]
        vshards = _commit_parts(parts_dir, vout, vs)
        vper = _fold_per_source(vs)
        write_manifest(vout, vshards, **common, role="validation", documents=sum(p["documents"] for p in vper.values()),
                       tokens_total=sum(p["tokens"] for p in vper.values()),
                       tokens_dropped=sum(v["tokens_dropped"] for v in vs),
                       rows_per_source={k: p["rows"] for k, p in vper.items()}, per_source=vper)
        val_summary = {"dir": os.path.relpath(vout.resolve(), out.resolve()), "share": validation_share,
                       "min_docs": validation_min_docs, "key_column": key_column, "forced_documents": len(forced),
                       "documents_per_source": {k: p["documents"] for k, p in vper.items()},
                       "rows_per_source": {k: p["rows"] for k, p in vper.items()}}
    for s in summaries:
        s.pop("validation", None)
    enc_summary = {"rank_chunks": sum(s["encoder"] == "rank" for s in summaries),
                   "hf_chunks": sum(s["encoder"] == "hf" for s in summaries),
                   "documents_verified": sum(s["documents_verified"] for s in summaries),
                   "fallbacks": [{"chunk": s["index"], "why": s["encoder_note"]} for s in summaries
                                 if "encoder_note" in s]}
    shards = _commit_parts(parts_dir, out, summaries)
    per = _fold_per_source(summaries)
    for s in summaries:
        s["files"] = [Path(os.path.relpath(f, root)).as_posix() for f in s["files"]]
    shutil.rmtree(parts_dir, ignore_errors=True)
    num_sequences = sum(s["num_sequences"] for s in shards)
    return write_manifest(
        out, shards, **common, role="train",
        documents=sum(s["documents"] for s in summaries),
        documents_skipped_empty=sum(s["documents_skipped_empty"] for s in summaries),
        documents_per_source={k: p["documents"] for k, p in per.items()},
        tokens_total=num_sequences * seq_len, tokens_input=sum(s["tokens"] for s in summaries),
        tokens_dropped=sum(s["tokens_dropped"] for s in summaries),
        tokens_per_source={k: p["tokens_input"] for k, p in per.items()},
        rows_per_source={k: p["rows"] for k, p in per.items()}, per_source=per,
        validation=val_summary, encoder=enc_summary, chunks=summaries)


def _commit_parts(parts_dir: Path, out: Path, summaries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rename the chunks' part files to ``out/shard-NNNNN.bin`` in chunk order; their manifest entries."""
    shards: list[dict[str, Any]] = []
    for s in summaries:
        for p in s.pop("parts"):
            name = shard_name(len(shards))
            os.replace(parts_dir / p["file"], out / name)
            shards.append({"file": name, "num_sequences": p["num_sequences"], "source": p["source"]})
    return shards


def _fold_per_source(summaries: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Sum the chunks' ``per_source`` counts (``bytes`` rounded to whole bytes once, at the end)."""
    acc: dict[str, dict[str, Any]] = {}
    for s in summaries:
        for src, c in s.pop("per_source").items():
            a = acc.setdefault(src, {k: 0 for k in c})
            for k, v in c.items():
                a[k] += v
    for a in acc.values():
        a["bytes"] = int(round(a["bytes"]))
    return dict(sorted(acc.items()))
