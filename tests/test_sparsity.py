"""N:M sparse training (issue 21): masks, the methods' GEMMs and gradients against their formulas, every
projection of the model behind one switch, MAC accounting, and the sparse checkpoint served as trained."""

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from moejax.config import (
    ModelConfig,
    MoEConfig,
    RouterConfig,
    SparsityConfig,
    TrainConfig,
)
from moejax.models.transformer import Transformer
from moejax.nn import sparse
from moejax.nn.experts import GROUPED_IMPLS, grouped_experts, swiglu
from moejax.nn.nm_masks import nm_mask, transposable_mask
from moejax.sparsity import (
    apply_forward_masks,
    forward_mask,
    sparse_training,
    sparse_weights,
    step_macs,
)


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


# ------------------------------------------------------------------------------------------ masks

def _groups(mask, axis, m):
    g = np.moveaxis(np.asarray(mask), axis, -1)
    return g.reshape(*g.shape[:-1], g.shape[-1] // m, m)


@settings(max_examples=20, deadline=None)
@given(nm=st.sampled_from([(1, 2), (2, 4), (1, 4), (3, 4), (2, 8)]), groups=st.integers(1, 3),
       other=st.integers(1, 4), axis=st.integers(0, 2), seed=st.integers(0, 2**16))
def test_nm_mask_keeps_the_n_largest_of_every_m_along_the_axis(nm, groups, other, axis, seed):
    n, m = nm
    shape = [other, other + 1, 2]
    shape[axis] = groups * m
    w = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
    mask = nm_mask(jnp.asarray(w), n, m, axis)
    assert mask.shape == w.shape and mask.dtype == jnp.bool_
    g, a = _groups(mask, axis, m), _groups(np.abs(w), axis, m)
    assert np.all(g.sum(-1) == n)
    kept_min = np.where(g, a, np.inf).min(-1)
    pruned_max = np.where(g, -np.inf, a).max(-1)
    assert np.all(kept_min >= pruned_max)


def test_nm_mask_ties_go_to_the_lower_index_and_bad_shapes_are_named():
    mask = np.asarray(nm_mask(jnp.ones((2, 8)), 2, 4, axis=1))
    assert mask.tolist() == [[True, True, False, False] * 2] * 2
    w = jnp.asarray([[1.0, -3.0, 3.0, 0.5]])  # |-3| == |3|: the lower index wins the tie for second place
    assert np.asarray(nm_mask(w, 1, 4, axis=1)).tolist() == [[False, True, False, False]]
    with pytest.raises(ValueError, match="not a multiple of the group size m=8"):
        nm_mask(jnp.ones((12, 3)), 2, 8, axis=0)
    with pytest.raises(ValueError, match="0 < n <= m"):
        nm_mask(jnp.ones((8, 3)), 5, 4)


def test_transposable_mask_is_nm_along_both_axes_and_optimal():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(3, 8, 12)).astype(np.float32)  # a leading batch axis (experts)
    mask = np.asarray(transposable_mask(jnp.asarray(w), 2, 4, axes=(1, 2)))
    assert np.all(_groups(mask, 1, 4).sum(-1) == 2) and np.all(_groups(mask, 2, 4).sum(-1) == 2)
    # every 4x4 0/1 matrix with two ones per row and per column, found by brute force over all 2^16
    bits = (np.arange(2**16)[:, None] >> np.arange(16)) & 1
    pats = bits.reshape(-1, 4, 4)
    pats = pats[(pats.sum(1) == 2).all(1) & (pats.sum(2) == 2).all(1)]
    assert len(pats) == 90
    for e, i, j in itertools.product(range(3), range(2), range(3)):
        blk = np.abs(w[e, 4 * i:4 * i + 4, 4 * j:4 * j + 4])
        kept = np.sum(blk * mask[e, 4 * i:4 * i + 4, 4 * j:4 * j + 4])
        assert kept == pytest.approx(np.max(np.einsum("pij,ij->p", pats, blk)), rel=1e-6)
    with pytest.raises(ValueError, match="m <= 4"):
        transposable_mask(jnp.ones((8, 8)), 2, 8)


