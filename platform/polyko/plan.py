"""Capacity planning: FLOPs per token, MFU, and will this model fit on those GPUs, how fast, how long.

A plan answers, before anyone books a cluster: for a model size on ``gpus`` x ``gpu``, which DeepSpeed
ZeRO stage and micro-batch fit in memory, how many gradient-accumulation steps make the global
batch, what throughput a given MFU means, and how many days the Polyglot-Ko token budget takes.
Pure arithmetic (plus a meta-device parameter count): runs anywhere, no GPU needed.

    python -m polyko.plan --size 12.8b --gpus 256 --gpu a100-80gb
    python -m polyko.plan --size 1.3b --gpus 8 --gpu h100 --mfu 0.40

    >>> from polyko.plan import make_plan
    >>> print(make_plan("12.8b", gpus=256, gpu="a100-80gb").render())   # doctest: +SKIP

Conventions (all documented in the function docstrings):

* FLOPs: PaLM appendix B / Chinchilla convention, ``6 N + 12 L h s`` training FLOPs per token, N =
  parameters of all matrix multiplies incl. the output embedding (not the input embedding lookup,
  biases or layer norms). MFU uses these *model* FLOPs; activation recomputation makes the GPU do
  the layers' forward twice, ~``8 N + 16 L h s`` (*hardware* FLOPs, HFU), which is not useful work.
* Memory: ZeRO paper (Rajbhandari et al. 2020) mixed-precision model: 2 B bf16 weights + 2 B bf16
  gradients + 12 B fp32 master weights and Adam moments per parameter, sharded over the
  data-parallel GPUs per stage; activations after Korthikanti et al. 2022 ("Reducing activation
  recomputation in large transformer models") without the attention-score term (SDPA/flash
  attention never materialises the s x s matrix) and without dropout masks (GPT-NeoX/Polyglot-Ko
  trains without dropout); plus the fp32 logits of the loss, DeepSpeed's communication buckets, a
  fixed CUDA context/workspace allowance and a fragmentation margin.

Pure data parallelism + ZeRO (what ``polyko.train`` runs): no tensor or pipeline parallelism.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from pathlib import Path

from polyko.model import PRESETS, build_config, count_params

GIB = 1024**3

# Dense (no 2:4 sparsity) bf16 tensor-core peak, TFLOP/s per device, from NVIDIA's datasheets:
# A100 (SXM4 and PCIe, 40 and 80 GB): "BF16 Tensor Core 312 TFLOPS" (624 with sparsity).
# H100 SXM5: "BF16 Tensor Core 1,979 TFLOPS*" with *sparsity -> 989 dense. H100 PCIe: 1,513* -> 756.
# H100 NVL: 1,671* -> 835. H200 (SXM): 1,979* -> 989 (same compute die as H100 SXM).
PEAK_TFLOPS: dict[str, float] = {
    "a100-40gb": 312.0,
    "a100-80gb": 312.0,
    "h100": 989.0,
    "h100-pcie": 756.0,
    "h100-nvl": 835.0,
    "h200": 989.0,
}

# Device memory in GiB as the CUDA runtime reports it (torch.cuda.get_device_properties().total_memory,
# what an allocator can actually hand out), not the marketing "GB": e.g. an "80GB" A100 reports 79.2 GiB.
GPU_MEMORY_GIB: dict[str, float] = {
    "a100-40gb": 39.4,
    "a100-80gb": 79.2,
    "h100": 79.1,
    "h100-pcie": 79.1,
    "h100-nvl": 93.1,
    "h200": 139.8,
}

# Polyglot-Ko's training budgets, from the model cards ("trained for T tokens over S steps on 256
# A100 GPUs"): 1.3b 213B / 102,000 steps (shared/data/reference/polyglot-ko-1.3b.model_card.md),
# 3.8b 219B / 105,000, 5.8b 172B / 320,000, 12.8b 167B / 301,000 (HF model cards; the 12.8b
# config.json also says num_steps global_step301000).
PAPER_TOKENS: dict[str, float] = {"1.3b": 213e9, "3.8b": 219e9, "5.8b": 172e9, "12.8b": 167e9}
PAPER_GPUS = 256  # all four sizes: 256 x A100 (model cards)

# Global batch in sequences of 2,048 tokens. The cards give tokens and steps only, so the batch is
# tokens / steps rounded to the nearest power of two in sequences (GPT-NeoX configs use such batches):
# 1.3b 213e9/102,000 = 2.09M tokens -> 1024 x 2048 = 2,097,152 (x 102,000 steps = 213.9B, matches);
# 3.8b 219e9/105,000 = 2.09M -> 1024 seqs (220.2B); 5.8b 172e9/320,000 = 537,500 -> 256 seqs = 524,288
# (167.8B); 12.8b 167e9/301,000 = 554,817 -> 256 seqs (157.8B: the card's 167B is ~6% more than
# 256 x 2048 x 301,000, so the 12.8b batch was probably ~272 sequences part of the time; we keep 256).
PAPER_BATCH_SEQS: dict[str, int] = {"1.3b": 1024, "3.8b": 1024, "5.8b": 256, "12.8b": 256}
DEFAULT_BATCH_TOKENS = 524_288  # sizes the paper did not train (tiny, 50m): 0.5M tokens
CHINCHILLA_TOKENS_PER_PARAM = 20  # token budget for sizes without a paper figure (Hoffmann et al. 2022)

# Memory accounting constants (bytes unless noted), see the module docstring.
WEIGHT_BYTES, GRAD_BYTES, OPTIM_BYTES = 2, 2, 12  # bf16 weights, bf16 grads, fp32 master + Adam m + v
LOGIT_BYTES = 12  # per logit element: bf16 logits 2 + fp32 upcast 4 + fp32 log-softmax saved 4 + grad ~2
# DeepSpeed default reduce_bucket_size / allgather_bucket_size (ZeRO-1/2) and prefetch + live
# parameters (ZeRO-3) are 5e8 elements each; two 16-bit buckets in flight ~ 1.9 GiB.
COMM_BUCKET_ELEMENTS = 2 * 500_000_000
CONTEXT_GIB = 2.0  # CUDA context (~0.5-1 GiB) + cuBLAS/NCCL workspaces, per process
FRAGMENTATION = 1.10  # PyTorch caching-allocator fragmentation margin on everything else
MAX_MICRO_BATCH = 64


def detect_accelerator() -> tuple[str, float | None]:
    """``(name, dense bf16 peak TFLOP/s)`` of CUDA device 0: a :data:`PEAK_TFLOPS` key when known,
    else the lower-cased device name and ``None``; ``("cpu", None)`` without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return "cpu", None
    raw = torch.cuda.get_device_name(0)
    mem_gib = torch.cuda.get_device_properties(0).total_memory / GIB
    key = gpu_key(raw, mem_gib)
    return (key, PEAK_TFLOPS[key]) if key else (raw.lower(), None)


