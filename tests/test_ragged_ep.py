"""The dropless (ragged_all_to_all) expert-parallel path.

XLA:CPU does not implement ``ragged_all_to_all``, so on CPU the path runs with
:func:`moejax.parallel.ragged_a2a.ragged_all_to_all_emulated` (``a2a="ragged_emulated"``), which is checked here
against a numpy model of the primitive's documented semantics; the real primitive is only lowered for cuda
(``experiments/gpu_check.py --only ep_ragged`` runs it on a GPU).
"""

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from test_expert_parallel import (
    GRAD_TOL,
    OUT_TOL,
    ROUTERS,
    T_LOCAL,
    D,
    E,
    F,
    _close,
    _rel_l2,
    _run_ref,
)

from moejax.config import MoEConfig
from moejax.nn.moe import MoE
from moejax.parallel import expert_parallel as ep_lib
from moejax.parallel.expert_parallel import EPContext, expert_parallel
from moejax.parallel.mesh import (
    BATCH_AXES,
    EXPERT_AXES,
    MeshConfig,
    make_mesh,
    num_batch_shards,
    state_specs,
)
from moejax.parallel.ragged_a2a import ragged_all_to_all_emulated

# ------------------------------------------------------------------------------------------- emulation


def _numpy_ragged_a2a(operand, output, in_off, send, out_off, recv):
    """The documented semantics, per device: lists over the n devices of numpy arrays."""
    n, N = len(operand), len(in_off[0])
    spd = N // n
    result = [o.copy() for o in output]
    for r in range(n):
        for s in range(n):
            for j in range(spd):
                i = r * spd + j
                size = recv[r][s * spd + j]
                assert size == send[s][i]
                result[r][out_off[s][i]:out_off[s][i] + size] = operand[s][in_off[s][i]:in_off[s][i] + size]
    return result


def _random_exchange(rng, n, spd, R, M):
    """Random valid arguments: each sender's slices are disjoint in its operand, each receiver's disjoint in its
    output (in a random order, with gaps)."""
    N = n * spd
    send = rng.integers(0, 4, size=(n, N))  # with gaps of at most 1: <= 4N rows, R and M are >= 4N
    in_off = np.zeros((n, N), np.int32)
    for s in range(n):
        perm, pos = rng.permutation(N), 0
        for i in perm:
            pos += rng.integers(0, 2)
            in_off[s, i] = pos
            pos += send[s, i]
    # recv[r][s*spd+j] = send[s][r*spd+j]
    recv = np.zeros((n, N), np.int32)
    out_off = np.zeros((n, N), np.int32)
    for r in range(n):
        for s in range(n):
            recv[r, s * spd:(s + 1) * spd] = send[s, r * spd:(r + 1) * spd]
        perm, pos = rng.permutation(N), 0
        for k in perm:  # k = s*spd + j on receiver r: the slice sent as entry r*spd+j by s
            s, j = divmod(k, spd)
            pos += rng.integers(0, 2)
            out_off[s, r * spd + j] = pos
            pos += recv[r, k]
    return in_off, send.astype(np.int32), out_off, recv


@pytest.mark.parametrize("n,spd,feat", [(4, 1, (3,)), (8, 2, ()), (2, 3, (2, 2))])
def test_emulation_matches_documented_semantics(n, spd, feat):
    rng = np.random.default_rng(n * 10 + spd)
    R, M = 4 * n * spd, 4 * n * spd + 3
    mesh = Mesh(np.array(jax.devices()[:n]), ("x",))
    operand = rng.normal(size=(n, R) + feat).astype(np.float32)
    output = rng.normal(size=(n, M) + feat).astype(np.float32)
    in_off, send, out_off, recv = _random_exchange(rng, n, spd, R, M)
    want = _numpy_ragged_a2a(list(operand), list(output), in_off, send, out_off, recv)

    def body(op, out, a, b, c, d):
        return ragged_all_to_all_emulated(op[0], out[0], a[0], b[0], c[0], d[0], "x")[None]

    f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P("x"),) * 6, out_specs=P("x")))
    got = f(operand, output, in_off, send, out_off, recv)
    np.testing.assert_array_equal(np.asarray(got), np.stack(want))


