"""Grouped matrix multiplication for MoE experts: ``gmm`` and its transpose ``tgmm``, as Pallas kernels.

Rows of ``lhs [M, K]`` are sorted by group (expert): group ``g`` owns rows
``offsets[g] : offsets[g] + group_sizes[g]`` with ``offsets = cumsum(group_sizes) - group_sizes``; the sizes
are known only at run time (the output of routing). ``sum(group_sizes) <= M`` is required (the kernels
truncate groups at row ``M``; ``lax.ragged_dot`` leaves it undefined); rows past the sum (padding) produce
zeros.

- :func:`gmm` ``(lhs [M, K], rhs [G, K, N], group_sizes [G]) -> [M, N]``: ``out[rows of g] = lhs[rows of g] @
  rhs[g]`` (``rhs[g].T`` with ``transpose_rhs=True``, ``rhs [G, N, K]``).
- :func:`tgmm` ``(lhs [M, K], rhs [M, N], group_sizes [G]) -> [G, K, N]``: ``out[g] = lhs[rows of g].T @
  rhs[rows of g]`` (the weight gradient; zeros for an empty group). Note ``lhs`` is ``[M, K]``, not the
  transposed ``[K, M]`` that megablox's ``tgmm`` takes.

``gmm`` is a ``jax.custom_vjp``: with ``impl="pallas"``, ``jax.grad`` computes ``d lhs = gmm(d out, rhs^T)``
and ``d rhs = tgmm(lhs, d out)`` with the kernels as well.

Implementations (``impl``):

- ``"xla"``: ``jax.lax.ragged_dot`` / ``jax.lax.ragged_dot_general`` (native on GPU/TPU, a dense masked
  product on CPU). :func:`gmm_reference` / :func:`tgmm_reference` are separate naive masked-loop references
  the tests compare everything against.
- ``"pallas"``: one of two kernel variants (``variant``):

  * ``"gpu"``: written for the **Triton** Pallas backend (``jax.experimental.pallas.triton``; plain
    ``pl.pallas_call`` with Triton compiler params, no TPU-specific grid spec). jax 0.11 deprecates that
    backend (a ``DeprecationWarning`` at lowering; it still works); a Mosaic GPU port is future work. ``gmm``: a grid of ``(M / tm) * (N / tn)`` output tiles (launched in
    ``group_m``-row swizzled order); an output tile loops over the groups that overlap its rows (at most one extra tile per group
    boundary), and for each over ``K / tk`` with rows outside the group masked to zero, so every output
    tile is written exactly once (padding rows get zeros). ``tgmm``: grid ``(G, K / tk, N / tn)``, each
    program loops over the row tiles of its group (none for an empty group, which writes zeros). On CPU it
    runs in Pallas interpret mode.
  * ``"tpu"``: **Mosaic** TPU kernels in the style of megablox (``jax/experimental/pallas/ops/tpu/megablox``,
    Apache-2.0): group offsets, per-grid-step group ids and row-tile ids are scalar-prefetched
    (``PrefetchScalarGridSpec``), the grid visits only the active row tiles, and an output tile shared by
    two groups is revisited consecutively with masked stores. Never run on a TPU yet; on CPU it runs in the
    TPU interpreter (``pltpu.InterpretParams``).

- ``"auto"``: the kernel only on backends where it has been compiled for real, validated and measured faster
  than ``"xla"`` (:data:`VALIDATED_FASTER`), else ``"xla"``. Today that is the GPU variant on GPUs: on one
  H100 (jax 0.11.2, ``experiments/results/gpu_check.md``) it passed every check and ran 4.8-5.3x faster than
  ``lax.ragged_dot`` (which XLA lowers to a dense masked product there; at 64 experts it runs out of memory)
  at 0.50-0.71 of a dense ``jnp.dot`` with the same FLOPs (the issue's 0.85 target is not met). The TPU
  variant has never run on a TPU.

Block sizes come from :class:`GmmTiling` (``None``: :func:`default_tiling`, the best of the H100 sweep on the
GPU variant); tiles larger than a (rounded-up) dimension are clamped to it and
dimensions that are not tile multiples are zero-padded around the kernel (a copy of the operand; avoid it on
hot paths by using tile-multiple dimensions). Accumulation is float32; the output dtype is ``lhs.dtype``
unless ``preferred_element_type`` says otherwise.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import _compat, common
from pallas_kernels._compat import SUPPORTED_DTYPES, VARIANTS, pltpu

IMPLS = ("xla", "pallas", "auto")
# (variant, backend) pairs where the kernel was compiled for real, checked against the reference and measured
# faster than the XLA path by experiments/gpu_check.py. "auto" uses the kernel only there: the GPU variant on
# GPUs since an H100 run (experiments/results/gpu_check.md); add a pair together with its committed results.
VALIDATED_FASTER: frozenset = frozenset({("gpu", "gpu")})

_F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class GmmTiling:
    """Block sizes of the grouped-matmul kernels.

    Attributes:
      tm: rows (tokens) per tile. GPU: a power of two >= 16; TPU: a multiple of 8.
      tk: contraction (``K``) tile. GPU: a power of two >= 16; TPU: a multiple of 128.
      tn: output-column (``N``) tile. GPU: a power of two >= 16; TPU: a multiple of 128.
      num_warps, num_stages: Triton launch parameters (GPU variant only). ``num_warps=None``: Triton's default;
        ``num_stages=None``: 3, or fewer where 3 pipelined operand tiles would not fit in shared memory.
      group_m: GPU ``gmm`` launch order: programs run in groups of ``group_m`` row tiles that sweep the
        column tiles together, so concurrently running programs share ``rhs`` column blocks in L2 (the
        usual Triton matmul swizzle; 1 = row-major order).
    """

    tm: int = 128
    tk: int = 128
    tn: int = 128
    num_warps: int | None = None
    num_stages: int | None = None
    group_m: int = 8

    def validate(self, variant: str) -> GmmTiling:
        for name in ("tm", "tk", "tn"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"GmmTiling.{name} must be a positive int, got {v!r}")
            if variant == "gpu" and (not common.is_pow2(v) or v < 16):
                raise ValueError(f"GmmTiling.{name}={v}: the GPU (Triton) variant needs a power of two >= 16")
        if variant == "tpu":
            if self.tm % 8:
                raise ValueError(f"GmmTiling.tm={self.tm}: the TPU variant needs a multiple of 8")
            for name in ("tk", "tn"):
                if getattr(self, name) % 128:
                    raise ValueError(f"GmmTiling.{name}={getattr(self, name)}: the TPU variant needs a "
                                     "multiple of 128")
        for name in ("num_warps", "num_stages"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v <= 0):
                raise ValueError(f"GmmTiling.{name} must be None or a positive int, got {v!r}")
        if not isinstance(self.group_m, int) or isinstance(self.group_m, bool) or self.group_m <= 0:
            raise ValueError(f"GmmTiling.group_m must be a positive int, got {self.group_m!r}")
        return self


def _fit(tile: int, dim: int, variant: str, *, rows: bool) -> int:
    """Clamp a tile to a small dimension (keeping the variant's alignment rules)."""
    if variant == "gpu":
        return min(tile, max(16, common.next_pow2(dim)))
    align = 8 if rows else 128
    return min(tile, common.round_up(max(dim, 1), align))


# ------------------------------------------------------------------------------------------ validation

def _check_impl(impl):
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


def _check_variant(variant):
    if variant is None:
        return _compat.default_variant()
    if variant not in VARIANTS:
        raise ValueError(f"variant must be None or one of {VARIANTS}, got {variant!r}")
    return variant


def _check_float(name, x):
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{name} must be an array, got {type(x).__name__}")
    if jnp.dtype(x.dtype) not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} dtype must be one of float32, bfloat16, float16; got {x.dtype}")


