"""OmniMoE's Cartesian product router against brute force over all N = n^2 experts.

Scores are sums of two float32 log-probabilities; the product top-k forms the very same float32 sums the
brute force forms, so values compare exactly. Index sets are compared where the k-th and (k+1)-th brute-force
sums differ (elsewhere a tie decides). Batch statistics compare with ``rtol=1e-5`` against float64 numpy.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from moejax.nn.routers import (
    CartesianRouter,
    HeadNorm,
    product_candidates,
    product_router_statistics,
    product_topk,
)

RTOL = 1e-5


def brute_topk(s1, s2, k):
    """All n1 * n2 sums, top-k (numpy, float32 sums as jax forms them)."""
    tot = (s1[..., :, None] + s2[..., None, :]).reshape(s1.shape[:-1] + (-1,))
    order = np.argsort(-tot, axis=-1, kind="stable")
    return np.take_along_axis(tot, order, -1), order


def test_candidates_are_the_pairs_with_few_dominators():
    a, b = product_candidates(16, 16, 16)
    assert len(a) == 50 and np.all((a + 1) * (b + 1) <= 16)
    assert len(product_candidates(256, 256, 256)[0]) == sum(256 // a for a in range(1, 257)) == 1466
    a, b = product_candidates(6, 2, 8)  # clipped to the heads' sizes
    assert a.max() == 1 and b.max() <= 5


@settings(max_examples=40, deadline=None)
@given(n1=st.integers(1, 12), n2=st.integers(1, 12), k_frac=st.floats(0.0, 1.0), seed=st.integers(0, 2**31 - 1),
       ties=st.booleans())
def test_product_topk_equals_brute_force(n1, n2, k_frac, seed, ties):
    k = max(1, round(k_frac * n1 * n2))
    rng = np.random.default_rng(seed)
    if ties:  # a few distinct values: many equal sums
        s1 = rng.integers(-3, 3, (3, n1)).astype(np.float32)
        s2 = rng.integers(-3, 3, (3, n2)).astype(np.float32)
    else:
        s1 = rng.normal(size=(3, n1)).astype(np.float32)
        s2 = rng.normal(size=(3, n2)).astype(np.float32)
    scores, ids = jax.jit(product_topk, static_argnums=2)(s1, s2, k)
    scores, ids = np.asarray(scores), np.asarray(ids)
    ref_v, ref_i = brute_topk(s1, s2, k)
    np.testing.assert_array_equal(scores, ref_v[:, :k])
    # each id's own sum is its score
    np.testing.assert_array_equal(s1[np.arange(3)[:, None], ids // n2] + s2[np.arange(3)[:, None], ids % n2],
                                  scores)
    assert all(len(set(r)) == k for r in ids)  # no pair twice
    for r in range(3):
        if k == n1 * n2 or ref_v[r, k - 1] > ref_v[r, k]:
            assert set(ids[r]) == set(ref_i[r, :k])


def test_product_topk_gradient_equals_brute_force():
    rng = np.random.default_rng(0)
    s1, s2 = (rng.normal(size=(4, 9)).astype(np.float32) for _ in range(2))
    w = rng.normal(size=(4, 7)).astype(np.float32)

    def fast(s1, s2):
        return jnp.sum(product_topk(s1, s2, 7)[0] * w)

    def brute(s1, s2):
        tot = (s1[:, :, None] + s2[:, None, :]).reshape(4, -1)
        return jnp.sum(jax.lax.top_k(tot, 7)[0] * w)

    g_fast, g_brute = jax.grad(fast, (0, 1))(s1, s2), jax.grad(brute, (0, 1))(s1, s2)
    for a, b in zip(g_fast, g_brute, strict=True):
        np.testing.assert_allclose(a, b, rtol=RTOL, atol=1e-6)


def test_product_topk_rejects_bad_k():
    with pytest.raises(ValueError, match=r"k must be in \[1, n1 \* n2 = 6\]"):
        product_topk(jnp.zeros((2,)), jnp.zeros((3,)), 7)


def _np_norm(x, mask, eps=1e-5):
    v = x[mask].astype(np.float64)
    mu, var = v.mean(0), v.var(0)
    return (x - mu) / np.sqrt(var + eps), mu, var


def test_head_norm_uses_valid_tokens_and_moves_running_statistics():
    rng = np.random.default_rng(1)
    x = rng.normal(2.0, 3.0, (2, 5, 4)).astype(np.float32)
    mask = np.ones((2, 5), bool)
    mask[1, 3:] = False
    x_pad = x.copy()
    x_pad[~mask] = 1e4  # padding must not move anything
    norm = HeadNorm(4, momentum=0.9)
    y = norm(jnp.asarray(x_pad), token_mask=jnp.asarray(mask), train=True)
    ref, mu, var = _np_norm(x, mask)
    np.testing.assert_allclose(np.asarray(y)[mask], ref[mask], rtol=RTOL, atol=1e-5)
    np.testing.assert_allclose(norm.mean[...], 0.1 * mu, rtol=RTOL, atol=1e-6)
    np.testing.assert_allclose(norm.var[...], 0.9 + 0.1 * var, rtol=RTOL)
    # evaluation uses the running statistics and changes nothing
    y_eval = norm(jnp.asarray(x), train=False)
    np.testing.assert_allclose(y_eval, (x - 0.1 * mu) / np.sqrt(0.9 + 0.1 * var + 1e-5), rtol=RTOL, atol=1e-5)
    np.testing.assert_allclose(norm.mean[...], 0.1 * mu, rtol=RTOL, atol=1e-6)
    with pytest.raises(ValueError, match="momentum"):
        HeadNorm(4, momentum=1.0)


def test_head_norm_under_shard_map_uses_the_global_batch():
    mesh = jax.make_mesh((4,), ("data",))
    rng = np.random.default_rng(2)
    x = rng.normal(1.0, 2.0, (8, 3, 4)).astype(np.float32)
    mask = rng.random((8, 3)) > 0.3
    norm = HeadNorm(4)
    gdef, state = nnx.split(norm)

    def shard(x, m, state):
        mod = nnx.merge(gdef, state)
        y = mod(x, token_mask=m, train=True, axis_name="data")
        return y, nnx.state(mod)

    f = jax.shard_map(shard, mesh=mesh, in_specs=(P("data"), P("data"), P()), out_specs=(P("data"), P()),
                      check_vma=False)
    xs = jax.device_put(x, NamedSharding(mesh, P("data")))
    ms = jax.device_put(mask, NamedSharding(mesh, P("data")))
    y, new_state = jax.jit(f)(xs, ms, state)
    ref, mu, _ = _np_norm(x, mask)
    np.testing.assert_allclose(np.asarray(y)[mask], ref[mask], rtol=RTOL, atol=1e-5)
    np.testing.assert_allclose(new_state["mean"][...], 0.01 * mu, rtol=RTOL, atol=1e-6)


def _np_router(router, x, mask=None):
    """The reference's math: both heads, batch norm over valid tokens, log_softmax, all N sums, top-k."""
    xs = np.asarray(x, np.float64)
    m = np.ones(x.shape[:-1], bool) if mask is None else mask
    logps = []
    for w in (router.w1[...], router.w2[...]):
        z, _, _ = _np_norm(xs @ np.asarray(w, np.float64), m)
        logps.append(z - np.log(np.exp(z).sum(-1, keepdims=True)))
    return logps


