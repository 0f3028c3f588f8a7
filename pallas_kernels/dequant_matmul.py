"""Dequantize-and-matmul over group-quantized, bit-plane-packed weights (D²MoE's MWQ and uniform int-k).

``out [M, N] = x [M, K] @ dequant(W) [K, N]`` where ``W`` is stored as one or more *planes* of small unsigned
integers, each with a per-group float scale, plus a per-group float ``zero`` (offset). Groups run along the
reduction dimension ``K`` (``group_size`` rows of ``W`` share a scale); ``K`` is padded up to ``Kp``, a
multiple of ``group_size`` (``x`` is zero-padded to match, so padded rows of ``W`` never contribute).

Dequantization (all in float32; ``g = row // group_size``; plane 0 is the *base*)::

    W[r, n] = zero[g, n] + scale_0[g, n] * (q_0[r, n] + base_offset)
              + sum_{p >= 1} scale_p[g, n] * (q_p[r, n] - (2**k_p - 1) / 2)

``base_offset`` is 0.5 for the mid-rise MWQ base and 0 for a mid-tread uniform quantizer; the residual planes
(``p >= 1``) are symmetric mid-rise quantizers centred on zero. :mod:`moejax.quant.mwq` produces these
arrays; this module owns the packed layout and the math, so the quantizer, the XLA path and the kernel agree.

**Packed layout** (``k``-bit plane, ``k`` in 1, 2, 4, 8; ``per = 8 // k`` values per byte): a plane is a
``uint8 [Kp * k / 8, N]`` array. Inside each group of ``G = group_size`` rows, byte row ``b``
(``0 <= b < G / per``) holds the rows ``b + j * G / per`` for ``j = 0 .. per - 1``, value ``j`` in bits
``[j * k, (j + 1) * k)``. So ``(byte >> j * k) & (2**k - 1)`` over the group's ``G / per`` byte rows is the
*contiguous* row block ``[j * G / per, (j + 1) * G / per)`` of the group: a kernel unpacks a plane with one
shift and mask per block and no interleaving. Leading batch dimensions (e.g. experts) are allowed in the
reference functions: ``[..., Kp * k / 8, N]``.

Implementations (``impl``):

- ``"xla"``: :func:`dequantize_reference` then one ``dot`` (float32 accumulation).
- ``"pallas"``: the ``"gpu"`` variant, written for the **Triton** Pallas backend (plain ``pl.pallas_call``
  with Triton compiler params). Grid ``(Mp / tm, N / tn)``; each program loops over the ``Kp / G`` groups and,
  inside a group, over row chunks of ``c = G * min(k) / 8`` rows (a static unroll): it loads the chunk's byte
  rows of every plane, unpacks and dequantizes them into a ``[c, tn]`` float32 tile (never writing the
  dequantized weight to memory) and accumulates ``x[:, chunk] @ tile``. On CPU it runs in Pallas interpret
  mode. There is no TPU (Mosaic) variant yet: ``variant="tpu"`` raises.
- ``"auto"``: the kernel only where ``(variant, backend)`` is in :data:`VALIDATED_FASTER` (the GPU variant on
  GPUs) **and** ``x`` has at most :data:`AUTO_MAX_ROWS` rows, else ``"xla"``. On one H100 (jax 0.11.2,
  ``experiments/results/gpu_check_dequant.md``; K 4096, N 14336, groups of 128) the kernel passed its checks
  and at 16 rows (decode) ran 1.8x (int8), 3.4x (int4) and 1.35x (MWQ 2+1+1 bits) faster than the XLA path,
  but at 2048 rows (prefill) it ran at 0.24-0.52x of it (0.49-0.89x with the best tiling of
  ``gpu_check_dequant_sweep.md``): there dequantizing once and calling the dense matmul wins.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import _compat, common
from pallas_kernels._compat import SUPPORTED_DTYPES

IMPLS = ("xla", "pallas", "auto")
KERNEL_VARIANTS = ("gpu",)
PLANE_BITS = (1, 2, 4, 8)
SCALE_DTYPES = (jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))
# (variant, backend) pairs where the kernel was compiled for real, checked against the reference and measured
# faster than the XLA path (experiments/gpu_check.py). "auto" uses the kernel only there: the GPU variant on
# GPUs since a lent GPU's run (experiments/results/gpu_check_dequant.md).
VALIDATED_FASTER: frozenset = frozenset({("gpu", "gpu")})
# "auto" picks the kernel only up to this many rows of x (measured faster at 16 rows, slower at 2048).
AUTO_MAX_ROWS = 16

_F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class DequantTiling:
    """Block sizes of the dequant-matmul kernel.

    Attributes:
      tm: rows of ``x`` per program: a power of two >= 16 (clamped down to small ``M``).
      tn: output columns per program: a power of two >= 16 (clamped down to small ``N``).
      num_warps, num_stages: Triton launch parameters (``None`` = Triton's defaults).
    """

    tm: int = 64
    tn: int = 128
    num_warps: int | None = None
    num_stages: int | None = None

    def validate(self) -> DequantTiling:
        for name in ("tm", "tn"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 16 or not common.is_pow2(v):
                raise ValueError(f"DequantTiling.{name} must be a power of two >= 16, got {v!r}")
        for name in ("num_warps", "num_stages"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
                raise ValueError(f"DequantTiling.{name} must be None or a positive int, got {v!r}")
        return self


# ------------------------------------------------------------------------------------------ layout + reference

def _plane_consts(k: int):
    return 8 // k, (1 << k) - 1, ((1 << k) - 1) / 2.0


def unpack_plane(packed, k: int, group_size: int):
    """Unpack a ``k``-bit plane ``uint8 [..., Kp * k / 8, N]`` to int32 ``[..., Kp, N]`` (see module docstring)."""
    per, mask, _ = _plane_consts(k)
    *lead, rows, n = packed.shape
    gb = group_size // per
    p = packed.reshape(*lead, rows // gb, 1, gb, n).astype(jnp.int32)
    # one shift per sub-row, broadcast: an elementwise op XLA fuses and vectorizes (a stack of ``per`` shifted
    # copies lowers to a concatenate that XLA:CPU did not vectorize on AVX2: 3-8x slower decodes at >= 3 bits)
    shifts = (jnp.arange(per, dtype=jnp.int32) * k).reshape(per, 1, 1)
    q = (p >> shifts) & mask  # [..., groups, per, gb, N]
    return q.reshape(*lead, rows * per, n)


def dequantize_reference(planes, scales, zero, *, plane_bits, group_size: int, base_offset: float = 0.5,
                         dtype=jnp.float32):
    """Dequantize packed planes to ``[..., Kp, N]`` (float32 math, cast to ``dtype``); pure JAX.

    ``planes[p]``: ``uint8 [..., Kp * plane_bits[p] / 8, N]``; ``scales[p]``, ``zero``: ``[..., Kp / G, N]``.
    Only the planes passed are used (pass a prefix of the planes to decode at a lower width).
    """
    def expand(s):
        s = jnp.asarray(s).astype(_F32)
        return jnp.repeat(s, group_size, axis=-2)

    k0 = plane_bits[0]
    w = expand(zero) + expand(scales[0]) * (unpack_plane(planes[0], k0, group_size).astype(_F32) + base_offset)
    for p in range(1, len(planes)):
        _, _, half = _plane_consts(plane_bits[p])
        w = w + expand(scales[p]) * (unpack_plane(planes[p], plane_bits[p], group_size).astype(_F32) - half)
    return w.astype(dtype)


def dequant_matmul_reference(x, planes, scales, zero, *, plane_bits, group_size: int, base_offset: float = 0.5,
                             preferred_element_type=None):
    """Pure-JAX ``x @ dequantize_reference(...)[:K]`` (the weight cast to ``x.dtype``, float32 accumulation)."""
    out_dtype = preferred_element_type or x.dtype
    w = dequantize_reference(planes, scales, zero, plane_bits=plane_bits, group_size=group_size,
                             base_offset=base_offset, dtype=x.dtype)
    w = w[:x.shape[-1]]
    return jnp.einsum("mk,kn->mn", x, w, preferred_element_type=_F32).astype(out_dtype)


# ------------------------------------------------------------------------------------------ validation

def _validate(x, planes, scales, zero, plane_bits, group_size, base_offset):
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"x must be an array, got {type(x).__name__}")
    if jnp.dtype(x.dtype) not in SUPPORTED_DTYPES:
        raise TypeError(f"x dtype must be one of float32, bfloat16, float16; got {x.dtype}")
    if x.ndim != 2:
        raise ValueError(f"x must be 2-D [M, K], got shape {tuple(x.shape)}")
    if not isinstance(planes, (tuple, list)) or not planes:
        raise ValueError("planes must be a non-empty tuple of uint8 arrays (base plane first)")
    plane_bits = tuple(plane_bits)
    if len(plane_bits) != len(planes) or not isinstance(scales, (tuple, list)) or len(scales) != len(planes):
        raise ValueError(f"planes ({len(planes)}), scales ({len(scales) if hasattr(scales, '__len__') else '?'}) "
                         f"and plane_bits ({len(plane_bits)}) must have the same length")
    for k in plane_bits:
        if k not in PLANE_BITS:
            raise ValueError(f"plane_bits entries must be one of {PLANE_BITS}, got {plane_bits}")
    if not isinstance(group_size, int) or group_size <= 0 or group_size % 8:
        raise ValueError(f"group_size must be a positive multiple of 8, got {group_size!r}")
    if base_offset not in (0.0, 0.5):
        raise ValueError(f"base_offset must be 0.5 (mid-rise) or 0.0 (mid-tread), got {base_offset!r}")
    if not hasattr(zero, "shape") or zero.ndim != 2:
        raise ValueError(f"zero must be a 2-D [Kp / group_size, N] array, got {getattr(zero, 'shape', zero)!r}")
    n_groups, N = zero.shape
    Kp = n_groups * group_size
    if jnp.dtype(zero.dtype) not in SCALE_DTYPES:
        raise TypeError(f"zero dtype must be float16 or float32, got {zero.dtype}")
    for p, (q, s, k) in enumerate(zip(planes, scales, plane_bits)):
        if not hasattr(q, "dtype") or q.dtype != jnp.uint8:
            raise TypeError(f"planes[{p}] must be a uint8 array, got {getattr(q, 'dtype', type(q).__name__)}")
        if tuple(q.shape) != (Kp * k // 8, N):
            raise ValueError(f"planes[{p}] ({k}-bit) must have shape {(Kp * k // 8, N)} for Kp={Kp}, N={N}; got "
                             f"{tuple(q.shape)}")
        if not hasattr(s, "dtype") or jnp.dtype(s.dtype) != jnp.dtype(zero.dtype) or tuple(s.shape) != (n_groups, N):
            raise ValueError(f"scales[{p}] must be {jnp.dtype(zero.dtype).name} of shape {(n_groups, N)}, got "
                             f"{getattr(s, 'dtype', None)} {tuple(getattr(s, 'shape', ()))}")
    K = x.shape[1]
    if not (Kp - group_size < K <= Kp):
        raise ValueError(f"x has K={K} columns but the weight has Kp={Kp} padded rows (group_size={group_size}): "
                         f"need {Kp - group_size} < K <= {Kp}")
    return plane_bits


def _check_impl(impl):
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


def _check_variant(variant):
    if variant is None:
        return "gpu"
    if variant not in KERNEL_VARIANTS:
        raise ValueError(f"variant must be None or one of {KERNEL_VARIANTS} (no TPU dequant-matmul kernel yet), "
                         f"got {variant!r}")
    return variant


def chunk_rows(plane_bits, group_size: int) -> int:
    """Rows of ``W`` the kernel dequantizes at a time: ``group_size * min(plane_bits) / 8``."""
    return group_size * min(plane_bits) // 8


def _check_kernel_shapes(plane_bits, group_size):
    c = chunk_rows(plane_bits, group_size)
    if c < 16 or not common.is_pow2(c):
        raise ValueError(f"group_size={group_size} with {min(plane_bits)}-bit planes gives {c}-row chunks; the GPU "
                         "kernel needs a power of two >= 16 (use group_size >= 128 for 1-bit planes, >= 64 for "
                         "2-bit, a power of two)")


# ------------------------------------------------------------------------------------------ GPU (Triton) kernel

def _dequant_matmul_gpu_call(x, planes, scales, zero, *, plane_bits, group_size, base_offset, tm, tn, out_dtype,
                             interpret, num_warps, num_stages):
    Mp, Kp = x.shape
    N = zero.shape[1]
    G = group_size
    c = chunk_rows(plane_bits, G)
    n_chunks = G // c
    n_p = len(planes)
    consts = [_plane_consts(k) for k in plane_bits]

    def kernel(x_ref, *refs):
        p_refs, s_refs, z_ref, o_ref = refs[:n_p], refs[n_p:2 * n_p], refs[2 * n_p], refs[2 * n_p + 1]
        i, j = pl.program_id(0), pl.program_id(1)
        cols = pl.ds(j * tn, tn)

        def group_body(g, acc):
            z = z_ref[pl.ds(g, 1), cols].astype(_F32)
            ss = [s_ref[pl.ds(g, 1), cols].astype(_F32) for s_ref in s_refs]
            for t in range(n_chunks):
                w = None
                for p, k in enumerate(plane_bits):
                    per, mask, half = consts[p]
                    gb = G // per  # byte rows of this plane per group
                    jj, r0 = divmod(t * c, gb)
                    byte = p_refs[p][pl.ds(g * gb + r0, c), cols].astype(jnp.int32)
                    q = ((byte >> (jj * k)) & mask).astype(_F32)
                    if p == 0:
                        w = z + ss[0] * (q + base_offset)
                    else:
                        w = w + ss[p] * (q - half)
                xs = x_ref[pl.ds(i * tm, tm), pl.ds(g * G + t * c, c)]
                acc = acc + lax.dot_general(xs, w.astype(xs.dtype), (((1,), (0,)), ((), ())),
                                            preferred_element_type=_F32)
            return acc

        acc = lax.fori_loop(0, Kp // G, group_body, jnp.zeros((tm, tn), _F32))
        o_ref[...] = acc.astype(o_ref.dtype)

    full = pl.BlockSpec()
    return pl.pallas_call(
        kernel,
        grid=(Mp // tm, N // tn),
        in_specs=[full] * (2 * n_p + 2),
        out_specs=pl.BlockSpec((tm, tn), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((Mp, N), out_dtype),
        compiler_params=_compat.gpu_compiler_params(num_warps, num_stages),
        interpret=interpret,
        name=f"dequant_matmul_gpu_{tm}x{tn}_{'_'.join(map(str, plane_bits))}b",
    )(x, *planes, *scales, zero)


def _pad_axis(a, axis, mult):
    pad = -a.shape[axis] % mult
    if not pad:
        return a
    widths = [(0, 0)] * a.ndim
    widths[axis] = (0, pad)
    return jnp.pad(a, widths)


@functools.partial(jax.jit, static_argnames=("plane_bits", "group_size", "base_offset", "tiling", "out_dtype",
                                             "interpret"))
def _dequant_matmul_pallas(x, planes, scales, zero, *, plane_bits, group_size, base_offset, tiling, out_dtype,
                           interpret):
    M, K = x.shape
    N = zero.shape[1]
    Kp = zero.shape[0] * group_size
    tm = min(tiling.tm, max(16, common.next_pow2(M)))
    tn = min(tiling.tn, max(16, common.next_pow2(N)))
    xp = _pad_axis(jnp.pad(x, ((0, 0), (0, Kp - K))), 0, tm)
    planes = tuple(_pad_axis(q, 1, tn) for q in planes)
    scales = tuple(_pad_axis(s, 1, tn) for s in scales)
    zero = _pad_axis(zero, 1, tn)
    out = _dequant_matmul_gpu_call(xp, planes, scales, zero, plane_bits=plane_bits, group_size=group_size,
                                   base_offset=base_offset, tm=tm, tn=tn, out_dtype=out_dtype, interpret=interpret,
                                   num_warps=tiling.num_warps, num_stages=tiling.num_stages)
    return out[:M, :N]


def resolve_impl(impl: str, variant: str | None = None, rows: int | None = None) -> str:
    """``"auto"`` -> ``"pallas"`` only where ``(variant, backend)`` is in :data:`VALIDATED_FASTER` and ``rows``
    (the rows of ``x``; ``None`` = unknown) is at most :data:`AUTO_MAX_ROWS`."""
    _check_impl(impl)
    if impl != "auto":
        return impl
    v = _check_variant(variant)
    small = rows is not None and rows <= AUTO_MAX_ROWS
    return "pallas" if (v, _compat.backend()) in VALIDATED_FASTER and small else "xla"


def dequant_matmul(x: jax.Array, planes, scales, zero, *, plane_bits, group_size: int, base_offset: float = 0.5,
                   impl: str = "auto", tiling: DequantTiling | None = None, variant: str | None = None,
                   preferred_element_type=None, interpret: bool | None = None) -> jax.Array:
    """``x [M, K] @ W [K, N]`` with ``W`` dequantized from packed planes (see the module docstring).

    Args:
      x: ``[M, K]`` float32, bfloat16 or float16; ``K`` is the weight's logical (unpadded) row count.
      planes: tuple of ``uint8 [Kp * k_p / 8, N]`` packed planes, base first; pass a prefix to decode at a
        lower width (the others are never read).
      scales: tuple of per-group scales ``[Kp / group_size, N]`` (float16 or float32), one per plane.
      zero: per-group offsets ``[Kp / group_size, N]``, same dtype as the scales.
      plane_bits: bits of each plane passed (each 1, 2, 4 or 8).
      group_size: rows per quantization group (a multiple of 8).
      base_offset: 0.5 for the mid-rise MWQ base, 0.0 for a mid-tread uniform quantizer.
      impl: ``"xla"``, ``"pallas"`` or ``"auto"`` (see the module docstring).
      tiling: :class:`DequantTiling` (kernel only).
      variant: ``"gpu"`` (Triton) or ``None``; there is no TPU variant.
      preferred_element_type: output dtype (default ``x.dtype``); accumulation is float32.
      interpret: run the kernel in interpret mode; ``None`` = interpret unless on a GPU backend.

    Shapes, dtypes and tiling are validated before anything is traced.
    """
    plane_bits = _validate(x, planes, scales, zero, plane_bits, group_size, base_offset)
    impl = resolve_impl(impl, variant, rows=x.shape[0])
    out_dtype = jnp.dtype(preferred_element_type or x.dtype)
    if impl == "xla":
        return dequant_matmul_reference(x, tuple(planes), tuple(scales), zero, plane_bits=plane_bits,
                                        group_size=group_size, base_offset=base_offset,
                                        preferred_element_type=out_dtype)
    variant = _check_variant(variant)
    _check_kernel_shapes(plane_bits, group_size)
    if tiling is None:
        tiling = DequantTiling()
    if not isinstance(tiling, DequantTiling):
        raise TypeError(f"tiling must be a DequantTiling or None, got {type(tiling).__name__}")
    tiling.validate()
    interpret = _compat.resolve_interpret(interpret, variant)
    return _dequant_matmul_pallas(x, tuple(planes), tuple(scales), zero, plane_bits=plane_bits,
                                  group_size=group_size, base_offset=float(base_offset), tiling=tiling,
                                  out_dtype=out_dtype, interpret=interpret)
