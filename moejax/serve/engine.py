"""Continuous-batching inference engine over a paged KV cache.

Usage::

    engine = Engine(model, EngineConfig(scheduler="layered"))
    rid = engine.add_request([1, 2, 3], SamplingParams(max_tokens=32, temperature=0))
    while engine.has_unfinished():
        for out in engine.step():          # tokens stream out as they are produced
            print(out.request_id, out.new_tokens, out.finished)

    results = engine.generate(prompts, SamplingParams(max_tokens=64, temperature=0))   # offline

Each :meth:`Engine.step` asks the scheduler for a :class:`~moejax.serve.scheduler.Plan`, packs it into
fixed shape buckets, runs the jitted :func:`~moejax.serve.step.engine_step`, samples on device, and hands back
per-request deltas. The buckets: decode rows are rounded up to a power of two (to the full batch next to a
prefill), prefill rows to a power of two and prefill tokens to a power of two and then to multiples of 512;
block tables always span ``max_model_len`` (attention loops over key blocks up to the longest row at run time)
and the layer group is a run-time value, so the compiled programs do not depend on context length or layer
group: :meth:`Engine.warmup` compiles all of them ahead of time (no recompilation in steady state). :meth:`add_request` and
:meth:`abort` may be called from another thread: they are queued and applied at the start of the next step.
"""

from __future__ import annotations

import itertools
import math
import queue
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moejax.models.generate import bucket as pow2
from moejax.models.transformer import dtype_of, resolve_layer_loop, unstack_layers
from moejax.serve.kv_cache import BlockAllocator, KVPool
from moejax.serve.metrics import (
    IterationStats,
    PrometheusMetrics,
    RequestMetrics,
    summarize,
)
from moejax.serve.scheduler import (
    Plan,
    Request,
    SchedulerConfig,
    Status,
    make_scheduler,
)
from moejax.serve.step import (
    TOP_LOGPROBS,
    DecodeBatch,
    PrefillBatch,
    engine_decode_steps,
    engine_step,
)


