"""KoBEST evaluation: lm-eval's own kobest tasks on the REAL KoBEST data (offline), a real tiny
GPT-NeoX checkpoint, a real MLflow server. Runs with --limit so the module takes ~1-2 min."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from polyko.eval import KOBEST_TASKS, EndpointConfig, EvalConfig, evaluate
from polyko.eval import kobest as kobest_mod
from polyko.eval import table as table_mod
from polyko.eval.table import load_published

REPO = Path(__file__).resolve().parents[1]
LIMIT = 6


@pytest.fixture(scope="module")
def zero_shot(mlflow_server, tiny_hf_checkpoint, kobest_dir, tmp_path_factory):
    """All five tasks, 0-shot, first LIMIT docs each (in-process)."""
    cfg = EvalConfig(model=str(tiny_hf_checkpoint), tasks=["kobest"], shots=[0], limit=LIMIT,
                     kobest_dir=str(kobest_dir), output=str(tmp_path_factory.mktemp("eval0")), batch_size=8,
                     device="cpu", run_name="tiny-0shot")
    return cfg, evaluate(cfg)


@pytest.fixture(scope="module")
def few_shot(mlflow_server, tiny_hf_checkpoint, kobest_dir, tmp_path_factory):
    """COPA 1-shot (a shot count the card reports), samples logged, checkpoint registered."""
    cfg = EvalConfig(model=str(tiny_hf_checkpoint), tasks=["copa"], shots=[1], limit=LIMIT,
                     kobest_dir=str(kobest_dir), output=str(tmp_path_factory.mktemp("eval1")), batch_size=8,
                     device="cpu", log_samples=True, register_name="eval-test-tiny", register_alias="candidate",
                     run_name="tiny-copa-1shot")
    return cfg, evaluate(cfg)


def test_zero_shot_outputs_and_mlflow(zero_shot, tiny_hf_checkpoint):
    from mlflow import MlflowClient

    cfg, res = zero_shot
    out = Path(res["output"])
    results = json.loads((out / "results.json").read_text())
    lm = results["lm_eval"]["0"]
    assert set(KOBEST_TASKS) <= set(lm["results"]), lm["results"].keys()
    assert lm["n-shot"]["kobest_copa"] == 0
    # Loaded split sizes are the real test sets (sentineg: the negated test set only, not +test_originated).
    assert lm["n-samples"]["kobest_sentineg"] == {"original": 397, "effective": LIMIT}
    assert res["split_sizes"] == {"kobest_boolq": 1404, "kobest_copa": 1000, "kobest_hellaswag": 500,
                                  "kobest_sentineg": 397, "kobest_wic": 1260}
    for t in KOBEST_TASKS:
        assert 0.0 <= res["metrics"][f"{t}/acc/0shot"] <= 1.0
        assert 0.0 <= res["metrics"][f"{t}/f1/0shot"] <= 1.0
    assert "kobest_hellaswag/acc_norm/0shot" in res["metrics"]
    assert res["metrics"]["kobest/f1_avg/0shot"] == pytest.approx(
        sum(res["metrics"][f"{t}/f1/0shot"] for t in KOBEST_TASKS) / 5)

    md = (out / "table.md").read_text()
    assert "| sentineg |" in md and "| average |" in md and f"--limit {LIMIT}" in md
    assert f"{res['metrics']['kobest_copa/f1/0shot']:.4f}" in md
    # Published columns at the same shot count: a tiny model is compared with polyglot-ko-1.3b (nearest size)
    # and shown next to every published model; the delta is ours - 1.3b.
    assert res["reference"] == "EleutherAI/polyglot-ko-1.3b"
    head = next(line for line in md.splitlines() if line.startswith("| task | shots |"))
    for m in ("polyglot-ko-1.3b (1.3B)", "polyglot-ko-3.8b (3.8B)", "polyglot-ko-5.8b (5.8B)",
              "polyglot-ko-12.8b (12.8B)", "kogpt (6.0B)", "xglm-7.5B (7.5B)", "Δ vs polyglot-ko-1.3b"):
        assert m in head, (m, head)
    pub = load_published()["models"]
    for t in KOBEST_TASKS:
        row = next(line for line in md.splitlines() if line.startswith(f"| {t.removeprefix('kobest_')} | 0 |"))
        ours = res["metrics"][f"{t}/f1/0shot"]
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[2] == f"{ours:.4f}"
        assert cells[3] == f"{ours - pub['EleutherAI/polyglot-ko-1.3b']['f1']['0'][t]:+.4f}"
        assert cells[4:] == [f"{pub[m]['f1']['0'][t]:.4f}" for m in table_mod.PUBLISHED_ORDER]

    client = MlflowClient()
    run = client.get_run(res["run_id"])
    assert client.get_experiment(run.info.experiment_id).name == "polyko-eval"
    for t in KOBEST_TASKS:
        assert run.data.metrics[f"{t}/f1/0shot"] == pytest.approx(res["metrics"][f"{t}/f1/0shot"])
        assert f"{t}/acc/0shot" in run.data.metrics
    assert not any("," in k for k in run.data.metrics)
    assert run.data.tags["polyko.eval.reference"] == "EleutherAI/polyglot-ko-1.3b"
    assert run.data.metrics["published/kobest_copa/f1/0shot"] == 0.7196
    assert run.data.metrics["kobest/f1_avg_vs_ref/0shot"] == pytest.approx(
        res["metrics"]["kobest/f1_avg/0shot"] - sum(pub["EleutherAI/polyglot-ko-1.3b"]["f1"]["0"].values()) / 5)
    assert run.data.tags["polyko.checkpoint"] == str(tiny_hf_checkpoint)
    assert run.data.params["limit"] == str(LIMIT)
    arts = {a.path for a in client.list_artifacts(res["run_id"])}
    assert {"table.md", "results.json"} <= arts
    assert json.loads((out / "polyko_run.json").read_text())["run_id"] == res["run_id"]


def test_deterministic_via_cli(zero_shot, tmp_path):
    """Same checkpoint + config through jobs/evaluate.py in a fresh process -> identical numbers."""
    cfg, res = zero_shot
    out = tmp_path / "again"
    cmd = [sys.executable, str(REPO / "jobs" / "evaluate.py"), "--model", cfg.model, "--shots", "0",
           "--limit", str(LIMIT), "--kobest-dir", cfg.kobest_dir, "--output", str(out), "--batch-size", "8",
           "--device", "cpu", "--run-name", "tiny-0shot-again"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ), cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "Running loglikelihood requests" in p.stderr  # lm-eval's progress bar is visible
    again = json.loads((out / "results.json").read_text())["polyko"]["metrics"]
    assert again == res["metrics"]


def test_few_shot_published_table_and_register(few_shot, tiny_hf_checkpoint):
    from mlflow import MlflowClient

    cfg, res = few_shot
    out = Path(res["output"])
    lm = json.loads((out / "results.json").read_text())["lm_eval"]["1"]
    assert lm["n-shot"]["kobest_copa"] == 1 and set(lm["results"]) >= {"kobest_copa"}
    assert "kobest_boolq" not in lm["results"]
    # Few-shot really happened: every prompt holds one solved training example before the test doc.
    rows = [json.loads(line) for line in (out / "samples_kobest_copa_1shot.jsonl").read_text().splitlines()]
    assert len(rows) == LIMIT
    ctx = rows[0]["arguments"][0][0]  # [context, continuation] of the first choice
    assert ctx.count("\n\n") == 1 and re.search(r"(왜냐하면|그래서)", ctx.split("\n\n")[0])
    # 1 shot is only in the superseded 2022 card: the table puts its 1-shot COPA numbers next to ours.
    md = (out / "table.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| copa | 1 |"))
    assert f"{res['metrics']['kobest_copa/f1/1shot']:.4f}" in row
    assert "0.7106" in row and "0.7446" in row and "0.6773" in row  # polyglot-ko-1.3b, kogpt, trinity
    assert "EleutherAI/polyglot" in md
    # --register: the evaluated checkpoint is a registry version with the alias, linked to this eval run.
    client = MlflowClient()
    mv = client.get_model_version_by_alias("eval-test-tiny", "candidate")
    assert mv.version == res["registered_version"] and mv.run_id == res["run_id"]


def test_compare_shows_differing_params(zero_shot, few_shot):
    from polyko.eval.compare import compare_runs

    text = compare_runs("eval", metrics=["kobest_copa/f1/*"])
    head = next(line for line in text.splitlines() if line.startswith("| run |"))
    assert "tasks" in head and "shots" in head and "log_samples" in head  # they differ across runs
    assert "seed" not in head and "batch_size" not in head  # identical in every run: hidden
    assert "kobest_copa/f1/0shot" in head and "kobest_copa/f1/1shot" in head
    assert "tiny-0shot" in text and "tiny-copa-1shot" in text
    p = subprocess.run([sys.executable, str(REPO / "jobs" / "compare.py"), "--experiment", "polyko-eval",
                        "--metric", "kobest/f1_avg/*"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "kobest/f1_avg/0shot" in p.stdout and "MLflow UI" in p.stdout
    # Published rows close the table: polyglot-ko-12.8b's 0-shot COPA next to the runs' own.
    row = next(line for line in text.splitlines() if "| EleutherAI/polyglot-ko-12.8b |" in line)
    assert row.startswith("| published |") and "0.7937" in row


def test_superseded_card_numbers_are_the_cards(shared_data):
    """The superseded 2022 card kept in published_kobest.json == that card's tables (re-parsed here)."""
    pub = load_published()["superseded_2022_card"]
    card = (shared_data / "reference" / "polyglot-ko-1.3b.model_card.md").read_text(encoding="utf-8")
    import hashlib

    assert hashlib.sha256(card.encode("utf-8")).hexdigest() == pub["source"]["sha256"]
    order = ["kobest_boolq", "kobest_copa", "kobest_wic", "kobest_hellaswag", "kobest_sentineg", "average"]
    n = 0
    for block in re.finditer(r"few shot examples = (\d+)\n\n((?:\|.*\n)+)", card):
        for line in block.group(2).splitlines()[2:]:
            cells = [c.strip().replace("**", "") for c in line.strip("|").split("|")]
            name = re.match(r"\[([^\]]+)\]", cells[0]).group(1)
            got = pub["models"][name]["f1"][block.group(1)]
            assert [got[k] for k in order] == [float(v) for v in cells[2:]]
            n += 1
    assert n == 15  # 5 shot counts x 3 models
    assert "EleutherAI/polyglot-ko-3.8b" not in pub["models"]  # not in that source: not invented


