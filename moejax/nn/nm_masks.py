"""N:M masks (used by :mod:`moejax.nn.sparse`): ``n`` ones in every group of ``m`` consecutive elements along one axis, kept by magnitude.

- :func:`nm_mask`: the magnitude N:M mask along ``axis`` (the groups SR-STE and BDWP's forward mask use along
  the reduction axis; BDWP's backward mask along the output axis). Ties are broken toward the lower index
  within a group (``lax.top_k``'s order), so the mask is a deterministic function of the weights.
- :func:`transposable_mask`: one mask that is N:M along two axes at once (Hubara et al. 2021, "Accelerated
  sparse neural training"): in every ``m x m`` block, every row and every column holds ``n`` ones, chosen to
  keep the largest total magnitude. Exact, by scoring every such block pattern (90 for 2:4), so it is offered
  for ``m <= 4`` (2:8 would need millions of patterns; Hubara et al. use a min-cost-flow or greedy solver).
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np

TRANSPOSABLE_MAX_M = 4


def check_nm(n: int, m: int) -> None:
    """Raise ``ValueError`` unless ``0 < n <= m``."""
    if not (isinstance(n, int) and isinstance(m, int) and 0 < n <= m):
        raise ValueError(f"N:M sparsity needs integers 0 < n <= m, got n={n!r}, m={m!r}")


def _check_axis(shape, axis: int, m: int, what: str) -> int:
    axis = axis % len(shape)
    if shape[axis] % m:
        raise ValueError(f"{what}: axis {axis} of a weight of shape {tuple(shape)} has {shape[axis]} elements, "
                         f"not a multiple of the group size m={m}")
    return axis


def nm_mask(w: jax.Array, n: int, m: int, axis: int = 0) -> jax.Array:
    """Boolean mask of ``w``'s shape with exactly ``n`` True in every group of ``m`` consecutive elements along
    ``axis`` (the ``n`` largest ``|w|``; on a tie the lower index wins). ``w.shape[axis] % m == 0``."""
    check_nm(n, m)
    axis = _check_axis(w.shape, axis, m, "nm_mask")
    if n == m:
        return jnp.ones(w.shape, bool)
    a = jnp.moveaxis(jnp.abs(w), axis, -1)
    g = a.reshape(*a.shape[:-1], a.shape[-1] // m, m)
    _, idx = jax.lax.top_k(g, n)  # [..., G, n]; equal values: the lower index first
    keep = jnp.sum(jax.nn.one_hot(idx, m, dtype=jnp.int32), axis=-2) > 0
    return jnp.moveaxis(keep.reshape(a.shape), -1, axis)


@functools.cache
def _block_patterns(n: int, m: int) -> np.ndarray:
    """Every ``m x m`` 0/1 matrix with ``n`` ones in each row and column, ``[P, m, m]``."""
    rows = [np.array([1 if i in c else 0 for i in range(m)]) for c in itertools.combinations(range(m), n)]
    out = [np.stack(p) for p in itertools.product(rows, repeat=m) if np.all(np.sum(p, axis=0) == n)]
    return np.stack(out).astype(np.float32)


def transposable_mask(w: jax.Array, n: int, m: int, axes: tuple[int, int] = (0, 1)) -> jax.Array:
    """Boolean mask that is N:M along both ``axes`` of ``w`` (every ``m x m`` block of those two axes has ``n``
    ones per row and per column), maximizing the kept ``|w|`` of each block (first pattern on a tie).
    Other axes are independent batches. ``m <= 4`` (:data:`TRANSPOSABLE_MAX_M`)."""
    check_nm(n, m)
    if m > TRANSPOSABLE_MAX_M:
        raise ValueError(f"transposable masks are exact by enumerating block patterns and are offered for "
                         f"m <= {TRANSPOSABLE_MAX_M}; got {n}:{m}")
    a0, a1 = (_check_axis(w.shape, ax, m, "transposable_mask") for ax in axes)
    if a0 == a1:
        raise ValueError(f"transposable_mask needs two different axes, got {axes}")
    if n == m:
        return jnp.ones(w.shape, bool)
    a = jnp.moveaxis(jnp.abs(w).astype(jnp.float32), (a0, a1), (-2, -1))
    *lead, r, c = a.shape
    blocks = a.reshape(*lead, r // m, m, c // m, m)
    pats = jnp.asarray(_block_patterns(n, m))  # [P, m, m]
    score = jnp.einsum("...imjn,pmn->...ijp", blocks, pats)
    best = jnp.take(pats, jnp.argmax(score, axis=-1), axis=0) > 0  # [..., R/m, C/m, m, m]
    keep = jnp.swapaxes(best, -3, -2).reshape(*lead, r, c)
    return jnp.moveaxis(keep, (-2, -1), (a0, a1))
