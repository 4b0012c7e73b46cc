"""Train polyko's morpheme-aware byte-level BPE tokenizer (the Polyglot-Ko recipe), streaming.

    python jobs/train_tokenizer.py --input DIR/cleaned --output TOKDIR [--vocab-size 30000]

Steps (two streaming passes over the input; the corpus is never held in memory):

1. scan: read every document once in a fixed order; hold out ``heldout_fraction`` of them by hash
   of id (for the fertility report only); reservoir-sample at most ``morph.sample_sentences``
   lines of the training documents for soynlp; count documents and characters.
2. soynlp: learn word scores on the sample (:mod:`polyko.tokenizer.morph`).
3. BPE: stream the training documents again, insert U+0CF1 at morpheme boundaries (and in place
   of special-token strings such as ``<|tel|>``, so BPE learns no pieces of them), and feed
   batches to ``Tokenizer.train_from_iterator`` (counting and merging run in Rust).
4. save ``TOKDIR`` (tokenizer.json, tokenizer_config.json, special_tokens_map.json, morph.json),
   measure fertility on the held-out documents for ours and the reference Polyglot-Ko tokenizer,
   and write ``TOKDIR/report.json`` LAST (its presence means the directory is complete).

Everything is logged to MLflow (experiment ``polyko-tokenizer``) with lineage to the data run.

Inference does NOT segment. Polyglot-Ko segmented its tokenizer-training text; the released
tokenizer.json has no morphological analyzer, so prompts (and, as far as the released artifacts
show, pretraining data) are encoded as plain byte-level BPE over raw text. We do the same: the
markers only constrain which merges are learned (so the vocabulary is made of morpheme-like
pieces), the packed training data and the served model see plain text, and the Rust tokenizer
alone reproduces every encoding (no soynlp at run time). ``morph.json`` keeps the segmenter for
analysis; ``report.json`` shows fertility with and without inference-time segmentation (on the
shared corpus segmenting adds 0.2% tokens, and would cost a Python pass per request).

CPU: the 8.8 M-character shared corpus at vocab 30,000 takes ~80 s of CPU (soynlp ~half, BPE the
rest) and 1.3 GB RSS; wall time depends on the machine (see README).
"""

from __future__ import annotations

import os
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from polyko.tokenizer import bpe
from polyko.tokenizer.corpus import Doc, is_heldout, iter_docs, list_input_files
from polyko.tokenizer.morph import MARKER, MorphConfig, MorphemeSegmenter

REPORT = "report.json"
_SPECIALS = re.compile("|".join(re.escape(t) for t in bpe.ALL_SPECIAL_TOKENS))


@dataclass
class TokenizerConfig:
    """What to train on and how. Defaults reproduce Polyglot-Ko's 30,000-token layout."""

    input: str = ""                  # data pipeline's DIR/cleaned (Parquet), or .jsonl/.txt file(s)/dir
    output: str = ""                 # TOKDIR
    # Learned vocabulary incl. the 4 head special tokens and the 256 bytes (Polyglot-Ko: 30,000);
    # the PII tokens come after it, so the tokenizer has vocab_size + 4 ids.
    vocab_size: int = 30_000
    min_frequency: int = 2           # a merge must occur at least this often (drops one-off noise)
    text_column: str = "text"
    # Held-out share for the fertility report (by hash of id, never trained on). 1% of a real
    # corpus is plenty; at most heldout_max_docs of them (reservoir-sampled) are encoded.
    heldout_fraction: float = 0.01
    heldout_max_docs: int = 20_000
    # Cap the BPE training stream (0 = every training document). BPE word counts live in Rust
    # memory (distinct pre-tokens), so a multi-TB corpus should be capped to a ~10-50 GB sample.
    max_train_docs: int = 0
    max_train_chars: int = 0
    model_max_length: int = 2048     # written to tokenizer_config.json (the model's context)
    # Tokenizer directory (or tokenizer.json) compared side by side in report.json. "auto": the
    # released Polyglot-Ko tokenizer in the shared data ($POLYKO_REFERENCE_TOKENIZER,
    # $POLYKO_SHARED_DATA/reference/polyglot-ko-tokenizer, or ../shared/data beside the repo);
    # "" or a missing path: skipped, with a note in the report.
    reference_tokenizer: str = "auto"
    batch_docs: int = 1_000          # documents per batch handed to the Rust trainer
    morph: MorphConfig = field(default_factory=MorphConfig)

    def __post_init__(self):
        if self.vocab_size < bpe.MIN_VOCAB:
            raise ValueError(f"vocab_size={self.vocab_size} is too small (minimum {bpe.MIN_VOCAB})")
        if not 0 <= self.heldout_fraction < 1:
            raise ValueError(f"heldout_fraction={self.heldout_fraction} must be in [0, 1)")
        if self.min_frequency < 1 or self.batch_docs < 1:
            raise ValueError("min_frequency and batch_docs must be >= 1")


