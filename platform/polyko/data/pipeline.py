"""The corpus pipeline on Ray Data: read -> clean -> dedup -> (pack), streaming and restartable.

    python jobs/prepare_data.py --output work/data                     # bundled sample corpus
    python jobs/prepare_data.py --input corpus/ --input s3://b/more/ --output work/data \\
        --tokenizer work/tokenizer --seq-len 2048 --set dedup.threshold=0.8

Stages (each committed by a marker written last, so a crash never leaves half an output that looks
finished, and a rerun skips what is done):

1. **clean** (``DIR/.stages/clean-<hash>/``): :mod:`polyko.data.io` streams every input file
   (bad records quarantined, never fatal), :func:`polyko.data.clean.clean_text` runs in
   ``map_batches`` on Arrow batches, then :func:`polyko.data.decontam.decontam_batch` checks the kept
   documents against the benchmark n-gram index (``--decontaminate DIR``); every record is written
   once as Parquet with its fate (``kind`` = kept/filter/bad/contaminated, ``reason``, ``bench``, byte
   counts, PII counts). From that: ``DIR/rejected/`` (bad input: file, line, reason, raw bytes),
   ``DIR/contaminated/`` (documents overlapping a benchmark item, with the item named) and the
   per-source counts, computed by the write tasks, never by pulling documents to the driver.
2. **dedup** (``DIR/cleaned/``): :func:`polyko.data.dedup.deduplicate` over the kept documents
   of the whole corpus, keyed by the reader's unique ``key`` (file index + byte offset: inputs whose
   ``id`` fields collide -- every public dataset numbers from 0 or 1 -- are distinct documents);
   the survivors are ``DIR/cleaned/*.parquet`` (``key``, ``id``, ``text``, ``source``).
3. **pack** (``DIR/tokens/``, with a tokenizer): :func:`polyko.data.pack.pack_corpus`, rows of one
   source each. ``validation_share`` (default 0.5%) of the documents, chosen per document by the hash
   of its unique ``key`` (plus one per source of >= ``validation_min_docs`` documents), are held out and
   packed the same way into ``DIR/validation/`` (never into DIR/tokens); its manifest counts rows,
   tokens and covered UTF-8 bytes per source, for bits per byte.

``DIR/stats.json`` gathers documents/bytes in and out, drops per rule and per source, duplicates
(exact/near), contaminated documents per benchmark (also per source), PII masks by kind, bad records
by reason and timings; the MLflow run (experiment
``polyko-data``) logs the counts as metrics and stats.json as an artifact.

Outputs are named by config hash: each output directory holds ``_polyko.json`` with the hash of the
config that made it (written last). Re-running a finished config does nothing; a different config
pointed at a directory holding another config's output is a ``ValueError`` (or, with
``overwrite=True``, replaces it). Memory is bounded by block size: nothing materializes the corpus.
Runs on a laptop CPU (a private local Ray cluster) or joins a cluster with ``ray_address``.
"""

from __future__ import annotations

import json
import logging
import posixpath
import time
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from polyko.config import config_hash, to_dict
from polyko.data.clean import PII_KINDS, CleanConfig, clean_text, fast_decisions
from polyko.data.decontam import DecontamConfig
from polyko.data.dedup import DedupConfig
from polyko.data.io import SCHEMA, ReadConfig, group_splits, list_splits, read_batch
from polyko.data.shards import is_remote
from polyko.heap import release_heap

log = logging.getLogger(__name__)

# Bump when the on-disk layout or the meaning of a stage changes: old outputs then get new hashes.
PIPELINE_VERSION = 2
MARKER = "_polyko.json"
SUCCESS = "_SUCCESS"
STATS = "stats.json"
KINDS = ("kept", "filter", "bad", "contaminated")


