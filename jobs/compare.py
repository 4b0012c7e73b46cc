"""Compare MLflow runs in a terminal: run name, the params that differ, chosen metrics, sorted.

    python jobs/compare.py --experiment polyko-eval
    python jobs/compare.py --experiment eval --metric 'kobest_copa/*' --max-runs 10 --sort kobest_copa/f1/5shot
"""

import argparse
import sys

from polyko.eval.compare import compare_runs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experiment", default="polyko-eval", help="experiment name, or a stage (eval, pretrain ...)")
    p.add_argument("--metric", action="append", default=[], help="metric name or pattern (repeatable)")
    p.add_argument("--max-runs", type=int, default=50, help="newest N runs")
    p.add_argument("--sort", default=None, help="metric to sort by (default: the first shown)")
    p.add_argument("--ascending", action="store_true", help="lowest first (e.g. for a loss)")
    a = p.parse_args(argv)
    try:
        print(compare_runs(a.experiment, a.metric or None, a.max_runs, a.sort, a.ascending), end="")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
