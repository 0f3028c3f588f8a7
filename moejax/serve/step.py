"""The serving engine's jitted iteration: decode rows and prefill rows over a paged KV cache.

One call runs

* a **decode part**: ``Bd`` running requests, one new token each, through every layer; and
* a **prefill part**: ``Bp`` prompt chunks of up to ``Tp`` tokens, through the layers ``[lo, hi)`` only.

Chunked prefill uses ``lo, hi = 0, n_layers`` (every iteration sees whole chunks through the whole stack).
Layered prefill is the same compiled step with a *group mask*: ``(lo, hi)`` is a runtime value, each layer of
the scanned stack tests ``lo <= layer < hi``, and ``lax.cond`` takes the prefill rows through that layer's
projections, attention and experts only when it is active (:func:`grouped_layer`; the KV pool itself never
enters a conditional, which would copy it in every layer). In inactive layers prefill tokens are neither
written to the KV cache (their writes are dropped) nor routed: the MoE call there contains the decode tokens
alone, so a masked prefill token is never dispatched to another group's experts. The prefill hidden states
leave the step and come back on the next iteration (``pf_hidden``), so a prompt advances one layer group per
iteration.

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

from moejax.nn.attention import _NEG, rope_tables
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


def _paged_attend(q, kp, vp, li, tables, qpos, lengths, block_size, impl="xla", kv_block=None):
    """Attention of ``q [B, Tq, H, hd]`` at positions ``qpos [B, Tq]`` over the row's cached keys.

    Rows are left-padded, so a row's queries end at position ``lengths - 1`` (the layout of
    ``pallas_kernels.paged_attention``); queries see positions ``<= qpos`` and ``< lengths``, and queries with
    no visible key give zeros. ``impl="xla"``: a loop over key blocks of ``kv_block`` tokens (a whole number
    of pages; default the whole table) with an online softmax, as flash attention does. The loop's trip
    count is a run-time value (the longest row's visible length), so the table width ``P`` can be the
    engine's maximum without costing work for short contexts: the compiled step does not depend on context
    length. Each block gathers its pages straight from the stacked per-run pool (no copy of layer ``li``'s
    pages); long prefill query blocks are split so the score matrix stays bounded. This computes the
    math of ``pallas_kernels.paged_attention.paged_attention_reference``. ``impl="pallas"`` (or
    ``"auto"``, which picks the kernel only where it was validated faster) calls the paged-attention kernel
    on layer ``li``'s pages.
    """
    if impl != "xla":
        from pallas_kernels.paged_attention import paged_attention

        nb = kp.shape[1] // block_size
        kl = kp[li].reshape(nb, block_size, *kp.shape[2:]).astype(q.dtype)
        vl = vp[li].reshape(nb, block_size, *vp.shape[2:]).astype(q.dtype)
        return paged_attention(q, kl, vl, tables, lengths, impl=impl)
    B, P = tables.shape
    kv_block = kv_block or P * block_size
    if kv_block % block_size:
        raise ValueError(f"kv_block={kv_block} must be a multiple of block_size={block_size}")
    ppb = kv_block // block_size
    if P % ppb:  # pad the table with the scratch block (never visible: beyond every length)
        tables = jnp.pad(tables, ((0, 0), (0, ppb - P % ppb)))
        P = tables.shape[1]
    B, Tq, H, hd = q.shape
    KV = kp.shape[2]
    G = H // KV
    scale = 1.0 / jnp.sqrt(jnp.float32(hd))
    within = jnp.arange(kv_block)

    def attend_block(qb, pb):
        """``qb [B, Tb, H, hd]`` at positions ``pb [B, Tb]``: online softmax over the visible key blocks."""
        Tb = qb.shape[1]
        qg = qb.reshape(B, Tb, KV, G, hd)
        # keys needed: positions < min(length, max query position + 1) of any row
        need = jnp.max(jnp.minimum(lengths, jnp.max(pb, axis=1) + 1))
        n_blocks = jnp.clip((need + kv_block - 1) // kv_block, 0, P // ppb)

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
            sc = jnp.where(mk, sc, _NEG)
            m_new = jnp.maximum(m, jnp.max(sc, axis=-1))
            p = jnp.where(mk, jnp.exp(sc - m_new[..., None]), 0.0)
            corr = jnp.exp(m - m_new)
            den = den * corr + jnp.sum(p, axis=-1)
            acc = acc * corr[..., None] + jnp.einsum("bkgst,btkd->bkgsd", p.astype(v.dtype), v,
                                                     preferred_element_type=jnp.float32)
            return m_new, den, acc

        init = (jnp.full((B, KV, G, Tb), _NEG, jnp.float32), jnp.zeros((B, KV, G, Tb), jnp.float32),
                jnp.zeros((B, KV, G, Tb, hd), jnp.float32))
        if P // ppb == 1:  # one key block covers the table: no loop (its overhead shows in decode steps)
            _, den, acc = body(0, init)
        else:
            _, den, acc = jax.lax.fori_loop(0, n_blocks, body, init)
        o = acc / jnp.where(den > 0, den, 1.0)[..., None]  # no visible key: zeros
        return jnp.moveaxis(o, 3, 1).reshape(B, Tb, H, hd).astype(qb.dtype)

    if Tq <= QUERY_BLOCK or Tq % QUERY_BLOCK:
        return attend_block(q, qpos)
    nq = Tq // QUERY_BLOCK
    qs = jnp.moveaxis(q.reshape(B, nq, QUERY_BLOCK, H, hd), 1, 0)
    ps = jnp.moveaxis(qpos.reshape(B, nq, QUERY_BLOCK), 1, 0)
    out = jax.lax.map(lambda a: attend_block(*a), (qs, ps))
    return jnp.moveaxis(out, 0, 1).reshape(q.shape)


def _sample(model, h, keys, temperature, top_p, return_logits):
    logits = model.head(h)
    tok, lp = sample_rows(logits, keys, temperature, top_p)
    top_lp, top_id = jax.lax.top_k(lp, TOP_LOGPROBS)
    chosen = jnp.take_along_axis(lp, tok[:, None], axis=1)[:, 0]
    return tok, chosen, (top_id.astype(jnp.int32), top_lp), (logits if return_logits else None)


class RowContext(NamedTuple):
    """Per-row attention inputs shared by every layer: RoPE tables, positions, cache slots, lengths, tables."""

    rope: tuple
    pos: jax.Array      # [B, S] query positions
    slots: jax.Array    # [B, S] pool slots the new K/V go to (0 = scratch)
    lengths: jax.Array  # [B] cached tokens after this step (0 = padding row)
    tables: jax.Array   # [B, P]
    valid: jax.Array    # [B, S] real tokens
    expert_ids: jax.Array | None = None  # [B, S] pre-gated experts (Read-ME), used by every MoE layer


def prepare_rows(model, dec: DecodeBatch | None, pf: PrefillBatch | None, pf_hidden, *, block_size: int,
                 use_hidden: bool, dec_ids=None, pf_ids=None):
    """Embeddings (or carried hidden states) and :class:`RowContext` of the decode and prefill parts.

    ``use_hidden``: a Python bool (static choice) or a traced bool (the prefill rows start from ``pf_hidden``
    where it is true, from the token embeddings otherwise; ``pf_hidden`` must then be given).
    ``dec_ids [Bd]`` / ``pf_ids [Bp, Tp]``: experts chosen by a pre-gating router (None: the model's routers).
    """
    cfg = model.cfg
    dt = jnp.dtype(cfg.dtype)
    hd = cfg.resolved_head_dim
    emb = model.embed[...]
    xd = xp = dctx = pctx = None
    if dec is not None:
        xd = jnp.take(emb, dec.tokens, axis=0).astype(dt)[:, None]  # [Bd, 1, D]
        pos = dec.pos[:, None]
        slots = jnp.where(dec.valid[:, None], _slots(dec.tables, pos, block_size), 0)
        dctx = RowContext(rope_tables(pos, hd, cfg.rope_theta), pos, slots, jnp.where(dec.valid, dec.pos + 1, 0),
                          dec.tables, dec.valid[:, None], None if dec_ids is None else dec_ids[:, None])
    if pf is not None:
        Tp = pf.tokens.shape[1]
        pad = Tp - pf.length  # left padding
        pos = (pf.start - pad)[:, None] + jnp.arange(Tp, dtype=jnp.int32)
        valid = jnp.arange(Tp)[None, :] >= pad[:, None]
        if isinstance(use_hidden, bool):
            xp = pf_hidden.astype(dt) if use_hidden else jnp.take(emb, pf.tokens, axis=0).astype(dt)
        else:
            xp = jnp.where(use_hidden, pf_hidden.astype(dt), jnp.take(emb, pf.tokens, axis=0).astype(dt))
        slots = jnp.where(valid, _slots(pf.tables, jnp.maximum(pos, 0), block_size), 0)
        pctx = RowContext(rope_tables(pos, hd, cfg.rope_theta), pos, slots,
                          jnp.where(pf.length > 0, pf.start + pf.length, 0), pf.tables, valid, pf_ids)
    return xd, xp, dctx, pctx


def layer_attention(blk, x, ctx: RowContext, kp, vp, li, *, block_size: int, impl: str = "xla",
                    kv_block: int | None = None, prefill_kv_block: int | None = None):
    """Pre-norm attention of rows ``x [B, S, D]`` through layer ``li`` of a run's pool (writes the new K/V).
    Rows of several tokens (prefill chunks) use key blocks of ``prefill_kv_block`` (default ``kv_block``)."""
    q, k, v = blk.attn.qkv(blk.attn_norm(x), None, ctx.rope)
    kp, vp = write_kv(kp, vp, li, ctx.slots, k, v)
    x = read_attention(blk, x, q, ctx, kp, vp, li, block_size=block_size, impl=impl, kv_block=kv_block,
                       prefill_kv_block=prefill_kv_block)
    return x, kp, vp


def write_kv(kp, vp, li, slots, k, v):
    """Write new keys/values ``[B, S, KV, hd]`` to pool slots ``slots [B, S]`` of layer ``li``. A slot past the
    pool's end (``>= kp.shape[1]``) is skipped: no write at all, unlike the scratch slot 0 that padding rows use."""
    flat = slots.reshape(-1)
    kp = kp.at[li, flat].set(k.reshape(-1, *k.shape[2:]).astype(kp.dtype), mode="drop")
    vp = vp.at[li, flat].set(v.reshape(-1, *v.shape[2:]).astype(vp.dtype), mode="drop")
    return kp, vp


def read_attention(blk, x, q, ctx: RowContext, kp, vp, li, *, block_size: int, impl: str = "xla",
                   kv_block: int | None = None, prefill_kv_block: int | None = None):
    """The attention half of :func:`layer_attention` for queries ``q`` whose K/V are already in the pool
    (reads the pool only): ``x`` plus the attention output."""
    if x.shape[1] > 1 and prefill_kv_block:
        kv_block = prefill_kv_block
    o = _paged_attend(q, kp, vp, li, ctx.tables, ctx.pos, ctx.lengths, block_size, impl, kv_block)
    return x + blk.attn.out(o).astype(x.dtype)


def grouped_layer(blk, ffn, attn_read, xd, xp, dctx, pctx, kp, vp, li, active):
    """One layer of a step with a prefill part whose layer group is a run-time value (``active``).

    Decode rows (``xd``, or None) always pass; prefill rows ``xp`` pass only where ``active``, and are then
    routed in the same MoE call as the decode rows. The KV pool never enters a ``lax.cond`` (a conditional
    that updates the pool makes XLA copy the whole pool in every layer): the prefill projections run under a
    first cond, the new K/V of both parts are written unconditionally (in an inactive layer the prefill rows'
    writes are dropped: their slots point past the pool, so thousands of rows do not all hit one scratch slot,
    which on GPUs serializes the scatter), and a second cond, which only reads the pool, runs the
    prefill attention and the shared MoE call (or the decode rows' MoE call alone)."""
    a = blk.attn

    def pf_qkv(x):
        return a.qkv(blk.attn_norm(x), None, pctx.rope)

    def pf_none(x):
        q, k, v = jax.eval_shape(pf_qkv, x)
        return jnp.zeros(q.shape, q.dtype), jnp.zeros(k.shape, k.dtype), jnp.zeros(v.shape, v.dtype)

    qp, kpn, vpn = jax.lax.cond(active, pf_qkv, pf_none, xp)
    pslots = jnp.where(active, pctx.slots, kp.shape[1])  # past the pool: the write is dropped
    kp, vp = write_kv(kp, vp, li, pslots, kpn, vpn)
    if xd is not None:  # decode and prefill rows own their blocks: they share no slot but the scratch slot 0
        qd, kd, vd = a.qkv(blk.attn_norm(xd), None, dctx.rope)
        kp, vp = write_kv(kp, vp, li, dctx.slots, kd, vd)
        xd = attn_read(blk, xd, qd, dctx, kp, vp, li)

    def with_prefill(xd, xp, qp, kp, vp):
        xp = attn_read(blk, xp, qp, pctx, kp, vp, li)
        if xd is None:
            (xp,), cnt = _ffn_parts(blk, ffn, [(xp, pctx)])
        else:
            (xd, xp), cnt = _ffn_parts(blk, ffn, [(xd, dctx), (xp, pctx)])
        return xd, xp, cnt

    def decode_only(xd, xp, qp, kp, vp):
        if xd is None:
            return xd, xp, jnp.int32(0)
        (xd,), cnt = _ffn_parts(blk, ffn, [(xd, dctx)])
        return xd, xp, cnt

    xd, xp, cnt = jax.lax.cond(active, with_prefill, decode_only, xd, xp, qp, kp, vp)
    return xd, xp, kp, vp, cnt


def _ffn_parts(blk, ffn, rows):
    """One shared FFN call over ``rows = [(x, ctx), ...]`` plus residuals; also the experts-touched count."""
    parts = [(x, ctx.valid) for x, ctx in rows]
    f, cnt = ffn(*ffn_rows(blk, parts, [c.expert_ids for _, c in rows]))
    return add_ffn(parts, f), cnt


def ffn_rows(blk, parts, ids=None):
    """Normalized FFN inputs of several row groups ``[(x [B, S, D], valid [B, S]), ...]`` as one token batch
    (and their pre-gated expert ids when ``ids`` lists one ``[B, S]`` array per group)."""
    ys = [blk.ffn_norm(x).reshape(-1, x.shape[-1]) for x, _ in parts]
    ms = [m.reshape(-1) for _, m in parts]
    if ids is None or any(i is None for i in ids):
        return jnp.concatenate(ys), jnp.concatenate(ms), None
    return jnp.concatenate(ys), jnp.concatenate(ms), jnp.concatenate([i.reshape(-1) for i in ids])


def add_ffn(parts, f):
    """Split the FFN output ``f [T, D]`` back over the row groups and add the residuals."""
    out, i = [], 0
    for x, _ in parts:
        n = x.shape[0] * x.shape[1]
        out.append(x + f[i:i + n].reshape(x.shape).astype(x.dtype))
        i += n
    return out


def _engine_step(gdef, state, pool: KVPool, dec: DecodeBatch | None, pf: PrefillBatch | None, pf_hidden, group,
                 dec_ids=None, pf_ids=None, layer_states=None, *, block_size: int, return_logits: bool = False,
                 attn_impl: str = "xla", kv_block: int | None = None,
                 prefill_kv_block: int | None = None) -> StepOutput:
    """One engine iteration (see the module docstring). ``dec``/``pf`` may be None (empty part).

    ``group`` is ``int32 [3]`` = ``(lo, hi, use_hidden)``: the prefill rows pass through layers ``[lo, hi)``
    this iteration, starting from ``pf_hidden [Bp, Tp, D]`` (the previous group's output) where
    ``use_hidden`` is 1 and from the token embeddings otherwise (``pf_hidden`` may be None then). All three
    are run-time values, so one compiled step serves every layer group. ``kv_block``: key-block size of the
    XLA attention loop (see :func:`_paged_attend`); ``prefill_kv_block``: the same for the prefill rows.
    ``layer_states`` (:func:`moejax.models.transformer.unstack_layers`): apply the layers one by one on their
    own weight buffers instead of scanning the stacked weights (no per-layer weight copy on CPU; the group
    mask is then tested per layer the same way).
    """
    model = nnx.merge(gdef, state)
    cfg = model.cfg
    dt = jnp.dtype(cfg.dtype)
    lo, hi = group[0], group[1]
    has_d, has_p = dec is not None, pf is not None
    use_hidden = False if pf_hidden is None else group[2] > 0
    xd, xp, dctx, pctx = prepare_rows(model, dec, pf, pf_hidden, block_size=block_size, use_hidden=use_hidden,
                                      dec_ids=dec_ids, pf_ids=pf_ids)
    attn = partial(layer_attention, block_size=block_size, impl=attn_impl, kv_block=kv_block,
                   prefill_kv_block=prefill_kv_block)
    attn_read = partial(read_attention, block_size=block_size, impl=attn_impl, kv_block=kv_block,
                        prefill_kv_block=prefill_kv_block)

    ks, vs, touched = list(pool.k), list(pool.v), []
    for r, (kind, first, n) in enumerate(model.runs):
        gd, st = nnx.split(model.stacks[r])

        def body(carry, xs, gd=gd, kind=kind, first=first):
            xd_, xp_, kp, vp = carry
            bst, li = xs
            blk = nnx.merge(gd, bst)

            def ffn(y, mask, ids):
                if kind == "moe":
                    f, aux = blk.moe(y, token_mask=mask, expert_ids=ids)
                    return f.astype(dt), jnp.sum(aux["expert_load"] > 0).astype(jnp.int32)
                return blk.mlp(y).astype(dt), jnp.int32(0)

            if has_p:
                xd_new, xp_, kp, vp, cnt = grouped_layer(blk, ffn, attn_read, xd_ if has_d else None, xp_, dctx,
                                                         pctx, kp, vp, li, (first + li >= lo) & (first + li < hi))
                xd_ = xd_new if has_d else xd_
            else:  # decode only: no prefill part, no group test
                xd_, kp, vp = attn(blk, xd_, dctx, kp, vp, li)
                (xd_,), cnt = _ffn_parts(blk, ffn, [(xd_, dctx)])
            return (xd_, xp_, kp, vp), cnt

        carry = (xd if has_d else jnp.zeros((0,), dt), xp if has_p else jnp.zeros((0,), dt), ks[r], vs[r])
        if layer_states is None:
            carry, cnt = jax.lax.scan(body, carry, (st, jnp.arange(n, dtype=jnp.int32)))
        else:
            cnts = []
            for i in range(n):
                carry, c = body(carry, (layer_states[r][i], i))
                cnts.append(c)
            cnt = jnp.stack(cnts)
        xd_o, xp_o, ks[r], vs[r] = carry
        if has_d:
            xd = xd_o
        if has_p:
            xp = xp_o
        touched.append(cnt)
    return finish_step(model, xd, xp, dec, pf, jnp.concatenate(touched), KVPool(tuple(ks), tuple(vs)),
                       return_logits)


_STATIC = ("gdef", "block_size", "return_logits", "attn_impl", "kv_block")
engine_step = jax.jit(_engine_step, static_argnames=(*_STATIC, "prefill_kv_block"), donate_argnames=("pool",))
engine_step.__doc__ = _engine_step.__doc__


class MultiStepOutput(NamedTuple):
    """``steps`` decode iterations of :func:`engine_decode_steps` (leading axis: the iteration)."""

    tokens: jax.Array          # [steps, Bd]
    logprob: jax.Array         # [steps, Bd]
    top: tuple                 # ([steps, Bd, 5] ids, [steps, Bd, 5] logprobs)
    experts_touched: jax.Array  # [steps, n_layers]
    logits: jax.Array | None   # [steps, Bd, V] (only with return_logits)
    pool: KVPool


@partial(jax.jit, static_argnames=(*_STATIC, "steps"), donate_argnames=("pool",))
def engine_decode_steps(gdef, state, pool: KVPool, dec: DecodeBatch, layer_states=None, *, steps: int,
                        block_size: int, return_logits: bool = False, attn_impl: str = "xla",
                        kv_block: int | None = None) -> MultiStepOutput:
    """``steps`` decode iterations in one call (multi-step scheduling): iteration ``j`` feeds back the tokens
    iteration ``j - 1`` sampled, at positions ``dec.pos + j``, with sampling keys ``dec.keys + (0, j)`` (the
    key a single step would use for that output index), so it computes exactly what ``steps`` calls of
    :func:`engine_step` on decode-only batches would. The rows' block tables must already cover positions
    ``< dec.pos + steps``. A row that finishes early (stop token, ``max_tokens``) keeps decoding to the end of
    the call; the host drops its extra tokens (their K/V lie beyond the row's end, never visible)."""
    mcfg = nnx.merge(gdef, state).cfg
    L, V, Bd = mcfg.n_layers, mcfg.vocab_size, dec.tokens.shape[0]
    group = jnp.asarray([0, L, 0], jnp.int32)
    kw = {"block_size": block_size, "return_logits": return_logits, "attn_impl": attn_impl, "kv_block": kv_block}

    def body(j, carry):
        tok, pool, toks, lps, tids, tlps, touched, logits = carry
        step_key = jnp.asarray([0, 1], jnp.uint32) * j.astype(jnp.uint32)  # (seed, output index + j)
        d = dec._replace(tokens=tok, pos=dec.pos + j, keys=dec.keys + step_key)
        o = _engine_step(gdef, state, pool, d, None, None, group, layer_states=layer_states, **kw)
        toks, lps = toks.at[j].set(o.dec_next), lps.at[j].set(o.dec_logprob)
        tids, tlps = tids.at[j].set(o.dec_top[0]), tlps.at[j].set(o.dec_top[1])
        touched = touched.at[j].set(o.experts_touched)
        if return_logits:
            logits = logits.at[j].set(o.dec_logits)
        return o.dec_next, o.pool, toks, lps, tids, tlps, touched, logits

    init = (dec.tokens, pool, jnp.zeros((steps, Bd), jnp.int32), jnp.zeros((steps, Bd), jnp.float32),
            jnp.zeros((steps, Bd, TOP_LOGPROBS), jnp.int32), jnp.zeros((steps, Bd, TOP_LOGPROBS), jnp.float32),
            jnp.zeros((steps, L), jnp.int32),
            jnp.zeros((steps, Bd, V) if return_logits else (0,), jnp.float32))
    _, pool, toks, lps, tids, tlps, touched, logits = jax.lax.fori_loop(0, steps, body, init)
    return MultiStepOutput(toks, lps, (tids, tlps), touched, logits if return_logits else None, pool)


def finish_step(model, xd, xp, dec, pf, touched, pool, return_logits) -> StepOutput:
    """Sample the decode rows and each prefill row's last token; package a :class:`StepOutput`."""
    empty_i = jnp.zeros((0,), jnp.int32)
    empty_f = jnp.zeros((0,), jnp.float32)
    empty_top = (jnp.zeros((0, TOP_LOGPROBS), jnp.int32), jnp.zeros((0, TOP_LOGPROBS), jnp.float32))
    if dec is not None:
        d_next, d_lp, d_top, d_logits = _sample(model, xd[:, 0], dec.keys, dec.temperature, dec.top_p,
                                                return_logits)
    else:
        d_next, d_lp, d_top, d_logits = empty_i, empty_f, empty_top, None
    if pf is not None:
        # left-padded rows end with their last token
        p_next, p_lp, p_top, p_logits = _sample(model, xp[:, -1], pf.keys, pf.temperature, pf.top_p, return_logits)
        p_hidden = xp
    else:
        p_next, p_lp, p_top, p_logits, p_hidden = empty_i, empty_f, empty_top, None, empty_f
    return StepOutput(d_next, d_lp, d_top, p_next, p_lp, p_top, p_hidden, touched, d_logits, p_logits, pool)
