"""The MoE layer against the naive per-token reference (``tests/reference.py``).

Every router x dispatch variant x shared-expert setting is compared with the reference, which uses the layer's
own router output and re-derives capacity drops, expert FFNs, combine and shared experts with plain loops.

Tolerances (float32 compute; conftest sets matmul precision to ``highest``):
  * outputs: ``max|y - y_ref| <= 1e-5 * max(1, max|y_ref|)`` (``OUT_TOL``);
  * gradients of ``sum(y * cot)`` (``cot`` fixed random) w.r.t. ``x`` and every parameter, leaf by leaf:
    ``||g - g_ref||_2 <= 1e-5 * ||g_ref||_2`` (``GRAD_TOL``; a leaf whose reference gradient is exactly zero,
    e.g. an empty expert's weights, must be exactly zero too);
  * bfloat16 compute (``MoE(dtype=bfloat16)``, float32 params) vs the float32 reference: outputs
    ``max|y - y_ref| <= 2e-2 * max(1, max|y_ref|)`` and gradients relative L2 ``<= 3e-2`` (``BF16_OUT_TOL``,
    ``BF16_GRAD_TOL``): bf16 has an 8-bit significand (unit roundoff 2**-9 ~ 2e-3), and inputs, expert
    weights, the SwiGLU hidden activations and the output are each rounded to bf16, so a few roundings of
    ~2e-3 plus accumulation stay well inside 2e-2 / 3e-2;
  * aux ``dropped``, ``expert_load`` and ``capacity_used`` equal the reference counts exactly.

Parameters are initialized with ``init_std=0.3`` so activations and outputs are O(1) (with the default 0.02
they would be ~1e-4 and an absolute 1e-5 tolerance would be meaningless).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from moejax.config import MoEConfig, RouterConfig
from moejax.nn.moe import MoE

import reference as ref

OUT_TOL = 1e-5
GRAD_TOL = 1e-5
BF16_OUT_TOL = 2e-2
BF16_GRAD_TOL = 3e-2

D, F, E = 16, 24, 8
INIT_STD = 0.3

ROUTERS = {
    "topk": RouterConfig(type="topk", top_k=2),
    "switch": RouterConfig(type="switch"),
    "gshard": RouterConfig(type="gshard"),
    "sigmoid": RouterConfig(type="sigmoid", top_k=2, n_groups=4, topk_groups=2, scaling_factor=2.5),
    "xmoe": RouterConfig(type="xmoe", top_k=2, xmoe_dim=8, xmoe_init_temperature=0.3),
}
EC_ROUTER = RouterConfig(type="expert_choice")

VARIANTS = {
    "dropless-tiles": dict(dispatch="dropless", grouped_impl="tiles"),
    "dropless-ragged_dot": dict(dispatch="dropless", grouped_impl="ragged_dot"),
    "dropless-dense": dict(dispatch="dropless", grouped_impl="dense"),
    "dropless-gather": dict(dispatch="dropless", grouped_impl="gather"),
    "capacity-1.0": dict(dispatch="capacity", capacity_factor=1.0),
    "capacity--1.0": dict(dispatch="capacity", capacity_factor=-1.0),
    "capacity-0": dict(dispatch="capacity", capacity_factor=0.0),
    "capacity-0.5": dict(dispatch="capacity", capacity_factor=0.5),
}
CAPACITY_VARIANTS = [v for v in VARIANTS if v.startswith("capacity")]

SHARED = {
    "none": dict(),
    "1-gated": dict(num_shared_experts=1, shared_d_ff=20, shared_expert_gate=True),
    "2-ungated": dict(num_shared_experts=2, shared_d_ff=12),
}


# ------------------------------------------------------------------------------------------------ helpers

def make_cfg(router: RouterConfig, variant: str, shared: str = "none", *, num_experts: int = E,
             group_size: int | None = None, **overrides) -> MoEConfig:
    router = dataclasses.replace(router, group_size=group_size)
    kw = dict(num_experts=num_experts, d_ff=F, router=router, **VARIANTS[variant], **SHARED[shared])
    kw.update(overrides)
    return MoEConfig(**kw)


def make_layer(cfg: MoEConfig, *, seed: int = 0, dtype=jnp.float32, d_model: int = D) -> MoE:
    m = MoE(d_model, cfg, init_std=INIT_STD, dtype=dtype, rngs=nnx.Rngs(seed))
    if cfg.router.type == "sigmoid":
        # A nonzero aux-free bias, so selection (scores + bias) and weights (scores) differ.
        bias = 0.2 * jax.random.normal(jax.random.key(seed + 1000), (cfg.num_experts,))
        m.router.bias.value = bias
    return m


def make_x(shape, seed: int = 1, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32).astype(dtype)


def layer_value_and_grad(model, x, cot, call_kw, train):
    """Jitted layer output, aux and gradients of ``sum(y * cot)`` w.r.t. (params, x)."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(p, x, kw):
        y, aux = nnx.merge(graphdef, p, rest)(x, train=train, **kw)
        return jnp.sum(y.astype(jnp.float32) * cot), (y, aux)

    f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    (_, (y, aux)), (gp, gx) = f(params, x, call_kw)
    return y, aux, gp, gx, params


