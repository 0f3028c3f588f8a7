"""Per-layer rematerialization (``ModelConfig.remat``): same loss and gradients, a different program."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.config import RouterConfig
from moejax.parallel.mesh import MeshConfig
from moejax.train.trainer import Trainer
from tests.test_parallel_train import batch, configs

TOL = 1e-6


def _cfgs(remat):
    cfg, _, tc = configs(RouterConfig(type="topk", top_k=2), MeshConfig())
    return dataclasses.replace(cfg, remat=remat), tc


def _checkpoint_eqns(jaxpr) -> list:
    """The policy of every checkpoint equation of a jaxpr, nested ones included (the primitive is ``remat2`` in
    jax 0.10; ``checkpoint``/``remat`` elsewhere)."""
    from jax.extend.core import jaxprs_in_params

    out = []
    for eqn in jaxpr.eqns:
        if "remat" in eqn.primitive.name or "checkpoint" in eqn.primitive.name:
            out.append(eqn.params.get("policy"))
        for sub in jaxprs_in_params(eqn.params):
            out.extend(_checkpoint_eqns(sub))
    return out


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


@pytest.fixture(scope="module")
def reference():
    cfg, tc = _cfgs("none")
    t = Trainer(cfg, tc)
    b, key = jax.tree.map(jnp.asarray, batch()), jax.random.PRNGKey(3)
    g, m = jax.jit(t._grads)(t.params, t.rest, b, key)
    return t, b, key, g, m


@pytest.mark.parametrize("remat", ["full", "dots", "dots_no_batch", "save_dots"])
def test_remat_same_loss_and_grads_different_program(remat, reference):
    ref, b, key, g_ref, m_ref = reference
    cfg, tc = _cfgs(remat)
    t = Trainer(cfg, tc)
    for a, r in zip(jax.tree.leaves(t.params), jax.tree.leaves(ref.params), strict=True):  # same initial parameters
        np.testing.assert_array_equal(np.asarray(a), np.asarray(r))
    g, m = jax.jit(t._grads)(t.params, t.rest, b, key)
    for k in ("loss", "ce", "aux_loss", "z_loss"):
        assert _rel(m[k], m_ref[k]) <= TOL, (k, float(m[k]), float(m_ref[k]))
    for (path, a), r in zip(jax.tree_util.tree_leaves_with_path(g), jax.tree.leaves(g_ref), strict=True):
        assert _rel(a, r) <= TOL, (jax.tree_util.keystr(path), _rel(a, r))
    # the program differs: one checkpoint equation per scanned layer stack, with the configured policy
    jr = jax.make_jaxpr(t._grads)(t.params, t.rest, b, key).jaxpr
    eqns = _checkpoint_eqns(jr)
    assert len(eqns) == len(t.model().runs)
    expected = {"full": None, "dots": jax.checkpoint_policies.checkpoint_dots}.get(
        remat, jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
    assert all(p is expected for p in eqns)
    assert _checkpoint_eqns(jax.make_jaxpr(ref._grads)(ref.params, ref.rest, b, key).jaxpr) == []


def test_remat_validation():
    cfg, _ = _cfgs("dots")
    cfg.validate()
    with pytest.raises(ValueError, match=r"ModelConfig.remat='everything' is invalid"):
        dataclasses.replace(cfg, remat="everything").validate()


def test_remat_with_expert_parallel_fsdp_step():
    """Remat composes with the sharded step (expert-parallel all_to_all inside the checkpointed layer, FSDP)."""
    mesh = MeshConfig.parse("data=2,expert=4,fsdp")
    cfg, _, tc = configs(RouterConfig(type="topk", top_k=2), mesh)
    plain, remat = Trainer(cfg, tc, mesh), Trainer(dataclasses.replace(cfg, remat="full"), tc, mesh)
    b, key = plain.place(batch()), jax.random.PRNGKey(3)
    (g0, m0), (g1, m1) = (jax.jit(t._sharded_grads)(t.params, t.rest, b, key) for t in (plain, remat))
    assert _rel(m1["loss"], m0["loss"]) <= TOL
    for a, r in zip(jax.tree.leaves(g1), jax.tree.leaves(g0), strict=True):
        assert _rel(a, r) <= TOL
