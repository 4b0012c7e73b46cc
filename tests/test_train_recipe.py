"""The Polyglot-Ko / GPT-NeoX recipe of the model build: initialisation (small_init / wang_init, or
transformers' N(0, 0.02)), weight-decay groups, and the ZeRO-3 partitioned build giving the very same
weights as a plain build (two real DeepSpeed ranks over gloo)."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

from polyko.cluster import free_port
from polyko.model import build_config, build_model, param_groups

ZERO3_CHECK = r"""
import importlib, sys, torch, deepspeed, torch.distributed as dist
importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
deepspeed.init_distributed("gloo", verbose=False)
from polyko.model import build_config, build_model, zero3_context
cfg = build_config("tiny")
ds = {"train_batch_size": dist.get_world_size(), "train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
model = build_model(cfg, init="neox", seed=5, zero3=zero3_context(ds))
share = sum(p.ds_tensor.numel() for p in model.parameters())          # what this rank holds
ref = build_model(cfg, init="neox", seed=5)
full = sum(p.numel() for p in ref.parameters())
assert share <= full // dist.get_world_size() + 64 * len(list(ref.parameters())), (share, full)
for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
    with deepspeed.zero.GatheredParameters([p]):
        assert torch.equal(p.data, q.data), n
for (n, b), (_, c) in zip(model.named_buffers(), ref.named_buffers()):
    assert b.dtype == c.dtype == torch.float32 and torch.equal(b, c), n
print("EQUAL", dist.get_rank(), share, full)
"""


def _norm(name: str) -> bool:
    return "layernorm" in name or "layer_norm" in name


def _std(name: str, cfg) -> float | None:
    d, layers = cfg.hidden_size, cfg.num_hidden_layers
    if _norm(name) or name.endswith("bias"):
        return None
    if name.endswith(("attention.dense.weight", "mlp.dense_4h_to_h.weight")):
        return 2 / (layers * math.sqrt(d))                   # wang_init
    return math.sqrt(2 / (5 * d))                            # small_init


def test_neox_init_std_per_module():
    cfg = build_config("tiny")
    model = build_model(cfg, seed=0)
    checked = 0
    for name, p in model.named_parameters():
        std = _std(name, cfg)
        if std is None:
            want = 1.0 if _norm(name) and name.endswith("weight") else 0.0
            assert torch.all(p == want), name
            continue
        assert p.mean().abs() < 3 * std / math.sqrt(p.numel()) + 1e-6, name
        assert p.std().item() == pytest.approx(std, rel=0.05 if p.numel() >= 16384 else 0.1), name
        checked += 1
    assert checked == 2 + 4 * cfg.num_hidden_layers         # embed_in, lm_head, 4 matrices per layer
    # deterministic in (config, seed), a new draw for another seed; the hf option is transformers' N(0, 0.02)
    again, other = build_model(cfg, seed=0), build_model(cfg, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))
    assert not torch.equal(model.lm_head.weight, other.lm_head.weight)
    hf = build_model(cfg, init="hf", seed=0)
    for name, p in hf.named_parameters():
        if p.ndim == 2:
            assert p.std().item() == pytest.approx(cfg.initializer_range, rel=0.1), name
    x = torch.randint(4, 1000, (2, 16))
    assert abs(model(input_ids=x, labels=x).loss.item() - math.log(cfg.vocab_size)) < 1.0


def test_weight_decay_groups_follow_gpt_neox():
    model = build_model(build_config("tiny"), seed=0)
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = param_groups(model, 0.1)
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)
    d = {names[id(p)] for p in decay["params"]}
    nd = {names[id(p)] for p in no_decay["params"]}
    assert d | nd == set(names.values()) and not d & nd
    assert all(n.endswith("bias") or _norm(n) for n in nd)
    assert "gpt_neox.final_layer_norm.weight" in nd and "gpt_neox.layers.0.input_layernorm.weight" in nd
    assert {"gpt_neox.embed_in.weight", "lm_head.weight", "gpt_neox.layers.1.attention.dense.weight"} <= d
    assert all(n.endswith("weight") and not _norm(n) for n in d)


def test_zero3_partitioned_build_equals_plain_build(tmp_path):
    """Two DeepSpeed ranks build ``tiny`` under zero.Init: each holds half the weights, and gathered they
    equal the plain (non-partitioned) build with the same seed, bit for bit."""
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, "-c", ZERO3_CHECK], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env={**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
                                              "RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r),
                                              "DS_ACCELERATOR": "cpu"})
             for r in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0 and "EQUAL" in out, err[-3000:]
