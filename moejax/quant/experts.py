"""Quantized SwiGLU experts: quantize a layer's experts, (de)serialize them per expert and per plane, and run
the experts on quantized weights.

A layer's routed experts (:class:`moejax.nn.experts.SwiGLUExperts`: ``w_gate, w_up [E, D, F]``,
``w_down [E, F, D]``) become a :class:`QuantizedExperts` of three stacked :class:`~moejax.quant.mwq.QTensor`
(reduction dimension ``D`` for gate/up, ``F`` for down). An offload store keeps each *(expert, plane)* as one
record (:meth:`QuantizedExperts.expert_plane_arrays`, :meth:`QuantizedExperts.plane_nbytes` bytes), loads the
planes it needs for the width the bit router chose, and decodes with :func:`expert_from_arrays` +
:func:`dequantize_expert` (float weights for the engine's usual paths) or runs :func:`quantized_swiglu`
directly on the packed planes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from moejax.quant.mwq import QTensor, QuantConfig, quantize
from pallas_kernels import dequant_matmul as _dqmm

EXPERT_TENSORS = ("w_gate", "w_up", "w_down")
_F32 = jnp.float32


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True)
class QuantizedExperts:
    """``E`` quantized SwiGLU experts (stacked): ``w_gate, w_up`` ``[E, D, F]``, ``w_down`` ``[E, F, D]``."""

    w_gate: QTensor
    w_up: QTensor
    w_down: QTensor

    def tree_flatten(self):
        return (self.w_gate, self.w_up, self.w_down), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children)

    def tensors(self) -> dict:
        """``{"w_gate": QTensor, "w_up": ..., "w_down": ...}`` (stacked over experts)."""
        return {name: getattr(self, name) for name in EXPERT_TENSORS}

    @property
    def config(self) -> QuantConfig:
        return self.w_gate.config

    @property
    def bits(self) -> tuple:
        """Decodable widths (``config.bits``)."""
        return tuple(self.config.bits)

    @property
    def num_planes(self) -> int:
        return len(self.config.bits)

    @property
    def num_experts(self) -> int:
        return int(self.w_gate.shape[0])

    # ------------------------------------------------------------------ bytes
    def plane_nbytes(self, p: int) -> int:
        """Bytes of plane ``p`` of **one** expert (its three tensors' codes + scales; plane 0 + zero points)."""
        return sum(t.plane_nbytes(p) for t in self.tensors().values()) // self.num_experts

    def plane_nbytes_list(self) -> list:
        """``[plane_nbytes(0), plane_nbytes(1), ...]``: the per-expert cost of each plane (bit router input)."""
        return [self.plane_nbytes(p) for p in range(self.num_planes)]

    def expert_nbytes(self, bits: int) -> int:
        """Bytes of one expert decodable at width ``bits`` (planes ``0..p``)."""
        if bits not in self.bits:
            raise ValueError(f"bits must be one of {self.bits}, got {bits!r}")
        return sum(self.plane_nbytes(p) for p in range(self.bits.index(bits) + 1))

    # ------------------------------------------------------------------ per-expert access / serialization
    def expert(self, e: int) -> dict:
        """Expert ``e``'s unstacked ``{name: QTensor}`` (2-D weights)."""
        self._check_expert(e)
        return {name: t[e] for name, t in self.tensors().items()}

    def _check_expert(self, e):
        if not isinstance(e, (int, np.integer)) or not 0 <= e < self.num_experts:
            raise ValueError(f"expert must be an int in [0, {self.num_experts}), got {e!r}")

    def expert_plane_arrays(self, e: int, p: int) -> dict:
        """Numpy arrays of plane ``p`` of expert ``e`` (one offload record): keys ``{name}.p{p}.q``,
        ``{name}.p{p}.scale`` (and ``{name}.zero`` for ``p == 0``) for each tensor. Their total ``nbytes`` is
        :meth:`plane_nbytes`."""
        out = {}
        for name, t in self.expert(e).items():
            out.update(t.plane_arrays(p, prefix=f"{name}."))
        return out

    def expert_meta_arrays(self, e: int = 0) -> dict:
        """The small ``{name}.meta`` int64 arrays describing one expert's tensors (same for every expert)."""
        return {f"{name}.meta": t.meta_array() for name, t in self.expert(e).items()}

    def expert_arrays(self, e: int, bits: int | None = None) -> dict:
        """Expert ``e`` as a flat dict of numpy arrays (meta + the planes for width ``bits``, default all)."""
        out = {}
        for name, t in self.expert(e).items():
            out.update(t.to_dict(prefix=f"{name}.", bits=bits))
        return out

    def to_dict(self) -> dict:
        """All experts (stacked) as a flat dict of numpy arrays, keys ``{name}.meta``, ``{name}.p{i}.q``, ..."""
        out = {}
        for name, t in self.tensors().items():
            out.update(t.to_dict(prefix=f"{name}."))
        return out

    @classmethod
    def from_dict(cls, d: Mapping) -> QuantizedExperts:
        """Inverse of :meth:`to_dict`."""
        return cls(*(QTensor.from_dict(d, prefix=f"{name}.") for name in EXPERT_TENSORS))

    # ------------------------------------------------------------------ decode
    def dequantize(self, bits_per_expert, dtype=jnp.float32) -> tuple:
        """Float ``(w_gate, w_up, w_down)`` ``[E, ...]`` with expert ``e`` decoded at ``bits_per_expert[e]``
        (0 or ``None``: zeros, an expert that is not used)."""
        bpe = _bits_list(bits_per_expert, self.num_experts)
        outs = []
        for t in self.tensors().values():
            per = []
            for e, b in enumerate(bpe):
                per.append(jnp.zeros(t.shape[1:], dtype) if not b else t[e].dequantize(b, dtype))
            outs.append(jnp.stack(per))
        return tuple(outs)


def _bits_list(bits_per_expert, E: int) -> list:
    if isinstance(bits_per_expert, Mapping):
        bad = [e for e in bits_per_expert if not 0 <= int(e) < E]
        if bad:
            raise ValueError(f"bits_per_expert has experts {bad} outside [0, {E})")
        return [bits_per_expert.get(e) for e in range(E)]
    if isinstance(bits_per_expert, (int, np.integer)):
        return [int(bits_per_expert)] * E
    bpe = list(bits_per_expert)
    if len(bpe) != E:
        raise ValueError(f"bits_per_expert must have one entry per expert ({E}), got {len(bpe)}")
    return [None if b is None else int(b) for b in bpe]


def quantize_experts(experts, config: QuantConfig | None = None) -> QuantizedExperts:
    """Quantize a layer's experts: a :class:`~moejax.nn.experts.SwiGLUExperts`, a ``(w_gate, w_up, w_down)``
    tuple or a dict with those keys (``[E, D, F]``, ``[E, D, F]``, ``[E, F, D]``)."""
    if isinstance(experts, Mapping):
        missing = [n for n in EXPERT_TENSORS if n not in experts]
        if missing:
            raise ValueError(f"experts dict is missing {missing} (needs {EXPERT_TENSORS})")
        ws = [experts[n] for n in EXPERT_TENSORS]
    elif isinstance(experts, (tuple, list)):
        if len(experts) != 3:
            raise ValueError(f"experts tuple must be (w_gate, w_up, w_down), got {len(experts)} items")
        ws = list(experts)
    elif hasattr(experts, "weights"):
        ws = list(experts.weights())
    else:
        raise TypeError(f"experts must be SwiGLUExperts, a (w_gate, w_up, w_down) tuple or a dict, got "
                        f"{type(experts).__name__}")
    ws = [np.asarray(w) for w in ws]
    for name, w in zip(EXPERT_TENSORS, ws):
        if w.ndim != 3:
            raise ValueError(f"{name} must be 3-D [E, in, out], got shape {w.shape}")
    E, D, F = ws[0].shape
    if ws[1].shape != (E, D, F) or ws[2].shape != (E, F, D):
        raise ValueError(f"expert shapes must be w_gate/w_up [E, D, F] and w_down [E, F, D], got "
                         f"{[w.shape for w in ws]}")
    return QuantizedExperts(*(quantize(w, config) for w in ws))


def expert_from_arrays(arrays: Mapping) -> dict:
    """One expert's ``{name: QTensor}`` from a flat dict holding ``{name}.meta`` and any prefix of its planes
    (e.g. :meth:`QuantizedExperts.expert_meta_arrays` merged with the plane records a cache holds)."""
    return {name: QTensor.from_dict(arrays, prefix=f"{name}.") for name in EXPERT_TENSORS}


def dequantize_expert(expert: Mapping, bits: int, dtype=jnp.float32) -> tuple:
    """Float ``(w_gate, w_up, w_down)`` of one expert (``{name: QTensor}`` or its flat array dict) at ``bits``."""
    if f"{EXPERT_TENSORS[0]}.meta" in expert:
        expert = expert_from_arrays(expert)
    return tuple(expert[name].dequantize(bits, dtype) for name in EXPERT_TENSORS)


# ------------------------------------------------------------------------------------------ compute

def dequant_matmul(x: jax.Array, qweight: QTensor, bits: int | None = None, *, impl: str = "auto",
                   preferred_element_type=None, interpret: bool | None = None,
                   tiling: _dqmm.DequantTiling | None = None) -> jax.Array:
    """``x [M, K] @ dequant(qweight at width bits) [K, N]``: ``impl="xla"`` dequantizes then dots,
    ``"pallas"`` runs :mod:`pallas_kernels.dequant_matmul`'s kernel on the packed planes (only the planes up
    to ``bits`` are read), ``"auto"`` picks per :func:`pallas_kernels.dequant_matmul.resolve_impl`.
    ``qweight`` must be 2-D (one expert: ``qexperts.w_gate[e]``)."""
    if not isinstance(qweight, QTensor):
        raise TypeError(f"qweight must be a QTensor, got {type(qweight).__name__}")
    if len(qweight.shape) != 2:
        raise ValueError(f"qweight must be a 2-D [K, N] QTensor (index experts first), got shape {qweight.shape}")
    bits = qweight.bits_available[-1] if bits is None else bits
    n = qweight.num_planes(bits)
    if x.ndim != 2 or x.shape[1] != qweight.shape[0]:
        raise ValueError(f"x must be [M, {qweight.shape[0]}], got shape {tuple(x.shape)}")
    c = qweight.config
    to = jnp.asarray
    return _dqmm.dequant_matmul(x, tuple(to(a) for a in qweight.planes[:n]), tuple(to(a) for a in qweight.scales[:n]),
                                to(qweight.zero), plane_bits=c.plane_bits[:n], group_size=c.group_size,
                                base_offset=c.base_offset, impl=impl, tiling=tiling,
                                preferred_element_type=preferred_element_type, interpret=interpret)


def _expert_items(qexperts, bits_per_expert):
    if isinstance(qexperts, QuantizedExperts):
        E = qexperts.num_experts
        bpe = _bits_list(bits_per_expert, E)
        return [(e, qexperts.expert(e), b) for e, b in enumerate(bpe) if b]
    if isinstance(qexperts, Mapping):
        bpe = dict(bits_per_expert) if isinstance(bits_per_expert, Mapping) else dict(enumerate(bits_per_expert))
        items = []
        for e, b in sorted(bpe.items()):
            if not b:
                continue
            if e not in qexperts:
                raise ValueError(f"bits_per_expert gives expert {e} {b} bits but it is not among the experts "
                                 f"passed ({sorted(qexperts)})")
            q = qexperts[e]
            items.append((e, expert_from_arrays(q) if f"{EXPERT_TENSORS[0]}.meta" in q else q, int(b)))
        return items
    raise TypeError(f"qexperts must be QuantizedExperts or a mapping expert -> expert, got {type(qexperts).__name__}")


def quantized_swiglu(x: jax.Array, qexperts, bits_per_expert, expert_ids: jax.Array, weights: jax.Array, *,
                     impl: str = "auto", interpret: bool | None = None,
                     tiling: _dqmm.DequantTiling | None = None) -> jax.Array:
    """MoE experts + combine on quantized weights: ``out[t] = sum_k weights[t, k] * expert_{ids[t, k]}(x[t])``.

    Args:
      x: ``[T, D]`` tokens.
      qexperts: :class:`QuantizedExperts`, or a mapping ``expert id -> {name: QTensor}`` (or that expert's flat
        array dict) holding only the experts a cache has loaded.
      bits_per_expert: width per expert (a sequence of ``E``, a mapping, or one int); 0/``None`` = the expert is
        skipped (its routed tokens get no contribution from it: give every routed expert a width). Static.
      expert_ids, weights: ``[T, K]`` routing (ids int, combine weights float).
      impl: ``"xla"`` | ``"pallas"`` | ``"auto"`` for the dequant-matmuls (see :func:`dequant_matmul`).

    Each expert with a width runs its SwiGLU on all ``T`` tokens, weighted by its combine weight per token
    (zero for tokens not routed to it): exact dropless semantics at (experts with a width) / ``K`` times the
    active FLOPs, which suits decode batches. Jit it with ``bits_per_expert`` static.
    """
    if x.ndim != 2:
        raise ValueError(f"x must be [T, D], got shape {tuple(x.shape)}")
    if expert_ids.shape != weights.shape or expert_ids.ndim != 2 or expert_ids.shape[0] != x.shape[0]:
        raise ValueError(f"expert_ids and weights must both be [T={x.shape[0]}, K], got {tuple(expert_ids.shape)} "
                         f"and {tuple(weights.shape)}")
    kw = {"impl": impl, "interpret": interpret, "tiling": tiling, "preferred_element_type": _F32}
    out = jnp.zeros(x.shape, _F32)
    for e, q, b in _expert_items(qexperts, bits_per_expert):
        comb = jnp.sum(jnp.where(expert_ids == e, weights.astype(_F32), 0.0), axis=-1)
        a = dequant_matmul(x, q["w_gate"], b, **kw)
        u = dequant_matmul(x, q["w_up"], b, **kw)
        h = (jax.nn.silu(a) * u).astype(x.dtype)
        out = out + comb[:, None] * dequant_matmul(h, q["w_down"], b, **kw)
    return out.astype(x.dtype)

