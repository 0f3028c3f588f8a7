"""Tensor parallelism (Megatron-style over the ``tensor`` mesh axis) in the shard_map train step equals one device."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.config import ModelConfig, MoEConfig, RouterConfig, TrainConfig
from moejax.parallel.mesh import MeshConfig, num_batch_shards
from moejax.train.trainer import Trainer
from tests.test_parallel_train import batch as shared_batch

SEQ, BATCH = 8, 8
TOL = 1e-5  # relative to each gradient's (and loss's) max magnitude


TOPK = RouterConfig(type="topk", top_k=2)


def configs(mesh_cfg, moe=True, router=TOPK, n_heads=4, n_kv_heads=2, n_layers=2):
    n = num_batch_shards(mesh_cfg)
    m = MoEConfig(num_experts=4, d_ff=16, dispatch="capacity", capacity_factor=2.0, router=router,
                  num_shared_experts=1, shared_d_ff=8) if moe else None
    cfg = ModelConfig(vocab_size=260, d_model=16, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
                      head_dim=8, d_ff=24, max_seq_len=32, moe=m).validate()
    ref = cfg if m is None else dataclasses.replace(cfg, moe=dataclasses.replace(m, router=dataclasses.replace(
        router, group_size=BATCH // n * SEQ)))
    tc = TrainConfig(steps=10, seq_len=SEQ, global_batch=BATCH, warmup_steps=1)
    return cfg, ref, tc


def batch(seed=0):
    return shared_batch(seed, batch_size=BATCH, seq=SEQ)


def close(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.max(np.abs(a - b)) <= TOL * max(np.max(np.abs(b)), 1e-30)


def _grads(t, b, key):
    if t.mesh is None:
        return jax.jit(t._grads)(t.params, t.rest, jax.tree.map(jnp.asarray, b), key)
    return jax.jit(t._sharded_grads)(t.params, t.rest, jax.tree.map(lambda a: jax.device_put(a, t.batch_sharding), b),
                                     key)


def _check(mesh_spec, moe=True, schedule=None, n_layers=2):
    """One step's loss, metrics and gradients on ``mesh_spec`` (tensor-parallel) equal one device's."""
    mesh_cfg = MeshConfig.parse(mesh_spec)
    cfg, ref_cfg, tc = configs(mesh_cfg, moe=moe, n_layers=n_layers)
    par, one = Trainer(cfg, tc, mesh_cfg, schedule=schedule), Trainer(ref_cfg, tc)
    b = batch()
    key = jax.random.PRNGKey(5)
    gp, mp = _grads(par, b, key)
    g1, m1 = _grads(one, b, key)
    keys = ("loss", "ce") + (("aux_loss", "z_loss") if moe else ())
    for k in keys:
        assert close(mp[k], m1[k]), (k, float(mp[k]), float(m1[k]))
    if moe:
        np.testing.assert_array_equal(np.asarray(mp["expert_load"]), np.asarray(m1["expert_load"]))
        assert int(mp["dropped"]) == int(m1["dropped"])
    leaves1 = jax.tree.leaves(g1)
    for (path, a), b_ in zip(jax.tree_util.tree_leaves_with_path(gp), leaves1, strict=True):
        assert close(a, b_), (jax.tree_util.keystr(path), float(np.max(np.abs(np.asarray(a) - np.asarray(b_)))))
    return par, one


@pytest.mark.parametrize("mesh_spec", ["tensor=2,expert=4", "data=2,tensor=2,expert=2"])
def test_tensor_parallel_grads_equal_single_device(mesh_spec):
    par, _ = _check(mesh_spec)
    st = par.params["stacks"][0]
    # the parameters are really sharded over tensor (heads, d_ff), experts over the expert axes
    assert st["attn"]["wq"].get_value().sharding.spec[2] == "tensor"
    assert st["attn"]["wk"].get_value().sharding.spec[2] == "tensor"
    assert st["attn"]["wo"].get_value().sharding.spec[1] == "tensor"
    w = st["moe"]["experts"]["w_gate"].get_value()
    assert w.sharding.spec[1] == ("node", "expert") and w.sharding.spec[3] == "tensor"
    assert st["moe"]["experts"]["w_down"].get_value().sharding.spec[2] == "tensor"
    assert st["moe"]["shared"]["w_up"].get_value().sharding.spec[2] == "tensor"
    shard = w.addressable_shards[0].data.shape
    assert shard[-1] == w.shape[-1] // 2


def test_tensor_parallel_dense_model():
    par, _ = _check("data=4,tensor=2", moe=False)
    assert par.params["stacks"][0]["mlp"]["w_gate"].get_value().sharding.spec[2] == "tensor"


@pytest.mark.slow  # default: test_tensor_parallel_with_fsdp_two_steps (two steps on data x tensor x expert)
def test_tensor_parallel_train_step_runs():
    mesh_cfg = MeshConfig.parse("tensor=2,expert=4")
    cfg, ref_cfg, tc = configs(mesh_cfg)
    par, one = Trainer(cfg, tc, mesh_cfg), Trainer(ref_cfg, tc)
    for s in range(2):
        lp, l1 = par.train_step(batch(s))["loss"], one.train_step(batch(s))["loss"]
        assert close(lp, l1), (s, float(lp), float(l1))


@pytest.mark.parametrize("heads,kv,field", [(6, 3, "n_kv_heads"), (3, 1, "n_heads")])
def test_bad_head_count(heads, kv, field):
    cfg, _, tc = configs(MeshConfig(tensor=2, expert=2), n_heads=heads, n_kv_heads=kv)
    with pytest.raises(ValueError, match=rf"ModelConfig\.{field}=\d+ is not divisible by MeshConfig\.tensor=2"):
        Trainer(cfg, tc, MeshConfig(tensor=2, expert=2))


def test_tensor_parallel_pipelined_step():
    """The FSMoE passes (2-chunk pipelining of the expert stage, holding the tensor psum; gradient bucketing)
    keep the tensor-parallel step equal to one device."""
    from moejax.schedule.overlap import OverlapSchedule

    _check("tensor=2,expert=4", schedule=OverlapSchedule(degree_fwd=2, degree_bwd=2))


# ------------------------------------------------------------------------------------------ combinations

def _uses(spec, axis):
    return any(e == axis or (isinstance(e, tuple) and axis in e) for e in spec)


def _two_steps(par, one):
    """Two optimizer steps: losses equal one device's, parameters after them too."""
    for s in range(2):
        lp, l1 = par.train_step(batch(s))["loss"], one.train_step(batch(s))["loss"]
        assert close(lp, l1), (s, float(lp), float(l1))
    for (path, a), b_ in zip(jax.tree_util.tree_leaves_with_path(par.params), jax.tree.leaves(one.params),
                             strict=True):
        assert close(a, b_), (jax.tree_util.keystr(path), float(np.max(np.abs(np.asarray(a) - np.asarray(b_)))))


