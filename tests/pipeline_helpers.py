"""Test inputs for the data pipeline tests: slices of the real shared corpus and files with every kind
of bad input the readers must survive (owned by tests/test_pipeline.py and tests/test_io.py), and the
digest of a packed token directory that the packing tests compare outputs by."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

def shard_digest(out: Path) -> str:
    """sha256 over a packed token directory's shard names and bytes, in manifest order."""
    from polyko.data.shards import read_manifest

    h = hashlib.sha256()
    for s in read_manifest(out)["shards"]:
        h.update(s["file"].encode())
        h.update((out / s["file"]).read_bytes())
    return h.hexdigest()


PHONE_OR_MAIL = re.compile(r"@|01[016789][-. ]?\d{3,4}[-. ]?\d{4}")


def _lines(path: Path, start: int = 0, stop: int | None = None) -> list[str]:
    with open(path, encoding="utf-8") as f:
        out = f.read().splitlines()
    return out[start:stop]


def korean_docs(corpus_dir: Path, n: int = 400) -> list[str]:
    """Real Korean sentences (KLUE dev), long enough to pass the filters."""
    docs = [json.loads(l)["text"] for l in _lines(corpus_dir / "klue_dev_sentences" / "klue_dev_sentences.jsonl")]
    return [d for d in docs if len(d) > 25][:n]


