"""The validation split of ``polyko.data.pack`` (documents held out by key hash, packed per source into
DIR/validation) and ``polyko.train.data.open_validation``: deterministic, disjoint from the training
tokens, per-source rows/tokens/bytes, bits per byte."""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline_helpers import shard_digest
from polyko.data.pack import holdout_hash, holdout_threshold, pack_corpus
from polyko.data.shards import TokenShards, read_manifest
from polyko.tokenizer import load_tokenizer
from polyko.train.data import open_validation, source_rows

SEQ, EOS, SHARE = 64, 2, 0.05


def _docs(corpus_dir):
    rows = []
    for name, path, n in (("klue", "klue_dev_sentences/klue_dev_sentences.jsonl", 900),
                          ("nsmc", "nsmc_raw_sample/nsmc_raw_sample.part01.jsonl", 250),
                          ("news", "soynlp_news_sample/doublespace_line_corpus_sample.jsonl", 30)):
        with open(corpus_dir / path, encoding="utf-8") as f:
            for i, line in zip(range(n), f):
                rows.append({"key": f"{name}:{i}", "text": json.loads(line)["text"], "source": name})
    return rows


def _by_source(out):
    ts, acc, row = TokenShards(out), {}, 0
    for sh in read_manifest(out)["shards"]:
        acc.setdefault(sh["source"], []).extend(ts[i] for i in range(row, row + sh["num_sequences"]))
        row += sh["num_sequences"]
    return {k: np.concatenate(v).astype(np.int64) for k, v in acc.items()}


def test_split_is_deterministic_disjoint_and_counted(tmp_path, corpus_dir, polyglot_tokenizer_dir):
    rows = _docs(corpus_dir)
    (tmp_path / "cleaned").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "cleaned" / "part-0.parquet", row_group_size=128)
    kw = dict(seq_len=SEQ, shard_tokens=SEQ * 20, workers=0, validation_share=SHARE, validation_min_docs=200)
    data = tmp_path / "data"
    m = pack_corpus(tmp_path / "cleaned", polyglot_tokenizer_dir, data / "tokens",
                    validation_dir=data / "validation", **kw)
    vm = read_manifest(data / "validation")
    assert vm["role"] == "validation" and vm["pack_key"] == m["pack_key"] and m["validation"]["dir"] == "../validation"

    thr = holdout_threshold(SHARE)
    held = {r["key"] for r in rows if holdout_hash(r["key"]) < thr}
    for src in ("klue", "nsmc"):   # >= 200 documents: at least one held out, forced if the hash chose none
        if not any(k.startswith(src + ":") for k in held):
            mine = [r["key"] for r in rows if r["source"] == src]
            held.add(min(mine, key=lambda k: (holdout_hash(k), k)))
    tok = load_tokenizer(polyglot_tokenizer_dir)

    def stream(docs):
        ids = []
        for e in tok.encode_batch([d["text"] for d in docs], add_special_tokens=False):
            ids += e.ids + [EOS]
        return np.asarray(ids, np.int64)

    train, val = _by_source(data / "tokens"), _by_source(data / "validation")
    for src in ("klue", "nsmc", "news"):
        tr = [r for r in rows if r["source"] == src and r["key"] not in held]
        va = [r for r in rows if r["source"] == src and r["key"] in held]
        assert m["documents_per_source"][src] == len(tr)
        assert vm["per_source"].get(src, {}).get("documents", 0) == len(va)
        # the training tokens are exactly the kept documents' stream: no held-out document in them
        assert np.array_equal(train[src], stream(tr)[:len(train[src])])
        if src in val:
            assert np.array_equal(val[src], stream(va)[:len(val[src])])
            p = vm["per_source"][src]
            assert p["tokens"] == p["rows"] * SEQ == len(val[src]) and p["text_bytes"] == sum(len(d["text"].encode()) for d in va)
            assert p["bytes"] == round(p["text_bytes"] * p["tokens"] / p["tokens_input"])
    assert set(val) >= {"klue", "nsmc"}
    # same input -> byte-identical training and validation shards
    m2 = pack_corpus(tmp_path / "cleaned", polyglot_tokenizer_dir, tmp_path / "again" / "tokens",
                     validation_dir=tmp_path / "again" / "validation", **kw)
    assert m2["pack_key"] == m["pack_key"]
    assert shard_digest(data / "tokens") == shard_digest(tmp_path / "again" / "tokens")
    assert shard_digest(data / "validation") == shard_digest(tmp_path / "again" / "validation")
    # share 0: no split, a different pack_key (so caches re-pack), every document trains
    m0 = pack_corpus(tmp_path / "cleaned", polyglot_tokenizer_dir, tmp_path / "nosplit" / "tokens", seq_len=SEQ,
                     shard_tokens=SEQ * 20, workers=0)
    assert m0["pack_key"] != m["pack_key"] and m0["documents"] == len(rows) and m0["validation"] is None
    assert open_validation(str(tmp_path / "nosplit"), str(polyglot_tokenizer_dir)) is None

    vs = open_validation(str(data), str(polyglot_tokenizer_dir))
    assert vs is not None and set(vs.sources) == set(val)
    assert {s: len(r) for s, r in vs.sources.items()} == vm["rows_per_source"]
    assert all(np.array_equal(vs.shards.batch(r).ravel(), val[s]) for s, r in vs.sources.items())
    sub = vs.eval_rows(2, seed=0)
    assert all(len(r) == min(2, len(vs.sources[s])) and set(r) <= set(vs.sources[s]) for s, r in sub.items())
    assert all(np.array_equal(sub[s], vs.eval_rows(2, seed=0)[s]) for s in sub)   # the same every evaluation
    # bits per byte = loss (nats/token) * tokens / (ln 2 * bytes)
    loss = {s: 2.0 for s in vs.sources}
    bpb = vs.bits_per_byte(loss)
    for s in vs.sources:
        assert math.isclose(bpb[s], 2.0 * vs.tokens[s] / (math.log(2) * vs.bytes[s]))
    assert math.isclose(vs.overall_bits_per_byte(loss),
                        2.0 * sum(vs.tokens.values()) / (math.log(2) * sum(vs.bytes.values())))
    assert {s: r.tolist() for s, r in source_rows(vm).items()} == {s: r.tolist() for s, r in vs.sources.items()}


