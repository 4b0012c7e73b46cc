"""OpenAI completions protocol: the request and response schema, validation, response shapes.

The bodies are pydantic models (:class:`CompletionRequestBody`, :class:`CompletionResponse`,
:class:`ModelList`, :class:`ErrorResponse`): FastAPI validates requests against them on the
ingress and serves the schema at ``/openapi.json`` (Swagger UI at ``/docs``). Validation is strict
(no coercion: ``"5"`` is not an integer, ``1`` is not a boolean), and :func:`request_error` turns
pydantic's errors into OpenAI's error body ``{"error": {"message", "type", "param", "code"}}``,
HTTP 400, ``param`` naming the offending field. Bounds that depend on the service's
``ServeConfig.limits`` (max_tokens, prompts per request, logprobs, stop strings) are checked by
:func:`to_request` after the schema; prompt lengths are checked against the model's context by
the engine before anything is queued. Nothing a client sends can reach a 5xx.

The builders make ``text_completion`` bodies and SSE chunks from engine sequences, in the shapes
of OpenAI's legacy ``/v1/completions`` (which lm-eval's ``local-completions`` consumes):
``logprobs = {tokens, token_logprobs, top_logprobs, text_offset}`` where ``tokens`` and the keys
of ``top_logprobs`` are raw vocabulary strings (unique per id), and with ``echo`` the prompt's
tokens come first with a ``None`` log-prob for the first one. ``system_fingerprint`` names the
registry version that answered (``models:/name/3``) when the model comes from the registry.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, WrapValidator, field_validator
from pydantic_core import PydanticCustomError

from polyko.serve.config import ServeConfig
from polyko.serve.engine import RequestError, SamplingParams, Sequence

# ---------------------------------------------------------------------- request schema
NonEmptyStr = Annotated[str, Field(min_length=1)]
TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
_PROMPT_SHAPES = ("a non-empty string, a list of non-empty strings, a list of token ids (integers >= 0) "
                  "or a list of non-empty token-id lists")


def _prompt_shape(v: Any, handler):
    # One clear message instead of one error per union member.
    try:
        return handler(v)
    except ValidationError as e:
        # The deepest error is the member that got furthest (e.g. an empty inner list).
        first = max(e.errors(), key=lambda x: len(x["loc"]))
        where = "".join(f"[{x}]" for x in first["loc"] if isinstance(x, int))
        raise PydanticCustomError("prompt_shape", "'prompt' must be {shapes}; got {got}{where}: {why}",
                                  {"shapes": _PROMPT_SHAPES, "got": type(v).__name__, "where": where,
                                   "why": first["msg"]}) from None


Prompt = Annotated[Union[NonEmptyStr, Annotated[list[NonEmptyStr], Field(min_length=1)], TokenIds,
                         Annotated[list[TokenIds], Field(min_length=1)]],
                   WrapValidator(_prompt_shape)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    include_usage: bool = Field(False, description="Send a last chunk with `usage` before `[DONE]`.")


class CompletionRequestBody(BaseModel):
    """``POST /v1/completions`` (OpenAI's legacy completions API). Unknown fields are ignored;
    accepted-but-unimplemented OpenAI fields are allowed only at their neutral value."""

    model_config = ConfigDict(strict=True, extra="ignore", json_schema_extra={
        "examples": [{"model": "tiny", "prompt": "대한민국의 수도는", "max_tokens": 16, "temperature": 0}]})

    model: str = Field(description="A served model name (`GET /v1/models`); never a path.")
    prompt: Prompt = Field(description="One prompt or several (each one choice): strings or token-id lists.")
    max_tokens: Optional[int] = Field(None, ge=0, description="Tokens to generate (default "
                                      "`limits.default_max_tokens`, at most `limits.max_tokens_limit`); "
                                      "0 with `echo` scores the prompt only.")
    temperature: Optional[float] = Field(None, ge=0, le=2, allow_inf_nan=False,
                                         description="0 is greedy; default 1.")
    top_p: Optional[float] = Field(None, gt=0, le=1, allow_inf_nan=False, description="Nucleus sampling mass.")
    stop: Optional[Union[NonEmptyStr, list[NonEmptyStr]]] = Field(
        None, description="Stop strings (at most `limits.max_stop`); the text ends before the first one.")
    seed: Optional[int] = Field(None, ge=-(2 ** 63), lt=2 ** 63, description="Reproducible sampling.")
    logprobs: Optional[int] = Field(None, ge=0, description="Top log-probs per token (at most "
                                    "`limits.max_logprobs`); 0 returns the chosen tokens' log-probs only.")
    echo: Optional[bool] = Field(False, description="Return the prompt (and its log-probs) before the generation.")
    stream: Optional[bool] = Field(False, description="Server-sent events, one chunk per step, `data: [DONE]` last.")
    stream_options: Optional[StreamOptions] = None
    ignore_eos: Optional[bool] = Field(False, description="Keep generating past the end-of-text token.")
    n: Optional[int] = Field(None, description="Only 1.")
    best_of: Optional[int] = Field(None, description="Only 1.")
    presence_penalty: Optional[float] = Field(None, description="Only 0.")
    frequency_penalty: Optional[float] = Field(None, description="Only 0.")
    logit_bias: Optional[dict[str, float]] = Field(None, description="Only empty.")
    suffix: Optional[str] = Field(None, description="Not supported (null only).")
    user: Optional[str] = Field(None, description="Ignored.")

    @field_validator("n", "best_of")
    @classmethod
    def _only_one(cls, v, info):
        if v is not None and v != 1:
            raise ValueError(f"'{info.field_name}' is not supported by this server (only 1)")
        return v

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _only_zero(cls, v, info):
        if v is not None and v != 0:
            raise ValueError(f"'{info.field_name}' is not supported by this server (only 0)")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, v):
        if v:
            raise ValueError("'logit_bias' is not supported by this server (only {} or null)")
        return v

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, v):
        if v is not None:
            raise ValueError("'suffix' is not supported by this server (only null)")
        return v


@dataclass
class CompletionRequest:
    """A validated request, as the model replicas receive it (no pydantic across processes)."""

    model: str
    prompts: list[str | list[int]]
    params: SamplingParams
    stream: bool = False
    include_usage: bool = False   # stream_options.include_usage: a final chunk with usage


def request_error(errors: list[dict[str, Any]]) -> RequestError:
    """Pydantic/FastAPI validation errors -> one 400 ``RequestError`` naming the first bad field."""
    if not errors:
        return RequestError("invalid request", None)
    e = errors[0]
    loc = list(e.get("loc", ()))
    if loc and loc[0] == "body":       # FastAPI prefixes body fields with "body"
        loc = loc[1:]
    param = loc[0] if loc and isinstance(loc[0], str) else None
    kind, msg = e.get("type", ""), str(e.get("msg", "invalid value"))
    if kind == "json_invalid":
        message = f"request body is not valid JSON: {e.get('ctx', {}).get('error', msg)}"
    elif param is None:
        message = f"request body must be a JSON object with the completion fields: {msg}"
    elif kind == "missing":
        message = f"missing required field '{param}'"
    elif kind == "prompt_shape":
        message = msg
    else:
        msg = msg.removeprefix("Value error, ")
        rest = "".join(f"[{x}]" for x in loc[1:] if isinstance(x, int))   # not pydantic's union tags
        message = msg if msg.startswith(f"'{param}'") else f"'{param}{rest}': {msg}"
        if "input" in e and kind not in ("missing",):
            message += f" (got {json.dumps(e['input'], default=str)[:100]})"
    if len(errors) > 1:
        message += f" ({len(errors) - 1} more error{'s' if len(errors) > 2 else ''})"
    return RequestError(message[:1000], param)


def check_model(name: str, cfg: ServeConfig) -> None:
    if cfg.model(name) is None:
        # Only configured names: a request can never make the service load a path of its choosing.
        raise RequestError(f"model {name[:200]!r} does not exist; served models: {[m.name for m in cfg.models]}",
                           "model", status=404, code="model_not_found")


def to_request(body: CompletionRequestBody, cfg: ServeConfig) -> CompletionRequest:
    """A schema-valid body checked against the service's limits (``RequestError`` naming the field)."""
    lim = cfg.limits
    check_model(body.model, cfg)
    prompts = body.prompt
    if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
        prompts = [prompts]                      # one prompt (a string or token ids)
    if len(prompts) > lim.max_prompts:
        raise RequestError(f"'prompt' has {len(prompts)} prompts; at most {lim.max_prompts} per request", "prompt")
    for i, p in enumerate(prompts):
        if isinstance(p, str) and len(p) > lim.max_prompt_chars:
            raise RequestError(f"prompt {i} has {len(p)} characters; the limit is {lim.max_prompt_chars}", "prompt")
    max_tokens = lim.default_max_tokens if body.max_tokens is None else body.max_tokens
    if max_tokens > lim.max_tokens_limit:
        raise RequestError(f"'max_tokens' must be in [0, {lim.max_tokens_limit}], got {max_tokens}", "max_tokens")
    if body.logprobs is not None and body.logprobs > lim.max_logprobs:
        raise RequestError(f"'logprobs' must be in [0, {lim.max_logprobs}], got {body.logprobs}", "logprobs")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > lim.max_stop:
        raise RequestError(f"'stop' has {len(stop)} sequences; at most {lim.max_stop}", "stop")
    echo = bool(body.echo)
    if max_tokens == 0 and not echo:
        raise RequestError("'max_tokens' is 0 without 'echo': nothing to return", "max_tokens")
    params = SamplingParams(max_tokens=max_tokens, temperature=1.0 if body.temperature is None else body.temperature,
                            top_p=1.0 if body.top_p is None else body.top_p, stop=tuple(stop), seed=body.seed,
                            logprobs=body.logprobs, echo=echo, ignore_eos=bool(body.ignore_eos))
    return CompletionRequest(model=body.model, prompts=list(prompts), params=params, stream=bool(body.stream),
                             include_usage=bool(body.stream_options and body.stream_options.include_usage))


def parse_completion_request(body: Any, cfg: ServeConfig) -> CompletionRequest:
    """Validate an untrusted, JSON-decoded ``/v1/completions`` body (``RequestError`` naming the field)."""
    try:
        parsed = CompletionRequestBody.model_validate(body)
    except ValidationError as e:
        raise request_error(e.errors()) from None
    return to_request(parsed, cfg)


# ---------------------------------------------------------------------- response schema
class Logprobs(BaseModel):
    tokens: list[str] = Field(description="Raw vocabulary strings (unique per token id).")
    token_logprobs: list[Optional[float]] = Field(description="With echo, the first prompt token's is null.")
    top_logprobs: list[Optional[dict[str, float]]]
    text_offset: list[int] = Field(description="Character offset of each token in the choice's text.")


class Choice(BaseModel):
    index: int
    text: str
    logprobs: Optional[Logprobs] = None
    finish_reason: Optional[Literal["stop", "length", "cancelled", "timeout", "error"]] = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionResponse(BaseModel):
    """A ``text_completion`` (streamed: the same object per chunk, one choice each, as SSE)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: Optional[str] = Field(None, description="The registry version that answered "
                                              "(models:/name/N), for registry models.")
    choices: list[Choice]
    usage: Optional[Usage] = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    source: str = Field(description="What the service was configured with (a directory or a models:/ URI).")
    version: Optional[str] = Field(None, description="The registry version answering now (registry models), "
                                   "null for directories or before the model is first loaded.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: Optional[str] = Field(None, description="The request field at fault, when there is one.")
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Health(BaseModel):
    status: Literal["ok"]
    models: list[str]


# ---------------------------------------------------------------------- responses
def new_id() -> str:
    return "cmpl-" + uuid.uuid4().hex[:24]


def error_body(message: str, param: str | None = None, type: str = "invalid_request_error",
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def logprobs_block(engine, s: Sequence, *, prompt: bool, gen_start: int, gen_end: int,
                   text_start: int) -> dict[str, Any]:
    """The ``logprobs`` object for (part of) one sequence: optionally the prompt's tokens, then
    generated tokens ``[gen_start, gen_end)``. ``text_offset`` is the position in the choice's whole
    text; ``text_start`` is where the generation starts in it (the prompt's length with echo in a stream)."""
    ids: list[int] = []
    lps: list[float | None] = []
    tops: list[dict | None] = []
    if prompt:
        ids += s.prompt_ids
        lps += s.prompt_logprobs
        tops += s.prompt_top
    ids += s.generated[gen_start:gen_end]
    lps += s.gen_logprobs[gen_start:gen_end]
    tops += s.gen_top[gen_start:gen_end]
    # Offsets from decoding prefixes: of prompt + generation with echo, else of the generation only
    # (the part of the text this response returns).
    if prompt:
        offsets = engine.text_offsets(ids)
    else:
        offsets = engine.text_offsets(s.generated[:gen_end])[gen_start:]
    return {
        "tokens": engine.token_strings(ids),
        "token_logprobs": lps,
        "top_logprobs": [None if t is None else {engine.vocab[k]: v for k, v in t.items()} for t in tops],
        "text_offset": [text_start + o for o in offsets],
    }


def prompt_text(engine, s: Sequence) -> str:
    return s.prompt_text if s.prompt_text is not None else engine.tokenizer.decode(s.prompt_ids)


def completion_body(engine, req: CompletionRequest, seqs: list[Sequence], rid: str, model: str,
                    fingerprint: str | None = None) -> dict[str, Any]:
    choices = []
    for s in seqs:
        text = s.text
        lp = None
        if req.params.echo:
            text = prompt_text(engine, s) + text
        if req.params.logprobs is not None:
            lp = logprobs_block(engine, s, prompt=req.params.echo, gen_start=0, gen_end=len(s.generated),
                                text_start=0)
        choices.append({"index": s.index, "text": text, "logprobs": lp, "finish_reason": s.finish_reason})
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "system_fingerprint": fingerprint, "choices": choices, "usage": usage(seqs)}


def usage(seqs: list[Sequence]) -> dict[str, int]:
    p = sum(len(s.prompt_ids) for s in seqs)
    c = sum(len(s.generated) for s in seqs)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def chunk(rid: str, model: str, index: int, text: str, logprobs: dict | None,
          finish_reason: str | None, fingerprint: str | None = None) -> dict[str, Any]:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "system_fingerprint": fingerprint, "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}]}


def sse(data: dict[str, Any] | str) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {payload}\n\n".encode()