def _check_group_sizes(group_sizes, G):
    if not hasattr(group_sizes, "shape") or not hasattr(group_sizes, "dtype"):
        raise TypeError(f"group_sizes must be an int32 array, got {type(group_sizes).__name__}")
    if group_sizes.dtype != jnp.int32:
        raise TypeError(f"group_sizes must be int32, got {group_sizes.dtype}")
    if group_sizes.shape != (G,):
        raise ValueError(f"group_sizes must have shape ({G},) (one size per group of rhs), got "
                         f"{tuple(group_sizes.shape)}")


def _validate_gmm(lhs, rhs, group_sizes, transpose_rhs):
    _check_float("lhs", lhs)
    _check_float("rhs", rhs)
    if lhs.ndim != 2:
        raise ValueError(f"lhs must be 2-D [M, K], got shape {tuple(lhs.shape)}")
    if rhs.ndim != 3:
        raise ValueError(f"rhs must be 3-D [G, K, N] ([G, N, K] with transpose_rhs), got shape {tuple(rhs.shape)}")
    if lhs.dtype != rhs.dtype:
        raise TypeError(f"lhs and rhs must have the same dtype, got {lhs.dtype} and {rhs.dtype}")
    k_rhs = rhs.shape[2] if transpose_rhs else rhs.shape[1]
    if lhs.shape[1] != k_rhs:
        raise ValueError(f"contraction mismatch: lhs is {tuple(lhs.shape)} and rhs is {tuple(rhs.shape)} "
                         f"(transpose_rhs={transpose_rhs})")
    if rhs.shape[0] < 1:
        raise ValueError("rhs must have at least one group")
    _check_group_sizes(group_sizes, rhs.shape[0])


