"""Corpus-wide deduplication on Ray: exact (canonical-text hash) and near-duplicate (MinHash LSH).

    from polyko.data.dedup import DedupConfig, deduplicate
    kept, removed = deduplicate(ds, DedupConfig(threshold=0.8))

``kept`` holds the input rows (all columns) minus the duplicates; ``removed`` holds one row per dropped
document: ``id``, ``source`` (when the input has one), ``dup_of`` (the id of the KEPT document it
duplicates) and ``kind`` (``"exact"`` or ``"near"``). This module is the driver; the maths live in
:mod:`polyko.data.minhash` (signatures, LSH bands, canonical forms), :mod:`polyko.data.components`
(connected components) and :mod:`polyko.data.shuffle` (the shuffle every distributed step uses).

How it scales (nothing of corpus size ever reaches the driver, and the TEXT is never shuffled):

1. keys      one Ray Data map over the corpus: per document a 128-bit blake2b hash of the exact canonical
             text and the LSH band hashes of its MinHash signature (the signature itself is not kept:
             512 B/doc at num_perm=128, 5x the rest). The key table is ~(id + source + 16 + 8*bands)
             bytes/doc, ~115 B; it is held once, in the corpus's block order, and never shuffled whole:
             with ``keys_dir`` (the pipeline's choice) as a Parquet file per block that the tasks
             using it read (only the columns they need: one column per band, so a bucket round
             reads its own bands), else in the object store.
2. exact     shuffle (id, hash, source) by hash; in each hash run the smallest id is the representative.
             The (id, representative, source) table is held until 6: under ``keys_dir`` when given.
3. buckets   map tasks over the key table drop the exact duplicates (a range-chunked anti-join as in 7)
             and explode the representatives' band hashes; shuffle by bucket; every bucket with >1
             member gives star edges (smallest id, other) -- the text-dedup / NeMo Curator recipe.
             The bands go in rounds of at most ``bucket_round_bytes`` (a round starts when the
             previous one is done), so the store holds one round's pieces, not 16 B x bands per doc.
4. verify    (optional) drop candidate pairs whose similarity is below ``threshold``: ``"minhash"``
             compares the full signatures (estimated Jaccard, std ~ sqrt(J(1-J)/num_perm) = 0.035 at
             J=0.8, num_perm=128), recomputed for the candidate pairs' ends only by a range-chunked
             semi-join over the corpus (one more read of it; MinHash over ~1-3 % of the documents on the
             shared corpus), then two shuffles of (edges + ends' signatures); ``"jaccard"`` computes the
             true shingle Jaccard (exact; two shuffles of the candidates' texts), ``"none"`` keeps every
             LSH candidate. Joins are reduce-side joins (both tables hash-partitioned on the key).
5. components connected components of the verified edges; every document in a component points to the
             component's smallest id. Up to ``cc_local_max_edges`` edges in ONE task (scipy, see
             :mod:`polyko.data.components`); beyond it, large-star / small-star rounds (two shuffles
             of the edge list per round, O(log n) rounds). Trade-off: components can chain A~B~C with
             A,C below the threshold (standard for LSH dedup); star edges after verification can also
             miss B~C when both only met A in a bucket and A fails verification (a little recall,
             never precision).
6. resolve   shuffle (id, representative, source) + component roots by representative -> ``removed``;
             submitted once the roots exist, so its pieces never share the store with the joins'.
7. kept      a RANGE-partitioned broadcast anti-join: the removed ids are range-partitioned into sorted
             chunks of ``drop_chunk_rows`` (8-16 MB) with known [lo, hi]; each map task over the corpus
             fetches only the chunks overlapping its block's id range. The pipeline's ids are
             (file, offset) keys, so a block spans one narrow range and fetches one or two chunks:
             memory per task is bounded whatever the corpus size, and the corpus is read once, in
             order, never shuffled (the earlier reduce-side anti-join shuffled every text).

Every shuffle of steps 2-6 is :class:`polyko.data.shuffle.Blocks` (Ray core tasks, pieces in the
object store, spilled to disk when it is full): a key group can never be split across reduce calls,
whatever the block sizes -- ``tests/test_dedup.py`` forces many small blocks per partition and several
partitions per reduce block and gets exactly the single-process reference. Each shuffle's partition
count follows the bytes it moves (~16 MB per partition), so a reduce task's heap is bounded.

Small corpora (up to ``local_max_docs`` documents, default 500k, i.e. a key table of ~65 MB) skip
every shuffle: steps 2-3 run as ONE Ray task over the (materialised, text-free) key table and 4-6 as a
second one after the ends' signatures are recomputed, with the very same per-partition functions
(results are identical: the tests run both paths against the same single-process reference).
``verify="jaccard"`` needs the texts and always takes the distributed path.

Determinism: which copy survives never depends on block order, partition count or worker count:
exact clusters keep their smallest id, near clusters their smallest id (ids compare as Arrow sorts
them: numbers numerically, strings by code point). Ids must be unique (the pipeline's (file, offset)
keys are by construction); the one-task path checks and raises ValueError on a repeated id.

Runs on a CPU laptop: ``python -m pytest -q tests/test_dedup.py`` (private 2-CPU Ray cluster).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from polyko.data.components import (components_local, encode as _encode, large_star, large_star_in,
                                    np_col as _np, run_starts as _run_starts, small_star, small_star_in)
from polyko.data.minhash import (MinHasher, exact_canonical, exact_key, jaccard, near_canonical,  # noqa: F401
                                 optimal_bands, shingles)
from polyko.data.shuffle import Blocks, OnDisk, concat, write_block
from polyko.heap import release_heap

if TYPE_CHECKING:  # pragma: no cover
    import ray.data

log = logging.getLogger(__name__)

VERIFY_MODES = ("none", "minhash", "jaccard")
# Reserved column name (the input must not use it).
_K = "_dedup_k"



@dataclass
class DedupConfig:
    """What counts as a duplicate and how the work is split. Defaults follow common LLM-corpus practice
    (Polyglot-Ko / GPT-NeoX Pile dedup used MinHash LSH at Jaccard ~0.8)."""

    exact: bool = True                # drop documents whose canonical (whitespace-collapsed) text repeats
    near: bool = True                 # drop MinHash-LSH near duplicates of the exact survivors
    threshold: float = 0.8            # Jaccard similarity of character-ngram shingle sets counted as duplicate
    ngram: int = 5                    # shingle size in characters (syllable blocks for Korean; see module doc)
    num_perm: int = 128               # MinHash permutations: estimate std sqrt(J(1-J)/num_perm), cost linear
    seed: int = 42                    # draws the permutations; same seed -> same signatures everywhere
    bands: int = 0                    # LSH bands; 0 = derive (bands, rows) with optimal_bands(threshold, num_perm)
    rows: int = 0                     # rows per band; set together with bands (bands * rows <= num_perm)
    false_positive_weight: float = 0.5  # weights of the FP / FN areas optimal_bands minimises
    verify: str = "minhash"           # "none" | "minhash" (full-signature estimate) | "jaccard" (true; 2 text shuffles)
    ignore_spaces: bool = True        # near dedup: shingle the text with all whitespace removed (Korean spacing varies)
    num_partitions: int = 0           # shuffle partitions; 0 = per shuffle max(cluster CPUs, MB it moves / 16)
    map_bytes: int = 16 << 20         # input per shuffle map task (bytes it moves): small blocks are grouped up to it,
                                      # or to partitions x 256 KB when more (a piece is ~1/partitions of it; Ray keeps
                                      # one < 100 KB in the driver's heap, not the object store); 0 = one per block
    cc_local_max_edges: int = 20_000_000  # components in ONE task up to this many edges (~40 B/edge), else distributed
    local_max_docs: int = 500_000     # dedup in one task (two with verify="minhash") up to this many docs
                                      # (~0.8 KB/doc of task heap: 1.1 GB at 1.39M docs), else shuffles; 0 = always shuffle
    reducers: int = 0                 # tasks per shuffle (each takes partitions p % reducers); 0 = num_partitions
    drop_chunk_rows: int = 1_000_000  # removed ids per range chunk of the kept filter (8-16 MB each)
    bucket_round_bytes: int = 256 << 20  # (bucket, id) bytes one bucket-shuffle round moves: beyond it the
                                      # bands are shuffled in rounds, one after the other, so the object store
                                      # holds one round's pieces (9 bands x 16 B/doc: 1.6 GB at 11M docs)

    def __post_init__(self):
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"DedupConfig.threshold must be in (0, 1), got {self.threshold}")
        if self.ngram < 1:
            raise ValueError(f"DedupConfig.ngram must be >= 1, got {self.ngram}")
        if self.num_perm < 2:
            raise ValueError(f"DedupConfig.num_perm must be >= 2, got {self.num_perm}")
        if self.verify not in VERIFY_MODES:
            raise ValueError(f"DedupConfig.verify must be one of {VERIFY_MODES}, got {self.verify!r}")
        if (self.bands > 0) != (self.rows > 0):
            raise ValueError("DedupConfig.bands and DedupConfig.rows must be set together (or both 0 = derive)")
        if self.bands * self.rows > self.num_perm:
            raise ValueError(f"DedupConfig.bands * rows = {self.bands * self.rows} exceeds num_perm = {self.num_perm}")
        if not 0.0 <= self.false_positive_weight <= 1.0:
            raise ValueError("DedupConfig.false_positive_weight must be in [0, 1]")
        if min(self.num_partitions, self.cc_local_max_edges, self.local_max_docs, self.reducers, self.map_bytes,
               self.bucket_round_bytes) < 0:
            raise ValueError("DedupConfig.num_partitions, cc_local_max_edges, local_max_docs, reducers, map_bytes "
                             "and bucket_round_bytes must be >= 0")
        if self.drop_chunk_rows < 1:
            raise ValueError("DedupConfig.drop_chunk_rows must be >= 1")

    def band_rows(self) -> tuple[int, int]:
        """(bands, rows) used for LSH."""
        if self.bands:
            return self.bands, self.rows
        return optimal_bands(self.threshold, self.num_perm, self.false_positive_weight)

    def hasher(self) -> "MinHasher":
        b, r = self.band_rows()
        return MinHasher(num_perm=self.num_perm, ngram=self.ngram, seed=self.seed, bands=b, rows=r,
                         ignore_spaces=self.ignore_spaces)



class _KeysFn:
    def __init__(self, cfg: DedupConfig, text_column: str, id_column: str, source_column: str | None):
        self.cfg, self.text, self.id, self.source = cfg, text_column, id_column, source_column
        self.hasher = cfg.hasher() if cfg.near else None  # ~4 KB of numpy state, shipped with the task

    def __call__(self, block: pa.Table, rows: int = 4096) -> pa.Table:
        # slices of ``rows`` documents bound the MinHash work arrays (~100 B per character) whatever
        # the block size
        out = (self._keys(block) if block.num_rows <= rows else
               pa.concat_tables([self._keys(block.slice(i, rows)) for i in range(0, block.num_rows, rows)]))
        release_heap()
        return out

    def _keys(self, batch: pa.Table) -> pa.Table:
        texts = batch[self.text].to_pylist()
        if any(t is None for t in texts):
            raise ValueError(f"deduplicate: column {self.text!r} has null values; drop or fill them first")
        cols = {"id": batch[self.id]}
        if self.source:
            # dictionary-encoded: every shuffle that carries it moves a 4-byte index, not the name (at
            # 11M documents ~220 MB less in the object store while the representatives are held)
            cols["source"] = pc.dictionary_encode(batch[self.source])
        digests = np.frombuffer(b"".join(exact_key(t) for t in texts), dtype=np.uint64).reshape(-1, 2)
        cols["_xk0"], cols["_xk1"] = pa.array(digests[:, 0]), pa.array(digests[:, 1])
        if self.hasher is not None:
            # the bands read the first bands * rows permutations only; the full signature of a
            # candidate pair's end is recomputed for verification (:class:`_EndSigs`)
            sig, ok = self.hasher.signatures(texts, self.hasher.bands * self.hasher.rows)
            bands = self.hasher.band_hashes(sig)
            cols["_ok"] = pa.array(ok)
            # one flat column per band, not one list column: a bucket-shuffle round reads only its
            # own bands' columns of the Parquet key table (a list column is read whole, with its
            # repetition levels, in every round)
            cols.update((name, pa.array(bands[:, j])) for j, name in enumerate(_band_columns(self.hasher.bands)))
            # no signatures (512 B/doc, 5x the rest of the row): verification recomputes them for the
            # candidate pairs' ends only (:class:`_EndSigs`)
        return pa.table(cols)


class _WriteBlock:
    """Writes each block to its own Parquet file under ``root`` and returns one row (``path``,
    ``rows``, ``bytes`` in memory) per block: a table that then lives on disk, not in the object store
    (:func:`polyko.data.shuffle.load` reads it back)."""

    def __init__(self, root: str):
        self.root = root

    def __call__(self, block: pa.Table) -> pa.Table:
        path = write_block(block, self.root) if block.num_rows else ""
        return pa.table({"path": [path], "rows": [block.num_rows], "bytes": [block.nbytes]})


class _EndSigs:
    """(id, _sig) of the corpus documents whose id is in the range chunks of the candidate pairs' ends:
    a map-side semi-join over the corpus (each block fetches the one or two chunks overlapping its id
    range) that recomputes those documents' MinHash signatures -- the same deterministic function
    as the key map, so the values are identical. Costs one more read of the corpus and MinHash over
    the ends only (~1-3 % of documents on the shared corpus), instead of carrying 512 B/doc of
    signatures in the key table through every step."""

    def __init__(self, cfg: DedupConfig, chunks: list, text_column: str, id_column: str):
        self.chunks, self.text, self.id, self.num_perm = chunks, text_column, id_column, cfg.num_perm
        self.hasher = cfg.hasher()

    def __call__(self, block: pa.Table, rows: int = 4096) -> pa.Table:
        want = _overlapping_ids(self.chunks, block[self.id])
        block = block.slice(0, 0) if want is None else block.filter(pc.is_in(block[self.id], value_set=want))
        sig = [self.hasher.signatures(block[self.text].slice(i, rows).to_pylist())[0]
               for i in range(0, block.num_rows, rows)]
        sig = np.concatenate(sig) if sig else np.zeros((0, self.num_perm), np.uint32)
        out = pa.table({"id": block[self.id], "_sig": _sig_array(sig)})
        release_heap()
        return out


def _sig_array(sig: np.ndarray) -> pa.Array:
    """Signatures [n, num_perm] as a variable-size ``list<uint32>`` column. Not a fixed-size list: the
    reduce-side joins give the other side's rows a null ``_sig``, and a null fixed-size list still
    allocates num_perm values (512 B a row: every edge row of the join shuffles carried one, 20x the
    rest of the row); a null variable-size list costs its 4-byte offset."""
    n, k = sig.shape
    offsets = pa.array(np.arange(0, n * k + 1, k, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(sig.reshape(-1)))


def _end_signatures(ds, cfg: DedupConfig, ends: list, text_column: str, id_column: str) -> tuple["Blocks", int]:
    """(blocks of (id, _sig) of the candidate pairs' ends, their bytes)."""
    # batch_size=None: whole blocks (see the key map in :func:`deduplicate`)
    sigs = ds.select_columns([id_column, text_column]).map_batches(
        _EndSigs(cfg, ends, text_column, id_column), batch_format="pyarrow", batch_size=None,
        zero_copy_batch=True).materialize()
    return Blocks(sigs.to_arrow_refs()), sigs.size_bytes()


def _mark_exact(block: pa.Table) -> pa.Table:
    """Within each exact-hash run the smallest id is the representative; adds ``_rep``. Only the three
    key columns are sorted (as indices) and the block keeps its row order, so its other columns (the
    512 B/doc signatures among them) are never copied."""
    n = block.num_rows
    if n == 0:
        return block.append_column("_rep", block["id"])
    order = _np(pc.sort_indices(block.select(["_xk0", "_xk1", "id"]),
                                sort_keys=[("_xk0", "ascending"), ("_xk1", "ascending"), ("id", "ascending")]))
    new = _run_starts(_np(block["_xk0"])[order], _np(block["_xk1"])[order])
    rep_row = np.empty(n, np.int64)
    rep_row[order] = order[np.flatnonzero(new)][np.cumsum(new) - 1]  # sorted run -> its first row, in place
    return block.append_column("_rep", block["id"].take(pa.array(rep_row)))


def _no_exact(block: pa.Table) -> pa.Table:
    return block.append_column("_rep", block["id"])


def _band_columns(bands: int, sel: list[int] | None = None) -> list[str]:
    """The key table's band-hash columns (uint64 each): all ``bands`` of them, or those of ``sel``."""
    return [f"_b{j}" for j in (range(bands) if sel is None else sel)]


class _Explode:
    """(bucket, id) rows of the documents with shingles, for every band or the bands ``sel``.
    ``columns``: the key-table columns it reads (callers select them before filtering or loading)."""

    def __init__(self, bands: int, sel: list[int] | None = None):
        self.bands = _band_columns(bands, sel)
        self.columns = ["id", "_ok"] + self.bands

    def __call__(self, block: pa.Table) -> pa.Table:
        block = block.filter(block["_ok"])
        # document-major, band-minor (the order does not matter: the reduce side sorts by bucket)
        flat = np.stack([_np(block[c]) for c in self.bands], axis=1).reshape(-1)
        idx = np.repeat(np.arange(block.num_rows), len(self.bands))
        return pa.table({"_bucket": pa.array(flat, pa.uint64()), "id": block["id"].take(pa.array(idx, pa.int64()))})


def _star_edges(block: pa.Table) -> pa.Table:
    """Every bucket with k > 1 members -> k-1 edges (smallest id, member). Duplicates are removed later."""
    block = block.sort_by([("_bucket", "ascending"), ("id", "ascending")])
    new = _run_starts(_np(block["_bucket"]))
    run = np.cumsum(new) - 1
    first = np.flatnonzero(new)
    keep = ~new
    src = block["id"].take(pa.array(first[run][keep] if len(run) else np.zeros(0, np.int64)))
    dst = block["id"].filter(pa.array(keep))
    return pa.table({"src": src, "dst": dst})


def _attach_fn(key: str, payload: str, out: str, id_type: pa.DataType, payload_type: pa.DataType):
    """Reduce-side join step: the block holds edge rows (``src``/``dst`` set) and table rows (``id`` and
    ``payload`` set), partitioned on ``_dedup_k``; copies the payload of each edge's ``key`` end into
    ``out`` and drops duplicate edges (equal src and dst share the partition of their key)."""

    def attach(block: pa.Table) -> pa.Table:
        names = block.column_names
        if "src" not in names:  # partition without edges
            cols = {"src": pa.array([], id_type), "dst": pa.array([], id_type)}
            if out == "_p_dst":
                cols["_p_src"] = pa.array([], payload_type)
            cols[out] = pa.array([], payload_type)
            return pa.table(cols)
        is_edge = pc.is_valid(block["src"])
        table = block.filter(pc.invert(is_edge))
        edges = block.filter(is_edge).drop_columns([c for c in ("id", payload, _K) if c in names])
        edges = edges.sort_by([("src", "ascending"), ("dst", "ascending")])
        if edges.num_rows:
            keep = _run_starts(*(_encode(edges[c].combine_chunks())[0] for c in ("src", "dst")))
            edges = edges.filter(pa.array(keep))
        idx = pc.index_in(edges[key], value_set=table["id"].combine_chunks())
        assert idx.null_count == 0, "edge endpoint missing from the key table"
        return edges.append_column(out, table[payload].take(idx))

    attach.__name__ = f"attach{out}"
    return attach


class _VerifyFn:
    def __init__(self, cfg: DedupConfig):
        self.cfg = cfg

    def __call__(self, block: pa.Table) -> pa.Table:
        cfg = self.cfg
        if block.num_rows == 0:
            return block.select(["src", "dst"])
        if cfg.verify == "minhash":
            a = _np(pc.list_flatten(block["_p_src"])).reshape(block.num_rows, cfg.num_perm)
            b = _np(pc.list_flatten(block["_p_dst"])).reshape(block.num_rows, cfg.num_perm)
            sim = (a == b).mean(axis=1)
        else:
            sim = np.array([jaccard(x, y, cfg.ngram, cfg.ignore_spaces)
                            for x, y in zip(block["_p_src"].to_pylist(), block["_p_dst"].to_pylist())])
        return block.select(["src", "dst"]).filter(pa.array(sim >= cfg.threshold))


def _local_candidates(cfg: DedupConfig, id_column: str, source: bool, *pieces: pa.Table) -> tuple[pa.Table, pa.Table]:
    """First task of the one-task path (``DedupConfig.local_max_docs`` bounds the key table): exact
    representatives, LSH buckets and star edges over the whole key table -> ((id, _rep[, source]) of
    every document, candidate edges). The same per-partition functions the distributed path runs after
    each shuffle, so both paths give identical results; saves ~5 hash shuffles (each costs seconds of
    scheduling however small the table)."""
    keys = concat(pieces)
    if pc.count_distinct(keys["id"]).as_py() != keys.num_rows:
        counts = pc.value_counts(keys["id"])
        dup = counts.filter(pc.greater(counts.field("counts"), 1))[0]["values"]
        raise ValueError(f"deduplicate: id column {id_column!r} is not unique (e.g. {dup}); "
                         "give every document its own id")
    marked = _mark_exact(keys) if cfg.exact else _no_exact(keys)
    id_type = keys.schema.field("id").type
    edges = pa.table({"src": pa.array([], id_type), "dst": pa.array([], id_type)})
    if cfg.near:
        is_rep = pc.equal(marked["id"], marked["_rep"])
        explode = _Explode(cfg.band_rows()[0])
        edges = _star_edges(explode(marked.select(explode.columns).filter(is_rep)))
    return marked.select(["id", "_rep"] + (["source"] if source else [])), edges


def _local_finish(cfg: DedupConfig, docs: pa.Table, edges: pa.Table, *sig_pieces: pa.Table) -> pa.Table:
    """Second task of the one-task path: MinHash verification of the candidate edges (``sig_pieces``:
    the ends' signatures, :class:`_EndSigs`), components, dup_of resolution -> removed rows."""
    assert cfg.verify != "jaccard", "jaccard verification needs the texts: distributed path"
    id_type = docs.schema.field("id").type
    roots = pa.table({"id": pa.array([], id_type), "_root": pa.array([], id_type)})
    if edges.num_rows and cfg.verify == "minhash":
        sigs = concat(sig_pieces)
        ids = sigs["id"].combine_chunks()
        for end in ("src", "dst"):
            idx = pc.index_in(edges[end], value_set=ids)
            assert idx.null_count == 0, "edge endpoint missing from the key table"
            edges = edges.append_column(f"_p_{end}", sigs["_sig"].take(idx))
        edges = _VerifyFn(cfg)(edges)
    if edges.num_rows:
        roots = components_local(edges)
    return _resolve_tables(docs, roots)


def _resolve(block: pa.Table) -> pa.Table:
    """Partition keyed by representative id: rows of the key table (``_rep`` set) and component roots
    (``_root`` set, keyed by the node id). Emits the removed rows with dup_of = the surviving id."""
    if "_root" in block.column_names:
        has_root = pc.is_valid(block["_root"])
    else:
        has_root = pa.array(np.zeros(block.num_rows, bool))
    return _resolve_tables(block.filter(pc.invert(has_root)), block.filter(has_root))


def _resolve_tables(docs: pa.Table, roots: pa.Table) -> pa.Table:
    """docs (id, _rep[, source]) + roots (id, _root) of the same representatives -> removed rows."""
    root_of_rep = roots["_root"].take(pc.index_in(docs["_rep"], value_set=roots["id"])) if roots.num_rows else \
        pa.nulls(docs.num_rows, docs["_rep"].type)
    is_rep = pc.equal(docs["id"], docs["_rep"])
    near_removed = pc.and_(is_rep, pc.is_valid(root_of_rep))
    removed = pc.or_(pc.invert(is_rep), near_removed)
    dup_of = pc.coalesce(root_of_rep, docs["_rep"])
    kind = pc.if_else(near_removed, pa.scalar("near"), pa.scalar("exact"))
    cols = {"id": docs["id"]}
    if "source" in docs.column_names:  # back to plain strings: blocks carry differing dictionaries
        cols["source"] = docs["source"].cast(pa.string())
    cols.update(dup_of=dup_of, kind=kind)
    return pa.table(cols).filter(removed)


class _JoinSide:
    """``pre`` of a reduce-side join shuffle, run in its map tasks: adds the join key ``_dedup_k`` --
    the ``key`` column of a block that has ``marker`` (one side of the join), else its ``id`` (the
    other side) -- and gives the block exactly the union ``schema`` (missing columns as nulls): the
    shuffle concatenates a partition's pieces with ``pa.concat_tables``, which needs one schema.
    (A map task per block to add the key cost ~2,000 tiny tasks per join at 11M documents.)"""

    def __init__(self, a: pa.Schema, b: pa.Schema, marker: str, key: str):
        self.schema = pa.unify_schemas([a, b]).append(pa.field(_K, a.field(key).type))
        self.marker, self.key = marker, key

    def __call__(self, block: pa.Table) -> pa.Table:
        block = block.append_column(_K, block[self.key if self.marker in block.column_names else "id"])
        cols = [block[f.name].cast(f.type) if f.name in block.column_names else pa.nulls(block.num_rows, f.type)
                for f in self.schema]
        return pa.Table.from_arrays(cols, schema=self.schema)


def _schema(ds) -> pa.Schema:
    s = ds.schema()
    return s.base_schema if hasattr(s, "base_schema") else s


def _overlapping_ids(chunks: list, col: pa.ChunkedArray | pa.Array) -> pa.Array | None:
    """The ids of the range chunks ``[(lo, hi, ref)]`` that overlap the [min, max] of ``col`` (None: no
    overlap or nothing in them). A block of the pipeline's (file, offset) keys spans one narrow range,
    so it fetches one or two chunks whatever the corpus size."""
    import ray

    if not len(col) or not chunks:
        return None
    mm = pc.min_max(col)
    lo, hi = mm["min"].as_py(), mm["max"].as_py()
    refs = [r for a, b, r in chunks if a <= hi and b >= lo]
    # only the chunk ids inside the block's [lo, hi] can match: cut them out first (a vectorised
    # range test, ~1 ms per 1M ids) so the hash set is_in builds holds a handful, not the chunk:
    # while the whole corpus removes fewer than drop_chunk_rows ids, ONE chunk spans every key and
    # each block built a 1M-entry set (0.1 CPU-s), so the joins grew with blocks x removed ids
    # (quadratic: 25x the CPU from 10x to 50x of the shared corpus)
    got = []
    for t in ray.get(refs):
        ids = t["id"]
        if len(ids):
            ids = ids.filter(pc.and_(pc.greater_equal(ids, mm["min"]), pc.less_equal(ids, mm["max"])))
            if len(ids):
                got.append(ids)
    return pa.chunked_array(got).combine_chunks() if got else None


class _DropIds:
    """kept = corpus minus the removed ids: a range-partitioned broadcast anti-join. ``chunks`` are
    (lo, hi, ref) of sorted removed-id tables with disjoint ranges; a block fetches only the chunks
    whose range overlaps its own ids (one or two for the pipeline's (file, offset) keys)."""

    def __init__(self, chunks: list, id_column: str, names: list[str]):
        self.chunks, self.id, self.names = chunks, id_column, names

    def __call__(self, block: pa.Table) -> pa.Table:
        drop = _overlapping_ids(self.chunks, block[self.id])
        if drop is not None:
            block = block.filter(pc.invert(pc.is_in(block[self.id], value_set=drop)))
            release_heap()
        return block.select(self.names)


class _RepBands:
    """Map side of the bucket shuffle, straight over the key table: drops the exact duplicates (the
    range chunks of non-representative ids, fetched per block like :class:`_DropIds`) and explodes
    the representatives' band hashes (of the bands ``sel``) to (bucket, id) rows. The key table is
    never copied for this."""

    def __init__(self, chunks: list, bands: int, sel: list[int] | None = None):
        self.chunks, self.explode = chunks, _Explode(bands, sel)
        self.columns = self.explode.columns

    def __call__(self, block: pa.Table) -> pa.Table:
        block = block.select(self.columns)
        drop = _overlapping_ids(self.chunks, block["id"])
        if drop is not None:
            block = block.filter(pc.invert(pc.is_in(block["id"], value_set=drop)))
        return self.explode(block)


def _non_rep_ids(t: pa.Table) -> pa.Table:
    return t.filter(pc.not_equal(t["id"], t["_rep"])).select(["id"])


def _end_ids(t: pa.Table) -> pa.Table:
    return pa.table({"id": pc.unique(pa.concat_arrays([t["src"].combine_chunks(), t["dst"].combine_chunks()]))})


def _id_chunks(ids: Blocks, rows: int, name: str) -> list:
    """Range-partition the ids of ``ids`` (an ``id`` column) into sorted chunks: [(lo, hi, ref)]."""
    chunks, ranges = ids.range_shuffle("id", rows, name=name)
    return [(r[0], r[1], ref) for r, ref in zip(ranges, chunks.refs) if r is not None]


def _drop_index(removed: Blocks, rows: int) -> list:
    """Range-partition the removed ids into sorted chunks: [(lo, hi, ref)]."""
    return _id_chunks(removed.map(lambda t: t.select(["id"])), rows, "dedup-removed-ids")


def deduplicate(ds: "ray.data.Dataset", cfg: DedupConfig, *, text_column: str = "text",
                id_column: str = "id", schema: pa.Schema | None = None,
                keys_dir: str | None = None) -> tuple["ray.data.Dataset", "ray.data.Dataset"]:
    """(kept, removed). ``removed`` has columns id, source (if the input has it), dup_of (the kept id),
    kind ("exact"|"near") and is materialised (it is small); ``kept`` is lazy, all input columns, in
    the input's order. ``schema``: the input's schema when the caller knows it (a dataset made by a
    ``map_batches`` UDF would otherwise run a block just to find its columns). ``keys_dir``: a
    directory (local path or fsspec URI every node reaches) that the key table is written to as one
    Parquet file per block, read back by the tasks that use it, and so is the distributed path's
    representatives table (~20 B/doc, held from the exact shuffle to the resolution); None holds both
    in the object store (~115 B/doc: 1.3 GB at 11M documents). Files of an earlier call there are
    ignored, not read."""
    import ray

    if not (cfg.exact or cfg.near):
        raise ValueError("DedupConfig: at least one of exact / near must be enabled")
    if schema is None:
        schema = _schema(ds)
    names = schema.names
    for col in (text_column, id_column):
        if col not in names:
            raise ValueError(f"deduplicate: column {col!r} not in dataset columns {names}")
    if _K in names:
        raise ValueError(f"deduplicate: column name {_K!r} is reserved")
    source = "source" if "source" in names else None
    t0 = time.perf_counter()

    # 1. key table (no text)
    # batch_size=None (whole blocks, sliced inside): a fixed batch size makes Ray Data bundle the
    # INPUT rows of the fused read operator up to it, and when those rows are file paths (one per
    # block) that put every file of a small corpus into one task
    keys = ds.select_columns([c for c in (id_column, text_column, source) if c]).map_batches(
        _KeysFn(cfg, text_column, id_column, source), batch_format="pyarrow", batch_size=None,
        zero_copy_batch=True)
    if keys_dir is None:
        keys = keys.materialize()
        n_docs = keys.count()  # metadata of a materialised dataset: free
        key_bytes = keys.size_bytes()
        K = Blocks(keys.to_arrow_refs())
    else:
        import fsspec

        fs, root = fsspec.core.url_to_fs(keys_dir)
        fs.makedirs(root, exist_ok=True)
        # the files come from the tasks' returns, never from listing the directory: a retried task's
        # partial file, or an earlier run's, is never read
        files = keys.map_batches(_WriteBlock(keys_dir), batch_format="pyarrow", batch_size=None).take_all()
        K = Blocks([f["path"] for f in files if f["rows"]])
        n_docs, key_bytes = sum(f["rows"] for f in files), sum(f["bytes"] for f in files)
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))

    def parts_for(nbytes: float) -> int:
        # partitions of each shuffle sized by the bytes IT moves (~16 MB per partition bounds a reduce
        # task's heap: the pieces plus a sort copy), not one count for all: the exact shuffle moves
        # ~30 B/doc, the bucket shuffle 16 B per band, the key table itself ~120 B/doc (no signatures)
        return cfg.num_partitions or max(cpus, math.ceil(nbytes / (16 << 20)))

    def group_for(blocks: int, nbytes: float, partitions: int) -> int:
        return map_group(blocks, nbytes, partitions, cpus, cfg.map_bytes)

    t_keys = time.perf_counter() - t0
    log.info("dedup: keys for %d docs (%.0f MB) in %.1f s (%.0f docs/s)",
             n_docs, key_bytes / 2**20, t_keys, n_docs / max(t_keys, 1e-9))
    id_type = schema.field(id_column).type  # not the key table's: it has none when no document is left
    if n_docs == 0:
        empty = {"id": pa.array([], id_type)}
        if source:
            empty["source"] = pa.array([], pa.string())
        empty.update(dup_of=empty["id"], kind=pa.array([], pa.string()))
        return ds, ray.data.from_arrow(pa.table(empty))

    if n_docs <= cfg.local_max_docs and not (cfg.near and cfg.verify == "jaccard"):
        # 2-6 in two tasks (around the signatures of the candidates' ends): no shuffle at all
        docs_ref, edges_ref = ray.remote(_local_candidates).options(num_returns=2).remote(
            cfg, id_column, bool(source), *K.refs)
        K = keys = None  # the key table is freed once the task ran
        sig_refs = []
        if cfg.near and cfg.verify == "minhash" and Blocks([edges_ref]).count():
            ends = _id_chunks(Blocks([edges_ref]).map(_end_ids), cfg.drop_chunk_rows, "dedup-end-ids")
            sig_refs = _end_signatures(ds, cfg, ends, text_column, id_column)[0].refs
        removed = Blocks([ray.remote(_local_finish).remote(cfg, docs_ref, edges_ref, *sig_refs)])
        log.info("dedup: one-task path over %d docs", n_docs)
    else:
        # handed over in a list and dropped here (with the materialised dataset), so the key table
        # is freed once its first shuffle read it
        box, K, keys = [K], None, None
        removed = _distributed(ds, box, cfg, parts_for, group_for, n_docs, key_bytes, id_type, bool(source),
                               text_column, id_column, schema.field(text_column).type, keys_dir)
    removed_ds = removed.to_dataset()
    n_removed = removed.count()
    log.info("dedup: %d of %d docs removed in %.1f s", n_removed, n_docs, time.perf_counter() - t0)
    chunks = _drop_index(removed, cfg.drop_chunk_rows) if n_removed else []
    kept = ds.map_batches(_DropIds(chunks, id_column, names), batch_format="pyarrow", batch_size=None,
                          zero_copy_batch=True)
    # the driver's own heap: the steps above leave it at its high-water mark (freed, not returned),
    # which then sits beside the kept filter + write, the pipeline's memory peak. At 11.1M documents
    # of the shared corpus: 431 -> 291 MB RSS (about 48 MB of it Python objects)
    release_heap()
    return kept, removed_ds


