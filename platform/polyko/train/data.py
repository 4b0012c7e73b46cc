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


# ---------------------------------------------------------------------------------------------------
# Sources: per-source rows, weighted mixtures, the validation split.
#
# ``polyko.data.pack`` (layout 2) writes shards of a single source each and names it in the manifest
# (``shards[i].source``), so the rows of a source are a union of shard ranges.


def source_rows(manifest: dict) -> dict[str, np.ndarray] | None:
    """``{source: global row indices (int64, ascending)}`` from a manifest's per-shard ``source``;
    None when the shards do not name one (data packed before per-source rows: re-pack it)."""
    shards = manifest.get("shards", [])
    if not shards or any("source" not in s for s in shards):
        return None
    acc: dict[str, list[np.ndarray]] = {}
    row = 0
    for s in shards:
        n = int(s["num_sequences"])
        if n:
            acc.setdefault(s["source"], []).append(np.arange(row, row + n, dtype=np.int64))
        row += n
    return {k: np.concatenate(v) for k, v in sorted(acc.items())}


def _source_seed(seed: int, source: str) -> int:
    """A per-source sampler seed: independent permutations per source, a function of (seed, name)."""
    return int.from_bytes(hashlib.sha256(f"polyko-source:{seed}:{source}".encode()).digest()[:8], "little")


def _interleave(counts: list[int]) -> np.ndarray:
    """A block of ``sum(counts)`` positions holding source ``s`` exactly ``counts[s]`` times, spread
    evenly: source ``s``'s ``k``-th slot sits at the midpoint ``(k + 1/2) / counts[s]`` of the block, sorted
    (ties by source order). Every prefix of the block then holds each source within one sample of its
    share -- the same property as Megatron-LM's greedy ``build_blending_indices``, in closed form."""
    times = np.concatenate([(2 * np.arange(c) + 1) / (2.0 * c) for c in counts if c])
    src = np.concatenate([np.full(c, s, np.int64) for s, c in enumerate(counts) if c])
    # equal fractions divide to equal doubles (correct rounding) and distinct ones (denominators
    # < 2**26) differ by far more than an ulp: the order is exact and the same on every machine
    return src[np.lexsort((src, times))]


