"""Frozen, validated configuration dataclasses and named presets.

Every config is an immutable dataclass whose fields are documented in its docstring. ``validate()`` raises
``ValueError`` naming the bad field and what is allowed; constructors do not validate so that presets can be
built incrementally with :func:`dataclasses.replace` -- call ``validate()`` (``ModelConfig.validate`` checks
the nested configs too) before use. Configs round-trip through JSON or YAML with :func:`save_config` /
:func:`load_config`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

ROUTER_TYPES = ("topk", "switch", "gshard", "sigmoid", "xmoe", "expert_choice")  # routers of SwiGLU experts
PRODUCT_ROUTER_TYPES = ("cartesian",)  # routers of atomic experts (OmniMoE): N = n^2, O(sqrt(N)) per token
ALL_ROUTER_TYPES = ROUTER_TYPES + PRODUCT_ROUTER_TYPES
EXPERT_TYPES = ("swiglu", "atomic")
ATOMIC_IMPLS = ("auto", "expert_centric", "token_centric", "pallas")
DISPATCH_TYPES = ("dropless", "capacity")
GSHARD_SECOND_POLICIES = ("random", "all", "sampling")
GROUPED_IMPLS = ("auto", "tiles", "ragged_dot", "dense", "gather", "pallas")
DTYPES = ("float32", "bfloat16")
# ModelConfig.remat -> jax.checkpoint policy of each scanned layer (moejax.models.transformer.remat_policy)
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "save_dots")

# Byte-level vocabulary of moejax's own models (moejax.train.data tokenizes corpora with it and
# moejax.serve.tokenizer.ByteTokenizer serves it): token b < 256 is the byte b, then two specials.
EOS = 256          # end of document: ends every training document; generation stops at it
PAD = 257          # padding of batch rows (not a training target)
BYTE_VOCAB = 258   # the smallest vocab_size of a byte-level model
MASK = 258         # the mask token of byte-level diffusion LMs (ModelConfig.mask_token_id's default; needs
                   # vocab_size > 258, as every byte-level preset has)


def _err(cls: str, name: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"{cls}.{name}={value!r} is invalid: {allowed}")


EP_A2A_MODES = ("fixed", "ragged", "auto", "ragged_emulated")
"""Expert-parallel exchange modes (``TrainConfig.ep_a2a``, ``moejax.parallel.expert_parallel.A2A_MODES``)."""


def _check_choice(cls: str, name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise _err(cls, name, value, f"allowed values are {', '.join(map(repr, choices))}")


def _check_int(cls: str, name: str, value: Any, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise _err(cls, name, value, f"must be an integer >= {minimum}")


def _check_float(cls: str, name: str, value: Any, minimum: float | None = None,
                 strict: bool = False) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise _err(cls, name, value, "must be a number")
    if minimum is not None and (value < minimum or (strict and value == minimum)):
        raise _err(cls, name, value, f"must be {'>' if strict else '>='} {minimum}")


@dataclass(frozen=True)
class RouterConfig:
    """How tokens choose experts.

    Attributes:
      type: one of ``ALL_ROUTER_TYPES``.
        ``topk``: softmax over all experts, top-k, optionally renormalized over the k chosen (Mixtral:
        ``normalize=True``, which equals a softmax over the top-k logits; Qwen2/Qwen3-MoE:
        ``normalize`` from ``norm_topk_prob``).
        ``switch``: top-1 with the softmax probability as weight (Switch Transformer), optional jitter.
        ``gshard``: top-2; the second expert is kept with probability ``min(1, 2 * g2)`` (``second_policy``).
        ``sigmoid``: DeepSeek-V3 sigmoid scores, selection on score + a non-trainable bias updated
        aux-loss-free from expert load (:func:`moejax.nn.routers.aux_free_bias_update`), optional group-limited
        selection, weights renormalized and scaled by ``scaling_factor``.
        ``xmoe``: X-MoE: low-rank projection to ``xmoe_dim``, L2-normalized cosine similarity to L2-normalized
        expert embeddings divided by a learnable temperature, softmax, top-k.
        ``expert_choice``: every expert takes its top-``capacity`` tokens of a routing group (capacity
        dispatch only; ``top_k`` is ignored, the average number of experts per token is ``capacity_factor``).
        ``cartesian`` (``MoEConfig.expert_type="atomic"`` only): OmniMoE's Cartesian product router over
        ``N = n^2`` atomic experts: two heads ``Linear(d, n)`` with affine-free batch norm and log_softmax,
        the exact top-k of the pair sums ``logp1[i] + logp2[j]``, weights ``exp(score)``
        (:class:`moejax.nn.routers.CartesianRouter`).
      top_k: experts per token (``switch`` forces 1, ``gshard`` forces 2).
      normalize: renormalize the chosen experts' weights to sum to one.
      group_size: tokens per routing group. Batch-dependent statistics (capacity, Expert Choice, aux losses,
        loads) are computed per group. ``None``: the tokens of one layer call form one group (under expert
        parallelism: one group per device).
      jitter: ``switch``: multiplicative input jitter ``U(1-eps, 1+eps)`` in training (0 disables).
      second_policy: ``gshard``: ``random`` keeps expert 2 with probability ``min(1, 2*g2)`` (GShard),
        ``all`` always keeps it, ``sampling`` picks expert 2 by Gumbel-perturbed logits.
      scaling_factor: ``sigmoid``: routed-expert weight scale (DeepSeek ``routed_scaling_factor``).
      n_groups, topk_groups: ``sigmoid``: group-limited routing (experts split into ``n_groups``; only the
        ``topk_groups`` best groups, by the sum of their top-2 scores, are eligible). 1/1 disables it.
      bias_update_rate: ``sigmoid``: aux-loss-free bias step ``gamma``.
      xmoe_dim: ``xmoe``: low-rank routing dimension.
      xmoe_init_temperature: ``xmoe``: initial temperature (learnable).
    """

    type: str = "topk"
    top_k: int = 2
    normalize: bool = True
    group_size: int | None = None
    jitter: float = 0.0
    second_policy: str = "random"
    scaling_factor: float = 1.0
    n_groups: int = 1
    topk_groups: int = 1
    bias_update_rate: float = 1e-3
    xmoe_dim: int = 16
    xmoe_init_temperature: float = 0.07

    @property
    def effective_top_k(self) -> int:
        return {"switch": 1, "gshard": 2}.get(self.type, self.top_k)

    def validate(self, num_experts: int | None = None) -> RouterConfig:
        c = "RouterConfig"
        _check_choice(c, "type", self.type, ALL_ROUTER_TYPES)
        _check_int(c, "top_k", self.top_k)
        if num_experts is not None and self.type == "cartesian" and math.isqrt(num_experts) ** 2 != num_experts:
            raise _err(c, "type", self.type, f"'cartesian' needs num_experts = n^2 (got {num_experts})")
        if num_experts is not None and self.type != "expert_choice" and self.effective_top_k > num_experts:
            raise _err(c, "top_k", self.effective_top_k, f"must be <= num_experts ({num_experts})")
        if self.group_size is not None:
            _check_int(c, "group_size", self.group_size)
        _check_float(c, "jitter", self.jitter, 0.0)
        if self.jitter >= 1:
            raise _err(c, "jitter", self.jitter, "must be in [0, 1)")
        _check_choice(c, "second_policy", self.second_policy, GSHARD_SECOND_POLICIES)
        _check_float(c, "scaling_factor", self.scaling_factor, 0.0, strict=True)
        _check_int(c, "n_groups", self.n_groups)
        _check_int(c, "topk_groups", self.topk_groups)
        if self.topk_groups > self.n_groups:
            raise _err(c, "topk_groups", self.topk_groups, f"must be <= n_groups ({self.n_groups})")
        if num_experts is not None and num_experts % self.n_groups:
            raise _err(c, "n_groups", self.n_groups, f"must divide num_experts ({num_experts})")
        if (num_experts is not None and self.type == "sigmoid" and self.n_groups > 1
                and self.topk_groups * (num_experts // self.n_groups) < self.top_k):
            raise _err(c, "topk_groups", self.topk_groups, "the eligible groups must hold >= top_k experts")
        _check_float(c, "bias_update_rate", self.bias_update_rate, 0.0)
        _check_int(c, "xmoe_dim", self.xmoe_dim)
        _check_float(c, "xmoe_init_temperature", self.xmoe_init_temperature, 0.0, strict=True)
        return self


@dataclass(frozen=True)
class MoEConfig:
    """A mixture-of-experts FFN.

    Attributes:
      num_experts: routed experts.
      d_ff: intermediate size of one routed SwiGLU expert.
      router: see :class:`RouterConfig`.
      dispatch: ``dropless`` (sort tokens by expert, grouped compute, nothing dropped) or ``capacity``
        (fixed per-expert buffers of each routing group, Tutel ``capacity_factor`` semantics).
      capacity_factor: ``capacity`` dispatch (Tutel semantics). ``> 0``: capacity
        ``ceil(cf * group_tokens * top_k / num_experts)``. ``0``: dropless (capacity = group tokens).
        ``< 0``: dynamic capacity ``min(max load, ceil(|cf| * group_tokens * top_k / num_experts))``. Buffers
        are always sized to the bound so shapes stay static under jit; therefore ``cf`` and ``-cf`` drop
        the same tokens and give the same outputs (the dynamic value is reported as ``capacity_used``).
        Overflowing tokens are dropped in priority order (first choices of all tokens before second choices,
        token order within a choice rank), as GShard/Tutel do. For ``expert_choice`` the per-expert
        capacity is ``ceil(|cf| * group_tokens / num_experts)`` (1.0 if ``cf == 0``).
      num_shared_experts: always-on shared experts (DeepSeek style), fused into one SwiGLU of width
        ``num_shared_experts * shared_d_ff``.
      shared_d_ff: intermediate size of one shared expert (defaults to ``d_ff``).
      shared_expert_gate: Qwen2-MoE style ``sigmoid(x @ w_gate)`` scalar gate on the shared expert output.
      aux_loss_coef: weight of the load-balancing loss in the training objective.
      z_loss_coef: weight of the router z-loss.
      grouped_impl: grouped expert compute for dropless dispatch: ``tiles`` (tile loop over sorted tokens,
        each tile one expert; fastest on CPU), ``ragged_dot`` (``jax.lax.ragged_dot``; native on GPU/TPU, a
        dense masked product on CPU), ``dense`` (every expert on every token, weighted by the routing; exact
        dropless semantics, cheapest when ``tokens * num_experts`` is small, e.g. decode steps), ``gather``
        (each token slot on its expert's gathered weights: reads only the routed experts, for a few slots such
        as one decoding sequence), ``pallas``
        (the ``pallas_kernels.gmm`` grouped-matmul kernels over unpadded sorted rows, backward through
        ``gmm``/``tgmm`` too; interpret mode on CPU, so only for tests there), ``auto`` (``gather`` when
        ``4 * tokens * top_k <= num_experts``, ``dense`` when ``tokens * num_experts <= 256``, else ``tiles``
        on CPU and ``ragged_dot`` elsewhere; see :func:`moejax.nn.experts.resolve_grouped_impl`; ``auto`` picks
        ``pallas`` only on a backend listed in ``pallas_kernels.grouped_matmul.VALIDATED_FASTER`` -- where
        the kernel was compiled for real, validated and measured faster -- which is none yet).
      block_rows: row tile of the ``tiles`` implementation; ``None`` picks one from the token count.
      expert_type: ``swiglu`` (routed SwiGLU experts ``[E, D, d_ff]``) or ``atomic`` (OmniMoE: every expert
        one row of ``U`` and of ``V`` ``[N, D]``, ``y = sum_k g_k silu(x . U[e_k]) V[e_k]``, with the
        ``cartesian`` router, dropless; ``d_ff`` is unused; the dense branch is the shared expert).
      atomic_impl: atomic experts' compute (:data:`moejax.nn.experts.ATOMIC_IMPLS`): ``expert_centric``
        (pairs sorted by expert), ``token_centric`` (per-token gathers), ``pallas`` (the expert-centric Pallas
        kernel, :mod:`pallas_kernels.atomic_experts`; interpreted on CPU, so for tests there), ``auto``
        (expert-centric).
    """

    num_experts: int = 8
    d_ff: int = 512
    router: RouterConfig = field(default_factory=RouterConfig)
    dispatch: str = "dropless"
    capacity_factor: float = 1.25
    num_shared_experts: int = 0
    shared_d_ff: int | None = None
    shared_expert_gate: bool = False
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.001
    grouped_impl: str = "auto"
    block_rows: int | None = None
    expert_type: str = "swiglu"
    atomic_impl: str = "auto"

    def validate(self) -> MoEConfig:
        c = "MoEConfig"
        _check_int(c, "num_experts", self.num_experts)
        _check_int(c, "d_ff", self.d_ff)
        _check_choice(c, "dispatch", self.dispatch, DISPATCH_TYPES)
        _check_float(c, "capacity_factor", self.capacity_factor)
        _check_int(c, "num_shared_experts", self.num_shared_experts, 0)
        if self.shared_d_ff is not None:
            _check_int(c, "shared_d_ff", self.shared_d_ff)
        if self.shared_expert_gate and self.num_shared_experts == 0:
            raise _err(c, "shared_expert_gate", True, "needs num_shared_experts >= 1")
        _check_float(c, "aux_loss_coef", self.aux_loss_coef, 0.0)
        _check_float(c, "z_loss_coef", self.z_loss_coef, 0.0)
        _check_choice(c, "grouped_impl", self.grouped_impl, GROUPED_IMPLS)
        if self.block_rows is not None:
            _check_int(c, "block_rows", self.block_rows)
        if not isinstance(self.router, RouterConfig):
            raise _err(c, "router", self.router, "must be a RouterConfig")
        self.router.validate(self.num_experts)
        _check_choice(c, "expert_type", self.expert_type, EXPERT_TYPES)
        _check_choice(c, "atomic_impl", self.atomic_impl, ATOMIC_IMPLS)
        if self.expert_type == "atomic" and self.router.type not in PRODUCT_ROUTER_TYPES:
            raise _err(c, "router.type", self.router.type, f"atomic experts need a product router: "
                       f"{', '.join(map(repr, PRODUCT_ROUTER_TYPES))}")
        if self.expert_type != "atomic" and self.router.type in PRODUCT_ROUTER_TYPES:
            raise _err(c, "expert_type", self.expert_type, f"router type {self.router.type!r} needs "
                       "expert_type='atomic'")
        if self.expert_type == "atomic" and self.dispatch != "dropless":
            raise _err(c, "dispatch", self.dispatch, "atomic experts are dropless only: use 'dropless'")
        if self.router.type == "expert_choice" and self.dispatch != "capacity":
            raise _err(c, "dispatch", self.dispatch,
                       "router type 'expert_choice' is capacity-based only: use dispatch='capacity'")
        return self


MAX_MTP_DEPTH = 4
"""The most multi-token-prediction modules a model may have (``ModelConfig.mtp_depth``)."""


@dataclass(frozen=True)
class ModelConfig:
    """A decoder-only language model with dense or MoE FFNs.

    Attributes:
      vocab_size, d_model, n_layers, n_heads, n_kv_heads: the usual sizes (``n_heads % n_kv_heads == 0``).
      head_dim: per-head size; ``None`` means ``d_model // n_heads``.
      d_ff: intermediate size of dense (non-MoE) SwiGLU FFN layers.
      max_seq_len: longest sequence (prompt + generation) the KV cache and RoPE support.
      rope_theta: RoPE base.
      norm_eps: RMSNorm epsilon.
      qk_norm: RMSNorm on each query/key head before RoPE (Qwen3).
      qkv_bias: bias on the q/k/v projections (Qwen2).
      tie_embeddings: the LM head reuses the token embedding.
      moe: the MoE FFN config, or ``None`` for a dense model.
      moe_every: layer ``i`` is MoE when ``(i + 1) % moe_every == 0`` (HF ``decoder_sparse_step``).
      dense_layers: layer indices that are always dense (HF ``mlp_only_layers``).
      dtype: compute dtype (``float32`` or ``bfloat16``); parameters are stored in ``param_dtype``.
      param_dtype: parameter storage dtype.
      init_std: standard deviation of the normal initializer.
      remat: rematerialization of each layer of the scanned stack in the backward pass (``jax.checkpoint`` of
        the layer with a policy): ``none`` (keep activations), ``full`` (save only the layer's input, recompute
        the whole layer), ``dots`` (keep every matmul output, ``checkpoint_dots``), ``dots_no_batch`` (keep
        matmul outputs without batch dimensions, ``dots_with_no_batch_dims_saveable``: the weight-stationary
        projections, not attention scores or batched expert GEMMs), ``save_dots`` (older name of
        ``dots_no_batch``). Results are identical; only memory and recompute change.
      mtp_depth: multi-token-prediction modules (DeepSeek-V3 style, :class:`moejax.models.transformer.MTPHead`):
        module ``k`` (1-based) predicts the token ``k + 1`` positions ahead from module ``k - 1``'s hidden
        state and the embedding of the token ``k`` ahead. 0 (default): none. Trained with
        ``TrainConfig.objective="mtp"``; they draft tokens for speculative decoding
        (``EngineConfig.speculative="mtp"``). At most :data:`MAX_MTP_DEPTH`.
      causal: ``True`` (default): a left-to-right LM (causal attention within segments). ``False``: a masked
        diffusion LM (LLaDA): attention is bidirectional within segments, the model is trained with
        ``TrainConfig.objective="mdm"`` and generates with :mod:`moejax.diffusion` (its sampler and engine), not
        with ``generate`` or the autoregressive serving engine.
      mask_token_id: the mask token of a diffusion LM (``causal=False``); default :data:`MASK` (258, the first
        id after the byte vocabulary's specials).
    """

    vocab_size: int = 512
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 8
    n_kv_heads: int = 2
    head_dim: int | None = None
    d_ff: int = 512
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    qk_norm: bool = False
    qkv_bias: bool = False
    tie_embeddings: bool = False
    moe: MoEConfig | None = field(default_factory=MoEConfig)
    moe_every: int = 1
    dense_layers: tuple[int, ...] = ()
    dtype: str = "float32"
    param_dtype: str = "float32"
    init_std: float = 0.02
    remat: str = "none"
    mtp_depth: int = 0
    causal: bool = True
    mask_token_id: int = MASK

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

    def is_moe_layer(self, i: int) -> bool:
        return self.moe is not None and i not in self.dense_layers and (i + 1) % self.moe_every == 0

    def layer_kinds(self) -> tuple[str, ...]:
        return tuple("moe" if self.is_moe_layer(i) else "dense" for i in range(self.n_layers))

    def validate(self) -> ModelConfig:
        c = "ModelConfig"
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "max_seq_len",
                     "moe_every"):
            _check_int(c, name, getattr(self, name))
        if self.head_dim is not None:
            _check_int(c, "head_dim", self.head_dim)
        elif self.d_model % self.n_heads:
            raise _err(c, "head_dim", None, f"set it explicitly: d_model ({self.d_model}) is not divisible "
                                            f"by n_heads ({self.n_heads})")
        if self.resolved_head_dim % 2:
            raise _err(c, "head_dim", self.resolved_head_dim, "must be even (RoPE rotates pairs)")
        if self.n_heads % self.n_kv_heads:
            raise _err(c, "n_kv_heads", self.n_kv_heads, f"must divide n_heads ({self.n_heads})")
        _check_float(c, "rope_theta", self.rope_theta, 0.0, strict=True)
        _check_float(c, "norm_eps", self.norm_eps, 0.0, strict=True)
        _check_float(c, "init_std", self.init_std, 0.0, strict=True)
        _check_choice(c, "dtype", self.dtype, DTYPES)
        _check_choice(c, "param_dtype", self.param_dtype, DTYPES)
        _check_choice(c, "remat", self.remat, REMAT_POLICIES)
        _check_int(c, "mtp_depth", self.mtp_depth, 0)
        if self.mtp_depth > MAX_MTP_DEPTH:
            raise _err(c, "mtp_depth", self.mtp_depth, f"must be in [0, {MAX_MTP_DEPTH}]")
        if not isinstance(self.causal, bool):
            raise _err(c, "causal", self.causal, "must be True (autoregressive) or False (masked diffusion)")
        if not self.causal:
            if not (isinstance(self.mask_token_id, int) and 0 <= self.mask_token_id < self.vocab_size):
                raise _err(c, "mask_token_id", self.mask_token_id,
                           f"must be a token id in [0, vocab_size={self.vocab_size}) for a diffusion LM (causal=False)")
            if self.mtp_depth:
                raise _err(c, "mtp_depth", self.mtp_depth, "must be 0 for a diffusion LM (causal=False): "
                                                           "multi-token prediction heads are next-token drafters")
        bad = [i for i in self.dense_layers if not (isinstance(i, int) and 0 <= i < self.n_layers)]
        if bad:
            raise _err(c, "dense_layers", tuple(self.dense_layers), f"indices must be in [0, {self.n_layers})")
        if self.moe is not None:
            if not isinstance(self.moe, MoEConfig):
                raise _err(c, "moe", self.moe, "must be a MoEConfig or None")
            self.moe.validate()
        return self


SPARSITY_METHODS = ("dense", "srste", "bdwp", "transposable")
"""N:M sparse-training methods (``SparsityConfig.method``; :mod:`moejax.sparsity.methods`)."""
SPARSITY_SITES = ("attention", "mlp", "experts")
"""Layer groups N:M sparsity can cover (``SparsityConfig.layers``; router and embeddings stay dense)."""


@dataclass(frozen=True)
class SparsityConfig:
    """N:M sparse training (:mod:`moejax.sparsity`).

    Attributes:
      n, m: ``n`` weights kept in every group of ``m`` consecutive ones (``0 < n <= m``).
      method: one of :data:`SPARSITY_METHODS`: ``dense`` (off), ``srste`` (forward mask along the reduction axis,
        straight-through gradient with the SR-STE decay), ``bdwp`` (bidirectional: a second mask along the
        output axis for the activation-gradient GEMM, dense weight gradient), ``transposable`` (one mask N:M
        along both axes; ``m <= 4``).
      layers: which of :data:`SPARSITY_SITES` are sparse: attention q/k/v/o, the dense and shared SwiGLU MLPs
        (``mlp``), the routed experts (each expert masked on its own).
      srste_decay: SR-STE's lambda_W, the decay on pruned weights added to their gradient (``srste`` only;
        ``aojunzz/NM-sparsity``'s default 2e-4).
    """

    n: int = 2
    m: int = 4
    method: str = "dense"
    layers: tuple[str, ...] = SPARSITY_SITES
    srste_decay: float = 2e-4

    def validate(self) -> SparsityConfig:
        c = "SparsityConfig"
        _check_int(c, "n", self.n)
        _check_int(c, "m", self.m)
        if self.n > self.m:
            raise _err(c, "n", self.n, f"must be <= m ({self.m})")
        _check_choice(c, "method", self.method, SPARSITY_METHODS)
        if not self.layers or not isinstance(self.layers, tuple):
            raise _err(c, "layers", self.layers, f"must be a non-empty tuple of {', '.join(map(repr, SPARSITY_SITES))}")
        for site in self.layers:
            _check_choice(c, "layers", site, SPARSITY_SITES)
        if self.method == "transposable" and self.m > 4:
            raise _err(c, "m", self.m, "transposable masks are offered for m <= 4 (exact block-pattern search)")
        _check_float(c, "srste_decay", self.srste_decay, 0.0)
        return self


OBJECTIVES = ("next_token", "mtp", "mdm")
"""Training objectives (``TrainConfig.objective``; :mod:`moejax.train.objectives`)."""
TRAIN_ONLY = ("mtp",)
"""Parameter subsets that can train alone on a frozen model (``TrainConfig.train_only``)."""


@dataclass(frozen=True)
class TrainConfig:
    """A training run.

    Attributes:
      steps: optimizer steps (the run also stops after ``minutes`` of training if that is set).
      minutes: wall-clock training budget in minutes (``None``: no limit); the schedule still spans ``steps``.
      seq_len: tokens per training sequence (the model sees ``seq_len`` inputs predicting the next token).
      global_batch: sequences per optimizer step, summed over data-parallel ranks and accumulation steps.
      grad_accum: micro-batches per step (``global_batch`` must be divisible by it).
      lr, min_lr_ratio, warmup_steps: AdamW peak learning rate, linear warmup then cosine decay to
        ``lr * min_lr_ratio`` at ``steps``.
      weight_decay, b1, b2, eps: AdamW.
      clip_norm: global gradient-norm clipping (0 disables).
      compute_dtype: ``float32`` or ``bfloat16`` (master weights and optimizer state stay float32).
      eval_every, eval_batches: validation cadence and size (batches of ``global_batch`` sequences).
      ckpt_every, keep: checkpoint cadence (steps) and how many recent checkpoints to keep.
      log_every: steps between metric log lines.
      seed: parameter init, data order and router randomness.
      val_percent: share of corpus files held out for validation (by path hash).
      ep_a2a: the expert-parallel token exchange on a mesh with ``expert`` (or ``node``) > 1, one of
        :data:`EP_A2A_MODES`: ``fixed`` (capacity ``all_to_all``), ``ragged`` (dropless
        ``ragged_all_to_all``; not on CPU), ``auto`` (``fixed`` until a backend is validated for ``ragged``) or
        ``ragged_emulated`` (the ragged path with a CPU emulation of the primitive, for tests); see
        :mod:`moejax.parallel.expert_parallel`.
      sparsity: N:M sparse training (:class:`SparsityConfig`; ``None`` or method ``dense``: off).
      objective: what is minimized, one of :data:`OBJECTIVES` (:mod:`moejax.train.objectives`): ``next_token``,
        ``mtp`` (next token plus the ``ModelConfig.mtp_depth`` multi-token-prediction losses), or ``mdm``
        (LLaDA's masked-diffusion loss, for a model with ``ModelConfig.causal=False``: each sequence draws
        ``t ~ U(mdm_eps, 1]``, each token is masked with probability ``t``, cross-entropy on the masked tokens
        weighted ``1 / t``; validation reports its Monte-Carlo ELBO in bits/byte).
      mdm_eps: the smallest masking ratio ``t`` of the ``mdm`` objective (LLaDA: 1e-3).
      elbo_samples: masking draws per validation sequence of the ``mdm`` objective's Monte-Carlo ELBO
        (stratified ``t``; more: less variance).
      mtp_weight: DeepSeek-V3's lambda: the MTP losses are added with weight ``mtp_weight / mtp_depth`` each.
      train_only: ``None`` (every parameter) or ``"mtp"``: only the MTP modules train, on a frozen model (start
        from a trained run with ``train(..., init_from=RUN)`` / ``moejax train --init-from RUN``).
    """

    steps: int = 1000
    minutes: float | None = None
    seq_len: int = 256
    global_batch: int = 16
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float = 1.0
    compute_dtype: str = "float32"
    eval_every: int = 200
    eval_batches: int = 16
    ckpt_every: int = 500
    keep: int = 3
    log_every: int = 10
    seed: int = 0
    val_percent: float = 5.0
    ep_a2a: str = "fixed"
    sparsity: SparsityConfig | None = None
    objective: str = "next_token"
    mtp_weight: float = 0.3
    train_only: str | None = None
    mdm_eps: float = 1e-3
    elbo_samples: int = 2

    def validate(self) -> TrainConfig:
        c = "TrainConfig"
        for name in ("steps", "seq_len", "global_batch", "grad_accum", "eval_every", "eval_batches", "ckpt_every",
                     "keep", "log_every"):
            _check_int(c, name, getattr(self, name))
        _check_int(c, "warmup_steps", self.warmup_steps, 0)
        _check_int(c, "seed", self.seed, 0)
        if self.minutes is not None:
            _check_float(c, "minutes", self.minutes, 0.0, strict=True)
        if self.global_batch % self.grad_accum:
            raise _err(c, "grad_accum", self.grad_accum, f"must divide global_batch ({self.global_batch})")
        _check_float(c, "lr", self.lr, 0.0, strict=True)
        _check_float(c, "min_lr_ratio", self.min_lr_ratio, 0.0)
        if self.min_lr_ratio > 1:
            raise _err(c, "min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]")
        _check_float(c, "weight_decay", self.weight_decay, 0.0)
        for name in ("b1", "b2"):
            v = getattr(self, name)
            _check_float(c, name, v, 0.0)
            if v >= 1:
                raise _err(c, name, v, "must be in [0, 1)")
        _check_float(c, "eps", self.eps, 0.0, strict=True)
        _check_float(c, "clip_norm", self.clip_norm, 0.0)
        _check_choice(c, "compute_dtype", self.compute_dtype, DTYPES)
        _check_float(c, "val_percent", self.val_percent, 0.0, strict=True)
        if self.val_percent >= 100:
            raise _err(c, "val_percent", self.val_percent, "must be in (0, 100)")
        _check_choice(c, "ep_a2a", self.ep_a2a, EP_A2A_MODES)
        _check_choice(c, "objective", self.objective, OBJECTIVES)
        _check_float(c, "mtp_weight", self.mtp_weight, 0.0)
        _check_float(c, "mdm_eps", self.mdm_eps, 0.0, strict=True)
        if self.mdm_eps >= 1:
            raise _err(c, "mdm_eps", self.mdm_eps, "must be in (0, 1)")
        _check_int(c, "elbo_samples", self.elbo_samples)
        if self.train_only is not None:
            _check_choice(c, "train_only", self.train_only, TRAIN_ONLY)
        if self.sparsity is not None:
            if not isinstance(self.sparsity, SparsityConfig):
                raise _err(c, "sparsity", self.sparsity, "must be a SparsityConfig or None")
            self.sparsity.validate()
        return self


# ----------------------------------------------------------------------------------------------- presets

def _tiny() -> ModelConfig:
    return ModelConfig(vocab_size=512, d_model=256, n_layers=4, n_heads=8, n_kv_heads=2, d_ff=512,
                       max_seq_len=1024, moe=MoEConfig(num_experts=8, d_ff=512,
                                                       router=RouterConfig(type="topk", top_k=2)))


PRESETS: dict[str, ModelConfig] = {
    # Fast on CPU: the tiny Mixtral-shaped model of the benchmarks.
    "tiny": _tiny(),
    "tiny-dense": dataclasses.replace(_tiny(), moe=None, d_ff=1024),
    # OmniMoE on tiny's shapes: N = 2^16 atomic experts, K = 128, a dense SwiGLU branch of 768: 786,432 active
    # FFN parameters per token and layer (router heads included) against tiny's 788,480 (-0.26%).
    "tiny-omni": dataclasses.replace(_tiny(), moe=MoEConfig(
        num_experts=2**16, d_ff=768, num_shared_experts=1, shared_d_ff=768, expert_type="atomic",
        router=RouterConfig(type="cartesian", top_k=128))),
    # Fine-grained experts for expert-parallel serving and EPLB (issue 22): 64 experts top-4 of width 256 on
    # tiny's shapes: the same active FFN parameters as tiny (4 x 3 x 256 x 256 = 8 experts' 2 x 3 x 256 x 512).
    "tiny-e64": dataclasses.replace(_tiny(), moe=MoEConfig(
        num_experts=64, d_ff=256, router=RouterConfig(type="topk", top_k=4))),
    # Shapes only (nothing downloads); for cost models, memory planning and shape tests.
    "mixtral-8x7b": ModelConfig(
        vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, d_ff=14336,
        max_seq_len=32768, rope_theta=1e6, norm_eps=1e-5,
        moe=MoEConfig(num_experts=8, d_ff=14336, router=RouterConfig(type="topk", top_k=2, normalize=True))),
    "qwen3-30b-a3b": ModelConfig(
        vocab_size=151936, d_model=2048, n_layers=48, n_heads=32, n_kv_heads=4, head_dim=128, d_ff=6144,
        max_seq_len=40960, rope_theta=1e6, norm_eps=1e-6, qk_norm=True,
        moe=MoEConfig(num_experts=128, d_ff=768, router=RouterConfig(type="topk", top_k=8, normalize=True))),
    "qwen2-moe-a2.7b": ModelConfig(
        vocab_size=151936, d_model=2048, n_layers=24, n_heads=16, n_kv_heads=16, d_ff=5632,
        max_seq_len=8192, rope_theta=1e6, norm_eps=1e-6, qkv_bias=True,
        moe=MoEConfig(num_experts=60, d_ff=1408, num_shared_experts=1, shared_d_ff=5632,
                      shared_expert_gate=True,
                      router=RouterConfig(type="topk", top_k=4, normalize=False))),
}


def get_preset(name: str) -> ModelConfig:
    """Return the named preset (a validated :class:`ModelConfig`)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}: allowed values are {', '.join(map(repr, PRESETS))}")
    return PRESETS[name].validate()


