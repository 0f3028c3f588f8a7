"""Roofline model of one MoE serving iteration: a named model on a named GPU.

Moved from ``experiments/layered_prefill.py`` (which projects its measured iteration sequence onto
Qwen3-30B-A3B on an H100) so that other scheduling work (cluster routing, EPLB placement, NanoFlow) prices
iterations with the same arithmetic.

An iteration runs ``decode_tokens`` decode rows through every layer and ``prefill_tokens`` prefill rows through
a fraction of the layers (layered prefill passes a prompt through one layer group per iteration; chunked
prefill through all of them). It takes ``max(bytes / HBM bandwidth, FLOPs / dense bf16 peak)`` with

* bytes = (attention + router weights of every layer + LM head + the distinct experts touched) x bytes per
  weight + the KV cache the rows read, where the distinct experts per layer are the *expected* count under
  uniform top-k routing (:func:`expected_distinct`) of the tokens that pass that layer;
* FLOPs = 2 x active parameters x (token, layer) pairs + 2 x LM-head parameters x tokens that reach the head +
  attention scores (``4 x heads x head_dim`` per (query, key) pair; decode rows attend over their context in
  every layer, prefill rows over their causal pairs in the layers they pass).

NanoFlow's bounds (:func:`optimal_throughput`, :func:`throughput_bounds`): the compute-bound serving
throughput is ``usable compute rate / (2 x active parameters)`` tokens/s per GPU, where the usable rate is
NanoFlow's: its 1,857 tokens/s/GPU for LLaMA-2-70B on 8 A100s implies about 260 TFLOP/s of sustained dense GEMM
on an A100 (the datasheet's 312 is never reached); GPUs without such a figure get their peak times the same
260 / 312 (an assumption, stated in :data:`USABLE_FRACTION`). Beside it the memory bound (weights and KV cache
read once per iteration) and the network bound (tensor parallelism's two all-reduces per layer).

This is a model, not a measurement: label its outputs as modelled. Nothing here imports :mod:`moejax.serve`;
:func:`iteration_time` takes plain numbers and :func:`iteration_times` takes any objects with the attribute
names of :class:`moejax.serve.metrics.IterationStats` (``group``, ``decode_tokens``, ``prefill_tokens``,
``decode_context``, ``prefill_context``, ``prefill_pairs``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

__all__ = ["GPUS", "MODELS", "USABLE_FRACTION", "GPUSpec", "ModelSpec", "active_params", "ep_moe_layer_time",
           "expected_distinct", "get_gpu", "get_model", "iteration_time", "iteration_times", "optimal_throughput",
           "throughput_bounds"]

#: sustained dense-GEMM rate / datasheet peak where no measured figure is given: NanoFlow's A100 figures
#: (1,857 tok/s/GPU x 2 x 70e9 parameters = 260 TFLOP/s of a 312 TFLOP/s peak)
USABLE_FRACTION = 260.0 / 312.0


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """The shape of a MoE transformer, as far as the roofline needs it (every layer is a MoE layer).

    The field names are those of the dict ``experiments/layered_prefill.py`` records in its results
    (``dataclasses.asdict`` gives it back).

    Attributes:
      name: display name.
      layers: transformer layers.
      d_model: hidden size.
      experts: routed experts per layer.
      top_k: experts each token is routed to.
      expert_ff: hidden width of one expert's (SwiGLU: gate, up, down) FFN (a dense model: ``experts = top_k
        = 1`` and its FFN width).
      heads: query heads.
      kv_heads: key/value heads (GQA).
      head_dim: width of one head.
      vocab: vocabulary size (the LM head is ``d_model x vocab``).
      bytes: bytes per weight and per KV-cache element (2: bf16).
    """

    name: str
    layers: int
    d_model: int
    experts: int
    top_k: int
    expert_ff: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    bytes: int

    @property
    def attn_weights(self) -> int:
        """Q, K, V and output projection parameters of one layer."""
        return self.d_model * self.head_dim * (2 * self.heads + 2 * self.kv_heads)

    @property
    def expert_weights(self) -> int:
        """Parameters of one expert (gate, up and down projections)."""
        return 3 * self.d_model * self.expert_ff

    @property
    def router_weights(self) -> int:
        """Router parameters of one layer."""
        return self.d_model * self.experts

    @property
    def head_weights(self) -> int:
        """LM-head parameters."""
        return self.d_model * self.vocab

    @property
    def kv_per_token_layer(self) -> int:
        """KV-cache elements of one token in one layer (keys and values)."""
        return 2 * self.kv_heads * self.head_dim


@dataclasses.dataclass(frozen=True)
class GPUSpec:
    """The two roofs of one accelerator.

    Attributes:
      name: display name.
      hbm_bytes_per_s: memory (HBM) bandwidth, bytes/s.
      bf16_flops: dense bf16 matmul peak, FLOP/s (without structured sparsity).
      link_bytes_per_s: GPU-to-GPU (NVLink) bandwidth per direction (all-to-all, all-reduce).
      usable_flops: sustained dense-GEMM rate for the optimal-throughput bound (None: ``bf16_flops x
        USABLE_FRACTION``).
    """

    name: str
    hbm_bytes_per_s: float
    bf16_flops: float
    link_bytes_per_s: float = 450e9
    usable_flops: float | None = None

    @property
    def usable(self) -> float:
        """The sustained dense-GEMM rate NanoFlow's bound divides by."""
        return self.bf16_flops * USABLE_FRACTION if self.usable_flops is None else self.usable_flops


