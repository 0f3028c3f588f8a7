"""Sampling from a masked-diffusion LM: LLaDA's low-confidence remasking with Fast-dLLM's KV caches.

A *canvas* ``x [B, L]`` holds the prompt (left-padded, ``valid`` marks real tokens) followed by a *region* of
mask tokens. The region is denoised in semi-autoregressive *blocks* of ``block_length`` tokens, left to right;
each block takes ``steps_per_block`` steps. A step runs the model, takes for every masked position of the block
the most likely token (with Gumbel noise at ``temperature > 0``) and its softmax probability, the
*confidence*, and unmasks the ``k`` most confident positions, ``k`` following LLaDA's schedule
(:func:`transfer_counts`: the block's masked tokens spread evenly over its steps). ``remasking="random"``
ranks positions by a random score instead.

KV caches (``SamplerConfig.cache``), as Fast-dLLM:

* ``none``: every step runs the whole canvas (LLaDA's reference sampler);
* ``prefix``: a block's first step is a *refresh* (the whole canvas; its keys/values cached); the block's other
  steps (*reuse*) run only the block and everything after it, over the cached keys/values of the prefix;
* ``dual``: the refresh caches every position; reuse steps run only the block, over the cached keys/values of
  the prefix *and* the suffix.

On a refresh step the cached forward is the full forward (tested); reuse steps approximate it (the cached keys
of the other positions are those of the refresh).

Logit budgeting (dLLM-Serve): the LM head runs only on the block's positions, at most ``head_rows`` rows at a
time, each chunk reduced at once to ``(token, confidence)`` (:func:`pick_tokens`): no ``[B, L, V]`` logits
tensor is ever built.

Randomness is per row: row ``b`` draws its step-``s`` noise from ``fold_in(row_keys[b], s)``, so a request gives
the same tokens alone or in any batch (the serving engine relies on it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moejax.models.transformer import resolve_layer_loop, unstack_layers
from moejax.nn.shapes import pow2_bucket

REMASKING = ("low_confidence", "random")
"""How a step ranks the masked positions it may unmask (``SamplerConfig.remasking``)."""
CACHE_MODES = ("none", "prefix", "dual")
"""KV-cache policies of the sampler (``SamplerConfig.cache``)."""
HEAD_ROWS = 1024
"""The most hidden rows one LM-head call of logit budgeting takes (dLLM-Serve's chunk)."""


def _bad(name, value, allowed):
    return ValueError(f"SamplerConfig.{name}={value!r} is invalid: {allowed}")


@dataclass(frozen=True)
class SamplerConfig:
    """How a diffusion LM generates.

    Attributes:
      gen_length: tokens generated after the prompt (a multiple of ``block_length``).
      block_length: tokens per semi-autoregressive block (LLaDA/Fast-dLLM: 32).
      steps: denoising steps over the whole generation, spread evenly over the blocks (a multiple of the
        number of blocks, at most ``gen_length``: each step unmasks at least one token).
      temperature: Gumbel-noise temperature of the token choice (0: the most likely token).
      remasking: one of :data:`REMASKING`.
      cache: one of :data:`CACHE_MODES`.
      head_rows: the most rows per LM-head call (logit budgeting).
    """

    gen_length: int = 64
    block_length: int = 32
    steps: int = 64
    temperature: float = 0.0
    remasking: str = "low_confidence"
    cache: str = "dual"
    head_rows: int = HEAD_ROWS

    @property
    def num_blocks(self) -> int:
        return self.gen_length // self.block_length

    @property
    def steps_per_block(self) -> int:
        return self.steps // self.num_blocks

    def validate(self) -> SamplerConfig:
        for name in ("gen_length", "block_length", "steps", "head_rows"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise _bad(name, v, "must be an integer >= 1")
        if self.gen_length % self.block_length:
            raise _bad("gen_length", self.gen_length, f"must be a multiple of block_length={self.block_length}")
        nb = self.num_blocks
        if self.steps % nb or self.steps > self.gen_length:
            raise _bad("steps", self.steps, f"must be a multiple of the number of blocks ({nb} = gen_length "
                                            f"{self.gen_length} / block_length {self.block_length}) and at most "
                                            f"gen_length ({self.gen_length})")
        if not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            raise _bad("temperature", self.temperature, "must be a number >= 0")
        if self.remasking not in REMASKING:
            raise _bad("remasking", self.remasking, f"allowed values are {', '.join(map(repr, REMASKING))}")
        if self.cache not in CACHE_MODES:
            raise _bad("cache", self.cache, f"allowed values are {', '.join(map(repr, CACHE_MODES))}")
        return self


def transfer_counts(masked: np.ndarray | jax.Array, steps: int):
    """LLaDA's schedule: ``[..., steps]`` tokens to unmask at each step of a block holding ``masked [...]`` mask
    tokens: ``masked // steps`` each, the remainder one more on the first steps."""
    xp = jnp if isinstance(masked, jax.Array) else np
    base, rem = masked // steps, masked % steps
    return base[..., None] + (xp.arange(steps) < rem[..., None]).astype(base.dtype)


def pick_tokens(head, h, keys, temperature, *, greedy: bool, random_scores: bool = False, chunk: int = HEAD_ROWS):
    """Logit budgeting: the LM head ``head`` (hidden ``[n, D]`` -> float32 logits ``[n, V]``) over hidden rows
    ``h [N, D]``, ``chunk`` rows at a time, each chunk reduced at once to ``(token [N] int32, confidence [N]
    float32)``: the token is the argmax of the logits (plus ``temperature`` (one, or ``[N]``: one per row) times
    Gumbel noise from row key ``keys[i]`` unless ``greedy``), its confidence the token's softmax probability (or, with ``random_scores``,
    a uniform draw: LLaDA's random remasking)."""
    N, D = h.shape
    temps = jnp.broadcast_to(jnp.asarray(temperature, jnp.float32), (N,))  # one, or one per row

    def one(hc, kc, tc):
        logits = head(hc)
        score = logits
        if not greedy:
            g = jax.vmap(lambda k: jax.random.gumbel(jax.random.fold_in(k, 0), logits.shape[-1:]))(kc)
            score = logits + tc[:, None] * g
        tok = jnp.argmax(score, axis=-1).astype(jnp.int32)
        if random_scores:
            conf = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, 1)))(kc)
        else:
            lse = jax.nn.logsumexp(logits, axis=-1)
            conf = jnp.exp(jnp.take_along_axis(logits, tok[:, None], axis=-1)[:, 0] - lse)
        return tok, conf

    if N <= chunk:
        return one(h, keys, temps)
    n = math.ceil(N / chunk)
    hp = jnp.pad(h, ((0, n * chunk - N), (0, 0))).reshape(n, chunk, D)
    kp = jnp.concatenate([keys, jnp.broadcast_to(keys[:1], (n * chunk - N, *keys.shape[1:]))]).reshape(
        n, chunk, *keys.shape[1:])
    tp = jnp.pad(temps, (0, n * chunk - N)).reshape(n, chunk)
    tok, conf = jax.lax.map(lambda a: one(*a), (hp, kp, tp))
    return tok.reshape(-1)[:N], conf.reshape(-1)[:N]


