"""The serving engine's jitted iteration: decode rows and prefill rows over a paged KV cache.

One call runs

* a **decode part**: ``Bd`` running requests, one new token each, through every layer; and
* a **prefill part**: ``Bp`` prompt chunks of up to ``Tp`` tokens, through the layers ``[lo, hi)`` only.

Chunked prefill uses ``lo, hi = 0, n_layers`` (every iteration sees whole chunks through the whole stack).
Layered prefill is the same compiled step with a *group mask*: ``(lo, hi)`` is a runtime value, each layer of
the scanned stack tests ``lo <= layer < hi``, and ``lax.cond`` takes the prefill rows through that layer's
projections, attention and experts only when it is active
(:meth:`~moejax.models.transformer.Block.paged_layer`; the KV pool itself never enters a conditional, which
would copy it in every layer). In inactive layers prefill tokens are neither
written to the KV cache (their writes are dropped) nor routed: the MoE call there contains the decode tokens
alone, so a masked prefill token is never dispatched to another group's experts. The prefill hidden states
leave the step and come back on the next iteration (``pf_hidden``), so a prompt advances one layer group per
iteration.

The decode and prefill tokens of an active layer share one MoE call, so an iteration touches each expert's
weights once per layer however many rows use it; the step reports the number of distinct experts it routed to
in each layer (``experts_touched``), the basis of the expert-weight-traffic metric.

Attention reads keys/values through block tables from the pool laid out by
:class:`moejax.serve.kv_cache.KVPool` (column ``t`` of a row's gathered keys is position ``t``).

The layer math is the model's own: this module packs rows (:func:`prepare_rows`), walks the layers calling
:meth:`~moejax.models.transformer.Block.paged_layer` with the group mask, and samples (:func:`finish_step`); it
never takes a block's attention or FFN apart.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.models.transformer import PagedPart
from moejax.nn.attention import PagedSpec, paged_rows
from moejax.nn.sampling import sample_rows
from moejax.serve.kv_cache import KVPool

TOP_LOGPROBS = 5


class DecodeBatch(NamedTuple):
    tokens: jax.Array       # [Bd] int32 ([Bd, 1 + K] in a speculative step: the token, then K drafts)
    pos: jax.Array          # [Bd] int32 position of the (first) token (= tokens already cached)
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
    dropped: jax.Array | None = None  # [n_layers] (token, slot) rows the MoE dispatch dropped (capacity)
    expert_load: jax.Array | None = None  # [n_layers, E] float32 routed slots per expert (zeros: dense layers)


def _sample(model, h, keys, temperature, top_p, return_logits):
    logits = model.head(h)
    tok, lp = sample_rows(logits, keys, temperature, top_p)
    top_lp, top_id = jax.lax.top_k(lp, TOP_LOGPROBS)
    chosen = jnp.take_along_axis(lp, tok[:, None], axis=1)[:, 0]
    return tok, chosen, (top_id.astype(jnp.int32), top_lp), (logits if return_logits else None)


def prepare_rows(model, dec: DecodeBatch | None, pf: PrefillBatch | None, pf_hidden, *, block_size: int,
                 use_hidden, dec_ids=None, pf_ids=None) -> tuple[PagedPart | None, PagedPart | None]:
    """The decode and prefill parts of a step as the layers see them (:class:`PagedPart`: embeddings or carried
    hidden states, paged-attention rows, pre-gated experts).

    ``use_hidden``: a Python bool (static choice) or a traced bool (the prefill rows start from ``pf_hidden``
    where it is true, from the token embeddings otherwise; ``pf_hidden`` must then be given).
    ``dec_ids [Bd]`` / ``pf_ids [Bp, Tp]``: experts chosen by a pre-gating router (None: the model's routers).
    """
    cfg = model.cfg
    dt = jnp.dtype(cfg.dtype)
    rows = partial(paged_rows, block_size=block_size, head_dim=cfg.resolved_head_dim, rope_theta=cfg.rope_theta)
    dpart = ppart = None
    if dec is not None:
        toks = dec.tokens if dec.tokens.ndim == 2 else dec.tokens[:, None]  # [Bd, S]: S > 1 verifies drafts
        S = toks.shape[1]
        pos = dec.pos[:, None] + jnp.arange(S, dtype=jnp.int32)
        valid = jnp.broadcast_to(dec.valid[:, None], (toks.shape[0], S))
        drows = rows(dec.tables, pos, valid, jnp.where(dec.valid, dec.pos + S, 0))
        dpart = PagedPart(model.embed_tokens(toks), drows, None if dec_ids is None else dec_ids[:, None])
    if pf is not None:
        Tp = pf.tokens.shape[1]
        pad = Tp - pf.length  # left padding
        pos = (pf.start - pad)[:, None] + jnp.arange(Tp, dtype=jnp.int32)
        valid = jnp.arange(Tp)[None, :] >= pad[:, None]
        if isinstance(use_hidden, bool):
            xp = pf_hidden.astype(dt) if use_hidden else model.embed_tokens(pf.tokens)
        else:
            xp = jnp.where(use_hidden, pf_hidden.astype(dt), model.embed_tokens(pf.tokens))
        prows = rows(pf.tables, pos, valid, jnp.where(pf.length > 0, pf.start + pf.length, 0))
        ppart = PagedPart(xp, prows, pf_ids)
    return dpart, ppart


def attention_specs(block_size: int, attn_impl: str, kv_block: int | None, prefill_kv_block: int | None,
                    prefill_tokens: int | None) -> tuple[PagedSpec, PagedSpec]:
    """The paged-attention settings of the decode rows and of prefill rows of ``prefill_tokens`` columns: rows
    of several tokens (prefill chunks) use key blocks of ``prefill_kv_block`` (default ``kv_block``)."""
    dspec = PagedSpec(block_size, attn_impl, kv_block)
    if prefill_tokens is not None and prefill_tokens > 1 and prefill_kv_block:
        return dspec, PagedSpec(block_size, attn_impl, prefill_kv_block)
    return dspec, dspec


def _engine_step(gdef, state, pool: KVPool, dec: DecodeBatch | None, pf: PrefillBatch | None, pf_hidden, group,
                 dec_ids=None, pf_ids=None, layer_states=None, *, block_size: int, return_logits: bool = False,
                 attn_impl: str = "xla", kv_block: int | None = None,
                 prefill_kv_block: int | None = None, nano_batches: int = 1) -> StepOutput:
    """One engine iteration (see the module docstring). ``dec``/``pf`` may be None (empty part).

    ``group`` is ``int32 [3]`` = ``(lo, hi, use_hidden)``: the prefill rows pass through layers ``[lo, hi)``
    this iteration, starting from ``pf_hidden [Bp, Tp, D]`` (the previous group's output) where
    ``use_hidden`` is 1 and from the token embeddings otherwise (``pf_hidden`` may be None then). All three
    are run-time values, so one compiled step serves every layer group. ``kv_block``: key-block size of the
    XLA attention loop (see :func:`moejax.nn.attention.paged_attention`); ``prefill_kv_block``: the same for the prefill rows.
    ``layer_states`` (:func:`moejax.models.transformer.unstack_layers`): apply the layers one by one on their
    own weight buffers instead of scanning the stacked weights (no per-layer weight copy on CPU; the group
    mask is then tested per layer the same way). ``nano_batches`` > 1: every layer nano-batched
    (:meth:`~moejax.models.transformer.Block.paged_layer_nano`, NanoFlow).
    """
    model = nnx.merge(gdef, state)
    lo, hi = group[0], group[1]
    has_p = pf is not None
    use_hidden = False if pf_hidden is None else group[2] > 0
    dpart, ppart = prepare_rows(model, dec, pf, pf_hidden, block_size=block_size, use_hidden=use_hidden,
                                dec_ids=dec_ids, pf_ids=pf_ids)
    dspec, pspec = attention_specs(block_size, attn_impl, kv_block, prefill_kv_block,
                                   pf.tokens.shape[1] if has_p else None)
    xd, xp, pool, stats = run_layers(model, pool, dpart, ppart, lo, hi, layer_states, dspec, pspec, nano_batches)
    o = finish_step(model, xd, xp, dec, pf, stats.touched, pool, return_logits)
    return o._replace(dropped=stats.dropped, expert_load=stats.load)


def run_layers(model, pool: KVPool, dpart: PagedPart | None, ppart: PagedPart | None, lo, hi, layer_states,
               dspec: PagedSpec, pspec: PagedSpec, nano: int = 1):
    """The model's layers over a step's decode part and prefill part (either may be None), the prefill rows
    passing layers ``[lo, hi)`` only (:meth:`~moejax.models.transformer.Block.paged_layer`). Returns ``(xd, xp,
    pool, stats)``: both parts' hidden states after the last layer (``jnp.zeros((0,))`` for an absent part), the
    pool (entries past the model's runs, e.g. MTP layers, passed through) and the per-layer
    :class:`~moejax.models.transformer.LayerStats` stacked ``[n_layers, ...]``."""
    dt = jnp.dtype(model.cfg.dtype)
    has_d, has_p = dpart is not None, ppart is not None
    xd = dpart.x if has_d else jnp.zeros((0,), dt)
    xp = ppart.x if has_p else jnp.zeros((0,), dt)
    ks, vs, stats = list(pool.k), list(pool.v), []
    for r, (_kind, first, n) in enumerate(model.runs):
        gd, st = nnx.split(model.stacks[r])

        def body(carry, xs, gd=gd, first=first):
            xd_, xp_, kp, vp = carry
            bst, li = xs
            blk = nnx.merge(gd, bst)
            d = dpart._replace(x=xd_) if has_d else None
            p = ppart._replace(x=xp_) if has_p else None
            active = ((first + li >= lo) & (first + li < hi)) if has_p else None
            if nano > 1:
                xd_new, xp_new, kp, vp, cnt = blk.paged_layer_nano(kp, vp, li, d, p, active, nano=nano,
                                                                   dec_spec=dspec, pf_spec=pspec)
            else:
                xd_new, xp_new, kp, vp, cnt = blk.paged_layer(kp, vp, li, d, p, active, dec_spec=dspec,
                                                              pf_spec=pspec)
            return (xd_new if has_d else xd_, xp_new if has_p else xp_, kp, vp), cnt

        carry = (xd, xp, ks[r], vs[r])
        if layer_states is None:
            carry, cnt = jax.lax.scan(body, carry, (st, jnp.arange(n, dtype=jnp.int32)))
        else:
            cnts = []
            for i in range(n):
                carry, c = body(carry, (layer_states[r][i], i))
                cnts.append(c)
            cnt = jax.tree.map(lambda *a: jnp.stack(a), *cnts)
        xd, xp, ks[r], vs[r] = carry
        stats.append(cnt)
    stats = jax.tree.map(lambda *a: jnp.concatenate(a), *stats)  # LayerStats, [n_layers, ...] each
    return xd, xp, KVPool(tuple(ks), tuple(vs)), stats


_STATIC = ("gdef", "block_size", "return_logits", "attn_impl", "kv_block")
engine_step = jax.jit(_engine_step, static_argnames=(*_STATIC, "prefill_kv_block", "nano_batches"),
                      donate_argnames=("pool",))
engine_step.__doc__ = _engine_step.__doc__


class MultiStepOutput(NamedTuple):
    """``steps`` decode iterations of :func:`engine_decode_steps` (leading axis: the iteration)."""

    tokens: jax.Array          # [steps, Bd]
    logprob: jax.Array         # [steps, Bd]
    top: tuple                 # ([steps, Bd, 5] ids, [steps, Bd, 5] logprobs)
    experts_touched: jax.Array  # [steps, n_layers]
    logits: jax.Array | None   # [steps, Bd, V] (only with return_logits)
    pool: KVPool
    dropped: jax.Array | None = None  # [steps, n_layers]
    expert_load: jax.Array | None = None  # [steps, n_layers, E]


@partial(jax.jit, static_argnames=(*_STATIC, "steps", "nano_batches"), donate_argnames=("pool",))
def engine_decode_steps(gdef, state, pool: KVPool, dec: DecodeBatch, layer_states=None, *, steps: int,
                        block_size: int, return_logits: bool = False, attn_impl: str = "xla",
                        kv_block: int | None = None, nano_batches: int = 1) -> MultiStepOutput:
    """``steps`` decode iterations in one call (multi-step scheduling): iteration ``j`` feeds back the tokens
    iteration ``j - 1`` sampled, at positions ``dec.pos + j``, with sampling keys ``dec.keys + (0, j)`` (the
    key a single step would use for that output index), so it computes exactly what ``steps`` calls of
    :func:`engine_step` on decode-only batches would. The rows' block tables must already cover positions
    ``< dec.pos + steps``. A row that finishes early (stop token, ``max_tokens``) keeps decoding to the end of
    the call; the host drops its extra tokens (their K/V lie beyond the row's end, never visible)."""
    model = nnx.merge(gdef, state)
    mcfg = model.cfg
    L, V, Bd = mcfg.n_layers, mcfg.vocab_size, dec.tokens.shape[0]
    E = model.stacks[0].load_size
    group = jnp.asarray([0, L, 0], jnp.int32)
    kw = {"block_size": block_size, "return_logits": return_logits, "attn_impl": attn_impl, "kv_block": kv_block,
          "nano_batches": nano_batches}

    def body(j, carry):
        tok, pool, toks, lps, tids, tlps, touched, dropped, load, logits = carry
        step_key = jnp.asarray([0, 1], jnp.uint32) * j.astype(jnp.uint32)  # (seed, output index + j)
        d = dec._replace(tokens=tok, pos=dec.pos + j, keys=dec.keys + step_key)
        o = _engine_step(gdef, state, pool, d, None, None, group, layer_states=layer_states, **kw)
        toks, lps = toks.at[j].set(o.dec_next), lps.at[j].set(o.dec_logprob)
        tids, tlps = tids.at[j].set(o.dec_top[0]), tlps.at[j].set(o.dec_top[1])
        touched, dropped = touched.at[j].set(o.experts_touched), dropped.at[j].set(o.dropped)
        load = load.at[j].set(o.expert_load)
        if return_logits:
            logits = logits.at[j].set(o.dec_logits)
        return o.dec_next, o.pool, toks, lps, tids, tlps, touched, dropped, load, logits

    init = (dec.tokens, pool, jnp.zeros((steps, Bd), jnp.int32), jnp.zeros((steps, Bd), jnp.float32),
            jnp.zeros((steps, Bd, TOP_LOGPROBS), jnp.int32), jnp.zeros((steps, Bd, TOP_LOGPROBS), jnp.float32),
            jnp.zeros((steps, L), jnp.int32), jnp.zeros((steps, L), jnp.int32), jnp.zeros((steps, L, E), jnp.float32),
            jnp.zeros((steps, Bd, V) if return_logits else (0,), jnp.float32))
    _, pool, toks, lps, tids, tlps, touched, dropped, load, logits = jax.lax.fori_loop(0, steps, body, init)
    return MultiStepOutput(toks, lps, (tids, tlps), touched, logits if return_logits else None, pool, dropped,
                           load)


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
