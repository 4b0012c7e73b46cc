"""The Ray Serve application: an OpenAI-style completions API over several checkpoints.

Two deployments:

* ``PolykoIngress`` (FastAPI): authentication (optional bearer key), request validation against
  the pydantic schema of :mod:`polyko.serve.api` (OpenAPI at ``/openapi.json``, ``/docs``),
  ``/v1/completions`` (JSON or SSE stream), ``/v1/models``, ``/health``, request metrics,
  timeouts and overload answers (503 + ``Retry-After``). A client that disconnects cancels its
  request; Serve cancels the model call with it and the engine drops its rows at the next step.
* ``PolykoModel``: holds up to ``max_resident`` checkpoints per replica (``@serve.multiplexed``:
  requests are routed to replicas that already hold their model; least-recently-used models are
  unloaded) and batches concurrent requests of each model into shared forward passes
  (:class:`polyko.serve.engine.HFEngine`). Autoscales on ongoing requests. A ``models:/name@alias``
  model follows its alias (:class:`ModelSlot`): every ``follow_interval_s`` the replica reads the
  alias; when it moved, the new version is loaded beside the old one, new requests go to it once
  it is ready, requests in flight finish on the old one, which is then unloaded. The switch is
  logged and counted (``polyko_serve_model_switches_total``).

A request's ``model`` field selects one of the configured names only; it is never a path.

Run it (CPU, one tiny checkpoint)::

    python jobs/serve.py --model tiny=work/quickstart/pretrain/hf
    serve run cluster/serve.yaml                  # the same, from a Serve config file

or from Python: ``serve.run(build_app(cfg))``; ``app_builder(args)`` is the import path for
Serve config files (``polyko.serve.app:app_builder``, args = a ServeConfig as a dict).
"""


import asyncio
import dataclasses
import hmac
import logging
import os
import re
import time
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from polyko.config import from_dict, to_dict
from polyko.serve import api
from polyko.serve.config import ModelSpec, ServeConfig
from polyko.serve.engine import HFEngine, RequestError, check_checkpoint_dir, overloaded
from polyko.serve.metrics import registry_metrics, resident_models_gauge, serve_metrics

log = logging.getLogger(__name__)


def resolve_source(spec: ModelSpec, version: str | None = None) -> str:
    """A local checkpoint directory for a configured model (downloads registry models).
    ``version`` pins a ``models:/name@alias`` source to the version the alias was read at."""
    if spec.is_registry_uri:
        try:
            from polyko.registry import resolve_model
        except ImportError as e:  # pragma: no cover - registry is part of the package
            raise ValueError(f"model {spec.name!r}: {spec.source} needs polyko.registry ({e})") from e
        uri = f"models:/{spec.alias[0]}/{version}" if (version and spec.alias) else spec.source
        return str(resolve_model(uri))
    return str(check_checkpoint_dir(spec.source))


def registry_version(spec: ModelSpec) -> str | None:
    """The registry version ``spec`` names now: the alias's target, the pinned ``models:/name/N``,
    or None (a directory, ``runs:/``, ``models:/name`` = latest)."""
    if spec.alias:
        from polyko.registry import alias_version

        return alias_version(*spec.alias)
    if m := re.fullmatch(r"models:/([^/@]+)/(\d+)/?", spec.source):
        return m[2]
    return None


# ---------------------------------------------------------------------------- model replicas
class ModelSlot:
    """One served name on a model replica: the engine answering it now and the registry version
    it runs. A request takes ``slot.engine`` and submits to it without yielding the event loop,
    so a switch (``swap``) never splits a request: requests already submitted to the old engine
    finish there (``HFEngine.close`` drains it, then frees the weights); later ones get the new."""

    def __init__(self, name: str, engine: HFEngine, version: str | None, spec: ModelSpec):
        self.name, self.engine, self.version, self.spec = name, engine, version, spec
        self.switches = 0
        self.retired: list[HFEngine] = []   # previous versions still finishing their requests
        self.follow_task: asyncio.Task | None = None
        self.on_close = None
        self._loop = asyncio.get_running_loop()

    @property
    def fingerprint(self) -> str | None:
        reg = self.spec.alias[0] if self.spec.alias else None
        return f"models:/{reg}/{self.version}" if (reg and self.version) else None

    def swap(self, engine: HFEngine, version: str) -> HFEngine:
        old, self.engine, self.version = self.engine, engine, version
        self.switches += 1
        old.close()
        self.retired = [e for e in self.retired + [old] if e.model is not None]
        return old

    def close(self) -> None:
        """Stop following, drain and free the engine. Callable from any thread (the
        multiplexer calls ``__del__`` from an executor thread)."""
        if self.follow_task is not None:
            if not self._loop.is_closed():
                self._loop.call_soon_threadsafe(self.follow_task.cancel)
            self.follow_task = None
        self.engine.close()
        if self.on_close is not None:
            self.on_close()
            self.on_close = None

    def __del__(self):
        # Serve's multiplexer calls __del__ when it evicts a model (LRU).
        self.close()


