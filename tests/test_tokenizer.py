"""The morpheme-aware byte-level BPE tokenizer, trained for real on a slice of the shared corpus
(KLUE sentences + NSMC reviews, written as the data pipeline's cleaned Parquet), through the job
entry point, tracked on a real MLflow server."""

from __future__ import annotations

import importlib.util
import json
import random
import unicodedata
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from polyko.tokenizer import MARKER, MorphemeSegmenter, tokenizer_hash
from polyko.tokenizer import bpe
from polyko.tokenizer.corpus import is_heldout, iter_docs, list_input_files
from polyko.tokenizer.fertility import measure
from polyko.tokenizer.train import TokenizerConfig, _fertility_section, training_text, train_tokenizer

REPO = Path(__file__).resolve().parents[1]
VOCAB = 2000
N_PER_SOURCE = 2500


def _load_job():
    spec = importlib.util.spec_from_file_location("train_tokenizer_job", REPO / "jobs" / "train_tokenizer.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _read_jsonl(path: Path, n: int) -> list[dict]:
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            d = json.loads(line)
            if d["text"].strip():
                out.append(d)
            if len(out) >= n:
                break
    return out


@pytest.fixture(scope="module")
def cleaned(tmp_path_factory, corpus_dir) -> Path:
    """Cleaned-corpus Parquet (id, text, source) like the data pipeline writes, 2 files."""
    root = tmp_path_factory.mktemp("cleaned")
    klue = _read_jsonl(corpus_dir / "klue_dev_sentences" / "klue_dev_sentences.jsonl", N_PER_SOURCE)
    nsmc = _read_jsonl(corpus_dir / "nsmc_raw_sample" / "nsmc_raw_sample.part00.jsonl", N_PER_SOURCE)
    rows = [{"id": f"klue-{i}", "text": d["text"], "source": "klue"} for i, d in enumerate(klue)]
    rows += [{"id": f"nsmc-{i}", "text": d["text"], "source": "nsmc"} for i, d in enumerate(nsmc)]
    # What the cleaner leaves in the text: PII placeholders. BPE must not learn pieces of them.
    for i in range(0, len(rows), 50):
        rows[i]["text"] += " 문의는 <|tel|> 또는 <|email|>로 주세요"
    pq.write_table(pa.Table.from_pylist(rows[0::2]), root / "part-00000.parquet", row_group_size=500)
    pq.write_table(pa.Table.from_pylist(rows[1::2]), root / "part-00001.parquet", row_group_size=500)
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cleaned, mlflow_server, polyglot_tokenizer_dir):
    """Train through jobs/train_tokenizer.py (the user's entry point)."""
    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    report = _load_job().main([
        "--input", str(cleaned), "--output", str(out), "--vocab-size", str(VOCAB), "--run-name", "test-tok",
        "--set", "heldout_fraction=0.05", "--set", "morph.min_frequency=3",
        "--set", f"reference_tokenizer={polyglot_tokenizer_dir}"])
    return out, report


def test_special_ids_and_offline_autotokenizer(trained):
    from transformers import AutoTokenizer

    out, report = trained
    tok = AutoTokenizer.from_pretrained(str(out))   # HF_HUB_OFFLINE=1 (conftest): local files only
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == 2
    assert tok.pad_token == "<pad>" and tok.pad_token_id == 0
    expected = {"<pad>": 0, "<eos>": 1, "<|endoftext|>": 2, "<|sep|>": 3,
                "<|acc|>": VOCAB, "<|tel|>": VOCAB + 1, "<|rrn|>": VOCAB + 2, "<|email|>": VOCAB + 3}
    assert {t: tok.convert_tokens_to_ids(t) for t in expected} == expected
    assert report["special_tokens"] == expected and report["bpe_vocab_size"] == VOCAB
    assert len(tok) == VOCAB + 4 and report["vocab_size"] == VOCAB + 4
    assert set(expected) <= set(tok.all_special_tokens)
    # learned tokens start at 4 with the byte alphabet, as in Polyglot-Ko
    ref = json.loads((out / "tokenizer.json").read_text())
    assert ref["pre_tokenizer"]["pretokenizers"][0] == {
        "type": "Split", "pattern": {"String": MARKER}, "behavior": "Removed", "invert": False}
    assert ref["pre_tokenizer"]["pretokenizers"][1]["type"] == "ByteLevel"
    assert sorted(ref["model"]["vocab"].values())[:5] == [0, 1, 2, 3, 4]
    # PII placeholders are atomic, wherever they sit, and never produced by BPE pieces
    ids = tok("계좌<|acc|>전화<|tel|>주민<|rrn|>메일<|email|>끝<|endoftext|>")["input_ids"]
    for t in ("<|acc|>", "<|tel|>", "<|rrn|>", "<|email|>", "<|endoftext|>"):
        assert ids.count(expected[t]) == 1
    vocab = ref["model"]["vocab"]
    assert not any("tel" in t or "email" in t for t in vocab if t not in expected), "BPE learned PII pieces"
    assert tok.decode(ids, skip_special_tokens=True) == "계좌전화주민메일끝"


