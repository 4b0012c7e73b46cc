"""Morpheme-like segmentation with soynlp: where BPE merges are not allowed to cross.

Polyglot-Ko's tokenizer is a *morpheme-aware* byte-level BPE: before BPE training, the text was
cut into morphemes and a rare marker character, U+0CF1 (KANNADA SIGN JIHVAMULIYA, ``MARKER``),
was inserted at every boundary; the tokenizer's pre-tokenizer ``Split("\\u0cf1", Removed)`` turns
each morpheme into its own pre-token, so no learned merge spans two morphemes (the released
``tokenizer.json`` shows the mechanism; the Polyglot-Ko report used a morphological analyzer).

We have no dictionary-based analyzer here, so the boundaries come from soynlp's *unsupervised*
word extraction: :class:`soynlp.word.WordExtractor` learns cohesion and branching-entropy scores
from a bounded sample of the same corpus, then an ``LTokenizer`` (default: each Hangul word
-> L (stem / noun) + R (josa / ending), the usual Korean eojeol structure) or a
``MaxScoreTokenizer`` (several pieces per word) cuts every run of Hangul syllables.
Boundaries are also put between a Hangul run and an adjacent letter of another script
("GPT는" -> "GPT" | "는"): byte-level BPE's regex keeps all letters in one pre-token otherwise.
Digits, punctuation and whitespace are already separated by the byte-level regex.

Cost: soynlp trains in pure Python, about 150k characters/s on one core (the default sample of
200k sentences takes ~1 min and ~1-2 GB); segmenting is cached per distinct Hangul run, a few MB/s.

CPU example::

    python -c "from polyko.tokenizer.morph import *; s = MorphemeSegmenter.train(['학교에서 공부를 했다']*50, MorphConfig(min_frequency=2)); print(s.segment('학교에서 공부를 했다'))"
"""

from __future__ import annotations

import functools
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

MARKER = "\u0cf1"  # the boundary character of Polyglot-Ko's tokenizer (removed by its pre-tokenizer)
METHODS = ("ltokenizer", "maxscore", "none")
SCORES = ("cohesion", "cohesion_entropy")
MORPH_FILE = "morph.json"

_HANGUL_RUN = re.compile("[\uac00-\ud7a3]+")      # Hangul syllables only
_NOT_HANGUL = re.compile("[^\uac00-\ud7a3]+")


@dataclass
class MorphConfig:
    """How morpheme boundaries are found (soynlp, unsupervised)."""

    # "ltokenizer": one cut per Hangul word, L|R (soynlp LTokenizer); "maxscore": as many pieces as
    # scored sub-words fit (soynlp MaxScoreTokenizer, finer but splits unknown nouns more often);
    # "none": no morpheme boundaries at all (plain byte-level BPE, the ablation baseline).
    method: str = "ltokenizer"
    # Word score: "cohesion" = soynlp cohesion_forward; "cohesion_entropy" = cohesion_forward *
    # exp(right_branching_entropy), soynlp's suggested combination: a stem is cohesive AND is
    # followed by many different endings, which is exactly an L part.
    score: str = "cohesion_entropy"
    # A word is cut only where the L part scores above this (soynlp's LTokenizer would otherwise cut
    # every unknown word after its second syllable; extracted words already passed soynlp's filters).
    min_score: float = 0.0
    # Bound on soynlp's training sample: sentences (lines) reservoir-sampled from the training docs.
    # WordExtractor keeps every substring count in Python dicts: ~200k sentences ~ 1-2 GB, ~1 min.
    sample_sentences: int = 200_000
    max_sentence_chars: int = 1_000   # longer lines are truncated before sampling (memory bound)
    min_frequency: int = 5            # soynlp: a word must occur this often in the sample
    # soynlp's cohesion filter (its default 0.05). Lower keeps stems whose first syllable starts
    # many other words ("정부" < 0.05 because "정말" dominates "정-"), at the cost of more noise.
    min_cohesion: float = 0.05
    max_left_length: int = 10         # soynlp: longest L part considered (syllables)
    max_right_length: int = 6         # soynlp: longest R part considered (syllables)
    cache_size: int = 1 << 20         # distinct Hangul runs whose cuts are memoised (~100 B each)
    seed: int = 0                     # reservoir sampling seed

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"morph.method={self.method!r}: choose one of {METHODS}")
        if self.score not in SCORES:
            raise ValueError(f"morph.score={self.score!r}: choose one of {SCORES}")
        if self.sample_sentences < 1:
            raise ValueError("morph.sample_sentences must be >= 1")


def soynlp_sentence(line: str) -> str:
    """What soynlp trains on: Hangul syllables only, everything else a space, so scores are about
    Korean words and not about '..' or emoji runs."""
    return _NOT_HANGUL.sub(" ", line).strip()


