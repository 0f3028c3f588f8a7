"""A naive, per-token reference MoE layer for the tests (no tests here).

The reference takes the *layer's own router* output (expert ids, combine weights, routed mask), so it checks
dispatch, the expert FFNs, combine and the shared experts -- the routers are checked against their definitions
in ``tests/test_routers.py``. Everything else is written as plainly as possible:

- the capacity rule is a Python loop over routing groups, then choice rank ``k``, then tokens, counting the
  slots each expert has taken (all first choices of a group before any second choice, token order within a
  rank); a slot is dropped when its expert is full;
- every token's output is ``sum_k weight * SwiGLU_e(x_t)`` with ``jnp`` ops on that token alone, plus the
  shared experts (each a dense SwiGLU, summed, times ``sigmoid(x_t @ shared_gate)`` if gated).

Discrete decisions (ids, routed mask, kept slots) come from concrete numpy values (:func:`reference_decisions`);
the combine weights and all FFN math are traced, so ``jax.grad`` works through :func:`reference_moe` when the
decisions are computed first, outside the differentiated function.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

_HI = jax.lax.Precision.HIGHEST


class Decisions(NamedTuple):
    ids: np.ndarray       # [G, S, K] int: expert of each slot
    routed: np.ndarray    # [G, S, K] bool: the router routed the slot (token_mask applied)
    keep: np.ndarray      # [G, S, K] bool: the slot survived the capacity rule
    dropped: int          # routed slots that did not survive
    expert_load: np.ndarray  # [E] int: routed slots per expert, summed over groups (before drops)
    kept_per_group: np.ndarray  # [G, E] int: kept slots per expert and group
    capacity: int | None  # per-expert slots of a routing group; None = unbounded (dropless)


def reference_capacity(cfg, group_tokens: int, k: int) -> int | None:
    """Per-expert capacity of one routing group, straight from the Tutel definition (exact rational ceil).

    Token-choice routers: ``cf == 0`` or dropless dispatch -> unbounded; otherwise ``ceil(|cf| * S * k / E)``
    (``cf < 0`` is Tutel's dynamic capacity whose upper bound ``|cf|`` decides the drops). No clamp to ``S`` is
    needed: the ``k`` choices of a token are distinct experts, so an expert never gets more than ``S`` slots.
    Expert Choice: ``min(S, ceil(|cf| * S / E))`` with ``cf == 0`` meaning 1.
    """
    E = cfg.num_experts
    cf = Fraction(str(abs(cfg.capacity_factor)))
    if cfg.router.type == "expert_choice":
        cf = cf or Fraction(1)
        return min(group_tokens, math.ceil(cf * group_tokens / E))
    if cfg.dispatch == "dropless" or cf == 0:
        return None
    return math.ceil(cf * group_tokens * k / E)


def route(model, x, *, token_mask=None, token_index=None, rng=None, train=False):
    """Run the layer's router on ``x [..., D]`` split into routing groups of ``cfg.router.group_size`` tokens."""
    D = x.shape[-1]
    xt = jnp.asarray(x).reshape(-1, D)
    T = xt.shape[0]
    gs = model.cfg.router.group_size or T
    assert T % gs == 0, (T, gs)
    G = T // gs
    tm = None if token_mask is None else jnp.asarray(token_mask).reshape(G, gs)
    ti = jnp.arange(T, dtype=jnp.int32) if token_index is None else jnp.asarray(token_index)
    return model.router(xt.reshape(G, gs, D), token_mask=tm, token_index=ti.reshape(G, gs), rng=rng, train=train)


def keep_slots(ids: np.ndarray, routed: np.ndarray, num_experts: int, capacity: int | None):
    """The capacity rule as a plain loop: groups, then choice rank, then tokens."""
    G, S, K = ids.shape
    keep = np.zeros((G, S, K), bool)
    kept = np.zeros((G, num_experts), np.int64)
    load = np.zeros(num_experts, np.int64)
    dropped = 0
    for g in range(G):
        for k in range(K):
            for s in range(S):
                if not routed[g, s, k]:
                    continue
                e = int(ids[g, s, k])
                load[e] += 1
                if capacity is None or kept[g, e] < capacity:
                    keep[g, s, k] = True
                    kept[g, e] += 1
                else:
                    dropped += 1
    return keep, dropped, load, kept


def reference_decisions(model, x, *, token_mask=None, token_index=None, rng=None, train=False) -> Decisions:
    """Concrete routing decisions of ``model`` on ``x`` (call outside any jax transformation)."""
    r = route(model, x, token_mask=token_mask, token_index=token_index, rng=rng, train=train)
    ids = np.asarray(r.expert_ids)
    routed = np.asarray(r.mask)
    cap = reference_capacity(model.cfg, ids.shape[1], ids.shape[2])
    keep, dropped, load, kept = keep_slots(ids, routed, model.cfg.num_experts, cap)
    return Decisions(ids, routed, keep, dropped, load, kept, cap)


def swiglu_token(v, wg, wu, wd):
    """One SwiGLU FFN on one token ``v [D]``: ``(silu(v @ wg) * (v @ wu)) @ wd``."""
    a = jnp.dot(v, wg, precision=_HI)
    b = jnp.dot(v, wu, precision=_HI)
    return jnp.dot(jax.nn.silu(a) * b, wd, precision=_HI)


def reference_moe(model, x, *, token_mask=None, token_index=None, rng=None, train=False,
                  decisions: Decisions | None = None):
    """Float32 reference output ``[..., D]`` of the MoE layer ``model`` and its :class:`Decisions`.

    Pass ``decisions`` (from :func:`reference_decisions` on the same inputs) when differentiating.
    """
    if decisions is None:
        decisions = reference_decisions(model, x, token_mask=token_mask, token_index=token_index, rng=rng,
                                        train=train)
    cfg = model.cfg
    f32 = jnp.float32
    D = x.shape[-1]
    xt = jnp.asarray(x).reshape(-1, D).astype(f32)
    T = xt.shape[0]
    r = route(model, xt, token_mask=token_mask, token_index=token_index, rng=rng, train=train)
    K = r.weights.shape[-1]
    weights = r.weights.reshape(T, K).astype(f32)
    ids = decisions.ids.reshape(T, K)
    keep = decisions.keep.reshape(T, K)
    wg = model.experts.w_gate[...].astype(f32)
    wu = model.experts.w_up[...].astype(f32)
    wd = model.experts.w_down[...].astype(f32)

    shared = []
    if cfg.num_shared_experts:
        F = cfg.shared_d_ff or cfg.d_ff
        sg, su, sd = (model.shared.w_gate[...].astype(f32), model.shared.w_up[...].astype(f32),
                      model.shared.w_down[...].astype(f32))
        # The layer fuses the shared experts into one SwiGLU of width n*F; here each is its own FFN.
        shared = [(sg[:, i * F:(i + 1) * F], su[:, i * F:(i + 1) * F], sd[i * F:(i + 1) * F])
                  for i in range(cfg.num_shared_experts)]

    rows = []
    for t in range(T):
        y = jnp.zeros((D,), f32)
        for k in range(K):
            if keep[t, k]:
                e = int(ids[t, k])
                y = y + weights[t, k] * swiglu_token(xt[t], wg[e], wu[e], wd[e])
        if shared:
            s = jnp.zeros((D,), f32)
            for g_, u_, d_ in shared:
                s = s + swiglu_token(xt[t], g_, u_, d_)
            if cfg.shared_expert_gate:
                s = s * jax.nn.sigmoid(jnp.dot(xt[t], model.shared_gate[...][:, 0].astype(f32), precision=_HI))
            y = y + s
        rows.append(y)
    return jnp.stack(rows).reshape(x.shape), decisions
