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

**The exchange** (``expert_parallel(a2a=...)``, :data:`A2A_MODES`):

- ``"fixed"``: the fixed-capacity ``all_to_all`` path above (runs everywhere; slots beyond the capacity
  ``capacity_factor`` gives are dropped, in the single-device capacity order).
- ``"ragged"``: dropless. Each device sorts its ``(token, slot)`` rows by expert, exchanges per-expert counts
  with an ``all_to_all`` and sends the rows with ``jax.lax.ragged_all_to_all`` into a receive buffer of static
  size ``M`` grouped by (source device, local expert); the local experts run on it with the layer's dropless
  grouped compute (``grouped_impl``), a second ``ragged_all_to_all`` returns the outputs, and the combine is the
  dropless one (:mod:`moejax.parallel.ragged_a2a`). ``M`` is ``ceil(ragged_bound * T * K)`` rows for ``T``
  local tokens with ``K`` slots (``T * K`` is the balanced load), capped at the worst case ``n * T * K``;
  ``ragged_bound=None`` (default) is the worst case, so nothing is dropped; rows that do not fit a smaller
  bound are dropped (zero output) and counted in ``aux["dropped"]``. Gradients use jax's own transpose of
  ``ragged_all_to_all`` (the reverse exchange).
- ``"ragged_emulated"``: the ragged path with :func:`~moejax.parallel.ragged_a2a.ragged_all_to_all_emulated`
  (all_gather-based, runs on CPU; for tests -- XLA:CPU does not implement ``ragged_all_to_all``).
- ``"auto"``: ``"ragged"`` on a backend in :data:`RAGGED_VALIDATED_BACKENDS`, else ``"fixed"``.

Status: the ragged path is tested on CPU (through the emulation) to equal the fixed path with no drops and one
device with the same routing groups, outputs and gradients, and it lowers for cuda with the real primitive;
it has never run on a real GPU yet, so ``auto`` keeps the fixed path everywhere
(``experiments/gpu_check.py --only ep_ragged`` is the check a GPU session runs first).
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp

from moejax.config import EP_A2A_MODES
from moejax.nn import dispatch as dsp
from moejax.nn import stages
from moejax.nn.experts import grouped_experts, resolve_grouped_impl
from moejax.nn.sharding import tensor_output
from moejax.parallel import eplb, ragged_a2a

DEFAULT_EP_CAPACITY_FACTOR = 2.0

A2A_MODES = EP_A2A_MODES
"""Values of ``EPContext.a2a`` (see the module docstring): fixed, ragged, auto, ragged_emulated."""

# Backends on which ``a2a="auto"`` picks the ragged path. Empty: ragged_all_to_all has never run on a real
# accelerator in this project. A GPU session adds "gpu" after ``experiments/gpu_check.py --only ep_ragged``
# passes there (and records the result in experiments/results/).
RAGGED_VALIDATED_BACKENDS: frozenset[str] = frozenset()


@dataclass(frozen=True)
class EPContext:
    axis: str | tuple[str, ...] = ("node", "expert")
    batch_axes: tuple[str, ...] = ("data", "node", "expert")
    capacity_factor: float | None = None  # None: the layer's own (capacity dispatch) or DEFAULT_EP_CAPACITY_FACTOR
    a2a: str = "fixed"  # one of A2A_MODES
    ragged_bound: float | None = None  # ragged receive buffer rows / (T*K); None: the worst case n*T*K

    def __post_init__(self):
        if self.a2a not in A2A_MODES:
            raise ValueError(f"EPContext.a2a={self.a2a!r} is invalid; allowed: {', '.join(A2A_MODES)}")
        if self.ragged_bound is not None and not (isinstance(self.ragged_bound, (int, float))
                                                  and self.ragged_bound > 0):
            raise ValueError(f"EPContext.ragged_bound={self.ragged_bound!r} is invalid: must be a number > 0 "
                             f"or None (the worst case, nothing dropped)")

    def resolved_a2a(self) -> str:
        """``a2a`` with ``auto`` resolved for the default backend: ``ragged`` where validated, else ``fixed``."""
        if self.a2a != "auto":
            return self.a2a
        return "ragged" if jax.default_backend() in RAGGED_VALIDATED_BACKENDS else "fixed"

    def run_moe(self, layer, xt, **kwargs):
        """The :class:`~moejax.nn.stages.MoEExecutor` entry: :func:`ep_moe` of this context."""
        return ep_moe(layer, xt, self, **kwargs)