def test_holdout_hashes_vectorised_and_unbiased():
    """Integer keys (the pipeline's (file << 40) | offset) are split by a vectorised salted splitmix64
    that equals the one-key function and holds out the share asked for, even on structured keys (every
    key of 40 files at ~95-byte offsets); other keys by salted BLAKE2b of their text."""
    from polyko.data.pack import holdout_hashes

    keys = np.concatenate([(f << 40) + np.arange(0, 95 * 5000, 95) for f in range(40)]).astype(np.int64)
    h = holdout_hashes(pa.array(keys))
    assert h.dtype == np.uint64 and len(np.unique(h)) == len(keys)
    assert [holdout_hash(int(k)) for k in keys[:50]] == h[:50].tolist()
    for share in (0.005, 0.05, 0.5):
        held = float(np.mean(h < np.uint64(holdout_threshold(share))))
        assert abs(held - share) < 4 * math.sqrt(share * (1 - share) / len(keys)), (share, held)
    # chunked input gives the same hashes as one array
    assert np.array_equal(holdout_hashes(pa.chunked_array([keys[:7], keys[7:]])), h)
    salted = hashlib.blake2b(b"klue:3", digest_size=8, salt=b"polyko-validation-v1"[:16]).digest()
    assert holdout_hash("klue:3") == int.from_bytes(salted, "little")


def test_validation_with_less_than_a_row_is_none(tmp_path, corpus_dir, polyglot_tokenizer_dir):
    """Held-out documents shorter than one row per source pack into no shard at all (a small corpus, as
    the quickstart's): the validation set is then None, and an empty shard set has length 0 (an int)."""
    rows = _docs(corpus_dir)
    (tmp_path / "cleaned").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "cleaned" / "part-0.parquet")
    data = tmp_path / "data"
    pack_corpus(tmp_path / "cleaned", polyglot_tokenizer_dir, data / "tokens", validation_dir=data / "validation",
                seq_len=8192, shard_tokens=8192 * 4, workers=0, validation_share=SHARE, validation_min_docs=0)
    vm = read_manifest(data / "validation")
    assert vm["shards"] == [] and vm["documents"] > 0 and vm["tokens_dropped"] > 0
    assert len(TokenShards(data / "validation")) == 0
    assert open_validation(str(data), str(polyglot_tokenizer_dir)) is None
    assert len(TokenShards(data / "tokens")) > 0
