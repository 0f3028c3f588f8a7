"""Routes of the OpenAI-compatible server and the per-choice streaming they share.

A request becomes ``n`` :class:`Choice` objects per prompt (incremental detokenization, stop strings,
logprobs); :func:`run_choices` submits them to the engine thread and yields their text as tokens arrive;
:func:`stream_response` turns that into server-sent events and :func:`finished_choices` waits for the whole
answer. The routes find the engine, tokenizer and model name in ``request.app.state.ctx`` (a
:class:`ServeContext`, built by :func:`moejax.serve.server.create_app`); :func:`register_routes` adds them to
an app.

``return_token_ids`` (vLLM's field; default false) adds token ids where vLLM puts them: completions give each
choice ``token_ids`` (its generated ids) and ``prompt_token_ids`` (its prompt's); chat gives each choice
``token_ids`` and the response a top-level ``prompt_token_ids``. In a stream, every event carries its new ids
in ``token_ids`` (an engine output with new ids always makes an event, even while its text is held back) and a
choice's first event carries the prompt's ids (completions: in the choice; chat: at the top level, as vLLM's
role chunk of each choice). ``token_ids`` are what the engine generated: an EOS or stop token id it emitted
included, with a stop string the ids up to the one that completed it, with ``echo`` the generated ids only.
With the flag false or null the keys are absent (responses as without the field).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from moejax.serve.engine import Engine, RequestOutput, SamplingParams
from moejax.serve.errors import APIError
from moejax.serve.protocol import ChatRequest, CompletionRequest
from moejax.serve.tokenizer import ChatTemplateError


# ------------------------------------------------------------------------------------------------ context
@dataclass
class ServeContext:
    """What the routes serve from: the engine (which also scores prompts for ``echo`` logprobs), its thread
    (:class:`~moejax.serve.server.AsyncEngine`), the tokenizer, the served model's name and its creation time."""

    engine: Engine
    tokenizer: Any
    aengine: Any
    model_name: str
    created: int

    def check_model(self, name) -> None:
        if name is not None and name != self.model_name:
            raise APIError(404, f"model '{name}' does not exist; this server serves '{self.model_name}'", "model",
                           "model_not_found")

    def params_for(self, body, max_tokens: int, i: int, n_logprobs: int) -> SamplingParams:
        """The sampling parameters of choice ``i`` (seeds differ per choice so ``n`` > 1 samples differ)."""
        stop_ids = tuple(body.stop_token_ids or ())
        if self.tokenizer.eos_id is not None and not body.ignore_eos:
            stop_ids += (self.tokenizer.eos_id,)
        seed = None if body.seed is None else (body.seed + i) % 2 ** 32
        sp = SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, seed=seed,
                            stop_token_ids=stop_ids, logprobs=n_logprobs)
        adapt = getattr(self.engine, "request_params", None)  # an engine with its own per-request options
        return sp if adapt is None else adapt(body, sp)

    def check_request(self, body, max_tokens: int) -> None:
        """An engine that cannot serve every request (a diffusion LM's engine) raises a 400 here, naming the
        field."""
        check = getattr(self.engine, "check_request", None)
        if check is not None:
            check(body, max_tokens)

    def validate_prompt(self, ids: list[int]) -> list[int]:
        try:
            return self.engine.validate_prompt(ids)
        except ValueError as e:
            raise APIError(400, str(e), "prompt", "context_length_exceeded" if "context" in str(e) else None)

    def resolve_max_tokens(self, req_max, n_prompt):
        if req_max is None and getattr(self.engine, "default_max_tokens", None):  # e.g. one diffusion block
            return self.engine.default_max_tokens
        room = self.engine.max_model_len - n_prompt
        if req_max is None:
            return room
        return req_max


def context(request: Request) -> ServeContext:
    return request.app.state.ctx


def stops_of(body) -> list[str]:
    s = body.stop
    stops = [s] if isinstance(s, str) else list(s or [])
    if any(not x for x in stops):
        raise APIError(400, "invalid value for 'stop': stop strings must be non-empty", "stop")
    if len(stops) > 16:
        raise APIError(400, "invalid value for 'stop': at most 16 stop strings", "stop")
    return stops


