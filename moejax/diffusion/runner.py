"""The diffusion engine's jitted iteration over a paged KV pool: refresh rows and reuse rows in one step.

Each request owns KV blocks for its whole canvas (prompt + generation) in a pool laid out as the serving
engine's (:class:`moejax.serve.kv_cache.KVPool`). One iteration runs two parts through every layer:

* **refresh rows** ``[Br, T]``: whole canvases (right-padded to ``T``): every position's keys/values are written
  to the pool and every query attends to the whole canvas (Fast-dLLM's refresh, the dual cache's fill);
* **reuse rows** ``[Bu, block]``: only the current block of a canvas: its keys/values are rewritten and its
  queries attend to the cached keys/values of the rest of the canvas and the block's fresh ones (the dual
  cache's reuse step).

Attention is bidirectional (:func:`moejax.nn.attention.paged_rows` with ``causal=False``). Both parts share one
FFN call per layer (:meth:`~moejax.models.transformer.Block.ffn_sublayer`: each expert's weights read once for
all rows). The layer math is the model's own: this module packs rows and walks the layers, calling the Block's
entry points (:meth:`~moejax.models.transformer.Block.paged_attention`, ``ffn_sublayer``), as the
autoregressive step does.

The head: the hidden states of the blocks' positions (``[Br + Bu, block, D]``) are indexed by ``sel`` (the masked
positions the host asks about) and reduced to ``(token, confidence)`` by
:func:`moejax.diffusion.sampler.pick_tokens` in chunks (logit budgeting). Without logit budgeting the head runs on
every refresh position (``[Br, T, V]`` logits, as a model that returns full logits does) and on every reuse
position, and the selected rows are read from those logits: the same tokens, more memory.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.diffusion.sampler import pick_tokens
from moejax.models.transformer import PagedPart
from moejax.nn.attention import PagedSpec, paged_rows
from moejax.serve.kv_cache import KVPool


class Rows(NamedTuple):
    """One part of an iteration (refresh or reuse rows)."""

    tokens: jax.Array       # [B, T] int32: the canvas (refresh) or the block (reuse)
    start: jax.Array        # [B] int32: position of column 0 (refresh: 0; reuse: the block's first position)
    length: jax.Array       # [B] int32: the canvas length (0: padding row)
    tables: jax.Array       # [B, P] int32 block tables
    block_start: jax.Array  # [B] int32: column of the block's first token in ``tokens`` (reuse: 0)
    keep: jax.Array | None = None     # refresh rows, sparse attention: [B] positions each KV head keeps
    sel_pos: jax.Array | None = None  # reuse rows, sparse attention: [B, n_layers, KV, K] selected positions
    sel_ok: jax.Array | None = None   # [B, n_layers, KV, K] bool


class Selection(NamedTuple):
    """The masked positions whose (token, confidence) the host needs: row ``i`` of the blocks' hidden states
    ``[Br + Bu, block]`` flattened, with its sampling key, step and temperature."""

    index: jax.Array        # [N] int32 into the flattened blocks (padding: 0)
    keys: jax.Array         # [N, 2] uint32: the request's key
    step: jax.Array         # [N] int32: the request's step counter
    offset: jax.Array       # [N] int32: position within the block
    temperature: jax.Array  # [N] float32


class DiffusionStepOutput(NamedTuple):
    tokens: jax.Array       # [N] int32 chosen token per selected position
    confidence: jax.Array   # [N] float32
    pool: KVPool
    experts_touched: jax.Array  # [n_layers]
    selection: tuple | None = None  # refresh rows under sparse attention: ([Br, n_layers, KV, K] positions, valid)


def _part(model, rows: Rows, block_size: int) -> PagedPart:
    cfg = model.cfg
    T = rows.tokens.shape[1]
    pos = rows.start[:, None] + jnp.arange(T, dtype=jnp.int32)
    valid = (pos < rows.length[:, None]) & (rows.length[:, None] > 0)
    pr = paged_rows(rows.tables, pos, valid, rows.length, block_size=block_size, head_dim=cfg.resolved_head_dim,
                    rope_theta=cfg.rope_theta, causal=False)
    return PagedPart(model.embed_tokens(rows.tokens), pr)


def _layers(model, pool: KVPool, parts: list[tuple[PagedPart, Rows]], spec: PagedSpec, layer_states, *,
            block: int, sparse_k: int, window: int):
    """Every layer over the parts: each part's attention (writes its keys/values, then reads: dense, or for reuse
    rows with a selection the selected positions, or for refresh rows with ``keep`` dense while choosing the
    positions), then one FFN call. Returns the parts' hidden states, the pool, experts touched per layer and the
    refresh part's selection ``([n_layers, Br, KV, K], valid)`` (None without ``sparse_k``)."""
    ks, vs, touched, sels = list(pool.k), list(pool.v), [], []
    xs = [p.x for p, _ in parts]
    for r, (_kind, first, n) in enumerate(model.runs):
        gd, st = nnx.split(model.stacks[r])

        def body(carry, xs_, gd=gd, first=first):
            x_all, kp, vp = carry
            bst, li = xs_
            blk = nnx.merge(gd, bst)
            new, sel = [], None
            for (p, rw), x in zip(parts, x_all):
                if rw.keep is not None and sparse_k:
                    x, kp, vp, sel = blk.paged_attention_select(x, p.rows, kp, vp, li, spec, rw.block_start, block,
                                                                rw.keep, sparse_k, window)
                elif rw.sel_pos is not None:
                    x, kp, vp = blk.paged_read_selected(x, p.rows, kp, vp, li, spec, rw.sel_pos[:, first + li],
                                                        rw.sel_ok[:, first + li])
                else:
                    x, kp, vp = blk.paged_attention(x, p.rows, kp, vp, li, spec)
                new.append(x)
            new, stats = blk.ffn_sublayer([(x, p.rows.valid, None) for (p, _), x in zip(parts, new)])
            return (new, kp, vp), (stats.touched, sel)

        carry = (xs, ks[r], vs[r])
        if layer_states is None:
            carry, (t, sel) = jax.lax.scan(body, carry, (st, jnp.arange(n, dtype=jnp.int32)))
        else:
            outs = []
            for i in range(n):
                carry, o = body(carry, (layer_states[r][i], i))
                outs.append(o)
            t, sel = jax.tree.map(lambda *a: jnp.stack(a), *outs)
        xs, ks[r], vs[r] = carry
        touched.append(t)
        sels.append(sel)
    sel = None if sels[0] is None else jax.tree.map(lambda *a: jnp.concatenate(a), *sels)
    return xs, KVPool(tuple(ks), tuple(vs)), jnp.concatenate(touched), sel