def _validate_tgmm(lhs, rhs, group_sizes, num_groups):
    _check_float("lhs", lhs)
    _check_float("rhs", rhs)
    if lhs.ndim != 2 or rhs.ndim != 2:
        raise ValueError(f"tgmm: lhs [M, K] and rhs [M, N] must be 2-D, got {tuple(lhs.shape)} and "
                         f"{tuple(rhs.shape)}")
    if lhs.shape[0] != rhs.shape[0]:
        raise ValueError(f"tgmm: lhs and rhs must have the same rows, got {tuple(lhs.shape)} and {tuple(rhs.shape)}")
    if lhs.dtype != rhs.dtype:
        raise TypeError(f"lhs and rhs must have the same dtype, got {lhs.dtype} and {rhs.dtype}")
    _check_group_sizes(group_sizes, num_groups)


# ------------------------------------------------------------------------------------------ references

def _row_groups(group_sizes, M):
    """Group id of each row (``G`` for rows past ``sum(group_sizes)``)."""
    ends = jnp.cumsum(group_sizes)
    return jnp.searchsorted(ends, jnp.arange(M, dtype=jnp.int32), side="right").astype(jnp.int32)


def gmm_reference(lhs, rhs, group_sizes, *, transpose_rhs: bool = False, preferred_element_type=None):
    """Naive pure-JAX ``gmm``: a loop over groups of a masked dense product (``G`` times the FLOPs)."""
    M = lhs.shape[0]
    out_dtype = preferred_element_type or lhs.dtype
    gid = _row_groups(group_sizes, M)
    spec = "mk,nk->mn" if transpose_rhs else "mk,kn->mn"

    def body(g, acc):
        y = jnp.einsum(spec, lhs, rhs[g], preferred_element_type=_F32)
        return jnp.where((gid == g)[:, None], y, acc)

    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    return lax.fori_loop(0, rhs.shape[0], body, jnp.zeros((M, n), _F32)).astype(out_dtype)


def tgmm_reference(lhs, rhs, group_sizes, *, preferred_element_type=None):
    """Naive pure-JAX ``tgmm``: ``out[g] = (lhs * [row in g]).T @ rhs`` for each group."""
    G = group_sizes.shape[0]
    gid = _row_groups(group_sizes, lhs.shape[0])
    out_dtype = preferred_element_type or lhs.dtype

    def one(g):
        xm = jnp.where((gid == g)[:, None], lhs, jnp.zeros_like(lhs))
        return jnp.einsum("mk,mn->kn", xm, rhs, preferred_element_type=_F32)

    return lax.map(one, jnp.arange(G)).astype(out_dtype)


def _gmm_xla(lhs, rhs, group_sizes, transpose_rhs, out_dtype):
    if transpose_rhs:
        rhs = jnp.swapaxes(rhs, 1, 2)
    return lax.ragged_dot(lhs, rhs, group_sizes, preferred_element_type=_F32).astype(out_dtype)


def _tgmm_xla(lhs, rhs, group_sizes, out_dtype):
    dims = lax.RaggedDotDimensionNumbers(dot_dimension_numbers=(([0], [0]), ([], [])),
                                         lhs_ragged_dimensions=[0], rhs_group_dimensions=[])
    return lax.ragged_dot_general(lhs, rhs, group_sizes, dims, preferred_element_type=_F32).astype(out_dtype)


# ------------------------------------------------------------------------------------------ GPU (Triton) kernels

def default_tiling(variant: str, op: str = "gmm") -> GmmTiling:
    """Block sizes used when ``tiling=None``: per kernel on the GPU variant (the fastest of the tiling sweep in
    ``experiments/gpu_check.py`` on an H100, 8 experts top-2 at 16384 tokens: ``gmm`` 256x64x128 and ``tgmm``
    64x128x256, 8 warps), 128x128x128 on the TPU variant. Tiles are clamped to small dimensions."""
    if op not in ("gmm", "tgmm"):
        raise ValueError(f"op must be 'gmm' or 'tgmm', got {op!r}")
    if variant == "gpu":
        return GmmTiling(256, 64, 128, num_warps=8) if op == "gmm" else GmmTiling(64, 128, 256, num_warps=8)
    return GmmTiling()


def _swizzle(pid, tiles_m, tiles_n, group_m):
    """Program id -> (row tile, column tile), ``group_m`` row tiles at a time (non-negative int math only)."""
    group_m = min(group_m, tiles_m)
    per_group = group_m * tiles_n
    first_m = lax.div(pid, per_group) * group_m
    size_m = jnp.minimum(tiles_m - first_m, group_m)
    r = lax.rem(pid, per_group)
    return first_m + lax.rem(r, size_m), lax.div(r, size_m)