def test_pii_tokens_match_the_cleaner():
    from polyko.data.clean import PII_TOKENS

    assert set(PII_TOKENS.values()) == set(bpe.PII_SPECIAL_TOKENS)


def _random_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    alphabet = (
        [chr(c) for c in range(0xAC00, 0xAC00 + 400)] + list("가나다라마바사아자차카타파하의는을를이가에서")
        + list("ㄱㄴㄷㅋㅎㅏㅓㅜㅠ") + list("abcXYZ0123456789.,!?~-()[]'\"") + list("漢字ひらがなカタカナ")
        + [" ", "  ", "\n", "\t", "\r\n", "\u3000", "\u00a0"] + ["😀", "👩‍💻", "🇰🇷", "❤️"]
        + list(bpe.PII_SPECIAL_TOKENS) + ["<|endoftext|>", "\u1100\u1161\u11a8", "\ufeff", "\x00", "é"])
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60))) for _ in range(n)]


def test_exact_round_trip_of_any_text(trained):
    from transformers import AutoTokenizer

    out, _ = trained
    hf = AutoTokenizer.from_pretrained(str(out))
    rust = bpe.load_tokenizer(out)
    cases = [
        "", " ", "   앞뒤 공백   ", "줄\n바꿈\n\n\n여러 줄\r\n윈도우", "탭\t\t문자",
        "한국어 English 日本語 中文 Русский العربية mixed123",
        "이모지 😀👍🏽👩‍👩‍👧 🇰🇷 ❤️ 끝",
        unicodedata.normalize("NFD", "한글 자모 분해 형태 NFD: 훈민정음"),
        "옛한글 ᄀᆞᆫ ᄒᆞᆫ 글", "Ｆｕｌｌｗｉｄｔｈ　ＡＢＣ　１２３", "ㅋㅋㅋㅋㅋ ㅠㅠ ㅎㅎ;;", "....!!!???~~~",
        "전화 <|tel|>, 메일 <|email|>, 계좌<|acc|> 주민번호<|rrn|>.", "<|endoftext|><|sep|><pad><eos>",
        "<|tel", "|>", "< |tel| >", "zero\u200bwidth\u200djoiner", "\x00\x01\x7f 제어문자",
        "https://example.com/경로?q=한글&x=1", "가" * 3000,
    ]
    for s in cases + _random_texts(300):
        ids = hf(s)["input_ids"]
        assert hf.decode(ids) == s, repr(s)
        assert rust.decode(rust.encode(s, add_special_tokens=False).ids, skip_special_tokens=False) == s, repr(s)
    # The one exception, shared with Polyglot-Ko: the morpheme marker itself is removed.
    assert hf.decode(hf("가" + MARKER + "나")["input_ids"]) == "가나"


