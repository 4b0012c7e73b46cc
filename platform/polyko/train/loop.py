"""The pretraining loop run by every worker (one process per GPU, or per CPU slot).

Reads top to bottom: distributed setup (hang timeout first) -> data (and the newest valid checkpoint,
refused if trained on other data/seed/batch) -> model (built partitioned at ZeRO-3) -> resume (resharded
if the worker count or ZeRO stage changed) -> DeepSpeed engine -> steps (each: set lr, ``acc`` weighted micro-batches of
forward/backward/step, reduce loss, log) -> checkpoint every N steps.

Determinism: the data of step ``s`` is a function of ``(seed, s)`` (``polyko.train.data``), the lr a
function of ``s`` (``config.lr_at``), and the RNG is reseeded from ``(seed, s, rank)`` every step, so a
run resumed from step ``k`` on the same worker count reproduces the uninterrupted run bit for bit; on
another worker count (even one that does not divide the global batch) it takes the same samples with
the same weights (``BatchLayout``), equal up to float summation order.

Where it runs: ``polyko.train.trainer.pretrain`` hands :func:`train_loop` to Ray Train's ``TorchTrainer``
(rank, world and reports come from :class:`RayContext`). The same function runs in a plain
``torch.distributed`` world without Ray with a :class:`LocalContext` (``benchmarks/gpu_mfu.py --groups
production``: one GPU, or ``torchrun``)::

    train_loop({"config": to_dict(cfg.resolved()), "output": "out", "run_name": "x"}, LocalContext("out"))
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


def train_loop(loop_cfg: dict[str, Any], ctx: "RayContext | LocalContext | None" = None) -> None:
    import deepspeed
    import torch
    import torch.distributed as dist

    cfg = from_dict(PretrainConfig, loop_cfg["config"])
    ctx = ctx or RayContext()
    rank, world, local_rank = ctx.rank, ctx.world_size, ctx.local_rank
    out = Path(loop_cfg["output"])

    # --- distributed setup --------------------------------------------------------------------------
    device = setup_distributed(cfg, local_rank)

    # --- data ---------------------------------------------------------------------------------------
    from polyko.train.data import GlobalSampler, manifest_hash, open_tokens, tokenizer_size, worker_positions

    tokens = open_tokens(cfg.data.path, cfg.data.tokenizer)
    data_manifest = manifest_hash(cfg.data.path)
    seq_len = tokens.seq_len
    sampler = GlobalSampler(len(tokens), seed=cfg.seed, shuffle=cfg.data.shuffle)
    layout = BatchLayout.derive(cfg.batch.global_batch_tokens, seq_len, world, cfg.batch.micro_batch)
    ds_config = deepspeed_config(cfg, layout)
    # The checkpoint to continue, refused before anything is built if it was trained on other data/seed/batch.
    found = _find_checkpoint(cfg, ctx)
    if found is not None:
        check_resume(*found, cfg, data_manifest=data_manifest, global_batch=layout.global_batch, seq_len=seq_len)

    # --- model --------------------------------------------------------------------------------------
    from polyko.model import PRESETS, build_config, build_model, padded_vocab, param_groups, zero3_context

    torch.manual_seed(cfg.seed)
    dtype = torch.bfloat16 if cfg.deepspeed.precision == "bf16" else torch.float32
    if cfg.model.init_from:
        from transformers import GPTNeoXForCausalLM

        model = GPTNeoXForCausalLM.from_pretrained(cfg.model.init_from, dtype=torch.float32)
        model_config = model.config
    else:
        model_config = build_config(cfg.model.size, vocab_size=padded_vocab(tokenizer_size(cfg.data.tokenizer)),
                                    max_position_embeddings=max(seq_len, PRESETS[cfg.model.size].max_position_embeddings))
        # Built once, in place: on the accelerator in the training dtype (ZeRO 0-2), or partitioned as it is
        # created (ZeRO-3: each rank holds 1/world of the weights); the same weights either way.
        model = build_model(model_config, dtype, init=cfg.model.init, seed=cfg.seed, device=device,
                            zero3=zero3_context(ds_config) if cfg.deepspeed.zero_stage == 3 else None)
    if model_config.vocab_size < tokenizer_size(cfg.data.tokenizer):
        raise ValueError(f"model vocabulary {model_config.vocab_size} is smaller than the tokenizer's "
                         f"{tokenizer_size(cfg.data.tokenizer)}")
    if cfg.model.activation_checkpointing:
        # Non-reentrant checkpointing (torch's recommended mode; works with ZeRO-3's parameter hooks).
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers 5
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        model.config.use_cache = False

    # --- resume -------------------------------------------------------------------------------------
    load_dir = None
    if found is not None:
        path, meta = found
        load_dir, universal = ckpt_io.prepare_resume(path, meta, world_size=world, rank=rank, local_rank=local_rank,
                                                     zero_stage=cfg.deepspeed.zero_stage,
                                                     timeout_s=cfg.checkpoint.reshard_timeout_s)
        if universal:
            ds_config["checkpoint"] = {"load_universal": True}

    # Weight decay on matrices and embeddings only (GPT-NeoX's groups, polyko.model.no_decay).
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=param_groups(model, cfg.optim.weight_decay),
                                           config=ds_config)
    start_step = 0
    if found is not None:
        engine.load_checkpoint(str(load_dir), tag=ckpt_io.DS_TAG, load_optimizer_states=True,
                               load_lr_scheduler_states=False)
        start_step = meta["step"]
        if rank == 0:
            print(f"[polyko] resumed from {found[0]} at step {start_step} "
                  f"(saved by {meta['world_size']} workers, now {world})", flush=True)

    # --- metrics ------------------------------------------------------------------------------------
    from polyko.train.metrics import MetricsSink, accelerator_peak, flops_per_token

    sink = None
    if rank == 0:
        sink = MetricsSink(run_id=loop_cfg.get("run_id"), tracking_uri=loop_cfg.get("tracking_uri"),
                           run_name=loop_cfg["run_name"], size=cfg.model.size, jsonl=out / "metrics.jsonl",
                           gauges=ctx.ray)
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
        idx = sampler.indices(*worker_positions(step, rank, layout.global_batch, world))
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # sum of per-sequence losses
        at = 0
        for n in layout.micro_sizes(rank):  # the same number of micro-steps on every rank
            # n == 0 (only with micro_batch 1 and an uneven split): a zero-weight copy of a real sequence keeps
            # this rank's forward/backward collectives in step with the others.
            micro = idx[at:at + n] if n else idx[:1]
            at += n
            x = torch.from_numpy(tokens.batch(micro)).to(device)
            loss = engine(input_ids=x, labels=x).loss  # HF shifts labels: mean next-token loss over the micro-batch
            engine.backward(loss if layout.even else loss * layout.loss_scale(n))
            engine.step()
            loss_sum += loss.detach().double() * n
        dist.all_reduce(loss_sum)
        step_loss = (loss_sum / layout.global_batch).item()
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
                    "data_manifest": data_manifest, "seed": cfg.seed,
                    "process_group_timeouts_s": group_timeouts(),  # every group's collective timeout (rank 0's view)
                    "model_config": model_config.to_dict(), "tokenizer": cfg.data.tokenizer,
                    "config": to_dict(cfg), "run_id": loop_cfg.get("run_id")}
            local = ckpt_io.save(engine, done, meta)
            ctx.report({k: v for k, v in metrics.items() if v is not None}, checkpoint=local, step=done)
            shutil.rmtree(local, ignore_errors=True)
            last_ckpt_s = metrics["checkpoint_seconds"] = time.perf_counter() - t1
        if sink is not None:
            sink.log(done, metrics)
    if sink is not None:
        sink.close()


# ------------------------------------------------------------------------------------------- helpers


def setup_distributed(cfg: PretrainConfig, local_rank: int):
    """Join (or, outside Ray Train, create) the process group with the hang timeout; returns the device.

    Every process group created from here on takes c10d's default timeout unless given one: DeepSpeed's
    own groups (``new_group`` for data-parallel/ZeRO) never pass one, so without this they wait gloo's or
    NCCL's 30 minutes, not ``fault.hang_timeout_s``. c10d reads ``default_pg_timeout`` for gloo and
    ``default_pg_nccl_timeout`` for NCCL (``distributed_c10d._get_default_timeout``): both are set, so a hung
    rank makes the others raise after hang_timeout_s on GPUs too, and Ray Train restarts the group. The
    default group gets it from Ray's ``TorchConfig(timeout_s=...)`` or from ``init_distributed`` below.
    """
    import deepspeed
    import torch
    import torch.distributed.distributed_c10d as c10d

    timeout = timedelta(seconds=cfg.fault.hang_timeout_s)
    c10d.default_pg_timeout = timeout
    c10d.default_pg_nccl_timeout = timeout
    if not cfg.scaling.use_gpu:
        # The CPU accelerator JIT-compiles a shared-memory comm op in init_distributed (~35 s, needs a
        # compiler) that training never uses. (import_module: `import deepspeed.comm.torch` binds a clash.)
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
        torch.set_num_threads(max(1, cfg.scaling.cpus_per_worker))
    deepspeed.init_distributed(dist_backend="nccl" if cfg.scaling.use_gpu else "gloo", timeout=timeout,
                               verbose=False)
    if cfg.scaling.use_gpu:
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def group_timeouts() -> dict[str, float]:
    """``{process group name: collective timeout in seconds}`` of every group of this process."""
    import torch.distributed.distributed_c10d as c10d

    return {name: max(pg._get_backend(d).options._timeout.total_seconds() for d in pg._device_types)
            for pg, name in c10d._world.pg_names.items()}


def resume_mismatches(meta: dict[str, Any], cfg: PretrainConfig, *, data_manifest: str, global_batch: int,
                      seq_len: int) -> list[str]:
    """What differs between a checkpoint's trajectory and this run's: data, seed, global batch, seq_len."""
    diffs = []
    saved = meta.get("data_manifest")
    if saved is not None and saved != data_manifest:
        diffs.append(f"data manifest {saved} != {data_manifest} ({cfg.data.path})")
    seed = meta.get("seed", (meta.get("config") or {}).get("seed"))
    if seed is not None and seed != cfg.seed:
        diffs.append(f"seed {seed} != {cfg.seed}")
    if meta.get("global_batch") is not None and meta["global_batch"] != global_batch:
        diffs.append(f"global batch {meta['global_batch']} != {global_batch} sequences")
    if meta.get("seq_len") is not None and meta["seq_len"] != seq_len:
        diffs.append(f"seq_len {meta['seq_len']} != {seq_len}")
    return diffs


def check_resume(path: Path, meta: dict[str, Any], cfg: PretrainConfig, **current) -> None:
    """Refuse (ValueError naming each difference) to continue a checkpoint on another data set, seed or
    global batch: the result would be neither run. ``checkpoint.allow_mismatch`` resumes anyway, logged."""
    diffs = resume_mismatches(meta, cfg, **current)
    if not diffs:
        return
    what = "; ".join(diffs)
    if not cfg.checkpoint.allow_mismatch:
        raise ValueError(f"checkpoint {path} was trained with other settings: {what}. Resume with the same "
                         "data, seed and batch, or set checkpoint.allow_mismatch=true to continue it anyway")
    print(f"[polyko] WARNING resuming {path} despite: {what} (checkpoint.allow_mismatch)", flush=True)


class RayContext:
    """Ray Train's side of the loop: rank/world from ``ray.train.get_context()``, checkpoints reported to
    (and restored from) Ray Train's storage."""

    ray = True  # Ray metrics gauges are available

    def __init__(self):
        import ray.train

        c = ray.train.get_context()
        self.rank, self.world_size, self.local_rank = c.get_world_rank(), c.get_world_size(), c.get_local_rank()

    def latest_checkpoint(self) -> Path | None:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return None
        if ckpt.filesystem is None or ckpt.filesystem.type_name == "local":
            return Path(ckpt.path)
        local = Path(tempfile.mkdtemp(prefix="polyko-resume-"))  # remote storage: only the latest, downloaded
        ckpt.to_directory(str(local))
        return local

    def report(self, metrics: dict[str, float], *, checkpoint: Path, step: int) -> None:
        import ray.train

        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(checkpoint)),
                         checkpoint_dir_name=ckpt_io.step_dir_name(step))


