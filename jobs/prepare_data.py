"""Prepare a Korean pretraining corpus: read -> clean -> dedup -> (pack into token shards).

    python jobs/prepare_data.py --output work/data                          # bundled sample corpus
    python jobs/prepare_data.py --input /data/corpus --input s3://bucket/crawl/ --output work/data \\
        --tokenizer work/tokenizer --seq-len 2048 --set dedup.threshold=0.8 --set read.max_doc_bytes=8388608 \
        --decontaminate /data/kobest                  # drop documents overlapping KoBEST test/validation items

Writes DIR/cleaned (Parquet key/id/text/source), DIR/rejected (bad input, raw bytes), DIR/contaminated
(documents overlapping a benchmark item, the item named), DIR/stats.json and, with --tokenizer, DIR/tokens
and DIR/validation (--validation-share of the documents, by key hash; 0 = none). Rerunning a finished config does nothing; see polyko.data.pipeline.
"""

from __future__ import annotations

import argparse
import json
import logging

from polyko.config import apply_overrides
from polyko.data.pipeline import PipelineConfig, run_pipeline


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", action="append", default=[], help="file, directory or URI (repeatable); "
                   "default: the bundled sample corpus")
    p.add_argument("--output", required=True, help="output directory")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory: also pack DIR/tokens")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--validation-share", type=float, default=PipelineConfig.validation_share,
                   help="share of documents held out (by a hash of each document's unique key) and packed into "
                   "DIR/validation for validation loss / bits per byte; 0 disables (default %(default)s)")
    p.add_argument("--text-field", default="text")
    p.add_argument("--id-field", default="id")
    p.add_argument("--decontaminate", action="append", default=[], metavar="DIR",
                   help="benchmark files or directory (e.g. KoBEST's <task>/<split>.jsonl): remove training "
                   "documents overlapping its test/validation items (repeatable; --set decontam.mode=flag "
                   "only lists them)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. dedup.threshold=0.8 (repeatable)")
    p.add_argument("--ray-address", default=None, help="join this Ray cluster (default: private local one)")
    p.add_argument("--run-name", default=None, help="MLflow run name")
    args = p.parse_args(argv)

    cfg = PipelineConfig(output=args.output, inputs=tuple(args.input), tokenizer=args.tokenizer,
                         seq_len=args.seq_len, validation_share=args.validation_share, ray_address=args.ray_address, run_name=args.run_name)
    cfg.read.text_field, cfg.read.id_field = args.text_field, args.id_field
    cfg.decontam.benchmarks = tuple(args.decontaminate)
    cfg = apply_overrides(cfg, args.set)
    stats = run_pipeline(cfg)
    summary = {k: stats[k] for k in ("documents_in", "documents_out", "bytes_in", "bytes_out", "bad_records",
                                     "duplicates_removed", "contaminated", "pii_masked") if k in stats}
    print(json.dumps(summary, ensure_ascii=False))
    return stats


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    main()
