"""GPU MFU benchmark: training-step throughput of a Polyglot-Ko size on ONE GPU, as MFU.

Measures tokens/s, achieved TFLOP/s and MFU (model FLOPs, ``polyko.plan.flops_per_token``: 6N + 12Lhs,
over the device's dense bf16 peak from ``polyko.plan.PEAK_TFLOPS``) of a full training step --
forward, backward, grad-norm clip, fused AdamW step -- of ``GPTNeoXForCausalLM(build_config(size))``
from random init on random tokens (no downloads, no data). Goal: >= 45% MFU for 1.3b on an H100.

Precision: bf16 autocast over fp32 parameters (fp32 master weights and Adam state, bf16 matmuls:
PyTorch AMP; DeepSpeed's bf16 mode keeps the same fp32 master copy). Attention: SDPA (flash kernel
on Ampere/Hopper); ``flash_attention_2`` only if the ``flash_attn`` package imports.

Groups, each in its own child process with a timeout (an OOM, a hang or a compiler crash cannot take
the run down; what a child measured before it died is kept):

  eager      micro-batch sweep (default 4, 8, 16) x activation checkpointing off/on, SDPA
  fp32       the baseline: same loop in fp32 (TF32 off), one config -> ``speedup_vs_fp32``
  compile    ``torch.compile`` of the best eager config(s) -> ``compile_speedup`` (eager vs compiled)
  flash2     best eager config with ``attn_implementation="flash_attention_2"`` (if importable)
  deepspeed  best eager config through a DeepSpeed engine, ZeRO-1, bf16, single rank
  production the training job's own code: ``polyko.train.loop.train_loop`` (what every Ray Train worker
             runs) in a one-process torch.distributed world (``LocalContext``): the model built in place
             with GPT-NeoX init, DeepSpeed bf16 + ZeRO-1 + activation checkpointing, random tokens through
             the packed-shard reader; then a resume from its own checkpoint (+2 steps) and an HF export
             (``polyko.train.export.export_hf``, bf16) that is loaded back and scored

Prints ONE JSON line: every config's tokens/s, TFLOP/s, MFU (and HFU = with the recomputed forward),
peak memory and status, the best config, the baselines' ratios, device name and the peak used.
Warm-up steps are excluded from timing. Total wall time is bounded by ``--budget-s`` (default 330 s:
fits a 10-minute device window with model init and interpreter start-up to spare).

    python benchmarks/gpu_mfu.py                      # 1.3b on the local GPU
    python benchmarks/gpu_mfu.py --dry-run            # tiny model, 3 steps, CPU ok: proves the script works
    python benchmarks/gpu_mfu.py --groups eager,fp32 --micro-batches 8,16
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

MARK = "@@POLYKO_MFU "
GROUPS = ("eager", "fp32", "compile", "flash2", "deepspeed", "production")
# Seconds each group may take at most (the overall --budget-s cuts them further). Compile is the
# slowest to start (inductor compiles a 24-layer graph: ~1-2 min on a 16-core host).
GROUP_CAP_S = {"eager": 120, "fp32": 60, "compile": 160, "flash2": 60, "deepspeed": 80, "production": 330}
GOAL_MFU = 0.45


# ----------------------------------------------------------------------------------------------- worker


def _sig(x: float, digits: int = 4) -> float:
    """``x`` rounded to significant digits (a CPU dry run's TFLOP/s are ~1e-4, an H100's ~400)."""
    return float(f"{x:.{digits}g}")


def _emit(record: dict) -> None:
    print(MARK + json.dumps(record), flush=True)


def _log(msg: str) -> None:
    print(f"[gpu_mfu {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _worker(spec: dict) -> None:
    """Run one group's configs in this process; emit one MARK line per config."""
    t_start = time.monotonic()
    end = t_start + spec["budget_s"]
    import torch

    from polyko.model import PRESETS, build_config
    from polyko.plan import detect_accelerator, flops_per_token, tflops

    cuda = torch.cuda.is_available() and spec["device"] != "cpu"
    device = torch.device("cuda" if cuda else "cpu")
    group, seq_len = spec["group"], spec["seq_len"]
    config = build_config(spec["size"], max_position_embeddings=max(seq_len, PRESETS[spec["size"]].max_position_embeddings))
    config.use_cache = False
    fpt_model = flops_per_token(config, seq_len)
    gpu, peak = detect_accelerator() if cuda else ("cpu", None)
    peak = spec["peak_tflops"] or peak
    _emit(dict(kind="device", device=torch.cuda.get_device_name(0) if cuda else "cpu", gpu=gpu, peak_tflops=peak,
               memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if cuda else None,
               torch=torch.__version__, cuda=torch.version.cuda))
    if group == "production":
        for cfg in spec["configs"]:
            record = dict(group=group, precision="bf16 (DeepSpeed)" if cuda else "fp32 (DeepSpeed)", **cfg)
            try:
                record.update(_production(spec, cfg, cuda, peak))
            except Exception as e:
                import traceback

                traceback.print_exc()
                record["status"] = f"error: {type(e).__name__}: {str(e)[:300]}"
            _emit(record)
        return
    fp32 = group == "fp32"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 baseline is real fp32
        torch.backends.cudnn.allow_tf32 = False

    state: dict = {}

    def build(attn: str, ckpt: bool):
        from transformers import AutoModelForCausalLM

        torch.manual_seed(0)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, attn_implementation=attn)
        model.train()
        if ckpt:
            kwargs = {"use_reentrant": False}  # non-reentrant: works with torch.compile and DeepSpeed
            if hasattr(model, "activation_checkpointing_enable"):
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:  # transformers 4.x
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        try:
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=True)
            fused = True
        except (RuntimeError, TypeError, ValueError):
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
            fused = False
        return model, opt, fused

    def release():
        import gc

        state.clear()
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()

    def measure(cfg: dict) -> dict:
        """Build (or reuse) the model for cfg, run warm-up + timed steps, return the figures."""
        mb, ckpt, attn = cfg["micro_batch"], cfg["ckpt"], cfg["attn"]
        key = (attn, ckpt, cfg.get("compile", False), group)
        if state.get("key") != key:
            release()
            if group == "deepspeed":
                state.update(_deepspeed_engine(spec, config, device, attn, ckpt, mb, build))
            else:
                model, opt, fused = build(attn, ckpt)
                fwd = torch.compile(model, dynamic=False) if cfg.get("compile") else model
                state.update(model=model, opt=opt, fused=fused, fwd=fwd)
            state["key"] = key
        amp = not fp32
        ids = torch.randint(4, config.vocab_size, (mb, seq_len), device=device)

        if group == "deepspeed":
            engine = state["engine"]

            def step():
                loss = engine(input_ids=ids, labels=ids).loss
                engine.backward(loss)
                engine.step()
                return loss
        else:
            model, opt, fwd = state["model"], state["opt"], state["fwd"]

            def step():
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                    loss = fwd(input_ids=ids, labels=ids).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
                return loss

        def sync():
            if cuda:
                torch.cuda.synchronize()

        if cuda:
            torch.cuda.reset_peak_memory_stats()
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        first = time.perf_counter() - t0
        for _ in range(max(0, spec["warmup"] - 1)):
            step()
        sync()
        t0 = time.perf_counter()
        for _ in range(spec["steps"]):
            loss = step()
        sync()
        dt = (time.perf_counter() - t0) / spec["steps"]
        tps = mb * seq_len / dt
        achieved = tflops(tps, fpt_model)
        hw = tflops(tps, flops_per_token(config, seq_len, recompute=ckpt))
        out = dict(status="ok", step_s=_sig(dt), first_step_s=_sig(first), tokens_per_s=_sig(tps, 6),
                   tflops=_sig(achieved), hw_tflops=_sig(hw), loss=round(float(loss.detach()), 3))
        if peak:
            out.update(mfu=round(achieved / peak, 4), hfu=round(hw / peak, 4))
        if cuda:
            out["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        if group != "deepspeed":
            out["fused_adamw"] = state["fused"]
        return out

    oom_at: dict = {}  # (ckpt, attn) -> smallest micro-batch that ran out of memory
    for cfg in spec["configs"]:
        record = dict(group=group, precision="fp32" if fp32 else ("bf16 (DeepSpeed)" if group == "deepspeed" else
                      "bf16 autocast, fp32 master"), **cfg)
        if time.monotonic() > end:
            record["status"] = "skipped: group time budget"
            _emit(record)
            continue
        if cfg["micro_batch"] > oom_at.get((cfg["ckpt"], cfg["attn"]), float("inf")):
            record["status"] = "skipped: a smaller micro-batch ran out of memory"
            _emit(record)
            continue
        _log(f"{group}: {cfg}")
        try:
            record.update(measure(cfg))
        except torch.cuda.OutOfMemoryError:
            record["status"] = "oom"
            oom_at[(cfg["ckpt"], cfg["attn"])] = cfg["micro_batch"]
        except Exception as e:  # a config that breaks must not lose the others' figures
            record["status"] = f"error: {type(e).__name__}: {str(e)[:300]}"
        if record["status"] != "ok":
            release()  # after the except block: its traceback no longer pins the failed step's tensors
        _log(f"{group}: -> {record.get('status')} {record.get('mfu', record.get('tokens_per_s', ''))}")
        _emit(record)


def _deepspeed_engine(spec, config, device, attn, ckpt, mb, build):
    """A single-rank DeepSpeed engine: ZeRO-1, bf16, the client fused AdamW (no JIT-compiled ops)."""
    import importlib

    import deepspeed
    import torch

    from polyko.cluster import free_port

    for k, v in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(free_port())), ("RANK", "0"),
                 ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        os.environ.setdefault(k, v)
    if device.type == "cpu":  # skip the shared-memory comm op JIT (~35 s, needs a compiler); training never uses it
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    model, opt, fused = build(attn, ckpt)
    ds_config = {
        "train_micro_batch_size_per_gpu": mb,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "bf16": {"enabled": True},
        "zero_optimization": {"stage": 1},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config)
    return dict(engine=engine, model=model, fused=fused)


