"""Expert parallelism: the MoE layer inside ``jax.shard_map`` with experts sharded over the ``expert`` axis.

Each device routes its own tokens (one routing group per device, so batch-dependent routing means the same as
on one device with ``group_size`` = tokens per device), lays them out in fixed-capacity ``[E, C]`` buffers,
exchanges them with ``all_to_all`` so every device holds the buffers of its ``E / n`` local experts from all
devices, runs its experts and sends the results back with a second ``all_to_all`` -- FSMoE's gate, order,
dispatch, expert, combine and inverse-order stages (:mod:`moejax.nn.stages`), each swappable and hookable.

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

from moejax.nn import stages

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
    """The expert-parallel MoE forward for local tokens ``xt [T_local, D]`` (call inside shard_map).

    Runs the six stages of :mod:`moejax.nn.stages` on the ``expert_parallel`` path: gate; order into
    ``[E, G*C, D]`` expert-major capacity buffers; dispatch ``all_to_all(split_axis=0, concat_axis=1)`` to
    the local experts' ``[E/n, n*G*C, D]``; the experts (row-wise along axis 1); combine
    ``all_to_all(split_axis=1, concat_axis=0)`` back; inverse order. With no hooks or replaced stages nothing
    else runs between the two ``all_to_all`` ops.
    """
    cfg = moe.cfg
    E = cfg.num_experts
    n = jax.lax.psum(1, ctx.axis)
    wg, wu, wd = moe.experts.weights()  # local shards [E/n, D, F]
    if wg.shape[0] * n != E:
        raise ValueError(f"expert weights are not sharded over '{ctx.axis}': local {wg.shape[0]} x {n} devices "
                         f"!= {E} experts")
    return stages.run_stages(moe, xt, path="expert_parallel", ep=ctx, capacity_factor=ep_capacity_factor(cfg, ctx),
                             expert_weights=(wg, wu, wd), token_mask=token_mask, token_index=token_index, rng=rng,
                             train=train)
