"""Each router against a direct numpy computation of its definition, plus the router statistics.

Numpy references run in float64 on the router's float32 parameters and inputs; the routers compute in float32,
so weights/probabilities are compared with ``rtol=1e-5, atol=1e-7`` (``RTOL``/``ATOL``: a few float32 ulps of
O(1) values); logits, which are sums of products with cancellation, with ``atol = 1e-5 * max|logits|`` (and
the same ``rtol``); discrete choices (expert ids, masks) must match exactly.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax.config import RouterConfig
from moejax.nn.routers import (RouterOutput, aux_free_bias_update, expert_choice_capacity, make_router,
                               router_statistics)

RTOL, ATOL = 1e-5, 1e-7
D, E = 12, 8


def build(rc: RouterConfig, num_experts: int = E, capacity_factor: float = 1.0, seed: int = 0):
    return make_router(D, num_experts, rc, capacity_factor=capacity_factor, init_std=0.5, rngs=nnx.Rngs(seed))


def make_x(G, S, seed=1):
    return np.asarray(jax.random.normal(jax.random.key(seed), (G, S, D), jnp.float32))


def np_softmax(z):
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def np_topk(scores, k):
    """Indices of the k largest entries of the last axis, ties to the lower index (stable sort of -score)."""
    return np.argsort(-scores, axis=-1, kind="stable")[..., :k]


def take(a, idx):
    return np.take_along_axis(a, idx, -1)


def logits_of(router, x):
    return np.asarray(x, np.float64) @ np.asarray(router.w.value, np.float64)


def close(got, want):
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=RTOL, atol=ATOL)


def close_logits(got, want):
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=RTOL, atol=RTOL * np.abs(want).max())


# -------------------------------------------------------------------------------------------------- topk

@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("normalize", [True, False])
def test_topk(k, normalize):
    router = build(RouterConfig(type="topk", top_k=k, normalize=normalize))
    x = make_x(2, 16)
    out = router(jnp.asarray(x))
    logits = logits_of(router, x)
    probs = np_softmax(logits)
    ids = np_topk(probs, k)
    w = take(probs, ids)
    if normalize:
        # Renormalized over the chosen experts (a lone expert gets weight 1, as Hugging Face does).
        w = w / w.sum(-1, keepdims=True)
        # Mixtral: renormalized top-k softmax probabilities == softmax over the top-k logits.
        close(out.weights, np_softmax(take(logits, ids)))
    np.testing.assert_array_equal(np.asarray(out.expert_ids), ids)
    close(out.weights, w)
    close(out.probs, probs)
    close_logits(out.logits, logits)
    assert np.asarray(out.mask).all() and out.mask.shape == (2, 16, k)


# ------------------------------------------------------------------------------------------------- ties

def _tied_router(rtype):
    rc = RouterConfig(type=rtype, top_k=2) if rtype != "expert_choice" else RouterConfig(type=rtype)
    router = build(rc)
    if rtype == "xmoe":
        router.expert_emb.value = jnp.ones_like(router.expert_emb.value)  # every expert embedding equal
    else:
        router.w.value = jnp.zeros_like(router.w.value)  # every logit exactly zero
    return router


@pytest.mark.parametrize("rtype", ["topk", "switch", "gshard", "sigmoid", "xmoe"])
def test_ties_go_to_lower_expert_index(rtype):
    router = _tied_router(rtype)
    out = router(jnp.asarray(make_x(1, 8)))
    k = out.expert_ids.shape[-1]
    np.testing.assert_array_equal(np.asarray(out.expert_ids), np.broadcast_to(np.arange(k), (1, 8, k)))


@pytest.mark.parametrize("rtype", ["topk", "sigmoid"])
def test_partial_tie_goes_to_lower_expert_index(rtype):
    # Experts 3 and 6 have identical gate columns that dominate every (positive) token: 3 must come first.
    router = build(RouterConfig(type=rtype, top_k=2))
    w = 0.01 * np.asarray(router.w.value)
    w[:, 3] = w[:, 6] = 1.0
    router.w.value = jnp.asarray(w)
    x = np.abs(make_x(1, 8)) + 0.5
    out = router(jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(out.expert_ids), np.broadcast_to([3, 6], (1, 8, 2)))


def test_expert_choice_ties_go_to_lower_token_index():
    router = build(RouterConfig(type="expert_choice"), capacity_factor=2.0)
    x = np.broadcast_to(make_x(1, 1), (2, 8, D))  # all tokens identical: every score ties
    out = router(jnp.asarray(x))
    c = expert_choice_capacity(8, E, 2.0)
    assert c == 2
    want = np.zeros((2, 8, E), bool)
    want[:, :c, :] = True
    np.testing.assert_array_equal(np.asarray(out.mask), want)


# ----------------------------------------------------------------------------------------------- switch

def test_switch():
    router = build(RouterConfig(type="switch", top_k=2))  # top_k is ignored: Switch is top-1
    x = make_x(2, 16)
    out = router(jnp.asarray(x))
    probs = np_softmax(logits_of(router, x))
    ids = np_topk(probs, 1)
    assert out.expert_ids.shape == (2, 16, 1)
    np.testing.assert_array_equal(np.asarray(out.expert_ids), ids)
    close(out.weights, take(probs, ids))  # the raw softmax probability, not renormalized to 1


def test_switch_jitter():
    eps = 0.3
    router = build(RouterConfig(type="switch", jitter=eps))
    x = make_x(2, 8)
    rng = jax.random.key(5)
    ti = np.arange(16, dtype=np.int32).reshape(2, 8) + 40
    # Evaluation (or no rng): no jitter.
    for kw in (dict(train=False, rng=rng), dict(train=True, rng=None)):
        close_logits(router(jnp.asarray(x), token_index=jnp.asarray(ti), **kw).logits, logits_of(router, x))
    out = router(jnp.asarray(x), token_index=jnp.asarray(ti), rng=rng, train=True)
    u = np.stack([np.asarray(jax.random.uniform(jax.random.fold_in(rng, int(i)), (D,))) for i in ti.reshape(-1)])
    xj = x * (1 - eps + 2 * eps * u.reshape(x.shape))
    probs = np_softmax(logits_of(router, xj))
    close_logits(out.logits, logits_of(router, xj))
    np.testing.assert_array_equal(np.asarray(out.expert_ids), np_topk(probs, 1))
    close(out.weights, take(probs, np_topk(probs, 1)))


# ----------------------------------------------------------------------------------------------- gshard

def _gshard_np(router, x):
    probs = np_softmax(logits_of(router, x))
    ids = np_topk(probs, 2)
    g = take(probs, ids)
    return ids, g / g.sum(-1, keepdims=True)


@pytest.mark.parametrize("policy", ["random", "all", "sampling"])
def test_gshard_eval_keeps_both(policy):
    router = build(RouterConfig(type="gshard", second_policy=policy))
    x = make_x(2, 16)
    ids, w = _gshard_np(router, x)
    for kw in (dict(), dict(train=True), dict(train=False, rng=jax.random.key(0))):  # no rng or not training
        out = router(jnp.asarray(x), token_index=jnp.arange(32).reshape(2, 16), **kw)
        np.testing.assert_array_equal(np.asarray(out.expert_ids), ids)
        close(out.weights, w)
        assert np.asarray(out.mask).all()


def test_gshard_training_keep_rule():
    router = build(RouterConfig(type="gshard"))
    x = make_x(2, 16)
    rng = jax.random.key(11)
    ti = np.arange(32, dtype=np.int32).reshape(2, 16) * 7 + 3
    out = router(jnp.asarray(x), token_index=jnp.asarray(ti), rng=rng, train=True)
    ids, w = _gshard_np(router, x)
    u = np.array([float(jax.random.uniform(jax.random.fold_in(rng, int(i)))) for i in ti.reshape(-1)])
    keep2 = 2.0 * w[..., 1] > u.reshape(2, 16)  # kept with probability min(1, 2 * g2)
    assert 0 < keep2.sum() < keep2.size
    np.testing.assert_array_equal(np.asarray(out.expert_ids), ids)
    np.testing.assert_array_equal(np.asarray(out.mask[..., 0]), True)
    np.testing.assert_array_equal(np.asarray(out.mask[..., 1]), keep2)
    close(out.weights, np.where(np.stack([np.ones_like(keep2), keep2], -1), w, 0.0))


def test_gshard_keep_depends_only_on_rng_and_token_index():
    router = build(RouterConfig(type="gshard"))
    rng = jax.random.key(12)
    x = make_x(1, 32, seed=2).reshape(32, D)
    ti = np.arange(32, dtype=np.int32) + 500
    full = np.asarray(router(jnp.asarray(x.reshape(2, 16, D)), token_index=jnp.asarray(ti.reshape(2, 16)),
                             rng=rng, train=True).mask).reshape(32, 2)
    assert 0 < full[:, 1].sum() < 32
    # A differently shaped, offset sub-batch (tokens 5..12 as one group of 8) ...
    sub = np.asarray(router(jnp.asarray(x[5:13][None]), token_index=jnp.asarray(ti[5:13][None]), rng=rng,
                            train=True).mask).reshape(8, 2)
    np.testing.assert_array_equal(sub, full[5:13])
    # ... and a permuted batch in 4 groups of 8 get the same decision for each token.
    perm = np.asarray(jax.random.permutation(jax.random.key(0), 32))
    permuted = np.asarray(router(jnp.asarray(x[perm].reshape(4, 8, D)), token_index=jnp.asarray(ti[perm].reshape(4, 8)),
                                 rng=rng, train=True).mask).reshape(32, 2)
    np.testing.assert_array_equal(permuted, full[perm])
    # A different rng gives different decisions.
    other = np.asarray(router(jnp.asarray(x.reshape(2, 16, D)), token_index=jnp.asarray(ti.reshape(2, 16)),
                              rng=jax.random.key(13), train=True).mask).reshape(32, 2)
    assert (other != full).any()


def test_gshard_keep_rate():
    # 4096 copies of one token: the fraction of kept second experts is min(1, 2 * g2) (binomial, 5 sigma).
    router = build(RouterConfig(type="gshard"))
    x = np.broadcast_to(make_x(1, 1, seed=3), (1, 4096, D))
    out = router(jnp.asarray(x), token_index=jnp.arange(4096)[None], rng=jax.random.key(14), train=True)
    _, w = _gshard_np(router, x[:, :1])
    p = min(1.0, 2 * float(w[0, 0, 1]))
    rate = float(np.asarray(out.mask[..., 1]).mean())
    assert abs(rate - p) <= 5 * math.sqrt(p * (1 - p) / 4096) + 1e-9, (rate, p)


def test_gshard_sampling_policy():
    router = build(RouterConfig(type="gshard", second_policy="sampling"))
    x = make_x(2, 16)
    probs = np_softmax(logits_of(router, x))
    outs = [router(jnp.asarray(x), token_index=jnp.arange(32).reshape(2, 16), rng=jax.random.key(s), train=True)
            for s in range(4)]
    for out in outs:
        ids = np.asarray(out.expert_ids)
        np.testing.assert_array_equal(ids[..., 0], np.argmax(probs, -1))
        assert (ids[..., 1] != ids[..., 0]).all()
        assert np.asarray(out.mask).all()
        g = take(probs, ids)
        close(out.weights, g / g.sum(-1, keepdims=True))
    assert any((np.asarray(o.expert_ids[..., 1]) != np.asarray(outs[0].expert_ids[..., 1])).any() for o in outs)


# ---------------------------------------------------------------------------------------------- sigmoid

def _sigmoid_np(router, x, rc, bias):
    scores = 1.0 / (1.0 + np.exp(-logits_of(router, x)))
    choice = scores + bias
    if rc.n_groups > 1:
        per = E // rc.n_groups
        grouped = choice.reshape(choice.shape[:-1] + (rc.n_groups, per))
        gscore = np.sort(grouped, -1)[..., -2:].sum(-1)  # sum of each group's top-2
        keep_groups = np_topk(gscore, rc.topk_groups)
        eligible = np.zeros(gscore.shape, bool)
        np.put_along_axis(eligible, keep_groups, True, -1)
        choice = np.where(np.repeat(eligible, per, -1), choice, -np.inf)
    ids = np_topk(choice, rc.top_k)
    w = take(scores, ids)  # weights come from the scores, never from score + bias
    if rc.normalize:
        w = w / w.sum(-1, keepdims=True)
    return ids, w * rc.scaling_factor, scores


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("groups", [(1, 1), (4, 2)])
def test_sigmoid(normalize, groups):
    rc = RouterConfig(type="sigmoid", top_k=3, normalize=normalize, scaling_factor=2.5, n_groups=groups[0],
                      topk_groups=groups[1])
    router = build(rc)
    bias = np.asarray(0.3 * jax.random.normal(jax.random.key(2), (E,)), np.float32)
    router.bias.value = jnp.asarray(bias)
    x = make_x(2, 16)
    out = router(jnp.asarray(x))
    ids, w, scores = _sigmoid_np(router, x, rc, bias.astype(np.float64))
    np.testing.assert_array_equal(np.asarray(out.expert_ids), ids)
    close(out.weights, w)
    close(out.probs, scores / scores.sum(-1, keepdims=True))
    if groups[0] > 1:  # all chosen experts lie in at most topk_groups groups
        assert max(len(set(row // (E // groups[0]))) for row in ids.reshape(-1, 3)) <= groups[1]


def test_sigmoid_bias_changes_selection_not_weights():
    rc = RouterConfig(type="sigmoid", top_k=2, normalize=False)
    router = build(rc)
    x = make_x(2, 16)
    base = router(jnp.asarray(x))
    bias = np.zeros(E, np.float32)
    bias[7] = 10.0  # expert 7 always selected ...
    router.bias.value = jnp.asarray(bias)
    out = router(jnp.asarray(x))
    ids = np.asarray(out.expert_ids)
    assert (ids == 7).any(-1).all()
    assert (np.asarray(base.expert_ids) != ids).any()
    scores = 1.0 / (1.0 + np.exp(-logits_of(router, x)))
    close(out.weights, take(scores, ids))  # ... but its weight is its sigmoid score, not score + bias
    close_logits(out.logits, base.logits)
    assert float(jnp.max(out.weights)) < 1.0


# ------------------------------------------------------------------------------------------------- xmoe

@pytest.mark.parametrize("temperature", [0.07, 0.5])
def test_xmoe(temperature):
    rc = RouterConfig(type="xmoe", top_k=2, xmoe_dim=6, xmoe_init_temperature=temperature)
    router = build(rc)
    x = make_x(2, 16)
    out = router(jnp.asarray(x))
    z = np.asarray(x, np.float64) @ np.asarray(router.proj.value, np.float64)
    z = z / np.linalg.norm(z, axis=-1, keepdims=True)
    e = np.asarray(router.expert_emb.value, np.float64)
    e = e / np.linalg.norm(e, axis=-1, keepdims=True)
    cos = z @ e.T
    assert np.abs(cos).max() <= 1 + 1e-12
    logits = cos / temperature
    probs = np_softmax(logits)
    ids = np_topk(probs, 2)
    w = take(probs, ids)
    np.testing.assert_array_equal(np.asarray(out.expert_ids), ids)
    close_logits(out.logits, logits)
    close(out.weights, w / w.sum(-1, keepdims=True))
    # The temperature is a learnable parameter: doubling it halves the logits.
    router.temperature.value = router.temperature.value * 2
    close_logits(router(jnp.asarray(x)).logits, logits / 2)


# ---------------------------------------------------------------------------------------- expert choice

@pytest.mark.parametrize("cf", [1.0, 2.0, -0.5, 0.0])
def test_expert_choice(cf):
    router = build(RouterConfig(type="expert_choice"), capacity_factor=cf)
    G, S = 2, 16
    x = make_x(G, S)
    out = router(jnp.asarray(x))
    probs = np_softmax(logits_of(router, x))
    c = math.ceil((abs(cf) or 1.0) * S / E)
    assert expert_choice_capacity(S, E, cf) == c
    want = np.zeros((G, S, E), bool)
    for g in range(G):
        for e in range(E):
            top = np.argsort(-probs[g, :, e], kind="stable")[:c]  # ties -> lower token index
            want[g, top, e] = True
    np.testing.assert_array_equal(np.asarray(out.mask), want)
    assert (np.asarray(out.mask).sum(1) == c).all()  # each expert takes exactly c tokens per group
    np.testing.assert_array_equal(np.asarray(out.expert_ids), np.broadcast_to(np.arange(E), (G, S, E)))
    close(out.weights, np.where(want, probs, 0.0))


def test_expert_choice_token_mask():
    router = build(RouterConfig(type="expert_choice"), capacity_factor=2.0)
    G, S = 2, 8
    x = make_x(G, S)
    tm = np.ones((G, S), bool)
    tm[0, ::2] = False
    tm[1, :7] = False  # one valid token, capacity 2: experts take fewer than c tokens
    out = router(jnp.asarray(x), token_mask=jnp.asarray(tm))
    probs = np_softmax(logits_of(router, x))
    mask = np.asarray(out.mask)
    assert not mask[~tm].any()
    for g in range(G):
        valid = np.flatnonzero(tm[g])
        for e in range(E):
            top = valid[np.argsort(-probs[g, valid, e], kind="stable")[:2]]
            np.testing.assert_array_equal(np.flatnonzero(mask[g, :, e]), np.sort(top))


def test_token_mask_unroutes_tokens():
    for rc in (RouterConfig(type="topk"), RouterConfig(type="sigmoid"), RouterConfig(type="gshard")):
        router = build(rc)
        tm = np.asarray(jax.random.bernoulli(jax.random.key(3), 0.5, (2, 16)))
        out = router(jnp.asarray(make_x(2, 16)), token_mask=jnp.asarray(tm))
        mask, w = np.asarray(out.mask), np.asarray(out.weights)
        assert not mask[~tm].any() and mask[tm].all()
        assert (w[~tm] == 0).all()


# ---------------------------------------------------------------------------------------- statistics

def _stats_np(out: RouterOutput, tm):
    probs, logits = np.asarray(out.probs, np.float64), np.asarray(out.logits, np.float64)
    ids, mask = np.asarray(out.expert_ids), np.asarray(out.mask)
    G, S, Ex = probs.shape
    tm = np.ones((G, S), bool) if tm is None else tm
    lbs, load = [], np.zeros(Ex)
    for g in range(G):
        cnt = np.zeros(Ex)
        for s in range(S):
            for k in range(ids.shape[-1]):
                if mask[g, s, k]:
                    cnt[ids[g, s, k]] += 1
        load += cnt
        f = cnt / max(cnt.sum(), 1)
        P = probs[g][tm[g]].mean(0)
        lbs.append(Ex * (f * P).sum())
    m = logits.max(-1, keepdims=True)
    lse = (m[..., 0] + np.log(np.exp(logits - m).sum(-1)))
    return np.mean(lbs), (lse ** 2)[tm].mean(), load


def test_load_balance_loss_is_one_at_perfect_balance():
    G, S, Ex = 2, 8, 4
    ids = np.broadcast_to((np.arange(S) % Ex)[None, :, None], (G, S, 1))  # every expert gets S / E tokens
    rnd = np_softmax(np.asarray(jax.random.normal(jax.random.key(0), (G, S, Ex))))
    for probs in (np.full((G, S, Ex), 1.0 / Ex), rnd):  # uniform loads -> 1 for any router probabilities
        out = RouterOutput(jnp.asarray(ids, jnp.int32), jnp.ones((G, S, 1)), jnp.ones((G, S, 1), bool),
                           jnp.asarray(probs, jnp.float32), jnp.zeros((G, S, Ex)))
        stats = router_statistics(out)
        np.testing.assert_allclose(float(stats["load_balance_loss"]), 1.0, rtol=1e-6)
        np.testing.assert_allclose(float(stats["z_loss"]), math.log(Ex) ** 2, rtol=1e-6)
        np.testing.assert_array_equal(np.asarray(stats["expert_load"]), np.full(Ex, G * S / Ex))
    # All tokens on one expert with all probability on it: the maximum, E.
    out = RouterOutput(jnp.zeros((G, S, 1), jnp.int32), jnp.ones((G, S, 1)), jnp.ones((G, S, 1), bool),
                       jnp.asarray(np.eye(Ex)[np.zeros((G, S), int)], jnp.float32), jnp.zeros((G, S, Ex)))
    np.testing.assert_allclose(float(router_statistics(out)["load_balance_loss"]), Ex, rtol=1e-6)


@pytest.mark.parametrize("rtype", ["topk", "gshard", "expert_choice"])
@pytest.mark.parametrize("masked", [False, True])
def test_router_statistics_match_numpy(rtype, masked):
    router = build(RouterConfig(type=rtype, top_k=2))
    x = make_x(3, 16) * 2
    tm = np.asarray(jax.random.bernoulli(jax.random.key(4), 0.7, (3, 16))) if masked else None
    out = router(jnp.asarray(x), token_mask=None if tm is None else jnp.asarray(tm))
    stats = router_statistics(out, None if tm is None else jnp.asarray(tm))
    lb, z, load = _stats_np(out, tm)
    np.testing.assert_allclose(float(stats["load_balance_loss"]), lb, rtol=RTOL)
    np.testing.assert_allclose(float(stats["z_loss"]), z, rtol=RTOL)
    np.testing.assert_array_equal(np.asarray(stats["expert_load"]), load)
    assert stats["expert_load"].dtype == jnp.float32


# ------------------------------------------------------------------------------------ aux-free balancing

def test_aux_free_bias_update_formula():
    bias = jnp.asarray([0.0, 0.1, -0.2, 0.3])
    load = jnp.asarray([10.0, 2.0, 4.0, 0.0])  # mean 4
    new = aux_free_bias_update(bias, load, 0.05)
    np.testing.assert_allclose(np.asarray(new), [-0.05, 0.15, -0.2, 0.35], rtol=1e-6)


def test_aux_free_bias_update_moves_toward_balance():
    rc = RouterConfig(type="sigmoid", top_k=2, bias_update_rate=0.01)
    router = build(rc)
    w = np.array(router.w.value)
    w[:, 0] += 1.0  # skew: expert 0 overloaded for positive-ish tokens
    router.w.value = jnp.asarray(w)
    x = jnp.asarray(np.abs(make_x(4, 64)) * 0.5 + make_x(4, 64, seed=9) * 0.5)

    graphdef, state = nnx.split(router)

    @jax.jit
    def step(state, bias):
        r = nnx.merge(graphdef, state)  # a fresh copy: no module state leaks out of the trace
        r.bias.value = bias
        load = router_statistics(r(x))["expert_load"]
        return aux_free_bias_update(bias, load, rc.bias_update_rate), load

    bias = jnp.zeros(E)
    _, load0 = step(state, bias)
    imb0 = float(jnp.max(load0) / jnp.mean(load0))
    for _ in range(300):
        bias, load = step(state, bias)
    imb = float(jnp.max(load) / jnp.mean(load))
    assert imb0 > 2.0
    assert imb < 1.5, (imb0, imb)  # observed: 3.8 -> 1.1
    assert float(bias[0]) < 0  # the overloaded expert's bias went down