def _write_inputs(work, vocab: int, seq_len: int, sequences: int):
    """A packed-token dataset of random ids and a word-level tokenizer of ``vocab`` ids with the
    Polyglot-Ko special ids (no downloads: the GPU machine has no network)."""
    import numpy as np
    from tokenizers import Tokenizer, models, pre_tokenizers

    from polyko.data.shards import token_dtype, write_manifest, write_shard
    from polyko.model import ENDOFTEXT_ID, PAD_ID

    tok_dir, data_dir = work / "tokenizer", work / "tokens"
    tok_dir.mkdir(parents=True)
    data_dir.mkdir(parents=True)
    names = {PAD_ID: "<pad>", 1: "<eos>", ENDOFTEXT_ID: "<|endoftext|>", 3: "<sep>"}
    tok = Tokenizer(models.WordLevel({names.get(i, f"t{i}"): i for i in range(vocab)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(tok_dir / "tokenizer.json"))
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "pad_token": "<pad>", "eos_token": "<|endoftext|>"}))
    arr = np.random.default_rng(0).integers(4, vocab, size=(sequences, seq_len)).astype(token_dtype(vocab))
    write_manifest(data_dir, [write_shard(data_dir, 0, arr)], seq_len=seq_len, dtype=arr.dtype,
                   vocab_size=vocab, max_token_id=int(arr.max()))
    return data_dir, tok_dir


