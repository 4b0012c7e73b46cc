"""Resharding and export of real DeepSpeed checkpoints (no Ray): a 2-worker ZeRO-3 ``tiny`` checkpoint
written by the production train loop is converted to a universal checkpoint through the lease protocol
of ``polyko.train.checkpoint.reshard`` (a live conversion is waited for, never taken over; a killed one
is taken over and resumed where it stopped), and exported by the streaming exporter, whose weights must
equal DeepSpeed's own consolidation exactly, in fp32 and bf16, one file or sharded."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from polyko.train import checkpoint as ckpt_io
from polyko.train.export import consolidated_state_dict, export_hf

from test_train import tokens_dir  # noqa: F401  (fixture)
from train_helpers import make_checkpoint


@pytest.fixture(scope="module")
def zero3_checkpoint(tmp_path_factory, tokens_dir, polyglot_tokenizer_dir) -> Path:  # noqa: F811
    return make_checkpoint(tmp_path_factory.mktemp("z3"), tokens_dir, polyglot_tokenizer_dir, workers=2, zero_stage=3)


def test_lease_is_exclusive_and_taken_over_only_when_dead(tmp_path):
    uni = tmp_path / "universal"
    assert ckpt_io.latest_lease(uni) == (0, None)
    assert ckpt_io.acquire_lease(uni, 1, "a") and not ckpt_io.acquire_lease(uni, 1, "b")  # one winner per generation
    gen, lease = ckpt_io.latest_lease(uni)
    assert gen == 1 and lease["owner"] == "a" and lease["state"] == "starting"
    watch = ckpt_io.LeaseWatch(ttl_s=0.5)
    for beat in range(4):                          # a beating lease stays alive however long it runs
        assert not watch.dead(1, dict(lease, beat=beat))
        time.sleep(0.3)
    assert not watch.dead(1, dict(lease, beat=3))
    time.sleep(0.6)
    assert watch.dead(1, dict(lease, beat=3))      # silent for longer than the TTL: dead
    assert ckpt_io.acquire_lease(uni, 2, "b") and ckpt_io.latest_lease(uni)[0] == 2


def test_reshard_is_needed_for_another_world_size_or_stage():
    meta = {"zero_stage": 2, "world_size": 2, "precision": "fp32"}
    assert not ckpt_io.needs_reshard(meta, 2, 2)
    assert ckpt_io.needs_reshard(meta, 1, 2) and ckpt_io.needs_reshard(meta, 2, 3)
    z0 = {"zero_stage": 0, "world_size": 2, "precision": "fp32"}
    assert not ckpt_io.needs_reshard(z0, 5, 0)     # unpartitioned: loads at any worker count
    with pytest.raises(ckpt_io.CheckpointError, match="resume with deepspeed.zero_stage=2"):
        ckpt_io.prepare_resume("/nonexistent", meta, world_size=2, rank=0, local_rank=0, zero_stage=3, timeout_s=1)
    with pytest.raises(ckpt_io.CheckpointError, match="ZeRO-0"):
        ckpt_io.prepare_resume("/nonexistent", z0, world_size=1, rank=0, local_rank=0, zero_stage=2, timeout_s=1)


def _universal_fp32(uni: Path) -> dict[str, torch.Tensor]:
    """``{name: flat fp32 master weight}`` of a universal checkpoint (ZeRO-3's merge saves bare flat tensors,
    ZeRO-1/2's ``{"param": tensor}``)."""
    zero = uni / ckpt_io.DS_TAG / "zero"
    out = {}
    for p in zero.rglob("fp32.pt"):
        v = torch.load(p, weights_only=False)
        out[p.parent.relative_to(zero).as_posix()] = (v["param"] if isinstance(v, dict) else v).reshape(-1)
    return out


def test_conversion_killed_midway_is_taken_over_and_resumed(zero3_checkpoint, tmp_path):
    ckpt = tmp_path / zero3_checkpoint.name
    shutil.copytree(zero3_checkpoint, ckpt)
    uni = ckpt / ckpt_io.UNIVERSAL
    # A first converter that stops (chaos delay) after extracting every rank's fragments, before merging.
    code = ("import sys; from polyko.train.checkpoint import reshard; "
            "reshard(sys.argv[1], timeout_s=600, workers=1, chaos_delay_s=600)")
    first = subprocess.Popen([sys.executable, "-c", code, str(ckpt)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and (ckpt_io.latest_lease(uni)[1] or {}).get("phase") != "merge":
            assert first.poll() is None
            time.sleep(0.5)
        lease = ckpt_io.latest_lease(uni)[1]
        assert lease["phase"] == "merge" and lease["state"] == "converting", lease

        # While it heartbeats, another caller waits for it and never takes it over: its own timeout fires.
        with pytest.raises(ckpt_io.CheckpointError, match=r"checkpoint\.reshard_timeout_s=4"):
            ckpt_io.reshard(ckpt, timeout_s=4, lease_ttl_s=2, poll_s=0.2)
        assert ckpt_io.latest_lease(uni)[0] == 1 and not (uni / ckpt_io.DONE).exists()
    finally:
        # Crash midway: the caller and its converter (own session) die without cleaning up.
        os.killpg(first.pid, signal.SIGKILL)
        os.killpg(ckpt_io.latest_lease(uni)[1]["pid"], signal.SIGKILL)
        first.wait()

    t0 = time.time()
    assert ckpt_io.reshard(ckpt, timeout_s=300, lease_ttl_s=2, poll_s=0.2) == uni
    assert time.time() - t0 >= 2                              # waited out the dead lease's TTL first
    gen, lease = ckpt_io.latest_lease(uni)
    assert gen == 2 and lease["state"] == "done"
    assert "extract: 2 items, 2 already done" in (uni / "convert.0002.log").read_text()  # not redone
    ref = consolidated_state_dict(ckpt)
    got = _universal_fp32(uni)
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k].reshape(-1)) for k in ref)
    assert ckpt_io.validate(ckpt)["step"] == 2                # the checkpoint itself is still valid
    assert ckpt_io.reshard(ckpt, timeout_s=5) == uni          # done once: later callers return at once


