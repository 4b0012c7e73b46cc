"""Train the morpheme-aware byte-level BPE tokenizer (Polyglot-Ko recipe) on a cleaned corpus.

    python jobs/train_tokenizer.py --input work/data/cleaned --output work/tokenizer
    python jobs/train_tokenizer.py --input corpus.jsonl --output work/tok --vocab-size 8000 \\
        --set morph.sample_sentences=50000 --set reference_tokenizer=/path/to/polyglot-ko-tokenizer

Writes TOKDIR (loadable with transformers.AutoTokenizer, offline) and TOKDIR/report.json
(fertility vs. the Polyglot-Ko tokenizer on held-out text); logs an MLflow run (polyko-tokenizer)
linked to the data run. See polyko.tokenizer.train for every option (--set KEY=VALUE).
"""

from __future__ import annotations

import argparse
import json

from polyko.config import apply_overrides
from polyko.tokenizer import TokenizerConfig, train_tokenizer


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="cleaned corpus: Parquet dir (DIR/cleaned), .jsonl or .txt")
    p.add_argument("--output", required=True, help="tokenizer directory to write")
    p.add_argument("--vocab-size", type=int, default=None, help="learned vocabulary incl. 4 specials "
                   "(default 30000, as Polyglot-Ko); PII tokens come after it")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. morph.method=maxscore (repeatable)")
    p.add_argument("--run-name", default=None, help="MLflow run name")
    args = p.parse_args(argv)

    cfg = TokenizerConfig(input=args.input, output=args.output)
    if args.vocab_size is not None:
        cfg.vocab_size = args.vocab_size
    cfg = apply_overrides(cfg, args.set)   # also re-validates the whole config
    report = train_tokenizer(cfg, run_name=args.run_name)
    fert = report["fertility"]
    summary = {"tokenizer_hash": report["tokenizer_hash"], "vocab_size": report["vocab_size"],
               "train_documents": report["train"]["documents"], "seconds": report["seconds"]["total"],
               "ours_tokens_per_char": (fert.get("ours") or {}).get("tokens_per_char"),
               "reference_tokens_per_char": (fert.get("reference") or {}).get("tokens_per_char")}
    print(json.dumps(summary, ensure_ascii=False))
    return report


if __name__ == "__main__":
    main()
