"""Deterministic data order for pretraining: a seeded global-index sampler over ``TokenShards``.

The dataset is an endless stream of *positions* 0, 1, 2, ...; position ``p`` is sample
``perm_e(p mod N)`` of epoch ``e = p // N``, where ``perm_e`` is a seeded pseudo-random permutation
of ``range(N)`` (a keyed Feistel network with cycle walking: O(1) memory and time per index, so a
billion-sequence dataset costs no permutation table). Optimizer step ``s`` consumes positions
``[s*G, (s+1)*G)`` for a global batch of ``G`` sequences; worker ``r`` of ``w`` takes the next
``G // w`` positions (one more for the first ``G % w`` workers), so the ``w`` slices tile the step's
range in rank order whether or not ``w`` divides ``G``. The set of samples in a step is therefore
independent of the worker count: resuming (also on a different number of workers) is "skip to step",
with no sample repeated or skipped.

CPU check: ``python -c "from polyko.train.data import GlobalSampler as S; print(S(10, seed=0).indices(0, 10))"``
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from polyko.data.shards import MANIFEST, TokenShards, is_remote, read_manifest

_MASK32 = np.uint64(0xFFFFFFFF)


def _mix(x: np.ndarray, key: np.uint64) -> np.ndarray:
    """splitmix64-style round function on uint64 arrays (wrapping arithmetic is intended)."""
    with np.errstate(over="ignore"):
        z = (x + key) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


class GlobalSampler:
    """Position -> sample index; a fresh seeded permutation per epoch (``shuffle=False``: identity)."""

    ROUNDS = 4

    def __init__(self, num_samples: int, seed: int, shuffle: bool = True):
        if num_samples < 1:
            raise ValueError("the token dataset is empty")
        self.n = int(num_samples)
        self.seed = int(seed)
        self.shuffle = shuffle
        bits = max(2, int(np.ceil(np.log2(self.n))))
        self.half = (bits + 1) // 2            # domain 2^(2*half) >= n: at most 4n, so ~<4 walks per index
        self.half_mask = np.uint64((1 << self.half) - 1)

    def _keys(self, epoch: int) -> list[np.uint64]:
        h = hashlib.sha256(f"polyko-sampler:{self.seed}:{epoch}".encode()).digest()
        return [np.uint64(int.from_bytes(h[8 * i:8 * i + 8], "little")) for i in range(self.ROUNDS)]

    def _permute(self, x: np.ndarray, keys: list[np.uint64]) -> np.ndarray:
        sh = np.uint64(self.half)
        left, right = x >> sh, x & self.half_mask
        for k in keys:
            left, right = right, left ^ (_mix(right, k) & self.half_mask)
        return (left << sh) | right

    def indices(self, start: int, count: int) -> np.ndarray:
        """Sample indices of positions ``[start, start + count)`` (int64)."""
        pos = np.arange(start, start + count, dtype=np.int64)
        if not self.shuffle:
            return pos % self.n
        out = np.empty(count, dtype=np.int64)
        epochs = pos // self.n
        for e in np.unique(epochs):
            sel = epochs == e
            keys = self._keys(int(e))
            x = (pos[sel] % self.n).astype(np.uint64)
            y = self._permute(x, keys)
            bad = y >= np.uint64(self.n)
            while bad.any():                    # cycle walking keeps it a bijection on range(n)
                y[bad] = self._permute(y[bad], keys)
                bad = y >= np.uint64(self.n)
            out[sel] = y.astype(np.int64)
        return out


def worker_positions(step: int, rank: int, global_batch: int, world_size: int) -> tuple[int, int]:
    """``(start, count)`` of the positions worker ``rank`` reads at optimizer ``step``: consecutive slices
    of ``G // w`` or ``G // w + 1`` positions (the larger ones first), tiling the step's ``G`` positions."""
    assert 1 <= world_size <= global_batch and 0 <= rank < world_size, (rank, world_size, global_batch)
    per, extra = divmod(global_batch, world_size)
    return step * global_batch + rank * per + min(rank, extra), per + (1 if rank < extra else 0)


# Manifest keys that define the token stream (paths and statistics do not: moved data is the same data).
_IDENTITY_KEYS = ("format", "seq_len", "dtype", "num_sequences", "shards", "tokenizer_hash", "pack_key")


def manifest_hash(data_path: str) -> str:
    """Identity of a packed token dataset: the canonical-JSON hash of its manifest's identity keys (shards in
    order with their row counts, seq_len, dtype, tokenizer hash, and the pipeline's ``pack_key`` -- itself a
    hash of the input files, tokenizer and packing settings). Checkpoints record it; a resume on other
    data is refused."""
    from polyko.config import config_hash

    m = read_manifest(resolve_tokens_dir(data_path))
    return config_hash({k: m[k] for k in _IDENTITY_KEYS if k in m}, 16)


def resolve_tokens_dir(path: str) -> str:
    """``DIR`` or ``DIR/tokens``: whichever holds the manifest (the pipeline writes ``DIR/tokens``)."""
    if is_remote(path):
        return path
    p = Path(path.removeprefix("file://"))
    if not (p / MANIFEST).is_file() and (p / "tokens" / MANIFEST).is_file():
        p = p / "tokens"
    return str(p)


def tokenizer_hash(tokenizer_dir: str) -> str:
    """The tokenizer's identity as recorded in token manifests (``polyko.tokenizer.tokenizer_hash``)."""
    from polyko.tokenizer import tokenizer_hash as th

    return th(tokenizer_dir)


def tokenizer_size(tokenizer_dir: str) -> int:
    """Number of token ids of a tokenizer dir (``tokenizer.json``), added tokens included."""
    from tokenizers import Tokenizer

    f = Path(tokenizer_dir) / "tokenizer.json"
    if not f.is_file():
        raise ValueError(f"{tokenizer_dir} has no tokenizer.json (pass the tokenizer dir the tokens were made with)")
    return Tokenizer.from_file(str(f)).get_vocab_size(with_added_tokens=True)


def open_tokens(data_path: str, tokenizer_dir: str) -> TokenShards:
    """Open the packed tokens and check they were made with ``tokenizer_dir`` (ValueError if not)."""
    path = resolve_tokens_dir(data_path)
    manifest = read_manifest(path)
    recorded = manifest.get("tokenizer_hash")
    if recorded is not None:
        actual = tokenizer_hash(tokenizer_dir)
        if recorded != actual:
            raise ValueError(f"token data {path} was made with tokenizer {recorded}, but --tokenizer {tokenizer_dir} "
                             f"is {actual}: pass the tokenizer the data was packed with (or re-pack the data)")
    shards = TokenShards(path)
    vocab = tokenizer_size(tokenizer_dir)
    max_id = manifest.get("max_token_id")
    if max_id is not None and max_id >= vocab:
        raise ValueError(f"token data {path} has ids up to {max_id} but the tokenizer has only {vocab}")
    return shards
