"""Grouped-query attention with RoPE, optional QK-norm and q/k/v bias, over a contiguous or a paged KV cache.

Dense entry points: :meth:`Attention.__call__` without a cache (training / teacher forcing: causal attention
within segments) and with a contiguous cache (``generate``'s prefill or decode: new keys/values are written at
``cache_index`` and queries attend to every valid cached column at or before their own).

Paged entry points (the serving engine, offloaded serving): keys and values live in a pool of fixed-size blocks
``[layers, num_blocks * block_size, KV, hd]`` (one pool per run of layers; a token's *slot* is
``block * block_size + offset``) and each row reads its own through a block table. :class:`PagedRows` holds a
batch of rows' per-step inputs (RoPE tables, positions, write slots, lengths, tables), :func:`write_kv` writes new
keys/values, :func:`paged_attention` attends over a row's cached keys (an online-softmax loop over key blocks,
or the ``pallas_kernels.paged_attention`` kernel). Softmax runs in float32 everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.nn import sparse
from moejax.nn.norms import rms_norm
from moejax.nn.sharding import tensor_input, tensor_output
from pallas_kernels.common import MASK_VALUE

QUERY_BLOCK = 512  # paged prefill queries are processed in blocks of this many to bound the score matrix


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
    s = jnp.where(mask[:, None, None], s, MASK_VALUE)
    p = jax.nn.softmax(s, axis=-1)
    p = jnp.where(mask[:, None, None], p, 0.0)  # rows with no valid key (padding queries) give zeros
    o = jnp.einsum("bkgst,btkd->bskgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return o.reshape(B, S, H, hd).astype(q.dtype)


def attention_mask(batch: int, seq: int, *, segment_ids=None, cache_index=None, kv_valid=None,
                   causal: bool = True) -> jax.Array:
    """Boolean ``[B, S, keys]`` mask.

    Without a cache (``kv_valid is None``): causal within segments (``segment_ids [B, S]``, 0 = padding).
    With a cache: query ``s`` (at column ``cache_index + s``) sees the valid columns at or before its own.
    ``causal=False`` (a diffusion LM, ``ModelConfig.causal``): every query sees every key of its segment (without
    a cache) or every valid column (with one), before or after its own.
    """
    if kv_valid is None:
        seg = jnp.ones((batch, seq), jnp.int32) if segment_ids is None else segment_ids
        same = (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] != 0)
        return (jnp.tril(jnp.ones((seq, seq), bool))[None] & same) if causal else same
    if not causal:
        return jnp.broadcast_to(kv_valid[:, None, :], (batch, seq, kv_valid.shape[1]))
    T = kv_valid.shape[1]
    qpos = cache_index + jnp.arange(seq)
    return (jnp.arange(T)[None, :] <= qpos[:, None])[None] & kv_valid[:, None, :]


def _proj(w):
    """A q/k/v weight ``[D, heads, head_dim]`` as the projection multiplies by it (:mod:`moejax.nn.sparse`)."""
    return sparse.sparse_weight(w[...], "attention", *Attention.SPARSE_WEIGHTS["wq"])


class Attention(nnx.Module):
    """Multi-head attention with ``n_kv_heads`` shared key/value heads."""

    SPARSE_SITE = "attention"  # N:M sparsity (moejax.nn.sparse): (reduction axis, output axis) of each weight
    SPARSE_WEIGHTS: ClassVar[dict[str, tuple[int, int]]] = {"wq": (-3, -1), "wk": (-3, -1), "wv": (-3, -1),
                                                            "wo": (-2, -1)}

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
        """q, k, v ``[B, S, heads, hd]`` with RoPE. Under tensor parallelism (:mod:`moejax.nn.sharding`) the
        projections are column-parallel: the local heads only (``x`` replicated, its gradient summed)."""
        dt = self.dtype
        x = tensor_input(x.astype(dt))
        q = sparse.einsum("bsd,dhk->bshk", x, _proj(self.wq).astype(dt))
        k = sparse.einsum("bsd,dhk->bshk", x, _proj(self.wk).astype(dt))
        v = sparse.einsum("bsd,dhk->bshk", x, _proj(self.wv).astype(dt))
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
        wo = sparse.sparse_weight(self.wo[...], "attention", *self.SPARSE_WEIGHTS["wo"])  # reduce: heads, head_dim
        return tensor_output(sparse.einsum("bshk,hkd->bsd", o, wo.astype(self.dtype)))

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


# ------------------------------------------------------------------------------------------------ paged cache
@dataclass(frozen=True)
class PagedSpec:
    """Static settings of :func:`paged_attention` (hashable: a jit static argument).

    Attributes:
      block_size: tokens per KV block of the pool.
      impl: ``"xla"`` (the key-block loop), ``"pallas"`` or ``"auto"`` (``pallas_kernels.paged_attention``).
      kv_block: keys per block of the XLA loop (a multiple of ``block_size``; None: the whole table).
    """

    block_size: int
    impl: str = "xla"
    kv_block: int | None = None


class PagedRows(NamedTuple):
    """A batch of rows' paged-attention inputs for one step, the same for every layer.

    Rows are left-padded: a row's queries end at position ``lengths - 1``.
    """

    rope: tuple          # (cos, sin) ``[B, S, hd]`` of the query positions
    pos: jax.Array       # [B, S] query positions for the mask (a query sees keys at or before it)
    slots: jax.Array     # [B, S] pool slots the new keys/values go to (0: the scratch slot, for padding)
    lengths: jax.Array   # [B] cached tokens after this step (0: padding row)
    tables: jax.Array    # [B, P] block tables
    valid: jax.Array     # [B, S] real tokens


def paged_slots(tables: jax.Array, pos: jax.Array, block_size: int) -> jax.Array:
    """Pool slot of position ``pos`` (any shape ``[B, ...]``) through ``tables [B, P]``."""
    blk = jnp.take_along_axis(tables, (pos // block_size).reshape(pos.shape[0], -1), axis=1).reshape(pos.shape)
    return blk * block_size + pos % block_size


def paged_rows(tables, pos, valid, lengths, *, block_size: int, head_dim: int, rope_theta: float,
               causal: bool = True) -> PagedRows:
    """:class:`PagedRows` of rows at positions ``pos [B, S]`` (``valid [B, S]``: real tokens; padding tokens
    write to the scratch slot 0) holding ``lengths [B]`` tokens after this step. ``causal=False`` (a diffusion
    LM): every query sees all ``lengths`` cached tokens of its row, before and after its own position (the
    queries' mask position is the row's last; RoPE keeps their own)."""
    slots = jnp.where(valid, paged_slots(tables, jnp.maximum(pos, 0), block_size), 0)
    see = pos if causal else jnp.broadcast_to(lengths[:, None] - 1, pos.shape)
    return PagedRows(rope_tables(pos, head_dim, rope_theta), see, slots, lengths, tables, valid)


def write_kv(kp, vp, li, slots, k, v):
    """Write new keys/values ``[B, S, KV, hd]`` to pool slots ``slots [B, S]`` of layer ``li``. A slot past the
    pool's end (``>= kp.shape[1]``) is skipped: no write at all, unlike the scratch slot 0 that padding rows use."""
    flat = slots.reshape(-1)
    kp = kp.at[li, flat].set(k.reshape(-1, *k.shape[2:]).astype(kp.dtype), mode="drop")
    vp = vp.at[li, flat].set(v.reshape(-1, *v.shape[2:]).astype(vp.dtype), mode="drop")
    return kp, vp


