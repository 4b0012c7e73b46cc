"""The Serve app end to end: a real private Ray cluster on 127.0.0.1, the real app (two
checkpoints multiplexed, API key on), real HTTP. One app for the whole module (~25 s to start).

Checks generation against transformers directly (greedy tokens, echo log-probs within 1e-4),
streaming, seeds, stop strings, batching, every bad-input case (4xx naming the field, through the
pydantic schema), the OpenAPI document, client disconnects cancelling generation, the API key,
/v1/models, /health, Prometheus metrics, concurrent load, and lm-eval ``local-completions`` on
KoBEST COPA through the endpoint against lm-eval's direct ``hf`` evaluation.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import math
import os
import time

import pytest
import requests

API_KEY_ENV = "POLYKO_TEST_SERVE_KEY"
API_KEY = "test-key-3f9a"


@pytest.fixture(scope="module")
def second_checkpoint(make_tiny_checkpoint):
    """Another tiny checkpoint (different seed) for multiplexing."""
    return make_tiny_checkpoint(1)


@pytest.fixture(scope="module")
def server(tiny_hf_checkpoint, second_checkpoint):
    """The app on a private 2-CPU cluster: models ``tiny`` and ``b``, one resident per replica
    (so alternating requests exercise LRU eviction), bearer key required."""
    import ray
    from ray import serve

    from polyko.cluster import free_port, init_ray
    from polyko.serve.app import build_app
    from polyko.serve.config import AutoscalingConfig, ModelSpec, ServeConfig

    if ray.is_initialized():   # another module's cluster: ours needs a metrics port
        ray.shutdown()
    os.environ[API_KEY_ENV] = API_KEY   # inherited by the replicas of the local cluster
    metrics_port = free_port()
    init_ray(num_cpus=2, include_dashboard=False, _metrics_export_port=metrics_port,
             _system_config={"metrics_report_interval_ms": 1000})
    port = free_port()
    cfg = ServeConfig(models=[ModelSpec.parse(f"tiny={tiny_hf_checkpoint}"), ModelSpec.parse(f"b={second_checkpoint}")],
                      port=port, api_key_env=API_KEY_ENV, max_resident=1,
                      autoscaling=AutoscalingConfig(min_replicas=1, max_replicas=1, target_ongoing_requests=32))
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app(cfg), name=cfg.app_name, route_prefix="/")
        yield {"url": f"http://127.0.0.1:{port}", "metrics": f"http://127.0.0.1:{metrics_port}/metrics",
               "cfg": cfg, "ckpt": tiny_hf_checkpoint, "ckpt_b": second_checkpoint}
    finally:
        serve.shutdown()
        ray.shutdown()
        os.environ.pop(API_KEY_ENV, None)


HDR = {"Authorization": f"Bearer {API_KEY}"}


def post(server, body, **kw):
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return requests.post(server["url"] + "/v1/completions", data=data,
                         headers={**HDR, "Content-Type": "application/json"}, timeout=120, **kw)


@pytest.fixture(scope="module")
def hf_model(tiny_hf_checkpoint):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (AutoModelForCausalLM.from_pretrained(str(tiny_hf_checkpoint)).eval(),
            AutoTokenizer.from_pretrained(str(tiny_hf_checkpoint)))


def token_ids(tok, choice):
    return tok.convert_tokens_to_ids(choice["logprobs"]["tokens"])


def test_greedy_generation_matches_transformers(server, hf_model):
    import torch

    from polyko.serve.api import CompletionResponse

    model, tok = hf_model
    prompt = "대한민국의 수도는"
    r = post(server, {"model": "tiny", "prompt": prompt, "max_tokens": 8, "temperature": 0, "logprobs": 0,
                      "ignore_eos": True})
    assert r.status_code == 200, r.text
    body = r.json()
    CompletionResponse.model_validate(body)   # the response schema served in /openapi.json
    assert body["object"] == "text_completion" and body["model"] == "tiny"
    ch = body["choices"][0]
    ids = tok.encode(prompt, add_special_tokens=False)
    with torch.no_grad():
        ref = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, min_new_tokens=8)[0, len(ids):]
    assert token_ids(tok, ch) == ref.tolist()
    assert ch["text"] == tok.decode(ref.tolist())
    assert ch["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 8, "total_tokens": len(ids) + 8}


def test_batched_prompts_equal_single_requests(server):
    prompts = ["안녕하세요", "오늘 날씨가 좋아서 산책을 했다", "김치", [100, 200, 300, 400, 500, 600, 700]]
    singles = []
    for p in prompts:
        r = post(server, {"model": "tiny", "prompt": p, "max_tokens": 6, "temperature": 0})
        assert r.status_code == 200, r.text
        singles.append(r.json()["choices"][0]["text"])
    # strings together in one request (one padded batch) ...
    r = post(server, {"model": "tiny", "prompt": prompts[:3], "max_tokens": 6, "temperature": 0})
    assert [c["text"] for c in sorted(r.json()["choices"], key=lambda c: c["index"])] == singles[:3]
    # ... and concurrent requests (batched by the engine loop).
    with cf.ThreadPoolExecutor(8) as ex:
        outs = list(ex.map(lambda p: post(server, {"model": "tiny", "prompt": p, "max_tokens": 6,
                                                   "temperature": 0}).json()["choices"][0]["text"], prompts * 2))
    assert outs == singles * 2


def test_seed_makes_sampling_reproducible(server):
    body = {"model": "tiny", "prompt": "한국어", "max_tokens": 12, "temperature": 1.0, "top_p": 0.9, "seed": 7}
    a, b = post(server, body).json(), post(server, body).json()
    assert a["choices"][0]["text"] == b["choices"][0]["text"]
    c = post(server, {**body, "seed": 8}).json()
    assert c["choices"][0]["text"] != a["choices"][0]["text"]


def test_stop_sequence_truncates(server):
    base = {"model": "tiny", "prompt": "서울", "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    full = post(server, base).json()["choices"][0]["text"]
    stop = full[len(full) // 2: len(full) // 2 + 2]
    assert stop.strip() and "\ufffd" not in stop
    r = post(server, {**base, "stop": [stop]}).json()["choices"][0]
    assert r["text"] == full[:full.index(stop)]
    assert r["finish_reason"] == "stop"


def _sse(r):
    events = []
    for line in r.iter_lines(decode_unicode=True):
        if line:
            assert line.startswith("data: ")
            events.append(line[len("data: "):])
    return events


def test_streaming_matches_non_streaming(server):
    body = {"model": "tiny", "prompt": ["부산은", "제주도"], "max_tokens": 10, "temperature": 0, "ignore_eos": True}
    full = post(server, body).json()
    with post(server, {**body, "stream": True, "stream_options": {"include_usage": True}}, stream=True) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = _sse(r)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    texts = {0: "", 1: ""}
    finish = {}
    for c in chunks[:-1]:
        (ch,) = c["choices"]
        texts[ch["index"]] += ch["text"]
        if ch["finish_reason"]:
            finish[ch["index"]] = ch["finish_reason"]
    assert chunks[-1]["usage"] == full["usage"]
    assert [texts[0], texts[1]] == [c["text"] for c in sorted(full["choices"], key=lambda c: c["index"])]
    assert finish == {0: "length", 1: "length"}
    assert len(chunks) > 4   # token by token, not one blob


def test_streaming_echo_logprobs(server):
    body = {"model": "tiny", "prompt": "스트리밍 로그확률", "max_tokens": 4, "temperature": 0, "echo": True,
            "logprobs": 1, "ignore_eos": True}
    full = post(server, body).json()["choices"][0]
    with post(server, {**body, "stream": True}, stream=True) as r:
        chunks = [json.loads(e)["choices"][0] for e in _sse(r)[:-1]]
    assert "".join(c["text"] for c in chunks) == full["text"]
    tokens = [t for c in chunks for t in c["logprobs"]["tokens"]]
    lps = [t for c in chunks for t in c["logprobs"]["token_logprobs"]]
    assert tokens == full["logprobs"]["tokens"]
    assert lps[0] is None and lps[1:] == pytest.approx(full["logprobs"]["token_logprobs"][1:], abs=1e-5)


def test_echo_logprobs_match_direct_forward(server, hf_model):
    """What lm-eval's local-completions sends for log-likelihoods, checked against transformers."""
    import torch

    model, tok = hf_model
    ids = tok.encode("전화를 걸었다 왜냐하면 친구가 보고 싶었다", add_special_tokens=False)
    r = post(server, {"model": "tiny", "prompt": [ids], "echo": True, "logprobs": 1, "max_tokens": 1,
                      "temperature": 0, "seed": 1234})
    assert r.status_code == 200, r.text
    lp = r.json()["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(ids) + 1 and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    ref = torch.log_softmax(logits, -1)
    want = [ref[i - 1, ids[i]].item() for i in range(1, len(ids))]
    got = lp["token_logprobs"][1:len(ids)]
    assert max(abs(a - b) for a, b in zip(got, want)) < 1e-4
    # the generated token is the greedy one, with its log-prob
    gen = tok.convert_tokens_to_ids(lp["tokens"][-1])
    assert gen == int(ref[-1, :len(tok)].argmax())
    assert abs(lp["token_logprobs"][-1] - ref[-1, gen].item()) < 1e-4
    # top_logprobs: raw vocabulary strings, the top-1 included, max == the greedy check lm-eval does
    for i in range(1, len(ids)):
        top = lp["top_logprobs"][i]
        best = int(ref[i - 1].argmax())
        assert tok.convert_ids_to_tokens(best) in top
        assert abs(max(top.values()) - ref[i - 1].max().item()) < 1e-4
    # max_tokens 0 with echo: prompt scoring only
    r0 = post(server, {"model": "tiny", "prompt": ids, "echo": True, "logprobs": 1, "max_tokens": 0,
                       "temperature": 0}).json()
    assert r0["choices"][0]["logprobs"]["token_logprobs"][1:] == pytest.approx(got, abs=1e-4)
    assert r0["usage"]["completion_tokens"] == 0 and r0["choices"][0]["text"] == tok.decode(ids)


def test_two_models_multiplexed(server):
    body = {"prompt": "같은 프롬프트", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    outs = [post(server, {**body, "model": m}).json()["choices"][0]["text"] for m in ("tiny", "b", "tiny", "b")]
    # different weights -> different text; each model stable across LRU evictions (max_resident=1)
    assert outs[0] != outs[1] and outs[0] == outs[2] and outs[1] == outs[3]
    models = requests.get(server["url"] + "/v1/models", headers=HDR, timeout=10).json()
    assert {m["id"]: m["source"] for m in models["data"]} == {"tiny": str(server["ckpt"]), "b": str(server["ckpt_b"])}
    assert all(m["version"] is None for m in models["data"])   # directories have no registry version


BAD = [
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    ({"model": "nope", "prompt": "a"}, 404, "model"),
    ({"prompt": "a"}, 400, "model"),
    ({"model": 3, "prompt": "a"}, 400, "model"),
    ({"model": "/etc", "prompt": "a"}, 404, "model"),          # a path is never a model
    ({"model": "tiny"}, 400, "prompt"),
    ({"model": "tiny", "prompt": []}, 400, "prompt"),
    ({"model": "tiny", "prompt": ""}, 400, "prompt"),
    ({"model": "tiny", "prompt": [[]]}, 400, "prompt"),
    ({"model": "tiny", "prompt": {"a": 1}}, 400, "prompt"),
    ({"model": "tiny", "prompt": ["a", 5]}, 400, "prompt"),
    ({"model": "tiny", "prompt": [1.5, 2]}, 400, "prompt"),
    ({"model": "tiny", "prompt": ["x"] * 65}, 400, "prompt"),
    ({"model": "tiny", "prompt": [[99_999_999]]}, 400, "prompt"),
    ({"model": "tiny", "prompt": [[-1, 5]]}, 400, "prompt"),
    ({"model": "tiny", "prompt": [list(range(5, 600))]}, 400, "prompt"),          # > 512 context
    ({"model": "tiny", "prompt": [list(range(5, 505))], "max_tokens": 100}, 400, "max_tokens"),
    ({"model": "tiny", "prompt": "a", "max_tokens": -1}, 400, "max_tokens"),
    ({"model": "tiny", "prompt": "a", "max_tokens": 10**9}, 400, "max_tokens"),
    ({"model": "tiny", "prompt": "a", "max_tokens": "5"}, 400, "max_tokens"),
    ({"model": "tiny", "prompt": "a", "max_tokens": 2.5}, 400, "max_tokens"),
    ({"model": "tiny", "prompt": "a", "max_tokens": 0}, 400, "max_tokens"),        # 0 needs echo
    ({"model": "tiny", "prompt": "a", "temperature": -0.1}, 400, "temperature"),
    ({"model": "tiny", "prompt": "a", "temperature": 2.5}, 400, "temperature"),
    ({"model": "tiny", "prompt": "a", "temperature": "hot"}, 400, "temperature"),
    ({"model": "tiny", "prompt": "a", "top_p": 0}, 400, "top_p"),
    ({"model": "tiny", "prompt": "a", "top_p": 1.5}, 400, "top_p"),
    ({"model": "tiny", "prompt": "a", "stop": 5}, 400, "stop"),
    ({"model": "tiny", "prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"model": "tiny", "prompt": "a", "seed": "x"}, 400, "seed"),
    ({"model": "tiny", "prompt": "a", "logprobs": 1000}, 400, "logprobs"),
    ({"model": "tiny", "prompt": "a", "logprobs": True}, 400, "logprobs"),
    ({"model": "tiny", "prompt": "a", "echo": "yes"}, 400, "echo"),
    ({"model": "tiny", "prompt": "a", "stream": 1}, 400, "stream"),
    ({"model": "tiny", "prompt": "a", "n": 3}, 400, "n"),
]


@pytest.mark.parametrize("body,status,param", BAD, ids=[f"{i}-{b[2]}" for i, b in enumerate(BAD)])
def test_bad_input_is_a_4xx_naming_the_field(server, body, status, param):
    from polyko.serve.api import ErrorResponse

    r = post(server, body)
    assert r.status_code == status, r.text
    err = ErrorResponse.model_validate(r.json()).error
    assert err.param == param and err.message and err.type == "invalid_request_error"
    if param:
        assert param in err.message


def test_openapi_schema_validates_and_docs_are_served(server):
    from openapi_spec_validator import validate

    spec = requests.get(server["url"] + "/openapi.json", timeout=30).json()
    validate(spec)   # a valid OpenAPI 3.1 document
    op = spec["paths"]["/v1/completions"]["post"]
    ref = op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    req = spec["components"]["schemas"][ref.rsplit("/", 1)[1]]
    assert {"model", "prompt"} <= set(req["required"]) and "max_tokens" in req["properties"]
    assert {"200", "400", "401", "404", "503"} <= set(op["responses"])
    assert "ErrorResponse" in spec["components"]["schemas"] and "/v1/models" in spec["paths"]
    docs = requests.get(server["url"] + "/docs", timeout=30)
    assert docs.status_code == 200 and "swagger" in docs.text.lower() and "/openapi.json" in docs.text


def _engine_stats(server, model="tiny"):
    from ray import serve

    handle = serve.get_deployment_handle("PolykoModel", app_name=server["cfg"].app_name)
    return handle.stats.remote().result(timeout_s=60)["models"].get(model)


def _wait_rows_freed(server, cancelled_before, n):
    deadline = time.time() + 60
    while time.time() < deadline:
        st = _engine_stats(server)
        if st["running"] == 0 and st["waiting"] == 0 and st["cancelled"] >= cancelled_before + n:
            return st
        time.sleep(0.2)
    raise AssertionError(f"rows not freed after the client went away: {st}")


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_client_disconnect_cancels_generation(server, stream):
    """A client that goes away (read timeout / closed stream) cancels its rows: they leave the
    batch at the next step instead of generating their max_tokens for nobody."""
    n, max_tokens = 16, 480
    body = {"model": "tiny", "prompt": ["끝나지 않는 생성"] * n, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": stream}
    assert post(server, {"model": "tiny", "prompt": "load", "max_tokens": 1}).status_code == 200
    before = _engine_stats(server)
    with requests.Session() as s:
        if stream:
            r = s.post(server["url"] + "/v1/completions", json=body, headers=HDR, stream=True, timeout=60)
            assert r.status_code == 200
            lines = r.iter_lines()
            for _ in range(3):   # generation has started
                next(lines)
            r.close()
        else:
            with pytest.raises(requests.exceptions.ReadTimeout):
                s.post(server["url"] + "/v1/completions", json=body, headers=HDR, timeout=(10, 0.5))
    after = _wait_rows_freed(server, before["cancelled"], n)
    # The n rows were counted as cancelled (not finished), and they stopped short of their max_tokens (with
    # ignore_eos an uncancelled row generates all of them). How far they got depends on the machine's speed:
    # a quiet CPU decodes the tiny model's 16 rows at ~4 ms a step.
    assert after["tokens_generated"] - before["tokens_generated"] < n * max_tokens
    # the engine keeps serving
    assert post(server, {"model": "tiny", "prompt": "다음", "max_tokens": 2}).status_code == 200


def test_bad_stream_request_is_refused_before_streaming(server):
    r = post(server, {"model": "tiny", "prompt": [list(range(5, 600))], "stream": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


def test_api_key_required_except_health(server):
    url = server["url"]
    body = {"model": "tiny", "prompt": "a", "max_tokens": 1}
    r = requests.post(url + "/v1/completions", json=body, timeout=30)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = requests.post(url + "/v1/completions", json=body, headers={"Authorization": "Bearer wrong"}, timeout=30)
    assert r.status_code == 401
    assert requests.get(url + "/v1/models", timeout=30).status_code == 401
    h = requests.get(url + "/health", timeout=30)
    assert h.status_code == 200 and h.json()["status"] == "ok" and h.json()["models"] == ["tiny", "b"]


def test_concurrent_load_every_request_answered(server):
    body = {"model": "tiny", "prompt": "동시에 많은 요청", "max_tokens": 16, "temperature": 0.7, "ignore_eos": True}
    with cf.ThreadPoolExecutor(48) as ex:
        codes = list(ex.map(lambda i: post(server, {**body, "seed": i}).status_code, range(96)))
    assert all(c in (200, 503) for c in codes) and codes.count(200) >= 90, codes


def test_metrics_exported(server):
    post(server, {"model": "tiny", "prompt": "metrics", "max_tokens": 2})
    post(server, {"model": "nope", "prompt": "metrics"})
    want = ['ray_polyko_serve_requests_total{', 'ray_polyko_serve_request_latency_seconds_bucket{',
            'ray_polyko_serve_generated_tokens_total{', 'ray_polyko_serve_resident_models{']
    deadline, text = time.time() + 60, ""
    while time.time() < deadline:
        text = requests.get(server["metrics"], timeout=10).text
        if all(w in text for w in want) and 'status="404"' in text:
            break
        time.sleep(2)
    missing = [w for w in want if w not in text]
    assert not missing, missing
    reqs = [line for line in text.splitlines() if line.startswith("ray_polyko_serve_requests_total{")]
    assert any('model="tiny"' in line and 'status="200"' in line for line in reqs)
    assert any('model="-"' in line and 'status="404"' in line for line in reqs)   # unknown names: one label
    resident = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                if line.startswith("ray_polyko_serve_resident_models{")]
    assert resident and max(resident) <= 1   # max_resident=1


def test_lm_eval_local_completions_matches_hf(server, kobest_dir, monkeypatch):
    """KoBEST COPA (20 docs) through the endpoint == lm-eval's direct hf evaluation."""
    from polyko.eval.kobest import resolve_data, run_lm_eval

    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)   # local-completions sends it as the bearer key
    tasks = ["kobest_copa"]
    data = resolve_data(str(kobest_dir), tasks)
    ckpt = str(server["ckpt"])
    common = dict(tasks=tasks, data=data, shots=0, limit=20, seed=1234, log_samples=True)
    direct = run_lm_eval(model="hf", model_args={"pretrained": ckpt, "dtype": "float32"}, batch_size=8,
                         device="cpu", **common)
    api = run_lm_eval(model="local-completions", model_args={
        "model": "tiny", "base_url": server["url"] + "/v1/completions", "tokenizer": ckpt,
        "tokenizer_backend": "huggingface", "tokenized_requests": True, "num_concurrent": 4,
        "max_length": 512, "max_retries": 1}, batch_size=8, device=None, **common)
    for metric in ("acc,none", "f1,none"):
        assert api["results"]["kobest_copa"][metric] == direct["results"]["kobest_copa"][metric], metric
    d = {s["doc_id"]: s for s in direct["samples"]["kobest_copa"]}
    a = {s["doc_id"]: s for s in api["samples"]["kobest_copa"]}
    assert sorted(d) == sorted(a) and len(d) == 20
    n = 0
    for k in d:
        for (ld, gd), (la, ga) in zip([r[0] for r in d[k]["resps"]], [r[0] for r in a[k]["resps"]]):
            assert math.isclose(float(ld), float(la), abs_tol=1e-4), (k, ld, la)
            n += 1
    assert n == 40
