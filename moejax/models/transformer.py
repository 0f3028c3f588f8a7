"""Decoder-only language model with dense or MoE FFNs and a scanned layer stack.

The layer stack is split into *runs* of consecutive layers of the same kind (dense or MoE); each run's
parameters are stacked on a leading layer axis and applied with ``jax.lax.scan``, so compile time grows with
the number of runs (1 for an all-MoE model, 2 for Qwen2-MoE-style patterns with a dense prefix), not with depth.

``Transformer.__call__`` is a pure function of its state and inputs; use ``nnx.split``/``nnx.merge`` (or
``nnx.jit``) around it. Incremental decoding uses a contiguous KV cache (:class:`KVCache`).
"""

from __future__ import annotations

import itertools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.config import ModelConfig
from moejax.nn.attention import (
    Attention,
    LayerKV,
    PagedRows,
    PagedSpec,
    head_topk,
    paged_attention,
    rope_tables,
    selected_attention,
    write_kv,
)
from moejax.nn.attention import attention_mask as make_attention_mask
from moejax.nn.experts import SwiGLU
from moejax.nn.moe import AtomicMoE, MoE
from moejax.nn.norms import RMSNorm

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def dtype_of(name: str):
    return _DTYPES[name]


def require_causal(cfg: ModelConfig, what: str) -> None:
    """Raise ValueError if ``cfg`` is a diffusion LM (``causal=False``): ``what`` runs left-to-right models only."""
    if not cfg.causal:
        raise ValueError(f"{what} runs autoregressive models; this is a masked diffusion LM (ModelConfig.causal="
                         f"False): generate with moejax.diffusion (DiffusionSampler, DiffusionEngine; `moejax "
                         f"generate`/`moejax serve` pick them for a diffusion checkpoint)")


def remat_policy(name: str):
    """The ``jax.checkpoint`` policy of ``ModelConfig.remat`` (``None``: save nothing but the layer input)."""
    cp = jax.checkpoint_policies
    policies = {"full": None, "dots": cp.checkpoint_dots, "dots_no_batch": cp.dots_with_no_batch_dims_saveable,
                "save_dots": cp.dots_with_no_batch_dims_saveable}
    if name not in policies:
        raise ValueError(f"ModelConfig.remat={name!r} is invalid: allowed values with rematerialization are "
                         f"{', '.join(map(repr, policies))} (or 'none')")
    return policies[name]


class KVCache(NamedTuple):
    """Keys/values per run of the stack and column validity ``[B, S_max]``.

    ``k[r]``/``v[r]`` is either one stacked array ``[n_layers_in_run, B, S_max, KV, hd]`` (for the scanned
    stack) or, from ``init_cache(..., per_layer=True)``, a tuple of per-layer arrays ``[B, S_max, KV, hd]``:
    with the per-layer weight loop (``layer_states``) each layer then updates its own buffer in place, where
    a stacked cache costs a slice and a write-back of the layer's whole cache per layer and step on XLA:CPU.
    """

    k: tuple
    v: tuple
    valid: jax.Array


class ModelOutput(NamedTuple):
    logits: jax.Array        # [B, S, V] float32 (or hidden states if return_hidden)
    cache: KVCache | None
    aux: dict                # MoE statistics stacked over MoE layers, e.g. aux["load_balance_loss"] [n_moe]


class PagedPart(NamedTuple):
    """One part of a serving step's rows as a layer sees it: hidden states ``x [B, S, D]``, their paged-attention
    inputs and, with a pre-gating router, the experts chosen for them (``expert_ids [B, S]``; None: the model's
    routers)."""

    x: jax.Array
    rows: PagedRows
    expert_ids: jax.Array | None = None


class LayerStats(NamedTuple):
    """A layer's serving statistics for one step (:meth:`Block.ffn_sublayer`, :meth:`Block.paged_layer`)."""

    touched: jax.Array  # int32: distinct experts routed to (0 for a dense layer)
    dropped: jax.Array  # int32: (token, slot) rows the MoE dispatch dropped (capacity; 0 when dropless)
    load: jax.Array     # float32 [E]: routed slots per expert, before drops (E: the model's routed experts,
                        # zeros for a dense layer; empty for atomic experts, whose N is too large to report)


