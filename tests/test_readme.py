"""Read-ME: dense -> pre-gated MoE refactor, pre-gate distillation, pre-gated serving with lookahead caching."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax.config import ModelConfig
from moejax.models.transformer import Transformer
from moejax.nn.experts import swiglu
from moejax.offload import pregate as rm
from moejax.offload.pregate import PreGatedRunner
from moejax.offload.runtime import OffloadConfig, OffloadRunner, load_offloaded_model
from moejax.offload.store import ExpertStore, prepare
from moejax.serve.engine import Engine, EngineConfig, SamplingParams


def dense_cfg():
    return ModelConfig(vocab_size=258, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                       max_seq_len=256, moe=None).validate()


@pytest.fixture(scope="module")
def setup():
    per = rm.corpus_domain_tokens()
    dense = Transformer(dense_cfg(), rngs=nnx.Rngs(0))
    imp = rm.neuron_importance(dense, per, seq=64, windows=4)
    moe, info = rm.refactor(dense, imp, keep=0.5)
    toks = np.stack([per[d][:96] for d in range(len(per))]).astype(np.int32)
    gate = rm.PreGate(258, len(per), d=32, window=8, rngs=nnx.Rngs(1))
    stats = rm.train_pregate(gate, toks, rm.distill_targets(dense, moe, toks), steps=40, batch=128)
    return per, dense, imp, moe, info, gate, stats


def test_domains_cover_the_stdlib(setup):
    per = setup[0]
    assert len(per) == len(rm.DOMAIN_NAMES) and all(len(x) > 10_000 for x in per)
    assert rm.domain_of("asyncio/tasks.py") == 1 and rm.domain_of("email/parser.py") == 0
    assert rm.domain_of("json/decoder.py") == 5 and rm.domain_of("this.py") == len(rm.DOMAINS)


def test_refactor_keeps_exactly_the_selected_neurons(setup):
    _, dense, imp, moe, _, _, _ = setup
    E = imp.shape[0]
    assert moe.cfg.moe.num_experts == E and moe.cfg.moe.router.top_k == 1
    # keep=1: every neuron is shared and the MoE equals the dense model exactly
    moe1, info1 = rm.refactor(dense, imp, keep=1.0)
    toks = jnp.asarray(np.arange(40).reshape(2, 20) % 258)
    a = dense(toks).logits
    b = moe1(toks, expert_ids=jnp.zeros((2, 20), jnp.int32)).logits
    assert float(jnp.max(jnp.abs(a - b))) == 0.0 and info1.shared_per_layer == [64, 64]
    # keep=0.5: shared + expert d == the dense FFN restricted to domain d's top neurons, per layer
    y = np.random.default_rng(0).normal(size=(5, 32)).astype(np.float32)
    gd, st = nnx.split(moe.stacks[0])
    dgd, dst = nnx.split(dense.stacks[0])
    for layer in range(2):
        blk = nnx.merge(gd, jax.tree.map(lambda a, i=layer: a[i], st))
        dblk = nnx.merge(dgd, jax.tree.map(lambda a, i=layer: a[i], dst))
        for d in range(E):
            keep = np.argsort(-imp[d, layer])[:32]
            g, u, dn = (np.asarray(dblk.mlp.w_gate[...]), np.asarray(dblk.mlp.w_up[...]),
                        np.asarray(dblk.mlp.w_down[...]))
            want = swiglu(jnp.asarray(y), g[:, keep], u[:, keep], dn[keep])
            wg, wu, wd = blk.moe.experts.weights()
            got = blk.moe.shared(jnp.asarray(y)) + swiglu(jnp.asarray(y), wg[d], wu[d], wd[d])
            np.testing.assert_allclose(got, want, atol=1e-6)


def test_pregate_learns_the_distillation_targets(setup):
    stats = setup[-1]
    assert stats["train_accuracy"] > stats["majority_baseline"], stats


def test_pregated_serving_with_offload_and_belady(setup, tmp_path):
    per, _, _, moe, _, gate, _ = setup
    prompts = [per[d][2000:2000 + n].astype(int).tolist() for d, n in zip(range(4), (11, 25, 7, 30))]
    sp = SamplingParams(max_tokens=5, temperature=0)
    ref = Engine(moe, runner=PreGatedRunner(moe, EngineConfig(record_logits=True, block_size=8), gate)).generate(
        prompts, sp)
    for p, r in zip(prompts, ref):  # teacher-forced against the model run with pre-gated ids
        full = np.array([p + r.tokens[:-1]])
        ids = rm.route_tokens(gate, full)
        lg = np.asarray(moe(jnp.asarray(full), expert_ids=jnp.asarray(ids)).logits[0, len(p) - 1:])
        assert np.abs(lg - r.logits).max() <= 1e-4
    path = prepare(moe, str(tmp_path / "store"))
    store = ExpertStore(path)
    om = load_offloaded_model(store)
    misses = {}
    for policy in ("lru", "lfu", "belady"):
        eng = Engine(om, runner=OffloadRunner(om, EngineConfig(record_logits=True, block_size=8),
                                              OffloadConfig(path, 10 * store.record_bytes, policy=policy),
                                              pregate=gate))
        res = eng.generate(prompts, sp)
        for a, b in zip(res, ref):
            assert a.tokens == b.tokens
            np.testing.assert_allclose(a.logits, b.logits, atol=1e-5, rtol=0)
        misses[policy] = eng.runner.stats.misses
        eng.runner.close()
    assert misses["belady"] <= misses["lru"] and misses["belady"] <= misses["lfu"], misses
    with pytest.raises(ValueError, match="pre-gating"):
        e = Engine(om, runner=OffloadRunner(om, EngineConfig(block_size=8),
                                            OffloadConfig(path, 10 * store.record_bytes, policy="belady")))
        e.generate(prompts[:1], sp)


def test_pregated_serving_with_the_predictive_policy(setup, tmp_path):
    """Predictive eviction (Markov model of the pre-gate's expert sequence from training text + each
    iteration's exact lookahead): same tokens as in memory; it needs a pre-gate and a transition matrix."""
    from moejax.offload.cache import transition_matrix

    per, _, _, moe, _, gate, _ = setup
    E = moe.cfg.moe.num_experts
    P = transition_matrix([rm.route_tokens(gate, d[None, :400].astype(np.int32))[0] for d in per], E)
    prompts = [per[d][2000:2000 + n].astype(int).tolist() for d, n in zip(range(4), (11, 25, 7, 30))]
    sp = SamplingParams(max_tokens=5, temperature=0)
    ref = Engine(moe, runner=PreGatedRunner(moe, EngineConfig(record_logits=True, block_size=8), gate)).generate(
        prompts, sp)
    path = prepare(moe, str(tmp_path / "store"))
    store = ExpertStore(path)
    om = load_offloaded_model(store)
    ocfg = OffloadConfig(path, 10 * store.record_bytes, policy="predictive", transitions=tuple(map(tuple, P)))
    eng = Engine(om, runner=OffloadRunner(om, EngineConfig(record_logits=True, block_size=8), ocfg, pregate=gate))
    learned = 0
    for p in prompts[:2]:  # single stream
        (a,) = eng.generate([p], sp)
        (b,) = [r for q, r in zip(prompts, ref) if q == p]
        assert a.tokens == b.tokens
        # online learning saw each known consecutive pair once: the prompt's and the 4 computed decode tokens'
        learned += len(p) - 1 + sp.max_tokens - 1
        assert eng.runner.cache._counts.sum() == learned
    res = eng.generate(prompts, sp)  # concurrent rows: several current experts
    for a, b in zip(res, ref):
        assert a.tokens == b.tokens
        np.testing.assert_allclose(a.logits, b.logits, atol=1e-5, rtol=0)
    assert eng.runner.stats.hits + eng.runner.stats.misses > 0
    eng.runner.close()
    with pytest.raises(ValueError, match="transitions"):
        OffloadRunner(om, EngineConfig(block_size=8), OffloadConfig(path, 10 * store.record_bytes, policy="predictive"),
                      pregate=gate)
    with pytest.raises(ValueError, match="pre-gating"):
        Engine(om, runner=OffloadRunner(om, EngineConfig(block_size=8), ocfg)).generate(prompts[:1], sp)


def test_refactor_rejects_bad_inputs(setup):
    _, dense, imp, moe, _, _, _ = setup
    with pytest.raises(ValueError, match="keep"):
        rm.refactor(dense, imp, keep=0.0)
    with pytest.raises(ValueError, match="importance shape"):
        rm.refactor(dense, imp[:, :1], keep=0.5)
    with pytest.raises(ValueError, match="dense model"):
        rm.refactor(moe, imp, keep=0.5)
    assert dataclasses.is_dataclass(rm.RefactorInfo)