class MorphemeSegmenter:
    """Inserts :data:`MARKER` at morpheme-like boundaries; ``segment(t).replace(MARKER, "") == t``."""

    def __init__(self, scores: dict[str, float], cfg: MorphConfig):
        self.cfg = cfg
        self.scores = scores
        if cfg.method == "ltokenizer":
            from soynlp.tokenizer import LTokenizer

            self._tok = LTokenizer(scores=scores)
        elif cfg.method == "maxscore":
            from soynlp.tokenizer import MaxScoreTokenizer

            self._tok = MaxScoreTokenizer(scores=scores, max_length=cfg.max_left_length)
        else:
            self._tok = None
        self._cuts = functools.lru_cache(maxsize=cfg.cache_size)(self._compute_cuts)

    # -- training / persistence -------------------------------------------------------------
    @classmethod
    def train(cls, sentences: Iterable[str], cfg: MorphConfig) -> "MorphemeSegmenter":
        """Learn word scores from ``sentences`` (already a bounded sample) with soynlp."""
        if cfg.method == "none":
            return cls({}, cfg)
        from soynlp.word import WordExtractor

        sents = [s for s in (soynlp_sentence(x) for x in sentences) if s]
        we = WordExtractor(min_frequency=cfg.min_frequency, min_cohesion_forward=cfg.min_cohesion,
                           max_left_length=cfg.max_left_length,
                           max_right_length=cfg.max_right_length, verbose_points=0)
        we.train(sents)
        extracted = we.extract()
        scores: dict[str, float] = {}
        import math

        for word, s in extracted.items():
            v = s.cohesion_forward
            if cfg.score == "cohesion_entropy":
                v *= math.exp(s.right_branching_entropy)
            if len(word) >= 2 and v > 0:
                scores[word] = round(float(v), 6)
        return cls(scores, cfg)

    def save(self, out_dir: str | os.PathLike) -> Path:
        from polyko.config import to_dict

        path = Path(out_dir) / MORPH_FILE
        path.write_text(json.dumps({"config": to_dict(self.cfg), "marker": MARKER,
                                    "scores": dict(sorted(self.scores.items()))}, ensure_ascii=False))
        return path

    @classmethod
    def load(cls, tokenizer_dir: str | os.PathLike) -> "MorphemeSegmenter":
        """The segmenter a tokenizer was trained with (``TOKDIR/morph.json``)."""
        from polyko.config import from_dict

        path = Path(tokenizer_dir) / MORPH_FILE
        if not path.is_file():
            raise ValueError(f"{path} not found: {tokenizer_dir} was not written by polyko.tokenizer")
        d = json.loads(path.read_text())
        return cls(d["scores"], from_dict(MorphConfig, d["config"]))

    # -- segmentation ----------------------------------------------------------------------
    def _compute_cuts(self, run: str) -> tuple[int, ...]:
        """Cut offsets (0 < c < len(run)) inside one run of Hangul syllables."""
        if self._tok is None or len(run) <= 2:
            return ()
        if self.cfg.method == "ltokenizer":
            l, r = self._tok.tokenize(run, flatten=False)[0]
            if not r or self.scores.get(l, 0.0) <= self.cfg.min_score:
                return ()
            return (len(l),)
        pieces = self._tok.tokenize(run)
        cuts, pos = [], 0
        for p in pieces[:-1]:
            pos += len(p)
            cuts.append(pos)
        assert pos + len(pieces[-1]) == len(run), (run, pieces)
        return tuple(cuts)

    def segment(self, text: str) -> str:
        """``text`` with :data:`MARKER` inserted at every boundary (nothing else changes)."""
        if self.cfg.method == "none":
            return text
        out: list[str] = []
        last = 0
        for m in _HANGUL_RUN.finditer(text):
            b, e = m.span()
            out.append(text[last:b])
            if b > 0 and text[b - 1].isalpha():        # e.g. Latin/jamo letter directly before
                out.append(MARKER)
            run = m.group()
            prev = 0
            for c in self._cuts(run):
                out.append(run[prev:c])
                out.append(MARKER)
                prev = c
            out.append(run[prev:])
            if e < len(text) and text[e].isalpha():
                out.append(MARKER)
            last = e
        out.append(text[last:])
        return "".join(out)

    def boundaries(self, text: str) -> list[int]:
        """Character offsets in ``text`` where :meth:`segment` puts a boundary."""
        seg = self.segment(text)
        offs, n = [], 0
        for ch in seg:
            if ch == MARKER:
                offs.append(n)
            else:
                n += 1
        return offs
