"""The Ray Data corpus pipeline end to end (jobs/prepare_data.py -> polyko.data.pipeline) on slices of the
real shared corpus plus every kind of bad input, on a real local Ray cluster, logging to a real MLflow
server. One pipeline run (module fixture) feeds most checks; reruns check skip/refuse/resume."""

from __future__ import annotations

import importlib.util
import json
import logging
import re
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline_helpers import RULE_DOCS, korean_docs, write_bad_inputs, write_real_slice, write_rule_docs
from polyko.data.clean import FILTER_RULES, CleanConfig, clean_text

REPO = Path(__file__).resolve().parents[1]
EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+\.[A-Za-z]{2,}")


def _job():
    spec = importlib.util.spec_from_file_location("prepare_data", REPO / "jobs" / "prepare_data.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, corpus_dir):
    root = tmp_path_factory.mktemp("pipeline_inputs")
    counts = write_real_slice(corpus_dir, root / "real")
    bad = write_bad_inputs(corpus_dir, root / "badin")
    rules = write_rule_docs(corpus_dir, root / "rulesin")
    return {"real": root / "real", "bad": bad, "rules": rules, "counts": counts}


def _args(inputs, out, *extra):
    return ["--input", str(inputs["real"]), "--input", str(inputs["bad"]["dir"]), "--input", str(inputs["rules"]),
            "--output", str(out), "--set", "dedup.num_partitions=2", "--set", "keep_intermediate=true", *extra]


@pytest.fixture(scope="module")
def finished(inputs, tmp_path_factory, mlflow_server):
    """One full run of the job (clean + dedup, MLflow on) -> (output dir, returned stats)."""
    from polyko.cluster import init_ray

    init_ray(num_cpus=2)  # the job reuses it (same as the ray_local fixture's cluster)
    out = tmp_path_factory.mktemp("pipeline_out") / "data"
    stats = _job().main(_args(inputs, out, "--run-name", "test-pipeline"))
    return out, stats


def _cleaned(out: Path) -> list[dict]:
    return pq.read_table(out / "cleaned", columns=["id", "text", "source"]).to_pylist()


def test_outputs_and_totals(finished, inputs):
    out, stats = finished
    assert json.loads((out / "stats.json").read_text())["hashes"] == stats["hashes"]
    rows = _cleaned(out)
    assert len(rows) == stats["documents_out"] > 1000
    assert sum(len(r["text"].encode()) for r in rows) == stats["bytes_out"]
    per = stats["per_source"]
    for key in ("documents_in", "bytes_in", "documents_out", "bytes_out", "kept_after_clean"):
        assert sum(s[key] for s in per.values()) == stats[key]
    # every input line became exactly one record: kept, filtered or bad
    for s in per.values():
        assert s["documents_in"] == s["kept_after_clean"] + sum(s["filtered"].values()) + sum(s["bad"].values())
        assert s["contaminated"] == {}  # no --decontaminate in this run
        assert s["documents_out"] == s["kept_after_clean"] - sum(s["duplicates"].values())
    assert per["nsmc_raw"]["documents_in"] == inputs["counts"]["nsmc"]
    assert stats["timings_s"]["total_s"] > 0


def test_one_intermediate_file_per_read_task_so_dedup_runs_in_parallel(finished, inputs):
    """Every group of splits (read.task_bytes, but at least read.min_tasks groups for a small corpus:
    here a split each) is its own read+clean task and intermediate file, and the dedup stage reads one
    file per task: a minimum file size (Ray Data meets it by bundling the write operator's input rows,
    the splits) or Ray's 128 MiB Parquet read bins put a whole small corpus on one core."""
    from polyko.data.io import ReadConfig, group_splits, list_splits

    out, _ = finished
    splits = list_splits([str(inputs["real"]), str(inputs["bad"]["dir"]), str(inputs["rules"])])
    docs = [f for f in out.glob(".stages/clean-*/docs/*.parquet")]
    assert len(docs) == len(group_splits(splits, ReadConfig())) > 3
    cleaned = list((out / "cleaned").glob("*.parquet"))
    assert 3 < len(cleaned) <= len(docs)


def test_each_filter_rule_counted_per_source(finished):
    _, stats = finished
    rules = stats["per_source"]["rules"]["filtered"]
    assert rules == {rule: 1 for rule in FILTER_RULES}, rules
    assert set(RULE_DOCS) == set(FILTER_RULES)
    # real data: short reviews are dropped in NSMC, and totals are the sum over sources
    assert stats["per_source"]["nsmc_raw"]["filtered"]["too_short"] > 100
    for rule, n in stats["filtered"].items():
        assert n == sum(s["filtered"].get(rule, 0) for s in stats["per_source"].values())


def test_exact_and_near_duplicates_removed(finished):
    out, stats = finished
    rows = _cleaned(out)
    texts = [r["text"] for r in rows]
    assert len(texts) == len(set(texts)), "exact duplicates left in the output"
    assert len({r["id"] for r in rows}) == len(rows)
    per = stats["per_source"]
    assert per["nsmc_raw"]["duplicates"]["exact"] > 0
    # the North-Korean-orthography rewrites are near duplicates of the .ko lines: most are removed
    ko, nk = per["korean-english-park.dev.ko"], per["northkorean-english.dev.nk"]
    near = ko["duplicates"]["near"] + nk["duplicates"]["near"]
    assert near > 300, (ko, nk)
    assert stats["duplicates_removed"]["near"] >= near
    assert ko["documents_out"] + nk["documents_out"] < 0.7 * (ko["kept_after_clean"] + nk["kept_after_clean"])


def test_pii_masked_in_output(finished):
    out, stats = finished
    assert stats["pii_masked"].get("email", 0) >= 10 and stats["pii_masked"].get("tel", 0) >= 5
    texts = [r["text"] for r in _cleaned(out)]
    assert sum("<|email|>" in t for t in texts) >= 10
    assert sum("<|tel|>" in t for t in texts) >= 5
    assert not [t for t in texts if EMAIL.search(t)]


def test_bad_inputs_counted_quarantined_good_docs_kept(finished, inputs):
    out, stats = finished
    exp = inputs["bad"]
    assert stats["bad_records"] == exp["bad"]
    assert stats["per_source"]["bad"]["bad"] == exp["bad"]
    rej = pq.read_table(out / "rejected").to_pylist()
    assert len(rej) == sum(exp["bad"].values())
    assert json.loads((out / "rejected" / "_polyko.json").read_text())["records"] == len(rej)
    by = {}
    for r in rej:
        by.setdefault(r["reason"], []).append(r)
    assert b"\xff\xfe" in by["invalid_utf8"][0]["raw"] and by["invalid_utf8"][0]["line"] == 41
    assert by["too_long"][0]["bytes_in"] > 50_000_000 and by["too_long"][0]["file"] == "bad/mixed.jsonl"
    assert {r["file"] for r in by["truncated_file"]} == {"bad/truncated.jsonl.gz", "bad/truncated.jsonl.zst"}
    assert len(by["non_korean_file"]) == 50
    # the good documents of the damaged files went through cleaning like any other
    n_good = sum(exp["good"].values())
    s = stats["per_source"]["bad"]
    assert s["kept_after_clean"] + sum(s["filtered"].values()) == n_good


def test_all_formats_read(finished, inputs):
    out, _ = finished
    ids = {r["id"] for r in _cleaned(out)}
    assert {"zst-0", "pq-0"} <= ids                          # .jsonl.zst and .parquet, input ids kept
    assert any(i.startswith("bad/docs.txt:") for i in ids)   # .txt, positional ids
    assert any(i.startswith("bad/truncated.jsonl.gz:") for i in ids)  # docs before a truncation kept
    assert any(i.startswith("bad/mixed.jsonl:") for i in ids)


def test_rerun_skips_and_other_config_refused(finished, inputs, caplog):
    out, stats = finished
    before = (out / "stats.json").stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="polyko.data.pipeline"):
        again = _job().main(_args(inputs, out))
    assert "skipped" in caplog.text
    assert again["hashes"] == stats["hashes"] and again["documents_out"] == stats["documents_out"]
    assert (out / "stats.json").stat().st_mtime_ns == before
    with pytest.raises(ValueError, match="another config"):
        _job().main(_args(inputs, out, "--set", "dedup.threshold=0.7"))
    with pytest.raises(ValueError, match="another config"):
        _job().main(_args(inputs, out, "--set", "clean.filters.min_chars=3"))
    assert (out / "stats.json").stat().st_mtime_ns == before


