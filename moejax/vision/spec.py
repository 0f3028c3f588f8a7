"""Static network descriptions for patch-based CNN inference (MCUNetV2).

A network is a :class:`NetSpec`: a stem-to-head sequence of :class:`BlockSpec` (the unit the patch stage is
counted in: block 0 is the stem convolution, then the inverted-residual blocks, then the final 1x1 convolution)
followed by global average pooling and a linear classifier. Each block is a short chain of
:class:`ConvSpec` (square kernels, zero "same"-style padding ``dilation * (kernel - 1) // 2``) with an optional
identity residual around it. Specs are frozen and hashable so they can be static arguments of ``jax.jit``.

Builders: :func:`mobilenetv2` (width multiplier, resolution, the real MobileNetV2 stage table) and
:func:`mcunet` (MCUNet-style: per-block kernel sizes and expansion ratios).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

ACTIVATIONS = ("relu6", "relu", "none")

# MobileNetV2 (Sandler et al. 2018, Table 2): expansion t, output channels c, repeats n, first stride s.
MOBILENETV2_STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                      (6, 160, 3, 2), (6, 320, 1, 1))


def make_divisible(v: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round a channel count to a multiple of ``divisor`` (never below 90% of ``v``), as in MobileNetV2."""
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


@dataclass(frozen=True)
class ConvSpec:
    """One convolution (+ folded BatchNorm) + activation.

    Attributes:
      cin, cout: input and output channels.
      kernel: square kernel size (odd).
      stride: spatial stride.
      dilation: kernel dilation.
      groups: feature groups (``groups == cin == cout`` is a depthwise convolution).
      act: ``"relu6"``, ``"relu"`` or ``"none"`` (linear bottleneck).
    """

    cin: int
    cout: int
    kernel: int = 1
    stride: int = 1
    dilation: int = 1
    groups: int = 1
    act: str = "relu6"

    @property
    def padding(self) -> int:
        """Zero padding on each side (applied only at the true feature-map border)."""
        return self.dilation * (self.kernel - 1) // 2

    @property
    def span(self) -> int:
        """Extent of the dilated kernel: ``dilation * (kernel - 1) + 1``."""
        return self.dilation * (self.kernel - 1) + 1

    @property
    def depthwise(self) -> bool:
        return self.groups > 1 and self.groups == self.cin == self.cout

    def out_size(self, size: int) -> int:
        """Output length along one axis for an input of length ``size``."""
        return (size + 2 * self.padding - self.span) // self.stride + 1

    def macs_per_pixel(self) -> int:
        """Multiply-accumulates per output pixel."""
        return self.kernel * self.kernel * (self.cin // self.groups) * self.cout

    def validate(self, where: str = "ConvSpec") -> None:
        for name in ("cin", "cout", "kernel", "stride", "dilation", "groups"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{where}.{name}={v!r} is invalid: must be an integer >= 1")
        if self.kernel % 2 == 0:
            raise ValueError(f"{where}.kernel={self.kernel} is invalid: must be odd (symmetric padding)")
        if self.cin % self.groups or self.cout % self.groups:
            raise ValueError(f"{where}.groups={self.groups} is invalid: must divide cin={self.cin} and "
                             f"cout={self.cout}")
        if self.act not in ACTIVATIONS:
            raise ValueError(f"{where}.act={self.act!r} is invalid: allowed values are {ACTIVATIONS}")


@dataclass(frozen=True)
class BlockSpec:
    """A chain of convolutions, optionally wrapped in an identity residual (``y = x + convs(x)``).

    Attributes:
      convs: the convolutions in order.
      residual: add the block input to the output (requires stride 1 and equal channels).
      name: label used in tables and plots.
      kernel, expand: the block's depthwise kernel size and expansion ratio (informational; 0 if none).
    """

    convs: tuple[ConvSpec, ...]
    residual: bool = False
    name: str = ""
    kernel: int = 0
    expand: int = 0

    @property
    def cin(self) -> int:
        return self.convs[0].cin

    @property
    def cout(self) -> int:
        return self.convs[-1].cout

    @property
    def stride(self) -> int:
        s = 1
        for c in self.convs:
            s *= c.stride
        return s

    def out_size(self, size: int) -> int:
        for c in self.convs:
            size = c.out_size(size)
        return size


@dataclass(frozen=True)
class NetSpec:
    """A CNN: blocks (stem, inverted residuals, final 1x1 conv), global average pool, linear classifier.

    Attributes:
      name: label.
      resolution: input height and width (square images).
      in_channels: image channels.
      blocks: the blocks; the patch stage is a prefix ``blocks[:K]``.
      num_classes: classifier outputs.
    """

    name: str
    resolution: int
    in_channels: int
    blocks: tuple[BlockSpec, ...]
    num_classes: int = 1000
    meta: tuple = field(default=(), compare=False)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def validate(self) -> NetSpec:
        """Check shapes chain and residuals are legal; raises ValueError naming the field."""
        if not isinstance(self.resolution, int) or self.resolution < 1:
            raise ValueError(f"NetSpec.resolution={self.resolution!r} is invalid: must be an integer >= 1")
        if not self.blocks:
            raise ValueError("NetSpec.blocks is empty: a network needs at least one block")
        if self.num_classes < 1:
            raise ValueError(f"NetSpec.num_classes={self.num_classes} is invalid: must be >= 1")
        c, size = self.in_channels, self.resolution
        for b, blk in enumerate(self.blocks):
            for j, conv in enumerate(blk.convs):
                conv.validate(f"blocks[{b}].convs[{j}]")
                if conv.cin != c:
                    raise ValueError(f"blocks[{b}].convs[{j}].cin={conv.cin} does not match the previous "
                                     f"output channels {c}")
                c = conv.cout
                size = conv.out_size(size)
                if size < 1:
                    raise ValueError(f"NetSpec.resolution={self.resolution} is too small: the feature map "
                                     f"vanishes at blocks[{b}].convs[{j}]")
            if blk.residual and (blk.stride != 1 or blk.cin != blk.cout):
                raise ValueError(f"blocks[{b}].residual=True needs stride 1 and cin == cout "
                                 f"(got stride {blk.stride}, {blk.cin}->{blk.cout})")
        return self

    def feature_sizes(self, resolution: int | None = None) -> list[int]:
        """Spatial size after each block (index b = output of block b); entry -1 is the input."""
        size = resolution or self.resolution
        out = []
        for blk in self.blocks:
            size = blk.out_size(size)
            out.append(size)
        return out

    def with_resolution(self, resolution: int) -> NetSpec:
        return replace(self, resolution=resolution).validate()

    def describe(self) -> str:
        """One line per block: name, channels, stride, kernel, expansion, residual."""
        lines, size = [], self.resolution
        for b, blk in enumerate(self.blocks):
            size = blk.out_size(size)
            lines.append(f"{b:2d} {blk.name:14s} {blk.cin:4d}->{blk.cout:4d} s{blk.stride} k{blk.kernel} "
                         f"t{blk.expand} {'res' if blk.residual else '   '} out {size}x{size}")
        return "\n".join(lines)


def inverted_residual(cin: int, cout: int, stride: int, expand: int, kernel: int, name: str = "",
                      act: str = "relu6", dilation: int = 1) -> BlockSpec:
    """MobileNetV2 inverted residual: [1x1 expand] -> kxk depthwise (stride) -> 1x1 linear projection."""
    hidden = round(cin * expand)
    convs = []
    if expand != 1:
        convs.append(ConvSpec(cin, hidden, 1, act=act))
    convs.append(ConvSpec(hidden, hidden, kernel, stride, dilation, groups=hidden, act=act))
    convs.append(ConvSpec(hidden, cout, 1, act="none"))
    return BlockSpec(tuple(convs), residual=(stride == 1 and cin == cout), name=name, kernel=kernel,
                     expand=expand)


def build_ir_net(name: str, resolution: int, stem: int, blocks: Sequence[tuple[int, int, int, int]],
                 last: int, num_classes: int, in_channels: int = 3, act: str = "relu6",
                 stem_kernel: int = 3) -> NetSpec:
    """Stem conv (stride 2) + inverted residual blocks ``(cout, stride, expand, kernel)`` + final 1x1 conv."""
    out = [BlockSpec((ConvSpec(in_channels, stem, stem_kernel, 2, act=act),), name="stem", kernel=stem_kernel)]
    c, stage_idx = stem, 0
    for i, (cout, stride, expand, kernel) in enumerate(blocks):
        if stride != 1 or cout != c:
            stage_idx += 1
        out.append(inverted_residual(c, cout, stride, expand, kernel, name=f"ir{i + 1}.t{expand}k{kernel}",
                                     act=act))
        c = cout
    out.append(BlockSpec((ConvSpec(c, last, 1, act=act),), name="conv_last", kernel=1))
    return NetSpec(name, resolution, in_channels, tuple(out), num_classes).validate()


def _expand_stages(stages, width: float, kernels=None):
    blocks = []
    for t, c, n, s in stages:
        cout = make_divisible(c * width, 8)
        for i in range(n):
            blocks.append([cout, s if i == 0 else 1, t, 3])
    if kernels is not None:
        if len(kernels) != len(blocks):
            raise ValueError(f"kernels has {len(kernels)} entries: must have one per inverted-residual block "
                             f"({len(blocks)})")
        for b, k in zip(blocks, kernels):
            b[3] = k
    return [tuple(b) for b in blocks]


def mobilenetv2(width: float = 1.0, resolution: int = 224, num_classes: int = 1000,
                in_channels: int = 3) -> NetSpec:
    """MobileNetV2 with width multiplier ``width`` at input ``resolution`` (17 inverted residual blocks).

    Blocks: 0 = stem 3x3/2 conv (32*width channels), 1..17 = inverted residuals, 18 = 1x1 conv to
    ``max(1280, 1280*width)`` channels; then average pool and a linear classifier.
    """
    if not isinstance(width, (int, float)) or width <= 0:
        raise ValueError(f"width={width!r} is invalid: must be a positive number")
    stem = make_divisible(32 * width, 8)
    last = make_divisible(1280 * max(1.0, width), 8)
    blocks = _expand_stages(MOBILENETV2_STAGES, width)
    return build_ir_net(f"mobilenetv2-w{width:g}-r{resolution}", resolution, stem, blocks, last, num_classes,
                        in_channels)


def mcunet(kernels: Sequence[int], expands: Sequence[int], width: float = 1.0, resolution: int = 160,
           num_classes: int = 1000, stages: Sequence[tuple[int, int, int, int]] = MOBILENETV2_STAGES,
           in_channels: int = 3, name: str = "mcunet") -> NetSpec:
    """MCUNet-style network: MobileNetV2 stage layout with per-block kernel sizes and expansion ratios.

    ``kernels[i]`` and ``expands[i]`` set inverted-residual block ``i`` (the stage table ``stages`` fixes
    channels, repeats and strides); ``len(kernels) == len(expands) == sum(n for stages)``.
    """
    blocks = _expand_stages(stages, width, kernels)
    if len(expands) != len(blocks):
        raise ValueError(f"expands has {len(expands)} entries: must have one per inverted-residual block "
                         f"({len(blocks)})")
    blocks = [(c, s, e, k) for (c, s, _, k), e in zip(blocks, expands)]
    stem = make_divisible(32 * width, 8)
    last = make_divisible(1280 * max(1.0, width), 8)
    return build_ir_net(f"{name}-w{width:g}-r{resolution}", resolution, stem, blocks, last, num_classes,
                        in_channels)


def ir_blocks_of(spec: NetSpec) -> list[tuple[int, int, int, int]]:
    """The inverted-residual blocks of ``spec`` as ``(cout, stride, expand, kernel)`` (stem/last excluded)."""
    return [(b.cout, b.stride, b.expand, b.kernel) for b in spec.blocks[1:-1]]
