"""Evaluation decontamination (polyko.data.decontam) on the real KoBEST sets: lightly edited test items
planted in a real corpus are found and named; KoBEST's train split and unrelated real text are the
false-positive controls; one pipeline run (real local Ray cluster) removes, counts and quarantines them."""

from __future__ import annotations

import difflib
import importlib.util
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline_helpers import korean_docs
from polyko.data.decontam import DecontamConfig, build_index, canonical, decontam_batch, find_overlaps

REPO = Path(__file__).resolve().parents[1]
TASKS = ("boolq", "copa", "hellaswag", "sentineg", "wic")


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in open(path, encoding="utf-8")]


@pytest.fixture(scope="module")
def index(kobest_dir):
    return build_index(DecontamConfig(benchmarks=(str(kobest_dir),)))


def _edit(text: str, k: int, replace_word: bool = True) -> str:
    """A light edit a web copy shows: spacing changed, punctuation changed, one word replaced."""
    words = text.split()
    if replace_word and len(words) > 6:
        words[len(words) // 3] = "그리고"                       # one word substituted
    s = " ".join(words)
    s = s.replace(". ", "! ", 1) if k % 2 else s.replace(",", "", 2)  # punctuation
    half = len(s) // 2
    return s[:half].replace(" ", "") + s[half:]                  # first half re-spaced (no spaces)


def planted_docs(kobest_dir: Path, filler: list[str]) -> list[dict]:
    """Lightly edited test items, each inside a longer document of unrelated real sentences:
    [{"text", "bench", "field_text"}]."""
    out = []
    # (task, field, items, min canonical length, replace a word). Short items (SentiNeg sentences of
    # 20-40 syllables: WiC contexts, SentiNeg sentences) only get spacing/punctuation edits: one replaced word
    # leaves too few intact 13-grams of so short a text (a deliberate floor, see polyko.data.decontam).
    picks = [("boolq", "paragraph", 6, 30, True), ("hellaswag", "context", 4, 30, True),
             ("wic", "context_1", 3, 30, False), ("sentineg", "sentence", 2, 20, False)]
    k = 0
    for task, field, n, min_len, replace in picks:
        rows = [r for r in _rows(kobest_dir / task / "test.jsonl") if len(canonical(r[field])) >= min_len]
        for r in rows[:: max(1, len(rows) // n)][:n]:
            text = f"{filler[k]} {_edit(r[field], k, replace)} {filler[k + 1]}"
            out.append({"text": text, "bench": f"kobest/{task}/test", "field_text": r[field]})
            k += 2
    return out


def _same_field(index, field_id: int, field_text: str) -> bool:
    # the item named may be another row with the same passage (BoolQ asks several questions per paragraph)
    named = index.field_text[field_id]
    return canonical(named)[:200] == canonical(field_text)[:200]


def test_planted_edited_items_are_found_and_named(index, kobest_dir, corpus_dir):
    filler = korean_docs(corpus_dir, 60)
    planted = planted_docs(kobest_dir, filler)
    assert len(planted) == 15
    hits = find_overlaps([p["text"] for p in planted], index)
    for p, h in zip(planted, hits):
        assert h is not None, p["text"]
        fid, share = h
        assert index.field_bench[fid].split("/")[1] == p["bench"].split("/")[1]
        assert _same_field(index, fid, p["field_text"]), (index.field_text[fid], p["field_text"])
        assert 0.5 <= share <= 1.0
    # the unedited filler sentences (real KLUE text) alone are clean
    assert not any(find_overlaps(filler, index))


def test_train_split_and_unrelated_text_controls(index, kobest_dir, corpus_dir):
    """False-positive controls. KoBEST's train split is not free of its own test passages (BoolQ
    reuses Wikipedia paragraphs across splits, WiC reuses dictionary example sentences, HellaSwag
    contexts repeat): every train item flagged must really contain most of the named item (checked
    with difflib, independently of the n-gram code), and they must be few. Unrelated real text
    (news, reviews, dialogue) must give no flag at all."""
    flagged = total = 0
    for task in TASKS:
        rows = _rows(kobest_dir / task / "train.jsonl")
        texts = [" ".join(v for v in r.values() if isinstance(v, str)) for r in rows]
        total += len(texts)
        for t, h in zip(texts, find_overlaps(texts, index)):
            if h is None:
                continue
            flagged += 1
            field = canonical(index.field_text[h[0]])[:300]
            doc = canonical(t)
            sm = difflib.SequenceMatcher(None, field, doc, autojunk=False)
            matched = sum(b.size for b in sm.get_matching_blocks() if b.size >= 8)
            assert matched >= 0.4 * len(field), (task, index.field_text[h[0]], t)
    print(f"\nKoBEST train: {flagged} of {total} items hold a validation/test passage")
    assert flagged < 0.01 * total
    unrelated = []
    for name in ("klue_dev_sentences", "soynlp_news_sample", "chatbot_data"):
        for p in sorted((corpus_dir / name).glob("*.jsonl")):
            unrelated += [json.loads(line)["text"] for line in open(p, encoding="utf-8")]
    assert len(unrelated) > 20_000
    assert not any(find_overlaps(unrelated, index))


def test_flag_mode_keeps_documents_and_config_errors(index, kobest_dir):
    item = _rows(kobest_dir / "boolq" / "validation.jsonl")[5]["paragraph"]
    t = pa.table({"text": [item, "관련 없는 문장입니다 정말로 관련이 없습니다", None],
                  "kind": ["kept", "kept", "filter"]})
    flagged = decontam_batch(t, index, "flag")
    assert flagged["kind"].to_pylist() == ["kept", "kept", "filter"]
    assert flagged["bench"].to_pylist()[0].startswith("kobest/boolq/") and flagged["bench"].to_pylist()[1:] == [None, None]
    removed = decontam_batch(t, index, "remove")
    assert removed["kind"].to_pylist() == ["contaminated", "kept", "filter"]
    assert removed["bench_overlap"].to_pylist()[0] == 1.0
    for bad in (dict(mode="drop"), dict(ngram=2), dict(min_chars=5), dict(min_overlap=0)):
        with pytest.raises(ValueError):
            DecontamConfig(**bad)
    with pytest.raises(ValueError, match="does not exist"):
        build_index(DecontamConfig(benchmarks=("/nonexistent/kobest",)))


@pytest.fixture(scope="module")
def decontaminated_run(tmp_path_factory, corpus_dir, kobest_dir):
    """One pipeline run over real text with planted test items, --decontaminate KoBEST."""
    from polyko.cluster import init_ray

    init_ray(num_cpus=2)
    root = tmp_path_factory.mktemp("decontam_in")
    filler = korean_docs(corpus_dir, 400)
    planted = planted_docs(kobest_dir, filler[:60])
    (root / "web").mkdir()
    (root / "web" / "crawl.jsonl").write_text("\n".join(json.dumps({"text": d}, ensure_ascii=False) for d in
                                              [p["text"] for p in planted] + filler[60:]) + "\n", encoding="utf-8")
    out = tmp_path_factory.mktemp("decontam_out") / "data"
    spec = importlib.util.spec_from_file_location("prepare_data", REPO / "jobs" / "prepare_data.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    stats = job.main(["--input", str(root), "--output", str(out), "--decontaminate", str(kobest_dir),
                      "--set", "track=false"])
    return out, stats, planted


def test_pipeline_removes_counts_and_quarantines(decontaminated_run):
    out, stats, planted = decontaminated_run
    n = len(planted)
    assert sum(stats["contaminated"].values()) == n, stats["contaminated"]
    assert stats["per_source"]["web"]["contaminated"] == stats["contaminated"]
    assert set(stats["contaminated"]) <= {f"kobest/{t}/{s}" for t in TASKS for s in ("test", "validation")}
    s = stats["per_source"]["web"]
    assert s["documents_in"] == s["kept_after_clean"] + sum(s["filtered"].values()) + n
    cleaned = pq.read_table(out / "cleaned", columns=["text"])["text"].to_pylist()
    assert not set(p["text"] for p in planted) & set(cleaned)
    q = pq.read_table(out / "contaminated").to_pylist()
    assert len(q) == n and {r["kind"] for r in q} == {"contaminated"}
    by_text = {r["text"]: r for r in q}
    for p in planted:
        r = by_text[p["text"]]  # the quarantine keeps the document and names the item
        assert r["bench"].split("/")[1] == p["bench"].split("/")[1] and r["bench_item"] >= 0
        assert r["bench_overlap"] >= 0.5 and r["file"] == "web/crawl.jsonl"