@dataclass
class PipelineConfig:
    """One corpus-preparation run. Only ``inputs``/``read``/``clean``/``dedup`` (and, for the tokens,
    ``tokenizer``/``seq_len``) name the outputs; addresses and names do not."""

    output: str = "work/data"
    """Output directory (local path or fsspec URI): cleaned/, rejected/, tokens/, stats.json."""
    inputs: tuple[str, ...] = ()
    """Files, directories (recursive) or URIs. Empty = the bundled sample corpus (quickstart)."""
    tokenizer: str | None = None
    """Tokenizer directory: when set, the cleaned corpus is packed into DIR/tokens."""
    seq_len: int = 2048
    """Tokens per packed sequence (Polyglot-Ko trained at 2048)."""
    validation_share: float = 0.005
    """Share of documents held out (by the hash of their unique key, so per source in expectation)
    and packed into DIR/validation; 0 disables the split."""
    validation_min_docs: int = 200
    """A source with at least this many documents gets at least one validation document (its
    smallest-hash one) even when the share alone would hold out none; 0 = no minimum."""
    pack_encoder: str = "auto"
    """Packing's encoder: ``auto`` = the tiktoken run of the tokenizer's BPE when the tokenizer
    qualifies (identical ids, ~4x less packing CPU; ``polyko.tokenizer.rankbpe``), else the Rust
    tokenizer; ``rank`` = require it; ``hf`` = always the Rust tokenizer. Does not name the output:
    the shards are byte-identical either way."""
    read: ReadConfig = field(default_factory=ReadConfig)
    clean: CleanConfig = field(default_factory=CleanConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    decontam: DecontamConfig = field(default_factory=DecontamConfig)
    rows_per_file: int = 100_000
    """Minimum records per Parquet file of DIR/rejected and DIR/contaminated (few, larger files).
    DIR/cleaned and the intermediate DIR/.stages files hold one file per read task (<=
    ``read.task_bytes`` of input): the unit of parallelism of the dedup and write tasks."""
    keep_intermediate: bool = False
    """Keep DIR/.stages/clean-*/docs (every record with its fate, ~ the corpus size again) after the
    run; needed only to re-dedup without re-cleaning."""
    overwrite: bool = False
    """Replace outputs of a different config in ``output`` instead of refusing."""
    track: bool = True
    """Log an MLflow run (experiment ``polyko-data``)."""
    ray_address: str | None = None
    """Cluster to join (``auto``, ``ray://...``); None starts a private local cluster."""
    run_name: str | None = None
    """MLflow run name (default ``data-<config hash>``)."""

    def __post_init__(self) -> None:
        if isinstance(self.inputs, str):
            self.inputs = (self.inputs,)
        self.inputs = tuple(str(p) for p in self.inputs)
        if self.seq_len <= 0:
            raise ValueError(f"seq_len must be positive, got {self.seq_len}")
        if not self.output:
            raise ValueError("output directory must be set")
        if not 0.0 <= self.validation_share < 1.0:
            raise ValueError(f"validation_share must be in [0, 1), got {self.validation_share}")
        if self.validation_min_docs < 0:
            raise ValueError(f"validation_min_docs must be >= 0, got {self.validation_min_docs}")
        if self.pack_encoder not in ("auto", "rank", "hf"):
            raise ValueError(f"pack_encoder must be 'auto', 'rank' or 'hf', got {self.pack_encoder!r}")


# ----------------------------------------------------------------------------------------------
# Per-batch work (runs in Ray Data tasks)


def clean_batch(t: pa.Table, cfg: CleanConfig) -> pa.Table:
    """``map_batches`` UDF over reader rows: clean good documents, label every row's fate.

    Adds ``kind`` (kept/filter/bad), ``reason`` (rule or bad-input reason; "kept"), ``bytes_out``
    (UTF-8 bytes of the cleaned text) and ``pii_<kind>`` counts; ``text`` becomes the cleaned text
    (null unless kept). :func:`polyko.data.clean.fast_decisions` settles most documents for the whole
    batch (numpy over its code points; ~85 % of the shared corpus), the rest go through ``clean_text``
    one by one, with identical results. A document that makes the cleaner raise is quarantined as
    ``clean_error`` (the batch goes on).
    """
    import numpy as np

    texts = t.column("text").to_pylist()
    is_bad = pc.is_valid(t.column("bad")).to_numpy(zero_copy_only=False)
    n = len(texts)
    # most documents are settled for the whole batch at once (unchanged text, no PII, reason from
    # vectorised counts); the rest go through clean_text one by one. The per-row bookkeeping of the
    # settled ones is numpy too (a Python pass over every row cost ~10 % of the stage).
    decided, fast_reason = fast_decisions([None if b else x for x, b in zip(texts, is_bad)], cfg)
    decided &= ~is_bad
    reason = np.array(["kept"] * n, dtype=object)
    reason[is_bad] = t.column("bad").filter(pa.array(is_bad)).to_numpy(zero_copy_only=False)
    fr = np.array(fast_reason, dtype=object)
    filtered = decided & (fr != None)  # noqa: E711 -- elementwise
    reason[filtered] = fr[filtered]
    kind = np.where(is_bad, "bad", np.where(filtered, "filter", "kept")).astype(object)
    keep_text = decided & ~filtered  # unchanged text, kept
    bytes_out = np.where(keep_text, pc.fill_null(pc.binary_length(t.column("text")), 0).to_numpy(), 0).astype(np.int64)
    out: list[str | None] = [x if k else None for x, k in zip(texts, keep_text)]
    pii = {k: np.zeros(n, np.int64) for k in PII_KINDS}
    for i in np.flatnonzero(~decided & ~is_bad).tolist():
        try:
            r = clean_text(texts[i], cfg)
            if r.text is not None:
                b_out = len(r.text.encode("utf-8"))
        except Exception as e:  # noqa: BLE001 -- one record's failure is quarantined, never fatal
            kind[i], reason[i] = "bad", "clean_error"
            log.warning("clean_text failed on one document (quarantined): %s: %s", type(e).__name__, e)
            continue
        if r.text is None:
            kind[i], reason[i] = "filter", r.reason or "unknown"
            continue
        out[i] = r.text
        bytes_out[i] = b_out
        for k, c in r.pii.items():
            pii[k][i] = c
    t = t.set_column(t.schema.get_field_index("text"), "text", pa.array(out, pa.string()))
    t = t.append_column("kind", pa.array(kind.tolist(), pa.string()))
    t = t.append_column("reason", pa.array(reason.tolist(), pa.string()))
    t = t.append_column("bytes_out", pa.array(bytes_out, pa.int64()))
    for k in PII_KINDS:
        t = t.append_column(f"pii_{k}", pa.array(pii[k], pa.int64()))
    release_heap()
    return t


def _count_batch(t: pa.Table, keys: list[str], sums: list[str], count: bool = True) -> pa.Table:
    """Per-block partial counts: one small row per group (the distributed half of the stats);
    ``count=False`` re-aggregates partial rows (``n`` is then one of ``sums``)."""
    # use_threads=False: Acero's thread pool raises "thread index N is out of range" when called from
    # the extra threads Ray Data runs write tasks in (and a block's groups are few anyway)
    g = t.group_by(keys, use_threads=False).aggregate([(c, "sum") for c in sums] + ([(keys[0], "count")] if count else []))
    return g.rename_columns(_names(g, keys, sums))


def _names(g: pa.Table, keys: list[str], sums: list[str]) -> list[str]:
    # pyarrow names aggregates "<col>_<fn>"; map back to plain names
    out = []
    for name in g.column_names:
        if name.endswith("_sum") and name[:-4] in sums:
            out.append(name[:-4])
        elif name.endswith("_count"):
            out.append("n")
        else:
            out.append(name)
    return out


def _keep_bad(t: pa.Table) -> pa.Table:
    return t.filter(pc.equal(t.column("kind"), "bad")).select(
        ["file", "line", "offset", "reason", "detail", "bytes_in", "key", "id", "source", "raw"])


CONTAMINATED_COLUMNS = ["bench", "bench_item", "bench_field", "bench_overlap", "kind", "key", "id", "source",
                        "file", "line", "text"]


def _keep_contaminated(t: pa.Table) -> pa.Table:
    return t.filter(pc.is_valid(t.column("bench"))).select(CONTAMINATED_COLUMNS)


def read_docs_batch(batch: dict[str, Any], columns: list[str], kinds: tuple[str, ...] | None = None,
                    batch_rows: int = 16384) -> Any:
    """``map_batches`` UDF: a batch of intermediate Parquet paths -> streamed Arrow tables of
    ``columns`` (rows of the given ``kind`` only, when ``kinds`` is set; ``kind`` need not be in
    ``columns``). One file per task, streamed by row group batches of ``batch_rows``: Ray Data's own
    Parquet reader bin-packs row groups into 128 MiB read tasks, so a corpus under that size read
    in ONE task and the dedup keys of a small run were computed on one core."""
    import fsspec
    import pyarrow.parquet as pq

    read_cols = list(columns) + (["kind"] if kinds is not None and "kind" not in columns else [])
    for path in batch["path"]:
        with fsspec.open(str(path), "rb") as f:
            for rb in pq.ParquetFile(f).iter_batches(batch_size=batch_rows, columns=read_cols):
                t = pa.Table.from_batches([rb])
                if kinds is not None:
                    t = t.filter(pc.is_in(t.column("kind"), value_set=pa.array(list(kinds), pa.string())))
                if t.num_rows:
                    yield t.select(list(columns))


def read_docs(out: "_Out", docs: str, columns: list[str], kinds: tuple[str, ...] | None = None) -> tuple[Any, pa.Schema]:
    """(dataset, schema) of the intermediate ``docs`` files, one read task per file (= per input
    split), in file order; the schema comes from one file's footer, so no block is run to find it."""
    import fsspec
    import pyarrow.parquet as pq
    import ray

    root = out.fs._strip_protocol(docs)
    files = sorted(p for p in out.fs.find(root) if p.endswith(".parquet")
                   and not posixpath.basename(p).startswith((".", "_")))
    assert files, f"no intermediate files under {docs}"
    paths = [out.fs.unstrip_protocol(p) if out.remote else p for p in files]
    with fsspec.open(paths[0], "rb") as f:
        full = pq.ParquetFile(f).schema_arrow
    schema = pa.schema([full.field(c) for c in columns])
    ds = ray.data.from_items([{"path": p} for p in paths], override_num_blocks=len(paths)).map_batches(
        read_docs_batch, batch_size=1, batch_format="numpy",
        fn_kwargs={"columns": list(columns), "kinds": kinds})
    return ds, schema


def _with_bytes(t: pa.Table) -> pa.Table:
    return t.append_column("bytes", pc.binary_length(t.column("text")).cast(pa.int64()))


def grouped_counts(ds: Any, keys: list[str], sums: list[str]) -> list[dict[str, Any]]:
    """``{keys..., n, sums...}`` rows over a Ray dataset. The counting is distributed: each block is
    reduced to one small row per group in ``map_batches``; the driver streams those partial rows
    (``iter_rows``, blocks x groups, never documents) and folds them into a dict of group totals.
    (A Ray ``groupby`` over the partial rows costs a hash shuffle: ~30 s of scheduling for a few
    hundred rows on a laptop, for no gain at this size.)"""
    partial = ds.map_batches(_count_batch, batch_format="pyarrow", batch_size=None,
                             fn_kwargs={"keys": keys, "sums": sums})
    return fold_counts(partial.iter_rows(), keys, sums)


def fold_counts(partial_rows: Any, keys: list[str], sums: list[str]) -> list[dict[str, Any]]:
    """Fold partial count rows (dicts with ``keys``, ``n``, ``sums``) into sorted group totals."""
    acc: dict[tuple, dict[str, Any]] = {}
    for r in partial_rows:
        k = tuple(r[c] for c in keys)
        a = acc.setdefault(k, {**dict(zip(keys, k)), "n": 0, **{c: 0 for c in sums}})
        a["n"] += int(r["n"])
        for c in sums:
            a[c] += int(r[c] or 0)
    return [acc[k] for k in sorted(acc, key=lambda k: tuple(str(x) for x in k))]


def counting_parquet_sink(path: str, keys: list[str], sums: list[str], extra: Any = None, **kw: Any) -> Any:
    """A Ray Parquet datasink whose write tasks also return per-block partial counts of what they wrote
    (``_count_batch`` rows, after ``extra(table)`` adds derived columns): the stats come with the write,
    without reading the output again. After ``ds.write_datasink(sink)``, ``sink.counts`` holds the
    folded totals (the partial rows are blocks x groups, never documents)."""
    from ray.data._internal.datasource.parquet_datasink import ParquetDatasink
    from ray.data.block import BlockAccessor

    class _Sink(ParquetDatasink):
        def write(self, blocks, ctx):  # runs in the write task
            blocks = list(blocks)
            super().write(blocks, ctx)
            parts = []
            for b in blocks:
                t = BlockAccessor.for_block(b).to_arrow()
                if t.num_rows:
                    t = extra(t) if extra is not None else t
                    parts.append(_count_batch(t.select(keys + [c for c in sums]), keys, sums))
            return pa.concat_tables(parts).to_pylist() if parts else []

        def on_write_complete(self, write_result):  # runs in the driver
            super().on_write_complete(write_result)
            self.counts = fold_counts((r for rows in write_result.write_returns if rows for r in rows),
                                      keys, sums)

    sink = _Sink(path, **kw)
    sink.counts = []
    return sink


# ----------------------------------------------------------------------------------------------
# Output bookkeeping (fsspec, so DIR may be remote)


class _Out:
    def __init__(self, root: str) -> None:
        import fsspec

        self.fs, self.root = fsspec.core.url_to_fs(root)
        self.remote = is_remote(root)
        self.uri = root.rstrip("/")

    def path(self, *parts: str) -> str:
        return posixpath.join(self.uri, *parts)

    def _p(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def exists(self, *parts: str) -> bool:
        return self.fs.exists(self._p(*parts))

    def read_json(self, *parts: str) -> dict[str, Any] | None:
        p = self._p(*parts)
        if not self.fs.exists(p):
            return None
        with self.fs.open(p, "r") as f:
            return json.load(f)

    def write_json(self, obj: Any, *parts: str) -> None:
        """Atomic on a local disk (tmp + rename); object stores write whole objects anyway."""
        p = self._p(*parts)
        self.fs.makedirs(posixpath.dirname(p), exist_ok=True)
        tmp = p + ".tmp"
        with self.fs.open(tmp, "w") as f:
            json.dump(obj, f, indent=2, ensure_ascii=False, sort_keys=True)
        self.fs.mv(tmp, p)

    def rm(self, *parts: str) -> None:
        p = self._p(*parts)
        if self.fs.exists(p):
            self.fs.rm(p, recursive=True)


def _claim(out: _Out, name: str, want: str, cfg: PipelineConfig) -> bool:
    """True when ``DIR/name`` already holds the output of hash ``want`` (skip). Clears a leftover
    without a marker (crashed write). Another hash is a ValueError unless ``overwrite``."""
    marker = out.read_json(name, MARKER)
    if marker is not None and marker.get("config_hash") == want:
        return True
    if marker is not None and not cfg.overwrite:
        raise ValueError(
            f"{out.path(name)} holds output of another config (hash {marker.get('config_hash')}, "
            f"this run {want}); use a new --output directory or --set overwrite=true to replace it")
    out.rm(name)
    return False


# ----------------------------------------------------------------------------------------------


def plan_hashes(cfg: PipelineConfig, splits: list[dict[str, Any]], tok_hash: str | None) -> dict[str, str]:
    """Hashes naming each stage's output: what goes in, and the config of every stage up to it."""
    files = sorted({(s["path"], s["size"]) for s in splits})
    plan = {"v": PIPELINE_VERSION, "files": files, "read": to_dict(cfg.read), "clean": to_dict(cfg.clean)}
    if cfg.decontam.benchmarks:  # the benchmark files name the output like the inputs do
        from polyko.data.decontam import benchmark_files

        import fsspec

        plan["decontam"] = to_dict(cfg.decontam)
        plan["benchmark_files"] = [(p, fsspec.core.url_to_fs(p)[0].size(p)) for p, _ in benchmark_files(cfg.decontam)]
    clean_h = config_hash(plan)
    dedup_h = config_hash({"clean": clean_h, "dedup": to_dict(cfg.dedup)})
    out = {"clean": clean_h, "dedup": dedup_h}
    if tok_hash is not None:
        from polyko.data.pack import PACK_LAYOUT

        out["pack"] = config_hash({"dedup": dedup_h, "tokenizer": tok_hash, "seq_len": cfg.seq_len,
                                   "layout": PACK_LAYOUT, "validation_share": cfg.validation_share,
                                   "validation_min_docs": cfg.validation_min_docs})
    return out


def run_pipeline(cfg: PipelineConfig) -> dict[str, Any]:
    """Run (or resume, or skip) the pipeline; returns the stats (also written to DIR/stats.json)."""
    t_start = time.time()
    if not cfg.inputs:
        from polyko.data.clean import SAMPLE_DIR

        cfg = PipelineConfig(**{**{f: getattr(cfg, f) for f in cfg.__dataclass_fields__},
                                "inputs": (str(SAMPLE_DIR),)})
    splits = list_splits(cfg.inputs, cfg.read.split_bytes)
    tok_hash = None
    if cfg.tokenizer:
        from polyko.tokenizer import tokenizer_hash

        tok_hash = tokenizer_hash(cfg.tokenizer)
    hashes = plan_hashes(cfg, splits, tok_hash)
    out = _Out(cfg.output)

    # Refuse early (before any work) if DIR holds another config's output.
    done_rej = _claim(out, "rejected", hashes["clean"], cfg)
    done_clean = _claim(out, "cleaned", hashes["dedup"], cfg)
    done_pack = _claim(out, "tokens", hashes["pack"], cfg) if "pack" in hashes else True
    if "pack" in hashes and cfg.validation_share > 0:
        done_pack = _claim(out, "validation", hashes["pack"], cfg) and done_pack
    stats = out.read_json(STATS)
    if done_rej and done_clean and done_pack and stats and stats.get("hashes") == hashes:
        log.info("skipped: %s already holds the finished output of this config (%s)", cfg.output, hashes)
        return stats

    if not cfg.track:
        return _run(cfg, out, splits, hashes, tok_hash, t_start, done_rej, done_clean, done_pack, None)
    from polyko import tracking

    parents = tracking.lineage(cfg.tokenizer) if cfg.tokenizer else {}
    with tracking.start_run("data", cfg, output=cfg.output if not out.remote else None, parents=parents,
                            run_name=cfg.run_name, tags={"polyko.data.hash": hashes["dedup"]}) as run:
        stats = _run(cfg, out, splits, hashes, tok_hash, t_start, done_rej, done_clean, done_pack, run)
        _log_mlflow(stats, out)
    return stats


def _run(cfg: PipelineConfig, out: _Out, splits: list[dict[str, Any]], hashes: dict[str, str],
         tok_hash: str | None, t_start: float, done_rej: bool, done_clean: bool, done_pack: bool,
         run: Any) -> dict[str, Any]:
    import ray

    from polyko.cluster import init_ray

    init_ray(cfg.ray_address)
    timings: dict[str, float] = {}
    stage = f".stages/clean-{hashes['clean']}"
    docs = out.path(stage, "docs")

    # ---- stage 1: read + clean, every record with its fate -----------------------------------
    clean_done = out.read_json(stage, SUCCESS)
    if clean_done is not None and (done_clean or out.exists(stage, "docs")):
        log.info("clean stage %s already done: skipped", hashes["clean"])
        clean_stats = clean_done["stats"]
        timings.update(clean_done.get("timings", {}))
        done_rej = done_rej or _claim(out, "rejected", hashes["clean"], cfg)
    else:
        done_rej = False
        out.rm(stage)
        out.rm("rejected")
        t0 = time.time()
        # one read task per group of consecutive splits (read.task_bytes), not per small file
        groups = [{"splits": json.dumps(g)} for g in group_splits(splits, cfg.read)]
        ds = ray.data.from_items(groups, override_num_blocks=max(1, len(groups)))
        ds = ds.map_batches(read_batch, batch_size=1, batch_format="numpy", fn_kwargs={"cfg": cfg.read})
        ds = ds.map_batches(clean_batch, batch_format="pyarrow", batch_size=None, fn_kwargs={"cfg": cfg.clean})
        if cfg.decontam.benchmarks:
            from polyko.data.decontam import build_index, decontam_batch

            index = build_index(cfg.decontam)  # small (benchmarks, not the corpus); shipped with the tasks
            ds = ds.map_batches(decontam_batch, batch_format="pyarrow", batch_size=None,
                                fn_kwargs={"index": index, "mode": cfg.decontam.mode})
        else:
            from polyko.data.decontam import no_decontam_batch

            ds = ds.map_batches(no_decontam_batch, batch_format="pyarrow", batch_size=None)
        sums = ["bytes_in", "bytes_out", *(f"pii_{k}" for k in PII_KINDS)]
        # the per-source/rule counts come back from the write tasks: no second read of the corpus.
        # One intermediate file per read task (no min_rows_per_file: Ray Data meets it by bundling
        # the write operator's INPUT rows -- here the split groups -- so 12.5k rows per file put every
        # split of a small corpus into ONE read+clean task and one file, and the dedup stage, which
        # reads a file per task, then ran on one core as well).
        sink = counting_parquet_sink(docs, ["source", "kind", "reason", "bench"], sums)
        ds.write_datasink(sink)
        clean_stats = sink.counts
        timings["read_clean_s"] = round(time.time() - t0, 3)
        out.write_json({"config_hash": hashes["clean"], "stats": clean_stats, "timings": timings}, stage, SUCCESS)
    if not done_rej:
        t0 = time.time()
        n_bad = sum(r["n"] for r in clean_stats if r["kind"] == "bad")
        if n_bad:
            (ray.data.read_parquet(docs, columns=[f.name for f in SCHEMA if f.name not in ("text", "bad")]
                                   + ["kind", "reason"])
             .map_batches(_keep_bad, batch_format="pyarrow", batch_size=None)
             .write_parquet(out.path("rejected"), min_rows_per_file=cfg.rows_per_file))
        out.write_json({"config_hash": hashes["clean"], "records": n_bad}, "rejected", MARKER)
        timings["rejected_s"] = round(time.time() - t0, 3)
        # documents overlapping a benchmark item: the quarantine names the item (removed or flagged)
        out.rm("contaminated")
        n_cont = sum(r["n"] for r in clean_stats if r.get("bench") is not None)
        if n_cont:
            (ray.data.read_parquet(docs, columns=CONTAMINATED_COLUMNS)
             .map_batches(_keep_contaminated, batch_format="pyarrow", batch_size=None)
             .write_parquet(out.path("contaminated"), min_rows_per_file=cfg.rows_per_file))
        out.write_json({"config_hash": hashes["clean"], "records": n_cont, "mode": cfg.decontam.mode},
                       "contaminated", MARKER)

    # ---- stage 2: dedup over the whole corpus -> DIR/cleaned ----------------------------------
    if done_clean:
        log.info("dedup stage %s already done: skipped", hashes["dedup"])
        marker = out.read_json("cleaned", MARKER)
        dedup_stats, out_stats = marker["dedup"], marker["out"]
    else:
        from polyko.data.dedup import deduplicate

        t0 = time.time()
        # one read task per intermediate file; the schema is passed on, so deduplicate runs no block
        # to learn it
        kept, kept_schema = read_docs(out, docs, ["key", "id", "text", "source"], kinds=("kept",))
        # keyed by the reader's unique key, never by the input ids (which collide across inputs); the
        # key table goes to disk beside the intermediate files, not into the object store
        keys_stage = f".stages/dedup-{hashes['dedup']}"
        out.rm(keys_stage)
        survivors, removed = deduplicate(kept, cfg.dedup, text_column="text", id_column="key", schema=kept_schema,
                                         keys_dir=out.path(keys_stage))
        # one file per intermediate file (no min_rows_per_file: Ray Data meets it by bundling the
        # fused operator's input rows, here file paths, into one write task)
        sink = counting_parquet_sink(out.path("cleaned"), ["source"], ["bytes"], extra=_with_bytes)
        survivors.select_columns(["key", "id", "text", "source"]).write_datasink(sink)
        out_stats = sink.counts  # documents/bytes out per source, counted by the write tasks
        out.rm(keys_stage)
        timings["dedup_write_s"] = round(time.time() - t0, 3)
        t0 = time.time()
        dedup_stats = grouped_counts(removed.select_columns(["source", "kind"]), ["source", "kind"], [])
        timings["dedup_stats_s"] = round(time.time() - t0, 3)
        out.write_json({"config_hash": hashes["dedup"], "clean_hash": hashes["clean"], "dedup": dedup_stats,
                        "out": out_stats, "timings": timings}, "cleaned", MARKER)

    # ---- stage 3: pack ------------------------------------------------------------------------
    manifest = None
    if cfg.tokenizer:
        if done_pack:
            log.info("pack stage %s already done: skipped", hashes["pack"])
            manifest = out.read_json("tokens", "manifest.json")
        else:
            from polyko.data.pack import pack_corpus

            t0 = time.time()
            split = cfg.validation_share > 0
            manifest = pack_corpus(out.path("cleaned"), cfg.tokenizer, out.path("tokens"), seq_len=cfg.seq_len,
                                   validation_dir=out.path("validation") if split else None,
                                   validation_share=cfg.validation_share,
                                   validation_min_docs=cfg.validation_min_docs, encoder=cfg.pack_encoder)
            timings["pack_s"] = round(time.time() - t0, 3)
            marker = {"config_hash": hashes["pack"], "dedup_hash": hashes["dedup"], "tokenizer_hash": tok_hash,
                      "seq_len": cfg.seq_len}
            if split:
                out.write_json({**marker, "role": "validation"}, "validation", MARKER)
            out.write_json(marker, "tokens", MARKER)

    if not cfg.keep_intermediate:
        out.rm(stage, "docs")
    timings["total_s"] = round(time.time() - t_start, 3)
    stats = summarize(clean_stats, dedup_stats, out_stats, manifest)
    stats.update({"hashes": hashes, "output": cfg.output, "inputs": list(cfg.inputs),
                  "input_files": len({s["path"] for s in splits}),
                  "input_file_bytes": sum(s["size"] for s in splits if s["start"] == 0),
                  "timings_s": timings})
    if run is not None:
        stats["mlflow_run_id"] = run.info.run_id
    out.write_json(stats, STATS)
    log.info("data pipeline done: %d -> %d documents, %.1f -> %.1f MB; stats in %s", stats["documents_in"],
             stats["documents_out"], stats["bytes_in"] / 1e6, stats["bytes_out"] / 1e6, out.path(STATS))
    return stats


def summarize(clean_rows: list[dict], dedup_rows: list[dict], out_rows: list[dict],
              manifest: dict | None) -> dict[str, Any]:
    """Fold grouped counts into the stats.json layout (totals + per source)."""
    per: dict[str, dict[str, Any]] = {}

    def src(name: str) -> dict[str, Any]:
        return per.setdefault(name, {"documents_in": 0, "bytes_in": 0, "bad": {}, "filtered": {},
                                     "contaminated": {}, "pii_masked": {}, "kept_after_clean": 0,
                                     "bytes_after_clean": 0,
                                     "duplicates": {"exact": 0, "near": 0}, "documents_out": 0, "bytes_out": 0})

    for r in clean_rows:
        s = src(r["source"])
        s["documents_in"] += r["n"]
        s["bytes_in"] += r["bytes_in"]
        if r.get("bench") is not None:  # removed ("contaminated") or only flagged (still "kept")
            s["contaminated"][r["bench"]] = s["contaminated"].get(r["bench"], 0) + r["n"]
        if r["kind"] == "contaminated":
            continue
        if r["kind"] == "bad":
            s["bad"][r["reason"]] = s["bad"].get(r["reason"], 0) + r["n"]
        elif r["kind"] == "filter":
            s["filtered"][r["reason"]] = s["filtered"].get(r["reason"], 0) + r["n"]
        else:
            s["kept_after_clean"] += r["n"]
            s["bytes_after_clean"] += r["bytes_out"]
            for k in PII_KINDS:
                if r[f"pii_{k}"]:
                    s["pii_masked"][k] = s["pii_masked"].get(k, 0) + r[f"pii_{k}"]
    for r in dedup_rows:
        d = src(r["source"])["duplicates"]
        d[r["kind"]] = d.get(r["kind"], 0) + r["n"]
    for r in out_rows:
        s = src(r["source"])
        s["documents_out"] += r["n"]
        s["bytes_out"] += r["bytes"]

    def total(key: str) -> Any:
        vals = [s[key] for s in per.values()]
        if vals and isinstance(vals[0], dict):
            acc: dict[str, int] = {}
            for v in vals:
                for k, c in v.items():
                    acc[k] = acc.get(k, 0) + c
            return dict(sorted(acc.items()))
        return sum(vals)

    stats = {k: total(k) for k in ("documents_in", "bytes_in", "kept_after_clean", "bytes_after_clean",
                                   "documents_out", "bytes_out")}
    stats["bad_records"] = total("bad")
    stats["filtered"] = total("filtered")
    stats["contaminated"] = total("contaminated")
    stats["pii_masked"] = total("pii_masked")
    stats["duplicates_removed"] = total("duplicates")
    stats["per_source"] = dict(sorted(per.items()))
    if manifest is not None:
        stats["tokens"] = {k: manifest.get(k) for k in ("num_sequences", "seq_len", "dtype", "num_tokens",
                                                        "tokens_dropped") if k in manifest}
        if manifest.get("rows_per_source"):
            stats["tokens"]["rows_per_source"] = manifest["rows_per_source"]
        if manifest.get("validation"):
            v = manifest["validation"]
            stats["validation"] = {"share": v["share"], "documents_per_source": v["documents_per_source"],
                                   "rows_per_source": v["rows_per_source"]}
    return stats


def _log_mlflow(stats: dict[str, Any], out: _Out) -> None:
    import mlflow

    from polyko.tracking import metric_name

    m: dict[str, float] = {}
    for k in ("documents_in", "bytes_in", "kept_after_clean", "documents_out", "bytes_out"):
        m[k] = stats[k]
    for group in ("bad_records", "filtered", "contaminated", "pii_masked", "duplicates_removed"):
        for k, v in stats[group].items():
            m[f"{group}.{k}"] = v
    for name, s in list(stats["per_source"].items())[:200]:  # bounded: one metric family per source
        for k in ("documents_in", "documents_out", "bytes_out"):
            m[f"source.{name}.{k}"] = s[k]
    for k, v in stats.get("timings_s", {}).items():
        m[f"time.{k}"] = v
    for k, v in stats.get("tokens", {}).items():
        if isinstance(v, (int, float)):
            m[f"tokens.{k}"] = v
    mlflow.log_metrics({metric_name(k): float(v) for k, v in m.items()})
    if out.remote:
        mlflow.log_dict(stats, STATS)
    else:
        mlflow.log_artifact(out.path(STATS))
