"""Document quality filters for Korean text (step 2 of ``polyko.data.clean``).

Each rule has a name (the ``reason`` a dropped document carries) and thresholds in
:class:`FilterConfig`. Polyglot-Ko's report names the categories it filtered (empty / too short,
too little Korean, repetitive, markup/code) but publishes no thresholds, so the defaults follow the
published English heuristics (Gopher = Rae et al. 2021 "MassiveText" quality filters, C4 = Raffel
et al. 2020, CCNet = Wenzek et al. 2020) adapted to Korean, where one whitespace word (eojeol)
carries roughly 1.5-2 English words and 3-4 syllables, and were checked on the shared real corpus
(see ``FilterConfig`` docstrings and the README for the drop counts).

Rules, evaluated cheapest first; the first that fires names the drop:

``empty``        nothing left after normalization.
``too_short``    fewer than ``min_chars`` non-space characters.
``too_long``     more than ``max_chars`` characters (runaway pages / concatenation bugs).
``low_hangul``   Hangul share of letters below ``min_hangul_ratio``.
``markup``       code/markup symbol share of non-space characters above ``max_symbol_ratio``.
``repetitive``   Gopher repetition: duplicate lines, top 2-4-gram share, duplicated 5-10-gram share;
                 for short texts, share of distinct words.

All counts are C-level (regex ``sub``/``str.count``/``Counter`` over words); there is no Python loop
over characters. CPU only.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

FILTER_RULES: tuple[str, ...] = ("empty", "too_short", "too_long", "low_hangul", "markup", "repetitive")


@dataclass
class FilterConfig:
    """Quality thresholds. 0 (or 0.0) disables a numeric rule unless stated otherwise."""

    min_chars: int = 10
    """Minimum non-space characters. 10 Korean characters is about 3 eojeol, the Korean counterpart of
    C4's "at least 3 words per line" and far below Gopher's 50-word document minimum (which would drop
    nearly all reviews and dialogue, the genres Polyglot-Ko deliberately included). Texts like "최고"
    or "굿굿" (half of the movie-review corpus is < 10 characters) carry no context for a 2048-token
    language model and are the most duplicated strings on the web; "최고의 영화!" (6) is dropped,
    "연출도 좋고 배우들 연기도 최고" (14) is kept. Lower it for chat-style corpora."""
    max_chars: int = 1_000_000
    """Maximum characters. Gopher drops documents over 100,000 words; 100k eojeol is about 450k-600k
    Korean characters, so 1M only catches broken concatenations. 0 = no limit."""
    min_hangul_ratio: float = 0.3
    """Minimum (Hangul syllables + jamo) / letters. Letters = Unicode letters (Hangul, Latin, Hanja,
    kana ...), so digits, punctuation and emoticons do not dilute it, and URLs are not counted.
    A Hangul syllable carries what 2-3 Latin letters do (an eojeol is ~3 syllables, an English word
    ~4.7 letters), so 0.3 means "at least about as many Korean words as foreign ones": it keeps
    '제이홉 사랑해 ♡ Happy birthday' (0.32) and news with English names and acronyms, and drops
    English/Japanese/Chinese documents, bilingual word lists and code. On the shared corpus 0.4
    would drop 20 % more documents, nearly all legitimate mixed-language comments. CCNet's fastText
    language-ID threshold (0.5) plays this role for other languages; a script ratio is exact and far
    cheaper for Korean, which has its own script."""
    max_symbol_ratio: float = 0.1
    """Maximum share of code/markup characters (``{ } [ ] = | \\ $`` and leftover tag names
    ``<div``, ``</span``, ``/>``; see ``_SYMBOL_RE``) in non-space characters. Gopher drops
    documents whose symbol-to-word ratio (``#``, ``...``) exceeds 0.1 and C4 drops pages with ``{``;
    Korean prose has well under 1 % of these, wiki markup, JSON, CSS, JS and leftover HTML 15-40 %."""
    markup_min_symbols: int = 5
    """The symbol rule needs at least this many symbols, so '<기생충> 최고' (title brackets) or a
    '[포토]' headline prefix never trips it on a short text."""
    max_dup_line_frac: float = 0.3
    """Gopher: drop when more than 30 % of the (non-empty) lines are duplicates of an earlier line."""
    max_dup_line_char_frac: float = 0.2
    """Gopher: ... or duplicate lines hold more than 20 % of the characters."""
    max_top_ngram_frac: tuple[float, ...] = (0.20, 0.18, 0.16)
    """Gopher: for n = 2, 3, 4, drop when the most frequent word n-gram (occurring at least twice)
    covers more than this share of the characters."""
    max_dup_ngram_frac: tuple[float, ...] = (0.15, 0.14, 0.13, 0.12, 0.11, 0.10)
    """Gopher: for n = 5 .. 10, drop when duplicated word n-grams cover more than this share."""
    ngram_min_words: int = 50
    """N-gram statistics only for texts with at least this many words -- Gopher's own minimum document
    length, for which its thresholds were set. On the shared corpus, applying them from 30 words on
    dropped 15 legitimate 30-50-word comments and news sentences (one repeated name or a rhetorical
    "그런데 이건 아니다." twice already covers 20 %) and caught no spam that the distinct-word rule
    below does not catch."""
    min_unique_word_ratio: float = 0.3
    """Short texts (4 <= words < ngram_min_words): drop when distinct words / words is below this
    ('좋아요 좋아요 좋아요 좋아요' = 0.25; '정말 정말 재밌어요' = 0.67 is kept)."""

    def __post_init__(self) -> None:
        if self.min_chars < 0 or self.max_chars < 0:
            raise ValueError("min_chars and max_chars must be >= 0")
        if self.max_chars and self.max_chars < self.min_chars:
            raise ValueError(f"max_chars ({self.max_chars}) < min_chars ({self.min_chars})")
        for name in ("min_hangul_ratio", "max_symbol_ratio", "max_dup_line_frac", "max_dup_line_char_frac",
                     "min_unique_word_ratio"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {v}")
        if len(self.max_top_ngram_frac) > 3:
            raise ValueError("max_top_ngram_frac holds thresholds for n = 2, 3, 4 (at most 3 values)")
        if len(self.max_dup_ngram_frac) > 6:
            raise ValueError("max_dup_ngram_frac holds thresholds for n = 5 .. 10 (at most 6 values)")


# Hangul syllables, compatibility jamo (ㅋ ㅠ), conjoining jamo left over by NFC.
_HANGUL_CLASS = "\uac00-\ud7a3\u3131-\u318e\u1100-\u11ff"
_HANGUL_RE = re.compile(f"[{_HANGUL_CLASS}]+")
_ANY_HANGUL_RE = re.compile(f"[{_HANGUL_CLASS}]")  # for search(): stops at the first syllable
# Unicode letters that are not Hangul: word chars minus digits, '_' and Hangul. Rare in Korean text,
# so this scan (and the Hangul count it guards) is cheap.
_OTHER_LETTER_RE = re.compile(f"[^\\W\\d_{_HANGUL_CLASS}]+")
_URL_RE = re.compile(r"(?:https?|ftp)://[!-~]+|www\.[!-~]+", re.IGNORECASE)
# Code/markup symbols. Not ';' '^' '>' '<' '~' '#' '/' '`': Korean writing uses them as emoticons,
# arrows and quotes ('^^;;', '>_<', 'A>>>B', '#해시태그', '8/10', news titles' `강식당2`) and
# '<기생충>' title brackets.
_SYMBOL_RE = re.compile(r"[{}\[\]=|\\$]+")
# Leftover tags ('&lt;div&gt;' unescaped after tag stripping, broken markup): '<' + ASCII name, '/>'.
_TAG_RE = re.compile(r"</?[A-Za-z][A-Za-z0-9:-]*|/>")


def _removed(pat: re.Pattern, text: str) -> int:
    """How many characters ``pat`` matches (C-level: length difference after ``sub``)."""
    return len(text) - len(pat.sub("", text))


def _dup_lines(text: str, cfg: FilterConfig) -> bool:
    lines = [ln for ln in text.split("\n") if ln]
    if len(lines) < 2:
        return False
    seen: set[str] = set()
    dup_n = dup_chars = total = 0
    for ln in lines:
        total += len(ln)
        if ln in seen:
            dup_n += 1
            dup_chars += len(ln)
        else:
            seen.add(ln)
    return (cfg.max_dup_line_frac and dup_n / len(lines) > cfg.max_dup_line_frac) or (
        cfg.max_dup_line_char_frac and dup_chars / total > cfg.max_dup_line_char_frac
    )


def _top_ngram_chars(words: list[str], n: int) -> int:
    """Characters covered by the most frequent n-gram (count x length), 0 if no n-gram repeats."""
    grams = Counter(zip(*(words[i:] for i in range(n))))
    gram, count = grams.most_common(1)[0]
    if count < 2:
        return 0
    return count * (sum(map(len, gram)) + n - 1)


def _dup_ngram_chars(words: list[str], n: int) -> int:
    """Gopher/datatrove: characters in n-grams that repeat an earlier one (scan skips past a repeat)."""
    grams = list(zip(*(words[i:] for i in range(n))))  # built in C; the scan below is O(words)
    seen: set[tuple[str, ...]] = set()
    dup = 0
    i, end = 0, len(grams)
    while i < end:
        gram = grams[i]
        if gram in seen:
            dup += sum(map(len, gram))
            i += n
        else:
            seen.add(gram)
            i += 1
    return dup


def _repeated_5gram_cover(words: list[str]) -> int:
    """Characters of the words covered by any 5-gram occurrence whose 5-gram occurred before."""
    lens = list(map(len, words))
    seen: set[tuple[str, ...]] = set()
    covered = end = 0
    for i, gram in enumerate(zip(words, words[1:], words[2:], words[3:], words[4:])):
        if gram in seen:
            covered += sum(lens[max(i, end):i + 5])
            end = i + 5
        else:
            seen.add(gram)
    return covered


def _repetitive(text: str, cfg: FilterConfig) -> bool:
    if "\n" in text and _dup_lines(text, cfg):
        return True
    words = text.split()
    nw = len(words)
    if nw < 4:
        return False
    if nw < cfg.ngram_min_words:
        return bool(cfg.min_unique_word_ratio) and len(set(words)) / nw < cfg.min_unique_word_ratio
    n_chars = len(text)
    for n, frac in enumerate(cfg.max_top_ngram_frac, start=2):
        if frac and _top_ngram_chars(words, n) / n_chars > frac:
            return True
    # Exact shortcut: every word that Gopher's scan counts for some n >= 5 lies in a 5-gram occurrence
    # that repeats an earlier 5-gram, so the chars covered by repeated 5-gram occurrences bound all six
    # shares. Below the smallest threshold (ordinary prose) one pass replaces six.
    floor = min((f for f in cfg.max_dup_ngram_frac if f), default=0.0)
    if floor and nw >= 10 and _repeated_5gram_cover(words) / n_chars <= floor:
        return False
    for n, frac in enumerate(cfg.max_dup_ngram_frac, start=5):
        if frac and nw >= 2 * n and _dup_ngram_chars(words, n) / n_chars > frac:
            return True
    return False


def filter_reason(text: str, cfg: FilterConfig) -> str | None:
    """Name of the first rule in ``FILTER_RULES`` that drops ``text`` (already normalized), or None."""
    n = len(text)
    if n == 0 or text.isspace():
        return "empty"
    nonspace = n - text.count(" ") - text.count("\n") - text.count("\t")
    if nonspace < cfg.min_chars:
        return "too_short"
    if cfg.max_chars and n > cfg.max_chars:
        return "too_long"
    if cfg.min_hangul_ratio:
        # URLs are not language: 'http://blog.naver.com/...' must not outweigh the Korean review.
        scored = _URL_RE.sub(" ", text) if ("://" in text or "www." in text) else text
        other = _removed(_OTHER_LETTER_RE, scored)
        if other == 0:
            if _ANY_HANGUL_RE.search(scored) is None:  # no letters at all: numbers, symbols, emoji
                return "low_hangul"
        else:
            hangul = _removed(_HANGUL_RE, scored)
            if hangul / (hangul + other) < cfg.min_hangul_ratio:
                return "low_hangul"
    if cfg.max_symbol_ratio:
        sym = _removed(_SYMBOL_RE, text)
        if "<" in text or "/>" in text:
            sym += _removed(_TAG_RE, text)
        if sym >= cfg.markup_min_symbols and sym / nonspace > cfg.max_symbol_ratio:
            return "markup"
    if (n - nonspace >= 3 or "\n" in text) and _repetitive(text, cfg):  # >= 4 words or several lines
        return "repetitive"
    return None
