"""The expert-parallel train step (shard_map, all_to_all MoE, explicit gradient psum) equals one device."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.config import ModelConfig, MoEConfig, RouterConfig, TrainConfig
from moejax.parallel.mesh import MeshConfig, num_batch_shards
from moejax.train.trainer import Trainer

SEQ, BATCH = 16, 16
# Loss and gradients: relative 1e-5 (float32; the sharded step sums the same terms in another order).
TOL = 1e-5


def configs(router, mesh_cfg):
    n = num_batch_shards(mesh_cfg)
    moe = MoEConfig(num_experts=8, d_ff=32, dispatch="capacity", capacity_factor=2.0, router=router)
    cfg = ModelConfig(vocab_size=260, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, max_seq_len=64,
                      moe=moe).validate()
    # One routing group per device on the mesh == group_size of one device's tokens on one device.
    ref = dataclasses.replace(cfg, moe=dataclasses.replace(moe, router=dataclasses.replace(
        router, group_size=BATCH // n * SEQ)))
    tc = TrainConfig(steps=10, seq_len=SEQ, global_batch=BATCH, warmup_steps=1)
    return cfg, ref, tc


def batch(seed=0, batch_size=BATCH, seq=SEQ):
    """A random byte batch ``[batch_size, seq + 1]`` of two packed documents per row (shared by other tests)."""
    rng = np.random.default_rng(seed)
    tok = rng.integers(0, 256, (batch_size, seq + 1)).astype(np.int32)
    seg = np.ones_like(tok)
    seg[:, seq // 2:] = 2
    pos = np.concatenate([np.arange(seq // 2), np.arange(seq + 1 - seq // 2)])[None].repeat(batch_size, 0)
    return {"tokens": tok, "segment_ids": seg, "positions": pos.astype(np.int32)}


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


TOPK, GSHARD = RouterConfig(type="topk", top_k=2), RouterConfig(type="gshard")


# Each mesh once in the default suite (data=2,expert=4 also by the sigmoid case of the all-routers test below);
# every router x mesh in the slow set.
@pytest.mark.parametrize("mesh_spec, router", [
    pytest.param("expert=8", TOPK, id="topk-expert=8"),
    pytest.param("data=2,node=2,expert=2", GSHARD, id="gshard-data=2,node=2,expert=2"),
    pytest.param("data=2,expert=4", TOPK, id="topk-data=2,expert=4", marks=pytest.mark.slow),
    pytest.param("data=2,node=2,expert=2", TOPK, id="topk-data=2,node=2,expert=2", marks=pytest.mark.slow),
    pytest.param("expert=8", GSHARD, id="gshard-expert=8", marks=pytest.mark.slow),
    pytest.param("data=2,expert=4", GSHARD, id="gshard-data=2,expert=4", marks=pytest.mark.slow),
])
def test_sharded_grads_equal_single_device(mesh_spec, router):
    _check_grads(mesh_spec, router)


def _check_grads(mesh_spec, router):
    mesh_cfg = MeshConfig.parse(mesh_spec)
    cfg, ref_cfg, tc = configs(router, mesh_cfg)
    compare_sharded_grads(Trainer(cfg, tc, mesh_cfg), Trainer(ref_cfg, tc))


def compare_sharded_grads(par, one):
    """``par``'s sharded step and ``one``'s single-device step on :func:`batch` agree: loss metrics and gradients
    within ``TOL``, expert loads and dropped counts exactly. Returns both metric dicts."""
    b = batch()
    key = jax.random.PRNGKey(5)
    gp, mp = jax.jit(par._sharded_grads)(par.params, par.rest,
                                        jax.tree.map(lambda a: jax.device_put(a, par.batch_sharding), b), key)
    g1, m1 = jax.jit(one._grads)(one.params, one.rest, jax.tree.map(jnp.asarray, b), key)
    for k in ("loss", "ce", "aux_loss", "z_loss"):
        assert rel(mp[k], m1[k]) <= TOL, (k, float(mp[k]), float(m1[k]))
    np.testing.assert_array_equal(np.asarray(mp["expert_load"]), np.asarray(m1["expert_load"]))
    assert int(mp["dropped"]) == int(m1["dropped"])
    for (path, a), b_ in zip(jax.tree_util.tree_leaves_with_path(gp), jax.tree.leaves(g1), strict=True):
        assert rel(a, b_) <= TOL, (jax.tree_util.keystr(path), rel(a, b_))
    return mp, m1


# The routers the default cases above leave out (switch, sigmoid, xmoe) get one default case each; the rest of
# the grid is slow.
ALL_ROUTERS_DEFAULT = {("switch", "expert=8"), ("sigmoid", "data=2,expert=4"), ("xmoe", "expert=8")}


@pytest.mark.parametrize("rtype,mesh_spec", [
    pytest.param(r, m, marks=() if (r, m) in ALL_ROUTERS_DEFAULT else pytest.mark.slow)
    for m in ("expert=8", "data=2,expert=4") for r in ("topk", "switch", "gshard", "sigmoid", "xmoe", "expert_choice")])
def test_sharded_grads_equal_single_device_all_routers(mesh_spec, rtype):
    _check_grads(mesh_spec, RouterConfig(type=rtype, top_k=2))


def test_sharded_training_loss_trajectory_matches():
    mesh_cfg = MeshConfig(expert=8)
    cfg, ref_cfg, tc = configs(RouterConfig(type="topk", top_k=2), mesh_cfg)
    par, one = Trainer(cfg, tc, mesh_cfg), Trainer(ref_cfg, tc)
    for s in range(3):
        lp, l1 = par.train_step(batch(s))["loss"], one.train_step(batch(s))["loss"]
        assert rel(lp, l1) <= TOL, (s, float(lp), float(l1))


def test_mesh_errors():
    cfg, _, tc = configs(RouterConfig(type="topk", top_k=2), MeshConfig(expert=8))
    with pytest.raises(ValueError, match="does not divide num_experts"):
        Trainer(cfg, tc, MeshConfig(expert=3))
    with pytest.raises(ValueError, match="not divisible by the 8 batch shards"):
        Trainer(cfg, dataclasses.replace(tc, global_batch=12), MeshConfig(data=2, expert=4))


@pytest.mark.slow  # default: test_resume_on_another_mesh_continues_the_trajectory (the same move through train())
def test_restore_onto_another_mesh(tmp_path):
    """Saved on expert=8, restored on data=4,expert=2: bit-identical parameters, logits within 1e-6."""
    from flax import nnx

    from moejax.train.checkpoint import Checkpointer, load_model
    from moejax.train.trainer import train

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rng = np.random.default_rng(1)
    for i in range(12):
        (corpus / f"m{i}.py").write_text("".join(rng.choice(list("abc xyz()\n"), 300)))
    cfg, _, tc = configs(RouterConfig(type="topk", top_k=2), MeshConfig(expert=8))
    tc = dataclasses.replace(tc, steps=2, seq_len=16, global_batch=8, eval_every=2, ckpt_every=2, eval_batches=1,
                             val_percent=25.0)
    out = tmp_path / "run"
    train(cfg, tc, str(out), corpus=str(corpus), cache_dir=str(tmp_path / "c"), progress=False,
          mesh=MeshConfig(expert=8))
    single, _, _ = load_model(str(out))
    other = Trainer(cfg, tc, MeshConfig(data=4, expert=2))
    ck = Checkpointer(str(out / "checkpoints"), async_save=False)
    state, meta = ck.restore({"params": other.params, "rest": other.rest, "opt_state": other.opt_state})
    ck.close()
    assert meta["step"] == 2
    w = state["params"]["stacks"][0]["moe"]["experts"]["w_gate"].get_value()
    assert w.sharding.spec[1] == ("node", "expert")  # placed on the new mesh, experts over the expert axes
    ref = nnx.state(single, nnx.Param)
    for a, b in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(ref), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    model = nnx.merge(other.gdef, state["params"], state["rest"])
    tok = jnp.array([[1, 2, 3, 4, 5, 6, 7, 8]])
    la, lb = np.asarray(model(tok).logits), np.asarray(single(tok).logits)
    assert np.max(np.abs(la - lb)) <= 1e-6 * max(1.0, np.max(np.abs(lb)))
    # ... and training continues on the new mesh (scalar optimizer state is replicated there too).
    other.params, other.rest, other.opt_state = state["params"], state["rest"], state["opt_state"]
    m = other.train_step(jax.tree.map(lambda a: a[:8], batch()))
    assert np.isfinite(float(m["loss"]))


def test_resume_on_another_mesh_continues_the_trajectory(tmp_path):
    """``train(resume=True)`` on another mesh (``moejax train --resume`` with a different ``--mesh``): a run on
    expert=8 checkpointed at step 3, resumed on data=2,expert=4 to step 6, follows the uninterrupted expert=8 run.

    The interrupted run is the uninterrupted run's step-3 checkpoint copied to a new output directory (what a run
    stopped there leaves; ``test_train``'s resume test shows that stopping at a checkpoint and resuming on the
    same mesh is bit-identical), which saves compiling the expert=8 step twice.

    Tolerance: the loss at each resumed step within ``TOL`` (1e-5) relative to the uninterrupted run's. Both
    meshes have 8 batch shards, so each device routes the same 16 tokens as one group (the same routing,
    capacity and drops); the new mesh may still reduce the gradients over the devices in another order (float32
    rounding), which the optimizer carries into the later steps.
    """
    import json
    import shutil

    from moejax.train.trainer import train

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rng = np.random.default_rng(2)
    for i in range(12):
        (corpus / f"m{i}.py").write_text("".join(rng.choice(list("abc xyz()\n"), 300)))
    moe = MoEConfig(num_experts=8, d_ff=16, dispatch="capacity", capacity_factor=2.0,
                    router=RouterConfig(type="topk", top_k=2))
    cfg = ModelConfig(vocab_size=260, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=16, max_seq_len=16,
                      moe=moe).validate()
    tc = TrainConfig(steps=6, seq_len=16, global_batch=8, log_every=1, eval_every=3, ckpt_every=3, eval_batches=1,
                     val_percent=25.0, warmup_steps=1)
    kw = {"corpus": str(corpus), "cache_dir": str(tmp_path / "cache"), "progress": False}
    full = train(cfg, tc, str(tmp_path / "full"), mesh=MeshConfig(expert=8), **kw)
    shutil.copytree(tmp_path / "full" / "checkpoints" / "3", tmp_path / "part" / "checkpoints" / "3")
    resumed = train(cfg, tc, str(tmp_path / "part"), mesh=MeshConfig(data=2, expert=4), resume=True, **kw)

    def log(run):
        return [json.loads(line) for line in (tmp_path / run / "log.jsonl").read_text().splitlines()]

    a = {r["step"]: r["loss"] for r in log("full") if "loss" in r and "event" not in r}
    b = {r["step"]: r["loss"] for r in log("part") if "loss" in r and "event" not in r}
    assert sorted(a) == [1, 2, 3, 4, 5, 6] and sorted(b) == [4, 5, 6]
    for s in (4, 5, 6):
        assert abs(b[s] - a[s]) <= TOL * abs(a[s]), (s, b[s], a[s])
    # it really resumed at step 3, on the new mesh
    assert [(r["step"], r["mesh"]) for r in log("part") if r.get("event") == "start"] == [
        (3, MeshConfig(data=2, expert=4).spec())]
    assert resumed["step"] == full["step"] == 6
    assert abs(resumed["val_bits_per_byte"] - full["val_bits_per_byte"]) <= TOL * full["val_bits_per_byte"]
