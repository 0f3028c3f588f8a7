"""Speculative decoding with the model's MTP heads as the drafter (xLLM; DeepSeek-V3's MTP; vLLM's ``mtp`` method).

One compiled *speculative step* (:func:`spec_step`) replaces the engine step while speculation is on:

1. **Verify.** Each running request's decode row holds ``1 + K`` tokens: its last token and the ``K`` drafts
   the MTP heads proposed for the positions after it. The main model runs them at positions ``pos .. pos + K``
   through the same layers and paged attention as a prefill chunk (queries see keys up to their own
   position), beside the step's prefill rows, in one MoE call per layer.
2. **Accept** (:func:`verify`). Greedy rows (temperature 0) accept drafts while each equals the target's argmax
   at the position before it, then emit the target's argmax: the tokens plain greedy decoding would produce.
   Sampled rows use rejection sampling: the drafts are the heads' argmax (a point-mass draft distribution), so
   draft ``d`` at index ``j`` is accepted with probability ``p_j(d)`` under the target's sampling
   distribution ``p_j`` (temperature and top-p applied) and, at the first rejection, a token is drawn from
   ``p_j`` with ``d`` removed (the residual ``max(0, p - q)`` renormalized); after ``K`` acceptances a bonus
   token is drawn from ``p_K``. Each emitted token is then distributed exactly as plain sampling would draw it
   (Leviathan et al., 2023); the random draws differ, so sampled tokens differ from a plain run with the same
   seed. A row emits ``accepted + 1`` tokens; the host appends them in order, so a stop token or
   ``max_tokens`` inside an accepted run ends the request there (as with multi-step decoding).
3. **Roll back.** Nothing moves on the device: keys/values written for rejected positions lie past the
   request's length (never visible: attention reads up to the query's position) and are overwritten when those
   positions are computed again; the host counts only the accepted tokens as cached, for the main layers and
   the MTP layers alike.
4. **Draft.** MTP module ``k`` runs at each position ``i`` of the verified rows and of the step's prefill
   chunks on ``(h^{k-1}_i, emb(t_{i+k}))`` (its own KV pages: the pool's last entry, one layer per module), and
   its output at the last accepted position (a prompt's last token) drafts the token ``k + 1`` ahead. Inputs
   past the last known token are the drafts of the earlier modules. The MTP keys/values therefore cover every
   position the step computed, so the next drafts attend over the whole context. Two approximations touch
   draft quality only, never the output: module ``k >= 2``'s keys at the last ``k - 1`` positions of a step
   are computed from draft (or, in a prompt chunk that does not end the prompt, placeholder) inputs and are
   not recomputed after a rejection; and positions computed while speculation was off
   (``EngineConfig.speculative_max_batch``) have no MTP keys/values.

``spec_step`` is jitted with the same static arguments as :func:`moejax.serve.step.engine_step`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.nn.sampling import top_p_filter
from moejax.serve.kv_cache import KVPool
from moejax.serve.step import (
    _STATIC,
    TOP_LOGPROBS,
    DecodeBatch,
    PrefillBatch,
    _sample,
    attention_specs,
    prepare_rows,
    run_layers,
)

SPECULATIVE_METHODS = ("mtp",)


class SpecPrefill(NamedTuple):
    """What the MTP heads need of a step's prefill rows beyond :class:`~moejax.serve.step.PrefillBatch`."""

    ahead: jax.Array  # [Bp, K] int32: the prompt tokens right after the chunk (0 past the prompt)
    final: jax.Array  # [Bp] bool: the chunk completes its prompt (its sampled token and drafts are used)


class SpecOutput(NamedTuple):
    """One speculative step. Decode fields are step-major ``[1 + K, Bd, ...]`` (the layout of multi-step
    results): column ``b``'s first ``accepted[b] + 1`` tokens are emitted."""

    tokens: jax.Array           # [1 + K, Bd]
    logprob: jax.Array          # [1 + K, Bd] log-probability of each token (the model's unmodified distribution)
    top: tuple                  # ([1 + K, Bd, 5] ids, [1 + K, Bd, 5] logprobs)
    accepted: jax.Array         # [Bd] drafts accepted (0..K)
    drafts: jax.Array           # [Bd, K] the next step's drafts
    pf_next: jax.Array          # [Bp] token sampled after each chunk's last token
    pf_logprob: jax.Array
    pf_top: tuple
    pf_drafts: jax.Array        # [Bp, K] drafts after a completed prompt
    experts_touched: jax.Array  # [n_layers] (the main model's layers)
    logits: jax.Array | None    # [1 + K, Bd, V] (only with return_logits)
    pf_logits: jax.Array | None
    pool: KVPool
    dropped: jax.Array | None = None
    expert_load: jax.Array | None = None


