"""FSMoE scheduling passes: MoE all-to-all/expert pipelining and gradient bucketing leave the expert-parallel
training step's outputs and gradients unchanged, and give the intended collective structure in the HLO.

Tolerances: pipelining changes float summation order only (chunked matmuls, summed weight gradients):
relative 1e-5 of each gradient's largest magnitude, as the sharded-vs-single-device test. Bucketing reduces
the same values over the same devices: bit-exact.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from test_parallel_train import batch, configs

from moejax.config import RouterConfig
from moejax.parallel.mesh import MeshConfig
from moejax.schedule.bucketing import bucket_gradients
from moejax.schedule.overlap import OverlapSchedule
from moejax.schedule.pipeline import NotChunkable, PipelineStats, pipeline_moe, two_level_all_to_all
from moejax.schedule.rewrite import count_collectives
from moejax.train.trainer import Trainer

TOL = 1e-5
NO_COMBINER = {"xla_disable_hlo_passes": "cpu-all-reduce-combiner"}
ROUTERS = {
    "topk": RouterConfig(type="topk", top_k=2),
    "gshard": RouterConfig(type="gshard"),
    "switch": RouterConfig(type="switch"),
    "sigmoid": RouterConfig(type="sigmoid", top_k=2),
    "xmoe": RouterConfig(type="xmoe", top_k=2),
    "expert_choice": RouterConfig(type="expert_choice", top_k=2),
}


def _trainer(mesh_spec, router, schedule=None):
    mesh_cfg = MeshConfig.parse(mesh_spec)
    cfg, _, tc = configs(ROUTERS[router], mesh_cfg)
    return Trainer(cfg, tc, mesh_cfg, schedule=schedule)


def _grads(tr, key=5):
    b = jax.tree.map(lambda a: jax.device_put(a, tr.batch_sharding), batch())
    f = jax.jit(tr._sharded_grads)
    args = (tr.params, tr.rest, b, jax.random.PRNGKey(key))
    return f(*args), f.lower(*args)


def _assert_close(got, ref, tol):
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(ref), strict=True):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        scale = max(float(np.max(np.abs(b))), 1e-30)
        err = float(np.max(np.abs(a - b))) / scale
        assert err <= tol, f"{jax.tree_util.keystr(path)}: relative error {err:.3g} > {tol}"


def _check_pipeline(mesh_spec, router, r_fwd, r_bwd):
    (g0, m0), _ = _grads(_trainer(mesh_spec, router))
    sch = OverlapSchedule(degree_fwd=r_fwd, degree_bwd=r_bwd, bucketing=False)
    tr = _trainer(mesh_spec, router, sch)
    args = (tr.params, tr.rest, jax.tree.map(lambda a: jax.device_put(a, tr.batch_sharding), batch()),
            jax.random.PRNGKey(5))
    compiled = jax.jit(tr._sharded_grads).lower(*args).compile()  # compiled once: run, then inspected
    g1, m1 = compiled(*args)
    _assert_close(g1, g0, TOL)
    _assert_close({k: m1[k] for k in ("loss", "ce")}, {k: m0[k] for k in ("loss", "ce")}, TOL)
    np.testing.assert_array_equal(m1["expert_load"], m0["expert_load"])
    # One scanned MoE run -> one span body in the HLO: 2 r_fwd dispatch/combine all-to-alls in the forward and
    # 2 r_bwd in the backward.
    assert count_collectives(compiled.as_text())["all_to_all"] == 2 * r_fwd + 2 * r_bwd


@pytest.mark.parametrize("mesh_spec,router,r_fwd,r_bwd", [
    ("expert=8", "topk", 4, 4),
    ("data=2,expert=4", "gshard", 1, 4),
    pytest.param("expert=8", "gshard", 4, 1, marks=pytest.mark.slow),
    pytest.param("data=2,expert=4", "topk", 4, 4, marks=pytest.mark.slow),
    # beyond topk and gshard in the default suite: sigmoid (its aux-free bias) and expert_choice (its own
    # capacity); switch and xmoe, and every router x degree, in the slow full grid
    pytest.param("expert=8", "switch", 2, 8, marks=pytest.mark.slow),
    ("data=2,expert=4", "sigmoid", 4, 1),
    pytest.param("expert=8", "xmoe", 8, 4, marks=pytest.mark.slow),
    ("data=2,expert=4", "expert_choice", 2, 8),
])
def test_pipelined_step_equals_plain_step(mesh_spec, router, r_fwd, r_bwd):
    _check_pipeline(mesh_spec, router, r_fwd, r_bwd)


@pytest.mark.slow
@pytest.mark.parametrize("mesh_spec", ["expert=8", "data=2,expert=4"])
@pytest.mark.parametrize("router", list(ROUTERS))
@pytest.mark.parametrize("r", [1, 2, 4, 8])
def test_pipelined_step_equals_plain_step_full_grid(mesh_spec, router, r):
    _check_pipeline(mesh_spec, router, r, {1: 2, 2: 8, 4: 1, 8: 4}[r])


def test_pipeline_stats_and_errors():
    tr = _trainer("expert=8", "topk")
    b = jax.tree.map(lambda a: jax.device_put(a, tr.batch_sharding), batch())
    key = jax.random.PRNGKey(0)
    orig = tr._loss
    stats = PipelineStats()
    tr._loss = lambda *a, **k: pipeline_moe(lambda *x: orig(*x, **k), 2, bwd_degree=4, stats=stats)(*a)
    jax.jit(tr._sharded_grads).lower(tr.params, tr.rest, b, key)
    assert (stats.spans, stats.degree_fwd, stats.degree_bwd) == (1, 2, 4)
    # 3 does not divide the 16-row per-expert buffers
    tr._loss = lambda *a, **k: pipeline_moe(lambda *x: orig(*x, **k), 3)(*a)
    with pytest.raises(NotChunkable, match="degree r_fwd=3 does not divide the 16 tokens"):
        jax.jit(tr._sharded_grads).lower(tr.params, tr.rest, b, key)
    tr._loss = lambda *a, **k: pipeline_moe(lambda *x: orig(*x, **k), 3, strict=False)(*a)
    with pytest.warns(UserWarning, match="using 2"):
        jax.jit(tr._sharded_grads).lower(tr.params, tr.rest, b, key)
    for bad in (0, 2.0, True):
        with pytest.raises(ValueError, match="degree must be a positive int"):
            pipeline_moe(orig, bad)
    with pytest.raises(ValueError, match="OverlapSchedule.degree_bwd"):
        OverlapSchedule(degree_bwd=0).validate()


def test_pipeline_without_moe_span_is_identity():
    f = lambda x: jnp.tanh(x) @ x.T
    x = jnp.arange(12.0).reshape(3, 4) / 10
    stats = PipelineStats()
    np.testing.assert_array_equal(pipeline_moe(f, 4, stats=stats)(x), f(x))
    assert stats.spans == 0


def test_span_with_unchunkable_expert_op_raises():
    mesh = jax.make_mesh((8,), ("e",))

    def layer(x):  # [E=8, T, D] -> dispatch -> an op mixing rows (cumsum over tokens) -> combine
        xr = jax.lax.all_to_all(x, "e", 0, 1, tiled=True)
        y = jnp.cumsum(xr, axis=1)
        return jax.lax.all_to_all(y, "e", 1, 0, tiled=True)

    x = jax.device_put(jnp.ones((64, 8, 4)), NamedSharding(mesh, P("e")))
    f = jax.shard_map(pipeline_moe(layer, 2), mesh=mesh, in_specs=P("e"), out_specs=P("e"))
    with pytest.raises(NotChunkable, match="cumsum"):
        jax.jit(f).lower(x)


# ------------------------------------------------------------------------------------------ gradient buckets

L, D = 4, 16


def _stack_problem():
    mesh = jax.make_mesh((8,), ("data",))

    def loss(params, x):
        def body(h, w):
            return jnp.tanh(h @ w["a"]) @ w["b"] + h, None

        h, _ = jax.lax.scan(body, x, params["stack"])
        return jnp.sum(h @ params["head"])

    def grads(params, x):  # the data-parallel reduction: one psum per gradient
        return jax.tree.map(lambda v: jax.lax.psum(v, "data"), jax.grad(loss)(params, x))

    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    params = {"stack": {"a": jax.random.normal(k1, (L, D, D)) * 0.2, "b": jax.random.normal(k2, (L, D, D)) * 0.2},
              "head": jnp.ones((D, 3))}
    x = jax.device_put(jax.random.normal(k3, (64, D)), NamedSharding(mesh, P("data")))
    return mesh, grads, params, x


@pytest.mark.parametrize("kwargs,n_all_reduce", [
    ({}, 1),  # one bucket
    ({"bucket_bytes": 1}, 3),  # one per gradient
    ({"bucket_bytes": L * D * D * 4}, 2),  # production order head (192 B), a, b: [head, a] reaches 4 KiB, then [b]
    ({"inside_loops": True}, 2),  # the two per-layer reductions bucketed inside the backward loop + head
    ({"inside_loops": True, "bucket_bytes": 1}, 3),
])
def test_bucketed_gradients_are_exact(kwargs, n_all_reduce):
    mesh, grads, params, x = _stack_problem()

    def sm(f):
        return jax.jit(jax.shard_map(f, mesh=mesh, in_specs=(P(), P("data")), out_specs=P(), check_vma=False))

    ref = sm(grads)(params, x)
    f = sm(bucket_gradients(grads, **kwargs))
    got = f(params, x)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref), strict=True):
        np.testing.assert_array_equal(a, b)
    hlo = f.lower(params, x).compile(compiler_options=NO_COMBINER).as_text()
    assert count_collectives(hlo)["all_reduce"] == n_all_reduce
    if kwargs.get("inside_loops"):  # the reductions sit in the loop body: fewer at top level than reduced values
        assert count_collectives(sm(grads).lower(params, x).compile(compiler_options=NO_COMBINER)
                                 .as_text())["all_reduce"] == 3


def test_bucket_arguments_are_validated():
    _, grads, _, _ = _stack_problem()
    with pytest.raises(ValueError, match="bucket_bytes must be a positive int"):
        bucket_gradients(grads, bucket_bytes=0)
    with pytest.raises(ValueError, match="not both"):
        bucket_gradients(grads, bucket_bytes=8, buckets=[[0]])
    mesh, grads, params, x = _stack_problem()
    f = jax.shard_map(bucket_gradients(grads, buckets=[[0, 1]]), mesh=mesh, in_specs=(P(), P("data")),
                      out_specs=P(), check_vma=False)
    with pytest.raises(ValueError, match="buckets must partition the 3 reductions"):
        jax.jit(f).lower(params, x)


def _top_level_reduction_groups(tr):
    b = jax.tree.map(lambda a: jax.device_put(a, tr.batch_sharding), batch())
    jx = jax.make_jaxpr(tr._sharded_grads)(tr.params, tr.rest, b, jax.random.PRNGKey(5))
    body = next(e for e in jx.jaxpr.eqns if e.primitive.name == "shard_map").params["jaxpr"]
    psums = [e for e in body.eqns if e.primitive.name == "psum"]
    return len(psums), {(tuple(e.params["axes"]), str(v.aval.dtype)) for e in psums for v in e.invars}


@pytest.mark.parametrize("mesh_spec", ["expert=8", pytest.param("data=2,expert=4", marks=pytest.mark.slow)])
def test_trainer_step_with_buckets_and_pipelining(mesh_spec):
    plain = _trainer(mesh_spec, "topk")
    n_psums, groups = _top_level_reduction_groups(plain)
    (g0, m0), low0 = _grads(plain)
    one_bucket = OverlapSchedule(inside_loops=False)
    (g1, m1), low1 = _grads(_trainer(mesh_spec, "topk", one_bucket))
    for a, b in zip(jax.tree.leaves((g1, m1)), jax.tree.leaves((g0, m0)), strict=True):
        np.testing.assert_array_equal(a, b)
    # emitted reductions (StableHLO; XLA later drops the trivial ones over axes of size 1)
    count = lambda low: count_collectives(low.as_text())["all_reduce"]
    assert count(low0) == n_psums
    # one bucket per (mesh axes, dtype), except that the loss's token-count psum (int32) is consumed by the
    # forward pass itself, so it cannot wait for the int32 metric reductions: one more bucket
    assert count(low1) == len(groups) + 1
    compiled = count_collectives(low1.compile(compiler_options=NO_COMBINER).as_text())["all_reduce"]
    assert compiled <= len(groups) + 1
    # per-layer buckets inside the backward loop, plus pipelining: still the same step
    both = OverlapSchedule(degree_fwd=2, degree_bwd=4, inside_loops=True)
    (g2, _), low2 = _grads(_trainer(mesh_spec, "topk", both))
    _assert_close(g2, g0, TOL)
    assert count_collectives(low2.compile().as_text())["all_to_all"] == 2 * 2 + 2 * 4
    assert dataclasses.replace(both, degree_fwd=1).degree_fwd == 1


# ------------------------------------------------------------------------------------------ 2-level all-to-all

@pytest.mark.parametrize("split_axis,concat_axis", [(0, 1), (1, 0), (1, 2)])
def test_two_level_all_to_all_equals_flat(split_axis, concat_axis):
    mesh = jax.make_mesh((2, 4), ("node", "expert"))
    x = jax.device_put(jax.random.normal(jax.random.PRNGKey(0), (8 * 16, 24, 5)),
                       NamedSharding(mesh, P(("node", "expert"))))

    def sm(f):
        return jax.jit(jax.shard_map(f, mesh=mesh, in_specs=P(("node", "expert")), out_specs=P(("node", "expert"))))

    axes = ("node", "expert")
    flat = sm(lambda v: jax.lax.all_to_all(v, axes, split_axis, concat_axis, tiled=True))
    two = sm(lambda v: two_level_all_to_all(v, axes, split_axis, concat_axis))
    np.testing.assert_array_equal(two(x), flat(x))
    assert count_collectives(two.lower(x).compile().as_text())["all_to_all"] == 2


def test_pipelined_two_level_step_equals_plain_step():
    (g0, _), _ = _grads(_trainer("data=2,node=2,expert=2", "topk"))
    sch = OverlapSchedule(degree_fwd=2, degree_bwd=2, two_level=True, bucketing=False)
    (g1, _), lowered = _grads(_trainer("data=2,node=2,expert=2", "topk", sch))
    _assert_close(g1, g0, TOL)
    # every dispatch/combine (forward and backward, per chunk) is an intra-node then an inter-node exchange
    assert count_collectives(lowered.compile().as_text())["all_to_all"] == 2 * (2 * 2 + 2 * 2)


# ------------------------------------------------------------------------------------------ train integration

def test_train_with_schedule_matches_plain_training(tmp_path):
    import json
    import types

    from moejax.cli import _train_schedule
    from moejax.config import ModelConfig, MoEConfig, TrainConfig
    from moejax.schedule.overlap import schedule_from_plan
    from moejax.train.trainer import train

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        (corpus / f"m{i}.py").write_text("".join(rng.choice(list("abcdef ()\n:"), 400)))
    cfg = ModelConfig(vocab_size=260, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, max_seq_len=64,
                      moe=MoEConfig(num_experts=8, d_ff=32, router=RouterConfig(type="topk", top_k=2)))
    tc = TrainConfig(steps=3, seq_len=16, global_batch=16, log_every=1, eval_every=3, eval_batches=1, ckpt_every=3,
                     warmup_steps=1, val_percent=25.0)
    mesh = MeshConfig(expert=8)

    def losses(out):
        recs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        return [r["loss"] for r in recs if "loss" in r and "event" not in r]

    kw = {"corpus": str(corpus), "cache_dir": str(tmp_path / "cache"), "progress": False, "mesh": mesh}
    train(cfg, tc, str(tmp_path / "plain"), **kw)
    sch = OverlapSchedule(degree_fwd=4, degree_bwd=2)
    summary = train(cfg, tc, str(tmp_path / "fsmoe"), schedule=sch, **kw)
    assert summary["schedule"]["degree_fwd"] == 4
    a, b = losses(tmp_path / "fsmoe"), losses(tmp_path / "plain")
    assert len(a) == len(b) == 3
    np.testing.assert_allclose(a, b, rtol=1e-5)
    with pytest.raises(ValueError, match="schedule needs a mesh"):
        train(cfg, tc, str(tmp_path / "nomesh"), schedule=sch, **{**kw, "mesh": None})
    # CLI spelling of --schedule
    args = types.SimpleNamespace(schedule="4,2", two_level_a2a=False, profile=None)
    assert _train_schedule(args, cfg, tc, mesh) == OverlapSchedule(degree_fwd=4, degree_bwd=2)
    for bad in ("fast", "0", "1,2,3"):
        with pytest.raises(SystemExit, match="expected 'none', 'auto'"):
            _train_schedule(types.SimpleNamespace(schedule=bad, two_level_a2a=False, profile=None), cfg, tc, mesh)
    # a plan's per-layer degrees -> one pair for the scanned stack; several buckets -> per-layer buckets in the loop
    plan = types.SimpleNamespace(fwd_degrees=(2, 2, 4), bwd_degrees=(8, 8, 8), buckets=((2,), (1, 0)))
    assert schedule_from_plan(plan) == OverlapSchedule(degree_fwd=2, degree_bwd=8, inside_loops=True)


def test_pipelined_layer_with_scheduling_annotations():
    mesh = jax.make_mesh((8,), ("e",))
    w = jax.random.normal(jax.random.PRNGKey(1), (4, 4))

    def layer(x, w):  # [E=8, T, D] -> dispatch -> row-wise experts -> combine
        xr = jax.lax.all_to_all(x, "e", 0, 1, tiled=True)
        y = jnp.tanh(xr @ w) * xr
        return jax.lax.all_to_all(y, "e", 1, 0, tiled=True)

    x = jax.device_put(jax.random.normal(jax.random.PRNGKey(0), (64, 16, 4)), NamedSharding(mesh, P("e")))

    def sm(f):
        return jax.jit(jax.shard_map(f, mesh=mesh, in_specs=(P("e"), P()), out_specs=P("e")))

    def loss(f):
        return jax.jit(jax.value_and_grad(lambda x, w: jnp.sum(sm(f)(x, w) ** 2), argnums=(0, 1)))

    ref = loss(layer)(x, w)
    piped = pipeline_moe(layer, 4, bwd_degree=2, annotate=True)
    got = loss(piped)(x, w)
    _assert_close(got, ref, TOL)
    text = loss(piped).lower(x, w).as_text()
    assert "_scheduling_group_id" in text
    assert count_collectives(text)["all_to_all"] == 2 * 4 + 2 * 2
    assert "_scheduling_group_id" not in loss(pipeline_moe(layer, 4)).lower(x, w).as_text()


def test_buckets_of_an_unrolled_stack_are_placed_inside_the_backward():
    """Unrolled layers: each layer's gradient is ready as soon as its backward ran, so a bucket's reduction is
    emitted between the backward computations of earlier layers (where XLA can overlap it)."""
    mesh = jax.make_mesh((8,), ("data",))

    def loss(params, x):
        h = x
        for w in params:  # unrolled: one set of equations per layer
            h = jnp.tanh(h @ w) + h
        return jnp.sum(h)

    def grads(params, x):
        return [jax.lax.psum(g, "data") for g in jax.grad(loss)(params, x)]

    params = [jax.random.normal(jax.random.PRNGKey(i), (D, D)) * 0.3 for i in range(L)]
    x = jax.device_put(jax.random.normal(jax.random.PRNGKey(9), (64, D)), NamedSharding(mesh, P("data")))
    f = bucket_gradients(grads, bucket_bytes=2 * D * D * 4)  # two layers per bucket

    def sm(g):
        return jax.shard_map(g, mesh=mesh, in_specs=(P(), P("data")), out_specs=P(), check_vma=False)

    for a, b in zip(jax.jit(sm(f))(params, x), jax.jit(sm(grads))(params, x), strict=True):
        np.testing.assert_array_equal(a, b)
    body = next(e for e in jax.make_jaxpr(sm(f))(params, x).jaxpr.eqns
                if e.primitive.name == "shard_map").params["jaxpr"]
    names = [e.primitive.name for e in body.eqns]
    psums = [i for i, n in enumerate(names) if n == "psum"]
    dots = [i for i, n in enumerate(names) if n == "dot_general"]
    assert len(psums) == L // 2  # one reduction per bucket
    assert psums[0] < dots[-1]  # the first bucket is reduced while earlier layers' backward is still to run
