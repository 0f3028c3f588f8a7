"""Atomic experts (OmniMoE): ``y[t] = sum_k g[t, k] * silu(x[t] . U[e]) * V[e]``, ``e = ids[t, k]``.

Expert-centric, as OmniMoE schedules it: the ``(token, expert)`` pairs are sorted by expert (a stable sort,
padded to whole tiles of ``tile`` pairs with weight-0 pairs that add nothing), and the kernel runs one program
per tile. Each program loads its tile's expert ids, token ids and weights, gathers the tile's token rows and
``U``/``V`` rows (consecutive pairs share rows: one expert's rows are read once per run of pairs) and computes
the tile's pair rows ``silu(x . u) * g * v`` ``[tile, d]``; XLA then sums the pair rows of each token
(``segment_sum``). The custom VJP's backward kernel computes, per pair, ``dh * u`` (the input gradient's rows),
``dh * x`` and ``silu(h) * g * dy`` (the two tables' gradient rows, summed by XLA over sorted ids) and the
weight gradient ``(dy . v) * silu(h)``. No atomics: every program writes only its own tile.

Written for the **Triton** Pallas backend (array-indexed loads from whole-array blocks); on CPU it runs in
interpret mode. There is no TPU (Mosaic) variant. :func:`atomic_experts_reference` is the plain per-pair XLA
computation it is tested against. Its Triton IR is built and verified from CPU (``tests/test_pallas_lowering``);
it has never been compiled or run on a GPU (``experiments/gpu_check.py``'s ``omnimoe`` step does that where
one is lent).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from pallas_kernels import _compat
from pallas_kernels.common import silu_grad

DEFAULT_TILE = 128
_F32 = jnp.float32


def atomic_experts_reference(x, u, v, expert_ids, weights):
    """Plain XLA: every pair's row, summed per token. ``x [T, d]``, ``u, v [N, d]``, ``expert_ids, weights [T, K]``."""
    h = jnp.einsum("td,tkd->tk", x.astype(_F32), jnp.take(u, expert_ids, axis=0).astype(_F32))
    a = jax.nn.silu(h) * weights.astype(_F32)
    return jnp.einsum("tk,tkd->td", a, jnp.take(v, expert_ids, axis=0).astype(_F32)).astype(x.dtype)


def _fwd_kernel(e_ref, t_ref, g_ref, x_ref, u_ref, v_ref, o_ref):
    e, t, g = e_ref[...], t_ref[...], g_ref[...]
    xr = x_ref[t, :].astype(_F32)
    ur = u_ref[e, :].astype(_F32)
    h = jnp.sum(xr * ur, axis=-1)
    o_ref[...] = ((jax.nn.silu(h) * g)[:, None] * v_ref[e, :].astype(_F32)).astype(o_ref.dtype)


def _bwd_kernel(e_ref, t_ref, g_ref, x_ref, u_ref, v_ref, dy_ref, dx_ref, du_ref, dv_ref, dg_ref):
    e, t, g = e_ref[...], t_ref[...], g_ref[...]
    xr = x_ref[t, :].astype(_F32)
    ur = u_ref[e, :].astype(_F32)
    vr = v_ref[e, :].astype(_F32)
    dyr = dy_ref[t, :].astype(_F32)
    h = jnp.sum(xr * ur, axis=-1)
    sh = jax.nn.silu(h)
    da = jnp.sum(dyr * vr, axis=-1)
    dh = da * g * silu_grad(h)
    dx_ref[...] = dh[:, None] * ur
    du_ref[...] = dh[:, None] * xr
    dv_ref[...] = (sh * g)[:, None] * dyr
    dg_ref[...] = da * sh