MODELS: dict[str, ModelSpec] = {
    # Qwen3-30B-A3B's config.json (Qwen/Qwen3-30B-A3B on the Hugging Face Hub): num_hidden_layers 48,
    # hidden_size 2048, num_experts 128, num_experts_per_tok 8, moe_intermediate_size 768,
    # num_attention_heads 32, num_key_value_heads 4, head_dim 128, vocab_size 151936; bf16 weights.
    "qwen3-30b-a3b": ModelSpec(name="Qwen3-30B-A3B", layers=48, d_model=2048, experts=128, top_k=8, expert_ff=768,
                               heads=32, kv_heads=4, head_dim=128, vocab=151936, bytes=2),
    # meta-llama/Llama-2-70b-hf config.json: 80 layers, hidden 8192, intermediate 28672, 64 heads, 8 KV heads,
    # vocab 32000 (a dense model: one "expert" of the FFN's width)
    "llama-2-70b": ModelSpec(name="LLaMA-2-70B", layers=80, d_model=8192, experts=1, top_k=1, expert_ff=28672,
                             heads=64, kv_heads=8, head_dim=128, vocab=32000, bytes=2),
    # mistralai/Mixtral-8x7B-v0.1 config.json: 32 layers, hidden 4096, 8 experts top-2 of width 14336, 32 heads,
    # 8 KV heads, vocab 32000
    "mixtral-8x7b": ModelSpec(name="Mixtral-8x7B", layers=32, d_model=4096, experts=8, top_k=2, expert_ff=14336,
                              heads=32, kv_heads=8, head_dim=128, vocab=32000, bytes=2),
}

GPUS: dict[str, GPUSpec] = {
    # NVIDIA H100 SXM datasheet: 3.35 TB/s HBM3, 989 TFLOP/s dense bf16 (1,979 with 2:4 sparsity), NVLink 4
    # 900 GB/s bidirectional (450 GB/s per direction).
    "h100": GPUSpec(name="H100 SXM (modelled)", hbm_bytes_per_s=3.35e12, bf16_flops=989e12, link_bytes_per_s=450e9),
    # NVIDIA A100 SXM 80GB datasheet: 2.039 TB/s HBM2e, 312 TFLOP/s dense bf16, NVLink 3 600 GB/s bidirectional;
    # usable 260 TFLOP/s from NanoFlow's optimal throughput (see USABLE_FRACTION)
    "a100": GPUSpec(name="A100 SXM 80GB (modelled)", hbm_bytes_per_s=2.039e12, bf16_flops=312e12,
                    link_bytes_per_s=300e9, usable_flops=260e12),
}


def get_model(name: str | ModelSpec) -> ModelSpec:
    """The :class:`ModelSpec` registered as ``name`` in :data:`MODELS` (a spec is returned as it is).

    Raises ``ValueError`` naming the registered models for an unknown name."""
    return _lookup(name, ModelSpec, MODELS, "model")


