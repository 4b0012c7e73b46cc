"""The tiktoken run of a byte-level BPE (polyko.tokenizer.rankbpe) and the packer's use of it: same ids
as the Rust tokenizer on real and permuted Korean text, tokenizers it must refuse, and a vocabulary on
which the two really differ -- the packer's sampled check catches it and re-packs with the Rust one."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer

from pipeline_helpers import shard_digest
from polyko.data.pack import pack_corpus
from polyko.tokenizer import MARKER
from polyko.tokenizer.rankbpe import byte_symbols, rank_encoder


def _reference(tok: Tokenizer, texts: list[str], eos: int) -> tuple[list[int], list[int]]:
    enc = tok.encode_batch(texts, add_special_tokens=False)
    return [t for e in enc for t in e.ids + [eos]], [len(e.ids) + 1 for e in enc]


def _shifted(text: str, k: int = 7) -> str:
    """Every Hangul syllable moved k places in the syllable block: unseen syllable sequences."""
    return "".join(chr(0xAC00 + (ord(c) - 0xAC00 + k) % 11172) if 0xAC00 <= ord(c) <= 0xD7A3 else c for c in text)


def test_rank_encoder_equals_polyglot_ko_tokenizer(corpus_dir, polyglot_tokenizer_dir):
    enc, why = rank_encoder(polyglot_tokenizer_dir)
    assert enc is not None, why
    tok = Tokenizer.from_file(str(polyglot_tokenizer_dir / "tokenizer.json"))
    texts = []
    for f in sorted(corpus_dir.rglob("*.jsonl")):   # the first 1,500 documents of every file
        with open(f, encoding="utf-8") as fh:
            texts += [json.loads(line)["text"] for _, line in zip(range(1500), fh)]
    texts += [_shifted(t) for t in texts[::3]]
    edge = ["", " ", "\n\n", "  \n", "끝<", "<|endof", "text|> 시작", "doc <|endoftext|> inside",
            "주민 <|rrn|> 계좌 <|acc|>, <|tel|>/<|email|>", f"형태{MARKER}소{MARKER} 분석 {MARKER}",
            f"a{MARKER}<|sep|>{MARKER}b", "😀👩‍💻🇰🇷", "\ufeff\x00\r\n\t\u3000\u00a0", "I'm 'tis we'll 's",
            "ｆｕｌｌｗｉｄｔｈ ١٢٣ ½ ⅷ", "e\u0301 \u1100\u1161\u11a8"]
    texts = edge + texts
    for i in range(0, len(texts), 1024):
        batch = texts[i:i + 1024]
        flat, counts = enc.encode_docs(batch)
        want_flat, want_counts = _reference(tok, batch, 2)
        assert counts.tolist() == want_counts
        assert flat.tolist() == want_flat
    assert len(texts) > 20000


def _byte_bpe(root: Path, merges: list[tuple[bytes, bytes]], normalizer=None) -> Path:
    """A byte-level BPE tokenizer directory: the 256 byte symbols (ids 0-255), one token per merge
    (ids 256 ...) and <|endoftext|>."""
    from tokenizers import decoders, models, normalizers, pre_tokenizers

    sym = byte_symbols()
    u = lambda b: "".join(sym[x] for x in b)  # noqa: E731
    vocab = {sym[b]: b for b in range(256)}
    for a, b in merges:
        vocab[u(a + b)] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[(u(a), u(b)) for a, b in merges]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    if normalizer == "nfc":
        tok.normalizer = normalizers.NFC()
    tok.add_special_tokens(["<|endoftext|>"])
    root.mkdir(parents=True)
    tok.save(str(root / "tokenizer.json"))
    return root


# U+1F600 is F0 9F 98 80 in UTF-8. With (9F 98) merged before (F0 9F), the Rust BPE leaves
# [F0][9F98][80] (F0 + 9F98 is no merge); tiktoken merges F0 + 9F98 because their bytes are the token
# F0 9F 98 (made by the later merge F09F + 98). Every token involved is a piece of a 4-byte character,
# never valid UTF-8 alone, so rank_encoder's self-check cannot see it; only real text shows it.
EMOJI_MERGES = [(b"\x9f", b"\x98"), (b"\xf0", b"\x9f"), (b"\xf0\x9f", b"\x98")]


def test_rank_encoder_refuses_what_it_cannot_reproduce(tmp_path, polyglot_tokenizer_dir):
    # a normalizer: tiktoken has none
    assert "normalizer" in rank_encoder(_byte_bpe(tmp_path / "nfc", [(b"a", b"b")], normalizer="nfc"))[1]
    # a vocabulary token no merge makes (tiktoken could still produce it from any split)
    d = json.loads((polyglot_tokenizer_dir / "tokenizer.json").read_text())
    d["model"]["vocab"]["ĠíķľêµŃìĸ´ìĸ´"] = 40000
    (tmp_path / "extra").mkdir()
    (tmp_path / "extra" / "tokenizer.json").write_text(json.dumps(d, ensure_ascii=False))
    enc, why = rank_encoder(tmp_path / "extra")
    assert enc is None and "one token per merge" in why
    # a difference inside one token's own (valid UTF-8) bytes: (b c) merges before (a b), so the Rust
    # BPE gives [a][bc] for "abc" where tiktoken merges a + bc into the token abc = (ab c)
    enc, why = rank_encoder(_byte_bpe(tmp_path / "abc", [(b"b", b"c"), (b"a", b"b"), (b"ab", b"c")]))
    assert enc is None and "'abc' encodes as" in why
    # the emoji vocabulary passes every static check ...
    enc, why = rank_encoder(_byte_bpe(tmp_path / "emoji", EMOJI_MERGES))
    assert enc is not None, why
    # ... and really differs on text
    rust = Tokenizer.from_file(str(tmp_path / "emoji" / "tokenizer.json"))
    assert rust.encode("😀", add_special_tokens=False).ids != enc.encode_docs(["😀"])[0][:-1].tolist()


def test_pack_falls_back_to_the_rust_tokenizer_on_a_sampled_difference(tmp_path):
    tokdir = _byte_bpe(tmp_path / "emoji", EMOJI_MERGES)
    cleaned = tmp_path / "cleaned"
    cleaned.mkdir()
    texts = [f"document {i} " + ("😀" if i == 40 else "plain text") for i in range(100)]
    pq.write_table(pa.table({"text": texts, "source": ["web"] * 100}), cleaned / "part-0.parquet")
    kw = dict(seq_len=16, shard_tokens=16 * 20, workers=0, batch_size=32)

    hf = pack_corpus(cleaned, tokdir, tmp_path / "hf", encoder="hf", **kw)
    assert hf["encoder"] == {"rank_chunks": 0, "hf_chunks": 1, "documents_verified": 0, "fallbacks": []}
    # the sample (every 8th document of a batch) includes document 40 (batch 1, position 8): caught
    m = pack_corpus(cleaned, tokdir, tmp_path / "rank", encoder="rank", verify_every=8, **kw)
    assert m["encoder"]["rank_chunks"] == 0 and m["encoder"]["hf_chunks"] == 1
    assert len(m["encoder"]["fallbacks"]) == 1 and "document 40 😀" in m["encoder"]["fallbacks"][0]["why"]
    assert shard_digest(tmp_path / "rank") == shard_digest(tmp_path / "hf") and m["pack_key"] == hf["pack_key"]
    # a sample that misses it packs different ids: the check is what keeps the shards exact
    miss = pack_corpus(cleaned, tokdir, tmp_path / "miss", encoder="rank", verify_every=7, **kw)
    assert miss["encoder"]["rank_chunks"] == 1 and miss["encoder"]["documents_verified"] == 5 + 5 + 5 + 1
    assert shard_digest(tmp_path / "miss") != shard_digest(tmp_path / "hf")


def test_pack_encoder_choice(tmp_path, polyglot_tokenizer_dir):
    cleaned = tmp_path / "cleaned"
    cleaned.mkdir()
    texts = [f"문서 {i}번: 한국어 텍스트를 토큰으로 바꿉니다. <|tel|>" for i in range(300)]
    pq.write_table(pa.table({"text": texts, "source": ["a", "b", "c"] * 100}), cleaned / "part-0.parquet")
    kw = dict(seq_len=32, shard_tokens=32 * 10, workers=0)
    auto = pack_corpus(cleaned, polyglot_tokenizer_dir, tmp_path / "auto", **kw)
    hf = pack_corpus(cleaned, polyglot_tokenizer_dir, tmp_path / "hf", encoder="hf", **kw)
    assert auto["encoder"]["rank_chunks"] == 1 and auto["encoder"]["documents_verified"] == 5  # 0, 64, ... 256
    assert hf["encoder"]["hf_chunks"] == 1 and hf["pack_key"] == auto["pack_key"]
    assert shard_digest(tmp_path / "auto") == shard_digest(tmp_path / "hf")
    nfc = _byte_bpe(tmp_path / "nfc", [(b"a", b"b")], normalizer="nfc")
    with pytest.raises(ValueError, match="does not qualify: it has a normalizer"):
        pack_corpus(cleaned, nfc, tmp_path / "x", encoder="rank", **kw)
    assert pack_corpus(cleaned, nfc, tmp_path / "y", **kw)["encoder"]["hf_chunks"] == 1   # auto: the Rust one
    with pytest.raises(ValueError, match="encoder='fast'"):
        pack_corpus(cleaned, polyglot_tokenizer_dir, tmp_path / "z", encoder="fast", **kw)


def test_pipeline_pack_encoder_setting_checked():
    from polyko.data.pipeline import PipelineConfig

    assert PipelineConfig().pack_encoder == "auto"
    with pytest.raises(ValueError, match="pack_encoder must be 'auto', 'rank' or 'hf', got 'fast'"):
        PipelineConfig(pack_encoder="fast")
