"""MCUNetV2 patch-based inference: exact patch == whole-image outputs, receptive fields, planner, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax.vision import executor as ex
from moejax.vision import planner as pl
from moejax.vision import rf
from moejax.vision.models import VisionNet, fold_bn, random_folded
from moejax.vision.quant import quantize
from moejax.vision.redistribute import redistribute, redistribute_mobilenetv2
from moejax.vision.spec import (
    BlockSpec,
    ConvSpec,
    NetSpec,
    build_ir_net,
    mcunet,
    mobilenetv2,
)


def small_spec(resolution=67):
    """Odd input size, stride-2 blocks with k3 and k5, residual blocks, a dilated block.

    67 -> stem s2 -> 34 -> ir1 (res) 34 -> ir2 k5 s2 -> 17 -> ir3 (res) 17 -> ir4 s2 -> 9 -> last 9.
    """
    return build_ir_net("small", resolution, 8, [(8, 1, 2, 3), (12, 2, 2, 5), (12, 1, 3, 3), (16, 2, 2, 3)],
                        24, 10)


def dilated_spec(resolution=29):
    blocks = (BlockSpec((ConvSpec(3, 6, 3, 2),), name="stem"),
              BlockSpec((ConvSpec(6, 6, 3, 1, dilation=2, groups=6), ConvSpec(6, 6, 1, act="none")), residual=True,
                        name="dil"),
              BlockSpec((ConvSpec(6, 8, 3, 2),), name="down"),
              BlockSpec((ConvSpec(8, 16, 1),), name="last"))
    return NetSpec("dilated", resolution, 3, blocks, 5).validate()


def _image(spec, n=1, seed=1):
    return jax.random.normal(jax.random.PRNGKey(seed), (n, spec.resolution, spec.resolution, 3))


@pytest.fixture(scope="module")
def exact_net():
    return random_folded(small_spec(), seed=0).with_conv_impl("exact")


def _stage_fn(K):
    return jax.jit(lambda net, x: ex.stage_output(net, x, K))


def _patch_fn(K, n, mode):
    return jax.jit(lambda net, x: ex.patch_stage(net, net.prepare_input(x), K, n, mode))


# ---------------------------------------------------------------- exact equality (float32)

def test_loop_patches_equal_whole_image_every_grid(exact_net):
    """K=4 ends right after stride-2 (k5) and residual blocks: 17x17 output, grids 1..8 incl. uneven ones."""
    x = _image(exact_net.spec)
    ref = _stage_fn(4)(exact_net, x)
    for n in range(1, 9):
        y = _patch_fn(4, n, "loop")(exact_net, x)
        assert y.shape == ref.shape
        assert jnp.array_equal(y, ref), f"n={n}: max diff {float(jnp.max(jnp.abs(y - ref)))}"


@pytest.mark.parametrize("K,n", [(2, 3), (3, 2), (5, 2)])
def test_unrolled_patches_equal_whole_image(exact_net, K, n):
    x = _image(exact_net.spec)
    assert jnp.array_equal(_patch_fn(K, n, "unrolled")(exact_net, x), _stage_fn(K)(exact_net, x))


def test_patch_logits_equal_whole_image_logits(exact_net):
    x = _image(exact_net.spec, n=2)
    whole = jax.jit(ex.forward)(exact_net, x)
    patch = jax.jit(lambda net, x: ex.forward_patch(net, x, 4, 3, "loop"))(exact_net, x)
    assert jnp.array_equal(whole, patch)


def test_dilated_patches_equal_whole_image():
    net = random_folded(dilated_spec(), seed=3).with_conv_impl("exact")
    x = _image(net.spec)
    ref = _stage_fn(3)(net, x)
    assert jnp.array_equal(_patch_fn(3, 4, "loop")(net, x), ref)
    assert jnp.array_equal(_patch_fn(3, 3, "unrolled")(net, x), ref)


def test_int8_patches_equal_whole_image_with_xla_convs():
    """int8 accumulation is exact, so even XLA's (size-dependent) convolution gives identical codes."""
    net = random_folded(small_spec(), seed=0)
    x = _image(net.spec, n=2)
    q = quantize(net, np.asarray(_image(net.spec, n=4, seed=7)))
    whole = jax.jit(ex.forward)(q, x)
    patch = jax.jit(lambda q, x: ex.forward_patch(q, x, 4, 4, "loop"))(q, x)
    assert jnp.array_equal(whole, patch)
    ref = jax.jit(ex.forward)(net, x)
    assert float(jnp.max(jnp.abs(whole - ref))) < 0.1 * float(jnp.max(jnp.abs(ref)))


