"""MTP heads (DeepSeek-V3) and speculative decoding in the engine (issue 22, items 3-4).

References: the dense forward (``Transformer`` + ``mtp_forward``) for the MTP modules and the drafts the engine
computes over its paged KV pages; plain decoding for the speculative engine (greedy: the same tokens, logits
within 1e-4, compared up to the first near tie); the target distribution itself for rejection sampling
(chi-square tests, fixed seeds).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import stats

from moejax.config import ModelConfig, MoEConfig, RouterConfig, TrainConfig
from moejax.models.generate import generate
from moejax.models.transformer import Transformer
from moejax.serve.engine import Engine, EngineConfig, SamplingParams
from moejax.serve.runner import ModelRunner
from moejax.serve.scheduler import SchedulerConfig
from moejax.serve.speculative import target_logprobs, verify

LOGIT_TOL = 1e-4
NEAR_TIE = 1e-3
P_MIN = 1e-3  # chi-square p-value below which a distribution is rejected (fixed seeds: deterministic)


def mtp_cfg(**kw):
    base = ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, max_seq_len=128,
                       moe=MoEConfig(num_experts=8, d_ff=24, router=RouterConfig(type="topk", top_k=2)),
                       mtp_depth=2)
    return dataclasses.replace(base, **kw).validate()


@pytest.fixture(scope="module")
def model():
    return Transformer(mtp_cfg(), rngs=nnx.Rngs(3))


def ecfg(**kw):
    base = EngineConfig(sched=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, max_prefill_seqs=2),
                        block_size=8, kv_block=32, max_model_len=96, record_logits=True, speculative="mtp",
                        num_speculative_tokens=2)
    return dataclasses.replace(base, **kw)


def prompts_of(n, seed=0, lo=3, hi=30, vocab=97):
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(0, vocab, int(rng.integers(lo, hi)))] for _ in range(n)]


# ------------------------------------------------------------------------------------------------ model / training

def test_mtp_heads_do_not_change_the_main_model():
    """Adding MTP heads leaves the main model's initialization and forward unchanged (they are initialized last)."""
    a = Transformer(mtp_cfg(mtp_depth=0), rngs=nnx.Rngs(0))
    b = Transformer(mtp_cfg(mtp_depth=2), rngs=nnx.Rngs(0))
    toks = jnp.asarray(prompts_of(1, lo=12, hi=13))
    np.testing.assert_array_equal(np.asarray(a(toks).logits), np.asarray(b(toks).logits))
    assert len(b.mtp) == 2 and not hasattr(a, "mtp")


def test_mtp_forward_is_causal_and_uses_the_token_k_ahead(model):
    """Module k at position i sees tokens up to i + k only: changing token i + k + 1 leaves positions <= i."""
    toks = jnp.asarray(prompts_of(1, seed=1, lo=16, hi=17))
    S = toks.shape[1]
    pos = jnp.arange(S)[None]
    h = model(toks, return_hidden=True).logits
    ref = [np.asarray(model.mtp_logits(k, x)) for k, (x, _) in enumerate(model.mtp_forward(h, toks, pos))]
    toks2 = toks.at[0, 10].set((toks[0, 10] + 1) % 97)
    h2 = model(toks2, return_hidden=True).logits
    out = [np.asarray(model.mtp_logits(k, x)) for k, (x, _) in enumerate(model.mtp_forward(h2, toks2, pos))]
    for k in range(2):  # module k+1 at i uses token i + k + 1: positions i < 10 - (k + 1) are unchanged
        keep = 10 - (k + 1)
        np.testing.assert_allclose(out[k][0, :keep], ref[k][0, :keep], rtol=0, atol=1e-6)
        assert np.abs(out[k][0, keep] - ref[k][0, keep]).max() > 1e-6