# Ray keeps a task return under 100 KB (``max_direct_call_object_size``) in its owner's heap -- the
# driver's -- instead of the object store, which spills: shuffle pieces are kept at least this large.
MIN_PIECE_BYTES = 256 << 10


def map_group(blocks: int, nbytes: float, partitions: int, cpus: int, map_bytes: int) -> int:
    """Input blocks per shuffle map task: about ``map_bytes`` of the ``nbytes`` the shuffle moves, and
    enough that each of its ``partitions`` pieces holds ``MIN_PIECE_BYTES`` (at 1.2 TB of corpus the
    exact shuffle has ~1,100 partitions: 16 MB per map task would make ~15 KB pieces, every one in the
    driver's heap), but at least two map tasks per CPU. Blocks can be small (a block per read batch
    of each read task's file): at 11M documents of the shared corpus a map task per block made
    4,500 blocks x 100 partitions of 3 KB pieces (3.0 GB of driver heap; 0.9 GB grouped)."""
    if not map_bytes or blocks <= 2 * cpus:
        return 1
    want = max(map_bytes, partitions * MIN_PIECE_BYTES)
    return max(1, min(int(want * blocks // max(nbytes, 1)), blocks // (2 * cpus)))


def _distributed(ds, key_table: list, cfg: DedupConfig, parts_for, group_for, n_docs: int, key_bytes: int,
                 id_type: pa.DataType, source: bool, text_column: str, id_column: str,
                 text_type: pa.DataType, keys_dir: str | None = None) -> Blocks:
    """Steps 2-6 as shuffles (see the module docstring). ``key_table`` is a one-element list holding the
    key table's Blocks (~130 B/doc: id, source, 128-bit hash, band hashes; no signatures), popped here.
    The key table is held ONCE, in the input's block order, and never shuffled whole: the exact
    shuffle moves only (id, hash, source); the bucket shuffle's map tasks read the band hashes straight
    from it, dropping the exact duplicates by a range-chunked anti-join; verification recomputes the
    signatures of the candidate pairs' ends only (:class:`_EndSigs`). It is released once those map
    tasks are submitted. With ``keys_dir``, the representatives table of step 2 (held until step 6)
    is written under it as well. (Carrying 512 B/doc of signatures through the exact shuffle, the
    representatives and twice through the joins held 2-3 copies of ~620 B/doc at a time: 2 GB of
    object store and 4.7 GB spilled at 1.4M documents.)"""
    import ray

    red = cfg.reducers
    K = key_table.pop()
    per_id = 8 if pa.types.is_integer(id_type) else 32  # bytes per id (strings: a guess for the estimate)
    src_b = 4 if source else 0  # the source's dictionary index

    def shuffle(b: Blocks, name: str, key: str, fn, nbytes: float, pre=None, columns=None) -> Blocks:
        parts = parts_for(nbytes)
        return b.shuffle(key, parts, fn, reducers=red, pre=pre, group=group_for(len(b.refs), nbytes, parts),
                         name=f"dedup-{name}", columns=columns)

    m_schema = pa.schema([("id", id_type), ("_rep", id_type)]
                         + ([("source", pa.dictionary(pa.int32(), pa.string()))] if source else []))
    cols = ["id", "_rep"] + (["source"] if source else [])

    # 2. exact: only id, the 128-bit hash and source travel -> (id, _rep[, source]) for every document;
    # on disk with keys_dir: held from here to step 6, it would sit in the store under every later
    # step's pieces (~20 B/doc, ~220 MB at 11M documents)
    def held(fn: Callable) -> Callable:
        return OnDisk(fn, f"{keys_dir.rstrip('/')}/representatives") if keys_dir else fn

    if cfg.exact:
        xcols = ["id", "_xk0", "_xk1"] + (["source"] if source else [])
        docs_cols = shuffle(K, "exact", "_xk0", held(lambda t: _mark_exact(t).select(cols)),
                            n_docs * (per_id + 16 + src_b), columns=xcols)
    else:
        docs_cols = K.map(held(lambda t: _no_exact(t.select(["id"] + (["source"] if source else []))).select(cols)))

    # 3-5. near: LSH buckets -> candidate edges -> verified -> connected components
    roots = None
    if cfg.near:
        b, _ = cfg.band_rows()
        nonrep = _id_chunks(docs_cols.map(_non_rep_ids), cfg.drop_chunk_rows, "dedup-nonrep-ids") if cfg.exact else []
        # bands in rounds of at most bucket_round_bytes each, a round submitted once the previous one
        # ran: the store holds one round's pieces, not every band's at once
        per_band = n_docs * (8 + per_id)
        rounds = min(b, max(1, math.ceil(b * per_band / cfg.bucket_round_bytes))) if cfg.bucket_round_bytes else 1
        parts = []
        for sel in np.array_split(np.arange(b), rounds):
            if parts:
                ray.wait(parts[-1].refs, num_returns=len(parts[-1].refs), fetch_local=False)
            pre = _RepBands(nonrep, b, sel.tolist())  # reads only this round's band columns
            parts.append(shuffle(K, "buckets", "_bucket", _star_edges, len(sel) * per_band,
                                 pre=pre, columns=pre.columns))
        edges = Blocks([ref for p in parts for ref in p.refs])
        K = None  # every task that reads the key table is submitted: Ray frees it once they ran
        n_candidates = edges.count()
        if cfg.verify != "none" and n_candidates:
            if cfg.verify == "minhash":
                ends = _id_chunks(edges.map(_end_ids), cfg.drop_chunk_rows, "dedup-end-ids")
                table, sig_bytes = _end_signatures(ds, cfg, ends, text_column, id_column)
                payload, payload_type = "_sig", pa.list_(pa.uint32())
                # what the second join moves: each end's signature once, each edge with one signature
                # (star edges share their src: far fewer ends than 2 per edge)
                join_bytes = sig_bytes + n_candidates * (3 * per_id + 4 * cfg.num_perm)
            else:
                sel = ds.select_columns([id_column, text_column])
                if id_column != "id":
                    sel = sel.rename_columns({id_column: "id"})
                table = Blocks.from_dataset(sel)
                payload, payload_type = text_column, text_type
                join_bytes = max(key_bytes, n_candidates * (3 * per_id + 2 * 4 * cfg.num_perm))
            t_schema = pa.schema([("id", id_type), (payload, payload_type)])
            e_schema = pa.schema([("src", id_type), ("dst", id_type)])
            for end in ("src", "dst"):
                edges = shuffle(edges.union(table), f"attach-{end}", _K,
                                _attach_fn(end, payload, f"_p_{end}", id_type, payload_type),
                                join_bytes, pre=_JoinSide(e_schema, t_schema, "src", end))
                e_schema = e_schema.append(pa.field("_p_src", payload_type))
            edges = edges.map(_VerifyFn(cfg), name="dedup-verify")
            del table
        if n_candidates == 0:
            roots = None
        elif n_candidates <= cfg.cc_local_max_edges:
            roots = edges.gather(components_local, name="dedup-components")
        else:
            cc_bytes = n_candidates * 4 * per_id
            cc_parts = parts_for(cc_bytes)
            roots = _components_distributed(edges, cc_parts, red,
                                            group=lambda blocks: group_for(blocks, cc_bytes, cc_parts))
    K = None

    # 6. resolve dup_of to the surviving id
    if roots is None:
        return docs_cols.map(_resolve)
    # submitted once the roots exist: else its map tasks partition the representatives (~20 B/doc)
    # while the joins' pieces still fill the store, and the two add up (the store's high-water mark
    # at 11M documents: 317 -> 657 MB while attach-* and resolve/map ran side by side)
    ray.wait(roots.refs, num_returns=len(roots.refs), fetch_local=False)
    d_schema = pa.schema([m_schema.field(c) for c in cols])
    r_schema = pa.schema([("id", id_type), ("_root", id_type)])
    return shuffle(docs_cols.union(roots), "resolve", _K, _resolve, n_docs * (3 * per_id + src_b),
                   pre=_JoinSide(d_schema, r_schema, "_rep", "_rep"))


def _components_distributed(edges: Blocks, parts: int, reducers: int = 0, max_rounds: int = 100,
                            group: Callable[[int], int] = lambda blocks: 1) -> Blocks:
    """Large-star / small-star rounds until a fixed point (one count per round); returns (id, _root)
    for every non-root node. Rounds are O(log n) (Kiveris et al. 2014). ``group(blocks)``: input
    blocks per map task (:func:`map_group`)."""
    a = edges.map(lambda t: t.select(["src", "dst"]).rename_columns(["u", "v"]))
    for rnd in range(max_rounds):
        b = a.shuffle("u", parts, large_star, reducers=reducers, pre=large_star_in, group=group(len(a.refs)),
                      name="dedup-large-star")
        a = b.shuffle("u", parts, small_star, reducers=reducers, pre=small_star_in, group=group(len(b.refs)),
                      name="dedup-small-star")
        _, chg = a.count_sum("_chg")
        log.info("dedup: components round %d, %d changed edges", rnd, chg)
        a = a.map(lambda t: t.select(["u", "v"]))
        if chg == 0:
            return a.map(lambda t: t.rename_columns(["id", "_root"]))
    raise RuntimeError(f"connected components did not converge in {max_rounds} rounds")