def test_xla_conv_patches_close_to_whole_image():
    """XLA convolutions sum in a size-dependent order: equal up to float32 rounding, not bitwise."""
    net = random_folded(small_spec(), seed=0)
    x = _image(net.spec)
    ref = _stage_fn(4)(net, x)
    y = _patch_fn(4, 4, "loop")(net, x)
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("spec_fn,resolution", [(small_spec, 67), (small_spec, 64), (small_spec, 45),
                                                (dilated_spec, 29), (dilated_spec, 32)])
def test_every_grid_every_K_both_modes(spec_fn, resolution):
    net = random_folded(spec_fn(resolution), seed=resolution).with_conv_impl("exact")
    x = _image(net.spec, seed=resolution)
    sizes = net.spec.feature_sizes()
    for K in range(1, net.spec.num_blocks + 1):
        ref = _stage_fn(K)(net, x)
        for n in range(1, min(8, sizes[K - 1]) + 1):
            # the unrolled executor compiles one program per patch: grids up to 4x4 here, 8x8 below
            for mode in ("loop", "unrolled") if n <= 4 else ("loop",):
                y = _patch_fn(K, n, mode)(net, x)
                assert jnp.array_equal(y, ref), f"K={K} n={n} mode={mode}"


@pytest.mark.slow
def test_unrolled_large_grids():
    net = random_folded(small_spec(), seed=11).with_conv_impl("exact")
    x = _image(net.spec, seed=11)
    for K, n in ((2, 8), (4, 7), (5, 5)):
        assert jnp.array_equal(_patch_fn(K, n, "unrolled")(net, x), _stage_fn(K)(net, x)), (K, n)


@pytest.fixture(scope="module")
def mobilenetv2_net():
    return random_folded(mobilenetv2(0.35, 96, 10), seed=0).with_conv_impl("exact")


# MobileNetV2-0.35 at 96x96: K=5 (a 12x12 output after three stride-2 layers, as a 3x3 grid of patches) in the
# default suite, the other (K, grid) pairs slow.
@pytest.mark.parametrize("K,n", [(5, 3)] + [pytest.param(K, n, marks=pytest.mark.slow) for K in (3, 5, 8)
                                             for n in (2, 3, 4) if (K, n) != (5, 3)])
def test_mobilenetv2_patch_stage_exact(mobilenetv2_net, K, n):
    net = mobilenetv2_net
    x = _image(net.spec)
    assert jnp.array_equal(_patch_fn(K, n, "loop")(net, x), _stage_fn(K)(net, x))


# ---------------------------------------------------------------- receptive field

