"""FSMoE's performance model and solvers (arXiv 2501.10714): pipeline degrees and gradient partitioning.

Everything here is **modelled** from alpha-beta fits (:mod:`moejax.schedule.profile`), never measured.

Pipelined MoE layer (one pass, per device). The layer's tokens are split into ``r`` chunks; chunk ``i`` runs
dispatch all-to-all ``D_i`` (network) -> expert GEMMs ``E_i`` (compute) -> combine all-to-all ``C_i`` (network).
Dispatch and combine share one network link and run in issue order ``D_1..D_r, C_1..C_r`` (all dispatches are
ready first), experts in order ``E_1..E_r``. With per-chunk times ``a(r) = alpha_a2a + beta_a2a * B / r`` and
``e(r) = alpha_gemm + beta_gemm * F / r`` the makespan of that schedule is exactly::

    T(r) = max( 2 r a(r) + g ,  2 a(r) + r e(r) )
              network-bound      compute-bound (fill + all experts + drain)

where ``g`` is gradient all-reduce time forced onto the same link during the layer (FSMoE's ``gar``; 0 in the
forward). These are the dominated-resource cases of FSMoE's model (its ``optim.py`` ``f1``/``f3`` and ``f2``
without the intra-node all-gather/reduce-scatter terms of expert-sharding parallelism, which moejax does not
use). The backward runs two GEMMs per chunk (data and weight gradients: ``2 e(r)``, twice the forward FLOPs).
``T`` is a maximum of functions convex in ``r``, hence convex: the best power of two is one of the two
neighbours of the continuous optimum, which :func:`solve_degree` finds with SLSQP per case (the case's
function minimized subject to dominating the other case), as FSMoE does.

Gradient partitioning. In backward-production order, step ``k`` (one layer's backward) lasts ``c_k`` and
leaves the gradient link free for ``w_k`` seconds; its ``s_k`` gradient bytes are ready at its end. A bucket
(consecutive steps) is one all-reduce of ``alpha + beta * bytes`` issued when its last step ends; buckets are
reduced in order in the free link time (low priority, so the backward is not delayed). The step ends
``tail`` seconds after the backward, where ``tail`` is the reduction work left. Merging buckets saves
``alpha``; splitting starts reductions earlier. :func:`partition_gradients` offers FSMoE's greedy + local
search, an exact dynamic program (the left-over work is monotone in the backlog, so the minimal backlog per
prefix is optimal) and :func:`brute_force_partition` for checking.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from moejax.schedule.profile import Profile

DEFAULT_CANDIDATES = (1, 2, 4, 8)
PARTITION_METHODS = ("dp", "greedy", "greedy+search")


@dataclass(frozen=True)
class AlphaBeta:
    """``t(n) = alpha + beta * n`` seconds (``t(n) = 0`` for ``n <= 0``: no call is made)."""

    alpha: float
    beta: float

    def __call__(self, n: float) -> float:
        return 0.0 if n <= 0 else self.alpha + self.beta * n

    def __add__(self, other: AlphaBeta) -> AlphaBeta:
        return AlphaBeta(self.alpha + other.alpha, self.beta + other.beta)

    @classmethod
    def of(cls, profile: Profile, op: str) -> AlphaBeta:
        f = profile.fit(op)
        return cls(f.alpha_s, f.beta_s_per_unit)


@dataclass(frozen=True)
class MoELayerTerms:
    """Inputs of the per-layer model (per device).

    Attributes:
      a2a: time model of one all-to-all of ``n`` bytes (both levels summed for a 2-level all-to-all).
      a2a_bytes: bytes one device sends in the dispatch all-to-all (the combine sends as many).
      gemm: time model of one expert GEMM call of ``n`` FLOPs.
      gemm_flops: forward expert FLOPs of the layer on one device (the backward does twice as many).
      link: the part of ``a2a`` that occupies the link the gradient all-reduce uses (``None``: all of it).
    """

    a2a: AlphaBeta
    a2a_bytes: float
    gemm: AlphaBeta
    gemm_flops: float
    link: AlphaBeta | None = None

    def chunk_a2a(self, r: float) -> float:
        return self.a2a.alpha + self.a2a.beta * self.a2a_bytes / r

    def chunk_gemm(self, r: float, backward: bool = False) -> float:
        e = self.gemm.alpha + self.gemm.beta * self.gemm_flops / r
        return 2.0 * e if backward else e

    def link_busy(self, r: float) -> float:
        """Seconds the gradient link is busy with this layer's all-to-alls at degree ``r``."""
        ab = self.link or self.a2a
        return 2.0 * r * (ab.alpha + ab.beta * self.a2a_bytes / r)


