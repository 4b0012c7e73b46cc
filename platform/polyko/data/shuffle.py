"""A hash (or range) shuffle of Arrow blocks on Ray core, with a guarantee Ray Data's does not give:
the function run after the shuffle sees ALL rows of every key it is given, however the input was split.

    from polyko.data.shuffle import Blocks
    b = Blocks.from_dataset(ds.materialize())              # object refs of Arrow tables
    out = b.shuffle("key", partitions=64, fn=per_group)    # fn(table holding whole key groups)
    out.to_dataset()                                       # back to a Ray Dataset (no copy)

Why not ``Dataset.repartition(keys=..., sort=True).map_batches(batch_size=None)``: its correctness rests
on every hash partition leaving the shuffle as exactly one block; a future Ray, the disk-based shuffle
or a block-size limit that splits a large partition would silently cut key groups in two (duplicates
survive). Here a map task splits each input block into ``partitions`` pieces by a stable hash of the
key (``num_returns=partitions``) and reduce task ``r`` concatenates every piece of the partitions
``p % reducers == r`` before calling ``fn``: a key group can never be split, whatever the number or
size of the input blocks, and one reduce block may hold several partitions (``fn`` must be
group-local, which every dedup step is). Pieces live in the object store, which spills to disk when
full (``object_spilling_directory``): memory stays bounded by the object store size, not by the
corpus, unlike the hash-shuffle aggregator actors that hold their partitions on the heap.

Cost: one task per input block and one per reducer; ``partitions x blocks`` small objects (keep
``partitions`` in the hundreds). Runs on a CPU: ``python -m pytest -q tests/test_dedup.py -k split``.
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from polyko.data.minhash import int_hashes
from polyko.heap import release_heap


def partition_of(col: pa.ChunkedArray | pa.Array, parts: int) -> np.ndarray:
    """Stable partition id (0..parts-1) of every value: splitmix64 of integers, blake2b of strings/bytes
    (hashed once per distinct value). Same value -> same partition in every process."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    if len(col) == 0:
        return np.zeros(0, np.int64)
    if pa.types.is_integer(col.type):
        return (int_hashes(col) % np.uint64(parts)).astype(np.int64)
    enc = pc.dictionary_encode(col)
    words = [v.encode("utf-8") if isinstance(v, str) else bytes(v) for v in enc.dictionary.to_pylist()]
    h = np.array([int.from_bytes(hashlib.blake2b(w, digest_size=8).digest(), "little") for w in words],
                 dtype=np.uint64)
    return (h % np.uint64(parts)).astype(np.int64)[enc.indices.to_numpy(zero_copy_only=False)]


def load(block: Any, columns: list[str] | None = None) -> pa.Table:
    """A block as an Arrow table: a table (an object ref Ray resolved for the task) or the path (local
    or fsspec URI) of a Parquet file that holds one, of which only ``columns`` are read. File blocks
    keep a large table out of the object store (the dedup key table: ~115 B/doc, 1.3 GB at 11M
    documents, which filled a 2 GB store and spilled) at the cost of a read per task that uses it."""
    if isinstance(block, str):
        import fsspec
        import pyarrow.parquet as pq

        with fsspec.open(block, "rb") as f:
            return pq.read_table(f, columns=columns)
    return block if columns is None else block.select(columns)


def write_block(table: pa.Table, root: str) -> str:
    """Write ``table`` to a new Parquet file under ``root`` (local path or fsspec URI) and return its
    path, which :func:`load` reads back. Names are random: a retried task writes anew, never over a
    file another attempt may still be read from."""
    import uuid

    import fsspec
    import pyarrow.parquet as pq

    path = f"{root.rstrip('/')}/part-{uuid.uuid4().hex}.parquet"
    with fsspec.open(path, "wb", auto_mkdir=True) as f:
        pq.write_table(table, f, compression="none")  # ids and hashes: little to gain, CPU to lose
    return path


class OnDisk:
    """A reduce function whose table goes to a Parquet file under ``root`` (:func:`write_block`)
    instead of the object store: for a table held across later steps, whose store pages would
    otherwise stay resident for the rest of the run (the store's high-water mark)."""

    def __init__(self, fn: Callable, root: str):
        self.fn, self.root = fn, root

    def __call__(self, table: pa.Table) -> str:
        return write_block(self.fn(table), self.root)