class _ModelServerBase:
    """Everything of the model deployment except the multiplexed loader (which needs
    ``max_resident`` at class-definition time, see :func:`model_deployment`)."""

    def __init__(self, cfg: ServeConfig):
        self.cfg = cfg
        self.slots: dict[str, ModelSlot] = {}
        try:
            self.replica = serve.get_replica_context().replica_id.unique_id
        except Exception:
            self.replica = str(os.getpid())
        self._gauge()

    def _gauge(self) -> None:
        resident_models_gauge().set(len(self.slots), tags={"replica": self.replica})

    def _build(self, name: str, spec: ModelSpec, version: str | None) -> HFEngine:
        threads = self.cfg.engine.torch_threads or max(1, int(self.cfg.num_cpus))
        return HFEngine(resolve_source(spec, version), self.cfg.engine, name=name, num_threads=threads,
                        max_stop=self.cfg.limits.max_stop)

    async def _load(self, name: str) -> ModelSlot:
        spec = self.cfg.model(name)
        if spec is None:   # the ingress checks too; never load anything not configured
            raise RequestError(f"model {name!r} is not served here", "model", status=404, code="model_not_found")
        loop = asyncio.get_running_loop()

        def build() -> tuple[HFEngine, str | None]:
            # Read the alias once and load exactly that version (the alias may move meanwhile).
            version = registry_version(spec)
            return self._build(name, spec, version), version

        engine, version = await loop.run_in_executor(None, build)
        slot = ModelSlot(name, engine, version, spec)
        slot.on_close = lambda: (self.slots.pop(name) if self.slots.get(name) is slot else None, self._gauge())
        self.slots[name] = slot
        self._gauge()
        if version is not None:
            registry_metrics()[1].set(int(version), tags={"model": name, "replica": self.replica})
        if spec.alias and self.cfg.follow_interval_s > 0:
            slot.follow_task = loop.create_task(self._follow(slot))
        log.info("loaded model %s (%s, version %s) on replica %s", name, spec.source, version, self.replica)
        return slot

    async def _follow(self, slot: ModelSlot) -> None:
        """Poll the registry alias of ``slot``; when it moves, load the new version beside the
        current one (which keeps serving), then switch. A failed poll or load keeps the current
        version serving and is retried at the next poll."""
        loop = asyncio.get_running_loop()
        name, reg = slot.name, slot.spec.alias
        while True:
            await asyncio.sleep(self.cfg.follow_interval_s)
            try:
                from polyko.registry import alias_version

                version = await loop.run_in_executor(None, alias_version, *reg)
                if version == slot.version:
                    continue
                log.info("model %s: models:/%s@%s moved to version %s (serving %s); loading it beside",
                         name, reg[0], reg[1], version, slot.version)
                t0 = time.perf_counter()
                engine = await loop.run_in_executor(None, self._build, name, slot.spec, version)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - keep serving what is loaded
                log.warning("model %s: following models:/%s@%s failed (%s); still serving version %s",
                            name, reg[0], reg[1], e, slot.version)
                continue
            if self.slots.get(name) is not slot:   # evicted while loading
                engine.close()
                return
            old = slot.version
            slot.swap(engine, version)
            switches, gauge = registry_metrics()
            switches.inc(1, tags={"model": name})
            gauge.set(int(version), tags={"model": name, "replica": self.replica})
            log.info("model %s: switched from version %s to %s on replica %s (loaded in %.1f s); "
                     "requests in flight on version %s finish there, then it is unloaded",
                     name, old, version, self.replica, time.perf_counter() - t0, old)

    async def _slot(self, name: str) -> ModelSlot:
        try:
            return await self.get_engine(name)
        except RequestError:
            raise
        except Exception as e:
            raise RequestError(f"model {name!r} could not be loaded: {e}", "model", status=503,
                               type="server_error", code="model_load_failed", retry_after=5) from e

    async def served(self) -> dict[str, dict[str, Any]]:
        """What this replica serves: per resident name, the version and switch count."""
        return {n: {"version": s.version, "fingerprint": s.fingerprint, "switches": s.switches,
                    "draining": sum(e.model is not None for e in s.retired)}
                for n, s in self.slots.items()}

    async def stats(self) -> dict[str, Any]:
        """Engine counters per resident model and this process's RSS (benchmarks, tests)."""
        import psutil

        return {"pid": os.getpid(), "rss_bytes": psutil.Process().memory_info().rss,
                "models": {n: {**s.engine.stats(), "version": s.version} for n, s in self.slots.items()}}

    async def complete(self, req: api.CompletionRequest) -> dict[str, Any]:
        """Non-streaming completion: ``{"status", "body", "generated", "retry_after"}``."""
        try:
            slot = await self._slot(req.model)
            engine, fingerprint = slot.engine, slot.fingerprint   # no await until submitted: see ModelSlot
            seqs = engine.prepare(req.prompts, req.params, timeout_s=self.cfg.limits.request_timeout_s)
            await engine.run(seqs)   # cancelled with this call (client gone): its rows leave at the next step
            if any(s.finish_reason == "timeout" for s in seqs):
                raise overloaded(f"request timed out after {self.cfg.limits.request_timeout_s} s", 5.0)
            body = api.completion_body(engine, req, seqs, api.new_id(), req.model, fingerprint)
            return {"status": 200, "body": body, "generated": body["usage"]["completion_tokens"],
                    "version": slot.version}
        except RequestError as e:
            return {"status": e.status, "body": e.body(), "retry_after": e.retry_after}

    async def stream(self, req: api.CompletionRequest) -> AsyncIterator[dict[str, Any]]:
        """Streaming completion: first ``{"status": ...}`` (an error body when refused), then
        ``{"data": bytes}`` SSE events, the last one ``data: [DONE]``."""
        try:
            slot = await self._slot(req.model)
            engine, fingerprint = slot.engine, slot.fingerprint   # no await until submitted: see ModelSlot
            seqs = engine.prepare(req.prompts, req.params, timeout_s=self.cfg.limits.request_timeout_s)
            engine.submit(seqs)
        except RequestError as e:
            yield {"status": e.status, "body": e.body(), "retry_after": e.retry_after}
            return
        yield {"status": 200, "version": slot.version}
        rid, p = api.new_id(), req.params
        sent_text = [0] * len(seqs)
        sent_tok = [0] * len(seqs)
        finished = [False] * len(seqs)
        prefix = [0] * len(seqs)
        try:
            if p.echo:
                # The first chunks are the prompts (and their log-probs), once prefill has run.
                async for _ in engine.updates(seqs):
                    if all(s.done or s.generated for s in seqs):
                        break
                for s in seqs:
                    if s.error is not None:
                        break
                    text = api.prompt_text(engine, s)
                    prefix[s.index] = len(text)
                    lp = None
                    if p.logprobs is not None:
                        lp = api.logprobs_block(engine, s, prompt=True, gen_start=0, gen_end=0, text_start=0)
                    yield {"data": api.sse(api.chunk(rid, req.model, s.index, text, lp, None, fingerprint))}
            async for _ in engine.updates(seqs):
                for s in seqs:
                    i = s.index
                    if finished[i]:
                        continue
                    if s.error is not None or s.finish_reason == "timeout":
                        err = s.error or overloaded("request timed out", 5.0)
                        yield {"data": api.sse(err.body())}
                        finished[i] = True
                        continue
                    end = s.safe_text_end()
                    text = s.text[sent_text[i]:end]
                    ntok = len(s.generated) if (text or s.done) else sent_tok[i]
                    if not text and not s.done:
                        continue
                    lp = None
                    if p.logprobs is not None:
                        lp = api.logprobs_block(engine, s, prompt=False, gen_start=sent_tok[i], gen_end=ntok,
                                                text_start=prefix[i])
                    yield {"data": api.sse(api.chunk(rid, req.model, i, text, lp, s.finish_reason, fingerprint))}
                    sent_text[i], sent_tok[i] = end, ntok
                    finished[i] = s.done
            if req.include_usage:
                body = api.chunk(rid, req.model, 0, "", None, None, fingerprint)
                body["choices"] = []
                body["usage"] = api.usage(seqs)
                yield {"data": api.sse(body)}
            yield {"data": api.sse("[DONE]"), "generated": sum(len(s.generated) for s in seqs)}
        finally:
            for s in seqs:
                s.cancelled = True

    async def resident(self) -> list[str]:
        return sorted(self.slots)


