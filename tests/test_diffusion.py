"""Masked-diffusion LMs (issue 25, items 1-2): bidirectional attention, the ``mdm`` objective, its ELBO evaluation,
and the sampler (low-confidence remasking, prefix/dual KV caches, logit budgeting).

References: a direct computation of LLaDA's loss; the model's own full forward for the cached forwards; a plain
loop over full-canvas logits (LLaDA's ``generate``) for the sampler; full logits for logit budgeting.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax.config import MASK, ModelConfig, MoEConfig, RouterConfig, TrainConfig
from moejax.diffusion.sampler import (
    DiffusionSampler,
    SamplerConfig,
    pick_tokens,
    row_keys,
    select_positions,
    transfer_counts,
)
from moejax.models.transformer import Transformer

V = 264


def dcfg(**kw):
    base = ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, max_seq_len=128,
                       moe=MoEConfig(num_experts=4, d_ff=24, router=RouterConfig(type="topk", top_k=2)),
                       causal=False, init_std=0.3)
    return dataclasses.replace(base, **kw).validate()


@pytest.fixture(scope="module")
def model():
    return Transformer(dcfg(), rngs=nnx.Rngs(0))


def batch_of(B=2, S=17, seed=0):
    rng = np.random.default_rng(seed)
    return {"tokens": rng.integers(0, 256, (B, S)).astype(np.int32),
            "segment_ids": np.repeat(np.asarray([[1] * 9 + [2] * (S - 9)]), B, 0).astype(np.int32),
            "positions": np.repeat(np.asarray([list(range(9)) + list(range(S - 9))]), B, 0).astype(np.int32)}


# ------------------------------------------------------------------------------------------------ model / objective

def test_bidirectional_attention_within_segments(model):
    """causal=False: an earlier position sees a later token of its segment, never one of another segment."""
    b = batch_of(B=1, S=16)
    toks, seg, pos = (jnp.asarray(b[k][:, :16]) for k in ("tokens", "segment_ids", "positions"))
    base = np.asarray(model(toks, segment_ids=seg, positions=pos).logits)
    later = np.asarray(model(toks.at[0, 7].set(5), segment_ids=seg, positions=pos).logits)  # segment 1 ends at 8
    assert np.abs(later[0, 0] - base[0, 0]).max() > 1e-4          # position 0 sees position 7
    np.testing.assert_array_equal(later[0, 9:], base[0, 9:])      # segment 2 does not
    causal = Transformer(dataclasses.replace(dcfg(), causal=True), rngs=nnx.Rngs(0))
    c0 = np.asarray(causal(toks, segment_ids=seg, positions=pos).logits)
    c1 = np.asarray(causal(toks.at[0, 7].set(5), segment_ids=seg, positions=pos).logits)
    np.testing.assert_array_equal(c1[0, :7], c0[0, :7])


def test_mdm_loss_equals_a_direct_computation(model):
    """The objective's term: sum over masked tokens of CE / t (t per sequence), over the non-pad token count."""
    from moejax.train.objectives import MDM_SALT, get_objective, mdm_noise

    b = batch_of(B=3, S=17)
    b["tokens"][2, 12:] = 257  # PAD: never masked, not counted
    key = jax.random.PRNGKey(5)
    res = get_objective("mdm")(model, b, rng=key, tc=TrainConfig(objective="mdm"))
    total, count, w = res.terms["ce"]
    tok = b["tokens"][:, :16]
    t, masked = mdm_noise(jax.random.fold_in(key, MDM_SALT), jnp.arange(3), 16, 1e-3)
    t, masked = np.asarray(t), np.asarray(masked) & (tok != 257)
    assert np.all((t > 1e-3) & (t <= 1.0)) and masked.any()
    noisy = np.where(masked, MASK, tok)
    logits = np.asarray(model(jnp.asarray(noisy), segment_ids=jnp.asarray(b["segment_ids"][:, :16]),
                              positions=jnp.asarray(b["positions"][:, :16])).logits, np.float64)
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    ce = lse - np.take_along_axis(logits, tok[..., None], -1)[..., 0]
    ref = float((ce * masked / t[:, None]).sum())
    assert int(count) == int((tok != 257).sum()) and w == 1.0
    np.testing.assert_allclose(float(total), ref, rtol=1e-5)