def reference_value_and_grad(model, x, cot, call_kw, train):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    dec = ref.reference_decisions(model, x, train=train, **call_kw)

    def loss(p, x):
        y, _ = ref.reference_moe(nnx.merge(graphdef, p, rest), x, train=train, decisions=dec, **call_kw)
        return jnp.sum(y * cot), y

    (_, y), (gp, gx) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x)
    return y, dec, gp, gx


def assert_rel_l2(got, want, tol, what):
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    err = np.linalg.norm(got - want)
    scale = np.linalg.norm(want)
    assert err <= tol * scale, f"{what}: |g - g_ref| = {err:.3e}, |g_ref| = {scale:.3e}, tol {tol:g} relative"


def check_layer(model, x, *, token_mask=None, token_index=None, rng=None, train=False,
                out_tol=OUT_TOL, grad_tol=GRAD_TOL, cot_seed=7):
    """Compare outputs, gradients and aux counts of ``model`` with the reference; returns (y, aux, decisions)."""
    call_kw = {}
    if token_mask is not None:
        call_kw["token_mask"] = jnp.asarray(token_mask)
    if token_index is not None:
        call_kw["token_index"] = jnp.asarray(token_index)
    if rng is not None:
        call_kw["rng"] = rng
    cot = jax.random.normal(jax.random.key(cot_seed), x.shape, jnp.float32)
    y, aux, gp, gx, params = layer_value_and_grad(model, x, cot, call_kw, train)
    ry, dec, rgp, rgx = reference_value_and_grad(model, x.astype(jnp.float32), cot, call_kw, train)

    assert y.shape == x.shape and y.dtype == x.dtype
    err = float(jnp.max(jnp.abs(y.astype(jnp.float32) - ry)))
    bound = out_tol * max(1.0, float(jnp.max(jnp.abs(ry))))
    assert err <= bound, f"output max-abs error {err:.3e} > {bound:.3e}"

    assert_rel_l2(gx, rgx, grad_tol, "grad x")
    leaves = jax.tree_util.tree_leaves_with_path(gp)
    ref_leaves = jax.tree_util.tree_leaves_with_path(rgp)
    assert [p for p, _ in leaves] == [p for p, _ in ref_leaves]
    assert len(leaves) >= 4
    for (path, g), (_, rg) in zip(leaves, ref_leaves, strict=True):
        assert_rel_l2(g, rg, grad_tol, f"grad {jax.tree_util.keystr(path)}")

    assert int(aux["dropped"]) == dec.dropped, (int(aux["dropped"]), dec.dropped)
    np.testing.assert_array_equal(np.asarray(aux["expert_load"]), dec.expert_load.astype(np.float32))
    # Tutel's dynamic capacity: the largest kept per-expert slot count of a routing group.
    assert int(aux["capacity_used"]) == int(dec.kept_per_group.max())
    for name in ("load_balance_loss", "z_loss"):
        assert np.isfinite(float(aux[name]))
    return y, aux, dec