class Block(nnx.Module):
    """Pre-norm decoder block: attention then a dense or MoE SwiGLU FFN.

    ``__call__`` is the dense forward (training, ``generate``). The serving entry points, which every serving
    runner composes instead of re-implementing the layer: :meth:`paged_attention` (the attention sublayer over a
    paged KV pool; :meth:`paged_qkv` and :meth:`paged_read` are its two halves), :meth:`ffn` /
    :meth:`ffn_sublayer` (the FFN on normalized tokens / with its norm and residual, over several row groups in
    one call), :meth:`route` and :meth:`apply_experts` (the MoE FFN split where a runner must act between
    routing and the experts, e.g. to load offloaded weights) and :meth:`paged_layer` (a whole layer for decode
    rows and prefill rows, the prefill rows passing only where the layer-group mask is set).
    """

    def __init__(self, cfg: ModelConfig, kind: str, *, rngs: nnx.Rngs):
        dt, pdt = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
        self.kind = kind
        # experts in LayerStats.load: the model's routed-expert count, the same for every layer (atomic: 0)
        self.load_size = 0 if cfg.moe is None or cfg.moe.expert_type == "atomic" else cfg.moe.num_experts
        self.attn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=pdt)
        self.attn = Attention(cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.resolved_head_dim,
                              rope_theta=cfg.rope_theta, qk_norm=cfg.qk_norm, qkv_bias=cfg.qkv_bias,
                              norm_eps=cfg.norm_eps, init_std=cfg.init_std, dtype=dt, param_dtype=pdt, rngs=rngs)
        self.ffn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=pdt)
        if kind == "moe":
            layer = AtomicMoE if cfg.moe.expert_type == "atomic" else MoE
            self.moe = layer(cfg.d_model, cfg.moe, init_std=cfg.init_std, dtype=dt, param_dtype=pdt, rngs=rngs)
        else:
            self.mlp = SwiGLU(cfg.d_model, cfg.d_ff, init_std=cfg.init_std, param_dtype=pdt, rngs=rngs)

    def __call__(self, x, positions, *, segment_ids=None, kv=None, cache_index=None, kv_valid=None,
                 token_mask=None, token_index=None, rng=None, train=False, rope=None, mask=None, expert_ids=None):
        h, new_kv = self.attn(self.attn_norm(x), positions, segment_ids=segment_ids, kv=kv,
                              cache_index=cache_index, kv_valid=kv_valid, rope=rope, mask=mask)
        x = x + h.astype(x.dtype)
        y = self.ffn_norm(x)
        if self.kind == "moe":
            f, aux = self.moe(y, token_mask=token_mask, token_index=token_index, rng=rng, train=train,
                              expert_ids=expert_ids)
        else:
            f, aux = self.mlp(y), {}
        return x + f.astype(x.dtype), new_kv, aux

    # ------------------------------------------------------------------------------------ serving entry points
    def paged_qkv(self, x, rows: PagedRows):
        """Pre-norm q, k, v ``[B, S, heads, hd]`` of rows ``x [B, S, D]`` (RoPE at ``rows``' positions)."""
        return self.attn.qkv(self.attn_norm(x), None, rows.rope)

    def paged_read(self, x, q, rows: PagedRows, kp, vp, li, spec: PagedSpec):
        """``x`` plus the attention output of queries ``q`` whose keys/values are already in layer ``li`` of the
        pool ``kp``/``vp`` (reads the pool only)."""
        o = paged_attention(q, kp, vp, li, rows.tables, rows.pos, rows.lengths, spec.block_size, spec.impl,
                            spec.kv_block)
        return x + self.attn.out(o).astype(x.dtype)

    def paged_read_selected(self, x, rows: PagedRows, kp, vp, li, spec: PagedSpec, sel_pos, sel_ok):
        """The attention sublayer of a diffusion LM's reuse rows ``x [B, S, D]`` under head-centric sparse
        attention: their fresh keys/values are written to the pool (as :meth:`paged_attention` does) and each KV
        head attends to its own selected cached positions ``sel_pos [B, KV, K]`` (where ``sel_ok``) plus the rows'
        own tokens (:func:`moejax.nn.attention.selected_attention`). Returns ``(x + attention, kp, vp)``."""
        q, k, v = self.paged_qkv(x, rows)
        kp, vp = write_kv(kp, vp, li, rows.slots, k, v)
        o = selected_attention(q, kp, vp, li, rows.tables, spec.block_size, sel_pos, sel_ok, k, v, rows.valid)
        return x + self.attn.out(o).astype(x.dtype), kp, vp

    def paged_attention_select(self, x, rows: PagedRows, kp, vp, li, spec: PagedSpec, block_start, block: int,
                               keep, K: int, window: int):
        """:meth:`paged_attention` of whole diffusion canvases (a refresh step) that also chooses, per KV head,
        the cached positions the coming reuse steps of the block at ``block_start`` attend to
        (:func:`moejax.nn.attention.head_topk`). Returns ``(x + attention, kp, vp, (positions, valid))``."""
        q, k, v = self.paged_qkv(x, rows)
        kp, vp = write_kv(kp, vp, li, rows.slots, k, v)
        sel = head_topk(q, k, block_start, block, rows.lengths, keep, K, window)
        return self.paged_read(x, q, rows, kp, vp, li, spec), kp, vp, sel

    def paged_attention(self, x, rows: PagedRows, kp, vp, li, spec: PagedSpec):
        """The attention sublayer of rows ``x [B, S, D]`` over a paged KV pool: writes their new keys/values to
        ``rows.slots`` of layer ``li`` and returns ``(x + attention, kp, vp)``."""
        q, k, v = self.paged_qkv(x, rows)
        kp, vp = write_kv(kp, vp, li, rows.slots, k, v)
        return self.paged_read(x, q, rows, kp, vp, li, spec), kp, vp

    def ffn(self, y, *, token_mask=None, expert_ids=None):
        """The FFN on normalized tokens ``y [..., D]``: ``(out, aux)`` (``aux`` empty for a dense layer)."""
        if self.kind == "moe":
            return self.moe(y, token_mask=token_mask, expert_ids=expert_ids)
        return self.mlp(y), {}

    def ffn_input(self, parts):
        """Normalized FFN inputs of several row groups ``[(x [B, S, D], valid [B, S], expert_ids or None), ...]``
        as one token batch ``(y [T, D], mask [T], expert_ids [T] or None)`` (ids only if every group has them)."""
        ys = [self.ffn_norm(x).reshape(-1, x.shape[-1]) for x, _, _ in parts]
        ms = [m.reshape(-1) for _, m, _ in parts]
        if any(i is None for _, _, i in parts):
            return jnp.concatenate(ys), jnp.concatenate(ms), None
        return jnp.concatenate(ys), jnp.concatenate(ms), jnp.concatenate([i.reshape(-1) for _, _, i in parts])

    def ffn_sublayer(self, parts):
        """The FFN sublayer of several row groups in one FFN call (one MoE call: each expert's weights are read
        once for all of them). ``parts`` as in :meth:`ffn_input`; returns the groups' ``x + ffn`` and the layer's
        :class:`LayerStats` (zeros for a dense layer)."""
        y, mask, ids = self.ffn_input(parts)
        f, aux = self.ffn(y, token_mask=mask, expert_ids=ids)
        return add_residual([x for x, _, _ in parts], f), self.stats(aux if self.kind == "moe" else None)

    def stats(self, aux: dict | None) -> LayerStats:
        """A MoE call's :class:`LayerStats` from its ``aux``; zeros for ``None`` (a dense layer, no FFN call)."""
        if aux is None:
            return LayerStats(jnp.int32(0), jnp.int32(0), jnp.zeros((self.load_size,), jnp.float32))
        load = aux["expert_load"].astype(jnp.float32)
        return LayerStats(jnp.sum(load > 0).astype(jnp.int32), jnp.sum(aux.get("dropped", 0)).astype(jnp.int32),
                          load if load.shape[0] == self.load_size else jnp.zeros((self.load_size,), jnp.float32))

    def route(self, y, *, token_mask=None, expert_ids=None):
        """The router's choice for normalized tokens ``y [T, D]`` as flat ``(expert_ids, weights, mask)``, each
        ``[T, K]`` (MoE layers only)."""
        moe = self.moe
        r, _ = moe.route(y.astype(moe.dtype), token_mask=token_mask, expert_ids=expert_ids)
        T, K = y.shape[0], r.expert_ids.shape[-1]
        return r.expert_ids.reshape(T, K), r.weights.reshape(T, K), r.mask.reshape(T, K)

    def apply_experts(self, y, expert_ids, weights, mask, **kwargs):
        """The routed and shared experts on given routing (see :meth:`moejax.nn.moe.MoE.apply_experts`, which
        takes the keyword arguments: ``expert_weights``, ``method``, ``block_rows``)."""
        return self.moe.apply_experts(y, expert_ids, weights, mask, **kwargs)

    def paged_layer(self, kp, vp, li, dec: PagedPart | None, pf: PagedPart | None, active=None, *,
                    dec_spec: PagedSpec, pf_spec: PagedSpec | None = None):
        """One layer of a serving step: decode rows ``dec`` and prefill rows ``pf`` (either may be None) over
        layer ``li`` of the KV pool ``kp``/``vp``. Returns ``(x_dec, x_pf, kp, vp, stats)`` (the layer's
        :class:`LayerStats`).

        Without prefill rows: attention, then the FFN. With them, ``active`` (a traced bool: the layer-group
        mask of layered prefill) says whether the prefill rows pass this layer: decode rows always pass;
        prefill rows pass only where ``active``, and are then routed in the same MoE call as the decode rows (in
        an inactive layer the MoE call holds the decode tokens alone, so a masked prefill token is never
        dispatched to another group's experts). The KV pool never enters a ``lax.cond`` (a conditional that
        updates the pool makes XLA copy the whole pool in every layer): the prefill projections run under a
        first cond, the new K/V of both parts are written unconditionally (in an inactive layer the prefill rows'
        writes are dropped: their slots point past the pool, so thousands of rows do not all hit one scratch
        slot, which on GPUs serializes the scatter), and a second cond, which only reads the pool, runs the
        prefill attention and the shared MoE call (or the decode rows' MoE call alone)."""
        if pf is None:
            xd, kp, vp = self.paged_attention(dec.x, dec.rows, kp, vp, li, dec_spec)
            (xd,), stats = self.ffn_sublayer([(xd, dec.rows.valid, dec.expert_ids)])
            return xd, None, kp, vp, stats
        pf_spec = pf_spec or dec_spec
        prows = pf.rows

        def pf_qkv(x):
            return self.paged_qkv(x, prows)

        def pf_none(x):
            return tuple(jnp.zeros(a.shape, a.dtype) for a in jax.eval_shape(pf_qkv, x))

        qp, kpn, vpn = jax.lax.cond(active, pf_qkv, pf_none, pf.x)
        kp, vp = write_kv(kp, vp, li, jnp.where(active, prows.slots, kp.shape[1]), kpn, vpn)  # past the pool: dropped
        xd = None
        if dec is not None:  # decode and prefill rows own their blocks: they share no slot but the scratch slot 0
            qd, kd, vd = self.paged_qkv(dec.x, dec.rows)
            kp, vp = write_kv(kp, vp, li, dec.rows.slots, kd, vd)
            xd = self.paged_read(dec.x, qd, dec.rows, kp, vp, li, dec_spec)

        def with_prefill(xd, xp, qp, kp, vp):
            xp = self.paged_read(xp, qp, prows, kp, vp, li, pf_spec)
            parts = [] if dec is None else [(xd, dec.rows.valid, dec.expert_ids)]
            xs, stats = self.ffn_sublayer(parts + [(xp, prows.valid, pf.expert_ids)])
            return (None if dec is None else xs[0]), xs[-1], stats

        def decode_only(xd, xp, qp, kp, vp):
            if dec is None:
                return xd, xp, self.stats(None)
            (xd,), stats = self.ffn_sublayer([(xd, dec.rows.valid, dec.expert_ids)])
            return xd, xp, stats

        xd, xp, stats = jax.lax.cond(active, with_prefill, decode_only, xd, pf.x, qp, kp, vp)
        return xd, xp, kp, vp, stats

    def paged_layer_nano(self, kp, vp, li, dec: PagedPart | None, pf: PagedPart | None, active=None, *,
                         nano: int, dec_spec: PagedSpec, pf_spec: PagedSpec | None = None):
        """:meth:`paged_layer` as NanoFlow's nano-batched layer. Each part's rows are cut into ``nano``
        nano-batches (contiguous row ranges) for the attention half, NanoFlow's template of 4 nano-operations
        for KQV and decode attention: every nano-batch's Q/K/V, the new K/V written, then every nano-batch's
        attention (reading the pool only); and into ``ceil(nano / 2)`` for the FFN half (the template's 2 for the
        O projection and MLP / experts): one FFN (MoE) call each, over that range of every part's rows.
        Operations of different nano-batches share no data but the pool, so a compiler or backend that runs
        independent operations at once can overlap one nano-batch's memory-bound attention with another's
        GEMMs. Results equal :meth:`paged_layer`'s up to the reassociation of smaller GEMMs, with dropless
        dispatch (a capacity limit applies per MoE call). ``active`` (layered prefill's group mask) holds the
        prefill rows back as :meth:`paged_layer` does, but they are computed in every layer and discarded where
        it is false (no ``lax.cond``): use nano-batching with whole-model prefill. ``stats.touched`` counts expert
        reads: an expert routed to from two FFN nano-batches is read twice (the re-reads nano-batching costs,
        against the expert-traffic goal of layered prefill)."""
        pf_spec = pf_spec or dec_spec
        parts = []  # (part, spec, rows that take part, pool slots of its new K/V)
        if dec is not None:
            parts.append((dec, dec_spec, dec.rows.valid, dec.rows.slots))
        if pf is not None:
            on = pf.rows.valid if active is None else pf.rows.valid & active
            slots = pf.rows.slots if active is None else jnp.where(active, pf.rows.slots, kp.shape[1])
            parts.append((pf, pf_spec, on, slots))
        queries = []
        for part, _, _, slots in parts:  # Q/K/V of every attention nano-batch; their new K/V into the pool
            qs = []
            for a, b in _row_cuts(part.x.shape[0], nano):
                rows = jax.tree.map(lambda t, a=a, b=b: t[a:b], part.rows)
                q, k, v = self.paged_qkv(part.x[a:b], rows)
                kp, vp = write_kv(kp, vp, li, slots[a:b], k, v)  # past the pool: dropped (inactive prefill)
                qs.append((a, b, rows, q))
            queries.append(qs)
        xs = [jnp.concatenate([self.paged_read(part.x[a:b], q, rows, kp, vp, li, spec) for a, b, rows, q in qs])
              for (part, spec, _, _), qs in zip(parts, queries)]
        cuts = [_row_cuts(part.x.shape[0], -(-nano // 2)) for part, *_ in parts]
        outs, loads, reads, dropped = [[] for _ in parts], [], jnp.int32(0), jnp.int32(0)
        for j in range(max(len(c) for c in cuts)):  # one FFN call per FFN nano-batch
            grp = [(i, (x[a:b], valid[a:b], None if part.expert_ids is None else part.expert_ids[a:b]))
                   for i, ((part, _, valid, _), x, c) in enumerate(zip(parts, xs, cuts)) if j < len(c)
                   for a, b in [c[j]]]
            ys, st = self.ffn_sublayer([g for _, g in grp])
            for (i, _), y in zip(grp, ys):
                outs[i].append(y)
            loads.append(st.load)
            reads, dropped = reads + st.touched, dropped + st.dropped
        outs = [jnp.concatenate(o) for o in outs]
        xd = outs[0] if dec is not None else None
        xp = None
        if pf is not None:
            xp = outs[-1] if active is None else jnp.where(active, outs[-1], pf.x)
        return xd, xp, kp, vp, LayerStats(reads, dropped, sum(loads))


class MTPHead(nnx.Module):
    """One multi-token-prediction module (DeepSeek-V3): module ``k`` at position ``i`` combines module ``k - 1``'s
    hidden state ``h^{k-1}_i`` (the main model's last hidden state for ``k = 1``) with the embedding of token
    ``t_{i+k}``: ``h^k_i = Block(W [norm(h^{k-1}_i); norm(emb(t_{i+k}))])``, and predicts ``t_{i+k+1}`` through
    its own output norm and the model's shared LM head (:meth:`Transformer.mtp_logits`). The block is a decoder
    block of the kind of the model's last layer, with its own attention (its own KV pages when serving)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        pdt = dtype_of(cfg.param_dtype)
        D = cfg.d_model
        self.h_norm = RMSNorm(D, eps=cfg.norm_eps, param_dtype=pdt)
        self.e_norm = RMSNorm(D, eps=cfg.norm_eps, param_dtype=pdt)
        init = nnx.initializers.normal(stddev=cfg.init_std)
        self.proj = nnx.Param(init(rngs.params(), (2 * D, D), pdt), logical_axes=(None, "embed"))
        self.block = Block(cfg, cfg.layer_kinds()[-1], rngs=rngs)
        self.out_norm = RMSNorm(D, eps=cfg.norm_eps, param_dtype=pdt)

    def combine(self, h, e):
        """The block's input from the previous hidden states ``h [..., D]`` and the token embeddings ``e``."""
        z = jnp.concatenate([self.h_norm(h), self.e_norm(e).astype(h.dtype)], axis=-1)
        return jnp.einsum("...d,de->...e", z, self.proj[...].astype(z.dtype))


def _row_cuts(rows: int, n: int) -> list[tuple[int, int]]:
    """``min(n, rows)`` contiguous row ranges of sizes differing by at most one."""
    n = min(n, rows)
    return [(i * rows // n, (i + 1) * rows // n) for i in range(n)]


def add_residual(xs, f):
    """Split the FFN output ``f [T, D]`` of one call over several row groups ``xs`` (``[B, S, D]`` each, in the
    order they were concatenated) and add each group's residual."""
    out, i = [], 0
    for x in xs:
        n = x.shape[0] * x.shape[1]
        out.append(x + f[i:i + n].reshape(x.shape).astype(x.dtype))
        i += n
    return out


def layer_runs(cfg: ModelConfig) -> tuple[tuple[str, int, int], ...]:
    """``(kind, first_layer, count)`` for each run of consecutive same-kind layers."""
    runs, i = [], 0
    for kind, grp in itertools.groupby(cfg.layer_kinds()):
        n = len(list(grp))
        runs.append((kind, i, n))
        i += n
    return tuple(runs)


def _stack_blocks(cfg: ModelConfig, kind: str, n: int, rngs: nnx.Rngs) -> Block:
    blocks = [Block(cfg, kind, rngs=rngs) for _ in range(n)]
    gdef, first = nnx.split(blocks[0])
    states = [first] + [nnx.split(b)[1] for b in blocks[1:]]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *states)
    return nnx.merge(gdef, stacked)


class Transformer(nnx.Module):
    """The language model. ``__call__(tokens [B, S]) -> ModelOutput``."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        cfg.validate()
        self.cfg = cfg
        pdt = dtype_of(cfg.param_dtype)
        init = nnx.initializers.normal(stddev=cfg.init_std)
        self.embed = nnx.Param(init(rngs.params(), (cfg.vocab_size, cfg.d_model), pdt),
                               logical_axes=("vocab", "embed"))
        self.runs = layer_runs(cfg)
        self.stacks = nnx.List([_stack_blocks(cfg, kind, n, rngs) for kind, _, n in self.runs])
        self.final_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=pdt)
        if not cfg.tie_embeddings:
            self.lm_head = nnx.Param(init(rngs.params(), (cfg.d_model, cfg.vocab_size), pdt),
                                     logical_axes=("embed", "vocab"))
        if cfg.mtp_depth:  # initialized last: the main model's weights do not depend on mtp_depth
            self.mtp = nnx.List([MTPHead(cfg, rngs=rngs) for _ in range(cfg.mtp_depth)])

    # -------------------------------------------------------------------------------------------- cache
    def init_cache(self, batch: int, max_len: int, dtype=None, *, per_layer: bool = False) -> KVCache:
        """An empty KV cache for ``batch`` sequences of up to ``max_len`` tokens (``per_layer``: one buffer per
        layer instead of one stacked array per run, see :class:`KVCache`)."""
        cfg = self.cfg
        if max_len > cfg.max_seq_len:
            raise ValueError(f"cache length {max_len} exceeds ModelConfig.max_seq_len={cfg.max_seq_len}")
        dt = dtype or dtype_of(cfg.dtype)
        shape = (batch, max_len, cfg.n_kv_heads, cfg.resolved_head_dim)

        def run_cache(n):
            return tuple(jnp.zeros(shape, dt) for _ in range(n)) if per_layer else jnp.zeros((n, *shape), dt)

        ks = tuple(run_cache(n) for _, _, n in self.runs)
        vs = tuple(run_cache(n) for _, _, n in self.runs)
        return KVCache(ks, vs, jnp.zeros((batch, max_len), bool))

    # -------------------------------------------------------------------------------------------- forward
    def embed_tokens(self, tokens):
        """Token embeddings ``[..., D]`` of ``tokens [...]`` in the compute dtype."""
        return jnp.take(self.embed[...], tokens, axis=0).astype(dtype_of(self.cfg.dtype))

    def head(self, h, norm=None):
        """Final norm (or ``norm``) + LM head: hidden ``[..., D]`` -> float32 logits ``[..., V]``."""
        h = (norm or self.final_norm)(h)
        w = self.embed[...].T if self.cfg.tie_embeddings else self.lm_head[...]
        return jnp.einsum("...d,dv->...v", h, w.astype(h.dtype), preferred_element_type=jnp.float32)

    def mtp_logits(self, k: int, h):
        """Logits ``[..., V]`` of MTP module ``k`` (0-based here) from its hidden states: its own output norm and
        the shared LM head."""
        return self.head(h, self.mtp[k].out_norm)

    def mtp_forward(self, h, tokens, positions, *, segment_ids=None, attention_mask=None, rng=None,
                    train: bool = False):
        """The MTP modules over a whole sequence (training, the dense reference of the serving drafts).

        ``h [B, S, D]``: the main model's last hidden states (``return_hidden=True``) at the positions of
        ``tokens [B, S]``. Module ``k`` (1-based) takes, at position ``i``, the embedding of ``tokens[:, i + k]``
        (past the end: token 0, and the target there is not used). Returns a list of ``(hidden [B, S, D],
        aux)`` per module; module ``k``'s hidden state at ``i`` predicts ``tokens[:, i + k + 1]``."""
        cfg = self.cfg
        B, S = tokens.shape
        if attention_mask is None:
            attention_mask = jnp.ones((B, S), jnp.int32) if segment_ids is None else (segment_ids != 0)
        if segment_ids is None:
            segment_ids = attention_mask.astype(jnp.int32)
        rope = rope_tables(positions, cfg.resolved_head_dim, cfg.rope_theta)
        mask = make_attention_mask(B, S, segment_ids=segment_ids)
        tidx = jnp.arange(B * S, dtype=jnp.int32).reshape(B, S)
        out = []
        for k, mod in enumerate(self.mtp, start=1):
            ahead = jnp.pad(tokens[:, k:], ((0, 0), (0, min(k, S))))[:, :S]
            x = mod.combine(h, self.embed_tokens(ahead))
            lrng = None if rng is None else jax.random.fold_in(rng, 10_000 + k)
            x, _, aux = mod.block(x, positions, segment_ids=segment_ids, token_mask=attention_mask.astype(bool),
                                  token_index=tidx, rng=lrng, train=train, rope=rope, mask=mask)
            out.append((x, aux))
            h = x
        return out

    def __call__(self, tokens, *, positions=None, segment_ids=None, attention_mask=None, cache: KVCache | None = None,
                 cache_index=None, token_index=None, rng=None, train: bool = False, return_hidden: bool = False,
                 layers: tuple[int, int] | None = None, hidden=None, expert_ids=None,
                 layer_states=None) -> ModelOutput:
        """Run the model.

        Args:
          tokens: ``[B, S]`` int token ids.
          positions: ``[B, S]`` RoPE positions; default ``arange(S)`` (plus ``cache_index`` with a cache).
          segment_ids: ``[B, S]`` packed-document ids (attention stays within a segment; 0 = padding).
          attention_mask: ``[B, S]`` 1 for real tokens, 0 for padding (used when ``segment_ids`` is None).
          cache, cache_index: KV cache and the column where these tokens go (prefill/decode).
          token_index: ``[B, S]`` global token index for per-token router randomness (default ``b*S + s``).
          rng: PRNG key for stochastic routers (``train=True``).
          return_hidden: return final hidden states instead of logits.
          layers: ``(start, stop)`` run only these layers (requires ``hidden`` from earlier layers when
            ``start > 0``); used by layer-group schedulers.
          expert_ids: ``[B, S]`` or ``[B, S, K]`` experts chosen outside the model (Read-ME's pre-gating
            router), used by every MoE layer instead of its own router.
        """
        cfg = self.cfg
        B, S = tokens.shape
        if attention_mask is None:
            attention_mask = jnp.ones((B, S), jnp.int32) if segment_ids is None else (segment_ids != 0)
        valid_tok = attention_mask.astype(bool)
        if segment_ids is None and cache is None:
            segment_ids = valid_tok.astype(jnp.int32)
        if positions is None:
            base = 0 if cache_index is None else cache_index
            positions = jnp.broadcast_to(base + jnp.arange(S, dtype=jnp.int32), (B, S))
        if token_index is None:
            token_index = jnp.arange(B * S, dtype=jnp.int32).reshape(B, S)
        start, stop = layers if layers is not None else (0, cfg.n_layers)
        if hidden is not None:
            x = hidden
        else:
            x = self.embed_tokens(tokens)
        kv_valid = None
        if cache is not None:
            kv_valid = jax.lax.dynamic_update_slice_in_dim(cache.valid, valid_tok, cache_index, 1)
        # RoPE tables and the attention mask are the same for every layer: computed once here.
        rope = rope_tables(positions, cfg.resolved_head_dim, cfg.rope_theta)
        mask = make_attention_mask(B, S, segment_ids=segment_ids, cache_index=cache_index, kv_valid=kv_valid,
                                   causal=cfg.causal)
        new_k, new_v, auxes = [], [], []
        for r, (kind, first, n) in enumerate(self.runs):
            lo, hi = max(start, first) - first, min(stop, first + n) - first
            if lo >= hi:
                if cache is not None:
                    new_k.append(cache.k[r])
                    new_v.append(cache.v[r])
                continue
            kv = None if cache is None else LayerKV(cache.k[r], cache.v[r])
            x, kv_out, aux = self._run_stack(r, lo, hi, x, positions, kv, cache_index, valid_tok, token_index,
                                             expert_ids, rng, train, rope, mask,
                                             None if layer_states is None else layer_states[r])
            if cache is not None:
                new_k.append(kv_out.k)
                new_v.append(kv_out.v)
            if kind == "moe":
                auxes.append(aux)
        aux = {k: jnp.concatenate([a[k] for a in auxes]) for k in auxes[0]} if auxes else {}
        new_cache = None if cache is None else KVCache(tuple(new_k), tuple(new_v), kv_valid)
        out = x if (return_hidden or stop < cfg.n_layers) else self.head(x)
        return ModelOutput(out, new_cache, aux)

    def _run_stack(self, r, lo, hi, x, positions, kv, cache_index, token_mask, token_index, expert_ids, rng, train,
                   rope, mask, per_layer=None):
        _kind, first, n = self.runs[r]
        gdef, state = nnx.split(self.stacks[r])
        sl = (lambda a: a[lo:hi]) if (lo, hi) != (0, n) else (lambda a: a)
        layer_ids = jnp.arange(first + lo, first + hi, dtype=jnp.uint32)

        def body(x, xs):
            st, lkv, lid = xs
            blk = nnx.merge(gdef, st)
            lrng = None if rng is None else jax.random.fold_in(rng, lid)
            x, new_kv, aux = blk(x, positions, kv=lkv, cache_index=cache_index, token_mask=token_mask,
                                 token_index=token_index, rng=lrng, train=train, rope=rope, mask=mask,
                                 expert_ids=expert_ids)
            return x, (new_kv, aux)

        if self.cfg.remat != "none":
            body = jax.checkpoint(body, policy=remat_policy(self.cfg.remat), prevent_cse=False)
        listed = kv is not None and isinstance(kv.k, tuple)  # a per-layer cache (init_cache(per_layer=True))
        if per_layer is None:
            if listed:
                kv = LayerKV(jnp.stack(kv.k), jnp.stack(kv.v))
            kv_in = None if kv is None else LayerKV(sl(kv.k), sl(kv.v))
            x, (kv_out, aux) = jax.lax.scan(body, x, (jax.tree.map(sl, state), kv_in, layer_ids))
            if kv is not None and (lo, hi) != (0, n):
                kv_out = LayerKV(kv.k.at[lo:hi].set(kv_out.k), kv.v.at[lo:hi].set(kv_out.v))
            if listed:
                kv_out = LayerKV(tuple(kv_out.k), tuple(kv_out.v))
            return x, kv_out, aux
        # one call per layer on its own weights (see unstack_layers)
        kk = vv = None
        if kv is not None:
            kk, vv = (list(kv.k), list(kv.v)) if listed else (kv.k, kv.v)
        auxes = []
        for i in range(lo, hi):
            lkv = None if kv is None else LayerKV(kk[i], vv[i])
            x, (new_kv, a) = body(x, (per_layer[i], lkv, layer_ids[i - lo]))
            if new_kv is not None:
                if listed:
                    kk[i], vv[i] = new_kv.k, new_kv.v
                else:
                    kk, vv = kk.at[i].set(new_kv.k), vv.at[i].set(new_kv.v)
            auxes.append(a)
        kv_out = None
        if kv is not None:
            kv_out = LayerKV(tuple(kk), tuple(vv)) if listed else LayerKV(kk, vv)
        return x, kv_out, jax.tree.map(lambda *a: jnp.stack(a), *auxes)


def unstack_layers(model: Transformer) -> tuple[tuple[nnx.State, ...], ...]:
    """Per-layer parameter states of each run of the stack (``result[run][i]`` is layer ``first + i``).

    For inference loops that apply the layers one by one (``Transformer(..., layer_states=...)``, the serving
    engine): a layer's weights are then their own buffers. Scanning the stacked weights instead makes XLA:CPU
    copy each layer's slice out of the stack on every step (about half a decode step's time on the tiny
    preset). The result holds copies: weights take twice the memory while both are kept.
    """
    out = []
    for r, (_kind, _first, n) in enumerate(model.runs):
        _, st = nnx.split(model.stacks[r])
        out.append(tuple(jax.tree.map(lambda a, i=i: a[i], st) for i in range(n)))
    return tuple(out)


LAYER_LOOPS = ("auto", "scan", "unroll")


def resolve_layer_loop(layer_loop: str) -> str:
    """``"scan"`` (the stacked weights in a ``lax.scan``), ``"unroll"`` (one call per layer over
    :func:`unstack_layers`' per-layer weights) or ``"auto"``: ``unroll`` on CPU, where slicing a layer out
    of the stack is a copy each step, else ``scan``."""
    if layer_loop not in LAYER_LOOPS:
        raise ValueError(f"layer_loop={layer_loop!r}; allowed: {', '.join(map(repr, LAYER_LOOPS))}")
    if layer_loop == "auto":
        return "unroll" if jax.default_backend() == "cpu" else "scan"
    return layer_loop


def count_params(model: nnx.Module) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def active_params(cfg: ModelConfig) -> dict[str, Any]:
    """Total and per-token active parameter counts from the config alone."""
    D, hd = cfg.d_model, cfg.resolved_head_dim
    attn = D * hd * (cfg.n_heads * 2 + cfg.n_kv_heads * 2)
    dense_ffn = 3 * D * cfg.d_ff
    total = active = cfg.vocab_size * D * (1 if cfg.tie_embeddings else 2)
    for kind in cfg.layer_kinds():
        total += attn
        active += attn
        if kind == "moe" and cfg.moe.expert_type == "atomic":  # K rows of U and of V, two router heads
            m = cfg.moe
            shared = 3 * D * m.num_shared_experts * (m.shared_d_ff or m.d_ff)
            router = 2 * D * math.isqrt(m.num_experts)
            total += 2 * m.num_experts * D + shared + router
            active += 2 * m.router.top_k * D + shared + router
        elif kind == "moe":
            m = cfg.moe
            e = 3 * D * m.d_ff
            shared = 3 * D * m.num_shared_experts * (m.shared_d_ff or m.d_ff)
            total += m.num_experts * e + shared + D * m.num_experts
            active += m.router.effective_top_k * e + shared + D * m.num_experts
        else:
            total += dense_ffn
            active += dense_ffn
    return {"total": total, "active": active}