_SMEM_BUDGET = 200 * 1024  # bytes of shared memory the software pipeline may use (H100: 227 KiB per block)


def _gpu_stages(num_stages, stage_bytes):
    """Triton pipeline depth: the caller's, or (``None``) 3 reduced until ``stages * stage_bytes`` fits."""
    if num_stages is not None:
        return num_stages
    stages = 3
    while stages > 1 and stages * stage_bytes > _SMEM_BUDGET:
        stages -= 1
    return stages


def _gmm_gpu_call(lhs, rhs, group_sizes, *, tm, tk, tn, transpose_rhs, out_dtype, interpret, num_warps,
                  num_stages, group_m):
    M, K = lhs.shape
    N = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    tiles_m, tiles_n, tiles_k = M // tm, N // tn, K // tk
    ends = jnp.cumsum(group_sizes).astype(jnp.int32)
    starts = ends - group_sizes
    offsets = jnp.concatenate([jnp.zeros(1, jnp.int32), ends])
    lo = jnp.arange(tiles_m, dtype=jnp.int32) * tm
    hi = jnp.minimum(lo + tm, ends[-1])
    g_first = jnp.searchsorted(ends, lo, side="right").astype(jnp.int32)  # first group ending after lo
    g_stop = jnp.searchsorted(starts, hi, side="left").astype(jnp.int32)  # groups starting before hi
    # A row tile wholly inside one group (the common case) needs no row mask: its operands go straight from
    # the pipelined loads to the tensor-core dot.
    g_safe = jnp.minimum(g_first, group_sizes.shape[0] - 1)
    whole = ((g_stop - g_first == 1) & (offsets[g_safe] <= lo) & (offsets[g_safe + 1] >= lo + tm)).astype(jnp.int32)
    dims = (((1,), (1,)), ((), ())) if transpose_rhs else (((1,), (0,)), ((), ()))

    def kernel(gfirst_ref, gstop_ref, whole_ref, off_ref, x_ref, w_ref, o_ref):
        i, j = _swizzle(pl.program_id(0), tiles_m, tiles_n, group_m)
        g0, g1 = gfirst_ref[i], gstop_ref[i]

        def k_loop(g, acc, mask):
            def k_body(kk, acc):
                x = x_ref[pl.ds(i * tm, tm), pl.ds(kk * tk, tk)]
                if mask is not None:
                    x = jnp.where(mask, x, jnp.zeros_like(x))
                if transpose_rhs:
                    w = w_ref[g, pl.ds(j * tn, tn), pl.ds(kk * tk, tk)]
                else:
                    w = w_ref[g, pl.ds(kk * tk, tk), pl.ds(j * tn, tn)]
                return acc + lax.dot_general(x, w, dims, preferred_element_type=_F32)

            return lax.fori_loop(0, tiles_k, k_body, acc)

        def one_group(acc):
            return k_loop(g0, acc, None)

        def mixed(acc):
            rows = i * tm + lax.broadcasted_iota(jnp.int32, (tm, tk), 0)

            def group_body(g, acc):
                g_lo, g_hi = off_ref[g], off_ref[g + 1]
                mask = (rows >= g_lo) & (rows < g_hi)
                return lax.cond(g_hi > g_lo, lambda a: k_loop(g, a, mask), lambda a: a, acc)

            return lax.fori_loop(g0, g1, group_body, acc)

        acc = lax.cond(whole_ref[i] == 1, one_group, mixed, jnp.zeros((tm, tn), _F32))
        o_ref[...] = acc.astype(o_ref.dtype)

    full = pl.BlockSpec()
    stage_bytes = (tm * tk + tk * tn) * lhs.dtype.itemsize
    return pl.pallas_call(
        kernel,
        grid=(tiles_m * tiles_n,),
        in_specs=[full] * 6,
        out_specs=pl.BlockSpec((tm, tn), lambda p: _swizzle(p, tiles_m, tiles_n, group_m)),
        out_shape=jax.ShapeDtypeStruct((M, N), out_dtype),
        compiler_params=_compat.gpu_compiler_params(num_warps, _gpu_stages(num_stages, stage_bytes)),
        interpret=interpret,
        name=f"gmm_gpu_{tm}x{tk}x{tn}",
    )(g_first, g_stop, whole, offsets, lhs, rhs)


