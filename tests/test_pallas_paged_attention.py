"""Paged attention kernels (``pallas_kernels.paged_attention``) against references, interpret mode on CPU.

Both variants run: ``gpu`` (Triton-style, generic Pallas interpreter) and ``tpu`` (scalar-prefetch Mosaic
style, TPU interpreter). The reference itself is checked against a float64 per-query numpy loop. Tolerances
(max-abs error relative to ``max(1, max|reference|)``): float32 1e-5; bfloat16 2e-2 (the kernels round the
softmax probabilities to bfloat16 for the ``p @ V`` product, as flash kernels do; the reference keeps
them in float32). Default suite: a few tiny shapes; the issue's full grid is ``-m slow``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import paged_attention as pa
from pallas_kernels.paged_attention import (
    PagedAttentionConfig,
    paged_attention,
    paged_attention_reference,
)

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def close(a, b, tol):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape
    err = float(np.max(np.abs(a - b)))
    assert err <= tol * max(1.0, float(np.max(np.abs(b)))), err


def numpy_paged(q, kp, vp, bt, lengths):
    q, kp, vp, bt, lengths = (np.asarray(a, np.float64) if i < 3 else np.asarray(a)
                              for i, a in enumerate((q, kp, vp, bt, lengths)))
    B, Tq, H, D = q.shape
    P, ps, KVH, _ = kp.shape
    G = H // KVH
    kf, vf = kp.reshape(P * ps, KVH, D), vp.reshape(P * ps, KVH, D)
    out = np.zeros((B, Tq, H, D))
    for b in range(B):
        L = int(lengths[b])
        tok = [bt[b, s // ps] * ps + s % ps for s in range(L)]
        K, V = kf[tok], vf[tok]
        for t in range(Tq):
            pos = L - Tq + t
            if pos < 0:
                continue
            for h in range(H):
                s = K[:pos + 1, h // G] @ q[b, t, h] / np.sqrt(D)
                p = np.exp(s - s.max())
                out[b, t, h] = (p / p.sum()) @ V[:pos + 1, h // G]
    return out


def make(B, Tq, H, KVH, D, ps, lengths, dtype, *, extra_pages=3, seed=0):
    """Random pool with shuffled, non-contiguous page assignment; table entries past the end are garbage."""
    rng = np.random.default_rng(seed)
    maxp = max(1, -(-max(lengths) // ps))
    P = B * maxp + extra_pages
    perm = rng.permutation(P)[:B * maxp].reshape(B, maxp)
    q = jnp.asarray(rng.normal(size=(B, Tq, H, D)), dtype)
    kp = jnp.asarray(rng.normal(size=(P, ps, KVH, D)), dtype)
    vp = jnp.asarray(rng.normal(size=(P, ps, KVH, D)), dtype)
    for b, L in enumerate(lengths):  # entries past a sequence's last page are arbitrary
        perm[b, -(-L // ps):] = rng.integers(0, P, size=maxp - (-(-L // ps)))
    return q, kp, vp, jnp.asarray(perm, jnp.int32), jnp.asarray(lengths, jnp.int32)


def test_reference_matches_numpy():
    args = make(3, 3, 8, 2, 16, 8, [0, 2, 29], jnp.float32)
    out = paged_attention_reference(*args)
    close(out, numpy_paged(*args), 1e-5)
    assert not np.any(np.asarray(out[0]))  # length-0 padding slot: zeros, not NaN
    assert paged_attention(*args, impl="xla").shape == args[0].shape


# (B, Tq, H, KVH, D, page_size, lengths): decode with GQA 4 and a padding slot; speculative (Tq=3) with
# GQA 1; a prefill chunk (Tq=12) with GQA 8 and a first chunk (length == Tq).
CASES = [
    (3, 1, 8, 2, 32, 16, [0, 7, 45]),
    (2, 3, 4, 4, 16, 16, [3, 40]),
    (2, 12, 8, 1, 16, 8, [12, 37]),
]


@pytest.mark.parametrize("variant", ["gpu", "tpu"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_kernel_matches_reference(variant, case):
    B, Tq, H, KVH, D, ps, lengths = CASES[case]
    args = make(B, Tq, H, KVH, D, ps, lengths, jnp.float32, seed=case)
    cfg = PagedAttentionConfig(pages_per_block=2) if variant == "gpu" else None
    out = paged_attention(*args, impl="pallas", variant=variant, config=cfg)
    assert out.dtype == jnp.float32 and np.all(np.isfinite(np.asarray(out)))
    close(out, numpy_paged(*args), 1e-5)


@pytest.mark.parametrize("kv_splits", [2, 3])
def test_gpu_kv_splits(kv_splits):
    """Flash-decoding split of the KV range (GPU variant): splits past a sequence's end stay empty."""
    B, Tq, H, KVH, D, ps, lengths = CASES[0]
    args = make(B, Tq, H, KVH, D, ps, lengths, jnp.float32, seed=11)
    cfg = PagedAttentionConfig(pages_per_block=1, kv_splits=kv_splits)
    close(paged_attention(*args, impl="pallas", variant="gpu", config=cfg), numpy_paged(*args), 1e-5)


