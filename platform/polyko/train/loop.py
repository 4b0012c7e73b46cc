"""The pretraining loop run by every Ray Train worker (one process per GPU, or per CPU slot).

Reads top to bottom: distributed setup (hang timeout first) -> data -> model -> resume (newest valid
checkpoint, resharded if the worker count changed) -> DeepSpeed engine -> steps (each: set lr, ``acc``
micro-batches of forward/backward/step, reduce loss, log) -> checkpoint every N steps.

Determinism: the data of step ``s`` is a function of ``(seed, s)`` (``polyko.train.data``), the lr a
function of ``s`` (``config.lr_at``), and the RNG is reseeded from ``(seed, s, rank)`` every step, so a
run resumed from step ``k`` on the same worker count reproduces the uninterrupted run bit for bit.

Not called directly: ``polyko.train.trainer.pretrain`` hands it to ``TorchTrainer``.
"""

from __future__ import annotations

import importlib
import os
import shutil
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from polyko.config import from_dict, to_dict
from polyko.train import checkpoint as ckpt_io
from polyko.train.config import BatchLayout, PretrainConfig, deepspeed_config, lr_at


def train_loop(loop_cfg: dict[str, Any]) -> None:
    import deepspeed
    import ray.train
    import torch
    import torch.distributed as dist
    import torch.distributed.distributed_c10d as c10d

    cfg = from_dict(PretrainConfig, loop_cfg["config"])
    ctx = ray.train.get_context()
    rank, world, local_rank = ctx.get_world_rank(), ctx.get_world_size(), ctx.get_local_rank()
    out = Path(loop_cfg["output"])

    # --- distributed setup --------------------------------------------------------------------------
    # DeepSpeed's own process groups take c10d's default timeout (30 min), not TorchConfig's: set it so
    # a hung rank makes the others raise after hang_timeout_s and Ray Train restarts the group.
    c10d.default_pg_timeout = timedelta(seconds=cfg.fault.hang_timeout_s)
    if not cfg.scaling.use_gpu:
        # The CPU accelerator JIT-compiles a shared-memory comm op in init_distributed (~35 s, needs a
        # compiler) that training never uses. (import_module: `import deepspeed.comm.torch` binds a clash.)
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
        torch.set_num_threads(max(1, cfg.scaling.cpus_per_worker))
    deepspeed.init_distributed(dist_backend="nccl" if cfg.scaling.use_gpu else "gloo")
    device = torch.device("cuda", local_rank) if cfg.scaling.use_gpu else torch.device("cpu")

    # --- data ---------------------------------------------------------------------------------------
    from polyko.train.data import GlobalSampler, open_tokens, tokenizer_size, worker_positions

    tokens = open_tokens(cfg.data.path, cfg.data.tokenizer)
    seq_len = tokens.seq_len
    sampler = GlobalSampler(len(tokens), seed=cfg.seed, shuffle=cfg.data.shuffle)
    layout = BatchLayout.derive(cfg.batch.global_batch_tokens, seq_len, world, cfg.batch.micro_batch)

    # --- model --------------------------------------------------------------------------------------
    from polyko.model import PRESETS, build_config, build_model, padded_vocab

    torch.manual_seed(cfg.seed)
    if cfg.model.init_from:
        from transformers import GPTNeoXForCausalLM

        model = GPTNeoXForCausalLM.from_pretrained(cfg.model.init_from, dtype=torch.float32)
        model_config = model.config
    else:
        model_config = build_config(cfg.model.size, vocab_size=padded_vocab(tokenizer_size(cfg.data.tokenizer)),
                                    max_position_embeddings=max(seq_len, PRESETS[cfg.model.size].max_position_embeddings))
        model = build_model(model_config)
    if model_config.vocab_size < tokenizer_size(cfg.data.tokenizer):
        raise ValueError(f"model vocabulary {model_config.vocab_size} is smaller than the tokenizer's "
                         f"{tokenizer_size(cfg.data.tokenizer)}")
    if cfg.model.activation_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False

    # --- resume -------------------------------------------------------------------------------------
    found = _find_checkpoint(cfg)
    ds_config = deepspeed_config(cfg, layout)
    load_dir = None
    if found is not None:
        path, meta = found
        load_dir = path
        if ckpt_io.needs_universal(meta, world) or meta["zero_stage"] != cfg.deepspeed.zero_stage:
            # Optimizer state is partitioned for another world size: reshard via a universal checkpoint,
            # converted once per node by its local rank 0.
            uni = ckpt_io.universal_cache_dir(path)
            if local_rank == 0:
                print(f"[polyko] resharding {path} ({meta['world_size']} -> {world} workers, universal checkpoint)",
                      flush=True)
                ckpt_io.to_universal(path, uni)
            dist.barrier()
            load_dir = uni
            ds_config["checkpoint"] = {"load_universal": True}

    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
    start_step = 0
    if found is not None:
        engine.load_checkpoint(str(load_dir), tag=ckpt_io.DS_TAG, load_optimizer_states=True,
                               load_lr_scheduler_states=False)
        start_step = meta["step"]
        if load_dir != found[0]:
            # The universal copy (16 B/param: fp32 master + Adam) is only needed for this load.
            dist.barrier()
            if local_rank == 0:
                shutil.rmtree(load_dir, ignore_errors=True)
        if rank == 0:
            print(f"[polyko] resumed from {found[0]} at step {start_step} "
                  f"(saved by {meta['world_size']} workers, now {world})", flush=True)

    # --- metrics ------------------------------------------------------------------------------------
    from polyko.train.metrics import MetricsSink, accelerator_peak, flops_per_token

    sink = None
    if rank == 0:
        sink = MetricsSink(run_id=loop_cfg.get("run_id"), tracking_uri=loop_cfg.get("tracking_uri"),
                           run_name=loop_cfg["run_name"], size=cfg.model.size, jsonl=out / "metrics.jsonl")
    fpt = flops_per_token(model_config, seq_len)
    _, peak = accelerator_peak(cfg.scaling.use_gpu)
    step_tokens = layout.global_batch * seq_len

    # --- steps --------------------------------------------------------------------------------------
    last_ckpt_s = None
    for step in range(start_step, cfg.steps):
        _maybe_inject_fault(cfg.fault.inject, step, rank, out)
        t0 = time.perf_counter()
        torch.manual_seed((cfg.seed * 1_000_003 + step) * 4096 + rank)  # RNG = f(seed, step, rank)
        lr = lr_at(cfg, step)
        for group in engine.optimizer.param_groups:
            group["lr"] = lr
        start, count = worker_positions(step, rank, layout.global_batch, world)
        idx = sampler.indices(start, count)
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        for a in range(layout.grad_accum):
            micro = idx[a * layout.micro_batch:(a + 1) * layout.micro_batch]
            x = torch.from_numpy(tokens.batch(micro)).to(device)
            loss = engine(input_ids=x, labels=x).loss  # HF shifts labels: next-token loss
            engine.backward(loss)
            engine.step()
            loss_sum += loss.detach().double()
        dist.all_reduce(loss_sum)
        step_loss = (loss_sum / (layout.grad_accum * world)).item()
        grad_norm = engine.get_global_grad_norm()
        step_s = time.perf_counter() - t0
        done = step + 1

        tps = step_tokens / step_s
        tflops = fpt * tps / world / 1e12  # model TFLOP/s per worker
        metrics = {"loss": step_loss, "lr": lr, "grad_norm": None if grad_norm is None else float(grad_norm),
                   "tokens_per_second": tps, "tflops": tflops, "mfu": tflops / peak if peak else None,
                   "step_seconds": step_s, "step": done, "tokens_seen": done * step_tokens,
                   "checkpoint_seconds": last_ckpt_s, "world_size": world}

        if done % cfg.checkpoint.every_steps == 0 or done == cfg.steps:
            t1 = time.perf_counter()
            meta = {"step": done, "tokens_seen": done * step_tokens, "data_position": done * layout.global_batch,
                    "global_batch": layout.global_batch, "seq_len": seq_len, "world_size": world,
                    "zero_stage": cfg.deepspeed.zero_stage, "precision": cfg.deepspeed.precision,
                    "rng": "reseeded from (seed, step, rank) every step", "loss": step_loss,
                    "model_config": model_config.to_dict(), "tokenizer": cfg.data.tokenizer,
                    "config": to_dict(cfg), "run_id": loop_cfg.get("run_id")}
            local = ckpt_io.save(engine, done, meta)
            ray.train.report({k: v for k, v in metrics.items() if v is not None},
                             checkpoint=ray.train.Checkpoint.from_directory(str(local)),
                             checkpoint_dir_name=ckpt_io.step_dir_name(done))
            shutil.rmtree(local, ignore_errors=True)
            last_ckpt_s = metrics["checkpoint_seconds"] = time.perf_counter() - t1
        if sink is not None:
            sink.log(done, metrics)
    if sink is not None:
        sink.close()


