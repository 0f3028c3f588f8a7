"""Grouped matmul kernels (``pallas_kernels.grouped_matmul``) against references, in interpret mode on CPU.

Both kernel variants run here: ``gpu`` (Triton-style ``pallas_call``, generic Pallas interpreter) and ``tpu``
(Mosaic-style with scalar prefetch, TPU interpreter). Tolerances, as max-abs error relative to
``max(1, max|reference|)``: float32 1e-5 (the reference runs at ``highest`` matmul precision, set in conftest);
bfloat16 1e-2 (one bfloat16 rounding of the output, 2^-8, with float32 accumulation on both sides).
The default suite uses a few tiny shapes; the full grid of the issue is ``-m slow``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import grouped_matmul as gm
from pallas_kernels.grouped_matmul import (
    GmmTiling,
    gmm,
    gmm_reference,
    tgmm,
    tgmm_reference,
)

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}
# Small tiles so a few dozen rows already span several tiles, with groups straddling tile boundaries.
TILING = {"gpu": GmmTiling(16, 16, 16), "tpu": GmmTiling(16, 128, 128)}


def close(a, b, tol):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    err = float(np.max(np.abs(a - b))) if a.size else 0.0
    assert a.shape == b.shape
    assert err <= tol * max(1.0, float(np.max(np.abs(b))) if b.size else 1.0), err


def numpy_gmm(x, w, gs):
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    out, r = np.zeros((x.shape[0], w.shape[2])), 0
    for g, n in enumerate(np.asarray(gs)):
        out[r:r + n] = x[r:r + n] @ w[g]
        r += n
    return out


def numpy_tgmm(x, y, gs):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    out, r = np.zeros((len(gs), x.shape[1], y.shape[1])), 0
    for g, n in enumerate(np.asarray(gs)):
        out[g] = x[r:r + n].T @ y[r:r + n]
        r += n
    return out


def make(M, K, N, sizes, dtype, seed=0):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    x = jax.random.normal(k1, (M, K), jnp.float32).astype(dtype)
    w = (jax.random.normal(k2, (len(sizes), K, N), jnp.float32) / np.sqrt(K)).astype(dtype)
    dy = jax.random.normal(k3, (M, N), jnp.float32).astype(dtype)
    return x, w, dy, jnp.asarray(sizes, jnp.int32)


# Empty groups (first, middle, last), sizes that are not multiples of 16, 9 padding rows past the sum.
SIZES = [0, 5, 17, 0, 16, 1, 0]
SHAPE = (47, 24, 40)


def test_references_match_numpy():
    x, w, dy, gs = make(*SHAPE, SIZES, jnp.float32)
    close(gmm_reference(x, w, gs), numpy_gmm(x, w, gs), 1e-5)
    close(tgmm_reference(x, dy, gs), numpy_tgmm(x, dy, gs), 1e-5)
    close(gmm(x, w, gs, impl="xla"), numpy_gmm(x, w, gs), 1e-5)
    close(tgmm(x, dy, gs, impl="xla"), numpy_tgmm(x, dy, gs), 1e-5)


@pytest.mark.parametrize("variant", ["gpu", "tpu"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gmm_forward(variant, dtype):
    x, w, _, gs = make(*SHAPE, SIZES, dtype)
    out = gmm(x, w, gs, impl="pallas", variant=variant, tiling=TILING[variant])
    assert out.dtype == dtype and out.shape == (SHAPE[0], SHAPE[2])
    close(out, numpy_gmm(x, w, gs), TOL[dtype])
    assert not np.any(np.asarray(out[sum(SIZES):], np.float32))  # padding rows are exactly zero


@pytest.mark.parametrize("variant", ["gpu", "tpu"])
def test_gmm_transpose_rhs_and_tgmm(variant):
    x, w, dy, gs = make(*SHAPE, SIZES, jnp.float32, seed=1)
    out = gmm(x, jnp.swapaxes(w, 1, 2), gs, impl="pallas", variant=variant, tiling=TILING[variant],
              transpose_rhs=True)
    close(out, numpy_gmm(x, w, gs), 1e-5)
    t = tgmm(x, dy, gs, impl="pallas", variant=variant, tiling=TILING[variant])
    assert t.shape == (len(SIZES), SHAPE[1], SHAPE[2])
    close(t, numpy_tgmm(x, dy, gs), 1e-5)
    assert not np.any(np.asarray(t[0])) and not np.any(np.asarray(t[3]))  # empty groups give zeros


@pytest.mark.parametrize("variant", ["gpu", "tpu"])
def test_gmm_gradient_uses_kernels(variant):
    x, w, dy, gs = make(*SHAPE, SIZES, jnp.float32, seed=2)

    def loss(fn):
        return lambda x, w: jnp.sum(fn(x, w) * dy)

    kern = loss(lambda x, w: gmm(x, w, gs, impl="pallas", variant=variant, tiling=TILING[variant]))
    ref = loss(lambda x, w: gmm_reference(x, w, gs))
    gk, gr = jax.grad(kern, (0, 1))(x, w), jax.grad(ref, (0, 1))(x, w)
    close(gk[0], gr[0], 1e-5)
    close(gk[1], gr[1], 1e-5)
    # The backward pass is made of pallas calls (gmm with the rhs transposed, and tgmm), not XLA dots.
    jaxpr = str(jax.make_jaxpr(jax.grad(kern, (0, 1)))(x, w))
    assert jaxpr.count("pallas_call") >= 3 and "ragged_dot" not in jaxpr


def test_default_tiling_and_jit():
    x, w, _, gs = make(70, 48, 72, [30, 0, 33], jnp.float32, seed=3)
    f = jax.jit(lambda x, w, gs: gmm(x, w, gs, impl="pallas", variant="gpu"))
    close(f(x, w, gs), numpy_gmm(x, w, gs), 1e-5)


@pytest.mark.parametrize("variant", ["gpu", "tpu"])
def test_sizes_past_m_are_truncated_and_zero_rows(variant):
    x, w, dy, _ = make(*SHAPE, SIZES, jnp.float32, seed=4)
    gs = jnp.asarray([20, 0, 30, 9] + [0] * (len(SIZES) - 4), jnp.int32)  # sums to 59 > 47 rows
    clipped = jnp.asarray([20, 0, 27, 0] + [0] * (len(SIZES) - 4), jnp.int32)
    tiling = TILING[variant]
    close(gmm(x, w, gs, impl="pallas", variant=variant, tiling=tiling), numpy_gmm(x, w, clipped), 1e-5)
    close(tgmm(x, dy, gs, impl="pallas", variant=variant, tiling=tiling), numpy_tgmm(x, dy, clipped), 1e-5)
    assert gmm(x[:0], w, gs, impl="pallas", variant=variant).shape == (0, SHAPE[2])


def test_auto_picks_the_kernel_only_where_validated():
    # Validated on a GPU (experiments/results/gpu_check.md, H100); never interpret mode, never the unrun TPU variant.
    assert gm.VALIDATED_FASTER == frozenset({("gpu", "gpu")})
    assert gm.resolve_impl("auto") == ("pallas" if jax.default_backend() == "gpu" else "xla")
    assert gm.resolve_impl("auto", "tpu") == "xla"
    assert gm.resolve_impl("pallas") == "pallas"


BAD = [
    (lambda x, w, gs: gmm(x[0], w, gs), ValueError, "lhs must be 2-D"),
    (lambda x, w, gs: gmm(x, w[0], gs), ValueError, "rhs must be 3-D"),
    (lambda x, w, gs: gmm(x, w.astype(jnp.bfloat16), gs), TypeError, "same dtype"),
    (lambda x, w, gs: gmm(x.astype(jnp.int32), w.astype(jnp.int32), gs), TypeError, "lhs dtype"),
    (lambda x, w, gs: gmm(x[:, :5], w, gs), ValueError, "contraction mismatch"),
    (lambda x, w, gs: gmm(x, w, gs.astype(jnp.int64 if jax.config.x64_enabled else jnp.float32)), TypeError,
     "group_sizes must be int32"),
    (lambda x, w, gs: gmm(x, w, gs[:2]), ValueError, r"group_sizes must have shape \(3,\)"),
    (lambda x, w, gs: gmm(x, w, gs, impl="triton"), ValueError, "impl must be one of"),
    (lambda x, w, gs: gmm(x, w, gs, impl="pallas", variant="cuda"), ValueError, "variant must be"),
    (lambda x, w, gs: gmm(x, w, gs, impl="pallas", tiling=GmmTiling(tm=24)), ValueError, "GmmTiling.tm=24"),
    (lambda x, w, gs: gmm(x, w, gs, impl="pallas", tiling=GmmTiling(tk=8)), ValueError, "GmmTiling.tk=8"),
    (lambda x, w, gs: gmm(x, w, gs, impl="pallas", variant="tpu", tiling=GmmTiling(tn=64)), ValueError,
     "GmmTiling.tn=64"),
    (lambda x, w, gs: gmm(x, w, gs, impl="pallas", tiling=GmmTiling(tm=0)), ValueError, "positive int"),
    (lambda x, w, gs: gmm(x, w, gs, impl="pallas", tiling=(128, 128, 128)), TypeError, "GmmTiling"),
    (lambda x, w, gs: gmm(x, w, gs, impl="pallas", tiling=GmmTiling(group_m=0)), ValueError, "group_m"),
    (lambda x, w, gs: gmm(x, w, gs, impl="pallas", interpret="yes"), TypeError, "interpret"),
    (lambda x, w, gs: tgmm(x, x[:5], gs), ValueError, "same rows"),
]


@pytest.mark.parametrize("i", range(len(BAD)))
def test_invalid_arguments_raise_before_tracing(i, monkeypatch):
    fn, exc, msg = BAD[i]
    x, w, _, gs = make(32, 16, 16, [10, 0, 12], jnp.float32)

    def no_kernel(*a, **k):
        raise AssertionError("a kernel was traced before the arguments were validated")

    monkeypatch.setattr(gm.pl, "pallas_call", no_kernel)
    with pytest.raises(exc, match=msg):
        fn(x, w, gs)


# ------------------------------------------------------------------------------------------ full grid (slow)

def _random_sizes(rng, G, M):
    """Group sizes summing to <= M with about a quarter of the groups empty."""
    w = rng.random(G) * (rng.random(G) > 0.25)
    if w.sum() == 0:
        w[rng.integers(G)] = 1.0
    total = int(rng.integers(max(1, M // 2), M + 1))
    sizes = np.floor(w / w.sum() * total).astype(np.int32)
    return sizes


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["gpu", "tpu"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("G", [1, 2, 7, 16, 64])
def test_gmm_grid(variant, dtype, G):
    rng = np.random.default_rng(G)
    M, K, N = (200, 64, 96) if variant == "gpu" else (200, 128, 256)
    tiling = GmmTiling(32, 32, 32) if variant == "gpu" else GmmTiling(32, 128, 128)
    sizes = _random_sizes(rng, G, M)
    x, w, dy, gs = make(M, K, N, sizes, dtype, seed=G)
    close(gmm(x, w, gs, impl="pallas", variant=variant, tiling=tiling), numpy_gmm(x, w, gs), TOL[dtype])
    close(tgmm(x, dy, gs, impl="pallas", variant=variant, tiling=tiling), numpy_tgmm(x, dy, gs), TOL[dtype])
    kern = jax.grad(lambda x, w: jnp.sum(gmm(x, w, gs, impl="pallas", variant=variant, tiling=tiling)
                                         .astype(jnp.float32) * dy.astype(jnp.float32)), (0, 1))(x, w)
    ref = jax.grad(lambda x, w: jnp.sum(gmm_reference(x, w, gs).astype(jnp.float32)
                                        * dy.astype(jnp.float32)), (0, 1))(x, w)
    close(kern[0], ref[0], TOL[dtype])
    close(kern[1], ref[1], TOL[dtype])
