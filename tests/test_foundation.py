"""The foundation: config helpers, model presets (exact Polyglot-Ko sizes), token shard format,
and the MLflow tracking convention against a real server."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import pytest

from polyko import config as C
from polyko.data.shards import TokenShards, read_manifest, write_manifest, write_shard
from polyko.model import PRESETS, RELEASED_PARAMS, build_config, count_params


@dataclass
class Inner:
    lr: float = 1e-3
    betas: tuple[float, ...] = (0.9, 0.95)


@dataclass
class Outer:
    name: str = "x"
    steps: int = 10
    flag: bool = False
    inner: Inner = field(default_factory=Inner)


def test_config_roundtrip_hash_and_overrides():
    cfg = Outer()
    d = C.to_dict(cfg)
    assert C.from_dict(Outer, d) == cfg
    assert C.flatten(cfg)["inner.lr"] == 1e-3
    assert C.config_hash(cfg) == C.config_hash(Outer())
    new = C.apply_overrides(cfg, ["inner.lr=0.5", "steps=3", "flag=true", "name=hello"])
    assert new.inner.lr == 0.5 and new.steps == 3 and new.flag is True and new.name == "hello"
    assert C.config_hash(new) != C.config_hash(cfg)
    with pytest.raises(ValueError, match="unknown field"):
        C.apply_overrides(cfg, ["inner.nope=1"])
    with pytest.raises(ValueError, match="expected int"):
        C.from_dict(Outer, {"steps": "many"})


@pytest.mark.parametrize("size", ["1.3b", "3.8b", "5.8b"])
def test_presets_match_released_parameter_counts(size, shared_data):
    cfg = build_config(size)
    assert count_params(cfg) == RELEASED_PARAMS[size]
    ref = json.loads((shared_data / "reference" / "polyglot-ko-configs" / f"polyglot-ko-{size}.config.json").read_text())
    for k in ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "vocab_size",
              "max_position_embeddings", "use_parallel_residual", "tie_word_embeddings"):
        assert getattr(cfg, k) == ref[k], k


def test_12_8b_preset_matches_released_config(shared_data):
    """12.8b has the released config.json's exact shapes. The model card's headline count
    (12,898,631,680) is 5,027,840 above what those shapes give (12,893,603,840); we follow the
    config, which is what the released weights load into."""
    cfg = build_config("12.8b")
    ref = json.loads((shared_data / "reference" / "polyglot-ko-configs" / "polyglot-ko-12.8b.config.json").read_text())
    for k in ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "vocab_size"):
        assert getattr(cfg, k) == ref[k], k
    assert count_params(cfg) == 12_893_603_840
    assert abs(count_params(cfg) - RELEASED_PARAMS["12.8b"]) / RELEASED_PARAMS["12.8b"] < 5e-4


def test_rotary_pct_per_size():
    assert build_config("5.8b").rope_parameters["partial_rotary_factor"] == 0.25
    assert build_config("1.3b").rope_parameters["partial_rotary_factor"] == 0.5
    with pytest.raises(ValueError, match="unknown model size"):
        build_config("7b")
    assert set(PRESETS) >= {"tiny", "1.3b", "3.8b", "5.8b", "12.8b"}


def test_token_shards_random_access(tmp_path):
    a = np.arange(40, dtype=np.uint16).reshape(10, 4)
    b = np.arange(100, 108, dtype=np.uint16).reshape(2, 4)
    shards = [write_shard(tmp_path, 0, a), write_shard(tmp_path, 1, b)]
    with pytest.raises(ValueError, match="not a committed token dataset"):
        TokenShards(tmp_path)  # no manifest yet: not committed
    write_manifest(tmp_path, shards, seq_len=4, dtype="uint16", tokenizer_hash="abc")
    ds = TokenShards(tmp_path)
    assert len(ds) == 12 and read_manifest(tmp_path)["tokenizer_hash"] == "abc"
    assert ds[9].tolist() == [36, 37, 38, 39] and ds[10].tolist() == [100, 101, 102, 103]
    assert ds.batch([11, 0]).tolist() == [[104, 105, 106, 107], [0, 1, 2, 3]]
    with pytest.raises(IndexError):
        ds[12]
    assert TokenShards("file://" + str(tmp_path))[11].tolist() == [104, 105, 106, 107]


def test_tracking_convention_against_real_server(mlflow_server, tmp_path):
    import mlflow

    from polyko import tracking

    data_out = tmp_path / "data"
    with tracking.start_run("data", Outer(), output=data_out) as run:
        mlflow.log_metric(tracking.metric_name("kobest_copa/f1,none"), 0.5)
    marker = tracking.read_marker(data_out / "cleaned")
    assert marker["run_id"] == run.info.run_id and marker["stage"] == "data"
    parents = tracking.lineage(data_out / "cleaned")
    with tracking.start_run("tokenizer", Outer(steps=5), output=tmp_path / "tok", parents=parents) as run2:
        pass
    got = mlflow.get_run(run2.info.run_id)
    assert got.data.tags["polyko.parent.data"] == run.info.run_id
    assert got.data.params["inner.lr"] == "0.001"
    assert tracking.lineage(tmp_path / "tok") == {"data": run.info.run_id, "tokenizer": run2.info.run_id}
    assert "kobest_copa/f1_none" in mlflow.get_run(run.info.run_id).data.metrics


def test_tiny_hf_checkpoint_fixture_loads_and_generates(tiny_hf_checkpoint):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_hf_checkpoint)
    model = AutoModelForCausalLM.from_pretrained(tiny_hf_checkpoint)
    assert tok.eos_token_id == 2 and tok.convert_tokens_to_ids("<|tel|>") == 30001
    text = "안녕하세요, 폴리글롯입니다."
    ids = tok(text, return_tensors="pt").input_ids
    assert tok.decode(ids[0]) == text
    out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 3
    assert (tiny_hf_checkpoint / "model.safetensors").is_file()
