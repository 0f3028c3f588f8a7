"""Analytic activation memory and MACs of layer-by-layer and patch-based schedules, and a (K, n) search.

Counting rules (:class:`CountingRules`; the defaults follow MCUNet/MCUNetV2's TinyEngine accounting, which
reproduces the paper's MobileNetV2 numbers -- 1372 kB = 112*112*(16+96)/1024 bytes in int8):

* A step is one convolution (or the pool / classifier). Its live memory is the sum of the buffers alive
  during it: the input and the output activation, plus the residual buffer (the block input kept for the
  skip connection) while a residual block runs (``residual=True``).
* Depthwise convolutions run in place (``dw_in_place=True``): they need ``max(input, output)``, not the sum
  (TinyEngine's in-place depthwise kernel; its one-channel scratch buffer is not counted). A depthwise
  convolution whose input is the residual buffer cannot overwrite it and counts input + output.
* The projection of a residual block accumulates into the residual buffer (``fuse_residual_add=True``), so its
  step counts input + residual buffer.
* Layer-by-layer, the first step counts the whole input image. Patch-based, only the current patch's input
  region is resident (``patch_full_input=False``: the image is read patch by patch from the sensor/flash).
* Patch-based, every patch-stage step also counts the stage's whole output buffer, which the last convolution
  writes into directly; the remaining blocks then run layer by layer from that buffer.
* ``patch_sizes="uniform"``: every patch is computed at the interior patch size (fixed-size patch buffers;
  regions hanging over the image border are computed on zero padding), as in the ``loop`` executor;
  ``"exact"``: regions clipped at the border, as in the ``unrolled`` executor.
* Bytes per element: 1 for int8, 4 for float32; kB = 1024 bytes. MACs count multiply-accumulates of
  convolutions and the classifier (bias, activation, pooling and residual adds are not counted).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from moejax.vision import rf
from moejax.vision.executor import validate_plan
from moejax.vision.spec import NetSpec

DTYPE_BYTES = {"int8": 1, "float32": 4}
PATCH_SIZES = ("uniform", "exact")


@dataclass(frozen=True)
class CountingRules:
    """How live activation memory is counted (see the module docstring).

    Attributes:
      dw_in_place: depthwise convolutions overwrite their input (peak = max(in, out)).
      residual: residual (skip) buffers count while their block runs.
      fuse_residual_add: the last conv of a residual block accumulates into the residual buffer.
      patch_full_input: patch-based schedules keep the whole input image resident.
      patch_sizes: ``"uniform"`` or ``"exact"`` patch regions (memory and MACs).
    """

    dw_in_place: bool = True
    residual: bool = True
    fuse_residual_add: bool = True
    patch_full_input: bool = False
    patch_sizes: str = "uniform"

    def validate(self) -> CountingRules:
        if self.patch_sizes not in PATCH_SIZES:
            raise ValueError(f"CountingRules.patch_sizes={self.patch_sizes!r} is invalid: allowed values are "
                             f"{PATCH_SIZES}")
        return self


@dataclass
class Step:
    """One execution step: ``live`` elements alive (sum of ``buffers``) and ``macs`` it performs."""

    label: str
    block: int
    live: int
    macs: int
    buffers: dict = field(default_factory=dict)
    stage: str = "layer"


def _conv_live(in_e: int, out_e: int, res_e: int, conv, j: int, nconv: int, residual: bool,
               rules: CountingRules, out_is_buffer: bool = False) -> dict:
    """Buffers alive during conv ``j`` of a block (elements). ``res_e`` is the residual buffer size."""
    keep_res = residual and rules.residual
    bufs = {"in": in_e}
    last = j == nconv - 1
    if keep_res and last and rules.fuse_residual_add:
        bufs["residual(out)"] = res_e
        return bufs
    if keep_res and j > 0:
        bufs["residual"] = res_e
    if conv.depthwise and rules.dw_in_place and not (keep_res and j == 0):
        bufs["in"] = max(in_e, out_e)
        return bufs
    if not out_is_buffer:
        bufs["out"] = out_e
    return bufs


def layer_steps(spec: NetSpec, start: int = 0, rules: CountingRules = CountingRules(),
                resolution: int | None = None, include_head: bool = True) -> list[Step]:
    """Steps of layer-by-layer execution of blocks ``start..`` (+ pool and classifier)."""
    size = resolution or spec.resolution
    if start > 0:
        size = spec.feature_sizes(size)[start - 1]
    steps = []
    for b in range(start, spec.num_blocks):
        blk = spec.blocks[b]
        res_e = size * size * blk.cin
        for j, c in enumerate(blk.convs):
            o = c.out_size(size)
            bufs = _conv_live(size * size * c.cin, o * o * c.cout, res_e, c, j, len(blk.convs), blk.residual,
                              rules)
            steps.append(Step(f"{blk.name}.{j}", b, sum(bufs.values()), o * o * c.macs_per_pixel(), bufs))
            size = o
    if include_head:
        cl = spec.blocks[-1].cout
        steps.append(Step("pool", spec.num_blocks, size * size * cl + cl, 0,
                          {"in": size * size * cl, "out": cl}))
        steps.append(Step("fc", spec.num_blocks, cl + spec.num_classes, cl * spec.num_classes,
                          {"in": cl, "out": spec.num_classes}))
    return steps


def _patch_regions(spec: NetSpec, K: int, n: int, size: int, mode: str):
    """Per patch (row, col) pairs of per-conv (in_len, out_len) along each axis."""
    out_size = spec.feature_sizes(size)[K - 1]
    if mode == "exact":
        axis = [[(r.in_hi - r.in_lo, r.out_hi - r.out_lo) for r in rf.region_chain(spec, K, lo, hi, size)]
                for lo, hi in rf.split(out_size, n)]
    else:
        p, _starts = rf.uniform_split(out_size, n)
        one = [(u.in_len, u.out_len) for u in rf.uniform_chain(spec, K, p, size)]
        axis = [one] * n
    return [(r, c) for r in axis for c in axis]


def patch_steps(spec: NetSpec, K: int, n: int, rules: CountingRules = CountingRules(),
                resolution: int | None = None) -> list[Step]:
    """Steps of patch-based execution: the ``K``-block stage per patch (peak patch), then layer by layer.

    A patch-stage step's ``live`` is the maximum over patches of the per-patch buffers plus the stage output
    buffer; its ``macs`` is the sum over all patches (including recomputed overlap).
    """
    rules.validate()
    size = resolution or spec.resolution
    validate_plan(spec, K, n, size)
    out_size = spec.feature_sizes(size)[K - 1]
    stage_out = out_size * out_size * spec.blocks[K - 1].cout
    patches = _patch_regions(spec, K, n, size, rules.patch_sizes)
    convs = rf.stage_convs(spec, K)
    steps = []
    i = 0
    for b in range(K):
        blk = spec.blocks[b]
        i_block = i
        for j, c in enumerate(blk.convs):
            best, macs = None, 0
            for rows, cols in patches:
                (ri, ro), (ci, co) = rows[i], cols[i]
                (rbi, _), (cbi, _) = rows[i_block], cols[i_block]
                in_e = ri * ci * c.cin
                if i == 0 and rules.patch_full_input:
                    in_e = size * size * c.cin
                last_of_stage = i == len(convs) - 1
                bufs = _conv_live(in_e, ro * co * c.cout, rbi * cbi * blk.cin, c, j, len(blk.convs),
                                  blk.residual, rules, out_is_buffer=last_of_stage)
                bufs["stage_out"] = stage_out
                tot = sum(bufs.values())
                if best is None or tot > best[0]:
                    best = (tot, bufs)
                macs += ro * co * c.macs_per_pixel()
            steps.append(Step(f"{blk.name}.{j}", b, best[0], macs, best[1], stage="patch"))
            i += 1
    return steps + layer_steps(spec, K, rules, size)


def peak(steps: list[Step]) -> int:
    """Largest ``live`` over the steps (elements)."""
    return max(s.live for s in steps)


def total_macs(steps: list[Step]) -> int:
    return sum(s.macs for s in steps)


@dataclass
class PlanReport:
    """Memory and MACs of one network under layer-by-layer and patch-based (K, n) schedules.

    Memory fields are in elements (multiply by bytes per element: 1 int8, 4 float32).
    """

    spec: NetSpec
    K: int
    n: int
    rules: CountingRules
    layer: list[Step]
    patch: list[Step]
    rf: int
    stage_macs: int
    stage_patch_macs: int
    total_macs: int

    @property
    def peak_layer(self) -> int:
        return peak(self.layer)

    @property
    def peak_patch(self) -> int:
        return peak(self.patch)

    @property
    def stage_overhead(self) -> float:
        """Extra MACs of the patch stage relative to computing it layer by layer."""
        return self.stage_patch_macs / self.stage_macs - 1.0

    @property
    def total_overhead(self) -> float:
        """Extra MACs of the patch stage relative to the whole network's MACs."""
        return (self.stage_patch_macs - self.stage_macs) / self.total_macs

    def kb(self, elems: int, dtype: str = "int8") -> float:
        return elems * DTYPE_BYTES[dtype] / 1024

    def summary(self, dtype: str = "int8") -> dict:
        return {"model": self.spec.name, "K": self.K, "n": self.n, "rf": self.rf,
                "peak_layer_kB": self.kb(self.peak_layer, dtype), "peak_patch_kB": self.kb(self.peak_patch, dtype),
                "reduction": self.peak_layer / self.peak_patch, "total_MMACs": self.total_macs / 1e6,
                "stage_MMACs": self.stage_macs / 1e6, "stage_patch_MMACs": self.stage_patch_macs / 1e6,
                "stage_overhead": self.stage_overhead, "total_overhead": self.total_overhead}

    def table(self, dtype: str = "int8") -> str:
        """Per-step memory (kB) and MACs for both schedules, as text."""
        lines = [(f"{self.spec.name}: K={self.K} blocks in the patch stage, {self.n}x{self.n} patches, "
                 f"{dtype}, receptive field {self.rf}px, patch sizes {self.rules.patch_sizes}"),
                 f"{'step':18s} {'layer kB':>10s} {'patch kB':>10s} {'layer MMAC':>11s} {'patch MMAC':>11s}"]
        for a, p in zip(self.layer, self.patch):
            lines.append(f"{a.label:18s} {self.kb(a.live, dtype):10.1f} {self.kb(p.live, dtype):10.1f} "
                         f"{a.macs / 1e6:11.2f} {p.macs / 1e6:11.2f}")
        s = self.summary(dtype)
        lines.append(f"peak: layer-by-layer {s['peak_layer_kB']:.1f} kB, patch-based {s['peak_patch_kB']:.1f} kB "
                     f"({s['reduction']:.2f}x smaller)")
        lines.append(f"MACs: total {s['total_MMACs']:.1f} M; patch stage {s['stage_MMACs']:.1f} M -> "
                     f"{s['stage_patch_MMACs']:.1f} M ({100 * s['stage_overhead']:+.1f}% stage, "
                     f"{100 * s['total_overhead']:+.1f}% network)")
        return "\n".join(lines)