def test_published_numbers_equal_the_reference_file(shared_data):
    """Every published number (4 Polyglot-Ko sizes + 3 baselines, 5 tasks, 0/5/10/50 shots) equals the
    transcribed reference file, which is the file whose sha256 is recorded; sources and notes kept."""
    import hashlib

    from polyko.eval.table import PUBLISHED_ORDER, published_f1

    raw = (shared_data / "reference" / "polyglot-ko-kobest-published.json").read_bytes()
    pub = load_published()
    assert hashlib.sha256(raw).hexdigest() == pub["transcribed_from"]["sha256"]
    ref = json.loads(raw)
    assert pub["sources"] == ref["sources"] and pub["notes"] == ref["notes"]
    n = 0
    for task, by_model in ref["results"].items():
        for model, row in by_model.items():
            for s in ("0", "5", "10", "50"):
                assert pub["models"][model]["f1"][s][task] == row[s], (model, task, s)
                assert published_f1(model, task, int(s)) == row[s]
                n += 1
            assert pub["models"][model]["source"][task] == row["source"]
    assert n == 140 and set(pub["models"]) == set(PUBLISHED_ORDER)
    ids = {src["id"] for src in pub["sources"]}
    assert all(src in ids for m in pub["models"].values() for src in m["source"].values())
    # 'average' is derived (the cards have none): the mean of the five task F1s.
    assert published_f1("EleutherAI/polyglot-ko-1.3b", "average", 0) == pytest.approx(
        sum(ref["results"][t]["EleutherAI/polyglot-ko-1.3b"]["0"] for t in KOBEST_TASKS) / 5)


