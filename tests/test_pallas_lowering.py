"""Cross-platform lowering of the kernels from this CPU machine: the GPU variant through the Triton lowering
(``lowering_platforms=("cuda",)``) and the TPU variant through the Mosaic lowering (``("tpu",)``).

This runs the real Pallas->Triton-IR and Pallas->Mosaic lowerings (block-shape rules, supported ops), which
interpret mode skips; it does not run the device compilers (Triton->PTX, Mosaic->TPU), so it is a static
check that complements, not replaces, ``experiments/gpu_check.py`` on a device.
"""

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels.grouped_matmul import gmm, tgmm
from pallas_kernels.paged_attention import PagedAttentionConfig, paged_attention

PLATFORM = {"gpu": "cuda", "tpu": "tpu"}


def lower(fn, args, platform):
    traced = jax.jit(fn).trace(*args)
    try:
        return traced.lower(lowering_platforms=(platform,)).as_text()
    except TypeError as e:  # pragma: no cover - a jax without cross-platform lowering
        pytest.skip(f"cross-platform lowering unavailable: {e}")


@pytest.mark.parametrize("variant", ["gpu", "tpu"])
def test_grouped_matmul_lowers(variant):
    M, K, N, G = 512, 256, 384, 8
    x = jnp.zeros((M, K), jnp.bfloat16)
    w = jnp.zeros((G, K, N), jnp.bfloat16)
    dy = jnp.zeros((M, N), jnp.bfloat16)
    gs = jnp.zeros((G,), jnp.int32)
    kw = {"impl": "pallas", "variant": variant, "interpret": False}

    def loss(x, w, gs):
        return jnp.sum(gmm(x, w, gs, **kw).astype(jnp.float32))

    for fn, args in ((lambda x, w, gs: gmm(x, w, gs, **kw), (x, w, gs)),
                     (lambda x, dy, gs: tgmm(x, dy, gs, **kw), (x, dy, gs)),
                     (jax.grad(loss, (0, 1)), (x, w, gs))):
        text = lower(fn, args, PLATFORM[variant])
        assert ("triton" in text.lower()) if variant == "gpu" else ("tpu_custom_call" in text)


@pytest.mark.parametrize("variant", ["gpu", "tpu"])
@pytest.mark.parametrize("shape", [(4, 1, 32, 8, 128, 16), (2, 24, 8, 2, 64, 32)])
def test_paged_attention_lowers(variant, shape):
    B, Tq, H, KVH, D, ps = shape
    q = jnp.zeros((B, Tq, H, D), jnp.bfloat16)
    kp = jnp.zeros((50, ps, KVH, D), jnp.bfloat16)
    bt = jnp.zeros((B, 12), jnp.int32)
    ln = jnp.zeros((B,), jnp.int32)
    configs = [None] + ([PagedAttentionConfig(kv_splits=3)] if variant == "gpu" else [])
    for cfg in configs:
        text = lower(lambda q, k, v, bt, ln, cfg=cfg: paged_attention(q, k, v, bt, ln, impl="pallas", variant=variant,
                                                                      config=cfg, interpret=False),
                     (q, kp, kp, bt, ln), PLATFORM[variant])
        assert ("triton" in text.lower()) if variant == "gpu" else ("tpu_custom_call" in text)
