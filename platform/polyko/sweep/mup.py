"""Maximal update parametrization (μP, Yang et al. 2022, "Tensor Programs V") for GPT-NeoX, so a learning rate
tuned on a narrow proxy holds at full width.

Widths are measured against a base model (``tiny``: hidden 64, head dim 16); ``m = hidden / base_hidden``.
For Adam, per layer group (TP5 table 3), relative to the base model's init std ``sigma`` and peak lr ``eta``:

============================================  ==================  ==============  =====================
group                                         init std            Adam lr         why
============================================  ==================  ==============  =====================
input embedding, biases, LayerNorm gains      sigma               eta             fan-in does not grow
hidden matrices (qkv, attn out, MLP in/out)   sigma / sqrt(m)     eta / m         fan-in grows with m
output embedding (``lm_head``)                sigma / m           eta / m         the 1/m output multiplier
attention logits                              q.k / d_head (times sqrt(d_head_base)), not q.k / sqrt(d_head)
============================================  ==================  ==============  =====================

The output row is the output multiplier written into the weights: ``logits = (W h) / m`` with ``W`` of std
``sigma`` and lr ``eta`` takes exactly the same Adam steps as ``W' = W / m`` with std ``sigma / m`` and lr
``eta / m`` (Adam's update does not depend on the gradient's scale). Written that way the model stays a plain
``GPTNeoXForCausalLM``: nothing changes in its forward pass except the attention scale, DeepSpeed builds its
optimizer from ordinary parameter groups, and an HF export needs only the attention scale folded into the query
projection (:func:`fold_attention_scale`).

Why not Microsoft's ``mup`` package: it replaces the readout layer with ``MuReadout`` and needs its own
``MuAdam`` built from parameters annotated by ``set_base_shapes``; DeepSpeed builds the optimizer itself from
the config and ZeRO-3 replaces the parameters (losing the annotations), and the swapped modules would not
export as a standard GPT-NeoX checkpoint. The rules above are a few lines on a stock model.

CPU: ``groups = apply_mup(model, base_hidden=64, lr=1e-3)``, then ``torch.optim.AdamW(groups)`` (each group's
``lr`` already scaled; ``lr_mult`` says by how much, for a schedule that sets ``group["lr"] = lr_at(step) *
group["lr_mult"]``).
"""

from __future__ import annotations

import math
from typing import Any

BASE_SIZE = "tiny"
HIDDEN_MATRICES = ("query_key_value", "attention.dense", "dense_h_to_4h", "dense_4h_to_h")


def base_shape(size: str = BASE_SIZE) -> tuple[int, int]:
    """``(hidden, head_dim)`` of the base (proxy) model."""
    from polyko.model import PRESETS

    s = PRESETS[size]
    return s.hidden_size, s.hidden_size // s.num_heads


def layer_group(name: str) -> str:
    """``input`` | ``hidden`` | ``output`` | ``vector`` for a GPT-NeoX parameter name."""
    if name.split(".")[0] in ("lm_head", "embed_out"):  # transformers 5 calls GPT-NeoX's embed_out lm_head
        return "output"
    if "embed_in" in name:
        return "input"
    if name.endswith(".weight") and any(k in name for k in HIDDEN_MATRICES):
        return "hidden"
    return "vector"  # biases, LayerNorm weights and biases


def apply_mup(model, *, base_hidden: int | None = None, base_head_dim: int | None = None, lr: float = 1e-3,
              init_std: float | None = None, weight_decay: float = 0.0) -> list[dict[str, Any]]:
    """Re-initialise ``model`` (a ``GPTNeoXForCausalLM``) in μP and set its attention scale; returns the
    optimizer parameter groups (``params``, ``lr``, ``lr_mult``, ``weight_decay``, ``mup_group``).
    At the base width this is the standard parametrization exactly (same init std, lr and attention scale)."""
    import torch

    bh, bd = base_shape()
    base_hidden = base_hidden or bh
    base_head_dim = base_head_dim or bd
    cfg = model.config
    m = cfg.hidden_size / base_hidden
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    sigma = init_std if init_std is not None else cfg.initializer_range
    std = {"input": sigma, "hidden": sigma / math.sqrt(m), "output": sigma / m}
    mult = {"input": 1.0, "vector": 1.0, "hidden": 1.0 / m, "output": 1.0 / m}
    groups: dict[str, list] = {k: [] for k in mult}
    with torch.no_grad():
        for name, p in model.named_parameters():
            g = layer_group(name)
            groups[g].append(p)
            if g in std:
                p.normal_(0.0, std[g])
    scale = attention_scale(head_dim, base_head_dim)
    for module in model.modules():
        if hasattr(module, "scaling") and hasattr(module, "query_key_value"):
            module.scaling = scale
    model.config.mup_width_mult = m
    model.config.mup_attention_scale = scale
    return [{"params": ps, "lr": lr * mult[g], "lr_mult": mult[g], "mup_group": g,
             "weight_decay": 0.0 if g == "vector" else weight_decay} for g, ps in groups.items() if ps]


