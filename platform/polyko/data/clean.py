"""Per-document cleaning for the Korean corpus pipeline: normalize -> filter -> mask PII.

This is the function the Ray Data pipeline (``polyko.data.pipeline``) maps over every document::

    from polyko.data.clean import CleanConfig, clean_text
    r = clean_text("<p>연락처 010-1234-5678 ㅋㅋㅋㅋㅋㅋ</p> 정말 재미있는 영화였어요", CleanConfig())
    r.text    # '연락처 <|tel|> ㅋㅋㅋ\\n정말 재미있는 영화였어요'
    r.reason  # None (kept); otherwise one of FILTER_RULES
    r.pii     # {'tel': 1}

The three steps live in one module each (``normalize``, ``filters``, ``pii``); this module composes
them and re-exports their configs. ``clean_text`` is pure and does no I/O: regexes are compiled at
import time, so it is safe and cheap inside ``map_batches`` on any worker. The filters decide on the
normalized text with its PII removed (an e-mail address must not count as Latin letters, nor
``<|tel|>`` as markup), so PII is located before the filter decision; a dropped document's masked
text is discarded (``pii`` is then empty).

``SAMPLE_DIR`` is a small, deliberately dirty Korean corpus written for polyko (HTML, fake PII,
duplicates, ㅋㅋㅋ runs, code, non-Korean lines) used by the quickstart and the tests.
Run on a CPU: ``python -m polyko.data.clean "텍스트..."`` prints the result as JSON.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from polyko.data.filters import FILTER_RULES, FilterConfig, filter_reason
from polyko.data.normalize import NormalizeConfig, normalize_text
from polyko.data.pii import PII_KINDS, PII_TOKENS, PIIConfig, mask_pii, may_contain_pii

__all__ = [
    "CleanConfig", "CleanResult", "FILTER_RULES", "FilterConfig", "NormalizeConfig", "PIIConfig", "PII_KINDS",
    "PII_TOKENS", "SAMPLE_DIR", "clean_text", "fast_decisions",
]

_TOKEN_RE = re.compile("|".join(re.escape(t) for t in PII_TOKENS.values()))

SAMPLE_DIR: Path = Path(__file__).parent / "sample"
"""The bundled dirty sample corpus (sample.jsonl, sample.txt, sample.jsonl.gz, bad.jsonl)."""


@dataclass
class CleanConfig:
    """Everything ``clean_text`` does, as one nested config (``--set clean.filters.min_chars=5``)."""

    normalize: NormalizeConfig = field(default_factory=NormalizeConfig)
    filters: FilterConfig = field(default_factory=FilterConfig)
    pii: PIIConfig = field(default_factory=PIIConfig)


@dataclass
class CleanResult:
    """Outcome for one document: ``text`` is None iff it was dropped, then ``reason`` names the rule."""

    text: str | None
    reason: str | None
    pii: dict[str, int] = field(default_factory=dict)
    """Masks applied by kind (``{"tel": 1}``); empty for dropped or PII-free documents."""


def clean_text(text: str, cfg: CleanConfig) -> CleanResult:
    """Normalize, filter, then mask PII in one document. Pure; never raises on odd text."""
    if not isinstance(text, str):
        # None / NaN from a missing column; bytes should have been decoded by the reader.
        return CleanResult(None, "empty", {})
    text = normalize_text(text, cfg.normalize)
    if may_contain_pii(text):  # ~2 % of web text; skips four regex scans for the rest
        text, counts = mask_pii(text, cfg.pii)
    else:
        counts = {}
    # The filters judge the content without the PII: an e-mail address must not count as Latin
    # letters (low_hangul) nor '<|tel|>' as markup symbols. Only PII-bearing texts pay for this.
    reason = filter_reason(_TOKEN_RE.sub("", text) if counts else text, cfg.filters)
    if reason is not None:
        return CleanResult(None, reason, {})
    return CleanResult(text, None, counts)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    text = " ".join(args) if args else sys.stdin.read()
    r = clean_text(text, CleanConfig())
    print(json.dumps({"text": r.text, "reason": r.reason, "pii": r.pii}, ensure_ascii=False))


if __name__ == "__main__":
    main()


# ---------------------------------------------------------------------------------------------------
# Batch fast path. On short documents (~100 B) the regexes themselves are cheap and the Python cost of
# calling ~15 of them per document dominates. ``fast_decisions`` settles, for a whole batch at once and
# with numpy over the batch's code points, every document that provably passes through
# ``normalize_text`` and ``mask_pii`` unchanged, and computes its ``filter_reason`` from per-document
# counts; every other document (HTML, entities, controls, odd or doubled spaces, several lines, a run
# the repeat rules would cut, digits that may be PII, '@', URLs, long texts for the n-gram rules, non-NFC
# text) is left to ``clean_text``. The per-character classes are taken from the very regexes of the
# per-document path (evaluated once over all code points), so the two paths cannot disagree on a
# character; ``tests/test_clean.py`` checks equality on the shared corpus and on adversarial text.

_D_DIRTY, _D_DIGIT, _D_HANGUL, _D_OTHER, _D_SYM, _D_URL = 1, 2, 4, 8, 16, 32
_CHAR_FLAGS = None


def _flags_of(chars: str):
    """uint8 flags of each character of ``chars``: DIRTY = control/invisible (``_CONTROL_RE``),
    whitespace other than ' ' (``str.split``'s), '<', '&', '@'; DIGIT = ``\\d``; HANGUL / OTHER / SYM =
    the classes the filters count; URL = ':' '/' 'w'. Taken from the very regexes of the per-document
    path (single-character classes, so neighbours do not matter)."""
    import numpy as np

    from polyko.data import filters, normalize

    flags = np.zeros(len(chars), np.uint8)
    for pat, bit in ((normalize._CONTROL_RE, _D_DIRTY), (_WS_RUN_RE, _D_DIRTY), (_DIGIT_RUN_RE, _D_DIGIT),
                     (filters._HANGUL_RE, _D_HANGUL), (filters._OTHER_LETTER_RE, _D_OTHER),
                     (filters._SYMBOL_RE, _D_SYM)):
        for m in pat.finditer(chars):
            flags[m.start():m.end()] |= bit
    for i, ch in enumerate(chars):
        if ch == " ":
            flags[i] &= ~np.uint8(_D_DIRTY)
        elif ch in "<&@":
            flags[i] |= _D_DIRTY
        elif ch in ":/w":
            flags[i] |= _D_URL
    return flags


_WS_RUN_RE = re.compile(r"\s+")
_DIGIT_RUN_RE = re.compile(r"\d+")


def _char_flags():
    """:func:`_flags_of` for the Basic Multilingual Plane (built once per process, ~20 ms); the few
    astral characters of a batch (emoji ...) are looked up per batch."""
    global _CHAR_FLAGS
    if _CHAR_FLAGS is None:
        _CHAR_FLAGS = _flags_of("".join(map(chr, range(0x10000))))
    return _CHAR_FLAGS


def _flags_at(cps):
    import numpy as np

    bmp = _char_flags()
    astral = cps > 0xFFFF
    if not astral.any():
        return bmp[cps]
    f = bmp[np.minimum(cps, 0xFFFF)]
    pos = np.flatnonzero(astral)
    uniq = np.unique(cps[pos])
    f[pos] = _flags_of("".join(map(chr, uniq.tolist())))[np.searchsorted(uniq, cps[pos])]
    return f


def _all_of_window(e, span: int):
    """r[j] = e[j:j+span].all() (length len(e) - span + 1), by doubling: ~log2(span) ANDs."""
    r, have = e, 1
    while have * 2 <= span:
        r = r[:-have] & r[have:]
        have *= 2
    if have < span:  # r[j] and r[j+span-have] together cover [j, j+span) since span - have < have
        r = r[:-(span - have)] & r[span - have:]
    return r


_PACK_BITS = 12
_PACKED_LUT = None


def _packed_lut():
    """flags -> int64 with 1 in the 12-bit field of each count (space, DIRTY, HANGUL, OTHER, SYM)."""
    global _PACKED_LUT
    if _PACKED_LUT is None:
        import numpy as np

        v = np.arange(256)
        lut = np.zeros(256, np.int64)
        for i, b in enumerate((_D_DIRTY, _D_HANGUL, _D_OTHER, _D_SYM), start=1):
            lut += ((v & b) != 0).astype(np.int64) << (_PACK_BITS * i)
        _PACKED_LUT = lut
    return _PACKED_LUT


def _fast_supported(cfg: CleanConfig) -> bool:
    n = cfg.normalize
    return n.nfc and n.strip_html and n.unescape_html and n.remove_control and n.collapse_whitespace


def fast_decisions(texts: list, cfg: CleanConfig):
    """``(decided, reasons)`` for a batch: ``decided[i]`` (numpy bool) means ``clean_text(texts[i], cfg)``
    returns the text unchanged with no PII and ``reasons[i]`` as its reason (None = kept); other
    documents (and non-strings) must go through ``clean_text``."""
    import unicodedata

    import numpy as np

    n_all = len(texts)
    decided = np.zeros(n_all, bool)
    reasons: list[str | None] = [None] * n_all
    if not n_all or not _fast_supported(cfg):
        return decided, reasons
    idx = np.fromiter((i for i, t in enumerate(texts) if type(t) is str), np.int64)
    if not idx.size:
        return decided, reasons
    docs = texts if idx.size == n_all else [texts[i] for i in idx]
    nd = len(docs)
    joined = "\n".join(docs)
    # NFC of 'a\nb' is NFC(a) + '\n' + NFC(b) ('\n' is a starter that composes with nothing), so one
    # check covers the batch; only a batch holding a non-NFC text pays per document
    if unicodedata.is_normalized("NFC", joined):
        ok = np.ones(nd, bool)
    else:
        ok = np.fromiter((unicodedata.is_normalized("NFC", t) for t in docs), bool, count=nd)
    cps = np.frombuffer(joined.encode("utf-32-le", "surrogatepass"), np.uint32)
    lens = np.fromiter(map(len, docs), np.int64, count=nd)
    starts = np.zeros(nd, np.int64)
    np.cumsum(lens[:-1] + 1, out=starts[1:])
    f = _flags_at(cps)

    def per_doc(bit_or_mask) -> np.ndarray:
        # ranges [start_i, start_{i+1}) hold doc i and its '\n' separator, which has only the DIRTY flag
        return np.add.reduceat(bit_or_mask, starts, dtype=np.int64) if cps.size else np.zeros(nd, np.int64)

    sp = cps == 0x20
    if lens.max(initial=0) < (1 << _PACK_BITS) - 1:
        # one pass: the five per-document counts packed into 12-bit fields of one int64 per character
        packed = per_doc(_packed_lut()[f] + sp)
        counts = [(packed >> (_PACK_BITS * i)) & ((1 << _PACK_BITS) - 1) for i in range(5)]
    else:  # a document of 4k+ characters: one pass per count
        counts = [per_doc(sp)] + [per_doc((f & b) != 0) for b in (_D_DIRTY, _D_HANGUL, _D_OTHER, _D_SYM)]
    spaces, dirty, hangul, other, sym = counts
    dirty[:-1] -= 1  # the separators
    ok &= dirty == 0

    def mark(pos: np.ndarray) -> None:
        # a window starting in document i (it may run into the next: a conservative mark)
        if pos.size:
            ok[np.searchsorted(starts, pos, "right") - 1] = False

    mark(np.flatnonzero(sp[:-1] & sp[1:]))  # '  ': collapsed by normalize_text
    nonempty = lens > 0
    edge = np.zeros(nd, bool)
    edge[nonempty] = sp[starts[nonempty]] | sp[starts[nonempty] + lens[nonempty] - 1]
    ok &= ~edge  # leading/trailing space: stripped
    d = (f & _D_DIGIT) != 0
    mark(np.flatnonzero(d[:-2] & d[1:-1] & d[2:]))  # 3 digits in a row: may_contain_pii
    # repeat rules: a k-char unit repeated n+1 times = cps[j] == cps[j+k] on k*n consecutive j
    reps = []
    if cfg.normalize.max_char_repeat:
        reps.append((1, cfg.normalize.max_char_repeat))
    if cfg.normalize.max_unit_repeat:
        reps += [(k, cfg.normalize.max_unit_repeat) for k in (2, 3, 4)]
    for k, n in reps:
        span = k * n
        if cps.size > k + span:
            mark(np.flatnonzero(_all_of_window(cps[:-k] == cps[k:], span)))
    # the URL rule ('://', 'www.') and leftover tags ('/>'): documents holding ':', '/' or 'w' are
    # looked at one by one (a few per cent)
    pos = np.flatnonzero(f & _D_URL)
    if pos.size:
        for j in np.unique(np.searchsorted(starts, pos, "right") - 1):
            if ok[j]:
                t = docs[j]
                if "://" in t or "www." in t or "/>" in t:
                    ok[j] = False

    nonspace = lens - spaces
    fc = cfg.filters
    reason = np.full(nd, None, object)
    undecided = np.ones(nd, bool)

    def fire(mask: np.ndarray, name: str) -> None:
        m = mask & undecided
        reason[m] = name
        undecided[m] = False

    fire(lens == 0, "empty")
    fire(nonspace < fc.min_chars, "too_short")
    if fc.max_chars:
        fire(lens > fc.max_chars, "too_long")
    if fc.min_hangul_ratio:
        with np.errstate(divide="ignore", invalid="ignore"):
            low = np.where(other == 0, hangul == 0, hangul / np.maximum(hangul + other, 1) < fc.min_hangul_ratio)
        fire(low, "low_hangul")
    if fc.max_symbol_ratio:
        with np.errstate(divide="ignore", invalid="ignore"):
            fire((sym >= fc.markup_min_symbols) & (sym / np.maximum(nonspace, 1) > fc.max_symbol_ratio), "markup")
    nw = spaces + 1  # single spaces only, none at the ends: words = spaces + 1
    rep = undecided & (spaces >= 3)
    ok &= ~(rep & (nw >= fc.ngram_min_words))  # the n-gram rules: per document
    rep &= nw < fc.ngram_min_words
    if fc.min_unique_word_ratio and rep.any():
        sel = np.flatnonzero(rep & ok)
        if sel.size:
            # ~0.3 us per document in C (split + set); a pyarrow group_by over the words cost 4x that
            distinct = np.fromiter((len(set(docs[j].split(" "))) for j in sel), np.int64, count=sel.size)
            fire_m = np.zeros(nd, bool)
            fire_m[sel] = distinct / nw[sel] < fc.min_unique_word_ratio
            fire(fire_m, "repetitive")
    decided[idx] = ok
    for j in np.flatnonzero(ok):
        reasons[idx[j]] = reason[j]
    return decided, reasons
