"""``pretrain(cfg)``: run GPT-NeoX pretraining on Ray Train + DeepSpeed and export the result.

The driver checks everything it can before any worker starts (data committed and made with the given
tokenizer, batch splits over every allowed worker count, on GPUs: the memory plan fits), opens the MLflow
``pretrain`` run (linked to the data and tokenizer runs), then runs ``polyko.train.loop.train_loop`` on
``scaling.num_workers`` workers (or elastically between ``min_workers`` and ``max_workers``) under
``TorchTrainer``. Ray Train restarts a failed or hung worker group from the newest checkpoint up to
``fault.max_failures`` times; re-running the same config resumes the same run (the run is named by the
config hash and stored under ``<output>/ray``). At the end the last checkpoint is exported to ``<output>/hf``.

CPU: ``pretrain(PretrainConfig(data=DataConfig(path="out/tokens", tokenizer="out/tokenizer"), steps=20))``
or ``python jobs/pretrain.py --size tiny --data out --tokenizer out/tokenizer --steps 20``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from polyko import tracking
from polyko.config import config_hash, to_dict
from polyko.train import checkpoint as ckpt_io
from polyko.train.config import BatchLayout, PretrainConfig


@dataclass
class PretrainResult:
    export_dir: Path | None      # HF model dir (None when cfg.export is False)
    run_id: str                  # MLflow pretrain run
    final_loss: float | None
    checkpoint_dir: Path | None  # the last valid checkpoint (step_XXXXXX)
    steps: int                   # optimizer steps completed
    output: Path                 # the run directory


def run_paths(cfg: PretrainConfig) -> tuple[Path, str]:
    """``(output dir, run name)`` of a config: both named by the config hash unless given."""
    identity = replace(cfg, output=None, run_name=None, export=True)
    h = config_hash(identity)
    out = Path(cfg.output) if cfg.output else tracking.work_dir() / "pretrain" / h
    return out.resolve(), cfg.run_name or f"pretrain-{cfg.model.size}-{h}"


def check_plan(cfg: PretrainConfig, seq_len: int, *, zero_stage: int | None, micro_batch: int | None):
    """On GPUs, the memory/throughput plan for this run (``None`` ZeRO stage / micro-batch: the plan picks
    the lowest stage that fits and the largest micro-batch); ValueError with the plan if it does not fit."""
    from polyko.plan import PEAK_TFLOPS, check_fits, detect_accelerator, make_plan

    gpu, _ = detect_accelerator()
    if gpu not in PEAK_TFLOPS:
        print(f"[polyko] no memory plan for accelerator {gpu!r} (known: {', '.join(PEAK_TFLOPS)})", flush=True)
        return None
    workers = cfg.scaling.ray_num_workers()
    gpus = workers[1] if isinstance(workers, tuple) else workers
    plan = make_plan(cfg.model.size, gpus=gpus, gpu=gpu, seq_len=seq_len,
                     global_batch_tokens=cfg.batch.global_batch_tokens, zero_stage=zero_stage,
                     micro_batch=micro_batch, activation_checkpointing=bool(cfg.model.activation_checkpointing))
    check_fits(plan)
    return plan


def preflight(cfg: PretrainConfig) -> int:
    """Driver-side checks (ValueError with a clear message); returns the data's seq_len."""
    from polyko.train.data import open_tokens

    if not cfg.data.path or not cfg.data.tokenizer:
        raise ValueError("data.path (--data) and data.tokenizer (--tokenizer) are required")
    tokens = open_tokens(cfg.data.path, cfg.data.tokenizer)
    workers = cfg.scaling.ray_num_workers()
    lo, hi = workers if isinstance(workers, tuple) else (workers, workers)
    for w in {lo, hi}:
        BatchLayout.derive(cfg.batch.global_batch_tokens, tokens.seq_len, w, cfg.batch.micro_batch)
    g = cfg.batch.global_batch_tokens // tokens.seq_len
    uneven = [w for w in range(lo, hi + 1) if g % w]
    if uneven:  # an elastic restart may land on one of these: it then fails with a clear error (and retries)
        print(f"[polyko] WARNING: the global batch of {g} sequences does not split over {len(uneven)} worker "
              f"counts in [{lo}, {hi}] (e.g. {uneven[:5]}); prefer a range of divisors of {g}", flush=True)
    if cfg.model.init_from and not (Path(cfg.model.init_from) / "config.json").is_file():
        raise ValueError(f"--init-from {cfg.model.init_from}: not an HF checkpoint dir (no config.json)")
    return tokens.seq_len


