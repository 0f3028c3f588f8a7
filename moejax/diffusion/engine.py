"""Serving a diffusion LM (dLLM-Serve): a request-level engine with a phase-multiplexed scheduler.

A request's canvas is its prompt followed by ``max_tokens`` mask tokens (a whole number of blocks). It owns KV
blocks for the whole canvas. Each iteration the scheduler picks requests and each advances one denoising step:
a block's first step is a **refresh** (the whole canvas recomputed, its keys/values written: charged the whole
sequence against the iteration's token budget), the others **reuse** steps (only the block recomputed over the
cached keys/values: charged the block). :class:`DiffusionEngineConfig.scheduler`:

* ``phase`` (dLLM-Serve's phase-multiplexed scheduler): requests advance independently, so refresh and reuse
  steps of different requests mix in one iteration; requests are taken first-come first-served while the
  token budget lasts (a request that does not fit is skipped for this iteration, later smaller ones may still
  go); new requests are admitted whenever a slot and KV blocks are free;
* ``static`` (the baseline, Fast-dLLM-like lockstep batching): a batch of up to ``max_num_seqs`` requests is
  admitted together and steps together until every request of it has finished; arrivals wait for the next batch.

A step's tokens come from :func:`moejax.diffusion.runner.diffusion_step` (logit budgeting: the LM head only on
the block's masked positions, in chunks); the host unmasks each request's ``k`` most confident positions
(LLaDA's schedule, the same choice as :class:`~moejax.diffusion.sampler.DiffusionSampler`, whose per-request
keys the engine shares, so a request gives the sampler's tokens alone or among others). A completed block
streams out; a block holding a stop token ends the request there.

The engine has the interface the OpenAI server drives (``add_request``, ``step``, ``abort``, ``has_unfinished``,
``prom``, ...), so ``moejax serve`` serves a diffusion checkpoint with it; requests it cannot serve (``n > 1``,
``logprobs``, ``echo``, a length that is not a multiple of the block, bad ``steps``) are answered 400
(:meth:`DiffusionEngine.check_request`).
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

from moejax.diffusion.runner import Rows, Selection, diffusion_step, step_memory
from moejax.diffusion.sampler import HEAD_ROWS, transfer_counts
from moejax.models.transformer import resolve_layer_loop, unstack_layers
from moejax.nn.shapes import pow2_bucket
from moejax.serve.engine import RequestOutput, SamplingParams, token_ids
from moejax.serve.kv_cache import BlockAllocator, KVPool, NoFreeBlocks, block_bytes
from moejax.serve.metrics import PrometheusMetrics, RequestMetrics

DIFFUSION_SCHEDULERS = ("phase", "static")
"""Request scheduling of the diffusion engine (``DiffusionEngineConfig.scheduler``)."""


def _bad(name, value, allowed):
    return ValueError(f"DiffusionEngineConfig.{name}={value!r} is invalid: {allowed}")


@dataclass(frozen=True)
class DiffusionEngineConfig:
    """Settings of :class:`DiffusionEngine`.

    Attributes:
      block_length: tokens per semi-autoregressive block; a request's ``max_tokens`` must be a multiple of it.
      steps_per_block: denoising steps per block (1..block_length); a request may ask for ``steps`` over its
        whole generation instead (then ``steps / blocks`` per block).
      scheduler: one of :data:`DIFFUSION_SCHEDULERS`.
      max_num_seqs: requests in flight at once.
      token_budget: tokens one iteration may compute (``phase``): a refresh step costs the request's canvas, a
        reuse step its block (dLLM-Serve: 16,384 on a GPU).
      logit_budget: the LM head only on the masked positions, at most ``head_rows`` rows per call; False: the
        head on every computed position (``[B, T, V]`` logits), as the baseline.
      head_rows: rows per LM-head call under logit budgeting.
      block_size: tokens per KV block of the pool.
      num_blocks: KV blocks of the pool; None: enough for ``max_num_seqs`` canvases of ``max_model_len``, or,
        with ``memory_budget``, what fits in it.
      memory_budget: bytes the engine may use (weights + KV pool + the largest step's temporaries, from compiled
        memory analysis); sizes the pool when ``num_blocks`` is None.
      max_model_len: the longest canvas (prompt + max_tokens); None: the model's ``max_seq_len``.
      sparse_retention: head-centric sparse attention (dLLM-Serve): None (default) attends densely; a ratio in
        (0, 1] makes each block's refresh step choose, per KV head, that share of the canvas's other tokens (by
        the block's mean query, max over the head group, max-pooled over ``sparse_window`` tokens) and the
        block's reuse steps attend only to those plus the block itself.
      sparse_window: the max-pooling window of the selection scores (odd, >= 1).
    """

    block_length: int = 32
    steps_per_block: int = 32
    scheduler: str = "phase"
    max_num_seqs: int = 16
    token_budget: int = 4096
    logit_budget: bool = True
    head_rows: int = HEAD_ROWS
    block_size: int = 16
    num_blocks: int | None = None
    memory_budget: int | None = None
    max_model_len: int | None = None
    sparse_retention: float | None = None
    sparse_window: int = 3

    def validate(self) -> DiffusionEngineConfig:
        for name in ("block_length", "steps_per_block", "max_num_seqs", "token_budget", "head_rows", "block_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise _bad(name, v, "must be an integer >= 1")
        if self.steps_per_block > self.block_length:
            raise _bad("steps_per_block", self.steps_per_block, f"must be in [1, block_length={self.block_length}]")
        if self.scheduler not in DIFFUSION_SCHEDULERS:
            raise _bad("scheduler", self.scheduler, f"allowed values are {', '.join(map(repr, DIFFUSION_SCHEDULERS))}")
        if self.num_blocks is not None and (not isinstance(self.num_blocks, int) or self.num_blocks < 2):
            raise _bad("num_blocks", self.num_blocks, "must be None or an integer >= 2")
        r = self.sparse_retention
        if r is not None and (isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < r <= 1):
            raise _bad("sparse_retention", r, "must be None (dense attention) or a ratio in (0, 1]")
        if not isinstance(self.sparse_window, int) or self.sparse_window < 1 or self.sparse_window % 2 == 0:
            raise _bad("sparse_window", self.sparse_window, "must be an odd integer >= 1")
        if self.memory_budget is not None and (not isinstance(self.memory_budget, int) or self.memory_budget < 1):
            raise _bad("memory_budget", self.memory_budget, "must be None or a number of bytes >= 1")
        return self


@dataclass
class _Req:
    id: str
    prompt: list[int]
    params: SamplingParams
    steps_per_block: int
    metrics: RequestMetrics
    callback: Callable | None
    canvas: np.ndarray = None       # [L] int32
    blocks: list[int] = field(default_factory=list)
    block: int = 0                  # current block index
    step_in_block: int = 0
    counts: np.ndarray = None       # [steps_per_block] tokens to unmask per step of the current block
    nfe: int = 0                    # steps taken (the sampling key's step index)
    output: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    suffix: list[int] = field(default_factory=list)  # tokens after the generated region (infilling)
    key: np.ndarray = None          # [2] uint32: PRNGKey(params.seed), made once at admission
    selection: tuple | None = None  # sparse attention: ([n_layers, KV, K] positions, valid) of the current block

    @property
    def length(self) -> int:
        return len(self.canvas)

    def block_cols(self, bl: int) -> tuple[int, int]:
        s = len(self.prompt) + self.block * bl
        return s, s + bl


class DiffusionEngine:
    """Continuous serving of a diffusion LM (see the module docstring).

    ``engine.add_request(prompt, SamplingParams(max_tokens=64, temperature=0, seed=1))`` queues a request;
    :meth:`step` runs one iteration and returns the requests' new outputs (a completed block each);
    :meth:`generate` runs prompts to completion.
    """

    def __init__(self, model, cfg: DiffusionEngineConfig | None = None, *, model_name: str = "moejax",
                 layer_loop: str = "auto"):
        mcfg = model.cfg
        if mcfg.causal:
            raise ValueError("DiffusionEngine serves diffusion LMs (ModelConfig.causal=False); an autoregressive "
                             "model is served by moejax.serve.engine.Engine")
        cfg = (cfg or DiffusionEngineConfig()).validate()
        self.model, self.cfg, self.mcfg, self.model_name = model, cfg, mcfg, model_name
        self.max_model_len = cfg.max_model_len or mcfg.max_seq_len
        if self.max_model_len > mcfg.max_seq_len:
            raise _bad("max_model_len", cfg.max_model_len, f"must be <= ModelConfig.max_seq_len={mcfg.max_seq_len}")
        self.gdef, self.state = nnx.split(model)
        self.layer_states = unstack_layers(model) if resolve_layer_loop(layer_loop) == "unroll" else None
        self.max_pages = math.ceil(self.max_model_len / cfg.block_size)
        self.num_blocks = cfg.num_blocks or (self.blocks_for_memory() if cfg.memory_budget else
                                             1 + cfg.max_num_seqs * self.max_pages)
        self.pool = KVPool.create(model.runs, self.num_blocks, cfg.block_size, mcfg.n_kv_heads,
                                  mcfg.resolved_head_dim, jnp.dtype(mcfg.dtype))
        self.alloc = BlockAllocator(self.num_blocks, cfg.block_size, enable_prefix_cache=False)
        self.waiting: list[_Req] = []
        self.running: list[_Req] = []
        self.entries: dict[str, _Req] = {}
        self.finished_metrics: list[RequestMetrics] = []
        self.iterations: list[dict] = []
        self.prom = PrometheusMetrics(model_name)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._ids = itertools.count()
        self._rng = np.random.default_rng(0)
        self._static_batch: set[str] = set()
        self.default_max_tokens = cfg.block_length  # a request that gives no max_tokens gets one block

    # ----------------------------------------------------------------------------------------- memory
    def kv_block_bytes(self) -> int:
        m = self.mcfg
        return block_bytes(m.n_layers, self.cfg.block_size, m.n_kv_heads, m.resolved_head_dim, jnp.dtype(m.dtype))

    def weight_bytes(self) -> int:
        return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(self.state))

    def peak_step_memory(self, num_blocks: int = 2) -> dict:
        """Compiled memory analysis of the largest iteration (``max_num_seqs`` refresh rows of ``max_model_len``)
        over a pool of ``num_blocks`` blocks."""
        cfg, m = self.cfg, self.mcfg
        B, T = pow2_bucket(cfg.max_num_seqs), pow2_bucket(self.max_model_len, 16)
        T = min(T, self.max_model_len)
        pool = jax.eval_shape(lambda: KVPool.create(self.model.runs, num_blocks, cfg.block_size, m.n_kv_heads,
                                                    m.resolved_head_dim, jnp.dtype(m.dtype)))
        i32 = jnp.int32
        ref = Rows(jax.ShapeDtypeStruct((B, T), i32), *(jax.ShapeDtypeStruct((B,), i32),) * 2,
                   jax.ShapeDtypeStruct((B, self.max_pages), i32), jax.ShapeDtypeStruct((B,), i32))
        N = pow2_bucket(B * cfg.block_length, 8)
        sel = Selection(jax.ShapeDtypeStruct((N,), i32), jax.ShapeDtypeStruct((N, 2), jnp.uint32),
                        jax.ShapeDtypeStruct((N,), i32), jax.ShapeDtypeStruct((N,), i32),
                        jax.ShapeDtypeStruct((N,), jnp.float32))
        return step_memory(self.gdef, self.state, pool, ref, None, sel, self.layer_states,
                           block_size=cfg.block_size, block=cfg.block_length, greedy=True,
                           logit_budget=cfg.logit_budget, head_rows=cfg.head_rows)

    def blocks_for_memory(self) -> int:
        """KV blocks that fit in ``memory_budget`` after the weights and the largest step's temporaries."""
        left = self.cfg.memory_budget - self.weight_bytes() - self.peak_step_memory()["temp_bytes"]
        n = left // self.kv_block_bytes()
        if n < 2 + self.max_pages:
            raise _bad("memory_budget", self.cfg.memory_budget,
                       f"leaves room for {max(n, 0)} KV blocks; one request of max_model_len={self.max_model_len} "
                       f"needs {self.max_pages} (+1 scratch): raise it or lower max_model_len/max_num_seqs")
        return int(n)

    # ----------------------------------------------------------------------------------------- requests
    def check_request(self, body, max_tokens: int) -> None:
        """Raise :class:`moejax.serve.errors.APIError` (400, naming the field) for an OpenAI request this engine
        cannot serve."""
        from moejax.serve.errors import APIError

        if body.n != 1:
            raise APIError(400, f"n={body.n}: a diffusion LM serves one choice per request (n=1)", "n")
        lp = getattr(body, "logprobs", None)
        if lp not in (None, False) or getattr(body, "top_logprobs", None):
            raise APIError(400, "logprobs are not available from a diffusion LM (tokens are unmasked by "
                                "confidence, not sampled left to right)", "logprobs")
        if getattr(body, "echo", False):
            raise APIError(400, "echo is not available from a diffusion LM (no teacher-forced prompt logprobs)",
                           "echo")
        try:
            self.steps_for(max_tokens, (body.model_extra or {}).get("steps"))
        except ValueError as e:
            raise APIError(400, str(e), "steps" if "steps" in str(e).split("=")[0] else "max_tokens") from None

    def steps_for(self, max_tokens: int, steps=None) -> int:
        """Steps per block of a request of ``max_tokens`` asking for ``steps`` in all (None: the engine's)."""
        bl = self.cfg.block_length
        if not isinstance(max_tokens, int) or max_tokens < 1 or max_tokens % bl:
            raise ValueError(f"max_tokens={max_tokens!r} must be a positive multiple of the block length {bl}")
        if steps is None:
            return self.cfg.steps_per_block
        nb = max_tokens // bl
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < nb or steps % nb or steps // nb > bl:
            raise ValueError(f"steps={steps!r} must be a multiple of the number of blocks ({nb}) between {nb} and "
                             f"max_tokens ({max_tokens})")
        return steps // nb

    def request_params(self, body, params: SamplingParams) -> tuple[SamplingParams, int | None]:
        return params, (body.model_extra or {}).get("steps")

    def validate_prompt(self, prompt: Sequence[int]) -> list[int]:
        prompt = token_ids(prompt, self.mcfg.vocab_size)
        if len(prompt) + self.cfg.block_length > self.max_model_len:
            raise ValueError(f"prompt has {len(prompt)} tokens; the context is {self.max_model_len} (prompt + at "
                             f"least one block of {self.cfg.block_length} must fit)")
        return prompt

    def add_request(self, prompt: Sequence[int], params: SamplingParams | tuple | None = None, *,
                    request_id: str | None = None, arrival: float | None = None, steps: int | None = None,
                    suffix: Sequence[int] | None = None,
                    callback: Callable[[RequestOutput], None] | None = None) -> str:
        """Queue a request (``params.max_tokens`` a multiple of the block; ``steps``: denoising steps over the
        whole generation, default the engine's per block). ``params`` may also be the ``(params, steps)`` pair
        of :meth:`request_params`. ``suffix``: tokens after the generated region (infilling: the region is
        denoised with both sides visible). Bad prompts or parameters raise ``ValueError`` here."""
        if isinstance(params, tuple):
            params, steps = params
        params = (params or SamplingParams(max_tokens=self.cfg.block_length)).validate()
        prompt = self.validate_prompt(prompt)
        suffix = self.validate_prompt(suffix) if suffix else []
        spb = self.steps_for(params.max_tokens, steps)
        if len(prompt) + params.max_tokens + len(suffix) > self.max_model_len:
            raise ValueError(f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens})"
                             + (f" + suffix ({len(suffix)})" if suffix else "")
                             + f" exceeds the context length {self.max_model_len}")
        if params.seed is None:
            params = SamplingParams(**{**params.__dict__, "seed": int(self._rng.integers(0, 2 ** 32))})
        rid = request_id or f"dreq-{next(self._ids)}"
        now = time.perf_counter() if arrival is None else arrival
        self._inbox.put(("add", _Req(rid, prompt, params, spb, RequestMetrics(now, len(prompt)), callback,
                                     suffix=suffix)))
        return rid

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))

    def has_unfinished(self) -> bool:
        return bool(self.entries) or not self._inbox.empty()

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def warmup_status(self) -> dict:
        return {"state": "none"}

    def score_prompt(self, ids):
        raise ValueError("prompt logprobs (echo) are not available from a diffusion LM")

    def close(self) -> None:
        pass

    # ----------------------------------------------------------------------------------------- loop
    def _drain(self, outputs) -> None:
        while True:
            try:
                op, x = self._inbox.get_nowait()
            except queue.Empty:
                return
            if op == "add":
                if x.id in self.entries:
                    raise ValueError(f"duplicate request id {x.id!r}")
                self.entries[x.id] = x
                self.waiting.append(x)
            else:
                r = self.entries.get(x)
                if r is not None:
                    r.finish_reason = "abort"
                    self._finish(r, [], outputs)

    def _admit_one(self, r: _Req) -> bool:
        n = math.ceil((len(r.prompt) + r.params.max_tokens + len(r.suffix)) / self.cfg.block_size)
        if self.alloc.num_free < n:
            return False
        try:
            r.blocks = self.alloc.allocate(n)
        except NoFreeBlocks:  # pragma: no cover - num_free said otherwise
            return False
        mask = self.mcfg.mask_token_id
        r.canvas = np.asarray(r.prompt + [mask] * r.params.max_tokens + r.suffix, np.int32)
        r.counts = transfer_counts(np.asarray(self.cfg.block_length), r.steps_per_block)
        r.key = np.asarray(jax.random.PRNGKey(r.params.seed), np.uint32)
        self.waiting.remove(r)
        self.running.append(r)
        return True

    def _admit(self) -> None:
        if self.cfg.scheduler == "static":
            if self._static_batch:  # lockstep: the batch runs until all of it finished
                return
            for r in list(self.waiting[:self.cfg.max_num_seqs]):
                if not self._admit_one(r):
                    break
            self._static_batch = {r.id for r in self.running}
            return
        for r in list(self.waiting):
            if len(self.running) >= self.cfg.max_num_seqs or not self._admit_one(r):
                break

    def _choose(self) -> list[_Req]:
        if self.cfg.scheduler == "static":
            return list(self.running)
        budget, out = self.cfg.token_budget, []
        for r in self.running:  # FCFS (admission order)
            cost = r.length if r.step_in_block == 0 else self.cfg.block_length
            if cost <= budget or not out:
                out.append(r)
                budget -= cost
        return out

    def step(self) -> list[RequestOutput]:
        """One iteration: admit, choose, run one denoising step of each chosen request, stream finished blocks."""
        outputs: list[RequestOutput] = []
        self._drain(outputs)
        self._admit()
        chosen = self._choose()
        if not chosen:
            return outputs
        t0 = time.perf_counter()
        refresh = [r for r in chosen if r.step_in_block == 0]
        reuse = [r for r in chosen if r.step_in_block > 0]
        tok, conf, at, touched = self._execute(refresh, reuse)
        t1 = time.perf_counter()
        self._apply(refresh + reuse, tok, conf, at, t1, outputs)
        self.iterations.append({"start": t0, "end": t1, "refresh": len(refresh), "reuse": len(reuse),
                                "tokens": sum(r.length for r in refresh) + len(reuse) * self.cfg.block_length,
                                "experts_touched": touched})
        return outputs

    def _rows(self, reqs: list[_Req], refresh: bool) -> Rows | None:
        if not reqs:
            return None
        bl = self.cfg.block_length
        B = pow2_bucket(len(reqs))
        T = min(pow2_bucket(max(r.length for r in reqs), 16), self.max_model_len) if refresh else bl
        tokens = np.zeros((B, T), np.int32)
        start = np.zeros(B, np.int32)
        length = np.zeros(B, np.int32)
        tables = np.zeros((B, self.max_pages), np.int32)
        bstart = np.zeros(B, np.int32)
        for i, r in enumerate(reqs):
            s, e = r.block_cols(bl)
            if refresh:
                tokens[i, :r.length] = r.canvas
                bstart[i] = s
            else:
                tokens[i] = r.canvas[s:e]
                start[i] = s
            length[i] = r.length
            tables[i, :len(r.blocks)] = r.blocks
        rows = Rows(*(jnp.asarray(a) for a in (tokens, start, length, tables, bstart)))
        if self.cfg.sparse_retention is None:
            return rows
        if refresh:  # each row keeps this share of its candidates (the canvas outside the block)
            keep = np.zeros(B, np.int32)
            keep[:len(reqs)] = [self._keep(r) for r in reqs]
            return rows._replace(keep=jnp.asarray(keep))
        K = pow2_bucket(max(r.selection[0].shape[-1] for r in reqs), 8)
        NL, KV = self.mcfg.n_layers, self.mcfg.n_kv_heads
        pos, ok = np.zeros((B, NL, KV, K), np.int32), np.zeros((B, NL, KV, K), bool)
        for i, r in enumerate(reqs):
            p, o = r.selection
            pos[i, ..., :p.shape[-1]], ok[i, ..., :p.shape[-1]] = p, o
        return rows._replace(sel_pos=jnp.asarray(pos), sel_ok=jnp.asarray(ok))

    def _keep(self, r: _Req) -> int:
        """Positions each KV head keeps under sparse attention: the retention share of the canvas outside the
        block."""
        return math.ceil(self.cfg.sparse_retention * (r.length - self.cfg.block_length))

    def _execute(self, refresh: list[_Req], reuse: list[_Req]):
        """Run one step of ``refresh`` and ``reuse``; returns the chosen tokens and confidences of the masked
        positions, where each request's positions start in them (``[(offset, masked columns)]``) and the
        experts touched per layer."""
        bl, mask = self.cfg.block_length, self.mcfg.mask_token_id
        ref_rows, reu_rows = self._rows(refresh, True), self._rows(reuse, False)
        n_ref = 0 if ref_rows is None else ref_rows.tokens.shape[0]
        index, keys, steps, offs, temps, at = [], [], [], [], [], []
        for i, r in enumerate(refresh + reuse):
            row = i if i < len(refresh) else n_ref + i - len(refresh)
            s, e = r.block_cols(bl)
            masked = np.flatnonzero(r.canvas[s:e] == mask)
            at.append((len(index), masked))
            index += list(row * bl + masked)
            keys += [r.key] * len(masked)
            steps += [r.nfe] * len(masked)
            offs += list(masked)
            temps += [r.params.temperature] * len(masked)
        N = pow2_bucket(max(len(index), 1), 8)
        pad = N - len(index)
        sel = Selection(jnp.asarray(np.asarray(index + [0] * pad, np.int32)),
                        jnp.asarray(np.asarray(keys + [np.zeros(2, np.uint32)] * pad, np.uint32).reshape(N, 2)),
                        jnp.asarray(np.asarray(steps + [0] * pad, np.int32)),
                        jnp.asarray(np.asarray(offs + [0] * pad, np.int32)),
                        jnp.asarray(np.asarray(temps + [0.0] * pad, np.float32)))
        greedy = all(r.params.temperature == 0 for r in refresh + reuse)
        sparse_k = 0  # the refresh part's selection width: its largest keep, bucketed, at most the canvas bucket
        if ref_rows is not None and ref_rows.keep is not None:
            sparse_k = min(pow2_bucket(max(max(self._keep(r) for r in refresh), 1), 8), ref_rows.tokens.shape[1])
        out = diffusion_step(self.gdef, self.state, self.pool, ref_rows, reu_rows, sel, self.layer_states,
                             block_size=self.cfg.block_size, block=bl, greedy=greedy,
                             logit_budget=self.cfg.logit_budget, head_rows=self.cfg.head_rows,
                             sparse_k=sparse_k, window=self.cfg.sparse_window)
        self.pool = out.pool
        if out.selection is not None:  # the refresh rows' selections, kept for their block's reuse steps
            pos, ok = (np.asarray(a) for a in out.selection)
            for i, r in enumerate(refresh):
                r.selection = (pos[i], ok[i])
        return (np.asarray(out.tokens), np.asarray(out.confidence), at,
                np.asarray(out.experts_touched).tolist())

    def _apply(self, reqs: list[_Req], tok, conf, where, now: float, outputs) -> None:
        bl = self.cfg.block_length
        for r, (at, masked) in zip(reqs, where):
            s, _ = r.block_cols(bl)
            k = int(r.counts[r.step_in_block])
            if k and len(masked):
                c = conf[at:at + len(masked)]
                pick = np.argsort(-c, kind="stable")[:k]  # ties: the leftmost (select_positions' order)
                r.canvas[s + masked[pick]] = tok[at:at + len(masked)][pick]
            r.step_in_block += 1
            r.nfe += 1
            if r.step_in_block == r.steps_per_block:
                self._block_done(r, now, outputs)

    def _block_done(self, r: _Req, now: float, outputs) -> None:
        bl = self.cfg.block_length
        s, e = r.block_cols(bl)
        new = r.canvas[s:e].tolist()
        stops = set(r.params.stop_token_ids)
        cut = next((i for i, t in enumerate(new) if t in stops), None)
        if cut is not None:
            new = new[:cut + 1]
        r.output += new
        if r.metrics.first_token is None:
            r.metrics.first_token = now
        r.metrics.token_times += [now] * len(new)
        r.block += 1
        r.step_in_block = 0
        last = r.block * bl >= r.params.max_tokens
        if cut is not None or last:
            r.finish_reason = "stop" if cut is not None else "length"
            self._finish(r, new, outputs)
        else:
            self._emit(r, RequestOutput(r.id, new, [], [[] for _ in new], False, None, len(r.prompt)), outputs)

    def _emit(self, r: _Req, out: RequestOutput, outputs) -> None:
        outputs.append(out)
        if r.callback is not None:
            r.callback(out)

    def _finish(self, r: _Req, new: list[int], outputs) -> None:
        if r in self.running:
            self.running.remove(r)
        if r in self.waiting:
            self.waiting.remove(r)
        self.alloc.release(r.blocks)
        r.blocks = []
        self._static_batch.discard(r.id)
        self.entries.pop(r.id, None)
        r.metrics.finish = time.perf_counter()
        self.finished_metrics.append(r.metrics)
        self.prom.on_finish(r.metrics, r.finish_reason)
        self._emit(r, RequestOutput(r.id, new, [], [[] for _ in new], True, r.finish_reason, len(r.prompt)), outputs)

    # ----------------------------------------------------------------------------------------- offline
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams] | None = None,
                 *, steps: int | None = None) -> list[tuple[list[int], str]]:
        """Run prompts to completion; returns ``(tokens, finish_reason)`` per prompt in order."""
        if params is None or isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        ids = [self.add_request(p, sp, steps=steps) for p, sp in zip(prompts, params)]
        done: dict[str, tuple[list[int], str]] = {}
        got: dict[str, list[int]] = {rid: [] for rid in ids}
        while len(done) < len(ids):
            for o in self.step():
                if o.request_id in got:
                    got[o.request_id] += o.new_tokens
                    if o.finished:
                        done[o.request_id] = (got[o.request_id], o.finish_reason)
        return [done[r] for r in ids]
