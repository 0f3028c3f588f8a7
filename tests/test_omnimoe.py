"""OmniMoE in the model: the AtomicMoE layer against a per-token loop, training with the router's batch
statistics, checkpoints, generate and the serving engine, and the errors for what is not supported yet.

Layer outputs compare at ``1e-5`` relative to the reference's largest magnitude (float32 sums of ``K`` terms).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax.config import ModelConfig, MoEConfig, RouterConfig, TrainConfig, get_preset
from moejax.models.transformer import Transformer, active_params
from moejax.nn.moe import AtomicMoE

MOE = MoEConfig(num_experts=64, d_ff=32, num_shared_experts=1, shared_d_ff=24, expert_type="atomic",
                router=RouterConfig(type="cartesian", top_k=8))
CFG = ModelConfig(vocab_size=260, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=8, d_ff=32,
                  max_seq_len=64, moe=MOE)


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)


def test_atomic_layer_equals_the_per_token_loop_and_impls_agree():
    layer = AtomicMoE(16, MOE, init_std=0.3, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (3, 5, 16))
    y, aux = layer(x, train=False)
    r, _ = layer.route(x.reshape(-1, 16))
    ids, w = np.asarray(r.expert_ids), np.asarray(r.weights, np.float64)
    xt = np.asarray(x, np.float64).reshape(-1, 16)
    u, v = np.asarray(layer.u[...], np.float64), np.asarray(layer.v[...], np.float64)
    ref = np.asarray(layer.shared(x.reshape(-1, 16)), np.float64)
    for t in range(xt.shape[0]):
        for k in range(ids.shape[1]):
            h = xt[t] @ u[ids[t, k]]
            ref[t] += w[t, k] * h / (1 + np.exp(-h)) * v[ids[t, k]]
    assert rel(y.reshape(-1, 16), ref) < 1e-5
    assert aux["expert_load"].shape == (64,) and float(aux["expert_load"].sum()) == 15 * 8
    assert "norm_stats" not in aux

    def loss(impl):
        lay = AtomicMoE(16, dataclasses.replace(MOE, atomic_impl=impl), init_std=0.3, rngs=nnx.Rngs(0))
        gdef, params, rest = nnx.split(lay, nnx.Param, ...)
        return jax.grad(lambda p, r: jnp.sum(nnx.merge(gdef, p, r)(x)[0] ** 2))(params, rest)

    g_ec, g_tc = loss("expert_centric"), loss("token_centric")
    for a, b in zip(jax.tree.leaves(g_ec), jax.tree.leaves(g_tc), strict=True):
        assert rel(a, b) < 1e-5


def test_bad_atomic_configs_name_the_field():
    with pytest.raises(ValueError, match="router.type.*atomic experts need a product router"):
        dataclasses.replace(MOE, router=RouterConfig(type="topk", top_k=2)).validate()
    with pytest.raises(ValueError, match="expert_type.*needs expert_type='atomic'"):
        dataclasses.replace(MOE, expert_type="swiglu").validate()
    with pytest.raises(ValueError, match="'cartesian' needs num_experts = n\\^2"):
        dataclasses.replace(MOE, num_experts=60).validate()
    with pytest.raises(ValueError, match="dispatch.*dropless only"):
        dataclasses.replace(MOE, dispatch="capacity").validate()
    with pytest.raises(ValueError, match="atomic_impl"):
        dataclasses.replace(MOE, atomic_impl="fast").validate()


def test_tiny_omni_preset_matches_tiny_active_parameters():
    tiny, omni = active_params(get_preset("tiny")), active_params(get_preset("tiny-omni"))
    assert abs(omni["active"] / tiny["active"] - 1) < 0.05
    assert get_preset("tiny-omni").moe.num_experts == 2**16


def test_training_updates_router_statistics_and_checkpoints_serve(tmp_path):
    """Two training steps move the routers' running statistics (stored by the trainer, checkpointed); the
    checkpoint's model evaluates on them, generate and the engine agree on it, a mesh is refused."""
    from moejax.parallel.mesh import MeshConfig
    from moejax.serve.engine import Engine, EngineConfig, SamplingParams
    from moejax.train.checkpoint import load_model
    from moejax.train.trainer import Trainer, train
    from tests.test_serve_engine import check_against_generate

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        (corpus / f"m{i}.py").write_text(" ".join(rng.choice(["def", "x", "(", ")", ":", "return"], 200)) + "\n")
    tc = TrainConfig(steps=2, seq_len=16, global_batch=2, warmup_steps=1, eval_every=2, eval_batches=1,
                     ckpt_every=2, val_percent=20.0)
    s = train(CFG, tc, str(tmp_path / "run"), corpus=str(corpus), cache_dir=str(tmp_path / "cache"), progress=False)
    assert np.isfinite(s["val_bits_per_byte"])
    model, _, _ = load_model(s["out_dir"])
    init = Transformer(CFG, rngs=nnx.Rngs(0))
    for blk, blk0 in ((model.stacks[0], init.stacks[0]),):
        for norm, norm0 in ((blk.moe.router.norm1, blk0.moe.router.norm1),):
            assert norm.mean[...].shape == (2, 8)
            assert not np.allclose(norm.mean[...], norm0.mean[...])  # moved from the initial zeros
            assert np.all(np.asarray(norm.var[...]) > 0)
    prompts = [rng.integers(0, 256, n).tolist() for n in (5, 9)]
    eng = Engine(model, EngineConfig(record_logits=True, block_size=8))
    res = eng.generate(prompts, SamplingParams(max_tokens=6, temperature=0))
    check_against_generate(model, prompts, res, 6)
    assert eng.runner.expert_bytes == 2 * CFG.d_model * 4  # an atomic expert is a U row and a V row (float32)
    with pytest.raises(ValueError, match="trains data parallel only"):
        Trainer(CFG, tc, MeshConfig.parse("data=2,expert=2"))


