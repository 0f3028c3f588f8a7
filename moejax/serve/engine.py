"""Continuous-batching inference engine over a paged KV cache.

Usage::

    engine = Engine(model, EngineConfig(scheduler="layered"))
    rid = engine.add_request([1, 2, 3], SamplingParams(max_tokens=32, temperature=0))
    while engine.has_unfinished():
        for out in engine.step():          # tokens stream out as they are produced
            print(out.request_id, out.new_tokens, out.finished)

    results = engine.generate(prompts, SamplingParams(max_tokens=64, temperature=0))   # offline

The engine is the loop between a scheduler and a runner (vLLM v1's split): each :meth:`Engine.step` asks the
:class:`~moejax.serve.scheduler.Scheduler` for a :class:`~moejax.serve.scheduler.Plan`, has the
:class:`~moejax.serve.runner.ModelRunner` execute it (packing into fixed shape buckets, the jitted
:func:`~moejax.serve.step.engine_step`, sampling on device), hands the sampled tokens back to the scheduler
(:meth:`~moejax.serve.scheduler.Scheduler.advance` when the step is launched: the state changes that need no
token value; :meth:`~moejax.serve.scheduler.Scheduler.resolve` when its tokens are back: stops, finishing) and
returns per-request deltas, recording metrics. With ``EngineConfig.async_scheduling`` the tokens of iteration i
are resolved after iteration i + 1 was scheduled and launched (its decode rows read i's tokens on the device). The buckets: decode rows are rounded up to a power of two (to the full
batch next to a prefill), prefill rows to a power of two and prefill tokens to a power of two and then to
multiples of ``prefill_token_step``; block tables always span ``max_model_len`` (attention loops over key
blocks up to the longest row at run time) and the layer group is a run-time value, so the compiled programs do
not depend on context length or layer group: :meth:`Engine.warmup` compiles all of them ahead of time (no
recompilation in steady state). :meth:`add_request` and :meth:`abort` may be called from another thread: they
are queued and applied at the start of the next step.

Serving that runs the model differently passes its own runner: ``Engine(model, runner=OffloadRunner(...))``
(:mod:`moejax.offload.runtime`) or :class:`~moejax.offload.pregate.PreGatedRunner`.
"""

from __future__ import annotations

