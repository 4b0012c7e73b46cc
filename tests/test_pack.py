"""Packing a cleaned corpus into token shards: every document + <|endoftext|> in order within its
source, rows of one source each, exact manifest bookkeeping, O(1) random access, byte-identical output whatever the worker count (a real
local Ray cluster vs. in-process), idempotent reruns. Tokenizer: the released Polyglot-Ko one."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline_helpers import shard_digest
from polyko.data.pack import PACK_LAYOUT, pack_corpus, plan_chunks
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


def _source_tokens(out: Path) -> dict[str, np.ndarray]:
    """Each source's rows, concatenated in global order (shards name their single source)."""
    ts, acc, row = TokenShards(out), {}, 0
    for sh in read_manifest(out)["shards"]:
        acc.setdefault(sh["source"], []).extend(ts[i] for i in range(row, row + sh["num_sequences"]))
        row += sh["num_sequences"]
    return {k: np.concatenate(v).astype(np.int64) for k, v in acc.items()}


def test_pack_one_stream_per_source_in_order(tmp_path, cleaned, polyglot_tokenizer_dir):
    out = tmp_path / "tokens"
    m = pack_corpus(cleaned, polyglot_tokenizer_dir, out, seq_len=SEQ, shard_tokens=SEQ * 50, workers=0)
    tok = load_tokenizer(polyglot_tokenizer_dir)
    rows = [r for r in _ordered_docs(cleaned) if r["text"]]
    sources = sorted({r["source"] for r in rows})
    expected = {s: _stream(tok, [r["text"] for r in rows if r["source"] == s]) for s in sources}

    assert m == read_manifest(out)
    assert m["dtype"] == "uint16" and m["seq_len"] == SEQ and m["eos_id"] == EOS and m["role"] == "train"
    assert m["vocab_size"] == 30003 and m["tokenizer_hash"] == tokenizer_hash(polyglot_tokenizer_dir)
    assert m["documents"] == len(rows) and m["documents_skipped_empty"] == 2
    assert m["tokens_input"] == sum(len(e) for e in expected.values())
    assert m["tokens_total"] == m["num_sequences"] * SEQ == sum(len(e) // SEQ * SEQ for e in expected.values())
    assert m["tokens_dropped"] == sum(len(e) % SEQ for e in expected.values())
    assert len(m["chunks"]) == 1 and len(m["shards"]) > 3      # one chunk, several shard files
    assert m["tokens_per_source"] == {s: len(e) for s, e in expected.items()}
    assert m["rows_per_source"] == {s: len(e) // SEQ for s, e in expected.items()}
    assert m["documents_per_source"] == {s: sum(r["source"] == s for r in rows) for s in sources}
    assert m["validation"] is None and m["pack"]["layout"] == PACK_LAYOUT == 3
    for s in sources:   # bytes: the text's UTF-8 bytes, pro-rated for the dropped row-end tokens
        p = m["per_source"][s]
        text_bytes = sum(len(r["text"].encode()) for r in rows if r["source"] == s)
        assert p["text_bytes"] == text_bytes and p["tokens"] == p["rows"] * SEQ
        assert p["bytes"] == round(text_bytes * p["tokens"] / p["tokens_input"])

    got = _source_tokens(out)
    assert sorted(got) == sources
    for s in sources:
        assert np.array_equal(got[s], expected[s][:len(got[s])])
        # decode back: the source's documents in order, each followed by <|endoftext|>
        docs = [r["text"] for r in rows if r["source"] == s]
        cuts = np.flatnonzero(got[s] == EOS)
        ends = np.cumsum([len(e.ids) + 1 for e in tok.encode_batch(docs, add_special_tokens=False)]) - 1
        assert np.array_equal(cuts, ends[ends < len(got[s])])   # one eos per document, at its end
        start = 0
        for text, c in zip(docs, cuts):
            assert tok.decode(got[s][start:c].tolist(), skip_special_tokens=False) == text
            start = c + 1

    ts = TokenShards(out)
    assert len(ts) == m["num_sequences"] and ts[0].dtype == np.uint16
    flat = np.concatenate([ts[i] for i in range(len(ts))]).astype(np.int64)
    for i in np.random.default_rng(0).integers(0, len(ts), 20):
        assert np.array_equal(ts[int(i)], flat[i * SEQ:(i + 1) * SEQ])
    b = ts.batch([3, 0, len(ts) - 1])
    assert b.dtype == np.int64 and b.shape == (3, SEQ) and np.array_equal(b[1], flat[:SEQ])
    assert not (out / ".parts").exists()


def test_pack_is_deterministic_across_workers(tmp_path, cleaned, polyglot_tokenizer_dir, ray_local):
    """Many chunks: in-process vs. a 2-actor Ray Data pool give byte-identical shards; each chunk
    is its own stream (documents never split across chunks, tails dropped per chunk)."""
    kw = dict(seq_len=SEQ, chunk_bytes=40_000, shard_tokens=SEQ * 30)
    m0 = pack_corpus(cleaned, polyglot_tokenizer_dir, tmp_path / "w0", workers=0, **kw)
    m2 = pack_corpus(cleaned, polyglot_tokenizer_dir, tmp_path / "w2", workers=2, **kw)
    assert len(m0["chunks"]) >= 4
    assert shard_digest(tmp_path / "w0") == shard_digest(tmp_path / "w2")
    strip = lambda m: {k: v for k, v in m.items() if k != "source_dir"}   # noqa: E731
    assert strip(m0) == strip(m2)

    tok = load_tokenizer(polyglot_tokenizer_dir)
    files = sorted(cleaned.rglob("*.parquet"), key=lambda p: p.relative_to(cleaned).as_posix())
    expected: dict[str, list[np.ndarray]] = {}
    for chunk in plan_chunks(files, kw["chunk_bytes"], "text"):
        docs = []
        for path, rgs in chunk:
            pf = pq.ParquetFile(path)
            docs += [r for rg in rgs for r in pf.read_row_group(rg, columns=["text", "source"]).to_pylist() if r["text"]]
        for src in sorted({r["source"] for r in docs}):   # per chunk: one stream per source, tail dropped
            s = _stream(tok, [r["text"] for r in docs if r["source"] == src])
            expected.setdefault(src, []).append(s[:len(s) // SEQ * SEQ])
    expected = {k: np.concatenate(v) for k, v in expected.items()}
    got = _source_tokens(tmp_path / "w2")
    assert sorted(got) == sorted(expected)
    for src in expected:
        assert np.array_equal(got[src], expected[src])
    assert sum(len(v) for v in expected.values()) == len(_all_tokens(tmp_path / "w2"))
    assert m2["tokens_total"] == sum(len(v) for v in expected.values())
    assert m2["tokens_dropped"] == m2["tokens_input"] - m2["tokens_total"] > 0
    assert sum(c["num_sequences"] for c in m2["chunks"]) == m2["num_sequences"]


def test_plan_chunks_are_the_fewest_of_equal_size(cleaned):
    """The plan covers every non-empty row group once, in order, in ceil(total / chunk_bytes) chunks of
    about equal size (within a row group of each other), none above chunk_bytes + one row group: no
    short last chunk that leaves an actor idle while another packs a full one."""
    files = sorted(cleaned.rglob("*.parquet"), key=lambda p: p.relative_to(cleaned).as_posix())
    groups = [(str(f), rg, pq.read_metadata(f).row_group(rg).total_byte_size)
              for f in files for rg in range(pq.read_metadata(f).num_row_groups)]
    total, biggest = sum(g[2] for g in groups), max(g[2] for g in groups)
    size = {(f, rg): b for f, rg, b in groups}
    for chunk_bytes in (total // 7, total // 3 + 1, int(total / 2.2), total, 10 * total):
        chunks = plan_chunks(files, chunk_bytes, "text")
        assert len(chunks) == -(-total // chunk_bytes)
        assert [(f, rg) for c in chunks for f, rgs in c for rg in rgs] == [(f, rg) for f, rg, _ in groups]
        sizes = [sum(size[(f, rg)] for f, rgs in c for rg in rgs) for c in chunks]
        assert max(sizes) - min(sizes) <= biggest and max(sizes) <= chunk_bytes + biggest, (chunk_bytes, sizes)


def test_pack_threads_give_identical_shards(tmp_path, cleaned, polyglot_tokenizer_dir):
    """Encoding threads (a window of batches in flight while the oldest is packed) never change the
    output: 1 vs 3 threads, small batches so the window wraps many times, byte-identical shards."""
    kw = dict(seq_len=SEQ, chunk_bytes=40_000, shard_tokens=SEQ * 30, batch_size=7, workers=0,
              validation_dir=None)
    m1 = pack_corpus(cleaned, polyglot_tokenizer_dir, tmp_path / "t1", threads=1, **kw)
    m3 = pack_corpus(cleaned, polyglot_tokenizer_dir, tmp_path / "t3", threads=3, **kw)
    assert shard_digest(tmp_path / "t1") == shard_digest(tmp_path / "t3")
    strip = lambda m: {k: v for k, v in m.items() if k != "source_dir"}   # noqa: E731
    assert strip(m1) == strip(m3) and m1["num_sequences"] > 0


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