# ------------------------------------------------------------------------------------------------ choices
class Choice:
    """Incremental detokenization, stop strings and logprobs of one sequence."""

    def __init__(self, index, stops, n_logprobs, tokenizer):
        self.index, self.stops, self.n_logprobs = index, stops, n_logprobs
        self.tokenizer = tokenizer
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.prompt_ids: list[int] = []
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
        eos_id = self.tokenizer.eos_id
        ids = [t for t in out.new_tokens if t != eos_id]
        self.ids += out.new_tokens
        self.lps += out.new_logprobs
        self.tops += out.new_top_logprobs
        if ids or out.finished:
            self.text = self.tokenizer.decode([t for t in self.ids if t != eos_id])
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
        piece = self.tokenizer.piece
        toks = [piece(t) for t in self.ids[start:end]]
        return {"tokens": toks, "token_logprobs": self.lps[start:end],
                "top_logprobs": [{piece(a): b for a, b in top} for top in self.tops[start:end]],
                "text_offset": list(np.cumsum([0] + [len(t) for t in toks])[:-1])}

    def logprobs_chat(self, start: int, end: int):
        def entry(t, lp):
            p = self.tokenizer.piece(t)
            return {"token": p, "logprob": lp, "bytes": list(p.encode("utf-8"))}
        return {"content": [{**entry(t, lp), "top_logprobs": [entry(a, b) for a, b in top]}
                            for t, lp, top in zip(self.ids[start:end], self.lps[start:end], self.tops[start:end])]}


def make_choices(ctx: ServeContext, prompts: list[list[int]], body, n_logprobs: int) -> list[Choice]:
    """``body.n`` choices per prompt, indexed prompt-major."""
    stops = stops_of(body)
    choices = []
    for ids in prompts:
        for _ in range(body.n):
            c = Choice(len(choices), stops, n_logprobs, ctx.tokenizer)
            c.prompt_ids = ids
            choices.append(c)
    return choices


