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
import numpy as np
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


# ------------------------------------------------------------------------- Cartesian product (OmniMoE)

def product_candidates(k: int, n1: int, n2: int) -> tuple[np.ndarray, np.ndarray]:
    """Rank pairs ``(a, b)`` that can hold one of the top-``k`` sums of two descending-sorted lists.

    With ``u`` and ``v`` sorted descending, ``u[a] + v[b]`` is at most every ``u[a'] + v[b']`` with ``a' <= a``,
    ``b' <= b``: ``(a + 1) (b + 1) - 1`` other pairs. So a pair with ``(a + 1) (b + 1) > k`` is never needed
    for the top-``k`` values; the rest, ``sum_a floor(k / a)`` ~ ``k ln k`` pairs (50 for k = 16, 1,466 for
    k = 256, against ``k^2``), always suffice. Returned in ``(a, b)`` lexicographic order (ties go to the
    earlier pair).
    """
    a, b = [], []
    for i in range(min(k, n1)):
        for j in range(min(k // (i + 1), n2)):
            a.append(i)
            b.append(j)
    return np.asarray(a, np.int32), np.asarray(b, np.int32)


def product_topk(s1: jax.Array, s2: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """Exact top-``k`` of ``s1[..., i] + s2[..., j]`` over all ``n1 * n2`` pairs, in O(k log k) per row.

    Args:
      s1: ``[..., n1]`` scores of the first head (OmniMoE: log-probabilities).
      s2: ``[..., n2]`` scores of the second head.
      k: how many pairs, ``1 <= k <= n1 * n2``.

    Returns:
      ``(scores, ids)``, each ``[..., k]``, scores descending; ``ids = i * n2 + j``. The top-``k`` of each
      head, then the top-``k`` of the candidate sums (:func:`product_candidates`): no ``[..., n1 * n2]`` tensor
      is formed. The scores are differentiable in ``s1`` and ``s2``. Where sums tie at the ``k``-th place the
      chosen ids may differ from a brute-force top-``k`` over all pairs (the values never do).
    """
    n1, n2 = s1.shape[-1], s2.shape[-1]
    if not 1 <= k <= n1 * n2:
        raise ValueError(f"product_topk: k must be in [1, n1 * n2 = {n1 * n2}], got {k}")
    v1, i1 = jax.lax.top_k(s1, min(k, n1))
    v2, i2 = jax.lax.top_k(s2, min(k, n2))
    a, b = product_candidates(k, n1, n2)
    cand = v1[..., a] + v2[..., b]
    scores, p = jax.lax.top_k(cand, k)
    ia = jnp.take_along_axis(i1, jnp.asarray(a)[p], axis=-1)
    ib = jnp.take_along_axis(i2, jnp.asarray(b)[p], axis=-1)
    return scores, (ia * n2 + ib).astype(jnp.int32)


class HeadNorm(nnx.Module):
    """BatchNorm without affine parameters over a router head's logits, padding tokens excluded.

    Training normalizes by the statistics of the valid tokens of the call (summed over ``axis_name`` when
    called inside ``shard_map``, so every data shard uses the global batch statistics) and moves the running
    statistics (``nnx.BatchStat``: carried as model state, checkpointed) by ``momentum``; evaluation and serving
    use the running statistics.
    """

    def __init__(self, n: int, *, momentum: float = 0.99, epsilon: float = 1e-5):
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"HeadNorm: momentum must be in [0, 1), got {momentum}")
        self.momentum, self.epsilon = momentum, epsilon
        self.mean = nnx.BatchStat(jnp.zeros((n,), jnp.float32))
        self.var = nnx.BatchStat(jnp.ones((n,), jnp.float32))

    def __call__(self, x: jax.Array, *, token_mask=None, train: bool = False, axis_name=None) -> jax.Array:
        x = x.astype(jnp.float32)
        if not train:
            mean, var = self.mean[...], self.var[...]
        else:
            w = jnp.ones(x.shape[:-1], jnp.float32) if token_mask is None else token_mask.astype(jnp.float32)
            w = w[..., None]
            red = tuple(range(x.ndim - 1))
            cnt, s = jnp.sum(w), jnp.sum(x * w, axis=red)
            if axis_name is not None:
                cnt, s = jax.lax.psum(cnt, axis_name), jax.lax.psum(s, axis_name)
            cnt = jnp.maximum(cnt, 1.0)
            mean = s / cnt
            ss = jnp.sum(jnp.square(x - mean) * w, axis=red)
            if axis_name is not None:
                ss = jax.lax.psum(ss, axis_name)
            var = ss / cnt
            m = self.momentum
            self.mean[...] = m * self.mean[...] + (1 - m) * jax.lax.stop_gradient(mean)
            self.var[...] = m * self.var[...] + (1 - m) * jax.lax.stop_gradient(var)
        return (x - mean) * jax.lax.rsqrt(var + self.epsilon)


class ProductRouterOutput(NamedTuple):
    expert_ids: jax.Array   # [G, S, K] int32, i * n + j
    weights: jax.Array      # [G, S, K] float32: exp(score) = p1[i] * p2[j] (0 where mask is False)
    mask: jax.Array         # [G, S, K] bool
    head_logp: tuple        # two [G, S, n] float32 log-probabilities (head-level aux statistics)
    head_logits: tuple      # two [G, S, n] float32 normalized logits before log_softmax (z-loss)


class CartesianRouter(nnx.Module):
    """OmniMoE's Cartesian product router over ``N = n^2`` atomic experts at O(sqrt(N)) cost per token.

    Two heads ``Linear(d, n)``, each followed by :class:`HeadNorm` and ``log_softmax``; the expert ``(i, j)``
    scores ``logp1[i] + logp2[j]``; the top-``k`` experts are the exact top-``k`` of those sums
    (:func:`product_topk`), weighted by ``exp(score)`` (not renormalized). No ``[tokens, N]`` tensor is formed.
    ``momentum`` 0.9 is PyTorch's BatchNorm default (its ``momentum=0.1``), as OmniMoE's reference uses. The
    reference scores all ``N`` pairs per token; this router scores about ``k ln k``.
    """

    def __init__(self, d_model: int, num_experts: int, top_k: int, *, init_std: float = 0.02,
                 momentum: float = 0.9, param_dtype=jnp.float32, rngs: nnx.Rngs):
        n = math.isqrt(num_experts)
        if n * n != num_experts:
            raise ValueError(f"CartesianRouter: num_experts must be a perfect square (n^2), got {num_experts}")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"CartesianRouter: top_k must be in [1, num_experts={num_experts}], got {top_k}")
        self.n, self.num_experts, self.top_k = n, num_experts, top_k
        init = _normal_init(init_std)
        self.w1 = nnx.Param(init(rngs.params(), (d_model, n), param_dtype), logical_axes=("embed", None))
        self.w2 = nnx.Param(init(rngs.params(), (d_model, n), param_dtype), logical_axes=("embed", None))
        self.norm1 = HeadNorm(n, momentum=momentum)
        self.norm2 = HeadNorm(n, momentum=momentum)

    def __call__(self, x, *, token_mask=None, train: bool = False, axis_name=None) -> ProductRouterOutput:
        xf = x.astype(jnp.float32)
        heads = []
        for w, norm in ((self.w1, self.norm1), (self.w2, self.norm2)):
            z = norm(jnp.einsum("...d,dn->...n", xf, w[...].astype(jnp.float32)), token_mask=token_mask,
                     train=train, axis_name=axis_name)
            heads.append((z, jax.nn.log_softmax(z, axis=-1)))
        scores, ids = product_topk(heads[0][1], heads[1][1], self.top_k)
        mask = jnp.ones(ids.shape, bool)
        if token_mask is not None:
            mask = mask & token_mask[..., None]
        weights = jnp.where(mask, jnp.exp(scores), 0.0)
        return ProductRouterOutput(ids, weights, mask, (heads[0][1], heads[1][1]), (heads[0][0], heads[1][0]))


def product_router_statistics(out: ProductRouterOutput, num_experts: int, token_mask=None) -> dict:
    """Head-level aux losses and per-expert loads of a Cartesian routing, with no ``[tokens, N]`` tensor.

    - ``load_balance_loss``: per head, ``n * sum_i f_i P_i`` (``f_i``: share of routed slots whose head
      coordinate is ``i``; ``P_i``: mean head probability), averaged over the two heads; 1.0 at balance.
    - ``z_loss``: mean over tokens and heads of ``logsumexp(head logits) ** 2``.
    - ``expert_load``: routed slots per expert (a segment sum over the chosen ids), float32 ``[N]``.
    """
    n = out.head_logp[0].shape[-1]
    lead = out.expert_ids.shape[:-1]
    valid = jnp.ones(lead, jnp.float32) if token_mask is None else token_mask.astype(jnp.float32)
    m = out.mask.reshape(-1).astype(jnp.float32)
    ids = out.expert_ids.reshape(-1)
    n_tok = jnp.maximum(jnp.sum(valid), 1.0)
    lb, z = 0.0, 0.0
    for h, coord in enumerate((ids // n, ids % n)):
        f = jax.ops.segment_sum(m, coord, num_segments=n)
        f = f / jnp.maximum(jnp.sum(f), 1.0)
        p = jnp.sum(jnp.exp(out.head_logp[h]) * valid[..., None], axis=tuple(range(len(lead)))) / n_tok
        lb = lb + n * jnp.sum(f * p) / 2
        z = z + jnp.sum(jax.nn.logsumexp(out.head_logits[h], axis=-1) ** 2 * valid) / n_tok / 2
    load = jax.ops.segment_sum(m, ids, num_segments=num_experts)
    return {"load_balance_loss": lb, "z_loss": z, "expert_load": load}