# ------------------------------------------------------------------------------------------ (de)serialise

_NESTED = {"moe": MoEConfig, "router": RouterConfig, "sparsity": SparsityConfig}


def config_to_dict(cfg: Any) -> dict:
    """A plain dict (JSON/YAML-safe) of a config dataclass, nested configs included."""
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        out[f.name] = config_to_dict(v) if dataclasses.is_dataclass(v) else (list(v) if isinstance(v, tuple) else v)
    return out


def config_from_dict(cls: type, data: Mapping[str, Any]) -> Any:
    """Build ``cls`` from a dict, recursing into nested configs; unknown keys are an error."""
    if not isinstance(data, Mapping):
        raise ValueError(f"{cls.__name__}: expected a mapping, got {type(data).__name__}")
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}; allowed fields are {sorted(names)}")
    kw = {}
    for k, v in data.items():
        if k in _NESTED and v is not None:
            v = config_from_dict(_NESTED[k], v)
        elif isinstance(v, list):
            v = tuple(v)
        kw[k] = v
    return cls(**kw)


def save_config(cfg: Any, path: str | os.PathLike) -> None:
    """Write ``cfg`` as JSON or YAML (by extension), atomically."""
    path = os.fspath(path)
    data = config_to_dict(cfg)
    if path.endswith((".yaml", ".yml")):
        import yaml
        text = yaml.safe_dump(data, sort_keys=False)
    elif path.endswith(".json"):
        text = json.dumps(data, indent=2) + "\n"
    else:
        raise ValueError(f"config path {path!r}: extension must be .json, .yaml or .yml")
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-config-")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _yaml_loader():
    """A SafeLoader that also reads ``1e-6`` (no decimal point) as a float, as JSON and Python do."""
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))
    return Loader


def load_config(path: str | os.PathLike, cls: type = ModelConfig) -> Any:
    """Read a config written by :func:`save_config` (or by hand) and validate it."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"config file {path!r} does not exist")
    with open(path) as f:
        if path.endswith((".yaml", ".yml")):
            import yaml
            data = yaml.load(f, Loader=_yaml_loader())
        else:
            data = json.load(f)
    cfg = config_from_dict(cls, data)
    return cfg.validate() if hasattr(cfg, "validate") else cfg
