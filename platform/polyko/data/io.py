"""Robust, streaming corpus readers with a quarantine for bad input.

What it reads: ``.jsonl``/``.json`` (one JSON object per line), ``.txt`` (one document per line) and
``.parquet``; line formats plain or compressed (``.gz``, ``.zst``/``.zstd``); from local paths,
directories (recursive) or any filesystem fsspec can open (``s3://``, ``gs://``, ``hf://`` ...).

How it streams: :func:`list_splits` lists the files on the driver (names and sizes only) and cuts
large uncompressed line files into byte ranges; :func:`read_split` runs inside a Ray Data task and
*yields* Arrow tables of ``ReadConfig.batch_rows`` rows while it reads the file in 1 MiB chunks, so
a task holds one chunk, one batch and at most one ``max_doc_bytes`` line whatever the file size.
JSONL is parsed a chunk's complete lines at a time with ``pyarrow.json`` when the block provably
parses as ``json.loads`` would parse each line (see ``_fast_jsonl``), else line by line; the output
is the same either way (``read_split(..., fast=False)`` is the reference the tests compare with).

What it never does: crash on a bad record or let a bad record take good ones with it. Each line is
checked (NUL bytes, invalid UTF-8, over-long line, malformed JSON, missing text field); truncated or
corrupt ``.gz``/``.zst`` streams keep every document before the damage; an empty file and a file
that is not Korean (Hangul share of letters in its first documents under a threshold) are flagged.
Bad rows travel in the same stream as good ones (``bad`` = reason, ``raw`` = the original bytes, up
to ``reject_prefix_bytes``) and the pipeline writes them to ``DIR/rejected/``.

Run on a CPU::

    python -c "from polyko.data.io import *; s = list_splits(['corpus/']); \
print(next(read_split(s[0], ReadConfig())).slice(0, 3))"
"""

from __future__ import annotations

import gzip
import json
import logging
import posixpath
import re
import zlib
from dataclasses import dataclass
from typing import Any, Iterator

import pyarrow as pa

log = logging.getLogger(__name__)

LINE_FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".txt": "txt"}
COMPRESSIONS = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}
# Reasons a record is quarantined (the ``bad`` column). Documented so users can grep rejected/.
BAD_REASONS = ("invalid_utf8", "nul_byte", "too_long", "malformed_json", "missing_field", "empty_file",
               "truncated_file", "corrupt_file", "read_error", "non_korean_file")

SCHEMA = pa.schema([
    ("key", pa.int64()),        # internal unique key: (file index << KEY_FILE_SHIFT) | byte offset (Parquet: row)
    ("id", pa.string()),        # input id field (as string) or "<source>/<relpath>:<line>"; NOT unique across inputs
    ("text", pa.string()),      # decoded document; null for a bad record
    ("source", pa.string()),    # record's source field, else the dataset (top directory) name
    ("file", pa.string()),      # path of the input file
    ("line", pa.int64()),       # 1-based line (row for Parquet); null inside a byte-range split
    ("offset", pa.int64()),     # byte offset of the line in the (decompressed) file
    ("bytes_in", pa.int64()),   # raw bytes of the record (the whole line, even if over-long)
    ("bad", pa.string()),       # null = good, else one of BAD_REASONS
    ("detail", pa.string()),    # human-readable detail for bad records (exception text ...)
    ("raw", pa.binary()),       # original bytes of a bad record (prefix of reject_prefix_bytes)
])

# Every input file gets an index (its position in the listing, see list_splits); a document's key packs
# it with the document's byte offset in the (decompressed) file, or its row in a Parquet file: unique
# across all inputs by construction, whatever ids the inputs carry (every public dataset numbers from
# 0 or 1), and ordered like the files and lines. 40 bits of offset = files up to 1 TiB; 23 bits of
# file index = 8 M files.
KEY_FILE_SHIFT = 40
MAX_FILES = 1 << (63 - KEY_FILE_SHIFT)

_HANGUL = re.compile(r"[\uac00-\ud7a3\u1100-\u11ff\u3130-\u318f]")
_NUL = b"\x00"
_CHUNK = 1 << 20  # bytes per read() call: bounds per-task memory next to one batch


