"""GPT-NeoX model sizes: named presets with the exact Polyglot-Ko shapes.

The four released sizes copy ``EleutherAI/polyglot-ko-*`` config.json (see
``shared/data/reference/polyglot-ko-configs``): vocabulary 30,080 (30,003 tokens padded to a
multiple of 128), context 2,048, parallel residual, untied input/output embeddings, rotary on half
of each head (a quarter for 5.8b). Their parameter counts equal the released checkpoints'
(``RELEASED_PARAMS``). ``tiny`` and ``50m`` are for CPUs: ``tiny`` trains in seconds.

    >>> from polyko.model import build_config, count_params
    >>> count_params(build_config("1.3b"))
    1331810304
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelShape:
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    rotary_pct: float = 0.5
    max_position_embeddings: int = 2048
    vocab_size: int = 30080


PRESETS: dict[str, ModelShape] = {
    # ~4M params, nearly all in the two 30,080-row embeddings; a step takes tens of ms on a CPU.
    "tiny": ModelShape(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=256, max_position_embeddings=512),
    # ~56M params: the CPU benchmark's "real" model.
    "50m": ModelShape(hidden_size=512, num_layers=8, num_heads=8, intermediate_size=2048),
    "1.3b": ModelShape(hidden_size=2048, num_layers=24, num_heads=16, intermediate_size=8192),
    "3.8b": ModelShape(hidden_size=3072, num_layers=32, num_heads=24, intermediate_size=12288),
    "5.8b": ModelShape(hidden_size=4096, num_layers=28, num_heads=16, intermediate_size=16384, rotary_pct=0.25),
    "12.8b": ModelShape(hidden_size=5120, num_layers=40, num_heads=40, intermediate_size=20480),
}

# Parameter counts of the released EleutherAI/polyglot-ko checkpoints.
RELEASED_PARAMS = {"1.3b": 1_331_810_304, "3.8b": 3_809_974_272, "5.8b": 5_885_059_072, "12.8b": 12_898_631_680}

# Polyglot-Ko token ids (shared/data/reference/polyglot-ko-tokenizer); our tokenizers keep them.
PAD_ID, EOS_ID, ENDOFTEXT_ID, SEP_ID = 0, 1, 2, 3


def padded_vocab(n_tokens: int, multiple: int = 128) -> int:
    """Embedding rows for a tokenizer of ``n_tokens`` ids (multiple of 128 for fast matmuls)."""
    return -(-n_tokens // multiple) * multiple


def build_config(size: str, vocab_size: int | None = None, max_position_embeddings: int | None = None):
    """A ``transformers.GPTNeoXConfig`` for a preset. ``vocab_size`` overrides the preset's (use
    :func:`padded_vocab` of your tokenizer's size); unknown sizes are a ``ValueError``."""
    from transformers import GPTNeoXConfig

    if size not in PRESETS:
        raise ValueError(f"unknown model size {size!r}; choose one of {list(PRESETS)}")
    s = PRESETS[size]
    return GPTNeoXConfig(
        vocab_size=vocab_size or s.vocab_size,
        hidden_size=s.hidden_size,
        num_hidden_layers=s.num_layers,
        num_attention_heads=s.num_heads,
        intermediate_size=s.intermediate_size,
        hidden_act="gelu",
        rotary_pct=s.rotary_pct,
        rotary_emb_base=10000,
        max_position_embeddings=max_position_embeddings or s.max_position_embeddings,
        initializer_range=0.02,
        layer_norm_eps=1e-5,
        use_parallel_residual=True,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=ENDOFTEXT_ID,
        pad_token_id=PAD_ID,
        use_cache=True,
    )


def count_params(config) -> int:
    """Parameters of a GPT-NeoX config, counted on the meta device (allocates nothing)."""
    import torch
    from transformers import GPTNeoXForCausalLM

    with torch.device("meta"):
        model = GPTNeoXForCausalLM(config)
    return sum(p.numel() for p in model.parameters())