def test_reference_model_and_comparison_metrics():
    from polyko.eval.table import comparison_metrics, reference_model
    from polyko.model import RELEASED_PARAMS

    for size, n in RELEASED_PARAMS.items():
        assert reference_model(n) == f"EleutherAI/polyglot-ko-{size}"
    assert reference_model(4_000_000) == reference_model(None) == "EleutherAI/polyglot-ko-1.3b"
    assert reference_model(10**12, "3.8b") == "EleutherAI/polyglot-ko-3.8b"
    assert reference_model(None, "kakaobrain/kogpt") == "kakaobrain/kogpt"
    with pytest.raises(ValueError, match="no published numbers"):
        reference_model(None, "2.7b")
    with pytest.raises(ValueError, match="compare_to"):
        EvalConfig(model="x", compare_to="gpt2")
    got = comparison_metrics({"kobest_copa/f1/5shot": 0.7, "kobest_copa/acc/5shot": 0.7,
                              "kobest_copa/f1/1shot": 0.7}, "EleutherAI/polyglot-ko-12.8b")
    assert got == {"published/kobest_copa/f1/5shot": 0.8108, "kobest_copa/f1_vs_ref/5shot": pytest.approx(0.7 - 0.8108)}


def test_bad_inputs_fail_clearly(tmp_path, kobest_dir, monkeypatch, tiny_hf_checkpoint):
    with pytest.raises(ValueError, match="unknown task"):
        EvalConfig(model="x", tasks=["klue"])
    with pytest.raises(ValueError, match="lacks"):
        kobest_mod.resolve_data(str(tmp_path), ["kobest_copa"])
    monkeypatch.delenv("POLYKO_KOBEST_DIR", raising=False)
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE"):  # offline: no hub call, no retry wait
        kobest_mod.resolve_data("", ["kobest_copa"])
    monkeypatch.setenv("POLYKO_KOBEST_DIR", str(kobest_dir))
    assert kobest_mod.resolve_data("", ["kobest_copa"]).local_dir == kobest_dir.resolve()
    with pytest.raises(ValueError, match="tokenizer"):
        evaluate(EvalConfig(model="http://127.0.0.1:9/v1", output=str(tmp_path / "o")))
    with pytest.raises(ValueError, match="neither a directory"):
        evaluate(EvalConfig(model=str(tmp_path / "missing"), output=str(tmp_path / "o")))


def test_endpoint_model_args(tiny_hf_checkpoint):
    """A URL goes to lm-eval's local-completions with an explicit HF tokenizer and the model's context."""
    from polyko.eval.runner import model_spec

    cfg = EvalConfig(model="http://127.0.0.1:8000/v1/", endpoint=EndpointConfig(
        model_name="tiny", tokenizer=str(tiny_hf_checkpoint), num_concurrent=3))
    kind, args, _ = model_spec(cfg)
    assert kind == "local-completions"
    assert args["base_url"] == "http://127.0.0.1:8000/v1/completions" and args["model"] == "tiny"
    assert args["tokenizer_backend"] == "huggingface" and args["tokenizer"] == str(tiny_hf_checkpoint.resolve())
    assert args["num_concurrent"] == 3 and args["max_retries"] == 3 and args["max_length"] == 512