def _diffusion_step(gdef, state, pool: KVPool, refresh: Rows | None, reuse: Rows | None, sel: Selection,
                    layer_states=None, *, block_size: int, block: int, greedy: bool, logit_budget: bool,
                    head_rows: int, kv_block: int | None = None, sparse_k: int = 0,
                    window: int = 3) -> DiffusionStepOutput:
    """One iteration (see the module docstring); ``refresh``/``reuse`` may be None (absent part).

    Head-centric sparse attention: refresh rows with ``keep`` choose ``sparse_k``-wide selections (returned in
    ``selection``, layer-major per row), reuse rows with ``sel_pos`` attend to theirs."""
    model = nnx.merge(gdef, state)
    spec = PagedSpec(block_size, "xla", kv_block)  # bidirectional rows: the XLA loop (the kernels are causal)
    present = [r for r in (refresh, reuse) if r is not None]
    xs, pool, touched, chosen = _layers(model, pool, [(_part(model, r, block_size), r) for r in present], spec,
                                        layer_states, block=block, sparse_k=sparse_k, window=window)
    if chosen is not None:
        chosen = tuple(jnp.moveaxis(a, 0, 1) for a in chosen)  # [Br, n_layers, KV, K]
    cols = jnp.arange(block, dtype=jnp.int32)
    blocks, full = [], []
    for r, x in zip(present, xs):
        idx = r.block_start[:, None] + cols  # [B, block]
        blocks.append(jnp.take_along_axis(x, idx[:, :, None], axis=1))
        if not logit_budget:
            # as a model that returns full logits is used (LLaDA, Fast-dLLM): the head, the argmax and the softmax
            # over every position the part computed ([B, T, V]), then the block's rows
            logits = model.head(x)
            tok_all = jnp.argmax(logits, axis=-1).astype(jnp.int32)
            conf_all = jnp.max(jax.nn.softmax(logits, axis=-1), axis=-1)
            full.append(tuple(jnp.take_along_axis(a, idx, axis=1) for a in (tok_all, conf_all))
                        + (jnp.take_along_axis(logits, idx[:, :, None], axis=1),))
    D = xs[0].shape[-1]
    keys = jax.vmap(lambda k, s, o: jax.random.fold_in(jax.random.fold_in(k, s), o))(
        sel.keys, sel.step, sel.offset)
    if logit_budget:
        h = jnp.concatenate(blocks).reshape(-1, D)[sel.index]
        tok, conf = pick_tokens(model.head, h, keys, sel.temperature, greedy=greedy, chunk=head_rows)
    elif greedy:
        tok = jnp.concatenate([t for t, _, _ in full]).reshape(-1)[sel.index]
        conf = jnp.concatenate([c for _, c, _ in full]).reshape(-1)[sel.index]
    else:  # Gumbel noise on the selected rows' logits (the same draws as with logit budgeting)
        logits = jnp.concatenate([lg for _, _, lg in full]).reshape(-1, model.cfg.vocab_size)[sel.index]
        tok, conf = pick_tokens(lambda z: z, logits, keys, sel.temperature, greedy=False, chunk=logits.shape[0])
    return DiffusionStepOutput(tok, conf, pool, touched, chosen)


diffusion_step = jax.jit(_diffusion_step, static_argnames=("gdef", "block_size", "block", "greedy", "logit_budget",
                                                           "head_rows", "kv_block", "sparse_k", "window"),
                         donate_argnames=("pool",))
diffusion_step.__doc__ = _diffusion_step.__doc__


def step_memory(gdef, state, pool, refresh, reuse, sel, layer_states=None, **statics) -> dict:
    """Compiled memory analysis of one iteration's shapes (``jax.stages.Compiled.memory_analysis``): bytes of
    arguments, outputs and temporaries (the peak activations the KV pool must leave room for)."""
    c = jax.jit(partial(_diffusion_step, **statics), static_argnums=(0,)).lower(
        gdef, state, pool, refresh, reuse, sel, layer_states).compile()
    m = c.memory_analysis()
    return {"argument_bytes": int(m.argument_size_in_bytes), "output_bytes": int(m.output_size_in_bytes),
            "temp_bytes": int(m.temp_size_in_bytes), "alias_bytes": int(getattr(m, "alias_size_in_bytes", 0))}