@pytest.mark.parametrize("variant", ["gpu", "tpu"])
def test_bfloat16(variant):
    args = make(2, 2, 8, 2, 64, 16, [5, 70], jnp.bfloat16, seed=7)
    out = paged_attention(*args, impl="pallas", variant=variant)
    assert out.dtype == jnp.bfloat16
    close(out, paged_attention_reference(*args).astype(jnp.float32), TOL[jnp.bfloat16])


def test_auto_picks_the_kernel_only_where_validated():
    # Validated on a GPU (experiments/results/gpu_check.md, H100); never interpret mode, never the unrun TPU variant.
    assert pa.VALIDATED_FASTER == frozenset({("gpu", "gpu")})
    assert pa.resolve_impl("auto") == ("pallas" if jax.default_backend() == "gpu" else "xla")
    assert pa.resolve_impl("auto", "tpu") == "xla"


def _args():
    return make(2, 1, 4, 2, 16, 16, [3, 9], jnp.float32)


BAD = [
    (lambda q, k, v, bt, ln: paged_attention(q[0], k, v, bt, ln), ValueError, "q must be"),
    (lambda q, k, v, bt, ln: paged_attention(q, k[0], v, bt, ln), ValueError, "k_pages must be"),
    (lambda q, k, v, bt, ln: paged_attention(q, k, v[:1], bt, ln), ValueError, "v_pages shape"),
    (lambda q, k, v, bt, ln: paged_attention(q, k.astype(jnp.bfloat16), v, bt, ln), TypeError, "dtype"),
    (lambda q, k, v, bt, ln: paged_attention(q[..., :8], k, v, bt, ln), ValueError, "head_dim mismatch"),
    (lambda q, k, v, bt, ln: paged_attention(q[:, :, :3], k, v, bt, ln), ValueError, "multiple of n_kv_heads"),
    (lambda q, k, v, bt, ln: paged_attention(q, k, v, bt.astype(jnp.float32), ln), ValueError, "block_tables"),
    (lambda q, k, v, bt, ln: paged_attention(q, k, v, bt, ln[:1]), ValueError, "lengths must be"),
    (lambda q, k, v, bt, ln: paged_attention(q, k, v, bt, ln, impl="flash"), ValueError, "impl must be"),
    (lambda q, k, v, bt, ln: paged_attention(q, k, v, bt, ln, impl="pallas", variant="x"), ValueError,
     "variant must be"),
    (lambda q, k, v, bt, ln: paged_attention(q, k, v, bt, ln, impl="pallas",
                                             config=PagedAttentionConfig(pages_per_block=3)), ValueError,
     "pages_per_block=3"),
    (lambda q, k, v, bt, ln: paged_attention(q, k, v, bt, ln, impl="pallas", variant="gpu",
                                             config=PagedAttentionConfig(block_rows=8)), ValueError, "block_rows=8"),
    (lambda q, k, v, bt, ln: paged_attention(q, k, v, bt, ln, impl="pallas", config={"block_rows": 16}),
     TypeError, "PagedAttentionConfig"),
    (lambda q, k, v, bt, ln: paged_attention(q, k[:, :12], v[:, :12], bt, ln, impl="pallas", variant="gpu"),
     ValueError, "page_size=12"),
    (lambda q, k, v, bt, ln: paged_attention(q, k[:, :12], v[:, :12], bt, ln, impl="pallas", variant="tpu"),
     ValueError, "page_size=12"),
    (lambda q, k, v, bt, ln: paged_attention(q[..., :12], k[..., :12], v[..., :12], bt, ln, impl="pallas",
                                             variant="gpu"), ValueError, "head_dim=12"),
    (lambda q, k, v, bt, ln: paged_attention(q, k, v, bt, ln, impl="pallas", variant="tpu",
                                             config=PagedAttentionConfig(kv_splits=2)), ValueError, "kv_splits=2"),
    (lambda q, k, v, bt, ln: paged_attention(q, k, v, bt, ln, impl="pallas",
                                             config=PagedAttentionConfig(kv_splits=0)), ValueError, "kv_splits"),
    (lambda q, k, v, bt, ln: paged_attention(q, k[:, :8], v[:, :8], bt, ln, impl="pallas", variant="gpu",
                                             config=PagedAttentionConfig(pages_per_block=1)), ValueError,
     "pages_per_block=1 with page_size=8"),
]


