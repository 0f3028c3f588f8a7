"""Expert FFNs over grouped tokens.

Routed experts are SwiGLU FFNs ``down(silu(x @ gate) * (x @ up))`` with stacked weights ``[E, D, F]`` /
``[E, F, D]``. The ways to run them over dropless routing form one table, :data:`GROUPED_IMPLS` (selected by
``MoEConfig.grouped_impl``, ``auto`` resolved by :func:`resolve_grouped_impl`; :func:`grouped_experts` runs
one end to end); the capacity path has its own buffers:

- :func:`moe_swiglu_tiles` (dropless, the CPU default): a loop over experts and, inside, over the row tiles
  of that expert (the trip count is the number of tiles actually used, so empty experts and padding cost
  nothing). Each tile gathers its tokens, runs one dense ``[block_rows, D] @ [D, F]`` SwiGLU (which XLA:CPU
  runs at dense-matmul speed) and scatter-adds its weighted output, so dispatch and combine are fused and
  no ``[T*K, D]`` buffer is written. A custom VJP runs the backward (input, combine-weight and per-expert
  weight gradients) as the same loop.
- :func:`swiglu_ragged` (dropless, the GPU/TPU default): ``jax.lax.ragged_dot``. On CPU XLA lowers it to a
  dense masked product (``E`` times the work), so it is not used there by default.
- :func:`swiglu_pallas` (dropless, ``grouped_impl="pallas"``): the ``pallas_kernels.gmm`` Pallas kernels
  (custom VJP through ``gmm``/``tgmm``); interpret mode on CPU.
- :func:`swiglu_capacity`: batched ``einsum`` over fixed ``[G, E, C, D]`` capacity buffers.
- :func:`swiglu_dense_combine` (``dense``, small batches) runs every expert on every token;
  :func:`swiglu_gather` (``gather``, a few slots) runs each slot on its own expert's gathered weights.

:func:`swiglu_reference` is the naive per-expert loop the others are tested against.

Atomic experts (OmniMoE: each expert one row of ``U`` and of ``V``, ``N`` up to 2^20) have their own table,
:data:`ATOMIC_IMPLS`: :func:`atomic_token_centric` (PEER-style gathers, the baseline) and
:func:`atomic_expert_centric` (pairs sorted by expert, custom VJP, temporaries independent of ``N``) and
:func:`atomic_pallas` (the same schedule as a Pallas kernel).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.nn import dispatch as dsp
from moejax.nn import sparse
from moejax.nn.dispatch import Layout
from moejax.nn.sharding import tensor_input, tensor_output
from moejax.nn.sparse import Dual
from pallas_kernels.common import silu_grad

_F32 = jnp.float32


def _dot(a, b, spec):
    return jnp.einsum(spec, a, b, preferred_element_type=_F32)


# ------------------------------------------------------------------------------------------ tile loop

def _tiles_forward(x, wg, wu, wd, row_weight, row_token, expert_tiles, bt, save):
    T, D = x.shape
    E, _, F = wg.shape
    R = row_token.shape[0]
    xz = jnp.concatenate([x, jnp.zeros((1, D), x.dtype)], 0)
    out = jnp.zeros((T, D), _F32)
    acts = (jnp.zeros((R, F), x.dtype), jnp.zeros((R, F), x.dtype)) if save else ()

    def expert_body(e, carry):
        wg_e, wu_e, wd_e = wg[e], wu[e], wd[e]

        def tile_body(t, c):
            out, acts = c
            r0 = t * bt
            tok = jax.lax.dynamic_slice_in_dim(row_token, r0, bt, 0)
            wr = jax.lax.dynamic_slice_in_dim(row_weight, r0, bt, 0)
            xs = jnp.take(xz, tok, axis=0)
            a = _dot(xs, wg_e, "rd,df->rf")
            b = _dot(xs, wu_e, "rd,df->rf")
            h = (jax.nn.silu(a) * b).astype(x.dtype)
            y = _dot(h, wd_e, "rf,fd->rd")
            out = out.at[tok].add(y * wr[:, None], mode="drop")
            if save:
                acts = (jax.lax.dynamic_update_slice_in_dim(acts[0], a.astype(x.dtype), r0, 0),
                        jax.lax.dynamic_update_slice_in_dim(acts[1], b.astype(x.dtype), r0, 0))
            return out, acts

        return jax.lax.fori_loop(expert_tiles[e], expert_tiles[e + 1], tile_body, carry)

    out, acts = jax.lax.fori_loop(0, E, expert_body, (out, acts))
    return out.astype(x.dtype), acts


def _tiles_backward(x, wg, wu, wd, row_weight, row_token, expert_tiles, bt, a_all, b_all, dout):
    T, D = x.shape
    E, _, F = wg.shape
    xz = jnp.concatenate([x, jnp.zeros((1, D), x.dtype)], 0)
    dz = jnp.concatenate([dout.astype(_F32), jnp.zeros((1, D), _F32)], 0)
    dx = jnp.zeros((T, D), _F32)
    dwr = jnp.zeros_like(row_weight)
    dwg, dwu, dwd = jnp.zeros_like(wg), jnp.zeros_like(wu), jnp.zeros_like(wd)

    def expert_body(e, carry):
        dx, dwr, dwg, dwu, dwd = carry
        wg_e, wu_e, wd_e = wg[e], wu[e], wd[e]

        def tile_body(t, c):
            dx, dwr, gg, gu, gd = c
            r0 = t * bt
            tok = jax.lax.dynamic_slice_in_dim(row_token, r0, bt, 0)
            wr = jax.lax.dynamic_slice_in_dim(row_weight, r0, bt, 0).astype(_F32)[:, None]
            xs = jnp.take(xz, tok, axis=0)
            do = jnp.take(dz, tok, axis=0)
            a = jax.lax.dynamic_slice_in_dim(a_all, r0, bt, 0).astype(_F32)
            b = jax.lax.dynamic_slice_in_dim(b_all, r0, bt, 0).astype(_F32)
            sa = jax.nn.silu(a)
            h = sa * b
            g = _dot(do.astype(x.dtype), wd_e, "rd,fd->rf")  # dout @ wd^T
            dwr = jax.lax.dynamic_update_slice_in_dim(dwr, jnp.sum(g * h, -1).astype(dwr.dtype), r0, 0)
            gd = gd + _dot(h.astype(x.dtype), (do * wr).astype(x.dtype), "rf,rd->fd")
            dh = g * wr
            db = (dh * sa).astype(x.dtype)
            da = (dh * b * silu_grad(a)).astype(x.dtype)
            dxs = _dot(da, wg_e, "rf,df->rd") + _dot(db, wu_e, "rf,df->rd")
            gg = gg + _dot(xs, da, "rd,rf->df")
            gu = gu + _dot(xs, db, "rd,rf->df")
            dx = dx.at[tok].add(dxs, mode="drop")
            return dx, dwr, gg, gu, gd

        z_in = jnp.zeros(wg.shape[1:], _F32)
        z_out = jnp.zeros(wd.shape[1:], _F32)
        dx, dwr, gg, gu, gd = jax.lax.fori_loop(expert_tiles[e], expert_tiles[e + 1], tile_body,
                                                (dx, dwr, z_in, z_in, z_out))
        dwg = jax.lax.dynamic_update_index_in_dim(dwg, gg.astype(wg.dtype), e, 0)
        dwu = jax.lax.dynamic_update_index_in_dim(dwu, gu.astype(wu.dtype), e, 0)
        dwd = jax.lax.dynamic_update_index_in_dim(dwd, gd.astype(wd.dtype), e, 0)
        return dx, dwr, dwg, dwu, dwd

    dx, dwr, dwg, dwu, dwd = jax.lax.fori_loop(0, E, expert_body, (dx, dwr, dwg, dwu, dwd))
    return dx.astype(x.dtype), dwg, dwu, dwd, dwr


@partial(jax.custom_vjp, nondiff_argnums=(7,))
def _moe_tiles(x, wg, wu, wd, row_weight, row_token, expert_tiles, bt):
    return _tiles_forward(x, wg, wu, wd, row_weight, row_token, expert_tiles, bt, save=False)[0]


def _moe_tiles_fwd(x, wg, wu, wd, row_weight, row_token, expert_tiles, bt):
    out, (a, b) = _tiles_forward(x, wg, wu, wd, row_weight, row_token, expert_tiles, bt, save=True)
    return out, (x, wg, wu, wd, row_weight, row_token, expert_tiles, a, b)


def _moe_tiles_bwd(bt, res, dout):
    x, wg, wu, wd, row_weight, row_token, expert_tiles, a, b = res
    dx, dwg, dwu, dwd, dwr = _tiles_backward(x, wg, wu, wd, row_weight, row_token, expert_tiles, bt, a, b,
                                             dout)
    return dx, dwg, dwu, dwd, dwr, None, None


_moe_tiles.defvjp(_moe_tiles_fwd, _moe_tiles_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(10,))
def _moe_tiles_dual(x, wg, wu, wd, bg, bu, bd, row_weight, row_token, expert_tiles, bt):
    """:func:`_moe_tiles` with backward weights ``bg, bu, bd`` for the activation gradients (N:M BDWP,
    :mod:`moejax.nn.sparse`): the forward and the weight gradients as there, ``dx`` and the combine-weight
    gradient through ``b*``; no gradient flows to ``b*``."""
    return _tiles_forward(x, wg, wu, wd, row_weight, row_token, expert_tiles, bt, save=False)[0]


def _moe_tiles_dual_fwd(x, wg, wu, wd, bg, bu, bd, row_weight, row_token, expert_tiles, bt):
    out, (a, b) = _tiles_forward(x, wg, wu, wd, row_weight, row_token, expert_tiles, bt, save=True)
    return out, (x, bg, bu, bd, row_weight, row_token, expert_tiles, a, b)


def _moe_tiles_dual_bwd(bt, res, dout):
    x, bg, bu, bd, row_weight, row_token, expert_tiles, a, b = res
    dx, dwg, dwu, dwd, dwr = _tiles_backward(x, bg, bu, bd, row_weight, row_token, expert_tiles, bt, a, b,
                                             dout)
    z = jnp.zeros_like
    return dx, dwg, dwu, dwd, z(bg), z(bu), z(bd), dwr, None, None


_moe_tiles_dual.defvjp(_moe_tiles_dual_fwd, _moe_tiles_dual_bwd)


def moe_swiglu_tiles(x: jax.Array, wg: jax.Array, wu: jax.Array, wd: jax.Array, layout: Layout,
                     weights: jax.Array, block_rows: int) -> jax.Array:
    """Fused dispatch + SwiGLU experts + combine over a dropless tiled layout.

    ``x [T, D]`` tokens, ``weights [T, K]`` combine weights, ``layout`` from
    :func:`moejax.nn.dispatch.dropless_layout` with tile ``block_rows``. Returns
    ``out[t] = sum_k weights[t, k] * expert_{e(t,k)}(x[t])`` without materializing the ``[T*K, D]`` rows:
    each tile gathers its tokens, runs its expert and scatter-adds the weighted result.
    """
    R = layout.row_token.shape[0]
    if R % block_rows:
        raise ValueError(f"layout rows ({R}) must be a multiple of block_rows ({block_rows})")
    row_weight = dsp_row_values(weights, layout)
    w = tuple(v.astype(x.dtype) for v in (wg, wu, wd))
    if any(isinstance(v, Dual) for v in w):  # N:M BDWP: backward weights for the activation gradients
        w = [v if isinstance(v, Dual) else Dual(v, v) for v in w]
        return _moe_tiles_dual(x, *(v.fwd for v in w), *(v.bwd for v in w), row_weight, layout.row_token,
                               layout.expert_tiles, block_rows)
    return _moe_tiles(x, *w, row_weight, layout.row_token, layout.expert_tiles, block_rows)


def dsp_row_values(weights: jax.Array, layout: Layout) -> jax.Array:
    """The combine weight of each layout row (0 for empty rows), float32 ``[R]``."""
    wz = jnp.concatenate([weights.reshape(-1).astype(_F32), jnp.zeros(1, _F32)])
    return jnp.take(wz, layout.row_slot, axis=0)


# ------------------------------------------------------------------------------------------ other paths

def swiglu_ragged(x: jax.Array, wg, wu, wd, layout: Layout) -> jax.Array:
    """SwiGLU experts with ``lax.ragged_dot`` over unpadded dropless rows (layout built with block_rows=1)."""
    gs = layout.group_sizes
    a = sparse.dual(_ragged, x, wg.astype(x.dtype), gs)
    b = sparse.dual(_ragged, x, wu.astype(x.dtype), gs)
    h = (jax.nn.silu(a) * b).astype(x.dtype)
    return sparse.dual(_ragged, h, wd.astype(x.dtype), gs).astype(x.dtype)


def _ragged(x, w, gs):
    return jax.lax.ragged_dot(x, w, gs, preferred_element_type=_F32)


def swiglu_pallas(x: jax.Array, wg, wu, wd, layout: Layout, *, interpret: bool | None = None) -> jax.Array:
    """SwiGLU experts with the ``pallas_kernels.gmm`` kernels over unpadded dropless rows (as
    :func:`swiglu_ragged`); ``jax.grad`` runs the ``gmm``/``tgmm`` kernels as well. ``interpret=None``:
    interpret mode unless on the kernel's backend (so on CPU it is a slow, exact test path)."""
    from pallas_kernels.grouped_matmul import gmm

    if any(isinstance(v, Dual) for v in (wg, wu, wd)):
        raise ValueError("grouped_impl='pallas' has no N:M BDWP backward (its gmm/tgmm VJP is fixed); train "
                         "sparse experts with grouped_impl 'auto', 'tiles', 'ragged_dot', 'dense' or 'gather'")
    gs = layout.group_sizes
    kw = {"impl": "pallas", "preferred_element_type": _F32, "interpret": interpret}
    a = gmm(x, wg.astype(x.dtype), gs, **kw)
    b = gmm(x, wu.astype(x.dtype), gs, **kw)
    h = (jax.nn.silu(a) * b).astype(x.dtype)
    return gmm(h, wd.astype(x.dtype), gs, **kw).astype(x.dtype)