def test_merges_never_cross_morpheme_boundaries(trained, cleaned):
    from tokenizers import pre_tokenizers

    out, _ = trained
    seg = MorphemeSegmenter.load(out)
    all_docs = list(iter_docs(list_input_files(cleaned), root=cleaned))
    docs = [d.text for d in all_docs if not is_heldout(d.id, 0.05)]      # what BPE trained on
    heldout = [d.text for d in all_docs if is_heldout(d.id, 0.05)]
    texts = [training_text(t, seg) for t in docs]
    assert sum(t.count(MARKER) for t in texts) > len(texts), "soynlp found (almost) no boundaries"
    # markers only ever add boundaries (special-token strings become boundaries too)
    assert all(t.replace(MARKER, "") == d for t, d in zip(texts, docs) if "<|" not in d)

    tok = bpe.load_tokenizer(out)
    pre = tok.pre_tokenizer
    assert pre.pre_tokenize_str(MARKER) == []           # the marker never reaches BPE ...
    marker_bytes = pre_tokenizers.ByteLevel(add_prefix_space=False).pre_tokenize_str(MARKER)[0][0]
    assert not any(marker_bytes in t for t in tok.get_vocab())  # ... nor its bytes the vocabulary
    # Every learned token lies inside one training pre-token (= one morpheme piece): no merge
    # ever crossed a marker.
    pieces = "\n".join(p for t in texts for p, _ in pre.pre_tokenize_str(t))  # byte-level strings
    learned = [t for t, i in tok.get_vocab().items() if 4 + 256 <= i < VOCAB]
    spanning = [t for t in learned if t not in pieces]
    assert not spanning, f"tokens spanning a morpheme boundary: {spanning[:10]}"
    # every soynlp boundary is a token boundary in training-style encoding
    for t in texts[:300]:
        starts = {o[0] for o in tok.encode(t, add_special_tokens=False).offsets}
        for k, ch in enumerate(t):
            if ch == MARKER and k + 1 < len(t) and t[k + 1] != MARKER and not t[k + 1].isspace():
                assert k + 1 in starts, (t, k)

    # Negative control: the same documents without markers (plain byte-level BPE, same vocab)
    # DO give tokens across soynlp's boundaries, and agree less with them on held-out text.
    plain = bpe.new_tokenizer()
    plain.train_from_iterator(docs, trainer=bpe.new_trainer(VOCAB, 2))
    plain_learned = [t for t, i in plain.get_vocab().items() if 4 + 256 <= i < VOCAB]
    assert [t for t in plain_learned if t not in pieces], "control: plain BPE should span boundaries"
    ours_recall = measure(tok, heldout, segmenter=seg)["boundary_recall"]
    plain_recall = measure(plain, heldout, segmenter=seg)["boundary_recall"]
    assert ours_recall > plain_recall, (ours_recall, plain_recall)


def test_fertility_report_and_mlflow(trained, mlflow_server):
    import mlflow

    out, report = trained
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["tokenizer_hash"] == report["tokenizer_hash"] == tokenizer_hash(out)
    fert = on_disk["fertility"]
    assert fert["heldout_documents"] > 100
    assert report["train"]["documents"] + on_disk["train"]["heldout_documents_total"] == 2 * N_PER_SOURCE
    for name in ("ours", "reference", "ours_segmented_input"):
        m = fert[name]
        assert m["characters"] > 1000 and m["tokens"] > 0
        assert m["tokens_per_char"] == pytest.approx(m["tokens"] / m["characters"])
        assert m["tokens_per_word"] == pytest.approx(m["tokens"] / m["words"])
    assert set(fert["per_source"]) == {"klue", "nsmc"}
    assert "reference_tokens_per_char" in fert["per_source"]["klue"]
    assert 0 < fert["ours"]["boundary_recall"] <= 1

    client = mlflow.MlflowClient(mlflow_server)
    run = client.get_run(report["mlflow_run_id"])
    assert run.data.tags["polyko.stage"] == "tokenizer"
    assert run.data.tags["polyko.tokenizer_hash"] == report["tokenizer_hash"]
    assert run.data.metrics["ours_tokens_per_char"] == pytest.approx(fert["ours"]["tokens_per_char"])
    assert run.data.metrics["reference_tokens_per_char"] == pytest.approx(fert["reference"]["tokens_per_char"])
    assert run.data.params["vocab_size"] == str(VOCAB)
    arts = {a.path for a in client.list_artifacts(run.info.run_id, "tokenizer")}
    assert {"tokenizer/tokenizer.json", "tokenizer/report.json"} <= arts
    assert json.loads((out / "polyko_run.json").read_text())["run_id"] == run.info.run_id


