"""The serving engine's jitted iteration: decode rows and prefill rows over a paged KV cache.

One call runs

* a **decode part**: ``Bd`` running requests, one new token each, through every layer; and
* a **prefill part**: ``Bp`` prompt chunks of up to ``Tp`` tokens, through the layers ``[lo, hi)`` only.

Chunked prefill uses ``lo, hi = 0, n_layers`` (every iteration sees whole chunks through the whole stack).
Layered prefill is the same compiled step with a *group mask*: ``(lo, hi)`` is a runtime value, each layer of
the scanned stack tests ``lo <= layer < hi``, and a ``lax.cond`` takes the prefill rows through that layer's
attention and experts only when it is active. In inactive layers prefill tokens are neither written to the KV
cache nor routed: the MoE call there contains the decode tokens alone, so a masked prefill token is never
dispatched to another group's experts. The prefill hidden states leave the step and come back on the next
iteration (``pf_hidden``), so a prompt advances one layer group per iteration.

The decode and prefill tokens of an active layer share one MoE call, so an iteration touches each expert's
weights once per layer however many rows use it; the step reports the number of distinct experts it routed to
in each layer (``experts_touched``), the basis of the expert-weight-traffic metric.

Attention reads keys/values through block tables from the pool laid out by
:class:`moejax.serve.kv_cache.KVPool` (column ``t`` of a row's gathered keys is position ``t``).
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.nn.attention import attend, rope_tables
from moejax.serve.kv_cache import KVPool
from moejax.serve.sampling import sample_rows

TOP_LOGPROBS = 5
QUERY_BLOCK = 512  # prefill queries are processed in blocks of this many to bound the score matrix


class DecodeBatch(NamedTuple):
    tokens: jax.Array       # [Bd] int32
    pos: jax.Array          # [Bd] int32 position of the token (= tokens already cached)
    tables: jax.Array       # [Bd, P] int32 block table
    valid: jax.Array        # [Bd] bool (False: padding row)
    keys: jax.Array         # [Bd, 2] uint32 sampling keys
    temperature: jax.Array  # [Bd] float32 (0 = greedy)
    top_p: jax.Array        # [Bd] float32


class PrefillBatch(NamedTuple):
    tokens: jax.Array       # [Bp, Tp] int32, left-padded: the chunk's tokens end at column Tp - 1
    start: jax.Array        # [Bp] int32 position of the chunk's first token
    length: jax.Array       # [Bp] int32 valid tokens in the chunk (0: padding row)
    tables: jax.Array       # [Bp, P] int32
    keys: jax.Array         # [Bp, 2]
    temperature: jax.Array  # [Bp]
    top_p: jax.Array        # [Bp]


class StepOutput(NamedTuple):
    dec_next: jax.Array        # [Bd] sampled tokens
    dec_logprob: jax.Array     # [Bd] log-probability of the sampled token
    dec_top: tuple             # ([Bd, 5] ids, [Bd, 5] logprobs)
    pf_next: jax.Array         # [Bp] token sampled after each chunk's last valid token
    pf_logprob: jax.Array      # [Bp]
    pf_top: tuple
    pf_hidden: jax.Array       # [Bp, Tp, D] hidden states after layer ``hi`` (layered prefill carries them)
    experts_touched: jax.Array  # [n_layers] distinct experts routed to per layer (0 for dense layers)
    dec_logits: jax.Array | None  # [Bd, V] float32 (only with return_logits)
    pf_logits: jax.Array | None   # [Bp, V]
    pool: KVPool


def _slots(tables, pos, block_size):
    """Pool slot of position ``pos`` (any shape ``[B, ...]``) through ``tables [B, P]``."""
    blk = jnp.take_along_axis(tables, (pos // block_size).reshape(pos.shape[0], -1), axis=1).reshape(pos.shape)
    return blk * block_size + pos % block_size


def _paged_attend(q, kp, vp, li, tables, qpos, lengths, block_size, impl="xla"):
    """Attention of ``q [B, Tq, H, hd]`` at positions ``qpos [B, Tq]`` over the row's cached keys.

    Rows are left-padded, so a row's queries end at position ``lengths - 1`` (the layout of
    ``pallas_kernels.paged_attention``). ``impl="xla"``: gather the row's pages (``kp[li]`` through
    ``tables``) and run masked dense attention; queries see positions ``<= qpos`` and ``< lengths``; long
    query blocks are split so the score matrix stays bounded. ``impl="pallas"`` (or ``"auto"``, which picks
    the kernel only where it was validated faster) calls the paged-attention kernel on layer ``li``'s pages.
    """
    if impl != "xla":
        from pallas_kernels.paged_attention import paged_attention

        nb = kp.shape[1] // block_size
        kl = kp[li].reshape(nb, block_size, *kp.shape[2:]).astype(q.dtype)
        vl = vp[li].reshape(nb, block_size, *vp.shape[2:]).astype(q.dtype)
        return paged_attention(q, kl, vl, tables, lengths, impl=impl)
    B, P = tables.shape
    T = P * block_size
    slots = (tables[:, :, None] * block_size + jnp.arange(block_size)).reshape(B, T)
    k = kp[li, slots].astype(q.dtype)  # [B, T, KV, hd]
    v = vp[li, slots].astype(q.dtype)
    cols = jnp.arange(T)

    def block(qb, pb):
        mask = (cols[None, None, :] <= pb[:, :, None]) & (cols[None, None, :] < lengths[:, None, None])
        return attend(qb, k, v, mask)

    Tq = q.shape[1]
    if Tq <= QUERY_BLOCK or Tq % QUERY_BLOCK:
        return block(q, qpos)
    nb = Tq // QUERY_BLOCK
    qs = jnp.moveaxis(q.reshape(B, nb, QUERY_BLOCK, *q.shape[2:]), 1, 0)
    ps = jnp.moveaxis(qpos.reshape(B, nb, QUERY_BLOCK), 1, 0)
    out = jax.lax.map(lambda a: block(*a), (qs, ps))
    return jnp.moveaxis(out, 0, 1).reshape(q.shape)


def _sample(model, h, keys, temperature, top_p, return_logits):
    logits = model.head(h)
    tok, lp = sample_rows(logits, keys, temperature, top_p)
    top_lp, top_id = jax.lax.top_k(lp, TOP_LOGPROBS)
    chosen = jnp.take_along_axis(lp, tok[:, None], axis=1)[:, 0]
    return tok, chosen, (top_id.astype(jnp.int32), top_lp), (logits if return_logits else None)


@partial(jax.jit, static_argnames=("gdef", "block_size", "use_hidden", "return_logits", "attn_impl"),
         donate_argnames=("pool",))
def engine_step(gdef, state, pool: KVPool, dec: DecodeBatch | None, pf: PrefillBatch | None, pf_hidden, group, *,
                block_size: int, use_hidden: bool = False, return_logits: bool = False,
                attn_impl: str = "xla") -> StepOutput:
    """One engine iteration (see the module docstring). ``dec``/``pf`` may be None (empty part).

    ``group`` is ``int32 [2]`` = ``(lo, hi)``: the layers the prefill rows pass through this iteration.
    With ``use_hidden`` the prefill rows start from ``pf_hidden`` (the previous group's output) instead of
    the token embeddings.
    """
    model = nnx.merge(gdef, state)
    cfg = model.cfg
    dt = jnp.dtype(cfg.dtype)
    hd = cfg.resolved_head_dim
    lo, hi = group[0], group[1]
    emb = model.embed[...]
    has_d, has_p = dec is not None, pf is not None

    if has_d:
        Bd = dec.tokens.shape[0]
        xd = jnp.take(emb, dec.tokens, axis=0).astype(dt)
        d_rope = rope_tables(dec.pos[:, None], hd, cfg.rope_theta)
        d_slots = jnp.where(dec.valid, _slots(dec.tables, dec.pos[:, None], block_size)[:, 0], 0)
        d_len = jnp.where(dec.valid, dec.pos + 1, 0)
    if has_p:
        Bp, Tp = pf.tokens.shape
        pad = Tp - pf.length  # left padding
        p_pos = (pf.start - pad)[:, None] + jnp.arange(Tp, dtype=jnp.int32)
        p_valid = jnp.arange(Tp)[None, :] >= pad[:, None]
        xp = pf_hidden.astype(dt) if use_hidden else jnp.take(emb, pf.tokens, axis=0).astype(dt)
        p_rope = rope_tables(p_pos, hd, cfg.rope_theta)
        p_slots = jnp.where(p_valid, _slots(pf.tables, jnp.maximum(p_pos, 0), block_size), 0)
        p_len = jnp.where(pf.length > 0, pf.start + pf.length, 0)

    ks, vs, touched = list(pool.k), list(pool.v), []
    for r, (kind, first, n) in enumerate(model.runs):
        gd, st = nnx.split(model.stacks[r])

        def body(carry, xs, gd=gd, kind=kind, first=first):
            xd_, xp_, kp, vp = carry
            bst, li = xs
            blk = nnx.merge(gd, bst)
            E = cfg.moe.num_experts if kind == "moe" else 1

            def ffn(y, mask):
                if kind == "moe":
                    f, aux = blk.moe(y, token_mask=mask)
                    return f, jnp.sum(aux["expert_load"] > 0).astype(jnp.int32)
                return blk.mlp(y), jnp.int32(0)

            def attn_part(x, rope, pos2, slots, tables, lengths, kp, vp):
                q, k, v = blk.attn.qkv(blk.attn_norm(x), None, rope)
                kp = kp.at[li, slots.reshape(-1)].set(k.reshape(-1, *k.shape[2:]).astype(kp.dtype))
                vp = vp.at[li, slots.reshape(-1)].set(v.reshape(-1, *v.shape[2:]).astype(vp.dtype))
                o = _paged_attend(q, kp, vp, li, tables, pos2, lengths, block_size, attn_impl)
                return x + blk.attn.out(o).astype(x.dtype), kp, vp

            def decode_only(xd_, xp_, kp, vp):
                xd_, kp, vp = attn_part(xd_[:, None], d_rope, dec.pos[:, None], d_slots, dec.tables, d_len, kp, vp)
                xd_ = xd_[:, 0]
                f, cnt = ffn(blk.ffn_norm(xd_), dec.valid)
                return xd_ + f.astype(xd_.dtype), xp_, kp, vp, cnt

            def with_prefill(xd_, xp_, kp, vp):
                if has_d:
                    xd_, kp, vp = attn_part(xd_[:, None], d_rope, dec.pos[:, None], d_slots, dec.tables, d_len,
                                            kp, vp)
                    xd_ = xd_[:, 0]
                xp_, kp, vp = attn_part(xp_, p_rope, p_pos, p_slots, pf.tables, p_len, kp, vp)
                yp = blk.ffn_norm(xp_).reshape(Bp * Tp, -1)
                mp = p_valid.reshape(-1)
                if has_d:
                    y = jnp.concatenate([blk.ffn_norm(xd_), yp])
                    m = jnp.concatenate([dec.valid, mp])
                else:
                    y, m = yp, mp
                f, cnt = ffn(y, m)
                f = f.astype(dt)
                if has_d:
                    xd_ = xd_ + f[:Bd]
                    f = f[Bd:]
                return xd_, xp_ + f.reshape(xp_.shape), kp, vp, cnt

            if has_p and has_d:
                layer = first + li
                active = (layer >= lo) & (layer < hi)
                xd_, xp_, kp, vp, cnt = jax.lax.cond(active, with_prefill, decode_only, xd_, xp_, kp, vp)
            elif has_p:
                layer = first + li
                active = (layer >= lo) & (layer < hi)
                xd_, xp_, kp, vp, cnt = jax.lax.cond(
                    active, with_prefill, lambda a, b, c, d: (a, b, c, d, jnp.int32(0)), xd_, xp_, kp, vp)
            else:
                xd_, xp_, kp, vp, cnt = decode_only(xd_, xp_, kp, vp)
            del E
            return (xd_, xp_, kp, vp), cnt

        carry = (xd if has_d else jnp.zeros((0,), dt), xp if has_p else jnp.zeros((0,), dt), ks[r], vs[r])
        (xd_o, xp_o, ks[r], vs[r]), cnt = jax.lax.scan(body, carry, (st, jnp.arange(n, dtype=jnp.int32)))
        if has_d:
            xd = xd_o
        if has_p:
            xp = xp_o
        touched.append(cnt)

    empty_i = jnp.zeros((0,), jnp.int32)
    empty_f = jnp.zeros((0,), jnp.float32)
    empty_top = (jnp.zeros((0, TOP_LOGPROBS), jnp.int32), jnp.zeros((0, TOP_LOGPROBS), jnp.float32))
    if has_d:
        d_next, d_lp, d_top, d_logits = _sample(model, xd, dec.keys, dec.temperature, dec.top_p, return_logits)
    else:
        d_next, d_lp, d_top, d_logits = empty_i, empty_f, empty_top, None
    if has_p:
        last = xp[:, -1]  # left-padded rows end with their last token
        p_next, p_lp, p_top, p_logits = _sample(model, last, pf.keys, pf.temperature, pf.top_p, return_logits)
        p_hidden = xp
    else:
        p_next, p_lp, p_top, p_logits, p_hidden = empty_i, empty_f, empty_top, None, empty_f
    return StepOutput(d_next, d_lp, d_top, p_next, p_lp, p_top, p_hidden, jnp.concatenate(touched), d_logits,
                      p_logits, KVPool(tuple(ks), tuple(vs)))
