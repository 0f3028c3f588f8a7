"""The MoE layer: FSMoE's six stages gate -> order -> dispatch -> expert -> combine -> inverse order
(:mod:`moejax.nn.stages`: swappable, with before/after hooks) + shared experts and aux statistics."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.config import MoEConfig
from moejax.nn import stages as _stages
from moejax.nn.experts import (
    ATOMIC_IMPLS,
    SwiGLU,
    SwiGLUExperts,
    grouped_experts,
    resolve_grouped_impl,
)
from moejax.nn.routers import (
    CartesianRouter,
    RouterOutput,
    make_router,
    product_router_statistics,
)


def forced_routing(expert_ids, token_mask, num_experts: int) -> RouterOutput:
    """A :class:`RouterOutput` for given ``expert_ids [G, S, K]``: weight ``1/K`` each, one-hot probabilities."""
    G, S, K = expert_ids.shape
    ids = expert_ids.astype(jnp.int32)
    mask = jnp.ones((G, S, K), bool) if token_mask is None else jnp.broadcast_to(token_mask[..., None], (G, S, K))
    probs = jnp.mean(jax.nn.one_hot(ids, num_experts, dtype=jnp.float32), axis=2)
    return RouterOutput(ids, jnp.where(mask, 1.0 / K, 0.0), mask, probs, jnp.zeros((G, S, num_experts), jnp.float32))


class MoE(nnx.Module):
    """A mixture-of-experts SwiGLU FFN.

    ``__call__(x [..., D]) -> (y [..., D], aux)`` where ``aux`` holds the per-layer statistics
    ``load_balance_loss``, ``z_loss``, ``expert_load [E]`` (routed slots per expert, before drops),
    ``dropped`` (slots dropped by capacity) and ``capacity_used`` (the dynamic capacity Tutel's ``cf < 0``
    would use: the largest kept per-expert row count of a group).

    Keyword arguments: ``token_mask`` (``[...]`` bool; masked tokens, e.g. padding, are not routed and do not
    count in the statistics), ``token_index`` (``[...]`` int; global token index for per-token randomness,
    default ``arange``), ``rng`` (a PRNG key for stochastic routers, used only when ``train``).

    The routed part runs as the six stages of :mod:`moejax.nn.stages`, locally and under expert parallelism.
    ``hooks`` (a :class:`moejax.nn.stages.MoEHooks`) run before/after this layer's stages; ``stages``
    (``{stage: fn}``) replaces this layer's stage implementations (see :func:`moejax.nn.stages.moe_stages`
    and :func:`moejax.nn.stages.moe_hooks` for every layer traced in a block). Both are static: they are
    applied at trace time and are not part of the layer's state.
    """

    def __init__(self, d_model: int, cfg: MoEConfig, *, init_std: float = 0.02, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs, hooks: _stages.MoEHooks | None = None,
                 stages: dict | None = None):
        cfg.validate()
        if hooks is not None and not isinstance(hooks, _stages.MoEHooks):
            raise TypeError(f"MoE(hooks=...) takes a moejax.nn.stages.MoEHooks, got {type(hooks).__name__}")
        self.cfg = cfg
        self.dtype = dtype
        self.hooks = hooks
        self.stages = _stages.stage_overrides(stages)
        self.router = make_router(d_model, cfg.num_experts, cfg.router, capacity_factor=cfg.capacity_factor,
                                  init_std=init_std, param_dtype=param_dtype, rngs=rngs)
        self.experts = SwiGLUExperts(cfg.num_experts, d_model, cfg.d_ff, init_std=init_std,
                                     param_dtype=param_dtype, rngs=rngs)
        if cfg.num_shared_experts:
            width = cfg.num_shared_experts * (cfg.shared_d_ff or cfg.d_ff)
            self.shared = SwiGLU(d_model, width, init_std=init_std, param_dtype=param_dtype, rngs=rngs)
            if cfg.shared_expert_gate:
                self.shared_gate = nnx.Param(
                    nnx.initializers.normal(stddev=init_std)(rngs.params(), (d_model, 1), param_dtype),
                    logical_axes=("embed", None))

    def route(self, xt, *, token_mask=None, token_index=None, rng=None, train=False, expert_ids=None):
        """Route flat tokens ``xt [T, D]`` in routing groups; returns (RouterOutput, group-shaped mask).

        ``expert_ids`` (``[T]`` or ``[T, K]`` int) bypasses the router: each token goes to the given experts
        with combine weight ``1 / K`` (a pre-gating router, as in Read-ME, decides them before the model runs).
        """
        T, D = xt.shape
        gs = self.cfg.router.group_size or T
        if T % gs:
            raise ValueError(f"RouterConfig.group_size={gs} must divide the number of tokens in a call ({T})")
        G = T // gs
        tm = None if token_mask is None else token_mask.reshape(G, gs)
        if expert_ids is not None:
            return forced_routing(expert_ids.reshape(G, gs, -1), tm, self.cfg.num_experts), tm
        ti = (jnp.arange(T, dtype=jnp.int32) if token_index is None else token_index).reshape(G, gs)
        return self.router(xt.reshape(G, gs, D), token_mask=tm, token_index=ti, rng=rng, train=train), tm

    def __call__(self, x, *, token_mask=None, token_index=None, rng=None, train=False, expert_ids=None):
        cfg = self.cfg
        shape = x.shape
        D = shape[-1]
        xt = x.reshape(-1, D).astype(self.dtype)
        executor = _stages.current_executor()
        if executor is not None and expert_ids is not None:
            raise NotImplementedError("expert_ids (pre-gated routing) under expert parallelism (a MoE executor "
                                      "is installed)")
        if expert_ids is not None:
            expert_ids = expert_ids.reshape(xt.shape[0], -1)
        if token_mask is not None:
            token_mask = token_mask.reshape(-1)
        if executor is not None:
            out, aux = executor.run_moe(self, xt, token_mask=token_mask, token_index=token_index, rng=rng,
                                        train=train)
        else:
            out, aux = self._local(xt, token_mask=token_mask, token_index=token_index, rng=rng, train=train,
                                   expert_ids=expert_ids)
        if cfg.num_shared_experts:
            out = out + self.shared_output(xt)
        return out.reshape(shape).astype(x.dtype), aux

    def apply_experts(self, xt, expert_ids, weights, mask, *, expert_weights=None, method: str | None = None,
                      block_rows: int | None = None):
        """The routed experts on given routing plus the shared experts: ``xt [T, D]``, ``expert_ids``/``weights``/
        ``mask [T, K]`` (as :meth:`route` gives them, flattened). A runner that routes, then decides where the
        experts' weights come from (offloaded serving: a slot buffer, ``expert_ids`` remapped to slots), passes
        ``expert_weights`` (stacked ``(w_gate, w_up, w_down)``, default the layer's own) and ``method`` (a
        :data:`~moejax.nn.experts.GROUPED_IMPLS` name, default ``MoEConfig.grouped_impl`` resolved for ``T``).
        Returns ``[T, D]`` in ``xt``'s dtype."""
        w = self.experts.weights() if expert_weights is None else expert_weights
        T, K = expert_ids.shape
        method = method or resolve_grouped_impl(self.cfg.grouped_impl, T, w[0].shape[0], K)
        yt = xt.astype(self.dtype)
        out = grouped_experts(yt, w, expert_ids, weights, mask, method=method,
                              block_rows=block_rows or self.cfg.block_rows)
        if self.cfg.num_shared_experts:
            out = out + self.shared_output(yt)
        return out.astype(xt.dtype)

    def shared_output(self, xt):
        """The shared experts' output for flat tokens ``xt [T, D]`` (gated as Qwen2-MoE when configured)."""
        s = self.shared(xt)
        if self.cfg.shared_expert_gate:
            g = jax.nn.sigmoid(jnp.einsum("td,do->to", xt.astype(jnp.float32),
                                          self.shared_gate[...].astype(jnp.float32)))
            s = (s.astype(jnp.float32) * g).astype(s.dtype)
        return s

    def _local(self, xt, *, token_mask=None, token_index=None, rng=None, train=False, expert_ids=None):
        """Single-device (or data-parallel) path: the six stages of :mod:`moejax.nn.stages` (gate, order,
        dispatch and combine as identities, expert, inverse order) on the configured dispatch path."""
        cfg = self.cfg
        path = "capacity" if cfg.dispatch == "capacity" else resolve_grouped_impl(
            cfg.grouped_impl, xt.shape[0], cfg.num_experts, cfg.router.effective_top_k)
        return _stages.run_stages(self, xt, path=path, capacity_factor=cfg.capacity_factor,
                                  expert_weights=self.experts.weights(), token_mask=token_mask,
                                  token_index=token_index, rng=rng, train=train, expert_ids=expert_ids)


