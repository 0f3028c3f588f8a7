"""FSMoE's six MoE stages: hooks, swappable stages and named scopes (``moejax/nn/stages.py``).

Hooks run at trace time, so the order/shape checks only trace (``jax.eval_shape``); the numeric checks use tiny
shapes. "Bitwise" means ``np.array_equal``: with no hooks the layer must compute exactly what the fixed
pipeline before the stage refactor computed; swapping the dispatch/combine ``all_to_all`` for an
``all_gather`` equivalent moves the same data, so it is bitwise equal too. A custom expert implementation
(a per-expert loop) computes the same math in another order: outputs within ``1e-5 * max(1, |ref|)``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P
from test_expert_parallel import ROUTERS  # the six routers, one config each

from moejax.config import ROUTER_TYPES, ModelConfig, MoEConfig, RouterConfig
from moejax.models.transformer import Transformer
from moejax.nn import dispatch as dsp
from moejax.nn.experts import swiglu, swiglu_capacity
from moejax.nn.moe import MoE
from moejax.nn.routers import RouterOutput, router_statistics
from moejax.nn.stages import STAGES, WHEN, MoEHooks, moe_hooks, moe_stages
from moejax.parallel.expert_parallel import expert_parallel
from moejax.parallel.mesh import (
    BATCH_AXES,
    EXPERT_AXES,
    MeshConfig,
    make_mesh,
    state_specs,
)

OUT_TOL = 1e-5
D, F, E = 16, 24, 8
T_LOCAL = 8

assert set(ROUTERS) == set(ROUTER_TYPES)
ALL_EVENTS = [(s, w) for s in STAGES for w in WHEN]


def make(router="topk", *, dispatch="capacity", cf=1.0, group_size=None, hooks=None, stages=None, **kw):
    rc = dataclasses.replace(ROUTERS[router], group_size=group_size)
    cfg = MoEConfig(num_experts=E, d_ff=F, router=rc, dispatch=dispatch, capacity_factor=cf, **kw)
    return MoE(D, cfg, init_std=0.3, rngs=nnx.Rngs(0), hooks=hooks, stages=stages)


def xs(T=16, seed=1):
    return jax.random.normal(jax.random.PRNGKey(seed), (T, D), jnp.float32)


def recorder():
    """A registry with a hook before and after every stage that records (stage, when, ctx.path, shape)."""
    events, hooks = [], MoEHooks()
    for s in STAGES:
        for w in WHEN:
            def hook(ctx, v, s=s, w=w):
                assert (ctx.stage, ctx.when) == (s, w)
                shape = v.expert_ids.shape if isinstance(v, RouterOutput) else v.shape
                events.append((s, w, ctx.path, shape))
            hooks.register(s, w, hook)
    return events, hooks


def local_call(model, x, train=False):
    g, state = nnx.split(model)
    return lambda state, x: nnx.merge(g, state)(x, rng=jax.random.PRNGKey(3), train=train), state


def ep_fn(model, mesh, train=False):
    """``f(params, rest, x) -> (y, aux)`` running ``model`` expert-parallel under ``shard_map``."""
    gdef, params, rest = nnx.split(model, nnx.Param, ...)

    def body(params, rest, x):
        with expert_parallel(axis=EXPERT_AXES, batch_axes=BATCH_AXES):
            y, aux = nnx.merge(gdef, params, rest)(x, rng=jax.random.PRNGKey(3), train=train)
        return y, jax.tree.map(lambda a: a[None], aux)

    f = jax.shard_map(body, mesh=mesh, in_specs=(state_specs(params), state_specs(rest), P(BATCH_AXES)),
                      out_specs=(P(BATCH_AXES), P(BATCH_AXES)), check_vma=False)
    return f, params, rest


def mesh_of(spec):
    mc = MeshConfig.parse(spec)
    return make_mesh(mc), mc


# ------------------------------------------------------------------------------------- stage order

@pytest.mark.parametrize("router", list(ROUTERS))
def test_hooks_observe_six_stages_in_order_local(router):
    model = make(router)
    events, hooks = recorder()
    f, state = local_call(model, None)
    with moe_hooks(hooks):
        jax.eval_shape(f, state, xs())
    assert [(s, w) for s, w, _, _ in events] == ALL_EVENTS
    assert {p for _, _, p, _ in events} == {"capacity"}
    shapes = {(s, w): sh for s, w, _, sh in events}
    C = shapes[("order", "after")][1]
    assert shapes[("order", "after")] == (E, C, D) == shapes[("dispatch", "after")] == shapes[("combine", "after")]
    assert shapes[("inverse_order", "after")] == (16, D)


@pytest.mark.parametrize("impl", ["tiles", "dense", "gather", "ragged_dot"])
def test_hooks_observe_six_stages_dropless_paths(impl):
    model = make("topk", dispatch="dropless", grouped_impl=impl)
    events, hooks = recorder()
    model.hooks = hooks  # a layer's own hooks (static, part of the graph definition)
    f, state = local_call(model, None)
    jax.eval_shape(f, state, xs())
    assert [(s, w) for s, w, _, _ in events] == ALL_EVENTS
    assert {p for _, _, p, _ in events} == {impl}
    assert events[-1][3] == (16, D)


@pytest.mark.parametrize("router,mesh_spec", [(r, "expert=8") for r in ROUTERS]
                         + [(r, "data=2,expert=4") for r in ("topk", "expert_choice")])
def test_hooks_observe_six_stages_expert_parallel(router, mesh_spec):
    mesh, mc = mesh_of(mesh_spec)
    model = make(router)
    events, hooks = recorder()
    f, params, rest = ep_fn(model, mesh, train=router == "gshard")
    x = xs(T_LOCAL * 8)
    with moe_hooks(hooks):
        jax.eval_shape(f, params, rest, x)
    assert [(s, w) for s, w, _, _ in events] == ALL_EVENTS
    assert {p for _, _, p, _ in events} == {"expert_parallel"}
    shapes = {(s, w): sh for s, w, _, sh in events}
    n = mc.expert  # devices over the expert axes
    _, GC, _ = shapes[("dispatch", "before")]
    assert shapes[("dispatch", "before")] == (E, GC, D)
    assert shapes[("dispatch", "after")] == (E // n, n * GC, D) == shapes[("expert", "after")]
    assert shapes[("combine", "after")] == (E, GC, D)
    assert shapes[("inverse_order", "after")] == (T_LOCAL, D)


# -------------------------------------------------------------------------------------- examples

def test_record_routing_statistics_hook():
    """Example: an after-gate hook adds the router entropy to ``aux`` and records expert counts on the host."""
    recorded = []
    hooks = MoEHooks()

    @hooks.register("gate", "after")
    def routing_stats(ctx, routing):
        p = routing.probs
        ctx.aux["router_entropy"] = -jnp.mean(jnp.sum(p * jnp.log(p + 1e-9), -1))
        counts = jnp.sum(jax.nn.one_hot(routing.expert_ids, ctx.cfg.num_experts, dtype=jnp.int32)
                         * routing.mask[..., None], axis=(0, 1, 2))
        jax.debug.callback(lambda c: recorded.append(np.asarray(c)), counts)

    model = make("topk")
    f, state = local_call(model, None)
    x = xs()

    def g(state, x):
        with moe_hooks(hooks):
            return f(state, x)

    y, aux = jax.jit(g)(state, x)
    y0, _ = jax.jit(f)(state, x)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(y0))  # observation changes nothing
    r, _ = model.route(x)
    p = r.probs
    np.testing.assert_allclose(float(aux["router_entropy"]), float(-jnp.mean(jnp.sum(p * jnp.log(p + 1e-9), -1))),
                               rtol=1e-6)
    assert len(recorded) == 1
    np.testing.assert_array_equal(recorded[0], np.asarray(aux["expert_load"]))


def test_hook_statistics_in_scanned_transformer():
    """Hooks reach every MoE layer of a scanned layer stack; an ``aux`` entry comes back per MoE layer, and its
    values are each layer's own: the largest router probability of that layer's input, recomputed layer by layer
    without hooks (within ``OUT_TOL``)."""
    from moejax.models.transformer import unstack_layers

    cfg = ModelConfig(vocab_size=97, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=48, max_seq_len=64,
                      moe=MoEConfig(num_experts=4, d_ff=24, router=RouterConfig(type="topk", top_k=2)),
                      dense_layers=(0,)).validate()
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    hooks = MoEHooks()
    hooks.register("gate", "after", lambda ctx, r: ctx.aux.update(max_prob=jnp.max(r.probs)))
    g, state = nnx.split(model)

    def f(s, t):
        return nnx.merge(g, s)(t)

    tok = jax.random.randint(jax.random.PRNGKey(4), (2, 8), 0, cfg.vocab_size)
    with moe_hooks(hooks):
        out = jax.eval_shape(f, state, tok)
        got = np.asarray(jax.jit(f)(state, tok).aux["max_prob"])
    assert out.aux["max_prob"].shape == (2,)
    # reference: layer i's MoE input is ffn_norm(h + attention(attn_norm(h))), h the hidden state after layers < i
    def reference(state, tok):
        m = nnx.merge(g, state)
        positions = jnp.broadcast_to(jnp.arange(8, dtype=jnp.int32), (2, 8))
        layer_states, want = unstack_layers(m), []
        for r, (kind, first, n) in enumerate(m.runs):
            if kind != "moe":
                continue
            gdef = nnx.graphdef(m.stacks[r])
            for j in range(n):
                h = m(tok, layers=(0, first + j), return_hidden=True).logits
                blk = nnx.merge(gdef, layer_states[r][j])
                a, _ = blk.attn(blk.attn_norm(h), positions, segment_ids=jnp.ones((2, 8), jnp.int32))
                routing, _ = blk.moe.route(blk.ffn_norm(h + a).reshape(-1, cfg.d_model))
                want.append(jnp.max(routing.probs))
        return jnp.stack(want)

    want = np.asarray(jax.jit(reference)(state, tok))
    assert want.shape == (2,) and want[0] != want[1]
    np.testing.assert_allclose(got, want, rtol=0, atol=OUT_TOL * max(1.0, float(np.max(want))))


def _gather_dispatch(ctx, x):
    """``all_to_all(split_axis=0, concat_axis=1)`` as ``all_gather`` + this device's slice."""
    if ctx.ep is None:
        return ctx.default(x)
    axis = ctx.ep.axis
    n = jax.lax.psum(1, axis)
    i = jax.lax.axis_index(axis)
    El = x.shape[0] // n
    allx = jax.lax.all_gather(x, axis)                                   # [n, E, GC, D]
    mine = jax.lax.dynamic_slice_in_dim(allx, i * El, El, axis=1)        # [n, El, GC, D]
    return jnp.swapaxes(mine, 0, 1).reshape(El, n * x.shape[1], x.shape[2])