def _split_hash(key: str, parts: int, pre: Callable | None, columns: list[str] | None, *tables: Any) -> Any:
    # ``pre`` per input table before they are joined: it may conform each to one schema
    tables = [load(t, columns) for t in tables]
    table = concat([pre(t) for t in tables] if pre is not None else tables)
    del tables
    pid = partition_of(table[key], parts)
    order = np.argsort(pid, kind="stable")
    cuts = np.searchsorted(pid[order], np.arange(parts + 1))
    t = table.take(pa.array(order))
    del table, pid, order
    release_heap()
    out = [t.slice(cuts[p], cuts[p + 1] - cuts[p]) for p in range(parts)]
    return out[0] if parts == 1 else tuple(out)


def _split_range(table: Any, key: str, bounds: pa.Array, pre: Callable | None) -> Any:
    table = load(table)
    if pre is not None:
        table = pre(table)
    t = table.sort_by(key)
    col = t[key].combine_chunks()
    # rows with bounds[i-1] <= key < bounds[i] go to piece i
    cuts = [0] + [int(pc.sum(pc.less(col, b)).as_py() or 0) for b in bounds] + [t.num_rows]
    out = [t.slice(cuts[i], cuts[i + 1] - cuts[i]) for i in range(len(cuts) - 1)]
    return out[0] if len(out) == 1 else tuple(out)


def concat(pieces) -> pa.Table:
    """One table of the pieces of a partition (or of a whole small table; a piece may be a Parquet
    file, see :func:`load`). The blocks of one table can differ in schema details -- an all-null
    column of a block typed null -- so the concatenation is permissive; a piece without columns (a
    block of a map that emitted nothing) is skipped."""
    pieces = [load(p) for p in pieces]
    with_cols = [p for p in pieces if p.num_columns] or pieces[:1]
    return pa.concat_tables(with_cols, promote_options="permissive") if len(with_cols) > 1 else with_cols[0]


def _reduce(fn: Callable | None, *pieces: pa.Table) -> pa.Table:
    t = concat(pieces)
    if fn is None:
        return t
    out = fn(t)
    del t
    release_heap()
    return out


def _apply(fn: Callable, table: Any) -> pa.Table:
    out = fn(load(table))
    release_heap()
    return out


def _stats(table: Any, col: str | None) -> tuple[int, int]:
    table = load(table)
    s = 0
    if col is not None and table.num_rows and col in table.column_names:
        s = int(pc.sum(table[col]).as_py() or 0)
    return table.num_rows, s


def _sample(table: Any, key: str, k: int) -> pa.Array:
    table = load(table, [key])
    col = table[key].combine_chunks()
    if len(col) == 0:
        return col
    col = col.take(pc.array_sort_indices(col))
    return col.take(pa.array(np.unique(np.linspace(0, len(col) - 1, min(k, len(col))).astype(np.int64))))


def _task(fn: Callable, name: str | None, **options: Any) -> Any:
    """``fn`` as a Ray task with ``options``, named ``name`` when given (Ray sets a worker's process
    title to ``ray::<name>`` while it runs the task, so a memory or CPU sample can tell steps apart)."""
    import ray

    if name:
        options["name"] = name
    return ray.remote(fn).options(**options) if options else ray.remote(fn)


