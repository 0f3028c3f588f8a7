"""The model runner: executes a scheduler's plans on the device (vLLM v1's ``ModelRunner`` role).

The :class:`~moejax.serve.engine.Engine` is the loop between a :class:`~moejax.serve.scheduler.Scheduler`
(decides, owns request state) and a runner (executes). A :class:`ModelRunner` owns:

* the model's ``(graphdef, state)`` and, with ``layer_loop="unroll"``, per-layer weight copies;
* the KV pool (:class:`~moejax.serve.kv_cache.KVPool`) and the prefill hidden states layered prefill carries
  from one layer group to the next;
* the shape buckets a plan is packed into (decode rows: a power of two, the full batch next to a prefill;
  prefill rows: a power of two; prefill tokens: :func:`moejax.nn.shapes.shape_bucket`) and the compiled steps
  (:func:`~moejax.serve.step.engine_step`, :func:`~moejax.serve.step.engine_decode_steps`): :meth:`warmup`
  compiles every shape a scheduler can ask for, now or on a background thread while serving;
* teacher-forced prompt scoring (:meth:`score_prompt`, the server's ``echo`` with ``logprobs``).

A serving feature that runs the model differently is another runner (a subclass overriding :meth:`run_step`
and, where it has them, :meth:`expert_ids` / :meth:`fetch`), passed to the engine: serve/ never
imports a paper package. Offloaded experts (:class:`moejax.offload.runtime.OffloadRunner`) and Read-ME's
pre-gating router (:class:`moejax.offload.pregate.PreGatedRunner`) are such runners.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moejax.models.transformer import (
    dtype_of,
    require_causal,
    resolve_layer_loop,
    unstack_layers,
)
from moejax.nn.shapes import bucket_edges, pow2_bucket, shape_bucket
from moejax.serve.kv_cache import KVPool
from moejax.serve.scheduler import Plan, Request
from moejax.serve.speculative import (
    SPECULATIVE_METHODS,
    SpecPrefill,
    mtp_pool_runs,
    spec_step,
)
from moejax.serve.step import (
    TOP_LOGPROBS,
    DecodeBatch,
    PrefillBatch,
    StepOutput,
    engine_decode_steps,
    engine_step,
)

ATTN_IMPLS = ("xla", "pallas", "auto")


class StepResult(NamedTuple):
    """One executed iteration, on the host (numpy). ``dec_*`` rows follow ``plan.decode``, ``pf_*`` rows
    ``plan.prefill`` (padding rows beyond them). Multi-step results (:meth:`ModelRunner.dispatch` with
    ``steps`` > 1) have a leading iteration axis on every ``dec_*`` field and on ``experts_touched``."""

    dec_next: np.ndarray
    dec_logprob: np.ndarray
    dec_top: tuple            # (ids, logprobs), [..., TOP_LOGPROBS] each
    pf_next: np.ndarray
    pf_logprob: np.ndarray
    pf_top: tuple
    experts_touched: np.ndarray  # [n_layers] (or [steps, n_layers])
    dec_logits: np.ndarray | None
    pf_logits: np.ndarray | None
    dropped: np.ndarray | None = None  # [n_layers] (or [steps, n_layers]) rows the MoE dispatch dropped
    expert_load: np.ndarray | None = None  # [n_layers, E] (or [steps, n_layers, E]) routed slots per expert
    accepted: np.ndarray | None = None  # speculative step: [Bd] drafts accepted per decode row
    drafts: np.ndarray | None = None    # speculative step: [Bd, K] the next drafts of each decode row
    pf_drafts: np.ndarray | None = None  # speculative step: [Bp, K] drafts after each completed prompt


class Launched(NamedTuple):
    """A step handed to the device and not yet brought back (:meth:`ModelRunner.dispatch`): its device outputs,
    ``steps`` (> 1: a multi-step decode call) and the decode-row bucket (:meth:`ModelRunner.source` indexes
    :attr:`ModelRunner.last_tokens` with them)."""

    out: object
    steps: int
    dec_rows: int


@jax.jit
def _fill_tokens(last, source, tokens):
    """Decode-row tokens whose values are still on the device filled in on the device: ``source >= 0`` indexes
    the previous step's sampled-token arrays ``last``, flattened and concatenated."""
    flat = jnp.concatenate([a.reshape(-1) for a in last])
    return jnp.where(source >= 0, flat[jnp.maximum(source, 0)], tokens).astype(tokens.dtype)