def swiglu_capacity(x: jax.Array, wg, wu, wd) -> jax.Array:
    """SwiGLU experts over capacity buffers ``x [G, E, C, D]``.

    The products run expert-major (``[E, G*C, D]``, the batch axis leading): XLA:CPU has no kernel for a
    bfloat16 x bfloat16 -> float32 batched dot whose batch axis is not the leading one (``gecd,edf->gecf``
    fails at run time with "Unsupported element type for DotThunk::Execute").
    """
    G, E, C, D = x.shape
    xe = jnp.swapaxes(x, 0, 1).reshape(E, G * C, D)
    a = sparse.einsum("erd,edf->erf", xe, wg.astype(x.dtype), preferred_element_type=_F32)
    b = sparse.einsum("erd,edf->erf", xe, wu.astype(x.dtype), preferred_element_type=_F32)
    h = (jax.nn.silu(a) * b).astype(x.dtype)
    y = sparse.einsum("erf,efd->erd", h, wd.astype(x.dtype), preferred_element_type=_F32).astype(x.dtype)
    return jnp.swapaxes(y.reshape(E, G, C, -1), 0, 1)


def swiglu_dense_combine(x: jax.Array, wg, wu, wd, combine: jax.Array) -> jax.Array:
    """Every expert on every token, combined: ``out[t] = sum_e combine[t, e] * expert_e(x[t])``.

    ``x [T, D]``, ``combine [T, E]`` (zero for experts a token is not routed to). Exact dropless semantics at
    ``E / k`` times the active FLOPs; one batched matmul per weight, so it wins for small ``T`` (decode).
    """
    T, D = x.shape
    E = wg.shape[0]
    xe = jnp.broadcast_to(x, (E, T, D))
    a = sparse.einsum("etd,edf->etf", xe, wg.astype(x.dtype), preferred_element_type=_F32)
    b = sparse.einsum("etd,edf->etf", xe, wu.astype(x.dtype), preferred_element_type=_F32)
    h = (jax.nn.silu(a) * b * jnp.swapaxes(combine, 0, 1)[..., None].astype(_F32)).astype(x.dtype)
    y = sparse.einsum("etf,efd->etd", h, wd.astype(x.dtype), preferred_element_type=_F32)
    return jnp.sum(y, axis=0).astype(x.dtype)


