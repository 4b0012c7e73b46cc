"""Packing a cleaned corpus into token shards: every document + <|endoftext|> in order, exact
manifest bookkeeping, O(1) random access, byte-identical output whatever the worker count (a real
local Ray cluster vs. in-process), idempotent reruns. Tokenizer: the released Polyglot-Ko one."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from polyko.data.pack import pack_corpus, plan_chunks
from polyko.data.shards import TokenShards, read_manifest
from polyko.tokenizer import load_tokenizer, tokenizer_hash

SEQ = 64
EOS = 2


@pytest.fixture(scope="module")
def docs(corpus_dir) -> list[dict]:
    rows = []
    for name, path in (("klue", "klue_dev_sentences/klue_dev_sentences.jsonl"),
                       ("nsmc", "nsmc_raw_sample/nsmc_raw_sample.part01.jsonl"),
                       ("news", "soynlp_news_sample/doublespace_line_corpus_sample.jsonl")):
        with open(corpus_dir / path, encoding="utf-8") as f:
            for i, line in enumerate(f):
                if i >= (40 if name == "news" else 700):   # news articles: many are > SEQ tokens
                    break
                rows.append({"id": f"{name}-{i}", "text": json.loads(line)["text"], "source": name})
    rows[5]["text"] += " 연락처 <|tel|> 메일 <|email|>"
    rows[10]["text"] = ""                  # empty documents are skipped, and counted
    rows[11]["text"] = None
    return rows


@pytest.fixture(scope="module")
def cleaned(tmp_path_factory, docs) -> Path:
    """Three Parquet files, several row groups each, interleaved sources (like the pipeline's output)."""
    root = tmp_path_factory.mktemp("cleaned")
    (root / "sub").mkdir()
    for k, name in enumerate(["part-0.parquet", "part-1.parquet", "sub/part-2.parquet"]):
        pq.write_table(pa.Table.from_pylist(docs[k::3]), root / name, row_group_size=97)
    (root / "_SUCCESS").write_text("")     # writers' marker files are ignored
    return root


def _ordered_docs(root: Path) -> list[dict]:
    """Documents in packing order: files sorted by relative path, rows in file order."""
    out = []
    for f in sorted(root.rglob("*.parquet"), key=lambda p: p.relative_to(root).as_posix()):
        out += pq.read_table(f).to_pylist()
    return out


def _stream(tok, texts: list[str]) -> np.ndarray:
    ids = []
    for e in tok.encode_batch(texts, add_special_tokens=False):
        ids += e.ids + [EOS]
    return np.asarray(ids, dtype=np.int64)


def _all_tokens(out: Path) -> np.ndarray:
    ts = TokenShards(out)
    return np.concatenate([ts[i] for i in range(len(ts))]).astype(np.int64) if len(ts) else np.zeros(0, np.int64)


def _shard_digest(out: Path) -> str:
    h = hashlib.sha256()
    for s in read_manifest(out)["shards"]:
        h.update(s["file"].encode())
        h.update((out / s["file"]).read_bytes())
    return h.hexdigest()


def test_pack_single_stream_in_order(tmp_path, cleaned, polyglot_tokenizer_dir):
    out = tmp_path / "tokens"
    m = pack_corpus(cleaned, polyglot_tokenizer_dir, out, seq_len=SEQ, shard_tokens=SEQ * 50, workers=0)
    tok = load_tokenizer(polyglot_tokenizer_dir)
    rows = [r for r in _ordered_docs(cleaned) if r["text"]]
    expected = _stream(tok, [r["text"] for r in rows])

    assert m == read_manifest(out)
    assert m["dtype"] == "uint16" and m["seq_len"] == SEQ and m["eos_id"] == EOS
    assert m["vocab_size"] == 30003 and m["tokenizer_hash"] == tokenizer_hash(polyglot_tokenizer_dir)
    assert m["documents"] == len(rows) and m["documents_skipped_empty"] == 2
    assert m["tokens_input"] == len(expected)
    assert m["tokens_total"] == m["num_sequences"] * SEQ == len(expected) // SEQ * SEQ
    assert m["tokens_dropped"] == len(expected) % SEQ
    assert len(m["chunks"]) == 1 and len(m["shards"]) > 3      # one stream, several shard files
    per_src = {}
    for r in rows:
        per_src[r["source"]] = per_src.get(r["source"], 0) + len(tok.encode(r["text"], add_special_tokens=False).ids) + 1
    assert m["tokens_per_source"] == per_src
    assert m["documents_per_source"] == {s: sum(r["source"] == s for r in rows) for s in per_src}

    got = _all_tokens(out)
    assert np.array_equal(got, expected[:m["tokens_total"]])
    # decode back: documents in order, each followed by <|endoftext|>
    cuts = np.flatnonzero(got == EOS)
    ends = np.cumsum([per_doc + 1 for per_doc in (len(e.ids) for e in tok.encode_batch(
        [r["text"] for r in rows], add_special_tokens=False))]) - 1
    assert np.array_equal(cuts, ends[ends < m["tokens_total"]])   # one eos per document, at its end
    start = 0
    for r, c in zip(rows, cuts):
        assert tok.decode(got[start:c].tolist(), skip_special_tokens=False) == r["text"]
        start = c + 1

    ts = TokenShards(out)
    assert len(ts) == m["num_sequences"] and ts[0].dtype == np.uint16
    for i in np.random.default_rng(0).integers(0, len(ts), 20):
        assert np.array_equal(ts[int(i)], got[i * SEQ:(i + 1) * SEQ])
    b = ts.batch([3, 0, len(ts) - 1])
    assert b.dtype == np.int64 and b.shape == (3, SEQ) and np.array_equal(b[1], got[:SEQ])
    assert not (out / ".parts").exists()


def test_pack_is_deterministic_across_workers(tmp_path, cleaned, polyglot_tokenizer_dir, ray_local):
    """Many chunks: in-process vs. a 2-actor Ray Data pool give byte-identical shards; each chunk
    is its own stream (documents never split across chunks, tails dropped per chunk)."""
    kw = dict(seq_len=SEQ, chunk_bytes=40_000, shard_tokens=SEQ * 30)
    m0 = pack_corpus(cleaned, polyglot_tokenizer_dir, tmp_path / "w0", workers=0, **kw)
    m2 = pack_corpus(cleaned, polyglot_tokenizer_dir, tmp_path / "w2", workers=2, **kw)
    assert len(m0["chunks"]) >= 4
    assert _shard_digest(tmp_path / "w0") == _shard_digest(tmp_path / "w2")
    strip = lambda m: {k: v for k, v in m.items() if k != "source_dir"}   # noqa: E731
    assert strip(m0) == strip(m2)

    tok = load_tokenizer(polyglot_tokenizer_dir)
    files = sorted(cleaned.rglob("*.parquet"), key=lambda p: p.relative_to(cleaned).as_posix())
    expected = []
    for chunk in plan_chunks(files, kw["chunk_bytes"], "text"):
        texts = []
        for path, rgs in chunk:
            pf = pq.ParquetFile(path)
            texts += [t for rg in rgs for t in pf.read_row_group(rg, columns=["text"]).column(0).to_pylist() if t]
        s = _stream(tok, texts)
        expected.append(s[:len(s) // SEQ * SEQ])
    expected = np.concatenate(expected)
    assert np.array_equal(_all_tokens(tmp_path / "w2"), expected)
    assert m2["tokens_total"] == len(expected)
    assert m2["tokens_dropped"] == m2["tokens_input"] - m2["tokens_total"] > 0
    assert sum(c["num_sequences"] for c in m2["chunks"]) == m2["num_sequences"]


def test_rerun_and_conflicts(tmp_path, cleaned, polyglot_tokenizer_dir):
    out = tmp_path / "tokens"
    # leftovers of a crashed run (no manifest) are cleared, not mixed in
    (out / ".parts" / "chunk-000000").mkdir(parents=True)
    (out / "shard-00042.bin").write_bytes(b"junk")
    m = pack_corpus(cleaned, polyglot_tokenizer_dir, out, seq_len=SEQ, workers=0)
    assert not (out / "shard-00042.bin").exists() and not (out / ".parts").exists()
    mtime = (out / "manifest.json").stat().st_mtime_ns
    assert pack_corpus(cleaned, polyglot_tokenizer_dir, out, seq_len=SEQ, workers=0) == m
    assert (out / "manifest.json").stat().st_mtime_ns == mtime        # nothing redone
    with pytest.raises(ValueError, match="already holds a committed token dataset"):
        pack_corpus(cleaned, polyglot_tokenizer_dir, out, seq_len=SEQ * 2, workers=0)
    assert read_manifest(out) == m                                     # and nothing lost


def test_bad_input_is_a_clear_error(tmp_path, polyglot_tokenizer_dir):
    with pytest.raises(ValueError, match="does not exist"):
        pack_corpus(tmp_path / "missing", polyglot_tokenizer_dir, tmp_path / "o", workers=0)
    (tmp_path / "c").mkdir()
    with pytest.raises(ValueError, match="no .parquet files"):
        pack_corpus(tmp_path / "c", polyglot_tokenizer_dir, tmp_path / "o", workers=0)
    pq.write_table(pa.table({"body": ["안녕"]}), tmp_path / "c" / "x.parquet")
    with pytest.raises(ValueError, match="no 'text' column"):
        pack_corpus(tmp_path / "c", polyglot_tokenizer_dir, tmp_path / "o", workers=0)
    with pytest.raises(ValueError, match="no tokenizer.json"):
        pack_corpus(tmp_path / "c", tmp_path, tmp_path / "o", workers=0)
    with pytest.raises(ValueError, match="local or mounted"):
        pack_corpus(tmp_path / "c", polyglot_tokenizer_dir, "s3://bucket/tokens", workers=0)