def _gather_combine(ctx, y):
    """``all_to_all(split_axis=1, concat_axis=0)`` as ``all_gather`` + this device's slice."""
    if ctx.ep is None:
        return ctx.default(y)
    axis = ctx.ep.axis
    n = jax.lax.psum(1, axis)
    i = jax.lax.axis_index(axis)
    GC = y.shape[1] // n
    ally = jax.lax.all_gather(y, axis)                                   # [n, El, n*GC, D]
    mine = jax.lax.dynamic_slice_in_dim(ally, i * GC, GC, axis=2)        # [n, El, GC, D]
    return mine.reshape(n * y.shape[0], GC, y.shape[2])


@pytest.mark.parametrize("mesh_spec", ["expert=8", "data=2,expert=4"])
def test_inject_custom_collective(mesh_spec):
    """Example: replace the dispatch/combine all_to_all with all_gather equivalents (swapped stages), and add a
    collective from a hook (global expert load); outputs and gradients are bitwise equal to the default."""
    mesh, _ = mesh_of(mesh_spec)
    model = make("topk", cf=0.5)
    f, params, rest = ep_fn(model, mesh)
    x = xs(T_LOCAL * 8)
    hooks = MoEHooks()
    hooks.register("gate", "after",
                   lambda ctx, r: ctx.aux.update(global_load=jax.lax.psum(router_statistics(r)["expert_load"],
                                                                          ctx.ep.batch_axes)))

    def run(custom):
        def loss(params, x):
            if custom:
                with moe_stages(dispatch=_gather_dispatch, combine=_gather_combine), moe_hooks(hooks):
                    y, aux = f(params, rest, x)
            else:
                y, aux = f(params, rest, x)
            return jnp.sum(y * jnp.cos(x)), (y, aux)

        step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
        return step(params, x), step.lower(params, x).compile().as_text()

    ((_, (y, aux)), grads), hlo = run(True)
    ((_, (y0, aux0)), grads0), hlo0 = run(False)
    assert "all-to-all" in hlo0 and "all-to-all" not in hlo and "all-gather" in hlo
    np.testing.assert_array_equal(np.asarray(y), np.asarray(y0))
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads0), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(aux["global_load"][0]), np.asarray(jnp.sum(aux0["expert_load"], 0)))