def test_emulation_matches_docstring_example():
    mesh = Mesh(np.array(jax.devices()[:2]), ("x",))
    args = [np.array(v, np.int32) for v in (
        [[1, 2, 2], [3, 4, 0]], [[0] * 4, [0] * 4], [[0, 1], [0, 1]], [[1, 2], [1, 1]], [[0, 0], [1, 2]],
        [[1, 1], [2, 1]])]

    def body(*a):
        return ragged_all_to_all_emulated(*(v[0] for v in a), "x")[None]

    got = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P("x"),) * 6, out_specs=P("x")))(*args)
    np.testing.assert_array_equal(np.asarray(got), [[1, 3, 0, 0], [2, 2, 4, 0]])


# ------------------------------------------------------------------------------------------- the MoE path

def _models(router, grouped_impl="auto"):
    cfg = MoEConfig(num_experts=E, d_ff=F, router=router, dispatch="dropless", grouped_impl=grouped_impl)
    model = MoE(D, cfg, init_std=0.3, rngs=nnx.Rngs(0))
    ref_cfg = dataclasses.replace(cfg, router=dataclasses.replace(router, group_size=T_LOCAL))
    return model, MoE(D, ref_cfg, init_std=0.3, rngs=nnx.Rngs(0))


def _ep_fn(model, mesh, ep_kw, x, tidx, cot, rng, train):
    """``loss(params, x) -> (sum(y*cot), (y, lb, per-device load, dropped))`` under shard_map."""
    gdef, params, rest = nnx.split(model, nnx.Param, ...)
    pspec, rspec = state_specs(params), state_specs(rest)
    n = math.prod(mesh.shape[a] for a in BATCH_AXES if a in mesh.shape)

    def body(params, rest, x, tidx, cot, rng):
        with expert_parallel(axis=EXPERT_AXES, batch_axes=BATCH_AXES, **ep_kw):
            y, aux = nnx.merge(gdef, params, rest)(x, token_index=tidx, rng=rng, train=train)
        dropped = jax.lax.psum(aux["dropped"], BATCH_AXES)
        return y, jnp.sum(y * cot)[None], aux["load_balance_loss"][None] / n, aux["expert_load"][None], dropped

    f = jax.shard_map(body, mesh=mesh, in_specs=(pspec, rspec, P(BATCH_AXES), P(BATCH_AXES), P(BATCH_AXES), P()),
                      out_specs=(P(BATCH_AXES), P(BATCH_AXES), P(BATCH_AXES), P(BATCH_AXES), P()), check_vma=False)

    def loss(params, x):
        y, l, lb, load, dropped = f(params, rest, x, tidx, cot, rng)
        return jnp.sum(l), (y, jnp.sum(lb), load, dropped)

    return loss, params


def _run(model, mesh, ep_kw, x, tidx, cot, rng, train):
    loss, params = _ep_fn(model, mesh, ep_kw, x, tidx, cot, rng, train)
    (_, (y, lb, load, dropped)), (gp, gx) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
        params, x)
    return y, lb, load, dropped, gp, gx


def _inputs(mesh_cfg):
    T = num_batch_shards(mesh_cfg) * T_LOCAL
    x = jax.random.normal(jax.random.PRNGKey(1), (T, D), jnp.float32)
    cot = jax.random.normal(jax.random.PRNGKey(2), (T, D), jnp.float32)
    return x, jnp.arange(T, dtype=jnp.int32), cot, jax.random.PRNGKey(3)


def _same(a, b):
    y, lb, _, _, gp, gx = a
    y_r, lb_r, gp_r, gx_r = b
    _close(y, y_r, OUT_TOL)
    np.testing.assert_allclose(float(lb), float(lb_r), rtol=1e-5)
    _rel_l2(gx, gx_r, GRAD_TOL, "dx")
    for (path, g), g_r in zip(jax.tree_util.tree_leaves_with_path(gp), jax.tree.leaves(gp_r), strict=True):
        _rel_l2(g, g_r, GRAD_TOL, jax.tree_util.keystr(path))


