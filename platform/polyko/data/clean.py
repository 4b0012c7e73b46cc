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
    "PII_TOKENS", "SAMPLE_DIR", "clean_text",
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