def test_mlflow_run_logged(finished, mlflow_server):
    import mlflow

    out, stats = finished
    client = mlflow.MlflowClient(mlflow_server)
    run = client.get_run(stats["mlflow_run_id"])
    assert run.info.run_name == "test-pipeline"
    assert run.data.tags["polyko.stage"] == "data"
    assert run.data.metrics["documents_out"] == stats["documents_out"]
    assert run.data.metrics["duplicates_removed.exact"] == stats["duplicates_removed"]["exact"]
    assert run.data.metrics["bad_records.truncated_file"] == 2
    assert run.data.params["dedup.num_partitions"] == "2"
    assert "stats.json" in [a.path for a in client.list_artifacts(run.info.run_id)]
    assert json.loads((out / "polyko_run.json").read_text())["run_id"] == run.info.run_id


@pytest.mark.slow
def test_resume_after_crash_skips_finished_stage(finished, inputs, tmp_path, caplog):
    """A crash after the clean stage committed (simulated by removing what the dedup stage writes):
    the rerun skips reading/cleaning and produces the same output."""
    out, stats = finished
    copy = tmp_path / "data"
    shutil.copytree(out, copy)
    ref = sorted(r["id"] for r in _cleaned(copy))
    (copy / "cleaned" / "_polyko.json").unlink()
    (copy / "stats.json").unlink()
    with caplog.at_level(logging.INFO, logger="polyko.data.pipeline"):
        again = _job().main(_args(inputs, copy))
    assert "clean stage" in caplog.text and "skipped" in caplog.text
    assert sorted(r["id"] for r in _cleaned(copy)) == ref
    assert again["documents_out"] == stats["documents_out"]