def swiglu_gather(x: jax.Array, wg, wu, wd, expert_ids: jax.Array, weights: jax.Array) -> jax.Array:
    """Each token slot on its own expert's gathered weights: ``out[t] = sum_k weights[t, k] * expert_{e(t,k)}(x[t])``.

    ``x [T, D]``, ``expert_ids``/``weights [T, K]`` (weight 0 for unrouted slots). Reads only the routed experts'
    weights (copied out per slot), so for a handful of slots (one decoding sequence: ``T * K`` well below ``E``)
    it moves a fraction of the bytes the ``dense`` path reads; with many slots the copies cost more than that.
    """
    T = x.shape[0]
    K = expert_ids.shape[1]
    ids = expert_ids.reshape(-1)
    xs = jnp.repeat(x, K, axis=0)  # [T*K, D], slot s = (t, k)
    a = sparse.dual(_gathered_dot, xs, wg, ids)
    b = sparse.dual(_gathered_dot, xs, wu, ids)
    h = (jax.nn.silu(a) * b * weights.reshape(-1, 1).astype(_F32)).astype(x.dtype)
    y = sparse.dual(_gathered_dot, h, wd, ids)
    return jnp.sum(y.reshape(T, K, -1), axis=1).astype(x.dtype)


def _gathered_dot(xs, w, ids):
    """Slot ``s`` of ``xs [S, K]`` times expert ``ids[s]``'s matrix of ``w [E, K, N]`` (gathered, then cast:
    only the routed experts' weights are read)."""
    return _dot(xs, jnp.take(w, ids, axis=0).astype(xs.dtype), "sd,sdf->sf")


