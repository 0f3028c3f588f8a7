"""The atomic-experts kernel (interpret mode) against its pure-JAX reference: values and gradients.

float32; ``rtol=1e-5`` with ``atol = 1e-5 * max|reference|`` (sums of ``K`` products in another order).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.atomic_experts import atomic_experts, atomic_experts_reference


def close(a, ref):
    ref = np.asarray(ref, np.float64)
    np.testing.assert_allclose(np.asarray(a, np.float64), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("T,K,N,d,tile", [(12, 3, 40, 8, 8), (16, 8, 16, 4, 32)])
def test_kernel_equals_reference_with_gradients(T, K, N, d, tile):
    r = np.random.default_rng(T)
    x = jnp.asarray(r.normal(size=(T, d)), jnp.float32)
    u = jnp.asarray(0.4 * r.normal(size=(N, d)), jnp.float32)
    v = jnp.asarray(r.normal(size=(N, d)), jnp.float32)
    ids = r.integers(0, N, (T, K)).astype(np.int32)
    ids[0, :2] = 5  # a repeated expert within a token
    w = jnp.asarray(r.random((T, K)), jnp.float32)
    close(atomic_experts(x, u, v, ids, w, tile=tile, interpret=True), atomic_experts_reference(x, u, v, ids, w))
    cot = jnp.asarray(r.normal(size=(T, d)), jnp.float32)

    def loss(f):
        return lambda x, u, v, w: jnp.sum(f(x, u, v, ids, w) * cot)

    kern = jax.jit(jax.grad(loss(lambda *a: atomic_experts(*a, tile=tile, interpret=True)), (0, 1, 2, 3)))
    g = kern(x, u, v, w)
    g_ref = jax.grad(loss(atomic_experts_reference), (0, 1, 2, 3))(x, u, v, w)
    for a, b in zip(g, g_ref, strict=True):
        close(a, b)


def test_kernel_rejects_bad_input():
    x, u = jnp.zeros((4, 8)), jnp.zeros((16, 8))
    ids, w = jnp.zeros((4, 2), jnp.int32), jnp.zeros((4, 2))
    with pytest.raises(ValueError, match="tile must be a power of two"):
        atomic_experts(x, u, u, ids, w, tile=12, interpret=True)
    with pytest.raises(ValueError, match=r"x \[T, d\] and u, v \[N, d\]"):
        atomic_experts(x, u[:, :4], u, ids, w, interpret=True)
    with pytest.raises(ValueError, match=r"must be \[T=4, K\]"):
        atomic_experts(x, u, u, ids[:2], w[:2], interpret=True)