def paged_attention(q, kp, vp, li, tables, qpos, lengths, block_size: int, impl: str = "xla", kv_block=None):
    """Attention of ``q [B, Tq, H, hd]`` at positions ``qpos [B, Tq]`` over the row's cached keys in layer ``li``
    of a pool ``kp``/``vp [layers, slots, KV, hd]``.

    Rows are left-padded, so a row's queries end at position ``lengths - 1`` (the layout of
    ``pallas_kernels.paged_attention``); queries see positions ``<= qpos`` and ``< lengths``, and queries with
    no visible key give zeros. ``impl="xla"``: a loop over key blocks of ``kv_block`` tokens (a whole number
    of pages; default the whole table) with an online softmax, as flash attention does. The loop's trip
    count is a run-time value (the longest row's visible length), so the table width ``P`` can be the
    engine's maximum without costing work for short contexts: the compiled step does not depend on context
    length. Each block gathers its pages straight from the stacked per-run pool (no copy of layer ``li``'s
    pages); long prefill query blocks are split (:data:`QUERY_BLOCK`) so the score matrix stays bounded. This
    computes the math of ``pallas_kernels.paged_attention.paged_attention_reference``. ``impl="pallas"`` (or
    ``"auto"``, which picks the kernel only where it was validated faster) calls the paged-attention kernel
    on layer ``li``'s pages.
    """
    if impl != "xla":
        from pallas_kernels.paged_attention import paged_attention as kernel

        nb = kp.shape[1] // block_size
        kl = kp[li].reshape(nb, block_size, *kp.shape[2:]).astype(q.dtype)
        vl = vp[li].reshape(nb, block_size, *vp.shape[2:]).astype(q.dtype)
        return kernel(q, kl, vl, tables, lengths, impl=impl)
    B, P = tables.shape
    kv_block = kv_block or P * block_size
    if kv_block % block_size:
        raise ValueError(f"kv_block={kv_block} must be a multiple of block_size={block_size}")
    ppb = kv_block // block_size
    if P % ppb:  # pad the table with the scratch block (never visible: beyond every length)
        tables = jnp.pad(tables, ((0, 0), (0, ppb - P % ppb)))
    attend_block = partial(_attend_key_blocks, kp=kp, vp=vp, li=li, tables=tables, lengths=lengths,
                           block_size=block_size, kv_block=kv_block)
    B, Tq, H, hd = q.shape
    if Tq <= QUERY_BLOCK or Tq % QUERY_BLOCK:
        return attend_block(q, qpos)
    nq = Tq // QUERY_BLOCK
    qs = jnp.moveaxis(q.reshape(B, nq, QUERY_BLOCK, H, hd), 1, 0)
    ps = jnp.moveaxis(qpos.reshape(B, nq, QUERY_BLOCK), 1, 0)
    out = jax.lax.map(lambda a: attend_block(*a), (qs, ps))
    return jnp.moveaxis(out, 0, 1).reshape(q.shape)


