"""Multiply-accumulates of a training step, per GEMM kind, dense against N:M sparse.

A step runs three kinds of GEMM per projection weight ``W``: the forward ``Y = X W``, the activation gradient
``dX = dY W^T`` and the weight gradient ``dW = X^T dY``. N:M sparsity saves MACs in a GEMM only where the mask is
N:M along *that* GEMM's reduction axis (a kernel skips the zeros of each group of M it reduces over):

======================  ===========  ==================  ===============
method                  forward      activation grad.    weight grad.
======================  ===========  ==================  ===============
``srste``               n/m          1 (mask along the   1
                                     wrong axis)
``bdwp``                n/m          n/m (second mask)   1
``transposable``        n/m          n/m                 1
``dense``               1            1                   1
======================  ===========  ==================  ===============

Counted per token: attention q/k/v/o projections, the attention core (``Q K^T`` and ``P V`` over the average
causal context; backward twice the forward; never sparse), dense and shared MLPs, routed experts at the
router's effective top-k, the router and the LM head (never sparse). Embedding lookups are not GEMMs. The
implied training speedup is dense MACs / sparse MACs: it assumes step time proportional to MACs, with N:M GEMMs
at ``n/m`` of their dense time (sparse tensor cores or an accelerator like BDWP's) and the rest of the step
(norms, softmax, routing, the optimizer) free; this machine's XLA:CPU runs the masked weights densely, so on
CPU the measured step is no faster (the masks add a little work).
"""

from __future__ import annotations

from moejax.config import ModelConfig, SparsityConfig

GEMM_KINDS = ("forward", "act_grad", "weight_grad")


def _saving(sc: SparsityConfig | None, site: str, kind: str) -> float:
    """Fraction of a GEMM's MACs that remain under ``sc`` at ``site``."""
    if sc is None or sc.method == "dense" or site not in sc.layers or kind == "weight_grad":
        return 1.0
    if kind == "act_grad" and sc.method == "srste":
        return 1.0
    return sc.n / sc.m


def token_macs(cfg: ModelConfig, seq_len: int) -> dict[str, float]:
    """Forward MACs per token by site (``attention``, ``mlp``, ``experts``: weight GEMMs that sparsity can
    cover; ``attention_core``, ``router``, ``head``: dense always)."""
    D, hd = cfg.d_model, cfg.resolved_head_dim
    H, KV = cfg.n_heads, cfg.n_kv_heads
    kinds = cfg.layer_kinds()
    n_moe = sum(k == "moe" for k in kinds)
    n_dense = len(kinds) - n_moe
    ctx = (seq_len + 1) / 2  # average causal context
    out = {"attention": len(kinds) * D * hd * (2 * H + 2 * KV), "attention_core": len(kinds) * 2 * H * hd * ctx,
           "mlp": n_dense * 3 * D * cfg.d_ff, "experts": 0.0, "router": 0.0, "head": D * cfg.vocab_size}
    if cfg.moe is not None and n_moe:
        m = cfg.moe
        out["experts"] = n_moe * m.router.effective_top_k * 3 * D * m.d_ff
        out["mlp"] += n_moe * 3 * D * m.num_shared_experts * (m.shared_d_ff or m.d_ff)
        out["router"] = n_moe * D * m.num_experts
    return {k: float(v) for k, v in out.items()}


def step_macs(cfg: ModelConfig, sc: SparsityConfig | None, *, tokens: int, seq_len: int) -> dict:
    """MACs of one training step over ``tokens`` tokens of sequences of ``seq_len``: ``{"dense": {kind: MACs},
    "sparse": {kind: MACs}, "by_site": ..., "implied_speedup": dense total / sparse total}``."""
    per = token_macs(cfg, seq_len)
    dense = dict.fromkeys(GEMM_KINDS, 0.0)
    sparse = dict.fromkeys(GEMM_KINDS, 0.0)
    by_site = {}
    for site, f in per.items():
        weight_gemm = site != "attention_core"
        counts = {"forward": f, "act_grad": 2 * f if not weight_gemm else f, "weight_grad": f if weight_gemm else 0.0}
        row = {}
        for kind, c in counts.items():
            c *= tokens
            s = c * _saving(sc, site, kind) if weight_gemm else c
            dense[kind] += c
            sparse[kind] += s
            row[kind] = {"dense": c, "sparse": s}
        by_site[site] = row
    total_d, total_s = sum(dense.values()), sum(sparse.values())
    return {"dense": dense, "sparse": sparse, "by_site": by_site, "dense_total": total_d, "sparse_total": total_s,
            "implied_speedup": total_d / total_s}
