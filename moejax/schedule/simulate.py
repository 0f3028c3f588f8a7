"""Event-level simulation of one MoE training step on a modelled cluster (all times **modelled**).

The cluster is the one a :class:`~moejax.schedule.profile.Profile` describes (``nodes`` x ``devices_per_node``
devices); one representative device is simulated (expert parallelism is symmetric). Resources, each a
CUDA-stream-like in-order queue:

* ``compute``: attention / router / dense FFN and the expert GEMMs;
* ``net_intra``: intra-node all-to-all (the whole all-to-all on one node) and, on one node, the gradient
  all-reduce;
* ``net_inter`` (several nodes): the inter-node phase of the 2-level all-to-all (intra-node phase first in
  the dispatch, last in the combine) and the gradient all-reduce.

A task starts when its resource has finished the previous task of its queue and its dependencies are done.
Gradient buckets of the ``fsmoe`` schedule are low-priority, preemptible traffic: they are backfilled into the
idle time of their link after their gradients are produced, so they never delay the all-to-alls (the same model
as :mod:`moejax.schedule.cost_model`).

Schedules:

* ``no_overlap`` (DeepSpeed-MoE-like): every task after the previous one; one gradient all-reduce at the end.
* ``fixed_degree`` (Tutel-like): all-to-all / expert pipelining with one fixed degree (``fixed_degree``, Tutel's
  ``a2a_ffn_overlap_degree``) in forward and backward; gradient all-reduce after the backward. (Tutel can also
  pick the degree at run time by trial; that is not modelled.)
* ``pipemoe``: pipelining with a per-layer degree minimizing the modelled forward layer time, used in forward
  and backward; gradient all-reduce after the backward (no gradient partitioning).
* ``fsmoe``: :func:`moejax.schedule.cost_model.plan`: separate solved forward/backward degrees per layer and
  adaptive gradient buckets overlapped with the backward.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from moejax.schedule.cost_model import (
    DEFAULT_CANDIDATES,
    ClusterTerms,
    LayerWork,
    SchedulePlan,
    _check_candidates,
    _mesh_sizes,
    layer_workloads,
    plan,
    solve_degree,
)
from moejax.schedule.profile import Profile

SCHEDULES = ("no_overlap", "fixed_degree", "pipemoe", "fsmoe")
RESOURCES = ("compute", "net_intra", "net_inter")


@dataclass(frozen=True)
class Event:
    """One simulated task execution (or one piece of a preempted gradient bucket).

    Attributes:
      name: e.g. ``L3.fwd.dispatch[1]``, ``L3.bwd.expert[0]``, ``grad.bucket[2]``.
      resource: ``compute``, ``net_intra`` or ``net_inter``.
      start_s, end_s: modelled times from the start of the step.
      layer: model layer index (``-1`` for step-level tasks such as the final all-reduce).
      phase: ``fwd``, ``bwd`` or ``grad``.
      chunk: pipeline chunk (``-1`` when not chunked).
    """

    name: str
    resource: str
    start_s: float
    end_s: float
    layer: int
    phase: str
    chunk: int = -1


@dataclass(frozen=True)
class SimResult:
    """A simulated step (modelled).

    Attributes:
      schedule: one of ``SCHEDULES``.
      step_time_s: end of the last event.
      events: every event, sorted by start time.
      fwd_degrees / bwd_degrees: degree per MoE layer (model layer order).
      buckets: gradient buckets (model layer indices, backward order); one bucket of all layers for baselines.
      busy_s: busy seconds per resource.
      sum_of_parts_s: sum of all task durations (the no-overlap step time).
    """

    schedule: str
    step_time_s: float
    events: tuple[Event, ...]
    fwd_degrees: tuple[int, ...]
    bwd_degrees: tuple[int, ...]
    buckets: tuple[tuple[int, ...], ...]
    busy_s: dict = field(default_factory=dict)
    sum_of_parts_s: float = 0.0


class _Sim:
    def __init__(self, sequential: bool):
        self.sequential = sequential
        self.free = {r: 0.0 for r in RESOURCES}
        self.events: list[Event] = []
        self.last_end = 0.0
        self.total = 0.0

    def task(self, name, resource, dur, deps, layer, phase, chunk=-1) -> float:
        """Run a task in issue order; returns its end time. ``deps``: end times it waits for."""
        start = max([self.free[resource], *deps] + ([self.last_end] if self.sequential else []))
        end = start + dur
        self.free[resource] = end
        self.last_end = max(self.last_end, end) if not self.sequential else end
        self.total += dur
        if dur > 0:
            self.events.append(Event(name, resource, start, end, layer, phase, chunk))
        return end

    def backfill(self, name, resource, dur, ready, layer=-1) -> float:
        """Low-priority preemptible work: fill idle gaps of ``resource`` from ``ready`` on; returns its end."""
        self.total += dur
        busy = sorted((e.start_s, e.end_s) for e in self.events if e.resource == resource)
        t, left, piece = ready, dur, 0
        for s, e in busy:
            if e <= t:
                continue
            if s > t:
                take = min(left, s - t)
                if take > 0:
                    self.events.append(Event(f"{name}.piece{piece}", resource, t, t + take, layer, "grad"))
                    piece += 1
                    left -= take
                    t += take
                if left <= 0:
                    return t
            t = max(t, e)
        if left > 0:
            self.events.append(Event(f"{name}.piece{piece}", resource, t, t + left, layer, "grad"))
            t += left
        return t


def _moe_pass(sim: _Sim, ct: ClusterTerms, wk: LayerWork, r: int, dep: float, phase: str) -> float:
    """Dispatch a2a -> experts -> combine a2a in ``r`` chunks (backward: combine-grad first, two GEMMs)."""
    n = wk.a2a_bytes / r
    f = wk.gemm_flops / r
    bwd = phase == "bwd"
    first, second = ("combine", "dispatch") if bwd else ("dispatch", "combine")
    L = wk.index
    ready = []
    for i in range(r):
        if ct.two_level:
            t = sim.task(f"L{L}.{phase}.{first}.intra[{i}]", "net_intra", ct.a2a_intra(n), [dep], L, phase, i)
            t = sim.task(f"L{L}.{phase}.{first}.inter[{i}]", "net_inter", ct.a2a_inter(n), [t], L, phase, i)
        else:
            t = sim.task(f"L{L}.{phase}.{first}[{i}]", "net_intra", ct.a2a_intra(n), [dep], L, phase, i)
        ready.append(t)
    done = []
    for i in range(r):
        dur = 2.0 * ct.gemm(f) if bwd else ct.gemm(f)
        done.append(sim.task(f"L{L}.{phase}.expert[{i}]", "compute", dur, [ready[i]], L, phase, i))
    ends = []
    for i in range(r):
        if ct.two_level:
            t = sim.task(f"L{L}.{phase}.{second}.inter[{i}]", "net_inter", ct.a2a_inter(n), [done[i]], L, phase, i)
            t = sim.task(f"L{L}.{phase}.{second}.intra[{i}]", "net_intra", ct.a2a_intra(n), [t], L, phase, i)
        else:
            t = sim.task(f"L{L}.{phase}.{second}[{i}]", "net_intra", ct.a2a_intra(n), [done[i]], L, phase, i)
        ends.append(t)
    return max(ends)


def simulate_layers(works: Sequence[LayerWork], ct: ClusterTerms, schedule: str, *,
                    fwd_degrees: dict[int, int], bwd_degrees: dict[int, int],
                    buckets: Sequence[Sequence[int]] | None = None) -> SimResult:
    """Simulate forward + backward over ``works`` with the given degrees; ``buckets`` (model layer indices in
    backward order) are backfilled during the backward, else one all-reduce follows the backward."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule: must be one of {SCHEDULES}, got {schedule!r}")
    sim = _Sim(sequential=schedule == "no_overlap")
    grad_res = ct.grad_link
    t = 0.0
    for wk in works:
        t = sim.task(f"L{wk.index}.fwd.other", "compute", ct.other_time(wk), [t], wk.index, "fwd")
        if wk.kind == "moe":
            t = _moe_pass(sim, ct, wk, fwd_degrees[wk.index], t, "fwd")
    grad_ready = {}
    for wk in reversed(works):
        if wk.kind == "moe":
            t = _moe_pass(sim, ct, wk, bwd_degrees[wk.index], t, "bwd")
        t = sim.task(f"L{wk.index}.bwd.other", "compute", ct.other_time(wk, backward=True), [t], wk.index, "bwd")
        grad_ready[wk.index] = t
    by_index = {wk.index: wk for wk in works}
    if buckets is None:
        total = sum(wk.grad_bytes for wk in works)
        sim.task("grad.all_reduce", grad_res, ct.all_reduce(total), [t], -1, "grad")
        buckets_out = (tuple(wk.index for wk in reversed(works)),)
    else:
        prev = 0.0
        for k, b in enumerate(buckets):
            nbytes = sum(by_index[i].grad_bytes for i in b)
            ready = max(max(grad_ready[i] for i in b), prev)
            prev = sim.backfill(f"grad.bucket[{k}]", grad_res, ct.all_reduce(nbytes), ready)
        buckets_out = tuple(tuple(b) for b in buckets)
    events = tuple(sorted(sim.events, key=lambda e: (e.start_s, e.resource)))
    busy = {r: sum(e.end_s - e.start_s for e in events if e.resource == r) for r in RESOURCES}
    moe = [wk.index for wk in works if wk.kind == "moe"]
    return SimResult(schedule, max((e.end_s for e in events), default=0.0), events,
                     tuple(fwd_degrees[i] for i in moe), tuple(bwd_degrees[i] for i in moe), buckets_out, busy,
                     sim.total)