def _case_fns(t: MoELayerTerms, backward: bool, grad_s: float):
    aa, ab, b = t.a2a.alpha, t.a2a.beta, t.a2a_bytes
    m = 2.0 if backward else 1.0
    ea, eb, f = m * t.gemm.alpha, m * t.gemm.beta, t.gemm_flops

    def network(r):
        return 2.0 * r * aa + 2.0 * ab * b + grad_s

    def compute(r):
        return 2.0 * aa + 2.0 * ab * b / r + r * ea + eb * f

    return {"network": network, "compute": compute}


def layer_time(terms: MoELayerTerms, r: float, *, backward: bool = False, grad_s: float = 0.0) -> float:
    """Modelled seconds of one MoE layer's dispatch -> experts -> combine at pipeline degree ``r``.

    ``grad_s``: gradient all-reduce seconds forced onto the all-to-all link during the layer.
    """
    if r < 1:
        raise ValueError(f"r: pipeline degree must be >= 1, got {r}")
    return max(fn(r) for fn in _case_fns(terms, backward, grad_s).values())


def layer_case(terms: MoELayerTerms, r: float, *, backward: bool = False, grad_s: float = 0.0) -> str:
    """Which resource dominates at degree ``r``: ``"network"`` or ``"compute"``."""
    v = {k: fn(r) for k, fn in _case_fns(terms, backward, grad_s).items()}
    return max(v, key=v.get)


@dataclass(frozen=True)
class DegreeChoice:
    """The solved pipeline degree of one layer pass (modelled).

    Attributes:
      degree: the chosen degree (a member of the candidate set).
      time_s: modelled layer time at ``degree``.
      r_continuous: the continuous optimum (SLSQP) in ``[min(candidates), max(candidates)]``.
      time_continuous_s: modelled time at ``r_continuous`` (a lower bound on ``time_s``).
      case: dominating resource at ``r_continuous`` (``network`` or ``compute``).
      evaluated: ``{degree: time_s}`` of the neighbouring candidates that were evaluated.
    """

    degree: int
    time_s: float
    r_continuous: float
    time_continuous_s: float
    case: str
    evaluated: Mapping[int, float]


def _check_candidates(candidates: Sequence[int]) -> tuple[int, ...]:
    c = tuple(sorted(set(candidates)))
    if not c or any(not isinstance(x, (int, np.integer)) or isinstance(x, bool) or x < 1 for x in c):
        raise ValueError(f"candidates: must be a non-empty set of ints >= 1, got {tuple(candidates)!r}")
    return tuple(int(x) for x in c)