def _production(spec: dict, cfg: dict, cuda: bool, peak) -> dict:
    """Train ``steps + warmup`` steps with the production loop, checkpoint, resume for 2 more, export."""
    import gc
    import statistics
    import tempfile
    from dataclasses import replace
    from pathlib import Path

    import torch

    from polyko.config import to_dict
    from polyko.train import checkpoint as ckpt_io
    from polyko.train.config import (BatchConfig, CheckpointConfig, DataConfig, DeepSpeedConfig, FaultConfig,
                                     ModelConfig, OptimConfig, PretrainConfig, ScalingConfig)
    from polyko.train.export import export_hf
    from polyko.train.loop import LocalContext, train_loop
    from polyko.train.metrics import read_jsonl

    mb, seq_len = cfg["micro_batch"], spec["seq_len"]
    steps = spec["warmup"] + spec["steps"]
    work = Path(tempfile.mkdtemp(prefix="polyko-gpu-check-", dir=spec.get("work_dir")))
    data_dir, tok_dir = _write_inputs(work, 30003, seq_len, (steps + 3) * mb)  # 30,003: Polyglot-Ko's vocabulary
    run_dir = work / "run"
    pc = PretrainConfig(
        model=ModelConfig(size=spec["size"], activation_checkpointing=cfg["ckpt"]),
        data=DataConfig(path=str(data_dir), tokenizer=str(tok_dir)),
        optim=OptimConfig(lr=1e-4, warmup_steps=1),
        batch=BatchConfig(global_batch_tokens=mb * seq_len, micro_batch=mb),
        deepspeed=DeepSpeedConfig(zero_stage=cfg.get("zero_stage", 1), precision="bf16" if cuda else "fp32"),
        checkpoint=CheckpointConfig(every_steps=steps, keep=1),
        fault=FaultConfig(max_failures=0, hang_timeout_s=600),
        scaling=ScalingConfig(num_workers=1, use_gpu=cuda, cpus_per_worker=1 if cuda else min(4, os.cpu_count() or 1)),
        steps=steps, output=str(run_dir), export=False)

    def train(c: PretrainConfig) -> float:
        t0 = time.perf_counter()
        train_loop({"config": to_dict(c.resolved()), "output": str(run_dir), "run_name": "gpu-check"},
                   LocalContext(run_dir, keep=1))
        gc.collect()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    _log(f"production: training {steps} steps of {spec['size']}, micro-batch {mb}")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    wall = train(pc)
    hist = read_jsonl(run_dir / "metrics.jsonl")
    timed = [hist[s] for s in range(spec["warmup"] + 1, steps + 1)]
    med = statistics.median(r["step_seconds"] for r in timed)
    tflops_med = statistics.median(r["tflops"] for r in timed)
    out = dict(status="ok", step_s=_sig(med), first_step_s=_sig(hist[1]["step_seconds"]),
               tokens_per_s=_sig(mb * seq_len / med, 6), tflops=_sig(tflops_med),
               loss=round(hist[steps]["loss"], 3), train_wall_s=round(wall, 1),
               setup_and_checkpoint_s=round(wall - sum(hist[s]["step_seconds"] for s in hist), 1))
    if peak:
        out["mfu"] = round(tflops_med / peak, 4)
    if cuda:
        out["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        torch.cuda.empty_cache()

    _log("production: resume from its own checkpoint, 2 more steps")
    wall = train(replace(pc, steps=steps + 2))
    hist = read_jsonl(run_dir / "metrics.jsonl")
    if sorted(hist) != list(range(1, steps + 3)):
        raise RuntimeError(f"resume logged steps {sorted(hist)}, expected 1..{steps + 2}")
    step_dir = ckpt_io.list_checkpoints(run_dir / "checkpoints")[0]
    meta = ckpt_io.validate(step_dir)
    out.update(resume_wall_s=round(wall, 1), resumed_steps=[steps + 1, steps + 2], resumed_loss=round(hist[steps + 2]["loss"], 3),
               checkpoint_gib=round(sum(meta["files"].values()) / 2**30, 2), checkpoint_step=meta["step"])

    _log("production: export to Hugging Face format (bf16) and score it")
    t0 = time.perf_counter()
    hf_dir = export_hf(step_dir, work / "hf", tok_dir, dtype="bf16", link_run=False)
    out["export_s"] = round(time.perf_counter() - t0, 1)
    from transformers import AutoModelForCausalLM

    from polyko.data.shards import TokenShards

    device = torch.device("cuda" if cuda else "cpu")
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.bfloat16 if cuda else torch.float32).to(device)
    x = torch.from_numpy(TokenShards(data_dir).batch(list(range(min(mb, 4))))).long().to(device)
    with torch.no_grad():
        out["export_loss"] = round(float(model(input_ids=x, labels=x).loss), 3)
    out["export_gib"] = round(sum(f.stat().st_size for f in hf_dir.iterdir()) / 2**30, 2)
    del model
    import shutil

    shutil.rmtree(work, ignore_errors=True)  # ~16 B/param of checkpoint: do not leave it on the machine
    return out


