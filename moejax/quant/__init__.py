"""D²MoE quantization: Matryoshka weight quantization (nested bit-widths), a uniform int-k baseline, quantized
SwiGLU experts, the bit-width router and HEBF load ordering.

- :mod:`moejax.quant.mwq`: :class:`QuantConfig`, :func:`quantize` -> :class:`QTensor` (packed planes, byte
  accounting, decode at any nested width, numpy-dict serialization).
- :mod:`moejax.quant.experts`: :func:`quantize_experts` -> :class:`QuantizedExperts` (per expert and plane
  records for an offload store), :func:`dequantize_expert`, :func:`dequant_matmul`, :func:`quantized_swiglu`.
- :mod:`moejax.quant.bit_router`: :func:`assign_bits` (widths by importance within a budget) and
  :func:`hebf_order` (hottest-expert-bit-first load order).

The dequant-matmul kernel is :mod:`pallas_kernels.dequant_matmul`.
"""

from moejax.quant.bit_router import (
    BitAssignment,
    assign_bits,
    expert_importance,
    hebf_order,
)
from moejax.quant.experts import (
    EXPERT_TENSORS,
    QuantizedExperts,
    dequant_matmul,
    dequantize_expert,
    expert_from_arrays,
    quantize_experts,
    quantized_swiglu,
)
from moejax.quant.mwq import (
    QTensor,
    QuantConfig,
    error_bound,
    mwq_config,
    quantize,
    uniform_config,
)

__all__ = [
    "EXPERT_TENSORS",
    "BitAssignment",
    "QTensor",
    "QuantConfig",
    "QuantizedExperts",
    "assign_bits",
    "dequant_matmul",
    "dequantize_expert",
    "error_bound",
    "expert_from_arrays",
    "expert_importance",
    "hebf_order",
    "mwq_config",
    "quantize",
    "quantize_experts",
    "quantized_swiglu",
    "uniform_config",
]