def gpu_key(device_name: str, memory_gib: float | None = None) -> str | None:
    """Map a CUDA device name ("NVIDIA A100-SXM4-80GB", "NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe",
    "NVIDIA H200") to a :data:`PEAK_TFLOPS` key; ``None`` if we do not know its peak."""
    n = device_name.upper()
    if "H200" in n:  # also GH200
        return "h200"
    if "H100" in n:
        if "PCIE" in n:
            return "h100-pcie"
        if "NVL" in n:
            return "h100-nvl"
        return "h100"
    if "A100" in n:
        if "80G" in n or (memory_gib is not None and memory_gib > 48):
            return "a100-80gb"
        return "a100-40gb"
    return None


def _shape(model_config):
    """(layers, hidden, ffn, vocab) of a GPT-NeoX config."""
    return (model_config.num_hidden_layers, model_config.hidden_size, model_config.intermediate_size,
            model_config.vocab_size)


def matmul_params(model_config) -> int:
    """N of the FLOPs formula: weights of every matrix multiply, incl. the output embedding.

    Per layer: fused QKV ``3h^2`` + attention output ``h^2`` + MLP ``2 h ffn``; plus ``embed_out``
    ``V h``. Excluded (no multiply-adds per token that scale with them): the input embedding (a
    lookup), biases and layer norms (~0.1% of parameters). With untied embeddings (all Polyglot-Ko
    sizes) this is ``count_params - V h - small``."""
    layers, h, ffn, vocab = _shape(model_config)
    return layers * (4 * h * h + 2 * h * ffn) + vocab * h