class Blocks:
    """An ordered list of blocks: object refs of Arrow tables, or paths of Parquet files holding one
    (:func:`load`; e.g. a table written by a Ray Data map). Built eagerly: every method submits its
    tasks at once and returns new refs; Ray runs them as their inputs appear."""

    def __init__(self, refs: list) -> None:
        self.refs = list(refs)

    @classmethod
    def from_dataset(cls, ds: Any) -> "Blocks":
        return cls(ds.materialize().to_arrow_refs())

    def to_dataset(self) -> Any:
        import ray.data

        return ray.data.from_arrow_refs(self.refs)

    def map(self, fn: Callable, name: str | None = None) -> "Blocks":
        task = _task(_apply, name)
        return Blocks([task.remote(fn, r) for r in self.refs])

    def union(self, other: "Blocks") -> "Blocks":
        return Blocks(self.refs + other.refs)

    def gather(self, fn: Callable | None = None, name: str | None = None) -> "Blocks":
        """Everything in ONE task (``fn`` over the concatenation): for small tables only."""
        if not self.refs:
            raise ValueError("gather of no blocks")
        return Blocks([_task(_reduce, name).remote(fn, *self.refs)])

    def shuffle(self, key: str, partitions: int, fn: Callable | None = None, *, reducers: int = 0,
                pre: Callable | None = None, group: int = 1, name: str | None = None,
                columns: list[str] | None = None) -> "Blocks":
        """Hash-partition on ``key`` and run ``fn`` once per reducer over whole key groups.
        ``pre`` runs in the map task before the split (e.g. conform a schema). ``group``: input blocks
        per map task. A map task returns ``partitions`` pieces, so many small input blocks make
        ``blocks x partitions`` tiny pieces, and Ray keeps every task return under 100 KB
        (``max_direct_call_object_size``) in the OWNER's heap -- the driver's -- not in the object
        store: grouping blocks so a piece is ~100s of KB keeps the shuffle's data in the store
        (which spills) and the driver's memory and bookkeeping flat as the corpus grows. ``name``
        names the tasks ``<name>/map`` and ``<name>/reduce`` (process titles, Ray's task list);
        ``columns``: the only columns a map task reads of a Parquet-file block."""
        assert partitions >= 1 and group >= 1
        reducers = min(reducers or partitions, partitions)
        split = _task(_split_hash, name and f"{name}/map", num_returns=partitions)
        pieces = [split.remote(key, partitions, pre, columns, *self.refs[i:i + group])
                  for i in range(0, len(self.refs), group)]
        if partitions == 1:
            pieces = [[p] for p in pieces]
        red = _task(_reduce, name and f"{name}/reduce")
        return Blocks([red.remote(fn, *[pcs[p] for pcs in pieces for p in range(r, partitions, reducers)])
                       for r in range(reducers)] if pieces else [])

    def range_shuffle(self, key: str, rows_per_block: int, name: str | None = None) -> tuple["Blocks", list]:
        """Sort by ``key`` into blocks of about ``rows_per_block`` rows with disjoint key ranges;
        returns (blocks, [(lo, hi)] per block, None for an empty one). Boundaries come from a sample."""
        import ray

        n = self.count()
        chunks = max(1, -(-n // rows_per_block))
        if not self.refs:
            return Blocks([]), []
        if chunks > 1:
            sample = pa.concat_arrays([s for s in ray.get([ray.remote(_sample).remote(r, key, 64 * chunks)
                                                           for r in self.refs]) if len(s)])
            sample = sample.take(pc.array_sort_indices(sample))
            idx = np.unique((np.arange(1, chunks) * len(sample)) // chunks)
            bounds = pc.unique(sample.take(pa.array(idx)))
        else:
            bounds = pa.array([], self._type(key))
        parts = len(bounds) + 1
        split = _task(_split_range, name and f"{name}/map", num_returns=parts)
        pieces = [split.remote(r, key, bounds, None) for r in self.refs]
        if parts == 1:
            pieces = [[p] for p in pieces]
        red = _task(_reduce, name and f"{name}/reduce")
        out = Blocks([red.remote(lambda t: t.sort_by(key), *[pcs[p] for pcs in pieces]) for p in range(parts)])
        ranges = ray.get([ray.remote(_min_max).remote(r, key) for r in out.refs])
        return out, ranges

    def _type(self, key: str) -> pa.DataType:
        import ray

        return ray.get(ray.remote(lambda t: t.schema.field(key).type).remote(self.refs[0]))

    def count(self) -> int:
        return self.count_sum(None)[0]

    def count_sum(self, col: str | None) -> tuple[int, int]:
        """(rows, sum of ``col``) over all blocks; only two numbers per block reach the driver."""
        import ray

        res = ray.get([ray.remote(_stats).remote(r, col) for r in self.refs])
        return sum(n for n, _ in res), sum(s for _, s in res)


def _min_max(table: Any, key: str) -> tuple | None:
    table = load(table, [key])
    if table.num_rows == 0:
        return None
    mm = pc.min_max(table[key])
    return mm["min"].as_py(), mm["max"].as_py()