def check_ragged(router_name, mesh_spec, train=False, grouped_impl="auto"):
    mesh_cfg = MeshConfig.parse(mesh_spec)
    mesh = make_mesh(mesh_cfg)
    x, tidx, cot, rng = _inputs(mesh_cfg)
    router = ROUTERS[router_name]
    model, ref = _models(router, grouped_impl)
    rag = _run(model, mesh, {"a2a": "ragged_emulated"}, x, tidx, cot, rng, train)
    assert int(rag[3]) == 0
    # the fixed-capacity path with capacity = group size drops nothing: the same function
    fixed = _run(model, mesh, {"a2a": "fixed", "capacity_factor": 0}, x, tidx, cot, rng, train)
    assert int(fixed[3]) == 0
    _same(rag, (fixed[0], fixed[1], fixed[4], fixed[5]))
    # one device, same routing groups (group_size = tokens per device), dropless
    y_ref, aux, gp_ref, gx_ref = _run_ref(ref, x, tidx, cot, rng, train)
    _same(rag, (y_ref, aux["load_balance_loss"], gp_ref, gx_ref))
    np.testing.assert_array_equal(np.asarray(rag[2]).sum(0), np.asarray(aux["expert_load"]))


@pytest.mark.parametrize("router,train", [("topk", False), ("gshard", True)])  # gshard: random 2nd expert
@pytest.mark.parametrize("mesh_spec", ["expert=8", "data=2,expert=4"])
def test_ragged_ep_equals_fixed_and_single_device(router, train, mesh_spec):
    check_ragged(router, mesh_spec, train=train)


@pytest.mark.slow
@pytest.mark.parametrize("router,mesh_spec,train,impl", [
    ("sigmoid", "expert=8", False, "auto"),
    ("sigmoid", "data=2,expert=4", False, "auto"),
    ("switch", "node=2,expert=4", True, "auto"),
    ("topk", "data=4,expert=2", False, "tiles"),
    ("topk", "data=2,node=2,expert=2", False, "ragged_dot"),
])
def test_ragged_ep_more_routers_meshes_and_grouped_impls(router, mesh_spec, train, impl):
    check_ragged(router, mesh_spec, train=train, grouped_impl=impl)


def test_ragged_ep_bound_drops_are_counted():
    # A receive buffer of ceil(0.5 * T*K) rows: a device whose experts get more than that drops the excess
    # (in source order), and the total equals what the per-device expert loads imply.
    mesh_cfg = MeshConfig.parse("expert=8")
    mesh = make_mesh(mesh_cfg)
    x, tidx, cot, rng = _inputs(mesh_cfg)
    model, _ = _models(ROUTERS["topk"])
    y, _, load, dropped, _, gx = _run(model, mesh, {"a2a": "ragged_emulated", "ragged_bound": 0.5}, x, tidx, cot,
                                       rng, False)
    K = ROUTERS["topk"].top_k
    M = math.ceil(0.5 * T_LOCAL * K)
    recv = np.asarray(load).sum(0)  # E/n = 1: device e receives expert e's rows from every device
    want = int(np.maximum(recv - M, 0).sum())
    assert want > 0 and int(dropped) == want
    assert np.all(np.isfinite(np.asarray(y))) and np.all(np.isfinite(np.asarray(gx)))


def test_a2a_option_is_validated():
    with pytest.raises(ValueError, match=r"EPContext\.a2a='bogus'.*fixed, ragged, auto"):
        EPContext(a2a="bogus")
    with pytest.raises(ValueError, match=r"EPContext\.a2a"), expert_parallel(a2a="all_to_all"):
        pass
    with pytest.raises(ValueError, match=r"EPContext\.ragged_bound"):
        EPContext(a2a="ragged", ragged_bound=0)


def test_auto_picks_fixed_until_a_backend_is_validated(monkeypatch):
    assert ep_lib.RAGGED_VALIDATED_BACKENDS == frozenset()
    assert EPContext(a2a="auto").resolved_a2a() == "fixed"
    monkeypatch.setattr(ep_lib, "RAGGED_VALIDATED_BACKENDS", frozenset({jax.default_backend()}))
    assert EPContext(a2a="auto").resolved_a2a() == "ragged"