def flops_per_token(model_config, seq_len: int, *, recompute: bool = False) -> float:
    """Training FLOPs per token (forward + backward), PaLM/Chinchilla convention.

    ``6 N + 12 L h s``: a multiply-add is 2 FLOPs; the forward pass costs ``2 N`` per token and the
    backward twice that (gradients w.r.t. inputs and weights) -> ``6 N``. Attention scores ``Q K^T``
    and ``softmax(.) V`` cost ``2 * 2 s h`` per token per layer forward -> ``12 L h s`` training,
    counted over the full s x s matrix even though causal attention needs half of it (the
    convention; flash attention skips the masked blocks, which is part of why it is fast).
    ``recompute=True`` adds the forward pass of the transformer layers again (full activation
    checkpointing per layer, as ``gradient_checkpointing_enable()`` / DeepSpeed do; the output
    embedding is not recomputed): ``8 N_layers + 6 V h + 16 L h s``, the *hardware* FLOPs
    (Narayanan et al. 2021, eq. 3). MFU is defined with ``recompute=False`` (model FLOPs)."""
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    layers, h, _, vocab = _shape(model_config)
    forward = 2 * matmul_params(model_config) + 4 * layers * h * seq_len
    layers_forward = forward - 2 * vocab * h
    return 3 * forward + (layers_forward if recompute else 0)


def tflops(tokens_per_s: float, flops_per_token: float, n_devices: int = 1) -> float:
    """Achieved TFLOP/s per device."""
    return tokens_per_s * flops_per_token / n_devices / 1e12


