"""Iteration schedulers: which requests decode, which prompt tokens prefill, through which layers.

Both schedulers share :class:`Scheduler`'s request lifecycle (admission with prefix-cache lookup, block growth,
preemption by recompute when the pool is full, and, once a step ran, :meth:`Scheduler.update_from_output`:
sampled tokens appended, prefill -> running transitions, stop and length checks, finished requests freed, full
blocks registered in the prefix cache) and differ only in how prompts are cut:

* :class:`ChunkedPrefillScheduler` (Sarathi-Serve / vLLM): a token budget per iteration (default 512); decode
  rows take one token each, the rest goes to prompt chunks, every chunk through the whole layer stack.
* :class:`LayeredPrefillScheduler` (Layered Prefill): whole prompts, cut along the *layer* axis instead: the
  stack is split into G contiguous groups and each iteration runs the in-flight prompts through one group
  while every running request decodes through all layers. G adapts to the prompt length (<=512 -> 1,
  <=1024 -> 2, <=2048 -> 4, <=4096 -> 8, else 16; thresholds configurable). Several waiting prompts can
  share one layered batch; G then follows their total (as the paper's scheduler does), which keeps the
  prefill work of one iteration near chunked prefill's token budget.
"""

from __future__ import annotations

import enum
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from moejax.serve.kv_cache import (
    BlockAllocator,
    NoFreeBlocks,
    block_hash,
    prefix_hashes,
)


class Status(enum.Enum):
    WAITING = "waiting"      # not admitted (or preempted): holds no blocks
    PREFILL = "prefill"      # admitted, prompt (plus any recomputed output) partly in the cache
    RUNNING = "running"      # decoding
    FINISHED = "finished"


@dataclass
class Request:
    """One generation request as the scheduler sees it."""

    id: str
    prompt: list[int]
    params: object                     # engine.SamplingParams
    arrival: float
    output: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    blocks: list[int] = field(default_factory=list)
    num_computed: int = 0               # tokens whose K/V are in the cache
    hashes: list[bytes] = field(default_factory=list)  # chained hashes of the full blocks registered so far
    num_preemptions: int = 0
    cached_tokens: int = 0              # prompt tokens served from the prefix cache (last admission)
    finish_reason: str | None = None
    aborted: bool = False
    draft: tuple[int, ...] = ()         # speculative decoding: drafts for the tokens after the last one
    draft_at: int = -1                  # num_tokens when they were drafted (stale once it changes)
    pending: int = 0                    # trailing outputs still on the device (PENDING in ``output``)
    source: int = -1                    # where the last pending token is in the step's device outputs
    closing: bool = False               # reached its length: no further iteration, finishes on resolve

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    @property
    def resolved_tokens(self) -> int:
        """Prompt and output tokens whose values are known on the host."""
        return self.num_tokens - self.pending

    @property
    def last_token(self) -> int:
        return self.output[-1] if self.output else self.prompt[-1]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + len(self.output)

    @property
    def to_prefill(self) -> int:
        """Tokens still to run before this request can sample its next token."""
        return self.num_tokens - self.num_computed


@dataclass
class PrefillChunk:
    request: Request
    start: int     # first position of the chunk
    length: int    # tokens in the chunk
    last: bool     # the chunk (and group) completes the prompt: sample the next token


@dataclass
class Plan:
    """What one iteration runs."""

    decode: list[Request]
    prefill: list[PrefillChunk]
    group: tuple[int, int]          # (lo, hi) layers the prefill rows pass through
    use_hidden: bool = False        # prefill rows start from the previous group's hidden states
    preempted: list[Request] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.decode and not self.prefill