# --- initialisation --------------------------------------------------------------------------------
# "neox" (default) is GPT-NeoX's, as Polyglot-Ko's NeoX configs set it (``"init_method": "small_init"``,
# ``"output_layer_init_method": "wang_init"``; EleutherAI/gpt-neox megatron/model/init_functions.py):
#   small_init  N(0, sqrt(2 / (5 d)))      Nguyen & Salazar 2019, "Transformers without Tears": the input
#               embedding, QKV, MLP up-projection and the output embedding (GPT-NeoX's final linear)
#   wang_init   N(0, 2 / (L sqrt(d)))      Wang 2021 (Mesh-Transformer-JAX): the two projections that write
#               into the residual stream, attention ``dense`` and ``mlp.dense_4h_to_h``
#   biases 0, LayerNorm weight 1 / bias 0 (GPT-NeoX and torch's defaults).
# "hf" is transformers' ``GPTNeoXPreTrainedModel._init_weights``: N(0, initializer_range=0.02) for every
# Linear/Embedding weight, biases 0, LayerNorm 1 / 0.
INITS = ("neox", "hf")
_RESIDUAL_OUT = ("attention.dense", "mlp.dense_4h_to_h")
# Values are drawn per chunk of this many elements from a generator seeded by (seed, parameter name, chunk):
# any rank can draw exactly the elements of its ZeRO-3 partition, and every partitioning gives the same model.
INIT_CHUNK = 1 << 18


def init_spec(name: str, module, config, init: str = "neox") -> tuple[str, float]:
    """``("normal", std)``, ``("ones", 1)`` or ``("zeros", 0)`` for parameter ``name`` (its last component)
    of ``module`` (the module that owns it)."""
    import math

    import torch

    if init not in INITS:
        raise ValueError(f"model.init must be one of {INITS}, got {init!r}")
    leaf = name.rsplit(".", 1)[-1]
    if isinstance(module, torch.nn.LayerNorm):
        return ("ones", 1.0) if leaf == "weight" else ("zeros", 0.0)
    if leaf == "bias":
        return "zeros", 0.0
    if init == "hf":
        return "normal", float(config.initializer_range)
    d, layers = config.hidden_size, config.num_hidden_layers
    owner = name.rsplit(".", 1)[0]
    if owner.endswith(_RESIDUAL_OUT):
        return "normal", 2.0 / (layers * math.sqrt(d))       # wang_init
    return "normal", math.sqrt(2.0 / (5.0 * d))               # small_init