def attention_scale(head_dim: int, base_head_dim: int | None = None) -> float:
    """μP's attention-logit scale for ``head_dim`` (1/d): the base model's 1/sqrt(d_base) times d_base/d, so
    at the base head dim (``tiny``'s 16 unless given) it is the standard 1/sqrt(d)."""
    base_head_dim = base_head_dim or base_shape()[1]
    return (base_head_dim ** 0.5) / head_dim


def standard_groups(model, *, lr: float = 1e-3, weight_decay: float = 0.0) -> list[dict[str, Any]]:
    """The standard parametrization's groups (one lr for all), shaped like :func:`apply_mup`'s."""
    hidden = [p for n, p in model.named_parameters() if layer_group(n) != "vector"]
    vector = [p for n, p in model.named_parameters() if layer_group(n) == "vector"]
    return [{"params": hidden, "lr": lr, "lr_mult": 1.0, "mup_group": "all", "weight_decay": weight_decay},
            {"params": vector, "lr": lr, "lr_mult": 1.0, "mup_group": "vector", "weight_decay": 0.0}]


def fold_attention_scale(state_dict: dict, config) -> dict:
    """A μP model's weights as a standard GPT-NeoX checkpoint: the attention scale ``s`` (vs. SP's
    1/sqrt(d_head)) multiplied into the query rows of every ``query_key_value`` weight and bias (rotary
    embedding is linear, so scaling q before or after it is the same)."""
    scale = getattr(config, "mup_attention_scale", None)
    if scale is None:
        return state_dict
    heads, hidden = config.num_attention_heads, config.hidden_size
    d = hidden // heads
    c = scale * math.sqrt(d)
    out = dict(state_dict)
    for k, v in state_dict.items():
        if "query_key_value" in k:
            # GPT-NeoX packs per head [q, k, v] blocks of d rows: rows (3d*h .. 3d*h + d) are head h's query.
            w = v.clone().view(heads, 3, d, *v.shape[1:])
            w[:, 0] *= c
            out[k] = w.view_as(v)
    return out


def width_config(width: int, *, vocab_size: int, depth: int = 2, heads: int = 4, max_positions: int = 512):
    """A GPT-NeoX config of ``width`` with ``tiny``'s other proportions (MLP 4x, 4 heads, so the head dim grows
    with width as it does from ``tiny``'s 16 to ``1.3b``'s 128), for coordinate checks and LR transfer."""
    from polyko.sweep.ladder import ladder_model_config

    c = ladder_model_config(width, depth, vocab_size, max_positions)
    c.num_attention_heads = heads
    return c


def coordinate_check(widths: list[int], *, mup: bool, tokens, steps: int = 4, lr: float = 1e-2, batch: int = 8,
                     vocab_size: int = 1024, seed: int = 0) -> dict[int, dict[str, float]]:
    """The standard μP coordinate check: train each width for ``steps`` Adam steps on the same batches and
    return ``{width: {layer: RMS of its output activations after the last step}}`` (layers: ``embed``, each
    ``layer.i``, ``logits``). Under μP these stay O(1) as width grows; under SP they grow. ``tokens``: an
    ``(n, seq_len)`` int array (ids are taken modulo ``vocab_size`` to keep wide models cheap)."""
    import numpy as np
    import torch
    from transformers import GPTNeoXForCausalLM

    out: dict[int, dict[str, float]] = {}
    data = torch.from_numpy(np.asarray(tokens, dtype=np.int64) % vocab_size)
    for w in widths:
        torch.manual_seed(seed)
        model = GPTNeoXForCausalLM(width_config(w, vocab_size=vocab_size, max_positions=max(512, data.shape[1])))
        groups = apply_mup(model, lr=lr) if mup else standard_groups(model, lr=lr)
        opt = torch.optim.AdamW(groups, betas=(0.9, 0.95), weight_decay=0.0)
        for step in range(steps):
            x = data[(step * batch) % len(data):][:batch]
            loss = model(input_ids=x, labels=x).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        acts: dict[str, float] = {}
        hooks = [model.gpt_neox.embed_in.register_forward_hook(
            lambda mod, i, o: acts.__setitem__("embed", float(o.pow(2).mean().sqrt())))]
        for i, layer in enumerate(model.gpt_neox.layers):
            hooks.append(layer.register_forward_hook(
                lambda mod, inp, o, i=i: acts.__setitem__(f"layer.{i}", float(
                    (o[0] if isinstance(o, tuple) else o).pow(2).mean().sqrt()))))
        with torch.no_grad():
            x = data[:batch]
            logits = model(input_ids=x).logits
        for h in hooks:
            h.remove()
        acts["logits"] = float(logits.pow(2).mean().sqrt())
        out[w] = acts
    return out


