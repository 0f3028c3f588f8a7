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


@pytest.fixture(autouse=True)
def verify_triton_modules(monkeypatch):
    """Run the MLIR verifier on every Triton module the GPU lowering builds.

    XLA's Triton pipeline verifies the module only on a GPU ("Failed to parse Triton module"); verifying it
    here catches ill-typed IR (e.g. an ``scf.for`` whose bounds differ in type) on this CPU machine.
    Yields the list of verified modules so a test can check that the hook ran.
    """
    try:
        from jax._src.pallas.triton import lowering as triton_lowering
    except ImportError:  # pragma: no cover - a jax without the Triton lowering
        yield None
        return
    orig, seen = triton_lowering.lower_jaxpr_to_triton_module, []

    def checked(*args, **kwargs):
        result = orig(*args, **kwargs)
        result.module.operation.verify()  # raises MLIRError with the failing op
        seen.append(True)
        return result

    monkeypatch.setattr(triton_lowering, "lower_jaxpr_to_triton_module", checked)
    yield seen


def lower(fn, args, platform):
    traced = jax.jit(fn).trace(*args)
    try:
        return traced.lower(lowering_platforms=(platform,)).as_text()
    except TypeError as e:  # pragma: no cover - a jax without cross-platform lowering
        pytest.skip(f"cross-platform lowering unavailable: {e}")


@pytest.mark.parametrize("variant", ["gpu", "tpu"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_grouped_matmul_lowers(variant, dtype, verify_triton_modules):
    M, K, N, G = 512, 256, 384, 8
    x = jnp.zeros((M, K), dtype)
    w = jnp.zeros((G, K, N), dtype)
    dy = jnp.zeros((M, N), dtype)
    gs = jnp.zeros((G,), jnp.int32)
    kw = {"impl": "pallas", "variant": variant, "interpret": False}

    def loss(x, w, gs):
        return jnp.sum(gmm(x, w, gs, **kw).astype(jnp.float32))

    for fn, args in ((lambda x, w, gs: gmm(x, w, gs, **kw), (x, w, gs)),
                     (lambda x, dy, gs: tgmm(x, dy, gs, **kw), (x, dy, gs)),
                     (jax.grad(loss, (0, 1)), (x, w, gs))):
        text = lower(fn, args, PLATFORM[variant])
        assert ("triton" in text.lower()) if variant == "gpu" else ("tpu_custom_call" in text)
    if variant == "gpu" and verify_triton_modules is not None:
        assert len(verify_triton_modules) >= 4  # gmm, tgmm, and the gradient's gmm + tgmm were verified


@pytest.mark.parametrize("variant", ["gpu", "tpu"])
@pytest.mark.parametrize("shape", [(4, 1, 32, 8, 128, 16), (2, 24, 8, 2, 64, 32)])
def test_paged_attention_lowers(variant, shape, verify_triton_modules):
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
    if variant == "gpu" and verify_triton_modules is not None:
        assert len(verify_triton_modules) == len(configs)


def test_atomic_experts_lower_to_triton(verify_triton_modules):
    from pallas_kernels.atomic_experts import atomic_experts

    T, K, N, d = 256, 16, 1024, 64
    x, u = jnp.zeros((T, d), jnp.bfloat16), jnp.zeros((N, d), jnp.bfloat16)
    ids, w = jnp.zeros((T, K), jnp.int32), jnp.zeros((T, K), jnp.float32)

    def f(x, u, v, w):
        return atomic_experts(x, u, v, ids, w, interpret=False)

    grad = jax.grad(lambda x, u, v, w: jnp.sum(f(x, u, v, w).astype(jnp.float32)), (0, 1, 2, 3))
    for fn in (f, grad):
        assert "triton" in lower(fn, (x, u, u, w), "cuda").lower()
    if verify_triton_modules is not None:
        assert len(verify_triton_modules) >= 2  # the forward and the backward kernel were verified