def plan(spec: NetSpec, K: int, n: int, rules: CountingRules = CountingRules(),
         resolution: int | None = None) -> PlanReport:
    """Analytic memory/MAC report of the (K, n) patch plan against layer-by-layer execution."""
    rules.validate()
    size = resolution or spec.resolution
    validate_plan(spec, K, n, size)
    layer = layer_steps(spec, 0, rules, size)
    patch = patch_steps(spec, K, n, rules, size)
    nstage = len(rf.stage_convs(spec, K))
    stage_macs = sum(s.macs for s in layer[:nstage])
    stage_patch = sum(s.macs for s in patch[:nstage])
    return PlanReport(spec if size == spec.resolution else dataclasses.replace(spec, resolution=size), K, n,
                      rules, layer, patch, rf.rf_size(spec, K)[0], stage_macs, stage_patch, total_macs(layer))


def search(spec: NetSpec, max_total_overhead: float = 0.1, max_n: int = 8,
           rules: CountingRules = CountingRules(), resolution: int | None = None) -> tuple[PlanReport, list]:
    """Best (K, n): minimum peak memory whose whole-network MAC overhead is <= ``max_total_overhead``.

    Ties go to fewer MACs. ``n = 1`` (no split) is always feasible. Returns the best report and every
    candidate's summary.
    """
    if max_total_overhead < 0:
        raise ValueError(f"max_total_overhead={max_total_overhead} is invalid: must be >= 0")
    if not isinstance(max_n, int) or max_n < 1:
        raise ValueError(f"max_n={max_n!r} is invalid: must be an integer >= 1")
    size = resolution or spec.resolution
    sizes = spec.feature_sizes(size)
    best, rows = None, []
    for K in range(1, spec.num_blocks + 1):
        for n in range(1, min(max_n, sizes[K - 1]) + 1):
            r = plan(spec, K, n, rules, size)
            s = r.summary()
            s["feasible"] = r.total_overhead <= max_total_overhead + 1e-12
            rows.append(s)
            if s["feasible"] and (best is None or (r.peak_patch, r.stage_patch_macs) <
                                  (best.peak_patch, best.stage_patch_macs)):
                best = r
    return best, rows