def test_cartesian_router_equals_all_pairs_and_forms_no_n_sized_tensor():
    n, k, d = 16, 8, 6
    router = CartesianRouter(d, n * n, k, init_std=0.5, rngs=nnx.Rngs(0))
    x = np.asarray(jax.random.normal(jax.random.key(1), (2, 5, d)), np.float32)
    out = router(jnp.asarray(x), train=True)
    l1, l2 = _np_router(router, x)
    tot = (l1[..., :, None] + l2[..., None, :]).reshape(2, 5, -1)
    order = np.argsort(-tot, -1, kind="stable")
    ref_v = np.take_along_axis(tot, order, -1)
    np.testing.assert_allclose(out.weights, np.exp(ref_v[..., :k]), rtol=1e-4)
    for g in range(2):
        for s in range(5):
            if ref_v[g, s, k - 1] - ref_v[g, s, k] > 1e-4:
                assert set(np.asarray(out.expert_ids[g, s])) == set(order[g, s, :k])
    # no intermediate with n^2 = 256 entries per token
    router2 = CartesianRouter(d, n * n, k, init_std=0.5, rngs=nnx.Rngs(0))
    gdef, state = nnx.split(router2)
    jaxpr = jax.make_jaxpr(lambda st, x: nnx.merge(gdef, st)(x, train=True).weights)(state, x)
    shapes = [v.aval.shape for e in jaxpr.jaxpr.eqns for v in e.outvars]
    assert shapes and not any(s and s[-1] == n * n for s in shapes)
    with pytest.raises(ValueError, match="perfect square"):
        CartesianRouter(d, 200, 4, rngs=nnx.Rngs(0))


def test_product_router_statistics_equal_direct_counts():
    n, k = 4, 3
    router = CartesianRouter(5, n * n, k, init_std=0.5, rngs=nnx.Rngs(3))
    x = jax.random.normal(jax.random.key(4), (1, 6, 5))
    mask = jnp.asarray([[True, True, True, True, False, False]])
    out = router(x, token_mask=mask, train=True)
    st_ = product_router_statistics(out, n * n, token_mask=mask)
    ids = np.asarray(out.expert_ids)[np.asarray(mask)]
    np.testing.assert_array_equal(st_["expert_load"], np.bincount(ids.ravel(), minlength=n * n))
    lb = 0.0
    for h, coord in enumerate((ids // n, ids % n)):
        f = np.bincount(coord.ravel(), minlength=n) / coord.size
        p = np.exp(np.asarray(out.head_logp[h]))[np.asarray(mask)].mean(0)
        lb += n * np.sum(f * p) / 2
    np.testing.assert_allclose(st_["load_balance_loss"], lb, rtol=RTOL)