def test_mdm_masks_depend_on_the_row_not_the_shard():
    """A sequence's masking draw depends on the key and its global row only: a batch split in two (shards,
    micro-batches) masks each row as the whole batch does."""
    from moejax.train.objectives import mdm_noise

    key = jax.random.PRNGKey(1)
    t, m = mdm_noise(key, jnp.arange(6), 32, 1e-3)
    t2, m2 = mdm_noise(key, jnp.arange(3, 6), 32, 1e-3)
    np.testing.assert_array_equal(np.asarray(t[3:]), np.asarray(t2))
    np.testing.assert_array_equal(np.asarray(m[3:]), np.asarray(m2))
    # the masked share follows t
    t, m = mdm_noise(key, jnp.arange(2000), 256, 1e-3)
    np.testing.assert_allclose(np.asarray(m).mean(1), np.asarray(t), atol=0.12)


def test_objective_and_model_must_agree():
    from moejax.train.trainer import Trainer

    with pytest.raises(ValueError, match="causal"):
        Trainer(dcfg(), TrainConfig(seq_len=16))
    with pytest.raises(ValueError, match="causal"):
        Trainer(dataclasses.replace(dcfg(), causal=True), TrainConfig(seq_len=16, objective="mdm"))
    with pytest.raises(ValueError, match="mask_token_id"):
        dcfg(vocab_size=258)
    with pytest.raises(ValueError, match="mtp_depth"):
        dcfg(mtp_depth=1)


def test_train_eval_and_autoregressive_paths_refuse(tmp_path, model):
    """`train` with objective mdm runs and checkpoints; validation is the ELBO (deterministic, near the training
    loss scale); generate, the serving engine and HF export refuse a diffusion model with a clear error."""
    from moejax.models.generate import generate
    from moejax.models.hf import save_hf
    from moejax.serve.engine import EngineConfig
    from moejax.serve.runner import ModelRunner
    from moejax.train.trainer import evaluate_checkpoint, train

    corpus = tmp_path / "c.txt"
    corpus.write_text("def f(x):\n    return x + 1\n" * 400)
    tc = TrainConfig(steps=3, seq_len=32, global_batch=2, eval_every=10**6, eval_batches=1, ckpt_every=10**6,
                     log_every=1, objective="mdm")
    s = train(dcfg(init_std=0.02), tc, str(tmp_path / "run"), corpus=str(corpus), progress=False)
    assert np.isfinite(s["val_bits_per_byte"]) and s["val_bits_per_byte"] > 0
    r1 = evaluate_checkpoint(str(tmp_path / "run"), max_batches=1)
    r2 = evaluate_checkpoint(str(tmp_path / "run"), max_batches=1)
    assert r1["val_bits_per_byte"] == r2["val_bits_per_byte"]
    with pytest.raises(ValueError, match="diffusion"):
        generate(model, [[1, 2]], 4)
    with pytest.raises(ValueError, match="diffusion"):
        ModelRunner(model, EngineConfig())
    with pytest.raises(ValueError, match="diffusion"):
        save_hf(model, model.cfg, tmp_path / "hf")


# ------------------------------------------------------------------------------------------------ sampler

def test_transfer_counts_and_selection():
    np.testing.assert_array_equal(transfer_counts(np.array([10, 3, 0]), 4),
                                  [[3, 3, 2, 2], [1, 1, 1, 0], [0, 0, 0, 0]])
    conf = jnp.asarray([[0.1, 0.9, 0.5, 0.9], [0.3, 0.2, 0.1, 0.0]])
    masked = jnp.asarray([[True, True, True, False], [True, True, True, True]])
    sel = np.asarray(select_positions(conf, masked, jnp.asarray([2, 1])))
    np.testing.assert_array_equal(sel, [[False, True, True, False], [True, False, False, False]])


