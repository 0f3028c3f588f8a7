"""OpenAI-compatible HTTP server (FastAPI + uvicorn) over the continuous-batching engine.

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both with ``stream`` for server-sent
events), ``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus text format).

The engine runs on one background thread (:class:`AsyncEngine`); request handlers queue work on it and receive
tokens through per-request asyncio queues. Errors follow OpenAI's shape ``{"error": {"message", "type",
"param", "code"}}``: malformed JSON, invalid fields (the message names the field and the allowed values),
prompts that do not fit the context and unknown models are 4xx; when more than ``max_pending`` requests are
in flight new ones get 503 with ``Retry-After``. A client that disconnects mid-stream has its requests aborted
and their KV blocks freed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
import uuid
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from fastapi import Request
from flax import nnx
from pydantic import BaseModel, ConfigDict, Field

from moejax.models.generate import bucket as pow2
from moejax.serve.engine import Engine, RequestOutput, SamplingParams

log = logging.getLogger("moejax.serve")


# ------------------------------------------------------------------------------------------------ engine thread
class AsyncEngine:
    """Runs :meth:`Engine.step` on a background thread; results are pushed to asyncio queues.

    ``batch_wait_ms``: when a request arrives at an idle engine, the first step waits until no further request
    has arrived for this long (at most ten times it), so that a burst of concurrent requests is prefilled
    together rather than as a first prompt alone and the rest one prefill later (as Triton's dynamic-batching
    queue delay). It costs a lone request that much time to first token; 0 steps at once. A busy engine never
    waits: arrivals join the next iteration.
    """

    def __init__(self, engine: Engine, *, max_pending: int = 512, batch_wait_ms: float = 2.0):
        if not (isinstance(batch_wait_ms, (int, float)) and not isinstance(batch_wait_ms, bool)
                and 0 <= batch_wait_ms <= 1000):
            raise ValueError(f"batch_wait_ms={batch_wait_ms!r} must be a number of milliseconds in [0, 1000]")
        self.engine = engine
        self.max_pending = max_pending
        self.batch_wait_s = batch_wait_ms / 1e3
        self.pending = 0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.last_error: str | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="moejax-engine", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def _gather_burst(self) -> None:
        """Wait while requests keep arriving (each within ``batch_wait_s`` of the last), for at most ten
        times ``batch_wait_s``."""
        deadline = time.monotonic() + 10 * self.batch_wait_s
        while not self._stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0 or not self._wake.wait(min(self.batch_wait_s, left)):
                return
            self._wake.clear()

    def _run(self) -> None:
        idle = True
        while not self._stop.is_set():
            if self.engine.has_unfinished():
                if idle and self.batch_wait_s > 0:
                    self._wake.clear()
                    self._gather_burst()
                idle = False
                try:
                    self.engine.step()
                except Exception as e:  # keep serving: fail the in-flight requests, not the server
                    log.exception("engine step failed")
                    self.last_error = repr(e)
                    for rid in list(self.engine.entries):
                        self.engine.abort(rid)
            else:
                idle = True
                self._wake.wait(0.05)
                self._wake.clear()

    def submit(self, prompt: list[int], params: SamplingParams, loop: asyncio.AbstractEventLoop,
               q: asyncio.Queue, tag: int) -> str:
        def cb(out: RequestOutput, tag=tag):
            if out.finished:
                with self._lock:
                    self.pending -= 1
            try:
                loop.call_soon_threadsafe(q.put_nowait, (tag, out))
            except RuntimeError:  # the request's event loop is gone (client and handler finished)
                pass

        rid = self.engine.add_request(prompt, params, callback=cb)
        with self._lock:
            self.pending += 1
        self._wake.set()
        return rid

    def abort(self, rid: str) -> None:
        self.engine.abort(rid)
        self._wake.set()

    @property
    def overloaded(self) -> bool:
        return self.pending >= self.max_pending


class PromptScorer:
    """Teacher-forced log-probabilities of prompt tokens (``echo`` with ``logprobs``), one compile per length
    bucket."""

    def __init__(self, model):
        self.gdef, self.state = nnx.split(model)
        self.lock = threading.Lock()
        self._jitted = jax.jit(self._score, static_argnums=0)

    @staticmethod
    def _score(gdef, state, tokens, n):
        model = nnx.merge(gdef, state)
        mask = (jnp.arange(tokens.shape[1]) < n)[None].astype(jnp.int32)
        lp = jax.nn.log_softmax(model(tokens, attention_mask=mask).logits[0], axis=-1)
        nxt = jnp.take_along_axis(lp[:-1], tokens[0, 1:, None], axis=1)[:, 0]
        top_lp, top_id = jax.lax.top_k(lp[:-1], 5)
        return nxt, top_id, top_lp

    def __call__(self, ids: list[int]):
        T = pow2(len(ids), 16)
        toks = np.zeros((1, T), np.int32)
        toks[0, :len(ids)] = ids
        with self.lock:
            nxt, top_id, top_lp = jax.device_get(self._jitted(self.gdef, self.state, toks, len(ids)))
        n = len(ids) - 1
        return nxt[:n], top_id[:n], top_lp[:n]


# ------------------------------------------------------------------------------------------------ requests
class _Base(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    max_tokens: int | None = Field(None, ge=0)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=16)
    seed: int | None = Field(None, ge=0, lt=2 ** 32)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    stream: bool = False

class CompletionRequest(_Base):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False

class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]]

class ChatRequest(_Base):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=5)


# ------------------------------------------------------------------------------------------------ app
def create_app(engine: Engine, tokenizer, *, model_name: str = "moejax", max_pending: int = 512,
               batch_wait_ms: float = 2.0):
    """The FastAPI application serving ``engine`` (started and stopped with the app's lifespan).
    ``max_pending`` and ``batch_wait_ms``: see :class:`AsyncEngine`."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    aengine = AsyncEngine(engine, max_pending=max_pending, batch_wait_ms=batch_wait_ms)
    scorer = PromptScorer(engine.model)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        aengine.start()
        yield
        aengine.stop()

    app = FastAPI(title="moejax", lifespan=lifespan)
    app.state.engine = engine
    app.state.async_engine = aengine

    class APIError(Exception):
        def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                     headers: dict | None = None):
            self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def err(status, message, param=None, code=None, type_="invalid_request_error", headers=None):
        return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}},
                            status_code=status, headers=headers)

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return err(e.status, e.message, e.param, e.code, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, e: RequestValidationError):
        errors = e.errors()
        first = errors[0] if errors else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        if first.get("type") == "json_invalid" or param is None:
            return err(400, f"request body is not valid JSON: {first.get('msg', 'parse error')}", None,
                       "invalid_json")
        return err(400, f"invalid value for '{param}': {first.get('msg')}", param, "invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e: StarletteHTTPException):
        msg = str(e.detail)
        if e.status_code == 400 and "parsing the body" in msg:
            msg = "request body could not be parsed (not valid UTF-8 JSON)"
        return err(e.status_code, msg, None, None, headers=getattr(e, "headers", None))

    # ---------------------------------------------------------------------------------------- helpers
    def check_model(name):
        if name is not None and name != model_name:
            raise APIError(404, f"model '{name}' does not exist; this server serves '{model_name}'", "model",
                           "model_not_found")

    def stops_of(body) -> list[str]:
        s = body.stop
        stops = [s] if isinstance(s, str) else list(s or [])
        if any(not x for x in stops):
            raise APIError(400, "invalid value for 'stop': stop strings must be non-empty", "stop")
        if len(stops) > 16:
            raise APIError(400, "invalid value for 'stop': at most 16 stop strings", "stop")
        return stops

    def params_for(body, max_tokens: int, i: int, n_logprobs: int) -> SamplingParams:
        stop_ids = tuple(body.stop_token_ids or ())
        if tokenizer.eos_id is not None and not body.ignore_eos:
            stop_ids += (tokenizer.eos_id,)
        seed = None if body.seed is None else (body.seed + i) % 2 ** 32
        return SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, seed=seed,
                              stop_token_ids=stop_ids, logprobs=n_logprobs)

    def validate_prompt(ids: list[int]) -> list[int]:
        try:
            return engine.validate_prompt(ids)
        except ValueError as e:
            raise APIError(400, str(e), "prompt", "context_length_exceeded" if "context" in str(e) else None)

    def resolve_max_tokens(req_max, n_prompt):
        room = engine.max_model_len - n_prompt
        if req_max is None:
            return room
        return req_max

    class Choice:
        """Incremental detokenization, stop strings and logprobs of one sequence."""

        def __init__(self, index, stops, n_logprobs):
            self.index, self.stops, self.n_logprobs = index, stops, n_logprobs
            self.hold = max((len(s) for s in stops), default=1) - 1
            self.ids: list[int] = []
            self.lps: list[float] = []
            self.tops: list = []
            self.text = ""
            self.emitted = 0
            self.finish_reason = None
            self.rid = None

        def feed(self, out: RequestOutput) -> str:
            """Add tokens; returns the newly final text (held back: incomplete UTF-8, a possible stop prefix).
            An output of several tokens (multi-step decoding) is fed token by token, so a stop string ends the
            choice at the token that completes it, as with one token per output."""
            if len(out.new_tokens) <= 1:
                return self._feed(out)
            delta, n = "", len(out.new_tokens)
            for i in range(n):
                last = i == n - 1
                delta += self._feed(RequestOutput(
                    out.request_id, out.new_tokens[i:i + 1], out.new_logprobs[i:i + 1],
                    out.new_top_logprobs[i:i + 1], out.finished and last, out.finish_reason if last else None,
                    out.num_prompt_tokens, out.num_cached_tokens))
                if self.finish_reason is not None:
                    break
            return delta

        def _feed(self, out: RequestOutput) -> str:
            ids = [t for t in out.new_tokens if t != tokenizer.eos_id]
            self.ids += out.new_tokens
            self.lps += out.new_logprobs
            self.tops += out.new_top_logprobs
            if ids or out.finished:
                self.text = tokenizer.decode([t for t in self.ids if t != tokenizer.eos_id])
            cut = None
            for s in self.stops:
                k = self.text.find(s, max(0, self.emitted - len(s)))
                if k >= 0 and (cut is None or k < cut):
                    cut = k
            if cut is not None:
                self.text = self.text[:cut]
                self.finish_reason = "stop"
            elif out.finished:
                self.finish_reason = out.finish_reason
            if self.finish_reason is not None:
                safe = len(self.text)
            else:
                safe = len(self.text.rstrip("\ufffd")) - self.hold
            delta = self.text[self.emitted:max(safe, self.emitted)]
            self.emitted += len(delta)
            return delta

        def logprobs_completion(self, start: int, end: int):
            toks = [tokenizer.piece(t) for t in self.ids[start:end]]
            return {"tokens": toks, "token_logprobs": self.lps[start:end],
                    "top_logprobs": [{tokenizer.piece(a): b for a, b in top} for top in self.tops[start:end]],
                    "text_offset": list(np.cumsum([0] + [len(t) for t in toks])[:-1])}

        def logprobs_chat(self, start: int, end: int):
            def entry(t, lp):
                p = tokenizer.piece(t)
                return {"token": p, "logprob": lp, "bytes": list(p.encode("utf-8"))}
            return {"content": [{**entry(t, lp), "top_logprobs": [entry(a, b) for a, b in top]}
                                for t, lp, top in zip(self.ids[start:end], self.lps[start:end],
                                                      self.tops[start:end])]}

    async def run_choices(request: Request, prompts: list[list[int]], body, max_tokens: int, n_logprobs: int):
        """Submit n sequences per prompt; yields (choice, delta text, token range) as tokens arrive."""
        if aengine.overloaded:
            raise APIError(503, "server overloaded; retry later", None, "overloaded", headers={"Retry-After": "1"})
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        stops = stops_of(body)
        choices = []
        for pi, ids in enumerate(prompts):
            for j in range(body.n):
                c = Choice(len(choices), stops, n_logprobs)
                c.prompt_ids = ids
                choices.append(c)
        if max_tokens == 0:
            for c in choices:
                c.finish_reason = "length"
                yield c, "", (0, 0)
            return
        try:
            for c in choices:
                c.rid = aengine.submit(c.prompt_ids, params_for(body, max_tokens, c.index, n_logprobs), loop, q,
                                       c.index)
        except ValueError as e:
            for c in choices:
                if c.rid:
                    aengine.abort(c.rid)
            raise APIError(400, str(e))
        live = len(choices)
        try:
            while live:
                try:
                    tag, out = await asyncio.wait_for(q.get(), timeout=1.0)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return
                    continue
                c = choices[tag]
                if c.finish_reason is not None:
                    continue
                start = len(c.ids)
                delta = c.feed(out)
                if c.finish_reason is not None:
                    live -= 1
                    if not out.finished:  # stopped by a stop string: free the engine's slot
                        aengine.abort(c.rid)
                yield c, delta, (start, len(c.ids))
        finally:
            for c in choices:
                if c.finish_reason is None and c.rid is not None:
                    aengine.abort(c.rid)

    def usage(choices, prompts):
        p = sum(len(x) for x in prompts)
        g = sum(len(c.ids) for c in choices)
        return {"prompt_tokens": p, "completion_tokens": g, "total_tokens": p + g}

    def sse(obj) -> str:
        return f"data: {json.dumps(obj)}\n\n"

    async def stream_response(request, prompts, body, max_tokens, n_lp, rid, obj, chunk):
        """Server-sent events of ``run_choices``: ``await chunk(choice, delta, start, end)`` gives the choice
        entry of one event (None: nothing to send). 4xx/503 errors surface before the stream starts."""
        gen = run_choices(request, prompts, body, max_tokens, n_lp)
        first = await anext(gen, None)

        async def events():
            try:
                item = first
                while item is not None:
                    c, delta, (a, b) = item
                    entry = await chunk(c, delta, a, b)
                    if entry is not None:
                        yield sse({"id": rid, "object": obj, "created": int(time.time()), "model": model_name,
                                   "choices": [entry]})
                    item = await anext(gen, None)
                yield "data: [DONE]\n\n"
            finally:
                await gen.aclose()

        return StreamingResponse(events(), media_type="text/event-stream")

    async def finished_choices(request, prompts, body, max_tokens, n_lp):
        """The finished choices of ``run_choices`` in index order (fewer if the client went away)."""
        final = {}
        async for c, _, _ in run_choices(request, prompts, body, max_tokens, n_lp):
            if c.finish_reason is not None:
                final[c.index] = c
        return [final[i] for i in sorted(final)]

    # ---------------------------------------------------------------------------------------- routes
    @app.get("/health")
    async def health():
        return {"status": "ok", "running": engine.num_running, "waiting": engine.num_waiting}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "moejax", "max_model_len": engine.max_model_len}]}

    @app.get("/metrics")
    async def metrics():
        from prometheus_client import CONTENT_TYPE_LATEST
        return Response(engine.prom.render(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        check_model(body.model)
        p = body.prompt
        if isinstance(p, str):
            prompts = [tokenizer.encode(p)]
        elif p and all(isinstance(x, int) for x in p):
            prompts = [list(p)]
        elif p and all(isinstance(x, str) for x in p):
            prompts = [tokenizer.encode(x) for x in p]
        else:
            prompts = [list(x) for x in p]
        if not prompts:
            raise APIError(400, "invalid value for 'prompt': empty", "prompt")
        prompts = [validate_prompt(x) for x in prompts]
        n_prompt = max(len(x) for x in prompts)
        max_tokens = 16 if body.max_tokens is None else body.max_tokens
        if n_prompt + max_tokens > engine.max_model_len:
            raise APIError(400, f"prompt ({n_prompt} tokens) + max_tokens ({max_tokens}) exceeds the context "
                                f"length {engine.max_model_len}", "max_tokens", "context_length_exceeded")
        if max_tokens == 0 and not body.echo:
            raise APIError(400, "invalid value for 'max_tokens': 0 is only allowed with echo=true",
                           "max_tokens")
        n_lp = body.logprobs or 0
        want_lp = body.logprobs is not None
        rid = f"cmpl-{uuid.uuid4().hex}"

        async def echo_part(ids):
            text = tokenizer.decode(ids)
            if not want_lp:
                return text, None
            nxt, top_id, top_lp = await asyncio.to_thread(scorer, ids)
            toks = [tokenizer.piece(t) for t in ids]
            lp = {"tokens": toks, "token_logprobs": [None] + [float(x) for x in nxt],
                  "top_logprobs": [None] + [{tokenizer.piece(a): float(b) for a, b in zip(i[:n_lp], v[:n_lp])}
                                            for i, v in zip(top_id, top_lp)],
                  "text_offset": [int(x) for x in np.cumsum([0] + [len(t) for t in toks])[:-1]]}
            return text, lp

        def merge_lp(a, b):
            if a is None:
                return b
            if b is None:
                return a
            off = (a["text_offset"][-1] + len(a["tokens"][-1])) if a["tokens"] else 0
            return {"tokens": a["tokens"] + b["tokens"], "token_logprobs": a["token_logprobs"] + b["token_logprobs"],
                    "top_logprobs": a["top_logprobs"] + b["top_logprobs"],
                    "text_offset": a["text_offset"] + [off + x for x in b["text_offset"]]}

        def clean(lp):
            if lp is None:
                return None
            return {**lp, "text_offset": [int(x) for x in lp["text_offset"]]}

        if body.stream:
            echoed = set()

            async def chunk(c, delta, a, b):
                text, lp = delta, (c.logprobs_completion(a, b) if want_lp and b > a else None)
                if body.echo and c.index not in echoed:
                    echoed.add(c.index)
                    et, elp = await echo_part(c.prompt_ids)
                    text, lp = et + text, merge_lp(elp, lp)
                if text or c.finish_reason or lp:
                    return {"index": c.index, "text": text, "logprobs": clean(lp), "finish_reason": c.finish_reason}
                return None

            return await stream_response(request, prompts, body, max_tokens, n_lp, rid, "text_completion", chunk)

        final = await finished_choices(request, prompts, body, max_tokens, n_lp)
        out = []
        for c in final:
            text, lp = c.text, (c.logprobs_completion(0, len(c.ids)) if want_lp else None)
            if body.echo:
                et, elp = await echo_part(c.prompt_ids)
                text, lp = et + text, merge_lp(elp, lp)
            out.append({"index": c.index, "text": text, "logprobs": clean(lp), "finish_reason": c.finish_reason})
        if len(out) < len(prompts) * body.n:  # client went away
            return Response(status_code=499)
        return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model_name,
                "choices": out, "usage": usage(final, prompts)}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        check_model(body.model)
        msgs = []
        for m in body.messages:
            content = m.content
            if isinstance(content, list):
                if any(p.get("type") != "text" or not isinstance(p.get("text"), str) for p in content):
                    raise APIError(400, "invalid value for 'messages.content': only text parts are supported",
                                   "messages")
                content = "".join(p["text"] for p in content)
            msgs.append({"role": m.role, "content": content})
        ids = validate_prompt(tokenizer.encode(tokenizer.apply_chat_template(msgs)))
        req_max = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        max_tokens = resolve_max_tokens(req_max, len(ids))
        if max_tokens < 1 or len(ids) + max_tokens > engine.max_model_len:
            raise APIError(400, f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) must fit the context "
                                f"length {engine.max_model_len} with at least one new token", "max_tokens",
                           "context_length_exceeded")
        n_lp = (body.top_logprobs or 0) if body.logprobs else 0
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        if body.stream:
            started = set()

            async def chunk(c, delta, a, b):
                d = {}
                if c.index not in started:
                    started.add(c.index)
                    d["role"] = "assistant"
                if delta:
                    d["content"] = delta
                lp = c.logprobs_chat(a, b) if body.logprobs and b > a else None
                if d or c.finish_reason or lp:
                    return {"index": c.index, "delta": d, "logprobs": lp, "finish_reason": c.finish_reason}
                return None

            return await stream_response(request, [ids], body, max_tokens, n_lp, rid, "chat.completion.chunk",
                                         chunk)
        final = await finished_choices(request, [ids], body, max_tokens, n_lp)
        if len(final) < body.n:
            return Response(status_code=499)
        choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                    "logprobs": c.logprobs_chat(0, len(c.ids)) if body.logprobs else None,
                    "finish_reason": c.finish_reason} for c in final]
        return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model_name,
                "choices": choices, "usage": usage(final, [ids])}

    return app


@contextlib.contextmanager
def serve_in_background(app, host: str = "127.0.0.1"):
    """Run ``app`` with uvicorn on a free port of ``host`` in a daemon thread; yields the base URL and stops the
    server on exit (benchmarks and tests use real sockets, so client disconnects are real)."""
    import socket

    import uvicorn

    with socket.socket() as sock:
        sock.bind((host, 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        for _ in range(600):
            if server.started:
                break
            time.sleep(0.05)
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def serve(engine: Engine, tokenizer, *, host: str = "127.0.0.1", port: int = 8000, model_name: str = "moejax",
          max_pending: int = 512, batch_wait_ms: float = 2.0, log_level: str = "info") -> None:
    """Run the server until interrupted."""
    import uvicorn

    app = create_app(engine, tokenizer, model_name=model_name, max_pending=max_pending, batch_wait_ms=batch_wait_ms)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