def get_gpu(name: str | GPUSpec) -> GPUSpec:
    """The :class:`GPUSpec` registered as ``name`` in :data:`GPUS` (a spec is returned as it is).

    Raises ``ValueError`` naming the registered GPUs for an unknown name."""
    return _lookup(name, GPUSpec, GPUS, "GPU")


def _lookup(name, cls, registry: dict, what: str):
    if isinstance(name, cls):
        return name
    if name not in registry:
        raise ValueError(f"unknown roofline {what} {name!r}; allowed: {', '.join(sorted(registry))}")
    return registry[name]


def ep_moe_layer_time(device_shares, tokens, *, model: str | ModelSpec, gpu: str | GPUSpec,
                      slots_per_device: int | None = None) -> float:
    """Modelled seconds of one expert-parallel MoE layer of ``model`` over ``len(device_shares)`` GPUs when
    ``tokens`` tokens (``tokens * top_k`` routed rows) are split over the GPUs in the proportions
    ``device_shares`` (summing to 1). The slowest GPU sets the time: its expert GEMMs at
    ``max(rows x 2 x expert parameters / peak, its slots' expert weights / HBM bandwidth)`` plus the all-to-all
    of its rows there and back (``2 x rows x d_model x bytes / link bandwidth``). ``slots_per_device``: expert
    slots each GPU holds (default ``experts / GPUs``: no redundancy). Shares from a measured load vector make
    this the modelled cost of a placement's imbalance."""
    q, hw = get_model(model), get_gpu(gpu)
    n = len(device_shares)
    slots = q.experts // n if slots_per_device is None else slots_per_device
    memory = slots * q.expert_weights * q.bytes / hw.hbm_bytes_per_s
    worst = 0.0
    for share in device_shares:
        rows = tokens * q.top_k * share
        compute = 2 * rows * q.expert_weights / hw.bf16_flops
        a2a = 2 * rows * q.d_model * q.bytes / hw.link_bytes_per_s
        worst = max(worst, max(compute, memory) + a2a)
    return worst


def expected_distinct(n_tokens, experts, k) -> float:
    """Expected number of distinct experts ``n_tokens`` tokens touch when each picks ``k`` of ``experts``
    (each expert is missed by one token with probability ``1 - k / experts``, independently across tokens)."""
    return experts * (1.0 - (1.0 - k / experts) ** n_tokens) if n_tokens > 0 else 0.0


def iteration_time(decode_tokens, prefill_tokens=0, prefill_fraction=0.0, decode_context=0, prefill_context=0,
                   prefill_pairs=0, *, model: str | ModelSpec, gpu: str | GPUSpec) -> float:
    """Modelled seconds of one serving iteration of ``model`` on ``gpu`` (names in :data:`MODELS` /
    :data:`GPUS`, or specs).

    Args:
      decode_tokens: decode rows (one token each), through every layer.
      prefill_tokens: prefill rows (new prompt tokens).
      prefill_fraction: fraction of the layers the prefill rows pass (1.0: all; layered prefill: one layer
        group of ``G``); rounded to whole layers of ``model``. Ignored when ``prefill_tokens`` is 0.
      decode_context: cached tokens the decode rows attend over, summed over rows (per layer).
      prefill_context: cached + new tokens the prefill rows attend over (KV read, per layer passed).
      prefill_pairs: causal (query, key) pairs of the prefill rows (per layer passed).
    """
    q, hw = get_model(model), get_gpu(gpu)
    hd, L = q.head_dim, q.layers
    attn_w, expert_w, router_w, head_w = q.attn_weights, q.expert_weights, q.router_weights, q.head_weights
    frac = prefill_fraction if prefill_tokens else 0.0
    l_pf = round(frac * L)
    dec, pf = decode_tokens, prefill_tokens
    distinct = (l_pf * expected_distinct(dec + pf, q.experts, q.top_k)
                + (L - l_pf) * expected_distinct(dec, q.experts, q.top_k))
    weights = L * (attn_w + router_w) + head_w + distinct * expert_w
    tokens_layers = dec * L + pf * l_pf
    flops = 2 * tokens_layers * (attn_w + router_w + q.top_k * expert_w) + 2 * (dec + (pf if frac else 0)) * head_w
    # attention: every row reads its cached K/V once per layer it passes; scores ~ 4 * heads * hd per
    # (query, key) pair, with prefill rows attending causally over their context
    kv_bytes = q.kv_per_token_layer * (L * decode_context + l_pf * prefill_context)
    flops += 4 * q.heads * hd * (L * decode_context + l_pf * prefill_pairs)
    return max(q.bytes * (weights + kv_bytes) / hw.hbm_bytes_per_s, flops / hw.bf16_flops)


