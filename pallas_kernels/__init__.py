"""Pallas kernels for moejax, one module per op (kernel variants + pure-JAX reference + block-size config).

- :mod:`pallas_kernels.grouped_matmul`: :func:`gmm` / :func:`tgmm` grouped expert matmuls (custom VJP).
- :mod:`pallas_kernels.paged_attention`: ``paged_attention`` over the serving engine's paged KV pool (import
  it from the module, ``from pallas_kernels.paged_attention import paged_attention``: the package does not
  re-export the function, so ``pallas_kernels.paged_attention`` stays the module).

Each public entry takes ``impl="xla"|"pallas"|"auto"`` and ``variant="gpu"|"tpu"`` (Triton or Mosaic
backend) and an ``interpret`` switch; ``"auto"`` picks a kernel only where it has been compiled for real,
validated and measured faster (no backend yet), otherwise the XLA path.
"""

from pallas_kernels.grouped_matmul import (
    GmmTiling,
    gmm,
    gmm_reference,
    tgmm,
    tgmm_reference,
)
from pallas_kernels.paged_attention import (
    PagedAttentionConfig,
    paged_attention_reference,
)

__all__ = [
    "GmmTiling",
    "PagedAttentionConfig",
    "gmm",
    "gmm_reference",
    "paged_attention_reference",
    "tgmm",
    "tgmm_reference",
]