def _exported(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    got = {}
    for f in sorted(out.glob("*.safetensors")):
        got.update(load_file(f))
    return got


def test_export_streams_exact_weights_that_load_and_generate(zero3_checkpoint, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ref = consolidated_state_dict(zero3_checkpoint)
    out = export_hf(zero3_checkpoint, tmp_path / "hf", link_run=False)
    assert (out / "model.safetensors").is_file() and not (out / "model.safetensors.index.json").exists()
    got = _exported(out)
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert all(torch.equal(model.state_dict()[k], ref[k]) for k in ref)
    ids = tok("서울 연합뉴스", return_tensors="pt")
    gen = model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert gen.shape[1] == ids["input_ids"].shape[1] + 5 and tok.eos_token_id == 2

    # bf16, sharded like save_pretrained: model-0000k-of-0000n.safetensors + index
    out16 = export_hf(zero3_checkpoint, tmp_path / "hf16", dtype="bf16", max_shard_bytes=3 * 10**6, link_run=False)
    index = json.loads((out16 / "model.safetensors.index.json").read_text())
    shards = sorted({*index["weight_map"].values()})
    assert len(shards) >= 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    got16 = _exported(out16)
    assert index["metadata"]["total_size"] == sum(v.numel() * 2 for v in got16.values())
    assert got16.keys() == ref.keys() and all(torch.equal(got16[k], ref[k].bfloat16()) for k in ref)
    m16 = AutoModelForCausalLM.from_pretrained(out16)
    assert m16.dtype == torch.bfloat16 and m16.generate(**ids, max_new_tokens=2, do_sample=False).shape[1] > 2


def test_export_refuses_checkpoint_that_does_not_match_its_config(zero3_checkpoint, tmp_path):
    ckpt = tmp_path / zero3_checkpoint.name
    shutil.copytree(zero3_checkpoint, ckpt)
    meta_file = ckpt / ckpt_io.META
    meta = json.loads(meta_file.read_text())
    meta["model_config"]["num_hidden_layers"] += 1             # a layer the checkpoint does not have
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"does not match its GPT-NeoX config: missing \['gpt_neox.layers"):
        export_hf(ckpt, tmp_path / "hf", link_run=False)
    with pytest.raises(ValueError, match="dtype"):
        export_hf(zero3_checkpoint, tmp_path / "hf", dtype="fp8", link_run=False)
    assert not (tmp_path / "hf").exists()