def swiglu(x: jax.Array, wg, wu, wd) -> jax.Array:
    """One dense SwiGLU FFN ``x [..., D]`` with ``wg, wu [D, F]``, ``wd [F, D]`` (arrays, or
    :class:`~moejax.nn.sparse.Dual` pairs under N:M BDWP)."""
    a = sparse.einsum("...d,df->...f", x, wg.astype(x.dtype), preferred_element_type=_F32)
    b = sparse.einsum("...d,df->...f", x, wu.astype(x.dtype), preferred_element_type=_F32)
    h = (jax.nn.silu(a) * b).astype(x.dtype)
    return sparse.einsum("...f,fd->...d", h, wd.astype(x.dtype), preferred_element_type=_F32).astype(x.dtype)


def swiglu_reference(x: jax.Array, wg, wu, wd, group_sizes) -> jax.Array:
    """Naive reference over contiguous unpadded groups (``group_sizes`` concrete): one FFN per expert."""
    outs, r = [], 0
    for e, n in enumerate([int(v) for v in group_sizes]):
        outs.append(swiglu(x[r:r + n], wg[e], wu[e], wd[e]))
        r += n
    outs.append(jnp.zeros((x.shape[0] - r, wd.shape[-1]), x.dtype))
    return jnp.concatenate(outs, 0)