@dataclass
class ReadConfig:
    """How input files are parsed and which records count as bad input."""

    text_field: str = "text"        # JSON/Parquet field holding the document
    id_field: str = "id"            # JSON/Parquet field kept as the document id when present
    source_field: str = "source"    # JSON/Parquet field naming the source; "" = always the dataset name
    # A line longer than this is quarantined as ``too_long`` (and never held whole in memory).
    # 4 MiB: far above a long news article or Wikipedia page (<1 MiB), far below a dumped blob.
    max_doc_bytes: int = 4 << 20
    # Bytes of a bad record kept in rejected/ (its full length is in ``bytes_in``).
    reject_prefix_bytes: int = 1 << 20
    # File-level language check: if the first ``probe_docs`` documents of a file have less than this
    # share of Hangul among letters, the whole file is quarantined as ``non_korean_file``. 0 disables.
    # 0.1 keeps Korean text with much English/Hanja mixed in; an English dump scores ~0.
    min_hangul_ratio: float = 0.1
    probe_docs: int = 200
    # Uncompressed line files above this are split into byte ranges read by separate tasks.
    split_bytes: int = 256 << 20
    # Input bytes one read task takes: consecutive small files (or splits) are read by one task up to
    # this. Each later stage runs a task per read task's output file, and Ray's per-task cost (~20 ms
    # of CPU across driver, raylet and worker) per 1 MB file was ~10 % of the pipeline's CPU at 11M
    # documents in 900 files. 0 = a task per split.
    task_bytes: int = 16 << 20
    # ...but a corpus smaller than task_bytes x min_tasks is cut into about min_tasks groups (at most
    # a task per split), so a small corpus still runs on many cores. Input-only: the grouping, and so
    # every output file, never depends on the cluster.
    min_tasks: int = 16
    # Rows per yielded Arrow table (one Ray Data block): ~4k docs of ~1 KiB = a few MiB.
    batch_rows: int = 4096

    def __post_init__(self) -> None:
        if self.max_doc_bytes <= 0 or self.batch_rows <= 0 or self.split_bytes <= 0:
            raise ValueError("read.max_doc_bytes, read.batch_rows and read.split_bytes must be positive")
        if self.task_bytes < 0 or self.min_tasks < 1:
            raise ValueError("read.task_bytes must be >= 0 (0 = a task per split) and read.min_tasks >= 1")
        if not self.text_field:
            raise ValueError("read.text_field must not be empty")


def file_format(path: str) -> tuple[str, str | None] | None:
    """``(format, compression)`` from a file name, ``None`` when unsupported."""
    name = posixpath.basename(path).lower()
    comp = None
    for ext, c in COMPRESSIONS.items():
        if name.endswith(ext):
            comp, name = c, name[: -len(ext)]
            break
    if name.endswith(".parquet"):
        return ("parquet", None) if comp is None else None
    for ext, fmt in LINE_FORMATS.items():
        if name.endswith(ext):
            return fmt, comp
    return None


def list_splits(inputs: list[str] | tuple[str, ...], split_bytes: int = 256 << 20) -> list[dict[str, Any]]:
    """Expand inputs (files, directories, URIs) into read splits, on the driver: names and sizes only.

    A split is ``{"path", "file", "dataset", "start", "end", "size", "file_index"}``; ``end`` is -1 for
    "to the end"; ``file_index`` numbers the distinct files in listing order (it makes document keys unique).
    ``dataset`` names the source when records carry none: the first directory under an input
    directory (``corpus/nsmc/part0.jsonl`` -> ``nsmc``), else the input directory's or the file's
    parent directory's name. Unsupported and hidden files inside a directory are skipped (logged);
    a missing input or an unsupported file given explicitly is a ``ValueError``.
    """
    import fsspec

    if not inputs:
        raise ValueError("no input paths given")
    splits: list[dict[str, Any]] = []
    for inp in inputs:
        fs, root = fsspec.core.url_to_fs(str(inp))
        root = root.rstrip("/") or root
        if not fs.exists(root):
            raise ValueError(f"input {inp!r} does not exist")
        remote = "://" in str(inp)

        def full(p: str) -> str:
            return fs.unstrip_protocol(p) if remote else p

        if fs.isdir(root):
            found = fs.find(root, detail=True)
            skipped = []
            for p in sorted(found):
                rel = posixpath.relpath(p, root)
                if any(part.startswith((".", "_")) for part in rel.split("/")):
                    continue
                if file_format(p) is None:
                    skipped.append(rel)
                    continue
                parts = rel.split("/")
                dataset = parts[0] if len(parts) > 1 else posixpath.basename(root)
                splits.extend(_cut(full(p), rel, dataset, int(found[p].get("size") or 0), split_bytes))
            if skipped:
                log.warning("skipped %d unsupported file(s) under %s: %s", len(skipped), inp, skipped[:10])
        else:
            if file_format(root) is None:
                raise ValueError(f"input {inp!r}: unsupported file type (want .jsonl/.json/.txt "
                                 f"[.gz|.zst] or .parquet)")
            dataset = posixpath.basename(posixpath.dirname(root)) or "input"
            size = int(fs.info(root).get("size") or 0)
            splits.extend(_cut(full(root), posixpath.basename(root), dataset, size, split_bytes))
    if not splits:
        raise ValueError(f"no readable files (.jsonl/.json/.txt[.gz|.zst]/.parquet) under {list(inputs)}")
    index: dict[str, int] = {}
    for s in splits:  # byte-range splits of one file share its index (their offsets differ)
        s["file_index"] = index.setdefault(s["path"], len(index))
    if len(index) > MAX_FILES:
        raise ValueError(f"{len(index)} input files: at most {MAX_FILES} per run (merge small files)")
    return splits