class ModelRunner:
    """Runs plans on a :class:`~moejax.models.transformer.Transformer` held in memory.

    ``cfg`` is the engine's :class:`~moejax.serve.engine.EngineConfig` (block size, pool size, buckets,
    attention settings, multi-step decoding); it is validated here.
    """

    #: a decode part padded to the full batch runs beside every prefill (one compiled program per prefill shape)
    pad_decode_with_prefill = True
    #: multi-step decode calls (``EngineConfig.decode_steps``) are available
    supports_multi_step = True
    #: speculative steps (``EngineConfig.speculative``, :mod:`moejax.serve.speculative`) are available
    supports_speculative = True
    #: asynchronous scheduling (``EngineConfig.async_scheduling``): a step can be packed while the previous one
    #: runs, its decode rows' last tokens read on the device (a runner that needs them on the host cannot)
    supports_async = True
    #: nano-batched steps (``EngineConfig.nano_batches``, NanoFlow) are available
    supports_nano_batches = True

    def __init__(self, model, cfg):
        mcfg = model.cfg
        require_causal(mcfg, "the serving engine (ModelRunner)")
        self.model, self.cfg, self.mcfg = model, cfg, mcfg
        self.max_model_len = cfg.max_model_len or mcfg.max_seq_len
        self.prefill_kv_block = _validate(cfg, mcfg, self.max_model_len)
        ppb = cfg.kv_block // cfg.block_size
        # block-table width: the whole context, rounded up to whole key blocks
        self.max_pages = -(-math.ceil(self.max_model_len / cfg.block_size) // ppb) * ppb
        self.num_blocks = cfg.num_blocks or 1 + cfg.sched.max_num_seqs * math.ceil(self.max_model_len / cfg.block_size)
        self.gdef, self.state = nnx.split(model)
        self.layer_states = self._layer_states(model)
        # the MTP modules' layers (speculative decoding) are the pool's last entry
        self.pool = KVPool.create(mtp_pool_runs(model, cfg.speculative is not None), self.num_blocks,
                                  cfg.block_size, mcfg.n_kv_heads, mcfg.resolved_head_dim, dtype_of(mcfg.dtype))
        # what compiling needs of the pool (a background warm-up must not touch the live, donated buffers)
        # (no sharding given: like the pool itself, uncommitted, so the steps later find the compiled programs)
        self._pool_spec = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), self.pool)
        m = mcfg.moe
        itemsize = jnp.dtype(dtype_of(mcfg.param_dtype)).itemsize
        # bytes of one routed expert's weights (an atomic expert: its U and V rows)
        self.expert_bytes = (0 if m is None else 2 * mcfg.d_model * itemsize if m.expert_type == "atomic"
                             else 3 * mcfg.d_model * m.d_ff * itemsize)
        self.compiled_shapes: set[tuple] = set()  # step shapes compiled so far (by warmup or by a step)
        self._pf_hidden = None  # layered prefill: the prefill rows' hidden states after the last layer group
        self._zeros = None
        self._score_lock = threading.Lock()
        self._score_jit = None
        #: the last dispatched step's sampled-token arrays on the device (decode rows, then prefill rows; a
        #: multi-step call's ``[steps, rows]``), as they came out of the step (joined only when a later step
        #: reads from them): where the next step reads tokens the host does not know yet
        self.last_tokens: tuple = ()

    def _layer_states(self, model):
        """Per-layer weight copies for the ``unroll`` layer loop (None: scan the stacked weights)."""
        return unstack_layers(model) if resolve_layer_loop(self.cfg.layer_loop) == "unroll" else None

    # ----------------------------------------------------------------------------------------- buckets
    def decode_rows(self, n: int, with_prefill: bool) -> int:
        """Decode-row bucket for ``n`` running requests (the full batch next to a prefill: one compiled
        program per prefill shape instead of one per (prefill shape, decode count))."""
        return pow2_bucket(self.cfg.sched.max_num_seqs if with_prefill else n, self.cfg.min_decode_bucket)

    def prefill_shape(self, rows: int, tokens: int) -> tuple[int, int]:
        """``(Bp, Tp)`` bucket of a prefill part with ``rows`` chunks, the longest of ``tokens`` tokens."""
        return pow2_bucket(rows, 1), shape_bucket(tokens, self.cfg.min_prefill_tokens, self.cfg.prefill_token_step)

    @staticmethod
    def shape_key(dec, pf, steps: int = 1, spec: int = 0) -> tuple:
        """What selects a compiled step: decode rows and prefill (rows, tokens); multi-step decode calls
        (``EngineConfig.decode_steps``) are ``(rows, None, steps)``, speculative steps ``(rows, prefill,
        ("spec", K))``."""
        key = (None if dec is None else int(dec.tokens.shape[0]), None if pf is None else tuple(pf.tokens.shape))
        if spec:
            return (*key, ("spec", spec))
        return key if steps == 1 else (*key, steps)

    # ----------------------------------------------------------------------------------------- packing
    def blank_decode(self, n: int) -> DecodeBatch:
        """A decode part of ``n`` padding rows (length 0: no attention work, no expert routed)."""
        return DecodeBatch(np.zeros(n, np.int32), np.zeros(n, np.int32), np.zeros((n, self.max_pages), np.int32),
                           np.zeros(n, bool), np.zeros((n, 2), np.uint32), np.zeros(n, np.float32),
                           np.ones(n, np.float32))

    def blank_prefill(self, rows: int, tokens: int) -> PrefillBatch:
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

    def pack(self, plan: Plan) -> tuple[DecodeBatch | None, PrefillBatch | None]:
        """The plan's decode and prefill parts in their shape buckets (numpy)."""
        dec = pf = None
        if plan.decode or (plan.prefill and self.pad_decode_with_prefill):
            dec = self.blank_decode(self.decode_rows(len(plan.decode), bool(plan.prefill)))
            for i, r in enumerate(plan.decode):
                dec.tokens[i], dec.pos[i], dec.valid[i] = r.last_token, r.num_tokens - 1, True
                self._fill_row(dec, i, r)
        if plan.prefill:
            pf = self.blank_prefill(*self.prefill_shape(len(plan.prefill), max(c.length for c in plan.prefill)))
            Tp = pf.tokens.shape[1]
            for i, c in enumerate(plan.prefill):
                toks = c.request.tokens[c.start:c.start + c.length]
                pf.tokens[i, Tp - len(toks):] = toks  # left-padded (see PrefillBatch)
                pf.start[i], pf.length[i] = c.start, c.length
                self._fill_row(pf, i, c.request)
        return dec, pf

    def expert_ids(self, plan: Plan, dec, pf):
        """Experts chosen before the step runs, ``(dec_ids [Bd], pf_ids [Bp, Tp])`` or ``(None, None)``: the
        model's own routers decide (a pre-gating runner overrides this)."""
        return None, None

    def blank_expert_ids(self, dec, pf):
        """:meth:`expert_ids` of blank parts, for compiling (``(None, None)`` without pre-gating)."""
        return None, None

    # ----------------------------------------------------------------------------------------- executing
    def execute(self, plan: Plan) -> StepResult:
        """Run one iteration of ``plan`` and bring its sampled tokens to the host."""
        return self.fetch(self.dispatch(plan))

    def dispatch(self, plan: Plan, steps: int = 1) -> Launched:
        """Pack ``plan`` and hand its step to the device without waiting for it (``steps`` > 1: a multi-step
        decode call of a decode-only plan whose rows' blocks already cover it). A decode row whose last token
        is still pending (``Request.pending``) reads it from the previous step's outputs on the device
        (``Request.source``)."""
        dec, pf = self.pack(plan)
        if dec is not None and any(r.pending for r in plan.decode):
            src = np.full(dec.tokens.shape[0], -1, np.int32)
            src[:len(plan.decode)] = [r.source if r.pending else -1 for r in plan.decode]
            dec = dec._replace(tokens=_fill_tokens(self.last_tokens, src, dec.tokens))
        if steps > 1:
            self.compiled_shapes.add(self.shape_key(dec, None, steps))
            o = engine_decode_steps(self.gdef, self.state, self.pool, dec, self.layer_states,
                                    **self._multi_kw(steps))
            self.pool, self.last_tokens = o.pool, (o.tokens,)
            return Launched(o, steps, dec.tokens.shape[0])
        hidden = self._pf_hidden if plan.use_hidden else None
        self.compiled_shapes.add(self.shape_key(dec, pf))
        dec_ids, pf_ids = self.expert_ids(plan, dec, pf)
        o = self.run_step(dec, pf, hidden, plan.group, plan.use_hidden, dec_ids, pf_ids)
        self.pool = o.pool
        self._pf_hidden = o.pf_hidden if (plan.prefill and not plan.prefill[0].last) else None
        self.last_tokens = tuple(x for x, part in ((o.dec_next, dec), (o.pf_next, pf)) if part is not None)
        return Launched(o, 1, 0 if dec is None else dec.tokens.shape[0])

    @staticmethod
    def source(launched: Launched, part: str, row: int) -> int:
        """Index of a row's (last) sampled token in :attr:`last_tokens`, flattened and joined, after
        ``launched``."""
        if part == "prefill":
            return launched.dec_rows + row
        return (launched.steps - 1) * launched.dec_rows + row

    def fetch(self, launched: Launched) -> StepResult:
        """Wait for a dispatched step and bring its results to the host."""
        o = launched.out
        if launched.steps > 1:
            toks, lps, top, touched, logits, dropped, load = jax.device_get(
                (o.tokens, o.logprob, o.top, o.experts_touched, o.logits, o.dropped, o.expert_load))
            return StepResult(toks, lps, top, None, None, None, touched, logits, None, dropped, load)
        host = jax.device_get((o.dec_next, o.dec_logprob, o.dec_top, o.pf_next, o.pf_logprob, o.pf_top,
                               o.experts_touched, o.dec_logits, o.pf_logits, o.dropped, o.expert_load))
        return StepResult(*host)

    def step_fn(self):
        """The jitted step :meth:`run_step` calls and :meth:`warmup` lowers, with
        :func:`~moejax.serve.step.engine_step`'s signature (a runner that runs the same step differently, e.g.
        on a mesh, returns its own)."""
        return engine_step

    def run_step(self, dec, pf, hidden, group, use_hidden: bool, dec_ids=None, pf_ids=None) -> StepOutput:
        """One :meth:`step_fn` call on packed parts over the runner's pool (donated)."""
        args, kw = self._step_args(dec, pf, hidden, group, use_hidden, dec_ids, pf_ids)
        return self.step_fn()(*args, **kw)

    def pack_speculative(self, plan: Plan, k: int) -> tuple[DecodeBatch | None, PrefillBatch | None, SpecPrefill]:
        """The plan packed for a speculative step of ``k`` drafts: each decode row holds its last token and its
        drafts (``Request.draft``; a request without current drafts, e.g. after speculation was off, gets
        copies of its last token: valid input, likely rejected), the prefill rows the prompt tokens after their
        chunk."""
        dec, pf = self.pack(plan)
        if dec is not None:
            toks = np.zeros((dec.tokens.shape[0], 1 + k), np.int32)
            toks[:, 0] = dec.tokens
            for i, r in enumerate(plan.decode):
                cur = len(r.draft) >= k and r.draft_at == r.num_tokens
                toks[i, 1:] = r.draft[:k] if cur else r.last_token
            dec = dec._replace(tokens=toks)
        rows = 0 if pf is None else pf.tokens.shape[0]
        spf = SpecPrefill(np.zeros((rows, k), np.int32), np.zeros(rows, bool))
        for i, c in enumerate(plan.prefill):
            nxt = c.request.tokens[c.start + c.length:c.start + c.length + k]
            spf.ahead[i, :len(nxt)] = nxt
            spf.final[i] = c.last
        return dec, pf, spf

    def execute_speculative(self, plan: Plan) -> StepResult:
        """One speculative step (:func:`~moejax.serve.speculative.spec_step`) of ``plan``: decode fields are
        step-major ``[1 + K, Bd]``; ``accepted``, ``drafts`` and ``pf_drafts`` are set. The decode rows' blocks
        must cover their ``1 + K`` positions."""
        k = self.cfg.num_speculative_tokens
        dec, pf, spf = self.pack_speculative(plan, k)
        self.compiled_shapes.add(self.shape_key(dec, pf, spec=k))
        o = spec_step(self.gdef, self.state, self.pool, dec, pf, spf, self.layer_states, **self._static_kw(),
                      prefill_kv_block=self.prefill_kv_block)
        self.pool = o.pool
        h = jax.device_get((o.tokens, o.logprob, o.top, o.pf_next, o.pf_logprob, o.pf_top, o.experts_touched,
                            o.logits, o.pf_logits, o.dropped, o.expert_load, o.accepted, o.drafts, o.pf_drafts))
        return StepResult(*h)

    def _static_kw(self) -> dict:
        """Static arguments shared by :func:`engine_step` and :func:`engine_decode_steps`."""
        return {"block_size": self.cfg.block_size, "return_logits": self.cfg.record_logits,
                "attn_impl": self.cfg.attn_impl, "kv_block": self.cfg.kv_block}

    def _nano_kw(self) -> dict:
        """``nano_batches`` for the engine steps (only when on: runners whose step does not take it stay
        untouched)."""
        return {"nano_batches": self.cfg.nano_batches} if self.cfg.nano_batches > 1 else {}

    def _multi_kw(self, k: int) -> dict:
        return {**self._static_kw(), **self._nano_kw(), "steps": k}

    def _zero_hidden(self, shape) -> jax.Array:
        if self._zeros is None or self._zeros.shape[:2] != tuple(shape):
            self._zeros = jnp.zeros((*shape, self.mcfg.d_model), dtype_of(self.mcfg.dtype))
        return self._zeros

    def _step_args(self, dec, pf, hidden, group, use_hidden, dec_ids, pf_ids):
        """Positional and keyword arguments of :func:`engine_step` (shared by stepping and :meth:`warmup`)."""
        if pf is not None and hidden is None:
            hidden = self._zero_hidden(pf.tokens.shape)  # the layer group and use_hidden are run-time values
        g = np.asarray((group[0], group[1], int(bool(use_hidden))), np.int32)
        kw = {**self._static_kw(), **self._nano_kw(), "prefill_kv_block": self.prefill_kv_block}
        return (self.gdef, self.state, self.pool, dec, pf, hidden, g, dec_ids, pf_ids, self.layer_states), kw

    # ----------------------------------------------------------------------------------------- warm-up
    def warmup_shapes(self, scheduler, max_prompt_tokens: int | None = None) -> list[tuple]:
        """Every step shape ``scheduler`` can ask for (see :meth:`shape_key`), smallest first.

        Decode-only steps: each decode-row bucket up to ``max_num_seqs`` (and the multi-step calls of each).
        Steps with a prefill: the full decode batch beside ``(rows, tokens)`` buckets for up to
        ``max_prefill_seqs`` rows and, per row count, up to the longest row the scheduler can produce
        (:meth:`~moejax.serve.scheduler.Scheduler.max_prefill_row`; ``max_prompt_tokens`` caps it when the
        workload's prompts are known to be shorter).
        """
        sc, L = self.cfg.sched, self.max_model_len
        longest = min(L, max_prompt_tokens) if max_prompt_tokens else L
        step, lo = self.cfg.prefill_token_step, self.cfg.min_prefill_tokens
        edges = bucket_edges(min(longest, scheduler.max_prefill_row(1, longest)), lo, step)
        tokens = sorted({self.prefill_shape(1, t)[1] for t in edges})
        rows = sorted({self.prefill_shape(n, 1)[0] for n in range(1, min(sc.max_prefill_seqs, sc.max_num_seqs) + 1)})
        buckets = sorted({self.decode_rows(n, False) for n in range(1, sc.max_num_seqs + 1)})
        keys = [(b, None) for b in buckets]
        if self.cfg.decode_steps > 1 and self.supports_multi_step:
            keys += [(b, None, self.cfg.decode_steps) for b in buckets]
        full = self.decode_rows(0, True) if self.pad_decode_with_prefill else None
        pf_keys = []
        for bp in rows:
            lim = shape_bucket(scheduler.max_prefill_row(bp, longest), lo, step)
            pf_keys += [(full, (bp, tp)) for tp in tokens if bp == 1 or tp <= lim]
        keys += pf_keys
        if self.cfg.speculative is not None:  # speculative steps: decode-only, prefill-only and mixed
            spec = ("spec", self.cfg.num_speculative_tokens)
            keys += [(b, None, spec) for b in buckets] + [(*kk, spec) for kk in pf_keys]
        return keys

    def warmup(self, shapes: Sequence[tuple], *, workers: int = 2, progress: bool = False,
               background: bool = False) -> int | Future:
        """Compile the engine step for ``shapes`` (keys of :meth:`shape_key`) ahead of time, so serving never
        stops to compile. Lowering runs on the calling thread, XLA compiles on ``workers`` threads. Returns the
        number of shapes compiled (those already compiled are skipped); ``background=True`` returns at once
        with a :class:`~concurrent.futures.Future` of that number, the compiling running on a daemon thread
        while the engine serves (a step whose shape is not compiled yet compiles it on first use, as without
        warm-up).

        Each compiled step stays loaded (jax's compilation cache) with its JIT code: on XLA:CPU a step of an
        8-layer model maps several hundred memory regions, so grids of many dozens of shapes across several
        engines in one process can reach the kernel's ``vm.max_map_count`` (65530 by default; LLVM then
        reports "Cannot allocate memory"). Keep the grid small (``prefill_token_step``, ``max_prompt_tokens``)
        or call ``jax.clear_caches()`` between engines."""
        todo = [k for k in shapes if k not in self.compiled_shapes]
        if background:
            fut: Future = Future()

            def run():
                try:
                    fut.set_result(self._compile(todo, workers, progress))
                except Exception as e:  # noqa: BLE001 (surfaced through the future)
                    fut.set_exception(e)

            threading.Thread(target=run, name="moejax-warmup", daemon=True).start()
            return fut
        return self._compile(todo, workers, progress)

    def _compile(self, todo: list[tuple], workers: int, progress: bool) -> int:
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=len(todo), desc="compile engine steps", unit="shape")
        with ThreadPoolExecutor(max(1, workers)) as ex:
            futs = [(ex.submit(self._lower(key).compile), key) for key in todo]
            for f, key in futs:
                f.result()
                self.compiled_shapes.add(key)
                if bar is not None:
                    bar.update(1)
        if bar is not None:
            bar.close()
        return len(todo)

    def _lower(self, key: tuple):
        """The lowered step of one shape key."""
        bd, pfs = key[:2]
        dec = None if bd is None else self.blank_decode(bd)
        if len(key) > 2 and isinstance(key[2], tuple):  # a speculative step
            k = key[2][1]
            pf = None if pfs is None else self.blank_prefill(*pfs)
            if dec is not None:
                dec = dec._replace(tokens=np.zeros((bd, 1 + k), np.int32))
            rows = 0 if pf is None else pfs[0]
            spf = SpecPrefill(np.zeros((rows, k), np.int32), np.zeros(rows, bool))
            return spec_step.lower(self.gdef, self.state, self._pool_spec, dec, pf, spf, self.layer_states,
                                   **self._static_kw(), prefill_kv_block=self.prefill_kv_block)
        if len(key) > 2:  # a multi-step decode call
            return engine_decode_steps.lower(self.gdef, self.state, self._pool_spec, dec, self.layer_states,
                                             **self._multi_kw(key[2]))
        pf = None if pfs is None else self.blank_prefill(*pfs)
        dec_ids, pf_ids = self.blank_expert_ids(dec, pf)
        args, kw = self._step_args(dec, pf, None, (0, self.mcfg.n_layers), False, dec_ids, pf_ids)
        return self.step_fn().lower(*args[:2], self._pool_spec, *args[3:], **kw)

    # ----------------------------------------------------------------------------------------- scoring
    def score_prompt(self, ids: Sequence[int]):
        """Teacher-forced log-probabilities of a prompt's tokens (the server's ``echo`` with ``logprobs``):
        ``(logprob of token i+1 given tokens <= i [n-1], top ids [n-1, 5], top logprobs [n-1, 5])`` from the
        model's dense forward, one compiled program per power-of-two length bucket (thread-safe)."""
        if self._score_jit is None:
            self._score_jit = jax.jit(_score, static_argnums=0)
        T = pow2_bucket(len(ids), 16)
        toks = np.zeros((1, T), np.int32)
        toks[0, :len(ids)] = ids
        gdef, state = self.score_graph()
        with self._score_lock:
            nxt, top_id, top_lp = jax.device_get(self._score_jit(gdef, state, toks, len(ids)))
        n = len(ids) - 1
        return nxt[:n], top_id[:n], top_lp[:n]

    def score_graph(self):
        """``(graphdef, state)`` of the dense forward :meth:`score_prompt` runs (the runner's own model)."""
        return self.gdef, self.state

    def close(self) -> None:
        """Release what the runner holds beyond memory (threads, files); the base runner holds nothing."""


