"""Pretraining configuration: typed nested dataclasses with per-size defaults.

``PretrainConfig`` is everything a run needs; it is hashed to name the run and logged to MLflow.
Fields left ``None`` are filled per model size by :meth:`PretrainConfig.resolved` (batch, learning
rate, ZeRO stage, micro-batch, precision) so ``--size 1.3b`` alone gives a sensible GPU recipe and
``--size tiny`` a CPU one. The DeepSpeed JSON is *built* from the config (:func:`deepspeed_config`);
``deepspeed.extra_json`` (from ``--deepspeed-config FILE``) is merged on top, last.

Batch arithmetic (fixed global batch, elastic worker count): the global batch in sequences
``G = global_batch_tokens / seq_len`` never changes, at ANY worker count ``1 <= w <= G``: worker ``r``
takes ``G // w`` sequences, plus one if ``r < G % w``, as ``acc`` micro-batches (the same ``acc`` on
every worker, sizes differing by at most one, none above ``batch.micro_batch``), and the loop weights
each micro-batch's loss so the gradient is the mean over the ``G`` sequences (:class:`BatchLayout`).
So a run resumed on another worker count takes the same optimizer steps over the same samples.

CPU: ``PretrainConfig(model=ModelConfig(size="tiny"), data=DataConfig(path=..., tokenizer=...))``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any

from polyko.train.evaluator import CheckpointEvalConfig
from polyko.train.guard import GuardConfig

# Global batch in tokens per size. 1.3b/3.8b: Polyglot-Ko's ~2M tokens (1024 x 2048); 5.8b/12.8b: its
# ~0.5M (256 x 2048). tiny/50m: small enough that a CPU step takes well under a second / a few seconds.
GLOBAL_BATCH_TOKENS = {"tiny": 8_192, "50m": 16_384, "1.3b": 2_097_152, "3.8b": 2_097_152,
                       "5.8b": 524_288, "12.8b": 524_288}
# Largest micro-batch per worker (sequences): what fits an 80 GB GPU at 2,048 tokens with the default
# ZeRO stage and activation checkpointing; on a CPU it bounds the activation memory.
MICRO_BATCH = {"tiny": 16, "50m": 8, "1.3b": 8, "3.8b": 4, "5.8b": 4, "12.8b": 2}
# Peak learning rates: GPT-3 paper table for similar sizes; tiny/50m tolerate more.
LEARNING_RATE = {"tiny": 1e-3, "50m": 6e-4, "1.3b": 2e-4, "3.8b": 1.6e-4, "5.8b": 1.2e-4, "12.8b": 1e-4}
# ZeRO stage when nothing else decides it: shard optimizer state (1), + gradients (2), + parameters (3) only
# when memory needs it; every stage above the need costs communication (tiny/50m at ZeRO-2 cost +17%/+48% per
# CPU step over plain data parallelism, benchmarks/train_step.py). ``pretrain`` replaces it by the memory plan's
# cheapest stage that fits (polyko.plan: GPU memory, or host RAM per CPU worker); bf16 needs stage >= 1.
ZERO_STAGE = {"tiny": 0, "50m": 0, "1.3b": 1, "3.8b": 2, "5.8b": 2, "12.8b": 3}
# DeepSpeed keys derived from this config; setting them in extra_json would break the batch arithmetic.
_DERIVED_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


@dataclass
class ModelConfig:
    size: str = "tiny"                 # a polyko.model.PRESETS name
    init_from: str | None = None       # HF checkpoint dir to continue from (weights only, step 0)
    activation_checkpointing: bool | None = None  # None: on for GPU sizes >= 1.3b (~30% more compute, far less memory)
    init: str = "neox"                 # neox: GPT-NeoX small_init/wang_init (Polyglot-Ko); hf: transformers' N(0, 0.02)
    parametrization: str = "standard"  # standard, or mup: maximal update parametrization with base shapes from
                                       # `tiny` (width-scaled init and per-group lr, 1/d attention;
                                       # polyko.sweep.mup), so a learning rate swept on tiny holds at full width


@dataclass
class DataConfig:
    path: str = ""                     # packed token dataset (a dir with manifest.json, or its parent with tokens/)
    tokenizer: str = ""                # tokenizer dir the tokens were made with (checked against the manifest)
    shuffle: bool = True               # epoch-wise seeded permutation of sequences
    # Source weights ({"news": 0.3, "web": 0.7}, normalised): sample sources with these shares instead of in
    # proportion to their size, in the same deterministic global order (polyko.train.data.MixtureSampler).
    # Empty: proportional. A source left out is not sampled. `--set data.mixture.news=0.3` sets one.
    mixture: dict[str, float] = field(default_factory=dict)


@dataclass
class OptimConfig:
    lr: float | None = None            # peak learning rate; None: per size (LEARNING_RATE)
    min_lr_ratio: float = 0.1          # cosine decays to lr * min_lr_ratio (GPT-3, Chinchilla)
    schedule: str = "cosine"           # after warmup: "cosine" to the last step, or "wsd" (warmup-stable-decay:
                                       # constant lr, then linear decay over the last decay_fraction of steps)
    decay_fraction: float = 0.2        # wsd: share of steps spent decaying (Hägele et al. 2024: 0.2 matches cosine)
    warmup_steps: int | None = None    # None: 1% of steps, at least 1 (tiny runs need short warmups)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95                # GPT-NeoX / Polyglot-Ko value; 0.999 is less stable at scale
    eps: float = 1e-8
    grad_clip: float = 1.0


@dataclass
class BatchConfig:
    global_batch_tokens: int | None = None  # None: per size (GLOBAL_BATCH_TOKENS); must be a multiple of seq_len
    micro_batch: int | None = None     # max sequences per worker per forward; None: per size (MICRO_BATCH)


@dataclass
class DeepSpeedConfig:
    zero_stage: int | None = None      # 0-3; None: per size (ZERO_STAGE)
    precision: str = "auto"            # auto (bf16 on GPU, fp32 on CPU), bf16, fp32
    extra_json: str | None = None      # DeepSpeed JSON merged on top of the built config (--deepspeed-config FILE)


@dataclass
class CheckpointConfig:
    every_steps: int = 100             # save every N optimizer steps (and at the last step)
    keep: int = 2                      # checkpoints kept (a ZeRO checkpoint holds fp32 master + Adam: 16 B/param)
    resume_from: str | None = None     # a checkpoint dir (step_XXXXXX) to start from when the run has none yet
    allow_mismatch: bool = False       # resume even if the data manifest, seed or global batch differ from the checkpoint's
    reshard_timeout_s: int = 14400     # limit of a resharding conversion (another worker count or ZeRO stage), which
                                       # runs no collective, so fault.hang_timeout_s does not bound it; 12.8b: ~200 GB
    reshard_workers: int = 0           # ds_to_universal extract processes (merge: half); 0: the node's CPUs, at most 16


@dataclass
class FaultConfig:
    max_failures: int = 3              # worker-group restarts before the run fails (-1: unlimited)
    hang_timeout_s: int = 600          # a collective blocked this long raises; Ray Train restarts the group
    inject: str | None = None          # chaos testing, comma-separated KIND@STEP[:RANK], each fires once per run dir:
                                       # crash (raise), exit (kill the process), hang (block forever), spike (the
                                       # step's loss and gradients x1000: a corrupt batch), nan (a non-finite loss)


@dataclass
class ScalingConfig:
    num_workers: int | None = None     # fixed worker count (ignored when min/max_workers are set); None: one per GPU
                                       # of the cluster on GPUs (pretrain derives it), CPU_WORKERS on CPUs
    min_workers: int | None = None     # elastic: run on anything between min and max workers (max None: the
    max_workers: int | None = None     # cluster's GPUs); the memory plan must fit at min_workers
    use_gpu: bool | None = None        # train on GPUs (CUDA, NCCL, bf16); None: when the Ray cluster has GPU nodes
                                       # (ray.nodes() of the cluster, not the driver's devices)
    gpu_type: str | None = None        # GPU the memory plan assumes (polyko.plan.PEAK_TFLOPS key or Ray accelerator
                                       # type, e.g. a100-80gb, H100); None: the accelerator_type of the GPU nodes
    simulate_gpus: bool = False        # dry runs/tests on a polyko.simcluster cluster: workers reserve its simulated
                                       # GPUs but compute on CPU (gloo); refused on any other cluster
    cpus_per_worker: int = 1           # CPU threads per worker (torch.set_num_threads on CPU)

    @property
    def elastic(self) -> bool:
        return self.min_workers is not None or self.max_workers is not None

    def ray_num_workers(self) -> int | tuple[int, int]:
        n = self.num_workers if self.num_workers is not None else CPU_WORKERS
        if not self.elastic:
            return n
        lo = self.min_workers if self.min_workers is not None else 1
        hi = self.max_workers if self.max_workers is not None else max(lo, n)
        return (lo, hi)


CPU_WORKERS = 2  # default worker count of a CPU run (one CPU slot each)


@dataclass
class TrainEvalConfig:
    """Evaluation during training: held-out loss on the workers, KoBEST on each checkpoint beside them."""

    # Validation loss and bits per byte, overall and per source, every N optimizer steps and at the last step,
    # on the validation set `jobs/prepare_data.py` packs beside the tokens (0 = off; none packed = off).
    every_steps: int = 100
    # Validation rows per source (the same seeded subset every time; 0 = all). Cost: one forward per row,
    # split over the workers: 64 rows of 2,048 tokens of 1.3b ~ 1 s on 8 A100s.
    rows_per_source: int = 64
    # KoBEST on checkpoints, in its own Ray task (polyko.train.evaluator). enabled None: on when a KoBEST copy
    # is at hand (kobest_dir, $POLYKO_KOBEST_DIR, or the hub when online), else off with a note.
    kobest: CheckpointEvalConfig = field(default_factory=lambda: CheckpointEvalConfig(enabled=None))


@dataclass
class PretrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    fault: FaultConfig = field(default_factory=FaultConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)  # loss-spike / NaN guard (polyko.train.guard)
    eval: TrainEvalConfig = field(default_factory=TrainEvalConfig)
    steps: int = 1000                  # optimizer steps
    seed: int = 0                      # model init and data order
    output: str | None = None          # run directory; None: <work dir>/pretrain/<config hash>
    export: bool = True                # export the final checkpoint to HF format (<output>/hf)
    run_name: str | None = None        # MLflow/Ray run name; None: pretrain-<config hash>

    def resolved(self) -> "PretrainConfig":
        """A copy with every per-size default filled in, and checked (ValueError on bad values)."""
        from polyko.model import PRESETS

        size = self.model.size
        if size not in PRESETS:
            raise ValueError(f"unknown model size {size!r}; choose one of {list(PRESETS)}")
        gpu = self.scaling.use_gpu
        precision = self.deepspeed.precision
        if precision == "auto":
            precision = "bf16" if gpu else "fp32"
        if precision not in ("bf16", "fp32"):
            raise ValueError(f"deepspeed.precision must be auto, bf16 or fp32, got {precision!r}")
        stage = self.deepspeed.zero_stage
        if stage is None:  # bf16 without ZeRO would accumulate gradients in bf16 (below): stage 1 at least
            stage = max(ZERO_STAGE[size], 1 if precision == "bf16" else 0)
        if stage not in (0, 1, 2, 3):
            raise ValueError(f"deepspeed.zero_stage must be 0..3, got {stage}")
        if stage == 0 and precision == "bf16":
            # DeepSpeed runs bf16 without ZeRO through its fp16-style wrapper: gradients are accumulated and
            # all-reduced in bf16 (an fp32 grad_accum_dtype raises NotImplementedError there). Stage 1 gives
            # fp32 accumulation (BF16_Optimizer) at the same memory as stage 0 plus a sharded optimizer.
            raise ValueError("deepspeed.zero_stage=0 with bf16 would accumulate gradients in bf16; use zero_stage >= 1 "
                             "with bf16, or precision fp32 with zero_stage 0")
        from polyko.model import INITS

        if self.model.init not in INITS:
            raise ValueError(f"model.init must be one of {INITS}, got {self.model.init!r}")
        if self.deepspeed.extra_json:
            try:
                extra = json.loads(self.deepspeed.extra_json)
            except json.JSONDecodeError as e:
                raise ValueError(f"--deepspeed-config is not valid JSON: {e}") from None
            bad = [k for k in _DERIVED_KEYS if k in extra]
            if bad:
                raise ValueError(f"--deepspeed-config sets {bad}: the batch comes from batch.global_batch_tokens "
                                 "and batch.micro_batch (so it survives a worker-count change); set those instead")
        ac = self.model.activation_checkpointing
        if ac is None:
            ac = bool(gpu) and PRESETS[size].hidden_size >= 2048
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.checkpoint.every_steps < 1 or self.checkpoint.keep < 1:
            raise ValueError("checkpoint.every_steps and checkpoint.keep must be >= 1")
        if self.model.parametrization not in ("standard", "mup"):
            raise ValueError(f"model.parametrization must be standard or mup, got {self.model.parametrization!r}")
        if self.model.parametrization == "mup" and (self.model.init_from or stage == 3):
            raise ValueError("model.parametrization=mup initialises the model itself, fully materialised: it "
                             "cannot continue --init-from weights, and is not available at ZeRO-3 yet")
        if self.eval.every_steps < 0 or self.eval.rows_per_source < 0:
            raise ValueError(f"eval.every_steps and eval.rows_per_source must be >= 0, got {self.eval.every_steps}, "
                             f"{self.eval.rows_per_source}")
        parse_faults(self.fault.inject)
        sc = self.scaling
        if sc.elastic:
            lo, hi = sc.ray_num_workers()
            if not 1 <= lo <= hi:
                raise ValueError(f"need 1 <= min_workers <= max_workers, got {lo}, {hi}")
        elif sc.num_workers is not None and sc.num_workers < 1:
            raise ValueError(f"scaling.num_workers must be >= 1, got {sc.num_workers}")
        return replace(
            self,
            model=replace(self.model, activation_checkpointing=ac),
            optim=replace(self.optim, lr=self.optim.lr if self.optim.lr is not None else LEARNING_RATE[size],
                          warmup_steps=(self.optim.warmup_steps if self.optim.warmup_steps is not None
                                        else max(1, self.steps // 100))),
            batch=BatchConfig(
                global_batch_tokens=self.batch.global_batch_tokens or GLOBAL_BATCH_TOKENS[size],
                micro_batch=self.batch.micro_batch or MICRO_BATCH[size]),
            deepspeed=replace(self.deepspeed, zero_stage=stage, precision=precision),
        )


@dataclass(frozen=True)
class BatchLayout:
    """How one optimizer step's ``global_batch`` sequences are split over ``world_size`` workers.

    Worker ``r`` takes ``count(r)`` = ``G // w`` (+1 for the first ``G % w`` workers) consecutive
    positions (``polyko.train.data.worker_positions``) as ``grad_accum`` micro-batches of
    ``micro_sizes(r)`` (sizes differ by at most one; a 0 is run as a zero-weight padded micro-batch).
    Every worker runs the same ``grad_accum`` micro-steps, so DeepSpeed's per-micro-step and per-boundary
    collectives (ZeRO-2/3 reduce-scatter in backward, ZeRO-3 all-gathers in forward) match on every rank.

    Gradient: DeepSpeed divides each backward by ``grad_accum`` and averages the reduced gradient over
    the ``w`` ranks, so scaling micro-batch ``j``'s mean loss by :meth:`loss_scale` ``= n_j * w * acc / G``
    makes the step's gradient ``sum_samples grad(loss_i) / G``: the mean over the ``G`` sequences, the
    same at every worker count (up to float summation order).
    """
    global_batch: int   # sequences per optimizer step (all workers)
    world_size: int
    micro_batch: int    # largest micro-batch on any worker (sequences per forward/backward)
    grad_accum: int     # micro-batches per worker per step (equal on every worker)

    @property
    def even(self) -> bool:
        """Every micro-batch of every worker has ``micro_batch`` sequences (no weighting needed)."""
        return self.global_batch == self.micro_batch * self.grad_accum * self.world_size

    def count(self, rank: int) -> int:
        """Sequences worker ``rank`` takes per step."""
        g, w = self.global_batch, self.world_size
        return g // w + (1 if rank < g % w else 0)

    def micro_sizes(self, rank: int) -> list[int]:
        """Sizes of worker ``rank``'s ``grad_accum`` micro-batches (sum = ``count(rank)``)."""
        n, a = self.count(rank), self.grad_accum
        return [n // a + (1 if j < n % a else 0) for j in range(a)]

    def loss_scale(self, n: int) -> float:
        """Factor on a micro-batch's mean loss over ``n`` sequences (see the class docstring)."""
        return n * self.world_size * self.grad_accum / self.global_batch

    @classmethod
    def derive(cls, global_batch_tokens: int, seq_len: int, world_size: int, max_micro_batch: int) -> "BatchLayout":
        if global_batch_tokens % seq_len:
            raise ValueError(f"batch.global_batch_tokens={global_batch_tokens} is not a multiple of the data's "
                             f"seq_len={seq_len}")
        g = global_batch_tokens // seq_len
        if not 1 <= world_size <= g:
            raise ValueError(f"the global batch of {g} sequences ({global_batch_tokens} tokens) cannot be spread over "
                             f"{world_size} workers: every worker needs at least one sequence per step; use at most "
                             f"{g} workers or a larger batch.global_batch_tokens")
        if max_micro_batch < 1:
            raise ValueError(f"batch.micro_batch must be >= 1, got {max_micro_batch}")
        per = -(-g // world_size)                 # the busiest worker's sequences
        acc = -(-per // max_micro_batch)          # fewest micro-steps that keep every micro-batch <= max
        return cls(global_batch=g, world_size=world_size, micro_batch=-(-per // acc), grad_accum=acc)


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def deepspeed_config(cfg: PretrainConfig, layout: BatchLayout) -> dict[str, Any]:
    """The DeepSpeed JSON for a resolved config at a given worker count (user JSON merged last).

    DeepSpeed's batch keys must satisfy ``train_batch_size = micro * acc * world``; with an uneven split
    they describe the largest micro-batch (``train_batch_size`` >= the true ``G``) and only size buffers and
    throughput logs: the true per-sample weighting is the loop's (:meth:`BatchLayout.loss_scale`)."""
    ds: dict[str, Any] = {
        "train_batch_size": layout.micro_batch * layout.grad_accum * layout.world_size,
        "train_micro_batch_size_per_gpu": layout.micro_batch,
        "gradient_accumulation_steps": layout.grad_accum,
        "gradient_clipping": cfg.optim.grad_clip,
        # torch_adam: torch's AdamW (fused on GPU) instead of DeepSpeed's JIT-compiled FusedAdam: nothing
        # to compile on a CPU node, and bit-exact resume.
        "optimizer": {"type": "AdamW", "params": {
            "lr": cfg.optim.lr, "betas": [cfg.optim.beta1, cfg.optim.beta2], "eps": cfg.optim.eps,
            "weight_decay": cfg.optim.weight_decay, "torch_adam": True}},
        "zero_optimization": {"stage": cfg.deepspeed.zero_stage},
        "bf16": {"enabled": cfg.deepspeed.precision == "bf16"},
        "steps_per_print": 10**9,       # we log ourselves
        "wall_clock_breakdown": False,
    }
    if cfg.deepspeed.zero_stage >= 2:
        # Overlap/contiguous gradients help on GPUs; bucket sizes in elements (~200 MB fp32).
        ds["zero_optimization"].update({"overlap_comm": cfg.scaling.use_gpu, "contiguous_gradients": True,
                                        "reduce_bucket_size": 5e7, "allgather_bucket_size": 5e7})
    if cfg.deepspeed.extra_json:
        ds = _merge(ds, json.loads(cfg.deepspeed.extra_json))
    return ds


FAULT_KINDS = ("crash", "exit", "hang", "spike", "nan")


def parse_faults(spec: str | None) -> list[tuple[str, int, int]]:
    """``fault.inject`` as ``[(kind, step, rank)]`` (ValueError naming a malformed entry)."""
    out = []
    for item in (spec or "").split(","):
        item = item.strip()
        if not item:
            continue
        kind, at, where = item.partition("@")
        s, _, r = where.partition(":")
        if kind not in FAULT_KINDS or not at or not s.isdigit() or not (r.isdigit() or r == ""):
            raise ValueError(f"fault.inject: {item!r} is not KIND@STEP[:RANK] with KIND one of {FAULT_KINDS}")
        out.append((kind, int(s), int(r or 0)))
    return out


def lr_at(cfg: PretrainConfig, step: int) -> float:
    """Linear warmup to ``optim.lr`` then cosine (or WSD, ``optim.schedule``) to ``lr * min_lr_ratio`` at the
    last step. A pure function of the step: nothing to checkpoint, identical after any resume."""
    import math

    o = cfg.optim
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    if o.schedule == "wsd":
        # Warmup-stable-decay: the loss at any step of the stable phase is that of a run that could still be
        # decayed from there, so intermediate losses of different configs compare like final ones
        # (what a sweep's early stopping needs); decay is linear to lr * min_lr_ratio at the last step.
        if not 0.0 < o.decay_fraction <= 1.0:
            raise ValueError(f"optim.decay_fraction must be in (0, 1], got {o.decay_fraction}")
        decay_steps = max(1, round(cfg.steps * o.decay_fraction))
        decay_start = max(o.warmup_steps, cfg.steps - decay_steps)
        if step < decay_start:
            return o.lr
        t = min(1.0, (step - decay_start + 1) / max(1, cfg.steps - decay_start))
        return o.lr * (1.0 - (1.0 - o.min_lr_ratio) * t)
    if o.schedule != "cosine":
        raise ValueError(f"optim.schedule must be cosine or wsd, got {o.schedule!r}")
    span = max(1, cfg.steps - o.warmup_steps)
    t = min(1.0, (step - o.warmup_steps) / span)
    return o.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))
