"""Serving pieces that need no Ray: config parsing, the safetensors-only rule, request
validation, and the batching engine against transformers (real model, real tokenizer)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from polyko.config import from_dict
from polyko.serve.api import parse_completion_request
from polyko.serve.config import ModelSpec, ServeConfig
from polyko.serve.engine import RequestError, SamplingParams, check_checkpoint_dir

REPO = Path(__file__).resolve().parents[1]


def test_model_spec_names():
    assert ModelSpec.parse("/data/ckpt/polyko-tiny") == ModelSpec("polyko-tiny", "/data/ckpt/polyko-tiny")
    assert ModelSpec.parse("ko=/data/x") == ModelSpec("ko", "/data/x")
    assert ModelSpec.parse("models:/polyko-1.3b@prod").name == "polyko-1.3b"
    assert ModelSpec.parse("models:/polyko-1.3b/3").name == "polyko-1.3b"
    assert ModelSpec.parse("prod=models:/polyko-1.3b@prod") == ModelSpec("prod", "models:/polyko-1.3b@prod")
    with pytest.raises(ValueError, match="unique"):
        ServeConfig(models=[ModelSpec("a", "/x"), ModelSpec("a", "/y")])
    # models:/name@alias sources are followed; pinned versions and directories are not
    assert ModelSpec.parse("prod=models:/polyko-1.3b@production").alias == ("polyko-1.3b", "production")
    assert ModelSpec.parse("models:/polyko-1.3b/3").alias is None and ModelSpec.parse("/data/x").alias is None
    with pytest.raises(ValueError, match="follow_interval_s"):
        ServeConfig(models=[ModelSpec("a", "/x")], follow_interval_s=-1)


def test_cluster_serve_yaml_args_are_a_valid_config():
    import yaml

    doc = yaml.safe_load((REPO / "cluster" / "serve.yaml").read_text())
    (app,) = doc["applications"]
    assert app["import_path"] == "polyko.serve.app:app_builder"
    assert doc["http_options"]["host"] == "127.0.0.1"
    cfg = from_dict(ServeConfig, app["args"])
    assert cfg.models[0].name == "tiny" and cfg.autoscaling.max_replicas >= cfg.autoscaling.min_replicas
    with pytest.raises(ValueError, match="unknown config field"):
        from_dict(ServeConfig, {**app["args"], "max_resdent": 3})


def test_pickle_only_checkpoint_is_refused(tmp_path, tiny_hf_checkpoint):
    import torch

    d = tmp_path / "pickled"
    d.mkdir()
    (d / "config.json").write_text((tiny_hf_checkpoint / "config.json").read_text())
    torch.save({"w": torch.zeros(2)}, d / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"no \*\.safetensors.*pytorch_model\.bin"):
        check_checkpoint_dir(d)
    with pytest.raises(ValueError, match="not a directory"):
        check_checkpoint_dir(tmp_path / "missing")
    from polyko.serve.app import build_app

    with pytest.raises(ValueError, match="safetensors"):
        build_app(ServeConfig(models=[ModelSpec("p", str(d))]))
    assert check_checkpoint_dir(tiny_hf_checkpoint) == tiny_hf_checkpoint


def test_validation_defaults_and_shapes():
    cfg = ServeConfig(models=[ModelSpec("m", "/x")])
    r = parse_completion_request({"model": "m", "prompt": [1, 2, 3]}, cfg)
    assert r.prompts == [[1, 2, 3]] and r.params.max_tokens == 16 and r.params.temperature == 1.0
    r = parse_completion_request({"model": "m", "prompt": ["a", "b"], "stop": "\n", "logprobs": 1, "echo": True,
                                  "max_tokens": 0, "seed": 5}, cfg)
    assert r.prompts == ["a", "b"] and r.params.stop == ("\n",) and r.params.echo and r.params.max_tokens == 0
    for body, param in [({"model": "m", "prompt": "a", "temperature": float("nan")}, "temperature"),
                        ({"model": "m", "prompt": ["a", [1]]}, "prompt"),
                        ({"model": "m", "prompt": "a", "presence_penalty": 1.0}, "presence_penalty")]:
        with pytest.raises(RequestError) as e:
            parse_completion_request(body, cfg)
        assert e.value.param == param and e.value.status == 400
        json.dumps(e.value.body())


def test_engine_batches_like_transformers(tiny_hf_checkpoint):
    """Left-padded batch + KV cache == transformers' own greedy generate, prompt by prompt."""
    import torch
    from transformers import AutoModelForCausalLM

    from polyko.serve.config import EngineConfig
    from polyko.serve.engine import HFEngine

    eng = HFEngine(tiny_hf_checkpoint, EngineConfig(max_batch_size=8))
    prompts = ["안녕하세요", "한국어 모델을 서빙합니다", [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17]]
    seqs = eng.prepare(prompts, SamplingParams(max_tokens=7, temperature=0, ignore_eos=True, logprobs=0),
                       timeout_s=60)

    async def go():
        await eng.run(seqs)

    asyncio.run(go())
    ref = AutoModelForCausalLM.from_pretrained(str(tiny_hf_checkpoint)).eval()
    for s in seqs:
        with torch.no_grad():
            out = ref.generate(torch.tensor([s.prompt_ids]), max_new_tokens=7, min_new_tokens=7, do_sample=False)
            logp = torch.log_softmax(ref(out).logits[0].float(), -1)
        assert s.generated == out[0, len(s.prompt_ids):].tolist()
        want = [logp[len(s.prompt_ids) + i - 1, t].item() for i, t in enumerate(s.generated)]
        assert s.gen_logprobs == pytest.approx(want, abs=1e-4)
        assert s.finish_reason == "length"

    async def staggered():
        # Continuous batching: sequences arriving while others decode join the running batch
        # (KV caches merged with left padding) and still produce exactly transformers' tokens.
        long = eng.prepare(["긴 생성을 시작합니다 그리고"], SamplingParams(max_tokens=24, ignore_eos=True, temperature=0),
                           timeout_s=60)
        eng.submit(long)
        while len(long[0].generated) < 5:
            await asyncio.sleep(0.005)
        short = eng.prepare([[40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59,
                              60, 61, 62, 63, 64, 65, 66, 67, 68, 69], "짧은"],
                            SamplingParams(max_tokens=6, ignore_eos=True, temperature=0), timeout_s=60)
        await eng.run(short)
        assert not long[0].done   # the short ones finished while the long one was still running
        async for _ in eng.updates(long):
            pass
        return long + short

    for s in asyncio.run(staggered()):
        with torch.no_grad():
            n = s.params.max_tokens
            out = ref.generate(torch.tensor([s.prompt_ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
        assert s.generated == out[0, len(s.prompt_ids):].tolist()

    async def deadlines_and_eviction():
        # A request past its deadline is finished as "timeout" without generating (never stuck).
        late = eng.prepare(["늦은 요청"], SamplingParams(max_tokens=50), timeout_s=0)
        await eng.run(late)
        assert late[0].finish_reason == "timeout" and late[0].generated == []
        # close() (Serve's LRU eviction) while sequences are queued: they finish, then the model is freed.
        busy = eng.prepare(["a", "b", "c"], SamplingParams(max_tokens=5, ignore_eos=True), timeout_s=60)
        eng.submit(busy)
        eng.close()
        with pytest.raises(RequestError) as e:
            eng.submit(eng.prepare(["d"], SamplingParams(max_tokens=1), timeout_s=60))
        assert e.value.status == 503 and e.value.retry_after
        async for _ in eng.updates(busy):
            pass
        assert [len(s.generated) for s in busy] == [5, 5, 5]
        await asyncio.sleep(0.05)
        assert eng.model is None

    asyncio.run(deadlines_and_eviction())


def test_app_builder_takes_serve_yaml_args(tiny_hf_checkpoint):
    import yaml
    from ray.serve import Application

    from polyko.serve.app import app_builder

    args = yaml.safe_load((REPO / "cluster" / "serve.yaml").read_text())["applications"][0]["args"]
    app = app_builder({**args, "models": [{"name": "tiny", "source": str(tiny_hf_checkpoint)}]})
    assert isinstance(app, Application)


def test_sustained_stream_keeps_the_kv_cache_bounded(tiny_hf_checkpoint):
    """>= 2,000 decode steps of staggered requests that never let the batch empty: at every step
    the cache spans at most the longest live row (prompt + generated), and the batch's cache
    (rows x columns) stays within max_batch_tokens. Before trimming, the columns of every row
    that ever ran stayed in the cache, so its length grew with the number of steps."""
    import random

    from polyko.serve.config import EngineConfig
    from polyko.serve.engine import HFEngine

    budget = 6 * (12 + 40)     # six of the longest rows
    eng = HFEngine(tiny_hf_checkpoint, EngineConfig(max_batch_size=8, max_batch_tokens=budget, batch_wait_ms=0),
                   num_threads=1)
    steps, running_after = [], []

    def on_step(st):
        steps.append((st.cache_len, max(st.lengths), len(st.lengths)))
        running_after.append(eng.running)

    eng.on_step = on_step
    rng = random.Random(0)
    done: list = []

    async def stream():
        live: list = []
        while eng.decode_steps < 2000:
            live = [s for s in live if not s.done]
            while len(live) < 8:   # keep the queue fed: the batch never runs dry
                ids = [rng.randrange(5, 20000) for _ in range(rng.randint(2, 12))]
                (s,) = eng.prepare([ids], SamplingParams(max_tokens=rng.randint(3, 40), temperature=0,
                                                         ignore_eos=True), timeout_s=600)
                eng.submit([s])
                live.append(s)
                done.append(s)
            await asyncio.sleep(0.001)
        n_busy = len(steps)
        for s in live:   # one submit each: each has its own update event
            async for _ in eng.updates([s]):
                pass
        return n_busy

    n_busy = asyncio.run(stream())
    eng.close()
    assert n_busy >= 2000
    assert all(r > 0 for r in running_after[:n_busy - 1]), "the batch emptied during the stream"
    for i, (cache_len, longest, rows) in enumerate(steps):
        assert cache_len <= longest, (i, cache_len, longest)
        assert rows == 1 or rows * cache_len <= budget, (i, rows, cache_len)
    assert max(c for c, _, _ in steps) <= 12 + 40
    assert sum(len(s.generated) for s in done) > 10 * (12 + 40)   # far more tokens than any row holds
    assert all(s.finish_reason == "length" and len(s.generated) == s.params.max_tokens for s in done)


def test_model_slot_switch_finishes_inflight_requests_on_the_old_version(tiny_hf_checkpoint, make_tiny_checkpoint):
    """What a registry-following replica does when the alias moves: requests already submitted to
    the old engine finish there, new ones go to the new engine, the old one is then freed."""
    from polyko.serve.app import ModelSlot
    from polyko.serve.config import EngineConfig
    from polyko.serve.engine import HFEngine

    old = HFEngine(tiny_hf_checkpoint, EngineConfig(), num_threads=1)
    new = HFEngine(make_tiny_checkpoint(1), EngineConfig(), num_threads=1)
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)

    async def go():
        slot = ModelSlot("m", old, "1", ModelSpec.parse("m=models:/polyko-x@production"))
        assert slot.fingerprint == "models:/polyko-x/1"
        inflight = slot.engine.prepare(["전환 중에도 끝까지"], params, timeout_s=60)
        slot.engine.submit(inflight)
        while len(inflight[0].generated) < 3:
            await asyncio.sleep(0.005)
        slot.swap(new, "2")
        assert slot.engine is new and slot.fingerprint == "models:/polyko-x/2" and slot.switches == 1
        with pytest.raises(RequestError) as e:   # nothing new reaches the old version
            old.submit(old.prepare(["늦게"], params, timeout_s=60))
        assert e.value.status == 503
        after = await slot.engine.run(slot.engine.prepare(["전환 중에도 끝까지"], params, timeout_s=60))
        async for _ in old.updates(inflight):
            pass
        await asyncio.sleep(0.05)
        return inflight[0], after[0]

    s_old, s_new = asyncio.run(go())
    assert s_old.finish_reason == "length" and len(s_old.generated) == 30   # finished on version 1
    assert s_new.finish_reason == "length" and s_new.generated != s_old.generated   # another model answered
    assert old.model is None and new.model is not None   # version 1 unloaded once drained
    new.close()


def test_engine_returns_freed_heap_memory_between_steps(tiny_hf_checkpoint):
    """The engine calls glibc's malloc_trim while busy (every malloc_trim_interval_s) and once when
    it goes idle, and never with the interval at 0; a negative interval is a config error."""
    import time

    from polyko.serve.config import EngineConfig
    from polyko.heap import malloc_trim
    from polyko.serve.engine import HFEngine

    assert malloc_trim() is not None   # glibc (Linux): the trim is real here, not skipped
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)

    def burst(interval: float) -> dict:
        eng = HFEngine(tiny_hf_checkpoint, EngineConfig(batch_wait_ms=0, malloc_trim_interval_s=interval),
                       num_threads=1)

        eng.on_step = lambda st: time.sleep(0.01)   # 23 decode steps take >= 0.23 s: several intervals

        async def go():
            await asyncio.gather(*[eng.run(eng.prepare([f"문장 {i}"], params, timeout_s=60)) for i in range(4)])
            for _ in range(50):   # the idle trim runs right after the last step
                if eng.running == 0 and eng.trims and eng._last_trim_step == eng.decode_steps:
                    break
                await asyncio.sleep(0.02)
            return eng.stats()

        st = asyncio.run(go())
        eng.close()
        return st

    on, off = burst(0.05), burst(0.0)
    assert on["decode_steps"] >= 23 and on["trims"] >= 3 and on["trim_seconds"] > 0   # periodic + idle
    assert off["trims"] == 0 and off["trim_seconds"] == 0
    for st in (on, off):   # the engine thread's CPU time is inside each step's wall time
        assert 0 < st["decode_cpu_seconds"] <= st["decode_seconds"]
    with pytest.raises(ValueError, match="malloc_trim_interval_s"):
        ServeConfig(engine=EngineConfig(malloc_trim_interval_s=-1))