def _score(gdef, state, tokens, n):
    model = nnx.merge(gdef, state)
    mask = (jnp.arange(tokens.shape[1]) < n)[None].astype(jnp.int32)
    lp = jax.nn.log_softmax(model(tokens, attention_mask=mask).logits[0], axis=-1)
    nxt = jnp.take_along_axis(lp[:-1], tokens[0, 1:, None], axis=1)[:, 0]
    top_lp, top_id = jax.lax.top_k(lp[:-1], TOP_LOGPROBS)
    return nxt, top_id, top_lp


def _validate(cfg, mcfg, max_model_len: int) -> int:
    """Check the engine settings a runner depends on; returns the prefill key block."""
    if max_model_len > mcfg.max_seq_len:
        raise ValueError(f"EngineConfig.max_model_len={max_model_len} exceeds ModelConfig.max_seq_len="
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
    if cfg.attn_impl not in ATTN_IMPLS:
        raise ValueError(f"EngineConfig.attn_impl={cfg.attn_impl!r}; allowed: {', '.join(map(repr, ATTN_IMPLS))}")
    if cfg.speculative is not None:
        if cfg.speculative not in SPECULATIVE_METHODS:
            raise ValueError(f"EngineConfig.speculative={cfg.speculative!r}; allowed: None, "
                             f"{', '.join(map(repr, SPECULATIVE_METHODS))}")
        n = cfg.num_speculative_tokens
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= max(mcfg.mtp_depth, 1):
            raise ValueError(f"EngineConfig.num_speculative_tokens={n!r} must be an integer in [1, "
                             f"{max(mcfg.mtp_depth, 1)}] (the model's MTP heads, ModelConfig.mtp_depth)")
        if mcfg.mtp_depth < 1:
            raise ValueError("EngineConfig.speculative='mtp' needs a model with MTP heads (ModelConfig.mtp_depth "
                             ">= 1; moejax train --mtp K)")
        if cfg.scheduler != "chunked":
            raise ValueError(f"EngineConfig.speculative={cfg.speculative!r} needs scheduler='chunked' (got "
                             f"{cfg.scheduler!r}): the MTP heads draft from the last layer's hidden states of whole "
                             f"prompt chunks")
        if cfg.decode_steps != 1:
            raise ValueError(f"EngineConfig.speculative={cfg.speculative!r} with decode_steps={cfg.decode_steps}: "
                             f"choose one (both emit several tokens per call)")
        mb = cfg.speculative_max_batch
        if mb is not None and (isinstance(mb, bool) or not isinstance(mb, int) or mb < 1):
            raise ValueError(f"EngineConfig.speculative_max_batch={mb!r} must be None or an integer >= 1")
    n = cfg.nano_batches
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 16:
        raise ValueError(f"EngineConfig.nano_batches={n!r} must be an integer in [1, 16] (1: off)")
    if n > 1 and cfg.scheduler != "chunked":
        raise ValueError(f"EngineConfig.nano_batches={n} needs scheduler='chunked' (got {cfg.scheduler!r}): a "
                         f"nano-batched layer computes the prefill rows in every layer, discarding layered "
                         f"prefill's masked ones")
    if n > 1 and cfg.speculative is not None:
        raise ValueError(f"EngineConfig.nano_batches={n} with speculative={cfg.speculative!r}: the speculative "
                         f"step is not nano-batched; choose one")
    if not isinstance(cfg.async_scheduling, bool):
        raise TypeError(f"EngineConfig.async_scheduling={cfg.async_scheduling!r} must be True or False")
    if cfg.async_scheduling and cfg.speculative is not None:
        raise ValueError(f"EngineConfig.async_scheduling=True with speculative={cfg.speculative!r}: the next "
                         f"step depends on how many drafts were accepted; choose one")
    return pkb
