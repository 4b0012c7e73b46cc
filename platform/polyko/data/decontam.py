"""Evaluation decontamination: find training documents that contain benchmark items (KoBEST test and
validation, or any benchmark file given), and remove or flag them.

    from polyko.data.decontam import DecontamConfig, build_index, find_overlaps
    index = build_index(DecontamConfig(benchmarks=("/data/kobest",)))   # on the driver: small
    hits = find_overlaps(["...training text..."], index)                   # per doc: best hit or None

The method is the n-gram overlap of GPT-3 (Brown et al. 2020, appendix C) and lm-eval's
``decontamination`` (13-gram overlap), adapted to Korean:

* Units are **syllables**, not eojeol (space-separated words): Korean spacing is inconsistent (the
  same sentence is spaced differently by different writers; a copy of a test item re-spaced must
  still match), and eojeol carry attached particles, so an eojeol n-gram changes with one particle.
  The canonical form drops whitespace, punctuation and symbols and lower-cases the rest (NFKC is done
  by the cleaner), so spacing, punctuation and quote edits do not hide a copy.
* ``ngram = 13`` syllables: about 4 eojeol (a Korean eojeol averages ~3.5 syllables), specific enough
  that unrelated sentences rarely share one, short enough that a one-word edit kills only ~13+3 of a
  passage's n-grams.
* A document is contaminated by an item *field* (a BoolQ paragraph, a COPA premise, a HellaSwag
  context...) when it contains at least ``min_overlap`` (default 0.5) of that field's distinct
  n-grams. GPT-3 flags any single shared 13-gram; on KoBEST itself that flags train items that merely
  share a stock phrase with a test item, while the coverage rule flags only documents holding most of
  an item: a lightly edited copy (re-spaced, re-punctuated, a few words changed) keeps > 0.5.
* Fields shorter than ``min_chars`` canonical syllables (COPA alternatives like "비가 왔다") are not
  checked: a 10-syllable phrase occurs in countless innocent documents (GPT-3 likewise set a floor
  on n); they are counted as ``fields_skipped_short`` in the index summary.

Which files: a file given directly is always used; in a directory, the ``.jsonl`` files whose stem is
in ``splits`` (test, validation, dev, test_originated by default; KoBEST's layout is
``<task>/<split>.jsonl``), every string field of each row being one field. The benchmark name is
``<dir name>/<path without extension>`` (``kobest/boolq/test``) and the item its 0-based row.

How it scales: the index (sorted uint64 n-gram hashes -> field ids, ~16 bytes per benchmark n-gram:
KoBEST test+validation is ~1.3 M n-grams, ~20 MB) is built once on the driver and shipped with the
``map_batches`` task that runs :func:`decontam_batch` over every block (a broadcast join, like
NeMo Curator's task decontamination): one vectorised ``searchsorted`` per document n-gram, no shuffle.
Run on a CPU: ``python -m pytest -q tests/test_decontam.py``.
"""

from __future__ import annotations

import json
import logging
import posixpath
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from polyko.data.minhash import _POLY, _splitmix64

log = logging.getLogger(__name__)

MODES = ("remove", "flag")
_FILTER_BITS = 23  # prefilter bitmap: 2^23 bytes (8 MB); lets ~5% of non-benchmark n-grams through


@dataclass
class DecontamConfig:
    """Which benchmarks to decontaminate against, and what counts as overlap."""

    benchmarks: tuple[str, ...] = ()
    """Benchmark files or directories (e.g. the KoBEST data dir). Empty = no decontamination."""
    splits: tuple[str, ...] = ("test", "validation", "dev", "test_originated")
    """File stems used inside a directory (a file given directly is always used); empty = every file."""
    mode: str = "remove"
    """"remove": contaminated documents leave the corpus (listed in DIR/contaminated/); "flag": they
    stay in the corpus and are only listed."""
    ngram: int = 13
    """N-gram length in canonical syllables (see the module docstring)."""
    min_chars: int = 20
    """Benchmark fields shorter than this (canonical syllables) are not checked."""
    min_overlap: float = 0.5
    """Share of a field's distinct n-grams a document must contain to count as contaminated."""

    def __post_init__(self) -> None:
        if isinstance(self.benchmarks, str):
            self.benchmarks = (self.benchmarks,)
        self.benchmarks = tuple(str(b) for b in self.benchmarks)
        self.splits = tuple(self.splits)
        if self.mode not in MODES:
            raise ValueError(f"decontam.mode must be one of {MODES}, got {self.mode!r}")
        if self.ngram < 4:
            raise ValueError(f"decontam.ngram must be >= 4, got {self.ngram}")
        if self.min_chars < self.ngram:
            raise ValueError(f"decontam.min_chars ({self.min_chars}) must be >= decontam.ngram ({self.ngram})")
        if not 0.0 < self.min_overlap <= 1.0:
            raise ValueError(f"decontam.min_overlap must be in (0, 1], got {self.min_overlap}")


