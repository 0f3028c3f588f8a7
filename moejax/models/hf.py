"""Hugging Face checkpoint import/export for Mixtral, Qwen3-MoE and Qwen2-MoE.

:func:`load_hf` reads a Hugging Face model directory (``config.json`` plus ``model.safetensors`` or sharded
``model-XXXXX-of-YYYYY.safetensors`` with ``model.safetensors.index.json``) into a moejax
:class:`~moejax.models.transformer.Transformer`; :func:`save_hf` writes one back in a form ``transformers``
loads. :func:`config_from_hf` / :func:`config_to_hf` translate the configs.

Expert weights are accepted in both layouts found in the wild:

- ``per_expert``: one ``[out, in]`` matrix per expert, as in the original releases and as
  ``transformers`` 5 ``save_pretrained`` still writes them: Mixtral
  ``model.layers.{i}.block_sparse_moe.experts.{e}.w1/w3/w2.weight`` (gate/up/down), Qwen
  ``model.layers.{i}.mlp.experts.{e}.gate_proj/up_proj/down_proj.weight``.
- ``fused``: the in-memory layout of ``transformers`` 5 (``model.layers.{i}.mlp.experts.gate_up_proj``
  ``[E, 2F, D]`` = gate rows then up rows, and ``model.layers.{i}.mlp.experts.down_proj`` ``[E, D, F]``).

Weight layout on the moejax side (torch ``Linear`` weights are ``[out, in]``, moejax stores ``[in, out]``):
``wq [D, H, hd]``, ``wk/wv [D, KV, hd]``, ``wo [H, hd, D]``, ``bq/bk/bv [H or KV, hd]``, router ``w [D, E]``,
experts ``w_gate/w_up [E, D, F]``, ``w_down [E, F, D]``, dense/shared SwiGLU ``[D, F]``/``[F, D]``, shared
gate ``[D, 1]``, ``embed [V, D]``, ``lm_head [D, V]``.

Safetensors files are read and written with the ``safetensors`` library's numpy API (no ``torch`` needed).
Loading and saving only transpose/reshape/concatenate, so export -> import round-trips bit-exactly when the
dtype is kept.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from moejax.config import DTYPES, ModelConfig, MoEConfig, RouterConfig
from moejax.models.transformer import Transformer, layer_runs, require_causal

SUPPORTED_MODEL_TYPES = ("mixtral", "qwen3_moe", "qwen2_moe")
LAYOUTS = ("per_expert", "fused")
_ARCHITECTURES = {"mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
                  "qwen2_moe": "Qwen2MoeForCausalLM"}
# Tensors a checkpoint may carry that hold no parameters (recomputed from the config).
_HARMLESS_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.original_inv_freq")


# ================================================================================================ config

def _require(hf: Mapping[str, Any], key: str, model_type: str) -> Any:
    if hf.get(key) is None:
        raise ValueError(f"config.json ({model_type}): missing required field {key!r}")
    return hf[key]


def _rope_theta(hf: Mapping[str, Any], model_type: str) -> float:
    """RoPE base from ``rope_parameters`` (transformers 5) or ``rope_theta`` (older); reject scaled RoPE."""
    params = hf.get("rope_parameters")
    if isinstance(params, Mapping) and "rope_theta" not in params and params:
        # transformers 5 may nest per-layer-type parameters ({"full_attention": {...}}).
        subs = [v for v in params.values() if isinstance(v, Mapping)]
        if subs:
            if any(dict(s) != dict(subs[0]) for s in subs[1:]):
                raise ValueError(f"config.json ({model_type}): field 'rope_parameters' has different RoPE "
                                 f"settings per layer type, which moejax does not support: {dict(params)}")
            params = subs[0]
    scaling = hf.get("rope_scaling")
    for field_name, p in (("rope_parameters", params), ("rope_scaling", scaling)):
        if p is None:
            continue
        if not isinstance(p, Mapping):
            raise ValueError(f"config.json ({model_type}): field {field_name!r} must be a mapping, got {p!r}")
        rtype = p.get("rope_type", p.get("type", "default"))
        if rtype not in (None, "default"):
            raise ValueError(f"config.json ({model_type}): field {field_name!r} has rope_type={rtype!r}; only "
                             f"the default (unscaled) RoPE is supported")
        prf = p.get("partial_rotary_factor", 1.0)
        if prf not in (None, 1, 1.0):
            raise ValueError(f"config.json ({model_type}): field {field_name!r} has partial_rotary_factor="
                             f"{prf!r}; only full rotary embeddings are supported")
    if hf.get("partial_rotary_factor", 1.0) not in (None, 1, 1.0):
        raise ValueError(f"config.json ({model_type}): field 'partial_rotary_factor'="
                         f"{hf['partial_rotary_factor']!r} is not supported (only 1.0)")
    theta = None
    if isinstance(params, Mapping):
        theta = params.get("rope_theta")
    if theta is None:
        theta = hf.get("rope_theta")
    if theta is None:
        theta = 1e6 if model_type == "mixtral" else 10000.0  # the transformers defaults
    return float(theta)


def _check_sliding_window(hf: Mapping[str, Any], model_type: str) -> None:
    """Reject a sliding window that would actually restrict attention."""
    window = hf.get("sliding_window")
    max_pos = hf.get("max_position_embeddings")
    if model_type == "mixtral":
        active = window is not None
    elif model_type == "qwen3_moe":
        active = bool(hf.get("use_sliding_window", False)) and window is not None
    else:  # qwen2_moe: per layer_types (or the rule transformers uses to build them)
        types = hf.get("layer_types")
        if types is None:
            n, mwl = hf.get("num_hidden_layers", 0), hf.get("max_window_layers", 28)
            types = ["sliding_attention" if (i + 1) % 2 and i < mwl and hf.get("use_sliding_window", False)
                     else "full_attention" for i in range(n)]
        bad = sorted(set(types) - {"full_attention", "sliding_attention"})
        if bad:
            raise ValueError(f"config.json ({model_type}): field 'layer_types' has unsupported value(s) {bad}")
        active = "sliding_attention" in types and bool(window)
    if active and not (isinstance(max_pos, int) and isinstance(window, int) and window >= max_pos):
        raise ValueError(f"config.json ({model_type}): field 'sliding_window'={window!r} is active "
                         f"(max_position_embeddings={max_pos!r}); sliding-window attention is not supported")


def config_from_hf(hf_config: Mapping[str, Any]) -> ModelConfig:
    """Translate a Hugging Face ``config.json`` dict into a validated :class:`~moejax.config.ModelConfig`.

    Supports ``model_type`` ``mixtral``, ``qwen3_moe`` and ``qwen2_moe`` (both transformers 4 and 5 field
    spellings: ``rope_theta`` or ``rope_parameters``, ``num_experts`` or ``num_local_experts``). Routing is
    ``topk`` with ``dropless`` dispatch; Mixtral renormalizes the top-k weights, Qwen follows
    ``norm_topk_prob``. Qwen3-MoE gets QK-norm; Qwen2-MoE gets q/k/v bias and its gated shared expert.
    ``decoder_sparse_step`` becomes ``moe_every`` and ``mlp_only_layers`` becomes ``dense_layers``. The
    load-balancing loss weight is ``router_aux_loss_coef``; the z-loss (not used by these models) is off.

    Raises:
      ValueError: unknown ``model_type`` (the message lists the allowed values), a missing required field,
        or a feature that changes the math and that moejax does not implement (an active sliding window,
        scaled or partial RoPE, an activation other than SiLU, Qwen3 ``attention_bias``, and top-1 routing
        with renormalized weights while moejax's ``topk`` router does not renormalize a single expert).
    """
    if not isinstance(hf_config, Mapping):
        raise ValueError(f"config.json: expected a JSON object, got {type(hf_config).__name__}")
    hf = dict(hf_config)
    mt = hf.get("model_type")
    if mt not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"config.json: model_type={mt!r} is not supported; allowed values are "
                         f"{', '.join(map(repr, SUPPORTED_MODEL_TYPES))}")
    act = hf.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ValueError(f"config.json ({mt}): field 'hidden_act'={act!r} is not supported (only 'silu')")
    _check_sliding_window(hf, mt)
    rope_theta = _rope_theta(hf, mt)

    d_model = _require(hf, "hidden_size", mt)
    n_heads = _require(hf, "num_attention_heads", mt)
    n_kv = hf.get("num_key_value_heads") or n_heads
    n_layers = _require(hf, "num_hidden_layers", mt)
    head_dim = hf.get("head_dim")
    if head_dim is not None and head_dim == d_model // n_heads and d_model % n_heads == 0:
        head_dim = None  # the default; keep the config canonical
    if mt == "mixtral":
        n_exp = hf.get("num_local_experts", hf.get("num_experts"))
        if n_exp is None:
            raise ValueError("config.json (mixtral): missing required field 'num_local_experts'")
        expert_ff = _require(hf, "intermediate_size", mt)
        d_ff = expert_ff
    else:
        n_exp = hf.get("num_experts", hf.get("num_local_experts"))
        if n_exp is None:
            raise ValueError(f"config.json ({mt}): missing required field 'num_experts'")
        expert_ff = _require(hf, "moe_intermediate_size", mt)
        d_ff = _require(hf, "intermediate_size", mt)
    top_k = _require(hf, "num_experts_per_tok", mt)
    normalize = True if mt == "mixtral" else bool(hf.get("norm_topk_prob", False))
    qk_norm = mt == "qwen3_moe"
    if mt == "qwen3_moe" and hf.get("attention_bias", False):
        raise ValueError("config.json (qwen3_moe): field 'attention_bias'=true is not supported (moejax has no "
                         "output-projection bias)")
    qkv_bias = bool(hf.get("qkv_bias", True)) if mt == "qwen2_moe" else False
    shared = {}
    if mt == "qwen2_moe":
        sff = _require(hf, "shared_expert_intermediate_size", mt)
        shared = dict(num_shared_experts=1, shared_d_ff=sff, shared_expert_gate=True)
    moe = None
    if n_exp:
        moe = MoEConfig(num_experts=n_exp, d_ff=expert_ff, dispatch="dropless",
                        router=RouterConfig(type="topk", top_k=top_k, normalize=normalize),
                        aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.01) or 0.0), z_loss_coef=0.0,
                        **shared)
    dense_layers = tuple(int(i) for i in (hf.get("mlp_only_layers") or ()))
    cfg = ModelConfig(
        vocab_size=_require(hf, "vocab_size", mt), d_model=d_model, n_layers=n_layers, n_heads=n_heads,
        n_kv_heads=n_kv, head_dim=head_dim, d_ff=d_ff,
        max_seq_len=int(hf.get("max_position_embeddings") or (131072 if mt == "mixtral" else 32768)),
        rope_theta=rope_theta, norm_eps=float(hf.get("rms_norm_eps", 1e-5 if mt == "mixtral" else 1e-6)),
        qk_norm=qk_norm, qkv_bias=qkv_bias, tie_embeddings=bool(hf.get("tie_word_embeddings", False)), moe=moe,
        moe_every=int(hf.get("decoder_sparse_step", 1) or 1) if mt != "mixtral" else 1,
        dense_layers=dense_layers)
    try:
        return cfg.validate()
    except ValueError as e:
        raise ValueError(f"config.json ({mt}): gives an invalid moejax config: {e}") from e


def infer_model_type(cfg: ModelConfig) -> str:
    """The Hugging Face architecture a moejax config corresponds to (``qwen3_moe`` if QK-norm, ``qwen2_moe``
    if shared experts or q/k/v bias, else ``mixtral``)."""
    if cfg.qk_norm:
        return "qwen3_moe"
    if cfg.qkv_bias or (cfg.moe is not None and cfg.moe.num_shared_experts):
        return "qwen2_moe"
    return "mixtral"


def config_to_hf(cfg: ModelConfig, model_type: str | None = None, dtype: str | None = None) -> dict:
    """The Hugging Face ``config.json`` dict for ``cfg`` as ``model_type`` (inferred when ``None``).

    Raises ``ValueError`` naming the field when ``cfg`` uses something the architecture cannot express.
    """
    cfg.validate()
    if cfg.moe is not None and cfg.moe.expert_type != "swiglu":
        raise ValueError(f"MoEConfig.expert_type={cfg.moe.expert_type!r} has no Hugging Face architecture "
                         "(Mixtral/Qwen2-MoE/Qwen3-MoE have SwiGLU experts); export needs expert_type='swiglu'")
    mt = model_type or infer_model_type(cfg)
    if mt not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"model_type={mt!r} is not supported; allowed values are "
                         f"{', '.join(map(repr, SUPPORTED_MODEL_TYPES))}")

    def bad(field_name, value, why):
        return ValueError(f"cannot export as {mt}: ModelConfig.{field_name}={value!r}: {why}")

    m = cfg.moe
    if m is None:
        raise bad("moe", None, "a dense model has no MoE layers to export")
    if m.router.type != "topk":
        raise bad("moe.router.type", m.router.type, "only 'topk' routing exists in this architecture")
    if mt == "mixtral":
        if cfg.qk_norm or cfg.qkv_bias:
            raise bad("qk_norm/qkv_bias", (cfg.qk_norm, cfg.qkv_bias), "Mixtral has neither")
        if m.num_shared_experts:
            raise bad("moe.num_shared_experts", m.num_shared_experts, "Mixtral has no shared experts")
        if not m.router.normalize:
            raise bad("moe.router.normalize", False, "Mixtral always renormalizes the top-k weights")
        if cfg.moe_every != 1 or cfg.dense_layers:
            raise bad("moe_every/dense_layers", (cfg.moe_every, cfg.dense_layers), "every Mixtral layer is MoE")
    elif mt == "qwen3_moe":
        if not cfg.qk_norm:
            raise bad("qk_norm", False, "Qwen3-MoE always has QK-norm")
        if cfg.qkv_bias:
            raise bad("qkv_bias", True, "Qwen3-MoE's attention_bias also adds an output bias")
        if m.num_shared_experts:
            raise bad("moe.num_shared_experts", m.num_shared_experts, "Qwen3-MoE has no shared experts")
    else:
        if cfg.qk_norm:
            raise bad("qk_norm", True, "Qwen2-MoE has no QK-norm")
        if not m.num_shared_experts or not m.shared_expert_gate:
            raise bad("moe.num_shared_experts/shared_expert_gate", (m.num_shared_experts, m.shared_expert_gate),
                      "Qwen2-MoE always has one sigmoid-gated shared expert")
    dtype = dtype or cfg.param_dtype
    out: dict[str, Any] = {
        "architectures": [_ARCHITECTURES[mt]],
        "model_type": mt,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.resolved_head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_parameters": {"rope_theta": cfg.rope_theta, "rope_type": "default"},
        "rope_theta": cfg.rope_theta,  # transformers 4 spelling (5 reads rope_parameters)
        "tie_word_embeddings": cfg.tie_embeddings,
        "num_experts_per_tok": m.router.top_k,
        "router_aux_loss_coef": m.aux_loss_coef,
        "attention_dropout": 0.0,
        "initializer_range": cfg.init_std,
        "use_cache": True,
        "dtype": dtype,
        "torch_dtype": dtype,  # transformers 4 spelling
    }
    if mt == "mixtral":
        out.update(intermediate_size=m.d_ff, num_local_experts=m.num_experts, sliding_window=None,
                   router_jitter_noise=0.0)
    else:
        out.update(intermediate_size=cfg.d_ff, moe_intermediate_size=m.d_ff, num_experts=m.num_experts,
                   norm_topk_prob=m.router.normalize, decoder_sparse_step=cfg.moe_every,
                   mlp_only_layers=sorted(set(cfg.dense_layers)), use_sliding_window=False)
        if mt == "qwen3_moe":
            out.update(attention_bias=False, sliding_window=None)
        else:
            out.update(qkv_bias=cfg.qkv_bias, sliding_window=None, max_window_layers=cfg.n_layers,
                       layer_types=["full_attention"] * cfg.n_layers,
                       shared_expert_intermediate_size=m.num_shared_experts * (m.shared_d_ff or m.d_ff))
    return out


# ================================================================================================ safetensors

class _SafetensorsFile:
    """One ``.safetensors`` file opened with the ``safetensors`` library (tensors read on demand as numpy)."""

    def __init__(self, path: str):
        self.path = path
        try:
            self._f = safe_open(path, framework="numpy")
        except Exception as e:  # safetensors raises its own error types for malformed headers
            raise ValueError(f"{path}: not a readable safetensors file ({e})") from e
        self.entries = tuple(self._f.keys())

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._f.get_slice(name).get_shape())

    def get(self, name: str) -> np.ndarray:
        try:
            return self._f.get_tensor(name)
        except Exception as e:
            raise ValueError(f"{self.path}: tensor {name!r} could not be read ({e})") from e


class _Checkpoint:
    """All tensors of a checkpoint directory (single-file or sharded)."""

    def __init__(self, path: str):
        index = os.path.join(path, "model.safetensors.index.json")
        single = os.path.join(path, "model.safetensors")
        if os.path.exists(index):
            with open(index) as f:
                wmap = json.load(f).get("weight_map")
            if not isinstance(wmap, Mapping):
                raise ValueError(f"{index}: missing 'weight_map'")
            files = sorted(set(wmap.values()))
        elif os.path.exists(single):
            files = ["model.safetensors"]
        else:
            files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        if not files:
            raise FileNotFoundError(f"{path}: no *.safetensors weights found (expected model.safetensors or "
                                    f"model.safetensors.index.json)")
        self.where: dict[str, _SafetensorsFile] = {}
        for fn in files:
            full = os.path.join(path, fn)
            if not os.path.exists(full):
                raise FileNotFoundError(f"{path}: shard {fn!r} listed in the index does not exist")
            st = _SafetensorsFile(full)
            for name in st.entries:
                if name in self.where:
                    raise ValueError(f"{path}: tensor {name!r} appears in both {self.where[name].path!r} "
                                     f"and {full!r}")
                self.where[name] = st
        self.used: set[str] = set()

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def get(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        st = self.where.get(name)
        if st is None:
            raise ValueError(f"checkpoint is missing tensor {name!r} (expected shape {tuple(shape)})")
        got = st.shape(name)
        if got != tuple(shape):
            raise ValueError(f"tensor {name!r} has shape {got}, expected {tuple(shape)} (from config.json)")
        self.used.add(name)
        return st.get(name)


# ================================================================================================ name mapping

@dataclass(frozen=True)
class _Entry:
    """``hf`` tensors (``hf_shapes``) <-> moejax ``dst`` parameters (paths within a Block or the model)."""

    hf: tuple[str, ...]
    hf_shapes: tuple[tuple[int, ...], ...]
    dst: tuple[tuple, ...]
    to_mj: Callable[[list[np.ndarray]], list[np.ndarray]]
    to_hf: Callable[[list[np.ndarray]], list[np.ndarray]]


def _linear(hf: str, shape_out_in: tuple[int, int], dst: tuple, mj_shape: tuple[int, ...]) -> _Entry:
    """A torch ``Linear`` weight ``[out, in]`` <-> moejax ``W.T`` reshaped to ``mj_shape`` (``in`` first)."""
    o, i = shape_out_in
    return _Entry((hf,), ((o, i),), (dst,),
                  lambda ts: [ts[0].T.reshape(mj_shape)],
                  lambda ws: [ws[0].reshape(i, o).T])


def _same(hf: str, shape: tuple[int, ...], dst: tuple, mj_shape: tuple[int, ...] | None = None) -> _Entry:
    mj_shape = mj_shape or shape
    return _Entry((hf,), (shape,), (dst,), lambda ts: [ts[0].reshape(mj_shape)], lambda ws: [ws[0].reshape(shape)])


def _swiglu_entries(prefix: str, names: tuple[str, str, str], D: int, F: int, dst: tuple) -> list[_Entry]:
    g, u, d = names
    return [_linear(f"{prefix}.{g}.weight", (F, D), dst + ("w_gate",), (D, F)),
            _linear(f"{prefix}.{u}.weight", (F, D), dst + ("w_up",), (D, F)),
            _linear(f"{prefix}.{d}.weight", (D, F), dst + ("w_down",), (F, D))]


def _expert_entries(prefix: str, names: tuple[str, str, str], E: int, D: int, F: int, layout: str) -> list[_Entry]:
    dst = ("moe", "experts")
    if layout == "fused":
        def gu_to_mj(ts):
            t = ts[0]
            return [t[:, :F, :].transpose(0, 2, 1), t[:, F:, :].transpose(0, 2, 1)]

        def gu_to_hf(ws):
            return [np.concatenate([ws[0], ws[1]], axis=2).transpose(0, 2, 1)]

        return [_Entry((f"{prefix}.gate_up_proj",), ((E, 2 * F, D),), (dst + ("w_gate",), dst + ("w_up",)),
                       gu_to_mj, gu_to_hf),
                _Entry((f"{prefix}.down_proj",), ((E, D, F),), (dst + ("w_down",),),
                       lambda ts: [ts[0].transpose(0, 2, 1)], lambda ws: [ws[0].transpose(0, 2, 1)])]
    out = []
    for name, w, (o, i) in zip(names, ("w_gate", "w_up", "w_down"), ((F, D), (F, D), (D, F))):
        out.append(_Entry(tuple(f"{prefix}.{e}.{name}.weight" for e in range(E)), ((o, i),) * E, (dst + (w,),),
                          lambda ts: [np.stack([t.T for t in ts])],
                          lambda ws: [w_.T for w_ in ws[0]]))
    return out


def _layer_entries(cfg: ModelConfig, mt: str, i: int, kind: str, layout: str, moe_prefix: str) -> list[_Entry]:
    D, H, KV, hd = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.resolved_head_dim
    L = f"model.layers.{i}"
    A = f"{L}.self_attn"
    es = [_same(f"{L}.input_layernorm.weight", (D,), ("attn_norm", "weight")),
          _same(f"{L}.post_attention_layernorm.weight", (D,), ("ffn_norm", "weight")),
          _linear(f"{A}.q_proj.weight", (H * hd, D), ("attn", "wq"), (D, H, hd)),
          _linear(f"{A}.k_proj.weight", (KV * hd, D), ("attn", "wk"), (D, KV, hd)),
          _linear(f"{A}.v_proj.weight", (KV * hd, D), ("attn", "wv"), (D, KV, hd)),
          _linear(f"{A}.o_proj.weight", (D, H * hd), ("attn", "wo"), (H, hd, D))]
    if cfg.qkv_bias:
        es += [_same(f"{A}.q_proj.bias", (H * hd,), ("attn", "bq"), (H, hd)),
               _same(f"{A}.k_proj.bias", (KV * hd,), ("attn", "bk"), (KV, hd)),
               _same(f"{A}.v_proj.bias", (KV * hd,), ("attn", "bv"), (KV, hd))]
    if cfg.qk_norm:
        es += [_same(f"{A}.q_norm.weight", (hd,), ("attn", "q_norm")),
               _same(f"{A}.k_norm.weight", (hd,), ("attn", "k_norm"))]
    if kind == "dense":
        es += _swiglu_entries(f"{L}.mlp", ("gate_proj", "up_proj", "down_proj"), D, cfg.d_ff, ("mlp",))
        return es
    m = cfg.moe
    E, F = m.num_experts, m.d_ff
    P = f"{L}.{moe_prefix}"
    es.append(_linear(f"{P}.gate.weight", (E, D), ("moe", "router", "w"), (D, E)))
    names = ("w1", "w3", "w2") if mt == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    es += _expert_entries(f"{P}.experts", names, E, D, F, layout)
    if m.num_shared_experts:
        sff = m.num_shared_experts * (m.shared_d_ff or m.d_ff)
        es += _swiglu_entries(f"{P}.shared_expert", ("gate_proj", "up_proj", "down_proj"), D, sff,
                              ("moe", "shared"))
        if m.shared_expert_gate:
            es.append(_linear(f"{P}.shared_expert_gate.weight", (1, D), ("moe", "shared_gate"), (D, 1)))
    return es


def _global_entries(cfg: ModelConfig) -> list[_Entry]:
    V, D = cfg.vocab_size, cfg.d_model
    es = [_same("model.embed_tokens.weight", (V, D), ("embed",)),
          _same("model.norm.weight", (D,), ("final_norm", "weight"))]
    if not cfg.tie_embeddings:
        es.append(_linear("lm_head.weight", (V, D), ("lm_head",), (D, V)))
    return es


# ================================================================================================ load / save

def _read_config(path: str) -> dict:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"Hugging Face model directory {path!r} does not exist")
    cpath = os.path.join(path, "config.json")
    if not os.path.exists(cpath):
        raise FileNotFoundError(f"{path}: config.json not found (a Hugging Face model directory needs "
                                f"config.json and *.safetensors)")
    with open(cpath) as f:
        try:
            return json.load(f)
        except ValueError as e:
            raise ValueError(f"{cpath}: invalid JSON: {e}") from e


def _resolve_dtype(dtype: str | None, hf: Mapping[str, Any]) -> str:
    if dtype is None:
        dtype = hf.get("dtype") or hf.get("torch_dtype") or "float32"
        return dtype if dtype in DTYPES else "float32"
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is invalid: allowed values are {', '.join(map(repr, DTYPES))}")
    return dtype


def _unflatten(flat: Mapping[tuple, Any]) -> dict:
    out: dict = {}
    for path, v in flat.items():
        cur = out
        for k in path[:-1]:
            cur = cur.setdefault(k, {})
        cur[path[-1]] = v
    return out


def load_hf(path: str | os.PathLike, dtype: str | None = "float32") -> tuple[Transformer, ModelConfig]:
    """Load a Hugging Face Mixtral / Qwen3-MoE / Qwen2-MoE directory into a moejax ``Transformer``.

    Args:
      path: directory with ``config.json`` and ``model.safetensors`` (or sharded safetensors with
        ``model.safetensors.index.json``). float32, bfloat16 and float16 tensors are accepted; expert weights
        may be per-expert or transformers-5 fused (``gate_up_proj``/``down_proj``), independently per layer.
      dtype: parameter and compute dtype of the returned model (``float32`` or ``bfloat16``); ``None`` uses
        the checkpoint's ``dtype``/``torch_dtype``.

    Returns:
      ``(model, cfg)``: the model with the checkpoint's weights and its :class:`ModelConfig`.

    Raises:
      FileNotFoundError: the directory, ``config.json`` or the weights are missing.
      ValueError: unsupported config (see :func:`config_from_hf`), a missing tensor or one of the wrong shape
        (the message names the tensor and the expected vs actual shape), or unused tensors in the checkpoint
        (named in the message; rotary ``inv_freq`` buffers are ignored).
    """
    path = os.fspath(path)
    hf = _read_config(path)
    cfg = config_from_hf(hf)
    dt = _resolve_dtype(dtype, hf)
    cfg = dataclasses.replace(cfg, dtype=dt, param_dtype=dt)
    mt = hf["model_type"]
    ckpt = _Checkpoint(path)
    np_dt = np.dtype(jnp.dtype(dt))

    def read(entry: _Entry) -> list[np.ndarray]:
        ts = [ckpt.get(n, s) for n, s in zip(entry.hf, entry.hf_shapes)]
        return [np.asarray(w).astype(np_dt) for w in entry.to_mj(ts)]

    bsm_layers = {n.split(".block_sparse_moe.")[0] + ".block_sparse_moe" for n in ckpt.where
                  if ".block_sparse_moe." in n}
    values: dict[tuple, np.ndarray] = {}
    for e in _global_entries(cfg):
        for d, w in zip(e.dst, read(e)):
            values[d] = w
    for r, (kind, first, n) in enumerate(layer_runs(cfg)):
        per_layer: dict[tuple, list[np.ndarray]] = {}
        for i in range(first, first + n):
            prefix, layout = "mlp", "per_expert"
            if kind == "moe":
                if mt == "mixtral" and f"model.layers.{i}.block_sparse_moe" in bsm_layers:
                    prefix = "block_sparse_moe"  # the original Mixtral naming (transformers 5 uses mlp)
                if f"model.layers.{i}.{prefix}.experts.gate_up_proj" in ckpt:
                    layout = "fused"
            for e in _layer_entries(cfg, mt, i, kind, layout, prefix):
                for d, w in zip(e.dst, read(e)):
                    per_layer.setdefault(d, []).append(w)
        for d, ws in per_layer.items():
            values[("stacks", r) + d] = np.stack(ws)

    extra = sorted(n for n in ckpt.where if n not in ckpt.used and not n.endswith(_HARMLESS_SUFFIXES))
    if cfg.tie_embeddings and "lm_head.weight" in extra:
        lm = ckpt.where["lm_head.weight"]
        emb = ckpt.where["model.embed_tokens.weight"]
        if (lm.shape("lm_head.weight") == emb.shape("model.embed_tokens.weight")
                and np.array_equal(lm.get("lm_head.weight"), emb.get("model.embed_tokens.weight"))):
            extra.remove("lm_head.weight")  # a redundant copy of the tied embedding
        else:
            raise ValueError("tensor 'lm_head.weight' differs from 'model.embed_tokens.weight' but config.json "
                             "has tie_word_embeddings=true")
    if extra:
        shown = ", ".join(map(repr, extra[:20])) + (f", ... ({len(extra)} in all)" if len(extra) > 20 else "")
        raise ValueError(f"checkpoint has tensor(s) that the {mt} config does not use: {shown}")

    abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    gdef, state = nnx.split(abstract)
    flat = dict(nnx.to_flat_state(state))
    missing = sorted(set(flat) - set(values), key=str)
    unknown = sorted(set(values) - set(flat), key=str)
    if missing or unknown:  # a mapping bug, not a checkpoint problem
        raise ValueError(f"internal error: moejax parameters not covered {missing}, unknown {unknown}")
    for p, v in flat.items():
        if tuple(v.shape) != values[p].shape:
            raise ValueError(f"internal error: parameter {p} has shape {values[p].shape}, model expects "
                             f"{tuple(v.shape)}")
    nnx.replace_by_pure_dict(state, _unflatten({p: jnp.asarray(w) for p, w in values.items()}))
    return nnx.merge(gdef, state), cfg


def save_hf(model: Transformer, cfg: ModelConfig, path: str | os.PathLike, *, layout: str = "per_expert",
            dtype: str | None = None, model_type: str | None = None, overwrite: bool = False) -> None:
    """Export a moejax ``Transformer`` as a Hugging Face directory (``config.json`` + ``model.safetensors``).

    Args:
      model, cfg: the model and its config.
      path: the output directory. It is written to a temporary directory next to it and renamed into place,
        so readers never see a partial export.
      layout: expert weights ``per_expert`` (``...experts.{e}.gate_proj.weight`` / Mixtral ``w1/w3/w2``, the
        layout of the original releases and of transformers' ``save_pretrained``) or ``fused``
        (transformers-5 ``...mlp.experts.gate_up_proj [E, 2F, D]`` and ``...mlp.experts.down_proj [E, D, F]``).
      dtype: tensor dtype in the file (``float32``/``bfloat16``); ``None`` keeps each parameter's dtype.
      model_type: ``mixtral``, ``qwen3_moe`` or ``qwen2_moe``; ``None`` infers it (:func:`infer_model_type`).
      overwrite: replace ``path`` if it already exists (the whole directory is replaced).

    Raises:
      ValueError: bad ``layout``/``dtype``/``model_type``, or a config the architecture cannot express.
      FileExistsError: ``path`` exists and ``overwrite`` is false.
    """
    require_causal(cfg, "save_hf (Mixtral/Qwen MoE architectures are causal)")
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is invalid: allowed values are {', '.join(map(repr, LAYOUTS))}")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is invalid: allowed values are {', '.join(map(repr, DTYPES))}")
    path = os.path.abspath(os.fspath(path))
    if os.path.lexists(path) and not overwrite:
        raise FileExistsError(f"{path} already exists (pass overwrite=True to replace it)")
    if cfg.mtp_depth:
        warnings.warn(f"save_hf: the model's {cfg.mtp_depth} MTP head(s) are not exported (the {model_type or 'HF'} "
                      f"architecture has no place for them); keep the moejax checkpoint to serve them",
                      stacklevel=2)
        cfg = dataclasses.replace(cfg, mtp_depth=0)
    hf_cfg = config_to_hf(cfg, model_type, dtype)
    mt = hf_cfg["model_type"]
    flat = {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param)) if p[0] != "mtp"}
    np_dt = None if dtype is None else np.dtype(jnp.dtype(dtype))
    tensors: dict[str, np.ndarray] = {}

    def write(entry: _Entry, ws: Sequence[np.ndarray]) -> None:
        for name, shape, t in zip(entry.hf, entry.hf_shapes, entry.to_hf(list(ws))):
            t = np.ascontiguousarray(t if np_dt is None else t.astype(np_dt))
            if t.shape != shape:  # a mapping bug
                raise ValueError(f"internal error: tensor {name!r} has shape {t.shape}, expected {shape}")
            tensors[name] = t

    def get(p: tuple) -> np.ndarray:
        if p not in flat:
            raise ValueError(f"model has no parameter {p}: does it match the config?")
        return flat[p]

    for e in _global_entries(cfg):
        write(e, [get(d) for d in e.dst])
    prefix = "block_sparse_moe" if (mt == "mixtral" and layout == "per_expert") else "mlp"
    for r, (kind, first, n) in enumerate(layer_runs(cfg)):
        for j in range(n):
            for e in _layer_entries(cfg, mt, first + j, kind, layout, prefix if kind == "moe" else "mlp"):
                write(e, [get(("stacks", r) + d)[j] for d in e.dst])

    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".tmp-hf-")
    try:
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf_cfg, f, indent=2)
            f.write("\n")
        save_file(dict(tensors), os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        os.chmod(tmp, 0o755)
        if os.path.lexists(path):
            old = tempfile.mkdtemp(dir=parent, prefix=".old-hf-")
            os.rename(path, os.path.join(old, "x"))
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