def select_positions(conf, masked, k):
    """The ``k [B]`` highest-``conf`` positions among ``masked [B, n]`` of each row (ties: the leftmost)."""
    score = jnp.where(masked, conf, -jnp.inf)
    order = jnp.argsort(-score, axis=-1, stable=True)
    rank = jnp.argsort(order, axis=-1, stable=True)
    return masked & (rank < k[:, None])


def step_keys(row_keys, step, n: int):
    """Per-position keys ``[B, n]`` of step ``step`` (``[B]``) from per-row keys ``[B]``."""
    ks = jax.vmap(jax.random.fold_in)(row_keys, step)
    return jax.vmap(lambda k: jax.vmap(lambda i: jax.random.fold_in(k, i))(jnp.arange(n)))(ks)


def unmask_block(head, h, xb, mask_id, k, row_keys, step, temperature, *, greedy, random_scores, chunk):
    """One denoising step of a block: hidden states ``h [B, n, D]`` of its positions, its tokens ``xb [B, n]``,
    ``k [B]`` tokens to unmask; returns the block's new tokens."""
    B, n, D = h.shape
    masked = xb == mask_id
    keys = step_keys(row_keys, step, n).reshape(B * n, -1)
    tok, conf = pick_tokens(head, h.reshape(B * n, D), keys, temperature, greedy=greedy,
                            random_scores=random_scores, chunk=chunk)
    sel = select_positions(conf.reshape(B, n), masked, k)
    return jnp.where(sel, tok.reshape(B, n), xb)


def _forward(model, x, pos, valid, layer_states, *, cache=None, cache_index=None):
    """Hidden states of ``x`` (``return_hidden``), with a KV cache when given."""
    return model(x, positions=pos, attention_mask=valid, cache=cache, cache_index=cache_index, return_hidden=True,
                 layer_states=layer_states)