class LocalContext:
    """The loop without Ray Train: a plain ``torch.distributed`` world from torchrun's environment
    (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``PORT``), or one process when unset.
    Checkpoints go to ``<run_dir>/checkpoints/step_XXXXXX`` (a filesystem every rank sees); the newest
    ``keep`` are kept; a rerun resumes from the newest valid one."""

    ray = False

    def __init__(self, run_dir: str | os.PathLike, keep: int = 2):
        from polyko.cluster import free_port

        for k, v in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1")):
            os.environ.setdefault(k, v)
        if "MASTER_PORT" not in os.environ:
            os.environ["MASTER_PORT"] = str(free_port())
        self.rank, self.world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        self.local_rank = int(os.environ["LOCAL_RANK"])
        self.dir = Path(run_dir) / "checkpoints"
        self.keep = keep

    def latest_checkpoint(self) -> Path | None:
        found = ckpt_io.list_checkpoints(self.dir)
        return found[0] if found else None

    def report(self, metrics: dict[str, float], *, checkpoint: Path, step: int) -> None:
        import torch.distributed as dist

        dst = self.dir / ckpt_io.step_dir_name(step)
        # Every rank moves its shard files in (a rename on the same filesystem: no second copy of ~16 B/param),
        # then rank 0 commits the metadata (what makes it valid) last.
        for f in sorted(checkpoint.rglob("*")):
            if f.is_file() and f.name != ckpt_io.META:
                (dst / f.relative_to(checkpoint)).parent.mkdir(parents=True, exist_ok=True)
                shutil.move(str(f), dst / f.relative_to(checkpoint))
        dist.barrier()
        if self.rank == 0:
            shutil.copy2(checkpoint / ckpt_io.META, dst / ckpt_io.META)
            for old in ckpt_io.list_checkpoints(self.dir)[self.keep:]:
                shutil.rmtree(old, ignore_errors=True)
        dist.barrier()


def _find_checkpoint(cfg: PretrainConfig, ctx):
    """Newest valid checkpoint: the run's latest (or its valid predecessors), else ``checkpoint.resume_from``."""
    latest = ctx.latest_checkpoint()
    if latest is not None:
        found = ckpt_io.select(latest)
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
