"""Text normalization for Korean web text (step 1 of ``polyko.data.clean``).

What it does, in order (each step can be switched off in :class:`NormalizeConfig`):

1. Unicode NFC (composes decomposed Hangul jamo, e.g. macOS NFD file names / copy-paste).
2. HTML: drop ``<script>``/``<style>`` blocks and comments with their contents, turn block-level tags
   (``<p> <br> <div> <li> <h1>``...) into newlines, drop all other tags, then unescape entities
   (``&#39;`` ``&hearts;`` ``&amp;``; only ``;``-terminated ones, so ``?a=1&para=2`` in a URL stays).
   Only ``<`` + ASCII letter/``/``/``!`` is a tag, so the Korean title brackets in ``<기생충>은 최고``
   survive. Entities are decoded after tag stripping: escaped markup (``&lt;div&gt;``) stays visible
   as text, and the ``markup``/``low_hangul`` filters judge it.
3. Remove control and invisible characters (zero-width space/joiners, BOM, soft hyphen, bidi marks,
   C0/C1 controls); ``\\r\\n``, ``\\r``, ``\\u2028``, ``\\u2029``, ``\\x85``, ``\\v``, ``\\f`` become
   ``\\n``; tabs and exotic spaces (NBSP, ideographic space ...) become a plain space.
4. Collapse whitespace: runs of spaces -> one space, strip each line, keep at most
   ``max_blank_lines`` empty lines between paragraphs (paragraph breaks stay meaningful).
5. Shorten absurd runs: any non-digit, non-space character repeated more than ``max_char_repeat``
   times (``ㅋㅋㅋㅋㅋㅋ``, ``!!!!!!``, ``......``, ``ㅠㅠㅠㅠ``) is cut to ``max_char_repeat``; any
   2-4 character non-digit unit repeated more than ``max_unit_repeat`` times (``ㅋㅎㅋㅎㅋㅎㅋㅎ``,
   ``^^;^^;^^;^^;``) likewise. Digits are never touched (``1000000`` must stay a number).

Everything is a precompiled regex or a C-level ``str`` method: no Python loop over characters.
CPU only; ``python -c "from polyko.data.normalize import *; print(normalize_text('ㅋㅋㅋㅋㅋ', NormalizeConfig()))"``.
"""

from __future__ import annotations

import functools
import html
import re
import unicodedata
from dataclasses import dataclass


@dataclass
class NormalizeConfig:
    """Normalization switches. Defaults = what the polyko pipeline trains on."""

    nfc: bool = True
    """Unicode NFC. NFC (not NFKC) so that ㈜, ①, ㎏, full-width punctuation keep their identity;
    Polyglot-Ko's tokenizer was trained on NFC-like web text."""
    strip_html: bool = True
    """Remove tags, script/style/comment blocks; block tags become newlines."""
    unescape_html: bool = True
    """Decode HTML entities (``&#39;`` -> ``'``, ``&hearts;`` -> ``♥``)."""
    remove_control: bool = True
    """Drop C0/C1 controls and invisible format characters (zero-width, BOM, bidi, soft hyphen)."""
    collapse_whitespace: bool = True
    """Runs of spaces -> one space, lines stripped, blank-line runs limited to ``max_blank_lines``."""
    max_blank_lines: int = 1
    """Empty lines kept between paragraphs (1 = paragraphs separated by exactly one blank line)."""
    max_char_repeat: int = 3
    """A non-digit character may repeat at most this many times (0 = off). 3 keeps the canonical
    ``...``, ``ㅋㅋㅋ``, ``!!!`` and ``www`` while cutting ``ㅋㅋㅋㅋㅋㅋㅋㅋ`` (which only wastes
    tokens and skews the BPE merges towards laughter runs)."""
    max_unit_repeat: int = 3
    """A 2-4 character non-digit unit may repeat at most this many times in a row (0 = off)."""

    def __post_init__(self) -> None:
        if self.max_blank_lines < 0:
            raise ValueError(f"max_blank_lines must be >= 0, got {self.max_blank_lines}")
        if self.max_char_repeat < 0 or self.max_char_repeat == 1:
            raise ValueError(f"max_char_repeat must be 0 (off) or >= 2, got {self.max_char_repeat}")
        if self.max_unit_repeat < 0 or self.max_unit_repeat == 1:
            raise ValueError(f"max_unit_repeat must be 0 (off) or >= 2, got {self.max_unit_repeat}")


# --- HTML ------------------------------------------------------------------------------------------
# script/style/noscript/iframe blocks with their contents, and comments (may span lines).
_HTML_BLOCK_RE = re.compile(
    r"<(script|style|noscript|template|iframe)\b[^>]*>.*?</\1\s*>|<!--.*?-->|<!\[CDATA\[.*?\]\]>",
    re.IGNORECASE | re.DOTALL,
)
# Block-level tags end a line of text.
_HTML_BREAK_RE = re.compile(
    r"</?(?:p|br|div|li|ul|ol|tr|table|h[1-6]|blockquote|pre|section|article|header|footer|hr|dd|dt|title)\b[^<>]*>",
    re.IGNORECASE,
)
# Any other tag: '<' + ASCII letter ('/', '!', '?'), so '<기생충>' and 'a < b' are not tags.
_HTML_TAG_RE = re.compile(r"</?[A-Za-z][A-Za-z0-9:-]*(?:\s[^<>]*)?/?>|<![A-Za-z][^<>]*>|<\?[^<>]*\?>")

