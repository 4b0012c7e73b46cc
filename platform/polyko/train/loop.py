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
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

from polyko.config import from_dict, to_dict
from polyko.train import checkpoint as ckpt_io
from polyko.train.config import BatchLayout, PretrainConfig, deepspeed_config, lr_at, parse_faults
from polyko.train.guard import EVENTS_FILE


def train_loop(loop_cfg: dict[str, Any], ctx: "RayContext | LocalContext | None" = None) -> None:
    import deepspeed
    import torch
    import torch.distributed as dist

    cfg = from_dict(PretrainConfig, loop_cfg["config"])
    ctx = ctx or RayContext(loop_cfg.get("checkpoint_root"))
    rank, world, local_rank = ctx.rank, ctx.world_size, ctx.local_rank
    out = Path(loop_cfg["output"])

    # --- distributed setup --------------------------------------------------------------------------
    device = setup_distributed(cfg, local_rank)

    # --- data ---------------------------------------------------------------------------------------
    from polyko.train.data import make_sampler, manifest_hash, open_tokens, open_validation, tokenizer_size, \
        worker_positions

    tokens = open_tokens(cfg.data.path, cfg.data.tokenizer)
    data_manifest = manifest_hash(cfg.data.path)
    seq_len = tokens.seq_len
    # Position -> row: a pure function of (seed, position), by source weights when data.mixture is set.
    sampler = make_sampler(cfg.data.path, cfg.seed, shuffle=cfg.data.shuffle, mixture=cfg.data.mixture or None)
    validation = open_validation(cfg.data.path, cfg.data.tokenizer) if cfg.eval.every_steps else None
    val_rows = validation.eval_rows(cfg.eval.rows_per_source or None, seed=cfg.seed) if validation else None
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
    if cfg.model.parametrization == "mup":
        from polyko.sweep.mup import apply_mup

        # Re-initialised in μP (same seed on every rank), groups carry lr_mult: the step's lr is lr_at * lr_mult.
        torch.manual_seed(cfg.seed)
        groups = apply_mup(model, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    else:
        groups = param_groups(model, cfg.optim.weight_decay)  # decay on matrices/embeddings (polyko.model.no_decay)

    # --- resume -------------------------------------------------------------------------------------
    load_dir = None
    if found is not None:
        path, meta = found
        load_dir, universal = ckpt_io.prepare_resume(path, meta, world_size=world, rank=rank, local_rank=local_rank,
                                                     zero_stage=cfg.deepspeed.zero_stage,
                                                     timeout_s=cfg.checkpoint.reshard_timeout_s)
        if universal:
            ds_config["checkpoint"] = {"load_universal": True}

    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=ds_config)
    # The guard decides every step from the all-reduced loss and global grad norm: the same on every rank.
    from polyko.train.guard import Guard, boundary_step, health_score, params_nonfinite, rollback_target, \
        z_loss_term, RETENTION_SCORE

    guard = Guard(cfg.guard, layout.global_batch)
    start_step = 0
    if found is not None:
        _load_checkpoint(engine, load_dir)
        start_step = meta["step"]
        state = (meta.get("guard") or {}).get("state")
        after = _read_rollback(out, start_step)
        if after is not None and (not state or after["rollbacks"] > state["rollbacks"]):
            state = after  # the run rolled back to this checkpoint and stopped before its next one
        if state:
            guard.load_state_dict(state)  # windows, streak, skipped ranges: the same decisions as without the stop
        if rank == 0:
            print(f"[polyko] resumed from {found[0]} at step {start_step} "
                  f"(saved by {meta['world_size']} workers, now {world})", flush=True)

    # --- metrics ------------------------------------------------------------------------------------
    from polyko.train.metrics import MetricsSink, Progress, accelerator_peak, flops_per_token

    sink = progress = None
    if rank == 0:
        sink = MetricsSink(run_id=loop_cfg.get("run_id"), tracking_uri=loop_cfg.get("tracking_uri"),
                           run_name=loop_cfg["run_name"], size=cfg.model.size, jsonl=out / "metrics.jsonl",
                           gauges=ctx.ray)
        progress = Progress(cfg.steps, start_step)
    events_file = out / EVENTS_FILE
    fpt = flops_per_token(model_config, seq_len)
    _, peak = accelerator_peak(cfg.scaling.use_gpu)
    step_tokens = layout.global_batch * seq_len
    faults = parse_faults(cfg.fault.inject)

    # --- steps --------------------------------------------------------------------------------------
    last_ckpt_s, last_ckpt_step, ckpt_due, stopped = None, (found[1]["step"] if found else None), False, None
    step = start_step
    while step < cfg.steps:
        corrupt = _maybe_inject_fault(faults, step, rank, out)  # crash/exit/hang act here; spike/nan are returned
        t0 = time.perf_counter()
        torch.manual_seed((cfg.seed * 1_000_003 + step) * 4096 + rank)  # RNG = f(seed, step, rank)
        lr = lr_at(cfg, step) * guard.lr_scale(step)  # re-warmed after a rollback
        for group in engine.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)  # μP: per-group multiplier
        # Positions are the step's slice of the global order, shifted past every window a rollback skipped.
        first, count = worker_positions(step, rank, layout.global_batch, world)
        idx = sampler.indices(first + guard.sample_offset, count)
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # sum of per-sequence losses
        at, sizes = 0, layout.micro_sizes(rank)
        for j, n in enumerate(sizes):  # the same number of micro-steps on every rank
            # n == 0 (only with micro_batch 1 and an uneven split): a zero-weight copy of a real sequence keeps
            # this rank's forward/backward collectives in step with the others.
            micro = idx[at:at + n] if n else idx[:1]
            at += n
            x = torch.from_numpy(tokens.batch(micro)).to(device)
            res = engine(input_ids=x, labels=x)
            loss = res.loss  # HF shifts labels: mean next-token loss over the micro-batch
            if corrupt:  # chaos: a corrupt batch (x1000) or a non-finite loss, on this rank
                loss = loss * (1000.0 if corrupt == "spike" else float("nan"))
            total = loss + z_loss_term(res.logits, cfg.guard.z_loss) if cfg.guard.z_loss else loss
            engine.backward(total if layout.even else total * layout.loss_scale(n))
            loss_sum += loss.detach().double() * n
            if j < len(sizes) - 1:
                engine.step()  # accumulation micro-step: DeepSpeed applies nothing until the boundary
        dist.all_reduce(loss_sum)
        # The boundary step under the guard: applied, or skipped (no parameter/optimizer update) for an anomaly.
        decision = boundary_step(guard, engine, step, loss_sum / layout.global_batch)
        if decision.anomaly and rank == 0:
            e = guard.events[-1]
            print(f"[polyko] guard: step {step + 1} {decision.anomaly} (statistic {e['statistic']}) -> "
                  f"{decision.action}, samples {e['samples'][0]}..{e['samples'][1]}", flush=True)
        reason = None  # why the run stops, when a rollback cannot be taken
        if decision.action == "rollback":
            target = rollback_target(ctx.checkpoints(), before_step=step)
            if target is None or not _loadable(target[1], world, cfg.deepspeed.zero_stage):
                decision = replace(decision, action="stop")
                reason = ("no healthy checkpoint to roll back to" if target is None else
                          f"the rollback target {target[0]} was saved at {target[1]['world_size']} workers, ZeRO-"
                          f"{target[1]['zero_stage']}: restart the run to reshard it")
            else:
                _load_checkpoint(engine, target[0])
                plan = guard.on_rollback(target[1])
                if rank == 0:
                    _write_rollback(out, plan.step, guard.state_dict())
                    print(f"[polyko] guard: rolled back to step {plan.step} ({target[0]}); samples "
                          f"{plan.skip_start}..{plan.skip_end} skipped, lr re-warmed over "
                          f"{cfg.guard.rewarmup_steps} steps", flush=True)
                    sink.log(step + 1, guard.metrics())
                    sink.artifact(guard.write_events(events_file))
                step = plan.step
                continue
        if decision.action == "stop":
            reason = reason or f"{decision.anomaly} after {cfg.guard.max_rollbacks} rollback(s) (guard.max_rollbacks)"
            stopped = f"stopped at step {step + 1}: {reason}"
            break
        step_s = time.perf_counter() - t0
        done = step + 1

        tps = step_tokens / step_s
        tflops = fpt * tps / world / 1e12  # model TFLOP/s per worker
        metrics = {"loss": decision.loss, "lr": lr, "grad_norm": decision.grad_norm,
                   "tokens_per_second": tps, "tflops": tflops, "mfu": tflops / peak if peak else None,
                   "step_seconds": step_s, "step": done, "tokens_seen": done * step_tokens,
                   "checkpoint_seconds": last_ckpt_s, "world_size": world, **guard.metrics(),
                   # global sample position this step read from, and whether its update was skipped
                   "data_position": guard.position(step), "guard/skipped": float(decision.action == "skip")}

        if validation is not None and (done % cfg.eval.every_steps == 0 or done == cfg.steps):
            t1 = time.perf_counter()
            by_source = validation_losses(engine, validation, val_rows, rank=rank, world=world,
                                          micro_batch=layout.micro_batch, device=device)
            metrics.update(validation_metrics(validation, by_source))
            metrics["val/seconds"] = time.perf_counter() - t1
        ckpt_due, reported = ckpt_due or done % cfg.checkpoint.every_steps == 0 or done == cfg.steps, False
        if ckpt_due and (guard.streak == 0 or done == cfg.steps):
            # Never a checkpoint with non-finite weights (the next step's check rolls back instead); during an
            # anomaly streak the save waits for a healthy step (a rollback would re-run and re-save it).
            finite = int(params_nonfinite(engine)) == 0
            if finite:
                t1 = time.perf_counter()
                gmeta = guard.checkpoint_meta(params_finite=True)
                meta = {"step": done, "tokens_seen": done * step_tokens,
                        "data_position": guard.position(done), "global_batch": layout.global_batch,
                        "seq_len": seq_len, "world_size": world,
                        "zero_stage": cfg.deepspeed.zero_stage, "precision": cfg.deepspeed.precision,
                        "rng": "reseeded from (seed, step, rank) every step", "loss": decision.loss,
                        "data_manifest": data_manifest, "seed": cfg.seed, "guard": gmeta,
                        "process_group_timeouts_s": group_timeouts(),  # every group's collective timeout (rank 0's view)
                        "model_config": engine.module.config.to_dict(), "tokenizer": cfg.data.tokenizer,
                        "config": to_dict(cfg), "run_id": loop_cfg.get("run_id")}
                local = ckpt_io.save(engine, done, meta)
                metrics[RETENTION_SCORE] = health_score(done, gmeta["healthy"])
                ctx.report({k: v for k, v in metrics.items() if v is not None}, checkpoint=local, step=done,
                           validation=_wants_kobest(cfg, done))
                shutil.rmtree(local, ignore_errors=True)
                last_ckpt_s = metrics["checkpoint_seconds"] = time.perf_counter() - t1
                last_ckpt_step, ckpt_due, reported = done, False, True
            elif rank == 0:
                print(f"[polyko] WARNING non-finite weights after step {done}: no checkpoint written (the last "
                      f"one, step {last_ckpt_step}, stays the one to resume or roll back to)", flush=True)
        if sink is not None:
            if guard.events and (decision.anomaly or done == cfg.steps):
                sink.artifact(guard.write_events(events_file, reason="finished" if done == cfg.steps else "running"))
            if done % cfg.checkpoint.every_steps == 0 or done == cfg.steps:
                metrics.update(_mixture_metrics(sampler, guard.position(done)))
            sink.log(done, metrics)
            progress.show(done, metrics, last_ckpt_step, guard)
        if reported and done < cfg.steps and loop_cfg.get("await_decision"):
            # A sweep's trial: no step past a report before the scheduler decided on it (after the step is logged)
            if await_decision(Path(loop_cfg["await_decision"]), done) == "stop":
                break  # stopped at this report: the run ends here, as if its last step (no export, no error)
        step = done
    if stopped and rank == 0:
        print(f"[polyko] guard: {stopped}", flush=True)
        sink.artifact(guard.write_events(events_file, reason=stopped))
    if sink is not None:
        sink.close()