@pytest.mark.parametrize("greedy", [True, False])
def test_logit_budgeting_equals_full_logits(model, greedy):
    """Chunked head + (token, confidence) reduction equals the argmax and softmax of the full logits."""
    h = jax.random.normal(jax.random.PRNGKey(0), (37, 32))
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(1), i))(jnp.arange(37))
    tok, conf = pick_tokens(model.head, h, keys, 0.7, greedy=greedy, chunk=8)
    full, fconf = pick_tokens(model.head, h, keys, 0.7, greedy=greedy, chunk=1024)
    logits = np.asarray(model.head(h), np.float64)
    if greedy:
        ref = logits.argmax(-1)
        np.testing.assert_array_equal(np.asarray(tok), ref)
    np.testing.assert_array_equal(np.asarray(tok), np.asarray(full))
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(conf), p[np.arange(37), np.asarray(tok)], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(conf), np.asarray(fconf), rtol=1e-6)


def reference_generate(model, prompt_rows, sc: SamplerConfig):
    """LLaDA's generate (greedy, low-confidence remasking) over full-canvas logits, one row at a time."""
    out = []
    fwd = jax.jit(lambda x: model(x).logits)
    for p in prompt_rows:
        x = np.asarray(list(p) + [MASK] * sc.gen_length, np.int32)
        P = len(p)
        for blk in range(sc.num_blocks):
            s0 = P + blk * sc.block_length
            counts = transfer_counts(np.asarray([(x[s0:s0 + sc.block_length] == MASK).sum()]), sc.steps_per_block)[0]
            for k in counts:
                logits = np.asarray(fwd(jnp.asarray(x[None])), np.float64)[0, s0:s0 + sc.block_length]
                x0 = logits.argmax(-1)
                p_ = np.exp(logits - logits.max(-1, keepdims=True))
                conf = (p_ / p_.sum(-1, keepdims=True))[np.arange(len(x0)), x0]
                blk_x = x[s0:s0 + sc.block_length]
                conf = np.where(blk_x == MASK, conf, -np.inf)
                order = np.argsort(-conf, kind="stable")[:k]
                blk_x[order] = x0[order]
        out.append(x[P:])
    return np.stack(out)


def test_sampler_without_cache_equals_the_reference_loop(model):
    sc = SamplerConfig(gen_length=16, block_length=8, steps=8, cache="none")
    prompts = [[3, 50, 7, 9, 100, 4, 8, 1], [60, 61, 62, 63, 64, 65, 66, 67]]
    res = DiffusionSampler(model).generate(prompts, sc, prompt_bucket=8)
    assert res.nfe == 8 and res.refreshes == 8
    np.testing.assert_array_equal(res.tokens, reference_generate(model, prompts, sc))
    assert not (res.tokens == MASK).any()