def _attend_key_blocks(qb, pb, *, kp, vp, li, tables, lengths, block_size, kv_block):
    """``qb [B, Tb, H, hd]`` at positions ``pb [B, Tb]``: online softmax over the visible key blocks."""
    B, Tb, H, hd = qb.shape
    KV = kp.shape[2]
    G = H // KV
    ppb = kv_block // block_size
    n_table_blocks = tables.shape[1] // ppb
    scale = 1.0 / jnp.sqrt(jnp.float32(hd))
    within = jnp.arange(kv_block)
    qg = qb.reshape(B, Tb, KV, G, hd)
    # keys needed: positions < min(length, max query position + 1) of any row
    need = jnp.max(jnp.minimum(lengths, jnp.max(pb, axis=1) + 1))
    n_blocks = jnp.clip((need + kv_block - 1) // kv_block, 0, n_table_blocks)

    def body(j, carry):
        m, den, acc = carry
        tb = jax.lax.dynamic_slice_in_dim(tables, j * ppb, ppb, axis=1)
        slots = (tb[:, :, None] * block_size + jnp.arange(block_size)).reshape(B, kv_block)
        k = kp[li, slots].astype(qb.dtype)  # [B, kv_block, KV, hd]
        v = vp[li, slots].astype(qb.dtype)
        cols = j * kv_block + within
        mask = (cols[None, None, :] <= pb[:, :, None]) & (cols[None, None, :] < lengths[:, None, None])
        sc = jnp.einsum("bskgd,btkd->bkgst", qg, k, preferred_element_type=jnp.float32) * scale
        mk = mask[:, None, None]
        sc = jnp.where(mk, sc, MASK_VALUE)
        m_new = jnp.maximum(m, jnp.max(sc, axis=-1))
        p = jnp.where(mk, jnp.exp(sc - m_new[..., None]), 0.0)
        corr = jnp.exp(m - m_new)
        den = den * corr + jnp.sum(p, axis=-1)
        acc = acc * corr[..., None] + jnp.einsum("bkgst,btkd->bkgsd", p.astype(v.dtype), v,
                                                 preferred_element_type=jnp.float32)
        return m_new, den, acc

    init = (jnp.full((B, KV, G, Tb), MASK_VALUE, jnp.float32), jnp.zeros((B, KV, G, Tb), jnp.float32),
            jnp.zeros((B, KV, G, Tb, hd), jnp.float32))
    if n_table_blocks == 1:  # one key block covers the table: no loop (its overhead shows in decode steps)
        _, den, acc = body(0, init)
    else:
        _, den, acc = jax.lax.fori_loop(0, n_blocks, body, init)
    o = acc / jnp.where(den > 0, den, 1.0)[..., None]  # no visible key: zeros
    return jnp.moveaxis(o, 3, 1).reshape(B, Tb, H, hd).astype(qb.dtype)


# ------------------------------------------------------------------------------------------ head-centric sparse
def head_topk(q, k, block_start, block: int, lengths, keep, K: int, window: int = 3):
    """dLLM-Serve's head-centric token selection for a diffusion LM's reuse steps.

    ``q [B, T, H, hd]``, ``k [B, T, KV, hd]``: a refresh step's (RoPE'd) queries and keys of whole canvases
    (``lengths [B]`` real tokens); the block ``[block_start, block_start + block)`` of each row is the one its
    coming reuse steps recompute. Per KV head, the block's mean query of each head of its group scores every
    *candidate* key (a real token outside the block), the group's maximum is max-pooled over ``window``
    neighbouring tokens, and the ``keep [B]`` best candidates are chosen (``K >= keep`` static). Returns the
    chosen positions ``[B, KV, K]`` (best first) and their validity ``[B, KV, K]``."""
    B, T, H, hd = q.shape
    KV = k.shape[2]
    cols = jnp.arange(T)
    in_block = (cols[None, :] >= block_start[:, None]) & (cols[None, :] < block_start[:, None] + block)
    qm = jnp.sum(jnp.where(in_block[:, :, None, None], q.astype(jnp.float32), 0.0), axis=1) / block  # [B, H, hd]
    qg = qm.reshape(B, KV, H // KV, hd)
    s = jnp.einsum("bkgd,btkd->bkgt", qg, k.astype(jnp.float32)).max(axis=2) / jnp.sqrt(jnp.float32(hd))
    cand = (cols[None, :] < lengths[:, None]) & ~in_block  # [B, T]
    s = jnp.where(cand[:, None], s, -jnp.inf)
    if window > 1:
        s = jax.lax.reduce_window(s, -jnp.inf, jax.lax.max, (1, 1, window), (1, 1, 1), "SAME")
        s = jnp.where(cand[:, None], s, -jnp.inf)
    val, pos = jax.lax.top_k(s, K)
    ok = (jnp.arange(K)[None, None, :] < keep[:, None, None]) & jnp.isfinite(val)
    return pos.astype(jnp.int32), ok


def selected_attention(q, kp, vp, li, tables, block_size: int, sel_pos, sel_ok, k_new, v_new, new_valid):
    """Attention of ``q [B, S, H, hd]`` over, per KV head, its own selected cached keys (positions ``sel_pos
    [B, KV, K]`` valid where ``sel_ok``, read from layer ``li`` of the pool through ``tables``) and the fresh keys
    and values of the queries' own tokens (``k_new``/``v_new [B, S, KV, hd]``, valid where ``new_valid [B, S]``):
    the reuse step of head-centric sparse attention. With every candidate selected it is the dense attention over
    the same keys (tested)."""
    B, S, H, hd = q.shape
    KV = kp.shape[2]
    slots = paged_slots(tables, sel_pos.reshape(B, -1), block_size).reshape(sel_pos.shape)  # [B, KV, K]
    heads = jnp.arange(KV)[None, :, None]
    ks = kp[li][slots, heads].astype(q.dtype)  # [B, KV, K, hd]
    vs = vp[li][slots, heads].astype(q.dtype)
    keys = jnp.concatenate([ks, jnp.moveaxis(k_new.astype(q.dtype), 1, 2)], axis=2)  # [B, KV, K + S, hd]
    vals = jnp.concatenate([vs, jnp.moveaxis(v_new.astype(q.dtype), 1, 2)], axis=2)
    ok = jnp.concatenate([sel_ok, jnp.broadcast_to(new_valid[:, None, :], (B, KV, S))], axis=2)  # [B, KV, K + S]
    qg = q.reshape(B, S, KV, H // KV, hd)
    sc = jnp.einsum("bskgd,bktd->bkgst", qg, keys, preferred_element_type=jnp.float32) / jnp.sqrt(jnp.float32(hd))
    mk = ok[:, :, None, None, :]
    sc = jnp.where(mk, sc, MASK_VALUE)
    p = jnp.where(mk, jax.nn.softmax(sc, axis=-1), 0.0)
    o = jnp.einsum("bkgst,bktd->bskgd", p.astype(vals.dtype), vals, preferred_element_type=jnp.float32)
    return o.reshape(B, S, H, hd).astype(q.dtype)