def target_logprobs(logits, temperature, top_p):
    """Log-probabilities ``[B, S, V]`` of the sampling distribution (temperature, then the top-p filter) of
    ``logits [B, S, V]`` with per-row ``temperature``/``top_p [B]`` (a greedy row's temperature is clamped)."""
    B, S, V = logits.shape
    z = logits / jnp.maximum(temperature, 1e-6)[:, None, None]
    z = jax.lax.cond(jnp.any(top_p < 1.0),
                     lambda z: top_p_filter(z.reshape(B * S, V), jnp.repeat(top_p, S)).reshape(B, S, V),
                     lambda z: z, z)
    return jax.nn.log_softmax(z, axis=-1)


def verify(logits, drafts, keys, temperature, top_p):
    """Accept drafts against the target (see the module docstring).

    ``logits [B, 1 + K, V]``: the target at the row's ``1 + K`` positions; ``drafts [B, K]`` (the tokens fed at
    positions ``1..K``); ``keys [B, 2]``: the row's sampling key for its first emitted token (index ``j`` uses
    ``keys + (0, j)``). Returns ``(tokens [B, 1 + K], accepted [B])``: the first ``accepted + 1`` tokens are
    emitted (accepted drafts, then the correction or bonus token)."""
    B, S, V = logits.shape
    K = S - 1
    logits = logits.astype(jnp.float32)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    g_acc = drafts == greedy[:, :K]
    kj = keys[:, None, :] + jnp.asarray([0, 1], jnp.uint32) * jnp.arange(S, dtype=jnp.uint32)[None, :, None]

    def sampled(_):
        logp = target_logprobs(logits, temperature, top_p)
        u = jax.vmap(jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, 1))))(kj)
        p_d = jnp.exp(jnp.take_along_axis(logp[:, :K], drafts[..., None], axis=-1)[..., 0])
        acc = u[:, :K] < p_d
        hit = jax.nn.one_hot(drafts, V, dtype=bool)  # the residual of a point-mass draft: the target without it
        resid = jnp.concatenate([jnp.where(hit, -jnp.inf, logp[:, :K]), logp[:, K:]], axis=1)
        draw = jax.vmap(jax.vmap(lambda k, lg: jax.random.categorical(jax.random.fold_in(k, 2), lg)))(kj, resid)
        return acc, draw.astype(jnp.int32)

    acc_s, draw = jax.lax.cond(jnp.any(temperature > 0), sampled, lambda _: (g_acc, greedy), None)
    is_greedy = (temperature <= 0)[:, None]
    acc = jnp.where(is_greedy, g_acc, acc_s)
    accepted = jnp.sum(jnp.cumprod(acc.astype(jnp.int32), axis=1), axis=1)
    fix = jnp.where(is_greedy, greedy, draw)
    idx = jnp.arange(S)[None, :]
    fed = jnp.concatenate([drafts, jnp.zeros((B, 1), jnp.int32)], axis=1)
    return jnp.where(idx < accepted[:, None], fed, fix), accepted


def _rows(a, idx):
    """``a[b, idx[b]]`` for each row ``b``."""
    return a[jnp.arange(a.shape[0]), idx]