# ------------------------------------------------------------------------------------------- helpers

# A report's decision arrives within a few seconds (Ray Train's controller polls its workers every 2 s, then
# Tune's loop); a longer wait means the decision file is not coming (a driver restarting): train on.
DECISION_TIMEOUT_S = 120.0


def await_decision(path: Path, step: int, timeout_s: float = DECISION_TIMEOUT_S, poll_s: float = 0.05) -> str:
    """Wait, before training past the report of ``step``, until whoever schedules this run has decided on that
    report: ``path`` (JSON ``{"step": n, "stop": bool}``) holds a step >= ``step`` once it has. Returns ``"go"``
    (train on), ``"stop"`` (the scheduler stopped the run at this report: the caller ends its loop, so the run
    trains no step beyond the report it was judged on and ends cleanly -- an ASHA sweep's trial, whose Tune
    actor is then free for the next trial: ``polyko.sweep.tune``) or ``"timeout"`` after ``timeout_s`` without
    a decision (train on). Costs one small read per ``poll_s`` while waiting."""
    import json

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            d = json.loads(path.read_text())
            if int(d.get("step", -1)) >= step:
                return "stop" if d.get("stop") else "go"
        except (OSError, ValueError):
            pass
        time.sleep(poll_s)
    print(f"[polyko] WARNING no decision on the report of step {step} after {timeout_s:.0f} s ({path}): "
          "training on", flush=True)
    return "timeout"


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
    """What differs between a checkpoint's trajectory and this run's: data, seed, global batch, seq_len, mixture."""
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
    saved_mix = ((meta.get("config") or {}).get("data") or {}).get("mixture") or {}
    if saved_mix != (cfg.data.mixture or {}):  # the global sample order is a function of the mixture
        diffs.append(f"data mixture {saved_mix or 'proportional'} != {cfg.data.mixture or 'proportional'}")
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

    def __init__(self, checkpoint_root: str | None = None):
        import ray.train

        c = ray.train.get_context()
        self.rank, self.world_size, self.local_rank = c.get_world_rank(), c.get_world_size(), c.get_local_rank()
        self.root = Path(checkpoint_root) if checkpoint_root else None  # <output>/ray/<run name> (pretrain sets it)

    def checkpoints(self) -> list[tuple[Path, dict[str, Any]]]:
        """Every valid checkpoint the run's storage holds (rollback targets; a filesystem every rank sees)."""
        return _valid_checkpoints(self.root) if self.root else []

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

    def report(self, metrics: dict[str, float], *, checkpoint: Path, step: int, validation: bool = False) -> None:
        import ray.train

        # validation=True: Ray Train starts the run's checkpoint evaluation (KoBEST, polyko.train.evaluator) as
        # its own task on the persisted checkpoint; this returns without waiting for it.
        extra = {"validation": True} if validation else {}
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(checkpoint)),
                         checkpoint_dir_name=ckpt_io.step_dir_name(step), **extra)


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

    def checkpoints(self) -> list[tuple[Path, dict[str, Any]]]:
        return _valid_checkpoints(self.dir)

    def report(self, metrics: dict[str, float], *, checkpoint: Path, step: int, validation: bool = False) -> None:
        import torch.distributed as dist

        from polyko.train.guard import retention

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
            # The newest `keep`, and always the newest healthy one (a rollback target through any bad streak).
            for old in retention(_valid_checkpoints(self.dir), self.keep):
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


