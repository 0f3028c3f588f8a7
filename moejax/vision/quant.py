"""int8 post-training quantization of a folded CNN (per-channel weights, per-tensor activations).

:func:`quantize` calibrates one symmetric per-tensor scale for every stored activation (the input image,
each convolution output and each residual sum: ``scale = max|x| / 127`` over calibration images) and one
symmetric per-output-channel scale for every convolution weight (``max|w[..., c]| / 127``). Biases become int32
in units of ``s_in * s_w[c]``.

:class:`QuantNet` runs the network on int8 *codes* (integers in ``[-127, 127]`` stored as float32 so the same
XLA convolutions apply): ``acc = conv(q_in, q_w) + q_b`` is an exact integer sum (every partial sum stays below
2**24 while ``kernel * kernel * cin / groups <= 1040``, which holds for MobileNetV2), then ``y = act(acc * s_in * s_w)`` and ``q_out = clip(round(y / s_out))``. Because the
accumulation is exact, patch-based and whole-image int8 inference agree bit for bit with any convolution
algorithm. Activation memory is then one byte per element, as on a microcontroller. The classifier
(average pool + linear) runs on dequantized features in float32.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from moejax.vision.executor import run_blocks
from moejax.vision.models import FoldedNet, activation, conv2d

QMAX = 127.0


def _q(x, scale):
    return jnp.clip(jnp.round(x / scale), -QMAX, QMAX)


@dataclasses.dataclass(frozen=True)
class QuantNet:
    """int8 network with the same layer operations as :class:`~moejax.vision.models.FoldedNet`.

    Attributes:
      spec: network description (static).
      weights: per block, per conv, ``(q_w int8 codes, s_w [cout], q_b int32 codes)``.
      in_scales / out_scales: per block, per conv, the activation scale read / written.
      add_scales: per block, the scale of the residual sum (1.0 where there is none).
      input_scale: scale of the input image.
      head_params: float classifier ``(w, b)``.
    """

    spec: Any
    weights: Any
    in_scales: Any
    out_scales: Any
    add_scales: Any
    input_scale: Any
    head_params: Any

    def prepare_input(self, x):
        """Quantize the image to int8 codes."""
        return _q(x.astype(jnp.float32), self.input_scale)

    def conv(self, b: int, j: int, x, padding):
        c = self.spec.blocks[b].convs[j]
        qw, sw, qb = self.weights[b][j]
        acc = conv2d(x, qw, c, padding) + qb
        y = activation(acc * (self.in_scales[b][j] * sw), c.act)
        return _q(y, self.out_scales[b][j])

    def add(self, b: int, residual, y):
        blk = self.spec.blocks[b]
        s_res = self.in_scales[b][0]
        s_y = self.out_scales[b][len(blk.convs) - 1]
        return _q(residual * s_res + y * s_y, self.add_scales[b])

    def output_scale(self, b: int):
        """Scale of block ``b``'s output tensor."""
        blk = self.spec.blocks[b]
        return self.add_scales[b] if blk.residual else self.out_scales[b][len(blk.convs) - 1]

    def to_float(self, x):
        """Dequantize the final feature map (output of the last block)."""
        return x * self.output_scale(self.spec.num_blocks - 1)

    def head(self, x):
        w, b = self.head_params
        return jnp.dot(jnp.mean(self.to_float(x), axis=(1, 2)), w, precision=jax.lax.Precision.HIGHEST) + b


jax.tree_util.register_dataclass(
    QuantNet, data_fields=["weights", "in_scales", "out_scales", "add_scales", "input_scale", "head_params"],
    meta_fields=["spec"])


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
    weights, in_s, out_s, add_s = [], [], [], []
    cur, k = s_input, 0
    for b, blk in enumerate(net.spec.blocks):
        bw, bi, bo = [], [], []
        for j, c in enumerate(blk.convs):
            w, bias = net.params[b][j]
            sw = jnp.maximum(jnp.max(jnp.abs(w), axis=(0, 1, 2)), 1e-8) / QMAX
            qw = jnp.clip(jnp.round(w / sw), -QMAX, QMAX)
            qb = jnp.round(bias / (cur * sw))
            so = scale(maxes[k])
            k += 1
            bw.append((qw, sw, qb))
            bi.append(jnp.float32(cur))
            bo.append(jnp.float32(so))
            cur = so
        if blk.residual:
            sa = scale(maxes[k])
            k += 1
            cur = sa
        else:
            sa = 1.0
        weights.append(tuple(bw))
        in_s.append(tuple(bi))
        out_s.append(tuple(bo))
        add_s.append(jnp.float32(sa))
    return QuantNet(net.spec, tuple(weights), tuple(in_s), tuple(out_s), tuple(add_s), jnp.float32(s_input),
                    net.head_params)