class AtomicMoE(nnx.Module):
    """OmniMoE's FFN: atomic experts (one row of ``U`` and of ``V`` each) under a Cartesian product router,
    plus the dense SwiGLU branch (``num_shared_experts * shared_d_ff`` wide).

    ``y = shared(x) + sum_k g_k silu(x . U[e_k]) V[e_k]`` over the ``K`` experts the
    :class:`~moejax.nn.routers.CartesianRouter` picks among ``N = n^2`` (``MoEConfig.num_experts``), run by
    :data:`~moejax.nn.experts.ATOMIC_IMPLS` (``MoEConfig.atomic_impl``). The same interface as :class:`MoE`
    (``__call__``, :meth:`route`, :meth:`apply_experts`, :meth:`shared_output`); ``aux`` holds head-level
    ``load_balance_loss`` and ``z_loss``, ``expert_load [N]``, ``dropped`` (always 0) and, in training,
    ``norm_stats [2 heads, 2 (mean, var), n]``: the router's running batch-norm statistics after this call
    (the trainer stores them: the layer runs inside scanned, jitted code where module state changes are local).
    Under a MoE executor (the trainer's ``shard_map`` step) the executor runs it: data parallel works (the
    tables replicated, the router's statistics reduced over the batch axes); sharding the experts and
    pre-gated ``expert_ids`` raise ``NotImplementedError``; ``token_index``/``rng`` are unused (the router is
    deterministic).
    """

    def __init__(self, d_model: int, cfg: MoEConfig, *, init_std: float = 0.02, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        cfg.validate()
        if cfg.expert_type != "atomic":
            raise ValueError(f"AtomicMoE needs MoEConfig.expert_type='atomic', got {cfg.expert_type!r}")
        self.cfg, self.dtype = cfg, dtype
        self.router = CartesianRouter(d_model, cfg.num_experts, cfg.router.top_k, init_std=init_std,
                                      param_dtype=param_dtype, rngs=rngs)
        init = nnx.initializers.normal(stddev=init_std)
        self.u = nnx.Param(init(rngs.params(), (cfg.num_experts, d_model), param_dtype),
                           logical_axes=(None, "embed"))
        self.v = nnx.Param(init(rngs.params(), (cfg.num_experts, d_model), param_dtype),
                           logical_axes=(None, "embed"))
        if cfg.num_shared_experts:
            width = cfg.num_shared_experts * (cfg.shared_d_ff or cfg.d_ff)
            self.shared = SwiGLU(d_model, width, init_std=init_std, param_dtype=param_dtype, rngs=rngs)

    def route(self, xt, *, token_mask=None, train=False, axis_name=None, **unused):
        """Route flat tokens ``xt [T, D]``: ``(ProductRouterOutput [T, K], None)``. ``axis_name``: the batch
        axes (inside ``shard_map``) the router's batch statistics are reduced over."""
        if unused.get("expert_ids") is not None:
            raise NotImplementedError("AtomicMoE: pre-gated expert_ids (the Cartesian router always routes)")
        return self.router(xt, token_mask=token_mask, train=train, axis_name=axis_name), None

    def __call__(self, x, *, token_mask=None, token_index=None, rng=None, train=False, expert_ids=None):
        if expert_ids is not None:
            raise NotImplementedError("AtomicMoE: pre-gated expert_ids (the Cartesian router always routes)")
        shape = x.shape
        xt = x.reshape(-1, shape[-1]).astype(self.dtype)
        tm = None if token_mask is None else token_mask.reshape(-1)
        executor = _stages.current_executor()
        if executor is not None:  # e.g. the trainer's shard_map step: the executor decides (data parallel only)
            out, aux = executor.run_moe(self, xt, token_mask=tm, token_index=token_index, rng=rng, train=train)
        else:
            out, aux = self.local(xt, token_mask=tm, train=train)
        return out.reshape(shape).astype(x.dtype), aux

    def local(self, xt, *, token_mask=None, train=False, axis_name=None):
        """Route and run flat tokens ``xt [T, D]`` on this device's (replicated) tables: ``(out, aux)``.
        ``axis_name``: batch axes to reduce the router's batch statistics over (data parallel in
        ``shard_map``)."""
        r, _ = self.route(xt, token_mask=token_mask, train=train, axis_name=axis_name)
        out = self.apply_experts(xt, r.expert_ids, r.weights, r.mask)
        aux = product_router_statistics(r, self.cfg.num_experts, token_mask=token_mask)
        aux["dropped"] = jnp.int32(0)
        aux["capacity_used"] = jnp.int32(0)
        if train:
            aux["norm_stats"] = jnp.stack([jnp.stack([n.mean[...], n.var[...]])
                                           for n in (self.router.norm1, self.router.norm2)])
        return out, aux

    def apply_experts(self, xt, expert_ids, weights, mask, *, method: str | None = None, expert_weights=None,
                      block_rows=None):
        """Atomic experts on given routing (``[T, K]`` each) plus the dense branch; ``[T, D]``. ``method``: an
        :data:`~moejax.nn.experts.ATOMIC_IMPLS` name (default ``MoEConfig.atomic_impl``). ``expert_weights``
        (a runner's own copy of the experts, as offloading passes to :meth:`MoE.apply_experts`) is not
        supported; ``block_rows`` does not apply."""
        if expert_weights is not None:
            raise NotImplementedError("AtomicMoE.apply_experts: expert_weights (experts held outside the layer, "
                                      "e.g. offloaded) -- atomic experts stay in the layer's U/V tables")
        method = method or self.cfg.atomic_impl
        method = "expert_centric" if method == "auto" else method
        if method not in ATOMIC_IMPLS:
            raise ValueError(f"AtomicMoE: method must be one of {', '.join(map(repr, ATOMIC_IMPLS))}, got "
                             f"{method!r}")
        yt = xt.astype(self.dtype)
        w = jnp.where(mask, weights, 0.0)
        out = ATOMIC_IMPLS[method](yt, self.u[...], self.v[...], expert_ids, w)
        if self.cfg.num_shared_experts:
            out = out + self.shared_output(yt)
        return out.astype(xt.dtype)

    def shared_output(self, xt):
        """The dense SwiGLU branch for flat tokens ``xt [T, D]``."""
        return self.shared(xt)