def _find_checkpoint(cfg: PretrainConfig):
    """Newest valid checkpoint: Ray's latest (or its valid predecessors), else ``checkpoint.resume_from``."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        if ckpt.filesystem is None or ckpt.filesystem.type_name == "local":
            found = ckpt_io.select(ckpt.path)
        else:  # remote storage: only the latest, downloaded
            local = Path(tempfile.mkdtemp(prefix="polyko-resume-"))
            ckpt.to_directory(str(local))
            found = ckpt_io.select(local)
        if found is not None:
            return found
    if cfg.checkpoint.resume_from:
        found = ckpt_io.select(cfg.checkpoint.resume_from)
        if found is None:
            raise ValueError(f"checkpoint.resume_from={cfg.checkpoint.resume_from}: no valid checkpoint there")
        return found
    return None


def _maybe_inject_fault(spec: str | None, step: int, rank: int, out: Path) -> None:
    """Chaos testing: ``KIND@STEP:RANK`` fires once per run directory when rank RANK is about to run
    step STEP (0-based). crash: raise; exit: kill the process; hang: block forever (hang detection)."""
    if not spec:
        return
    kind, _, where = spec.partition("@")
    s, _, r = where.partition(":")
    if step != int(s) or rank != int(r or 0):
        return
    marker = out / f"fault-fired-{kind}-{s}-{r or 0}"
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(str(time.time()))
    print(f"[polyko] injecting fault {spec}", flush=True)
    if kind == "crash":
        raise RuntimeError(f"injected fault {spec}")
    if kind == "exit":
        os._exit(1)
    if kind == "hang":
        while True:
            time.sleep(3600)
    raise ValueError(f"fault.inject: unknown kind {kind!r} (crash, exit, hang)")