@dataclass(frozen=True)
class SchedulerConfig:
    """Engine scheduling limits.

    Attributes:
      max_num_seqs: running + prefilling requests at once (decode batch bound).
      max_num_batched_tokens: chunked prefill's token budget per iteration (decode tokens count one each).
      max_prefill_seqs: prompts prefilled in one iteration.
      layered_thresholds: upper bounds on a layered batch's prompt tokens (its prompts' total) for
        G = 1, 2, 4, 8; more tokens use 16 groups.
      max_layered_tokens: total prompt tokens one layered prefill batch may hold.
      collapse_when_idle: layered prefill runs a prompt through all layers at once when nothing is decoding
        (no decode to interleave with, and the expert traffic is the same).
      max_layered_padding: a further prompt joins a layered prefill batch only while the batch's padded size
        (power-of-two rows x longest prompt) stays within ``1 + max_layered_padding`` times its real tokens
        (rows are padded to the longest prompt, and padding costs compute in every layer group).
    """

    max_num_seqs: int = 16
    max_num_batched_tokens: int = 512
    max_prefill_seqs: int = 4
    layered_thresholds: tuple[int, ...] = (512, 1024, 2048, 4096)
    max_layered_tokens: int = 4096
    collapse_when_idle: bool = True
    max_layered_padding: float = 0.25

    def validate(self) -> SchedulerConfig:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_prefill_seqs", "max_layered_tokens"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"SchedulerConfig.{name}={v!r} must be a positive integer")
        p = self.max_layered_padding
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p:
            raise ValueError(f"SchedulerConfig.max_layered_padding={p!r} must be a number >= 0")
        t = tuple(self.layered_thresholds)
        if len(t) != 4 or any(b <= a for a, b in itertools.pairwise(t)) or t[0] < 1:
            raise ValueError(f"SchedulerConfig.layered_thresholds={t!r} must be 4 increasing positive lengths "
                             "(upper bounds for 1, 2, 4 and 8 groups)")
        return self


#: the value of an output token sampled by a step whose result is not back yet (asynchronous scheduling)
PENDING = -1


@dataclass
class Slot:
    """An output position :meth:`Scheduler.advance` reserved for a token a step samples: decode row ``row`` of
    iteration ``step`` (``"decode"``) or prefill row ``row`` (``"prefill"``); ``at`` is its index in the
    request's output; ``abort``: no token, the request was aborted in flight."""

    request: Request
    part: str
    row: int
    step: int = 0
    at: int = -1
    abort: bool = False


@dataclass
class Emitted:
    """A token :meth:`Scheduler.update_from_output` appended to a request: from decode row ``row`` (``"decode"``)
    or prefill row ``row`` (``"prefill"``) of iteration ``step`` of the call; ``finish_reason`` set when it ended
    the request (``"stop"`` or ``"length"``)."""

    request: Request
    token: int
    part: str
    row: int
    step: int = 0
    finish_reason: str | None = None
    num_tokens: int = 0      # the request's prompt + output tokens right after this one


