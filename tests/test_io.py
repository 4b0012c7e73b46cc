"""The corpus readers (polyko.data.io) without Ray: every bad-input kind is quarantined with its raw
bytes while the good documents of the same file survive; byte-range splits read every line exactly once."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pytest

from pipeline_helpers import write_bad_inputs
from polyko.data.io import BAD_REASONS, ReadConfig, file_format, list_splits, read_split


def _read_all(splits, cfg):
    tables = [t for s in splits for t in read_split(s, cfg)]
    return pa.concat_tables(tables).to_pylist() if tables else []


def test_file_formats():
    assert file_format("a/b.jsonl") == ("jsonl", None)
    assert file_format("b.JSONL.GZ") == ("jsonl", "gzip")
    assert file_format("b.txt.zst") == ("txt", "zstd")
    assert file_format("b.parquet") == ("parquet", None)
    assert file_format("README.md") is None
    assert file_format("b.parquet.gz") is None


def test_bad_inputs_quarantined_good_docs_survive(tmp_path, corpus_dir):
    exp = write_bad_inputs(corpus_dir, tmp_path)
    (exp["dir"] / "README.md").write_text("not a corpus file")  # skipped, not read
    cfg = ReadConfig()
    splits = list_splits([str(exp["dir"])], cfg.split_bytes)
    assert {s["dataset"] for s in splits} == {"bad"}
    assert not any(s["file"].endswith("README.md") for s in splits)
    rows = _read_all(splits, cfg)
    good: dict[str, int] = {}
    bad: dict[str, int] = {}
    for r in rows:
        name = r["file"].split("/")[-1]
        if r["bad"] is None:
            assert r["text"] and r["raw"] is None
            good[name] = good.get(name, 0) + 1
        else:
            assert r["bad"] in BAD_REASONS and r["text"] is None and r["raw"] is not None
            bad[r["bad"]] = bad.get(r["bad"], 0) + 1
    assert good == exp["good"], good
    assert bad == exp["bad"], bad
    by_reason = {r["bad"]: r for r in rows if r["bad"]}
    # raw bytes are kept so nothing is lost; the 50 MB line keeps a prefix and its full length
    assert b"\xff\xfe" in by_reason["invalid_utf8"]["raw"]
    assert b"\x00" in by_reason["nul_byte"]["raw"]
    big = by_reason["too_long"]
    assert big["bytes_in"] > 50_000_000 and len(big["raw"]) == cfg.reject_prefix_bytes and big["line"] == 47
    assert by_reason["non_korean_file"]["raw"].startswith(b"This is English")
    # ids: input ids kept as strings, else <dataset>/<file>:<line>
    ids = {r["id"] for r in rows if r["bad"] is None}
    assert "zst-0" in ids and "pq-39" in ids and "bad/mixed.jsonl:1" in ids


def test_byte_range_splits_read_every_line_once(tmp_path, corpus_dir):
    src = corpus_dir / "soynlp_news_sample" / "doublespace_line_corpus_sample.jsonl"  # 482 long lines
    whole = _read_all(list_splits([str(src)]), ReadConfig())
    splits = list_splits([str(src)], split_bytes=10_000)
    assert len(splits) > 50
    parts = _read_all(splits, ReadConfig())
    assert [r["text"] for r in parts] == [r["text"] for r in whole]
    assert len(whole) == 482 and all(r["bad"] is None for r in whole)
    offsets = [r["offset"] for r in parts]
    assert offsets == sorted(offsets) and len(set(offsets)) == 482


def test_source_field_and_custom_text_field(tmp_path):
    p = tmp_path / "ds" / "a.jsonl.gz"
    p.parent.mkdir()
    recs = [{"body": "한국어 문서입니다 아주 좋은 문장이에요", "source": "wiki", "doc": 7},
            {"body": "두 번째 한국어 문서입니다 역시 좋아요"}]
    p.write_bytes(gzip.compress("\n".join(json.dumps(r, ensure_ascii=False) for r in recs).encode()))
    rows = _read_all(list_splits([str(p)]), ReadConfig(text_field="body", id_field="doc"))
    assert [(r["id"], r["source"]) for r in rows] == [("7", "wiki"), ("ds/a.jsonl.gz:2", "ds")]


def test_missing_input_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        list_splits([str(tmp_path / "nope")])
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(ValueError, match="unsupported file type"):
        list_splits([str(tmp_path / "x.csv")])


def test_keys_unique_across_inputs_with_colliding_ids(tmp_path):
    """Same file name, same ids in two input directories: the reader's keys still differ; a lone
    surrogate escaped in JSON is quarantined as invalid_utf8, not passed on to crash a later stage."""
    for root in ("a", "b"):
        d = tmp_path / root / "corpus"
        d.mkdir(parents=True)
        (d / "part.jsonl").write_text('{"id": 1, "text": "첫 번째 문서입니다"}\n{"id": 2, "text": "두 번째 문서입니다"}\n'
                                      '{"id": 3, "text": "깨진 \\ud800 문서"}\n', encoding="utf-8")
    cfg = ReadConfig(min_hangul_ratio=0)
    splits = list_splits([str(tmp_path / "a"), str(tmp_path / "b")], cfg.split_bytes)
    assert [s["file"] for s in splits] == ["corpus/part.jsonl"] * 2 and [s["file_index"] for s in splits] == [0, 1]
    rows = _read_all(splits, cfg)
    good = [r for r in rows if r["bad"] is None]
    assert [r["id"] for r in good] == ["1", "2", "1", "2"]
    assert len({r["key"] for r in rows}) == len(rows) == 6
    assert [r["bad"] for r in rows if r["bad"]] == ["invalid_utf8", "invalid_utf8"]


def _rows(path, cfg, fast):
    splits = list_splits([str(path)], cfg.split_bytes)
    return [t.to_pylist() for s in splits for t in read_split(s, cfg, fast=fast)]


def test_block_fast_path_equals_line_by_line_on_real_text(tmp_path, corpus_dir):
    """The JSONL block fast path gives the same tables (same cuts, rows, ids, keys) as json.loads per line."""
    src = corpus_dir / "korean_hate_speech" / "labeled_train.jsonl"
    cfg = ReadConfig(batch_rows=1000)
    fast, slow = _rows(src, cfg, True), _rows(src, cfg, False)
    assert len(fast) > 3 and fast == slow
    # integer ids (every public dataset numbers its rows) and string ids take the fast path too
    lines = src.read_text(encoding="utf-8").splitlines()[:3000]
    p = tmp_path / "ids" / "ids.jsonl"
    p.parent.mkdir()
    p.write_text("".join(json.dumps({"id": i if i < 1500 else f"s{i}", **json.loads(l)}, ensure_ascii=False) + "\n"
                         for i, l in enumerate(lines)), encoding="utf-8")
    assert _rows(p, cfg, True) == _rows(p, cfg, False)
    # byte-range splits: same rows as the per-line reader
    splits = list_splits([str(src)], 300_000)
    assert len(splits) > 3
    got = [t.to_pylist() for s in splits for t in read_split(s, cfg)]
    ref = [t.to_pylist() for s in splits for t in read_split(s, cfg, fast=False)]
    assert got == ref


def test_block_fast_path_bad_lines_quarantined_identically(tmp_path, corpus_dir):
    """Bad lines inside otherwise good blocks (and lines the block parser would read differently)
    come out exactly as line by line: every line keeps its reason, detail and raw bytes."""
    good = [l for l in (corpus_dir / "klue_dev_sentences" / "klue_dev_sentences.jsonl").read_bytes().split(b"\n") if l]
    bad = [b'{"text": 5}', b'{"text": "\xed\x95\x9c", "text": "b"}', b'[1, 2]', b'null', b'{"text": "a"}{"text": "b"}',
           b'{"text": "a"} {"text": "b"}', b'\xef\xbb\xbf{"text": "\xea\xb0\x80\xea\xb0\x80"}', b'{"text": "\\ud800"}',
           b'{"text": "a\\u0000b"}', b'{"text": NaN, "x": 1}', b'{"id": 1.0, "text": "\xea\xb0\x80"}',
           b'{"id": true, "text": "\xea\xb0\x80"}', b'{"text": "\xea\xb0\x80", "x": 1e999}', b'{"te\\u0078t": "b"}',
           b'{"text": "\xff\xfe"}', b'{"text": "a", "x": "\xc3"}', b'{"text": null}', b'{"source": 3, "text": "x"}',
           b'{"text": "x", "source": ""}', b'{"text": "x", "id": ""}', b'   ', b'', b'{"text": "x"}\r',
           b'{"text": "x", "n": ' + b"1" * 5000 + b'}', b'{"text": "x", "deep": ' + b"[" * 3000 + b"]" * 3000 + b'}',
           b'{"text": "a\tb"}', b'{"text": "\xea\xb0\x80\x00"}', b'{"text": "x",}', b'{"a": {"text": "y"}, "text": "z"}']
    lines = []
    for i, g in enumerate(good[:6000]):
        lines.append(g)
        if i % 97 == 5:
            lines.append(bad[(i // 97) % len(bad)])
    p = tmp_path / "mix" / "mix.jsonl"
    p.parent.mkdir()
    p.write_bytes(b"\n".join(lines) + b"\n")
    cfg = ReadConfig(batch_rows=512)
    fast, slow = _rows(p, cfg, True), _rows(p, cfg, False)
    assert fast == slow
    reasons = {r["bad"] for t in fast for r in t if r["bad"]}
    assert {"malformed_json", "missing_field", "invalid_utf8", "nul_byte"} <= reasons


def test_group_splits_by_bytes_and_min_tasks():
    """Read tasks take consecutive splits up to read.task_bytes, or 1/min_tasks of a small input; a
    split larger than the target is a group of its own; order and membership are the listing's."""
    from polyko.data.io import group_splits

    splits = [{"path": f"f{i}", "start": 0, "end": -1, "size": size} for i, size in
              enumerate([5, 5, 5, 40, 5, 5, 5, 5, 5, 5])]
    for cfg, sizes in ((ReadConfig(task_bytes=15, min_tasks=1), [[5, 5, 5], [40], [5, 5, 5], [5, 5, 5]]),
                       (ReadConfig(task_bytes=1000, min_tasks=4), [[5, 5, 5], [40], [5, 5, 5, 5], [5, 5]]),
                       (ReadConfig(task_bytes=0), [[s["size"]] for s in splits]),
                       (ReadConfig(task_bytes=100, min_tasks=10), [[s["size"]] for s in splits]),
                       (ReadConfig(task_bytes=100, min_tasks=1), [[5, 5, 5, 40, 5, 5, 5, 5, 5, 5]])):
        groups = group_splits(splits, cfg)
        assert [[s["size"] for s in g] for g in groups] == sizes
        assert [s for g in groups for s in g] == splits
    ranged = [{"path": "big", "start": s, "end": s + 10, "size": 30} for s in (0, 10, 20)]
    assert [len(g) for g in group_splits(ranged, ReadConfig(task_bytes=20, min_tasks=1))] == [2, 1]
    with pytest.raises(ValueError, match="min_tasks"):
        ReadConfig(min_tasks=0)