def continuous_optimum(terms: MoELayerTerms, *, backward: bool = False, grad_s: float = 0.0,
                       r_min: float = 1.0, r_max: float = 8.0) -> tuple[float, float, str]:
    """Continuous minimizer of :func:`layer_time` over ``[r_min, r_max]`` by SLSQP, one problem per case.

    For each case (``network``, ``compute``) minimize its function subject to it being the larger one (so on
    that region it equals the max); the best feasible case wins. Returns ``(r, time_s, case)``.
    """
    from scipy.optimize import minimize

    fns = _case_fns(terms, backward, grad_s)
    best = None
    for name, fn in fns.items():
        others = [g for k, g in fns.items() if k != name]
        cons = [{"type": "ineq", "fun": (lambda x, g=g, fn=fn: fn(x[0]) - g(x[0]))} for g in others]
        for x0 in {r_min, math.sqrt(r_min * r_max), r_max}:
            res = minimize(lambda x, fn=fn: fn(x[0]), np.array([x0]), method="SLSQP",
                           bounds=[(r_min, r_max)], constraints=cons, options={"ftol": 1e-12, "maxiter": 200})
            r = float(np.clip(res.x[0], r_min, r_max))
            if all(fn(r) - g(r) >= -1e-9 * max(1.0, abs(fn(r))) for g in others):
                val = layer_time(terms, r, backward=backward, grad_s=grad_s)
                if best is None or val < best[1] - 1e-15:
                    best = (r, val, name)
    if best is None:  # SLSQP failed on every case: fall back to a bounded scalar search of the (convex) max
        from scipy.optimize import minimize_scalar

        res = minimize_scalar(lambda r: layer_time(terms, r, backward=backward, grad_s=grad_s),
                              bounds=(r_min, r_max), method="bounded")
        r = float(res.x)
        best = (r, layer_time(terms, r, backward=backward, grad_s=grad_s),
                layer_case(terms, r, backward=backward, grad_s=grad_s))
    return best


def solve_degree(terms: MoELayerTerms, *, backward: bool = False, grad_s: float = 0.0,
                 candidates: Sequence[int] = DEFAULT_CANDIDATES) -> DegreeChoice:
    """FSMoE's solver: continuous optimum (SLSQP), then the neighbouring candidates below and above it are
    evaluated with the model and the better one returned (ties go to the smaller degree)."""
    c = _check_candidates(candidates)
    r, tc, case = continuous_optimum(terms, backward=backward, grad_s=grad_s, r_min=c[0], r_max=c[-1])
    lo = max(x for x in c if x <= r + 1e-9)
    hi = min(x for x in c if x >= r - 1e-9)
    evaluated = {d: layer_time(terms, d, backward=backward, grad_s=grad_s) for d in sorted({lo, hi})}
    deg = min(evaluated, key=lambda d: (evaluated[d], d))
    return DegreeChoice(deg, evaluated[deg], r, tc, case, evaluated)


def exhaustive_degree(terms: MoELayerTerms, *, backward: bool = False, grad_s: float = 0.0,
                      candidates: Sequence[int] = DEFAULT_CANDIDATES) -> tuple[int, float]:
    """Brute force over the candidate degrees: ``(best degree, its modelled time)``; ties to the smaller."""
    c = _check_candidates(candidates)
    times = {d: layer_time(terms, d, backward=backward, grad_s=grad_s) for d in c}
    d = min(times, key=lambda x: (times[x], x))
    return d, times[d]


# --- gradient partitioning -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class GradientPartition:
    """Gradient buckets over backward steps (modelled).

    Attributes:
      buckets: tuples of backward-step indices (0 = first step of the backward), consecutive and covering all.
      tail_s: reduction seconds left when the backward ends (the step's exposed gradient communication).
      comm_s: total all-reduce seconds of all buckets.
      method: ``dp``, ``greedy``, ``greedy+search`` or ``brute_force``.
    """

    buckets: tuple[tuple[int, ...], ...]
    tail_s: float
    comm_s: float
    method: str


def _validate_partition_inputs(windows_s, grad_bytes):
    w = [float(x) for x in windows_s]
    s = [float(x) for x in grad_bytes]
    if len(w) != len(s) or not w:
        raise ValueError(f"windows_s/grad_bytes: must be non-empty and of equal length, got {len(w)}, {len(s)}")
    for name, v in (("windows_s", w), ("grad_bytes", s)):
        if any(not math.isfinite(x) or x < 0 for x in v):
            raise ValueError(f"{name}: every entry must be finite and >= 0")
    return w, s