@pytest.mark.parametrize("spec_fn", [small_spec, dilated_spec])
def test_receptive_field_equals_nonzero_gradient(spec_fn):
    """RF arithmetic == input pixels with a non-zero gradient (linear activations: ReLU6 would hide pixels)."""
    spec = spec_fn()
    net = random_folded(spec, seed=5).as_linear()
    x = _image(spec)
    sizes = spec.feature_sizes()
    for K in range(1, spec.num_blocks):
        grad = jax.jit(jax.grad(lambda x, m, K=K: jnp.sum(ex.stage_output(net, x, K) * m)))
        s = sizes[K - 1]
        for (r0, r1), (c0, c1) in [((0, 1), (0, 1)), ((s - 1, s), (s // 2, s // 2 + 1)),
                                   ((s // 2, s // 2 + 1), (s // 2, s // 2 + 1)), ((1, max(2, s // 2)), (0, s))]:
            m = jnp.zeros((1, s, s, spec.blocks[K - 1].cout)).at[:, r0:r1, c0:c1, :].set(1.0)
            nz = np.asarray(jnp.any(grad(x, m) != 0, axis=(0, 3)))
            rows, cols = np.nonzero(nz.any(1))[0], np.nonzero(nz.any(0))[0]
            assert (rows.min(), rows.max() + 1) == rf.receptive_field(spec, K, r0, r1)
            assert (cols.min(), cols.max() + 1) == rf.receptive_field(spec, K, c0, c1)
            assert nz.sum() == len(rows) * len(cols)  # a full rectangle


def test_rf_size_mobilenetv2():
    # stem k3 s2: 3; ir1 dw k3 at stride 2: +2*2 = 7; ir2 dw k3 s2 at stride 2: +4 = 11;
    # ir3 dw k3 at stride 4: +8 = 19; ir4 dw k3 s2 at stride 4: +8 = 27; cumulative stride 8
    assert rf.rf_size(mobilenetv2(), 5) == (27, 8)
    # a 7x7 output patch (4x4 grid of the 28x28 map) reads (7-1)*8 + 27 = 75 input pixels
    assert rf.uniform_chain(mobilenetv2(), 5, 7)[0].in_len == 75


# ---------------------------------------------------------------- planner (hand-computed)

def planner_spec():
    """16x16x3 -> stem 3x3/2 to 8x8x4 -> residual IR t2 (4->8->8->4) -> 1x1 conv to 8 -> pool -> fc 10."""
    return build_ir_net("hand", 16, 4, [(4, 1, 2, 3)], 8, 10)


def test_planner_layer_by_layer_hand_computed():
    steps = pl.layer_steps(planner_spec())
    live = [s.live for s in steps]
    assert live == [
        16 * 16 * 3 + 8 * 8 * 4,   # stem: image 768 + output 256 = 1024
        8 * 8 * 4 + 8 * 8 * 8,     # expand: input (= residual buffer) 256 + output 512 = 768
        8 * 8 * 8 + 8 * 8 * 4,     # depthwise in place: max(512, 512) + residual 256 = 768
        8 * 8 * 8 + 8 * 8 * 4,     # projection accumulates into the residual: 512 + 256 = 768
        8 * 8 * 4 + 8 * 8 * 8,     # last 1x1 conv: 256 + 512 = 768
        8 * 8 * 8 + 8,             # pool: 512 + 8
        8 + 10,                    # fc
    ]
    assert pl.peak(steps) == 1024
    assert [s.macs for s in steps] == [8 * 8 * 4 * 27, 64 * 4 * 8, 64 * 8 * 9, 64 * 8 * 4, 64 * 4 * 8, 0, 80]
    # without in-place depthwise the dw step needs 512 + 512 + residual 256
    assert pl.peak(pl.layer_steps(planner_spec(), rules=pl.CountingRules(dw_in_place=False))) == 1280
    # without residual buffers: expand 256 + 512, dw max(512, 512), project 512 + 256
    no_res = pl.layer_steps(planner_spec(), rules=pl.CountingRules(residual=False))
    assert [s.live for s in no_res[1:4]] == [768, 512, 768]


def test_planner_patch_based_hand_computed():
    spec = planner_spec()
    # K=2 (stem + IR block), 2x2 grid of the 8x8x4 stage output (buffer 256); uniform patches of 4x4:
    # project out 4 <- dw out 4 in 6 <- expand out 6 in 6 <- stem out 6 in (6-1)*2+3 = 13
    r = pl.plan(spec, 2, 2)
    out_buf = 8 * 8 * 4
    assert [s.live for s in r.patch[:4]] == [
        13 * 13 * 3 + 6 * 6 * 4 + out_buf,   # stem: 507 + 144 + 256 = 907
        6 * 6 * 4 + 6 * 6 * 8 + out_buf,     # expand: 144 + 288 + 256 = 688
        6 * 6 * 8 + 6 * 6 * 4 + out_buf,     # dw in place max(288, 128) + residual 144 + 256 = 688
        4 * 4 * 8 + 6 * 6 * 4 + out_buf,     # project into residual (written to the stage buffer): 528
    ]
    assert r.peak_patch == 907 and r.peak_layer == 1024
    # MACs over 4 uniform patches: stem 36*4*27, expand 36*32, dw 16*72, project 16*32 (each x4)
    assert r.stage_patch_macs == 4 * (36 * 108 + 36 * 32 + 16 * 72 + 16 * 32) == 26816
    assert r.stage_macs == 6912 + 2048 + 4608 + 2048 == 15616
    assert r.total_macs == 15616 + 2048 + 80
    assert r.stage_overhead == pytest.approx(26816 / 15616 - 1)
    # exact (clipped) regions: rows [0,4) need stem out [0,5) from image [0,10); rows [4,8) need stem out
    # [3,8) from image [5,16) (11 rows): the largest patch reads 11x11x3 = 363 and writes 5x5x4 = 100
    e = pl.plan(spec, 2, 2, pl.CountingRules(patch_sizes="exact"))
    assert e.patch[0].live == 363 + 100 + out_buf
    assert e.stage_patch_macs == (5 + 5) ** 2 * 108 + (5 + 5) ** 2 * 32 + 8 * 8 * 72 + 8 * 8 * 32 == 20656


def test_planner_reproduces_paper_mobilenetv2():
    r = pl.plan(mobilenetv2(1.0, 224), 5, 4)
    assert r.kb(r.peak_layer) == 112 * 112 * (16 + 96) / 1024 == 1372.0
    assert r.kb(r.peak_patch) == 28 * 28 * (32 + 192) / 1024 == 171.5
    assert abs(r.stage_overhead - 0.42) < 0.01


def test_search_respects_overhead_limit():
    best, rows = pl.search(mobilenetv2(1.0, 224), max_total_overhead=0.05, max_n=4)
    assert best.total_overhead <= 0.05
    feas = [r for r in rows if r["feasible"]]
    assert best.kb(best.peak_patch) == min(r["peak_patch_kB"] for r in feas)


# ---------------------------------------------------------------- errors

def test_bad_plans_raise_clear_errors():
    spec = small_spec()
    with pytest.raises(ValueError, match=r"n \(patches\)=18 is out of range.*17x17.*1\.\.17"):
        ex.validate_plan(spec, 4, 18)
    with pytest.raises(ValueError, match=r"K \(patch_blocks\)=7 is out of range.*6 blocks.*allowed 1\.\.6"):
        ex.validate_plan(spec, 7, 2)
    with pytest.raises(ValueError, match=r"K \(patch_blocks\)=0"):
        pl.plan(spec, 0, 2)
    with pytest.raises(ValueError, match=r"n \(patches\)=0"):
        pl.plan(spec, 2, 0)
    net = random_folded(spec)
    with pytest.raises(ValueError, match="mode="):
        ex.forward_patch(net, _image(spec), 2, 2, mode="diagonal")
    with pytest.raises(ValueError, match=r"n \(patches\)=10 is out of range"):
        ex.forward_patch(net, _image(spec), 5, 10)
    with pytest.raises(ValueError, match="patch_sizes"):
        pl.plan(spec, 2, 2, pl.CountingRules(patch_sizes="odd"))
    with pytest.raises(ValueError, match="residual=True needs stride 1"):
        NetSpec("bad", 8, 3, (BlockSpec((ConvSpec(3, 3, 3, 2),), residual=True),)).validate()
    with pytest.raises(ValueError, match=r"cin=4 does not match"):
        NetSpec("bad", 8, 3, (BlockSpec((ConvSpec(4, 3, 3),)),)).validate()


# ---------------------------------------------------------------- models, folding, redistribution, CLI

def test_fold_bn_matches_eval_model():
    spec = planner_spec()
    model = VisionNet(spec, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(3)
    for blk in model.blocks:  # non-trivial running statistics
        for cb in blk.convs:
            c = cb.bn.mean[...].shape
            cb.bn.mean[...] = jnp.asarray(rng.standard_normal(c), jnp.float32)
            cb.bn.var[...] = jnp.asarray(rng.uniform(0.5, 2.0, c), jnp.float32)
            cb.bn.scale[...] = jnp.asarray(rng.uniform(0.5, 1.5, c), jnp.float32)
            cb.bn.bias[...] = jnp.asarray(0.1 * rng.standard_normal(c), jnp.float32)
    model.eval()
    x = _image(spec, n=2)
    expected = nnx.jit(lambda m, x: m(x))(model, x)
    np.testing.assert_allclose(np.asarray(jax.jit(ex.forward)(fold_bn(model), x)), np.asarray(expected),
                               rtol=1e-4, atol=1e-4)


def test_mobilenetv2_and_mcunet_specs():
    spec = mobilenetv2(1.0, 224)
    assert spec.num_blocks == 19 and spec.feature_sizes()[-1] == 7 and spec.blocks[-1].cout == 1280
    assert sum(s.macs for s in pl.layer_steps(spec)) == pytest.approx(300.8e6, rel=1e-3)
    m = mcunet([3, 5, 7] + [3] * 14, [1, 3, 4] + [6] * 14, width=0.5, resolution=96)
    assert m.blocks[2].kernel == 5 and m.blocks[3].expand == 4
    with pytest.raises(ValueError, match="kernels has 2 entries"):
        mcunet([3, 3], [6] * 17)


def test_redistribution_shrinks_receptive_field_and_overhead():
    base = mobilenetv2(1.0, 224)
    rd, K = redistribute(base, 5, drop=(3,), later_kernel=5)
    assert K == 4 and rf.rf_size(rd, K)[0] < rf.rf_size(base, 5)[0]
    assert rd.num_blocks == base.num_blocks
    a, b = pl.plan(base, 5, 4), pl.plan(rd, K, 4)
    assert b.stage_overhead < a.stage_overhead and b.total_overhead < a.total_overhead
    assert b.peak_patch <= a.peak_patch
    assert redistribute_mobilenetv2().blocks == rd.blocks
    with pytest.raises(ValueError, match="not a stride-1 residual block"):
        redistribute(base, 5, drop=(2,))
    with pytest.raises(ValueError, match="later_kernel=4 is invalid"):
        redistribute(base, 5, later_kernel=4)


def test_cli_plan(capsys):
    from moejax.cli import main
    assert main(["vision", "plan", "--model", "mobilenetv2", "--resolution", "224", "--patches", "4"]) == 0
    out = capsys.readouterr().out
    assert "K=5" in out and "1372.0 kB" in out and "171.5 kB" in out
    assert main(["vision", "plan", "--patches", "4", "--blocks", "30"]) == 2
    assert "allowed 1..19" in capsys.readouterr().err