def _maybe_inject_fault(faults: list[tuple[str, int, int]], step: int, rank: int, out: Path) -> str | None:
    """Chaos testing (``fault.inject``, :func:`polyko.train.config.parse_faults`): each ``KIND@STEP:RANK`` fires
    once per run directory when rank RANK is about to run step STEP (0-based). crash: raise; exit: kill the
    process; hang: block forever (hang detection). spike / nan: returned, and the loop corrupts this rank's
    batch of the step (loss x1000 / non-finite), a transient fault: a rollback that re-runs the step sees a
    clean batch."""
    hit = None
    for kind, s, r in faults:
        if step != s or rank != r:
            continue
        marker = out / f"fault-fired-{kind}-{s}-{r}"
        if marker.exists():
            continue
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(str(time.time()))
        print(f"[polyko] injecting fault {kind}@{s}:{r}", flush=True)
        if kind == "crash":
            raise RuntimeError(f"injected fault {kind}@{s}:{r}")
        if kind == "exit":
            os._exit(1)
        if kind == "hang":
            while True:
                time.sleep(3600)
        hit = kind
    return hit


def _load_checkpoint(engine, path: Path) -> None:
    """Weights and optimizer state of a polyko checkpoint into the running engine (the lr is set every step)."""
    engine.load_checkpoint(str(path), tag=ckpt_io.DS_TAG, load_optimizer_states=True, load_lr_scheduler_states=False)