def _chunk_seed(seed: int, name: str, chunk: int) -> int:
    import hashlib

    h = hashlib.sha256(f"polyko-init:{seed}:{name}:{chunk}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def _fill(dst, name: str, kind: str, std: float, start: int, end: int, numel: int, seed: int) -> None:
    """Write flat elements ``[start, end)`` of parameter ``name`` (``numel`` elements in all) into the flat
    tensor ``dst``. Chunk ``c`` covers ``[c * INIT_CHUNK, min((c + 1) * INIT_CHUNK, numel))`` and is drawn
    whole from its own generator, so a slice's values never depend on where the slice starts; chunks inside
    ``[start, end)`` are drawn straight into ``dst`` when it is CPU fp32 (no extra memory), others through
    one chunk-sized buffer."""
    import torch

    with torch.no_grad():
        if kind != "normal":
            dst.fill_(1.0 if kind == "ones" else 0.0)
            return
        direct = dst.dtype == torch.float32 and dst.device.type == "cpu"
        for c in range(start // INIT_CHUNK, -(-end // INIT_CHUNK)):
            lo, hi = c * INIT_CHUNK, min((c + 1) * INIT_CHUNK, numel)
            g = torch.Generator().manual_seed(_chunk_seed(seed, name, c))
            a, b = max(lo, start), min(hi, end)
            if direct and (a, b) == (lo, hi):
                dst[lo - start:hi - start].normal_(0.0, std, generator=g)
            else:
                vals = torch.empty(hi - lo).normal_(0.0, std, generator=g)
                dst[a - start:b - start].copy_(vals[a - lo:b - lo])


def initialize(model, init: str = "neox", seed: int = 0) -> None:
    """(Re)initialise every parameter of ``model`` in place, and its rotary buffers. Works on a plain
    model and on one built under ``deepspeed.zero.Init`` (each rank writes only its partition)."""
    import torch

    config = model.config
    for mod_name, module in model.named_modules():
        for leaf, p in module.named_parameters(recurse=False):
            name = f"{mod_name}.{leaf}" if mod_name else leaf
            kind, std = init_spec(name, module, config, init)
            ds = getattr(p, "ds_tensor", None)
            if ds is not None:  # ZeRO-3: this rank owns flat elements [r * part, (r + 1) * part) (DeepSpeed's
                import torch.distributed as dist  # _partition_param); the tail of the last one is padding

                part = ds.ds_numel
                start = part * dist.get_rank(group=p.ds_process_group)
                end = min(start + part, p.ds_numel)
                if end > start:
                    _fill(ds.view(-1)[:end - start], name, kind, std, start, end, p.ds_numel, seed)
            else:
                _fill(p.data.view(-1), name, kind, std, 0, p.numel(), p.numel(), seed)
        if "RotaryEmbedding" in type(module).__name__ and hasattr(module, "original_inv_freq"):
            # fp32 whatever the parameters' dtype (bf16 frequencies would blur long-range positions), recomputed
            # (no randomness): after a meta build they hold garbage.
            for b in ("inv_freq", "original_inv_freq"):
                setattr(module, b, getattr(module, b).float())
            model._init_weights(module)
    torch.nn.Module.train(model)


def build_model(config, dtype=None, *, init: str = "neox", seed: int | None = None, device=None, zero3=None):
    """A freshly initialised ``GPTNeoXForCausalLM`` built without a second copy of its weights.

    The module is created on the meta device (no memory, no initialisation), then allocated once on
    ``device`` (default CPU) in ``dtype`` (default fp32) and filled by :func:`initialize`: peak memory is the
    model plus one init chunk (1 MB). ``zero3``: a ``deepspeed.zero.Init`` context (DeepSpeed ZeRO-3) under
    which each parameter is partitioned as soon as its module is created, so every rank holds only its
    share; each rank then draws only its partition's values. ``seed`` None: ``torch.initial_seed()``.
    Same ``(config, init, seed)`` -> the same weights, whatever the device, dtype rounding aside, or partitioning.
    """
    import torch
    from transformers import GPTNeoXForCausalLM
    from transformers.initialization import no_init_weights

    seed = torch.initial_seed() if seed is None else int(seed)
    dtype = dtype or torch.float32
    device = torch.device(device or "cpu")
    if zero3 is not None:
        # Under zero.Init every tensor is allocated on the local device and each parameter partitioned
        # right after its module's __init__; no_init_weights keeps the full tensors untouched (never
        # resident) until then.
        with zero3, no_init_weights():
            model = GPTNeoXForCausalLM(config)
    else:
        with torch.device("meta"), no_init_weights():
            model = GPTNeoXForCausalLM(config)
        model = model.to(dtype=dtype).to_empty(device=device)
    initialize(model, init=init, seed=seed)
    return model


def zero3_context(ds_config: dict):
    """``deepspeed.zero.Init`` for :func:`build_model` (``zero3=``): parameters are partitioned over the
    data-parallel ranks as their modules are created.

    Stock ``zero.Init`` broadcasts every full parameter from rank 0 before partitioning it, to make
    random per-rank initialisations agree; that touches the whole tensor on every rank (one full
    parameter resident at a time: the 30,080-row embedding is a quarter of ``50m``). Here the weights are
    written afterwards by :func:`initialize`, deterministically on every rank, so the broadcast is skipped
    and a full parameter is never resident (DeepSpeed's own partitioning then copies only this rank's slice).
    The parameter dtype comes from ``ds_config`` (bf16 enabled or not): an explicit ``dtype=`` is ignored by
    DeepSpeed 0.19 on accelerators without fp16 (a precedence slip in ``Init._set_dtype`` picks bf16 on CPU).
    """
    import deepspeed

    class _PartitionOnlyInit(deepspeed.zero.Init):
        def _zero_init_param(self, param):  # deepspeed 0.19 partition_parameters.Init._zero_init_param minus broadcast
            self._convert_to_deepspeed_param(param)
            param.partition()

    return _PartitionOnlyInit(config_dict_or_path=ds_config)


def no_decay(name: str, module) -> bool:
    """GPT-NeoX's weight-decay rule (megatron/model/utils.py ``get_params_for_weight_decay_optimization``):
    no decay on biases and LayerNorm parameters; decay on every other weight, embeddings included."""
    import torch

    return isinstance(module, torch.nn.LayerNorm) or name.rsplit(".", 1)[-1] == "bias"


def param_groups(model, weight_decay: float) -> list[dict]:
    """AdamW parameter groups: ``decay`` (``weight_decay``) and ``no_decay`` (0), see :func:`no_decay`."""
    decay, skip = [], []
    for mod_name, module in model.named_modules():
        for leaf, p in module.named_parameters(recurse=False):
            if p.requires_grad:
                (skip if no_decay(f"{mod_name}.{leaf}", module) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
            {"params": skip, "weight_decay": 0.0, "name": "no_decay"}]
