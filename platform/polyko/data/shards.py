"""Packed token shards: the on-disk format between the data pipeline and the trainer.

Layout of a ``tokens/`` directory (local path or any fsspec URL such as ``s3://bucket/run/tokens``):

    manifest.json          written LAST: its presence is what commits the dataset
    shard-00000.bin        raw little-endian ``dtype`` array of shape (num_sequences, seq_len)
    shard-00001.bin        ...

``manifest.json`` (``format: "polyko-tokens-v1"``) holds ``seq_len``, ``dtype`` (``uint16`` while
the vocabulary fits, else ``uint32``), ``num_sequences``, ``shards`` (``[{file, num_sequences}]``
in global order) and whatever the writer adds (tokenizer hash, tokens per source, tokens dropped).

Sample ``i`` of the whole dataset is one seek + one read of ``seq_len * itemsize`` bytes
(``np.memmap`` locally, a ranged read remotely): the trainer indexes by global position, so
resuming is "skip to step" and shuffling is a permutation of indices.

Run on a CPU: ``python -c "from polyko.data.shards import TokenShards; print(len(TokenShards('out/tokens')))"``
"""

from __future__ import annotations

import bisect
import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

FORMAT = "polyko-tokens-v1"
MANIFEST = "manifest.json"


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits (vocab <= 65,536), else uint32: halves disk and I/O."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.bin"


def is_remote(path: str | os.PathLike) -> bool:
    """An object-store/fsspec URL (``s3://...``), as opposed to a local path or ``file://``."""
    path = str(path)
    return "://" in path and not path.startswith("file://")


def write_shard(out_dir: str | os.PathLike, index: int, sequences: np.ndarray) -> dict[str, Any]:
    """Write one shard (``sequences``: 2-D array, already in the manifest dtype). Atomic: written
    to a temporary name then renamed, so a crash never leaves a half shard under the final name.
    Returns the manifest entry."""
    assert sequences.ndim == 2, sequences.shape
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    final = out / shard_name(index)
    tmp = out / (final.name + ".tmp")
    np.ascontiguousarray(sequences).astype(sequences.dtype.newbyteorder("<"), copy=False).tofile(tmp)
    tmp.replace(final)
    return {"file": final.name, "num_sequences": int(sequences.shape[0])}


def write_manifest(out_dir: str | os.PathLike, shards: Sequence[dict[str, Any]], *, seq_len: int,
                   dtype: np.dtype | str, **extra: Any) -> dict[str, Any]:
    """Commit a token dataset: ``shards`` in global order. Written last, atomically."""
    manifest = {"format": FORMAT, "seq_len": int(seq_len), "dtype": np.dtype(dtype).name,
                "num_sequences": int(sum(s["num_sequences"] for s in shards)), "shards": list(shards), **extra}
    out = Path(out_dir)
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, ensure_ascii=False))
    tmp.replace(out / MANIFEST)
    return manifest


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    path = str(path)
    if is_remote(path):
        import fsspec

        with fsspec.open(path.rstrip("/") + "/" + MANIFEST, "r") as f:
            m = json.load(f)
    else:
        f = Path(path.removeprefix("file://")) / MANIFEST
        if not f.is_file():
            raise ValueError(f"{path} is not a committed token dataset: no {MANIFEST} "
                             "(run jobs/prepare_data.py with --tokenizer, and let it finish)")
        m = json.loads(f.read_text())
    if m.get("format") != FORMAT:
        raise ValueError(f"{path}/{MANIFEST}: unknown format {m.get('format')!r}, expected {FORMAT!r}")
    return m


class TokenShards:
    """Random access to packed sequences by global index. Picklable (opens files lazily), so it
    can be shipped to Ray workers; each process keeps its own memmaps/file handles."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        self.manifest = read_manifest(self.path)
        self.seq_len: int = self.manifest["seq_len"]
        self.dtype = np.dtype(self.manifest["dtype"])
        self._files = [s["file"] for s in self.manifest["shards"]]
        counts = [s["num_sequences"] for s in self.manifest["shards"]]
        # global index of each shard's row 0 (ints even with no shard: a validation set whose sources held
        # less than a row each has none, and len() must then be 0, not 0.0)
        self._starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).tolist()
        self._handles: dict[int, Any] = {}

    def __len__(self) -> int:
        return self._starts[-1]

    def __getstate__(self):
        return {"path": self.path}

    def __setstate__(self, state):
        self.__init__(state["path"])

    def _locate(self, i: int) -> tuple[int, int]:
        if not 0 <= i < len(self):
            raise IndexError(f"sequence {i} out of range [0, {len(self)})")
        shard = bisect.bisect_right(self._starts, i) - 1
        return shard, i - self._starts[shard]

    def _handle(self, shard: int):
        h = self._handles.get(shard)
        if h is None:
            if is_remote(self.path):
                import fsspec

                h = fsspec.open(self.path.rstrip("/") + "/" + self._files[shard], "rb").open()
            else:
                f = Path(self.path.removeprefix("file://")) / self._files[shard]
                n = self._starts[shard + 1] - self._starts[shard]
                h = np.memmap(f, dtype=self.dtype.newbyteorder("<"), mode="r", shape=(n, self.seq_len))
            self._handles[shard] = h
        return h

    def __getitem__(self, i: int) -> np.ndarray:
        """Sequence ``i`` as a 1-D array of ``seq_len`` token ids (the manifest dtype)."""
        shard, row = self._locate(int(i))
        h = self._handle(shard)
        if isinstance(h, np.memmap):
            return np.asarray(h[row])
        nbytes = self.seq_len * self.dtype.itemsize
        h.seek(row * nbytes)
        return np.frombuffer(h.read(nbytes), dtype=self.dtype.newbyteorder("<"))

    def batch(self, indices: Sequence[int]) -> np.ndarray:
        """Rows ``indices`` stacked as int64 (ready for ``torch.from_numpy``), shape (len, seq_len)."""
        return np.stack([self[i] for i in indices]).astype(np.int64)
