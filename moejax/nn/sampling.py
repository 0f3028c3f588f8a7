"""Token sampling: greedy, temperature and nucleus (top-p), per row."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def top_p_filter(logits: jax.Array, top_p: jax.Array) -> jax.Array:
    """Mask (to -inf) the tokens outside the smallest set whose probability mass reaches ``top_p``.

    ``logits [B, V]``, ``top_p [B]`` (1.0 keeps everything). The most likely token is always kept.
    """
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, -1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, -1) - probs
    keep_sorted = mass_before < top_p[:, None]
    keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
    return jnp.where(keep, logits, -jnp.inf)


def sample(logits: jax.Array, key: jax.Array, *, temperature=1.0, top_p=1.0, greedy=False) -> jax.Array:
    """Next tokens ``[B]`` from float32 ``logits [B, V]``.

    ``temperature`` and ``top_p`` are scalars or ``[B]`` arrays; a row with ``temperature == 0`` is greedy.
    ``greedy=True`` (static) skips sampling entirely. Rows draw from independent keys split from ``key``.
    """
    logits = logits.astype(jnp.float32)
    argmax = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if greedy:
        return argmax
    B = logits.shape[0]
    temperature = jnp.broadcast_to(jnp.asarray(temperature, jnp.float32), (B,))
    top_p = jnp.broadcast_to(jnp.asarray(top_p, jnp.float32), (B,))
    scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
    filtered = top_p_filter(scaled, top_p)
    keys = jax.random.split(key, B)
    drawn = jax.vmap(lambda k, l: jax.random.categorical(k, l))(keys, filtered).astype(jnp.int32)
    return jnp.where(temperature <= 0, argmax, drawn)


def sample_rows(logits: jax.Array, keys: jax.Array, temperature: jax.Array, top_p: jax.Array):
    """Per-row sampling with per-row keys ``[B, 2]`` (a request's key depends only on its seed and step).

    Returns ``(tokens [B], logprobs [B, V])``: ``temperature == 0`` rows are greedy; the log-probabilities
    are those of the model's unmodified distribution (what OpenAI-style ``logprobs`` report). The sort of the
    nucleus filter and the random draws run only when some row samples (``lax.cond``), so all-greedy batches
    pay for an argmax alone.
    """
    logits = logits.astype(jnp.float32)
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    argmax = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def draw(_):
        scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
        filtered = jax.lax.cond(jnp.any(top_p < 1.0), lambda x: top_p_filter(x, top_p), lambda x: x, scaled)
        drawn = jax.vmap(lambda k, lg: jax.random.categorical(k, lg))(keys, filtered).astype(jnp.int32)
        return jnp.where(temperature <= 0, argmax, drawn)

    tokens = jax.lax.cond(jnp.any(temperature > 0), draw, lambda _: argmax, None)
    return tokens, logprobs