def test_tensor_parallel_with_fsdp():
    """Tensor parallelism with FSDP over data: parameters sharded over both tensor and data; the step
    all-gathers over data only (the tensor shards stay local), and its loss and gradients equal one device's."""
    par, _ = _check("data=2,tensor=2,expert=2,fsdp")
    assert par.fsdp == 2
    specs = {jax.tree_util.keystr(p): v.sharding.spec for p, v in jax.tree_util.tree_leaves_with_path(par.params)}
    both = [k for k, s in specs.items() if _uses(s, "data") and _uses(s, "tensor")]
    assert "['stacks'][0]['attn']['wq'].value" in both and "['stacks'][0]['moe']['experts']['w_gate'].value" in both
    w = par.params["stacks"][0]["moe"]["experts"]["w_gate"].get_value()
    assert w.addressable_shards[0].data.size * 2 * 2 * 2 == w.size  # expert (2) x data (2) x tensor (2)


# The combinations below run in the default suite on a one-layer model (a scanned stack of one MoE layer: the
# same step, about a quarter cheaper to compile), and on the two-layer model in the slow suite.
N_LAYERS = [1, pytest.param(2, marks=pytest.mark.slow)]


@pytest.mark.parametrize("n_layers", N_LAYERS)
def test_tensor_parallel_with_fsdp_two_steps(n_layers):
    """... and two optimizer steps (updates on the data x tensor shards): losses and parameters equal one
    device's, and the parameters keep their placement."""
    mesh_cfg = MeshConfig.parse("data=2,tensor=2,expert=2,fsdp")
    cfg, ref_cfg, tc = configs(mesh_cfg, n_layers=n_layers)
    par, one = Trainer(cfg, tc, mesh_cfg), Trainer(ref_cfg, tc)
    before = jax.tree.map(lambda v: v.sharding, par.params)
    _two_steps(par, one)
    for (path, v), sh in zip(jax.tree_util.tree_leaves_with_path(par.params), jax.tree.leaves(before), strict=True):
        assert v.sharding.is_equivalent_to(sh, v.ndim), (jax.tree_util.keystr(path), v.sharding, sh)


