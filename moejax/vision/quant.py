"""int8 post-training quantization of a folded CNN (per-channel weights, per-tensor activations).

:func:`quantize` calibrates one symmetric per-tensor scale for every stored activation (the input image,
each convolution output and each residual sum: ``scale = max|x| / 127`` over calibration images) and one
symmetric per-output-channel scale for every convolution weight (``max|w[..., c]| / 127``). Biases become int32
in units of ``s_in * s_w[c]``.

:class:`QuantNet` runs the network on int8 *codes* (integers in ``[-127, 127]`` stored as float32 so the same
XLA convolutions apply), the way an integer-only MCU kernel does:

* convolution: ``acc = conv(q_in, q_w) + q_b`` is an exact integer sum (every partial sum stays below 2**24
  while ``kernel * kernel * cin / groups <= 1040``, which holds for MobileNetV2), then one requantizing
  multiply ``q_out = clip(round(acc * m[c]), lo, hi)`` with ``m = s_in * s_w / s_out`` precomputed per channel
  and the activation folded into the clip range (ReLU6: ``[0, round(6 / s_out)]``);
* residual add: ``q = clip(round(q_a * A + q_b * B))`` with ``A = s_a / s_out`` and ``B = s_b / s_out`` rounded to
  16 significant bits, so both products are exact and a fused multiply-add gives the same result as separate
  ones.

Every output code is therefore one correctly rounded operation on exact values, whatever the convolution
algorithm, operand shapes or XLA fusion: patch-based and whole-image int8 inference agree bit for bit.
Activation memory is one byte per element, as on a microcontroller. The classifier (average pool + linear)
runs on dequantized features in float32.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from moejax.vision.executor import run_blocks
from moejax.vision.models import FoldedNet, conv2d

QMAX = 127.0
MULT_BITS = 16


def _q(x, scale):
    return jnp.clip(jnp.round(x / scale), -QMAX, QMAX)


def round_significand(x, bits: int = MULT_BITS) -> np.ndarray:
    """Round positive floats to ``bits`` significant bits (so ``int8 * x`` is exact in float32)."""
    m, e = np.frexp(np.asarray(x, np.float64))
    return np.ldexp(np.round(np.ldexp(m, bits)), e - bits).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class QuantNet:
    """int8 network with the same layer operations as :class:`~moejax.vision.models.FoldedNet`.

    Attributes:
      spec: network description (static).
      weights: per block, per conv, ``(q_w codes, q_b int32 codes, m [cout] requantization multiplier,
        lo, hi)`` (clip range of the output codes: the activation in the integer domain).
      scales: per block, per conv, the output activation scale ``s_out``.
      add_params: per block, ``(A, B, s_add)`` of the residual add (ones where there is none).
      input_scale: scale of the input image.
      head_params: float classifier ``(w, b)``.
    """

    spec: Any
    weights: Any
    scales: Any
    add_params: Any
    input_scale: Any
    head_params: Any

    def prepare_input(self, x):
        """Quantize the image to int8 codes."""
        return _q(x.astype(jnp.float32), self.input_scale)

    def conv(self, b: int, j: int, x, padding):
        c = self.spec.blocks[b].convs[j]
        qw, qb, m, lo, hi = self.weights[b][j]
        acc = conv2d(x, qw, c, padding) + qb
        return jnp.clip(jnp.round(acc * m), lo, hi)

    def add(self, b: int, residual, y):
        a, bb, _ = self.add_params[b]
        return jnp.clip(jnp.round(residual * a + y * bb), -QMAX, QMAX)

    def output_scale(self, b: int):
        """Scale of block ``b``'s output tensor."""
        blk = self.spec.blocks[b]
        return self.add_params[b][2] if blk.residual else self.scales[b][len(blk.convs) - 1]

    def to_float(self, x):
        """Dequantize the final feature map (output of the last block)."""
        return x * self.output_scale(self.spec.num_blocks - 1)

    def head(self, x):
        w, b = self.head_params
        return jnp.dot(jnp.mean(self.to_float(x), axis=(1, 2)), w, precision=jax.lax.Precision.HIGHEST) + b


jax.tree_util.register_dataclass(
    QuantNet, data_fields=["weights", "scales", "add_params", "input_scale", "head_params"], meta_fields=["spec"])


def calibrate(net: FoldedNet, images, batch: int = 64) -> tuple[float, list[float]]:
    """max|x| of the input and of every stored tensor (conv outputs, residual sums), over ``images``."""
    fn = jax.jit(lambda n, x: [jnp.max(jnp.abs(t)) for t in _collect(n, x)])
    in_max, maxes = 0.0, None
    for i in range(0, len(images), batch):
        xb = jnp.asarray(images[i:i + batch], jnp.float32)
        in_max = max(in_max, float(jnp.max(jnp.abs(xb))))
        m = [float(v) for v in fn(net, xb)]
        maxes = m if maxes is None else [max(a, b) for a, b in zip(maxes, m)]
    return in_max, maxes


def _collect(net, x):
    out = []
    run_blocks(net, net.prepare_input(x), collect=out)
    return out


def quantize(net: FoldedNet, calib_images, batch: int = 64) -> QuantNet:
    """Post-training int8 quantization of ``net`` calibrated on ``calib_images`` (NHWC float array)."""
    if len(calib_images) == 0:
        raise ValueError("calib_images is empty: calibration needs at least one image")
    in_max, maxes = calibrate(net, calib_images, batch)

    def scale(m):
        return max(m, 1e-8) / QMAX

    s_input = scale(in_max)
    weights, scales, adds = [], [], []
    cur, k = s_input, 0
    for b, blk in enumerate(net.spec.blocks):
        bw, bs = [], []
        s_block_in = cur
        for j, c in enumerate(blk.convs):
            w, bias = (np.asarray(t, np.float64) for t in net.params[b][j])
            sw = np.maximum(np.max(np.abs(w), axis=(0, 1, 2)), 1e-8) / QMAX
            qw = np.clip(np.round(w / sw), -QMAX, QMAX)
            qb = np.round(bias / (cur * sw))
            so = scale(maxes[k])
            k += 1
            hi = min(QMAX, float(np.round(6.0 / so))) if c.act == "relu6" else QMAX
            lo = 0.0 if c.act in ("relu6", "relu") else -QMAX
            m = (cur * sw / so).astype(np.float32)
            bw.append((jnp.asarray(qw, jnp.float32), jnp.asarray(qb, jnp.float32), jnp.asarray(m),
                       jnp.float32(lo), jnp.float32(hi)))
            bs.append(jnp.float32(so))
            cur = so
        if blk.residual:
            sa = scale(maxes[k])
            k += 1
            adds.append((jnp.asarray(round_significand(s_block_in / sa)), jnp.asarray(round_significand(cur / sa)),
                         jnp.float32(sa)))
            cur = sa
        else:
            adds.append((jnp.float32(1.0), jnp.float32(1.0), jnp.float32(1.0)))
        weights.append(tuple(bw))
        scales.append(tuple(bs))
    return QuantNet(net.spec, tuple(weights), tuple(scales), tuple(adds), jnp.float32(s_input), net.head_params)
