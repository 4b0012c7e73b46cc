"""Evaluate a model on KoBEST (lm-eval's kobest tasks) and record it in MLflow (``polyko-eval``).

    python jobs/evaluate.py --model work/quickstart/pretrain/hf --shots 0 --limit 20            # CPU smoke run
    python jobs/evaluate.py --model models:/polyko-1.3b@candidate --shots 0,5,10,50  # the paper's table
    python jobs/evaluate.py --model http://127.0.0.1:8000/v1 --tokenizer work/quickstart/pretrain/hf --shots 0

Writes OUTPUT/results.json (lm-eval's full output per shot count) and OUTPUT/table.md.
"""

import argparse
import json
import sys

from polyko.config import apply_overrides
from polyko.eval import EndpointConfig, EvalConfig, evaluate


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="HF checkpoint dir, models:/name@alias, runs:/id/path or http://host:port/v1")
    p.add_argument("--tasks", default="kobest", help="kobest (all five) or a comma list: boolq,copa,hellaswag,sentineg,wic")
    p.add_argument("--shots", default="0,5,10,50", help="comma list of few-shot counts (the cards report 0,5,10,50)")
    p.add_argument("--limit", type=int, default=0, help="docs per task for quick runs (0 = full test sets)")
    p.add_argument("--kobest-dir", default="", help="local KoBEST <task>/<split>.jsonl (default $POLYKO_KOBEST_DIR, else the HF hub)")
    p.add_argument("--output", default="", help="output dir (default <work dir>/eval/<config hash>)")
    p.add_argument("--batch-size", type=int, default=8, help="8 suits a CPU; 0 = lm-eval's automatic batch size (GPU)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--tokenizer", default="", help="tokenizer dir for a --model URL")
    p.add_argument("--served-model", default="", help="model name on the server (default: its only model)")
    p.add_argument("--num-concurrent", type=int, default=4, help="requests in flight for a --model URL")
    p.add_argument("--register", default="", metavar="NAME", help="register the checkpoint as MLflow model NAME")
    p.add_argument("--alias", default="", help="alias for the registered version (candidate, production)")
    p.add_argument("--log-samples", action="store_true", help="also write every request's log-likelihoods")
    p.add_argument("--run-name", default="")
    p.add_argument("--compare-to", default="", help="published reference: 1.3b, 3.8b, 5.8b, 12.8b or a model name "
                                                    "(default: the Polyglot-Ko size nearest the model's)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override any EvalConfig field")
    a = p.parse_args(argv)
    try:
        cfg = EvalConfig(
            model=a.model, tasks=a.tasks.split(","), shots=[int(s) for s in a.shots.split(",") if s.strip()],
            limit=a.limit, kobest_dir=a.kobest_dir, output=a.output, batch_size=a.batch_size, device=a.device,
            dtype=a.dtype, log_samples=a.log_samples, register_name=a.register, register_alias=a.alias,
            run_name=a.run_name, compare_to=a.compare_to,
            endpoint=EndpointConfig(model_name=a.served_model, tokenizer=a.tokenizer, num_concurrent=a.num_concurrent))
        cfg = apply_overrides(cfg, a.set)
        res = evaluate(cfg)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(res["table"])
    print(json.dumps({k: res[k] for k in ("output", "run_id", "registered_version", "seconds")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
