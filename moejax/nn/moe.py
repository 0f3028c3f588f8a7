"""The MoE layer: route -> dispatch -> experts -> combine (+ shared experts, aux statistics)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.config import MoEConfig
from moejax.nn import dispatch as dsp
from moejax.nn.experts import (
    SwiGLU,
    SwiGLUExperts,
    moe_swiglu_tiles,
    swiglu_capacity,
    swiglu_dense_combine,
    swiglu_pallas,
    swiglu_ragged,
)
from moejax.nn.routers import RouterOutput, make_router, router_statistics
from moejax.parallel import expert_parallel

DENSE_MAX_ROWS = 256


def resolve_grouped_impl(impl: str, tokens: int, num_experts: int) -> str:
    """Pick the dropless grouped-compute method for a call with ``tokens`` tokens (static under jit).

    ``auto``: ``dense`` when ``tokens * num_experts <= DENSE_MAX_ROWS`` (small decode batches: one batched
    matmul over all experts beats sorting and looping), otherwise ``tiles`` on CPU (``ragged_dot`` is a dense
    masked product there) and, on GPU/TPU, ``pallas`` where ``pallas_kernels`` lists the backend as validated
    and measured faster (none yet), else ``ragged_dot``.
    """
    if impl != "auto":
        return impl
    if tokens * num_experts <= DENSE_MAX_ROWS:
        return "dense"
    if jax.default_backend() == "cpu":
        return "tiles"
    from pallas_kernels.grouped_matmul import resolve_impl

    return "pallas" if resolve_impl("auto") == "pallas" else "ragged_dot"


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
    """

    def __init__(self, d_model: int, cfg: MoEConfig, *, init_std: float = 0.02, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        cfg.validate()
        self.cfg = cfg
        self.dtype = dtype
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
        ctx = expert_parallel.current()
        if ctx is not None and expert_ids is not None:
            raise NotImplementedError("expert_ids (pre-gated routing) under expert parallelism")
        if expert_ids is not None:
            expert_ids = expert_ids.reshape(xt.shape[0], -1)
        if token_mask is not None:
            token_mask = token_mask.reshape(-1)
        if ctx is not None:
            out, aux = expert_parallel.ep_moe(self, xt, ctx, token_mask=token_mask, token_index=token_index, rng=rng,
                                              train=train)
        else:
            out, aux = self._local(xt, token_mask=token_mask, token_index=token_index, rng=rng, train=train,
                                   expert_ids=expert_ids)
        if cfg.num_shared_experts:
            out = out + self.shared_output(xt)
        return out.reshape(shape).astype(x.dtype), aux

    def shared_output(self, xt):
        """The shared experts' output for flat tokens ``xt [T, D]`` (gated as Qwen2-MoE when configured)."""
        s = self.shared(xt)
        if self.cfg.shared_expert_gate:
            g = jax.nn.sigmoid(jnp.einsum("td,do->to", xt.astype(jnp.float32),
                                          self.shared_gate[...].astype(jnp.float32)))
            s = (s.astype(jnp.float32) * g).astype(s.dtype)
        return s

    def _local(self, xt, *, token_mask=None, token_index=None, rng=None, train=False, expert_ids=None):
        """Single-device (or data-parallel) path: route, dispatch, experts, combine."""
        cfg = self.cfg
        T, D = xt.shape
        r, tm = self.route(xt, token_mask=token_mask, token_index=token_index, rng=rng, train=train,
                           expert_ids=expert_ids)
        aux = router_statistics(r, tm)
        G, S, K = r.expert_ids.shape
        E = cfg.num_experts
        wg, wu, wd = self.experts.weights()
        weights, ids, mask = r.weights.reshape(T, K), r.expert_ids.reshape(T, K), r.mask.reshape(T, K)
        if cfg.dispatch == "capacity":
            C = dsp.layer_capacity(cfg.router.type, S, E, K, cfg.capacity_factor)
            layout = dsp.capacity_layout(r.expert_ids, r.mask, E, C)
            xb = dsp.gather_rows(xt, layout).reshape(G, E, C, D)
            out = dsp.combine_rows(swiglu_capacity(xb, wg, wu, wd).reshape(G * E * C, D), layout, weights)
        elif (impl := resolve_grouped_impl(cfg.grouped_impl, T, E)) == "dense":
            layout = dsp.dense_layout(ids, mask, E)
            out = swiglu_dense_combine(xt, wg, wu, wd, dsp.dense_combine_weights(weights, ids, E))
        elif impl in ("ragged_dot", "pallas"):
            layout = dsp.dropless_layout(ids, mask, E, 1)
            grouped = swiglu_ragged if impl == "ragged_dot" else swiglu_pallas
            y = grouped(dsp.gather_rows(xt, layout), wg, wu, wd, layout)
            out = dsp.combine_rows(y, layout, weights)
        else:
            bt = cfg.block_rows or dsp.default_block_rows(T * K, E)
            layout = dsp.dropless_layout(ids, mask, E, bt)
            out = moe_swiglu_tiles(xt, wg, wu, wd, layout, weights, bt)
        aux["dropped"] = layout.dropped
        if cfg.dispatch == "capacity":  # kept rows (capped at C); dropless keeps router_statistics' group max
            aux["capacity_used"] = layout.capacity_used
        return out, aux