def _tgmm_gpu_call(lhs, rhs, group_sizes, *, tm, tk, tn, out_dtype, interpret, num_warps, num_stages):
    K = lhs.shape[1]
    N = rhs.shape[1]
    G = group_sizes.shape[0]
    offsets = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(group_sizes).astype(jnp.int32)])
    dims = (((0,), (0,)), ((), ()))

    def kernel(off_ref, x_ref, y_ref, o_ref):
        g, a, c = pl.program_id(0), pl.program_id(1), pl.program_id(2)
        g_lo, g_hi = off_ref[g], off_ref[g + 1]
        nonempty = g_hi > g_lo

        def tile(t, acc, masked):
            x = x_ref[pl.ds(t * tm, tm), pl.ds(a * tk, tk)]
            y = y_ref[pl.ds(t * tm, tm), pl.ds(c * tn, tn)]
            if masked:  # only x: a zero row of x zeroes that row's whole contribution
                xr = t * tm + lax.broadcasted_iota(jnp.int32, (tm, tk), 0)
                x = jnp.where((xr >= g_lo) & (xr < g_hi), x, jnp.zeros_like(x))
            return acc + lax.dot_general(x, y, dims, preferred_element_type=_F32)

        # Row tiles wholly inside the group run unmasked; the (at most two) partial tiles at its ends masked.
        t_in0 = (g_lo + tm - 1) // tm
        t_in1 = jnp.where(nonempty, g_hi // tm, t_in0)
        acc = lax.fori_loop(t_in0, jnp.maximum(t_in0, t_in1), lambda t, acc: tile(t, acc, False),
                            jnp.zeros((tk, tn), _F32))
        t_head, t_tail = g_lo // tm, g_hi // tm
        do_head = nonempty & (g_lo % tm != 0)
        do_tail = nonempty & (g_hi % tm != 0) & ~(do_head & (t_tail == t_head))
        acc = lax.cond(do_head, lambda a_: tile(t_head, a_, True), lambda a_: a_, acc)
        acc = lax.cond(do_tail, lambda a_: tile(t_tail, a_, True), lambda a_: a_, acc)
        o_ref[...] = acc.astype(o_ref.dtype)

    full = pl.BlockSpec()
    stage_bytes = (tm * tk + tm * tn) * lhs.dtype.itemsize
    return pl.pallas_call(
        kernel,
        grid=(G, K // tk, N // tn),
        in_specs=[full, full, full],
        out_specs=pl.BlockSpec((None, tk, tn), lambda g, a, c: (g, a, c)),
        out_shape=jax.ShapeDtypeStruct((G, K, N), out_dtype),
        compiler_params=_compat.gpu_compiler_params(num_warps, _gpu_stages(num_stages, stage_bytes)),
        interpret=interpret,
        name=f"tgmm_gpu_{tm}x{tk}x{tn}",
    )(offsets, lhs, rhs)


# ------------------------------------------------------------------------------------------ TPU (Mosaic) kernels

def _group_metadata(group_sizes, m, tm, visit_empty_groups):
    """megablox ``make_group_metadata`` without sharding: (offsets [G+1], group_ids, m_tile_ids), n_tiles.

    Grid step ``s`` works on row tile ``m_tile_ids[s]`` for group ``group_ids[s]``; a row tile that two or
    more groups share is visited once per group, consecutively, so its output block stays resident.
    """
    G = group_sizes.shape[0]
    ends = jnp.cumsum(group_sizes).astype(jnp.int32)
    offsets = jnp.concatenate([jnp.zeros(1, jnp.int32), ends])
    rounded_ends = ((ends + tm - 1) // tm * tm).astype(jnp.int32)
    starts = offsets[:-1]
    rounded_starts = starts // tm * tm
    rounded_sizes = jnp.where(group_sizes == 0, 0, rounded_ends - rounded_starts)
    group_tiles = rounded_sizes // tm
    if visit_empty_groups:
        group_tiles = jnp.where(group_sizes == 0, 1, group_tiles)
    tiles_m = m // tm
    group_ids = jnp.repeat(jnp.arange(G, dtype=jnp.int32), group_tiles, total_repeat_length=tiles_m + G - 1)
    partial_tile_mask = jnp.logical_or((starts % tm) == 0, group_sizes == 0)
    if visit_empty_groups:
        partial_tile_mask = jnp.where(group_sizes == 0, False, partial_tile_mask)
    partial_tile_ids = jnp.where(partial_tile_mask, tiles_m, starts // tm)
    tile_visits = jnp.histogram(partial_tile_ids, bins=tiles_m, range=(0, tiles_m - 1))[0] + 1
    m_tile_ids = jnp.repeat(jnp.arange(tiles_m, dtype=jnp.int32), tile_visits.astype(jnp.int32),
                            total_repeat_length=tiles_m + G - 1)
    return (offsets, group_ids, m_tile_ids), jnp.sum(group_tiles).astype(jnp.int32)


def _gmm_tpu_call(lhs, rhs, group_sizes, *, tm, tk, tn, transpose_rhs, out_dtype, interpret):
    M, K = lhs.shape
    N = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    tiles_k, tiles_n = K // tk, N // tn
    meta, num_tiles = _group_metadata(group_sizes, M, tm, visit_empty_groups=False)
    dims = (((1,), (1,)), ((), ())) if transpose_rhs else (((1,), (0,)), ((), ()))

    def kernel(meta_offsets, meta_gids, meta_mids, x_ref, w_ref, o_ref, acc_ref):
        s, kk = pl.program_id(1), pl.program_id(2)

        @pl.when(kk == 0)
        def _():
            acc_ref[...] = jnp.zeros_like(acc_ref)

        acc_ref[...] += lax.dot_general(x_ref[...], w_ref[...], dims, preferred_element_type=_F32)

        @pl.when(kk == tiles_k - 1)
        def _():
            g = meta_gids[s]
            rows = meta_mids[s] * tm + lax.broadcasted_iota(jnp.int32, (tm, tn), 0)
            mask = (rows >= meta_offsets[g]) & (rows < meta_offsets[g + 1])
            o_ref[...] = jnp.where(mask, acc_ref[...], o_ref[...].astype(_F32)).astype(o_ref.dtype)

    def x_map(n, s, kk, offs, gids, mids):
        return mids[s], kk

    def w_map(n, s, kk, offs, gids, mids):
        return (gids[s], n, kk) if transpose_rhs else (gids[s], kk, n)

    def o_map(n, s, kk, offs, gids, mids):
        return mids[s], n

    w_block = (None, tn, tk) if transpose_rhs else (None, tk, tn)
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((M, N), out_dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            in_specs=[pl.BlockSpec((tm, tk), x_map), pl.BlockSpec(w_block, w_map)],
            out_specs=pl.BlockSpec((tm, tn), o_map),
            grid=(tiles_n, num_tiles, tiles_k),
            scratch_shapes=[_compat.tpu_vmem((tm, tn), _F32)],
        ),
        compiler_params=_compat.tpu_compiler_params(("parallel", "arbitrary", "arbitrary")),
        interpret=_compat.tpu_interpret_arg(interpret),
        name=f"gmm_tpu_{tm}x{tk}x{tn}",
    )(*meta, lhs, rhs)
    # Row tiles past sum(group_sizes) are never visited: zero them (the kernel leaves them uninitialized).
    valid = jnp.arange(M, dtype=jnp.int32)[:, None] < meta[0][-1]
    return jnp.where(valid, out, jnp.zeros_like(out))


def _tgmm_tpu_call(lhs, rhs, group_sizes, *, tm, tk, tn, out_dtype, interpret):
    M, K = lhs.shape
    N = rhs.shape[1]
    G = group_sizes.shape[0]
    meta, num_tiles = _group_metadata(group_sizes, M, tm, visit_empty_groups=True)

    def kernel(meta_offsets, meta_gids, meta_mids, x_ref, y_ref, o_ref, acc_ref):
        s = pl.program_id(2)
        g = meta_gids[s]
        prev_g = meta_gids[jnp.maximum(s - 1, 0)]

        @pl.when((s == 0) | (prev_g != g))
        def _():
            acc_ref[...] = jnp.zeros_like(acc_ref)

        g_lo, g_hi = meta_offsets[g], meta_offsets[g + 1]

        @pl.when(g_hi > g_lo)
        def _():
            r0 = meta_mids[s] * tm
            xr = r0 + lax.broadcasted_iota(jnp.int32, (tm, tk), 0)
            yr = r0 + lax.broadcasted_iota(jnp.int32, (tm, tn), 0)
            x = jnp.where((xr >= g_lo) & (xr < g_hi), x_ref[...].astype(_F32), 0.0).astype(x_ref.dtype)
            y = jnp.where((yr >= g_lo) & (yr < g_hi), y_ref[...].astype(_F32), 0.0).astype(y_ref.dtype)
            acc_ref[...] += lax.dot_general(x, y, (((0,), (0,)), ((), ())), preferred_element_type=_F32)

        last = s == pl.num_programs(2) - 1
        next_g = meta_gids[jnp.where(last, s, s + 1)]

        @pl.when(last | (next_g != g))
        def _():
            o_ref[...] = acc_ref[...].astype(o_ref.dtype)

    def x_map(n, a, s, offs, gids, mids):
        return mids[s], a

    def y_map(n, a, s, offs, gids, mids):
        return mids[s], n

    def o_map(n, a, s, offs, gids, mids):
        return gids[s], a, n

    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((G, K, N), out_dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            in_specs=[pl.BlockSpec((tm, tk), x_map), pl.BlockSpec((tm, tn), y_map)],
            out_specs=pl.BlockSpec((None, tk, tn), o_map),
            grid=(N // tn, K // tk, num_tiles),
            scratch_shapes=[_compat.tpu_vmem((tk, tn), _F32)],
        ),
        compiler_params=_compat.tpu_compiler_params(("parallel", "arbitrary", "arbitrary")),
        interpret=_compat.tpu_interpret_arg(interpret),
        name=f"tgmm_tpu_{tm}x{tk}x{tn}",
    )(*meta, lhs, rhs)


# ------------------------------------------------------------------------------------------ padding + dispatch

@dataclasses.dataclass(frozen=True)
class _Static:
    variant: str
    tiling: GmmTiling | None  # None: default_tiling(variant, op) for each kernel
    interpret: bool
    transpose_rhs: bool
    out_dtype: object


def _pad_to(x, axis, mult):
    n = x.shape[axis]
    pad = -n % mult
    if not pad:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths)


def _clip_sizes(group_sizes, M):
    """Negative sizes -> 0 and groups truncated at row ``M`` (so the kernels never index past the rows)."""
    ends = jnp.minimum(jnp.cumsum(jnp.maximum(group_sizes, 0)), M).astype(jnp.int32)
    return jnp.diff(ends, prepend=jnp.zeros(1, jnp.int32))


def _gmm_kernel(lhs, rhs, group_sizes, st: _Static, transpose_rhs: bool):
    M, K = lhs.shape
    N = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    if M == 0 or N == 0 or K == 0:
        return jnp.zeros((M, N), st.out_dtype)
    v = st.variant
    t = st.tiling or default_tiling(v, "gmm")
    tm, tk, tn = _fit(t.tm, M, v, rows=True), _fit(t.tk, K, v, rows=False), _fit(t.tn, N, v, rows=False)
    x = _pad_to(_pad_to(lhs, 0, tm), 1, tk)
    k_axis, n_axis = (2, 1) if transpose_rhs else (1, 2)
    w = _pad_to(_pad_to(rhs, k_axis, tk), n_axis, tn)
    gs = _clip_sizes(group_sizes, M)
    if v == "gpu":
        out = _gmm_gpu_call(x, w, gs, tm=tm, tk=tk, tn=tn, transpose_rhs=transpose_rhs, out_dtype=st.out_dtype,
                            interpret=st.interpret, num_warps=t.num_warps, num_stages=t.num_stages,
                            group_m=t.group_m)
    else:
        out = _gmm_tpu_call(x, w, gs, tm=tm, tk=tk, tn=tn, transpose_rhs=transpose_rhs, out_dtype=st.out_dtype,
                            interpret=st.interpret)
    return out[:M, :N]


def _tgmm_kernel(lhs, rhs, group_sizes, st: _Static):
    M, K = lhs.shape
    N = rhs.shape[1]
    if M == 0 or N == 0 or K == 0:
        return jnp.zeros((group_sizes.shape[0], K, N), st.out_dtype)
    v = st.variant
    t = st.tiling or default_tiling(v, "tgmm")
    tm, tk, tn = _fit(t.tm, M, v, rows=True), _fit(t.tk, K, v, rows=False), _fit(t.tn, N, v, rows=False)
    x = _pad_to(_pad_to(lhs, 0, tm), 1, tk)
    y = _pad_to(_pad_to(rhs, 0, tm), 1, tn)
    gs = _clip_sizes(group_sizes, M)
    if v == "gpu":
        out = _tgmm_gpu_call(x, y, gs, tm=tm, tk=tk, tn=tn, out_dtype=st.out_dtype, interpret=st.interpret,
                             num_warps=t.num_warps, num_stages=t.num_stages)
    else:
        out = _tgmm_tpu_call(x, y, gs, tm=tm, tk=tk, tn=tn, out_dtype=st.out_dtype, interpret=st.interpret)
    return out[:, :K, :N]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _gmm_pallas(lhs, rhs, group_sizes, st: _Static):
    return _gmm_kernel(lhs, rhs, group_sizes, st, st.transpose_rhs)


def _gmm_pallas_fwd(lhs, rhs, group_sizes, st):
    return _gmm_kernel(lhs, rhs, group_sizes, st, st.transpose_rhs), (lhs, rhs, group_sizes)


def _gmm_pallas_bwd(st, res, dout):
    lhs, rhs, group_sizes = res
    dout = dout.astype(lhs.dtype)
    # d lhs[rows of g] = d out[rows of g] @ rhs[g]^T: the same kernel with the rhs transpose flipped.
    dst = dataclasses.replace(st, out_dtype=lhs.dtype)
    dlhs = _gmm_kernel(dout, rhs, group_sizes, dst, not st.transpose_rhs)
    drhs = _tgmm_kernel(lhs, dout, group_sizes, dataclasses.replace(st, out_dtype=rhs.dtype))
    if st.transpose_rhs:
        drhs = jnp.swapaxes(drhs, 1, 2)
    return dlhs, drhs, None


_gmm_pallas.defvjp(_gmm_pallas_fwd, _gmm_pallas_bwd)


def resolve_impl(impl: str, variant: str | None = None) -> str:
    """``"auto"`` -> ``"pallas"`` only where ``(variant, backend)`` is in :data:`VALIDATED_FASTER`."""
    _check_impl(impl)
    if impl != "auto":
        return impl
    v = _check_variant(variant)
    return "pallas" if (v, _compat.backend()) in VALIDATED_FASTER else "xla"


def _prepare(impl, variant, tiling, interpret):
    impl = resolve_impl(impl, variant)
    variant = _check_variant(variant)
    if tiling is not None:
        if not isinstance(tiling, GmmTiling):
            raise TypeError(f"tiling must be a GmmTiling or None, got {type(tiling).__name__}")
        tiling.validate(variant)
    return impl, variant, tiling, _compat.resolve_interpret(interpret, variant)


def gmm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, impl: str = "auto",
        tiling: GmmTiling | None = None, variant: str | None = None, transpose_rhs: bool = False,
        preferred_element_type=None, interpret: bool | None = None) -> jax.Array:
    """Grouped matmul ``out[rows of g] = lhs[rows of g] @ rhs[g]``; rows past ``sum(group_sizes)`` are zero.

    Args:
      lhs: ``[M, K]`` rows sorted by group (float32, bfloat16 or float16).
      rhs: ``[G, K, N]`` (``[G, N, K]`` with ``transpose_rhs``), same dtype as ``lhs``.
      group_sizes: int32 ``[G]``, non-negative, ``sum <= M``.
      impl: ``"xla"`` (``lax.ragged_dot``), ``"pallas"`` (the kernel) or ``"auto"`` (see module docstring).
      tiling: :class:`GmmTiling` (``None``: :func:`default_tiling` per kernel; clamped to small dimensions).
      variant: ``"gpu"`` (Triton backend) or ``"tpu"`` (Mosaic backend); ``None`` picks by backend (``tpu`` on
        TPU, else ``gpu``).
      transpose_rhs: use ``rhs[g].T``.
      preferred_element_type: output dtype (default ``lhs.dtype``); accumulation is always float32.
      interpret: run the Pallas kernel in interpret mode; ``None`` = interpret unless on the variant's backend.

    Differentiable in ``lhs`` and ``rhs``; with ``impl="pallas"`` the backward pass runs ``gmm`` and
    :func:`tgmm` kernels too. Shapes, dtypes and tiling are validated before anything is traced.
    """
    if not isinstance(transpose_rhs, bool):
        raise TypeError(f"transpose_rhs must be a bool, got {transpose_rhs!r}")
    _validate_gmm(lhs, rhs, group_sizes, transpose_rhs)
    impl, variant, tiling, interpret = _prepare(impl, variant, tiling, interpret)
    out_dtype = jnp.dtype(preferred_element_type or lhs.dtype)
    if impl == "xla":
        return _gmm_xla(lhs, rhs, group_sizes, transpose_rhs, out_dtype)
    return _gmm_pallas(lhs, rhs, group_sizes, _Static(variant, tiling, interpret, transpose_rhs, out_dtype))


def tgmm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, impl: str = "auto",
         tiling: GmmTiling | None = None, variant: str | None = None, preferred_element_type=None,
         interpret: bool | None = None) -> jax.Array:
    """Transposed grouped matmul ``out[g] = lhs[rows of g].T @ rhs[rows of g]`` -> ``[G, K, N]``.

    ``lhs [M, K]``, ``rhs [M, N]`` (same dtype), ``group_sizes`` int32 ``[G]``; an empty group gives zeros and
    rows past ``sum(group_sizes)`` are ignored. Other arguments as :func:`gmm` (``impl="xla"`` uses
    ``lax.ragged_dot_general`` with a ragged contracting dimension). Not differentiable with ``"pallas"``.
    """
    if not hasattr(group_sizes, "shape"):
        raise TypeError(f"group_sizes must be an int32 array, got {type(group_sizes).__name__}")
    G = group_sizes.shape[0] if group_sizes.ndim == 1 else -1
    _validate_tgmm(lhs, rhs, group_sizes, G)
    impl, variant, tiling, interpret = _prepare(impl, variant, tiling, interpret)
    out_dtype = jnp.dtype(preferred_element_type or lhs.dtype)
    if impl == "xla":
        return _tgmm_xla(lhs, rhs, group_sizes, out_dtype)
    return _tgmm_kernel(lhs, rhs, group_sizes, _Static(variant, tiling, interpret, False, out_dtype))