def test_mtp_objective_and_frozen_base(tmp_path):
    """objective='mtp' adds the per-depth losses with weight mtp_weight / K; train_only='mtp' moves only the MTP
    modules; init_from copies a trained run's weights into a model with new heads."""
    from moejax.train.objectives import get_objective, split_batch, token_ce
    from moejax.train.trainer import Trainer

    cfg = mtp_cfg(vocab_size=264)
    rng = np.random.default_rng(0)
    batch = {"tokens": rng.integers(0, 256, (2, 17)).astype(np.int32),
             "segment_ids": np.repeat(np.asarray([[1] * 9 + [2] * 8]), 2, 0).astype(np.int32),
             "positions": np.repeat(np.asarray([list(range(9)) + list(range(8))]), 2, 0).astype(np.int32)}
    m = Transformer(cfg, rngs=nnx.Rngs(0))
    tc = TrainConfig(objective="mtp", mtp_weight=0.5)
    res = get_objective("mtp")(m, batch, tc=tc)
    assert set(res.terms) == {"ce", "mtp_ce_1", "mtp_ce_2"}
    # depth 2 at position i predicts token i + 3 of the same document: 2 rows x (6 + 5) targets
    assert int(res.terms["mtp_ce_2"][1]) == 2 * (6 + 5)
    assert res.terms["mtp_ce_1"][2] == pytest.approx(0.25)
    inp, tgt = split_batch(batch)
    ref = token_ce(m(inp["tokens"], segment_ids=inp["segment_ids"], positions=inp["positions"]).logits, tgt)
    np.testing.assert_allclose(res.terms["ce"][0], ref[0], rtol=1e-5)

    t = Trainer(cfg, TrainConfig(steps=4, seq_len=16, global_batch=2, objective="mtp", train_only="mtp",
                                 warmup_steps=1))
    before = jax.tree.map(np.asarray, t.params)
    for _ in range(2):
        t.train_step(batch)
    moved = {jax.tree_util.keystr(p): bool(np.any(np.asarray(a) != np.asarray(b)))
             for (p, a), b in zip(jax.tree_util.tree_leaves_with_path(before), jax.tree.leaves(t.params))}
    assert all(v for k, v in moved.items() if "'mtp'" in k)
    assert not any(v for k, v in moved.items() if "'mtp'" not in k)
    with pytest.raises(ValueError, match="needs objective='mtp'"):
        Trainer(cfg, TrainConfig(seq_len=16, train_only="mtp"))
    with pytest.raises(ValueError, match="mtp_depth"):
        Trainer(mtp_cfg(vocab_size=264, mtp_depth=0), TrainConfig(seq_len=16, objective="mtp"))


def test_train_mtp_checkpoint_init_from_and_export(tmp_path):
    """`train --mtp` checkpoints the heads with the model; a frozen-base run starts from a plain run's weights;
    HF export drops the heads with a warning."""
    from moejax.models.hf import save_hf
    from moejax.train.checkpoint import load_model
    from moejax.train.trainer import train

    corpus = tmp_path / "c.txt"
    corpus.write_text("def f(x):\n    return x + 1\n" * 400)
    base_cfg = mtp_cfg(vocab_size=264, mtp_depth=0)
    tc = TrainConfig(steps=2, seq_len=32, global_batch=2, eval_every=10**6, eval_batches=1, ckpt_every=10**6,
                     log_every=1)
    train(base_cfg, tc, str(tmp_path / "base"), corpus=str(corpus), progress=False)
    base, _, _ = load_model(str(tmp_path / "base"))
    cfg = mtp_cfg(vocab_size=264, mtp_depth=1)
    tc2 = dataclasses.replace(tc, objective="mtp", train_only="mtp")
    train(cfg, tc2, str(tmp_path / "heads"), corpus=str(corpus), progress=False, init_from=str(tmp_path / "base"))
    heads, hcfg, _ = load_model(str(tmp_path / "heads"))
    assert hcfg.mtp_depth == 1 and len(heads.mtp) == 1
    toks = jnp.asarray(prompts_of(1, lo=20, hi=21, vocab=256))
    np.testing.assert_array_equal(np.asarray(heads(toks).logits), np.asarray(base(toks).logits))  # frozen
    with pytest.warns(UserWarning, match="MTP head"):
        save_hf(heads, hcfg, tmp_path / "hf")
    with pytest.raises(ValueError, match="differs"):
        train(mtp_cfg(vocab_size=264, mtp_depth=1, d_ff=64), tc2, str(tmp_path / "bad"), corpus=str(corpus),
              progress=False, init_from=str(tmp_path / "base"))
    assert not (tmp_path / "bad" / "checkpoints").exists() or not any((tmp_path / "bad" / "checkpoints").iterdir())