def write_real_slice(corpus_dir: Path, out: Path) -> dict[str, int]:
    """``out/<dataset>/...`` with slices of real corpora; returns line counts per dataset.

    nsmc: the first 2,500 reviews (exact duplicates such as 최고/굿, short reviews) plus every review of
    the sample with an e-mail or phone number (real PII); news_parallel: 500 .ko lines and their
    500 North-Korean-orthography rewrites (near duplicates); hate speech: 800 comments."""
    counts = {}
    nsmc = out / "nsmc"
    nsmc.mkdir(parents=True)
    head = _lines(corpus_dir / "nsmc_raw_sample" / "nsmc_raw_sample.part00.jsonl", 0, 2500)
    pii = [l for p in sorted((corpus_dir / "nsmc_raw_sample").glob("*.jsonl")) for l in _lines(p)
           if PHONE_OR_MAIL.search(json.loads(l)["text"])]
    (nsmc / "head.jsonl").write_text("\n".join(head) + "\n", encoding="utf-8")
    (nsmc / "pii.jsonl").write_text("\n".join(pii) + "\n", encoding="utf-8")
    counts["nsmc"] = len(head) + len(pii)
    news = out / "news_parallel"
    news.mkdir()
    src = corpus_dir / "korean_news_parallel_ko" / "news_ko_and_nk.jsonl"
    lines = _lines(src, 0, 500) + _lines(src, 1000, 1500)  # dev.ko[:500] + dev.nk[:500]
    (news / "ko_nk.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    counts["news_parallel"] = len(lines)
    hate = out / "hate"
    hate.mkdir()
    lines = _lines(corpus_dir / "korean_hate_speech" / "labeled_dev.jsonl", 0, 471)
    (hate / "dev.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    counts["hate"] = len(lines)
    return counts


RULE_DOCS = {  # one document per filter rule of polyko.data.clean, each dropped by that rule
    "empty": "   ",
    "too_short": "최고",
    "too_long": "가나다라마바사 " * 150_000,
    "low_hangul": "This is an English sentence about movies and actors.",
    "markup": "오늘의 설정 값은 다음과 같습니다 {a=1;} {b=2;} [c=3;] <d=4> |e| $f$ ^g^ `h` 끝입니다",
    "repetitive": "좋아요 좋아요 좋아요 좋아요 좋아요 좋아요",
}


def write_bad_inputs(corpus_dir: Path, out: Path) -> dict[str, object]:
    """``out/bad/...``: every kind of bad input next to good documents. Returns what to expect:
    ``good`` = {file name: number of good documents in it}, ``bad`` = {reason: count}."""
    d = out / "bad"
    d.mkdir(parents=True)
    good = korean_docs(corpus_dir, 400)
    rows = [json.dumps({"text": t}, ensure_ascii=False).encode() for t in good]
    expect_good: dict[str, int] = {}
    bad: dict[str, int] = {}

    # mixed.jsonl: good lines around one of each bad line kind
    lines = rows[:40] + [
        b'{"text": "\xff\xfe \xc3\x28 invalid utf-8 \xed\xa0\x80"}',  # invalid UTF-8
        b'{"text": "NUL \x00 byte here"}',                            # raw NUL byte
        b'{"text": "missing quote}',                                  # malformed JSON
        b'["a list", "not an object"]',                              # malformed JSON (not an object)
        b'{"body": "no text field"}',                                # missing field
        b'{"text": null}',                                           # missing field (null)
        b'{"text": "' + "가".encode() * (50 * 1024 * 1024 // 3) + b'"}',  # ~50 MB single line
    ] + rows[40:80]
    (d / "mixed.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    expect_good["mixed.jsonl"] = 80
    for r, n in (("invalid_utf8", 1), ("nul_byte", 1), ("malformed_json", 2), ("missing_field", 2), ("too_long", 1)):
        bad[r] = bad.get(r, 0) + n

    # empty .gz and empty plain file
    (d / "empty.jsonl.gz").write_bytes(b"")
    (d / "empty2.txt").write_bytes(b"")
    bad["empty_file"] = 2

    # truncated .gz: the documents before the cut survive
    body = b"\n".join(rows[80:280]) + b"\n"
    gz = gzip.compress(body)
    cut = gz[: len(gz) // 2]
    (d / "truncated.jsonl.gz").write_bytes(cut)
    expect_good["truncated.jsonl.gz"] = _complete_lines(gzip.GzipFile(fileobj=io.BytesIO(cut)))
    bad["truncated_file"] = 1

    # truncated .zst (zstandard's stream reader returns short data silently: must still be caught)
    zobj = zstandard.ZstdCompressor().compressobj()
    zc = b"".join(zobj.compress(body[i:i + 4096]) + zobj.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)
                  for i in range(0, len(body), 4096)) + zobj.flush()  # several blocks, like a streamed .zst
    zcut = zc[: len(zc) // 2]
    (d / "truncated.jsonl.zst").write_bytes(zcut)
    expect_good["truncated.jsonl.zst"] = _complete_lines(zstandard.ZstdDecompressor().stream_reader(
        io.BytesIO(zcut), read_across_frames=True))
    bad["truncated_file"] += 1
    assert expect_good["truncated.jsonl.gz"] > 0 and expect_good["truncated.jsonl.zst"] > 0

    # a non-Korean file (English): quarantined whole
    english = [f"This is English line number {i} about the weather and the markets." for i in range(50)]
    (d / "english.txt").write_text("\n".join(english) + "\n", encoding="utf-8")
    bad["non_korean_file"] = 50

    # good inputs in every other format: .txt, .jsonl.zst, .parquet
    (d / "docs.txt").write_text("\n".join(good[280:320]) + "\n", encoding="utf-8")
    expect_good["docs.txt"] = 40
    (d / "docs.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(
        b"\n".join(json.dumps({"text": t, "id": f"zst-{i}"}, ensure_ascii=False).encode()
                   for i, t in enumerate(good[320:360])) + b"\n"))
    expect_good["docs.jsonl.zst"] = 40
    pq.write_table(pa.table({"text": good[360:400], "id": [f"pq-{i}" for i in range(40)]}), d / "docs.parquet")
    expect_good["docs.parquet"] = 40
    return {"good": expect_good, "bad": bad, "dir": d}


def _complete_lines(stream) -> int:
    data = b""
    try:
        while chunk := (stream.read1(1 << 16) if hasattr(stream, "read1") else stream.read(1 << 16)):
            data += chunk
    except EOFError:
        pass
    return data.count(b"\n")


def write_rule_docs(corpus_dir: Path, out: Path) -> Path:
    """``out/rules/rules.jsonl``: real Korean documents (so the file passes the Korean probe) plus one
    document per filter rule."""
    d = out / "rules"
    d.mkdir(parents=True)
    docs = korean_docs(corpus_dir, 430)[400:] + list(RULE_DOCS.values())  # not reused by write_bad_inputs
    (d / "rules.jsonl").write_text("\n".join(json.dumps({"text": t}, ensure_ascii=False) for t in docs) + "\n",
                                   encoding="utf-8")
    return d