@contextlib.contextmanager
def expert_parallel(axis=("node", "expert"), batch_axes=("data", "node", "expert"),
                    capacity_factor: float | None = None, a2a: str = "fixed", ragged_bound: float | None = None):
    """Trace-time context: MoE layers called inside use the expert-parallel path (``a2a``: the exchange, one of
    :data:`A2A_MODES`; ``ragged_bound``: the ragged receive-buffer bound, see the module docstring). Installs an
    :class:`EPContext` as the layers' :class:`~moejax.nn.stages.MoEExecutor`."""
    with stages.moe_executor(EPContext(axis, tuple(batch_axes), capacity_factor, a2a, ragged_bound)):
        yield


def current() -> EPContext | None:
    """The :class:`EPContext` of the enclosing :func:`expert_parallel` block (None: not expert parallel)."""
    ex = stages.current_executor()
    return ex if isinstance(ex, EPContext) else None


@dataclass(frozen=True)
class ReplicatedEPContext(EPContext):
    """Serving's expert parallelism: every device holds the whole token batch (attention and the KV cache are
    replicated), so each MoE layer takes this device's ``1 / n`` of the rows (padded to a multiple of ``n``),
    runs :func:`ep_moe` on them (the training path: gate, order, ``all_to_all``, local experts,
    ``all_to_all``, inverse order) and ``all_gather``-s the outputs back to every device
    (:func:`ep_moe_replicated`). ``expert_load`` and ``dropped`` come back summed over the devices, the
    other statistics averaged. ``capacity_factor=0`` (serving's default) makes every expert's buffer hold all
    of a device's rows: nothing is dropped."""

    def run_moe(self, layer, xt, **kwargs):
        return ep_moe_replicated(layer, xt, self, **kwargs)


@contextlib.contextmanager
def expert_parallel_serving(axis=("node", "expert"), capacity_factor: float | None = 0.0, a2a: str = "fixed",
                            ragged_bound: float | None = None):
    """Trace-time context for a step whose tokens are replicated over ``axis`` (a serving step inside
    ``shard_map``): MoE layers run :func:`ep_moe_replicated`. ``capacity_factor`` 0 (default): dropless."""
    ctx = ReplicatedEPContext(axis, (), capacity_factor, a2a, ragged_bound)
    with stages.moe_executor(ctx):
        yield


