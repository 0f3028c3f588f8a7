"""Whole-image and patch-based execution of a folded (or int8) CNN.

Patch-based inference (MCUNetV2): the output of the first ``K`` blocks (the *patch stage*) is split into an
``n x n`` grid; each patch is computed from its input region (receptive field plus halo, see
:mod:`moejax.vision.rf`) through those ``K`` blocks and written into the stage's output buffer; the remaining
blocks then run layer by layer. Two executors give identical results to :func:`forward`:

* ``mode="unrolled"``: exact regions (border patches smaller, zero padding added only where a region crosses
  the true border); every patch is its own static-shape computation, unrolled under ``jit``.
* ``mode="loop"``: uniform patches in a ``lax.fori_loop`` whose carry is the stage output buffer, so XLA's
  buffer assignment sees one patch's working set at a time. Each layer computes a fixed-size region; rows
  outside the feature map are zeroed after each layer, which reproduces zero padding at the true border.

The ``net`` argument is anything with the layer operations of :class:`~moejax.vision.models.FoldedNet`
(``prepare_input``, ``conv``, ``add``, ``head``, ``spec``): float32 ``FoldedNet`` or int8 ``QuantNet``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from moejax.vision import rf
from moejax.vision.spec import NetSpec

MODES = ("unrolled", "loop")


def validate_plan(spec: NetSpec, K: int, n: int, resolution: int | None = None) -> int:
    """Check a patch plan; returns the stage output size. Raises ValueError naming the bad field.

    ``K`` (number of blocks in the patch stage) must be in ``1..num_blocks``; ``n`` (patches per side) must be
    in ``1..S`` where ``S`` is the spatial size of the patch stage's output.
    """
    rf.check_prefix(spec, K)
    size = spec.feature_sizes(resolution)[K - 1]
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= size:
        raise ValueError(f"n (patches)={n!r} is out of range: the patch stage (K={K}) outputs a {size}x{size} "
                         f"feature map, so the grid can have 1..{size} patches per side")
    return size


def run_blocks(net, x: jax.Array, start: int = 0, stop: int | None = None, collect: list | None = None):
    """Layer-by-layer execution of blocks ``start..stop-1`` on whole feature maps.

    If ``collect`` is a list, every stored tensor (each conv output and each residual sum) is appended to it,
    in order (used for calibration).
    """
    blocks = net.spec.blocks
    stop = len(blocks) if stop is None else stop
    for b in range(start, stop):
        blk = blocks[b]
        inp = x
        for j, c in enumerate(blk.convs):
            p = c.padding
            x = net.conv(b, j, x, ((p, p), (p, p)))
            if collect is not None:
                collect.append(x)
        if blk.residual:
            x = net.add(b, inp, x)
            if collect is not None:
                collect.append(x)
    return x


def forward(net, x: jax.Array) -> jax.Array:
    """Whole-image (layer-by-layer) inference: NHWC images -> logits."""
    return net.head(run_blocks(net, net.prepare_input(x)))


def _patch(net, x, K: int, rows: list[rf.AxisRegion], cols: list[rf.AxisRegion]):
    """One exact patch through blocks 0..K-1; ``x`` is the (prepared) whole image."""
    x = x[:, rows[0].in_lo:rows[0].in_hi, cols[0].in_lo:cols[0].in_hi]
    i = 0
    for b in range(K):
        blk = net.spec.blocks[b]
        inp, r_in, c_in = x, rows[i], cols[i]
        for j in range(len(blk.convs)):
            r, c = rows[i], cols[i]
            x = net.conv(b, j, x, ((r.pad_lo, r.pad_hi), (c.pad_lo, c.pad_hi)))
            i += 1
        if blk.residual:
            r, c = rows[i - 1], cols[i - 1]
            dr, dc = r.out_lo - r_in.in_lo, c.out_lo - c_in.in_lo
            x = net.add(b, inp[:, dr:dr + r.out_hi - r.out_lo, dc:dc + c.out_hi - c.out_lo], x)
    return x


def patch_stage_unrolled(net, x: jax.Array, K: int, n: int) -> jax.Array:
    """Output of blocks ``0..K-1`` computed as an ``n x n`` grid of exact patches (prepared input)."""
    spec = net.spec
    H, W = x.shape[1], x.shape[2]
    sh = validate_plan(spec, K, n, H)
    sw = spec.feature_sizes(W)[K - 1]
    if sw < n:
        raise ValueError(f"n (patches)={n} is out of range: the stage output width is {sw}; allowed 1..{sw}")
    row_chains = [rf.region_chain(spec, K, lo, hi, H) for lo, hi in rf.split(sh, n)]
    col_chains = [rf.region_chain(spec, K, lo, hi, W) for lo, hi in rf.split(sw, n)]
    out_rows = []
    for rows in row_chains:
        out_rows.append(jnp.concatenate([_patch(net, x, K, rows, cols) for cols in col_chains], axis=2))
    return jnp.concatenate(out_rows, axis=1)


def _window(x, start, length: int, size: int, axis: int):
    """Rows ``start .. start+length-1`` of ``x`` along ``axis`` with zeros outside ``[0, size)``."""
    idx = start + jnp.arange(length)
    valid = (idx >= 0) & (idx < size)
    taken = jnp.take(x, jnp.clip(idx, 0, size - 1), axis=axis)
    shape = [1] * x.ndim
    shape[axis] = length
    return jnp.where(valid.reshape(shape), taken, jnp.zeros((), x.dtype))


def _mask(y, start, size: int, axis: int):
    length = y.shape[axis]
    idx = start + jnp.arange(length)
    shape = [1] * y.ndim
    shape[axis] = length
    return jnp.where(((idx >= 0) & (idx < size)).reshape(shape), y, jnp.zeros((), y.dtype))


def patch_stage_loop(net, x: jax.Array, K: int, n: int) -> jax.Array:
    """Output of blocks ``0..K-1`` from uniform ``n x n`` patches in a ``lax.fori_loop`` (prepared input).

    The loop carry is the stage output buffer; each iteration gathers its input window (zeros outside the
    image), runs the stage's layers on fixed-size regions with VALID convolutions, zeroes rows/columns that
    fall outside each feature map, and writes its patch with ``dynamic_update_slice``.
    """
    spec = net.spec
    N, H, W = x.shape[0], x.shape[1], x.shape[2]
    sh = validate_plan(spec, K, n, H)
    sw = spec.feature_sizes(W)[K - 1]
    if sw < n:
        raise ValueError(f"n (patches)={n} is out of range: the stage output width is {sw}; allowed 1..{sw}")
    ph, rstarts = rf.uniform_split(sh, n)
    pw, cstarts = rf.uniform_split(sw, n)
    rch, cch = rf.uniform_chain(spec, K, ph, H), rf.uniform_chain(spec, K, pw, W)
    starts = jnp.asarray(np.array([(r, c) for r in rstarts for c in cstarts], np.int32))
    cout = spec.blocks[K - 1].cout
    out0 = jnp.zeros((N, sh, sw, cout), x.dtype)

    def patch_body(i, out):
        o_r, o_c = starts[i, 0], starts[i, 1]
        z = _window(x, rch[0].in_a * o_r + rch[0].in_b, rch[0].in_len, H, 1)
        z = _window(z, cch[0].in_a * o_c + cch[0].in_b, cch[0].in_len, W, 2)
        li = 0
        for b in range(K):
            blk = spec.blocks[b]
            inp, r_in, c_in = z, rch[li], cch[li]
            for j in range(len(blk.convs)):
                r, c = rch[li], cch[li]
                z = net.conv(b, j, z, ((0, 0), (0, 0)))
                z = _mask(z, r.out_a * o_r + r.out_b, r.out_size, 1)
                z = _mask(z, c.out_a * o_c + c.out_b, c.out_size, 2)
                li += 1
            if blk.residual:
                r, c = rch[li - 1], cch[li - 1]
                dr, dc = r.out_b - r_in.in_b, c.out_b - c_in.in_b  # same slope: static offsets
                z = net.add(b, inp[:, dr:dr + r.out_len, dc:dc + c.out_len], z)
        return jax.lax.dynamic_update_slice(out, z.astype(out.dtype), (0, o_r, o_c, 0))

    return jax.lax.fori_loop(0, n * n, patch_body, out0)


def patch_stage(net, x: jax.Array, K: int, n: int, mode: str = "unrolled") -> jax.Array:
    """Output of the patch stage for an already prepared input (see ``net.prepare_input``)."""
    if mode == "unrolled":
        return patch_stage_unrolled(net, x, K, n)
    if mode == "loop":
        return patch_stage_loop(net, x, K, n)
    raise ValueError(f"mode={mode!r} is invalid: allowed values are {MODES}")


def forward_patch(net, x: jax.Array, K: int, n: int, mode: str = "unrolled") -> jax.Array:
    """Patch-based inference: blocks ``0..K-1`` patch by patch (``n x n``), the rest layer by layer."""
    y = patch_stage(net, net.prepare_input(x), K, n, mode)
    return net.head(run_blocks(net, y, K))


def stage_output(net, x: jax.Array, K: int) -> jax.Array:
    """Whole-image output of blocks ``0..K-1`` (reference for the patch stage)."""
    return run_blocks(net, net.prepare_input(x), 0, K)
