"""OpenAI-compatible HTTP server (FastAPI + uvicorn) over the continuous-batching engine.

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both with ``stream`` for server-sent
events), ``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus text format).

The engine runs on one background thread (:class:`AsyncEngine`); request handlers queue work on it and receive
tokens through per-request asyncio queues. Errors follow OpenAI's shape ``{"error": {"message", "type",
"param", "code"}}``: malformed JSON, invalid fields (the message names the field and the allowed values),
prompts that do not fit the context and unknown models are 4xx; when more than ``max_pending`` requests are
in flight new ones get 503 with ``Retry-After``. A client that disconnects mid-stream has its requests aborted
and their KV blocks freed.

This module holds the engine thread, the app factory and the uvicorn runners; the request bodies are in
:mod:`moejax.serve.protocol`, the error shape and handlers in :mod:`moejax.serve.errors`, and the routes with
their per-choice streaming in :mod:`moejax.serve.routes`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time

from moejax.serve.engine import Engine, RequestOutput, SamplingParams
from moejax.serve.errors import install_error_handlers
from moejax.serve.routes import ServeContext, register_routes

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
        if isinstance(max_pending, bool) or not isinstance(max_pending, int) or max_pending < 1:
            raise ValueError(f"max_pending={max_pending!r} must be an integer >= 1 (requests in flight before the "
                             f"server answers 503)")
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


# ------------------------------------------------------------------------------------------------ app
def create_app(engine: Engine, tokenizer, *, model_name: str = "moejax", max_pending: int = 512,
               batch_wait_ms: float = 2.0):
    """The FastAPI application serving ``engine`` (started and stopped with the app's lifespan).
    ``max_pending`` and ``batch_wait_ms``: see :class:`AsyncEngine`."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI

    aengine = AsyncEngine(engine, max_pending=max_pending, batch_wait_ms=batch_wait_ms)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        aengine.start()
        yield
        aengine.stop()

    app = FastAPI(title="moejax", lifespan=lifespan)
    app.state.engine = engine
    app.state.async_engine = aengine
    app.state.ctx = ServeContext(engine=engine, tokenizer=tokenizer, aengine=aengine, model_name=model_name,
                                 created=created)
    install_error_handlers(app)
    register_routes(app)
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