ROLLBACK_FILE = "guard_rollback.json"


def _write_rollback(out: Path, step: int, state: dict[str, Any]) -> None:
    """The guard's state just after rolling back to checkpoint ``step``. That checkpoint's metadata holds the
    state from before the rollback; a run stopped before its next checkpoint resumes from this one, so it skips
    the same samples as an uninterrupted run would (atomic replace; rank 0, on the run directory)."""
    import json

    tmp = out / f".{ROLLBACK_FILE}.tmp"
    tmp.write_text(json.dumps({"step": step, "state": state}))
    tmp.replace(out / ROLLBACK_FILE)


def _read_rollback(out: Path, step: int) -> dict[str, Any] | None:
    import json

    p = out / ROLLBACK_FILE
    if not p.is_file():
        return None
    d = json.loads(p.read_text())
    return d["state"] if d.get("step") == step else None


def _valid_checkpoints(root: Path) -> list[tuple[Path, dict[str, Any]]]:
    """``(path, metadata)`` of every committed checkpoint under ``root``, newest first (broken ones skipped)."""
    out = []
    for p in ckpt_io.list_checkpoints(root):
        try:
            out.append((p, ckpt_io.validate(p)))
        except ckpt_io.CheckpointError:
            continue
    return out


def _loadable(meta: dict[str, Any], world: int, zero_stage: int) -> bool:
    """A checkpoint the running engine can load in place (no resharding: same layout, or ZeRO-0)."""
    return not ckpt_io.needs_reshard(meta, world, zero_stage)