# Only ';'-terminated references: html.unescape alone also decodes HTML5's legacy semicolon-less
# names, which corrupts URLs and prose in plain text ('?a=1&para=2' -> '?a=1¶=2', '&notice' -> '¬ice').
_ENTITY_RE = re.compile(r"&(?:#[0-9]{1,7}|#[xX][0-9a-fA-F]{1,6}|[A-Za-z][A-Za-z0-9]{1,31});")


def _unescape_entity(m: re.Match) -> str:
    return html.unescape(m.group(0))


# --- control / invisible characters ----------------------------------------------------------------
# C0 except \t \n \v \f \r, DEL, C1 except NEL(\x85), soft hyphen, zero-width & bidi controls,
# word joiner & invisible operators, BOM, interlinear annotation, object replacement.
_CONTROL_RE = re.compile(
    "[\x00-\x08\x0e-\x1f\x7f-\x84\x86-\x9f\u00ad\u180e\u200b-\u200f\u202a-\u202e\u2060-\u2064"
    "\u2066-\u206f\ufeff\ufff9-\ufffc]+"
)
_NEWLINE_RE = re.compile("\r\n?|[\u2028\u2029\x85\x0b\x0c]")
_SPACE_RUN_RE = re.compile("[ \t\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]+")
_EDGE_SPACE_RE = re.compile(" *\n *")


@functools.lru_cache(maxsize=16)
def _blank_lines_re(max_blank: int) -> tuple[re.Pattern, str]:
    return re.compile("\n{%d,}" % (max_blank + 2)), "\n" * (max_blank + 1)


@functools.lru_cache(maxsize=16)
def _char_repeat_re(n: int) -> re.Pattern:
    # A non-digit, non-whitespace char followed by >= n more copies of itself.
    return re.compile(r"([^\d\s])\1{%d,}" % n)


@functools.lru_cache(maxsize=16)
def _unit_repeat_re(n: int) -> re.Pattern:
    # A 2-4 char unit (no digits/whitespace) repeated more than n times in a row. Runs of one char
    # were already cut to max_char_repeat, so a unit like 'ㅋㅋ' cannot match n+1 times afterwards.
    return re.compile(r"([^\d\s]{2,4}?)\1{%d,}" % n)


def _repeat_sub(n: int) -> callable:
    def sub(m: re.Match) -> str:
        return m.group(1) * n

    return sub


# Cheap guards (a leading '.' lets the regex engine skip the per-character class test): only texts
# that have some run at all pay for the precise, digit/space-excluding substitutions.
@functools.lru_cache(maxsize=16)
def _run_guards(n: int) -> tuple[re.Pattern, tuple[re.Pattern, ...]]:
    """Fast patterns that find any char / 2-4 char unit occurring n+1 times in a row."""
    # Spelled out ('\1\1\1', not '\1{3}'): the repeat opcode on a backreference is ~2x slower.
    char = re.compile(r"(.)" + r"\1" * n)
    units = tuple(re.compile("(%s)" % ("." * k) + r"\1" * n) for k in (2, 3, 4))
    return char, units


def normalize_text(text: str, cfg: NormalizeConfig) -> str:
    """Normalize one document; pure function, returns the new text (possibly empty)."""
    if cfg.nfc and not unicodedata.is_normalized("NFC", text):
        text = unicodedata.normalize("NFC", text)
    if cfg.strip_html and "<" in text:
        text = _HTML_BLOCK_RE.sub("", text)
        text = _HTML_BREAK_RE.sub("\n", text)
        text = _HTML_TAG_RE.sub("", text)
    if cfg.unescape_html and "&" in text:
        text = _ENTITY_RE.sub(_unescape_entity, text)
        # Entities can produce NFD or controls ('&#x1100;' jamo, '&#8203;' zero-width space).
        if cfg.nfc and not unicodedata.is_normalized("NFC", text):
            text = unicodedata.normalize("NFC", text)
    if cfg.remove_control:
        text = _CONTROL_RE.sub("", text)
    if cfg.collapse_whitespace:
        if "\r" in text or "\n" in text:
            text = _NEWLINE_RE.sub("\n", text)
            text = _SPACE_RUN_RE.sub(" ", text)
            text = _EDGE_SPACE_RE.sub("\n", text)
            pat, repl = _blank_lines_re(cfg.max_blank_lines)
            text = pat.sub(repl, text).strip()
        else:
            # One line: str.split() (C) treats every Unicode space (and \u2028, \x85 ...) as a separator.
            text = " ".join(text.split())
    if cfg.max_char_repeat and _run_guards(cfg.max_char_repeat)[0].search(text) is not None:
        n = cfg.max_char_repeat
        text = _char_repeat_re(n).sub(r"\1" * n, text)
    if cfg.max_unit_repeat and len(text) >= 2 * (cfg.max_unit_repeat + 1):
        n = cfg.max_unit_repeat
        u2, u3, u4 = _run_guards(n)[1]
        if u2.search(text) or u3.search(text) or u4.search(text):
            text = _unit_repeat_re(n).sub(_repeat_sub(n), text)
    return text
