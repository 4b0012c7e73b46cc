"""OpenAI completions protocol: request validation and response shapes.

``parse_completion_request`` turns an untrusted JSON body into a :class:`CompletionRequest` or
raises :class:`~polyko.serve.engine.RequestError` (HTTP 4xx, OpenAI error body
``{"error": {"message", "type", "param", "code"}}`` with ``param`` naming the offending field).
Nothing a client sends can reach a 5xx: every field is type- and range-checked here, and prompt
lengths are checked against the model's context by the engine before anything is queued.

The builders make ``text_completion`` bodies and SSE chunks from engine sequences, in the shapes
of OpenAI's legacy ``/v1/completions`` (which lm-eval's ``local-completions`` consumes):
``logprobs = {tokens, token_logprobs, top_logprobs, text_offset}`` where ``tokens`` and the keys
of ``top_logprobs`` are raw vocabulary strings (unique per id), and with ``echo`` the prompt's
tokens come first with a ``None`` log-prob for the first one.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

from polyko.serve.config import ServeConfig
from polyko.serve.engine import RequestError, SamplingParams, Sequence

# Accepted but not implemented OpenAI fields: allowed only at their neutral value.
_NEUTRAL = {"presence_penalty": 0, "frequency_penalty": 0, "n": 1, "best_of": 1, "logit_bias": None,
            "suffix": None}
_IGNORED = {"user", "stream_options"}


@dataclass
class CompletionRequest:
    model: str
    prompts: list[str | list[int]]
    params: SamplingParams
    stream: bool = False
    include_usage: bool = False   # stream_options.include_usage: a final chunk with usage


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def parse_json(raw: bytes, cfg: ServeConfig) -> Any:
    if len(raw) > cfg.limits.max_body_bytes:
        raise RequestError(f"request body is {len(raw)} bytes; the limit is {cfg.limits.max_body_bytes}",
                           None, status=413)
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(f"request body is not valid JSON: {e}", None) from None


def _prompts(v: Any, cfg: ServeConfig) -> list[str | list[int]]:
    lim = cfg.limits
    if v is None:
        raise RequestError("missing required field 'prompt'", "prompt")
    if isinstance(v, str):
        v = [v]
    elif isinstance(v, list) and v and all(_is_int(t) for t in v):
        v = [v]                                   # one prompt as token ids
    elif not isinstance(v, list):
        raise RequestError("'prompt' must be a string, a list of strings, a list of token ids or a list of "
                           f"token-id lists; got {type(v).__name__}", "prompt")
    if not v:
        raise RequestError("'prompt' is an empty list", "prompt")
    if len(v) > lim.max_prompts:
        raise RequestError(f"'prompt' has {len(v)} prompts; at most {lim.max_prompts} per request", "prompt")
    out: list[str | list[int]] = []
    for i, p in enumerate(v):
        if isinstance(p, str):
            if not p:
                raise RequestError(f"prompt {i} is an empty string", "prompt")
            if len(p) > lim.max_prompt_chars:
                raise RequestError(f"prompt {i} has {len(p)} characters; the limit is {lim.max_prompt_chars}",
                                   "prompt")
        elif isinstance(p, list):
            if not p:
                raise RequestError(f"prompt {i} is an empty token list", "prompt")
            if not all(_is_int(t) for t in p):
                raise RequestError(f"prompt {i} must contain only integer token ids", "prompt")
        else:
            raise RequestError(f"prompt {i} must be a string or a list of token ids, got {type(p).__name__}",
                               "prompt")
        out.append(p)
    kinds = {isinstance(p, str) for p in out}
    if len(kinds) > 1:
        raise RequestError("'prompt' mixes strings and token-id lists", "prompt")
    return out


def parse_completion_request(body: Any, cfg: ServeConfig) -> CompletionRequest:
    """Validate an untrusted ``/v1/completions`` body (``RequestError`` naming the field)."""
    lim = cfg.limits
    if not isinstance(body, dict):
        raise RequestError(f"request body must be a JSON object, got {type(body).__name__}", None)
    model = body.get("model")
    if model is None:
        raise RequestError("missing required field 'model'", "model")
    if not isinstance(model, str):
        raise RequestError("'model' must be a string", "model")
    if cfg.model(model) is None:
        # Only configured names: a request can never make the service load a path of its choosing.
        raise RequestError(f"model {model[:200]!r} does not exist; served models: {[m.name for m in cfg.models]}",
                           "model", status=404, code="model_not_found")
    prompts = _prompts(body.get("prompt"), cfg)

    def num(name, default, lo, hi, *, lo_open=False, integer=False):
        v = body.get(name)
        if v is None:
            return default
        if not (_is_int(v) if integer else _is_num(v)) or v != v:
            raise RequestError(f"'{name}' must be {'an integer' if integer else 'a number'}, got {v!r}"[:300], name)
        if (v <= lo if lo_open else v < lo) or v > hi:
            rng = f"{'(' if lo_open else '['}{lo}, {hi}]"
            raise RequestError(f"'{name}' must be in {rng}, got {v}", name)
        return v

    max_tokens = num("max_tokens", lim.default_max_tokens, 0, lim.max_tokens_limit, integer=True)
    temperature = float(num("temperature", 1.0, 0.0, 2.0))
    top_p = float(num("top_p", 1.0, 0.0, 1.0, lo_open=True))
    logprobs = num("logprobs", None, 0, lim.max_logprobs, integer=True)
    seed = body.get("seed")
    if seed is not None and not _is_int(seed):
        raise RequestError(f"'seed' must be an integer, got {seed!r}"[:300], "seed")
    if seed is not None and not (-(2 ** 63) <= seed < 2 ** 63):
        raise RequestError("'seed' must fit in 64 bits", "seed")
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise RequestError("'stop' must be a non-empty string or a list of non-empty strings", "stop")
    if len(stop) > lim.max_stop:
        raise RequestError(f"'stop' has {len(stop)} sequences; at most {lim.max_stop}", "stop")
    flags = {}
    for name in ("echo", "stream", "ignore_eos"):
        v = body.get(name, False)
        if v is None:
            v = False
        if not isinstance(v, bool):
            raise RequestError(f"'{name}' must be a boolean, got {v!r}"[:300], name)
        flags[name] = v
    for name, neutral in _NEUTRAL.items():
        v = body.get(name)
        if v is not None and v != neutral and not (neutral is None and v == {}):
            raise RequestError(f"'{name}' is not supported by this server (only {neutral!r})", name)
    include_usage = False
    so = body.get("stream_options")
    if so is not None:
        if not isinstance(so, dict) or not isinstance(so.get("include_usage", False), bool):
            raise RequestError("'stream_options' must be an object like {\"include_usage\": true}", "stream_options")
        include_usage = so.get("include_usage", False)
    if max_tokens == 0 and not flags["echo"]:
        raise RequestError("'max_tokens' is 0 without 'echo': nothing to return", "max_tokens")
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, stop=tuple(stop),
                            seed=seed, logprobs=logprobs, echo=flags["echo"], ignore_eos=flags["ignore_eos"])
    return CompletionRequest(model=model, prompts=prompts, params=params, stream=flags["stream"],
                             include_usage=include_usage)


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


def completion_body(engine, req: CompletionRequest, seqs: list[Sequence], rid: str, model: str) -> dict[str, Any]:
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
            "choices": choices, "usage": usage(seqs)}


def usage(seqs: list[Sequence]) -> dict[str, int]:
    p = sum(len(s.prompt_ids) for s in seqs)
    c = sum(len(s.generated) for s in seqs)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def chunk(rid: str, model: str, index: int, text: str, logprobs: dict | None,
          finish_reason: str | None) -> dict[str, Any]:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}]}


def sse(data: dict[str, Any] | str) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {payload}\n\n".encode()