# ----------------------------------------------------------------------------------------- orchestrator


def _run_group(group: str, spec: dict, timeout_s: float) -> tuple[list[dict], dict | None]:
    """Run a group in a child process (own session, so a timeout kills its compile workers too).
    Returns its config records and the device it reported."""
    spec = dict(spec, group=group, budget_s=max(5.0, timeout_s - 15))
    env = dict(os.environ)
    env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # less fragmentation at big batches
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if spec["device"] == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
        env.setdefault("DS_ACCELERATOR", "cpu")
    child = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)],
                             stdout=subprocess.PIPE, text=True, env=env, start_new_session=True)
    note = None
    try:
        out, _ = child.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)  # only the child's own session: processes we started
        out, _ = child.communicate()
        note = f"timeout after {timeout_s:.0f} s"
    records = [json.loads(line[len(MARK):]) for line in out.splitlines() if line.startswith(MARK)]
    device = [r for r in records if r.get("kind") == "device"]
    records = [r for r in records if r.get("kind") != "device"]
    done = {json.dumps(r.get("micro_batch")) + str(r.get("ckpt")) + str(r.get("attn")) for r in records}
    for cfg in spec["configs"]:  # configs the child never reported: it died (timeout, crash, CUDA error)
        if json.dumps(cfg.get("micro_batch")) + str(cfg.get("ckpt")) + str(cfg.get("attn")) not in done:
            records.append(dict(group=group, **cfg, status=note or f"error: worker exited with {child.returncode}"))
    return records, (device[0] if device else None)


