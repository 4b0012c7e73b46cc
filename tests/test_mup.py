"""μP for GPT-NeoX on CPU: the standard coordinate check (activation RMS after a few Adam steps stays O(1) from
width 64 to 1024 under μP, grows under the standard parametrization) and LR transfer (the best learning rate
of small sweeps at three widths agrees under μP, drifts under SP), on the real Korean token data."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from polyko.sweep.mup import (apply_mup, coordinate_check, fold_attention_scale, layer_group, lr_sweep,
                              standard_groups, width_config)

from train_helpers import make_tokens


@pytest.fixture(scope="module")
def token_rows(tmp_path_factory, polyglot_tokenizer_dir, corpus_dir) -> np.ndarray:
    from polyko.train.data import open_tokens

    d = make_tokens(tmp_path_factory.mktemp("tokens"), polyglot_tokenizer_dir, corpus_dir, max_sequences=384)
    t = open_tokens(str(d), str(polyglot_tokenizer_dir))
    return t.batch(np.arange(len(t)))


def test_mup_groups_and_base_width_equals_standard_parametrization():
    from transformers import GPTNeoXForCausalLM

    torch.manual_seed(0)
    base = GPTNeoXForCausalLM(width_config(64, vocab_size=512))
    groups = {g["mup_group"]: g for g in apply_mup(base, lr=1e-3)}
    assert {k: g["lr_mult"] for k, g in groups.items()} == {"input": 1.0, "vector": 1.0, "hidden": 1.0, "output": 1.0}
    assert base.gpt_neox.layers[0].attention.scaling == pytest.approx(16 ** -0.5)  # SP's at the base head dim

    wide = GPTNeoXForCausalLM(width_config(1024, vocab_size=512))
    groups = {g["mup_group"]: g for g in apply_mup(wide, lr=1e-3)}
    assert groups["hidden"]["lr"] == pytest.approx(1e-3 / 16) and groups["output"]["lr"] == pytest.approx(1e-3 / 16)
    assert groups["input"]["lr"] == groups["vector"]["lr"] == 1e-3
    assert wide.lm_head.weight.std().item() == pytest.approx(0.02 / 16, rel=0.05)
    assert wide.gpt_neox.layers[0].mlp.dense_h_to_4h.weight.std().item() == pytest.approx(0.02 / 4, rel=0.05)
    assert wide.gpt_neox.embed_in.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert wide.gpt_neox.layers[0].attention.scaling == pytest.approx(4 / 256)  # 1/d: head dim 256
    assert layer_group("gpt_neox.layers.3.attention.query_key_value.bias") == "vector"
    assert sum(len(g["params"]) for g in standard_groups(wide)) == len(list(wide.parameters()))


def test_folding_the_attention_scale_gives_a_standard_gpt_neox():
    from transformers import GPTNeoXForCausalLM

    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(width_config(256, vocab_size=512))
    apply_mup(model)
    x = torch.randint(0, 512, (2, 32))
    with torch.no_grad():
        want = model(input_ids=x).logits
    plain = GPTNeoXForCausalLM(width_config(256, vocab_size=512))  # SP attention scale
    plain.load_state_dict(fold_attention_scale(model.state_dict(), model.config))
    with torch.no_grad():
        got = plain(input_ids=x).logits
    assert torch.allclose(got, want, atol=1e-4)


def test_coordinate_check_mup_stays_flat_sp_grows(token_rows):
    widths = [64, 256, 1024]
    mup = coordinate_check(widths, mup=True, tokens=token_rows, steps=4, lr=1e-2, batch=4)
    sp = coordinate_check(widths, mup=False, tokens=token_rows, steps=4, lr=1e-2, batch=4)

    def spread(r, layer):
        v = [r[w][layer] for w in widths]
        return max(v) / min(v)

    for layer in mup[64]:
        assert spread(mup, layer) < 2.5, (layer, {w: mup[w][layer] for w in widths})
    # SP: the hidden activations blow up with width (Adam moves each of d weights by ~lr, all in step).
    assert sp[1024]["layer.1"] / sp[64]["layer.1"] > 20, sp
    assert sp[1024]["logits"] / sp[64]["logits"] > 3, sp


@pytest.mark.slow
def test_learning_rate_transfers_across_widths_under_mup_not_sp(token_rows):
    lrs = [1e-3 * 2 ** k for k in range(-3, 6)]  # 1.25e-4 .. 3.2e-2, factors of 2
    widths = [64, 128, 256]
    best = {}
    for mup in (True, False):
        for w in widths:
            r = lr_sweep(w, lrs, mup=mup, tokens=token_rows, steps=30)
            best[mup, w] = min(r, key=r.get)
    mup_best = [best[True, w] for w in widths]
    sp_best = [best[False, w] for w in widths]
    assert max(mup_best) / min(mup_best) <= 2, mup_best
    assert sp_best[0] / sp_best[-1] >= 4, sp_best  # SP's optimum moves down with width
    print(f"best lr by width {widths}: muP {mup_best}, SP {sp_best}")
    assert all(math.isfinite(v) for v in mup_best)


@pytest.mark.parametrize("stage", [0, 1])
def test_mup_checkpoint_exports_a_standard_gpt_neox_with_the_trained_logits(stage, tmp_path, gloo_world,
                                                                            polyglot_tokenizer_dir):
    """A μP model trained a step by a real DeepSpeed engine, saved as the train loop saves it
    (``config.model.parametrization = "mup"`` in the metadata), exports to a plain GPT-NeoX whose HF logits
    are the trained model's under μP attention scaling; the same export read as standard would not be."""
    import json as _json
    import shutil

    import deepspeed
    from transformers import AutoModelForCausalLM, GPTNeoXForCausalLM

    from polyko.train import checkpoint as ckpt_io
    from polyko.train.export import export_hf, mup_query_factor

    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(width_config(128, vocab_size=512))  # head dim 32: μP scale 4/32, SP 1/sqrt(32)
    groups = apply_mup(model, lr=1e-3)
    for g in groups:
        g.pop("mup_group")  # DeepSpeed's optimizer takes ordinary groups (lr, weight_decay; lr_mult rides along)
    ds = {"train_batch_size": 2, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
          "steps_per_print": 10**9, "zero_optimization": {"stage": stage},
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, config=ds)
    x = torch.randint(0, 512, (2, 32))
    engine.backward(engine(input_ids=x, labels=x).loss)
    engine.step()
    engine.eval()
    with torch.no_grad():
        want = engine.module(input_ids=x).logits
    meta = {"step": 1, "tokens_seen": 64, "zero_stage": stage, "precision": "fp32", "world_size": 1,
            "model_config": model.config.to_dict(), "tokenizer": str(polyglot_tokenizer_dir),
            "config": {"model": {"size": "tiny", "parametrization": "mup"}}}
    local = ckpt_io.save(engine, 1, meta)
    try:
        factor = mup_query_factor(meta)
        assert factor == pytest.approx((4 / 32) * 32 ** 0.5)
        # Without the scale in the HF config (a loop that did not record it), the same factor from the head dim.
        bare = {**meta, "model_config": {k: v for k, v in meta["model_config"].items() if not k.startswith("mup_")}}
        assert mup_query_factor(bare) == pytest.approx(factor)
        out = export_hf(local, tmp_path / "hf", link_run=False)
        cfg = _json.loads((out / "config.json").read_text())
        assert not any(k.startswith("mup_") for k in cfg)  # a standard GPT-NeoX config
        assert _json.loads((out / "polyko_export.json").read_text())["parametrization"] == "mup"
        hf = AutoModelForCausalLM.from_pretrained(out).eval()
        assert hf.gpt_neox.layers[0].attention.scaling == pytest.approx(32 ** -0.5)
        with torch.no_grad():
            got = hf(input_ids=x).logits
        assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
        # The export read as standard (no fold) gives other logits: the fold is what makes them equal.
        meta_sp = _json.loads((local / ckpt_io.META).read_text())
        meta_sp["config"]["model"]["parametrization"] = "standard"
        (local / ckpt_io.META).write_text(_json.dumps(meta_sp))
        sp = AutoModelForCausalLM.from_pretrained(export_hf(local, tmp_path / "sp", link_run=False)).eval()
        with torch.no_grad():
            assert (sp(input_ids=x).logits - want).abs().max() > 1e-3
    finally:
        shutil.rmtree(local, ignore_errors=True)
