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


def build_model(config, dtype=None):
    """A freshly initialised ``GPTNeoXForCausalLM`` (on CPU; the trainer moves it)."""
    import torch
    from transformers import GPTNeoXForCausalLM

    torch_dtype = dtype or torch.float32
    model = GPTNeoXForCausalLM(config)
    return model.to(torch_dtype)