def _best(records: list[dict]) -> dict | None:
    ok = [r for r in records if r.get("status") == "ok"]
    return max(ok, key=lambda r: r["tokens_per_s"]) if ok else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="1.3b")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--micro-batches", default="4,8,16", help="comma-separated eager sweep")
    ap.add_argument("--steps", type=int, default=8, help="timed steps per config")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per config (>= 1)")
    ap.add_argument("--groups", default=",".join(GROUPS), help=f"subset of {','.join(GROUPS)}")
    ap.add_argument("--budget-s", type=float, default=330.0, help="wall-clock bound for all groups")
    ap.add_argument("--peak-tflops", type=float, default=None, help="override the detected bf16 peak")
    ap.add_argument("--device", choices=("auto", "cpu"), default="auto")
    ap.add_argument("--dry-run", action="store_true", help="tiny model, seq 128, 3 steps: proves the script works")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        _worker(json.loads(a.worker))
        return 0

    t0 = time.monotonic()
    result: dict = {"benchmark": "gpu_mfu"}
    try:
        import torch

        from polyko.model import PRESETS, build_config, count_params
        from polyko.plan import flops_per_token

        if a.dry_run:
            a.size, a.seq_len, a.steps, a.warmup, a.micro_batches = "tiny", 128, 3, 1, "2"
        # No CUDA call here: a context in this process would hold ~0.5 GiB of the GPU the children measure.
        cuda = torch.cuda.is_available() and a.device != "cpu"
        if not cuda and not a.dry_run and a.device != "cpu":
            raise ValueError(f"no CUDA device: a {a.size} step on a CPU takes minutes; use --dry-run "
                             "(or --device cpu if you mean it)")
        config = build_config(a.size, max_position_embeddings=max(a.seq_len, PRESETS[a.size].max_position_embeddings))
        result.update(
            size=a.size, seq_len=a.seq_len, dry_run=a.dry_run, device=None, gpu=None, peak_tflops=None,
            peak_source=None, torch=torch.__version__, params=count_params(config),
            flops_per_token=flops_per_token(config, a.seq_len),
            precision="bf16 autocast over fp32 params (fp32 master + Adam), fused AdamW if available; "
                      "baseline fp32 without TF32",
            steps=a.steps, warmup=a.warmup, goal_mfu=GOAL_MFU)
        groups = [g for g in a.groups.split(",") if g]
        unknown = set(groups) - set(GROUPS)
        if unknown:
            raise ValueError(f"unknown groups {sorted(unknown)}; choose from {GROUPS}")
        spec = dict(size=a.size, seq_len=a.seq_len, steps=a.steps, warmup=max(1, a.warmup),
                    peak_tflops=a.peak_tflops, device="cuda" if cuda else "cpu")
        mbs = [int(x) for x in a.micro_batches.split(",") if x]
        deadline = t0 + a.budget_s
        records: list[dict] = []

        def run(group: str, configs: list[dict], **overrides) -> list[dict]:
            remaining = deadline - time.monotonic()
            if remaining < 20:
                recs = [dict(group=group, **c, status="skipped: overall time budget") for c in configs]
            else:
                recs, device = _run_group(group, dict(spec, configs=configs, **overrides),
                                          min(GROUP_CAP_S[group], remaining))
                if device and result["device"] is None:
                    result.update(device=device["device"], gpu=device["gpu"], peak_tflops=device["peak_tflops"],
                                  memory_gib=device["memory_gib"], cuda=device["cuda"],
                                  peak_source="--peak-tflops" if a.peak_tflops else
                                  ("polyko.plan.PEAK_TFLOPS (NVIDIA datasheet, dense bf16)"
                                   if device["peak_tflops"] else None))
            records.extend(recs)
            return recs

        eager_best = None
        if "eager" in groups:
            # Ascending micro-batches per checkpointing setting: the worker skips sizes above an OOM.
            cfgs = [dict(micro_batch=mb, ckpt=ck, attn="sdpa") for ck in (False, True) for mb in mbs]
            eager_best = _best(run("eager", cfgs))
        ref = eager_best or dict(micro_batch=mbs[0], ckpt=True)
        pick = dict(micro_batch=ref["micro_batch"], ckpt=ref["ckpt"])
        if "fp32" in groups:
            # fp32 runs ~10x slower than bf16: fewer steps keep the baseline inside its time cap.
            run("fp32", [dict(micro_batch=min(mbs), ckpt=True, attn="sdpa")], warmup=1, steps=max(2, a.steps // 3))
        if "compile" in groups:
            if not cuda:
                records.append(dict(group="compile", attn="sdpa", compile=True, **pick,
                                    status="skipped: torch.compile on CPU fails in bf16"))
            else:
                run("compile", [dict(**pick, attn="sdpa", compile=True)])
        if "flash2" in groups:
            if importlib.util.find_spec("flash_attn") is None:
                records.append(dict(group="flash2", attn="flash_attention_2", **pick,
                                    status="skipped: flash_attn not installed"))
            else:
                run("flash2", [dict(**pick, attn="flash_attention_2")])
        if "deepspeed" in groups:
            run("deepspeed", [dict(**pick, attn="sdpa")])
        if "production" in groups:
            # The job's own loop: ZeRO-1 bf16 with activation checkpointing (what the plan picks for 1.3b on one
            # 80+ GB GPU), at the best eager micro-batch with checkpointing, or the first of the sweep.
            ck = _best([r for r in records if r["group"] == "eager" and r.get("ckpt")])
            run("production", [dict(micro_batch=(ck or {}).get("micro_batch", mbs[0]), ckpt=True, attn="sdpa",
                                    zero_stage=1)])

        result["configs"] = records
        best = _best([r for r in records if r["group"] not in ("fp32", "production")])
        result["best"] = best
        fp32 = _best([r for r in records if r["group"] == "fp32"])
        result["baseline_fp32"] = fp32
        if best and fp32:
            result["speedup_vs_fp32"] = round(best["tokens_per_s"] / fp32["tokens_per_s"], 2)
            same = _best([r for r in records if r["group"] == "eager" and r.get("micro_batch") == fp32["micro_batch"]
                          and r.get("ckpt") == fp32["ckpt"]])
            if same:  # precision alone: the eager bf16 run of the baseline's micro-batch and checkpointing
                result["bf16_vs_fp32_same_config"] = round(same["tokens_per_s"] / fp32["tokens_per_s"], 2)
        comp = _best([r for r in records if r["group"] == "compile"])
        if comp and eager_best:
            result["compile_speedup"] = round(comp["tokens_per_s"] / eager_best["tokens_per_s"], 3)
        prod = _best([r for r in records if r["group"] == "production"])
        if prod:
            same = _best([r for r in records if r["group"] == "eager" and r.get("ckpt")
                          and r.get("micro_batch") == prod["micro_batch"]])
            result["production"] = prod
            if same:  # the job's loop against a bare PyTorch loop of the same shape
                result["production_vs_eager"] = round(prod["tokens_per_s"] / same["tokens_per_s"], 3)
        ds = _best([r for r in records if r["group"] == "deepspeed"])
        if ds and eager_best:
            result["deepspeed_vs_eager"] = round(ds["tokens_per_s"] / eager_best["tokens_per_s"], 3)
        if best and "mfu" in best:
            result["best_mfu"] = best["mfu"]
            result["meets_goal"] = best["mfu"] >= GOAL_MFU
    except Exception as e:  # still print the one JSON line
        result["error"] = f"{type(e).__name__}: {e}"
    result["wall_s"] = round(time.monotonic() - t0, 1)
    print(json.dumps(result), flush=True)
    ok = "error" not in result and (result.get("best") or result.get("production"))
    prod_ok = all(r.get("status") == "ok" for r in result.get("configs") or [] if r.get("group") == "production")
    return 0 if ok and prod_ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
