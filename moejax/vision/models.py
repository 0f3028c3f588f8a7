"""Flax NNX CNNs built from a :class:`~moejax.vision.spec.NetSpec`, and their BatchNorm-folded inference form.

:class:`VisionNet` is the trainable model (Conv -> BatchNorm -> activation per :class:`ConvSpec`, identity
residuals, global average pool, linear classifier). For inference, :func:`fold_bn` folds every BatchNorm into
its convolution (``w' = w * gamma / sqrt(var + eps)``, ``b' = beta - mean * gamma / sqrt(var + eps)``) and
returns a :class:`FoldedNet`: a pytree of plain arrays plus the static spec. Folding matters for patch-based
inference: with batch statistics, each patch would be normalised differently. ``FoldedNet`` exposes the
per-layer operations (``prepare_input``, ``conv``, ``add``, ``head``) that the whole-image and patch-based
executors in :mod:`moejax.vision.executor` share; :class:`moejax.vision.quant.QuantNet` implements the same
operations in int8.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moejax.vision.spec import ConvSpec, NetSpec

HIGHEST = jax.lax.Precision.HIGHEST
DN = ("NHWC", "HWIO", "NHWC")


def activation(x: jax.Array, act: str) -> jax.Array:
    """Apply ``relu6``, ``relu`` or ``none``."""
    if act == "relu6":
        return jnp.clip(x, 0.0, 6.0)
    if act == "relu":
        return jnp.maximum(x, 0.0)
    if act == "none":
        return x
    raise ValueError(f"act={act!r} is invalid: allowed values are 'relu6', 'relu', 'none'")


CONV_IMPLS = ("xla", "exact")


def conv2d_exact(x: jax.Array, w: jax.Array, conv: ConvSpec, padding) -> jax.Array:
    """Convolution with a reduction order that does not depend on the spatial size.

    XLA's convolution may sum in a different order for a 75x75 patch than for the 224x224 image, so float32
    results can differ in the last bit. Here every output element is accumulated in the same fixed order --
    kernel taps row-major, then input channels in order (``acc = acc + x * w``, elementwise) -- so the same
    pixel gets bitwise the same value whatever region it is computed in. Slower than ``conv2d``; used to show
    that patch-based execution is exactly the whole-image computation.
    """
    if conv.groups not in (1, conv.cin) or (conv.groups > 1 and not conv.depthwise):
        raise ValueError(f"conv_impl='exact' supports groups=1 or depthwise, got groups={conv.groups}")
    (pt, pb), (pl, pr) = padding
    x = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    n, h, wd, _ = x.shape
    s, d, k = conv.stride, conv.dilation, conv.kernel
    ho, wo = (h - conv.span) // s + 1, (wd - conv.span) // s + 1
    taps = [x[:, dy * d:dy * d + (ho - 1) * s + 1:s, dx * d:dx * d + (wo - 1) * s + 1:s, :]
            for dy in range(k) for dx in range(k)]
    if conv.depthwise:
        acc = jnp.zeros((n, ho, wo, conv.cout), x.dtype)
        for t, xs in enumerate(taps):
            acc = acc + xs * w[t // k, t % k, 0]
        return acc
    # im2col rows in HWIO order (tap-major, then input channel), reduced one row at a time
    cols = jnp.moveaxis(jnp.stack(taps, 0), 4, 1).reshape(len(taps) * conv.cin, n, ho, wo)
    wr = w.reshape(len(taps) * conv.cin, conv.cout)
    acc = jnp.zeros((n, ho, wo, conv.cout), x.dtype)
    def step(a, cw):
        xc, wc = cw
        return a + xc[..., None] * wc, None
    acc, _ = jax.lax.scan(step, acc, (cols, wr))
    return acc


def conv2d(x: jax.Array, w: jax.Array, conv: ConvSpec, padding, impl: str = "xla") -> jax.Array:
    """NHWC x HWIO convolution with explicit ``((top, bottom), (left, right))`` zero padding.

    ``impl="xla"``: ``lax.conv_general_dilated``; ``impl="exact"``: :func:`conv2d_exact`.
    """
    if impl == "exact":
        return conv2d_exact(x, w, conv, padding)
    if impl != "xla":
        raise ValueError(f"conv_impl={impl!r} is invalid: allowed values are {CONV_IMPLS}")
    return jax.lax.conv_general_dilated(
        x, w, window_strides=(conv.stride, conv.stride), padding=padding,
        rhs_dilation=(conv.dilation, conv.dilation), dimension_numbers=DN,
        feature_group_count=conv.groups, precision=HIGHEST)


class ConvBN(nnx.Module):
    """Convolution (no bias) + BatchNorm + activation, configured by a :class:`ConvSpec`."""

    def __init__(self, c: ConvSpec, *, rngs: nnx.Rngs):
        p = c.padding
        self.act = c.act
        self.conv = nnx.Conv(c.cin, c.cout, (c.kernel, c.kernel), strides=c.stride, padding=[(p, p), (p, p)],
                             kernel_dilation=c.dilation, feature_group_count=c.groups, use_bias=False,
                             precision=HIGHEST, rngs=rngs)
        self.bn = nnx.BatchNorm(c.cout, momentum=0.9, epsilon=1e-5, rngs=rngs)

    def __call__(self, x):
        return activation(self.bn(self.conv(x)), self.act)


class Block(nnx.Module):
    """A chain of :class:`ConvBN` with an optional identity residual."""

    def __init__(self, convs, residual: bool, *, rngs: nnx.Rngs):
        self.convs = nnx.List([ConvBN(c, rngs=rngs) for c in convs])
        self.residual = residual

    def __call__(self, x):
        y = x
        for c in self.convs:
            y = c(y)
        return x + y if self.residual else y


class VisionNet(nnx.Module):
    """Trainable CNN for a :class:`NetSpec` (NHWC input in, logits out).

    Call ``model.train()`` / ``model.eval()`` to switch BatchNorm between batch and running statistics.
    """

    def __init__(self, spec: NetSpec, *, rngs: nnx.Rngs):
        spec.validate()
        self.spec = spec
        self.blocks = nnx.List([Block(b.convs, b.residual, rngs=rngs) for b in spec.blocks])
        self.classifier = nnx.Linear(spec.blocks[-1].cout, spec.num_classes, rngs=rngs)

    def __call__(self, x):
        for b in self.blocks:
            x = b(x)
        return self.classifier(jnp.mean(x, axis=(1, 2)))


def _register(cls, data, meta):
    return jax.tree_util.register_dataclass(cls, data_fields=data, meta_fields=meta)


@dataclasses.dataclass(frozen=True)
class FoldedNet:
    """Inference form of a network: BN folded into conv weights, float32.

    Attributes:
      spec: the static network description.
      params: per block, per conv, ``(w [k, k, cin/groups, cout], b [cout])``.
      head: ``(w [C, classes], b [classes])`` of the classifier.
      linear: if True every activation is the identity (used to check receptive fields with ``jax.grad``).
      conv_impl: ``"xla"`` (fast) or ``"exact"`` (spatial-size-independent summation order, see
        :func:`conv2d_exact`).
    """

    spec: NetSpec
    params: Any
    head_params: Any
    linear: bool = False
    conv_impl: str = "xla"

    def prepare_input(self, x: jax.Array) -> jax.Array:
        """The image as the first layer consumes it (float32 here; int8 codes in ``QuantNet``)."""
        return x.astype(jnp.float32)

    def conv(self, b: int, j: int, x: jax.Array, padding) -> jax.Array:
        """Convolution ``j`` of block ``b`` with folded BN and its activation."""
        c = self.spec.blocks[b].convs[j]
        w, bias = self.params[b][j]
        y = conv2d(x, w, c, padding, self.conv_impl) + bias
        return y if self.linear else activation(y, c.act)

    def add(self, b: int, residual: jax.Array, y: jax.Array) -> jax.Array:
        """Residual add of block ``b``."""
        return residual + y

    def to_float(self, x: jax.Array) -> jax.Array:
        """Real values of an activation tensor (identity for float)."""
        return x

    def head(self, x: jax.Array) -> jax.Array:
        """Global average pool + linear classifier."""
        w, b = self.head_params
        return jnp.dot(jnp.mean(self.to_float(x), axis=(1, 2)), w, precision=HIGHEST) + b

    def as_linear(self) -> FoldedNet:
        """Same weights with identity activations."""
        return dataclasses.replace(self, linear=True)

    def with_conv_impl(self, impl: str) -> FoldedNet:
        """Same network with another convolution implementation (``"xla"`` or ``"exact"``)."""
        if impl not in CONV_IMPLS:
            raise ValueError(f"conv_impl={impl!r} is invalid: allowed values are {CONV_IMPLS}")
        return dataclasses.replace(self, conv_impl=impl)


_register(FoldedNet, ["params", "head_params"], ["spec", "linear", "conv_impl"])


def fold_bn(model: VisionNet) -> FoldedNet:
    """Fold every BatchNorm (running statistics) into its convolution; returns a :class:`FoldedNet`."""
    params = []
    for blk in model.blocks:
        bp = []
        for cb in blk.convs:
            bn = cb.bn
            inv = bn.scale[...] / jnp.sqrt(bn.var[...] + bn.epsilon)
            w = cb.conv.kernel[...] * inv
            b = bn.bias[...] - bn.mean[...] * inv
            bp.append((w, b))
        params.append(tuple(bp))
    head = (model.classifier.kernel[...], model.classifier.bias[...])
    return FoldedNet(model.spec, tuple(params), head)


def random_folded(spec: NetSpec, seed: int = 0, bias_scale: float = 0.1) -> FoldedNet:
    """A :class:`FoldedNet` with random He-scaled weights and random biases (for tests and memory runs)."""
    spec.validate()
    rng = np.random.default_rng(seed)
    params = []
    for blk in spec.blocks:
        bp = []
        for c in blk.convs:
            fan_in = c.kernel * c.kernel * (c.cin // c.groups)
            w = rng.standard_normal((c.kernel, c.kernel, c.cin // c.groups, c.cout)) * (2.0 / fan_in) ** 0.5
            b = bias_scale * rng.standard_normal((c.cout,))
            bp.append((jnp.asarray(w, jnp.float32), jnp.asarray(b, jnp.float32)))
        params.append(tuple(bp))
    cl = spec.blocks[-1].cout
    head = (jnp.asarray(rng.standard_normal((cl, spec.num_classes)) / cl ** 0.5, jnp.float32),
            jnp.zeros((spec.num_classes,), jnp.float32))
    return FoldedNet(spec, tuple(params), head)