def test_ragged_ep_lowers_for_cuda_with_the_real_primitive():
    # Lowering only (StableHLO for the cuda platform, from this CPU machine); XLA:CPU cannot compile it.
    mesh_cfg = MeshConfig.parse("data=2,expert=4")
    mesh = make_mesh(mesh_cfg)
    x, tidx, cot, rng = _inputs(mesh_cfg)
    model, _ = _models(ROUTERS["topk"])
    loss, params = _ep_fn(model, mesh, {"a2a": "ragged"}, x, tidx, cot, rng, False)
    traced = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)).trace(params, x)
    try:
        text = traced.lower(lowering_platforms=("cuda",)).as_text()
    except TypeError as e:  # pragma: no cover - a jax without cross-platform lowering
        pytest.skip(f"cross-platform lowering unavailable: {e}")
    # forward dispatch + combine, and their transposes in the backward pass
    assert text.count("ragged_all_to_all") >= 4, text.count("ragged_all_to_all")


def test_train_config_ep_a2a_is_validated():
    from moejax.config import TrainConfig

    with pytest.raises(ValueError, match="ep_a2a"):
        TrainConfig(ep_a2a="ragged_all_to_all").validate()
    assert TrainConfig(ep_a2a="ragged").validate().ep_a2a == "ragged"


@pytest.mark.parametrize("small", [True, pytest.param(False, marks=pytest.mark.slow)], ids=["small", "full"])
def test_trainer_ragged_ep_grads_equal_single_device(small):
    # TrainConfig.ep_a2a reaches the trainer's shard_map step: dropless MoE, ragged (emulated) exchange. The small
    # model (one layer, d_model 16) runs in the default suite; test_parallel_train's model is slow.
    from test_parallel_train import batch, compare_sharded_grads, configs

    from moejax.config import RouterConfig
    from moejax.train.trainer import Trainer

    mesh_cfg = MeshConfig.parse("data=2,expert=4")
    cfg, ref_cfg, tc = configs(RouterConfig(type="topk", top_k=2), mesh_cfg)
    if small:
        shrink = {"d_model": 16, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1, "d_ff": 16}
        cfg, ref_cfg = (dataclasses.replace(c, **shrink, moe=dataclasses.replace(c.moe, d_ff=16)).validate()
                        for c in (cfg, ref_cfg))
    cfg = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, dispatch="dropless"))
    ref_cfg = dataclasses.replace(ref_cfg, moe=dataclasses.replace(ref_cfg.moe, dispatch="dropless"))
    par = Trainer(cfg, dataclasses.replace(tc, ep_a2a="ragged_emulated"), mesh_cfg)
    one = Trainer(ref_cfg, tc)
    mp, m1 = compare_sharded_grads(par, one)
    assert int(mp["dropped"]) == 0 == int(m1["dropped"])
    # the step exchanges the tokens by the emulated ragged all-to-all (all_gather + gathers); an all_to_all
    # carries only the int32 group sizes, never the float token buffers of the fixed path
    b = jax.tree.map(lambda a: jax.device_put(a, par.batch_sharding), batch())
    step = str(jax.make_jaxpr(par._sharded_grads)(par.params, par.rest, b, jax.random.PRNGKey(5)))
    a2a_dtypes = set(re.findall(r":(\w+)\[[\d,]*\] = all_to_all\[", step))
    assert "all_gather" in step and a2a_dtypes == {"i32"}, a2a_dtypes


def test_trainer_rejects_moe_pipelining_with_the_ragged_exchange():
    from moejax.config import ModelConfig, MoEConfig, TrainConfig
    from moejax.schedule.overlap import OverlapSchedule
    from moejax.train.trainer import Trainer

    cfg = ModelConfig(vocab_size=260, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=16, max_seq_len=16,
                      moe=MoEConfig(num_experts=8, d_ff=16))
    with pytest.raises(ValueError, match="ep_a2a='ragged_emulated'.*pipeline_moe"):
        Trainer(cfg, TrainConfig(seq_len=8, global_batch=8, ep_a2a="ragged_emulated"), MeshConfig(expert=8),
                schedule=OverlapSchedule(degree_fwd=2))
