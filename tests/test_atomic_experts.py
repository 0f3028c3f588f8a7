"""OmniMoE atomic experts: token-centric against a naive per-token loop, expert-centric against token-centric.

Outputs compare at ``rtol=1e-5`` with ``atol = 1e-5 * max|reference|`` (float32 sums of ``K`` terms against
float64 numpy); gradients the same way, scaled to each gradient's magnitude.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.nn.experts import ATOMIC_IMPLS, atomic_expert_centric, atomic_token_centric

RTOL = 1e-5


def close(a, ref):
    ref = np.asarray(ref, np.float64)
    np.testing.assert_allclose(np.asarray(a, np.float64), ref, rtol=RTOL, atol=1e-5 * np.abs(ref).max())


def problem(T=24, K=6, N=40, d=8, seed=0):
    r = np.random.default_rng(seed)
    x = r.normal(size=(T, d)).astype(np.float32)
    u = (0.4 * r.normal(size=(N, d))).astype(np.float32)
    v = r.normal(size=(N, d)).astype(np.float32)
    ids = r.integers(0, N, (T, K)).astype(np.int32)
    ids[0, 1] = ids[0, 0]  # one token picks an expert twice; another expert is shared by many tokens
    ids[:, -1] = 7
    w = r.random((T, K)).astype(np.float32)
    return x, u, v, ids, w


def naive(x, u, v, ids, w):
    y = np.zeros(x.shape, np.float64)
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            e = ids[t, k]
            h = float(np.dot(x[t].astype(np.float64), u[e]))
            y[t] += w[t, k] * h / (1.0 + np.exp(-h)) * v[e]
    return y


def loop_jax(x, u, v, ids, w):
    rows = []
    for t in range(x.shape[0]):
        acc = jnp.zeros(x.shape[1])
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            acc = acc + w[t, k] * jax.nn.silu(jnp.dot(x[t], u[e])) * v[e]
        rows.append(acc)
    return jnp.stack(rows)


def test_token_centric_equals_the_per_token_loop_with_gradients():
    x, u, v, ids, w = problem()
    close(atomic_token_centric(x, u, v, ids, w), naive(x, u, v, ids, w))
    cot = np.random.default_rng(5).normal(size=x.shape).astype(np.float32)

    def loss(f):
        return lambda x, u, v, w: jnp.sum(f(x, u, v, ids, w) * cot)

    g = jax.grad(loss(atomic_token_centric), (0, 1, 2, 3))(x, u, v, w)
    g_ref = jax.grad(loss(loop_jax), (0, 1, 2, 3))(x, u, v, w)
    for a, b in zip(g, g_ref, strict=True):
        close(a, b)


@pytest.mark.parametrize("shape", [{}, {"T": 5, "K": 3, "N": 200, "d": 4}, {"T": 64, "K": 16, "N": 16, "d": 8}])
def test_expert_centric_equals_token_centric(shape):
    x, u, v, ids, w = problem(**shape, seed=1)
    close(jax.jit(atomic_expert_centric)(x, u, v, ids, w), atomic_token_centric(x, u, v, ids, w))
    cot = np.random.default_rng(6).normal(size=x.shape).astype(np.float32)

    def loss(f):
        return lambda x, u, v, w: jnp.sum(f(x, u, v, ids, w) * cot)

    g = jax.jit(jax.grad(loss(atomic_expert_centric), (0, 1, 2, 3)))(x, u, v, w)
    g_ref = jax.grad(loss(atomic_token_centric), (0, 1, 2, 3))(x, u, v, w)
    for a, b in zip(g, g_ref, strict=True):
        close(a, b)


def test_expert_centric_temporary_memory_is_independent_of_n():
    """Compiled forward+backward temporaries stay within c * T * K * d and do not grow from N = 2^16 to 2^20.

    Compiled only (abstract inputs): nothing of size N is allocated. The [N, d] weight gradients are outputs
    (O(N d) like the parameters), not temporaries.
    """
    T, K, d = 256, 16, 32

    def temp_bytes(N):
        def loss(x, u, v, ids, w):
            return jnp.sum(atomic_expert_centric(x, u, v, ids, w) ** 2)

        f32 = jnp.float32
        args = (jax.ShapeDtypeStruct((T, d), f32), jax.ShapeDtypeStruct((N, d), f32),
                jax.ShapeDtypeStruct((N, d), f32), jax.ShapeDtypeStruct((T, K), jnp.int32),
                jax.ShapeDtypeStruct((T, K), f32))
        comp = jax.jit(jax.grad(loss, (0, 1, 2, 4))).lower(*args).compile()
        return comp.memory_analysis().temp_size_in_bytes

    small, large = temp_bytes(2**16), temp_bytes(2**20)
    assert large == small, (small, large)
    assert small <= 8 * T * K * d * 4, small


def test_atomic_impls_reject_bad_shapes():
    x, u, v, ids, w = problem()
    for f in ATOMIC_IMPLS.values():
        with pytest.raises(ValueError, match=r"U and V must both be \[N, d\]"):
            f(x, u, v[:, :4], ids, w)
        with pytest.raises(ValueError, match=r"expert_ids and weights must be \[tokens, K\]"):
            f(x, u, v, ids[:3], w[:3])


def test_expert_centric_in_bfloat16_matches_token_centric():
    x, u, v, ids, w = problem(seed=2)
    bf = jnp.bfloat16
    args = (jnp.asarray(x, bf), jnp.asarray(u, bf), jnp.asarray(v, bf), ids, jnp.asarray(w, bf))
    y = atomic_expert_centric(*args)
    assert y.dtype == bf
    ref = atomic_token_centric(*(a.astype(jnp.float32) if a.dtype == bf else a for a in args))
    np.testing.assert_allclose(np.asarray(y, np.float32), ref, rtol=2e-2, atol=2e-2 * np.abs(ref).max())
    g = jax.grad(lambda w: jnp.sum(atomic_expert_centric(*args[:4], w).astype(jnp.float32)))(args[4])
    assert g.dtype == bf and g.shape == w.shape