@dataclass(frozen=True)
class SamplingParams:
    """Per-request generation options.

    Attributes:
      max_tokens: new tokens to generate (>= 1); generation also stops at the engine's ``max_model_len``.
      temperature: 0 = greedy; otherwise softmax temperature (<= 100).
      top_p: nucleus sampling mass in (0, 1].
      seed: sampling seed; the i-th token's key depends only on (seed, i), so results do not depend on
        batching or preemption. None draws one from the engine's generator.
      stop_token_ids: stop after emitting one of these ids (the id is kept in the output tokens).
      logprobs: how many top log-probabilities to report per token (0..5); the sampled token's own
        log-probability is always reported.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    logprobs: int = 0

    def validate(self) -> SamplingParams:
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens!r} must be an integer >= 1")
        t = self.temperature
        if not isinstance(t, (int, float)) or isinstance(t, bool) or not math.isfinite(t) or not 0 <= t <= 100:
            raise ValueError(f"temperature={t!r} must be a number in [0, 100]")
        p = self.top_p
        if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0 < p <= 1:
            raise ValueError(f"top_p={p!r} must be a number in (0, 1]")
        if self.seed is not None and (not isinstance(self.seed, int) or not 0 <= self.seed < 2 ** 32):
            raise ValueError(f"seed={self.seed!r} must be an integer in [0, 2**32)")
        if not isinstance(self.logprobs, int) or not 0 <= self.logprobs <= TOP_LOGPROBS:
            raise ValueError(f"logprobs={self.logprobs!r} must be an integer in [0, {TOP_LOGPROBS}]")
        return self


@dataclass(frozen=True)
class EngineConfig:
    """Engine settings.

    Attributes:
      scheduler: ``"chunked"`` or ``"layered"``.
      sched: scheduling limits (:class:`~moejax.serve.scheduler.SchedulerConfig`).
      block_size: tokens per KV block.
      num_blocks: blocks in the pool (block 0 is scratch); default: enough for ``max_num_seqs`` full-length
        sequences.
      max_model_len: longest prompt + output; default the model's ``max_seq_len``.
      enable_prefix_cache: share full prompt blocks between requests by block hash.
      record_logits: keep each sampled token's full logits on the host (tests; costs a transfer per step).
      min_decode_bucket / min_prefill_tokens: smallest shape buckets.
      prefill_token_step: prefill tokens are bucketed to powers of two up to this power of two, then to its
        multiples (smaller: less padding of long prompts, more compiled shapes).
      kv_block: keys per block of the attention loop (a multiple of ``block_size``); the loop runs up to the
        longest row's length, so block tables can span the whole context at no cost.
      prefill_kv_block: the same for prefill chunks (default ``min(kv_block, 128)``): a chunk sees only the
        keys written so far, so smaller blocks score less of a wide table (decode rows keep ``kv_block``:
        one block, no loop, for short contexts).
      attn_impl: paged attention implementation: ``"xla"`` (gather + dense, the CPU path), ``"pallas"``
        (``pallas_kernels.paged_attention``; interpreted on CPU) or ``"auto"`` (the kernel only where it
        has been validated faster on the backend).
      layer_loop: ``"scan"``, ``"unroll"`` or ``"auto"`` (see :func:`moejax.models.transformer.resolve_layer_loop`):
        ``unroll`` keeps a per-layer copy of the stacked layer weights (twice the layer weights' memory while
        the model also holds them) and compiles one call per layer, which on CPU saves copying every layer's
        weights out of the stack on every step.
      offload: a :class:`moejax.offload.runtime.OffloadConfig` to serve with experts on storage and only
        ``budget_bytes`` of them in memory (the step then runs layer by layer; see ``moejax/offload``).
      pregate: a :class:`moejax.models.readme.PreGate`: every MoE layer uses the experts it picks from the
        token ids (Read-ME), known before the step runs (the offload cache's Belady policy uses them).
      decode_steps: multi-step decoding (as vLLM's multi-step scheduling): when an iteration would only
        decode (no prompt to prefill, none waiting), run this many decode iterations in one compiled call,
        feeding the sampled tokens back on the device, so the host's per-iteration work (scheduling, packing,
        dispatch, the transfer back) is paid once per ``decode_steps`` tokens. Tokens are the same as with 1;
        they reach the caller (and streams) in groups of up to ``decode_steps`` (one
        :class:`RequestOutput` per request and call), and a request that finishes
        inside a group costs the rest of the group's compute for its row. New requests wait at most one
        group. 1 (default) disables it.
    """

    scheduler: str = "chunked"
    sched: SchedulerConfig = field(default_factory=SchedulerConfig)
    block_size: int = 16
    num_blocks: int | None = None
    max_model_len: int | None = None
    enable_prefix_cache: bool = True
    record_logits: bool = False
    min_decode_bucket: int = 1
    min_prefill_tokens: int = 16
    prefill_token_step: int = 512
    kv_block: int = 256
    prefill_kv_block: int | None = None
    attn_impl: str = "xla"
    layer_loop: str = "auto"
    offload: object | None = None
    pregate: object | None = None
    decode_steps: int = 1


@dataclass
class RequestOutput:
    """What one step produced for one request (tokens since the previous output)."""

    request_id: str
    new_tokens: list[int]
    new_logprobs: list[float]
    new_top_logprobs: list[list[tuple[int, float]]]
    finished: bool
    finish_reason: str | None = None    # "stop", "length" or "abort"
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0


def merge_outputs(outs: Sequence[RequestOutput]) -> RequestOutput:
    """Consecutive outputs of one request as one (tokens in order; finished as the last one)."""
    if len(outs) == 1:
        return outs[0]
    first, last = outs[0], outs[-1]
    return RequestOutput(first.request_id, [t for o in outs for t in o.new_tokens],
                         [x for o in outs for x in o.new_logprobs], [x for o in outs for x in o.new_top_logprobs],
                         last.finished, last.finish_reason, first.num_prompt_tokens, first.num_cached_tokens)


@dataclass
class Completion:
    """A finished request (offline API)."""

    request_id: str
    prompt: list[int]
    tokens: list[int]
    logprobs: list[float]
    top_logprobs: list[list[tuple[int, float]]]
    finish_reason: str
    metrics: RequestMetrics
    logits: np.ndarray | None = None     # [n_tokens, V] with EngineConfig.record_logits


def _bucket_edges(longest: int, minimum: int, linear_from: int = 512) -> list[int]:
    """Lengths that reach every bucket of :func:`shape_bucket` up to ``longest``."""
    edges, b = [], minimum
    while b < min(longest, linear_from):
        edges.append(b)
        b *= 2
    edges.append(min(longest, max(b, minimum)))
    edges += list(range(linear_from * 2, longest, linear_from))
    return sorted(set(edges + [longest]))


def shape_bucket(n: int, minimum: int = 1, linear_from: int = 512) -> int:
    """Shape bucket: powers of two up to ``linear_from``, then multiples of it (long prompts waste < 1/k)."""
    if n <= linear_from:
        return pow2(n, minimum)
    return -(-n // linear_from) * linear_from


class _Entry:
    __slots__ = ("callback", "logits", "logprobs", "metrics", "req", "tops")

    def __init__(self, req, metrics, callback):
        self.req, self.metrics, self.callback = req, metrics, callback
        self.logprobs, self.tops, self.logits = [], [], []


class Engine:
    """Continuous-batching engine for a :class:`~moejax.models.transformer.Transformer`."""

    def __init__(self, model, cfg: EngineConfig | None = None, *, model_name: str = "moejax"):
        cfg = cfg or EngineConfig()
        mcfg = model.cfg
        self.model, self.cfg, self.mcfg = model, cfg, mcfg
        self.model_name = model_name
        self.max_model_len = cfg.max_model_len or mcfg.max_seq_len
        if self.max_model_len > mcfg.max_seq_len:
            raise ValueError(f"EngineConfig.max_model_len={self.max_model_len} exceeds ModelConfig.max_seq_len="
                             f"{mcfg.max_seq_len}")
        if cfg.block_size < 1:
            raise ValueError(f"EngineConfig.block_size={cfg.block_size} must be >= 1")
        if cfg.kv_block < cfg.block_size or cfg.kv_block % cfg.block_size:
            raise ValueError(f"EngineConfig.kv_block={cfg.kv_block} must be a positive multiple of "
                             f"block_size={cfg.block_size}")
        step = cfg.prefill_token_step
        if not isinstance(step, int) or step < cfg.min_prefill_tokens or step & (step - 1):
            raise ValueError(f"EngineConfig.prefill_token_step={step!r} must be a power of two >= "
                             f"min_prefill_tokens={cfg.min_prefill_tokens}")
        k = cfg.decode_steps
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"EngineConfig.decode_steps={k!r} must be an integer >= 1")
        pkb = cfg.prefill_kv_block
        if pkb is None:
            pkb = max(cfg.block_size, min(cfg.kv_block, 128) // cfg.block_size * cfg.block_size)
        if not isinstance(pkb, int) or pkb < cfg.block_size or pkb % cfg.block_size:
            raise ValueError(f"EngineConfig.prefill_kv_block={pkb!r} must be a positive multiple of "
                             f"block_size={cfg.block_size}")
        self.prefill_kv_block = pkb
        ppb = cfg.kv_block // cfg.block_size
        # block-table width: the whole context, rounded up to whole key blocks
        self.max_pages = -(-math.ceil(self.max_model_len / cfg.block_size) // ppb) * ppb
        if cfg.attn_impl not in ("xla", "pallas", "auto"):
            raise ValueError(f"EngineConfig.attn_impl={cfg.attn_impl!r}; allowed: 'xla', 'pallas', 'auto'")
        num_blocks = cfg.num_blocks or 1 + cfg.sched.max_num_seqs * math.ceil(self.max_model_len / cfg.block_size)
        self.gdef, self.state = nnx.split(model)
        self.layer_states = None
        if cfg.offload is None and resolve_layer_loop(cfg.layer_loop) == "unroll":
            self.layer_states = unstack_layers(model)
        self.alloc = BlockAllocator(num_blocks, cfg.block_size, enable_prefix_cache=cfg.enable_prefix_cache)
        self.scheduler = make_scheduler(cfg.scheduler, cfg.sched, self.alloc, mcfg.n_layers)
        self.pool = KVPool.create(model.runs, num_blocks, cfg.block_size, mcfg.n_kv_heads, mcfg.resolved_head_dim,
                                  dtype_of(mcfg.dtype))
        m = mcfg.moe
        self.expert_bytes = 0 if m is None else 3 * mcfg.d_model * m.d_ff * jnp.dtype(dtype_of(mcfg.param_dtype)).itemsize
        self.entries: dict[str, _Entry] = {}
        self.finished_metrics: list[RequestMetrics] = []
        self.iterations: list[IterationStats] = []
        self.prom = PrometheusMetrics(model_name)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._ids = itertools.count()
        self._rng = np.random.default_rng(0)
        self._pf_hidden = None
        self._zeros = None
        self._group: dict | None = None  # outputs of a multi-step call, per request (see _step_multi)
        self.compiled_shapes: set[tuple] = set()  # step shapes compiled so far (by warmup or by a step)
        self.runtime = None
        if cfg.offload is not None:
            from moejax.offload.runtime import OffloadRuntime

            self.runtime = OffloadRuntime(model, cfg.offload, block_size=cfg.block_size, attn_impl=cfg.attn_impl,
                                          kv_block=cfg.kv_block)

    # ----------------------------------------------------------------------------------------- requests
    def validate_prompt(self, prompt: Sequence[int]) -> list[int]:
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise ValueError("prompt must contain at least one token")
        V = self.mcfg.vocab_size
        bad = [t for t in prompt if not 0 <= t < V]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary [0, {V})")
        if len(prompt) >= self.max_model_len:
            raise ValueError(f"prompt has {len(prompt)} tokens; the context is {self.max_model_len} "
                             "(prompt + at least one new token must fit)")
        return prompt

    def add_request(self, prompt: Sequence[int], params: SamplingParams | None = None, *,
                    request_id: str | None = None, arrival: float | None = None,
                    callback: Callable[[RequestOutput], None] | None = None) -> str:
        """Queue a request; returns its id. Bad prompts or parameters raise ``ValueError`` here.

        ``callback`` (optional) receives each :class:`RequestOutput` of this request as it is produced (on the
        thread that runs :meth:`step`).
        """
        params = (params or SamplingParams()).validate()
        prompt = self.validate_prompt(prompt)
        if params.seed is None:
            params = SamplingParams(**{**params.__dict__, "seed": int(self._rng.integers(0, 2 ** 32))})
        rid = request_id or f"req-{next(self._ids)}"
        now = time.perf_counter() if arrival is None else arrival
        req = Request(rid, prompt, params, now)
        self._inbox.put(("add", _Entry(req, RequestMetrics(now, len(prompt)), callback)))
        return rid

    def abort(self, request_id: str) -> None:
        """Cancel a request (queued; takes effect at the next step). Unknown ids are ignored."""
        self._inbox.put(("abort", request_id))

    def _drain_inbox(self, outputs: list[RequestOutput]) -> None:
        while True:
            try:
                op, x = self._inbox.get_nowait()
            except queue.Empty:
                return
            if op == "add":
                if x.req.id in self.entries:
                    raise ValueError(f"duplicate request id {x.req.id!r}")
                self.entries[x.req.id] = x
                self.scheduler.add(x.req)
            else:
                e = self.entries.get(x)
                if e is None:
                    continue
                sched = self.scheduler
                if getattr(sched, "batch", None) and e.req in sched.batch:
                    e.req.aborted = True  # in flight through the layer groups: dropped when the prompt lands
                    continue
                self._finish(e, "abort", outputs)

    def has_unfinished(self) -> bool:
        return bool(self.entries) or not self._inbox.empty()

    @property
    def num_running(self) -> int:
        return self.scheduler.num_active

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    # ----------------------------------------------------------------------------------------- stepping
    def _finish(self, e: _Entry, reason: str, outputs: list[RequestOutput], emit_tokens=None):
        req = e.req
        self.scheduler.remove(req)
        req.status, req.finish_reason = Status.FINISHED, reason
        e.metrics.finish = time.perf_counter()
        e.metrics.preemptions = req.num_preemptions
        del self.entries[req.id]
        self.finished_metrics.append(e.metrics)
        self.prom.on_finish(e.metrics, reason)
        out = emit_tokens or RequestOutput(req.id, [], [], [], True, reason, len(req.prompt), req.cached_tokens)
        out.finished, out.finish_reason = True, reason
        self._emit(e, out, outputs)

    def _emit(self, e: _Entry, out: RequestOutput, outputs: list[RequestOutput]):
        if self._group is not None:  # inside a multi-step call: merged per request when it ends
            self._group.setdefault(out.request_id, (e, []))[1].append(out)
            return
        outputs.append(out)
        if e.callback is not None:
            e.callback(out)

    def decode_rows(self, n: int, with_prefill: bool) -> int:
        """Decode-row bucket for ``n`` running requests (the full batch next to a prefill: one compiled
        program per prefill shape instead of one per (prefill shape, decode count))."""
        return pow2(self.cfg.sched.max_num_seqs if with_prefill else n, self.cfg.min_decode_bucket)

    def prefill_shape(self, rows: int, tokens: int) -> tuple[int, int]:
        """``(Bp, Tp)`` bucket of a prefill part with ``rows`` chunks, the longest of ``tokens`` tokens."""
        return pow2(rows, 1), shape_bucket(tokens, self.cfg.min_prefill_tokens, self.cfg.prefill_token_step)

    def _blank_decode(self, n: int) -> DecodeBatch:
        """A decode part of ``n`` padding rows (length 0: no attention work, no expert routed)."""
        return DecodeBatch(np.zeros(n, np.int32), np.zeros(n, np.int32), np.zeros((n, self.max_pages), np.int32),
                           np.zeros(n, bool), np.zeros((n, 2), np.uint32), np.zeros(n, np.float32),
                           np.ones(n, np.float32))

    def _blank_prefill(self, rows: int, tokens: int) -> PrefillBatch:
        """A prefill part of ``rows`` empty rows of ``tokens`` tokens."""
        return PrefillBatch(np.zeros((rows, tokens), np.int32), np.zeros(rows, np.int32), np.zeros(rows, np.int32),
                            np.zeros((rows, self.max_pages), np.int32), np.zeros((rows, 2), np.uint32),
                            np.zeros(rows, np.float32), np.ones(rows, np.float32))

    @staticmethod
    def _fill_row(part, i: int, req: Request) -> None:
        """Row ``i``'s block table and sampling parameters."""
        part.tables[i, :len(req.blocks)] = req.blocks
        part.keys[i] = (req.params.seed, len(req.output))
        part.temperature[i], part.top_p[i] = req.params.temperature, req.params.top_p

    def _pack(self, plan: Plan):
        dec = pf = None
        if plan.decode or (plan.prefill and self.runtime is None):
            # next to a prefill the decode part is always there, padded to the full batch, so a prefill shape
            # compiles once
            dec = self._blank_decode(self.decode_rows(len(plan.decode), bool(plan.prefill)))
            for i, r in enumerate(plan.decode):
                dec.tokens[i], dec.pos[i], dec.valid[i] = r.last_token, r.num_tokens - 1, True
                self._fill_row(dec, i, r)
        if plan.prefill:
            pf = self._blank_prefill(*self.prefill_shape(len(plan.prefill), max(c.length for c in plan.prefill)))
            Tp = pf.tokens.shape[1]
            for i, c in enumerate(plan.prefill):
                toks = c.request.tokens[c.start:c.start + c.length]
                pf.tokens[i, Tp - len(toks):] = toks  # left-padded (see PrefillBatch)
                pf.start[i], pf.length[i] = c.start, c.length
                self._fill_row(pf, i, c.request)
        return dec, pf

    def step(self) -> list[RequestOutput]:
        """Run one iteration; returns the outputs it produced (possibly none)."""
        outputs: list[RequestOutput] = []
        self._drain_inbox(outputs)
        t0 = time.perf_counter()
        plan = self.scheduler.schedule(t0)
        if plan.empty:
            return outputs
        steps = self._decode_steps(plan)  # (grows the rows' blocks first: the tables are packed next)
        dec, pf = self._pack(plan)
        if steps > 1:
            return self._step_multi(plan, dec, steps, t0, outputs)
        use_hidden = plan.use_hidden
        hidden = self._pf_hidden if use_hidden else None
        self.compiled_shapes.add(self._shape_key(dec, pf))
        dec_ids, pf_ids = self._pregate(plan, dec, pf) if self.cfg.pregate is not None else (None, None)
        if self.runtime is not None:
            o = self.runtime.step(self.pool, dec, pf, hidden, plan.group, use_hidden=use_hidden,
                                  return_logits=self.cfg.record_logits, dec_ids=dec_ids, pf_ids=pf_ids)
        else:
            args, kw = self._step_args(dec, pf, hidden, plan.group, use_hidden, dec_ids, pf_ids)
            o = engine_step(*args, **kw)
        self.pool = o.pool
        host = jax.device_get((o.dec_next, o.dec_logprob, o.dec_top, o.pf_next, o.pf_logprob, o.pf_top,
                               o.experts_touched, o.dec_logits, o.pf_logits))
        d_next, d_lp, d_top, p_next, p_lp, p_top, touched, d_logits, p_logits = host
        t1 = time.perf_counter()

        L = self.mcfg.n_layers
        for i, req in enumerate(plan.decode):
            req.num_computed = req.num_tokens
            self._append(req, int(d_next[i]), float(d_lp[i]), d_top[0][i], d_top[1][i],
                         None if d_logits is None else d_logits[i], t1, outputs)
        for i, c in enumerate(plan.prefill):
            req = c.request
            if plan.group[1] == L:
                req.num_computed = c.start + c.length
            if c.last:
                e = self.entries.get(req.id)
                if req.aborted and e is not None:
                    self._finish(e, "abort", outputs)
                    continue
                self.scheduler.prefilling.remove(req)
                self.scheduler.running.append(req)
                req.status = Status.RUNNING
                self._append(req, int(p_next[i]), float(p_lp[i]), p_top[0][i], p_top[1][i],
                             None if p_logits is None else p_logits[i], t1, outputs)
        for req in list(self.scheduler.running) + list(self.scheduler.prefilling):
            self.scheduler.register_full_blocks(req)
        self.scheduler.on_step_done(plan)
        self._pf_hidden = o.pf_hidden if (plan.prefill and not plan.prefill[0].last) else None

        it = IterationStats(t0, t1, len(plan.decode), sum(c.length for c in plan.prefill), tuple(plan.group),
                            [int(x) for x in touched], int(touched.sum()) * self.expert_bytes, len(plan.preempted),
                            sum(r.num_tokens for r in plan.decode), sum(c.start + c.length for c in plan.prefill),
                            sum(c.length * c.start + c.length * (c.length + 1) // 2 for c in plan.prefill))
        self._record(it)
        return outputs

    def _record(self, it: IterationStats) -> None:
        """Keep an iteration's statistics and export them to Prometheus."""
        self.iterations.append(it)
        self.prom.on_iteration(it, len(self.scheduler.running), len(self.scheduler.waiting),
                               self.alloc.num_used / max(self.alloc.num_blocks - 1, 1))

    def _decode_steps(self, plan: Plan) -> int:
        """Decode iterations to fuse into this call: ``EngineConfig.decode_steps`` when the plan only decodes,
        nothing waits to be admitted, every row's context has room and the rows' blocks can grow to cover the
        whole group; else 1."""
        k = self.cfg.decode_steps
        sched = self.scheduler
        if (k == 1 or plan.prefill or not plan.decode or plan.preempted or self.runtime is not None
                or self.cfg.pregate is not None or sched.waiting or sched.prefilling or not self._inbox.empty()):
            return 1
        if any(r.num_tokens + k > self.max_model_len for r in plan.decode):
            return 1
        # positions num_tokens - 1 .. num_tokens + k - 2 get K/V written (blocks left over are used later)
        return k if all(sched._grow(r, r.num_tokens + k - 1) for r in plan.decode) else 1

    def _step_multi(self, plan: Plan, dec: DecodeBatch, k: int, t0: float,
                    outputs: list[RequestOutput]) -> list[RequestOutput]:
        """Run ``k`` decode iterations in one call (:func:`~moejax.serve.step.engine_decode_steps`) and hand
        out their tokens in order; a request that finishes inside the group drops its later tokens."""
        self.compiled_shapes.add(self._shape_key(dec, None, k))
        o = engine_decode_steps(self.gdef, self.state, self.pool, dec, self.layer_states, **self._multi_kw(k))
        self.pool = o.pool
        toks, lps, (tids, tlps), touched, logits = jax.device_get((o.tokens, o.logprob, o.top, o.experts_touched,
                                                                  o.logits))
        t1 = time.perf_counter()
        dt = (t1 - t0) / k
        self._group = {}
        try:
            for j in range(k):
                live = [(i, r) for i, r in enumerate(plan.decode) if r.status != Status.FINISHED]
                for i, req in live:
                    req.num_computed = req.num_tokens
                    self._append(req, int(toks[j, i]), float(lps[j, i]), tids[j, i], tlps[j, i],
                                 None if logits is None else logits[j, i], t1, outputs)
                it = IterationStats(t0 + j * dt, t0 + (j + 1) * dt, len(live), 0, (0, self.mcfg.n_layers),
                                    [int(x) for x in touched[j]], int(touched[j].sum()) * self.expert_bytes,
                                    0, sum(r.num_tokens for _, r in live))
                self._record(it)
        finally:
            group, self._group = self._group, None
        for e, outs in group.values():  # one output per request and call: the tokens it produced, in order
            self._emit(e, merge_outputs(outs), outputs)
        for req in self.scheduler.running:
            self.scheduler.register_full_blocks(req)
        self.scheduler.on_step_done(plan)
        return outputs

    def _static_kw(self) -> dict:
        """Static arguments shared by :func:`engine_step` and :func:`engine_decode_steps`."""
        return {"block_size": self.cfg.block_size, "return_logits": self.cfg.record_logits,
                "attn_impl": self.cfg.attn_impl, "kv_block": self.cfg.kv_block}

    def _multi_kw(self, k: int) -> dict:
        return {**self._static_kw(), "steps": k}

    # ----------------------------------------------------------------------------------------- compiling
    @staticmethod
    def _shape_key(dec, pf, steps: int = 1) -> tuple:
        """What selects a compiled step: decode rows and prefill (rows, tokens); multi-step decode calls
        (``EngineConfig.decode_steps``) are ``(rows, None, steps)``."""
        key = (None if dec is None else int(dec.tokens.shape[0]), None if pf is None else tuple(pf.tokens.shape))
        return key if steps == 1 else (*key, steps)

    def _zero_hidden(self, shape) -> jax.Array:
        if self._zeros is None or self._zeros.shape[:2] != tuple(shape):
            self._zeros = jnp.zeros((*shape, self.mcfg.d_model), dtype_of(self.mcfg.dtype))
        return self._zeros

    def _step_args(self, dec, pf, hidden, group, use_hidden, dec_ids, pf_ids):
        """Positional and keyword arguments of :func:`engine_step` (shared by :meth:`step` and :meth:`warmup`)."""
        if pf is not None and hidden is None:
            hidden = self._zero_hidden(pf.tokens.shape)  # the layer group and use_hidden are run-time values
        g = np.asarray((group[0], group[1], int(bool(use_hidden))), np.int32)
        kw = {**self._static_kw(), "prefill_kv_block": self.prefill_kv_block}
        return (self.gdef, self.state, self.pool, dec, pf, hidden, g, dec_ids, pf_ids, self.layer_states), kw

    def warmup_shapes(self, max_prompt_tokens: int | None = None) -> list[tuple]:
        """Every step shape the scheduler can ask for (see :meth:`_shape_key`), smallest first.

        Decode-only steps: each decode-row bucket up to ``max_num_seqs``. Steps with a prefill: the full decode
        batch beside ``(rows, tokens)`` buckets for up to ``max_prefill_seqs`` rows and, per row, up to the
        chunk budget (chunked) or the longest prompt the context allows (layered; ``max_prompt_tokens`` caps
        it when the workload's prompts are known to be shorter).
        """
        sc, L = self.cfg.sched, self.max_model_len
        longest = min(L, max_prompt_tokens) if max_prompt_tokens else L
        if self.cfg.scheduler == "chunked":
            longest = min(longest, sc.max_num_batched_tokens)
        edges = _bucket_edges(longest, self.cfg.min_prefill_tokens, self.cfg.prefill_token_step)
        tokens = sorted({self.prefill_shape(1, t)[1] for t in edges})
        rows = sorted({self.prefill_shape(n, 1)[0] for n in range(1, min(sc.max_prefill_seqs, sc.max_num_seqs) + 1)})
        multi = sc.max_num_batched_tokens if self.cfg.scheduler == "chunked" else sc.max_layered_tokens
        buckets = sorted({self.decode_rows(n, False) for n in range(1, sc.max_num_seqs + 1)})
        keys = [(b, None) for b in buckets]
        if self.cfg.decode_steps > 1 and self.runtime is None and self.cfg.pregate is None:
            keys += [(b, None, self.cfg.decode_steps) for b in buckets]
        full = self.decode_rows(0, True) if self.runtime is None else None
        for bp in rows:
            # several rows: their tokens fit the budget, and layered batches also keep within the padding bound
            # (bp rows x the longest <= (1 + max_layered_padding) x their tokens)
            lim = multi if self.cfg.scheduler == "chunked" or bp == 1 else int(
                (1 + sc.max_layered_padding) * multi / bp)
            for tp in tokens:
                if bp == 1 or tp <= shape_bucket(lim, self.cfg.min_prefill_tokens, self.cfg.prefill_token_step):
                    keys.append((full, (bp, tp)))
        return keys

    def warmup(self, shapes: Sequence[tuple] | None = None, *, max_prompt_tokens: int | None = None,
               workers: int = 2, progress: bool = False) -> int:
        """Compile the engine step for ``shapes`` (default :meth:`warmup_shapes`) ahead of time, so serving
        never stops to compile. Lowering runs here, XLA compiles on ``workers`` threads. Returns the number of
        shapes compiled (those already compiled are skipped). Not available with ``offload`` (its layer-by-layer
        step compiles per piece).

        Each compiled step stays loaded (jax's compilation cache) with its JIT code: on XLA:CPU a step of an
        8-layer model maps several hundred memory regions, so grids of many dozens of shapes across several
        engines in one process can reach the kernel's ``vm.max_map_count`` (65530 by default; LLVM then
        reports "Cannot allocate memory"). Keep the grid small (``prefill_token_step``, ``max_prompt_tokens``)
        or call ``jax.clear_caches()`` between engines."""
        if self.runtime is not None:
            raise ValueError("Engine.warmup is not available with EngineConfig.offload (the offload step runs "
                             "layer by layer and compiles its pieces on first use)")
        from concurrent.futures import ThreadPoolExecutor

        todo = [k for k in (shapes if shapes is not None else self.warmup_shapes(max_prompt_tokens))
                if k not in self.compiled_shapes]
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=len(todo), desc="compile engine steps", unit="shape")
        with ThreadPoolExecutor(max(1, workers)) as ex:
            futs = []
            for key in todo:
                bd, pfs = key[:2]
                dec = None if bd is None else self._blank_decode(bd)
                if len(key) > 2:  # a multi-step decode call
                    lower = engine_decode_steps.lower(self.gdef, self.state, self.pool, dec, self.layer_states,
                                                      **self._multi_kw(key[2]))
                    futs.append((ex.submit(lower.compile), key))
                    continue
                pf = None if pfs is None else self._blank_prefill(*pfs)
                dec_ids = pf_ids = None
                if self.cfg.pregate is not None:
                    dec_ids = None if dec is None else np.zeros(bd, np.int32)
                    pf_ids = None if pf is None else np.zeros(pfs, np.int32)
                args, kw = self._step_args(dec, pf, None, (0, self.mcfg.n_layers), False, dec_ids, pf_ids)
                futs.append((ex.submit(engine_step.lower(*args, **kw).compile), key))
            for f, key in futs:
                f.result()
                self.compiled_shapes.add(key)
                if bar is not None:
                    bar.update(1)
        if bar is not None:
            bar.close()
        return len(todo)

    def _pregate(self, plan: Plan, dec, pf):
        """Pre-gated expert ids of the decode rows ``[Bd]`` and prefill rows ``[Bp, Tp]`` (numpy)."""
        from moejax.models.readme import pregate_ids

        W = self.cfg.pregate.window
        dec_ids = pf_ids = None
        if dec is not None:
            win = np.full((len(dec.tokens), W), -1, np.int32)
            for i, r in enumerate(plan.decode):
                t = r.tokens[-W:]
                win[i, W - len(t):] = t
            dec_ids = np.asarray(pregate_ids(self.cfg.pregate, win))
        if pf is not None:
            Bp, Tp = pf.tokens.shape
            win = np.full((Bp, Tp, W), -1, np.int32)
            for i, c in enumerate(plan.prefill):
                toks = np.asarray(c.request.tokens[:c.start + c.length], np.int32)
                pad = Tp - c.length
                for j in range(c.length):
                    p = c.start + j
                    t = toks[max(0, p - W + 1):p + 1]
                    win[i, pad + j, W - len(t):] = t
            pf_ids = np.asarray(pregate_ids(self.cfg.pregate, win.reshape(Bp * Tp, W))).reshape(Bp, Tp)
        return dec_ids, pf_ids

    def _append(self, req: Request, tok: int, lp: float, top_ids, top_lps, logits, now: float, outputs):
        e = self.entries[req.id]
        req.output.append(tok)
        m = e.metrics
        if m.first_token is None:
            m.first_token = now
            m.cached_tokens = req.cached_tokens
        m.token_times.append(now)
        e.logprobs.append(lp)
        k = req.params.logprobs
        top = [(int(a), float(b)) for a, b in zip(top_ids[:k], top_lps[:k])]
        e.tops.append(top)
        if logits is not None:
            e.logits.append(np.asarray(logits))
        out = RequestOutput(req.id, [tok], [lp], [top], False, None, len(req.prompt), req.cached_tokens)
        if tok in req.params.stop_token_ids:
            self._finish(e, "stop", outputs, out)
        elif len(req.output) >= req.params.max_tokens or req.num_tokens >= self.max_model_len:
            self._finish(e, "length", outputs, out)
        else:
            self._emit(e, out, outputs)

    # ----------------------------------------------------------------------------------------- offline
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams] | None = None,
                 *, progress: bool = False) -> list[Completion]:
        """Run prompts to completion (all queued at once; continuous batching does the rest)."""
        if params is None or isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} SamplingParams for {len(prompts)} prompts")
        done: dict[str, Completion] = {}
        keep: dict[str, _Entry] = {}
        ids = []
        for p, sp in zip(prompts, params):
            rid = self.add_request(p, sp)
            ids.append(rid)
        self._drain_inbox([])
        for rid in ids:
            keep[rid] = self.entries[rid]
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=len(ids), desc="generate", unit="req")
        while len(done) < len(ids):
            for out in self.step():
                if out.finished and out.request_id in keep:
                    e = keep[out.request_id]
                    done[out.request_id] = Completion(
                        out.request_id, e.req.prompt, list(e.req.output), e.logprobs, e.tops, out.finish_reason,
                        e.metrics, np.stack(e.logits) if e.logits else None)
                    if bar is not None:
                        bar.update(1)
        if bar is not None:
            bar.close()
        return [done[r] for r in ids]

    def metrics(self, **slo) -> dict:
        """Summary of finished requests and all iterations so far (see :func:`moejax.serve.metrics.summarize`)."""
        return summarize(self.finished_metrics, self.iterations, **slo)

    def reset_metrics(self) -> None:
        self.finished_metrics, self.iterations = [], []