# ------------------------------------------------------------------------------------------ the table

@dataclass(frozen=True)
class GroupedImpl:
    """One way to run routed experts over dropless routing (an entry of :data:`GROUPED_IMPLS`).

    Attributes:
      name: the ``MoEConfig.grouped_impl`` value that selects it.
      layout: the :class:`~moejax.nn.dispatch.Layout` it runs over: ``"tiles"`` (each expert's rows padded to
        a tile of ``block_rows``), ``"rows"`` (rows sorted by expert, unpadded) or ``"dense"`` (no reordering;
        statistics only).
      sorted_rows: True: ``run`` takes the token rows gathered in layout order ``[R, D]`` and returns their
        outputs (combined afterwards with the routing weights); False: ``run`` takes the tokens ``[T, D]`` and
        returns the combined output (dispatch and combine fused).
      run: ``run(x, weights, layout, expert_ids [T, K], slot_weights [T, K], block_rows)`` with ``weights`` the
        stacked ``(w_gate, w_up, w_down)``.
    """

    name: str
    layout: str
    sorted_rows: bool
    run: Callable


def _run_tiles(x, w, layout, ids, sw, block_rows):
    return moe_swiglu_tiles(x, *w, layout, sw, block_rows)


def _run_dense(x, w, layout, ids, sw, block_rows):
    return swiglu_dense_combine(x, *w, dsp.dense_combine_weights(sw, ids, w[0].shape[0]))


def _run_gather(x, w, layout, ids, sw, block_rows):
    return swiglu_gather(x, *w, ids, sw)


def _run_ragged(rows, w, layout, ids, sw, block_rows):
    return swiglu_ragged(rows, *w, layout)


def _run_pallas(rows, w, layout, ids, sw, block_rows):
    return swiglu_pallas(rows, *w, layout)


GROUPED_IMPLS: dict[str, GroupedImpl] = {g.name: g for g in (
    GroupedImpl("tiles", "tiles", False, _run_tiles),
    GroupedImpl("ragged_dot", "rows", True, _run_ragged),
    GroupedImpl("dense", "dense", False, _run_dense),
    GroupedImpl("gather", "dense", False, _run_gather),
    GroupedImpl("pallas", "rows", True, _run_pallas),
)}
"""Every grouped-compute implementation, by ``MoEConfig.grouped_impl`` name (``"auto"`` resolves to one of them
with :func:`resolve_grouped_impl`). The MoE layer's stages, the expert-parallel ragged path, offloaded serving
and :meth:`moejax.models.transformer.Block.apply_experts` all run experts through this table; a new method is a
new entry (and its name in ``moejax.config.GROUPED_IMPLS``)."""

DENSE_MAX_ROWS = 256
GATHER_SLOT_FRACTION = 2  # ``gather`` while slots * this <= experts


