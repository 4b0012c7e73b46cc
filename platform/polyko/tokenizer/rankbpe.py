"""A tokenizer.json's byte-level BPE run by tiktoken: the same ids as the Rust ``tokenizers`` model,
several times faster, for packing.

    from polyko.tokenizer.rankbpe import rank_encoder
    enc, why = rank_encoder("work/tokenizer")        # (None, reason) when the tokenizer does not qualify
    flat, counts = enc.encode_docs(["안녕하세요.", "두 번째 문서"])   # uint32 ids, eos after each document

``polyko.data.pack`` uses it when the tokenizer qualifies (polyko's own tokenizers and Polyglot-Ko's
do). On one CPU core, over the shared corpus and a syllable-permuted copy of it (44 MB, 444k
documents), ``encode_docs`` packs 14-17 MB of text per CPU-second against 2.7-3.0 for HF
``encode_batch_fast`` plus the per-document id lists the packer built from it, with identical ids.
About 2.8x of that is the engine (tiktoken called per document: 8.9 vs 3.1 MB per CPU-second for
``encode_batch_fast`` alone), the rest is per call: one call per batch of documents (joined by the eos
token, which tiktoken splits on as a special token, so each document is encoded on its own) returning
one numpy buffer, instead of one ``Encoding`` object and one Python list of ints per document.

When the two agree. HF's BPE repeatedly merges the adjacent pair with the lowest merge index;
tiktoken merges the adjacent pair whose concatenated bytes have the lowest rank (leftmost on ties in
both). With rank = token id, :func:`rank_encoder` accepts a tokenizer only when:

* no normalizer; the pre-tokenizer is ``ByteLevel(use_regex=True, add_prefix_space=False)``, alone
  or after one ``Split(<literal>, Removed)`` (Polyglot-Ko's U+0CF1 morpheme marker: tiktoken splits
  on it as a special token whose sentinel id is dropped from the output); GPT-2's pre-tokenizer
  regex is then the same pattern in both (fancy-regex vs Oniguruma: every one of the 1.1M code
  points was checked in letter, digit, space, newline and apostrophe contexts, with no difference);
* a plain BPE model (no dropout, unk token, subword prefix / word suffix, byte fallback or
  ignore_merges) whose vocabulary is exactly the 256 byte symbols plus one new token per merge, with
  ids increasing in merge order (then rank order IS merge order for every pair that is a merge);
* added tokens that are literal (not normalized, no strip, not single-word) and none of them a prefix
  of another (HF matches them leftmost-longest, tiktoken by alternation: the same then);
* every vocabulary token that is valid UTF-8 encodes to itself the same way in both (a self-check).

What no static check rules out: a pair (A, B) that is NOT a merge although A+B is a token (Polyglot-Ko's
vocabulary has 9,660 such splits; many are unreachable, e.g. ``Ġ`` + ``ìĿ`` where ``Ġì`` merges first).
tiktoken would merge it if it ever became adjacent with the lowest rank; HF would not. No difference
was found on the 444k documents above, but the packer does not rely on that: it re-encodes a sample
of every batch with HF and re-packs the whole chunk with HF on any difference (``verify_every``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from polyko.tokenizer.bpe import ENDOFTEXT

# HF tokenizers' ByteLevel pre-tokenizer regex (tokenizers/src/pre_tokenizers/byte_level.rs) = GPT-2's
BYTE_LEVEL_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def byte_symbols() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the ByteLevel alphabet)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


class RankEncoder:
    """tiktoken ``Encoding`` of a qualifying tokenizer.json (build it with :func:`rank_encoder`)."""

    def __init__(self, encoding, eos: int, removed: str | None, sentinel: int | None):
        self.encoding, self.eos = encoding, eos
        self.removed, self.sentinel = removed, sentinel
        self._allowed = encoding.special_tokens_set  # every added token is matched in the text, as in HF

    def _encode(self, text: str) -> np.ndarray:
        # encode_to_numpy: one uint32 buffer, no Python int per token; the GIL is released while encoding
        return self.encoding.encode_to_numpy(text, allowed_special=self._allowed)

    def encode_docs(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(ids of all documents with ``eos`` after each, uint32; tokens per document including its
        eos, int64) -- the layout the packer writes. One tiktoken call for the batch: the documents are
        joined by the eos token, at which tiktoken cuts the text before its regex, so each document is
        pre-tokenized on its own exactly as when encoded alone. A batch in which some document holds
        the eos token's text itself is encoded one document at a time."""
        if not texts:
            return np.zeros(0, np.uint32), np.zeros(0, np.int64)
        joined = ENDOFTEXT.join(texts) + ENDOFTEXT
        if joined.count(ENDOFTEXT) == len(texts):
            flat = self._encode(joined)
            if self.removed is not None and self.removed in joined:
                flat = flat[flat != self.sentinel]
            ends = np.flatnonzero(flat == self.eos)
            if ends.size == len(texts):
                return flat, np.diff(ends, prepend=-1).astype(np.int64)
        # some document holds the eos text (or an added token reaches across a document's end)
        docs = [self._encode_doc(t) for t in texts]
        return np.concatenate(docs), np.fromiter(map(len, docs), np.int64, len(docs))

    def _encode_doc(self, text: str) -> np.ndarray:
        ids = self._encode(text)
        if self.removed is not None and self.removed in text:
            ids = ids[ids != self.sentinel]
        return np.append(ids, np.uint32(self.eos))


def _pre_steps(d: dict) -> list[dict]:
    """A tokenizer.json's pre-tokenizer steps, in order (a Sequence unrolled)."""
    pre = d.get("pre_tokenizer") or {}
    return pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]