def bucket_tail(ends: Sequence[int], windows_s: Sequence[float], grad_bytes: Sequence[float],
                all_reduce: AlphaBeta) -> float:
    """Left-over reduction seconds after the backward for buckets ending at steps ``ends`` (sorted; the last
    must be the last step)."""
    backlog, start = 0.0, 0
    ends = list(ends)
    for k, w in enumerate(windows_s):
        backlog = max(0.0, backlog - w) if k > 0 else backlog
        if ends and ends[0] == k:
            backlog += all_reduce(sum(grad_bytes[start:k + 1]))
            start = k + 1
            ends.pop(0)
    return backlog


def _make(ends, w, s, ar, method) -> GradientPartition:
    ends = sorted(set(ends))
    buckets, start = [], 0
    for e in ends:
        buckets.append(tuple(range(start, e + 1)))
        start = e + 1
    comm = sum(ar(sum(s[b[0]:b[-1] + 1])) for b in buckets)
    return GradientPartition(tuple(buckets), bucket_tail(ends, w, s, ar), comm, method)


def _greedy_ends(w, s, ar) -> list[int]:
    """Close the open bucket when the link would otherwise idle during the next step (MG-WFBP-like rule:
    merging is free while the link is still busy with earlier buckets)."""
    n = len(w)
    ends, backlog, start = [], 0.0, 0
    for k in range(n):
        if k > 0:
            backlog = max(0.0, backlog - w[k])
        if k == n - 1:
            ends.append(k)
            break
        if backlog <= w[k + 1]:
            ends.append(k)
            backlog += ar(sum(s[start:k + 1]))
            start = k + 1
    return ends


def _dp_ends(w, s, ar) -> list[int]:
    """Exact O(n^2) dynamic program: ``best[j]`` = least backlog after issuing a bucket that ends at step ``j``.
    The left-over work is non-decreasing in the backlog, so keeping the least backlog per prefix is optimal."""
    n = len(w)
    prefix = np.concatenate([[0.0], np.cumsum(s)])
    best = [math.inf] * n
    arg = [-1] * n
    for i in range(n):                 # bucket = steps i..j; best[i-1] is final here
        b = 0.0 if i == 0 else best[i - 1]
        for j in range(i, n):
            if j > 0:
                b = max(0.0, b - w[j])  # earlier backlog drains during step j
            v = b + ar(prefix[j + 1] - prefix[i])
            if v < best[j] - 1e-15:
                best[j], arg[j] = v, i
    ends, j = [], n - 1
    while j >= 0:
        ends.append(j)
        j = arg[j] - 1
    return sorted(ends)


def _search_ends(ends, w, s, ar) -> list[int]:
    """Local search from ``ends``: toggle one split point at a time, take the best improvement, repeat."""
    n = len(w)
    cur = set(ends)
    cur_v = bucket_tail(sorted(cur), w, s, ar)
    while True:
        best_v, best_set = cur_v, None
        for k in range(n - 1):
            cand = cur ^ {k}
            v = bucket_tail(sorted(cand), w, s, ar)
            if v < best_v - 1e-15:
                best_v, best_set = v, cand
        if best_set is None:
            return sorted(cur)
        cur, cur_v = best_set, best_v


def partition_gradients(windows_s: Sequence[float], grad_bytes: Sequence[float], all_reduce: AlphaBeta, *,
                        method: str = "dp") -> GradientPartition:
    """Choose gradient buckets over backward steps (see module docstring for the model).

    Args:
      windows_s: per backward step, seconds the gradient link is free (backward-production order).
      grad_bytes: per backward step, gradient bytes ready at its end.
      all_reduce: time model of one all-reduce of ``n`` bytes.
      method: ``dp`` (exact), ``greedy`` (FSMoE-style: keep merging while the link is busy), ``greedy+search``
        (greedy, then local search toggling split points).
    """
    if method not in PARTITION_METHODS:
        raise ValueError(f"method: must be one of {PARTITION_METHODS}, got {method!r}")
    w, s = _validate_partition_inputs(windows_s, grad_bytes)
    if method == "dp":
        ends = _dp_ends(w, s, all_reduce)
    else:
        ends = _greedy_ends(w, s, all_reduce)
        if method == "greedy+search":
            ends = _search_ends(ends, w, s, all_reduce)
    return _make(ends, w, s, all_reduce, method)