def _wants_kobest(cfg: PretrainConfig, done: int) -> bool:
    from polyko.train.evaluator import wants

    return bool(cfg.eval.kobest.enabled) and wants(cfg.eval.kobest, done, cfg.checkpoint.every_steps, cfg.steps)


def _mixture_metrics(sampler, positions: int) -> dict[str, float]:
    """Tokens share and epochs per source after ``positions`` global positions (with a mixture, or data small
    enough that counting a proportional order is cheap: it reads every position's row once, incrementally)."""
    from polyko.train.data import mixture_report

    if not sampler.rows or (not sampler.mixture and sampler.n > 1 << 22):
        return {}
    rep = mixture_report(sampler, positions)
    return {f"data/{s}/{k}": v[k] for s, v in rep.items() for k in ("share", "epochs")}


def validation_losses(engine, validation, rows: dict[str, "np.ndarray"], *, rank: int, world: int,
                      micro_batch: int, device) -> dict[str, float]:
    """Mean next-token loss (nats per predicted token) per source over the fixed validation ``rows``, the rows
    dealt round-robin over the ranks. Every rank runs the same number of forwards (ZeRO-3 gathers parameters
    in each), a rank out of rows running a zero-weight one. Cost: one forward per row, no backward."""
    import numpy as np
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    sources = sorted(rows)
    flat = np.concatenate([rows[s] for s in sources])
    src = np.concatenate([np.full(len(rows[s]), i, dtype=np.int64) for i, s in enumerate(sources)])
    mine = np.arange(rank, len(flat), world)
    mb = max(1, micro_batch)
    per_rank = -(-len(flat) // world)
    forwards = -(-per_rank // mb)
    acc = torch.zeros(len(sources), 2, dtype=torch.float64, device=device)  # (nats, predicted tokens) per source
    training = engine.module.training
    engine.eval()
    with torch.no_grad():
        for f in range(forwards):
            sel = mine[f * mb:(f + 1) * mb]
            real = len(sel) > 0
            sel = sel if real else np.array([0])
            x = torch.from_numpy(validation.shards.batch(flat[sel])).to(device)
            logits = engine(input_ids=x).logits.float()
            nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                  reduction="none").view(len(sel), -1).sum(1).double()
            if real:
                counts = torch.full_like(nll, float(x.shape[1] - 1))
                acc.index_add_(0, torch.from_numpy(src[sel]).to(device), torch.stack([nll, counts], 1))
    dist.all_reduce(acc)
    engine.train(training)
    vals = acc.tolist()
    return {s: vals[i][0] / vals[i][1] for i, s in enumerate(sources) if vals[i][1] > 0}


def validation_metrics(validation, by_source: dict[str, float]) -> dict[str, float]:
    """``val/loss`` (the sources' losses weighted by their validation tokens), ``val/bpb`` (bits per UTF-8
    byte: comparable across tokenizers), and both per source (``val/<source>/loss``, ``.../bpb``)."""
    with_bytes = {s: v for s, v in by_source.items() if validation.bytes.get(s, 0) > 0}
    tokens = {s: validation.tokens[s] for s in by_source}
    out = {"val/loss": sum(v * tokens[s] for s, v in by_source.items()) / max(1, sum(tokens.values()))}
    if with_bytes:
        out["val/bpb"] = validation.overall_bits_per_byte(with_bytes)
        out.update({f"val/{s}/bpb": v for s, v in validation.bits_per_byte(with_bytes).items()})
    out.update({f"val/{s}/loss": v for s, v in by_source.items()})
    return out
