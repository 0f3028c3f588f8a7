"""Grouped-query attention with RoPE, optional QK-norm and q/k/v bias, and a contiguous KV cache.

Entry points: :meth:`Attention.__call__` without a cache (training / teacher forcing: causal attention within
segments) and with a cache (prefill or decode: new keys/values are written at ``cache_index`` and queries
attend to every valid cached column at or before their own). Softmax runs in float32.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.nn.norms import rms_norm
from moejax.parallel import tensor_parallel as tp

_NEG = -1e30


class LayerKV(NamedTuple):
    k: jax.Array  # [B, S_max, KV, hd]
    v: jax.Array  # [B, S_max, KV, hd]


def rope_tables(positions: jax.Array, head_dim: int, theta: float):
    """cos/sin ``[B, S, head_dim]`` for Hugging Face's (non-interleaved, rotate-half) RoPE."""
    inv = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    ang = positions.astype(jnp.float32)[..., None] * inv
    ang = jnp.concatenate([ang, ang], axis=-1)
    return jnp.cos(ang), jnp.sin(ang)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate ``x [B, S, H, hd]`` by position (computed in float32)."""
    xf = x.astype(jnp.float32)
    h = x.shape[-1] // 2
    rot = jnp.concatenate([-xf[..., h:], xf[..., :h]], axis=-1)
    return (xf * cos[:, :, None, :] + rot * sin[:, :, None, :]).astype(x.dtype)


def attend(q, k, v, mask):
    """``q [B,S,H,hd]``, ``k,v [B,T,KV,hd]``, ``mask [B,S,T]`` bool -> ``[B,S,H,hd]`` (GQA by grouping)."""
    B, S, H, hd = q.shape
    KV = k.shape[2]
    qg = q.reshape(B, S, KV, H // KV, hd)
    s = jnp.einsum("bskgd,btkd->bkgst", qg, k, preferred_element_type=jnp.float32) / jnp.sqrt(
        jnp.float32(hd))
    s = jnp.where(mask[:, None, None], s, _NEG)
    p = jax.nn.softmax(s, axis=-1)
    p = jnp.where(mask[:, None, None], p, 0.0)  # rows with no valid key (padding queries) give zeros
    o = jnp.einsum("bkgst,btkd->bskgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return o.reshape(B, S, H, hd).astype(q.dtype)


def attention_mask(batch: int, seq: int, *, segment_ids=None, cache_index=None, kv_valid=None) -> jax.Array:
    """Boolean ``[B, S, keys]`` mask.

    Without a cache (``kv_valid is None``): causal within segments (``segment_ids [B, S]``, 0 = padding).
    With a cache: query ``s`` (at column ``cache_index + s``) sees the valid columns at or before its own.
    """
    if kv_valid is None:
        seg = jnp.ones((batch, seq), jnp.int32) if segment_ids is None else segment_ids
        causal = jnp.tril(jnp.ones((seq, seq), bool))
        return causal[None] & (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] != 0)
    T = kv_valid.shape[1]
    qpos = cache_index + jnp.arange(seq)
    return (jnp.arange(T)[None, :] <= qpos[:, None])[None] & kv_valid[:, None, :]


class Attention(nnx.Module):
    """Multi-head attention with ``n_kv_heads`` shared key/value heads."""

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, head_dim: int, *, rope_theta: float,
                 qk_norm: bool = False, qkv_bias: bool = False, norm_eps: float = 1e-6, init_std: float = 0.02,
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.rope_theta, self.norm_eps, self.dtype = rope_theta, norm_eps, dtype
        init = nnx.initializers.normal(stddev=init_std)
        self.wq = nnx.Param(init(rngs.params(), (d_model, n_heads, head_dim), param_dtype),
                            logical_axes=("embed", "heads", "head_dim"))
        self.wk = nnx.Param(init(rngs.params(), (d_model, n_kv_heads, head_dim), param_dtype),
                            logical_axes=("embed", "kv_heads", "head_dim"))
        self.wv = nnx.Param(init(rngs.params(), (d_model, n_kv_heads, head_dim), param_dtype),
                            logical_axes=("embed", "kv_heads", "head_dim"))
        self.wo = nnx.Param(init(rngs.params(), (n_heads, head_dim, d_model), param_dtype),
                            logical_axes=("heads", "head_dim", "embed"))
        if qkv_bias:
            self.bq = nnx.Param(jnp.zeros((n_heads, head_dim), param_dtype), logical_axes=("heads", "head_dim"))
            self.bk = nnx.Param(jnp.zeros((n_kv_heads, head_dim), param_dtype),
                                logical_axes=("kv_heads", "head_dim"))
            self.bv = nnx.Param(jnp.zeros((n_kv_heads, head_dim), param_dtype),
                                logical_axes=("kv_heads", "head_dim"))
        if qk_norm:
            self.q_norm = nnx.Param(jnp.ones((head_dim,), param_dtype), logical_axes=("head_dim",))
            self.k_norm = nnx.Param(jnp.ones((head_dim,), param_dtype), logical_axes=("head_dim",))

    def qkv(self, x, positions, rope=None):
        """q, k, v ``[B, S, heads, hd]`` with RoPE. Under :func:`~moejax.parallel.tensor_parallel.tensor_parallel`
        the projections are column-parallel: the local heads only (``x`` replicated, its gradient summed)."""
        dt = self.dtype
        x = tp.copy_to_tensor(x.astype(dt))
        q = jnp.einsum("bsd,dhk->bshk", x, self.wq[...].astype(dt))
        k = jnp.einsum("bsd,dhk->bshk", x, self.wk[...].astype(dt))
        v = jnp.einsum("bsd,dhk->bshk", x, self.wv[...].astype(dt))
        if hasattr(self, "bq"):
            q, k, v = q + self.bq[...].astype(dt), k + self.bk[...].astype(dt), v + self.bv[...].astype(dt)
        if hasattr(self, "q_norm"):
            q = rms_norm(q, self.q_norm[...], self.norm_eps)
            k = rms_norm(k, self.k_norm[...], self.norm_eps)
        cos, sin = rope if rope is not None else rope_tables(positions, self.head_dim, self.rope_theta)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def out(self, o):
        """The output projection (row-parallel under tensor parallelism: partial sums over the local heads,
        summed over the tensor axis)."""
        return tp.reduce_from_tensor(jnp.einsum("bshk,hkd->bsd", o, self.wo[...].astype(self.dtype)))

    def __call__(self, x, positions, *, segment_ids=None, kv: LayerKV | None = None, cache_index=None,
                 kv_valid=None, rope=None, mask=None):
        """Attention over ``x [B, S, D]``.

        Without ``kv``: causal within segments (``segment_ids [B, S]``, 0 = padding). With ``kv``: the new
        keys/values are written at columns ``[cache_index, cache_index + S)`` and each query attends to the
        columns ``<= cache_index + s`` where ``kv_valid [B, S_max]`` (already including the new tokens).
        ``rope`` (``(cos, sin)`` from :func:`rope_tables`) and ``mask`` (from :func:`attention_mask`) can be
        passed in precomputed, as the model does once for all layers. Returns ``(y, new_kv)``.
        """
        q, k, v = self.qkv(x, positions, rope)
        B, S = x.shape[:2]
        if mask is None:
            mask = attention_mask(B, S, segment_ids=segment_ids, cache_index=cache_index, kv_valid=kv_valid)
        if kv is None:
            return self.out(attend(q, k, v, mask)), None
        kc = jax.lax.dynamic_update_slice_in_dim(kv.k, k.astype(kv.k.dtype), cache_index, 1)
        vc = jax.lax.dynamic_update_slice_in_dim(kv.v, v.astype(kv.v.dtype), cache_index, 1)
        return self.out(attend(q, kc.astype(q.dtype), vc.astype(q.dtype), mask)), LayerKV(kc, vc)
