"""The README's first command: the whole pipeline on the bundled sample corpus, on this machine.

    python jobs/quickstart.py [--work-dir work/quickstart] [--steps 100] [--input PATH ...]

Starts a private local Ray cluster (or joins --ray-address / $RAY_ADDRESS), then: clean + dedup ->
tokenizer -> packed shards -> pretrain `tiny` -> HF export, all tracked in MLflow.
"""

import argparse
import os

from polyko.quickstart import QuickstartConfig, run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = QuickstartConfig()
    p.add_argument("--work-dir", default=d.work_dir)
    p.add_argument("--input", action="append", default=[], help="corpus file/dir (default: bundled sample)")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--num-workers", type=int, default=d.num_workers)
    p.add_argument("--ray-address", default=None)
    a = p.parse_args()
    # The embedded MLflow store lives in the work dir unless MLFLOW_TRACKING_URI says otherwise.
    os.environ.setdefault("POLYKO_WORK_DIR", a.work_dir)
    run(QuickstartConfig(work_dir=a.work_dir, inputs=tuple(a.input), steps=a.steps, num_workers=a.num_workers,
                         ray_address=a.ray_address))


if __name__ == "__main__":
    main()