def group_splits(splits: list[dict[str, Any]], cfg: ReadConfig) -> list[list[dict[str, Any]]]:
    """Consecutive splits in groups of at most ``cfg.task_bytes`` input bytes, or of 1/``min_tasks``
    of the input when that is less (a larger split alone; no more than ``min_tasks`` splits: a group
    each): the work of one read task. Depends on the listing only, never on the cluster."""
    def nbytes(s: dict[str, Any]) -> int:
        return (s["end"] - s["start"]) if s["end"] >= 0 else s["size"]

    if len(splits) <= cfg.min_tasks:
        return [[s] for s in splits]
    target = min(cfg.task_bytes, -(-sum(nbytes(s) for s in splits) // cfg.min_tasks))
    groups: list[list[dict[str, Any]]] = []
    size = 0
    for s in splits:
        n = nbytes(s)
        if not groups or not target or size + n > target:
            groups.append([])
            size = 0
        groups[-1].append(s)
        size += n
    return groups


def _cut(path: str, rel: str, dataset: str, size: int, split_bytes: int) -> list[dict[str, Any]]:
    fmt, comp = file_format(path)
    base = {"path": path, "file": f"{dataset}/{rel}" if not rel.startswith(dataset + "/") else rel,
            "dataset": dataset, "size": size}
    if fmt == "parquet" or comp is not None or size <= split_bytes:
        return [dict(base, start=0, end=-1)]
    return [dict(base, start=s, end=min(s + split_bytes, size)) for s in range(0, size, split_bytes)]


# ----------------------------------------------------------------------------------------------
# Byte streams: decompression that tells a clean end from a truncated one


class TruncatedError(Exception):
    """The compressed stream ended before its end-of-stream marker."""


class _ZstdStream:
    """Streaming zstd reader over a raw file, multi-frame, that raises :class:`TruncatedError`
    when the input ends inside a frame (``zstandard.stream_reader`` silently returns short data)."""

    def __init__(self, raw: Any) -> None:
        import zstandard

        self._raw, self._new = raw, zstandard.ZstdDecompressor().decompressobj
        self._d, self._fed = self._new(), False

    def read(self, n: int) -> bytes:
        while True:
            chunk = self._raw.read(_CHUNK)
            if not chunk:
                if self._fed and not self._d.eof:
                    raise TruncatedError("zstd stream ended inside a frame")
                return b""
            out = []
            while chunk:
                self._fed = True
                out.append(self._d.decompress(chunk))
                chunk = b""
                if self._d.eof:
                    chunk = self._d.unused_data
                    self._d, self._fed = self._new(), False
            data = b"".join(out)
            if data:
                return data


class _GzipStream:
    """``GzipFile.read(n)`` loses the data decoded so far when it hits a truncated end (the buffered
    reader drops it with the EOFError); ``read1`` returns per raw chunk, so nothing before the cut
    is lost."""

    def __init__(self, raw: Any) -> None:
        self._g = gzip.GzipFile(fileobj=raw, mode="rb")

    def read(self, n: int) -> bytes:
        return self._g.read1(n)


def _open_stream(raw: Any, comp: str | None) -> Any:
    if comp == "gzip":
        return _GzipStream(raw)
    if comp == "zstd":
        return _ZstdStream(raw)
    return raw


class _Lines:
    """Split a byte stream into lines without ever holding more than ``max_bytes`` of one line.

    The stream is positioned at absolute offset ``start``; with ``skip_first`` the bytes up to the
    first newline belong to the previous byte-range split and are skipped. Lines starting at or
    after ``end`` (-1 = none) belong to the next split. Iterating yields ``(offset, data, length)``;
    ``data`` is ``None`` for a line longer than ``max_bytes`` (``prefix`` then holds its first
    ``keep`` bytes). ``pending`` is the unterminated tail when the stream fails, to be quarantined.
    :meth:`blocks` yields the same lines, the complete lines inside one read chunk as one block.
    """

    def __init__(self, stream: Any, start: int, end: int, max_bytes: int, keep: int, skip_first: bool) -> None:
        self.stream, self.start, self.end, self.max, self.keep = stream, start, end, max_bytes, keep
        self.skip_first = skip_first
        self.pending = b""
        self.pending_offset = start
        self.prefix = b""

    def __iter__(self) -> Iterator[tuple[int, bytes | None, int]]:
        for ev in self.blocks():
            if ev[0] == "line":
                yield ev[1], ev[2], ev[3]
            else:
                _, off, block, lens = ev
                p = 0
                for n in lens:
                    yield off + p, block[p:p + n], n
                    p += n + 1

    def blocks(self) -> Iterator[tuple]:
        """``("line", offset, data, length)`` for a line that spans read chunks (or is over-long,
        or skipped/cut at a split edge), and ``("block", offset, bytes, lengths)`` for the run of
        complete lines inside one chunk: ``bytes`` holds them joined by ``\\n`` (no trailing one),
        ``lengths`` their byte lengths (each <= ``max_bytes``). The consumer can then parse a
        whole block at once instead of paying Python per line."""
        buf: list[bytes] = []
        buf_len = 0
        over = self.skip_first  # over-long (or skipped) line: keep only a prefix, count the rest
        skipping = self.skip_first
        line_start = pos = self.start
        while True:
            chunk = self.stream.read(_CHUNK)
            if not chunk:
                break
            parts = chunk.split(b"\n")
            last_i = len(parts) - 1
            i = 0
            # 0-based position of parts[i] in chunk, for slicing a block without re-joining
            cpos = 0
            while i <= last_i:
                if 0 < i < last_i and not over and not skipping and buf_len == 0:
                    lens = list(map(len, parts[i:last_i]))
                    if max(lens) <= self.max:
                        if self.end >= 0:
                            # lines starting at or after ``end`` belong to the next split
                            k, s = 0, line_start
                            for n in lens:
                                if s >= self.end:
                                    break
                                s += n + 1
                                k += 1
                        else:
                            k = len(lens)
                        size = sum(lens[:k]) + k  # bytes incl. the k newlines
                        if k:
                            yield "block", line_start, chunk[cpos:cpos + size - 1], lens[:k]
                        if k < len(lens):
                            return
                        pos += size
                        cpos += size
                        line_start = pos
                        i = last_i
                        continue
                part = parts[i]
                if not over:
                    if buf_len + len(part) > self.max:
                        over = True
                        self.prefix = (b"".join(buf) + part)[: self.keep]
                        buf = []
                    else:
                        buf.append(part)
                buf_len += len(part)
                pos += len(part)
                cpos += len(part)
                if i == last_i:
                    break
                pos += 1  # the newline
                cpos += 1
                if skipping:
                    skipping = False
                elif self.end >= 0 and line_start >= self.end:
                    return
                else:
                    yield "line", line_start, (None if over else b"".join(buf)), buf_len
                buf, buf_len, over, self.prefix = [], 0, False, b""
                line_start = pos
                i += 1
            self.pending = b"" if over else b"".join(buf)
            self.pending_offset = line_start
        # stream end: an unterminated last line is still a line
        if buf_len and not skipping and not (self.end >= 0 and line_start >= self.end):
            yield "line", line_start, (None if over else b"".join(buf)), buf_len
        self.pending = b""


# ----------------------------------------------------------------------------------------------
# Turning records into rows


class _Rows:
    """Accumulates rows of :data:`SCHEMA` and hands out Arrow tables of ``batch_rows``; runs the
    file-level Korean probe over the first ``probe_docs`` good documents before releasing them."""

    def __init__(self, split: dict[str, Any], cfg: ReadConfig) -> None:
        self.split, self.cfg = split, cfg
        self.cols: dict[str, list] = {f.name: [] for f in SCHEMA}
        self.probing = cfg.min_hangul_ratio > 0
        self.hangul = self.letters = self.probed = 0
        self.non_korean = False
        self.raw_of_good: list[bytes | None] = []  # kept only while probing (to quarantine if needed)
        # Arrow tables of rows from the block fast path (_fast_jsonl), in order before ``cols``'s rows
        self.parts: list[pa.Table] = []
        self.n_parts = 0

    def add(self, *, id: str, text: str | None, source: str, line: int | None, offset: int,
            bytes_in: int, bad: str | None = None, detail: str | None = None, raw: bytes | None = None,
            pos: int | None = None) -> None:
        """One row; ``pos`` (Parquet row, >= 1) replaces the byte offset in the key."""
        if bad is None and self.non_korean:
            bad, detail, raw = "non_korean_file", "file failed the Hangul probe", raw
        if bad is not None:
            text = None
            raw = (raw or b"")[: self.cfg.reject_prefix_bytes]
        else:
            raw = None
        c = self.cols
        c["key"].append((int(self.split.get("file_index", 0)) << KEY_FILE_SHIFT) | (offset if pos is None else pos))
        c["id"].append(id), c["text"].append(text), c["source"].append(source)
        c["file"].append(self.split["file"]), c["line"].append(line), c["offset"].append(offset)
        c["bytes_in"].append(bytes_in), c["bad"].append(bad), c["detail"].append(detail), c["raw"].append(raw)

    def add_good(self, text: str, raw: bytes, **kw: Any) -> None:
        if self.probing:
            self.hangul += len(_HANGUL.findall(text))
            self.letters += sum(ch.isalpha() for ch in text)
            self.probed += 1
            self.raw_of_good.append(raw)
            self.add(text=text, **kw)
            if self.probed >= self.cfg.probe_docs:
                self.decide()
            return
        self.add(text=text, raw=raw, **kw)

    def decide(self) -> None:
        """End of the probe: if the file is not Korean, turn the probed rows into bad ones."""
        if not self.probing:
            return
        self.probing = False
        if self.letters and self.hangul / self.letters < self.cfg.min_hangul_ratio:
            self.non_korean = True
            c = self.cols
            # the probed good rows are the last len(raw_of_good) good rows still buffered
            good_idx = [i for i, b in enumerate(c["bad"]) if b is None][-len(self.raw_of_good):]
            for i, raw in zip(good_idx, self.raw_of_good):
                c["bad"][i], c["text"][i] = "non_korean_file", None
                c["detail"][i] = f"Hangul share {self.hangul / self.letters:.3f} < {self.cfg.min_hangul_ratio}"
                c["raw"][i] = (raw or b"")[: self.cfg.reject_prefix_bytes]
        self.raw_of_good = []

    def ready(self) -> bool:
        return not self.probing and len(self) >= self.cfg.batch_rows

    def extend(self, t: pa.Table) -> None:
        """Append rows built whole by the block fast path (after the rows already held)."""
        if self.cols["id"]:
            self.parts.append(pa.table(self.cols, schema=SCHEMA))
            self.n_parts += len(self.cols["id"])
            self.cols = {f.name: [] for f in SCHEMA}
        self.parts.append(t)
        self.n_parts += t.num_rows

    def take(self) -> pa.Table:
        """All rows held; with block rows among them, exactly ``batch_rows`` (the rest stays), so the
        tables are cut where the line-by-line reader cuts them."""
        t = pa.table(self.cols, schema=SCHEMA)
        self.cols = {f.name: [] for f in SCHEMA}
        if not self.parts:
            return t
        t = pa.concat_tables(self.parts + [t]) if t.num_rows else pa.concat_tables(self.parts)
        n = min(self.cfg.batch_rows, t.num_rows)
        rest = t.slice(n)
        self.parts, self.n_parts = ([rest], rest.num_rows) if rest.num_rows else ([], 0)
        return t.slice(0, n).combine_chunks()

    def __len__(self) -> int:
        return self.n_parts + len(self.cols["id"])


def _default_id(split: dict[str, Any], line: int | None, offset: int) -> str:
    return f"{split['file']}:{line}" if line is not None else f"{split['file']}@{offset}"


def _line_record(rows: _Rows, split: dict[str, Any], fmt: str, line: int | None, offset: int,
                 data: bytes | None, length: int, prefix: bytes) -> None:
    cfg = rows.cfg
    did = _default_id(split, line, offset)
    src = split["dataset"]
    common = dict(id=did, source=src, line=line, offset=offset, bytes_in=length)
    if data is None:
        rows.add(text=None, bad="too_long", detail=f"line of {length} bytes > max_doc_bytes={cfg.max_doc_bytes}",
                 raw=prefix, **common)
        return
    if data.endswith(b"\r"):
        data = data[:-1]
    if not data.strip():
        return  # blank line: no document
    if b"\x00" in data:
        rows.add(text=None, bad="nul_byte", detail=f"NUL at byte {data.find(_NUL)}", raw=data, **common)
        return
    try:
        s = data.decode("utf-8")
    except UnicodeDecodeError as e:
        rows.add(text=None, bad="invalid_utf8", detail=str(e)[:200], raw=data, **common)
        return
    if fmt == "txt":
        rows.add_good(s, data, **common)
        return
    try:
        obj = json.loads(s)
    except (ValueError, RecursionError) as e:  # RecursionError: nesting deeper than the interpreter's limit
        rows.add(text=None, bad="malformed_json", detail=str(e)[:200], raw=data, **common)
        return
    if not isinstance(obj, dict):
        rows.add(text=None, bad="malformed_json", detail=f"JSON {type(obj).__name__}, not an object",
                 raw=data, **common)
        return
    text = obj.get(cfg.text_field)
    if not isinstance(text, str):
        rows.add(text=None, bad="missing_field",
                 detail=f"field {cfg.text_field!r} " + ("missing" if text is None else f"is {type(text).__name__}"),
                 raw=data, **common)
        return
    if "\x00" in text:
        rows.add(text=None, bad="nul_byte", detail="NUL character in the text field", raw=data, **common)
        return
    if b"\\u" in data:  # only a JSON escape can smuggle in a lone surrogate ("\ud800"): not encodable
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            rows.add(text=None, bad="invalid_utf8", detail=f"lone surrogate in JSON string: {e}"[:200], raw=data,
                     **common)
            return
    rid = obj.get(cfg.id_field) if cfg.id_field else None
    if rid is not None and rid != "":
        common["id"] = str(rid)
    if cfg.source_field:
        s_ = obj.get(cfg.source_field)
        if isinstance(s_, str) and s_:
            common["source"] = s_
    rows.add_good(text, data, **common)


# Block fast path for JSONL: one pyarrow.json parse per block of complete lines instead of json.loads
# + per-row Python per line (~3x the whole read's cost on ~100-byte documents). It is taken only when
# the block provably parses to what the line-by-line path would produce, and otherwise the block goes
# line by line (so every bad line is still found, counted and quarantined exactly as before):
# * no NUL, '\r' or JSON '\u' escape in the block (these need the per-line checks: NUL bytes, lone
#   surrogates, escaped field names), valid UTF-8 as a whole, no empty line;
# * every line starts with '{' and ends with '}': a line starting with '{' can never continue an
#   unfinished value of the line before (after a complete value only ',' '}' ']' may follow, and a
#   raw newline inside a string is invalid JSON), so each line is its own value; and pyarrow.json
#   crashes the process (SIGSEGV, pyarrow 2x) on a block whose first value is a bare 'null';
# * no digit run longer than Python's int-string limit (json.loads refuses such numbers), and no line
#   nested deeper than _MAX_BRACKETS (json.loads raises RecursionError on very deep nesting);
# * the parse gives one row per line (two objects on one line give two), a non-null string text for
#   every row; a duplicate field, a non-string text/source or a non-integer id makes pyarrow raise.
_MAX_BRACKETS = 200   # '[' + '{' per line above which the block goes line by line
_MIN_FAST_LINES = 16  # below this the per-line path is as cheap
_PJ_READ = None


def _long_digit_run() -> bytes | None:
    import sys

    lim = sys.get_int_max_str_digits() if hasattr(sys, "get_int_max_str_digits") else 0
    return b"0" * (lim + 1) if lim else None


# digits -> '0', every other byte -> '.': a run longer than the limit is then one C substring search
# (~1 GB/s; a regex like [0-9]{4301} tries every digit position and ran at ~10 MB/s)
_LONG_DIGITS = _long_digit_run()
_DIGITS_TO_0 = bytes(0x30 if 0x30 <= i <= 0x39 else 0x2E for i in range(256))


def _parse_block(block: bytes, cfg: ReadConfig, id_type: pa.DataType | None) -> pa.Table:
    import pyarrow.json as pj

    fields = [(cfg.text_field, pa.string())]
    if id_type is not None:
        fields.append((cfg.id_field, id_type))
    if cfg.source_field:
        fields.append((cfg.source_field, pa.string()))
    return pj.read_json(
        pa.BufferReader(block),
        # one block, one thread: Ray Data already runs one read task per core
        read_options=pj.ReadOptions(use_threads=False, block_size=len(block) + 1),
        parse_options=pj.ParseOptions(explicit_schema=pa.schema(fields), unexpected_field_behavior="ignore",
                                      newlines_in_values=False))


def _fast_jsonl(rows: _Rows, split: dict[str, Any], block: bytes, offset: int, lens: list[int],
                line: int | None) -> pa.Table | None:
    """Rows of :data:`SCHEMA` for a block of complete JSONL lines, or None (then read it line by line)."""
    import numpy as np

    cfg = rows.cfg
    n = len(lens)
    if n < _MIN_FAST_LINES or b"\x00" in block or b"\\u" in block or b"\r" in block:
        return None
    names = [f for f in (cfg.text_field, cfg.id_field, cfg.source_field) if f]
    if len(set(names)) != len(names):
        return None
    ln = np.asarray(lens, dtype=np.int64)
    if ln.min() == 0:
        return None
    starts = np.empty(n, np.int64)
    starts[0] = 0
    np.cumsum(ln[:-1] + 1, out=starts[1:])
    arr = np.frombuffer(block, np.uint8)
    if not ((arr[starts] == 0x7B).all() and (arr[starts + ln - 1] == 0x7D).all()):  # '{' ... '}'
        return None
    try:
        block.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if _LONG_DIGITS is not None and _LONG_DIGITS in block.translate(_DIGITS_TO_0):
        return None
    nest = np.flatnonzero((arr == 0x5B) | (arr == 0x7B))  # '[' '{'
    if nest.size > _MAX_BRACKETS and np.bincount(np.searchsorted(starts, nest, "right")).max() > _MAX_BRACKETS:
        return None
    t = None
    # ids are strings or integers in practice; anything else (floats, mixed) goes line by line
    for id_type in ((pa.string(), pa.int64()) if cfg.id_field else (None,)):
        try:
            t = _parse_block(block, cfg, id_type)
            break
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
            continue
    if t is None or t.num_rows != n:
        return None
    text = t.column(cfg.text_field).combine_chunks()
    if text.null_count:
        return None
    import pyarrow.compute as pc

    abs_off = starts + offset
    file = split["file"]
    if line is not None:
        line_arr = pa.array(np.arange(line, line + n, dtype=np.int64))
        default_id = pc.binary_join_element_wise(file + ":", pc.cast(line_arr, pa.string()), "")
    else:
        line_arr = pa.nulls(n, pa.int64())
        default_id = pc.binary_join_element_wise(file + "@", pc.cast(pa.array(abs_off), pa.string()), "")
    ids = default_id
    if cfg.id_field:
        rid = pc.cast(t.column(cfg.id_field).combine_chunks(), pa.string())
        use = pc.fill_null(pc.not_equal(rid, ""), False)
        ids = pc.if_else(use, rid, default_id)
    src = pa.array([split["dataset"]] * n, pa.string()) if n else pa.array([], pa.string())
    if cfg.source_field:
        s = t.column(cfg.source_field).combine_chunks()
        src = pc.if_else(pc.fill_null(pc.not_equal(s, ""), False), s, split["dataset"])
    key = (int(split.get("file_index", 0)) << KEY_FILE_SHIFT) | abs_off
    nulls = pa.nulls(n, pa.string())
    return pa.table([pa.array(key), ids, text, src, pa.array([file] * n, pa.string()), line_arr,
                     pa.array(abs_off), pa.array(ln), nulls, nulls, pa.nulls(n, pa.binary())], schema=SCHEMA)


def read_split(split: dict[str, Any], cfg: ReadConfig, fast: bool = True) -> Iterator[pa.Table]:
    """Stream one split as Arrow tables of :data:`SCHEMA` (good and bad rows). Never raises on bad
    data: read/decompression errors end the split with one bad row; rows before it are kept.
    ``fast=False`` parses every JSONL line on its own (the reference the block fast path must equal)."""
    fmt, comp = file_format(split["path"])
    rows = _Rows(split, cfg)
    if fmt == "parquet":
        yield from _read_parquet(split, cfg, rows)
        return
    import fsspec

    start, end = int(split["start"]), int(split["end"])
    lines: _Lines | None = None
    n = 0
    try:
        with fsspec.open(split["path"], "rb") as raw:
            if start > 0:  # byte range: start one byte early so a line starting exactly at
                raw.seek(start - 1)  # ``start`` is seen as the end of the skipped partial line
            stream = _open_stream(raw, comp)
            lines = _Lines(stream, max(start - 1, 0), end, cfg.max_doc_bytes, cfg.reject_prefix_bytes,
                           skip_first=start > 0)
            line_no = 1 if start == 0 else None
            for ev in lines.blocks():
                if ev[0] == "line":
                    n += 1
                    _line_record(rows, split, fmt, line_no, ev[1], ev[2], ev[3], lines.prefix)
                    if line_no is not None:
                        line_no += 1
                    if rows.ready():
                        yield rows.take()
                    continue
                _, offset, block, lens = ev
                k = p = 0  # lines of the block done, bytes of the block done
                try_fast = fast and fmt == "jsonl"
                while k < len(lens):
                    # line by line while the Korean probe runs (it may turn rows into bad ones)
                    if try_fast and not rows.probing and not rows.non_korean:
                        t = _fast_jsonl(rows, split, block[p:] if p else block, offset + p, lens[k:], line_no)
                        if t is not None:
                            rows.extend(t)
                            n += t.num_rows
                            if line_no is not None:
                                line_no += t.num_rows
                            k = len(lens)
                            while rows.ready():
                                yield rows.take()
                            break
                        try_fast = False  # the rest of this block goes line by line
                    m = lens[k]
                    n += 1
                    _line_record(rows, split, fmt, line_no, offset + p, block[p:p + m], m, b"")
                    if line_no is not None:
                        line_no += 1
                    p += m + 1
                    k += 1
                    if rows.ready():
                        yield rows.take()
    except Exception as e:  # noqa: BLE001 -- any read failure is quarantined, never fatal
        reason = _classify(e)
        tail = lines.pending if lines is not None else b""
        off = lines.pending_offset if lines is not None else start
        rows.add(id=_default_id(split, None, off), text=None, source=split["dataset"], line=None, offset=off,
                 bytes_in=len(tail), bad=reason, detail=f"{type(e).__name__}: {e}"[:500], raw=tail)
        log.warning("%s: %s after %d lines (%s); earlier documents kept", split["path"], reason, n, e)
    else:
        if n == 0 and start == 0:
            rows.add(id=_default_id(split, None, 0), text=None, source=split["dataset"], line=None, offset=0,
                     bytes_in=0, bad="empty_file", detail="no lines in file", raw=b"")
    rows.decide()
    while len(rows):
        yield rows.take()


def _classify(e: Exception) -> str:
    if isinstance(e, (TruncatedError, EOFError)):
        return "truncated_file"
    if isinstance(e, (zlib.error, gzip.BadGzipFile)) or type(e).__name__ == "ZstdError":
        return "corrupt_file"
    return "read_error"


def _read_parquet(split: dict[str, Any], cfg: ReadConfig, rows: _Rows) -> Iterator[pa.Table]:
    import fsspec
    import pyarrow.parquet as pq

    row = 0
    try:
        with fsspec.open(split["path"], "rb") as f:
            pf = pq.ParquetFile(f)
            names = set(pf.schema_arrow.names)
            if cfg.text_field not in names:
                rows.add(id=_default_id(split, None, 0), text=None, source=split["dataset"], line=None, offset=0,
                         bytes_in=int(split["size"]), bad="missing_field",
                         detail=f"no column {cfg.text_field!r} in Parquet schema {sorted(names)}", raw=b"")
            else:
                cols = [c for c in (cfg.text_field, cfg.id_field, cfg.source_field) if c and c in names]
                for batch in pf.iter_batches(batch_size=cfg.batch_rows, columns=cols):
                    d = batch.to_pydict()
                    texts = d[cfg.text_field]
                    ids = d.get(cfg.id_field) if cfg.id_field else None
                    srcs = d.get(cfg.source_field) if cfg.source_field else None
                    for i, t in enumerate(texts):
                        row += 1
                        did = str(ids[i]) if ids is not None and ids[i] not in (None, "") else _default_id(split, row, 0)
                        src = srcs[i] if srcs is not None and isinstance(srcs[i], str) and srcs[i] else split["dataset"]
                        common = dict(id=did, source=src, line=row, offset=0, pos=row)
                        if isinstance(t, bytes):
                            try:
                                t_dec = t.decode("utf-8")
                            except UnicodeDecodeError as e:
                                rows.add(text=None, bad="invalid_utf8", detail=str(e)[:200], raw=t,
                                         bytes_in=len(t), **common)
                                continue
                            t = t_dec
                        if not isinstance(t, str):
                            rows.add(text=None, bad="missing_field", detail=f"{cfg.text_field!r} is null",
                                     raw=b"", bytes_in=0, **common)
                            continue
                        raw = t.encode("utf-8")
                        if len(raw) > cfg.max_doc_bytes:
                            rows.add(text=None, bad="too_long", detail=f"{len(raw)} bytes > max_doc_bytes",
                                     raw=raw, bytes_in=len(raw), **common)
                        elif "\x00" in t:
                            rows.add(text=None, bad="nul_byte", detail="NUL character", raw=raw,
                                     bytes_in=len(raw), **common)
                        elif t.strip():
                            rows.add_good(t, raw, bytes_in=len(raw), **common)
                        if rows.ready():
                            yield rows.take()
                if row == 0:
                    rows.add(id=_default_id(split, None, 0), text=None, source=split["dataset"], line=None,
                             offset=0, bytes_in=0, bad="empty_file", detail="no rows", raw=b"")
    except Exception as e:  # noqa: BLE001
        rows.add(id=_default_id(split, None, 0), text=None, source=split["dataset"], line=None, offset=0,
                 bytes_in=0, bad="corrupt_file" if row == 0 else "read_error",
                 detail=f"{type(e).__name__}: {e}"[:500], raw=b"")
        log.warning("%s: Parquet read failed after %d rows: %s", split["path"], row, e)
    rows.decide()
    if len(rows):
        yield rows.take()


def read_batch(batch: dict[str, Any], cfg: ReadConfig) -> Iterator[pa.Table]:
    """``map_batches`` UDF: a batch of rows whose ``splits`` column holds a JSON list of splits (a
    :func:`group_splits` group) -> streamed Arrow tables, split after split."""
    for group in batch["splits"]:
        for split in json.loads(str(group)):
            yield from read_split(split, cfg)


def local_path(path: str) -> bool:
    return "://" not in path or path.startswith("file://")


__all__ = ["ReadConfig", "SCHEMA", "BAD_REASONS", "file_format", "list_splits", "group_splits", "read_split",
           "read_batch", "TruncatedError", "local_path"]
