"""FSDP/ZeRO-style sharding over ``data`` (``MeshConfig(fsdp=True)``): same step as without it, really sharded,
all-gather + reduce-scatter in the step, checkpoints interchangeable with non-FSDP runs."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from moejax.config import RouterConfig
from moejax.parallel.mesh import FSDP_MIN_SIZE, MeshConfig, add_fsdp, fsdp_dim
from moejax.train.trainer import Trainer
from tests.test_parallel_train import batch, configs

# float32; the FSDP step sums the same per-device terms as the all-reduce step, in another order
TOL = 1e-5


def _uses_data(spec) -> bool:
    return any(e == "data" or (isinstance(e, tuple) and "data" in e) for e in spec)


def _pair(mesh_spec, cfg=None):
    mc = MeshConfig.parse(mesh_spec)
    base, _, tc = configs(RouterConfig(type="topk", top_k=2), mc)
    cfg = cfg or base
    return Trainer(cfg, tc, mc), Trainer(cfg, tc, dataclasses.replace(mc, fsdp=True))


def test_mesh_spec_and_validation():
    mc = MeshConfig.parse("data=2,expert=4,fsdp")
    assert mc.fsdp and mc.fsdp_size == 2 and MeshConfig.parse(mc.spec()) == mc
    assert not MeshConfig.parse("data=2,fsdp=false").fsdp
    assert MeshConfig(data=4).fsdp_size == 1
    with pytest.raises(ValueError, match=r"MeshConfig.fsdp=True is invalid with data=1"):
        MeshConfig.parse("expert=8,fsdp").validate()
    with pytest.raises(ValueError, match="MeshConfig.fsdp"):
        MeshConfig(data=2, fsdp=1).validate()
    with pytest.raises(ValueError, match="fsdp takes no value or true/false"):
        MeshConfig.parse("data=2,fsdp=maybe")
    # the largest free dimension divisible by the data size; small or indivisible arrays stay replicated
    assert add_fsdp(P(None, "expert", None, "tensor"), (2, 8, 64, 32), 4) == P(None, "expert", "data", "tensor")
    assert add_fsdp(P(None, None), (260, 32), 4) == P("data", None)
    assert add_fsdp(P(None, None), (260, 32), 8) == P(None, "data")
    assert add_fsdp(P(None, None), (3, 5 * FSDP_MIN_SIZE + 1), 2) == P(None, None)
    assert add_fsdp(P(None), (64,), 2) == P(None)
    assert fsdp_dim(P(None, "expert", "data")) == 2 and fsdp_dim(P("expert")) is None


@pytest.mark.parametrize("mesh_spec", ["data=2,expert=4", pytest.param("data=4,expert=2", marks=pytest.mark.slow)])
def test_fsdp_step_equals_all_reduce_step(mesh_spec):
    plain, fsdp = _pair(mesh_spec)
    # parameters and optimizer moments are sharded over data (large ones; norm scales stay replicated)
    specs = {jax.tree_util.keystr(p): v.sharding.spec for p, v in jax.tree_util.tree_leaves_with_path(fsdp.params)}
    assert _uses_data(specs["['embed'].value"]) and _uses_data(specs["['lm_head'].value"])
    assert _uses_data(specs["['stacks'][0]['attn']['wq'].value"])
    w = specs["['stacks'][0]['moe']['experts']['w_gate'].value"]
    assert _uses_data(w) and w[1] == ("node", "expert")
    assert not _uses_data(specs["['final_norm']['weight'].value"])
    moments = [v for p, v in jax.tree_util.tree_leaves_with_path(fsdp.opt_state) if ".mu" in jax.tree_util.keystr(p)
               or ".nu" in jax.tree_util.keystr(p)]
    assert sum(_uses_data(v.sharding.spec) for v in moments) == 2 * sum(_uses_data(s) for s in specs.values()) > 0
    assert not any(_uses_data(v.sharding.spec) for v in jax.tree.leaves(plain.params))

    # one step's loss and gradients
    b = batch()
    key = jax.random.PRNGKey(5)

    def grads(t):
        return jax.jit(t._sharded_grads)(t.params, t.rest, t.place(b), key)

    (gp, mp), (gf, mf) = grads(plain), grads(fsdp)
    for k in ("loss", "ce", "aux_loss", "z_loss"):
        assert abs(float(mf[k]) - float(mp[k])) <= TOL * abs(float(mp[k])), k
    np.testing.assert_array_equal(np.asarray(mf["expert_load"]), np.asarray(mp["expert_load"]))
    for (path, a), ref in zip(jax.tree_util.tree_leaves_with_path(gf), jax.tree.leaves(gp), strict=True):
        a, ref = np.asarray(a), np.asarray(ref)
        assert np.max(np.abs(a - ref)) <= TOL * np.max(np.abs(ref)), jax.tree_util.keystr(path)
    # the gradients come out sharded like the parameters
    for g, p in zip(jax.tree.leaves(gf), jax.tree.leaves(fsdp.params), strict=True):
        assert _uses_data(g.sharding.spec) == _uses_data(p.sharding.spec)

    # two optimizer steps
    for s in range(2):
        lp, lf = plain.train_step(batch(s))["loss"], fsdp.train_step(batch(s))["loss"]
        assert abs(float(lf) - float(lp)) <= TOL * abs(float(lp)), s
    for (path, a), ref in zip(jax.tree_util.tree_leaves_with_path(fsdp.params), jax.tree.leaves(plain.params),
                              strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(ref), rtol=0, atol=TOL, err_msg=jax.tree_util.keystr(path))
    # still sharded after the update
    after = {jax.tree_util.keystr(p): v.sharding.spec for p, v in jax.tree_util.tree_leaves_with_path(fsdp.params)}
    assert {k: _uses_data(v) for k, v in after.items()} == {k: _uses_data(v) for k, v in specs.items()}

    if mesh_spec == "data=2,expert=4":
        # the step itself issues the collectives: all-gather of the parameters, reduce-scatter of the gradients
        text = fsdp._train_step.lower(fsdp.params, fsdp.rest, fsdp.opt_state, fsdp.place(b), jnp.int32(0)).as_text()
        assert "all_gather" in text and "reduce_scatter" in text
        plain_text = plain._train_step.lower(plain.params, plain.rest, plain.opt_state, plain.place(b),
                                             jnp.int32(0)).as_text()
        assert "all_gather" not in plain_text and "reduce_scatter" not in plain_text


def test_fsdp_dense_model_on_data8():
    """A dense model on a pure data-parallel mesh of 8 (no expert parallelism)."""
    base, _, _ = configs(RouterConfig(type="topk", top_k=2), MeshConfig(data=8))
    plain, fsdp = _pair("data=8", dataclasses.replace(base, moe=None, d_ff=64))
    assert _uses_data(fsdp.params["stacks"][0]["mlp"]["w_gate"].get_value().sharding.spec)
    for s in range(2):
        lp, lf = plain.train_step(batch(s))["loss"], fsdp.train_step(batch(s))["loss"]
        assert abs(float(lf) - float(lp)) <= TOL * abs(float(lp)), s
    for a, ref in zip(jax.tree.leaves(fsdp.params), jax.tree.leaves(plain.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(ref), rtol=0, atol=TOL)


def test_checkpoint_moves_between_fsdp_and_plain(tmp_path):
    """The default-suite case of the slow test below, without ``train()``: an FSDP trainer's state (random
    optimizer moments, so nothing is zero by chance) saved on data=2,expert=4,fsdp and restored without FSDP on
    data=4,expert=2, then that plain checkpoint restored into FSDP on data=4,expert=2,fsdp: parameters and
    optimizer state bit-identical at every move, sharded over ``data`` exactly where the target trainer is."""
    from moejax.train.checkpoint import Checkpointer

    cfg, _, tc = configs(RouterConfig(type="topk", top_k=2), MeshConfig(data=2, expert=4))
    src = Trainer(cfg, tc, MeshConfig.parse("data=2,expert=4,fsdp"))
    rng = np.random.default_rng(0)

    def fill(a):
        if not jnp.issubdtype(a.dtype, jnp.floating):
            return a
        return jax.device_put(rng.standard_normal(a.shape).astype(a.dtype), a.sharding)

    state = {"params": src.params, "rest": src.rest, "opt_state": jax.tree.map(fill, src.opt_state)}
    assert any(_uses_data(a.sharding.spec) for a in jax.tree.leaves(state["params"]))
    saved = jax.tree.map(np.asarray, state)

    def move(state, directory, target):
        ck = Checkpointer(str(tmp_path / directory), async_save=False)
        ck.save(1, state, {"step": 1})
        ck.wait()
        out, meta = ck.restore({"params": target.params, "rest": target.rest, "opt_state": target.opt_state})
        ck.close()
        assert meta["step"] == 1
        for (path, a), b, t in zip(jax.tree_util.tree_leaves_with_path(out), jax.tree.leaves(saved),
                                   jax.tree.leaves({"params": target.params, "rest": target.rest,
                                                    "opt_state": target.opt_state}), strict=True):
            np.testing.assert_array_equal(np.asarray(a), b, err_msg=jax.tree_util.keystr(path))
            assert a.sharding.is_equivalent_to(t.sharding, a.ndim), jax.tree_util.keystr(path)
        return out

    plain = Trainer(cfg, tc, MeshConfig(data=4, expert=2))
    out = move(state, "fsdp", plain)
    assert not any(_uses_data(a.sharding.spec) for a in jax.tree.leaves(out))
    fsdp = Trainer(cfg, tc, MeshConfig.parse("data=4,expert=2,fsdp"))
    out = move(out, "plain", fsdp)
    assert any(_uses_data(a.sharding.spec) for a in jax.tree.leaves(out["params"]))


@pytest.mark.slow  # its train()-free case above and restoring onto another mesh (test_parallel_train) run by default
def test_checkpoint_between_fsdp_and_plain(tmp_path):
    """Saved by an FSDP run, restored without FSDP on another mesh (and back): identical parameters."""
    from moejax.train.checkpoint import Checkpointer, load_model
    from moejax.train.trainer import train

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rng = np.random.default_rng(1)
    for i in range(12):
        (corpus / f"m{i}.py").write_text("".join(rng.choice(list("abc xyz()\n"), 300)))
    cfg, _, tc = configs(RouterConfig(type="topk", top_k=2), MeshConfig(data=2, expert=4))
    tc = dataclasses.replace(tc, steps=2, seq_len=16, global_batch=8, eval_every=2, ckpt_every=2, eval_batches=1,
                             val_percent=25.0)
    out = tmp_path / "run"
    train(cfg, tc, str(out), corpus=str(corpus), cache_dir=str(tmp_path / "c"), progress=False,
          mesh=MeshConfig.parse("data=2,expert=4,fsdp"))
    single, _, _ = load_model(str(out))
    from flax import nnx
    ref = jax.tree.leaves(nnx.state(single, nnx.Param))

    plain = Trainer(cfg, tc, MeshConfig(data=4, expert=2))
    ck = Checkpointer(str(out / "checkpoints"), async_save=False)
    state, meta = ck.restore({"params": plain.params, "rest": plain.rest, "opt_state": plain.opt_state})
    assert meta["step"] == 2
    assert not any(_uses_data(a.sharding.spec) for a in jax.tree.leaves(state["params"]))
    for a, b in zip(jax.tree.leaves(state["params"]), ref, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    # ... and the other way: a plain checkpoint restored into an FSDP trainer
    ck2 = Checkpointer(str(tmp_path / "plain"), async_save=False)
    ck2.save(2, state, meta)
    ck2.wait()
    fsdp = Trainer(cfg, tc, MeshConfig.parse("data=4,expert=2,fsdp"))
    state2, _ = ck2.restore({"params": fsdp.params, "rest": fsdp.rest, "opt_state": fsdp.opt_state})
    ck.close()
    ck2.close()
    assert any(_uses_data(a.sharding.spec) for a in jax.tree.leaves(state2["params"]))
    for a, b in zip(jax.tree.leaves(state2["params"]), ref, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(jax.tree.leaves(state2["opt_state"]), jax.tree.leaves(state["opt_state"]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