def brute_force_partition(windows_s: Sequence[float], grad_bytes: Sequence[float],
                          all_reduce: AlphaBeta) -> GradientPartition:
    """Reference: every one of the ``2^(n-1)`` partitions (for small ``n`` only)."""
    w, s = _validate_partition_inputs(windows_s, grad_bytes)
    n = len(w)
    if n > 16:
        raise ValueError(f"windows_s: brute force is for <= 16 steps, got {n}")
    best = None
    for mask in itertools.product((0, 1), repeat=n - 1):
        ends = [k for k in range(n - 1) if mask[k]] + [n - 1]
        v = bucket_tail(ends, w, s, all_reduce)
        if best is None or v < best[0] - 1e-15:
            best = (v, ends)
    return _make(best[1], w, s, all_reduce, "brute_force")


# --- model workloads ------------------------------------------------------------------------------------------
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class LayerWork:
    """Per-device work of one transformer layer in one training step (modelled from the config).

    Attributes:
      index: layer index in the model.
      kind: ``"moe"`` or ``"dense"``.
      a2a_bytes: bytes one device sends in the dispatch all-to-all (= combine); 0 for dense layers.
      gemm_flops: forward routed-expert FLOPs on one device (SwiGLU: 3 matmuls); 0 for dense layers.
      other_flops: forward FLOPs of everything else in the layer (attention projections and scores, router,
        shared experts, dense FFN).
      grad_bytes: gradient bytes this layer contributes to the data-parallel reduction.
    """

    index: int
    kind: str
    a2a_bytes: float
    gemm_flops: float
    other_flops: float
    grad_bytes: float


def routed_rows(cfg, tokens: int) -> float:
    """Rows one device sends to the experts per MoE layer (balanced routing; capacity buffers padded)."""
    moe = cfg.moe
    e = moe.num_experts
    cf = moe.capacity_factor
    if moe.router.type == "expert_choice":
        cap = math.ceil((abs(cf) if cf != 0 else 1.0) * tokens / e)
        return float(e * cap)
    k = moe.router.effective_top_k
    if moe.dispatch == "dropless":
        return float(tokens * k)
    if cf == 0:
        return float(e * tokens)
    return float(e * math.ceil(abs(cf) * tokens * k / e))


def layer_workloads(cfg, tokens_per_device: int, *, expert_parallel: int, n_devices: int,
                    seq_len: int | None = None, include_embeddings: bool = True) -> tuple[LayerWork, ...]:
    """Per-layer work of ``cfg`` (a moejax ``ModelConfig``) with ``tokens_per_device`` tokens on each device.

    Experts are sharded ``expert_parallel`` ways; non-expert parameters are replicated over all ``n_devices``
    (their gradients are all-reduced over all devices), expert parameters over ``n_devices / expert_parallel``.
    """
    if cfg.moe is None:
        raise ValueError("model_cfg.moe: the model has no MoE layers (moe=None); nothing to schedule")
    if not (isinstance(tokens_per_device, int) and tokens_per_device >= 1):
        raise ValueError(f"tokens_per_device: must be an int >= 1, got {tokens_per_device!r}")
    if expert_parallel < 1 or n_devices % expert_parallel or cfg.moe.num_experts % expert_parallel:
        raise ValueError(f"expert_parallel: {expert_parallel} must divide n_devices ({n_devices}) and "
                         f"num_experts ({cfg.moe.num_experts})")
    t = tokens_per_device
    d = cfg.d_model
    hd = cfg.resolved_head_dim
    h, kv = cfg.n_heads, cfg.n_kv_heads
    s_ctx = min(seq_len or min(cfg.max_seq_len, t), cfg.max_seq_len)
    act = _DTYPE_BYTES.get(cfg.dtype, 4)
    pb = _DTYPE_BYTES.get(cfg.param_dtype, 4)
    moe = cfg.moe
    e_local = moe.num_experts // expert_parallel
    dp_dense = n_devices > 1
    dp_expert = n_devices // expert_parallel > 1
    attn_flops = 2.0 * t * d * hd * (2 * h + 2 * kv) + 2.0 * t * s_ctx * h * hd  # projections + causal scores
    attn_params = d * hd * (2 * h + 2 * kv) + 2 * d
    shared_ff = moe.num_shared_experts * (moe.shared_d_ff or moe.d_ff)
    out = []
    kinds = cfg.layer_kinds()
    for i, kind in enumerate(kinds):
        if kind == "moe":
            rows = routed_rows(cfg, t)
            a2a = rows * d * act
            gemm = 6.0 * rows * d * moe.d_ff
            other = attn_flops + 2.0 * t * d * moe.num_experts + 6.0 * t * d * shared_ff
            dense_p = attn_params + d * moe.num_experts + 3 * d * shared_ff + (d if moe.shared_expert_gate else 0)
            expert_p = 3 * d * moe.d_ff * e_local
        else:
            a2a, gemm = 0.0, 0.0
            other = attn_flops + 6.0 * t * d * cfg.d_ff
            dense_p, expert_p = attn_params + 3 * d * cfg.d_ff, 0
        if include_embeddings and i == 0:
            dense_p += cfg.vocab_size * d
        if include_embeddings and i == len(kinds) - 1:
            other += 2.0 * t * d * cfg.vocab_size
            dense_p += d + (0 if cfg.tie_embeddings else cfg.vocab_size * d)
        grad = pb * (dense_p * dp_dense + expert_p * dp_expert)
        out.append(LayerWork(i, kind, float(a2a), float(gemm), float(other), float(grad)))
    return tuple(out)


