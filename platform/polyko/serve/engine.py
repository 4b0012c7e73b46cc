"""Batched text generation for one checkpoint: the engine behind every model replica.

:class:`HFEngine` runs a transformers causal LM with a KV cache and continuous batching. Requests
from concurrent HTTP calls are queued; at every decode-step boundary the loop prefills the queued
sequences together (left-padded, with attention mask and per-row position ids, so padding changes
no row's numbers), merges their KV cache into the running batch, and decodes all running
sequences one token per step. Finished sequences leave the batch (their cache rows are dropped),
so a short request neither waits for nor pays for long ones. Batch size and batch x length are
bounded (``max_batch_size``, ``max_batch_tokens``), the queue too (``max_queued`` -> 503). Forward
passes run in a dedicated thread: the replica's event loop keeps answering while the model works.

The cache stays bounded however long traffic keeps the batch busy: rows are left-padded, so the
columns left of the longest live row hold only padding once the rows that needed them are gone.
Whenever rows leave (or join), those columns are cut off, so at every step the cache spans exactly
the longest live row's prompt + generated tokens; merging pads the shorter side up to that length
and no further. Without this, a batch that never empties keeps every column it ever had, and each
step's attention cost and memory grow with the total tokens served. ``stats()`` and ``on_step``
expose the cache length per step. The process heap stays bounded too: the freed cache buffers of
past steps are returned to the OS every ``EngineConfig.malloc_trim_interval_s`` (glibc would
otherwise keep them resident, see :meth:`HFEngine._trim_heap`).

Per-sequence sampling: greedy at temperature 0, else temperature + nucleus (top_p) sampling with a
per-sequence ``torch.Generator`` (``seed`` makes it reproducible). Log-probabilities are those of
the model's distribution (before temperature/top_p), over the full embedding rows; ``echo``
returns the prompt's log-probs too (first entry ``None``), which is what lm-eval's
``local-completions`` needs for log-likelihoods.

The public surface (``prepare`` -> ``Sequence`` objects, ``submit``, ``close``) is what a vLLM
engine would implement on GPU nodes (``EngineConfig.kind = "vllm"``; not built yet).

On a CPU::

    eng = HFEngine("work/quickstart/pretrain/hf", EngineConfig())
    seqs = eng.prepare(["안녕하세요"], SamplingParams(max_tokens=8, temperature=0), timeout_s=60)
    asyncio.run(eng.run(seqs))   # fills seqs[i].generated / .text / .finish_reason
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from polyko.heap import malloc_trim
from polyko.serve.config import EngineConfig

log = logging.getLogger(__name__)

PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


class RequestError(Exception):
    """A request the service refuses; becomes an OpenAI error body with this HTTP status."""

    def __init__(self, message: str, param: str | None = None, *, status: int = 400,
                 type: str = "invalid_request_error", code: str | None = None,
                 retry_after: float | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.type = message, param, status, type
        self.code = code
        self.retry_after = retry_after

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def overloaded(message: str, retry_after: float = 1.0) -> RequestError:
    return RequestError(message, None, status=503, type="overloaded_error", code="overloaded",
                        retry_after=retry_after)


def check_checkpoint_dir(path: str | os.PathLike) -> Path:
    """``path`` if it is an HF checkpoint with safetensors weights, else a ``ValueError`` that says
    why. Pickle weights (``*.bin``/``*.pt``) are refused: unpickling can run arbitrary code."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise ValueError(f"checkpoint {str(p)!r} is not a directory (give an HF checkpoint dir or a models:/ URI)")
    if not (p / "config.json").is_file():
        raise ValueError(f"checkpoint {str(p)!r} has no config.json: not a Hugging Face checkpoint directory")
    if not list(p.glob("*.safetensors")):
        pickles = sorted(f.name for pat in PICKLE_WEIGHTS for f in p.glob(pat))
        detail = f" (found only pickle weights {pickles})" if pickles else ""
        raise ValueError(
            f"checkpoint {str(p)!r} has no *.safetensors weights{detail}. polyko serves safetensors only, "
            "because loading pickle weights can execute code; convert with "
            "`AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out, safe_serialization=True)` "
            "in a trusted environment.")
    return p


@dataclass
class StepStats:
    """One decode step of the running batch."""

    step: int
    seconds: float          # wall time of the forward pass (and token selection)
    cache_len: int          # KV-cache columns the step attended to (after appending its token)
    lengths: list[int]      # per row: prompt + generated tokens held in the cache at that step


