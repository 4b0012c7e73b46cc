"""Streaming documents for tokenizer training: Parquet (the data pipeline's ``cleaned/``), JSONL or
plain text, read in a fixed order, with a deterministic held-out split.

* Parquet: column ``text`` (+ optional ``id``, ``source``), read batch by batch with pyarrow;
  never the whole file in memory.
* JSONL (``.jsonl``): one object per line with a ``text`` field (``id``/``source`` optional).
* Text (``.txt``): one document per non-empty line.

Files are taken in sorted order of their path relative to the input (recursively for a directory).
A document is held out when the hash of its id (``id`` column, else ``<file>:<row>``) falls
under ``heldout_fraction``: the same documents whatever the machine, the worker count or the
order in which files arrive.

CPU example: ``python -c "from polyko.tokenizer.corpus import *; print(next(iter_docs(list_input_files('DIR/cleaned'))))"``
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

SUFFIXES = (".parquet", ".jsonl", ".txt")


@dataclass(frozen=True)
class Doc:
    id: str
    text: str
    source: str


def list_input_files(path: str | os.PathLike) -> list[Path]:
    """The input files under ``path`` (a file or a directory), sorted by relative path."""
    p = Path(path)
    if p.is_file():
        files = [p]
    elif p.is_dir():
        files = sorted((f for f in p.rglob("*") if f.is_file() and f.suffix in SUFFIXES
                        and not any(part.startswith((".", "_")) for part in f.relative_to(p).parts)),
                       key=lambda f: f.relative_to(p).as_posix())
    else:
        raise ValueError(f"input {path} does not exist")
    if not files:
        raise ValueError(f"no {'/'.join(SUFFIXES)} files under {path}")
    bad = [f for f in files if f.suffix not in SUFFIXES]
    if bad:
        raise ValueError(f"unsupported input file(s) {bad[:3]}: expected {SUFFIXES}")
    return files


def is_heldout(doc_id: str, fraction: float) -> bool:
    """Deterministic: blake2b(id) as a number in [0, 1) below ``fraction``."""
    if fraction <= 0:
        return False
    h = int.from_bytes(hashlib.blake2b(doc_id.encode("utf-8"), digest_size=8).digest(), "big")
    return h / 2.0**64 < fraction


def _iter_parquet(f: Path, name: str, text_column: str, batch_size: int) -> Iterator[Doc]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(f)
    names = pf.schema_arrow.names
    if text_column not in names:
        raise ValueError(f"{f}: no {text_column!r} column (columns: {names})")
    cols = [c for c in (text_column, "id", "source") if c in names]
    row = 0
    for batch in pf.iter_batches(batch_size=batch_size, columns=cols):
        d = batch.to_pydict()
        texts = d[text_column]
        ids = d.get("id") or [None] * len(texts)
        sources = d.get("source") or [None] * len(texts)
        for t, i, s in zip(texts, ids, sources):
            if t:
                yield Doc(str(i) if i is not None else f"{name}:{row}", t, s or "unknown")
            row += 1


def _iter_jsonl(f: Path, name: str, text_column: str) -> Iterator[Doc]:
    with open(f, encoding="utf-8") as fh:
        for n, line in enumerate(fh):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{f}:{n + 1}: not a JSON line ({e})") from None
            if not isinstance(obj, dict) or text_column not in obj:
                raise ValueError(f"{f}:{n + 1}: no {text_column!r} field")
            t = obj[text_column]
            if t:
                yield Doc(str(obj.get("id") or f"{name}:{n}"), t, obj.get("source") or f.parent.name)


def _iter_txt(f: Path, name: str) -> Iterator[Doc]:
    with open(f, encoding="utf-8") as fh:
        for n, line in enumerate(fh):
            t = line.rstrip("\n")
            if t.strip():
                yield Doc(f"{name}:{n}", t, f.parent.name)


def iter_docs(files: list[Path], *, root: str | os.PathLike | None = None, text_column: str = "text",
              batch_size: int = 1024) -> Iterator[Doc]:
    """Every non-empty document of ``files``, in order. ``root`` makes fallback ids relative."""
    for f in files:
        name = f.relative_to(root).as_posix() if root and Path(root).is_dir() else f.name
        if f.suffix == ".parquet":
            yield from _iter_parquet(f, name, text_column, batch_size)
        elif f.suffix == ".jsonl":
            yield from _iter_jsonl(f, name, text_column)
        else:
            yield from _iter_txt(f, name)
