"""Matryoshka weight quantization (MWQ, D²MoE) and a uniform int-k baseline, over one packed format.

A weight ``W [..., K, N]`` (``x @ W``; ``K`` is the reduction/input dimension) is quantized in groups of
``group_size`` consecutive rows along ``K`` (``K`` is padded to ``Kp``, a multiple of the group, by repeating
the last row, or rejected with ``pad=False``). Every array is per group and per output column ``n``.

**Nesting scheme** (``scheme="mwq"``, ``bits=(b_0, b_1, ..., b_L)`` strictly increasing, e.g. 2, 3, 4, 8).
Plane 0 (the *base*) has ``k_0 = b_0`` bits; plane ``p >= 1`` (a *residual plane*) has ``k_p = b_p - b_{p-1}``
bits; decoding at width ``b_p`` reads planes ``0..p`` only, so one stored copy serves every width and a loader
can fetch a base first and refine it later.

- Base, asymmetric mid-rise with its own scale and zero point: ``z = min(W_g)`` (rounded *down* to the scale
  dtype), ``s_0 = (max(W_g) - z) / 2**k_0`` (rounded *up*), ``q_0 = clip(floor((w - z) / s_0), 0, 2**k_0 - 1)``,
  ``w_0 = z + s_0 * (q_0 + 1/2)``. Error ``|w - w_0| <= s_0 / 2``.
- Residual plane ``p`` quantizes ``r_{p-1} = w - w_{p-1}`` symmetrically with its own scale:
  ``m = max|r_{p-1}|`` over the group, ``s_p = 2 m / 2**k_p`` (rounded up),
  ``q_p = clip(floor(r / s_p + 2**(k_p - 1)), 0, 2**k_p - 1)``,
  ``w_p = w_{p-1} + s_p * (q_p - (2**k_p - 1) / 2)``. The levels cover ``[-m, m]``, so
  ``|w - w_p| <= s_p / 2 = m / 2**k_p``.

**Error bounds** (per group and column; ``R = max - min`` of the group; exact arithmetic, then float
rounding of the stored scales, which are rounded up so they only widen the bound by ~2**-11 relative for
float16, and of the float32 reconstruction, ~1 ulp of ``|w|``):

- at every width ``|w - w_p| <= s_p / 2`` with the *stored* ``s_p`` (the test checks exactly this), and
- since ``m_p = max|r_p| <= s_p / 2`` and ``s_{p+1} = 2 m_p / 2**k_{p+1}``:
  ``max|w - w_{p+1}| <= max|w - w_p| / 2**k_{p+1}`` -- the group's max error at least halves with every
  residual bit, so it is **monotone (strictly) decreasing** in the width; per element it need not be.
- unrolled: ``max|w - w_b| <= R' / 2**(b + 1)`` at width ``b``, the bound of a uniform ``b``-bit mid-rise
  quantizer of the group (int8's mid-tread bound is ``R / 510``; MWQ at 8 bits gives ``R' / 512``). Here
  ``R' = max - z`` with the *stored* zero point; it equals the range ``R`` up to the rounding of ``min`` to
  ``scale_dtype`` (for float16, relevant only for groups far from zero with a small spread: use float32).

**Uniform baseline** (``scheme="uniform"``, EdgeMoE-style per-group asymmetric int-k, one width): mid-tread
``s = (max - z) / (2**k - 1)``, ``q = clip(round((w - z) / s), 0, 2**k - 1)``, ``w_hat = z + s * q``,
``|w - w_hat| <= s / 2 = R / (2 (2**k - 1))``. Same arrays and packing (one plane, ``base_offset=0``), so the
same dequant-matmul paths run both.

**Storage** (:class:`QTensor`): plane ``p`` is ``uint8 [..., Kp * k_p / 8, N]`` packed as described in
:mod:`pallas_kernels.dequant_matmul`; ``scales[p]`` and ``zero`` are ``[..., Kp / group_size, N]`` in
``scale_dtype``. Bytes to decode at width ``b_p``: :meth:`QTensor.nbytes`; per plane: :meth:`QTensor.plane_nbytes`
(plane 0 includes ``zero``). Quantization runs on the host in float64 numpy; dequantization is JAX.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.dequant_matmul import PLANE_BITS, dequantize_reference

SCHEMES = ("mwq", "uniform")
SCALE_DTYPES = ("float16", "float32")
MAX_BITS = 16
FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """How to quantize a weight.

    Attributes:
      scheme: ``"mwq"`` (nested base + residual planes) or ``"uniform"`` (one int-k plane, EdgeMoE-style).
      bits: decodable widths, strictly increasing. ``mwq``: the base width and every step between widths must
        be 1, 2, 4 or 8 bits (e.g. ``(2, 3, 4, 8)``, ``(2, 4, 8)``, ``(4, 8)``), at most 16 in total;
        ``uniform``: exactly one width in 1, 2, 4, 8 (``(8,)`` for int8, ``(4,)`` for int4).
      group_size: rows of the reduction dimension sharing a scale; a positive multiple of 8 (default 128).
      scale_dtype: ``"float16"`` (default, half the metadata) or ``"float32"`` for scales and zero points.
      pad: pad ``K`` up to a multiple of ``group_size`` (by repeating the last row); ``False`` raises instead.
    """

    scheme: str = "mwq"
    bits: tuple = (2, 3, 4, 8)
    group_size: int = 128
    scale_dtype: str = "float16"
    pad: bool = True

    def validate(self) -> QuantConfig:
        """Raise ``ValueError`` naming the bad field and the allowed values; returns ``self``."""
        if self.scheme not in SCHEMES:
            raise ValueError(f"QuantConfig.scheme must be one of {SCHEMES}, got {self.scheme!r}")
        bits = self.bits
        if (not isinstance(bits, (tuple, list)) or not bits
                or any(not isinstance(b, (int, np.integer)) or isinstance(b, bool) for b in bits)):
            raise ValueError(f"QuantConfig.bits must be a non-empty tuple of ints, got {bits!r}")
        bits = tuple(int(b) for b in bits)
        if self.scheme == "uniform":
            if len(bits) != 1 or bits[0] not in PLANE_BITS:
                raise ValueError(f"QuantConfig.bits for scheme='uniform' must be one width from {PLANE_BITS}, "
                                 f"e.g. (8,) or (4,); got {bits!r}")
        else:
            if any(b2 <= b1 for b1, b2 in itertools.pairwise(bits)):
                raise ValueError(f"QuantConfig.bits must be strictly increasing, got {bits!r}")
            steps = (bits[0],) + tuple(b2 - b1 for b1, b2 in itertools.pairwise(bits))
            if any(k not in PLANE_BITS for k in steps) or bits[-1] > MAX_BITS:
                raise ValueError(f"QuantConfig.bits={bits!r}: the base width and each step between widths must be "
                                 f"one of {PLANE_BITS} bits and the largest width at most {MAX_BITS} (e.g. "
                                 "(2, 3, 4, 8), (2, 4, 8), (4, 8))")
        g = self.group_size
        if not isinstance(g, (int, np.integer)) or isinstance(g, bool) or g <= 0 or g % 8:
            raise ValueError(f"QuantConfig.group_size must be a positive multiple of 8 (e.g. 32, 64, 128), got {g!r}")
        if self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"QuantConfig.scale_dtype must be one of {SCALE_DTYPES}, got {self.scale_dtype!r}")
        if not isinstance(self.pad, bool):
            raise ValueError(f"QuantConfig.pad must be True or False, got {self.pad!r}")  # noqa: TRY004
        return self

    @property
    def plane_bits(self) -> tuple:
        """Bits of each stored plane: ``(b_0, b_1 - b_0, ...)``."""
        b = tuple(self.bits)
        return (b[0],) + tuple(b2 - b1 for b1, b2 in itertools.pairwise(b))

    @property
    def base_offset(self) -> float:
        """0.5 for the mid-rise MWQ base, 0.0 for the mid-tread uniform quantizer."""
        return 0.5 if self.scheme == "mwq" else 0.0


def mwq_config(bits=(2, 3, 4, 8), group_size: int = 128, scale_dtype: str = "float16", pad: bool = True):
    """A validated MWQ :class:`QuantConfig`."""
    return QuantConfig("mwq", tuple(bits), group_size, scale_dtype, pad).validate()


def uniform_config(bits: int = 8, group_size: int = 128, scale_dtype: str = "float16", pad: bool = True):
    """A validated uniform int-``bits`` :class:`QuantConfig` (the EdgeMoE-style baseline)."""
    return QuantConfig("uniform", (bits,), group_size, scale_dtype, pad).validate()


# ------------------------------------------------------------------------------------------ packing

def pack_plane(q: np.ndarray, k: int, group_size: int) -> np.ndarray:
    """Pack ``k``-bit codes ``[..., Kp, N]`` (ints in ``[0, 2**k)``) to ``uint8 [..., Kp * k / 8, N]``."""
    if k not in PLANE_BITS:
        raise ValueError(f"plane bits must be one of {PLANE_BITS}, got {k!r}")
    q = np.asarray(q)
    *lead, kp, n = q.shape
    if kp % group_size:
        raise ValueError(f"rows ({kp}) must be a multiple of group_size ({group_size})")
    per = 8 // k
    gb = group_size // per
    v = q.astype(np.uint8).reshape(*lead, kp // group_size, per, gb, n)
    out = np.zeros((*lead, kp // group_size, gb, n), np.uint8)
    for j in range(per):
        out |= (v[..., j, :, :] << np.uint8(j * k)).astype(np.uint8)
    return out.reshape(*lead, kp * k // 8, n)


def unpack_plane_np(packed: np.ndarray, k: int, group_size: int) -> np.ndarray:
    """Inverse of :func:`pack_plane` (numpy): ``uint8 [..., Kp * k / 8, N]`` -> ``uint8 [..., Kp, N]``."""
    per, mask = 8 // k, (1 << k) - 1
    *lead, rows, n = packed.shape
    gb = group_size // per
    p = packed.reshape(*lead, rows // gb, gb, n)
    q = np.stack([(p >> np.uint8(j * k)) & np.uint8(mask) for j in range(per)], axis=-3)
    return q.reshape(*lead, rows * per, n)


# ------------------------------------------------------------------------------------------ the quantized tensor

@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True)
class QTensor:
    """A group-quantized weight ``[..., K, N]``: packed planes + per-group scales + zero points.

    Attributes:
      planes: packed ``uint8`` planes, base first (``[..., Kp * k_p / 8, N]``); may hold fewer planes than
        ``config.bits`` (a truncated copy: only the widths in :attr:`bits_available` decode).
      scales: one ``[..., Kp / G, N]`` scale array per plane held.
      zero: ``[..., Kp / G, N]`` zero points (the base's offset).
      config: the :class:`QuantConfig` it was made with (static under ``jit``).
      shape: the logical ``(..., K, N)`` shape (static).

    A pytree (arrays are leaves), so it passes through ``jax.jit``. Arrays may be numpy or jax arrays.
    """

    planes: tuple
    scales: tuple
    zero: Any
    config: QuantConfig
    shape: tuple

    def tree_flatten(self):
        return (self.planes, self.scales, self.zero), (self.config, self.shape)

    @classmethod
    def tree_unflatten(cls, aux, children):
        planes, scales, zero = children
        return cls(tuple(planes), tuple(scales), zero, *aux)

    # --------------------------------------------------------------- shape facts
    @property
    def bits_available(self) -> tuple:
        """Widths this copy can decode (a prefix of ``config.bits``)."""
        return tuple(self.config.bits[:len(self.planes)])

    @property
    def padded_rows(self) -> int:
        """``Kp``: ``K`` rounded up to the group size."""
        return -(-self.shape[-2] // self.config.group_size) * self.config.group_size

    @property
    def lead_shape(self) -> tuple:
        return tuple(self.shape[:-2])

    def num_planes(self, bits: int) -> int:
        """How many planes decoding at width ``bits`` reads; ``ValueError`` if ``bits`` is not available."""
        if bits not in self.bits_available:
            raise ValueError(f"bits must be one of the available widths {self.bits_available} (config.bits="
                             f"{tuple(self.config.bits)}), got {bits!r}")
        return self.bits_available.index(bits) + 1

    # --------------------------------------------------------------- byte accounting
    def plane_nbytes(self, p: int) -> int:
        """Bytes of plane ``p`` (packed codes + its scales; plane 0 also the zero points), from the shapes and
        config alone (equals the arrays' ``nbytes``, which the tests check). Counts all leading dims."""
        n_planes = len(self.config.bits)
        if not 0 <= p < n_planes:
            raise ValueError(f"plane index must be in [0, {n_planes}), got {p!r}")
        lead = math.prod(self.lead_shape)
        kp, n = self.padded_rows, self.shape[-1]
        meta = (kp // self.config.group_size) * n * np.dtype(self.config.scale_dtype).itemsize
        codes = kp * self.config.plane_bits[p] // 8 * n
        return lead * (codes + meta * (2 if p == 0 else 1))

    def nbytes(self, bits: int | None = None) -> int:
        """Bytes needed to decode at width ``bits`` (planes ``0..p`` with their scales and the zero points);
        ``None`` = every width in ``config.bits``."""
        n = len(self.config.bits) if bits is None else self._plane_count_cfg(bits)
        return sum(self.plane_nbytes(p) for p in range(n))

    def _plane_count_cfg(self, bits):
        if bits not in self.config.bits:
            raise ValueError(f"bits must be one of {tuple(self.config.bits)}, got {bits!r}")
        return tuple(self.config.bits).index(bits) + 1

    def array_nbytes(self) -> int:
        """Actual bytes of the arrays held (``nbytes`` of planes, scales and zero)."""
        return int(sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize
                       for a in (*self.planes, *self.scales, self.zero)))

    # --------------------------------------------------------------- decode
    def dequantize(self, bits: int | None = None, dtype=jnp.float32) -> jax.Array:
        """The weight ``[..., K, N]`` decoded at width ``bits`` (default: the widest available), as ``dtype``."""
        bits = self.bits_available[-1] if bits is None else bits
        n = self.num_planes(bits)
        w = dequantize_reference(self.planes[:n], self.scales[:n], self.zero,
                                 plane_bits=self.config.plane_bits[:n], group_size=self.config.group_size,
                                 base_offset=self.config.base_offset, dtype=dtype)
        return w[..., :self.shape[-2], :]

    def truncate(self, bits: int) -> QTensor:
        """A copy holding only the planes needed for width ``bits`` (what a bits-limited cache stores)."""
        n = self.num_planes(bits)
        return dataclasses.replace(self, planes=self.planes[:n], scales=self.scales[:n])

    def __getitem__(self, idx) -> QTensor:
        """Index the leading (e.g. expert) dimensions: ``qt[e]`` is expert ``e``'s ``[K, N]`` weight."""
        if not self.lead_shape:
            raise IndexError("this QTensor has no leading dimensions to index")
        probe = np.empty(self.lead_shape, dtype=np.int8)[idx]
        return QTensor(tuple(a[idx] for a in self.planes), tuple(a[idx] for a in self.scales), self.zero[idx],
                       self.config, tuple(probe.shape) + tuple(self.shape[-2:]))

    # --------------------------------------------------------------- serialization
    def meta_array(self) -> np.ndarray:
        """int64 metadata: ``[version, scheme, group_size, scale_dtype, pad, ndim, *shape, n_bits, *bits]``."""
        c = self.config
        return np.array([FORMAT_VERSION, SCHEMES.index(c.scheme), c.group_size, SCALE_DTYPES.index(c.scale_dtype),
                         int(c.pad), len(self.shape), *self.shape, len(c.bits), *c.bits], np.int64)

    @staticmethod
    def plane_keys(p: int, prefix: str = "") -> tuple:
        """Dict keys of plane ``p``'s arrays (a loader that reads one plane reads exactly these)."""
        keys = (f"{prefix}p{p}.q", f"{prefix}p{p}.scale")
        return keys + ((f"{prefix}zero",) if p == 0 else ())

    def plane_arrays(self, p: int, prefix: str = "") -> dict:
        """Plane ``p``'s arrays as numpy, keyed by :meth:`plane_keys` (plane 0 includes the zero points)."""
        out = {f"{prefix}p{p}.q": np.asarray(self.planes[p]), f"{prefix}p{p}.scale": np.asarray(self.scales[p])}
        if p == 0:
            out[f"{prefix}zero"] = np.asarray(self.zero)
        return out

    def to_dict(self, prefix: str = "", bits: int | None = None) -> dict:
        """Numpy arrays (safetensors-ready): ``{prefix}meta``, ``{prefix}zero``, ``{prefix}p{i}.q`` /
        ``{prefix}p{i}.scale`` for the planes needed at width ``bits`` (default: all held)."""
        n = len(self.planes) if bits is None else self.num_planes(bits)
        out = {f"{prefix}meta": self.meta_array()}
        for p in range(n):
            out.update(self.plane_arrays(p, prefix))
        return out

    @classmethod
    def from_dict(cls, d: dict, prefix: str = "") -> QTensor:
        """Rebuild from :meth:`to_dict` output; holds the consecutive planes ``p0, p1, ...`` present in ``d``.
        Missing or inconsistent arrays raise ``ValueError`` naming the key."""
        key = f"{prefix}meta"
        if key not in d:
            raise ValueError(f"missing quantized-weight metadata {key!r}")
        m = [int(v) for v in np.asarray(d[key]).reshape(-1)]
        if not m or m[0] != FORMAT_VERSION:
            raise ValueError(f"{key}: unsupported format version {m[:1]} (expected {FORMAT_VERSION})")
        try:
            ndim = m[5]
            shape = tuple(m[6:6 + ndim])
            nb = m[6 + ndim]
            bits = tuple(m[7 + ndim:7 + ndim + nb])
            cfg = QuantConfig(SCHEMES[m[1]], bits, m[2], SCALE_DTYPES[m[3]], bool(m[4])).validate()
        except (IndexError, ValueError) as e:
            raise ValueError(f"{key}: corrupt metadata {m}: {e}") from None
        planes, scales = [], []
        for p in range(len(bits)):
            qk, sk = f"{prefix}p{p}.q", f"{prefix}p{p}.scale"
            if qk not in d:
                break
            if sk not in d:
                raise ValueError(f"{sk!r} missing (plane {p} codes present without their scales)")
            planes.append(np.asarray(d[qk]))
            scales.append(np.asarray(d[sk]))
        if not planes:
            raise ValueError(f"no planes found under {prefix!r} (need at least {prefix}p0.q)")
        zk = f"{prefix}zero"
        if zk not in d:
            raise ValueError(f"{zk!r} missing")
        qt = cls(tuple(planes), tuple(scales), np.asarray(d[zk]), cfg, shape)
        _check_arrays(qt)
        return qt


def _check_arrays(qt: QTensor) -> None:
    kp, n = qt.padded_rows, qt.shape[-1]
    lead = qt.lead_shape
    gshape = (*lead, kp // qt.config.group_size, n)
    sdt = np.dtype(qt.config.scale_dtype)
    if tuple(qt.zero.shape) != gshape or qt.zero.dtype != sdt:
        raise ValueError(f"zero: expected {sdt.name}{gshape}, got {qt.zero.dtype}{tuple(qt.zero.shape)}")
    for p, (q, s) in enumerate(zip(qt.planes, qt.scales)):
        want = (*lead, kp * qt.config.plane_bits[p] // 8, n)
        if tuple(q.shape) != want or q.dtype != np.uint8:
            raise ValueError(f"p{p}.q: expected uint8{want}, got {q.dtype}{tuple(q.shape)}")
        if tuple(s.shape) != gshape or s.dtype != sdt:
            raise ValueError(f"p{p}.scale: expected {sdt.name}{gshape}, got {s.dtype}{tuple(s.shape)}")


# ------------------------------------------------------------------------------------------ quantization

def _round_dir(x: np.ndarray, dt: np.dtype, up: bool, what: str, cfg: QuantConfig) -> np.ndarray:
    """``x`` (float64) in ``dt``, rounded toward +inf (``up``) or -inf, so a stored scale never shrinks."""
    with np.errstate(over="ignore"):
        y = x.astype(dt)
    yf = y.astype(np.float64)
    bad = (yf < x) if up else (yf > x)
    if bad.any():
        y = np.where(bad, np.nextafter(y, np.array(np.inf if up else -np.inf, dt)), y)
    if not np.all(np.isfinite(y)):
        raise ValueError(f"QuantConfig.scale_dtype={cfg.scale_dtype!r} cannot hold the {what} of these weights "
                         f"(max |value| {float(np.max(np.abs(x))):.3g}); use scale_dtype='float32'")
    return y


def _quantize_one(w: np.ndarray, cfg: QuantConfig):
    """``w`` float64 ``[Kp, N]`` -> (codes per plane [Kp, N], scales per plane, zero) as numpy."""
    kp, n = w.shape
    G = cfg.group_size
    sdt = np.dtype(cfg.scale_dtype)
    wg = w.reshape(kp // G, G, n)
    lo, hi = wg.min(axis=1), wg.max(axis=1)
    zero = _round_dir(lo, sdt, False, "group minimum", cfg)
    z64 = zero.astype(np.float64)[:, None, :]
    k0 = cfg.plane_bits[0]
    codes, scales = [], []
    if cfg.scheme == "uniform":
        levels = (1 << k0) - 1
        s = _round_dir((hi - zero.astype(np.float64)) / levels, sdt, True, "scale", cfg)
        s64 = s.astype(np.float64)[:, None, :]
        safe = np.where(s64 > 0, s64, 1.0)
        q = np.clip(np.rint((wg - z64) / safe), 0, levels)
        return [q.reshape(kp, n)], [s], zero
    s = _round_dir((hi - zero.astype(np.float64)) / (1 << k0), sdt, True, "scale", cfg)
    s64 = s.astype(np.float64)[:, None, :]
    safe = np.where(s64 > 0, s64, 1.0)
    q = np.clip(np.floor((wg - z64) / safe), 0, (1 << k0) - 1)
    codes.append(q.reshape(kp, n))
    scales.append(s)
    r = wg - (z64 + s64 * (q + 0.5))
    for k in cfg.plane_bits[1:]:
        m = np.abs(r).max(axis=1)
        s = _round_dir(2.0 * m / (1 << k), sdt, True, "residual scale", cfg)
        s64 = s.astype(np.float64)[:, None, :]
        safe = np.where(s64 > 0, s64, 1.0)
        half = 1 << (k - 1)
        q = np.clip(np.floor(r / safe + half), 0, (1 << k) - 1)
        r = r - s64 * (q - ((1 << k) - 1) / 2.0)
        codes.append(q.reshape(kp, n))
        scales.append(s)
    return codes, scales, zero


def quantize(w, config: QuantConfig | None = None) -> QTensor:
    """Quantize ``w [..., K, N]`` (reduction dimension ``K`` second to last) per ``config`` (default MWQ
    ``(2, 3, 4, 8)`` bits, group 128). Returns a :class:`QTensor` of numpy arrays.

    Raises ``ValueError`` for a bad config, non-float or non-finite weights, fewer than 2 dimensions, or (with
    ``pad=False``) ``K`` not a multiple of ``group_size``.
    """
    cfg = (config or QuantConfig()).validate()
    cfg = dataclasses.replace(cfg, bits=tuple(int(b) for b in cfg.bits), group_size=int(cfg.group_size))
    if not hasattr(w, "shape") or not hasattr(w, "dtype"):
        raise TypeError(f"w must be an array, got {type(w).__name__}")
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise ValueError(f"w dtype must be floating (float32, bfloat16, float16, float64), got {w.dtype}")
    if len(w.shape) < 2:
        raise ValueError(f"w must have at least 2 dimensions [..., K, N], got shape {tuple(w.shape)}")
    w = np.asarray(w).astype(np.float64)
    if not np.all(np.isfinite(w)):
        raise ValueError("w has non-finite values (nan or inf); cannot quantize")
    *lead, K, N = w.shape
    G = cfg.group_size
    if K % G and not cfg.pad:
        raise ValueError(f"QuantConfig.group_size={G} does not divide the reduction dimension K={K} and "
                         "pad=False; use a group size dividing K or pad=True")
    if K == 0 or N == 0:
        raise ValueError(f"w must be non-empty, got shape {tuple(w.shape)}")
    kp = -(-K // G) * G
    flat = w.reshape(-1, K, N)
    if kp != K:
        flat = np.concatenate([flat, np.repeat(flat[:, -1:, :], kp - K, axis=1)], axis=1)
    n_p = len(cfg.plane_bits)
    planes = [[] for _ in range(n_p)]
    scales = [[] for _ in range(n_p)]
    zeros = []
    for i in range(flat.shape[0]):
        codes, sc, z = _quantize_one(flat[i], cfg)
        for p in range(n_p):
            planes[p].append(pack_plane(codes[p], cfg.plane_bits[p], G))
            scales[p].append(sc[p])
        zeros.append(z)

    def stack(arrs):
        return np.stack(arrs).reshape(*lead, *arrs[0].shape)

    return QTensor(tuple(stack(a) for a in planes), tuple(stack(a) for a in scales), stack(zeros), cfg,
                   (*lead, K, N))


def error_bound(qt: QTensor, bits: int) -> np.ndarray:
    """The guaranteed per-(group, column) bound on ``|w - w_hat|`` at width ``bits``: half the last decoded
    plane's stored scale, ``[..., Kp / G, N]`` float64 (exact arithmetic; add float32 rounding of ``|w|``)."""
    n = qt.num_planes(bits)
    return np.asarray(qt.scales[n - 1]).astype(np.float64) / 2.0
