"""Routers: tokens in, (expert ids, combine weights, valid mask, aux statistics) out.

All routers share one interface. Input ``x`` is ``[G, S, D]``: ``G`` routing groups of ``S`` tokens (GShard's
groups: batch-dependent quantities -- capacity, Expert Choice selection, load statistics -- are defined per
group, so they mean the same thing on one device and under expert parallelism). The output
:class:`RouterOutput` holds per-token *slots* ``[G, S, K]``: an expert id, a combine weight and a validity mask.
Top-k style routers use ``K = top_k``; Expert Choice uses ``K = E`` with slot ``k`` meaning expert ``k``.

Randomness (GShard's second-expert coin, Gumbel noise, Switch jitter) is drawn from
``fold_in(rng, global_token_index)`` so the same token gets the same draw on any device layout.
Ties in top-k go to the lower expert index (``lax.top_k`` is stable).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.config import RouterConfig


class RouterBias(nnx.Variable):
    """Non-trainable routing bias (aux-loss-free load balancing); updated by :func:`aux_free_bias_update`."""


class RouterOutput(NamedTuple):
    expert_ids: jax.Array  # [G, S, K] int32
    weights: jax.Array     # [G, S, K] float32 combine weights (0 where mask is False)
    mask: jax.Array        # [G, S, K] bool: slot is routed (before any capacity drop)
    probs: jax.Array       # [G, S, E] float32 router probabilities (for the load-balancing loss)
    logits: jax.Array      # [G, S, E] float32 raw logits (for the z-loss)


def _per_token_keys(rng: jax.Array, token_index: jax.Array) -> jax.Array:
    return jax.vmap(lambda i: jax.random.fold_in(rng, i))(token_index.reshape(-1).astype(jnp.uint32))


def _per_token_uniform(rng, token_index, shape=()):
    keys = _per_token_keys(rng, token_index)
    u = jax.vmap(lambda k: jax.random.uniform(k, shape, jnp.float32))(keys)
    return u.reshape(token_index.shape + shape)


def _per_token_gumbel(rng, token_index, n):
    keys = _per_token_keys(rng, token_index)
    g = jax.vmap(lambda k: jax.random.gumbel(k, (n,), jnp.float32))(keys)
    return g.reshape(token_index.shape + (n,))


def _normal_init(std):
    return nnx.initializers.normal(stddev=std)


class Router(nnx.Module):
    """Base router: a linear gate ``x @ w [D, E]`` (subclasses may replace the score function)."""

    def __init__(self, d_model: int, num_experts: int, cfg: RouterConfig, *, init_std: float = 0.02,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        self.num_experts = num_experts
        self.w = nnx.Param(_normal_init(init_std)(rngs.params(), (d_model, num_experts), param_dtype),
                           logical_axes=("embed", None))  # replicated: every device routes over all experts

    def gate_logits(self, x: jax.Array) -> jax.Array:
        # Routing is computed in float32 whatever the compute dtype (as MaxText/Megatron do).
        return jnp.einsum("gsd,de->gse", x.astype(jnp.float32), self.w[...].astype(jnp.float32))

    def __call__(self, x, *, token_mask=None, token_index=None, rng=None, train=False) -> RouterOutput:
        raise NotImplementedError


def _finish(ids, weights, mask, probs, logits, token_mask):
    if token_mask is not None:
        mask = mask & token_mask[..., None]
    weights = jnp.where(mask, weights, 0.0)
    return RouterOutput(ids.astype(jnp.int32), weights.astype(jnp.float32), mask, probs, logits)


def _renormalize(w, normalize: bool):
    """Chosen weights renormalized to sum to one; a single expert gets exactly 1 (and a zero gradient)."""
    if not normalize:
        return w
    if w.shape[-1] == 1:
        return jnp.ones_like(w)
    return w / jnp.sum(w, axis=-1, keepdims=True)


class TopKRouter(Router):
    """Softmax over all experts, top-k, optional renormalization (Mixtral, Qwen2/3-MoE)."""

    def __call__(self, x, *, token_mask=None, token_index=None, rng=None, train=False):
        logits = self.gate_logits(x)
        probs = jax.nn.softmax(logits, axis=-1)
        k = self.cfg.effective_top_k
        w, ids = jax.lax.top_k(probs, k)
        return _finish(ids, _renormalize(w, self.cfg.normalize), jnp.ones(ids.shape, bool), probs, logits,
                       token_mask)


class SwitchRouter(Router):
    """Switch Transformer top-1: weight is the softmax probability; optional multiplicative jitter."""

    def __call__(self, x, *, token_mask=None, token_index=None, rng=None, train=False):
        if train and self.cfg.jitter > 0 and rng is not None:
            eps = self.cfg.jitter
            u = _per_token_uniform(rng, token_index, (x.shape[-1],))
            x = x * (1.0 - eps + 2.0 * eps * u).astype(x.dtype)
        logits = self.gate_logits(x)
        probs = jax.nn.softmax(logits, axis=-1)
        w, ids = jax.lax.top_k(probs, 1)
        return _finish(ids, w, jnp.ones(ids.shape, bool), probs, logits, token_mask)


class GShardRouter(Router):
    """GShard top-2: first expert by argmax; second kept with probability ``min(1, 2 * g2)``.

    ``g1, g2`` are the two chosen probabilities renormalized to sum to one (as in GShard's Algorithm 1 and
    fairseq's ``top2gating``). Without an ``rng`` (evaluation) the second expert is always kept.
    """

    def __call__(self, x, *, token_mask=None, token_index=None, rng=None, train=False):
        logits = self.gate_logits(x)
        probs = jax.nn.softmax(logits, axis=-1)
        E = self.num_experts
        e1 = jnp.argmax(probs, axis=-1)
        policy = self.cfg.second_policy
        stochastic = train and rng is not None
        if policy == "sampling" and stochastic:
            rng, sub = jax.random.split(rng)
            noisy = logits + _per_token_gumbel(sub, token_index, E)
        else:
            noisy = logits
        noisy = jnp.where(jax.nn.one_hot(e1, E, dtype=bool), -jnp.inf, noisy)
        e2 = jnp.argmax(noisy, axis=-1)
        g1 = jnp.take_along_axis(probs, e1[..., None], -1)[..., 0]
        g2 = jnp.take_along_axis(probs, e2[..., None], -1)[..., 0]
        denom = g1 + g2
        g1, g2 = g1 / denom, g2 / denom
        keep2 = jnp.ones_like(g2, bool)
        if policy == "random" and stochastic:
            keep2 = 2.0 * g2 > _per_token_uniform(rng, token_index)
        ids = jnp.stack([e1, e2], -1)
        w = jnp.stack([g1, g2], -1)
        mask = jnp.stack([jnp.ones_like(keep2), keep2], -1)
        return _finish(ids, w, mask, probs, logits, token_mask)


class SigmoidRouter(Router):
    """DeepSeek-V3 routing: sigmoid scores, selection on score + aux-free bias, optional group limit."""

    def __init__(self, d_model, num_experts, cfg, *, init_std=0.02, param_dtype=jnp.float32, rngs):
        super().__init__(d_model, num_experts, cfg, init_std=init_std, param_dtype=param_dtype, rngs=rngs)
        self.bias = RouterBias(jnp.zeros((num_experts,), jnp.float32), logical_axes=(None,))

    def __call__(self, x, *, token_mask=None, token_index=None, rng=None, train=False):
        logits = self.gate_logits(x)
        scores = jax.nn.sigmoid(logits)
        choice = scores + jax.lax.stop_gradient(self.bias[...])
        cfg, E = self.cfg, self.num_experts
        if cfg.n_groups > 1:
            grouped = choice.reshape(choice.shape[:-1] + (cfg.n_groups, E // cfg.n_groups))
            gscore = jnp.sum(jax.lax.top_k(grouped, min(2, E // cfg.n_groups))[0], axis=-1)
            _, gidx = jax.lax.top_k(gscore, cfg.topk_groups)
            gmask = jnp.sum(jax.nn.one_hot(gidx, cfg.n_groups, dtype=jnp.int32), axis=-2) > 0
            emask = jnp.repeat(gmask, E // cfg.n_groups, axis=-1)
            choice = jnp.where(emask, choice, -jnp.inf)
        _, ids = jax.lax.top_k(choice, cfg.top_k)
        w = jnp.take_along_axis(scores, ids, -1)
        if cfg.normalize:
            w = w / (jnp.sum(w, axis=-1, keepdims=True) + 1e-20)
        w = w * cfg.scaling_factor
        probs = scores / jnp.sum(scores, axis=-1, keepdims=True)
        return _finish(ids, w, jnp.ones(ids.shape, bool), probs, logits, token_mask)


class XMoERouter(Router):
    """X-MoE: low-rank projection, cosine similarity to expert embeddings, learnable temperature."""

    def __init__(self, d_model, num_experts, cfg, *, init_std=0.02, param_dtype=jnp.float32, rngs):
        self.cfg = cfg
        self.num_experts = num_experts
        self.proj = nnx.Param(_normal_init(init_std)(rngs.params(), (d_model, cfg.xmoe_dim), param_dtype),
                              logical_axes=("embed", None))
        self.expert_emb = nnx.Param(_normal_init(1.0)(rngs.params(), (num_experts, cfg.xmoe_dim), param_dtype),
                                    logical_axes=(None, None))
        self.temperature = nnx.Param(jnp.full((), cfg.xmoe_init_temperature, param_dtype))

    def gate_logits(self, x):
        z = jnp.einsum("gsd,dr->gsr", x.astype(jnp.float32), self.proj[...].astype(jnp.float32))
        z = z * jax.lax.rsqrt(jnp.sum(z * z, -1, keepdims=True) + 1e-12)
        e = self.expert_emb[...].astype(jnp.float32)
        e = e * jax.lax.rsqrt(jnp.sum(e * e, -1, keepdims=True) + 1e-12)
        return jnp.einsum("gsr,er->gse", z, e) / self.temperature[...].astype(jnp.float32)

    def __call__(self, x, *, token_mask=None, token_index=None, rng=None, train=False):
        logits = self.gate_logits(x)
        probs = jax.nn.softmax(logits, axis=-1)
        w, ids = jax.lax.top_k(probs, self.cfg.top_k)
        return _finish(ids, _renormalize(w, self.cfg.normalize), jnp.ones(ids.shape, bool), probs, logits,
                       token_mask)


def expert_choice_capacity(group_tokens: int, num_experts: int, capacity_factor: float) -> int:
    """Tokens each expert takes per routing group under Expert Choice."""
    cf = abs(capacity_factor) if capacity_factor != 0 else 1.0
    return max(1, min(group_tokens, math.ceil(cf * group_tokens / num_experts - 1e-9)))


class ExpertChoiceRouter(Router):
    """Expert Choice: each expert takes its top-``capacity`` tokens of a group by softmax probability."""

    def __init__(self, d_model, num_experts, cfg, *, capacity_factor: float = 1.0, init_std=0.02,
                 param_dtype=jnp.float32, rngs):
        super().__init__(d_model, num_experts, cfg, init_std=init_std, param_dtype=param_dtype, rngs=rngs)
        self.capacity_factor = capacity_factor

    def __call__(self, x, *, token_mask=None, token_index=None, rng=None, train=False):
        logits = self.gate_logits(x)
        probs = jax.nn.softmax(logits, axis=-1)  # [G, S, E]
        G, S, E = probs.shape
        c = expert_choice_capacity(S, E, self.capacity_factor)
        score = probs if token_mask is None else jnp.where(token_mask[..., None], probs, -1.0)
        _, tok = jax.lax.top_k(jnp.swapaxes(score, 1, 2), c)  # [G, E, c], ties -> lower token index
        chosen = jnp.sum(jax.nn.one_hot(tok, S, dtype=jnp.int32), axis=-2) > 0  # [G, E, S]
        mask = jnp.swapaxes(chosen, 1, 2)  # [G, S, E]
        ids = jnp.broadcast_to(jnp.arange(E, dtype=jnp.int32), (G, S, E))
        return _finish(ids, probs, mask, probs, logits, token_mask)


_ROUTERS = {"topk": TopKRouter, "switch": SwitchRouter, "gshard": GShardRouter, "sigmoid": SigmoidRouter,
            "xmoe": XMoERouter, "expert_choice": ExpertChoiceRouter}


def make_router(d_model: int, num_experts: int, cfg: RouterConfig, *, capacity_factor: float = 1.0,
                init_std: float = 0.02, param_dtype=jnp.float32, rngs: nnx.Rngs) -> Router:
    """Build the router named by ``cfg.type``."""
    cfg.validate(num_experts)
    kw = dict(init_std=init_std, param_dtype=param_dtype, rngs=rngs)
    if cfg.type == "expert_choice":
        kw["capacity_factor"] = capacity_factor
    return _ROUTERS[cfg.type](d_model, num_experts, cfg, **kw)


# ------------------------------------------------------------------------------------------ statistics

def router_statistics(out: RouterOutput, token_mask=None) -> dict:
    """Aux losses and loads of one routing, computed per routing group and averaged over groups.

    - ``load_balance_loss``: Switch/GShard ``E * sum_e f_e * P_e`` (``f_e``: share of routed slots that go to
      expert ``e``; ``P_e``: mean router probability of ``e``); 1.0 at perfect balance.
    - ``z_loss``: mean over tokens of ``logsumexp(logits) ** 2``.
    - ``expert_load``: routed slots per expert, summed over groups (before capacity drops), float32 ``[E]``.
    - ``capacity_used``: the largest routed-slot count of an expert within a group (int32), the capacity a
      dropless group needs (Tutel's dynamic capacity before its cap).
    """
    G, S, E = out.probs.shape
    valid = jnp.ones((G, S), jnp.float32) if token_mask is None else token_mask.astype(jnp.float32)
    onehot = jax.nn.one_hot(out.expert_ids, E, dtype=jnp.float32) * out.mask[..., None]  # [G,S,K,E]
    load_g = jnp.sum(onehot, axis=(1, 2))  # [G, E]
    f = load_g / jnp.maximum(jnp.sum(load_g, -1, keepdims=True), 1.0)
    n_tok = jnp.maximum(jnp.sum(valid, -1, keepdims=True), 1.0)
    p = jnp.sum(out.probs * valid[..., None], axis=1) / n_tok  # [G, E]
    lb = jnp.mean(E * jnp.sum(f * p, -1))
    z = jax.nn.logsumexp(out.logits, axis=-1) ** 2
    z_loss = jnp.sum(z * valid) / jnp.maximum(jnp.sum(valid), 1.0)
    return {"load_balance_loss": lb, "z_loss": z_loss, "expert_load": jnp.sum(load_g, 0),
            "capacity_used": jnp.max(load_g).astype(jnp.int32)}


def aux_free_bias_update(bias: jax.Array, expert_load: jax.Array, rate: float) -> jax.Array:
    """DeepSeek-V3 aux-loss-free balancing: ``b_e += rate * sign(mean_load - load_e)``."""
    return bias + rate * jnp.sign(jnp.mean(expert_load) - expert_load).astype(bias.dtype)