class MixtureSampler:
    """Position -> global row index, sampling sources with given weights (same interface as
    :class:`GlobalSampler`: ``indices(start, count)``, a pure function of position and seed).

    Positions come in blocks of ``block`` positions. Every block holds source ``s`` exactly
    ``counts[s]`` times (largest-remainder rounding of ``block * weight``; ``block`` is 1000, or more so
    every weighted source gets at least one slot), in the fixed even interleave of :func:`_interleave`, so
    the token share is exact at every block boundary and within one sample per source at any position.
    Position ``p`` is the ``k``-th sample of its source ``s`` (``k = (p // block) * counts[s] + slot``),
    which is row ``rows_s[perm(k)]`` of a per-source :class:`GlobalSampler` (own seed, a fresh permutation
    per epoch of that source): epochs per source are ``samples / rows``. Resume = skip to the position.

    ``mixture`` None or empty: sample in proportion to size, which is exactly :class:`GlobalSampler` over
    all rows (today's order, unchanged). Weights are normalised; unknown names, negative or
    non-finite weights and all-zero weights are a ValueError listing the sources.

    CPU: ``MixtureSampler(read_manifest("work/data/tokens"), {"news": 0.8, "wiki": 0.2}, seed=0).indices(0, 8)``
    """

    BLOCK = 1000

    def __init__(self, manifest: dict, mixture: dict[str, float] | None, seed: int, shuffle: bool = True):
        self.manifest, self.seed, self.shuffle = manifest, int(seed), shuffle
        self.n = int(manifest["num_sequences"])
        self.seq_len = int(manifest["seq_len"])
        rows = source_rows(manifest)
        self.rows: dict[str, np.ndarray] = rows or {}
        self.mixture = dict(mixture or {})
        if not self.mixture:
            self.sources = list(self.rows)
            self.weights: dict[str, float] = {s: len(r) / self.n for s, r in self.rows.items()}
            self._global = GlobalSampler(self.n, seed=seed, shuffle=shuffle)
            self._report_cache = (0, np.zeros(len(self.sources), np.int64))
            return
        self._global = None
        if rows is None:
            raise ValueError("a source mixture needs token data whose shards name their source (rows of one "
                             "source each): re-pack it with jobs/prepare_data.py")
        known = sorted(rows)
        unknown = sorted(set(self.mixture) - set(known))
        if unknown:
            raise ValueError(f"data.mixture names unknown source(s) {unknown}; the data's sources are {known}")
        bad = {k: v for k, v in self.mixture.items() if not (np.isfinite(float(v)) and float(v) >= 0)}
        if bad:
            raise ValueError(f"data.mixture weights must be finite and >= 0, got {bad}; sources: {known}")
        total = sum(float(v) for v in self.mixture.values())
        if total <= 0:
            raise ValueError(f"data.mixture weights are all zero ({self.mixture}); give at least one of {known} "
                             "a positive weight")
        self.sources = [s for s in known if float(self.mixture.get(s, 0.0)) > 0]
        self.weights = {s: float(self.mixture[s]) / total for s in self.sources}
        w = np.array([self.weights[s] for s in self.sources])
        self.block = max(self.BLOCK, int(np.ceil(1.0 / w.min())))
        raw = w * self.block
        counts = np.floor(raw).astype(np.int64)
        # largest remainder (ties: source order) -- the block is exact, every source >= 1 slot
        for i in np.argsort(-(raw - counts), kind="stable")[: self.block - int(counts.sum())]:
            counts[i] += 1
        self.counts = counts
        self.pattern = _interleave(counts.tolist())                       # slot -> source
        self.slot_rank = np.zeros(self.block, np.int64)                   # slot -> rank within its source
        for s in range(len(self.sources)):
            sel = self.pattern == s
            self.slot_rank[sel] = np.arange(int(sel.sum()))
        self._per_source = [GlobalSampler(len(self.rows[s]), seed=_source_seed(self.seed, s), shuffle=shuffle)
                            for s in self.sources]

    def source_samples(self, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """(source index into ``self.sources``, that source's sample number) of positions [start, start+count)."""
        pos = np.arange(start, start + count, dtype=np.int64)
        if self._global is not None:
            raise ValueError("a proportional sampler has no per-source sample numbers")
        blk, slot = np.divmod(pos, self.block)
        src = self.pattern[slot]
        return src, blk * self.counts[src] + self.slot_rank[slot]

    def indices(self, start: int, count: int) -> np.ndarray:
        """Global row indices of positions ``[start, start + count)`` (int64)."""
        if self._global is not None:
            return self._global.indices(start, count)
        src, k = self.source_samples(start, count)
        out = np.empty(count, dtype=np.int64)
        for s in np.unique(src):
            sel = src == s
            kk = k[sel]
            lo = int(kk.min())
            local = self._per_source[s].indices(lo, int(kk.max()) - lo + 1)[kk - lo]
            out[sel] = self.rows[self.sources[s]][local]
        return out

    def samples_per_source(self, positions: int) -> dict[str, int]:
        """Samples each source contributed to positions ``[0, positions)`` (exact)."""
        if self._global is None:
            full, rest = divmod(int(positions), self.block)
            part = np.bincount(self.pattern[:rest], minlength=len(self.sources))
            return {s: int(full * self.counts[i] + part[i]) for i, s in enumerate(self.sources)}
        if not self.rows:
            return {"all": int(positions)}
        # proportional (GlobalSampler order): count the rows drawn; incremental, in bounded pieces
        done, acc = self._report_cache
        if positions < done:
            done, acc = 0, np.zeros(len(self.sources), np.int64)
        owner = np.empty(self.n, np.int64)
        for i, s in enumerate(self.sources):
            owner[self.rows[s]] = i
        acc = acc.copy()
        for a in range(done, int(positions), 1 << 20):
            idx = self._global.indices(a, min(1 << 20, int(positions) - a))
            acc += np.bincount(owner[idx], minlength=len(self.sources))
        self._report_cache = (int(positions), acc)
        return {s: int(acc[i]) for i, s in enumerate(self.sources)}


def mixture_report(sampler: MixtureSampler, positions_consumed: int) -> dict[str, dict[str, float]]:
    """Per source, after ``positions_consumed`` global positions: ``samples``, ``tokens`` (samples *
    seq_len), ``share`` of the tokens seen, target ``weight``, ``rows`` and ``epochs`` (samples / rows:
    above 1, the source is being repeated)."""
    got = sampler.samples_per_source(positions_consumed)
    total = max(1, sum(got.values()))
    out = {}
    for s, n in got.items():
        rows = len(sampler.rows[s]) if s in sampler.rows else sampler.n
        out[s] = {"samples": n, "tokens": n * sampler.seq_len, "share": n / total,
                  "weight": sampler.weights.get(s, 1.0), "rows": rows, "epochs": n / rows if rows else 0.0}
    return out


def make_sampler(data_path: str, seed: int, shuffle: bool = True,
                 mixture: dict[str, float] | None = None) -> MixtureSampler:
    """The training loop's sampler for the token data at ``data_path`` (``DIR`` or ``DIR/tokens``)."""
    return MixtureSampler(read_manifest(resolve_tokens_dir(data_path)), mixture, seed=seed, shuffle=shuffle)


def resolve_validation_dir(data_path: str) -> str | None:
    """The validation set packed beside the training tokens: ``DIR/validation`` for data at ``DIR`` or
    ``DIR/tokens`` (the training manifest's ``validation.dir`` when it names one); None if absent."""
    tokens = resolve_tokens_dir(data_path)
    if is_remote(tokens):
        import fsspec

        cand = tokens.rstrip("/").rsplit("/", 1)[0] + "/validation"   # the pipeline's DIR/validation
        fs, p = fsspec.core.url_to_fs(cand)
        return cand if fs.exists(p.rstrip("/") + "/" + MANIFEST) else None
    t = Path(tokens.removeprefix("file://"))
    cands = []
    try:
        rel = (read_manifest(str(t)).get("validation") or {}).get("dir")
        if rel:
            cands.append((t / rel).resolve())
    except ValueError:
        pass
    cands += [t.parent / "validation", t / "validation"]
    for c in cands:
        if (c / MANIFEST).is_file():
            return str(c)
    return None


class ValidationSet:
    """The held-out validation rows (``polyko.data.pack`` with ``validation_share > 0``).

    ``shards``: :class:`TokenShards`; ``sources``: ``{source: row indices}``; ``tokens`` / ``bytes``:
    ``{source: int}`` -- the tokens the rows hold and the UTF-8 text bytes they cover (the documents'
    text pro-rated for the row-end tokens dropped, see ``polyko.data.pack``).
    """

    def __init__(self, shards: TokenShards):
        self.shards = shards
        self.manifest = shards.manifest
        rows = source_rows(self.manifest) or {}
        self.sources: dict[str, np.ndarray] = rows
        per = self.manifest.get("per_source", {})
        self.tokens = {s: int(per[s]["tokens"]) if s in per else len(r) * shards.seq_len for s, r in rows.items()}
        self.bytes = {s: int(per.get(s, {}).get("bytes", 0)) for s in rows}

    def eval_rows(self, max_rows_per_source: int | None, seed: int = 0) -> dict[str, np.ndarray]:
        """A fixed subset per source, the same at every evaluation: ``min(max_rows, rows)`` rows drawn by
        a seeded permutation (a function of ``seed`` and the source name), ascending. None = all rows."""
        out = {}
        for s, r in self.sources.items():
            k = len(r) if max_rows_per_source is None else min(int(max_rows_per_source), len(r))
            pick = GlobalSampler(len(r), seed=_source_seed(seed, s), shuffle=True).indices(0, k)
            out[s] = np.sort(r[pick])
        return out

    def bits_per_byte(self, loss_per_token_by_source: dict[str, float]) -> dict[str, float]:
        """``{source: bits per UTF-8 byte}`` from the mean loss (nats per predicted token) of each source:
        ``loss * tokens / (ln 2 * bytes)`` with the source's tokens and bytes of the whole validation set
        (an evaluation subset drawn uniformly from the rows estimates the same ratio)."""
        out = {}
        for s, loss in loss_per_token_by_source.items():
            if s not in self.sources:
                raise ValueError(f"no validation rows of source {s!r}; sources: {sorted(self.sources)}")
            if self.bytes[s] <= 0:
                raise ValueError(f"validation source {s!r} covers no text bytes")
            out[s] = float(loss) * self.tokens[s] / (np.log(2.0) * self.bytes[s])
        return out

    def overall_bits_per_byte(self, loss_per_token_by_source: dict[str, float]) -> float:
        """Bits per byte of the whole validation set: every source's nats (loss * its tokens) over all bytes."""
        nats = sum(float(v) * self.tokens[s] for s, v in loss_per_token_by_source.items())
        nbytes = sum(self.bytes[s] for s in loss_per_token_by_source)
        return nats / (np.log(2.0) * nbytes)


def open_validation(data_path: str, tokenizer_dir: str) -> ValidationSet | None:
    """The validation set beside the training tokens (checked against ``tokenizer_dir`` like
    :func:`open_tokens`); None when the data has none (packed without a split, or no rows held out)."""
    vdir = resolve_validation_dir(data_path)
    if vdir is None:
        return None
    vs = ValidationSet(open_tokens(vdir, tokenizer_dir))
    return vs if len(vs.shards) else None