def test_reference_missing_is_a_note(trained):
    out, _ = trained
    tok, seg = bpe.load_tokenizer(out), MorphemeSegmenter.load(out)
    assert "note" in _fertility_section(tok, seg, [], None)
    from polyko.tokenizer.corpus import Doc

    sec = _fertility_section(tok, seg, [Doc("a", "안녕하세요 반갑습니다", "x")], Path("/nonexistent/tok"))
    assert sec["reference"] is None and "not found" in sec["note"] and sec["ours"]["tokens"] > 0


def test_tokenizer_hash_is_content_based(trained, tmp_path):
    out, _ = trained
    d = json.loads((out / "tokenizer.json").read_text())
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "tokenizer.json").write_text(json.dumps(d, indent=4))   # reformatted
    assert tokenizer_hash(tmp_path / "a") == tokenizer_hash(out)
    first = next(k for k, v in d["model"]["vocab"].items() if v == 500)
    d["model"]["vocab"][first + "x"] = d["model"]["vocab"].pop(first)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "tokenizer.json").write_text(json.dumps(d))
    assert tokenizer_hash(tmp_path / "b") != tokenizer_hash(out)
    with pytest.raises(ValueError, match="no tokenizer.json"):
        tokenizer_hash(tmp_path)


def test_heldout_split_is_deterministic():
    ids = [f"doc-{i}" for i in range(20000)]
    held = [i for i in ids if is_heldout(i, 0.05)]
    assert held == [i for i in ids if is_heldout(i, 0.05)]
    assert 0.04 < len(held) / len(ids) < 0.06
    assert not any(is_heldout(i, 0.0) for i in ids[:100])


def test_bad_input_is_a_clear_error(tmp_path, cleaned):
    with pytest.raises(ValueError, match="does not exist"):
        train_tokenizer(TokenizerConfig(input=str(tmp_path / "nope"), output=str(tmp_path / "t")))
    with pytest.raises(ValueError, match="too small"):
        TokenizerConfig(input="x", output="y", vocab_size=100)
    with pytest.raises(ValueError, match="inside the input"):
        train_tokenizer(TokenizerConfig(input=str(cleaned), output=str(cleaned / "tok")))
    pq.write_table(pa.table({"body": ["안녕"]}), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match="no 'text' column"):
        list(iter_docs([tmp_path / "bad.parquet"]))
    with pytest.raises(ValueError, match="choose one of"):
        from polyko.tokenizer import MorphConfig

        MorphConfig(method="mecab")


def test_rerun_of_finished_config_is_skipped(trained, cleaned, polyglot_tokenizer_dir):
    out, report = trained
    before = (out / "tokenizer.json").stat().st_mtime_ns
    again = _load_job().main([
        "--input", str(cleaned), "--output", str(out), "--vocab-size", str(VOCAB), "--run-name", "test-tok",
        "--set", "heldout_fraction=0.05", "--set", "morph.min_frequency=3",
        "--set", f"reference_tokenizer={polyglot_tokenizer_dir}"])
    assert again["mlflow_run_id"] == report["mlflow_run_id"]      # no new run, no retraining
    assert (out / "tokenizer.json").stat().st_mtime_ns == before


def test_rank_encoder_reproduces_the_trained_tokenizer(trained, cleaned):
    """Packing encodes with the tiktoken run of the BPE when it qualifies: polyko's own tokenizer does,
    with the same ids as the Rust tokenizer on real documents and on adversarial strings (PII tokens,
    <|endoftext|> inside a document, emoji sequences, NUL, BOM, CRLF, the U+0CF1 marker)."""
    from tokenizers import Tokenizer

    from polyko.tokenizer.rankbpe import rank_encoder

    out, _ = trained
    enc, why = rank_encoder(out)
    assert enc is not None, why
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    texts = [t for f in sorted(cleaned.rglob("*.parquet")) for t in pq.read_table(f).column("text").to_pylist()]
    texts += _random_texts(2000, seed=3) + [f"형태{MARKER}소{MARKER}", MARKER, f"{MARKER}<|acc|>{MARKER}"]
    for i in range(0, len(texts), 256):
        batch = texts[i:i + 256]
        flat, counts = enc.encode_docs(batch)
        want = [e.ids + [2] for e in tok.encode_batch(batch, add_special_tokens=False)]
        assert counts.tolist() == [len(w) for w in want]
        assert flat.tolist() == [t for w in want for t in w]
