"""N:M sparse training with bidirectional weight pruning (BDWP), beside SR-STE and transposable masks.

The mechanism sits in the layers, because the trainer applies ``TrainConfig.sparsity`` (and ``train`` does not
import paper packages): :mod:`moejax.nn.nm_masks` (N:M and transposable masks), :mod:`moejax.nn.sparse` (the
projection hook, the BDWP custom VJP, the methods, :func:`sparse_training`, inference masking). This package
re-exports them with the step accounting of :mod:`moejax.sparsity.macs`.

Switch it on with ``TrainConfig(sparsity=SparsityConfig(n=2, m=8, method="bdwp"))`` or
``moejax train --sparsity 2:8 --sparsity-method bdwp``; a checkpoint trained so loads (``generate``, ``serve``,
``eval``, ``export``) as the N:M-sparse model.
"""

from moejax.config import SPARSITY_METHODS, SPARSITY_SITES, SparsityConfig
from moejax.nn.nm_masks import nm_mask, transposable_mask
from moejax.nn.sparse import (
    Dual,
    apply_forward_masks,
    backward_mask,
    forward_mask,
    make_sparse_ops,
    mask_flip_rate,
    masked,
    sparse_training,
    sparse_weights,
)
from moejax.sparsity.macs import GEMM_KINDS, step_macs, token_macs

__all__ = [
    "GEMM_KINDS",
    "SPARSITY_METHODS",
    "SPARSITY_SITES",
    "Dual",
    "SparsityConfig",
    "apply_forward_masks",
    "backward_mask",
    "forward_mask",
    "make_sparse_ops",
    "mask_flip_rate",
    "masked",
    "nm_mask",
    "sparse_training",
    "sparse_weights",
    "step_macs",
    "token_macs",
    "transposable_mask",
]
