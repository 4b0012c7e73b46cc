"""Pretrain a GPT-NeoX model on packed tokens with Ray Train + DeepSpeed, then export it to HF format.

    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/pretrain.py --size 12.8b
    python jobs/pretrain.py --size 12.8b --dry-run          # what would run where (plan, placement); exits
    python jobs/pretrain.py --size tiny --steps 50           # CPU, the tokens prepared under the work dir
    python jobs/pretrain.py --size tiny --data out --tokenizer out/tokenizer --min-workers 1 --max-workers 2
    python jobs/pretrain.py --size 1.3b --gpu a100-80gb --num-workers 64 --set deepspeed.zero_stage=2 \
        --deepspeed-config ds_extra.json                     # GPU nodes autoscaled from zero: say type and count
    python jobs/pretrain.py --size 12.8b --plan --gpus 256 --gpu a100-80gb   # the plan's arithmetic only
    python jobs/pretrain.py --size 1.3b --plan --gpus 64 --ladder work/ladder/<hash>/ladder.json  # + predicted loss
    python jobs/pretrain.py --config work/sweep/<hash>/best.json --size 1.3b   # a sweep's winner, at another size

--data defaults to $POLYKO_DATA, else the token dataset under the work dir ($POLYKO_WORK_DIR/data/tokens, as
`jobs/prepare_data.py --output $POLYKO_WORK_DIR/data --tokenizer ...` writes it); --tokenizer to the tokenizer the
token manifest records (given, it is checked against the manifest). GPUs are used when the Ray cluster has GPU
nodes, one worker per GPU unless --num-workers/--min-workers/--max-workers say otherwise; the memory plan gates
the run (at the smallest worker count of an elastic range) and picks its ZeRO stage and micro-batch.
--config FILE (JSON/YAML PretrainConfig, e.g. a sweep's best.json) is the starting point; flags given on the
command line, then --set, override it.
Without --ray-address or $RAY_ADDRESS (set by `ray job submit`) it starts a private local cluster.
"""

import argparse
import sys
from pathlib import Path