# --------------------------------------------------------------------------------- router x dispatch grid

GRID = [(r, v) for r in ROUTERS for v in VARIANTS] + [("expert_choice", v) for v in CAPACITY_VARIANTS]
SHARED_NAMES = list(SHARED)


@pytest.mark.parametrize("router,variant", GRID)
def test_router_dispatch_matches_reference(router, variant):
    # The shared-expert setting cycles over the grid so each router and each variant meets all three settings.
    i = GRID.index((router, variant))
    shared = SHARED_NAMES[(i + i // len(VARIANTS)) % len(SHARED_NAMES)]
    rc = EC_ROUTER if router == "expert_choice" else ROUTERS[router]
    model = make_layer(make_cfg(rc, variant, shared))
    x = make_x((2, 16, D))
    _, aux, dec = check_layer(model, x)
    if variant == "capacity-0.5" and router != "expert_choice":
        assert dec.dropped > 0  # capacity 0.5 * S * k / E must overflow somewhere
    if variant in ("capacity-0",) or variant.startswith("dropless"):
        assert dec.dropped == 0


def test_cf_and_minus_cf_drop_the_same():
    # Tutel cf < 0: dynamic capacity bounded by |cf| -> identical drops and outputs to +|cf|.
    x = make_x((32, D), seed=4)
    outs = []
    for cf in (0.75, -0.75):
        model = make_layer(make_cfg(ROUTERS["topk"], "capacity-1.0", capacity_factor=cf), seed=2)
        y, aux, dec = check_layer(model, x)
        outs.append((y, int(aux["dropped"])))
    np.testing.assert_array_equal(np.asarray(outs[0][0]), np.asarray(outs[1][0]))
    assert outs[0][1] == outs[1][1] > 0


# ----------------------------------------------------------------------------------------- routing groups

@pytest.mark.parametrize("variant", list(VARIANTS))
def test_routing_groups(variant):
    # 32 tokens in 4 routing groups of 8: capacity, drops and priority order are per group.
    model = make_layer(make_cfg(ROUTERS["topk"], variant, group_size=8))
    _, aux, dec = check_layer(model, make_x((4, 8, D), seed=5))
    assert dec.ids.shape[:2] == (4, 8)


@pytest.mark.parametrize("variant", CAPACITY_VARIANTS[:2])
def test_routing_groups_expert_choice(variant):
    model = make_layer(make_cfg(EC_ROUTER, variant, group_size=16))
    _, _, dec = check_layer(model, make_x((32, D), seed=6))
    c = dec.capacity
    # Every expert takes exactly its capacity in every group.
    assert (dec.routed.sum(axis=1) == c).all()


def test_group_size_must_divide_tokens():
    model = make_layer(make_cfg(ROUTERS["topk"], "dropless-tiles", group_size=5))
    with pytest.raises(ValueError, match="group_size"):
        model(make_x((16, D)))


# ------------------------------------------------------------------------------------------- token mask

@pytest.mark.parametrize("variant", list(VARIANTS))
def test_token_mask(variant):
    model = make_layer(make_cfg(ROUTERS["topk"], variant, group_size=16))
    x = make_x((2, 16, D), seed=8)
    mask = np.array(jax.random.bernoulli(jax.random.key(9), 0.6, (2, 16)))
    mask[0, :3] = False
    y, aux, dec = check_layer(model, x, token_mask=mask)
    flat = mask.reshape(dec.routed.shape[:2])
    assert not dec.routed[~flat].any()  # masked tokens are not routed ...
    assert dec.routed[flat].all()
    assert float(jnp.sum(aux["expert_load"])) == 2 * mask.sum()  # ... and not counted
    np.testing.assert_array_equal(np.asarray(y)[~mask], 0.0)  # no shared experts: exact zeros


def test_token_mask_shared_and_expert_choice():
    cfg = make_cfg(EC_ROUTER, "capacity-1.0", "1-gated", group_size=16)
    model = make_layer(cfg)
    mask = np.ones((32,), bool)
    mask[5:20] = False  # group 0 keeps 5 valid tokens, group 1 keeps 12; capacity c = ceil(16 / 8) = 2
    _, _, dec = check_layer(model, make_x((32, D), seed=10), token_mask=mask)
    assert not dec.routed.reshape(32, -1)[~mask].any()


# --------------------------------------------------------------------------------------------- block rows

@pytest.mark.parametrize("block_rows", [1, 4, 64])
def test_block_rows(block_rows):
    # 32 tokens * 2 slots / 8 experts = 8 rows per expert on average; 64 is larger than any expert's rows.
    model = make_layer(make_cfg(ROUTERS["topk"], "dropless-tiles", "1-gated", block_rows=block_rows))
    check_layer(model, make_x((32, D), seed=11))


# ------------------------------------------------------------------------- skewed routing, empty experts

def _dominate(model, x):
    """Router weights and inputs such that every token picks expert 0 first and expert 1 second."""
    w = np.zeros(model.router.w.value.shape, np.float32)
    w[0, 0], w[0, 1] = 8.0, 4.0
    model.router.w.value = jnp.asarray(w)
    if model.cfg.router.type == "sigmoid":
        model.router.bias.value = jnp.zeros_like(model.router.bias.value)
    return x.at[..., 0].set(jnp.abs(x[..., 0]) + 1.0)


@pytest.mark.parametrize("router,variant", [
    ("switch", "dropless-tiles"), ("switch", "dropless-ragged_dot"), ("switch", "capacity-1.0"),
    ("topk", "dropless-tiles"), ("topk", "dropless-ragged_dot"), ("topk", "capacity-0"),
    ("gshard", "capacity-1.0"), ("sigmoid", "capacity--1.0"),
])
def test_all_tokens_to_one_expert(router, variant):
    rc = ROUTERS[router]
    if router == "sigmoid":
        rc = dataclasses.replace(rc, n_groups=1, topk_groups=1)
    model = make_layer(make_cfg(rc, variant, group_size=16))
    x = _dominate(model, make_x((32, D), seed=12))
    _, aux, dec = check_layer(model, x)
    k = dec.ids.shape[-1]
    load = np.zeros(E)
    load[0] = 32
    if k == 2:
        load[1] = 32
    np.testing.assert_array_equal(dec.expert_load, load)  # experts 2.. are empty
    if variant in ("capacity-1.0", "capacity--1.0"):
        cap = dec.capacity
        assert int(aux["dropped"]) == k * (32 - 2 * cap)  # 2 groups of 16, each expert keeps `cap` per group


def test_more_experts_than_tokens():
    # 2 tokens, 8 experts, top-2: at most 4 slots, so at least half the experts are empty.
    for variant in ("dropless-tiles", "capacity-0.5"):
        model = make_layer(make_cfg(ROUTERS["topk"], variant))
        _, _, dec = check_layer(model, make_x((2, D), seed=13))
        assert (dec.expert_load == 0).sum() >= 4


# ------------------------------------------------------------------------------- stochastic routing paths

@pytest.mark.parametrize("variant", ["dropless-tiles", "capacity-1.0"])
def test_gshard_training_path(variant):
    model = make_layer(make_cfg(ROUTERS["gshard"], variant, group_size=16))
    x = make_x((32, D), seed=14)
    token_index = np.arange(32) + 1000
    _, _, dec = check_layer(model, x, token_index=token_index, rng=jax.random.key(3), train=True)
    assert not dec.routed[..., 1].all()  # some second experts were dropped by the coin


def test_switch_jitter_training_path():
    rc = dataclasses.replace(ROUTERS["switch"], jitter=0.3)
    model = make_layer(make_cfg(rc, "capacity-1.0", group_size=16))
    check_layer(model, make_x((32, D), seed=15), rng=jax.random.key(4), train=True)


# ---------------------------------------------------------------------------------------------- bfloat16

@pytest.mark.parametrize("router,variant,shared", [
    ("topk", "dropless-tiles", "1-gated"), ("topk", "dropless-ragged_dot", "none"),
    ("gshard", "capacity-1.0", "2-ungated"),
])
def test_bfloat16_compute(router, variant, shared):
    model = make_layer(make_cfg(ROUTERS[router], variant, shared), dtype=jnp.bfloat16)
    # bf16-representable input, so the layer's bf16 cast is exact and routing matches the reference exactly.
    x = make_x((32, D), seed=16).astype(jnp.bfloat16).astype(jnp.float32)
    check_layer(model, x, out_tol=BF16_OUT_TOL, grad_tol=BF16_GRAD_TOL)


# --------------------------------------------------------------------------------------- property tests

@settings(max_examples=6, deadline=None)
@given(tokens=st.sampled_from([8, 16]), num_experts=st.sampled_from([4, 8]), top_k=st.sampled_from([1, 2]),
       variant=st.sampled_from(list(VARIANTS) + ["capacity-1.25", "capacity--0.5"]),
       groups=st.sampled_from([1, 2]), seed=st.integers(0, 2 ** 16))
def test_property_topk_matches_reference(tokens, num_experts, top_k, variant, groups, seed):
    extra = {}
    if variant in ("capacity-1.25", "capacity--0.5"):
        extra = dict(capacity_factor=float(variant.split("-", 1)[1]))
        variant = "capacity-1.0"
    rc = RouterConfig(type="topk", top_k=top_k, normalize=bool(seed % 2))
    cfg = make_cfg(rc, variant, num_experts=num_experts, group_size=tokens // groups, **extra)
    model = make_layer(cfg, seed=seed)
    x = make_x((tokens, D), seed=seed + 1)
    _, _, dec = check_layer(model, x)
    if cfg.dispatch == "dropless" or cfg.capacity_factor == 0:
        assert dec.dropped == 0


# ------------------------------------------------------------------------------------- exhaustive (slow)

@pytest.mark.slow
@pytest.mark.parametrize("shared", list(SHARED))
@pytest.mark.parametrize("router,variant", GRID)
@pytest.mark.parametrize("group_size", [None, 8])
@pytest.mark.parametrize("masked", [False, True])
def test_exhaustive_grid(router, variant, shared, group_size, masked):
    rc = EC_ROUTER if router == "expert_choice" else ROUTERS[router]
    model = make_layer(make_cfg(rc, variant, shared, group_size=group_size))
    x = make_x((32, D), seed=17)
    mask = np.asarray(jax.random.bernoulli(jax.random.key(18), 0.7, (32,))) if masked else None
    check_layer(model, x, token_mask=mask)


@pytest.mark.slow
@pytest.mark.parametrize("router", ["gshard", "switch"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_exhaustive_training_paths(router, variant):
    rc = ROUTERS[router]
    if router == "switch":
        rc = dataclasses.replace(rc, jitter=0.2)
    model = make_layer(make_cfg(rc, variant, "1-gated", group_size=8))
    check_layer(model, make_x((32, D), seed=19), token_index=np.arange(32) * 3 + 7, rng=jax.random.key(5),
                train=True)


@pytest.mark.slow
@pytest.mark.parametrize("router,variant", GRID)
def test_exhaustive_bfloat16(router, variant):
    rc = EC_ROUTER if router == "expert_choice" else ROUTERS[router]
    model = make_layer(make_cfg(rc, variant, "2-ungated", group_size=16), dtype=jnp.bfloat16)
    x = make_x((32, D), seed=20).astype(jnp.bfloat16).astype(jnp.float32)
    check_layer(model, x, out_tol=BF16_OUT_TOL, grad_tol=BF16_GRAD_TOL)


@pytest.mark.slow
@settings(max_examples=60, deadline=None)
@given(tokens=st.sampled_from([4, 8, 16, 24]), num_experts=st.sampled_from([2, 4, 8]),
       router=st.sampled_from(["topk", "sigmoid", "gshard", "switch", "xmoe", "expert_choice"]),
       variant=st.sampled_from(list(VARIANTS)), cf=st.sampled_from([0.25, 0.5, 1.0, 1.25, 2.0, -1.0, 0.0]),
       block_rows=st.sampled_from([None, 1, 2, 4, 64]), groups=st.sampled_from([1, 2, 4]),
       seed=st.integers(0, 2 ** 16))
def test_property_all_routers_slow(tokens, num_experts, router, variant, cf, block_rows, groups, seed):
    if tokens % groups:
        groups = 1
    if router == "expert_choice" and not variant.startswith("capacity"):
        variant = "capacity-1.0"
    rc = EC_ROUTER if router == "expert_choice" else ROUTERS[router]
    if router == "sigmoid":
        rc = dataclasses.replace(rc, n_groups=1, topk_groups=1)
    overrides = dict(block_rows=block_rows)
    if variant.startswith("capacity"):
        overrides["capacity_factor"] = cf
    cfg = make_cfg(rc, variant, num_experts=num_experts, group_size=tokens // groups, **overrides)
    check_layer(make_layer(cfg, seed=seed), make_x((tokens, D), seed=seed + 1))


def test_auto_impl_selection():
    """auto: all-experts 'dense' only for tiny token counts; tiles on CPU otherwise."""
    from moejax.nn.experts import resolve_grouped_impl
    assert resolve_grouped_impl("auto", 16, 8) == "dense"
    assert resolve_grouped_impl("auto", 16, 8, 2) == "dense"
    assert resolve_grouped_impl("auto", 1, 8, 2) == "gather"  # one decoding sequence: 2 of 8 experts
    assert resolve_grouped_impl("auto", 2, 8, 2) == "gather"  # 4 slots: half the experts
    assert resolve_grouped_impl("auto", 3, 8, 2) == "dense"
    assert resolve_grouped_impl("auto", 2, 64, 8) == "gather"
    assert resolve_grouped_impl("auto", 64, 8) == "tiles"
    assert resolve_grouped_impl("tiles", 1, 1) == "tiles"


def test_grouped_impl_table_matches_the_config_names():
    """One table of grouped-compute methods: every name MoEConfig.grouped_impl accepts (but 'auto') has an entry
    and every entry is selectable; an unknown name is refused naming the allowed ones."""
    from moejax.config import GROUPED_IMPLS as NAMES
    from moejax.nn.experts import GROUPED_IMPLS, resolve_grouped_impl
    assert set(GROUPED_IMPLS) == set(NAMES) - {"auto"}
    assert all(g.name == n and g.layout in ("tiles", "rows", "dense") for n, g in GROUPED_IMPLS.items())
    with pytest.raises(ValueError, match="allowed: 'auto', 'tiles'"):
        resolve_grouped_impl("fast", 4, 8)


@pytest.mark.parametrize("method", ["tiles", "ragged_dot", "dense", "gather"])
def test_apply_experts_equals_the_layer(method):
    """MoE.apply_experts on the layer's own routing (the runners' split of the FFN: route, then experts) gives
    the layer's output with every table method, and with the weights passed in explicitly."""
    cfg = make_cfg(ROUTERS["topk"], f"dropless-{method}", "1-gated")
    layer = make_layer(cfg, seed=3)
    x = make_x((24, D), seed=4)
    ref, _ = layer(x)
    r, _ = layer.route(x)
    T, K = 24, r.expert_ids.shape[-1]
    ids, w, m = (a.reshape(T, K) for a in (r.expert_ids, r.weights, r.mask))
    for kw in ({}, {"expert_weights": layer.experts.weights(), "method": method}):
        got = layer.apply_experts(x, ids, w, m, **kw)
        assert jnp.abs(got - ref).max() <= OUT_TOL * max(1.0, float(jnp.abs(ref).max())), (method, kw)