@dataclass(frozen=True)
class ClusterTerms:
    """Alpha-beta terms for a cluster derived from a :class:`Profile` (modelled).

    Attributes:
      a2a: one all-to-all (2-level: intra + inter summed) of the expert-parallel group.
      a2a_intra / a2a_inter: the two levels (``a2a_inter`` is ``None`` on one node).
      all_reduce: one gradient all-reduce (2-level: intra reduce-scatter + inter all-reduce of 1/G + intra
        all-gather, charged to the inter-node link).
      gemm: one GEMM call.
      two_level: whether the expert-parallel group spans nodes.
      nodes: nodes of the cluster; with ``nodes > 1`` the gradient all-reduce uses the inter-node link.
    """

    a2a: AlphaBeta
    a2a_intra: AlphaBeta
    a2a_inter: AlphaBeta | None
    all_reduce: AlphaBeta
    gemm: AlphaBeta
    two_level: bool
    nodes: int = 1

    @property
    def grad_link(self) -> str:
        """Simulator resource of the gradient all-reduce: ``net_inter`` on several nodes, else ``net_intra``."""
        return "net_inter" if self.nodes > 1 else "net_intra"

    @classmethod
    def from_profile(cls, profile: Profile, expert_parallel: int | None = None) -> ClusterTerms:
        profile.validate()
        ep = profile.n_devices if expert_parallel is None else expert_parallel
        g = profile.devices_per_node
        intra = AlphaBeta.of(profile, "all_to_all")
        two = profile.nodes > 1 and ep > g
        inter = AlphaBeta.of(profile, "all_to_all_inter") if two else None
        if profile.nodes > 1:
            rs, ag = AlphaBeta.of(profile, "reduce_scatter"), AlphaBeta.of(profile, "all_gather")
            ari = AlphaBeta.of(profile, "all_reduce_inter")
            ar = AlphaBeta(rs.alpha + ari.alpha + ag.alpha, rs.beta + ari.beta / g + ag.beta)
        else:
            ar = AlphaBeta.of(profile, "all_reduce")
        return cls(intra + inter if two else intra, intra, inter, ar, AlphaBeta.of(profile, "gemm"), two,
                   profile.nodes)

    def moe_terms(self, work: LayerWork) -> MoELayerTerms:
        if self.two_level:
            link = self.a2a_inter
        else:  # one node: a2a and gradients share the link; several nodes, EP inside a node: they do not
            link = self.a2a if self.nodes == 1 else AlphaBeta(0.0, 0.0)
        return MoELayerTerms(self.a2a, work.a2a_bytes, self.gemm, work.gemm_flops, link=link)

    def other_time(self, work: LayerWork, backward: bool = False) -> float:
        t = self.gemm(work.other_flops)
        return 2.0 * t if backward else t