class Scheduler:
    """Shared request lifecycle: admission, block growth, preemption, and the state transitions after a step
    (:meth:`update_from_output`). Subclasses implement :meth:`schedule` and :meth:`max_prefill_row`."""

    name = "base"

    def __init__(self, cfg: SchedulerConfig, allocator: BlockAllocator, n_layers: int,
                 max_model_len: int | None = None):
        self.cfg = cfg.validate()
        self.alloc = allocator
        self.bs = allocator.block_size
        self.n_layers = n_layers
        self.max_model_len = max_model_len
        self.waiting: list[Request] = []
        self.prefilling: list[Request] = []
        self.running: list[Request] = []
        self.closing: list[Request] = []    # reached their length; their last tokens are still on the device

    # ----------------------------------------------------------------------------------------- queue
    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def remove(self, req: Request) -> None:
        """Take a request out of every queue and free its blocks (finish or abort)."""
        for q in (self.waiting, self.prefilling, self.running, self.closing):
            if req in q:
                q.remove(req)
        self._free(req)

    def finish(self, req: Request, reason: str) -> None:
        """End a request (``reason``: ``"stop"``, ``"length"`` or ``"abort"``): out of every queue, blocks freed."""
        self.remove(req)
        if req.pending:  # tokens of steps still in flight (aborted meanwhile): never reported
            del req.output[len(req.output) - req.pending:]
            req.pending = 0
        req.status, req.finish_reason = Status.FINISHED, reason

    def abort(self, req: Request) -> bool:
        """Abort a request. True: it is finished now (the caller reports it); False: it is in flight and
        finishes as ``"abort"`` when its step's output comes back (:meth:`update_from_output`)."""
        self.finish(req, "abort")
        return True

    def has_work(self) -> bool:
        return bool(self.waiting or self.prefilling or self.running or self.closing)

    @property
    def num_active(self) -> int:
        return len(self.prefilling) + len(self.running)

    # ----------------------------------------------------------------------------------------- blocks
    def _free(self, req: Request) -> None:
        if req.blocks:
            self.alloc.release(req.blocks)
        req.blocks, req.num_computed, req.hashes = [], 0, []

    def _blocks_needed(self, req: Request, upto: int) -> int:
        return max(0, math.ceil(upto / self.bs) - len(req.blocks))

    def reserve(self, req: Request, upto: int) -> bool:
        """Make sure ``req`` has blocks for positions ``< upto`` (allocating what is missing); False if the pool
        is full (nothing allocated then)."""
        n = self._blocks_needed(req, upto)
        if n == 0:
            return True
        try:
            req.blocks += self.alloc.allocate(n)
        except NoFreeBlocks:
            return False
        return True

    def _admit(self, req: Request) -> bool:
        """Move a waiting request to PREFILL, reusing cached prefix blocks. False if it does not fit, or if it
        was preempted with a token still on the device (it is admitted once that token is back)."""
        if req.pending:
            return False
        toks = req.tokens
        # always leave >= 1 token to compute; no hashing without a prefix cache
        hashes = prefix_hashes(toks[:-1], self.bs) if self.alloc.enable_prefix_cache else []
        hit = self.alloc.lookup(hashes)
        need = math.ceil(len(toks) / self.bs) - len(hit)
        if need > self.alloc.num_free - sum(1 for b in hit if b in self.alloc.evictable):
            return False
        self.alloc.acquire(hit)
        req.blocks = list(hit) + self.alloc.allocate(need)  # the whole prompt's blocks, reserved up front
        req.hashes = hashes[:len(hit)]
        req.num_computed = len(hit) * self.bs
        req.cached_tokens = req.num_computed
        req.status = Status.PREFILL
        return True

    def _preempt(self, victim: Request, plan: Plan) -> None:
        """Recompute preemption: drop the victim's cache; it re-prefills prompt + output when readmitted."""
        for q in (self.running, self.prefilling):
            if victim in q:
                q.remove(victim)
        self._free(victim)
        victim.status = Status.WAITING
        victim.num_preemptions += 1
        self.waiting.insert(0, victim)
        plan.preempted.append(victim)

    def _schedule_decodes(self, plan: Plan) -> None:
        """Every running request decodes one token; preempt the newest ones while the pool is full."""
        i = 0
        while i < len(self.running):
            req = self.running[i]
            if self.reserve(req, req.num_tokens):
                i += 1
                continue
            victim = self.running[-1]
            self._preempt(victim, plan)
            if victim is req:
                continue
        plan.decode = list(self.running)

    def register_full_blocks(self, req: Request) -> None:
        """Add the request's newly completed blocks to the prefix cache (nothing to do without one)."""
        if not self.alloc.enable_prefix_cache:
            return
        full = min(req.num_computed, req.resolved_tokens) // self.bs
        if full <= len(req.hashes):
            return
        toks = req.tokens
        parent = req.hashes[-1] if req.hashes else None
        for i in range(len(req.hashes), full):
            parent = block_hash(parent, toks[i * self.bs:(i + 1) * self.bs])
            req.hashes.append(parent)
            self.alloc.register(req.blocks[i], parent)

    def schedule(self, now: float) -> Plan:  # pragma: no cover - interface
        raise NotImplementedError

    def max_prefill_row(self, rows: int, context: int) -> int:  # pragma: no cover - interface
        """The most prompt tokens one prefill row can hold when ``rows`` rows prefill together, with prompts of
        up to ``context`` tokens (the runner compiles the shapes up to it ahead of time)."""
        raise NotImplementedError

    def update_from_output(self, plan: Plan, dec_tokens: Sequence[Sequence[int]],
                           pf_tokens: Sequence[int]) -> list[Emitted]:
        """Apply an executed plan: ``dec_tokens[i]`` are the tokens decode row ``i`` sampled (one per iteration
        of the call, in order; several with multi-step decoding or speculative steps), ``pf_tokens[i]`` the
        token sampled after prefill row ``i`` (used only for a chunk that completes its prompt):
        :meth:`advance` then :meth:`resolve`.

        Returns every appended token in order (iteration-major, decode rows before prefill rows) and the
        in-flight aborts, as :class:`Emitted` (an abort has ``token=-1``)."""
        return self.resolve(self.advance(plan, [len(t) for t in dec_tokens[:len(plan.decode)]]), dec_tokens,
                            pf_tokens)

    def advance(self, plan: Plan, dec_counts: Sequence[int]) -> list[Slot]:
        """The state transitions of a plan that need no sampled value, made when its step is launched; the
        tokens come later (:meth:`resolve`). Decode row ``i`` reserves ``dec_counts[i]`` output positions (fewer
        if the request reaches its length first: it then closes, leaving the running queue, and finishes on
        resolve); prefill rows advance the cached-token count once they passed the last layer, and a completed
        prompt moves to running and reserves its first token, or, aborted in flight, finishes as ``"abort"``.
        The positions hold :data:`PENDING` until resolved, and the next plan may already include the request
        (its last token is then read on the device). Returns the reserved positions in order (iteration-major,
        decode rows before prefill rows)."""
        slots: list[Slot] = []
        for j in range(max(dec_counts, default=0)):
            for i, req in enumerate(plan.decode):
                if req.status == Status.FINISHED or req.closing or j >= dec_counts[i]:
                    continue
                req.num_computed = req.num_tokens
                slots.append(self._reserve_output(req, "decode", i, j))
        L = self.n_layers
        for i, c in enumerate(plan.prefill):
            req = c.request
            if plan.group[1] == L:
                req.num_computed = c.start + c.length
            if not c.last:
                continue
            if req.aborted:
                self.finish(req, "abort")
                slots.append(Slot(req, "prefill", i, abort=True))
                continue
            self.prefilling.remove(req)
            self.running.append(req)
            req.status = Status.RUNNING
            slots.append(self._reserve_output(req, "prefill", i, 0))
        self.on_step_done(plan)
        return slots

    def _reserve_output(self, req: Request, part: str, row: int, step: int) -> Slot:
        req.output.append(PENDING)
        req.pending += 1
        if len(req.output) >= req.params.max_tokens or (
                self.max_model_len is not None and req.num_tokens >= self.max_model_len):
            req.closing = True
            if req in self.running:
                self.running.remove(req)
                self.closing.append(req)
        return Slot(req, part, row, step, len(req.output) - 1)

    def resolve(self, slots: Sequence[Slot], dec_tokens: Sequence[Sequence[int]],
                pf_tokens: Sequence[int]) -> list[Emitted]:
        """Fill the positions :meth:`advance` reserved with the sampled tokens, in order. A token that is a stop
        id finishes its request (its later positions, already handed to a following step, are dropped: that
        step's token for it is discarded); the last position of a closing request finishes it as
        ``"length"``; a request finished meanwhile (aborted) is skipped. Then full blocks of known tokens are
        registered in the prefix cache. Returns the tokens and in-flight aborts as :class:`Emitted`."""
        out: list[Emitted] = []
        for s in slots:
            req = s.request
            if s.abort:
                out.append(Emitted(req, -1, "prefill", s.row, 0, "abort"))
                continue
            if req.status == Status.FINISHED:
                continue
            tok = int(dec_tokens[s.row][s.step]) if s.part == "decode" else int(pf_tokens[s.row])
            req.output[s.at] = tok
            req.pending -= 1
            reason = None
            if tok in req.params.stop_token_ids:
                reason = "stop"
                del req.output[s.at + 1:]
                req.pending = 0
            elif req.closing and s.at == len(req.output) - 1:
                reason = "length"
            if reason is not None:
                self.finish(req, reason)
            out.append(Emitted(req, tok, s.part, s.row, s.step, reason, len(req.prompt) + s.at + 1))
        for req in list(self.running) + list(self.prefilling):
            self.register_full_blocks(req)
        return out

    def on_step_done(self, plan: Plan) -> None:
        """Called after the step ran: state transitions that depend on the plan."""