def lr_sweep(width: int, lrs: list[float], *, mup: bool, tokens, steps: int = 30, batch: int = 8,
             vocab_size: int = 1024, seed: int = 0, window: int = 5) -> dict[float, float]:
    """``{lr: final training loss}`` (mean of the last ``window`` steps) of one width over a grid of peak lrs
    (constant after a 3-step warmup; a diverged run scores ``inf``)."""
    import numpy as np
    import torch
    from transformers import GPTNeoXForCausalLM

    data = torch.from_numpy(np.asarray(tokens, dtype=np.int64) % vocab_size)
    res = {}
    for lr in lrs:
        torch.manual_seed(seed)
        model = GPTNeoXForCausalLM(width_config(width, vocab_size=vocab_size, max_positions=max(512, data.shape[1])))
        groups = apply_mup(model, lr=lr) if mup else standard_groups(model, lr=lr)
        opt = torch.optim.AdamW(groups, betas=(0.9, 0.95), weight_decay=0.0)
        losses = []
        for step in range(steps):
            for g in opt.param_groups:
                g["lr"] = lr * g["lr_mult"] * min(1.0, (step + 1) / 3)
            x = data[(step * batch) % len(data):][:batch]
            loss = model(input_ids=x, labels=x).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            losses.append(loss.item())
        tail = losses[-window:]
        res[lr] = float(np.mean(tail)) if np.all(np.isfinite(tail)) else float("inf")
    return res


def plot_checks(coord: dict[bool, dict[int, dict[str, float]]], lr: dict[bool, dict[int, dict[float, float]]],
                path) -> None:
    """Two panels per parametrization: activation RMS vs width (coordinate check) and loss vs lr per width."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(9, 6.5))
    for row, mup in enumerate((False, True)):
        name = "μP" if mup else "standard"
        ax = axes[row][0]
        widths = sorted(coord[mup])
        for layer in coord[mup][widths[0]]:
            ax.plot(widths, [coord[mup][w][layer] for w in widths], marker="o", label=layer)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("width")
        ax.set_ylabel("activation RMS after 4 steps")
        ax.set_title(f"{name}: coordinate check")
        ax.legend(fontsize=7)
        ax = axes[row][1]
        for w, res in sorted(lr[mup].items()):
            xs = sorted(res)
            ax.plot(xs, [min(res[x], 12) for x in xs], marker="o", label=f"width {w}")
        ax.set_xscale("log")
        ax.set_xlabel("peak learning rate")
        ax.set_ylabel("training loss after 30 steps")
        ax.set_title(f"{name}: learning rate vs width")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    """``python -m polyko.sweep.mup --tokens DIR --tokenizer TOK --plot mup.png``: run both checks, print them,
    plot them."""
    import argparse
    import json

    import numpy as np

    from polyko.train.data import open_tokens

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--tokens", required=True)
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--plot", required=True)
    a = p.parse_args(argv)
    t = open_tokens(a.tokens, a.tokenizer)
    rows = t.batch(np.arange(len(t)))
    coord = {m: coordinate_check([64, 128, 256, 512, 1024], mup=m, tokens=rows) for m in (False, True)}
    lrs = [1e-3 * 2 ** k for k in range(-3, 6)]
    lr = {m: {w: lr_sweep(w, lrs, mup=m, tokens=rows) for w in (64, 128, 256)} for m in (False, True)}
    print(json.dumps({"coordinate_check": {str(m): coord[m] for m in coord},
                      "best_lr": {str(m): {w: min(r, key=r.get) for w, r in lr[m].items()} for m in lr}}))
    plot_checks(coord, lr, a.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