# --- plan -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SchedulePlan:
    """FSMoE schedule of one training step (all times **modelled** from the profile).

    Attributes:
      moe_layers: model indices of the MoE layers.
      fwd_degrees / bwd_degrees: pipeline degree per MoE layer (aligned with ``moe_layers``).
      buckets: gradient buckets as tuples of model layer indices, in backward production order.
      layer_fwd_s / layer_bwd_s: modelled seconds per model layer (forward; backward incl. its MoE part).
      fwd_s, bwd_s: modelled forward / backward seconds; grad_tail_s: exposed gradient reduction after the
        backward; step_s = fwd_s + bwd_s + grad_tail_s.
      no_overlap_step_s: modelled step with degree 1 everywhere and one all-reduce after the backward.
      tokens_per_device, expert_parallel, n_devices: the workload the plan is for.
      profile_source: ``measured`` or ``published`` (the profile's source).
      notes: how it was obtained.
    """

    moe_layers: tuple[int, ...]
    fwd_degrees: tuple[int, ...]
    bwd_degrees: tuple[int, ...]
    buckets: tuple[tuple[int, ...], ...]
    layer_fwd_s: tuple[float, ...]
    layer_bwd_s: tuple[float, ...]
    fwd_s: float
    bwd_s: float
    grad_tail_s: float
    step_s: float
    no_overlap_step_s: float
    tokens_per_device: int
    expert_parallel: int
    n_devices: int
    profile_source: str
    notes: str = "modelled (FSMoE alpha-beta cost model), not measured"

    def degrees(self) -> dict[int, tuple[int, int]]:
        """``{moe layer index: (forward degree, backward degree)}``."""
        return {i: (f, b) for i, f, b in zip(self.moe_layers, self.fwd_degrees, self.bwd_degrees)}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _mesh_sizes(mesh) -> dict[str, int]:
    if hasattr(mesh, "shape") and isinstance(mesh.shape, Mapping):
        return {str(k): int(v) for k, v in mesh.shape.items()}
    if isinstance(mesh, Mapping):
        return {str(k): int(v) for k, v in mesh.items()}
    if isinstance(mesh, int):
        return {"expert": int(mesh)}
    raise ValueError(f"mesh: must be a jax Mesh, a mapping axis -> size, or an int (expert-parallel devices), "
                     f"got {type(mesh).__name__}")


def backward_steps(works: Sequence[LayerWork], ct: ClusterTerms, bwd_degrees: Mapping[int, int]):
    """Per backward step (layers in reverse): ``(layer index, compute seconds, free-link seconds, grad bytes)``."""
    steps = []
    for wk in reversed(works):
        other = ct.other_time(wk, backward=True)
        c, w = other, other
        if wk.kind == "moe":
            terms = ct.moe_terms(wk)
            r = bwd_degrees[wk.index]
            tm = layer_time(terms, r, backward=True)
            c += tm
            w += max(0.0, tm - terms.link_busy(r))
        steps.append((wk.index, c, w, wk.grad_bytes))
    return steps


