"""Source mixtures: ``polyko.train.data.MixtureSampler`` (weighted, deterministic, resumable global order
over per-source rows), ``mixture_report``, ``make_sampler`` on really packed data, and the
``--set data.mixture.<source>=w`` / mixture-file overrides of ``polyko.config``."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from polyko.config import apply_overrides, from_dict
from polyko.data.pack import pack_corpus
from polyko.data.shards import TokenShards
from polyko.train.data import GlobalSampler, MixtureSampler, make_sampler, mixture_report, source_rows, worker_positions


def _manifest(sizes: dict[str, int], shard_rows: int = 70, seq_len: int = 64) -> dict:
    """A manifest of single-source shards, interleaved like chunked packing leaves them."""
    shards, left = [], dict(sizes)
    while any(left.values()):
        for s in sizes:
            n = min(shard_rows, left[s])
            if n:
                shards.append({"file": f"shard-{len(shards):05d}.bin", "num_sequences": n, "source": s})
                left[s] -= n
    return {"seq_len": seq_len, "num_sequences": sum(sizes.values()), "shards": shards}


def _owner(m: dict) -> np.ndarray:
    rows = source_rows(m)
    names = sorted(rows)
    own = np.empty(m["num_sequences"], np.int64)
    for i, s in enumerate(names):
        own[rows[s]] = i
    return own


def test_shares_are_exact_and_every_prefix_is_close():
    m = _manifest({"news": 300, "web": 1700, "wiki": 500})
    smp = MixtureSampler(m, {"news": 0.8, "web": 0.2}, seed=3)     # wiki: weight absent = not sampled
    own = _owner(m)
    idx = smp.indices(0, 5000)
    src = own[idx]
    assert set(np.unique(src)) == {0, 1}
    for n in (200, 300, 400, 777, 1000, 5000):   # token share (fixed-length rows) within 1% from a few hundred on
        assert abs((src[:n] == 0).mean() - 0.8) <= 0.01, n
    assert (src[:1000] == 0).sum() == 800       # exact at the block boundary
    # within a source: a permutation per epoch -- the first 300 news samples are each news row once
    news = idx[src == 0]
    assert sorted(news[:300].tolist()) == source_rows(m)["news"].tolist()
    assert not np.array_equal(news[:300], news[300:600])             # a fresh order in epoch 2
    rep = mixture_report(smp, 5000)
    assert set(rep) == {"news", "web"}
    assert rep["news"]["samples"] == 4000 and rep["news"]["tokens"] == 4000 * 64
    assert rep["news"]["share"] == pytest.approx(0.8) and rep["news"]["epochs"] == pytest.approx(4000 / 300)
    assert rep["web"]["epochs"] == pytest.approx(1000 / 1700)
    assert mixture_report(smp, 437)["news"]["samples"] == int((src[:437] == 0).sum())   # exact at any position


def test_resume_is_skip_to_step_and_independent_of_workers():
    m = _manifest({"a": 123, "b": 456, "c": 77})
    mix = {"a": 0.5, "b": 0.3, "c": 0.2}
    one = MixtureSampler(m, mix, seed=11).indices(0, 2000)
    again = MixtureSampler(m, mix, seed=11)                          # a fresh process after a restart
    assert np.array_equal(np.concatenate([again.indices(0, 613), again.indices(613, 1387)]), one)
    g = 40
    for world in (1, 3, 4):
        steps = [np.concatenate([again.indices(*worker_positions(st, r, g, world)) for r in range(world)])
                 for st in range(50)]
        assert np.array_equal(np.concatenate(steps), one)
    assert not np.array_equal(MixtureSampler(m, mix, seed=12).indices(0, 2000), one)
    plain = MixtureSampler(m, mix, seed=11, shuffle=False).indices(0, 2000)   # shuffle off: each source in row order
    assert np.array_equal(plain[_owner(m)[plain] == 0][:123], source_rows(m)["a"])
    # weights are normalised: 5/3/2 is the same mixture
    assert np.array_equal(MixtureSampler(m, {"a": 5, "b": 3, "c": 2}, seed=11).indices(0, 2000), one)


def test_no_mixture_is_todays_global_order():
    m = _manifest({"a": 123, "b": 456})
    for mix in (None, {}):
        s = MixtureSampler(m, mix, seed=5)
        assert np.array_equal(s.indices(100, 900), GlobalSampler(579, seed=5).indices(100, 900))
    rep = mixture_report(MixtureSampler(m, None, seed=5), 579 * 2)
    assert rep["a"]["samples"] == 246 and rep["b"]["samples"] == 912 and rep["a"]["epochs"] == pytest.approx(2.0)
    rep = mixture_report(MixtureSampler(m, None, seed=5), 300)     # partial epoch: counted from the order
    own = _owner(m)
    assert rep["a"]["samples"] == int((own[GlobalSampler(579, seed=5).indices(0, 300)] == 0).sum())


def test_a_tiny_weight_still_gets_its_share():
    m = _manifest({"big": 5000, "tiny": 10})
    s = MixtureSampler(m, {"big": 0.9999, "tiny": 0.0001}, seed=0)
    assert s.block >= 10_000
    src = _owner(m)[s.indices(0, 4 * s.block)]
    assert (src == 1).sum() == 4 * s.counts[1] >= 4


@pytest.mark.parametrize("mix, match", [
    ({"news": 0.5, "nope": 0.5}, r"unknown source\(s\) \['nope'\].*\['news', 'web'\]"),
    ({"news": -0.1, "web": 1.0}, r"finite and >= 0.*news"),
    ({"news": float("nan")}, r"finite and >= 0"),
    ({"news": 0.0, "web": 0}, r"all zero.*news"),
])
def test_bad_mixtures_are_clear_errors(mix, match):
    with pytest.raises(ValueError, match=match):
        MixtureSampler(_manifest({"news": 10, "web": 10}), mix, seed=0)


def test_mixture_needs_per_source_rows():
    m = {"seq_len": 8, "num_sequences": 10, "shards": [{"file": "shard-00000.bin", "num_sequences": 10}]}
    assert np.array_equal(MixtureSampler(m, None, seed=0).indices(0, 10), GlobalSampler(10, seed=0).indices(0, 10))
    with pytest.raises(ValueError, match="name their source"):
        MixtureSampler(m, {"x": 1.0}, seed=0)


def test_make_sampler_on_packed_data_gives_the_token_share(tmp_path, corpus_dir, polyglot_tokenizer_dir):
    """Real packing (rows of one source each), then 0.8/0.2: the tokens read are 80/20 by source."""
    rows = []
    for name, path, n in (("klue", "klue_dev_sentences/klue_dev_sentences.jsonl", 900),
                          ("news", "soynlp_news_sample/doublespace_line_corpus_sample.jsonl", 60)):
        with open(corpus_dir / path, encoding="utf-8") as f:
            for i, line in zip(range(n), f):
                rows.append({"key": f"{name}:{i}", "text": json.loads(line)["text"], "source": name})
    (tmp_path / "cleaned").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "cleaned" / "part-0.parquet", row_group_size=100)
    m = pack_corpus(tmp_path / "cleaned", polyglot_tokenizer_dir, tmp_path / "data" / "tokens", seq_len=64,
                    shard_tokens=64 * 20, workers=0)
    assert set(m["rows_per_source"]) == {"klue", "news"}
    ts = TokenShards(tmp_path / "data" / "tokens")
    row_source = np.concatenate([[s["source"]] * s["num_sequences"] for s in m["shards"]])
    smp = make_sampler(str(tmp_path / "data"), seed=0, shuffle=True, mixture={"klue": 0.2, "news": 0.8})
    idx = smp.indices(0, 300)
    tokens = {s: 0 for s in ("klue", "news")}
    for i in idx:
        tokens[row_source[i]] += len(ts[int(i)])
    assert abs(tokens["news"] / sum(tokens.values()) - 0.8) <= 0.01
    rep = mixture_report(smp, 300)
    assert rep["news"]["tokens"] == tokens["news"] and rep["klue"]["tokens"] == tokens["klue"]
    assert rep["news"]["epochs"] == pytest.approx(rep["news"]["samples"] / m["rows_per_source"]["news"])


# ---- config: --set data.mixture.<source>=w and mixture files --------------------------------------


@dataclass
class _Data:
    path: str = ""
    mixture: dict[str, float] = field(default_factory=dict)
    """Source weights (the DataConfig field the loop reads)."""


@dataclass
class _Cfg:
    data: _Data = field(default_factory=_Data)


def test_overrides_add_keys_to_a_dict_field(tmp_path):
    c = apply_overrides(_Cfg(), ["data.mixture.news=0.3", "data.mixture.web=0.5", "data.mixture.web=0.7",
                                 "data.mixture.ko.wiki=1", "data.path=x"])
    assert c.data.mixture == {"news": 0.3, "web": 0.7, "ko.wiki": 1.0} and c.data.path == "x"
    assert all(isinstance(v, float) for v in c.data.mixture.values())
    assert apply_overrides(c, ['data.mixture={"a": 2}']).data.mixture == {"a": 2.0}      # replace the whole dict
    assert apply_overrides(c, ["data.mixture=a=1,b=3"]).data.mixture == {"a": 1.0, "b": 3.0}
    assert apply_overrides(c, ["data.mixture={}"]).data.mixture == {}
    (tmp_path / "mix.yaml").write_text("news: 0.8\nweb: 0.2\n")
    (tmp_path / "mix.json").write_text('{"news": 1, "web": 3}')
    assert apply_overrides(_Cfg(), [f"data.mixture=@{tmp_path / 'mix.yaml'}"]).data.mixture == {"news": 0.8, "web": 0.2}
    assert apply_overrides(_Cfg(), [f"data.mixture=@{tmp_path / 'mix.json'}"]).data.mixture == {"news": 1.0, "web": 3.0}
    assert from_dict(_Cfg, {"data": {"mixture": {"news": "0.25"}}}).data.mixture == {"news": 0.25}   # config files
    with pytest.raises(ValueError, match=r"data.mixture.news: expected float"):
        apply_overrides(_Cfg(), ["data.mixture.news=lots"])
    with pytest.raises(ValueError, match="does not exist"):
        apply_overrides(_Cfg(), [f"data.mixture=@{tmp_path / 'missing.yaml'}"])
    with pytest.raises(ValueError, match="'mixtur' is not a config section"):
        apply_overrides(_Cfg(), ["data.mixtur.news=1"])
