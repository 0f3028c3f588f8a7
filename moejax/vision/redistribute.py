"""Receptive-field redistribution (MCUNetV2 Sec. 3.2): shrink the patch stage's receptive field and move the
capacity to later stages.

The overlap between neighbouring patches (hence the recomputation overhead) grows with the receptive field
of the patch stage. :func:`redistribute` removes stride-1 residual blocks from the patch stage and/or caps its
depthwise kernels, re-inserts the removed blocks after the stage (same channels, so the later, low-memory
stage gains the depth) and can enlarge the later stage's depthwise kernels to restore the overall receptive
field. The transform works on a :class:`~moejax.vision.spec.NetSpec`; train (or fine-tune) the result.
"""

from __future__ import annotations

import dataclasses

from moejax.vision import rf
from moejax.vision.spec import NetSpec, build_ir_net, ir_blocks_of, mobilenetv2

# The configuration used for "MobileNetV2-RD" in experiments/mcunetv2.py. The paper's redistributed MobileNetV2
# is only shown as a figure; this is our manual choice in its spirit: drop the stride-1 24-channel block from
# the patch stage (receptive field 27 -> 19 pixels per output pixel), re-insert it in the 32-channel stage, and
# use 5x5 depthwise kernels after the patch stage.
MBV2_RD = {"K": 5, "drop": (3,), "later_kernel": 5}


def redistribute(spec: NetSpec, K: int, drop: tuple[int, ...] = (), stage_kernel: int | None = None,
                 later_kernel: int | None = None) -> tuple[NetSpec, int]:
    """Redistribute the receptive field of the ``K``-block patch stage of an inverted-residual network.

    Args:
      spec: a network built by :func:`~moejax.vision.spec.build_ir_net` (stem, inverted residuals, last conv).
      K: number of blocks in the patch stage of ``spec``.
      drop: indices (into ``spec.blocks``, inside ``1..K-1``) of stride-1 residual blocks to move out of the
        patch stage; each is re-inserted right after the patch stage with the same channels and expansion.
      stage_kernel: cap on the depthwise kernel size inside the patch stage (odd), or None.
      later_kernel: depthwise kernel size of every block after the patch stage (odd), or None to keep.

    Returns:
      ``(new_spec, new_K)``: the transformed network and the size of its patch stage.
    """
    rf.check_prefix(spec, K)
    irs = ir_blocks_of(spec)  # blocks[1:-1]
    stem = spec.blocks[0].convs[0]
    last = spec.blocks[-1].convs[0]
    for d in drop:
        if not 1 <= d < min(K, spec.num_blocks - 1):
            raise ValueError(f"drop={drop}: block {d} is not an inverted-residual block of the patch stage "
                             f"(allowed 1..{min(K, spec.num_blocks - 1) - 1})")
        if not spec.blocks[d].residual:
            raise ValueError(f"drop={drop}: block {d} ({spec.blocks[d].name}) is not a stride-1 residual block, "
                             f"so removing it would change the shapes")
    for name, k in (("stage_kernel", stage_kernel), ("later_kernel", later_kernel)):
        if k is not None and (not isinstance(k, int) or k < 1 or k % 2 == 0):
            raise ValueError(f"{name}={k!r} is invalid: must be an odd integer >= 1")
    stage, moved = [], []
    for i, blk in enumerate(irs[:K - 1], start=1):
        cout, s, t, k = blk
        if stage_kernel is not None:
            k = min(k, stage_kernel)
        (moved if i in drop else stage).append((cout, s, t, k))
    later = [(c, s, t, k) for c, s, t, k in moved] + list(irs[K - 1:])
    if later_kernel is not None:
        later = [(c, s, t, later_kernel) for c, s, t, _ in later]
    # a moved block keeps its own channel count; it must follow a block with the same output channels
    new_K = K - len(drop)
    c_out = stage[-1][0] if stage else stem.cout
    fixed = []
    for i, (c, s, t, k) in enumerate(later):
        if i < len(moved):
            c = c_out  # re-inserted blocks take the stage output's channels (stride 1, residual)
        fixed.append((c, s, t, k))
    new = build_ir_net(f"{spec.name}-rd", spec.resolution, stem.cout, stage + fixed, last.cout, spec.num_classes,
                       spec.in_channels, act=stem.act, stem_kernel=stem.kernel)
    return dataclasses.replace(new, meta=(("redistributed_from", spec.name), ("K", new_K))), new_K


def redistribute_mobilenetv2(width: float = 1.0, resolution: int = 224, num_classes: int = 1000) -> NetSpec:
    """MobileNetV2-RD: :data:`MBV2_RD` applied to :func:`~moejax.vision.spec.mobilenetv2`."""
    cfg = dict(MBV2_RD)
    spec, _ = redistribute(mobilenetv2(width, resolution, num_classes), cfg.pop("K"), **cfg)
    return dataclasses.replace(spec, name=f"mobilenetv2-rd-w{width:g}-r{resolution}")