def plan(model_cfg, mesh, profile: Profile, tokens_per_device: int, *,
         candidates: Sequence[int] = DEFAULT_CANDIDATES, seq_len: int | None = None,
         partition_method: str = "dp", include_embeddings: bool = True, refine: bool = True) -> SchedulePlan:
    """FSMoE plan for ``model_cfg`` (a moejax ``ModelConfig``) on ``mesh`` with ``profile``.

    Args:
      mesh: a ``jax.sharding.Mesh``, a mapping of axis sizes (e.g. ``{"data": 2, "expert": 4}``) or an int
        (expert-parallel devices). Experts are sharded over the ``expert`` axis (all devices if absent).
      profile: alpha-beta fits (measured, or published for hardware we lack).
      tokens_per_device: tokens each device holds per step (batch * seq_len / devices).
      candidates: allowed pipeline degrees.
      partition_method: gradient bucketing method (``dp``, ``greedy``, ``greedy+search``).
      refine: after bucketing, coordinate search over each layer's backward degree with the gradient traffic
        in the model (FSMoE picks backward degrees given the all-reduce it overlaps).
    """
    sizes = _mesh_sizes(mesh)
    n_dev = int(np.prod(list(sizes.values())))
    ep = sizes.get("expert", n_dev)
    cands = _check_candidates(candidates)
    works = layer_workloads(model_cfg, tokens_per_device, expert_parallel=ep, n_devices=n_dev, seq_len=seq_len,
                            include_embeddings=include_embeddings)
    ct = ClusterTerms.from_profile(profile, ep)
    moe_idx = tuple(w.index for w in works if w.kind == "moe")
    fwd, bwd = {}, {}
    for wk in works:
        if wk.kind == "moe":
            terms = ct.moe_terms(wk)
            fwd[wk.index] = solve_degree(terms, candidates=cands).degree
            bwd[wk.index] = solve_degree(terms, backward=True, candidates=cands).degree

    def evaluate(bdeg):
        steps = backward_steps(works, ct, bdeg)
        part = partition_gradients([s[2] for s in steps], [s[3] for s in steps], ct.all_reduce,
                                   method=partition_method)
        return sum(s[1] for s in steps) + part.tail_s, steps, part

    best_v, steps, part = evaluate(bwd)
    if refine:
        improved = True
        while improved:
            improved = False
            for i in moe_idx:
                for r in cands:
                    if r == bwd[i]:
                        continue
                    trial = {**bwd, i: r}
                    v, st, pt = evaluate(trial)
                    if v < best_v - 1e-12:
                        best_v, steps, part, bwd, improved = v, st, pt, trial, True
    layer_fwd = []
    for wk in works:
        t = ct.other_time(wk)
        if wk.kind == "moe":
            t += layer_time(ct.moe_terms(wk), fwd[wk.index])
        layer_fwd.append(t)
    bwd_by_layer = {s[0]: s[1] for s in steps}
    layer_bwd = tuple(bwd_by_layer[w.index] for w in works)
    order = [s[0] for s in steps]
    buckets = tuple(tuple(order[k] for k in b) for b in part.buckets)
    fwd_s, bwd_s = float(sum(layer_fwd)), float(sum(layer_bwd))
    # no-overlap reference: degree 1, everything sequential, one all-reduce after the backward.
    no_ov = 0.0
    for wk in works:
        no_ov += 3.0 * (ct.other_time(wk))  # forward + 2x backward
        if wk.kind == "moe":
            terms = ct.moe_terms(wk)
            no_ov += layer_time(terms, 1) + layer_time(terms, 1, backward=True)
    no_ov += ct.all_reduce(sum(w.grad_bytes for w in works))
    return SchedulePlan(moe_idx, tuple(fwd[i] for i in moe_idx), tuple(bwd[i] for i in moe_idx), buckets,
                        tuple(layer_fwd), layer_bwd, fwd_s, bwd_s, part.tail_s, fwd_s + bwd_s + part.tail_s,
                        no_ov, tokens_per_device, ep, n_dev, profile.source)


__all__ = [
    "DEFAULT_CANDIDATES",
    "PARTITION_METHODS",
    "AlphaBeta",
    "ClusterTerms",
    "DegreeChoice",
    "GradientPartition",
    "LayerWork",
    "MoELayerTerms",
    "SchedulePlan",
    "backward_steps",
    "brute_force_partition",
    "bucket_tail",
    "continuous_optimum",
    "exhaustive_degree",
    "layer_case",
    "layer_time",
    "layer_workloads",
    "partition_gradients",
    "plan",
    "routed_rows",
    "solve_degree",
]