def pretrain(cfg: PretrainConfig, *, ray_address: str | None = None) -> PretrainResult:
    """Train, checkpoint, export. Joins ``ray_address``/``$RAY_ADDRESS`` or starts a local cluster."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from polyko.cluster import init_ray
    from polyko.train.data import resolve_tokens_dir
    from polyko.train.loop import train_loop
    from polyko.train.metrics import read_jsonl

    raw, cfg = cfg, cfg.resolved()
    seq_len = preflight(cfg)
    if cfg.scaling.use_gpu:
        # Fails at once, with the plan, when the model does not fit; otherwise the plan's ZeRO stage and
        # micro-batch replace the per-size defaults the user did not set.
        plan = check_plan(cfg, seq_len, zero_stage=raw.deepspeed.zero_stage, micro_batch=raw.batch.micro_batch)
        if plan is not None:
            print(plan.render(), flush=True)
            cfg = replace(cfg, deepspeed=replace(cfg.deepspeed, zero_stage=plan.zero_stage),
                          batch=replace(cfg.batch, micro_batch=plan.micro_batch))
            preflight(cfg)
    out, run_name = run_paths(cfg)
    out.mkdir(parents=True, exist_ok=True)
    init_ray(ray_address)

    parents = tracking.lineage(resolve_tokens_dir(cfg.data.path), cfg.data.tokenizer)
    with tracking.start_run("pretrain", cfg, output=out, parents=parents, run_name=run_name) as run:
        print(f"[polyko] pretrain run {run_name}: {tracking.run_url(run)}; output {out}", flush=True)
        sc = cfg.scaling
        trainer = TorchTrainer(
            train_loop,
            train_loop_config={"config": to_dict(cfg), "output": str(out), "run_name": run_name,
                               "run_id": run.info.run_id, "tracking_uri": tracking.tracking_uri()},
            torch_config=TorchConfig(backend="nccl" if sc.use_gpu else "gloo", timeout_s=cfg.fault.hang_timeout_s),
            scaling_config=ray.train.ScalingConfig(num_workers=sc.ray_num_workers(), use_gpu=sc.use_gpu,
                                                   resources_per_worker={"CPU": sc.cpus_per_worker}),
            run_config=ray.train.RunConfig(
                name=run_name, storage_path=str(out / "ray"),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.checkpoint.keep),
                failure_config=ray.train.FailureConfig(max_failures=cfg.fault.max_failures)),
        )
        result = trainer.fit()
        if result.error is not None:
            raise result.error

        found = ckpt_io.select(result.checkpoint.path) if result.checkpoint is not None else None
        ckpt_dir, meta = found if found else (None, None)
        steps = meta["step"] if meta else 0
        history = read_jsonl(out / "metrics.jsonl")
        final_loss = history[steps]["loss"] if steps in history else (meta or {}).get("loss")
        run_id = run.info.run_id
    # The export is its own MLflow "checkpoint" run, linked to this pretrain run: start it after this one ends.
    export_dir = None
    if cfg.export and ckpt_dir is not None:
        from mlflow.tracking import MlflowClient

        from polyko.train.export import export_hf

        export_dir = export_hf(ckpt_dir, out / "hf", cfg.data.tokenizer)
        MlflowClient(tracking_uri=tracking.tracking_uri()).set_tag(run_id, "polyko.export", str(export_dir))
        print(f"[polyko] exported step {steps} to {export_dir}", flush=True)
    return PretrainResult(export_dir=export_dir, run_id=run_id, final_loss=final_loss,
                          checkpoint_dir=ckpt_dir, steps=steps, output=out)
