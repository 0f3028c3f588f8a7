"""The MoE layer as FSMoE's six stages, each swappable, with before/after hooks.

Every MoE call -- single device (any dispatch / grouped-compute path) or expert parallel inside
``shard_map`` -- runs the same six stages in this order (:data:`STAGES`)::

    gate -> order -> dispatch -> expert -> combine -> inverse_order

Each stage is a function ``impl(ctx, value) -> value`` where ``ctx`` is the call's :class:`StageContext`.
What flows between the stages depends on the path (``ctx.path``):

- ``gate``: tokens ``[T, D]`` -> :class:`~moejax.nn.routers.RouterOutput` (``[G, S, K]`` expert ids,
  weights, mask); the layer's routing statistics (``aux``) are computed from it afterwards.
- ``order``: tokens ``[T, D]`` -> on the capacity paths (``capacity``, ``expert_parallel``) the expert-major
  buffers ``[E, G*C, D]``; ``ragged_dot`` / ``pallas`` / ``expert_parallel_ragged``: rows ``[T*K, D]`` sorted
  by expert; ``dense`` /
  ``tiles``: the tokens unchanged (their expert stage gathers by itself). Sets ``ctx.layout`` (and
  ``ctx.capacity`` / ``ctx.block_rows``).
- ``dispatch``: ``expert_parallel``: the ``all_to_all`` to the local experts' buffers from every device
  ``[E/n, n*G*C, D]``; ``expert_parallel_ragged``: the ``ragged_all_to_all`` of the sorted rows into a receive
  buffer ``[M, D]`` grouped by (source device, local expert) (sets ``ctx.exchange``); other paths: identity.
- ``expert``: the expert FFN outputs in the same layout (row-wise); ``dense`` / ``tiles``: the combined tokens
  ``[T, D]`` (fused gather, experts and weighted sum).
- ``combine``: ``expert_parallel``: the reverse ``all_to_all`` back to ``[E, G*C, D]``;
  ``expert_parallel_ragged``: the reverse ``ragged_all_to_all`` back to the sorted rows ``[T*K, D]``; other
  paths: identity.
- ``inverse_order``: -> tokens ``[T, D]``: un-permute and sum each token's slots with its routing weights
  (identity for ``dense`` / ``tiles``).

**Hooks.** A :class:`MoEHooks` registry holds functions ``fn(ctx, value)`` to run ``"before"`` or ``"after"``
a stage (:data:`WHEN`). A before-hook sees the stage's input, an after-hook its output (and ``ctx.inputs``,
the input); a hook that returns something other than ``None`` replaces the value. Hooks may add entries to
``ctx.aux``; they are returned with the layer's statistics. Attach hooks to one layer with
``MoE(..., hooks=registry)`` or to every MoE layer traced inside a block with :func:`moe_hooks`::

    hooks = MoEHooks()

    @hooks.register("gate", "after")
    def routing_entropy(ctx, routing):
        p = routing.probs
        ctx.aux["router_entropy"] = -jnp.mean(jnp.sum(p * jnp.log(p + 1e-9), -1))

    with moe_hooks(hooks):
        y, aux = model(x)          # aux["router_entropy"] per MoE layer

**Swapping a stage.** Replace an implementation for one layer with ``MoE(..., stages={"expert": fn})`` or
for every layer traced inside a block with :func:`moe_stages` (innermost wins; the context wins over the
layer's own). Inside an implementation ``ctx.default(value)`` runs the default one, e.g. to fall back on
paths a replacement does not handle. To inject a custom collective, swap ``dispatch`` / ``combine``
(``ctx.ep.axis`` names the expert mesh axes under expert parallelism).

**Executors: where parallelism plugs in.** ``nn`` never imports :mod:`moejax.parallel`. Expert parallelism
installs a :class:`MoEExecutor` for the trace (:func:`moe_executor`; its
:func:`~moejax.parallel.expert_parallel.expert_parallel` context does this): every MoE layer traced inside
hands its routed part to the executor, which runs these same six stages on its own path
(``expert_parallel`` / ``expert_parallel_ragged``) with its own default implementations (the collectives in
``dispatch`` / ``combine``; hooks and swapped stages apply on top, and ``ctx.default`` runs the executor's).
Tensor parallelism plugs in at the layers' tensor-parallel edges (:mod:`moejax.nn.sharding`).

Hooks and stage choices take effect when a function is *traced* (like
:func:`moejax.parallel.expert_parallel.expert_parallel`): enter the contexts inside the function you jit or
``shard_map``, or trace it afresh; a cached ``jax.jit`` trace does not see a context entered later. With no
hooks and no replaced stages the traced computation is the same as the layer's fixed pipeline.

**Profiling.** Each stage runs inside ``jax.named_scope(f"moe/{stage}")`` (hooks inside
``moe_hook/{when}_{stage}``, so they are not counted as the stage), so profiler traces and HLO op metadata
name the stages; identity stages (local ``dispatch`` / ``combine``) emit no ops. Time stages from those
names, not from hooks (hooks run once, at trace time).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import jax
import jax.numpy as jnp

from moejax.nn import dispatch as dsp
from moejax.nn.context import scoped
from moejax.nn.experts import GROUPED_IMPLS, grouped_layout, swiglu_capacity
from moejax.nn.routers import router_statistics
from moejax.nn.sharding import tensor_input, tensor_output

STAGES = ("gate", "order", "dispatch", "expert", "combine", "inverse_order")
"""The six MoE stages, in execution order (FSMoE's Gate, Order, Dispatch, Expert, Combine, I-Order)."""

WHEN = ("before", "after")
"""When a hook runs relative to its stage."""

PATHS = ("capacity", "dense", "gather", "ragged_dot", "pallas", "tiles", "expert_parallel",
         "expert_parallel_ragged")
"""The values of :attr:`StageContext.path`: the single-device dispatch/grouped-compute methods, the
expert-parallel (``shard_map`` + ``all_to_all``) capacity path and the dropless expert-parallel path
(``ragged_all_to_all``, :mod:`moejax.parallel.ragged_a2a`)."""

CAPACITY_PATHS = ("capacity", "expert_parallel")

StageFn = Callable[["StageContext", Any], Any]
HookFn = Callable[["StageContext", Any], Any]


def check_stage(stage: str) -> str:
    """``stage`` if it is one of :data:`STAGES`, else ``ValueError`` naming the allowed values."""
    if stage not in STAGES:
        raise ValueError(f"unknown MoE stage {stage!r}; allowed: {', '.join(STAGES)}")
    return stage


def check_when(when: str) -> str:
    """``when`` if it is one of :data:`WHEN`, else ``ValueError`` naming the allowed values."""
    if when not in WHEN:
        raise ValueError(f"unknown hook time when={when!r}; allowed: {', '.join(WHEN)}")
    return when


@dataclasses.dataclass(eq=False)
class StageContext:
    """What a stage implementation or hook sees of one MoE call (one per call, filled in as stages run).

    Attributes:
      layer: the :class:`~moejax.nn.moe.MoE` module being called.
      cfg: its :class:`~moejax.config.MoEConfig`.
      path: how the layer runs, one of :data:`PATHS`.
      ep: the :class:`~moejax.parallel.expert_parallel.EPContext` under expert parallelism (``ep.axis`` is the
        expert mesh axis or axes), else ``None``.
      tokens: the layer's flat input tokens ``[T, D]`` (local tokens under expert parallelism).
      token_mask, token_index, rng, train, expert_ids: the call's keyword arguments (flattened).
      capacity_factor: the capacity factor the capacity paths use (the layer's, or the expert-parallel one).
      expert_weights: ``(w_gate, w_up, w_down)`` of the experts (the local shards under expert parallelism).
      stage: the stage running now; when: ``"before"``/``"after"`` in a hook, ``None`` in the implementation.
      inputs: the value that entered the current stage (after its before-hooks).
      routing: the gate's :class:`~moejax.nn.routers.RouterOutput` (set after ``gate``).
      group_mask: the token mask in routing groups ``[G, S]`` (or ``None``), set after ``gate``.
      layout: the :class:`~moejax.nn.dispatch.Layout` (set by ``order``).
      capacity: per-expert rows of a routing group on the capacity paths (set by ``order``), else ``None``.
      block_rows: the row tile of the ``tiles`` path (set by ``order``), else ``None``.
      aux: the layer's statistics so far (set after ``gate``); hooks may add entries.
      exchange: ``expert_parallel_ragged``: the :class:`~moejax.parallel.ragged_a2a.RaggedPlan` (set by
        ``dispatch``), else ``None``.
    """

    layer: Any
    cfg: Any
    path: str
    ep: Any
    tokens: jax.Array
    token_mask: jax.Array | None
    token_index: jax.Array | None
    rng: jax.Array | None
    train: bool
    expert_ids: jax.Array | None
    capacity_factor: float
    expert_weights: tuple
    defaults: Mapping[str, StageFn]
    stage: str | None = None
    when: str | None = None
    inputs: Any = None
    routing: Any = None
    group_mask: jax.Array | None = None
    layout: Any = None
    capacity: int | None = None
    block_rows: int | None = None
    aux: dict = dataclasses.field(default_factory=dict)
    exchange: Any = None

    def default(self, value, stage: str | None = None):
        """Run the default implementation of ``stage`` (default: the current stage) on ``value``."""
        return self.defaults[check_stage(stage or self.stage)](self, value)

    @property
    def num_slots(self) -> int:
        """``K``, routed slots per token (after ``gate``)."""
        return self.routing.expert_ids.shape[-1]

    def slot_weights(self) -> jax.Array:
        """The routing weights as ``[T, K]`` (after ``gate``)."""
        T = self.routing.expert_ids.shape[0] * self.routing.expert_ids.shape[1]
        return self.routing.weights.reshape(T, self.num_slots)


# ------------------------------------------------------------------------------------- default stages

def gate(ctx: StageContext, x):
    """Default ``gate``: the layer's router (or the forced ``expert_ids`` routing) over routing groups."""
    r, _ = ctx.layer.route(x, token_mask=ctx.token_mask, token_index=ctx.token_index, rng=ctx.rng,
                           train=ctx.train, expert_ids=ctx.expert_ids)
    return r


def order(ctx: StageContext, x):
    """Default ``order``: build the layout and gather the tokens into expert-grouped order (see the table):
    capacity buffers on the capacity paths, else the layout of the path's :data:`~moejax.nn.experts.GROUPED_IMPLS`
    entry (rows gathered only for the entries that take sorted rows)."""
    cfg, r = ctx.cfg, ctx.routing
    G, S, K = r.expert_ids.shape
    T, D = x.shape
    E = cfg.num_experts
    if ctx.path in CAPACITY_PATHS:
        C = dsp.layer_capacity(cfg.router.type, S, E, K, ctx.capacity_factor)
        ctx.capacity = C
        ctx.layout = dsp.capacity_layout(r.expert_ids, r.mask, E, C)
        xb = dsp.gather_rows(x, ctx.layout).reshape(G, E, C, D)
        return jnp.swapaxes(xb, 0, 1).reshape(E, G * C, D)
    impl = _grouped(ctx.path)
    ctx.layout, ctx.block_rows = grouped_layout(impl.name, r.expert_ids.reshape(T, K), r.mask.reshape(T, K), E,
                                                cfg.block_rows)
    return dsp.gather_rows(x, ctx.layout) if impl.sorted_rows else x


def _grouped(path: str):
    impl = GROUPED_IMPLS.get(path)
    if impl is None:
        raise ValueError(f"unknown MoE path {path!r}; allowed: {', '.join(PATHS)}")
    return impl


def dispatch(ctx: StageContext, x):
    """Default ``dispatch``: the identity (on one device the tokens are already where the experts are; expert
    parallelism installs the ``all_to_all`` here, :mod:`moejax.parallel.expert_parallel`)."""
    return x


def expert(ctx: StageContext, x):
    """Default ``expert``: the SwiGLU experts over the dispatched value (see the table). Under tensor
    parallelism (:mod:`moejax.nn.sharding`) the weights are ``d_ff`` shards (gate/up column-parallel, down
    row-parallel) and the partial outputs are summed over the tensor axis here, on the expert output rows
    (before ``combine``)."""
    return tensor_output(_expert_ffn(ctx, x))


def _expert_ffn(ctx: StageContext, x):
    w = ctx.expert_weights
    if ctx.path in CAPACITY_PATHS:
        return swiglu_capacity(x[None], *w)[0]  # row-wise along axis 1
    ids = ctx.routing.expert_ids.reshape(ctx.tokens.shape[0], -1)
    return _grouped(ctx.path).run(x, w, ctx.layout, ids, ctx.slot_weights(), ctx.block_rows)


def combine(ctx: StageContext, y):
    """Default ``combine``: the identity (expert parallelism installs the reverse ``all_to_all`` here)."""
    return y


def inverse_order(ctx: StageContext, y):
    """Default ``inverse_order``: un-permute the rows and sum each token's slots with its routing weights
    (the identity where the expert stage already combined: ``dense``, ``gather``, ``tiles``)."""
    if ctx.path in CAPACITY_PATHS:
        G = ctx.routing.expert_ids.shape[0]
        E, C, D = ctx.cfg.num_experts, ctx.capacity, y.shape[-1]
        y = jnp.swapaxes(y.reshape(E, G, C, D), 0, 1).reshape(G * E * C, D)
    elif not _grouped(ctx.path).sorted_rows:
        return y
    return dsp.combine_rows(y, ctx.layout, ctx.slot_weights())


DEFAULT_STAGES: Mapping[str, StageFn] = {"gate": gate, "order": order, "dispatch": dispatch, "expert": expert,
                                         "combine": combine, "inverse_order": inverse_order}
"""The default implementation of each stage (all paths)."""


# ------------------------------------------------------------------------------------------- registry

class MoEHooks:
    """A registry of before/after stage hooks.

    A hook is ``fn(ctx: StageContext, value) -> replacement or None``; it runs at trace time. Register with
    ``hooks.register(stage, when, fn)`` or as a decorator ``@hooks.register(stage, when)``; attach with
    ``MoE(..., hooks=hooks)`` or ``with moe_hooks(hooks):``. Hooks of one stage and time run in
    registration order.
    """

    def __init__(self):
        self._hooks: dict[tuple[str, str], list[HookFn]] = {(s, w): [] for s in STAGES for w in WHEN}

    def register(self, stage: str, when: str = "after", fn: HookFn | None = None):
        """Add ``fn`` to run ``when`` (``"before"``/``"after"``) ``stage``; returns ``fn`` (or, without
        ``fn``, a decorator). Raises ``ValueError`` for an unknown stage or time, ``TypeError`` if ``fn`` is
        not callable."""
        check_stage(stage)
        check_when(when)
        if fn is None:
            return lambda f: self.register(stage, when, f)
        if not callable(fn):
            raise TypeError(f"hook for {when} {stage!r} must be callable, got {type(fn).__name__}")
        self._hooks[(stage, when)].append(fn)
        return fn

    def remove(self, stage: str, when: str, fn: HookFn) -> None:
        """Remove a registered hook (``ValueError`` if it is not registered there)."""
        hooks = self._hooks[(check_stage(stage), check_when(when))]
        if fn not in hooks:
            raise ValueError(f"{fn!r} is not registered {when} {stage!r}")
        hooks.remove(fn)

    def clear(self) -> None:
        """Remove every hook."""
        for v in self._hooks.values():
            v.clear()

    def get(self, stage: str, when: str) -> tuple[HookFn, ...]:
        """The hooks registered ``when`` ``stage``, in order."""
        return tuple(self._hooks[(check_stage(stage), check_when(when))])

    def __len__(self) -> int:
        return sum(len(v) for v in self._hooks.values())


_HOOKS: contextvars.ContextVar[tuple[MoEHooks, ...]] = contextvars.ContextVar("moejax_moe_hooks", default=())
_STAGES: contextvars.ContextVar[tuple[tuple[str, StageFn], ...]] = contextvars.ContextVar("moejax_moe_stages",
                                                                                          default=())


def stage_overrides(stages: Mapping[str, StageFn] | None) -> tuple[tuple[str, StageFn], ...]:
    """Validate a ``{stage: impl}`` mapping (``ValueError`` for unknown stages, ``TypeError`` for a
    non-callable) and return it as a hashable tuple of pairs in stage order."""
    if not stages:
        return ()
    for name, fn in dict(stages).items():
        check_stage(name)
        if not callable(fn):
            raise TypeError(f"implementation of MoE stage {name!r} must be callable, got {type(fn).__name__}")
    return tuple((s, stages[s]) for s in STAGES if s in stages)


@contextlib.contextmanager
def moe_hooks(*registries: MoEHooks):
    """Trace-time context: the hooks of ``registries`` run in every MoE layer traced inside (after the layer's
    own hooks and those of enclosing ``moe_hooks`` blocks)."""
    for h in registries:
        if not isinstance(h, MoEHooks):
            raise TypeError(f"moe_hooks takes MoEHooks registries, got {type(h).__name__}")
    with scoped(_HOOKS, _HOOKS.get() + tuple(registries)):
        yield


@contextlib.contextmanager
def moe_stages(**impls: StageFn):
    """Trace-time context: every MoE layer traced inside uses ``impls`` (``stage=fn``) in place of its stage
    implementations (over a layer's own ``stages`` and enclosing ``moe_stages`` blocks)."""
    new = dict(_STAGES.get())
    new.update(stage_overrides(impls))
    with scoped(_STAGES, tuple(new.items())):
        yield


class MoEExecutor(Protocol):
    """Runs a MoE layer's routed part somewhere other than on the local device's own experts (the plug for
    expert parallelism: :class:`moejax.parallel.expert_parallel.EPContext`). Installed for a trace with
    :func:`moe_executor`; the layer then calls ``executor.run_moe(layer, xt, token_mask=..., token_index=...,
    rng=..., train=...)`` instead of its local stages, which returns ``(out [T, D], aux)`` (typically by
    :func:`run_stages` with the executor's own path, weights and ``defaults``)."""

    def run_moe(self, layer, xt: jax.Array, **kwargs) -> tuple[jax.Array, dict]: ...


_EXECUTOR: contextvars.ContextVar[Any] = contextvars.ContextVar("moejax_moe_executor", default=None)


@contextlib.contextmanager
def moe_executor(executor: MoEExecutor | None):
    """Trace-time context: every MoE layer traced inside runs its routed part through ``executor`` (None: the
    local stages)."""
    if executor is not None and not callable(getattr(executor, "run_moe", None)):
        raise TypeError(f"moe_executor takes an object with a run_moe method, got {type(executor).__name__}")
    with scoped(_EXECUTOR, executor):
        yield


def current_executor() -> MoEExecutor | None:
    """The :class:`MoEExecutor` installed for the current trace (None: local)."""
    return _EXECUTOR.get()


def active_stages(layer_stages=(), defaults: Mapping[str, StageFn] | None = None) -> dict[str, StageFn]:
    """The implementations a layer traced now uses: ``defaults`` (:data:`DEFAULT_STAGES`, or an executor's) <
    the layer's ``stages`` < :func:`moe_stages`."""
    impls = dict(DEFAULT_STAGES if defaults is None else defaults)
    impls.update(layer_stages or ())
    impls.update(_STAGES.get())
    return impls


def active_hooks(layer_hooks: MoEHooks | None = None) -> tuple[MoEHooks, ...]:
    """The hook registries a layer traced now runs: its own, then those of :func:`moe_hooks` blocks."""
    return ((layer_hooks,) if layer_hooks is not None else ()) + _HOOKS.get()


# ----------------------------------------------------------------------------------------------- driver

def _run_hooks(ctx: StageContext, stage: str, when: str, inputs, value, registries):
    """Run the ``when`` hooks of ``stage``; each may replace ``value`` by returning something else than None.
    ``ctx.inputs`` is the stage's input (``None``: the current value, as for the before-hooks)."""
    for reg in registries:
        for fn in reg.get(stage, when):
            ctx.stage, ctx.when, ctx.inputs = stage, when, value if inputs is None else inputs
            with jax.named_scope(f"moe_hook/{when}_{stage}"):
                new = fn(ctx, value)
            value = value if new is None else new
    return value


def _run_stage(ctx: StageContext, stage: str, value, impls, registries):
    value = _run_hooks(ctx, stage, "before", None, value, registries)
    ctx.stage, ctx.when, ctx.inputs = stage, None, value
    with jax.named_scope(f"moe/{stage}"):
        out = impls[stage](ctx, value)
    out = _run_hooks(ctx, stage, "after", value, out, registries)
    ctx.when = None
    return out


def run_stages(layer, xt: jax.Array, *, path: str, capacity_factor: float, expert_weights: tuple, ep=None,
               token_mask=None, token_index=None, rng=None, train: bool = False, expert_ids=None,
               defaults: Mapping[str, StageFn] | None = None):
    """Run the six stages of ``layer`` on flat tokens ``xt [T, D]``; returns ``(out [T, D], aux)``.

    ``path`` is one of :data:`PATHS`; ``ep`` the expert-parallel context (``path="expert_parallel"``);
    ``defaults`` the stage implementations of this path (default :data:`DEFAULT_STAGES`: an executor such as
    expert parallelism passes its own, with its collectives in ``dispatch``/``combine``).
    ``aux`` holds :func:`~moejax.nn.routers.router_statistics` of the routing, ``dropped`` and, on the
    capacity paths, ``capacity_used``, plus whatever hooks added.
    """
    if path not in PATHS:
        raise ValueError(f"unknown MoE path {path!r}; allowed: {', '.join(PATHS)}")
    defaults = DEFAULT_STAGES if defaults is None else defaults
    impls = active_stages(getattr(layer, "stages", ()), defaults)
    registries = active_hooks(getattr(layer, "hooks", None))
    ctx = StageContext(layer=layer, cfg=layer.cfg, path=path, ep=ep, tokens=xt, token_mask=token_mask,
                       token_index=token_index, rng=rng, train=train, expert_ids=expert_ids,
                       capacity_factor=capacity_factor, expert_weights=expert_weights, defaults=defaults)
    r = _run_stage(ctx, "gate", xt, impls, registries)
    ctx.routing = r
    G = r.expert_ids.shape[0]
    ctx.group_mask = None if token_mask is None else token_mask.reshape(G, -1)
    with jax.named_scope("moe/gate"):
        ctx.aux.update(router_statistics(r, ctx.group_mask))
    # tensor parallelism: the experts' input gradient (from their d_ff shards) is summed over the tensor axis
    # where the tokens enter ``order`` (Megatron's f; the router's own input gradient is not)
    v = tensor_input(xt)
    for stage in STAGES[1:]:
        v = _run_stage(ctx, stage, v, impls, registries)
    if ctx.layout is None:
        raise ValueError("the MoE 'order' stage must set ctx.layout (a moejax.nn.dispatch.Layout)")
    aux = ctx.aux
    aux["dropped"] = ctx.layout.dropped
    if path in CAPACITY_PATHS:  # kept rows (capped at C); dropless keeps router_statistics' group max
        aux["capacity_used"] = ctx.layout.capacity_used
    return v, aux