# ------------------------------------------------------------------------------------------ one projection

def _linear_grads(sc, x, w, seed=3):
    """Value and (dx, dw) of ``sum(sin(x @ W') * r)`` through the mlp-site projection hook under ``sc``."""
    r = jax.random.normal(jax.random.key(seed), (x.shape[0], w.shape[1]))

    def f(x, w):
        with sparse_training(sc):
            y = sparse.einsum("bd,df->bf", x, sparse.sparse_weight(w, "mlp", 0, 1))
        return jnp.sum(jnp.sin(y) * r), y

    (_, y), (dx, dw) = jax.value_and_grad(f, (0, 1), has_aux=True)(x, w)
    dy = jnp.cos(y) * r
    return y, dx, dw, dy


@pytest.fixture(scope="module")
def xw():
    k1, k2 = jax.random.split(jax.random.key(0))
    return jax.random.normal(k1, (5, 16)), jax.random.normal(k2, (16, 24))


def test_bdwp_forward_dx_dw_equal_the_formulas(xw):
    x, w = xw
    sc = SparsityConfig(n=2, m=4, method="bdwp")
    y, dx, dw, dy = _linear_grads(sc, x, w)
    mf, mb = nm_mask(w, 2, 4, axis=0), nm_mask(w, 2, 4, axis=1)  # groups along D (forward), F (dX)
    np.testing.assert_allclose(y, x @ (w * mf), rtol=1e-6, atol=1e-6)
    assert rel(dx, dy @ (w * mb).T) < 1e-6
    assert rel(dw, x.T @ dy) < 1e-6  # dense weight gradient
    assert not np.allclose(mf, mb)  # the two masks differ, so the test tells them apart


def test_srste_and_transposable_gradients(xw):
    x, w = xw
    lam = 0.05
    y, dx, dw, dy = _linear_grads(SparsityConfig(n=2, m=4, method="srste", srste_decay=lam), x, w)
    mf = nm_mask(w, 2, 4, axis=0)
    np.testing.assert_allclose(y, x @ (w * mf), rtol=1e-6, atol=1e-6)
    assert rel(dx, dy @ (w * mf).T) < 1e-6  # SR-STE: dX with the forward mask (no saving along F)
    # SR-STE's rule (aojunzz/NM-sparsity): W <- W - lr * (g(W~) + lambda_W * (1 - mask) * W)
    assert rel(dw, x.T @ dy + lam * (~mf) * w) < 1e-6
    lr = 0.1
    w1 = w - lr * dw
    assert rel(w1, w - lr * (x.T @ dy + lam * jnp.where(mf, 0.0, w))) < 1e-6
    y, dx, dw, dy = _linear_grads(SparsityConfig(n=2, m=4, method="transposable"), x, w)
    mt = transposable_mask(w, 2, 4, axes=(0, 1))
    np.testing.assert_allclose(y, x @ (w * mt), rtol=1e-6, atol=1e-6)
    assert rel(dx, dy @ (w * mt).T) < 1e-6 and rel(dw, x.T @ dy) < 1e-6


def test_all_ones_masks_give_the_plain_gradients(xw):
    x, w = xw
    y0, dx0, dw0, _ = _linear_grads(None, x, w)
    for method in ("bdwp", "srste", "transposable"):
        y, dx, dw, _ = _linear_grads(SparsityConfig(n=4, m=4, method=method), x, w)
        assert rel(y, y0) < 1e-6 and rel(dx, dx0) < 1e-6 and rel(dw, dw0) < 1e-6, method


# ------------------------------------------------------------------------------------------ experts

T, D, F, E, K = 6, 8, 16, 4, 2