def simulate_step(model_cfg, profile: Profile, tokens_per_device: int, schedule: str, *, mesh=None,
                  fixed_degree: int = 2, candidates: Sequence[int] = DEFAULT_CANDIDATES,
                  seq_len: int | None = None, schedule_plan: SchedulePlan | None = None) -> SimResult:
    """Simulate one training step of ``model_cfg`` (a moejax ``ModelConfig``) under ``schedule``.

    Args:
      profile: the modelled cluster (``nodes`` x ``devices_per_node``) and its alpha-beta fits.
      mesh: axis sizes (e.g. ``{"data": 4, "expert": 8}``); default: experts over all devices of the profile.
      fixed_degree: the ``fixed_degree`` schedule's degree.
      schedule_plan: a precomputed :func:`~moejax.schedule.cost_model.plan` for ``fsmoe``.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule: must be one of {SCHEDULES}, got {schedule!r}")
    sizes = _mesh_sizes(mesh if mesh is not None else {"expert": profile.n_devices})
    n_dev = 1
    for v in sizes.values():
        n_dev *= v
    if n_dev != profile.n_devices:
        raise ValueError(f"mesh: {sizes} has {n_dev} devices but the profile models {profile.nodes} x "
                         f"{profile.devices_per_node} = {profile.n_devices}")
    ep = sizes.get("expert", n_dev)
    cands = _check_candidates(candidates)
    works = layer_workloads(model_cfg, tokens_per_device, expert_parallel=ep, n_devices=n_dev, seq_len=seq_len)
    ct = ClusterTerms.from_profile(profile, ep)
    moe = [wk for wk in works if wk.kind == "moe"]
    buckets = None
    if schedule == "no_overlap":
        fwd = bwd = {wk.index: 1 for wk in moe}
    elif schedule == "fixed_degree":
        if not isinstance(fixed_degree, int) or fixed_degree < 1:
            raise ValueError(f"fixed_degree: must be an int >= 1, got {fixed_degree!r}")
        fwd = bwd = {wk.index: fixed_degree for wk in moe}
    elif schedule == "pipemoe":
        fwd = {wk.index: solve_degree(ct.moe_terms(wk), candidates=cands).degree for wk in moe}
        bwd = fwd
    else:
        p = schedule_plan or plan(model_cfg, sizes, profile, tokens_per_device, candidates=cands, seq_len=seq_len)
        fwd = dict(zip(p.moe_layers, p.fwd_degrees))
        bwd = dict(zip(p.moe_layers, p.bwd_degrees))
        buckets = p.buckets
    return simulate_layers(works, ct, schedule, fwd_degrees=fwd, bwd_degrees=bwd, buckets=buckets)


__all__ = ["RESOURCES", "SCHEDULES", "Event", "SimResult", "simulate_layers", "simulate_step"]