def sort_pairs(expert_ids, weights, tile):
    """``(order, e, tok, g)``: the ``(token, expert)`` pairs stably sorted by expert, padded to whole tiles of
    ``tile`` pairs with expert 0, token 0, weight 0 (pairs that add nothing). Shared with
    :func:`moejax.nn.experts.atomic_expert_centric`."""
    K = expert_ids.shape[1]
    flat = expert_ids.reshape(-1).astype(jnp.int32)
    order = jnp.argsort(flat, stable=True)
    pad = -flat.shape[0] % tile
    e = jnp.pad(flat[order], (0, pad))
    tok = jnp.pad((order // K).astype(jnp.int32), (0, pad))
    g = jnp.pad(weights.reshape(-1)[order].astype(_F32), (0, pad))
    return order, e, tok, g


def unsort_pair_grads(dg, order, expert_ids, weights_dtype):
    """``(d_expert_ids, d_weights)`` for a custom VJP over :func:`sort_pairs`: the per-pair weight gradients
    ``dg`` (in sorted order, padded) put back in ``[T, K]`` token order, and the float0 zeros of the ids."""
    T, K = expert_ids.shape
    dw = jnp.zeros((T * K,), _F32).at[order].set(dg[:T * K], unique_indices=True).reshape(T, K)
    return np.zeros(expert_ids.shape, jax.dtypes.float0), dw.astype(weights_dtype)


def _call(kernel, n_tiles, tile, ins_full, outs, interpret):
    pair = pl.BlockSpec((tile,), lambda i: (i,))
    full = [pl.BlockSpec(a.shape, lambda i, nd=a.ndim: (0,) * nd) for a in ins_full]
    def row_block(s):
        rest = (0,) * (len(s.shape) - 1)
        return pl.BlockSpec((tile,) + s.shape[1:], lambda i: (i, *rest))

    out_specs = [row_block(s) for s in outs]
    return pl.pallas_call(kernel, grid=(n_tiles,), in_specs=[pair, pair, pair, *full],
                          out_specs=out_specs if len(outs) > 1 else out_specs[0],
                          out_shape=outs if len(outs) > 1 else outs[0], interpret=interpret,
                          compiler_params=_compat.gpu_compiler_params(4, 1))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _atomic(x, u, v, expert_ids, weights, tile, interpret):
    return _atomic_fwd(x, u, v, expert_ids, weights, tile, interpret)[0]


def _atomic_fwd(x, u, v, expert_ids, weights, tile, interpret):
    T = expert_ids.shape[0]
    order, e, tok, g = sort_pairs(expert_ids, weights, tile)
    n = e.shape[0] // tile
    rows = _call(_fwd_kernel, n, tile, (x, u, v), [jax.ShapeDtypeStruct((e.shape[0], x.shape[1]), _F32)],
                 interpret)(e, tok, g, x, u, v)
    y = jax.ops.segment_sum(rows, tok, num_segments=T).astype(x.dtype)
    return y, (x, u, v, expert_ids, order, e, tok, g, jnp.zeros((0,), weights.dtype))


def _atomic_bwd(tile, interpret, res, dy):
    x, u, v, expert_ids, order, e, tok, g, w_dtype = res
    T = expert_ids.shape[0]
    P, d = e.shape[0], x.shape[1]
    row = jax.ShapeDtypeStruct((P, d), _F32)
    dxr, dur, dvr, dg = _call(_bwd_kernel, P // tile, tile, (x, u, v, dy),
                              [row, row, row, jax.ShapeDtypeStruct((P,), _F32)], interpret)(e, tok, g, x, u, v, dy)
    dx = jax.ops.segment_sum(dxr, tok, num_segments=T).astype(x.dtype)
    du = jax.ops.segment_sum(dur, e, num_segments=u.shape[0], indices_are_sorted=True).astype(u.dtype)
    dv = jax.ops.segment_sum(dvr, e, num_segments=v.shape[0], indices_are_sorted=True).astype(v.dtype)
    return (dx, du, dv, *unsort_pair_grads(dg, order, expert_ids, w_dtype.dtype))


_atomic.defvjp(_atomic_fwd, _atomic_bwd)


def atomic_experts(x, u, v, expert_ids, weights, *, tile: int = DEFAULT_TILE, interpret: bool | None = None):
    """Atomic experts by the expert-centric kernel (differentiable: a custom VJP with its own kernel).

    Args:
      x: ``[T, d]`` tokens. u, v: ``[N, d]`` tables. expert_ids: ``[T, K]`` int. weights: ``[T, K]``.
      tile: pairs per program (a power of two for the Triton backend).
      interpret: ``None``: interpret unless on a GPU.
    """
    if u.shape != v.shape or u.ndim != 2 or x.ndim != 2 or x.shape[1] != u.shape[1]:
        raise ValueError(f"atomic_experts: x [T, d] and u, v [N, d] with one d; got x {x.shape}, u {u.shape}, "
                         f"v {v.shape}")
    if expert_ids.shape != weights.shape or expert_ids.shape[0] != x.shape[0]:
        raise ValueError(f"atomic_experts: expert_ids and weights must be [T={x.shape[0]}, K]; got "
                         f"{expert_ids.shape} and {weights.shape}")
    if tile < 1 or tile & (tile - 1):
        raise ValueError(f"atomic_experts: tile must be a power of two, got {tile}")
    interpret = _compat.resolve_interpret(interpret, "gpu")
    return _atomic(x, u, v, jnp.asarray(expert_ids, jnp.int32), jnp.asarray(weights), tile, interpret)