@pytest.fixture(scope="module")
def expert_case():
    ks = jax.random.split(jax.random.key(1), 6)
    x = jax.random.normal(ks[0], (T, D))
    w = tuple(jax.random.normal(k, s) * 0.5 for k, s in zip(ks[1:4], [(E, D, F), (E, D, F), (E, F, D)],
                                                                strict=True))
    ids = jnp.asarray(np.random.default_rng(0).permutation(np.tile(np.arange(E), 3))[:T * K].reshape(T, K))
    sw = jax.nn.softmax(jax.random.normal(ks[4], (T, K)), -1)
    r = jax.random.normal(ks[5], (T, D))
    return x, w, ids, sw, r


def _expert_grads(run, sc, x, w, r):
    def f(x, w):
        with sparse_training(sc):
            ws = tuple(sparse.sparse_weight(v, "experts", -2, -1) for v in w)
            return jnp.sum(run(x, ws) * r)

    return jax.grad(f, (0, 1))(x, w)


def _per_slot(ids, sw):
    """The naive reference: every (token, slot) through its expert's SwiGLU, one at a time."""
    def run(x, ws):
        out = []
        for t in range(T):
            acc = 0.0
            for k in range(K):
                e = int(ids[t, k])
                we = [sparse.Dual(v.fwd[e], v.bwd[e]) if isinstance(v, sparse.Dual) else v[e] for v in ws]
                acc = acc + sw[t, k] * swiglu(x[t:t + 1], *we)[0]
            out.append(acc)
        return jnp.stack(out)
    return run


@pytest.mark.parametrize("method", ["bdwp", "srste"])
@pytest.mark.parametrize("impl", ["tiles", "dense", "gather", "ragged_dot"])
def test_sparse_experts_match_the_per_slot_loop(expert_case, impl, method):
    x, w, ids, sw, r = expert_case
    sc = SparsityConfig(n=2, m=4, method=method)
    mask = jnp.ones(ids.shape, bool)

    def run(x, ws):
        return grouped_experts(x, ws, ids, sw, mask, method=impl, block_rows=4 if impl == "tiles" else None)

    got = _expert_grads(run, sc, x, w, r)
    want = _expert_grads(_per_slot(ids, sw), sc, x, w, r)
    for g, h in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert rel(g, h) < 1e-5, impl
    if method == "bdwp":  # and differs from the dense experts' gradient (the masks act)
        dense = _expert_grads(_per_slot(ids, sw), None, x, w, r)
        assert rel(got[0], dense[0]) > 1e-2


def test_pallas_experts_refuse_bdwp(expert_case):
    x, w, ids, sw, _ = expert_case
    with sparse_training(SparsityConfig(n=2, m=4, method="bdwp")), pytest.raises(ValueError, match="'tiles'"):
        ws = tuple(sparse.sparse_weight(v, "experts", -2, -1) for v in w)
        jax.grad(lambda x: jnp.sum(grouped_experts(x, ws, ids, sw, jnp.ones(ids.shape, bool), method="pallas")))(x)
    assert "pallas" in GROUPED_IMPLS


# ------------------------------------------------------------------------------------------ the model

CFG = ModelConfig(vocab_size=260, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=8, d_ff=32,
                  max_seq_len=64, dense_layers=(0,),
                  moe=MoEConfig(num_experts=4, d_ff=16, num_shared_experts=1,
                                router=RouterConfig(type="topk", top_k=2)))


@pytest.fixture(scope="module")
def model_case():
    model = Transformer(CFG, rngs=nnx.Rngs(0))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 12)), jnp.int32)
    return model, tokens


def _loss_grads(model, tokens, sc):
    gdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params):
        with sparse_training(sc):
            out = nnx.merge(gdef, params, rest)(tokens)
        return jnp.mean(jax.nn.logsumexp(out.logits, -1) - out.logits[..., 0])

    return jax.jit(jax.value_and_grad(loss))(params)


def test_dense_method_is_the_plain_step_bit_for_bit(model_case):
    model, tokens = model_case
    gdef, params, rest = nnx.split(model, nnx.Param, ...)

    def traced(sc):
        def loss(params):
            with sparse_training(sc):
                return jnp.sum(nnx.merge(gdef, params, rest)(tokens).logits)
        return str(jax.make_jaxpr(jax.grad(loss))(params))

    assert traced(SparsityConfig(method="dense")) == traced(None)
    assert traced(SparsityConfig(n=2, m=4, method="bdwp")) != traced(None)