@pytest.mark.parametrize("n_layers", N_LAYERS)
def test_tensor_parallel_with_node_axis(n_layers):
    """Experts over (node, expert), the batch over (node, expert), tensor inside: equals one device."""
    par, _ = _check("node=2,tensor=2,expert=2", n_layers=n_layers)
    w = par.params["stacks"][0]["moe"]["experts"]["w_gate"].get_value()
    assert w.sharding.spec[1] == ("node", "expert") and w.sharding.spec[3] == "tensor"


@pytest.mark.parametrize("n_layers", N_LAYERS)
def test_tensor_parallel_two_level_all_to_all(n_layers):
    """2-level (intra-node, then inter-node) dispatch/combine all-to-alls with pipelined expert stages holding
    the tensor psum: equals one device, and every exchange is really split in two."""
    from moejax.schedule.overlap import OverlapSchedule
    from moejax.schedule.rewrite import count_collectives

    sch = OverlapSchedule(degree_fwd=2, degree_bwd=2, two_level=True, bucketing=False)
    par, _ = _check("node=2,tensor=2,expert=2", schedule=sch, n_layers=n_layers)
    b = jax.tree.map(lambda a: jax.device_put(a, par.batch_sharding), batch())
    hlo = jax.jit(par._sharded_grads).lower(par.params, par.rest, b, jax.random.PRNGKey(5)).compile().as_text()
    # per (scanned) MoE layer: dispatch + combine, forward and backward, 2 chunks each, 2 exchanges each
    assert count_collectives(hlo)["all_to_all"] == 2 * (2 * 2 + 2 * 2)


def _all_gather_shapes(hlo: str) -> set[tuple[int, ...]]:
    """Result shapes (leading 1s dropped) of the all-gathers in compiled HLO text."""
    out = set()
    for line in hlo.splitlines():
        lhs, _, rhs = line.partition(" all-gather(")
        if rhs and "=" in lhs:
            for dims in re.findall(r"\w+\[([\d,]*)\]", lhs.split("=", 1)[1]):
                shape = tuple(int(d) for d in dims.split(",") if d)
                while shape and shape[0] == 1:
                    shape = shape[1:]
                out.add(shape)
    return out


def test_tensor_parallel_evaluate_equals_single_device():
    """``Trainer.evaluate`` (plain jit over the tensor-sharded parameters: GSPMD partitions the whole-batch
    model, routing included) equals one device, and does not gather the tensor-sharded weights."""
    mesh_cfg = MeshConfig.parse("data=2,tensor=2,expert=2")
    cfg, _, tc = configs(mesh_cfg)
    par, one = Trainer(cfg, tc, mesh_cfg), Trainer(cfg, tc)
    batches = [batch(7), batch(8)]
    ep, e1 = par.evaluate(batches), one.evaluate(batches)
    assert ep["val_bytes"] == e1["val_bytes"] > 0
    assert close(ep["val_bits_per_byte"], e1["val_bits_per_byte"]), (ep, e1)
    # no all-gather rebuilds a whole tensor-sharded weight (per layer or stacked); the eval step stays
    # tensor-parallel (the parameters stay sharded in the trainer's state too)
    hlo = par._eval_step.lower(par.params, par.rest, par.place(batches[0])).compile().as_text()
    full = set()
    for v in jax.tree.leaves(par.params):
        if _uses(v.sharding.spec, "tensor"):
            full |= {tuple(v.shape), tuple(v.shape[1:])}
    assert full and not (_all_gather_shapes(hlo) & full), _all_gather_shapes(hlo) & full
    assert par.params["stacks"][0]["attn"]["wq"].get_value().sharding.spec[2] == "tensor"