@dataclass
class SamplingParams:
    """Validated generation parameters of one sequence (see :mod:`polyko.serve.api`)."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: int | None = None     # top log-probs per token (None: no logprobs at all)
    echo: bool = False
    ignore_eos: bool = False


class Sequence:
    """One prompt on its way through the engine. The loop appends tokens; the request coroutine
    waits on ``updated`` (set after each step that changed it) and reads the fields."""

    def __init__(self, index: int, prompt_ids: list[int], prompt_text: str | None, params: SamplingParams,
                 deadline: float):
        self.index = index
        self.prompt_ids = prompt_ids
        self.prompt_text = prompt_text          # the request's string, or None for token-id prompts
        self.params = params
        self.deadline = deadline
        self.generated: list[int] = []
        self.gen_logprobs: list[float] = []
        self.gen_top: list[dict[int, float]] = []
        self.prompt_logprobs: list[float | None] = []
        self.prompt_top: list[dict[int, float] | None] = []
        self.text = ""                          # generated text, truncated at a stop string
        self.finish_reason: str | None = None   # "stop" | "length" | "cancelled" | "timeout" | "error"
        self.error: RequestError | None = None
        self.cancelled = False
        self.updated: asyncio.Event | None = None   # created on the engine's loop

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def _notify(self) -> None:
        if self.updated is not None:
            self.updated.set()

    def safe_text_end(self) -> int:
        """Length of ``text`` that can be streamed now: an unfinished sequence holds back a tail
        that may still become a stop string, and an incomplete UTF-8 character."""
        if self.done:
            return len(self.text)
        end = len(self.text)
        while end > 0 and self.text[end - 1] == "\ufffd":
            end -= 1
        hold = 0
        for s in self.params.stop:
            for k in range(min(len(s) - 1, end), 0, -1):
                if self.text[:end].endswith(s[:k]):
                    hold = max(hold, k)
                    break
        return end - hold


def _resolve_device_dtype(cfg: EngineConfig):
    import torch

    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.dtype == "auto":
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    else:
        if not hasattr(torch, cfg.dtype):
            raise ValueError(f"engine.dtype {cfg.dtype!r} is not a torch dtype")
        dtype = getattr(torch, cfg.dtype)
    return device, dtype


class HFEngine:
    """A transformers model + tokenizer + batching loop. Create on the replica's event loop thread;
    loading takes seconds (``load`` runs in a thread)."""

    def __init__(self, model_dir: str | os.PathLike, cfg: EngineConfig, *, name: str = "",
                 num_threads: int = 0, max_stop: int = 4):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if cfg.kind != "hf":
            raise ValueError(f"engine.kind {cfg.kind!r} is not available in this build (only 'hf')")
        self.torch = torch
        self.cfg = cfg
        self.name = name or Path(model_dir).name
        path = check_checkpoint_dir(model_dir)
        if num_threads > 0:
            torch.set_num_threads(num_threads)
        self.device, self.dtype = _resolve_device_dtype(cfg)
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        # use_safetensors=True: transformers refuses pickle weights instead of falling back to them.
        model = AutoModelForCausalLM.from_pretrained(str(path), use_safetensors=True, dtype=self.dtype,
                                                     trust_remote_code=False)
        self.model = model.to(self.device).eval()
        self.base = self.model.base_model
        import inspect

        from transformers import DynamicCache
        self._new_cache = lambda: DynamicCache(config=self.model.config)
        # transformers 5.x renames past_key_values -> cache (deprecated name warns); support both.
        self._cache_kw = "cache" if "cache" in inspect.signature(self.base.forward).parameters else "past_key_values"
        self.lm_head = self.model.get_output_embeddings()
        config = self.model.config
        self.max_context = int(getattr(config, "max_position_embeddings", 2048))
        self.vocab_rows = int(self.lm_head.weight.shape[0])
        self.n_tokens = min(len(self.tokenizer), self.vocab_rows)   # ids a tokenizer can decode
        eos = self.model.generation_config.eos_token_id
        eos = eos if isinstance(eos, list) else [eos]
        self.eos_ids = {int(e) for e in eos + [self.tokenizer.eos_token_id] if e is not None}
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        # Raw vocabulary strings: unique per id (decoded bytes are not), as lm-eval's top_logprobs needs.
        toks = self.tokenizer.convert_ids_to_tokens(list(range(self.n_tokens)))
        self.vocab = [t if t is not None else f"<|id_{i}|>" for i, t in enumerate(toks)]
        self.vocab += [f"<|id_{i}|>" for i in range(len(self.vocab), self.vocab_rows)]
        self.max_stop = max_stop
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"engine-{self.name}")
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self.tokens_generated = 0
        self.on_close = None    # called once by close() (the replica updates its resident-models gauge)
        # Called on the engine's event loop after every decode step with a StepStats (tests, metrics).
        self.on_step: Callable[[StepStats], None] | None = None
        self.decode_steps = 0
        self.decode_seconds = 0.0       # summed wall time of decode forward passes
        # Their CPU time on the engine thread: all of a step's compute at torch_threads=1 (other
        # intra-op threads are not counted). Unlike wall time it does not include waiting for a
        # core, so it compares steps fairly on a shared machine.
        self.decode_cpu_seconds = 0.0
        self.decode_rows = 0            # summed batch size of decode steps (row-steps)
        self.cancelled = 0              # sequences finished as "cancelled" (client went away)
        self.running = 0                # rows in the running batch after the last step
        self.cache_len = 0              # KV-cache columns of the running batch after the last step
        self.trims = 0                  # malloc_trim calls (see EngineConfig.malloc_trim_interval_s)
        self.trim_seconds = 0.0         # their summed wall time (engine thread; not in decode_seconds)
        self._last_trim = time.monotonic()
        self._last_trim_step = 0        # decode_steps at the last trim (idle trims run once per burst)

    # ------------------------------------------------------------------ requests
    def prepare(self, prompts: list[str | list[int]], params: SamplingParams, *, timeout_s: float,
                seed_offset: bool = True) -> list[Sequence]:
        """Tokenize and check the prompts of one request (``RequestError`` naming ``prompt`` or
        ``max_tokens`` when they do not fit the context)."""
        deadline = time.monotonic() + timeout_s
        seqs = []
        for i, p in enumerate(prompts):
            if isinstance(p, str):
                ids = self.tokenizer.encode(p, add_special_tokens=False)
                text = p
            else:
                bad = [t for t in p if t < 0 or t >= self.vocab_rows]
                if bad:
                    raise RequestError(f"prompt token id {bad[0]} is outside the vocabulary [0, {self.vocab_rows})",
                                       "prompt")
                ids, text = list(p), None
            if not ids:
                raise RequestError("prompt is empty after tokenization", "prompt")
            if len(ids) > self.max_context or (len(ids) == self.max_context and params.max_tokens > 0):
                raise RequestError(f"prompt {i} has {len(ids)} tokens; this model's context is {self.max_context} "
                                   "tokens (prompt + max_tokens must fit)", "prompt", code="context_length_exceeded")
            if len(ids) + params.max_tokens > self.max_context:
                raise RequestError(f"prompt {i} has {len(ids)} tokens and max_tokens is {params.max_tokens}; "
                                   f"together they exceed this model's context of {self.max_context} tokens",
                                   "max_tokens", code="context_length_exceeded")
            sp = params
            if params.seed is not None and seed_offset and i:
                sp = SamplingParams(**{**params.__dict__, "seed": params.seed + i})
            seqs.append(Sequence(i, ids, text, sp, deadline))
        return seqs

    def submit(self, seqs: list[Sequence]) -> None:
        """Queue sequences for the batching loop (503 when the queue is full)."""
        if self._closed:
            raise overloaded(f"model {self.name!r} was unloaded from this replica; retry", 1.0)
        if len(self._waiting) + len(seqs) > self.cfg.max_queued:
            raise overloaded(f"model {self.name!r} has {len(self._waiting)} sequences queued; retry later",
                             retry_after=1.0)
        self._ensure_loop()
        ev = asyncio.Event()   # one event per request: set when any of its sequences changed
        for s in seqs:
            s.updated = ev
            self._waiting.append(s)
        self._wake.set()

    async def run(self, seqs: list[Sequence]) -> list[Sequence]:
        """Submit and wait until every sequence is finished (cancelled if this coroutine is)."""
        self.submit(seqs)
        try:
            async for _ in self.updates(seqs):
                pass
        finally:
            for s in seqs:
                s.cancelled = True
        for s in seqs:
            if s.error is not None:
                raise s.error
        return seqs

    async def updates(self, seqs: list[Sequence]):
        """Yield once after every engine step that changed one of ``seqs`` (already submitted),
        until all are finished."""
        ev = seqs[0].updated
        while True:
            ev.clear()
            yield
            if all(s.done for s in seqs):
                return
            await ev.wait()

    def close(self) -> None:
        """Refuse new work; sequences already queued or running finish, then the model is freed
        (so an LRU eviction never fails requests in flight). Idempotent; callable from any thread."""
        if getattr(self, "_closed", True):
            return
        self._closed = True
        if self.on_close is not None:
            self.on_close()
        loop, task = self._loop, self._task
        if loop is not None and task is not None and not task.done() and not loop.is_closed():
            loop.call_soon_threadsafe(self._wake.set)   # the loop drains its queue, then frees
        else:
            self._free()

    def _free(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        self.model = self.base = self.lm_head = None

    def __del__(self):
        # Serve's multiplexer calls __del__ when it evicts a model (LRU); GC may call it again.
        self.close()

    # ------------------------------------------------------------------ batching loop
    def _ensure_loop(self) -> None:
        if self._task is None or self._task.done():
            self._loop = asyncio.get_running_loop()
            self._wake = asyncio.Event()
            self._task = self._loop.create_task(self._run_loop())

    async def _run_loop(self) -> None:
        """Continuous batching: at every decode-step boundary, queued sequences are prefilled
        together and join the running batch (their KV cache is merged into it); finished ones
        leave it. A request never waits for a whole batch of longer generations to end."""
        loop = asyncio.get_running_loop()
        running: list[Sequence] = []
        state: dict | None = None
        try:
            while True:
                if not running and not self._waiting:
                    if self._closed:
                        return
                    if self.cfg.malloc_trim_interval_s > 0 and self._last_trim_step != self.decode_steps:
                        await self._trim_heap(loop)   # going idle: give back what the burst freed
                        continue
                    await self._wake.wait()
                    self._wake.clear()
                    continue
                if not running and len(self._waiting) < self.cfg.max_batch_size and self.cfg.batch_wait_ms > 0:
                    # Idle engine: let concurrent requests arrive (costs <= batch_wait_ms, fills the batch).
                    await asyncio.sleep(self.cfg.batch_wait_ms / 1000)
                new = self._take_batch(running) if (state is None or self._can_merge) else []
                try:
                    if new:
                        new_state, picks = await loop.run_in_executor(self._executor, self._prefill, new)
                        self._advance(new, picks, first=True)
                        keep = [i for i, q in enumerate(new) if not q.done]
                        if keep:
                            state = await loop.run_in_executor(self._executor, self._merge, state, new_state, keep)
                            running += [new[i] for i in keep]
                    if running:
                        t0 = time.perf_counter()
                        picks = await loop.run_in_executor(self._executor, self._decode, state, running)
                        dt = time.perf_counter() - t0
                        # Rows' cached tokens: the prompt and every generated token but the one just picked.
                        lengths = [len(q.prompt_ids) + len(q.generated) for q in running]
                        self.decode_steps += 1
                        self.decode_seconds += dt
                        self.decode_rows += len(running)
                        stats = StepStats(self.decode_steps, dt, self._cache_columns(state), lengths)
                        self._advance(running, picks)
                        keep = [i for i, q in enumerate(running) if not q.done]
                        if len(keep) < len(running):
                            running = [running[i] for i in keep]
                            state = self._select_rows(state, keep) if running else None
                        self.running = len(running)
                        self.cache_len = self._cache_columns(state)
                        if self.on_step is not None:
                            self.on_step(stats)
                        if (self.cfg.malloc_trim_interval_s > 0
                                and time.monotonic() - self._last_trim >= self.cfg.malloc_trim_interval_s):
                            await self._trim_heap(loop)
                except asyncio.CancelledError:
                    raise
                except Exception as e:  # a bug or OOM: fail these sequences, keep serving
                    log.exception("engine %s: step failed", self.name)
                    for q in running + new:
                        if not q.done:
                            q.error = RequestError(f"generation failed: {type(e).__name__}: {e}", None,
                                                   status=500, type="server_error")
                            q.finish_reason = "error"
                            q._notify()
                    running, state = [], None
                    self.running, self.cache_len = 0, 0
        finally:
            if self._closed:
                self._free()

    async def _trim_heap(self, loop: asyncio.AbstractEventLoop) -> None:
        """Return the C heap's free pages to the OS (``malloc_trim(0)``), on the engine thread
        between steps. Why: each decode step allocates every layer's KV cache anew, one column
        longer, and merges/trims reallocate it at other sizes; glibc reuses the freed chunks only
        partly and hands back only the top of each arena, so without this the replica's RSS grows
        by the freed-but-kept bytes (measured: 300 MB in use, 600 MB free in the arenas after
        800 requests) while no Python or torch object holds them. The trim walks the arenas and
        ``madvise``s free pages away; later allocations fault them back in. Timed in ``stats()``."""
        self._last_trim_step = self.decode_steps
        self._last_trim = time.monotonic()
        fn = malloc_trim()
        if fn is None:
            return
        t0 = time.perf_counter()
        await loop.run_in_executor(self._executor, fn, 0)
        self.trims += 1
        self.trim_seconds += time.perf_counter() - t0
        self._last_trim = time.monotonic()

    def _take_batch(self, running: list[Sequence]) -> list[Sequence]:
        """Queued sequences that fit beside ``running``: at most max_batch_size in all, and the
        batch's KV cache (rows x columns) within max_batch_tokens for as long as they all run.
        The cache spans the longest live row (see ``_trim``), so its columns never exceed the
        largest prompt + max_tokens among the rows, nor its present length. An idle engine
        always takes at least one."""
        batch: list[Sequence] = []
        longest = max([len(q.prompt_ids) + q.params.max_tokens for q in running] + [self.cache_len])
        while self._waiting and len(running) + len(batch) < self.cfg.max_batch_size:
            q = self._waiting[0]
            if q.cancelled:
                self._waiting.popleft()
                q.finish_reason = "cancelled"
                self.cancelled += 1
                continue
            n = len(q.prompt_ids) + q.params.max_tokens
            if (running or batch) and (len(running) + len(batch) + 1) * max(longest, n) > self.cfg.max_batch_tokens:
                break
            longest = max(longest, n)
            batch.append(self._waiting.popleft())
        return batch

    def _advance(self, seqs: list[Sequence], picks, *, first: bool = False) -> None:
        """Apply one step's picked tokens (or finish cancelled/late sequences) and wake waiters."""
        now = time.monotonic()
        for q, pick in zip(seqs, picks):
            if q.cancelled:
                q.finish_reason = "cancelled"
                self.cancelled += 1
            elif now > q.deadline:
                q.finish_reason = "timeout"
            elif first and q.params.max_tokens == 0:   # echo-only scoring request
                q.finish_reason = "length"
            else:
                self._append(q, *pick)
            q._notify()

    def _append(self, s: Sequence, tok: int, lp: float, top: dict[int, float]) -> None:
        s.generated.append(tok)
        self.tokens_generated += 1
        if s.params.logprobs is not None:
            s.gen_logprobs.append(lp)
            s.gen_top.append(top)
        if tok in self.eos_ids and not s.params.ignore_eos:
            s.finish_reason = "stop"
            return
        if len(s.generated) >= s.params.max_tokens:
            s.finish_reason = "length"
        ids = [t for t in s.generated if t < self.n_tokens and (s.params.ignore_eos or t not in self.eos_ids)]
        text = self.tokenizer.decode(ids, skip_special_tokens=False)
        if s.params.stop:
            hits = [(text.find(st), st) for st in s.params.stop]
            hits = [h for h in hits if h[0] >= 0]
            if hits:
                text = text[:min(hits)[0]]
                s.finish_reason = "stop"
        s.text = text

    # ------------------------------------------------------------------ model (engine thread)
    def _select(self, logits, seqs: list[Sequence]) -> list[tuple[int, float, dict[int, float]]]:
        """Pick the next token of each row; return (token, its log-prob, top log-probs)."""
        torch = self.torch
        logits = logits.float()
        logp = torch.log_softmax(logits, dim=-1)
        # Embedding rows past the tokenizer (vocab padded to a multiple of 128) are never emitted.
        masked = logits[:, :self.n_tokens]
        greedy = masked.argmax(dim=-1).tolist()
        out = []
        for r, s in enumerate(seqs):
            p = s.params
            tok = greedy[r]
            if p.temperature > 0:
                z = masked[r] / p.temperature
                if p.top_p < 1.0:
                    sorted_z, idx = torch.sort(z, descending=True)
                    cum = torch.softmax(sorted_z, -1).cumsum(-1)
                    drop = (cum - torch.softmax(sorted_z, -1)) >= p.top_p   # keep the smallest prefix reaching top_p
                    sorted_z[drop] = float("-inf")
                    z = torch.full_like(z, float("-inf")).scatter(0, idx, sorted_z)
                gen = getattr(s, "_gen", None)
                if gen is None:
                    gen = torch.Generator(device=z.device)
                    gen.manual_seed(p.seed if p.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1)
                    s._gen = gen
                tok = int(torch.multinomial(torch.softmax(z, -1), 1, generator=gen).item())
            lp = float(logp[r, tok])
            top: dict[int, float] = {}
            if p.logprobs is not None:
                if p.logprobs > 0:
                    v, i = torch.topk(logp[r], p.logprobs)
                    top = dict(zip(i.tolist(), v.tolist()))
                top.setdefault(tok, lp)   # OpenAI: the chosen token is always listed
            out.append((tok, lp, top))
        return out

    def _prefill(self, seqs: list[Sequence]):
        torch = self.torch
        with torch.inference_mode():
            B = len(seqs)
            L = max(len(s.prompt_ids) for s in seqs)
            ids = torch.full((B, L), self.pad_id, dtype=torch.long)
            mask = torch.zeros((B, L), dtype=torch.long)
            for i, s in enumerate(seqs):      # left padding: every row's last token is at L-1
                n = len(s.prompt_ids)
                ids[i, L - n:] = torch.tensor(s.prompt_ids, dtype=torch.long)
                mask[i, L - n:] = 1
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            ids, mask, pos = ids.to(self.device), mask.to(self.device), pos.to(self.device)
            cache = self._new_cache()
            out = self.base(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                            **{self._cache_kw: cache})
            hidden = out.last_hidden_state
            for i, s in enumerate(seqs):
                if s.params.echo and s.params.logprobs is not None:
                    self._prompt_logprobs(s, hidden[i, L - len(s.prompt_ids):L - 1], ids[i, L - len(s.prompt_ids) + 1:])
            logits = self.lm_head(hidden[:, -1])
            state = {"cache": cache, "mask": mask, "pos": pos[:, -1]}
            return state, self._select(logits, seqs)

    def _prompt_logprobs(self, s: Sequence, h, targets) -> None:
        torch = self.torch
        k = s.params.logprobs
        # Chunks bound the [n, vocab] float32 buffer (~120 kB per position at vocab 30k).
        lps, tops = [None], [None]
        for a in range(0, h.shape[0], 256):
            logp = torch.log_softmax(self.lm_head(h[a:a + 256]).float(), dim=-1)
            t = targets[a:a + 256]
            tl = logp.gather(1, t[:, None])[:, 0]
            lps.extend(tl.tolist())
            if k > 0:
                v, idx = torch.topk(logp, k, dim=-1)
                rows = [dict(zip(ii, vv)) for ii, vv in zip(idx.tolist(), v.tolist())]
            else:
                rows = [{} for _ in range(len(t))]
            for row, tok, lp in zip(rows, t.tolist(), tl.tolist()):
                row.setdefault(tok, lp)
            tops.extend(rows)
        s.prompt_logprobs, s.prompt_top = lps, tops

    def _decode(self, state: dict, seqs: list[Sequence]):
        """One token for every running row, reusing (and extending) the KV cache."""
        torch = self.torch
        c0 = time.thread_time()
        with torch.inference_mode():
            cache = state["cache"]
            tokens = torch.tensor([q.generated[-1] for q in seqs], dtype=torch.long, device=self.device)
            mask = torch.cat([state["mask"], torch.ones((len(seqs), 1), dtype=torch.long, device=self.device)], dim=1)
            pos = state["pos"] + 1
            out = self.base(input_ids=tokens[:, None], attention_mask=mask, position_ids=pos[:, None],
                            use_cache=True, **{self._cache_kw: cache})
            state.update(mask=mask, pos=pos)
            picks = self._select(self.lm_head(out.last_hidden_state[:, -1]), seqs)
        self.decode_cpu_seconds += time.thread_time() - c0
        return picks

    def _select_rows(self, state: dict, keep: list[int]) -> dict:
        """Drop finished rows from the batch and its KV cache, then the columns no row needs."""
        sel = self.torch.tensor(keep, dtype=self.torch.long, device=self.device)
        state["cache"].batch_select_indices(sel)
        state.update(mask=state["mask"][sel], pos=state["pos"][sel])
        return self._trim(state)

    def _trim(self, state: dict) -> dict:
        """Cut the left columns that are padding in every row. Rows are left-padded (each mask
        row is zeros, then ones), so the cache needs only as many columns as the longest live row
        has tokens. Position ids are per row, so dropping masked columns changes no row's numbers."""
        mask = state["mask"]
        width = mask.shape[1]
        live = int(mask.sum(dim=1).max())
        if live < width and self._can_merge:   # plain [B, H, T, D] layers only
            cut = width - live
            for layer in state["cache"].layers:
                # .contiguous(): a view would keep the whole old buffer alive until the next append.
                layer.keys = layer.keys[:, :, cut:].contiguous()
                layer.values = layer.values[:, :, cut:].contiguous()
            state["mask"] = mask[:, cut:].contiguous()
        return state

    @staticmethod
    def _cache_columns(state: dict | None) -> int:
        return 0 if state is None else int(state["mask"].shape[1])

    def stats(self) -> dict[str, Any]:
        """Counters of this engine (cheap; for ``/metrics``-style polling and benchmarks)."""
        return {"decode_steps": self.decode_steps, "decode_seconds": self.decode_seconds,
                "decode_cpu_seconds": self.decode_cpu_seconds,
                "decode_rows": self.decode_rows,
                "tokens_generated": self.tokens_generated, "cancelled": self.cancelled,
                "running": self.running, "waiting": len(self._waiting), "cache_len": self.cache_len,
                "trims": self.trims, "trim_seconds": self.trim_seconds}

    @property
    def _can_merge(self) -> bool:
        """Caches whose layers are plain DynamicLayers (keys/values [B, H, T, D]) can be merged;
        others (sliding windows, quantized) fall back to admitting only into an idle engine."""
        from transformers.cache_utils import DynamicLayer

        if not hasattr(self, "_merge_ok"):
            probe = self._new_cache()
            self._merge_ok = hasattr(probe, "layers") and all(type(x) is DynamicLayer for x in probe.layers)
        return self._merge_ok

    def _merge(self, state: dict | None, new: dict, keep: list[int]) -> dict:
        """Rows ``keep`` of a fresh prefill joined to the running batch: both caches are
        left-padded (zeros, masked out) to the same length and concatenated on the batch axis.
        Position ids are per row, so padding changes no row's numbers."""
        torch = self.torch
        if len(keep) < new["mask"].shape[0]:
            new = self._select_rows(new, keep)
        if state is None:
            return new
        ta, tb = state["mask"].shape[1], new["mask"].shape[1]
        t = max(ta, tb)
        F = torch.nn.functional
        with torch.inference_mode():
            for la, lb in zip(state["cache"].layers, new["cache"].layers):
                la.keys = torch.cat([F.pad(la.keys, (0, 0, t - ta, 0)), F.pad(lb.keys, (0, 0, t - tb, 0))], dim=0)
                la.values = torch.cat([F.pad(la.values, (0, 0, t - ta, 0)), F.pad(lb.values, (0, 0, t - tb, 0))], dim=0)
            mask = torch.cat([F.pad(state["mask"], (t - ta, 0)), F.pad(new["mask"], (t - tb, 0))], dim=0)
            pos = torch.cat([state["pos"], new["pos"]], dim=0)
        state.update(mask=mask, pos=pos)
        return state

    # ------------------------------------------------------------------ helpers for responses
    def token_strings(self, ids: list[int]) -> list[str]:
        return [self.vocab[i] for i in ids]

    def text_offsets(self, ids: list[int], start: int = 0) -> list[int]:
        """Character offset of each token in the decoded text (prefix decoding: exact for
        byte-level BPE, O(n^2) characters but fast in Rust for prompts of a few thousand tokens)."""
        prefixes = self.tokenizer.batch_decode([ids[:i] for i in range(len(ids))], skip_special_tokens=False)
        return [start + len(p) for p in prefixes]