def test_every_projection_is_covered_and_all_ones_masks_change_nothing(model_case):
    model, tokens = model_case
    sc = SparsityConfig(n=2, m=4, method="bdwp")
    covered = sparse_weights(model, sc)
    # 2 layers x 4 attention weights, 1 dense MLP + 1 shared MLP x 3, 1 expert stack x 3
    assert len(covered) == 8 + 6 + 3
    l0, g0 = _loss_grads(model, tokens, None)
    for method in ("bdwp", "srste", "transposable"):
        l1, g1 = _loss_grads(model, tokens, SparsityConfig(n=4, m=4, method=method))
        assert rel(l1, l0) < 1e-6
        for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0), strict=True):
            assert rel(a, b) < 1e-6, method
    l2, _ = _loss_grads(model, tokens, SparsityConfig(n=2, m=4, method="bdwp", layers=("experts",)))
    assert abs(float(l2 - l0)) > 1e-6  # the switch acts (experts only)


def test_forward_masks_make_the_model_the_sparse_forward(model_case):
    model, tokens = model_case
    sc = SparsityConfig(n=2, m=8, method="bdwp")
    with sparse_training(sc):
        want = model(tokens).logits
    masked_model = nnx.merge(*nnx.split(model))
    zeroed = apply_forward_masks(masked_model, sc)
    assert zeroed == sum(p.size for p, _, _ in sparse_weights(model, sc)) * 6 // 8
    for p, r, o in sparse_weights(masked_model, sc):
        assert np.all(_groups(np.asarray(p[...]) != 0, r % p.ndim, 8).sum(-1) <= 2)
        assert np.all(np.asarray(forward_mask(p[...], sc, r, o)) | (np.asarray(p[...]) == 0))
    assert rel(masked_model(tokens).logits, want) < 1e-6


# ------------------------------------------------------------------------------------------ MACs

def test_step_macs_count_savings_only_along_each_gemms_reduction_axis():
    tiny = dataclasses.replace(CFG, dense_layers=(), moe=dataclasses.replace(CFG.moe, num_shared_experts=0))
    base = step_macs(tiny, None, tokens=10, seq_len=5)
    assert base["implied_speedup"] == 1.0 and base["dense"] == base["sparse"]
    D, hd, ctx = 16, 8, 3.0
    attn = 2 * D * hd * (2 * 2 + 2 * 1) + 2 * 2 * 2 * hd * ctx
    fwd = attn + 2 * 2 * 3 * D * 16 + 2 * D * 4 + D * 260
    assert base["dense"]["forward"] == pytest.approx(10 * fwd)
    for method, act in (("srste", 1.0), ("bdwp", 0.25), ("transposable", 0.25)):
        r = step_macs(tiny, SparsityConfig(n=1, m=4, method=method), tokens=10, seq_len=5)
        ex = r["by_site"]["experts"]
        assert ex["forward"]["sparse"] == pytest.approx(0.25 * ex["forward"]["dense"])
        assert ex["act_grad"]["sparse"] == pytest.approx(act * ex["act_grad"]["dense"])
        assert ex["weight_grad"]["sparse"] == ex["weight_grad"]["dense"]
        assert r["by_site"]["head"]["forward"]["sparse"] == r["by_site"]["head"]["forward"]["dense"]
    # the paper's bound: with two of three GEMMs at 2:8 the ideal is 2x; dense parts keep it below
    assert 1.0 < step_macs(tiny, SparsityConfig(n=2, m=8, method="bdwp"), tokens=1, seq_len=64)["implied_speedup"] < 2.0


# ------------------------------------------------------------------------------------------ training