@partial(jax.jit, static_argnames=("gdef", "bl", "mode", "greedy", "random_scores", "chunk"), donate_argnums=(5,))
def _refresh(gdef, state, layer_states, x, valid, cache, start, k, row_keys, step, temperature, *, bl, mode, greedy,
             random_scores, chunk):
    """A refresh step: the whole canvas (keys/values cached unless ``mode == "none"``), then the block's unmasking."""
    model = nnx.merge(gdef, state)
    pos = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0).astype(jnp.int32)
    if mode == "none":
        out = _forward(model, x, pos, valid, layer_states)
    else:
        out = _forward(model, x, pos, valid, layer_states, cache=jax.tree.map(jnp.zeros_like, cache), cache_index=0)
        cache = out.cache
    h = jax.lax.dynamic_slice_in_dim(out.logits, start, bl, axis=1)
    xb = jax.lax.dynamic_slice_in_dim(x, start, bl, axis=1)
    xb = unmask_block(model.head, h, xb, model.cfg.mask_token_id, k, row_keys, step, temperature, greedy=greedy,
                      random_scores=random_scores, chunk=chunk)
    return jax.lax.dynamic_update_slice_in_dim(x, xb, start, axis=1), cache


@partial(jax.jit, static_argnames=("gdef", "bl", "n_q", "greedy", "random_scores", "chunk"))
def _reuse(gdef, state, layer_states, x, valid, cache, start, k, row_keys, step, temperature, *, bl, n_q, greedy,
           random_scores, chunk):
    """A reuse step over the cache of the block's refresh: the ``n_q`` columns from ``start`` (the block for
    ``dual``; the block and everything after it for ``prefix``) attend to the cached keys/values of the other
    columns and their own fresh ones. The cache is not updated."""
    model = nnx.merge(gdef, state)
    pos = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0).astype(jnp.int32)

    def cols(a):
        return jax.lax.dynamic_slice_in_dim(a, start, n_q, axis=1)

    out = _forward(model, cols(x), cols(pos), cols(valid), layer_states, cache=cache, cache_index=start)
    xb = unmask_block(model.head, out.logits[:, :bl], jax.lax.dynamic_slice_in_dim(x, start, bl, axis=1),
                      model.cfg.mask_token_id, k, row_keys, step, temperature, greedy=greedy,
                      random_scores=random_scores, chunk=chunk)
    return jax.lax.dynamic_update_slice_in_dim(x, xb, start, axis=1)


@dataclass
class SampleResult:
    """What :func:`denoise` / :meth:`DiffusionSampler.generate` returns."""

    canvas: np.ndarray     # [B, L] the denoised canvas (prompt left-padded, then the region)
    region: tuple[int, int]  # (start, stop) columns of the denoised region
    nfe: int               # model forwards (steps), refresh steps included
    refreshes: int         # steps that ran the whole canvas

    @property
    def tokens(self) -> np.ndarray:
        """``[B, region length]``: the denoised region."""
        return self.canvas[:, self.region[0]:self.region[1]]

    def as_lists(self, eos_id: int | None = None) -> list[list[int]]:
        """Each row's region, cut after its first ``eos_id`` (kept) when given."""
        out = []
        for row in self.tokens.tolist():
            if eos_id is not None and eos_id in row:
                row = row[:row.index(eos_id) + 1]
            out.append(row)
        return out