def resolve_reference(spec: str) -> Path | None:
    """The reference tokenizer directory for ``spec`` (see ``TokenizerConfig.reference_tokenizer``)."""
    if not spec:
        return None
    if spec != "auto":
        return Path(spec)
    if os.environ.get("POLYKO_REFERENCE_TOKENIZER"):
        return Path(os.environ["POLYKO_REFERENCE_TOKENIZER"])
    repo = Path(__file__).resolve().parents[3]
    shared = Path(os.environ.get("POLYKO_SHARED_DATA", repo.parent / "shared" / "data"))
    return shared / "reference" / "polyglot-ko-tokenizer"


def _stream(files: list[Path], cfg: TokenizerConfig, root: str) -> Iterator[tuple[Doc, bool]]:
    """(doc, held_out) in a fixed order, stopping at the training caps."""
    docs = chars = 0
    for doc in iter_docs(files, root=root, text_column=cfg.text_column):
        if is_heldout(doc.id, cfg.heldout_fraction):
            yield doc, True
            continue
        if (cfg.max_train_docs and docs >= cfg.max_train_docs) or \
                (cfg.max_train_chars and chars >= cfg.max_train_chars):
            return
        docs += 1
        chars += len(doc.text)
        yield doc, False


@dataclass
class _Scan:
    sample: list[str]
    heldout: list[Doc]
    train_docs: int = 0
    train_chars: int = 0
    heldout_docs: int = 0


def _scan(files: list[Path], cfg: TokenizerConfig) -> _Scan:
    """Pass 1: counts, a reservoir sample of lines for soynlp, a reservoir of held-out docs."""
    rng = random.Random(cfg.morph.seed)
    s = _Scan(sample=[], heldout=[])
    k, seen_lines = cfg.morph.sample_sentences, 0
    for doc, held in _stream(files, cfg, cfg.input):
        if held:
            s.heldout_docs += 1
            if len(s.heldout) < cfg.heldout_max_docs:
                s.heldout.append(doc)
            else:
                j = rng.randrange(s.heldout_docs)
                if j < cfg.heldout_max_docs:
                    s.heldout[j] = doc
            continue
        s.train_docs += 1
        s.train_chars += len(doc.text)
        if cfg.morph.method == "none":
            continue
        for line in doc.text.split("\n"):
            if not line.strip():
                continue
            seen_lines += 1
            if len(s.sample) < k:
                s.sample.append(line[:cfg.morph.max_sentence_chars])
            else:
                j = rng.randrange(seen_lines)
                if j < k:
                    s.sample[j] = line[:cfg.morph.max_sentence_chars]
    return s


def training_text(text: str, segmenter: MorphemeSegmenter) -> str:
    """What BPE sees for one document: special-token strings become boundaries, then morpheme
    boundaries are marked."""
    return segmenter.segment(_SPECIALS.sub(MARKER, text))


def _training_batches(files, cfg: TokenizerConfig, seg: MorphemeSegmenter) -> Iterator[list[str]]:
    batch: list[str] = []
    for doc, held in _stream(files, cfg, cfg.input):
        if held:
            continue
        batch.append(training_text(doc.text, seg))
        if len(batch) >= cfg.batch_docs:
            yield batch
            batch = []
    if batch:
        yield batch


def _fertility_section(tok, seg: MorphemeSegmenter, heldout: list[Doc], ref_dir: Path | None) -> dict[str, Any]:
    from polyko.tokenizer.fertility import measure, per_source

    texts = [d.text for d in heldout]
    sources = [d.source for d in heldout]
    out: dict[str, Any] = {"heldout_documents": len(texts)}
    if not texts:
        out["note"] = "no held-out documents (heldout_fraction=0 or a tiny input): nothing measured"
        return out
    out["ours"] = measure(tok, texts, segmenter=seg)
    if seg.cfg.method != "none":
        out["ours_segmented_input"] = measure(tok, texts, segmenter=seg, pre_segment=True)
    srcs = {s: {"documents": v["documents"], "ours_tokens_per_char": v["tokens_per_char"],
                "ours_tokens_per_word": v["tokens_per_word"]} for s, v in per_source(tok, texts, sources).items()}
    if ref_dir is not None and (ref_dir / "tokenizer.json" if ref_dir.is_dir() else ref_dir).is_file():
        ref = bpe.load_tokenizer(ref_dir)
        out["reference_tokenizer"] = str(ref_dir)
        out["reference"] = measure(ref, texts, segmenter=seg)
        out["ours_vs_reference_tokens"] = out["ours"]["tokens"] / max(out["reference"]["tokens"], 1)
        for s, v in per_source(ref, texts, sources).items():
            srcs[s]["reference_tokens_per_char"] = v["tokens_per_char"]
            srcs[s]["reference_tokens_per_word"] = v["tokens_per_word"]
    else:
        out["reference"] = None
        out["note"] = (f"reference tokenizer not found at {ref_dir}: comparison skipped" if ref_dir
                       else "no reference tokenizer configured: comparison skipped")
    out["per_source"] = srcs
    return out


