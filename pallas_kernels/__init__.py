"""Pallas kernels for moejax, one module per op (kernel variants + pure-JAX reference + block-size config).

- :mod:`pallas_kernels.grouped_matmul`: :func:`gmm` / :func:`tgmm` grouped expert matmuls (custom VJP).
- :mod:`pallas_kernels.paged_attention`: ``paged_attention`` over the serving engine's paged KV pool (import
  it from the module, ``from pallas_kernels.paged_attention import paged_attention``: the package does not
  re-export the function, so ``pallas_kernels.paged_attention`` stays the module).
- :mod:`pallas_kernels.dequant_matmul`: matmul against bit-plane quantized weights (D2MoE).
- :mod:`pallas_kernels.common`: shape arithmetic and constants moejax shares (``next_pow2``, ``MASK_VALUE``).

Each public entry takes ``impl="xla"|"pallas"|"auto"`` and ``variant="gpu"|"tpu"`` (Triton or Mosaic
backend) and an ``interpret`` switch; ``"auto"`` picks a kernel only where it has been compiled for real,
validated and measured faster, otherwise the XLA path.

The names below load their module on first use (``import pallas_kernels`` alone imports no Pallas code), so
moejax layers that only need :mod:`pallas_kernels.common` do not pay for the kernels' imports.
"""

import importlib

_EXPORTS = {
    "GmmTiling": "grouped_matmul",
    "gmm": "grouped_matmul",
    "gmm_reference": "grouped_matmul",
    "tgmm": "grouped_matmul",
    "tgmm_reference": "grouped_matmul",
    "PagedAttentionConfig": "paged_attention",
    "paged_attention_reference": "paged_attention",
    "MASK_VALUE": "common",
    "next_pow2": "common",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'pallas_kernels' has no attribute {name!r}")
    return getattr(importlib.import_module(f"pallas_kernels.{mod}"), name)
