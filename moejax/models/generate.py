"""Jitted batched generation with a KV cache, compiled once per shape bucket.

Prompts are left-padded to a length bucket and the number of new tokens is rounded up to a bucket, so
requests of similar sizes reuse one compiled program; the actual number of new tokens is a runtime value.
Prefill runs the whole prompt in one call; decoding is a ``lax.while_loop`` inside the same program (no
per-token Python dispatch), stopping early once every row has produced ``eos_id``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moejax.models.transformer import require_causal, resolve_layer_loop, unstack_layers
from moejax.nn.sampling import sample
from moejax.nn.shapes import pow2_bucket


@dataclass
class GenerateResult:
    tokens: np.ndarray            # [B, max_new_tokens] generated ids (eos_id repeated after a row stops)
    lengths: np.ndarray           # [B] generated tokens per row, eos included
    logits: np.ndarray | None     # [B, max_new_tokens, V] float32 logits each token was chosen from

    def as_lists(self) -> list[list[int]]:
        return [row[:n].tolist() for row, n in zip(self.tokens, self.lengths)]


@partial(jax.jit, static_argnames=("gdef", "cache_len", "n_max", "greedy", "return_logits"))
def _generate(gdef, state, layer_states, tokens, mask, key, temperature, top_p, n_new, eos_id, *, cache_len, n_max,
              greedy, return_logits):
    model = nnx.merge(gdef, state)
    B, S = tokens.shape
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0).astype(jnp.int32)
    out = model(tokens, positions=positions, attention_mask=mask, cache=model.init_cache(B, cache_len, per_layer=layer_states is not None),
                cache_index=0, layer_states=layer_states)
    V = out.logits.shape[-1]
    toks = jnp.full((B, n_max), eos_id, jnp.int32)
    lg = jnp.zeros((B, n_max, V) if return_logits else (0,), jnp.float32)

    def emit(i, logits, done, toks, lg):
        t = sample(logits, jax.random.fold_in(key, i), temperature=temperature, top_p=top_p, greedy=greedy)
        t = jnp.where(done, eos_id, t)
        toks = toks.at[:, i].set(t)
        if return_logits:
            lg = lg.at[:, i].set(logits)
        return t, done | (t == eos_id), toks, lg

    def cond(c):
        i, done = c[0], c[3]
        return (i < n_new - 1) & ~jnp.all(done)

    def body(c):
        i, cache, logits, done, pos, toks, lg = c
        t, done, toks, lg = emit(i, logits, done, toks, lg)
        o = model(t[:, None], positions=pos[:, None], attention_mask=jnp.ones((B, 1), jnp.int32), cache=cache,
                  cache_index=S + i, layer_states=layer_states)
        return i + 1, o.cache, o.logits[:, 0], done, pos + 1, toks, lg

    init = (jnp.int32(0), out.cache, out.logits[:, -1], jnp.zeros(B, bool), positions[:, -1] + 1, toks, lg)
    i, _, logits, done, _, toks, lg = jax.lax.while_loop(cond, body, init)
    _, done, toks, lg = emit(i, logits, done, toks, lg)
    return toks, lg


def generate(model: nnx.Module, prompts: Sequence[Sequence[int]] | np.ndarray, max_new_tokens: int, *,
             greedy: bool = True, temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
             eos_id: int | None = None, return_logits: bool = False, pad_id: int = 0,
             layer_loop: str = "auto") -> GenerateResult:
    """Generate up to ``max_new_tokens`` for each prompt (a list of token-id lists of any lengths).

    Greedy by default; otherwise temperature / nucleus sampling with ``seed``. Rows stop at ``eos_id``.
    ``layer_loop``: how the layer stack runs (:func:`moejax.models.transformer.resolve_layer_loop`; ``auto``
    applies per-layer weight copies one layer at a time on CPU, a scan over the stacked weights elsewhere).
    """
    require_causal(model.cfg, "generate")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p} must be in (0, 1]")
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0")
    layer_loop = resolve_layer_loop(layer_loop)
    prompts = [list(map(int, p)) for p in prompts]
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    cfg = model.cfg
    bad = [t for p in prompts for t in p if not 0 <= t < cfg.vocab_size]
    if bad:
        raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary [0, {cfg.vocab_size})")
    longest = max(map(len, prompts))
    S, N = pow2_bucket(longest, 16), pow2_bucket(max_new_tokens, 16)
    if S + N > cfg.max_seq_len:
        S, N = longest, max_new_tokens
    if S + N > cfg.max_seq_len:
        raise ValueError(f"prompt ({longest}) + max_new_tokens ({max_new_tokens}) exceeds "
                         f"ModelConfig.max_seq_len={cfg.max_seq_len}")
    B = len(prompts)
    tokens = np.full((B, S), pad_id, np.int32)
    mask = np.zeros((B, S), np.int32)
    for b, p in enumerate(prompts):
        tokens[b, S - len(p):] = p
        mask[b, S - len(p):] = 1
    gdef, state = nnx.split(model)
    eos = -1 if eos_id is None else int(eos_id)
    layer_states = unstack_layers(model) if layer_loop == "unroll" else None
    toks, lg = _generate(gdef, state, layer_states, jnp.asarray(tokens), jnp.asarray(mask), jax.random.PRNGKey(seed),
                         jnp.float32(temperature), jnp.float32(top_p), jnp.int32(max_new_tokens), jnp.int32(eos),
                         cache_len=S + N, n_max=N, greedy=greedy, return_logits=return_logits)
    toks = np.asarray(toks)[:, :max_new_tokens]
    if eos_id is None:
        lengths = np.full(B, max_new_tokens)
    else:
        hit = toks == eos_id
        lengths = np.where(hit.any(1), hit.argmax(1) + 1, max_new_tokens)
    logits = np.asarray(lg)[:, :max_new_tokens] if return_logits else None
    return GenerateResult(toks, lengths, logits)