from polyko.config import apply_overrides, load_config_file
from polyko.train.config import PretrainConfig


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="PretrainConfig JSON/YAML to start from (e.g. a sweep's best.json)")
    p.add_argument("--size", help="model preset: tiny (default), 50m, 1.3b, 3.8b, 5.8b, 12.8b")
    p.add_argument("--data", help="packed tokens (DIR with manifest.json, or DIR/tokens); default: $POLYKO_DATA, "
                   "else the tokens under the work dir")
    p.add_argument("--tokenizer", help="tokenizer dir the tokens were made with; default: the one their manifest records")
    p.add_argument("--steps", type=int, help="optimizer steps")
    p.add_argument("--num-workers", type=int, help="fixed number of training workers (default: one per GPU of the cluster)")
    p.add_argument("--min-workers", type=int, help="elastic: fewest workers to train on (the plan must fit there)")
    p.add_argument("--max-workers", type=int, help="elastic: most workers to train on (default: the cluster's GPUs)")
    p.add_argument("--gpu", nargs="?", const="auto", default=None, metavar="TYPE",
                   help="train on GPUs (bf16, NCCL) even if none is up yet; TYPE (a100-40gb, a100-80gb, h100, h200, "
                        "or a Ray accelerator type) is the GPU the plan assumes (default: the cluster's)")
    p.add_argument("--cpu", action="store_true", help="train on CPU workers even if the cluster has GPUs")
    p.add_argument("--simulated-gpus", action="store_true",
                   help="on a simulated cluster (python -m polyko.simcluster) only: reserve its GPUs, compute on CPU")
    p.add_argument("--dry-run", action="store_true",
                   help="print what would run where (plan, workers per node, batch, checkpoint costs) and exit")
    p.add_argument("--allow-mismatch", action="store_true",
                   help="resume even if the checkpoint's data, seed or global batch differ (logged)")
    p.add_argument("--init-from", help="HF checkpoint dir to continue from (e.g. released Polyglot-Ko weights)")
    p.add_argument("--output", help="run directory (default: <work dir>/pretrain/<run identity hash>)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, e.g. optim.lr=3e-4")
    p.add_argument("--deepspeed-config", help="DeepSpeed JSON merged on top of the generated config")
    p.add_argument("--plan", action="store_true", help="print the memory/throughput plan and exit (no cluster)")
    p.add_argument("--gpus", type=int, help="--plan: number of GPUs")
    p.add_argument("--seq-len", type=int, default=2048, help="--plan: sequence length")
    p.add_argument("--ladder", metavar="LADDER_JSON",
                   help="--plan: ladder.json of `jobs/sweep.py --ladder`: print the predicted final loss beside the days")
    p.add_argument("--ray-address", help="Ray cluster to join (default: $RAY_ADDRESS, else a local cluster)")
    a = p.parse_args(argv)
    try:
        base = load_config_file(PretrainConfig, a.config) if a.config else PretrainConfig()
    except ValueError as e:
        p.error(str(e))

    if a.plan:
        from polyko.plan import make_plan

        cfg = base
        cfg.model.size = a.size or cfg.model.size
        cfg.scaling.use_gpu = True
        cfg = apply_overrides(cfg, a.set).resolved()
        gpu = a.gpu if a.gpu and a.gpu != "auto" else "a100-80gb"
        explicit_stage = any(s.startswith("deepspeed.zero_stage=") for s in a.set)  # else the plan picks one
        plan = make_plan(cfg.model.size, gpus=a.gpus or 8, gpu=gpu, seq_len=a.seq_len,
                         global_batch_tokens=cfg.batch.global_batch_tokens,
                         zero_stage=cfg.deepspeed.zero_stage if explicit_stage else None,
                         stages=(1, 2, 3) if cfg.deepspeed.precision == "bf16" else (0, 1, 2, 3))
        try:
            print(plan.render(ladder=a.ladder))
        except ValueError as e:
            p.error(str(e))
        return 0 if plan.fits else 1
    if a.ladder:
        p.error("--ladder goes with --plan")
    if a.cpu and (a.gpu or a.simulated_gpus):
        p.error("--cpu contradicts --gpu/--simulated-gpus")
    # Start from --config (or the defaults); a flag overrides the file only when it is given.
    cfg = base
    for value, section, name in ((a.size, cfg.model, "size"), (a.init_from, cfg.model, "init_from"),
                                 (a.data, cfg.data, "path"), (a.tokenizer, cfg.data, "tokenizer"),
                                 (a.output, cfg, "output"), (a.steps, cfg, "steps"),
                                 (a.num_workers, cfg.scaling, "num_workers"),
                                 (a.min_workers, cfg.scaling, "min_workers"),
                                 (a.max_workers, cfg.scaling, "max_workers")):
        if value is not None:
            setattr(section, name, value)
    if a.cpu or a.gpu:
        cfg.scaling.use_gpu = bool(a.gpu)
    if a.gpu and a.gpu != "auto":
        cfg.scaling.gpu_type = a.gpu
    cfg.scaling.simulate_gpus = cfg.scaling.simulate_gpus or a.simulated_gpus
    cfg.checkpoint.allow_mismatch = cfg.checkpoint.allow_mismatch or a.allow_mismatch
    if a.deepspeed_config:
        cfg.deepspeed.extra_json = Path(a.deepspeed_config).read_text()
    cfg = apply_overrides(cfg, a.set)

    from polyko.train import pretrain

    try:
        if a.dry_run:
            from polyko.train.trainer import deploy

            print(deploy(cfg, ray_address=a.ray_address, place=True).render())
            return 0
        r = pretrain(cfg, ray_address=a.ray_address)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"done: {r.steps} steps, final loss {r.final_loss}, checkpoint {r.checkpoint_dir}, "
          f"HF export {r.export_dir}, MLflow run {r.run_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
