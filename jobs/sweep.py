"""Sweep pretraining hyperparameters of a small model with Ray Tune (every trial a real Ray Train run),
or fit a scaling law on a ladder of small runs.

    python jobs/sweep.py --size tiny --data out --tokenizer out/tokenizer --trials 16 --max-steps 200 \
        --search optim.lr=loguniform:1e-4:3e-2 --search optim.warmup_steps=choice:10,50,200
    python jobs/sweep.py --sweep-file sweep.yaml --data out --tokenizer out/tokenizer      # same, from a file
    python jobs/sweep.py ... --scheduler fifo --concurrent 2 --set deepspeed.zero_stage=0
    python jobs/sweep.py --ladder --data out --tokenizer out/tokenizer                    # scaling-law ladder
    python jobs/pretrain.py --config work/sweep/<hash>/best.json --size 1.3b ...         # launch the winner

A sweep file (YAML or JSON) holds ``polyko.sweep.SweepConfig`` fields, e.g.
``{"trials": 16, "search": ["optim.lr=loguniform:1e-4:3e-2"], "scheduler": {"kind": "asha"},
"base": {"steps": 200, "model": {"size": "tiny"}}}``; flags and ``--set`` (on the base pretraining config)
override it. Sweeps default to the WSD schedule (``optim.schedule=wsd``), 200 steps and one ZeRO-0 worker
per trial (``polyko.sweep.default_config``).
Running the same command again resumes an interrupted sweep. Without --ray-address or $RAY_ADDRESS it starts
a private local cluster.
"""

import argparse
import sys

from polyko.config import apply_overrides


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sweep-file", help="YAML/JSON SweepConfig (flags below override it)")
    p.add_argument("--size", help="model preset of every trial (default tiny)")
    p.add_argument("--data", help="packed tokens (DIR with manifest.json, or DIR/tokens)")
    p.add_argument("--tokenizer", help="tokenizer dir the tokens were made with")
    p.add_argument("--search", action="append", default=[], metavar="KEY=KIND:ARGS",
                   help="searched field, e.g. optim.lr=loguniform:1e-4:3e-2, optim.warmup_steps=choice:10,50")
    p.add_argument("--trials", type=int, help="sampled configurations (default 16)")
    p.add_argument("--scheduler", choices=["asha", "fifo"], help="early stopping (default asha)")
    p.add_argument("--grace-period", type=int, help="asha: steps before the first rung")
    p.add_argument("--reduction-factor", type=int, help="asha: keep 1/rf of the trials per rung (default 3)")
    p.add_argument("--no-recheck", action="store_true",
                   help="asha: Ray's plain ASHA (decide once per rung, on arrival) instead of also stopping a "
                        "running trial that later arrivals push out of the top 1/rf")
    p.add_argument("--max-steps", type=int, help="steps of a trial that runs to the end")
    p.add_argument("--concurrent", type=int, help="most trials at once (default: what the cluster fits)")
    p.add_argument("--num-workers", type=int, help="training workers per trial (default 1)")
    p.add_argument("--gpu", action="store_true", help="trials train on GPUs")
    p.add_argument("--seed", type=int, help="search sampling seed")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override of the base pretraining config of every trial, e.g. optim.schedule=cosine")
    p.add_argument("--output", help="sweep dir (default: <work dir>/sweep/<config hash>)")
    p.add_argument("--ladder", action="store_true", help="train a scaling-law ladder and fit L(N, D) instead")
    p.add_argument("--ladder-widths", help="--ladder: hidden sizes, e.g. 32,64,128 (default)")
    p.add_argument("--ladder-depths", help="--ladder: layer counts, e.g. 2 (default)")
    p.add_argument("--ladder-steps", help="--ladder: token budgets in optimizer steps, e.g. 20,40,80 (default)")
    p.add_argument("--ray-address", help="Ray cluster to join (default: $RAY_ADDRESS, else a local cluster)")
    a = p.parse_args(argv)

    from polyko.sweep import default_config, load_sweep_file

    try:
        if a.ladder:
            return _ladder(a)
        cfg = load_sweep_file(a.sweep_file) if a.sweep_file else default_config()
        base = cfg.base
        if a.size:
            base.model.size = a.size
        if a.data:
            base.data.path = a.data
        if a.tokenizer:
            base.data.tokenizer = a.tokenizer
        if a.max_steps:
            base.steps = a.max_steps
        if a.num_workers:
            base.scaling.num_workers = a.num_workers
        if a.gpu:
            base.scaling.use_gpu = True
        cfg.base = apply_overrides(base, a.set)
        cfg.search = list(cfg.search) + a.search
        for flag, attr in ((a.trials, "trials"), (a.concurrent, "max_concurrent"), (a.seed, "seed"),
                           (a.output, "output")):
            if flag is not None:
                setattr(cfg, attr, flag)
        for flag, attr in ((a.scheduler, "kind"), (a.grace_period, "grace_period"),
                           (a.reduction_factor, "reduction_factor")):
            if flag is not None:
                setattr(cfg.scheduler, attr, flag)
        if a.no_recheck:
            cfg.scheduler.recheck = False
        if not cfg.base.data.path or not cfg.base.data.tokenizer:
            p.error("--data and --tokenizer are required")

        from polyko.sweep import sweep

        r = sweep(cfg, ray_address=a.ray_address)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"done: {len(r.trials)} trials, {r.steps_used} steps in all; best "
          f"{'none' if r.best is None else f'{r.best.trial_id} loss {r.best.loss:.4f}'}; best config "
          f"{r.best_config}; MLflow parent run {r.run_id}")
    return 0 if r.best is not None else 1


def _ladder(a) -> int:
    from polyko.sweep.ladder import LadderConfig, run_ladder

    cfg = LadderConfig()
    if a.data:
        cfg.base.data.path = a.data
    if a.tokenizer:
        cfg.base.data.tokenizer = a.tokenizer
    cfg.base = apply_overrides(cfg.base, a.set)
    for flag, attr in ((a.ladder_widths, "widths"), (a.ladder_depths, "depths"), (a.ladder_steps, "steps")):
        if flag:
            try:
                setattr(cfg, attr, [int(x) for x in flag.split(",") if x.strip()])
            except ValueError:
                raise ValueError(f"--ladder-{attr} must be comma-separated integers, got {flag!r}") from None
    if a.output:
        cfg.output = a.output
    if not cfg.base.data.path or not cfg.base.data.tokenizer:
        raise ValueError("--ladder needs --data and --tokenizer")
    r = run_ladder(cfg, ray_address=a.ray_address)
    print(r.report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