class ChunkedPrefillScheduler(Scheduler):
    """Sarathi-style chunked prefill with a per-iteration token budget."""

    name = "chunked"

    def schedule(self, now: float) -> Plan:
        plan = Plan([], [], (0, self.n_layers))
        self._schedule_decodes(plan)
        budget = self.cfg.max_num_batched_tokens - len(plan.decode)
        # continue partly prefilled prompts first (FIFO), then admit new ones
        candidates = list(self.prefilling)
        while self.waiting and self.num_active < self.cfg.max_num_seqs and budget > 0:
            req = self.waiting[0]
            if not self._admit(req):
                break
            self.waiting.pop(0)
            self.prefilling.append(req)
            candidates.append(req)
        for req in candidates:
            if budget <= 0 or len(plan.prefill) >= self.cfg.max_prefill_seqs:
                break
            n = min(req.to_prefill, budget)
            if not self.reserve(req, req.num_computed + n):
                break
            plan.prefill.append(PrefillChunk(req, req.num_computed, n, req.num_computed + n == req.num_tokens))
            budget -= n
        return plan

    def max_prefill_row(self, rows: int, context: int) -> int:
        """A chunk holds at most the token budget."""
        return min(context, self.cfg.max_num_batched_tokens)


class LayeredPrefillScheduler(Scheduler):
    """Layered prefill: one layer group of the in-flight prompts per iteration, decode through all layers."""

    name = "layered"

    def __init__(self, cfg: SchedulerConfig, allocator: BlockAllocator, n_layers: int,
                 max_model_len: int | None = None):
        super().__init__(cfg, allocator, n_layers, max_model_len)
        self.batch: list[Request] = []      # prompts in flight through the layer groups
        self.bounds: list[tuple[int, int]] = []
        self.group_index = 0

    def _padding_ok(self, reqs: list[Request]) -> bool:
        rows = 1 << (len(reqs) - 1).bit_length()
        real = sum(r.to_prefill for r in reqs)
        return rows * max(r.to_prefill for r in reqs) <= (1 + self.cfg.max_layered_padding) * real

    def num_groups(self, prompt_len: int) -> int:
        """Adaptive G from the prompt tokens of a layered batch (capped at the number of layers)."""
        g = 16
        for limit, groups in zip(self.cfg.layered_thresholds, (1, 2, 4, 8)):
            if prompt_len <= limit:
                g = groups
                break
        return min(g, self.n_layers)

    def group_bounds(self, g: int) -> list[tuple[int, int]]:
        """G contiguous groups of layers, sizes differing by at most one."""
        edges = [round(i * self.n_layers / g) for i in range(g + 1)]
        return [(a, b) for a, b in itertools.pairwise(edges)]

    def schedule(self, now: float) -> Plan:
        plan = Plan([], [], (0, self.n_layers))
        self._schedule_decodes(plan)
        if self.batch and any(r.status != Status.PREFILL for r in self.batch):
            self.batch = [r for r in self.batch if r.status == Status.PREFILL]  # preempted mid-flight
            if self.batch and self.group_index > 0:  # their hidden states are gone: restart the batch
                for r in list(self.batch):
                    self._preempt(r, plan)
                self.batch = []
        if not self.batch:
            tokens = 0
            while (self.waiting and self.num_active < self.cfg.max_num_seqs
                   and len(self.batch) < self.cfg.max_prefill_seqs):
                req = self.waiting[0]
                if self.batch and tokens + req.num_tokens > self.cfg.max_layered_tokens:
                    break
                if self.batch and not self._padding_ok(self.batch + [req]):
                    break
                if not self._admit(req):
                    break
                self.waiting.pop(0)
                self.prefilling.append(req)
                self.batch.append(req)
                tokens += req.to_prefill
            if not self.batch:
                return plan
            total = sum(r.to_prefill for r in self.batch)
            g = 1 if (self.cfg.collapse_when_idle and not plan.decode) else self.num_groups(total)
            self.bounds, self.group_index = self.group_bounds(g), 0
        lo, hi = self.bounds[self.group_index]
        last = self.group_index == len(self.bounds) - 1
        plan.group = (lo, hi)
        plan.use_hidden = self.group_index > 0
        plan.prefill = [PrefillChunk(r, r.num_computed, r.to_prefill, last) for r in self.batch]
        return plan

    def max_prefill_row(self, rows: int, context: int) -> int:
        """A whole prompt alone; several rows only within the padding bound (rows x the longest <=
        ``(1 + max_layered_padding)`` x their tokens, at most ``max_layered_tokens``)."""
        if rows == 1:
            return context
        return min(context, int((1 + self.cfg.max_layered_padding) * self.cfg.max_layered_tokens / rows))

    def abort(self, req: Request) -> bool:
        """A prompt in flight through the layer groups is dropped when it lands (its rows are in the batch)."""
        if req in self.batch:
            req.aborted = True
            return False
        return super().abort(req)

    def on_step_done(self, plan: Plan) -> None:
        if plan.prefill:
            self.group_index += 1
            if self.group_index == len(self.bounds):
                self.batch, self.bounds, self.group_index = [], [], 0


SCHEDULERS = {"chunked": ChunkedPrefillScheduler, "layered": LayeredPrefillScheduler}


def make_scheduler(name: str, cfg: SchedulerConfig, allocator: BlockAllocator, n_layers: int,
                   max_model_len: int | None = None) -> Scheduler:
    """The scheduler registered as ``name`` in :data:`SCHEDULERS`."""
    if name not in SCHEDULERS:
        raise ValueError(f"scheduler={name!r}; allowed: {sorted(SCHEDULERS)}")
    return SCHEDULERS[name](cfg, allocator, n_layers, max_model_len)