def test_data_parallel_step_equals_one_device():
    """On data=4 (shard_map, the router's batch statistics psum-ed over the batch axes) the step's loss, z-loss,
    expert loads, gradients and new running statistics equal one device's. The head-level load-balance loss is
    per routing group (a device's tokens on the mesh, the whole batch on one device), so it is left out of the
    objective here (``aux_loss_coef=0``) to compare the rest exactly."""
    from moejax.parallel.mesh import MeshConfig
    from moejax.train.trainer import Trainer
    from tests.test_parallel_train import batch

    cfg = dataclasses.replace(CFG, moe=dataclasses.replace(MOE, aux_loss_coef=0.0))
    tc = TrainConfig(steps=4, seq_len=16, global_batch=16, warmup_steps=1)
    par, one = Trainer(cfg, tc, MeshConfig.parse("data=4")), Trainer(cfg, tc)
    b = batch()
    key = jax.random.PRNGKey(5)
    gp, mp = jax.jit(par._sharded_grads)(par.params, par.rest,
                                        jax.tree.map(lambda a: jax.device_put(a, par.batch_sharding), b), key)
    g1, m1 = jax.jit(one._grads)(one.params, one.rest, jax.tree.map(jnp.asarray, b), key)
    for k in ("loss", "ce", "z_loss"):
        assert rel(mp[k], m1[k]) <= 1e-5, k
    np.testing.assert_array_equal(np.asarray(mp["expert_load"]), np.asarray(m1["expert_load"]))
    assert rel(np.asarray(mp["norm_stats"]) / 4, m1["norm_stats"]) <= 1e-5
    for (path, a), b_ in zip(jax.tree_util.tree_leaves_with_path(gp), jax.tree.leaves(g1), strict=True):
        assert rel(a, b_) <= 1e-5, jax.tree_util.keystr(path)
    lp, l1 = par.train_step(b)["loss"], one.train_step(b)["loss"]
    assert rel(lp, l1) <= 1e-5
    sp = nnx.state(par.model(), nnx.BatchStat)
    s1 = nnx.state(one.model(), nnx.BatchStat)
    for a, b_ in zip(jax.tree.leaves(sp), jax.tree.leaves(s1), strict=True):
        assert rel(a, b_) <= 1e-5


def test_export_and_offload_of_atomic_experts_fail_clearly(tmp_path):
    from moejax.models.hf import config_to_hf
    from moejax.offload.store import prepare

    with pytest.raises(ValueError, match="expert_type='atomic' has no Hugging Face architecture"):
        config_to_hf(CFG)
    with pytest.raises(ValueError, match="offloading stores whole SwiGLU experts"):
        prepare(Transformer(CFG, rngs=nnx.Rngs(0)), str(tmp_path / "store"))
    assert not (tmp_path / "store").exists()