def test_trainer_logs_the_mask_flip_rate_and_the_config_round_trips(tmp_path):
    from moejax.config import config_from_dict, config_to_dict
    from moejax.train.trainer import Trainer

    tc = TrainConfig(steps=2, seq_len=16, global_batch=2, warmup_steps=1,
                     sparsity=SparsityConfig(n=2, m=4, method="bdwp"))
    assert config_from_dict(TrainConfig, config_to_dict(tc)) == tc
    with pytest.raises(ValueError, match="SparsityConfig.method='bdwp2' is invalid"):
        dataclasses.replace(tc, sparsity=SparsityConfig(method="bdwp2")).validate()
    with pytest.raises(ValueError, match="SparsityConfig.m=8 is invalid: transposable"):
        SparsityConfig(n=2, m=8, method="transposable").validate()
    tr = Trainer(CFG, tc)
    batch = {"tokens": np.random.default_rng(0).integers(0, 256, (2, 17)).astype(np.int32),
             "segment_ids": np.ones((2, 17), np.int32), "positions": np.tile(np.arange(17, dtype=np.int32), (2, 1))}
    rates = [float(tr.train_step(batch)["mask_flip_rate"]) for _ in range(2)]
    assert all(0.0 <= r < 0.5 for r in rates) and max(rates) > 0.0  # lr 3e-3 moves some weights across


def test_a_sparse_checkpoint_loads_and_serves_as_the_sparse_model(tmp_path):
    """Train 2 BDWP 2:4 steps; the checkpoint loads N:M-sparse, its logits equal the training forward (forward
    masks on the dense weights), and the engine serves it as ``generate`` runs it."""
    from moejax.serve.engine import Engine, EngineConfig, SamplingParams
    from moejax.train.checkpoint import load_model
    from moejax.train.trainer import train
    from tests.test_serve_engine import check_against_generate

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        (corpus / f"m{i}.py").write_text(" ".join(rng.choice(["def", "x", "(", ")", ":", "return"], 200)) + "\n")
    sc = SparsityConfig(n=2, m=4, method="bdwp")
    tc = TrainConfig(steps=2, seq_len=16, global_batch=2, warmup_steps=1, eval_every=2, eval_batches=1,
                     ckpt_every=2, val_percent=20.0, sparsity=sc)
    s = train(CFG, tc, str(tmp_path / "run"), corpus=str(corpus), cache_dir=str(tmp_path / "cache"), progress=False)
    model, _, _ = load_model(s["out_dir"])
    dense, _, _ = load_model(s["out_dir"], apply_sparsity=False)
    for p, r, _ in sparse_weights(model, sc):
        assert np.all(_groups(np.asarray(p[...]) != 0, r % p.ndim, 4).sum(-1) <= 2)
    tokens = jnp.asarray(rng.integers(0, 256, (2, 10)), jnp.int32)
    with sparse_training(sc):
        want = dense(tokens).logits
    assert rel(model(tokens).logits, want) < 1e-5
    prompts = [rng.integers(0, 256, n).tolist() for n in (5, 9)]
    res = Engine(model, EngineConfig(record_logits=True, block_size=8)).generate(
        prompts, SamplingParams(max_tokens=6, temperature=0))
    check_against_generate(model, prompts, res, 6)


def test_sparse_expert_parallel_step_equals_one_device():
    """BDWP under the expert-parallel step (shard_map, all_to_all experts, FSDP-free data=2,expert=4): each
    device masks its own experts and the loss and gradients equal one device's."""
    from moejax.parallel.mesh import MeshConfig
    from moejax.train.trainer import Trainer
    from tests.test_parallel_train import compare_sharded_grads, configs

    mesh_cfg = MeshConfig.parse("data=2,expert=4")
    cfg, ref_cfg, tc = configs(RouterConfig(type="topk", top_k=2), mesh_cfg)
    tc = dataclasses.replace(tc, sparsity=SparsityConfig(n=2, m=4, method="bdwp"))
    compare_sharded_grads(Trainer(cfg, tc, mesh_cfg), Trainer(ref_cfg, tc))
