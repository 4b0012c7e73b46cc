"""Registry-following deployments: ``models:/name@alias`` served on a real private Ray cluster,
registered on a real MLflow server, promoted with ``jobs/register.py`` while clients keep
sending requests (JSON and streamed) over real HTTP. The switch must fail no request, and the
new version must answer afterwards (its own greedy text, its version in ``/v1/models``, in
``system_fingerprint`` and in the switch counter)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

REPO = Path(__file__).resolve().parents[1]
NAME = "polyko-follow"
PROMPT = {"prompt": "레지스트리를 따라가는 서비스", "max_tokens": 8, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def following_server(mlflow_server, make_tiny_checkpoint, tmp_path_factory):
    import ray
    from ray import serve

    from polyko.cluster import free_port, init_ray
    from polyko.registry import register_checkpoint
    from polyko.serve.app import build_app
    from polyko.serve.config import AutoscalingConfig, ModelSpec, ServeConfig

    os.environ["POLYKO_MODEL_CACHE"] = str(tmp_path_factory.mktemp("model_cache"))   # inherited by replicas
    assert register_checkpoint(make_tiny_checkpoint(0), NAME, alias="production") == "1"
    assert register_checkpoint(make_tiny_checkpoint(1), NAME) == "2"
    if ray.is_initialized():
        ray.shutdown()
    metrics_port = free_port()
    init_ray(num_cpus=2, include_dashboard=False, _metrics_export_port=metrics_port,
             _system_config={"metrics_report_interval_ms": 1000})
    port = free_port()
    cfg = ServeConfig(models=[ModelSpec.parse(f"models:/{NAME}@production")], port=port, follow_interval_s=1.0,
                      autoscaling=AutoscalingConfig(min_replicas=1, max_replicas=1, target_ongoing_requests=32))
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app(cfg), name=cfg.app_name, route_prefix="/")
        yield {"url": f"http://127.0.0.1:{port}", "metrics": f"http://127.0.0.1:{metrics_port}/metrics", "cfg": cfg}
    finally:
        serve.shutdown()
        ray.shutdown()
        os.environ.pop("POLYKO_MODEL_CACHE", None)


def complete(url, session, stream):
    """(status, fingerprint, text) of one request; a streamed one is read to [DONE]."""
    body = {"model": NAME, **PROMPT, "stream": stream}
    r = session.post(url + "/v1/completions", json=body, timeout=120, stream=stream)
    if r.status_code != 200:
        return r.status_code, None, r.text
    if not stream:
        b = r.json()
        return 200, b["system_fingerprint"], b["choices"][0]["text"]
    events = [line[len("data: "):] for line in r.iter_lines(decode_unicode=True) if line]
    if events[-1:] != ["[DONE]"] or any('"error"' in e for e in events):
        return 599, None, str(events[-3:])   # an error inside a 200 stream counts as a failure
    chunks = [json.loads(e) for e in events[:-1]]
    fps = {c["system_fingerprint"] for c in chunks}
    assert len(fps) == 1, fps   # one request, one version
    return 200, fps.pop(), "".join(c["choices"][0]["text"] for c in chunks)


@pytest.mark.slow   # ~2-3 min here: MLflow server, registrations, a Serve app, a switch under load
def test_alias_promotion_under_load_fails_no_request(following_server):
    url = following_server["url"]
    v1, v2 = f"models:/{NAME}/1", f"models:/{NAME}/2"
    with requests.Session() as s:
        status, fp, text_v1 = complete(url, s, False)
    assert (status, fp) == (200, v1), text_v1
    models = requests.get(url + "/v1/models", timeout=30).json()["data"]
    assert [(m["id"], m["source"], m["version"]) for m in models] == [(NAME, f"models:/{NAME}@production", "1")]

    results: list[tuple[float, int, str | None, str]] = []
    stop = threading.Event()

    def client(i):
        with requests.Session() as s:
            k = 0
            while not stop.is_set():
                try:
                    results.append((time.monotonic(), *complete(url, s, stream=(i + k) % 2 == 1)))
                except Exception as e:   # noqa: BLE001 - a dropped connection is a failed request
                    results.append((time.monotonic(), 0, None, repr(e)))
                k += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    try:
        time.sleep(2)
        promote = subprocess.run([sys.executable, str(REPO / "jobs" / "register.py"), "--name", NAME, "--alias",
                                  "production", "--version", "2"], capture_output=True, text=True, timeout=120,
                                 cwd=REPO, env=os.environ)
        assert promote.returncode == 0, promote.stderr[-2000:]
        promoted = time.monotonic()
        deadline = promoted + 120
        while time.monotonic() < deadline and not any(r[2] == v2 for r in results):
            time.sleep(0.2)
        time.sleep(2)   # keep the load on while the old version drains
    finally:
        stop.set()
        for t in threads:
            t.join(120)
    failed = [r for r in results if r[1] != 200]
    assert not failed, failed[:5]
    assert any(r[2] == v1 for r in results) and any(r[2] == v2 for r in results)
    text_v2 = next(r[3] for r in results if r[2] == v2)
    assert text_v2 != text_v1   # another checkpoint answers
    assert all(r[3] == {v1: text_v1, v2: text_v2}[r[2]] for r in results)   # each version whole
    switched = min(r[0] for r in results if r[2] == v2)
    assert all(r[2] == v2 for r in results if r[0] > switched + 10)   # no flapping back

    with requests.Session() as s:
        assert complete(url, s, False)[1:] == (v2, text_v2)
    models = requests.get(url + "/v1/models", timeout=30).json()["data"]
    assert models[0]["version"] == "2"

    from ray import serve

    handle = serve.get_deployment_handle("PolykoModel", app_name=following_server["cfg"].app_name)
    deadline = time.time() + 60
    while time.time() < deadline:
        served = handle.served.remote().result(timeout_s=30)[NAME]
        if served["draining"] == 0:
            break
        time.sleep(0.5)
    assert served == {"version": "2", "fingerprint": v2, "switches": 1, "draining": 0}   # old one unloaded
    deadline, lines = time.time() + 60, []
    while time.time() < deadline and not lines:
        text = requests.get(following_server["metrics"], timeout=10).text
        lines = [line for line in text.splitlines()
                 if line.startswith("ray_polyko_serve_model_switches_total{") and f'model="{NAME}"' in line]
        time.sleep(1)
    assert lines and float(lines[0].rsplit(" ", 1)[1]) == 1