@pytest.mark.parametrize("i", range(len(BAD)))
def test_invalid_arguments_raise_before_tracing(i, monkeypatch):
    fn, exc, msg = BAD[i]

    def no_kernel(*a, **k):
        raise AssertionError("a kernel was traced before the arguments were validated")

    monkeypatch.setattr(pa.pl, "pallas_call", no_kernel)
    with pytest.raises(exc, match=msg):
        fn(*_args())


# ------------------------------------------------------------------------------------------ full grid (slow)

GRID = [
    # (B, Tq, H, KVH, D, page_size, lengths)
    (4, 1, 8, 8, 64, 16, [1, 2, 17, 100]),           # decode, GQA 1
    (4, 1, 32, 8, 128, 16, [0, 16, 511, 2048]),      # decode, GQA 4, long context, padding slot
    (3, 1, 16, 2, 128, 32, [1, 33, 1999]),           # decode, GQA 8, 32-token pages
    (3, 4, 16, 4, 64, 32, [4, 64, 1025]),            # speculative decoding, 4 tokens
    (2, 32, 8, 1, 64, 16, [32, 700]),                # chunked prefill, GQA 8
    (2, 48, 4, 4, 128, 32, [48, 300]),               # chunked prefill, GQA 1, chunk not a power of two
]


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["gpu", "tpu"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("case", range(len(GRID)))
def test_grid(variant, dtype, case):
    B, Tq, H, KVH, D, ps, lengths = GRID[case]
    args = make(B, Tq, H, KVH, D, ps, lengths, dtype, seed=100 + case)
    ref = paged_attention_reference(*args)
    if dtype == jnp.float32 and case in (0, 3, 4):
        close(ref, numpy_paged(*args), 1e-5)
    out = paged_attention(*args, impl="pallas", variant=variant)
    assert np.all(np.isfinite(np.asarray(out, np.float32)))
    close(out.astype(jnp.float32), ref.astype(jnp.float32), TOL[dtype])
    if variant == "gpu" and case in (1, 3):
        split = paged_attention(*args, impl="pallas", variant=variant, config=PagedAttentionConfig(kv_splits=4))
        close(split.astype(jnp.float32), ref.astype(jnp.float32), TOL[dtype])