def mfu(tokens_per_s: float, flops_per_token: float, n_devices: int, peak_tflops: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over ``n_devices * peak`` (a fraction, 0..1).
    Pass :func:`flops_per_token` with ``recompute=False`` for MFU, ``True`` for HFU."""
    if peak_tflops is None or peak_tflops <= 0:
        raise ValueError(f"peak_tflops must be a positive number, got {peak_tflops!r}")
    return tflops(tokens_per_s, flops_per_token, n_devices) / peak_tflops


@dataclass
class Memory:
    """Per-GPU memory of one ZeRO stage at one micro-batch, in GiB."""

    weights: float
    grads: float
    optimizer: float
    activations: float  # layer activations (checkpointed inputs + one recomputed layer, or all)
    logits: float  # the loss's logits (bf16 + fp32 copies)
    buffers: float  # DeepSpeed communication buckets
    context: float = CONTEXT_GIB

    @property
    def total(self) -> float:
        states = self.weights + self.grads + self.optimizer + self.activations + self.logits + self.buffers
        return states * FRAGMENTATION + self.context


def memory_per_gpu(model_config, params: int, *, stage: int, gpus: int, micro_batch: int, seq_len: int,
                   activation_checkpointing: bool = True) -> Memory:
    """Per-GPU memory estimate for ZeRO ``stage`` over ``gpus`` data-parallel ranks.

    Stage 0 replicates everything (16 B/param); stage 1 shards the 12 B optimizer state; stage 2 also
    the 2 B gradients; stage 3 also the 2 B weights (gathered one layer at a time, in the buffers).
    Activations in 16-bit per layer per token: ``16 h + 4 ffn`` bytes (QKV/attn-out/MLP inputs,
    Q, K, V, attention output, GELU in/out, two layer norms; no s x s scores, no dropout masks).
    Checkpointing keeps only each layer's 2 h input plus one layer's full activations in backward."""
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"zero stage must be 0, 1, 2 or 3, got {stage}")
    layers, h, ffn, vocab = _shape(model_config)
    p = float(params)
    weights = WEIGHT_BYTES * p / (gpus if stage >= 3 else 1)
    grads = GRAD_BYTES * p / (gpus if stage >= 2 else 1)
    optim = OPTIM_BYTES * p / (gpus if stage >= 1 else 1)
    tokens = micro_batch * seq_len
    per_layer = tokens * (16 * h + 4 * ffn)
    acts = (layers * 2 * h * tokens + per_layer) if activation_checkpointing else layers * per_layer
    logits = tokens * vocab * LOGIT_BYTES
    buffers = 2 * min(COMM_BUCKET_ELEMENTS, 2 * p)  # 16-bit buckets, never more than the model
    return Memory(weights / GIB, grads / GIB, optim / GIB, acts / GIB, logits / GIB, buffers / GIB)


@dataclass
class Plan:
    """A training plan for ``size`` on ``gpus`` x ``gpu``. ``fits`` is False when no ZeRO stage fits
    even at micro-batch 1 (or the requested stage/micro-batch does not); :func:`check_fits` raises."""

    size: str
    gpu: str
    gpus: int
    seq_len: int
    params: int
    matmul_params: int
    flops_per_token: float  # model FLOPs (MFU); hardware FLOPs are in hardware_flops_per_token
    hardware_flops_per_token: float
    peak_tflops: float
    gpu_memory_gib: float
    global_batch_seqs: int
    global_batch_tokens: int
    zero_stage: int
    micro_batch: int
    grad_accum: int
    activation_checkpointing: bool
    memory: dict[int, Memory]  # by ZeRO stage, at the chosen micro-batch
    fits: bool
    mfu: float
    tokens_per_s: float
    tokens: float
    steps: int
    days: float
    notes: list[str] = field(default_factory=list)

    @property
    def memory_gib(self) -> dict[int, float]:
        """Total per-GPU GiB by ZeRO stage at the chosen micro-batch."""
        return {s: m.total for s, m in self.memory.items()}

    @property
    def gpu_hours(self) -> float:
        return self.days * 24 * self.gpus

    def render(self, ladder: str | Path | None = None) -> str:
        """A readable table (what ``jobs/pretrain.py --plan`` and ``python -m polyko.plan`` print); with
        ``ladder`` (a ``ladder.json`` of ``python jobs/sweep.py --ladder``) the scaling law's predicted final
        loss at this plan's token budget is printed beside its time."""
        mem = self.memory
        chosen = mem[self.zero_stage]
        lines = [
            f"polyko plan: {self.size} on {self.gpus} x {self.gpu} "
            f"({self.peak_tflops:g} TFLOP/s bf16 peak, {self.gpu_memory_gib:g} GiB each)",
            f"  {'parameters':<26}{self.params:,} ({self.matmul_params:,} in matmuls)",
            f"  {'FLOPs / token (train)':<26}{self.flops_per_token / 1e9:.2f} GFLOP model "
            f"(6N + 12Lhs), {self.hardware_flops_per_token / 1e9:.2f} GFLOP hardware",
            f"  {'sequence length':<26}{self.seq_len:,}",
            f"  {'global batch':<26}{self.global_batch_seqs:,} seqs = {self.global_batch_tokens:,} tokens"
            f" = micro-batch {self.micro_batch} x {self.gpus} GPUs x {self.grad_accum} accumulation",
            f"  {'ZeRO stage':<26}{self.zero_stage}" + ("" if self.fits else "  (DOES NOT FIT)"),
            f"  {'activation checkpointing':<26}{'on' if self.activation_checkpointing else 'off'}",
            "",
            f"  memory per GPU (GiB)      {'stage 0':>9}{'stage 1':>9}{'stage 2':>9}{'stage 3':>9}",
        ]
        rows = [("weights (bf16)", "weights"), ("gradients (bf16)", "grads"),
                ("fp32 master + Adam", "optimizer"), ("activations", "activations"),
                ("logits (loss)", "logits"), ("comm buckets", "buffers"), ("CUDA context", "context")]
        for label, attr in rows:
            lines.append(f"    {label:<24}" + "".join(f"{getattr(mem[s], attr):9.1f}" for s in range(4)))
        lines.append(f"    {'total (+10% fragm.)':<24}" + "".join(f"{mem[s].total:9.1f}" for s in range(4)))
        lines.append(f"    {'fits in ' + format(self.gpu_memory_gib, 'g') + ' GiB':<24}"
                     + "".join(f"{'yes' if mem[s].total <= self.gpu_memory_gib else 'no':>9}" for s in range(4)))
        lines += [
            "",
            f"  {'chosen: per GPU':<26}{chosen.total:.1f} of {self.gpu_memory_gib:g} GiB",
            f"  {'at MFU':<26}{self.mfu:.0%}: {self.tokens_per_s:,.0f} tokens/s "
            f"({self.tokens_per_s / self.gpus:,.0f} per GPU, {self.mfu * self.peak_tflops:.0f} TFLOP/s per GPU)",
            f"  {'token budget':<26}{self.tokens / 1e9:,.1f}B tokens = {self.steps:,} steps",
            f"  {'time':<26}{self.days:,.1f} days ({self.gpu_hours:,.0f} GPU-hours)",
        ]
        if ladder is not None:
            from polyko.sweep.ladder import predicted_loss_line

            lines.append(predicted_loss_line(self.size, ladder, self.tokens))
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _largest_micro_batch(fits_at, per_gpu: int) -> int:
    """Largest power of two that divides ``per_gpu`` and fits (``fits_at(mb) -> bool``); 0 if none.
    Memory grows with the micro-batch, so the search stops at the first that does not fit."""
    best, mb = 0, 1
    while mb <= min(per_gpu, MAX_MICRO_BATCH) and fits_at(mb):
        if per_gpu % mb == 0:
            best = mb
        mb *= 2
    return best


def make_plan(size: str, *, gpus: int, gpu: str, seq_len: int = 2048, global_batch_tokens: int | None = None,
              zero_stage: int | None = None, micro_batch: int | None = None, mfu: float = 0.45,
              tokens: float | None = None, activation_checkpointing: bool = True,
              stages: tuple[int, ...] = (0, 1, 2, 3)) -> Plan:
    """Plan ``size`` (a :data:`polyko.model.PRESETS` key) on ``gpus`` x ``gpu`` (a :data:`PEAK_TFLOPS` key).

    ``global_batch_tokens``: default Polyglot-Ko's batch for that size (:data:`PAPER_BATCH_SEQS`
    x 2,048), else 0.5M; rounded to whole sequences and to a multiple of ``gpus`` (noted).
    ``zero_stage``: default the lowest stage that fits at micro-batch 1 (lower stages communicate
    less or equal: 0-2 all-reduce-equivalent volume, 3 adds 50%). ``micro_batch``: default the largest
    power of two that fits at that stage and divides the per-GPU sequences. ``mfu``: the assumed
    model FLOPs utilisation for the throughput/time estimate. ``tokens``: default the paper's
    budget for that size (:data:`PAPER_TOKENS`), else 20 tokens/parameter (Chinchilla). ``stages``: the
    stages the automatic choice may take (a bf16 run needs >= 1: DeepSpeed's stage 0 accumulates bf16 grads).

    A ``global_batch_tokens`` given explicitly is kept exactly, also when ``gpus`` does not divide it (what the
    trainer's ``BatchLayout`` does: the busiest GPU takes ``ceil(seqs / gpus)``, which the memory is planned
    for); only the paper default is rounded to a multiple of ``gpus``."""
    if gpu not in PEAK_TFLOPS:
        raise ValueError(f"unknown gpu {gpu!r}; known: {', '.join(PEAK_TFLOPS)}")
    if size not in PRESETS:
        raise ValueError(f"unknown model size {size!r}; choose one of {list(PRESETS)}")
    if not isinstance(gpus, int) or gpus < 1:
        raise ValueError(f"gpus must be a positive integer, got {gpus!r}")
    if seq_len < 1:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    if not 0 < mfu <= 1:
        raise ValueError(f"mfu is a fraction in (0, 1], got {mfu}")
    if zero_stage is not None and zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {zero_stage}")
    if micro_batch is not None and micro_batch < 1:
        raise ValueError(f"micro_batch must be positive, got {micro_batch}")

    notes: list[str] = []
    config = build_config(size, max_position_embeddings=max(seq_len, PRESETS[size].max_position_embeddings))
    params = count_params(config)
    fpt = flops_per_token(config, seq_len)
    hw_fpt = flops_per_token(config, seq_len, recompute=activation_checkpointing)

    exact = global_batch_tokens is not None
    if global_batch_tokens is None:
        global_batch_tokens = PAPER_BATCH_SEQS[size] * 2048 if size in PAPER_BATCH_SEQS else DEFAULT_BATCH_TOKENS
    if global_batch_tokens < seq_len:
        raise ValueError(f"global_batch_tokens {global_batch_tokens:,} is less than one sequence of {seq_len}")
    seqs = global_batch_tokens // seq_len
    if exact and seqs % gpus:
        if gpus > seqs:
            raise ValueError(f"the global batch of {seqs} sequences cannot be spread over {gpus} GPUs")
        per_gpu = -(-seqs // gpus)
        notes.append(f"global batch {seqs} seqs over {gpus} GPUs: {seqs // gpus} or {per_gpu} per GPU "
                     f"(memory planned for {per_gpu})")
    else:
        per_gpu = max(1, round(seqs / gpus))
        if per_gpu * gpus != seqs:
            notes.append(f"global batch {seqs} seqs is not a multiple of {gpus} GPUs: using {per_gpu * gpus}")
        seqs = per_gpu * gpus

    def mem(stage: int, mb: int) -> Memory:
        return memory_per_gpu(config, params, stage=stage, gpus=gpus, micro_batch=mb, seq_len=seq_len,
                              activation_checkpointing=activation_checkpointing)

    capacity = GPU_MEMORY_GIB[gpu]

    def fits_at(stage: int, mb: int) -> bool:
        return mem(stage, mb).total <= capacity

    first_mb = micro_batch or 1
    stage = zero_stage
    if stage is None:
        stage = next((s for s in stages if fits_at(s, first_mb)), max(stages))
    if micro_batch is None:
        mb = _largest_micro_batch(lambda m: fits_at(stage, m), per_gpu) or 1
    else:
        # The largest micro-batch, as the trainer's BatchLayout takes it: ceil(per_gpu / mb) micro-steps of at
        # most mb sequences (sizes differing by one when mb does not divide per_gpu); memory is planned at mb.
        mb = min(micro_batch, per_gpu)
    fits = fits_at(stage, mb)
    if not fits:
        notes.append(f"does not fit: ZeRO-{stage} at micro-batch {mb} needs {mem(stage, mb).total:.1f} GiB "
                     f"per GPU, a {gpu} has {capacity:g} GiB; add GPUs or use a bigger GPU")
    if gpus == 1 and stage in (1, 2, 3):
        notes.append("one GPU: ZeRO shards nothing (stages 0-3 need the same memory)")

    if tokens is None:
        if size in PAPER_TOKENS:
            tokens = PAPER_TOKENS[size]
        else:
            tokens = CHINCHILLA_TOKENS_PER_PARAM * params
            notes.append(f"no paper token budget for {size}: using 20 tokens/param (Chinchilla)")
    peak = PEAK_TFLOPS[gpu]
    tps = mfu * peak * 1e12 * gpus / fpt
    return Plan(
        size=size, gpu=gpu, gpus=gpus, seq_len=seq_len, params=params, matmul_params=matmul_params(config),
        flops_per_token=fpt, hardware_flops_per_token=hw_fpt, peak_tflops=peak, gpu_memory_gib=capacity,
        global_batch_seqs=seqs, global_batch_tokens=seqs * seq_len, zero_stage=stage, micro_batch=mb,
        grad_accum=max(1, -(-per_gpu // mb)), activation_checkpointing=activation_checkpointing,
        memory={s: mem(s, mb) for s in range(4)}, fits=fits, mfu=mfu, tokens_per_s=tps, tokens=float(tokens),
        steps=math.ceil(tokens / (seqs * seq_len)), days=tokens / tps / 86400, notes=notes,
    )


# CPU workers train in fp32 (gloo): 4 B weights + 4 B gradients + 8 B Adam moments per parameter; at ZeRO >= 1
# DeepSpeed's optimizer also keeps an fp32 copy of its partition of the weights (4 B), sharded like the moments.
CPU_PROCESS_GIB = 1.0        # interpreter + torch + DeepSpeed + Ray worker per process (~0.6 GB imports, ~1 GB tiny run)
CPU_BUCKET_ELEMENTS = 2 * 50_000_000  # the reduce/allgather buckets polyko configures at ZeRO >= 2 (5e7 each), fp32


@dataclass
class CpuPlan:
    """Host-RAM plan of a CPU run: per-worker memory by ZeRO stage and the cheapest stage that fits."""

    size: str
    workers: int
    params: int
    host_memory_gib: float       # RAM available to one worker (its node's Ray memory / workers on the node)
    zero_stage: int
    micro_batch: int
    memory_gib: dict[int, float]  # per worker, by ZeRO stage
    fits: bool
    notes: list[str] = field(default_factory=list)

    def render(self) -> str:
        lines = [f"polyko CPU plan: {self.size} ({self.params:,} parameters) on {self.workers} CPU workers, fp32, "
                 f"{self.host_memory_gib:.1f} GiB host RAM per worker",
                 f"  {'ZeRO stage':<26}{self.zero_stage}" + ("" if self.fits else "  (DOES NOT FIT)"),
                 f"  {'micro-batch':<26}{self.micro_batch}",
                 f"  memory per worker (GiB)   {'stage 0':>9}{'stage 1':>9}{'stage 2':>9}{'stage 3':>9}",
                 f"    {'total':<24}" + "".join(f"{self.memory_gib[s]:9.2f}" for s in range(4))]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def cpu_memory_gib(model_config, params: int, *, stage: int, workers: int, micro_batch: int, seq_len: int) -> float:
    """Per-worker host RAM of fp32 CPU training at ZeRO ``stage`` over ``workers`` ranks (no activation
    checkpointing: CPU runs keep it off), in GiB. Same activation model as :func:`memory_per_gpu`, in 4-byte floats."""
    layers, h, ffn, vocab = _shape(model_config)
    p, w = float(params), workers
    weights = 4 * p / (w if stage >= 3 else 1)
    grads = 4 * p / (w if stage >= 2 else 1)
    optim = (8 + (4 if stage >= 1 else 0)) * p / (w if stage >= 1 else 1)
    tokens = micro_batch * seq_len
    acts = layers * tokens * (16 * h + 4 * ffn) * 2
    logits = tokens * vocab * LOGIT_BYTES
    buffers = 4 * min(CPU_BUCKET_ELEMENTS, 2 * p) if stage >= 2 else 0
    return (weights + grads + optim + acts + logits + buffers) / GIB + CPU_PROCESS_GIB


def make_cpu_plan(size: str, *, workers: int, host_memory_gib: float, seq_len: int, micro_batch: int,
                  zero_stage: int | None = None) -> CpuPlan:
    """The cheapest ZeRO stage whose per-worker memory fits ``host_memory_gib`` (``zero_stage`` given: that one,
    checked). Every stage above 0 costs communication on a CPU too (ZeRO-2 +17% per step for tiny, +48% for
    50m over plain data parallelism, benchmarks/train_step.py), so stage 0 wins whenever it fits."""
    if size not in PRESETS:
        raise ValueError(f"unknown model size {size!r}; choose one of {list(PRESETS)}")
    config = build_config(size, max_position_embeddings=max(seq_len, PRESETS[size].max_position_embeddings))
    params = count_params(config)
    mem = {s: cpu_memory_gib(config, params, stage=s, workers=workers, micro_batch=micro_batch, seq_len=seq_len)
           for s in range(4)}
    stage = zero_stage if zero_stage is not None else next((s for s in range(4) if mem[s] <= host_memory_gib), 3)
    fits = mem[stage] <= host_memory_gib
    notes = [] if fits else [f"does not fit: ZeRO-{stage} needs {mem[stage]:.1f} GiB per worker, "
                             f"{host_memory_gib:.1f} GiB available"]
    return CpuPlan(size=size, workers=workers, params=params, host_memory_gib=host_memory_gib, zero_stage=stage,
                   micro_batch=micro_batch, memory_gib=mem, fits=fits, notes=notes)


def check_fits(plan: Plan) -> Plan:
    """Return ``plan`` if it fits, else raise ``ValueError`` with the rendered plan."""
    if not plan.fits:
        raise ValueError(f"{plan.size} does not fit on {plan.gpus} x {plan.gpu} "
                         f"(ZeRO-{plan.zero_stage}, micro-batch {plan.micro_batch})\n" + plan.render())
    return plan


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m polyko.plan", description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", required=True, choices=list(PRESETS))
    ap.add_argument("--gpus", type=int, required=True)
    ap.add_argument("--gpu", required=True, help=f"one of {', '.join(PEAK_TFLOPS)}")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--global-batch-tokens", type=int, default=None)
    ap.add_argument("--zero-stage", type=int, default=None)
    ap.add_argument("--micro-batch", type=int, default=None)
    ap.add_argument("--mfu", type=float, default=0.45)
    ap.add_argument("--tokens", type=float, default=None, help="token budget (default: the paper's)")
    ap.add_argument("--no-activation-checkpointing", action="store_true")
    ap.add_argument("--ladder", help="ladder.json of a scaling-law ladder: print the predicted final loss")
    a = ap.parse_args(argv)
    plan = make_plan(a.size, gpus=a.gpus, gpu=a.gpu, seq_len=a.seq_len, global_batch_tokens=a.global_batch_tokens,
                     zero_stage=a.zero_stage, micro_batch=a.micro_batch, mfu=a.mfu, tokens=a.tokens,
                     activation_checkpointing=not a.no_activation_checkpointing)
    try:
        print(plan.render(ladder=a.ladder))
    except ValueError as e:
        ap.error(str(e))
    return 0 if plan.fits else 1


if __name__ == "__main__":
    raise SystemExit(main())