class DiffusionSampler:
    """Generation and infilling with a diffusion LM (``ModelConfig.causal=False``).

    ``layer_loop`` as in :func:`moejax.models.generate.generate` (``auto``: per-layer weights on CPU).
    Compiled steps are cached per canvas shape and sampler settings.
    """

    def __init__(self, model, layer_loop: str = "auto"):
        cfg = model.cfg
        if cfg.causal:
            raise ValueError("DiffusionSampler needs a diffusion LM (ModelConfig.causal=False); an autoregressive "
                             "model generates with moejax.models.generate.generate or the serving engine")
        self.model, self.cfg = model, cfg
        self.gdef, self.state = nnx.split(model)
        self.layer_states = unstack_layers(model) if resolve_layer_loop(layer_loop) == "unroll" else None

    def denoise(self, canvas, valid, region: tuple[int, int], sc: SamplerConfig, row_keys) -> SampleResult:
        """Denoise the mask tokens of ``canvas [B, L]`` in the columns ``region = (start, stop)`` (a whole number of
        ``sc.block_length`` blocks; tokens that are not masks stay), blocks left to right. ``valid [B, L]``: real
        tokens (0: left padding). ``row_keys [B]``: each row's PRNG key."""
        sc.validate()
        x = jnp.asarray(canvas, jnp.int32)
        valid = jnp.asarray(valid, jnp.int32)
        B, L = x.shape
        start, stop = region
        bl, spb = sc.block_length, sc.steps_per_block
        if (stop - start) % bl or not 0 <= start < stop <= L:
            raise ValueError(f"region {region} must lie in the canvas [0, {L}) and hold whole blocks of {bl}")
        if L > self.cfg.max_seq_len:
            raise ValueError(f"canvas length {L} exceeds ModelConfig.max_seq_len={self.cfg.max_seq_len}")
        mode, greedy = sc.cache, sc.temperature == 0
        statics = {"bl": bl, "mode": mode, "greedy": greedy, "random_scores": sc.remasking == "random",
                   "chunk": sc.head_rows}
        cache = None if mode == "none" else self.model.init_cache(B, L, per_layer=self.layer_states is not None)
        temp = jnp.float32(sc.temperature)
        mask_id = self.cfg.mask_token_id
        nfe = refreshes = 0
        for b0 in range(start, stop, bl):
            counts = transfer_counts(np.asarray(x[:, b0:b0 + bl] == mask_id).sum(1), spb)
            for s in range(spb):
                k = jnp.asarray(counts[:, s], jnp.int32)
                step = jnp.full((B,), nfe, jnp.int32)
                if s == 0 or mode == "none":
                    x, cache = _refresh(self.gdef, self.state, self.layer_states, x, valid, cache, jnp.int32(b0), k,
                                        row_keys, step, temp, **statics)
                    refreshes += 1
                else:
                    x = _reuse(self.gdef, self.state, self.layer_states, x, valid, cache, jnp.int32(b0), k, row_keys,
                               step, temp, n_q=bl if mode == "dual" else L - b0,
                               **{k_: v for k_, v in statics.items() if k_ != "mode"})
                nfe += 1
        return SampleResult(np.asarray(x), (start, stop), nfe, refreshes)

    def generate(self, prompts: Sequence[Sequence[int]], sc: SamplerConfig | None = None, *, seed: int | Sequence[int] = 0,
                 prompt_bucket: int = 16) -> SampleResult:
        """Generate ``sc.gen_length`` tokens after each prompt (token-id lists of any lengths, left-padded to a
        multiple-of-two bucket of at least ``prompt_bucket``). ``seed``: one for the batch (row ``b`` then uses
        ``fold_in(PRNGKey(seed), b)``) or one per row."""
        sc = (sc or SamplerConfig()).validate()
        prompts = [list(map(int, p)) for p in prompts]
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        V = self.cfg.vocab_size
        bad = [t for p in prompts for t in p if not 0 <= t < V]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary [0, {V})")
        longest = max(map(len, prompts))
        P = pow2_bucket(longest, prompt_bucket)
        if P + sc.gen_length > self.cfg.max_seq_len:
            P = longest
        if P + sc.gen_length > self.cfg.max_seq_len:
            raise ValueError(f"prompt ({longest}) + gen_length ({sc.gen_length}) exceeds ModelConfig.max_seq_len="
                             f"{self.cfg.max_seq_len}")
        B = len(prompts)
        canvas = np.full((B, P + sc.gen_length), self.cfg.mask_token_id, np.int32)
        valid = np.ones_like(canvas)
        for b, p in enumerate(prompts):
            canvas[b, :P - len(p)] = 0
            valid[b, :P - len(p)] = 0
            canvas[b, P - len(p):P] = p
        return self.denoise(canvas, valid, (P, P + sc.gen_length), sc, row_keys(seed, B))


def row_keys(seed: int | Sequence[int], batch: int):
    """Per-row PRNG keys ``[batch]``: ``fold_in(PRNGKey(seed), b)`` for one seed, ``PRNGKey(seed_b)`` for a list."""
    if isinstance(seed, (int, np.integer)):
        return jax.vmap(lambda b: jax.random.fold_in(jax.random.PRNGKey(int(seed)), b))(jnp.arange(batch))
    seeds = list(seed)
    if len(seeds) != batch:
        raise ValueError(f"{len(seeds)} seeds for {batch} rows")
    return jnp.stack([jax.random.PRNGKey(int(s)) for s in seeds])
