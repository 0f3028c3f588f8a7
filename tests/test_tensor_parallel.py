"""Tensor parallelism (Megatron-style over the ``tensor`` mesh axis) in the shard_map train step equals one device."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.config import ModelConfig, MoEConfig, RouterConfig, TrainConfig
from moejax.parallel.mesh import MeshConfig, num_batch_shards
from moejax.train.trainer import Trainer

SEQ, BATCH = 8, 8
TOL = 1e-5  # relative to each gradient's (and loss's) max magnitude


def configs(mesh_cfg, moe=True, router=RouterConfig(type="topk", top_k=2), n_heads=4, n_kv_heads=2):
    n = num_batch_shards(mesh_cfg)
    m = MoEConfig(num_experts=4, d_ff=16, dispatch="capacity", capacity_factor=2.0, router=router,
                  num_shared_experts=1, shared_d_ff=8) if moe else None
    cfg = ModelConfig(vocab_size=260, d_model=16, n_layers=2, n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=8,
                      d_ff=24, max_seq_len=32, moe=m).validate()
    ref = cfg if m is None else dataclasses.replace(cfg, moe=dataclasses.replace(m, router=dataclasses.replace(
        router, group_size=BATCH // n * SEQ)))
    tc = TrainConfig(steps=10, seq_len=SEQ, global_batch=BATCH, warmup_steps=1)
    return cfg, ref, tc


def batch(seed=0):
    rng = np.random.default_rng(seed)
    tok = rng.integers(0, 256, (BATCH, SEQ + 1)).astype(np.int32)
    seg = np.ones_like(tok)
    seg[:, SEQ // 2:] = 2
    pos = np.concatenate([np.arange(SEQ // 2), np.arange(SEQ + 1 - SEQ // 2)])[None].repeat(BATCH, 0)
    return {"tokens": tok, "segment_ids": seg, "positions": pos.astype(np.int32)}


def close(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.max(np.abs(a - b)) <= TOL * max(np.max(np.abs(b)), 1e-30)


def _check(mesh_spec, moe=True):
    mesh_cfg = MeshConfig.parse(mesh_spec)
    cfg, ref_cfg, tc = configs(mesh_cfg, moe=moe)
    par, one = Trainer(cfg, tc, mesh_cfg), Trainer(ref_cfg, tc)
    b = batch()
    key = jax.random.PRNGKey(5)
    gp, mp = jax.jit(par._sharded_grads)(par.params, par.rest,
                                        jax.tree.map(lambda a: jax.device_put(a, par.batch_sharding), b), key)
    g1, m1 = jax.jit(one._grads)(one.params, one.rest, jax.tree.map(jnp.asarray, b), key)
    keys = ("loss", "ce") + (("aux_loss", "z_loss") if moe else ())
    for k in keys:
        assert close(mp[k], m1[k]), (k, float(mp[k]), float(m1[k]))
    if moe:
        np.testing.assert_array_equal(np.asarray(mp["expert_load"]), np.asarray(m1["expert_load"]))
    leaves1 = jax.tree.leaves(g1)
    for (path, a), b_ in zip(jax.tree_util.tree_leaves_with_path(gp), leaves1, strict=True):
        assert close(a, b_), (jax.tree_util.keystr(path), float(np.max(np.abs(np.asarray(a) - np.asarray(b_)))))
    return par


@pytest.mark.parametrize("mesh_spec", ["tensor=2,expert=4", "data=2,tensor=2,expert=2"])
def test_tensor_parallel_grads_equal_single_device(mesh_spec):
    par = _check(mesh_spec)
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
    par = _check("data=4,tensor=2", moe=False)
    assert par.params["stacks"][0]["mlp"]["w_gate"].get_value().sharding.spec[2] == "tensor"


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

    mesh_cfg = MeshConfig.parse("tensor=2,expert=4")
    cfg, ref_cfg, tc = configs(mesh_cfg)
    par = Trainer(cfg, tc, mesh_cfg, schedule=OverlapSchedule(degree_fwd=2, degree_bwd=2))
    one = Trainer(ref_cfg, tc)
    b, key = batch(), jax.random.PRNGKey(5)
    gp, mp = jax.jit(par._sharded_grads)(par.params, par.rest,
                                        jax.tree.map(lambda a: jax.device_put(a, par.batch_sharding), b), key)
    g1, m1 = jax.jit(one._grads)(one.params, one.rest, jax.tree.map(jnp.asarray, b), key)
    assert close(mp["loss"], m1["loss"])
    for a, b_ in zip(jax.tree.leaves(gp), jax.tree.leaves(g1), strict=True):
        assert close(a, b_)