def model_deployment(cfg: ServeConfig):
    """The model deployment class, with ``@serve.multiplexed`` bounded by ``cfg.max_resident``."""

    class PolykoModel(_ModelServerBase):
        @serve.multiplexed(max_num_models_per_replica=cfg.max_resident)
        async def get_engine(self, name: str) -> ModelSlot:
            return await self._load(name)

    a = cfg.autoscaling
    return serve.deployment(PolykoModel).options(
        name="PolykoModel",
        autoscaling_config={"min_replicas": a.min_replicas, "max_replicas": a.max_replicas,
                            "target_ongoing_requests": a.target_ongoing_requests,
                            "upscale_delay_s": a.upscale_delay_s, "downscale_delay_s": a.downscale_delay_s},
        max_ongoing_requests=cfg.max_ongoing_requests,
        max_queued_requests=cfg.max_queued_requests,
        ray_actor_options={"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus},
        graceful_shutdown_timeout_s=10,
    )


# ---------------------------------------------------------------------------- HTTP ingress
fastapi_app = FastAPI(title="polyko", version="0.1.0",
                      description="OpenAI-style completions for polyko checkpoints (legacy `/v1/completions`). "
                                  "Errors are `{\"error\": {\"message\", \"type\", \"param\", \"code\"}}`; "
                                  "with an API key configured, send `Authorization: Bearer <key>`.",
                      docs_url="/docs", redoc_url=None, openapi_url="/openapi.json")
_ERRORS = {s: {"model": api.ErrorResponse} for s in (400, 401, 404, 413, 503)}


def _ingress() -> "PolykoIngress":
    return serve.get_replica_context().servable_object


@fastapi_app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException):
    # Unknown routes/methods in the OpenAI error shape too.
    return JSONResponse(api.error_body(str(exc.detail), None, code=str(exc.status_code)), status_code=exc.status_code)