def resolve_grouped_impl(impl: str, tokens: int, num_experts: int, top_k: int = 1) -> str:
    """Pick the dropless grouped-compute method for a call with ``tokens`` tokens of ``top_k`` slots (static
    under jit).

    ``auto``: ``gather`` when ``tokens * top_k * GATHER_SLOT_FRACTION <= num_experts`` (a few decoding rows:
    copying out the routed experts' weights moves fewer bytes than running all of them; on a 2-core AVX-512
    CPU, 4 layers with the unrolled layer loop, trained weights: tiny (8 experts top-2) 1 / 2 / 4 slots
    1.5-2.1 / 2.7-2.9 / 2.5-2.7 ms gather against 3.4-3.8 / 5.5-6.0 / 5.4-6.4 ms dense, 8 slots 4.0 against
    6.2; tiny-e64 (64 top-4) 16 / 32 / 64 slots 5.0 / 11.1 / 35.8 ms against 15.0 / 17.0 / 20.9: gather up to
    half the experts), else ``dense`` when ``tokens * num_experts <= DENSE_MAX_ROWS``
    (small decode batches: one batched matmul over all experts beats sorting and looping), otherwise ``tiles``
    on CPU (``ragged_dot`` is a dense masked product there) and, on GPU/TPU, ``pallas`` where
    ``pallas_kernels`` lists the backend as validated and measured faster (GPUs, since an H100 run:
    ``experiments/results/gpu_check.md``), else ``ragged_dot``.
    """
    if impl != "auto":
        if impl not in GROUPED_IMPLS:
            raise ValueError(f"grouped_impl={impl!r}; allowed: 'auto', {', '.join(map(repr, GROUPED_IMPLS))}")
        return impl
    if tokens * top_k * GATHER_SLOT_FRACTION <= num_experts:
        return "gather"
    if tokens * num_experts <= DENSE_MAX_ROWS:
        return "dense"
    if jax.default_backend() == "cpu":
        return "tiles"
    from pallas_kernels.grouped_matmul import resolve_impl

    return "pallas" if resolve_impl("auto") == "pallas" else "ragged_dot"


def grouped_layout(method: str, expert_ids, mask, num_experts: int, block_rows: int | None = None):
    """The layout ``method`` runs over for slots ``expert_ids``/``mask [T, K]``, and its row tile (``tiles``:
    ``block_rows`` or :func:`~moejax.nn.dispatch.default_block_rows`; else None)."""
    kind = GROUPED_IMPLS[method].layout
    if kind == "dense":
        return dsp.dense_layout(expert_ids, mask, num_experts), None
    if kind == "rows":
        return dsp.dropless_layout(expert_ids, mask, num_experts, 1), None
    bt = block_rows or dsp.default_block_rows(expert_ids.size, num_experts)
    return dsp.dropless_layout(expert_ids, mask, num_experts, bt), bt


def grouped_experts(x, weights, expert_ids, slot_weights, mask, *, method: str, block_rows: int | None = None):
    """``out[t] = sum_k slot_weights[t, k] * expert_{expert_ids[t, k]}(x[t])`` over the slots where ``mask``,
    with the :data:`GROUPED_IMPLS` entry ``method`` (resolved, not ``"auto"``). ``x [T, D]``,
    ``expert_ids``/``slot_weights``/``mask [T, K]`` (``slot_weights`` 0 where ``mask`` is False, as routers
    give them), ``weights`` the stacked ``(w_gate, w_up, w_down)``."""
    impl = GROUPED_IMPLS[method]
    sw = slot_weights
    layout, bt = grouped_layout(method, expert_ids, mask, weights[0].shape[0], block_rows)
    if not impl.sorted_rows:
        return impl.run(x, weights, layout, expert_ids, sw, bt)
    rows = dsp.gather_rows(x, layout)
    return dsp.combine_rows(impl.run(rows, weights, layout, expert_ids, sw, bt), layout, sw)


# ------------------------------------------------------------------------------------------ modules