def _loop_expert(ctx, x):
    """A custom expert stage: one dense SwiGLU per local expert over its ``[R, D]`` rows."""
    if ctx.path not in ("capacity", "expert_parallel"):
        return ctx.default(x)
    wg, wu, wd = ctx.expert_weights
    return jnp.stack([swiglu(x[e], wg[e], wu[e], wd[e]) for e in range(x.shape[0])])


def _close(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.max(np.abs(a - b)) <= OUT_TOL * max(1.0, np.max(np.abs(b))), np.max(np.abs(a - b))


@pytest.mark.parametrize("router", ["topk", "expert_choice"])
def test_swap_expert_stage_local(router):
    base = make(router, cf=0.5)
    swapped = make(router, cf=0.5, stages={"expert": _loop_expert})
    x = xs()
    f0, s0 = local_call(base, x)
    f1, s1 = local_call(swapped, x)
    y0, aux0 = jax.jit(f0)(s0, x)
    y1, aux1 = jax.jit(f1)(s1, x)  # the layer's stages survive nnx.split / merge
    _close(y1, y0)
    assert int(aux1["dropped"]) == int(aux0["dropped"])
    # The context form, on a dropless path: the replacement falls back to the default there.
    fd, sd = local_call(make("topk", dispatch="dropless", grouped_impl="tiles"), x)
    with moe_stages(expert=_loop_expert):
        yd = jax.jit(fd)(sd, x)[0]
    np.testing.assert_array_equal(np.asarray(yd), np.asarray(jax.jit(fd)(sd, x)[0]))


def test_swap_expert_stage_expert_parallel():
    mesh, _ = mesh_of("expert=8")
    f, params, rest = ep_fn(make("gshard"), mesh)
    x = xs(T_LOCAL * 8)
    y0 = jax.jit(f)(params, rest, x)[0]

    def g(params, rest, x):
        with moe_stages(expert=_loop_expert):
            return f(params, rest, x)

    _close(jax.jit(g)(params, rest, x)[0], y0)


# ----------------------------------------------------------------------------------- no-hook identity

def _fixed_pipeline_local(model, x):
    """The layer's single-device capacity path as written before the stage refactor."""
    cfg = model.cfg
    T = x.shape[0]
    r, tm = model.route(x)
    aux = router_statistics(r, tm)
    G, S, K = r.expert_ids.shape
    C = dsp.layer_capacity(cfg.router.type, S, E, K, cfg.capacity_factor)
    layout = dsp.capacity_layout(r.expert_ids, r.mask, E, C)
    xb = dsp.gather_rows(x, layout).reshape(G, E, C, D)
    wg, wu, wd = model.experts.weights()
    out = dsp.combine_rows(swiglu_capacity(xb, wg, wu, wd).reshape(G * E * C, D), layout, r.weights.reshape(T, K))
    return out, {**aux, "dropped": layout.dropped, "capacity_used": layout.capacity_used}


@pytest.mark.parametrize("router", list(ROUTERS))
def test_no_hooks_bitwise_equal_to_fixed_pipeline(router):
    model = make(router, cf=0.5, group_size=8)
    x = xs()
    g, state = nnx.split(model)
    y, aux = jax.jit(lambda s, x: nnx.merge(g, s)(x))(state, x)
    y0, aux0 = jax.jit(lambda s, x: _fixed_pipeline_local(nnx.merge(g, s), x))(state, x)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(y0))
    assert set(aux) == set(aux0)
    for k in aux:
        np.testing.assert_array_equal(np.asarray(aux[k]), np.asarray(aux0[k]))


