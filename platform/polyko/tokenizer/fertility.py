"""Fertility: how many tokens a tokenizer spends on held-out text (lower = more text per context
window and per FLOP), plus how often its token boundaries agree with the morpheme boundaries.

``tokens_per_char`` and ``tokens_per_word`` (whitespace words, i.e. Korean eojeol) are what the
literature calls fertility; ``chars_per_token`` is its inverse. ``boundary_recall`` = fraction of
the segmenter's morpheme boundaries at which a token starts when the plain text (no markers, as
at inference) is encoded: 1.0 means no token straddles a morpheme boundary.

Everything is encoded with the Rust ``encode_batch`` (no special tokens added).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

from polyko.tokenizer.morph import MorphemeSegmenter

_BATCH = 1024


def measure(tok, texts: Sequence[str], *, segmenter: MorphemeSegmenter | None = None,
            pre_segment: bool = False) -> dict[str, float]:
    """Fertility of ``tok`` on ``texts``. ``pre_segment``: encode ``segmenter.segment(text)``
    (training-style input) instead of the plain text. ``segmenter`` also enables boundary_recall."""
    tokens = chars = words = 0
    hits = bounds = 0
    for i in range(0, len(texts), _BATCH):
        batch = list(texts[i:i + _BATCH])
        inputs = [segmenter.segment(t) for t in batch] if pre_segment and segmenter else batch
        encs = tok.encode_batch(inputs, add_special_tokens=False)
        for t, e in zip(batch, encs):
            tokens += len(e.ids)
            chars += len(t)
            words += len(t.split())
            if segmenter is not None and not pre_segment and segmenter.cfg.method != "none":
                b = segmenter.boundaries(t)
                if b:
                    starts = {o[0] for o in e.offsets}
                    bounds += len(b)
                    hits += sum(1 for p in b if p in starts)
    out = {"tokens": tokens, "characters": chars, "words": words,
           "tokens_per_char": tokens / max(chars, 1), "tokens_per_word": tokens / max(words, 1),
           "chars_per_token": chars / max(tokens, 1)}
    if bounds:
        out["boundary_recall"] = hits / bounds
    return out


def per_source(tok, texts: Sequence[str], sources: Sequence[str]) -> dict[str, dict[str, float]]:
    """``tokens_per_char`` and ``tokens_per_word`` of ``tok`` for each source (genre)."""
    groups: dict[str, list[str]] = defaultdict(list)
    for t, s in zip(texts, sources):
        groups[s].append(t)
    out = {}
    for s in sorted(groups):
        m = measure(tok, groups[s])
        out[s] = {"documents": len(groups[s]), "tokens_per_char": m["tokens_per_char"],
                  "tokens_per_word": m["tokens_per_word"]}
    return out
