"""MinHash signatures and LSH banding for near-duplicate detection (pure numpy, no Ray).

    from polyko.data.minhash import MinHasher, optimal_bands
    h = MinHasher(num_perm=128, ngram=5, seed=42, bands=9, rows=13)
    sig, ok = h.signatures(["첫 번째 문서", "두 번째 문서"])    # uint32 [2, 128], has-shingles mask
    buckets = h.band_hashes(sig)                             # uint64 [2, 9]: one LSH bucket per band

Canonical forms (the input is already NFKC-normalised and cleaned by ``polyko.data.clean``):
* exact: whitespace runs collapsed to one space, ends stripped (so "a  b\\n" == "a b").
* near:  all whitespace removed and lower-cased before shingling. Korean word spacing (띄어쓰기) is
  notoriously inconsistent -- the North-Korean-orthography rewrites in our test data differ from the
  originals mostly in spacing -- so spacing must not make two documents look different.
Shingles are character ``ngram``-grams (default 5): one Hangul syllable block packs 2-3 jamo, so 5
syllables carry about what 12-15 Latin letters do (~1.5-2 Korean words), specific enough that unrelated
sentences share few shingles, short enough that a one-word edit changes only ~5 shingles.
Documents shorter than ``ngram`` get one shingle (the whole text); empty ones take part in exact dedup only.

Hashing: shingles are hashed with a polynomial rolling hash over Unicode code points (uint64,
wrap-around) finalised with splitmix64 to 32 bits -- stable across processes and machines (never
Python's salted ``hash()``); permutation i is Dietzfelbinger's multiply-add-shift
``((a_i * x + b_i) mod 2^64) >> 32`` with 64-bit a_i, b_i drawn from ``seed``: a strongly universal
(2-independent) family for 32-bit x, the same guarantee as datasketch's ``(a*x+b) mod (2^61-1)``,
in two passes over uint64 (multiply, add) where the Mersenne reduction took five; the minima are taken
on the uint64 values and only they are shifted (``>> 32`` is monotone). Bands x rows come from
:func:`optimal_bands`, the minimiser of the weighted false-positive + false-negative areas of the LSH
S-curve (datasketch's ``_optimal_param``; ``threshold=0.8, num_perm=128`` gives 9 bands x 13 rows).
Cost: ~0.6-1.1 ns per (shingle, permutation) on one core, i.e. ~0.1-0.14 us per character at
num_perm=128, shingling included (measured on 14.8M characters of the shared corpus).
Run on a CPU: ``python -c "from polyko.data.minhash import *; print(optimal_bands(0.8, 128))"``.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np

_S32 = np.uint64(32)
_POLY = np.uint64(0x100000001B3)  # FNV-64 prime: odd, so the rolling hash is a bijection per step
# Shingles per MinHash tile (see MinHasher.signatures).
_CHUNK = 1 << 13


def optimal_bands(threshold: float, num_perm: int, false_positive_weight: float = 0.5) -> tuple[int, int]:
    """(bands, rows) minimising w * FP + (1 - w) * FN, where FP = int_0^t P(s) ds and FN = int_t^1 1 - P(s) ds
    are the areas of the LSH S-curve P(s) = 1 - (1 - s^r)^b on the wrong side of ``threshold``: the same
    objective as datasketch's ``MinHashLSH._optimal_param`` (which integrates with scipy's quad; we use
    a 2001-point Simpson rule per side, error < 1e-9 -- far below the gaps between candidates)."""
    w = false_positive_weight
    n = 2001  # odd: Simpson

    def simpson(lo: float, hi: float, f) -> np.ndarray:
        s = np.linspace(lo, hi, n)
        y = f(s)
        coef = np.ones(n)
        coef[1:-1:2], coef[2:-1:2] = 4.0, 2.0
        return (y * coef).sum(axis=-1) * (hi - lo) / (3 * (n - 1))

    best, opt = math.inf, (0, 0)
    for b in range(1, num_perm + 1):
        r = np.arange(1, num_perm // b + 1, dtype=np.float64)[:, None]
        fp = simpson(0.0, threshold, lambda s: 1 - (1 - s[None, :] ** r) ** b)
        fn = simpson(threshold, 1.0, lambda s: (1 - s[None, :] ** r) ** b)
        err = w * fp + (1 - w) * fn
        i = int(np.argmin(err))
        if err[i] < best:
            best, opt = float(err[i]), (b, i + 1)
    return opt


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser (uint64 -> uint64, a bijection with full avalanche). Wraps mod 2^64."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def int_hashes(arr, salt: int = 0) -> np.ndarray:
    """splitmix64 of every value of an integer Arrow array xor ``salt`` (uint64; a value's bits read as
    unsigned 64-bit): stable across processes, ~10 ns a value."""
    import pyarrow as pa

    wide = pa.uint64() if pa.types.is_unsigned_integer(arr.type) else pa.int64()
    x = arr.cast(wide).to_numpy(zero_copy_only=False).view(np.uint64)
    return _splitmix64(x ^ np.uint64(salt) if salt else x)


def exact_canonical(text: str) -> str:
    """The form exact dedup hashes: whitespace runs collapsed to one space, ends stripped."""
    return " ".join(text.split())


def near_canonical(text: str, ignore_spaces: bool = True) -> str:
    """The form near dedup shingles: lower-cased, whitespace removed (or collapsed), NULs dropped."""
    return ("" if ignore_spaces else " ").join(text.replace("\x00", "").split()).lower()


# Joins a batch for the canonical forms: not whitespace (str.split keeps it), not cased and not
# case-ignorable (str.lower's final-sigma rule looks across neither), not NUL (dropped by near_canonical):
# so each document's canonical form is computed exactly as on its own, in a few C-level passes over
# the batch instead of ~5 Python-level calls per document.
_SEP = "\x01"


def _batch_ok(texts: list[str]) -> bool:
    return len(texts) > 1 and all(type(t) is str for t in texts)


def near_canonical_batch(texts: list[str], ignore_spaces: bool = True) -> list[str]:
    """``[near_canonical(t, ignore_spaces) for t in texts]``, computed on the joined batch."""
    if _batch_ok(texts):
        joined = _SEP.join(texts)
        if joined.count(_SEP) == len(texts) - 1:  # no text holds the separator itself
            if ignore_spaces:
                out = "".join(joined.replace("\x00", "").split()).lower().split(_SEP)
            else:
                out = [" ".join(p.split()) for p in joined.replace("\x00", "").lower().split(_SEP)]
            return out
    return [near_canonical(t, ignore_spaces) for t in texts]


def exact_key(text: str) -> bytes:
    """128-bit blake2b of the exact canonical form (64 bits would collide with ~3% odds at 1e9 docs)."""
    return hashlib.blake2b(exact_canonical(text).encode("utf-8"), digest_size=16).digest()


def shingles(text: str, ngram: int, ignore_spaces: bool = True) -> set[str]:
    """The shingle set MinHash estimates Jaccard on (reference implementation for verification/tests)."""
    t = near_canonical(text, ignore_spaces)
    if not t:
        return set()
    if len(t) < ngram:
        return {t}
    return {t[i:i + ngram] for i in range(len(t) - ngram + 1)}


def jaccard(a: str, b: str, ngram: int = 5, ignore_spaces: bool = True) -> float:
    """True Jaccard similarity of two texts' shingle sets (0.0 when both are empty)."""
    sa, sb = shingles(a, ngram, ignore_spaces), shingles(b, ngram, ignore_spaces)
    return len(sa & sb) / len(sa | sb) if sa or sb else 0.0