def iteration_times(iterations: Iterable, n_layers_measured: int, *, model: str | ModelSpec,
                    gpu: str | GPUSpec) -> list[float]:
    """:func:`iteration_time` of each measured iteration (objects with the attributes of
    :class:`moejax.serve.metrics.IterationStats`): an iteration's prefill passes the fraction
    ``(hi - lo) / n_layers_measured`` of the modelled layers, ``(lo, hi)`` being its layer ``group`` in the
    measured model of ``n_layers_measured`` layers."""
    times = []
    for it in iterations:
        lo, hi = it.group
        frac = (hi - lo) / n_layers_measured if it.prefill_tokens else 0.0
        times.append(iteration_time(it.decode_tokens, it.prefill_tokens, frac, it.decode_context,
                                    it.prefill_context, it.prefill_pairs, model=model, gpu=gpu))
    return times


def active_params(model: str | ModelSpec) -> int:
    """Parameters one token's forward multiplies by: every layer's attention, router and ``top_k`` experts, and
    the LM head (embeddings are a lookup)."""
    q = get_model(model)
    return q.layers * (q.attn_weights + q.router_weights + q.top_k * q.expert_weights) + q.head_weights


def optimal_throughput(model: str | ModelSpec, gpu: str | GPUSpec) -> float:
    """NanoFlow's optimal serving throughput, tokens/s per GPU, when compute is the bottleneck: the usable
    rate over ``2 x active parameters`` (independent of how many GPUs share the model)."""
    return get_gpu(gpu).usable / (2 * active_params(model))


def throughput_bounds(model: str | ModelSpec, gpu: str | GPUSpec, *, batch: int, context: int,
                      n_gpus: int = 1) -> dict:
    """Tokens/s per GPU each resource allows for decode iterations of ``batch`` rows attending over
    ``context`` cached tokens each, the model spread over ``n_gpus`` GPUs by tensor parallelism:

    * ``compute``: :func:`optimal_throughput` (attention scores included: ``4 x heads x head_dim`` per
      (query, key) pair);
    * ``memory``: every iteration reads all weights and the batch's KV cache once;
    * ``network``: two all-reduces per layer of ``batch x d_model`` activations (ring: ``2 (n - 1) / n`` of
      them over each link); infinite on one GPU.

    ``bound`` is the least of them. A modelled figure."""
    if batch < 1 or context < 0 or n_gpus < 1:
        raise ValueError(f"batch={batch!r} must be >= 1, context={context!r} >= 0, n_gpus={n_gpus!r} >= 1")
    q, hw = get_model(model), get_gpu(gpu)
    weights = q.layers * (q.attn_weights + q.router_weights) + q.head_weights + q.layers * q.experts * q.expert_weights
    flops = batch * (2 * active_params(q) + 4 * q.heads * q.head_dim * q.layers * context)
    t_compute = flops / (n_gpus * hw.usable)
    t_memory = q.bytes * (weights + batch * context * q.layers * q.kv_per_token_layer) / (n_gpus * hw.hbm_bytes_per_s)
    t_network = 0.0
    if n_gpus > 1:
        t_network = 2 * q.layers * batch * q.d_model * q.bytes * 2 * (n_gpus - 1) / n_gpus / hw.link_bytes_per_s
    per_gpu = {"compute": batch / t_compute / n_gpus, "memory": batch / t_memory / n_gpus,
               "network": batch / t_network / n_gpus if t_network else float("inf")}
    per_gpu["bound"] = min(per_gpu.values())
    return per_gpu