def _qualify(d: dict) -> str | None:
    """Why a tokenizer.json's pipeline is not one tiktoken reproduces (None: it is)."""
    if d.get("normalizer") is not None:
        return "it has a normalizer"
    steps = _pre_steps(d)
    if not steps or steps[-1].get("type") != "ByteLevel":
        return "its pre-tokenizer does not end in ByteLevel"
    bl = steps[-1]
    if not bl.get("use_regex", True) or bl.get("add_prefix_space", False):
        return "its ByteLevel pre-tokenizer adds a prefix space or has no regex"
    for s in steps[:-1]:
        if (s.get("type") != "Split" or "String" not in (s.get("pattern") or {})
                or s.get("behavior") != "Removed" or s.get("invert")):
            return f"pre-tokenizer step {s.get('type')} is not a literal Split(Removed)"
    if len(steps) > 2:
        return "more than one Split before ByteLevel"
    m = d.get("model") or {}
    if m.get("type") != "BPE":
        return "its model is not BPE"
    if m.get("dropout") or m.get("unk_token") or m.get("continuing_subword_prefix") or m.get("end_of_word_suffix") \
            or m.get("byte_fallback") or m.get("ignore_merges"):
        return "its BPE uses dropout, an unk token, subword prefixes/suffixes, byte fallback or ignore_merges"
    for a in d.get("added_tokens", []):
        if a.get("normalized") or a.get("lstrip") or a.get("rstrip") or a.get("single_word"):
            return f"added token {a['content']!r} is normalized, stripped or single-word"
    contents = [a["content"] for a in d.get("added_tokens", [])]
    for a in contents:
        if any(b != a and b.startswith(a) for b in contents):
            return f"added token {a!r} is a prefix of another"
    return None


def rank_encoder(tokenizer_dir: str | os.PathLike) -> tuple[RankEncoder | None, str]:
    """(encoder, "") for a tokenizer tiktoken reproduces exactly (see the module docstring), else
    (None, the reason). Needs the tokenizer to have ``<|endoftext|>`` and the ``tiktoken`` package;
    builds in ~0.5 s for a 30k vocabulary (most of it the self-check)."""
    p = Path(tokenizer_dir)
    f = p / "tokenizer.json" if p.is_dir() else p
    d = json.loads(f.read_text(encoding="utf-8"))
    why = _qualify(d)
    if why:
        return None, why
    try:
        import tiktoken
    except ImportError:
        return None, "the tiktoken package is not installed"
    m = d["model"]
    vocab: dict[str, int] = m["vocab"]
    merges = [tuple(x.split(" ")) if isinstance(x, str) else tuple(x) for x in m["merges"]]
    u2b = {c: b for b, c in byte_symbols().items()}
    specials = {a["content"]: a["id"] for a in d.get("added_tokens", [])}
    # added tokens may sit in the model's vocabulary too (Polyglot-Ko's ids 0-3); BPE never produces
    # them, so they are no rank of tiktoken's either
    vocab = {t: i for t, i in vocab.items() if t not in specials}
    try:
        ranks = {bytes(u2b[c] for c in tok): i for tok, i in vocab.items()}
    except KeyError:
        return None, "a vocabulary token is not made of ByteLevel symbols"
    singles = [t for t in vocab if len(t) == 1]
    if len(singles) != 256 or len(ranks) != len(vocab):
        return None, "its vocabulary does not hold each of the 256 byte symbols exactly once"
    made = [vocab.get(a + b) for a, b in merges]
    if None in made or len(set(made)) != len(made) or len(vocab) != 256 + len(merges):
        return None, "its vocabulary is not exactly the byte symbols plus one token per merge"
    if any(x >= y for x, y in zip(made, made[1:])):
        return None, "its merge results' ids do not increase in merge order"
    if ENDOFTEXT not in specials:
        return None, f"it has no {ENDOFTEXT} token"
    steps = _pre_steps(d)  # checked by _qualify: [ByteLevel] or [Split(literal, Removed), ByteLevel]
    removed = steps[0]["pattern"]["String"] if len(steps) == 2 else None
    sentinel = None
    if removed is not None:
        if removed in specials or any(removed in s for s in specials):
            return None, "the removed literal overlaps an added token"
        sentinel = max([*vocab.values(), *specials.values()]) + 1
        specials = {**specials, removed: sentinel}
    enc = tiktoken.Encoding(f"polyko-{f.parent.name}", pat_str=BYTE_LEVEL_PATTERN, mergeable_ranks=ranks,
                            special_tokens=specials)
    out = RankEncoder(enc, specials[ENDOFTEXT], removed, sentinel)
    # self-check: every token that is text encodes the same way in both (catches a non-merge pair that
    # concatenates to a token inside a single token's bytes -- the commonest way the two could differ)
    from tokenizers import Tokenizer

    hf = Tokenizer.from_str(json.dumps(d))
    words = []
    for tok in vocab:
        b = bytes(u2b[c] for c in tok)
        try:
            s = b.decode("utf-8")
        except UnicodeDecodeError:
            continue  # a piece of a multi-byte character: not a string either encoder can be given alone
        if removed is None or removed not in s:
            words.append(s)
    want = [e.ids for e in hf.encode_batch_fast(words, add_special_tokens=False)]
    for w, ids in zip(words, want):
        got = out._encode(w).tolist()
        if got != ids:
            return None, f"token {w!r} encodes as {got} by rank but {ids} by merges"
    return out, ""