@fastapi_app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError):
    """A body that does not fit the schema: 400 in OpenAI's shape, ``param`` naming the field."""
    err = api.request_error(list(exc.errors()))
    body = getattr(exc, "body", None)
    ingress = _ingress()
    model = body.get("model") if isinstance(body, dict) else None
    tag = model if isinstance(model, str) and ingress.cfg.model(model) else "-"
    ingress.metrics.record(tag, err.status, 0.0)
    return _error_response(err.status, err.body())


class _Guard:
    """ASGI middleware in front of ``/v1/``: the bearer key and the declared body size are checked
    before the body is read or parsed (a pure ASGI layer: streaming and client-disconnect
    cancellation pass through untouched)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope.get("path", "").startswith("/v1/"):
            return await self.app(scope, receive, send)
        ingress = _ingress()
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        resp = None
        if not ingress.authorized(headers.get("authorization", "")):
            resp = _error_response(401, api.error_body("missing or invalid API key (Authorization: Bearer <key>)",
                                                       None, code="invalid_api_key"))
        else:
            declared, limit = headers.get("content-length", ""), ingress.cfg.limits.max_body_bytes
            if declared.isdigit() and int(declared) > limit:
                resp = _error_response(413, RequestError(f"request body is {declared} bytes; the limit is {limit}",
                                                         None, status=413).body())
        if resp is None:
            return await self.app(scope, receive, send)
        if scope["path"] == "/v1/completions":
            ingress.metrics.record("-", resp.status_code, 0.0)
        await resp(scope, receive, send)


fastapi_app.add_middleware(_Guard)


def _error_response(status: int, body: dict, retry_after: float | None = None) -> JSONResponse:
    headers = {"Retry-After": str(max(1, int(round(retry_after))))} if retry_after else None
    if status == 401:
        headers = {**(headers or {}), "WWW-Authenticate": "Bearer"}
    return JSONResponse(body, status_code=status, headers=headers)


@serve.deployment(name="PolykoIngress")
@serve.ingress(fastapi_app)
class PolykoIngress:
    def __init__(self, model_handle, cfg: ServeConfig):
        self.cfg = cfg
        self.handle = model_handle
        self.api_key = None
        if cfg.api_key_env:
            self.api_key = os.environ.get(cfg.api_key_env, "")
            if not self.api_key:
                raise ValueError(f"api_key_env={cfg.api_key_env!r} but that environment variable is empty or unset "
                                 "on the Serve replica")
        self.created = int(time.time())
        self.metrics = serve_metrics()
        self.versions: dict[str, str | None] = {}   # model -> version of its latest answer

    def authorized(self, authorization: str) -> bool:
        if self.api_key is None:
            return True
        scheme, _, token = authorization.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode())

    @fastapi_app.get("/health", response_model=api.Health)
    async def health(self) -> dict:
        return {"status": "ok", "models": [m.name for m in self.cfg.models]}

    @fastapi_app.get("/v1/models", response_model=api.ModelList, responses=_ERRORS)
    async def models(self):
        """The served names, their configured sources and, for registry models, the version
        answering now (as the model replica asked reports it, else the latest answer's)."""
        versions = dict(self.versions)
        try:
            served = await asyncio.wait_for(self.handle.served.remote(), 10)
            versions.update({n: v["version"] for n, v in served.items()})
        except Exception as e:  # noqa: BLE001 - the listing does not depend on a model replica
            log.warning("could not ask a model replica for versions: %s", e)
        return {"object": "list", "data": [
            {"id": m.name, "object": "model", "created": self.created, "owned_by": "polyko", "source": m.source,
             "version": versions.get(m.name)} for m in self.cfg.models]}

    @fastapi_app.post("/v1/completions", response_model=api.CompletionResponse, responses=_ERRORS)
    async def completions(self, body: api.CompletionRequestBody):
        """A completion (JSON), or with ``stream`` server-sent events of the same objects."""
        t0 = time.perf_counter()
        model_tag = body.model if self.cfg.model(body.model) else "-"
        status, generated, streaming = 500, 0, False
        try:
            try:
                req = api.to_request(body, self.cfg)
            except RequestError as e:
                status = e.status
                return _error_response(e.status, e.body(), e.retry_after)
            handle = self.handle.options(multiplexed_model_id=req.model)
            timeout = self.cfg.limits.request_timeout_s + 30   # the engine's own deadline fires first
            if req.stream:
                resp, status = await self._stream(handle, req, timeout, t0, model_tag)
                streaming = isinstance(resp, StreamingResponse)   # its generator records the metrics
                return resp
            result = await self._call(handle.complete.remote(req), timeout)
            status, generated = result["status"], result.get("generated", 0)
            if status != 200:
                return _error_response(status, result["body"], result.get("retry_after"))
            self.versions[req.model] = result.get("version")
            return JSONResponse(result["body"])
        except RequestError as e:
            status = e.status
            return _error_response(e.status, e.body(), e.retry_after)
        except asyncio.CancelledError:   # the client went away: Serve cancels the model call with us
            status = 499
            raise
        except Exception as e:   # a bug: answer in the API's shape and keep the replica serving
            log.exception("completion failed")
            status = 500
            return _error_response(500, api.error_body(f"internal error: {type(e).__name__}", None, "server_error"))
        finally:
            if not streaming:
                self.metrics.record(model_tag, status, time.perf_counter() - t0, generated)

    async def _call(self, response, timeout: float):
        from ray.serve.exceptions import BackPressureError

        try:
            return await asyncio.wait_for(response, timeout)
        except asyncio.TimeoutError:
            response.cancel()
            raise overloaded(f"request timed out after {timeout:.0f} s", 5.0) from None
        except asyncio.CancelledError:
            response.cancel()   # explicit: the model replica's engine drops the rows at its next step
            raise
        except BackPressureError:
            raise overloaded("all model replicas are busy; retry later", 1.0) from None

    async def _stream(self, handle, req, timeout, t0, model_tag):
        from ray.serve.exceptions import BackPressureError

        gen = handle.options(stream=True).stream.remote(req)
        try:
            first = await asyncio.wait_for(gen.__anext__(), timeout)
        except asyncio.TimeoutError:
            gen.cancel()
            raise overloaded("request timed out before generation started", 5.0) from None
        except BackPressureError:
            raise overloaded("all model replicas are busy; retry later", 1.0) from None
        if first["status"] != 200:
            return _error_response(first["status"], first["body"], first.get("retry_after")), first["status"]
        self.versions[req.model] = first.get("version")
        request_state = {"generated": 0}
        metrics = self.metrics

        async def events():
            status = 200
            try:
                deadline = time.monotonic() + timeout
                while True:
                    try:
                        item = await asyncio.wait_for(gen.__anext__(), max(0.1, deadline - time.monotonic()))
                    except StopAsyncIteration:
                        break
                    request_state["generated"] = item.get("generated", request_state["generated"])
                    yield item["data"]
            except asyncio.TimeoutError:
                gen.cancel()
                status = 503
                yield api.sse(overloaded("request timed out", 5.0).body())
                yield api.sse("[DONE]")
            except asyncio.CancelledError:   # client went away
                gen.cancel()
                status = 499
                raise
            finally:
                metrics.record(model_tag, status, time.perf_counter() - t0, request_state["generated"])

        resp = StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return resp, 200


# ---------------------------------------------------------------------------- building the app
def build_app(cfg: ServeConfig):
    """The Serve application for ``cfg`` (local checkpoints are checked here, before deploying)."""
    if not cfg.models:
        raise ValueError("no models to serve: give at least one --model")
    # Local sources become absolute paths: replicas do not share the builder's working directory.
    models = [m if m.is_registry_uri else ModelSpec(m.name, str(check_checkpoint_dir(m.source).resolve()))
              for m in cfg.models]
    cfg = dataclasses.replace(cfg, models=models)
    model = model_deployment(cfg).bind(cfg)
    a = cfg.autoscaling
    ingress = PolykoIngress.options(
        autoscaling_config={"min_replicas": 1, "max_replicas": a.max_replicas,
                            "target_ongoing_requests": 4 * a.target_ongoing_requests},
        # The ingress only parses and forwards: it shares CPUs with model replicas.
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=4 * cfg.max_ongoing_requests,
    )
    return ingress.bind(model, cfg)


def app_builder(args: dict[str, Any]):
    """Import path for Serve config files: ``polyko.serve.app:app_builder`` with ``args`` = the
    ServeConfig as a dict (``models: [{name, source}]``, ``limits: {...}``, ...)."""
    return build_app(from_dict(ServeConfig, dict(args)))


def run_service(cfg: ServeConfig, *, ray_address: str | None = None, blocking: bool = True,
                track: bool = True) -> str:
    """Start (or join) Ray, start Serve's HTTP proxy on ``cfg.host:cfg.port`` and deploy the app.
    Returns the base URL; with ``blocking`` it serves until interrupted, then shuts Serve down.
    With ``track`` the deployment is an MLflow run (stage ``serve``: config as params, the served
    checkpoints' runs as parents) that stays open while serving; MLflow being unreachable only
    logs a warning -- serving does not depend on it."""
    import contextlib

    from polyko import tracking
    from polyko.cluster import init_ray

    if cfg.api_key_env and not os.environ.get(cfg.api_key_env):
        raise ValueError(f"--api-key-env {cfg.api_key_env}: that environment variable is empty or unset")
    app = build_app(cfg)   # fails fast on bad checkpoints
    init_ray(ray_address)
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    serve.run(app, name=cfg.app_name, route_prefix=cfg.route_prefix, blocking=False)
    url = f"http://{cfg.host}:{cfg.port}{cfg.route_prefix.rstrip('/')}"
    log.info("config %s", to_dict(cfg))
    print(f"serving {[m.name for m in cfg.models]} at {url}/v1/completions", flush=True)
    if not blocking:
        return url
    with contextlib.ExitStack() as stack:
        if track:
            try:
                parents = tracking.lineage(*[m.source for m in cfg.models if not m.is_registry_uri])
                run = stack.enter_context(tracking.start_run(
                    "serve", cfg, parents=parents, tags={"polyko.serve.url": url,
                                                         "polyko.serve.models": ",".join(m.name for m in cfg.models)}))
                print(f"MLflow: {tracking.run_url(run)}", flush=True)
            except Exception as e:  # noqa: BLE001 - tracking is optional for serving
                log.warning("MLflow tracking unavailable (%s); serving without a run", e)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
        finally:
            serve.shutdown()
    return url