def _spec_step(gdef, state, pool: KVPool, dec: DecodeBatch | None, pf: PrefillBatch | None, spf: SpecPrefill | None,
               layer_states=None, *, block_size: int, return_logits: bool = False, attn_impl: str = "xla",
               kv_block: int | None = None, prefill_kv_block: int | None = None) -> SpecOutput:
    """One speculative step (see the module docstring): ``dec.tokens [Bd, 1 + K]`` (last token, K drafts);
    ``pf`` whole-stack prefill chunks with ``spf``; the pool's last entry holds the MTP modules' layers. ``K``
    is ``spf.ahead.shape[1]`` without a decode part."""
    model = nnx.merge(gdef, state)
    mcfg = model.cfg
    L = mcfg.n_layers
    K = dec.tokens.shape[1] - 1 if dec is not None else spf.ahead.shape[1]
    dpart, ppart = prepare_rows(model, dec, pf, None, block_size=block_size, use_hidden=False)
    dspec, pspec = attention_specs(block_size, attn_impl, kv_block, prefill_kv_block,
                                   pf.tokens.shape[1] if pf is not None else None)
    xd, xp, pool, stats = run_layers(model, pool, dpart, ppart, 0, L, None if layer_states is None else layer_states,
                                     dspec, pspec)
    empty_top = (jnp.zeros((0, TOP_LOGPROBS), jnp.int32), jnp.zeros((0, TOP_LOGPROBS), jnp.float32))
    seqs, lasts, finals, hs = [], [], [], []
    if dec is not None:
        Bd = dec.tokens.shape[0]
        logits = model.head(xd)  # [Bd, S, V]
        toks, accepted = verify(logits, dec.tokens[:, 1:], dec.keys, dec.temperature, dec.top_p)
        lp = jax.nn.log_softmax(logits, axis=-1)
        chosen = jnp.take_along_axis(lp, toks[..., None], axis=-1)[..., 0]
        top_lp, top_id = jax.lax.top_k(lp, TOP_LOGPROBS)
        # MTP inputs of the verified rows: index i holds the token at position pos + i + 1 (known up to
        # index `accepted`, the drafts of earlier modules after it)
        seqs.append(jnp.concatenate([toks, jnp.zeros((Bd, K - 1), jnp.int32)], axis=1))
        lasts.append(accepted)
        finals.append(dec.valid)
        hs.append(xd)
    if pf is not None:
        Bp, Tp = pf.tokens.shape
        p_next, p_lp, p_top, p_logits = _sample(model, xp[:, -1], pf.keys, pf.temperature, pf.top_p, return_logits)
        first = jnp.where(spf.final, p_next, spf.ahead[:, 0])
        seqs.append(jnp.concatenate([pf.tokens[:, 1:], first[:, None], spf.ahead[:, 1:]], axis=1))
        lasts.append(jnp.full((Bp,), Tp - 1, jnp.int32))
        finals.append(spf.final)
        hs.append(xp)
    drafts = [[] for _ in hs]
    kp, vp = pool.k[-1], pool.v[-1]
    parts = [dpart, ppart]
    present = [i for i, p in enumerate(parts) if p is not None]
    for k in range(K):
        mod = model.mtp[k]
        xs = {}
        for j, i in enumerate(present):
            width = hs[j].shape[1]
            xs[i] = parts[i]._replace(x=mod.combine(hs[j], model.embed_tokens(seqs[j][:, k:k + width])))
        d_in, p_in = xs.get(0), xs.get(1)
        xd_k, xp_k, kp, vp, _ = mod.block.paged_layer(kp, vp, k, d_in, p_in, None if p_in is None else jnp.bool_(True),
                                                      dec_spec=dspec, pf_spec=pspec)
        outs = {0: xd_k, 1: xp_k}
        for j, i in enumerate(present):
            hs[j] = outs[i]
            d = jnp.argmax(model.mtp_logits(k, _rows(hs[j], lasts[j])), axis=-1).astype(jnp.int32)
            drafts[j].append(d)
            if k + 1 < K:  # the next module's input past the last known token
                at = lasts[j] + k + 1
                cur = _rows(seqs[j], jnp.minimum(at, seqs[j].shape[1] - 1))
                seqs[j] = seqs[j].at[jnp.arange(d.shape[0]), at].set(jnp.where(finals[j], d, cur), mode="drop")
    pool = KVPool((*pool.k[:-1], kp), (*pool.v[:-1], vp))
    j = 0
    if dec is not None:
        d_drafts = jnp.stack(drafts[0], axis=1)
        j = 1
        out_dec = (toks.T, chosen.T, (jnp.swapaxes(top_id, 0, 1).astype(jnp.int32), jnp.swapaxes(top_lp, 0, 1)),
                   accepted, d_drafts, jnp.swapaxes(logits, 0, 1) if return_logits else None)
    else:
        z = jnp.zeros((K + 1, 0), jnp.int32)
        out_dec = (z, z.astype(jnp.float32), (jnp.zeros((K + 1, 0, TOP_LOGPROBS), jnp.int32),
                                              jnp.zeros((K + 1, 0, TOP_LOGPROBS), jnp.float32)),
                   jnp.zeros((0,), jnp.int32), jnp.zeros((0, K), jnp.int32), None)
    if pf is not None:
        out_pf = (p_next, p_lp, p_top, jnp.stack(drafts[j], axis=1), p_logits)
    else:
        out_pf = (jnp.zeros((0,), jnp.int32), jnp.zeros((0,), jnp.float32), empty_top, jnp.zeros((0, K), jnp.int32),
                  None)
    tk, lpk, topk, acc, dd, lg = out_dec
    return SpecOutput(tk, lpk, topk, acc, dd, out_pf[0], out_pf[1], out_pf[2], out_pf[3], stats.touched, lg,
                      out_pf[4], pool, stats.dropped, stats.load)


spec_step = jax.jit(_spec_step, static_argnames=(*_STATIC, "prefill_kv_block"), donate_argnames=("pool",))
spec_step.__doc__ = _spec_step.__doc__


def mtp_pool_runs(model, enabled: bool) -> tuple:
    """The KV pool's runs for ``model``: its layer runs, plus one entry of ``mtp_depth`` layers for the MTP
    modules when speculative decoding is ``enabled``."""
    runs = tuple(model.runs)
    if enabled:
        runs += (("mtp", model.cfg.n_layers, model.cfg.mtp_depth),)
    return runs