async def run_choices(ctx: ServeContext, request: Request, prompts: list[list[int]], body, max_tokens: int,
                      n_logprobs: int):
    """Submit n sequences per prompt; yields (choice, delta text, token range) as tokens arrive."""
    aengine = ctx.aengine
    if aengine.overloaded:
        raise APIError(503, "server overloaded; retry later", None, "overloaded", headers={"Retry-After": "1"})
    loop = asyncio.get_running_loop()
    q: asyncio.Queue = asyncio.Queue()
    choices = make_choices(ctx, prompts, body, n_logprobs)
    if max_tokens == 0:
        for c in choices:
            c.finish_reason = "length"
            yield c, "", (0, 0)
        return
    try:
        for c in choices:
            c.rid = aengine.submit(c.prompt_ids, ctx.params_for(body, max_tokens, c.index, n_logprobs), loop, q,
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


async def stream_response(ctx: ServeContext, request, prompts, body, max_tokens, n_lp, rid, obj, chunk,
                          top=None):
    """Server-sent events of ``run_choices``: ``await chunk(choice, delta, start, end)`` gives the choice
    entry of one event (None: nothing to send); ``top(choice)``, when given, the event's top-level fields after
    ``choices``. 4xx/503 errors surface before the stream starts."""
    gen = run_choices(ctx, request, prompts, body, max_tokens, n_lp)
    first = await anext(gen, None)

    async def events():
        try:
            item = first
            while item is not None:
                c, delta, (a, b) = item
                entry = await chunk(c, delta, a, b)
                if entry is not None:
                    yield sse({"id": rid, "object": obj, "created": int(time.time()), "model": ctx.model_name,
                               "choices": [entry], **(top(c) if top is not None else {})})
                item = await anext(gen, None)
            yield "data: [DONE]\n\n"
        finally:
            await gen.aclose()

    return StreamingResponse(events(), media_type="text/event-stream")


async def finished_choices(ctx: ServeContext, request, prompts, body, max_tokens, n_lp):
    """The finished choices of ``run_choices`` in index order (fewer if the client went away)."""
    final = {}
    async for c, _, _ in run_choices(ctx, request, prompts, body, max_tokens, n_lp):
        if c.finish_reason is not None:
            final[c.index] = c
    return [final[i] for i in sorted(final)]


# ------------------------------------------------------------------------------------------------ info routes
async def health(request: Request):
    engine = context(request).engine
    out = {"status": "ok", "running": engine.num_running, "waiting": engine.num_waiting}
    warm = engine.warmup_status()
    if warm["state"] != "none":  # a background warm-up: serving already, compiling step shapes beside it
        out["warmup"] = warm
    return out


async def models(request: Request):
    ctx = context(request)
    return {"object": "list", "data": [{"id": ctx.model_name, "object": "model", "created": ctx.created,
                                        "owned_by": "moejax", "max_model_len": ctx.engine.max_model_len}]}


async def metrics(request: Request):
    from prometheus_client import CONTENT_TYPE_LATEST
    return Response(context(request).engine.prom.render(), media_type=CONTENT_TYPE_LATEST)


# ------------------------------------------------------------------------------------------------ completions
def completion_prompts(tokenizer, p) -> list[list[int]]:
    """The token ids of each prompt of a completion request (text, ids, or a batch of either)."""
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
    return prompts


async def echo_part(ctx: ServeContext, ids, want_lp: bool, n_lp: int):
    """The echoed prompt's text and (with ``want_lp``) its teacher-forced logprobs in completion format."""
    tokenizer = ctx.tokenizer
    text = tokenizer.decode(ids)
    if not want_lp:
        return text, None
    try:
        nxt, top_id, top_lp = await asyncio.to_thread(ctx.engine.score_prompt, ids)
    except NotImplementedError as e:  # e.g. offloaded experts: no dense forward to score with
        raise APIError(400, str(e), "logprobs", "unsupported") from None
    toks = [tokenizer.piece(t) for t in ids]
    lp = {"tokens": toks, "token_logprobs": [None] + [float(x) for x in nxt],
          "top_logprobs": [None] + [{tokenizer.piece(a): float(b) for a, b in zip(i[:n_lp], v[:n_lp])}
                                    for i, v in zip(top_id, top_lp)],
          "text_offset": [int(x) for x in np.cumsum([0] + [len(t) for t in toks])[:-1]]}
    return text, lp


def merge_logprobs(a, b):
    """Completion logprobs of ``a``'s tokens followed by ``b``'s (offsets of ``b`` shifted past ``a``)."""
    if a is None:
        return b
    if b is None:
        return a
    off = (a["text_offset"][-1] + len(a["tokens"][-1])) if a["tokens"] else 0
    return {"tokens": a["tokens"] + b["tokens"], "token_logprobs": a["token_logprobs"] + b["token_logprobs"],
            "top_logprobs": a["top_logprobs"] + b["top_logprobs"],
            "text_offset": a["text_offset"] + [off + x for x in b["text_offset"]]}


def clean_logprobs(lp):
    """Text offsets as Python ints (numpy ints are not JSON-serializable)."""
    if lp is None:
        return None
    return {**lp, "text_offset": [int(x) for x in lp["text_offset"]]}


def completion_chunk(ctx: ServeContext, body: CompletionRequest, want_lp: bool, n_lp: int):
    """The ``chunk`` of :func:`stream_response` for completions (the echo goes into a choice's first event, and
    with ``return_token_ids`` its prompt's ids; every event then carries its new ids)."""
    echoed, sent_prompt = set(), set()

    async def chunk(c, delta, a, b):
        text, lp = delta, (c.logprobs_completion(a, b) if want_lp and b > a else None)
        if body.echo and c.index not in echoed:
            echoed.add(c.index)
            et, elp = await echo_part(ctx, c.prompt_ids, want_lp, n_lp)
            text, lp = et + text, merge_logprobs(elp, lp)
        if text or c.finish_reason or lp or (body.return_token_ids and b > a):
            entry = {"index": c.index, "text": text, "logprobs": clean_logprobs(lp), "finish_reason": c.finish_reason}
            if body.return_token_ids:
                entry["token_ids"] = c.ids[a:b]
                if c.index not in sent_prompt:
                    sent_prompt.add(c.index)
                    entry["prompt_token_ids"] = c.prompt_ids
            return entry
        return None

    return chunk


async def completions(body: CompletionRequest, request: Request):
    ctx = context(request)
    ctx.check_model(body.model)
    prompts = [ctx.validate_prompt(x) for x in completion_prompts(ctx.tokenizer, body.prompt)]
    n_prompt = max(len(x) for x in prompts)
    max_len = ctx.engine.max_model_len
    max_tokens = (getattr(ctx.engine, "default_max_tokens", None) or 16) if body.max_tokens is None else body.max_tokens
    if n_prompt + max_tokens > max_len:
        raise APIError(400, f"prompt ({n_prompt} tokens) + max_tokens ({max_tokens}) exceeds the context "
                            f"length {max_len}", "max_tokens", "context_length_exceeded")
    if max_tokens == 0 and not body.echo:
        raise APIError(400, "invalid value for 'max_tokens': 0 is only allowed with echo=true", "max_tokens")
    ctx.check_request(body, max_tokens)
    n_lp = body.logprobs or 0
    want_lp = body.logprobs is not None
    rid = f"cmpl-{uuid.uuid4().hex}"
    if body.stream:
        return await stream_response(ctx, request, prompts, body, max_tokens, n_lp, rid, "text_completion",
                                     completion_chunk(ctx, body, want_lp, n_lp))

    final = await finished_choices(ctx, request, prompts, body, max_tokens, n_lp)
    out = []
    for c in final:
        text, lp = c.text, (c.logprobs_completion(0, len(c.ids)) if want_lp else None)
        if body.echo:
            et, elp = await echo_part(ctx, c.prompt_ids, want_lp, n_lp)
            text, lp = et + text, merge_logprobs(elp, lp)
        out.append({"index": c.index, "text": text, "logprobs": clean_logprobs(lp), "finish_reason": c.finish_reason})
        if body.return_token_ids:
            out[-1].update(token_ids=c.ids, prompt_token_ids=c.prompt_ids)
    if len(out) < len(prompts) * body.n:  # client went away
        return Response(status_code=499)
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": ctx.model_name,
            "choices": out, "usage": usage(final, prompts)}