def test_colliding_ids_across_inputs_both_survive(tmp_path, corpus_dir, ray_local):
    """Two inputs in different directories, same file name, ids 1..N in both (every public dataset
    numbers from 0 or 1): the run completes, both documents of each id survive, only the one real
    duplicate (same text in both files) is removed, and a record the cleaner cannot take (a lone
    surrogate escaped in JSON) is quarantined, not fatal."""
    docs = korean_docs(corpus_dir, 80)
    a, b = docs[:40], docs[40:80]
    b[4] = a[4]  # id 5: the same text in both inputs -> one exact duplicate
    for root, texts in (("one", a), ("two", b)):
        d = tmp_path / root / "corpus"
        d.mkdir(parents=True)
        lines = [json.dumps({"id": i + 1, "text": t}, ensure_ascii=False) for i, t in enumerate(texts)]
        if root == "two":
            lines.append('{"id": 41, "text": "깨진 문자 \\ud800 가 들어 있는 문서입니다 정말로요"}')
        (d / "part.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    stats = _job().main(["--input", str(tmp_path / "one"), "--input", str(tmp_path / "two"), "--output", str(out),
                         "--set", "track=false"])
    rows = _cleaned(out)
    assert stats["documents_out"] == len(rows) == 79
    assert stats["duplicates_removed"] == {"exact": 1, "near": 0}
    assert stats["bad_records"] == {"invalid_utf8": 1}
    by_id: dict = {}
    for r in rows:
        by_id.setdefault(r["id"], set()).add(r["text"])
    assert by_id["1"] == {a[0], b[0]} and by_id["5"] == {a[4]}
    assert len(by_id) == 40
    keys = pq.read_table(out / "cleaned", columns=["key"])["key"].to_pylist()
    assert len(set(keys)) == len(keys) == 79


def test_corpus_with_every_document_filtered_completes(tmp_path, ray_local):
    """Nothing survives cleaning (every document too short): the dedup stage gets an empty input and
    the run still completes with zero documents out (it used to fail on the empty key table)."""
    d = tmp_path / "in" / "short"
    d.mkdir(parents=True)
    (d / "a.jsonl").write_text('{"id": 1, "text": "짧다"}\n{"id": 2, "text": "최고"}\n', encoding="utf-8")
    (d / "b.jsonl").write_text('{"id": 1, "text": "굿"}\n', encoding="utf-8")
    stats = _job().main(["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--set", "track=false"])
    assert stats["documents_in"] == 3 and stats["documents_out"] == 0
    assert stats["filtered"] == {"too_short": 3}


def test_batch_canonical_forms_equal_per_document(corpus_dir):
    """The MinHash canonical forms computed on the joined batch equal the per-document ones
    (whitespace, NULs, final sigma, the separator inside a text), and so do the signatures."""
    import numpy as np

    from polyko.data.minhash import MinHasher, near_canonical, near_canonical_batch

    with open(corpus_dir / "nsmc_raw_sample" / "nsmc_raw_sample.part00.jsonl", encoding="utf-8") as f:
        real = [json.loads(l)["text"] for _, l in zip(range(3000), f)]
    odd = ["ΑΣ Β", "ΑΣ", "Σ", " ΟΔΟΣ ", "a\x00b", "  가  나\n다\t", "", " ", "İstanbul", "x\x01y", "\u3000가\u2028나"]
    for texts in (real + odd, odd, ["x\x01y", "z"], ["ΑΣ", "Β"], ["한 문서"]):
        for sp in (True, False):
            assert near_canonical_batch(texts, sp) == [near_canonical(t, sp) for t in texts]
    h = MinHasher(num_perm=128, ngram=5, seed=42, bands=9, rows=13)
    sig, ok = h.signatures(real + odd)
    ref = np.stack([h.signatures([t])[0][0] for t in real[:300] + odd])
    assert (sig[:300] == ref[:300]).all() and (sig[len(real):] == ref[300:]).all()
