"""Evaluating a diffusion LM beyond its ELBO: infill accuracy on held-out code.

A window of held-out text (one document, no boundary inside) gets a span of ``span`` tokens replaced by mask
tokens, with context on both sides; the sampler fills the span (bidirectional context: the suffix is visible)
and the accuracy is the share of the span's tokens it restores exactly. The ELBO in bits/byte is the trainer's
validation metric (:func:`moejax.train.objectives.elbo_sums`).
"""

from __future__ import annotations

import dataclasses

import numpy as np
from tqdm import tqdm

from moejax.diffusion.sampler import DiffusionSampler, SamplerConfig, row_keys


def single_document_windows(stream, length: int, count: int) -> np.ndarray:
    """Up to ``count`` windows ``[n, length]`` of a :class:`moejax.train.data.TokenStream` (in order) that lie
    inside one document (no EOS, no padding: one segment id)."""
    out = []
    for i in range(stream.num_sequences(length)):
        r = stream.sequence(i, length)
        if (r["segment_ids"] == r["segment_ids"][0]).all() and r["segment_ids"][0] != 0 and (r["tokens"] < 256).all():
            out.append(r["tokens"])
            if len(out) == count:
                break
    return np.stack(out).astype(np.int32) if out else np.zeros((0, length), np.int32)


def infill_accuracy(sampler: DiffusionSampler, windows: np.ndarray, *, span: int, sc: SamplerConfig,
                    batch: int = 16, seed: int = 0, progress: bool = False) -> dict:
    """Mask a span of ``span`` tokens in each window and fill it with ``sampler``; returns the accuracy over
    every masked token, the number of masked tokens, the share of spans restored exactly, and the settings.

    ``sc`` gives the block length, steps per block (``sc.steps / sc.num_blocks``), cache and remasking; its
    ``gen_length`` is replaced by ``span``, with ``steps`` scaled to keep the steps per block. Each batch masks
    the same columns (one region per sampler call), drawn per batch from ``seed``: the span starts at least a
    quarter of the window in and ends at least an eighth before its end."""
    n, L = windows.shape
    if span % sc.block_length:
        raise ValueError(f"span={span} must be a multiple of block_length={sc.block_length}")
    lo, hi = L // 4, L - span - L // 8
    if hi < lo:
        raise ValueError(f"windows of {L} tokens are too short for a span of {span} with context on both sides")
    spb = sc.validate().steps_per_block
    isc = dataclasses.replace(sc, gen_length=span, steps=spb * span // sc.block_length).validate()
    mask_id = sampler.cfg.mask_token_id
    rng = np.random.default_rng(seed)
    right = total = exact = 0
    for b0 in tqdm(range(0, n, batch), desc="infill", disable=not progress):
        rows = windows[b0:b0 + batch]
        s = int(rng.integers(lo, hi + 1))
        canvas = rows.copy()
        canvas[:, s:s + span] = mask_id
        res = sampler.denoise(canvas, np.ones_like(canvas), (s, s + span), isc,
                              row_keys([seed * 1_000_003 + b0 + i for i in range(len(rows))], len(rows)))
        hit = res.tokens == rows[:, s:s + span]
        right += int(hit.sum())
        total += hit.size
        exact += int(hit.all(1).sum())
    return {"accuracy": right / max(total, 1), "masked_tokens": total, "spans": n,
            "exact_spans": exact / max(n, 1), "span": span, "window": L, "block_length": sc.block_length,
            "steps_per_block": spb, "cache": sc.cache, "remasking": sc.remasking}


def engine_infill_accuracy(engine, windows: np.ndarray, *, span: int, seed: int = 0, progress: bool = False) -> dict:
    """Infill accuracy through a :class:`~moejax.diffusion.engine.DiffusionEngine` (so with its attention: e.g.
    head-centric sparse attention): each window's span (at a start drawn per window from ``seed``, at least a
    quarter in and an eighth before the end) becomes a request ``prompt = prefix, max_tokens = span, suffix =
    the rest``, greedy; all requests are queued at once. Returns the accuracy over the masked tokens, their
    number and the share of spans restored exactly."""
    from moejax.serve.engine import SamplingParams

    n, L = windows.shape
    lo, hi = L // 4, L - span - L // 8
    if hi < lo:
        raise ValueError(f"windows of {L} tokens are too short for a span of {span} with context on both sides")
    rng = np.random.default_rng(seed)
    starts = rng.integers(lo, hi + 1, n)
    ids = {}
    for i, (w, s) in enumerate(zip(windows, starts)):
        rid = engine.add_request(w[:s].tolist(), SamplingParams(max_tokens=span, temperature=0.0, seed=seed + i),
                                 suffix=w[s + span:].tolist())
        ids[rid] = i
    got: dict[int, list[int]] = {i: [] for i in range(n)}
    finished = 0
    bar = tqdm(total=n, desc="infill (engine)", disable=not progress)
    while finished < n:
        for o in engine.step():
            if o.request_id in ids:
                got[ids[o.request_id]] += o.new_tokens
                if o.finished:
                    finished += 1
                    bar.update(1)
    bar.close()
    right = exact = 0
    for i, (w, s) in enumerate(zip(windows, starts)):
        hit = np.asarray(got[i]) == w[s:s + span]
        right += int(hit.sum())
        exact += int(hit.all())
    return {"accuracy": right / (n * span), "masked_tokens": n * span, "spans": n, "exact_spans": exact / n,
            "span": span, "window": L}