def test_observing_hooks_leave_the_jaxpr_unchanged():
    _, hooks = recorder()
    model = make("sigmoid")
    f, state = local_call(model, None)
    x = xs()
    plain = str(jax.make_jaxpr(f)(state, x))
    with moe_hooks(hooks):
        hooked = str(jax.make_jaxpr(f)(state, x))
    assert hooked == plain


def _shard_map_body(jaxpr):
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "shard_map":
            return eqn.params["jaxpr"]
        for sub in eqn.params.values():
            sub = getattr(sub, "jaxpr", sub)
            if hasattr(sub, "eqns") and (body := _shard_map_body(sub)) is not None:
                return body
    return None


@pytest.mark.parametrize("router", ["topk", "xmoe"])
def test_expert_parallel_span_is_a2a_expert_a2a(router):
    """Between the dispatch and combine all_to_all there is exactly the expert FFN (for the overlap pass)."""
    mesh, _ = mesh_of("expert=8")
    f, params, rest = ep_fn(make(router), mesh)
    body = _shard_map_body(jax.make_jaxpr(f)(params, rest, xs(T_LOCAL * 8)).jaxpr)
    names = [e.primitive.name for e in body.eqns]
    a2a = [i for i, n in enumerate(names) if n == "all_to_all"]
    assert len(a2a) == 2
    d, c = body.eqns[a2a[0]], body.eqns[a2a[1]]
    assert (d.params["split_axis"], d.params["concat_axis"], d.params["tiled"]) == (0, 1, True)
    assert (c.params["split_axis"], c.params["concat_axis"], c.params["tiled"]) == (1, 0, True)
    xr = d.outvars[0].aval
    wg, wu, wd = (jax.ShapeDtypeStruct((E // 8, D, F), jnp.float32), jax.ShapeDtypeStruct((E // 8, D, F), jnp.float32),
                  jax.ShapeDtypeStruct((E // 8, F, D), jnp.float32))
    want = jax.make_jaxpr(lambda x, a, b, c: swiglu_capacity(x[None], a, b, c)[0])(
        jax.ShapeDtypeStruct(xr.shape, xr.dtype), wg, wu, wd)
    assert names[a2a[0] + 1:a2a[1]] == [e.primitive.name for e in want.jaxpr.eqns]


# -------------------------------------------------------------------------------------- named scopes

def test_named_scopes_in_lowered_hlo():
    model = make("topk")
    f, state = local_call(model, None)
    text = jax.jit(f).lower(state, xs()).as_text(debug_info=True)
    for s in ("gate", "order", "expert", "inverse_order"):  # local dispatch/combine are identities: no ops
        assert f"moe/{s}" in text, s
    mesh, _ = mesh_of("expert=8")
    g, params, rest = ep_fn(make("topk"), mesh)
    text = jax.jit(g).lower(params, rest, xs(T_LOCAL * 8)).as_text(debug_info=True)
    for s in STAGES:
        assert f"moe/{s}" in text, s


# ---------------------------------------------------------------------------------------------- errors

def test_bad_stage_and_when_raise():
    hooks = MoEHooks()
    with pytest.raises(ValueError, match="unknown MoE stage 'route'; allowed: gate, order, dispatch, expert, "
                                         "combine, inverse_order"):
        hooks.register("route", "after", lambda c, v: None)
    with pytest.raises(ValueError, match="when='during'; allowed: before, after"):
        hooks.register("gate", "during", lambda c, v: None)
    with pytest.raises(TypeError, match="callable"):
        hooks.register("gate", "after", 3)
    with pytest.raises(ValueError, match="allowed: gate, order"), moe_stages(experts=_loop_expert):
        pass
    with pytest.raises(ValueError, match="unknown MoE stage 'a2a'"):
        make("topk", stages={"a2a": _gather_dispatch})
    with pytest.raises(TypeError, match="MoEHooks"), moe_hooks(lambda c, v: None):
        pass
    fn = hooks.register("gate", "before", lambda c, v: None)
    assert len(hooks) == 1 and hooks.get("gate", "before") == (fn,)
    hooks.remove("gate", "before", fn)
    assert len(hooks) == 0