@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_cached_forward_equals_full_forward_after_a_refresh(model, mode):
    """Right after a refresh (nothing changed), the reuse forward over the cache gives the full forward's hidden
    states on the block: the cache holds exactly the full forward's keys/values."""
    x = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 24)), jnp.int32).at[:, 8:].set(MASK)
    full = model(x, return_hidden=True).logits
    out = model(x, cache=model.init_cache(2, 24), cache_index=0, return_hidden=True)
    np.testing.assert_allclose(np.asarray(out.logits), np.asarray(full), rtol=1e-5, atol=1e-5)
    start, stop = 8, (16 if mode == "dual" else 24)
    part = model(x[:, start:stop], positions=jnp.broadcast_to(jnp.arange(start, stop), (2, stop - start)),
                 cache=out.cache, cache_index=start, return_hidden=True).logits
    np.testing.assert_allclose(np.asarray(part), np.asarray(full[:, start:stop]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_cached_sampler_with_refresh_only_steps_equals_no_cache(model, mode):
    """With one step per block every step is a refresh: the cached sampler equals the uncached one exactly; with
    more steps it runs (reuse steps approximate) and leaves no mask."""
    prompts = [[3, 50, 7, 9, 100, 4, 8, 1], [60, 61, 62, 63, 64, 65, 66, 67]]
    s = DiffusionSampler(model)
    one = {"gen_length": 16, "block_length": 8, "steps": 2}
    a = s.generate(prompts, SamplerConfig(**one, cache="none"), prompt_bucket=8)
    b = s.generate(prompts, SamplerConfig(**one, cache=mode), prompt_bucket=8)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    c = s.generate(prompts, SamplerConfig(gen_length=16, block_length=8, steps=8, cache=mode), prompt_bucket=8)
    assert c.refreshes == 2 and c.nfe == 8 and not (c.tokens == MASK).any()


def test_rows_are_independent_of_the_batch(model):
    """Per-row keys: a row sampled with temperature gives the same tokens alone as in a batch."""
    sc = SamplerConfig(gen_length=16, block_length=8, steps=8, temperature=1.0, cache="dual")
    prompts = [[3, 50, 7, 9, 100, 4, 8, 1], [60, 61, 62, 63, 64, 65, 66, 67], [1, 2, 3, 4, 5, 6, 7, 8]]
    s = DiffusionSampler(model)
    both = s.generate(prompts, sc, seed=[11, 12, 13], prompt_bucket=8)
    alone = s.generate(prompts[1:2], sc, seed=[12], prompt_bucket=8)
    np.testing.assert_array_equal(both.tokens[1], alone.tokens[0])
    again = s.generate(prompts, sc, seed=[11, 12, 13], prompt_bucket=8)
    np.testing.assert_array_equal(both.tokens, again.tokens)
    other = s.generate(prompts, sc, seed=[21, 22, 23], prompt_bucket=8)
    assert (other.tokens != both.tokens).any()
    assert row_keys(0, 3).shape[0] == 3


def test_sampler_config_errors(model):
    with pytest.raises(ValueError, match="gen_length"):
        SamplerConfig(gen_length=20, block_length=8).validate()
    with pytest.raises(ValueError, match="steps"):
        SamplerConfig(gen_length=16, block_length=8, steps=3).validate()
    with pytest.raises(ValueError, match="steps"):
        SamplerConfig(gen_length=16, block_length=8, steps=32).validate()
    with pytest.raises(ValueError, match="cache"):
        SamplerConfig(cache="both").validate()
    with pytest.raises(ValueError, match="remasking"):
        SamplerConfig(remasking="top").validate()
    with pytest.raises(ValueError, match="causal"):
        DiffusionSampler(Transformer(dataclasses.replace(dcfg(), causal=True), rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="vocabulary"):
        DiffusionSampler(model).generate([[V + 1]], SamplerConfig(gen_length=8, block_length=8, steps=8))


def test_cli_train_generate_eval_a_diffusion_lm(tmp_path, capsys):
    """`train --objective mdm`, then `generate --ckpt` (the sampler) and `eval --ckpt --infill` (ELBO and infill
    accuracy); a generation length that is not a multiple of the block exits with the flags named."""
    import json

    from moejax.cli import main

    cfg = {"vocab_size": V, "d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "d_ff": 48,
           "max_seq_len": 128, "moe": {"num_experts": 4, "d_ff": 24}}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    corpus = tmp_path / "c.txt"
    corpus.write_text("def f(x):\n    return x + 1\n" * 400)
    out = str(tmp_path / "run")
    assert main(["train", "--config", str(tmp_path / "cfg.json"), "--objective", "mdm", "--steps", "2", "--seq-len",
                 "64", "--batch", "2", "--corpus", str(corpus), "--out", out, "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["generate", "--ckpt", out, "--prompt", "def f", "--max-new-tokens", "16", "--block-length", "8",
                 "--greedy"]) == 0
    o = capsys.readouterr()
    assert "16 denoising steps" in o.err and len(o.out.strip().splitlines()[-1].split(",")) == 16
    with pytest.raises(SystemExit, match="block_length"):
        main(["generate", "--ckpt", out, "--prompt", "def f", "--max-new-tokens", "12", "--block-length", "8"])
    assert main(["eval", "--ckpt", out, "--max-batches", "1", "--infill", "2", "--infill-span", "8",
                 "--infill-window", "64"]) == 0
    o = capsys.readouterr().out
    assert "ELBO bits/byte" in o and "infill accuracy" in o and "over 16 masked tokens" in o


# ------------------------------------------------------------------------------------------------ engine

PROMPTS = [[3, 50, 7, 9, 100, 4, 8, 1], [60, 61, 62, 63, 64, 65, 66, 67, 5, 5, 5], [1, 2, 3], [9] * 20]


def sampler_alone(model, prompt, seed, temperature, gen=16, block=8, steps_per_block=4):
    sc = SamplerConfig(gen_length=gen, block_length=block, steps=gen // block * steps_per_block, cache="dual", temperature=temperature)
    return DiffusionSampler(model).generate([prompt], sc, seed=[seed], prompt_bucket=1).tokens[0].tolist()


@pytest.mark.parametrize("scheduler,temperature,budget", [("phase", 0.0, 40), ("phase", 1.0, 4096),
                                                          ("static", 0.0, 4096)])
def test_engine_equals_the_sampler_alone(model, scheduler, temperature, budget):
    """Concurrent requests (phases mixed by a small token budget, or lockstep batches) give each request the
    tokens the dual-cache sampler gives it alone with the same seed."""
    from moejax.diffusion.engine import DiffusionEngine, DiffusionEngineConfig
    from moejax.serve.engine import SamplingParams

    eng = DiffusionEngine(model, DiffusionEngineConfig(block_length=8, steps_per_block=4, block_size=8,
                                                       max_num_seqs=3, token_budget=budget, scheduler=scheduler))
    seeds = [11, 12, 13, 14]
    res = eng.generate(PROMPTS, [SamplingParams(max_tokens=16, temperature=temperature, seed=s) for s in seeds])
    for p, (toks, why), s in zip(PROMPTS, res, seeds):
        assert why == "length"
        assert toks == sampler_alone(model, p, s, temperature)
    phases = [(it["refresh"] > 0, it["reuse"] > 0) for it in eng.iterations]
    if scheduler == "phase" and budget == 40:
        assert (True, True) in phases  # refresh and reuse steps of different requests in one iteration
    if scheduler == "static":  # lockstep: the 4th request waits for the whole first batch
        assert all(not (a and b) for a, b in phases) and eng.iterations[0]["refresh"] == 3
    assert eng.alloc.num_used == 0 and not eng.running


def test_engine_stop_tokens_streaming_and_logit_budget_off(model):
    """Each completed block streams out; a block holding a stop id ends the request after it (id kept); the head
    on every position (no logit budgeting) picks the same tokens."""
    from moejax.diffusion.engine import DiffusionEngine, DiffusionEngineConfig
    from moejax.serve.engine import SamplingParams

    ref = sampler_alone(model, PROMPTS[0], 5, 0.0, gen=24)
    stop = next(t for t in ref[8:16] if t not in ref[:8])  # first seen in the second block
    outs = []
    for lb in (True, False):
        eng = DiffusionEngine(model, DiffusionEngineConfig(block_length=8, steps_per_block=4, block_size=8,
                                                           logit_budget=lb))
        seen = []
        eng.add_request(PROMPTS[0], SamplingParams(max_tokens=24, temperature=0, seed=5, stop_token_ids=(stop,)),
                        callback=seen.append)
        while eng.has_unfinished():
            eng.step()
        outs.append(seen)
    for seen in outs:
        assert len(seen[0].new_tokens) == 8 and not seen[0].finished
        toks = [t for o in seen for t in o.new_tokens]
        cut = ref.index(stop)
        assert toks == ref[:cut + 1] and seen[-1].finished and seen[-1].finish_reason == "stop"
    assert [o.new_tokens for o in outs[0]] == [o.new_tokens for o in outs[1]]


def test_engine_request_errors(model):
    from moejax.diffusion.engine import DiffusionEngine, DiffusionEngineConfig
    from moejax.serve.engine import SamplingParams

    eng = DiffusionEngine(model, DiffusionEngineConfig(block_length=8, steps_per_block=4, block_size=8))
    with pytest.raises(ValueError, match="max_tokens"):
        eng.add_request([1, 2], SamplingParams(max_tokens=12))
    with pytest.raises(ValueError, match="steps"):
        eng.add_request([1, 2], SamplingParams(max_tokens=16), steps=3)
    with pytest.raises(ValueError, match="context"):
        eng.add_request([1] * 120, SamplingParams(max_tokens=16))
    with pytest.raises(ValueError, match="steps_per_block"):
        DiffusionEngineConfig(block_length=8, steps_per_block=9).validate()
    with pytest.raises(ValueError, match="scheduler"):
        DiffusionEngineConfig(scheduler="fcfs").validate()
    with pytest.raises(ValueError, match="diffusion"):
        DiffusionEngine(Transformer(dataclasses.replace(dcfg(), causal=True), rngs=nnx.Rngs(0)))


def test_server_streams_blocks_and_answers_400(model):
    """`moejax serve` on a diffusion LM: completions (streamed block by block, and not), chat; n > 1, logprobs,
    echo, a length that is not a multiple of the block and bad steps are 400 naming the field."""
    from starlette.testclient import TestClient

    from moejax.diffusion.engine import DiffusionEngine, DiffusionEngineConfig
    from moejax.serve.server import create_app
    from moejax.serve.tokenizer import ByteTokenizer

    eng = DiffusionEngine(model, DiffusionEngineConfig(block_length=8, steps_per_block=4, block_size=8))
    app = create_app(eng, ByteTokenizer(V), model_name="d")
    prompt = bytes(PROMPTS[0]).decode("latin-1")
    with TestClient(app) as c:
        r = c.post("/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 16, "temperature": 0, "seed": 3,
                                            "return_token_ids": True, "ignore_eos": True})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["token_ids"] == sampler_alone(model, PROMPTS[0], 3, 0.0)
        with c.stream("POST", "/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 16, "temperature": 0,
                                                        "seed": 3, "stream": True, "ignore_eos": True}) as s:
            events = [ln for ln in s.iter_lines() if ln.startswith("data: ")]
        assert events[-1] == "data: [DONE]" and len(events) >= 3
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": prompt}],
                                                 "max_tokens": 8, "steps": 8})
        assert r.status_code == 200, r.text
        for body, field in [({"n": 2}, "n"), ({"logprobs": 1}, "logprobs"), ({"echo": True}, "echo"),
                            ({"max_tokens": 12}, "max_tokens"), ({"steps": 3}, "steps"), ({"steps": 64}, "steps")]:
            r = c.post("/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 16, **body})
            assert r.status_code == 400, (body, r.text)
            assert r.json()["error"]["param"] == field, (body, r.json())
        assert c.get("/health").status_code == 200


# ------------------------------------------------------------------------------------------------ sparse attention

def test_head_topk_and_selected_attention_against_references():
    """head_topk picks, per KV head, the best max-pooled candidates (a numpy loop); selected attention with every
    candidate selected equals bidirectional paged attention over the whole row."""
    from moejax.nn.attention import head_topk, paged_attention, selected_attention

    rng = np.random.default_rng(0)
    B, T, H, KV, hd, bl = 2, 24, 4, 2, 8, 8
    q = jnp.asarray(rng.normal(size=(B, T, H, hd)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(B, T, KV, hd)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(B, T, KV, hd)), jnp.float32)
    lengths, bstart, keep = jnp.asarray([24, 20]), jnp.asarray([8, 12]), jnp.asarray([5, 3])
    pos, ok = head_topk(q, k, bstart, bl, lengths, keep, 8, window=3)
    qn, kn = np.asarray(q), np.asarray(k)
    for b in range(B):
        s0, L = int(bstart[b]), int(lengths[b])
        cand = np.asarray([t < L and not s0 <= t < s0 + bl for t in range(T)])
        qm = qn[b, s0:s0 + bl].mean(0)  # [H, hd]
        for h in range(KV):
            sc = np.asarray([max(qm[g] @ kn[b, t, h] for g in (2 * h, 2 * h + 1)) for t in range(T)]) / np.sqrt(hd)
            sc = np.where(cand, sc, -np.inf)
            pooled = np.asarray([sc[max(0, t - 1):t + 2].max() for t in range(T)])
            pooled = np.where(cand, pooled, -np.inf)
            want = set(np.argsort(-pooled, kind="stable")[:int(keep[b])].tolist())
            got = set(np.asarray(pos[b, h])[np.asarray(ok[b, h])].tolist())
            assert got == want and len(got) == int(keep[b])
    # all candidates selected == dense attention over the row (keys of the row in a pool of 1-token blocks)
    kp, vp = k.reshape(1, B * T, KV, hd), v.reshape(1, B * T, KV, hd)
    tables = jnp.arange(B * T).reshape(B, T)
    qb = jnp.stack([q[b, int(bstart[b]):int(bstart[b]) + bl] for b in range(B)])
    kb = jnp.stack([k[b, int(bstart[b]):int(bstart[b]) + bl] for b in range(B)])
    vb = jnp.stack([v[b, int(bstart[b]):int(bstart[b]) + bl] for b in range(B)])
    allpos, allok = head_topk(q, k, bstart, bl, lengths, lengths - bl, T, window=1)
    sparse = selected_attention(qb, kp, vp, 0, tables, 1, allpos, allok, kb, vb, jnp.ones((B, bl), bool))
    dense = paged_attention(qb, kp, vp, 0, tables, jnp.broadcast_to((lengths - 1)[:, None], (B, bl)), lengths, 1)
    np.testing.assert_allclose(np.asarray(sparse), np.asarray(dense), rtol=1e-5, atol=1e-5)


def test_engine_sparse_attention_and_infill(model):
    """Retention 1.0 serves the dense engine's tokens; retention 0.5 runs; a request with a suffix fills the
    region between prompt and suffix as the dual-cache sampler does on the same canvas."""
    from moejax.diffusion.engine import DiffusionEngine, DiffusionEngineConfig
    from moejax.serve.engine import SamplingParams

    base = {"block_length": 8, "steps_per_block": 4, "block_size": 8, "max_num_seqs": 4, "token_budget": 40}
    sp = [SamplingParams(max_tokens=16, temperature=0, seed=s) for s in (11, 12, 13, 14)]
    dense = DiffusionEngine(model, DiffusionEngineConfig(**base)).generate(PROMPTS, sp)
    full = DiffusionEngine(model, DiffusionEngineConfig(**base, sparse_retention=1.0)).generate(PROMPTS, sp)
    assert full == dense
    half = DiffusionEngine(model, DiffusionEngineConfig(**base, sparse_retention=0.5)).generate(PROMPTS, sp)
    assert all(len(t) == 16 and MASK not in t for t, _ in half)
    suffix = [70, 71, 72, 73, 74, 75]
    eng = DiffusionEngine(model, DiffusionEngineConfig(**base))
    rid = eng.add_request(PROMPTS[0], SamplingParams(max_tokens=16, temperature=0, seed=4), suffix=suffix)
    got = []
    while eng.has_unfinished():
        got += [t for o in eng.step() if o.request_id == rid for t in o.new_tokens]
    canvas = np.asarray([PROMPTS[0] + [MASK] * 16 + suffix], np.int32)
    ref = DiffusionSampler(model).denoise(canvas, np.ones_like(canvas), (8, 24),
                                          SamplerConfig(gen_length=16, block_length=8, steps=8), row_keys([4], 1))
    assert got == ref.tokens[0].tolist()


def test_engine_kv_pool_from_a_memory_budget(model):
    """memory_budget: the pool gets what the budget leaves after the weights and the largest step's temporaries
    (compiled memory analysis); logit budgeting leaves more; a budget too small for one request is an error."""
    from moejax.diffusion.engine import DiffusionEngine, DiffusionEngineConfig

    base = {"block_length": 8, "steps_per_block": 4, "block_size": 8, "max_num_seqs": 4, "max_model_len": 64}
    probe = DiffusionEngine(model, DiffusionEngineConfig(**base, num_blocks=2))
    w, temp = probe.weight_bytes(), probe.peak_step_memory()["temp_bytes"]
    full = DiffusionEngine(model, DiffusionEngineConfig(**base, num_blocks=2, logit_budget=False))
    assert full.peak_step_memory()["temp_bytes"] > temp
    budget = w + temp + 40 * probe.kv_block_bytes()
    eng = DiffusionEngine(model, DiffusionEngineConfig(**base, memory_budget=budget))
    assert eng.num_blocks == 40
    with pytest.raises(ValueError, match="memory_budget"):
        DiffusionEngine(model, DiffusionEngineConfig(**base, memory_budget=w + temp))