class MinHasher:
    """Vectorised MinHash + LSH band hashes for a batch of texts. Picklable, plain numpy state."""

    def __init__(self, *, num_perm: int, ngram: int, seed: int, bands: int, rows: int, ignore_spaces: bool = True):
        assert bands * rows <= num_perm
        self.num_perm, self.ngram, self.bands, self.rows = num_perm, ngram, bands, rows
        self.ignore_spaces = ignore_spaces
        rng = np.random.default_rng(seed)
        top = np.iinfo(np.uint64).max
        self.a = rng.integers(1, top, size=num_perm, dtype=np.uint64, endpoint=True)[:, None]
        self.b = rng.integers(0, top, size=num_perm, dtype=np.uint64, endpoint=True)[:, None]
        self.band_seed = _splitmix64(np.arange(bands, dtype=np.uint64) + np.uint64(seed) * np.uint64(1 << 20))

    def shingle_hashes(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(32-bit shingle hashes as uint64, shingle count per text). Hashes of text d are contiguous."""
        n = self.ngram
        canon = near_canonical_batch(texts, self.ignore_spaces)
        lens = np.fromiter((len(t) for t in canon), dtype=np.int64, count=len(canon))
        counts = np.where(lens >= n, lens - n + 1, (lens > 0).astype(np.int64))
        if counts.sum() == 0:
            return np.zeros(0, np.uint64), counts
        pad = "\x00" * (n - 1)  # texts shorter than n hash as text + NUL padding; NULs never occur in canon
        cps = np.frombuffer((pad.join(canon) + pad).encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
        m = cps.size - n + 1
        h = np.zeros(m, dtype=np.uint64)
        for j in range(n):  # polynomial hash of every window, uint64 wrap-around
            h = h * _POLY + cps[j:j + m]
        starts = np.concatenate([[0], np.cumsum(lens + n - 1)[:-1]])
        first = np.cumsum(counts) - counts
        pos = np.repeat(starts - first, counts) + np.arange(int(counts.sum()))
        return _splitmix64(h[pos]) >> np.uint64(32), counts

    def signatures(self, texts: list[str], perms: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(signatures uint32 [len(texts), perms], has_shingles bool). Empty texts get all-0xFFFFFFFF.
        ``perms``: only the first ``perms`` permutations (default all ``num_perm``); the band hashes
        read the first ``bands * rows`` only (117 of 128 at the defaults: 9 % of the work)."""
        perms = self.num_perm if perms is None else perms
        assert 0 < perms <= self.num_perm
        x, counts = self.shingle_hashes(texts)
        sig = np.full((len(texts), perms), 0xFFFFFFFF, dtype=np.uint32)
        if x.size == 0:
            return sig, counts > 0
        doc_of = np.repeat(np.arange(len(texts)), counts)
        a, b = self.a[:perms], self.b[:perms]
        # In-place passes over a perms x _CHUNK tile of uint64 (117 x 8192 x 8 B = 7.7 MB), ~7x faster
        # than fresh temporaries: multiply and add wrap around mod 2^64. The minima run on the uint64
        # values and only they are shifted to their high 32 bits (the universal part of
        # multiply-add-shift): ``>> 32`` is monotone, so min(y >> 32) == min(y) >> 32, and one pass over
        # the tile is saved (35 % of the signature time; 8192-shingle tiles another 20 % over 4096: fewer
        # reduceat calls, measured on the shared corpus).
        y = np.empty((perms, _CHUNK), np.uint64)
        for c0 in range(0, x.size, _CHUNK):
            xs, docs = x[c0:c0 + _CHUNK], doc_of[c0:c0 + _CHUNK]
            yy = y[:, : xs.size]
            np.multiply(a, xs[None, :], out=yy)
            yy += b
            cuts = np.flatnonzero(np.r_[True, docs[1:] != docs[:-1]])
            mins = (np.minimum.reduceat(yy, cuts, axis=1).T >> _S32).astype(np.uint32)
            d = docs[cuts]  # unique within the chunk (each text's shingles are contiguous)
            sig[d] = np.minimum(sig[d], mins)
        return sig, counts > 0

    def band_hashes(self, sig: np.ndarray) -> np.ndarray:
        """uint64 [n, bands]: band k's hash of rows k*r..k*r+r-1, salted by k (buckets of different bands never mix)."""
        v = sig[:, : self.bands * self.rows].astype(np.uint64).reshape(len(sig), self.bands, self.rows)
        h = np.broadcast_to(self.band_seed, (len(sig), self.bands)).copy()
        for j in range(self.rows):
            h = _splitmix64(h ^ v[:, :, j])
        return h