# ------------------------------------------------------------------------------------------------ chat
def chat_prompt_text(tokenizer, body: ChatRequest) -> str:
    """The tokenizer's chat template applied to the request's messages (text content parts joined), with the
    generation prompt; a template that fails on them (its own ``raise_exception`` included) is a 400."""
    msgs = []
    for m in body.messages:
        content = m.content
        if isinstance(content, list):
            if any(p.get("type") != "text" or not isinstance(p.get("text"), str) for p in content):
                raise APIError(400, "invalid value for 'messages.content': only text parts are supported",
                               "messages")
            content = "".join(p["text"] for p in content)
        msgs.append({"role": m.role, "content": content})
    try:
        return tokenizer.apply_chat_template(msgs)
    except ChatTemplateError as e:
        raise APIError(400, str(e), "messages", "chat_template_error") from None


def chat_chunk(body: ChatRequest, prompt_ids: list[int]):
    """The ``chunk`` and ``top`` of :func:`stream_response` for chat (a choice's first event carries the role, and
    with ``return_token_ids`` the top-level ``prompt_token_ids``; every event then carries its new ids)."""
    started, sent_prompt = set(), set()

    async def chunk(c, delta, a, b):
        d = {}
        if c.index not in started:
            started.add(c.index)
            d["role"] = "assistant"
        if delta:
            d["content"] = delta
        lp = c.logprobs_chat(a, b) if body.logprobs and b > a else None
        if d or c.finish_reason or lp or (body.return_token_ids and b > a):
            entry = {"index": c.index, "delta": d, "logprobs": lp, "finish_reason": c.finish_reason}
            if body.return_token_ids:
                entry["token_ids"] = c.ids[a:b]
            return entry
        return None

    def top(c):
        if body.return_token_ids and c.index not in sent_prompt:
            sent_prompt.add(c.index)
            return {"prompt_token_ids": prompt_ids}
        return {}

    return chunk, top


async def chat(body: ChatRequest, request: Request):
    ctx = context(request)
    ctx.check_model(body.model)
    ids = ctx.validate_prompt(ctx.tokenizer.encode(chat_prompt_text(ctx.tokenizer, body)))
    max_len = ctx.engine.max_model_len
    req_max = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    max_tokens = ctx.resolve_max_tokens(req_max, len(ids))
    if max_tokens < 1 or len(ids) + max_tokens > max_len:
        raise APIError(400, f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) must fit the context "
                            f"length {max_len} with at least one new token", "max_tokens",
                       "context_length_exceeded")
    ctx.check_request(body, max_tokens)
    n_lp = (body.top_logprobs or 0) if body.logprobs else 0
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    if body.stream:
        chunk, top = chat_chunk(body, ids)
        return await stream_response(ctx, request, [ids], body, max_tokens, n_lp, rid, "chat.completion.chunk",
                                     chunk, top)
    final = await finished_choices(ctx, request, [ids], body, max_tokens, n_lp)
    if len(final) < body.n:
        return Response(status_code=499)
    choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                "logprobs": c.logprobs_chat(0, len(c.ids)) if body.logprobs else None,
                "finish_reason": c.finish_reason} for c in final]
    out = {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": ctx.model_name,
           "choices": choices, "usage": usage(final, [ids])}
    if body.return_token_ids:
        for ch, c in zip(choices, final, strict=True):
            ch["token_ids"] = c.ids
        out["prompt_token_ids"] = ids
    return out


def register_routes(app) -> None:
    """Add the API's routes to ``app`` (whose ``state.ctx`` is a :class:`ServeContext`)."""
    app.get("/health")(health)
    app.get("/v1/models")(models)
    app.get("/metrics")(metrics)
    app.post("/v1/completions")(completions)
    app.post("/v1/chat/completions")(chat)