def ep_moe_replicated(moe, xt: jax.Array, ctx: EPContext, *, token_mask=None, token_index=None, rng=None,
                      train=False):
    """The expert-parallel MoE forward of tokens ``xt [T, D]`` held whole by every device of ``ctx.axis`` (see
    :class:`ReplicatedEPContext`); ``(out [T, D], aux)``, the same on every device."""
    T = xt.shape[0]
    n = jax.lax.psum(1, ctx.axis)
    i = jax.lax.axis_index(ctx.axis)
    Tl = -(-T // n)
    pad = Tl * n - T
    mask = jnp.ones((T,), bool) if token_mask is None else token_mask.reshape(T).astype(bool)
    index = jnp.arange(T, dtype=jnp.int32) if token_index is None else token_index.reshape(T).astype(jnp.int32)
    xp = jnp.pad(xt, ((0, pad), (0, 0)))
    mp, ip = jnp.pad(mask, (0, pad)), jnp.pad(index, (0, pad))
    local = partial(jax.lax.dynamic_slice_in_dim, start_index=i * Tl, slice_size=Tl)
    out, aux = ep_moe(moe, local(xp), ctx, token_mask=local(mp), token_index=local(ip), rng=rng, train=train)
    out = jax.lax.all_gather(out, ctx.axis, axis=0, tiled=True)[:T]

    def reduce(k, v):
        if k in ("expert_load", "dropped"):
            return jax.lax.psum(v, ctx.axis)
        if k == "capacity_used":
            return jax.lax.pmax(v, ctx.axis)
        return jax.lax.pmean(v, ctx.axis) if jnp.issubdtype(v.dtype, jnp.floating) else v

    return out, {k: reduce(k, v) for k, v in aux.items()}


def ep_capacity_factor(moe_cfg, ctx: EPContext) -> float:
    if ctx.capacity_factor is not None:
        return ctx.capacity_factor
    return moe_cfg.capacity_factor if moe_cfg.dispatch == "capacity" else DEFAULT_EP_CAPACITY_FACTOR


def ep_moe(moe, xt: jax.Array, ctx: EPContext, *, token_mask=None, token_index=None, rng=None, train=False):
    """The expert-parallel MoE forward for local tokens ``xt [T_local, D]`` (call inside shard_map).

    ``ctx.a2a`` resolving to ``fixed``: runs the six stages of :mod:`moejax.nn.stages` on the
    ``expert_parallel`` path: gate; order into
    ``[E, G*C, D]`` expert-major capacity buffers; dispatch ``all_to_all(split_axis=0, concat_axis=1)`` to
    the local experts' ``[E/n, n*G*C, D]``; the experts (row-wise along axis 1); combine
    ``all_to_all(split_axis=1, concat_axis=0)`` back; inverse order. With no hooks or replaced stages nothing
    else runs between the two ``all_to_all`` ops. ``ragged`` / ``ragged_emulated``: the
    ``expert_parallel_ragged`` path (dropless; see the module docstring).
    """
    cfg = moe.cfg
    E = cfg.num_experts
    n = jax.lax.psum(1, ctx.axis)
    if cfg.expert_type == "atomic":  # OmniMoE: replicated U/V tables, data parallel only
        if n > 1:
            raise NotImplementedError(f"atomic experts (OmniMoE) over an expert axis of {n} devices: an atomic "
                                      f"expert is one row of U/V read per token pair; sharding the tables "
                                      f"needs a row exchange that is not built (use a data-only mesh)")
        return moe.local(xt, token_mask=token_mask, train=train, axis_name=ctx.batch_axes)
    wg, wu, wd = moe.experts.weights()  # local shards [E/n, D, F] (EPLB: [P/n, D, F] physical slots)
    placed = getattr(moe, "eplb_log2phy", None) is not None
    if wg.shape[0] * n != E and not placed:
        raise ValueError(f"expert weights are not sharded over '{ctx.axis}': local {wg.shape[0]} x {n} devices "
                         f"!= {E} experts")
    a2a = ctx.resolved_a2a()
    fixed = a2a == "fixed"
    defaults = FIXED_STAGES if fixed else RAGGED_STAGES
    if placed:
        defaults = {**defaults, "order": partial(physical_order, base=defaults["order"])}
    return stages.run_stages(moe, xt, path="expert_parallel" if fixed else "expert_parallel_ragged",
                             ep=dataclasses.replace(ctx, a2a=a2a), capacity_factor=ep_capacity_factor(cfg, ctx),
                             expert_weights=(wg, wu, wd), token_mask=token_mask, token_index=token_index, rng=rng,
                             train=train, defaults=defaults)


def physical_order(ctx: stages.StageContext, x, *, base):
    """``order`` under EPLB (a layer carrying :class:`~moejax.parallel.eplb.ExpertSlots`): the routing's
    logical expert ids become physical slots (:func:`~moejax.parallel.eplb.to_physical`: a token's ``k``-th
    expert to replica ``(token index + k) mod count``), ``ctx.cfg.num_experts`` becomes the slot count ``P``,
    then the path's own ``order`` (``base``) runs over the ``P`` slots; the local weights are the device's
    ``P / n`` slots. The router's statistics (``aux``, computed after ``gate``) stay per logical expert."""
    r = ctx.routing
    G, S, K = r.expert_ids.shape
    T = G * S
    index = jnp.arange(T, dtype=jnp.int32) if ctx.token_index is None else ctx.token_index.reshape(T)
    phys = eplb.to_physical(r.expert_ids.reshape(T, K), ctx.layer.eplb_log2phy[...], ctx.layer.eplb_counts[...],
                            index)
    ctx.routing = r._replace(expert_ids=phys.reshape(G, S, K))
    ctx.cfg = dataclasses.replace(ctx.cfg, num_experts=ctx.expert_weights[0].shape[0] * jax.lax.psum(1, ctx.ep.axis))
    return base(ctx, x)


# ------------------------------------------------------------------------------------------ the EP stages

def dispatch_fixed(ctx: stages.StageContext, x):
    """``dispatch`` (fixed): the ``all_to_all`` that sends each device's ``[E, G*C, D]`` buffers to the experts'
    owners (``[E/n, n*G*C, D]``)."""
    return jax.lax.all_to_all(x, ctx.ep.axis, split_axis=0, concat_axis=1, tiled=True)


def combine_fixed(ctx: stages.StageContext, y):
    """``combine`` (fixed): the reverse ``all_to_all`` that returns each device its ``[E, G*C, D]`` outputs."""
    return jax.lax.all_to_all(y, ctx.ep.axis, split_axis=1, concat_axis=0, tiled=True)


def order_ragged(ctx: stages.StageContext, x):
    """``order`` (ragged): the ``(token, slot)`` rows ``[T*K, D]`` sorted by expert (dropless, unpadded)."""
    r = ctx.routing
    T, K = x.shape[0], ctx.num_slots
    ctx.layout = dsp.dropless_layout(r.expert_ids.reshape(T, K), r.mask.reshape(T, K), ctx.cfg.num_experts, 1)
    return dsp.gather_rows(x, ctx.layout)


def dispatch_ragged(ctx: stages.StageContext, x):
    """``dispatch`` (ragged): sorted rows ``[T*K, D]`` -> this device's receive buffer ``[M, D]`` (rows of its
    local experts from every device, grouped by (source, local expert)); rows beyond ``M`` are dropped and
    counted. Sets ``ctx.exchange`` (the :class:`~moejax.parallel.ragged_a2a.RaggedPlan`)."""
    n = jax.lax.psum(1, ctx.ep.axis)
    M = ragged_a2a.receive_rows(x.shape[0], n, ctx.ep.ragged_bound)
    plan = ragged_a2a.make_plan(ctx.layout.group_sizes, ctx.ep.axis, n, M)
    ctx.exchange = plan
    ctx.layout = ctx.layout._replace(dropped=plan.dropped)
    out = jnp.zeros((M,) + x.shape[1:], x.dtype)
    return ragged_a2a.exchange(x, out, *plan.forward_args(), ctx.ep.axis,
                               emulated=ctx.ep.a2a == "ragged_emulated")


def expert_ragged(ctx: stages.StageContext, x):
    """``expert`` (ragged): the local experts on the received rows ``x [M, D]`` (in any order): sorted by expert
    and run through the layer's dropless grouped compute (``MoEConfig.grouped_impl`` resolved for ``M`` rows, from
    :data:`~moejax.nn.experts.GROUPED_IMPLS`) as one-slot tokens of weight 1; empty rows give zeros. Tensor
    parallel partial outputs are summed here, as in the default ``expert`` stage."""
    wg, wu, wd = ctx.expert_weights
    row_expert = ctx.exchange.row_expert
    M, El = x.shape[0], wg.shape[0]
    ids = jnp.minimum(row_expert, El - 1)[:, None]
    valid = (row_expert < El)[:, None]
    method = resolve_grouped_impl(ctx.cfg.grouped_impl, M, El)
    y = grouped_experts(x, (wg, wu, wd), ids, valid.astype(jnp.float32), valid, method=method,
                        block_rows=ctx.cfg.block_rows)
    return tensor_output(y)


def combine_ragged(ctx: stages.StageContext, y):
    """``combine`` (ragged): the reverse ``ragged_all_to_all`` back to the sorted rows ``[T*K, D]`` (rows that
    were dropped stay zero)."""
    out = jnp.zeros((ctx.layout.slot_row.shape[0],) + y.shape[1:], y.dtype)
    return ragged_a2a.exchange(y, out, *ctx.exchange.reverse_args(), ctx.ep.axis,
                               emulated=ctx.ep.a2a == "ragged_emulated")


def inverse_order_rows(ctx: stages.StageContext, y):
    """``inverse_order`` (ragged): un-permute the sorted rows and sum each token's slots with its weights."""
    return dsp.combine_rows(y, ctx.layout, ctx.slot_weights())


FIXED_STAGES = {**stages.DEFAULT_STAGES, "dispatch": dispatch_fixed, "combine": combine_fixed}
"""The stages of the ``expert_parallel`` path: the local capacity stages with the two ``all_to_all`` ops."""

RAGGED_STAGES = {**stages.DEFAULT_STAGES, "order": order_ragged, "dispatch": dispatch_ragged,
                 "expert": expert_ragged, "combine": combine_ragged, "inverse_order": inverse_order_rows}
"""The stages of the ``expert_parallel_ragged`` path (dropless)."""
