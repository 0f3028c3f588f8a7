"""Normalization layers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """``x / rms(x) * weight`` computed in float32 (as Hugging Face's Llama/Mixtral/Qwen RMSNorm)."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (weight.astype(jnp.float32) * xf).astype(x.dtype)


class RMSNorm(nnx.Module):
    """RMSNorm over the last axis with a learned scale (initialized to one)."""

    def __init__(self, dim: int, *, eps: float = 1e-6, param_dtype=jnp.float32, logical_axis: str = "embed"):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype), logical_axes=(logical_axis,))

    def __call__(self, x):
        return rms_norm(x, self.weight[...], self.eps)