def _finished_report(out: Path, cfg: TokenizerConfig) -> dict[str, Any] | None:
    """The report of a finished training of this same config in ``out`` (report.json is written
    last, and polyko_run.json records the config hash), so re-running a finished step does nothing."""
    import json

    from polyko import tracking
    from polyko.config import config_hash

    marker, report = out / tracking.RUN_MARKER, out / REPORT
    if not (marker.is_file() and report.is_file()):
        return None
    if json.loads(marker.read_text()).get("config_hash") != config_hash(cfg):
        return None
    return json.loads(report.read_text())


def train_tokenizer(cfg: TokenizerConfig, *, run_name: str | None = None) -> dict[str, Any]:
    """Train, save ``cfg.output`` and return the report (also ``cfg.output/report.json``)."""
    import json

    import mlflow

    from polyko import tracking

    if not cfg.input or not cfg.output:
        raise ValueError("TokenizerConfig needs both input (cleaned corpus) and output (TOKDIR)")
    inp, out = Path(cfg.input).resolve(), Path(cfg.output).resolve()
    if inp.is_dir() and (out == inp or inp in out.parents):
        raise ValueError(f"output {out} is inside the input {inp}: its files would be read as corpus")
    files = list_input_files(cfg.input)
    previous = _finished_report(out, cfg)
    if previous is not None:
        print(f"[polyko] tokenizer {out} already trained with this config: skipped", flush=True)
        return previous
    with tracking.start_run("tokenizer", cfg, output=out, parents=tracking.lineage(cfg.input),
                            run_name=run_name) as run:
        t0 = time.perf_counter()
        (out / REPORT).unlink(missing_ok=True)   # uncommitted until the new report is written
        scan = _scan(files, cfg)
        if scan.train_docs == 0:
            raise ValueError(f"no training documents in {cfg.input} (all empty or held out)")
        t_scan = time.perf_counter()
        seg = MorphemeSegmenter.train(scan.sample, cfg.morph)
        sample_lines, sample_chars = len(scan.sample), sum(len(x) for x in scan.sample)
        scan.sample = []
        t_morph = time.perf_counter()

        tok = bpe.new_tokenizer()
        tok.train_from_iterator(_training_batches(files, cfg, seg), trainer=bpe.new_trainer(
            cfg.vocab_size, cfg.min_frequency))
        learned = tok.get_vocab_size(with_added_tokens=True)
        bpe.add_pii_tokens(tok)
        t_bpe = time.perf_counter()

        bpe.save_tokenizer_dir(tok, out, model_max_length=cfg.model_max_length)
        seg.save(out)
        fert = _fertility_section(tok, seg, scan.heldout, resolve_reference(cfg.reference_tokenizer))
        t_end = time.perf_counter()

        report: dict[str, Any] = {
            "tokenizer_dir": str(out),
            "tokenizer_hash": bpe.tokenizer_hash(out),
            "vocab_size": tok.get_vocab_size(with_added_tokens=True),
            "bpe_vocab_size": learned,
            "requested_vocab_size": cfg.vocab_size,
            "special_tokens": {t: tok.token_to_id(t) for t in bpe.ALL_SPECIAL_TOKENS},
            "eos_token": bpe.ENDOFTEXT, "eos_id": tok.token_to_id(bpe.ENDOFTEXT),
            "pad_token": bpe.PAD, "pad_id": tok.token_to_id(bpe.PAD),
            "train": {"files": len(files), "documents": scan.train_docs, "characters": scan.train_chars,
                      "heldout_documents_total": scan.heldout_docs},
            "morph": {"method": cfg.morph.method, "score": cfg.morph.score,
                      "sample_sentences": sample_lines,
                      "sample_characters": sample_chars, "scored_words": len(seg.scores),
                      "marker": "U+0CF1"},
            "fertility": fert,
            "seconds": {"scan": round(t_scan - t0, 3), "soynlp": round(t_morph - t_scan, 3),
                        "bpe": round(t_bpe - t_morph, 3), "report": round(t_end - t_bpe, 3),
                        "total": round(t_end - t0, 3)},
            "mlflow_run_id": run.info.run_id,
        }
        if learned < cfg.vocab_size:
            report["note_vocab"] = (f"the corpus only supported {learned} of the {cfg.vocab_size} requested "
                                    "tokens (too little text or min_frequency too high); PII ids follow at "
                                    f"{learned}..{learned + 3}")
        metrics = {"vocab_size": report["vocab_size"], "train_documents": scan.train_docs,
                   "train_characters": scan.train_chars, "seconds_total": report["seconds"]["total"],
                   "soynlp_scored_words": len(seg.scores)}
        for name in ("ours", "ours_segmented_input", "reference"):
            for k, v in (fert.get(name) or {}).items():
                if k in ("tokens_per_char", "tokens_per_word", "chars_per_token", "boundary_recall"):
                    metrics[f"{name}_{k}"] = v
        mlflow.log_metrics({tracking.metric_name(k): float(v) for k, v in metrics.items()})
        mlflow.set_tag("polyko.tokenizer_hash", report["tokenizer_hash"])
        tmp = out / (REPORT + ".tmp")
        tmp.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
        tmp.replace(out / REPORT)
        mlflow.log_artifacts(str(out), artifact_path="tokenizer")
    return report