import itertools
import math
import queue
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from moejax.serve.kv_cache import BlockAllocator
from moejax.serve.metrics import (
    IterationStats,
    PrometheusMetrics,
    RequestMetrics,
    summarize,
)
from moejax.serve.runner import Launched, ModelRunner, StepResult
from moejax.serve.scheduler import (
    Emitted,
    Plan,
    Request,
    SchedulerConfig,
    Slot,
    make_scheduler,
)
from moejax.serve.step import TOP_LOGPROBS


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
      decode_steps: multi-step decoding (as vLLM's multi-step scheduling): when an iteration would only
        decode (no prompt to prefill, none waiting), run this many decode iterations in one compiled call,
        feeding the sampled tokens back on the device, so the host's per-iteration work (scheduling, packing,
        dispatch, the transfer back) is paid once per ``decode_steps`` tokens. Tokens are the same as with 1;
        they reach the caller (and streams) in groups of up to ``decode_steps`` (one
        :class:`RequestOutput` per request and call), and a request that finishes
        inside a group costs the rest of the group's compute for its row. New requests wait at most one
        group. 1 (default) disables it.
      speculative: ``None`` (off) or ``"mtp"``: speculative decoding with the model's MTP heads as the drafter
        (:mod:`moejax.serve.speculative`): each iteration verifies ``num_speculative_tokens`` drafts per running
        request in one forward and emits the accepted ones plus one; greedy output is the plain output, sampled
        output has the plain distribution. Needs ``scheduler="chunked"`` and ``decode_steps=1``.
      num_speculative_tokens: drafts per request and iteration (1..``ModelConfig.mtp_depth``: MTP head ``k``
        drafts the ``k``-th).
      speculative_max_batch: run plain iterations while more than this many requests decode (verifying drafts
        costs compute a large batch no longer has to spare; vLLM's ``speculative_disable_by_batch_size``);
        ``None``: always speculate.
      nano_batches: NanoFlow's nano-batching: every layer of a step splits its rows into this many
        nano-batches for the attention half and half as many (rounded up) for the FFN half
        (:meth:`~moejax.models.transformer.Block.paged_layer_nano`), so that operations of different
        nano-batches can overlap where the backend runs independent operations at once (GPU streams; the
        collectives of expert parallelism). Same tokens as 1 (the default, off); each FFN nano-batch reads the
        experts its tokens route to, so expert weight traffic grows. Needs ``scheduler="chunked"`` and no
        speculative decoding.
      async_scheduling: schedule and pack iteration ``i + 1`` while the device runs iteration ``i`` (NanoFlow's
        asynchronous scheduling, vLLM's ``async_scheduling``): a step's decode rows read the previous step's
        tokens on the device, and its results come back during the next :meth:`Engine.step` call. A stop token
        is therefore seen one iteration late (the request's token from that next iteration is discarded);
        outputs are the same as without it, each arriving one :meth:`Engine.step` call later. Works with
        single- and multi-step decoding; not with speculative decoding, nor with runners that need the tokens
        on the host (offloaded experts, the pre-gating router).
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
    decode_steps: int = 1
    speculative: str | None = None
    num_speculative_tokens: int = 1
    speculative_max_batch: int | None = None
    nano_batches: int = 1
    async_scheduling: bool = False


def token_ids(prompt: Sequence[int], vocab_size: int) -> list[int]:
    """``prompt`` as a non-empty list of ints in ``[0, vocab_size)``; ``ValueError`` saying what is wrong."""
    prompt = [int(t) for t in prompt]
    if not prompt:
        raise ValueError("prompt must contain at least one token")
    bad = [t for t in prompt if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab_size})")
    return prompt


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


@dataclass
class _InFlight:
    """A step handed to the device whose tokens are not back yet."""

    plan: Plan
    slots: list[Slot]
    launched: Launched
    t0: float


class _Entry:
    __slots__ = ("callback", "logits", "logprobs", "metrics", "req", "tops")

    def __init__(self, req, metrics, callback):
        self.req, self.metrics, self.callback = req, metrics, callback
        self.logprobs, self.tops, self.logits = [], [], []


class Engine:
    """Continuous-batching engine for a :class:`~moejax.models.transformer.Transformer`.

    ``runner``: the :class:`~moejax.serve.runner.ModelRunner` that executes the plans (default: one over
    ``model`` in memory, built from ``cfg``); a runner built elsewhere carries its own ``EngineConfig``
    (``cfg`` may then be omitted, or must be that config).
    """

    def __init__(self, model, cfg: EngineConfig | None = None, *, runner: ModelRunner | None = None,
                 model_name: str = "moejax"):
        if runner is None:
            runner = ModelRunner(model, cfg or EngineConfig())
        if runner.cfg.async_scheduling and not runner.supports_async:
            raise ValueError(f"EngineConfig.async_scheduling=True: {type(runner).__name__} does not run "
                             f"asynchronously (its step needs the tokens on the host); use the default False")
        if runner.cfg.nano_batches > 1 and not runner.supports_nano_batches:
            raise ValueError(f"EngineConfig.nano_batches={runner.cfg.nano_batches}: {type(runner).__name__} does "
                             f"not run nano-batched steps; use the default 1")
        if runner.cfg.speculative is not None and not runner.supports_speculative:
            raise ValueError(f"EngineConfig.speculative={runner.cfg.speculative!r}: {type(runner).__name__} does "
                             f"not run speculative steps (the in-memory ModelRunner does)")
        elif runner.model is not model:
            raise ValueError("Engine(model, runner=...): the runner was built for another model")
        elif cfg is not None and cfg != runner.cfg:
            raise ValueError("Engine(cfg=..., runner=...): cfg differs from the runner's EngineConfig (pass one)")
        cfg = runner.cfg
        mcfg = model.cfg
        self.model, self.cfg, self.mcfg, self.runner = model, cfg, mcfg, runner
        self.model_name = model_name
        self.max_model_len = runner.max_model_len
        self.alloc = BlockAllocator(runner.num_blocks, cfg.block_size, enable_prefix_cache=cfg.enable_prefix_cache)
        self.scheduler = make_scheduler(cfg.scheduler, cfg.sched, self.alloc, mcfg.n_layers, self.max_model_len)
        self.entries: dict[str, _Entry] = {}
        self.finished_metrics: list[RequestMetrics] = []
        self.iterations: list[IterationStats] = []
        self.prom = PrometheusMetrics(model_name)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._ids = itertools.count()
        self._rng = np.random.default_rng(0)
        self._warmup = None  # (future, shapes) of a background warm-up
        self._inflight: _InFlight | None = None  # asynchronous scheduling: the step the device is running

    # ----------------------------------------------------------------------------------------- requests
    def validate_prompt(self, prompt: Sequence[int]) -> list[int]:
        prompt = token_ids(prompt, self.mcfg.vocab_size)
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
                if e is not None and self.scheduler.abort(e.req):  # else: in flight, finished when it lands
                    self._finalize(e, outputs)

    def has_unfinished(self) -> bool:
        return bool(self.entries) or not self._inbox.empty() or self._inflight is not None

    @property
    def num_running(self) -> int:
        return self.scheduler.num_active

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    # ----------------------------------------------------------------------------------------- stepping
    def _finalize(self, e: _Entry, outputs: list[RequestOutput], emit_tokens: RequestOutput | None = None,
                  group: dict | None = None):
        """Report a request the scheduler finished: metrics, and its last output."""
        req = e.req
        reason = req.finish_reason
        e.metrics.finish = time.perf_counter()
        e.metrics.preemptions = req.num_preemptions
        del self.entries[req.id]
        self.finished_metrics.append(e.metrics)
        self.prom.on_finish(e.metrics, reason)
        out = emit_tokens or RequestOutput(req.id, [], [], [], True, reason, len(req.prompt), req.cached_tokens)
        out.finished, out.finish_reason = True, reason
        self._emit(e, out, outputs, group)

    def _emit(self, e: _Entry, out: RequestOutput, outputs: list[RequestOutput], group: dict | None = None):
        if group is not None:  # inside a multi-step call: merged per request when it ends
            group.setdefault(out.request_id, (e, []))[1].append(out)
            return
        outputs.append(out)
        if e.callback is not None:
            e.callback(out)

    def step(self) -> list[RequestOutput]:
        """Run one iteration; returns the outputs it produced (possibly none). With
        ``EngineConfig.async_scheduling`` the outputs are those of the previous iteration, whose results came
        back while this one was scheduled and handed to the device."""
        outputs: list[RequestOutput] = []
        self._drain_inbox(outputs)
        t0 = time.perf_counter()
        plan = self.scheduler.schedule(t0)
        if plan.empty:
            self._land_inflight(outputs)
            return outputs
        if self._speculate(plan):  # (reserves the rows' blocks first: the tables are packed next)
            return self._step_speculative(plan, t0, outputs)
        steps = self._decode_steps(plan)  # (likewise)
        launched = self.runner.dispatch(plan, steps)
        slots = self.scheduler.advance(plan, [steps] * len(plan.decode))
        for s in slots:  # where the next step finds the tokens this one samples
            if not s.abort:
                s.request.source = self.runner.source(launched, s.part, s.row)
        flight = _InFlight(plan, slots, launched, t0)
        if self.cfg.async_scheduling:
            self._land_inflight(outputs)  # the previous step's results, while this one runs
            self._inflight = flight
        else:
            self._land(flight, outputs)
        return outputs

    def _land_inflight(self, outputs: list[RequestOutput]) -> None:
        if self._inflight is not None:
            flight, self._inflight = self._inflight, None
            self._land(flight, outputs)

    def _land(self, f: _InFlight, outputs: list[RequestOutput]) -> None:
        """Bring a dispatched step's results back, resolve its tokens and report them."""
        plan, steps = f.plan, f.launched.steps
        res = self.runner.fetch(f.launched)
        t1 = time.perf_counter()
        n = len(plan.decode)
        dec = res.dec_next.T if steps > 1 else res.dec_next[:, None]  # [rows, iterations]
        emitted = self.scheduler.resolve(f.slots, dec, () if res.pf_next is None else res.pf_next)
        if steps > 1:
            self._record_multi(plan, steps, emitted, res, f.t0, t1, outputs)
            return
        for em in emitted:
            self._record_token(em, res, t1, outputs)
        it = IterationStats(f.t0, t1, n, sum(c.length for c in plan.prefill), tuple(plan.group),
                            [int(x) for x in res.experts_touched],
                            int(res.experts_touched.sum()) * self.runner.expert_bytes, len(plan.preempted),
                            sum(em.num_tokens for em in emitted if em.part == "decode"),
                            sum(c.start + c.length for c in plan.prefill),
                            sum(c.length * c.start + c.length * (c.length + 1) // 2 for c in plan.prefill),
                            dropped=0 if res.dropped is None else int(res.dropped.sum()))
        self._record(it)

    def _record_token(self, em: Emitted, res: StepResult, now: float, outputs, group: dict | None = None):
        """Metrics, logprobs and the output of one token the scheduler appended (or of an in-flight abort)."""
        req = em.request
        e = self.entries[req.id]
        if em.token < 0:  # aborted in flight
            self._finalize(e, outputs, group=group)
            return
        m = e.metrics
        if m.first_token is None:
            m.first_token = now
            m.cached_tokens = req.cached_tokens
        m.token_times.append(now)
        dec = em.part == "decode"
        lp, (tids, tlps), logits = ((res.dec_logprob, res.dec_top, res.dec_logits) if dec
                                    else (res.pf_logprob, res.pf_top, res.pf_logits))
        at = (em.step, em.row) if (dec and res.dec_next.ndim == 2) else (em.row,)
        lp = float(lp[at])
        e.logprobs.append(lp)
        k = req.params.logprobs
        top = [(int(a), float(b)) for a, b in zip(tids[at][:k], tlps[at][:k])]
        e.tops.append(top)
        if logits is not None:
            e.logits.append(np.asarray(logits[at]))
        out = RequestOutput(req.id, [em.token], [lp], [top], False, None, len(req.prompt), req.cached_tokens)
        if em.finish_reason is not None:
            self._finalize(e, outputs, out, group)
        else:
            self._emit(e, out, outputs, group)

    def _record(self, it: IterationStats) -> None:
        """Keep an iteration's statistics and export them to Prometheus."""
        self.iterations.append(it)
        self.prom.on_iteration(it, len(self.scheduler.running), len(self.scheduler.waiting),
                               self.alloc.num_used / max(self.alloc.num_blocks - 1, 1))

    def _decode_steps(self, plan: Plan) -> int:
        """Decode iterations to fuse into this call: ``EngineConfig.decode_steps`` when the plan only decodes,
        nothing waits to be admitted, the runner supports multi-step calls, every row's context has room and
        the rows' blocks can grow to cover the whole group; else 1."""
        k = self.cfg.decode_steps
        sched = self.scheduler
        if (k == 1 or plan.prefill or not plan.decode or plan.preempted or not self.runner.supports_multi_step
                or sched.waiting or sched.prefilling or not self._inbox.empty()):
            return 1
        if any(r.num_tokens + k > self.max_model_len for r in plan.decode):
            return 1
        # positions num_tokens - 1 .. num_tokens + k - 2 get K/V written (blocks left over are used later)
        return k if all(sched.reserve(r, r.num_tokens + k - 1) for r in plan.decode) else 1

    def _record_multi(self, plan: Plan, k: int, emitted: list[Emitted], res: StepResult, t0: float, t1: float,
                      outputs: list[RequestOutput]) -> None:
        """Hand out the tokens of ``k`` decode iterations run in one call (multi-step decoding) in order, one
        output per request (a request that finishes inside the group drops its later tokens)."""
        group: dict = {}
        for em in emitted:
            self._record_token(em, res, t1, outputs, group)
        dt = (t1 - t0) / k
        for j in range(k):
            live = [em for em in emitted if em.step == j]
            touched = res.experts_touched[j]
            self._record(IterationStats(t0 + j * dt, t0 + (j + 1) * dt, len(live), 0, (0, self.mcfg.n_layers),
                                        [int(x) for x in touched], int(touched.sum()) * self.runner.expert_bytes,
                                        0, sum(em.num_tokens for em in live),
                                        dropped=0 if res.dropped is None else int(res.dropped[j].sum())))
        for e, outs in group.values():  # one output per request and call: the tokens it produced, in order
            self._emit(e, merge_outputs(outs), outputs)

    def _speculate(self, plan: Plan) -> bool:
        """Whether this iteration is a speculative step: speculation is configured, at most
        ``speculative_max_batch`` requests decode, and every decode row's context and blocks have room for its
        ``1 + K`` positions (reserved here)."""
        cfg = self.cfg
        if cfg.speculative is None:
            return False
        if cfg.speculative_max_batch is not None and len(plan.decode) > cfg.speculative_max_batch:
            return False
        k = cfg.num_speculative_tokens
        if any(r.num_tokens + k > self.max_model_len for r in plan.decode):
            return False
        # positions num_tokens - 1 .. num_tokens - 1 + k get K/V written
        return all(self.scheduler.reserve(r, r.num_tokens + k) for r in plan.decode)

    def _step_speculative(self, plan: Plan, t0: float, outputs: list[RequestOutput]) -> list[RequestOutput]:
        """One speculative step (:meth:`ModelRunner.execute_speculative`): each decode row emits its accepted
        drafts and one more token, in order, as one output per request; the new drafts are kept on the
        requests for the next step."""
        res = self.runner.execute_speculative(plan)
        t1 = time.perf_counter()
        n, k = len(plan.decode), self.cfg.num_speculative_tokens
        acc = res.accepted[:n]
        emitted = self.scheduler.update_from_output(
            plan, [list(res.dec_next[:int(acc[i]) + 1, i]) for i in range(n)], res.pf_next[:len(plan.prefill)])
        for i, r in enumerate(plan.decode):
            r.draft, r.draft_at = tuple(int(x) for x in res.drafts[i]), r.num_tokens
        for i, c in enumerate(plan.prefill):
            if c.last:
                c.request.draft, c.request.draft_at = tuple(int(x) for x in res.pf_drafts[i]), c.request.num_tokens
        group: dict = {}
        for em in emitted:
            self._record_token(em, res, t1, outputs, group)
        for e, outs in group.values():  # one output per request and step: the tokens it produced, in order
            self._emit(e, merge_outputs(outs), outputs)
        self._record(IterationStats(
            t0, t1, n * (1 + k), sum(c.length for c in plan.prefill), tuple(plan.group),
            [int(x) for x in res.experts_touched], int(res.experts_touched.sum()) * self.runner.expert_bytes,
            len(plan.preempted), sum(em.num_tokens for em in emitted if em.part == "decode"),
            sum(c.start + c.length for c in plan.prefill),
            sum(c.length * c.start + c.length * (c.length + 1) // 2 for c in plan.prefill),
            dropped=0 if res.dropped is None else int(res.dropped.sum()),
            spec_rows=n, spec_draft_tokens=n * k, spec_accepted_tokens=int(acc.sum())))
        return outputs

    # ----------------------------------------------------------------------------------------- compiling
    def warmup_shapes(self, max_prompt_tokens: int | None = None) -> list[tuple]:
        """Every step shape the scheduler can ask for (:meth:`ModelRunner.warmup_shapes`)."""
        return self.runner.warmup_shapes(self.scheduler, max_prompt_tokens)

    def warmup(self, shapes: Sequence[tuple] | None = None, *, max_prompt_tokens: int | None = None,
               workers: int = 2, progress: bool = False, background: bool = False):
        """Compile the engine step for ``shapes`` (default :meth:`warmup_shapes`) ahead of time, so serving
        never stops to compile (:meth:`ModelRunner.warmup`: returns the number compiled, or with
        ``background=True`` a future of it while compiling goes on beside serving)."""
        shapes = self.warmup_shapes(max_prompt_tokens) if shapes is None else list(shapes)
        out = self.runner.warmup(shapes, workers=workers, progress=progress, background=background)
        if background:
            self._warmup = (out, shapes)
        return out

    def warmup_status(self) -> dict:
        """Progress of a background :meth:`warmup`: ``state`` (``"none"``, ``"running"``, ``"done"`` or
        ``"failed"``, with ``error``), ``compiled`` of ``shapes`` step shapes (the server's ``/health`` shows
        it)."""
        if self._warmup is None:
            return {"state": "none"}
        fut, shapes = self._warmup
        done = fut.done()  # before counting: a done warm-up has added all its shapes
        out = {"state": "running", "compiled": sum(k in self.runner.compiled_shapes for k in shapes),
               "shapes": len(shapes)}
        if done:
            err = fut.exception()
            out.update({"state": "done"} if err is None else {"state": "failed", "error": repr(err)})
        return out

    def score_prompt(self, ids: Sequence[int]):
        """Teacher-forced log-probabilities of a prompt (:meth:`ModelRunner.score_prompt`); thread-safe."""
        return self.runner.score_prompt(self.validate_prompt(ids))

    def close(self) -> None:
        """Release the runner's threads and files (offloaded experts); the engine cannot step afterwards."""
        self.runner.close()

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