# ------------------------------------------------------------------------------------------------ acceptance

def test_verify_greedy():
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(3, 4, 11)), jnp.float32)
    g = np.asarray(jnp.argmax(logits, -1))
    drafts = np.stack([g[0, :3], [g[1, 0], g[1, 1], (g[1, 2] + 1) % 11], [(g[2, 0] + 1) % 11, g[2, 1], g[2, 2]]])
    keys = jnp.zeros((3, 2), jnp.uint32)
    toks, acc = verify(logits, jnp.asarray(drafts, jnp.int32), keys, jnp.zeros(3), jnp.ones(3))
    np.testing.assert_array_equal(np.asarray(acc), [3, 2, 0])
    np.testing.assert_array_equal(np.asarray(toks), g)  # greedy: always the target's argmax up to the emitted ones


@pytest.mark.parametrize(("temperature", "top_p"), [(1.0, 1.0), (0.7, 0.8)])
def test_rejection_sampling_preserves_the_target_distribution(temperature, top_p):
    """Drafts fixed (one likely, one unlikely token): the first emitted token is distributed as the target at
    position 0, and the second, given that the first draft was accepted, as the target at position 1."""
    V, N = 6, 40000
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(size=(1, 3, V)) * 1.5, jnp.float32)
    p = np.exp(np.asarray(target_logprobs(logits, jnp.asarray([temperature]), jnp.asarray([top_p]))))[0]
    for drafts in ([int(np.argmax(p[0])), int(np.argmin(p[1]))], [int(np.argsort(p[0])[-2]), 2]):
        keys = jnp.stack([jnp.arange(N, dtype=jnp.uint32), jnp.full((N,), 7, jnp.uint32)], axis=1)
        d = jnp.asarray(drafts, jnp.int32)
        f = jax.jit(jax.vmap(lambda k, d=d: verify(logits, d[None], k[None], jnp.asarray([temperature]),
                                                    jnp.asarray([top_p]))))
        toks, acc = (np.asarray(a) for a in f(keys))
        first = toks[:, 0, 0]
        second = toks[acc[:, 0] >= 1, 0, 1]
        for got, want in ((first, p[0]), (second, p[1])):
            keep = want > 0
            assert np.all(np.isin(got, np.flatnonzero(keep)))  # nothing outside the top-p set
            counts = np.bincount(got, minlength=V)[keep]
            w = want[keep].astype(np.float64)
            assert stats.chisquare(counts, w / w.sum() * counts.sum()).pvalue > P_MIN


# ------------------------------------------------------------------------------------------------ engine

def check_same(ref, out):
    """Tokens equal up to the first near tie of the reference; logits within LOGIT_TOL there."""
    for a, b in zip(ref, out, strict=True):
        top2 = np.sort(a.logits, axis=-1)[:, -2:]
        margin = top2[:, 1] - top2[:, 0]
        n = min(len(a.tokens), int(np.argmax(margin < NEAR_TIE)) + 1 if (margin < NEAR_TIE).any() else len(a.tokens))
        assert b.tokens[:n] == a.tokens[:n]
        assert np.abs(np.asarray(b.logits[:n]) - np.asarray(a.logits[:n])).max() <= LOGIT_TOL
        assert (a.finish_reason == b.finish_reason) or n < len(a.tokens)


class OracleRunner(ModelRunner):
    """Replaces the MTP drafts with the known plain continuation, each draft kept right with probability 0.7
    (else a wrong token): long accepted runs and rejections at every index, deterministic."""

    def __init__(self, model, cfg, plain: dict):
        super().__init__(model, cfg)
        self.plain, self.rng = plain, np.random.default_rng(0)

    def pack_speculative(self, plan, k):
        dec, pf, spf = super().pack_speculative(plan, k)
        for i, r in enumerate(plan.decode):
            full = self.plain[tuple(r.prompt)]
            n = len(r.output)
            for j in range(k):
                tok = full[n + j] if n + j < len(full) else 0
                dec.tokens[i, 1 + j] = tok if self.rng.random() < 0.7 else (tok + 1) % self.mcfg.vocab_size
        return dec, pf, spf


