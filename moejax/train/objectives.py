"""Training objectives: what the trainer minimizes, as a function of the model and a batch.

An objective takes the model, a batch of packed sequences (``tokens``, ``segment_ids``, ``positions``, each
``[B, S + 1]``) and the step's router randomness, and returns an :class:`ObjectiveOutput`: the main forward's
:class:`~moejax.models.transformer.ModelOutput` (its ``aux`` carries the MoE statistics the trainer turns into
the aux losses and the router-bias update) and named loss *terms*, each a summed loss, the count it is a sum
over and a weight. The trainer divides each sum by its count (summed over data shards) and adds ``weight *
mean`` to the loss; each mean is also logged under its name (``ce`` is next-token cross-entropy).

Objectives (:data:`OBJECTIVES`, ``TrainConfig.objective``):

* ``next_token``: cross-entropy of each next token.
* ``mtp``: ``next_token`` plus DeepSeek-V3's multi-token prediction: module ``k`` of ``ModelConfig.mtp_depth``
  predicts the token ``k + 1`` ahead; the terms ``mtp_ce_k`` are added with weight
  ``TrainConfig.mtp_weight / mtp_depth`` each (DeepSeek's lambda / D). With ``TrainConfig.train_only="mtp"``
  (MTP modules on a frozen trained model) the main forward is a constant: its ``ce`` is logged with weight 0
  and no gradient flows into it.
* ``mdm``: LLaDA's masked-diffusion loss, for a bidirectional model (``ModelConfig.causal=False``): each
  sequence draws a masking ratio ``t ~ U(TrainConfig.mdm_eps, 1]``, each of its tokens is replaced by
  ``ModelConfig.mask_token_id`` with probability ``t`` (:func:`mdm_noise`), and the term ``ce`` is the
  cross-entropy of the masked tokens weighted ``1 / t``, summed and divided by the number of tokens (LLaDA's
  estimator of the negative ELBO per token). :func:`elbo_sums` is its Monte-Carlo evaluation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from moejax.config import OBJECTIVES
from moejax.train import data as data_lib


class ObjectiveOutput(NamedTuple):
    out: object     # the main forward's ModelOutput
    terms: dict     # name -> (summed loss, count, weight)
    extra_aux: list  # aux dicts of further MoE layers (MTP blocks) whose aux losses the trainer adds


def token_ce(logits, targets, valid=None):
    """Summed cross-entropy (nats) of ``targets`` under ``logits`` over valid, non-pad targets, and their count."""
    ok = targets != data_lib.PAD
    if valid is not None:
        ok = ok & valid
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(ok, targets, 0))
    return jnp.sum(ce * ok), jnp.sum(ok)


def split_batch(batch):
    """Next-token prediction: inputs are tokens[:, :-1], targets tokens[:, 1:]."""
    inp = {"tokens": batch["tokens"][:, :-1], "segment_ids": batch["segment_ids"][:, :-1],
           "positions": batch["positions"][:, :-1]}
    return inp, batch["tokens"][:, 1:]


def _main(model, batch, *, rng, token_index, return_hidden):
    inp, tgt = split_batch(batch)
    out = model(inp["tokens"], segment_ids=inp["segment_ids"], positions=inp["positions"], token_index=token_index,
                rng=rng, train=True, return_hidden=return_hidden)
    return inp, tgt, out


def next_token(model, batch, *, rng=None, token_index=None, tc=None) -> ObjectiveOutput:
    _inp, tgt, out = _main(model, batch, rng=rng, token_index=token_index, return_hidden=False)
    return ObjectiveOutput(out, {"ce": (*token_ce(out.logits, tgt), 1.0)}, [])


def mtp(model, batch, *, rng=None, token_index=None, tc=None) -> ObjectiveOutput:
    K = model.cfg.mtp_depth
    if K < 1:
        raise ValueError("TrainConfig.objective='mtp' needs ModelConfig.mtp_depth >= 1 (moejax train --mtp K)")
    frozen = tc is not None and tc.train_only == "mtp"
    inp, tgt, out = _main(model, batch, rng=rng, token_index=token_index, return_hidden=True)
    h = out.logits
    if frozen:
        h = jax.lax.stop_gradient(h)
    logits = model.head(h)
    terms = {"ce": (*token_ce(jax.lax.stop_gradient(logits) if frozen else logits, tgt), 0.0 if frozen else 1.0)}
    seg = batch["segment_ids"]
    S = tgt.shape[1]
    weight = (tc.mtp_weight if tc is not None else 0.3) / K
    extra = []
    for k, (x, aux) in enumerate(model.mtp_forward(h, inp["tokens"], inp["positions"], segment_ids=inp["segment_ids"],
                                                   rng=rng, train=True), start=1):
        # module k at position i predicts token i + k + 1 of the batch row: same document only
        t = jnp.pad(batch["tokens"][:, k + 1:], ((0, 0), (0, k)), constant_values=data_lib.PAD)[:, :S]
        same = jnp.pad(seg[:, k + 1:] == seg[:, :-(k + 1)], ((0, 0), (0, k)))[:, :S]
        terms[f"mtp_ce_{k}"] = (*token_ce(model.mtp_logits(k - 1, x), t, same), weight)
        if aux:
            extra.append(aux)
    return ObjectiveOutput(out._replace(logits=logits), terms, extra)


MDM_SALT = 0x6D646D  # folded into the step key for the masking draws (the routers fold in layer ids)


def mdm_noise(key, rows, seq: int, eps: float, t=None):
    """LLaDA's forward process for sequences of ``seq`` tokens: ``(t [R], masked [R, seq])``.

    ``rows [R]``: each sequence's global row index (its draws depend on the key and the row only, so a batch
    sharded over devices or split into micro-batches masks each sequence as the whole batch would).
    ``t``: given ratios ``[R]`` (otherwise ``t ~ U(eps, 1]`` per row).
    """
    keys = jax.vmap(lambda r: jax.random.fold_in(key, r))(rows)
    if t is None:
        t = eps + (1.0 - eps) * (1.0 - jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, 1)))(keys))
    u = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, 2), (seq,)))(keys)
    return t, u < t[:, None]


def mdm_term(model, tokens, segment_ids, positions, t, masked, **kw):
    """The summed ``1/t``-weighted cross-entropy of the masked tokens of ``tokens [B, S]`` (PAD never masked) and
    the number of non-pad tokens: ``(sum, count, ModelOutput)``."""
    masked = masked & (tokens != data_lib.PAD)
    noisy = jnp.where(masked, model.cfg.mask_token_id, tokens)
    out = model(noisy, segment_ids=segment_ids, positions=positions, **kw)
    ce = optax.softmax_cross_entropy_with_integer_labels(out.logits, jnp.where(masked, tokens, 0))
    total = jnp.sum(jnp.where(masked, ce / t[:, None], 0.0))
    return total, jnp.sum(tokens != data_lib.PAD), out


def _mdm_inputs(batch):
    """The ``S`` input tokens of a ``[B, S + 1]`` batch (the same shapes as next-token training)."""
    return batch["tokens"][:, :-1], batch["segment_ids"][:, :-1], batch["positions"][:, :-1]


def mdm(model, batch, *, rng=None, token_index=None, tc=None) -> ObjectiveOutput:
    if model.cfg.causal:
        raise ValueError("TrainConfig.objective='mdm' trains a diffusion LM: it needs ModelConfig.causal=False "
                         "(moejax train --objective mdm sets it)")
    tokens, seg, pos = _mdm_inputs(batch)
    B, S = tokens.shape
    rows = jnp.arange(B, dtype=jnp.int32) if token_index is None else token_index[:, 0] // S
    key = jax.random.fold_in(jax.random.PRNGKey(0) if rng is None else rng, MDM_SALT)
    t, masked = mdm_noise(key, rows, S, tc.mdm_eps if tc is not None else 1e-3)
    total, count, out = mdm_term(model, tokens, seg, pos, t, masked, token_index=token_index, rng=rng, train=True)
    return ObjectiveOutput(out, {"ce": (total, count, 1.0)}, [])


def elbo_sums(model, batch, key, samples: int = 1, eps: float = 1e-3):
    """Monte-Carlo negative ELBO of a diffusion LM on a ``[B, S + 1]`` batch: ``(summed nats, byte tokens)``.

    Each sequence gets ``samples`` masking draws with stratified ratios ``t = eps + (1 - eps) (j + u) / samples``
    (``u`` per row and draw, ``j`` the draw): an unbiased estimate of LLaDA's bound with less variance than
    independent draws. Divide by the byte count and ln 2 for bits/byte (the next-token evaluation's unit: the
    EOS tokens' terms count, the bytes are the denominator)."""
    tokens, seg, pos = _mdm_inputs(batch)
    B, S = tokens.shape
    rows = jnp.arange(B, dtype=jnp.int32)
    total = 0.0
    for j in range(samples):
        kj = jax.random.fold_in(key, j)
        u = jax.random.uniform(jax.random.fold_in(kj, 7), (B,))
        t = eps + (1.0 - eps) * (j + u) / samples
        t, masked = mdm_noise(kj, rows, S, eps, t=t)
        s, _, _ = mdm_term(model, tokens, seg, pos, t, masked)
        total = total + s
    return total / samples, jnp.sum(tokens < 256)


_REGISTRY: dict[str, Callable[..., ObjectiveOutput]] = {"next_token": next_token, "mtp": mtp, "mdm": mdm}


def get_objective(name: str) -> Callable[..., ObjectiveOutput]:
    """The objective function of ``TrainConfig.objective``."""
    if name not in _REGISTRY:
        raise ValueError(f"TrainConfig.objective={name!r}; allowed: {', '.join(map(repr, OBJECTIVES))}")
    return _REGISTRY[name]
