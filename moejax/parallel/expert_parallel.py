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
import contextvars
import dataclasses
from dataclasses import dataclass

import jax

from moejax.config import EP_A2A_MODES
from moejax.nn import stages

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


_EP: contextvars.ContextVar[EPContext | None] = contextvars.ContextVar("moejax_ep", default=None)


@contextlib.contextmanager
def expert_parallel(axis=("node", "expert"), batch_axes=("data", "node", "expert"),
                    capacity_factor: float | None = None, a2a: str = "fixed", ragged_bound: float | None = None):
    """Trace-time context: MoE layers called inside use the expert-parallel path (``a2a``: the exchange, one of
    :data:`A2A_MODES`; ``ragged_bound``: the ragged receive-buffer bound, see the module docstring)."""
    tok = _EP.set(EPContext(axis, tuple(batch_axes), capacity_factor, a2a, ragged_bound))
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
    wg, wu, wd = moe.experts.weights()  # local shards [E/n, D, F]
    if wg.shape[0] * n != E:
        raise ValueError(f"expert weights are not sharded over '{ctx.axis}': local {wg.shape[0]} x {n} devices "
                         f"!= {E} experts")
    a2a = ctx.resolved_a2a()
    path = "expert_parallel" if a2a == "fixed" else "expert_parallel_ragged"
    return stages.run_stages(moe, xt, path=path, ep=dataclasses.replace(ctx, a2a=a2a), capacity_factor=ep_capacity_factor(cfg, ctx),
                             expert_weights=(wg, wu, wd), token_mask=token_mask, token_index=token_index, rng=rng,
                             train=train)
