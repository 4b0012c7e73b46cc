"""The Ray Serve application: an OpenAI-style completions API over several checkpoints.

Two deployments:

* ``PolykoIngress`` (FastAPI): authentication (optional bearer key), request validation
  (:mod:`polyko.serve.api`), ``/v1/completions`` (JSON or SSE stream), ``/v1/models``,
  ``/health``, request metrics, timeouts and overload answers (503 + ``Retry-After``).
* ``PolykoModel``: holds up to ``max_resident`` checkpoints per replica (``@serve.multiplexed``:
  requests are routed to replicas that already hold their model; least-recently-used models are
  unloaded) and batches concurrent requests of each model into shared forward passes
  (:class:`polyko.serve.engine.HFEngine`). Autoscales on ongoing requests.

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
import time
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from polyko.config import from_dict, to_dict
from polyko.serve import api
from polyko.serve.config import ModelSpec, ServeConfig
from polyko.serve.engine import HFEngine, RequestError, check_checkpoint_dir, overloaded
from polyko.serve.metrics import resident_models_gauge, serve_metrics

log = logging.getLogger(__name__)


def resolve_source(spec: ModelSpec) -> str:
    """A local checkpoint directory for a configured model (downloads registry models)."""
    if spec.is_registry_uri:
        try:
            from polyko.registry import resolve_model
        except ImportError as e:  # pragma: no cover - registry is part of the package
            raise ValueError(f"model {spec.name!r}: {spec.source} needs polyko.registry ({e})") from e
        return str(resolve_model(spec.source))
    return str(check_checkpoint_dir(spec.source))


# ---------------------------------------------------------------------------- model replicas
class _ModelServerBase:
    """Everything of the model deployment except the multiplexed loader (which needs
    ``max_resident`` at class-definition time, see :func:`model_deployment`)."""

    def __init__(self, cfg: ServeConfig):
        self.cfg = cfg
        self.engines: dict[str, HFEngine] = {}
        try:
            self.replica = serve.get_replica_context().replica_id.unique_id
        except Exception:
            self.replica = str(os.getpid())
        self._gauge()

    def _gauge(self) -> None:
        resident_models_gauge().set(len(self.engines), tags={"replica": self.replica})

    async def _load(self, name: str) -> HFEngine:
        spec = self.cfg.model(name)
        if spec is None:   # the ingress checks too; never load anything not configured
            raise RequestError(f"model {name!r} is not served here", "model", status=404, code="model_not_found")
        loop = asyncio.get_running_loop()
        threads = self.cfg.engine.torch_threads or max(1, int(self.cfg.num_cpus))

        def build() -> HFEngine:
            return HFEngine(resolve_source(spec), self.cfg.engine, name=name, num_threads=threads,
                            max_stop=self.cfg.limits.max_stop)

        engine = await loop.run_in_executor(None, build)
        engine.on_close = lambda: (self.engines.pop(name, None), self._gauge())
        self.engines[name] = engine
        self._gauge()
        log.info("loaded model %s (%s) on replica %s", name, spec.source, self.replica)
        return engine

    async def _engine(self, name: str) -> HFEngine:
        try:
            return await self.get_engine(name)
        except RequestError:
            raise
        except Exception as e:
            raise RequestError(f"model {name!r} could not be loaded: {e}", "model", status=503,
                               type="server_error", code="model_load_failed", retry_after=5) from e

    async def complete(self, req: api.CompletionRequest) -> dict[str, Any]:
        """Non-streaming completion: ``{"status", "body", "generated", "retry_after"}``."""
        try:
            engine = await self._engine(req.model)
            seqs = engine.prepare(req.prompts, req.params, timeout_s=self.cfg.limits.request_timeout_s)
            await engine.run(seqs)
            if any(s.finish_reason == "timeout" for s in seqs):
                raise overloaded(f"request timed out after {self.cfg.limits.request_timeout_s} s", 5.0)
            body = api.completion_body(engine, req, seqs, api.new_id(), req.model)
            return {"status": 200, "body": body, "generated": body["usage"]["completion_tokens"]}
        except RequestError as e:
            return {"status": e.status, "body": e.body(), "retry_after": e.retry_after}

    async def stream(self, req: api.CompletionRequest) -> AsyncIterator[dict[str, Any]]:
        """Streaming completion: first ``{"status": ...}`` (an error body when refused), then
        ``{"data": bytes}`` SSE events, the last one ``data: [DONE]``."""
        try:
            engine = await self._engine(req.model)
            seqs = engine.prepare(req.prompts, req.params, timeout_s=self.cfg.limits.request_timeout_s)
            engine.submit(seqs)
        except RequestError as e:
            yield {"status": e.status, "body": e.body(), "retry_after": e.retry_after}
            return
        yield {"status": 200}
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
                    yield {"data": api.sse(api.chunk(rid, req.model, s.index, text, lp, None))}
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
                    yield {"data": api.sse(api.chunk(rid, req.model, i, text, lp, s.finish_reason))}
                    sent_text[i], sent_tok[i] = end, ntok
                    finished[i] = s.done
            if req.include_usage:
                body = api.chunk(rid, req.model, 0, "", None, None)
                body["choices"] = []
                body["usage"] = api.usage(seqs)
                yield {"data": api.sse(body)}
            yield {"data": api.sse("[DONE]"), "generated": sum(len(s.generated) for s in seqs)}
        finally:
            for s in seqs:
                s.cancelled = True

    async def resident(self) -> list[str]:
        return sorted(self.engines)


def model_deployment(cfg: ServeConfig):
    """The model deployment class, with ``@serve.multiplexed`` bounded by ``cfg.max_resident``."""

    class PolykoModel(_ModelServerBase):
        @serve.multiplexed(max_num_models_per_replica=cfg.max_resident)
        async def get_engine(self, name: str) -> HFEngine:
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
fastapi_app = FastAPI(title="polyko", description="OpenAI-style completions for polyko checkpoints",
                      docs_url=None, redoc_url=None, openapi_url=None)


@fastapi_app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException):
    # Unknown routes/methods in the OpenAI error shape too.
    return JSONResponse(api.error_body(str(exc.detail), None, code=str(exc.status_code)), status_code=exc.status_code)


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

    def _authorized(self, request: Request) -> bool:
        if self.api_key is None:
            return True
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode())

    def _unauthorized(self) -> JSONResponse:
        return _error_response(401, api.error_body("missing or invalid API key (Authorization: Bearer <key>)",
                                                   None, code="invalid_api_key"))

    @fastapi_app.get("/health")
    async def health(self) -> dict:
        return {"status": "ok", "models": [m.name for m in self.cfg.models]}

    @fastapi_app.get("/v1/models")
    async def models(self, request: Request):
        if not self._authorized(request):
            return self._unauthorized()
        return {"object": "list", "data": [
            {"id": m.name, "object": "model", "created": self.created, "owned_by": "polyko", "source": m.source}
            for m in self.cfg.models]}

    @fastapi_app.post("/v1/completions")
    async def completions(self, request: Request):
        t0 = time.perf_counter()
        model_tag = "-"
        status, generated, streaming = 500, 0, False
        try:
            if not self._authorized(request):
                status = 401
                return self._unauthorized()
            try:
                declared = request.headers.get("content-length", "")
                if declared.isdigit() and int(declared) > self.cfg.limits.max_body_bytes:
                    raise RequestError(f"request body is {declared} bytes; the limit is "
                                       f"{self.cfg.limits.max_body_bytes}", None, status=413)
                body = api.parse_json(await request.body(), self.cfg)
                if isinstance(body, dict) and isinstance(body.get("model"), str) and self.cfg.model(body["model"]):
                    model_tag = body["model"]
                req = api.parse_completion_request(body, self.cfg)
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
            return JSONResponse(result["body"])
        except RequestError as e:
            status = e.status
            return _error_response(e.status, e.body(), e.retry_after)
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
