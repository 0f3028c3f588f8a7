"""Expert parallelism: the MoE layer inside ``jax.shard_map`` with experts sharded over the ``expert`` axis.

Each device routes its own tokens (one routing group per device, so batch-dependent routing means the same as
on one device with ``group_size`` = tokens per device), lays them out in fixed-capacity ``[E, C]`` buffers,
exchanges them with ``all_to_all`` so every device holds the buffers of its ``E / n`` local experts from all
devices, runs its experts and sends the results back with a second ``all_to_all``.

Use it by running the model inside ``shard_map`` under :func:`expert_parallel`::

    with expert_parallel(axis=("node", "expert")):
        y, aux = moe(x_local, token_index=global_index)

The returned statistics are this device's (its routing group's), like the single-device layer's per call;
the caller reduces what must be global across the batch axes (the trainer sums ``expert_load`` and
``dropped`` and averages the losses over devices, which equals the single-device mean over groups).
(XLA:CPU lacks ``ragged_all_to_all``; this fixed-capacity path runs everywhere.)
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from moejax.nn import dispatch as dsp
from moejax.nn.experts import swiglu_capacity
from moejax.nn.routers import router_statistics

DEFAULT_EP_CAPACITY_FACTOR = 2.0


@dataclass(frozen=True)
class EPContext:
    axis: str | tuple[str, ...] = ("node", "expert")
    batch_axes: tuple[str, ...] = ("data", "node", "expert")
    capacity_factor: float | None = None  # None: the layer's own (capacity dispatch) or DEFAULT_EP_CAPACITY_FACTOR


_EP: contextvars.ContextVar[EPContext | None] = contextvars.ContextVar("moejax_ep", default=None)


@contextlib.contextmanager
def expert_parallel(axis=("node", "expert"), batch_axes=("data", "node", "expert"),
                    capacity_factor: float | None = None):
    """Trace-time context: MoE layers called inside use the expert-parallel path."""
    tok = _EP.set(EPContext(axis, tuple(batch_axes), capacity_factor))
    try:
        yield
    finally:
        _EP.reset(tok)


def current() -> EPContext | None:
    return _EP.get()


def ep_capacity_factor(moe_cfg, ctx: EPContext) -> float:
    if ctx.capacity_factor is not None:
        return ctx.capacity_factor
    return moe_cfg.capacity_factor if moe_cfg.dispatch == "capacity" else DEFAULT_EP_CAPACITY_FACTOR


def ep_moe(moe, xt: jax.Array, ctx: EPContext, *, token_mask=None, token_index=None, rng=None, train=False):
    """The expert-parallel MoE forward for local tokens ``xt [T_local, D]`` (call inside shard_map)."""
    cfg = moe.cfg
    T, D = xt.shape
    E = cfg.num_experts
    n = jax.lax.psum(1, ctx.axis)
    wg, wu, wd = moe.experts.weights()  # local shards [E/n, D, F]
    if wg.shape[0] * n != E:
        raise ValueError(f"expert weights are not sharded over '{ctx.axis}': local {wg.shape[0]} x {n} devices "
                         f"!= {E} experts")
    r, tm = moe.route(xt, token_mask=token_mask, token_index=token_index, rng=rng, train=train)
    stats = router_statistics(r, tm)
    G, S, K = r.expert_ids.shape
    cf = ep_capacity_factor(cfg, ctx)
    C = dsp.layer_capacity(cfg.router.type, S, E, K, cf)
    layout = dsp.capacity_layout(r.expert_ids, r.mask, E, C)
    xb = dsp.gather_rows(xt, layout).reshape(G, E, C, D)
    xb = jnp.swapaxes(xb, 0, 1).reshape(E, G * C, D)
    # dispatch: [E, GC, D] -> local experts' buffers from every device [E/n, n*GC, D]
    xr = jax.lax.all_to_all(xb, ctx.axis, split_axis=0, concat_axis=1, tiled=True)
    yr = swiglu_capacity(xr[None], wg, wu, wd)[0]
    # combine: back to this device's [E, GC, D]
    yb = jax.lax.all_to_all(yr, ctx.axis, split_axis=1, concat_axis=0, tiled=True)
    yb = jnp.swapaxes(yb.reshape(E, G, C, D), 0, 1).reshape(G * E * C, D)
    out = dsp.combine_rows(yb, layout, r.weights.reshape(T, K))
    aux = {**stats, "dropped": layout.dropped, "capacity_used": layout.capacity_used}
    return out, aux