def _keep_lower(cps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mask of code points kept by the canonical form, code points lower-cased): Hangul syllables and
    jamo, ASCII letters (lower-cased) and digits, Latin-1/Extended letters, CJK ideographs (Hanja);
    whitespace, punctuation, symbols, emoji and other scripts are dropped. Vectorised: no regex."""
    upper = (cps >= 0x41) & (cps <= 0x5A)
    low = np.where(upper, cps | 0x20, cps)
    keep = (((low >= 0x61) & (low <= 0x7A)) | ((cps >= 0x30) & (cps <= 0x39))
            | ((cps >= 0xAC00) & (cps <= 0xD7A3)) | ((cps >= 0x3131) & (cps <= 0x318E))
            | ((cps >= 0x1100) & (cps <= 0x11FF)) | ((cps >= 0x4E00) & (cps <= 0x9FFF))
            | ((cps >= 0xC0) & (cps <= 0x24F) & (cps != 0xD7) & (cps != 0xF7)))
    return keep, low


def canonical(text: str) -> str:
    """The form n-grams are taken of: letters and digits only, lower-cased (see :func:`_keep_lower`)."""
    cps = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    keep, low = _keep_lower(cps)
    return low[keep].astype(np.uint32).tobytes().decode("utf-32-le")


def ngram_hashes(texts: list[str], n: int) -> tuple[np.ndarray, np.ndarray]:
    """(64-bit hashes of every n-gram of every text's canonical form, n-gram count per text); texts
    whose canonical form is shorter than n have none. The canonical form is computed here, vectorised
    over the batch. Polynomial rolling hash over code points + splitmix64 (stable everywhere)."""
    lens = np.fromiter((len(t) for t in texts), dtype=np.int64, count=len(texts))
    cps = np.frombuffer("".join(texts).encode("utf-32-le"), dtype=np.uint32)
    keep, low = _keep_lower(cps)
    doc = np.repeat(np.arange(len(texts), dtype=np.int64), lens)[keep]
    cps = low[keep].astype(np.uint64)
    m = cps.size - n + 1
    if m <= 0:
        return np.zeros(0, np.uint64), np.zeros(len(texts), np.int64)
    h = np.zeros(m, dtype=np.uint64)
    for j in range(n):
        h = h * _POLY + cps[j:j + m]
    inside = doc[: m] == doc[n - 1:]  # the window does not cross a document boundary
    d = doc[: m][inside]
    return _splitmix64(h[inside]), np.bincount(d, minlength=len(texts)).astype(np.int64)


@dataclass
class Index:
    """Benchmark n-grams: ``grams`` sorted unique hashes; ``offsets`` CSR into ``fields`` (field ids
    holding each n-gram); per field: its benchmark, item row, field name, n-gram count and a text prefix."""

    grams: np.ndarray
    bitmap: np.ndarray
    offsets: np.ndarray
    fields: np.ndarray
    field_bench: list[str]
    field_item: np.ndarray
    field_name: list[str]
    field_size: np.ndarray
    field_text: list[str]
    ngram: int
    min_overlap: float
    summary: dict[str, Any]

    def __len__(self) -> int:
        return len(self.grams)


def benchmark_files(cfg: DecontamConfig) -> list[tuple[str, str]]:
    """[(path, benchmark name)] of the files to use (see the module docstring); sorted, stable."""
    import fsspec

    out = []
    for b in cfg.benchmarks:
        fs, root = fsspec.core.url_to_fs(b)
        root = root.rstrip("/") or root
        if not fs.exists(root):
            raise ValueError(f"decontam benchmark {b!r} does not exist")
        base = posixpath.basename(root)
        if fs.isdir(root):
            for p in sorted(fs.find(root)):
                rel = posixpath.relpath(p, root)
                stem = posixpath.basename(rel).split(".")[0]
                if p.endswith((".jsonl", ".json")) and (not cfg.splits or stem in cfg.splits):
                    out.append((fs.unstrip_protocol(p) if "://" in b else p, f"{base}/{rel.rsplit('.', 1)[0]}"))
        else:
            out.append((b, base.rsplit(".", 1)[0]))
    if cfg.benchmarks and not out:
        raise ValueError(f"no benchmark files (.jsonl with stems {cfg.splits}) under {list(cfg.benchmarks)}")
    return out


def build_index(cfg: DecontamConfig) -> Index:
    """Read every benchmark item and index the n-grams of each long-enough string field."""
    import fsspec

    bench, item, name, text, canon = [], [], [], [], []
    summary: dict[str, Any] = {"benchmarks": {}, "fields_skipped_short": 0}
    for path, bname in benchmark_files(cfg):
        rows = 0
        with fsspec.open(path, "r", encoding="utf-8") as f:
            for i, line in enumerate(f):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except ValueError as e:
                    raise ValueError(f"{path}:{i + 1}: benchmark line is not JSON ({e})") from e
                rows += 1
                for k, v in (obj.items() if isinstance(obj, dict) else []):
                    if not isinstance(v, str):
                        continue
                    c = canonical(v)  # the same form ngram_hashes takes of documents
                    if len(c) < cfg.min_chars:
                        summary["fields_skipped_short"] += int(bool(c))
                        continue
                    bench.append(bname), item.append(i), name.append(k), text.append(v[:300]), canon.append(c)
        summary["benchmarks"][bname] = rows
    h, counts = ngram_hashes(canon, cfg.ngram)
    fid = np.repeat(np.arange(len(canon), dtype=np.int64), counts)
    # distinct (gram, field) pairs; a field's size = its distinct n-grams
    pairs = np.unique(np.stack([h, fid.astype(np.uint64)], axis=1), axis=0) if len(h) else np.zeros((0, 2), np.uint64)
    grams, starts = np.unique(pairs[:, 0], return_index=True)
    offsets = np.append(starts, len(pairs)).astype(np.int64)
    fields = pairs[:, 1].astype(np.int64)
    size = np.bincount(fields, minlength=len(canon)).astype(np.int64)
    summary.update(fields=len(canon), ngrams=int(len(grams)))
    log.info("decontam index: %d benchmark files, %d fields, %d distinct %d-grams", len(summary["benchmarks"]),
             len(canon), len(grams), cfg.ngram)
    bitmap = np.zeros(1 << _FILTER_BITS, dtype=bool)
    bitmap[(grams >> np.uint64(64 - _FILTER_BITS)).astype(np.int64)] = True
    return Index(grams, bitmap, offsets, fields, bench, np.asarray(item, np.int64), name, size, text, cfg.ngram,
                 cfg.min_overlap, summary)


def find_overlaps(texts: list[str | None], index: Index) -> list[tuple[int, float] | None]:
    """Per text: (field id, overlap share) of the field it covers best if the share >= min_overlap, else None."""
    out: list[tuple[int, float] | None] = [None] * len(texts)
    if len(index.grams) == 0:
        return out
    h, counts = ngram_hashes([t or "" for t in texts], index.ngram)
    if not len(h):
        return out
    doc = np.repeat(np.arange(len(texts), dtype=np.int64), counts)
    # bitmap prefilter (one random byte read per n-gram), then binary search for the candidates only
    cand = index.bitmap[(h >> np.uint64(64 - _FILTER_BITS)).astype(np.int64)]
    h, doc = h[cand], doc[cand]
    pos = np.minimum(np.searchsorted(index.grams, h), len(index.grams) - 1)
    hit = index.grams[pos] == h
    if not hit.any():
        return out
    # distinct (doc, gram) hits, expanded to the fields holding each gram
    dg = np.unique(np.stack([doc[hit], pos[hit]], axis=1), axis=0)
    lo, hi = index.offsets[dg[:, 1]], index.offsets[dg[:, 1] + 1]
    reps = hi - lo
    d = np.repeat(dg[:, 0], reps)
    f = index.fields[np.repeat(lo, reps) + (np.arange(reps.sum()) - np.repeat(np.cumsum(reps) - reps, reps))]
    pair, n = np.unique(np.stack([d, f], axis=1), axis=0, return_counts=True)
    share = n / index.field_size[pair[:, 1]]
    ok = share >= index.min_overlap
    for (di, fi), s in zip(pair[ok], share[ok]):
        cur = out[di]
        if cur is None or s > cur[1] or (s == cur[1] and fi < cur[0]):
            out[di] = (int(fi), float(s))
    return out


def decontam_batch(t: pa.Table, index: Index, mode: str) -> pa.Table:
    """``map_batches`` UDF after ``clean_batch``: kept documents overlapping a benchmark item get
    ``bench`` (benchmark name), ``bench_item`` (row), ``bench_field``, ``bench_overlap`` (share) and,
    in "remove" mode, ``kind`` = "contaminated" (the cleaned text stays, for the quarantine)."""
    n = t.num_rows
    kind = t.column("kind").to_pylist()
    texts = t.column("text").to_pylist()
    live = [i for i in range(n) if kind[i] == "kept"]
    hits = find_overlaps([texts[i] for i in live], index) if live else []
    bench: list[str | None] = [None] * n
    item: list[int | None] = [None] * n
    fname: list[str | None] = [None] * n
    share: list[float | None] = [None] * n
    for i, h in zip(live, hits):
        if h is None:
            continue
        fi, s = h
        bench[i], item[i], fname[i], share[i] = index.field_bench[fi], int(index.field_item[fi]), index.field_name[fi], s
        if mode == "remove":
            kind[i] = "contaminated"
    t = t.set_column(t.schema.get_field_index("kind"), "kind", pa.array(kind, pa.string()))
    t = t.append_column("bench", pa.array(bench, pa.string()))
    t = t.append_column("bench_item", pa.array(item, pa.int64()))
    t = t.append_column("bench_field", pa.array(fname, pa.string()))
    return t.append_column("bench_overlap", pa.array(share, pa.float64()))


def no_decontam_batch(t: pa.Table) -> pa.Table:
    """The same columns, all null (no benchmarks configured): one output schema either way."""
    n = t.num_rows
    for c, ty in (("bench", pa.string()), ("bench_item", pa.int64()), ("bench_field", pa.string()),
                  ("bench_overlap", pa.float64())):
        t = t.append_column(c, pa.nulls(n, ty))
    return t