@pytest.mark.parametrize("k", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_speculative_greedy_equals_plain(model, k):
    """Concurrent requests (prefill beside verification), K = 1 and 2, the model's own drafts: the same tokens
    and logits as plain decoding; a single request too."""
    prompts = prompts_of(5, seed=2)
    sp = SamplingParams(max_tokens=10, temperature=0)
    ref = Engine(model, ecfg(speculative=None)).generate(prompts, sp)
    eng = Engine(model, ecfg(num_speculative_tokens=k))
    check_same(ref, eng.generate(prompts, sp))
    m = eng.metrics()
    assert m["spec_draft_tokens"] > 0 and 1 <= m["spec_mean_accepted_length"] <= 1 + k
    check_same(ref[:1], Engine(model, ecfg(num_speculative_tokens=k)).generate(prompts[:1], sp))


def test_speculative_accepted_runs_stop_and_max_tokens(model):
    """With drafts that are mostly right (oracle), accepted runs are long; a stop token and max_tokens inside an
    accepted run end the request there, exactly as plain decoding; acceptance reaches /metrics."""
    prompts = prompts_of(4, seed=3)
    sp = SamplingParams(max_tokens=14, temperature=0)
    ref = Engine(model, ecfg(speculative=None)).generate(prompts, sp)
    plain = {tuple(p): r.tokens for p, r in zip(prompts, ref)}
    stop = ref[0].tokens[5]  # a stop id that appears mid-generation of request 0
    params = [SamplingParams(max_tokens=14, temperature=0, stop_token_ids=(stop,)),
              SamplingParams(max_tokens=7, temperature=0), sp, SamplingParams(max_tokens=1, temperature=0)]
    ref2 = Engine(model, ecfg(speculative=None)).generate(prompts, params)
    cfg = ecfg(num_speculative_tokens=2)
    eng = Engine(model, runner=OracleRunner(model, cfg, plain))
    out = eng.generate(prompts, params)
    check_same(ref2, out)
    assert out[0].finish_reason == "stop" and out[0].tokens[-1] == stop
    assert len(out[1].tokens) == 7 and out[1].finish_reason == "length"
    m = eng.metrics()
    assert m["spec_acceptance_rate"] > 0.3 and m["spec_mean_accepted_length"] > 1.5
    text = eng.prom.render().decode()
    assert "moejax_spec_decode_num_accepted_tokens_total" in text


def test_speculative_switches_off_above_max_batch(model):
    """Above speculative_max_batch the engine runs plain steps; output unchanged."""
    prompts = prompts_of(4, seed=4)
    sp = SamplingParams(max_tokens=8, temperature=0)
    ref = Engine(model, ecfg(speculative=None)).generate(prompts, sp)
    eng = Engine(model, ecfg(speculative_max_batch=2))
    check_same(ref, eng.generate(prompts, sp))
    its = eng.iterations
    assert any(i.spec_rows == 0 and i.decode_tokens > 2 for i in its)  # plain decode of > 2 rows
    assert all(i.spec_rows <= 2 for i in its)


def test_mtp_drafts_match_the_dense_reference(model):
    """K = 1: every step's draft is the argmax of MTP module 1 over the dense forward of the verified sequence
    (the engine's MTP KV pages are exact); skipped at near ties."""
    eng = Engine(model, ecfg(num_speculative_tokens=1, record_logits=False))
    prompt = prompts_of(1, seed=5, lo=20, hi=21)[0]
    eng.add_request(prompt, SamplingParams(max_tokens=12, temperature=0))
    W = 48  # the reference runs on sequences zero-padded at the end to one length (causal: padding is invisible)

    @jax.jit
    def ref_logits(toks, n):
        pos = jnp.arange(W)[None]
        h = model(toks, return_hidden=True).logits
        (x, _), = model.mtp_forward(h, toks, pos)[:1]
        return model.mtp_logits(0, x[0, n - 2])

    checked = 0
    while eng.has_unfinished():
        eng.step()
        for req in list(eng.scheduler.running):
            toks = np.zeros((1, W), np.int32)
            toks[0, :req.num_tokens] = req.tokens
            lg = np.asarray(ref_logits(jnp.asarray(toks), req.num_tokens))
            top2 = np.sort(lg)[-2:]
            if top2[1] - top2[0] > NEAR_TIE and req.draft_at == req.num_tokens:
                assert req.draft[0] == int(np.argmax(lg))
                checked += 1
    assert checked >= 5


def test_speculative_sampling_distribution_in_the_engine():
    """A small-vocabulary model (V = 8), temperature 1, 600 requests of 3 tokens with K = 2: the second and third
    tokens' marginals match the dense model's exact ones (chi-square)."""
    cfg = mtp_cfg(vocab_size=8, d_model=16, n_heads=2, n_kv_heads=1, moe=None, d_ff=16)
    m = Transformer(cfg, rngs=nnx.Rngs(1))
    prompt = [1, 5, 2, 7]
    N = 600
    eng = Engine(m, ecfg(sched=SchedulerConfig(max_num_seqs=256, max_num_batched_tokens=1024, max_prefill_seqs=256),
                         record_logits=False))
    out = eng.generate([prompt] * N, [SamplingParams(max_tokens=3, temperature=1.0, seed=s) for s in range(N)])
    toks = np.asarray([o.tokens for o in out])
    assert eng.metrics()["spec_accepted_tokens"] > 0
    # exact marginals by enumerating the first tokens through the dense model
    p1 = np.asarray(jax.nn.softmax(m(jnp.asarray([prompt])).logits[0, -1]))
    seqs = jnp.asarray([prompt + [a] for a in range(8)])
    p2c = np.asarray(jax.nn.softmax(m(seqs).logits[:, -1], -1))  # [a, b]
    seqs3 = jnp.asarray([prompt + [a, b] for a in range(8) for b in range(8)])
    p3c = np.asarray(jax.nn.softmax(m(seqs3).logits[:, -1], -1)).reshape(8, 8, 8)
    want2 = p1 @ p2c
    want3 = np.einsum("a,ab,abc->c", p1, p2c, p3c)
    for got, want in ((toks[:, 1], want2), (toks[:, 2], want3)):
        counts = np.bincount(got, minlength=8)
        w = want.astype(np.float64)
        assert stats.chisquare(counts, w / w.sum() * N).pvalue > P_MIN


def test_speculative_config_errors(model):
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        Engine(model, ecfg(num_speculative_tokens=3))
    with pytest.raises(ValueError, match="scheduler='chunked'"):
        Engine(model, ecfg(scheduler="layered"))
    with pytest.raises(ValueError, match="decode_steps"):
        Engine(model, ecfg(decode_steps=2))
    with pytest.raises(ValueError, match="MTP heads"):
        Engine(Transformer(mtp_cfg(mtp_depth=0), rngs=nnx.Rngs(0)), ecfg(num_speculative_tokens=1))
    with pytest.raises(ValueError, match="speculative="):
        Engine(model, ecfg(speculative="eagle"))


def test_speculative_warmup_compiles_every_shape(model):
    """Warm-up compiles the speculative steps too: serving afterwards compiles nothing new."""
    eng = Engine(model, ecfg(num_speculative_tokens=1, record_logits=False))
    shapes = eng.warmup_shapes(max_prompt_tokens=16)
    assert any(len(k) > 2 and k[2] == ("spec", 1) for k in shapes)
    eng.warmup(shapes)
    before = set(eng.runner.compiled_shapes)
    eng.generate(prompts_of(3, seed=6, hi=16), SamplingParams(max_tokens=5, temperature=0))
    assert eng.runner.compiled_shapes == before


def test_generate_reference_sanity(model):
    """The engine's plain path used as the reference here agrees with sequential generate."""
    p = prompts_of(1, seed=7)[0]
    r = Engine(model, ecfg(speculative=None)).generate([p], SamplingParams(max_tokens=6, temperature=0))[0]
    g = generate(model, [p], 6, return_logits=True)
    assert np.abs(np.asarray(g.logits[0]) - r.logits).max() <= LOGIT_TOL