class SwiGLUExperts(nnx.Module):
    """``E`` stacked SwiGLU experts: ``w_gate, w_up [E, D, F]``, ``w_down [E, F, D]``."""

    SPARSE_SITE = "experts"  # N:M sparsity (moejax.nn.sparse): each expert's matrix masked on its own
    SPARSE_WEIGHTS: ClassVar[dict[str, tuple[int, int]]] = {"w_gate": (-2, -1), "w_up": (-2, -1),
                                                            "w_down": (-2, -1)}

    def __init__(self, num_experts: int, d_model: int, d_ff: int, *, init_std: float = 0.02,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        init = nnx.initializers.normal(stddev=init_std)
        self.w_gate = nnx.Param(init(rngs.params(), (num_experts, d_model, d_ff), param_dtype),
                                logical_axes=("expert", "embed", "mlp"))
        self.w_up = nnx.Param(init(rngs.params(), (num_experts, d_model, d_ff), param_dtype),
                              logical_axes=("expert", "embed", "mlp"))
        self.w_down = nnx.Param(init(rngs.params(), (num_experts, d_ff, d_model), param_dtype),
                                logical_axes=("expert", "mlp", "embed"))

    def weights(self):
        """``(w_gate, w_up, w_down)`` as the expert GEMMs multiply by them: the parameters, or their N:M
        sparse forms when :mod:`moejax.nn.sparse` is installed for ``experts`` (each expert's matrix masked
        on its own: groups along ``D`` / ``F``, the reduction axes)."""
        return tuple(sparse.sparse_weight(getattr(self, a)[...], self.SPARSE_SITE, *axes)
                     for a, axes in self.SPARSE_WEIGHTS.items())


class SwiGLU(nnx.Module):
    """A dense SwiGLU FFN (dense layers and shared experts)."""

    SPARSE_SITE = "mlp"  # N:M sparsity (moejax.nn.sparse): (reduction axis, output axis) of each weight
    SPARSE_WEIGHTS: ClassVar[dict[str, tuple[int, int]]] = {"w_gate": (-2, -1), "w_up": (-2, -1),
                                                            "w_down": (-2, -1)}

    def __init__(self, d_model: int, d_ff: int, *, init_std: float = 0.02, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        init = nnx.initializers.normal(stddev=init_std)
        self.w_gate = nnx.Param(init(rngs.params(), (d_model, d_ff), param_dtype), logical_axes=("embed", "mlp"))
        self.w_up = nnx.Param(init(rngs.params(), (d_model, d_ff), param_dtype), logical_axes=("embed", "mlp"))
        self.w_down = nnx.Param(init(rngs.params(), (d_ff, d_model), param_dtype), logical_axes=("mlp", "embed"))

    def __call__(self, x):
        """``x [..., D]``; under tensor parallelism (:mod:`moejax.nn.sharding`) gate/up are column-parallel and
        down row-parallel over ``d_ff`` (Megatron's f before, g after)."""
        w = (sparse.sparse_weight(getattr(self, a)[...], self.SPARSE_SITE, *axes)
             for a, axes in self.SPARSE_WEIGHTS.items())
        return tensor_output(swiglu(tensor_input(x), *w))


# ------------------------------------------------------------------------------ atomic experts (OmniMoE)

def _atomic_check(x, u, v, ids, weights):
    if u.shape != v.shape or u.ndim != 2 or x.shape[-1] != u.shape[1]:
        raise ValueError(f"atomic experts: U and V must both be [N, d] with d = x.shape[-1] = {x.shape[-1]}; got "
                         f"U {u.shape}, V {v.shape}")
    if ids.shape != weights.shape or ids.shape[:-1] != x.shape[:-1]:
        raise ValueError(f"atomic experts: expert_ids and weights must be [tokens, K] for x {x.shape}; got "
                         f"{ids.shape} and {weights.shape}")


def atomic_token_centric(x: jax.Array, u: jax.Array, v: jax.Array, expert_ids: jax.Array,
                         weights: jax.Array) -> jax.Array:
    """Atomic experts, token-centric (PEER-style): every token gathers its ``K`` rows of ``U`` and ``V``.

    ``y[t] = sum_k weights[t, k] * silu(x[t] . U[e]) * V[e]`` with ``e = expert_ids[t, k]``; ``x [T, d]``,
    ``U, V [N, d]``, ``expert_ids, weights [T, K]``. Reads ``T * K`` rows of each table in token order.
    """
    _atomic_check(x, u, v, expert_ids, weights)
    ug = jnp.take(u, expert_ids, axis=0).astype(x.dtype)  # [T, K, d]
    h = jnp.einsum("td,tkd->tk", x, ug, preferred_element_type=_F32)
    a = (jax.nn.silu(h) * weights.astype(_F32)).astype(x.dtype)
    vg = jnp.take(v, expert_ids, axis=0).astype(x.dtype)
    return jnp.einsum("tk,tkd->td", a, vg, preferred_element_type=_F32).astype(x.dtype)


def atomic_expert_centric(x: jax.Array, u: jax.Array, v: jax.Array, expert_ids: jax.Array,
                          weights: jax.Array) -> jax.Array:
    """Atomic experts, expert-centric (OmniMoE): the ``(token, expert)`` pairs sorted by expert.

    Same result as :func:`atomic_token_centric`. One stable sort puts the pairs of an expert next to each
    other; a loop over tiles of :data:`ATOMIC_TILE` sorted pairs gathers each tile's token rows and ``U``/``V``
    rows (consecutive pairs share a row: fetched from memory once per run of pairs, the rest from cache),
    computes the tile and scatter-adds it into the ``[T, d]`` output, so no ``[T*K, d]`` buffer is written. The
    custom VJP runs the backward as the same loop (the weight gradients' scatter-adds over sorted rows): the
    forward+backward temporaries do not depend on ``N`` (the ``[N, d]`` weight gradients are outputs).
    """
    _atomic_check(x, u, v, expert_ids, weights)
    return _atomic_ec(x, u, v, jnp.asarray(expert_ids, jnp.int32), jnp.asarray(weights))


ATOMIC_TILE = 128  # (token, expert) pairs per tile of the expert-centric loop: [tile, d] buffers stay in cache


def _ec_tile(i, e, tok, g):
    sl = partial(jax.lax.dynamic_slice_in_dim, start_index=i * ATOMIC_TILE, slice_size=ATOMIC_TILE)
    return sl(e), sl(tok), sl(g)


def _ec_rows(table, et):
    return jnp.take(table, et, axis=0, indices_are_sorted=True, mode="clip").astype(_F32)


def _atomic_ec_fwd(x, u, v, expert_ids, weights):
    from pallas_kernels.atomic_experts import sort_pairs  # lazily: it imports Pallas

    order, e, tok, g = sort_pairs(expert_ids, weights, ATOMIC_TILE)

    def body(i, y):
        et, tt, gt = _ec_tile(i, e, tok, g)
        h = jnp.sum(jnp.take(x, tt, axis=0, mode="clip").astype(_F32) * _ec_rows(u, et), axis=-1)
        return y.at[tt].add((jax.nn.silu(h) * gt)[:, None] * _ec_rows(v, et), mode="drop")

    y = jax.lax.fori_loop(0, e.shape[0] // ATOMIC_TILE, body, jnp.zeros(x.shape, _F32))
    return y.astype(x.dtype), (x, u, v, expert_ids, order, e, tok, g, jnp.zeros((0,), weights.dtype))


@jax.custom_vjp
def _atomic_ec(x, u, v, expert_ids, weights):
    return _atomic_ec_fwd(x, u, v, expert_ids, weights)[0]


def _atomic_ec_bwd(res, dy):
    from pallas_kernels.atomic_experts import unsort_pair_grads  # lazily: it imports Pallas

    x, u, v, expert_ids, order, e, tok, g, w_dtype = res
    P = ATOMIC_TILE

    def body(i, carry):
        dx, du, dv, dg = carry
        et, tt, gt = _ec_tile(i, e, tok, g)
        xt = jnp.take(x, tt, axis=0, mode="clip").astype(_F32)
        ut, vt = _ec_rows(u, et), _ec_rows(v, et)
        dyt = jnp.take(dy, tt, axis=0, mode="clip").astype(_F32)
        h = jnp.sum(xt * ut, axis=-1)
        sh = jax.nn.silu(h)
        da = jnp.sum(dyt * vt, axis=-1)
        dh = da * gt * silu_grad(h)
        dx = dx.at[tt].add(dh[:, None] * ut, mode="drop")
        du = du.at[et].add(dh[:, None] * xt, indices_are_sorted=True, mode="drop")
        dv = dv.at[et].add((sh * gt)[:, None] * dyt, indices_are_sorted=True, mode="drop")
        return dx, du, dv, jax.lax.dynamic_update_slice_in_dim(dg, da * sh, i * P, 0)

    # Two distinct zero buffers (+0.0 and -0.0, equal as numbers): with one zero constant XLA merges the two
    # broadcasts and copies it for each in-place update, an [N, d] temporary.
    init = (jnp.zeros(x.shape, _F32), jnp.zeros(u.shape, _F32), jnp.full(v.shape, -0.0, _F32),
            jnp.zeros(e.shape, _F32))
    dx, du, dv, dg = jax.lax.fori_loop(0, e.shape[0] // P, body, init)
    return (dx.astype(x.dtype), du.astype(u.dtype), dv.astype(v.dtype),
            *unsort_pair_grads(dg, order, expert_ids, w_dtype.dtype))


_atomic_ec.defvjp(_atomic_ec_fwd, _atomic_ec_bwd)


def atomic_pallas(x: jax.Array, u: jax.Array, v: jax.Array, expert_ids: jax.Array, weights: jax.Array,
                  *, interpret: bool | None = None) -> jax.Array:
    """Atomic experts by the expert-centric Pallas kernel (:mod:`pallas_kernels.atomic_experts`; Triton
    backend, interpret mode on CPU)."""
    from pallas_kernels.atomic_experts import atomic_experts

    _atomic_check(x, u, v, expert_ids, weights)
    return atomic_experts(x, u, v, expert_ids, weights, interpret=interpret)


ATOMIC_IMPLS = {"token_centric": atomic_token_centric, "expert_centric": atomic_expert_centric,
                "pallas": atomic_pallas}
