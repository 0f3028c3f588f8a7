"""Receptive-field arithmetic for a prefix of layers (one spatial axis at a time; kernels are square).

For a convolution with kernel ``k``, stride ``s``, dilation ``d`` and padding ``p``, output rows ``[lo, hi)``
read input rows ``[lo*s - p, (hi-1)*s - p + d*(k-1) + 1)``. Rows outside ``[0, size)`` are zero padding: they
exist only at the true border of the feature map, so a patch computes exactly the clipped part of each
layer's region and pads with zeros only where its region crosses the border. Two ways to cut a stage output
into an ``n x n`` grid are provided:

* **exact** (:func:`split`, :func:`region_chain`): balanced patches, each layer's region clipped to the map
  (patches at the border are smaller). Used by the unrolled executor and the "exact" MAC count.
* **uniform** (:func:`uniform_split`, :func:`uniform_chain`): every patch has the same size
  ``ceil(size / n)`` and every layer region the same size (an affine function of the patch start); positions
  outside the map are computed and then zeroed. Used by the ``lax.fori_loop`` executor and the "uniform"
  MAC count (each patch computed at the interior size, as a fixed-size patch buffer on an MCU would).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

from moejax.vision.spec import ConvSpec, NetSpec


def check_prefix(spec: NetSpec, K: int) -> None:
    """Raise ValueError unless ``1 <= K <= spec.num_blocks``."""
    if not isinstance(K, int) or isinstance(K, bool) or not 1 <= K <= spec.num_blocks:
        raise ValueError(f"K (patch_blocks)={K!r} is out of range: the network has {spec.num_blocks} blocks "
                         f"(block 0 is the stem); allowed 1..{spec.num_blocks}")


def stage_convs(spec: NetSpec, K: int) -> list[tuple[int, int, ConvSpec]]:
    """``(block, index_in_block, conv)`` for every convolution of blocks ``0..K-1`` in execution order."""
    check_prefix(spec, K)
    return [(b, j, c) for b in range(K) for j, c in enumerate(spec.blocks[b].convs)]


def input_interval(conv: ConvSpec, lo: int, hi: int) -> tuple[int, int]:
    """Unclipped input rows ``[lo', hi')`` that output rows ``[lo, hi)`` of ``conv`` read."""
    return lo * conv.stride - conv.padding, (hi - 1) * conv.stride - conv.padding + conv.span


@dataclass(frozen=True)
class AxisRegion:
    """One convolution's regions along one axis for one patch.

    ``in_lo:in_hi`` is the clipped input region (computed by the previous layer or read from the image),
    ``pad_lo``/``pad_hi`` the zero rows added at the true border, ``out_lo:out_hi`` the output region,
    ``in_size``/``out_size`` the full feature-map lengths.
    """

    in_lo: int
    in_hi: int
    pad_lo: int
    pad_hi: int
    out_lo: int
    out_hi: int
    in_size: int
    out_size: int


def layer_sizes(spec: NetSpec, K: int, size: int | None = None) -> list[tuple[int, int]]:
    """``(in_size, out_size)`` of each convolution of the first K blocks along one axis."""
    size = spec.resolution if size is None else size
    out = []
    for _, _, c in stage_convs(spec, K):
        o = c.out_size(size)
        out.append((size, o))
        size = o
    return out


def region_chain(spec: NetSpec, K: int, lo: int, hi: int, size: int | None = None) -> list[AxisRegion]:
    """Regions of every convolution of blocks ``0..K-1`` needed for stage-output rows ``[lo, hi)`` (exact).

    Returned in execution order; entry 0's ``in_lo:in_hi`` is the region of the input image.
    """
    convs = stage_convs(spec, K)
    sizes = layer_sizes(spec, K, size)
    out_size = sizes[-1][1]
    if not 0 <= lo < hi <= out_size:
        raise ValueError(f"output rows [{lo}, {hi}) are outside the stage output of length {out_size}")
    chain = []
    for (_, _, c), (in_size, o_size) in zip(reversed(convs), reversed(sizes)):
        a, b = input_interval(c, lo, hi)
        ca, cb = max(a, 0), min(b, in_size)
        chain.append(AxisRegion(ca, cb, ca - a, b - cb, lo, hi, in_size, o_size))
        lo, hi = ca, cb
    return chain[::-1]


def receptive_field(spec: NetSpec, K: int, lo: int, hi: int, size: int | None = None) -> tuple[int, int]:
    """Clipped input-image rows ``[lo', hi')`` that stage-output rows ``[lo, hi)`` depend on."""
    r = region_chain(spec, K, lo, hi, size)[0]
    return r.in_lo, r.in_hi


def rf_size(spec: NetSpec, K: int) -> tuple[int, int]:
    """(receptive field, cumulative stride) of one output pixel of the first K blocks, ignoring the border."""
    rf, jump = 1, 1
    for _, _, c in stage_convs(spec, K):
        rf += (c.span - 1) * jump
        jump *= c.stride
    return rf, jump


def split(size: int, n: int) -> list[tuple[int, int]]:
    """Balanced split of ``range(size)`` into ``n`` contiguous non-empty parts (requires ``n <= size``)."""
    if not 1 <= n <= size:
        raise ValueError(f"n (patches)={n} is out of range for a feature map of length {size}: allowed 1..{size}")
    bounds = [i * size // n for i in range(n + 1)]
    return list(itertools.pairwise(bounds))


@dataclass(frozen=True)
class UniformLayer:
    """A convolution in a uniform patch: region of ``in_len`` input rows starting at ``in_a * o + in_b`` where
    ``o`` is the patch's start row in the stage output; output ``out_len`` rows starting at ``out_a*o+out_b``."""

    in_len: int
    in_a: int
    in_b: int
    out_len: int
    out_a: int
    out_b: int
    in_size: int
    out_size: int


def uniform_split(size: int, n: int) -> tuple[int, list[int]]:
    """Patch length ``P = ceil(size/n)`` and the ``n`` start rows ``min(i*P, size-P)`` (last ones clamped)."""
    if not 1 <= n <= size:
        raise ValueError(f"n (patches)={n} is out of range for a feature map of length {size}: allowed 1..{size}")
    p = math.ceil(size / n)
    return p, [min(i * p, size - p) for i in range(n)]


def uniform_chain(spec: NetSpec, K: int, patch: int, size: int | None = None) -> list[UniformLayer]:
    """Per-convolution uniform regions (execution order) for output patches of ``patch`` rows."""
    convs = stage_convs(spec, K)
    sizes = layer_sizes(spec, K, size)
    length, a, b = patch, 1, 0
    chain = []
    for (_, _, c), (in_size, o_size) in zip(reversed(convs), reversed(sizes)):
        in_len = (length - 1) * c.stride + c.span
        ia, ib = a * c.stride, b * c.stride - c.padding
        chain.append(UniformLayer(in_len, ia, ib, length, a, b, in_size, o_size))
        length, a, b = in_len, ia, ib
    return chain[::-1]
