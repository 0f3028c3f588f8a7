"""Serving engine: paged KV cache, chunked and layered prefill against sequential generate."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from moejax.config import ModelConfig, MoEConfig, RouterConfig
from moejax.models.generate import generate
from moejax.models.transformer import Transformer
from moejax.serve.engine import Engine, EngineConfig, SamplingParams
from moejax.serve.kv_cache import BlockAllocator, NoFreeBlocks, prefix_hashes
from moejax.serve.scheduler import SchedulerConfig, Status

LOGIT_TOL = 1e-4     # teacher-forced logits, max-abs (issue 5)
KV_TOL = 1e-5        # layered vs one-shot prefill KV cache, x max(1, |ref|)
NEAR_TIE = 1e-3      # greedy tokens compared up to the first step whose top-2 margin is below this


def small_cfg(**kw):
    base = ModelConfig(vocab_size=97, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=48, max_seq_len=256,
                       moe=MoEConfig(num_experts=8, d_ff=24, router=RouterConfig(type="topk", top_k=2)),
                       dense_layers=(0,))
    return dataclasses.replace(base, **kw).validate()


@pytest.fixture(scope="module")
def model():
    return Transformer(small_cfg(), rngs=nnx.Rngs(0))


def sched_cfg(**kw):
    base = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=48, max_prefill_seqs=2,
                           layered_thresholds=(8, 16, 32, 64))
    return dataclasses.replace(base, **kw)


def check_against_generate(model, prompts, results, n_new):
    """Tokens equal up to the first near tie; logits within LOGIT_TOL up to there (teacher-forced)."""
    for p, r in zip(prompts, results, strict=True):
        ref = generate(model, [p], n_new, return_logits=True)
        ref_toks, ref_logits = ref.tokens[0], ref.logits[0]
        top2 = np.sort(ref_logits, axis=-1)[:, -2:]
        margin = top2[:, 1] - top2[:, 0]
        stop = int(np.argmax(margin < NEAR_TIE)) if (margin < NEAR_TIE).any() else n_new
        n = min(stop + 1, n_new)
        assert r.tokens[:n] == ref_toks[:n].tolist(), (r.tokens, ref_toks)
        err = np.abs(r.logits[:n] - ref_logits[:n]).max()
        assert err <= LOGIT_TOL, err


@pytest.mark.parametrize(("scheduler", "kv_block", "layer_loop"), [("chunked", 16, "scan"), ("layered", 24, "unroll")])
def test_engine_matches_generate(model, scheduler, kv_block, layer_loop):
    """Both schedulers, both layer loops, and attention over several key blocks (up to 50 tokens in blocks
    of 16 / 24) against sequential generate."""
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 97, n).tolist() for n in (3, 40, 17, 29, 9)]
    eng = Engine(model, EngineConfig(scheduler=scheduler, record_logits=True, block_size=8, kv_block=kv_block,
                                     layer_loop=layer_loop, sched=sched_cfg(collapse_when_idle=False)))
    assert (eng.runner.layer_states is None) == (layer_loop == "scan")
    res = eng.generate(prompts, SamplingParams(max_tokens=10, temperature=0))
    check_against_generate(model, prompts, res, 10)
    assert all(r.finish_reason == "length" and len(r.tokens) == 10 for r in res)
    if scheduler == "layered":  # G > 1 happened, decode interleaved with a partial prefill
        assert any(it.group != (0, 4) and it.decode_tokens for it in eng.iterations)
    eng.alloc.check()
    assert eng.alloc.num_used == 0  # everything freed or evictable


@pytest.mark.parametrize("scheduler", [pytest.param("chunked", marks=pytest.mark.slow), "layered"])
def test_prefix_sharing_and_preemption(model, scheduler):
    rng = np.random.default_rng(1)
    shared = rng.integers(0, 97, 24).tolist()
    prompts = [shared + rng.integers(0, 97, k).tolist() for k in (5, 11, 2)] + [rng.integers(0, 97, 30).tolist()]
    # 14 usable blocks of 8 tokens: four requests of ~30-45 tokens cannot all stay resident -> preemption
    eng = Engine(model, EngineConfig(scheduler=scheduler, record_logits=True, block_size=8, num_blocks=15,
                                     sched=sched_cfg()))
    first = eng.generate(prompts[:1], SamplingParams(max_tokens=4, temperature=0))  # warms the prefix cache
    res = eng.generate(prompts, SamplingParams(max_tokens=14, temperature=0))
    check_against_generate(model, prompts, res, 14)
    assert res[0].tokens[:4] == first[0].tokens
    assert sum(r.metrics.cached_tokens for r in res) >= 16, [r.metrics.cached_tokens for r in res]
    assert sum(r.metrics.preemptions for r in res) > 0
    eng.alloc.check()
    assert eng.alloc.num_used == 0


def test_prefix_sharing_and_preemption_chunked_small():
    """The default ``chunked`` scheduler with prefix sharing and preemption, small enough for the default suite
    (the case above is slow for ``chunked``): one MoE layer stack of two layers, prompts prefilled in chunks of
    at most 16 tokens, at most two sequences at a time; 6 usable blocks of 8 tokens cannot hold two requests of
    ~35 tokens (even sharing a 16-token prefix) -> preemption. Tokens and logits against sequential generate."""
    m = Transformer(small_cfg(n_layers=2, dense_layers=()), rngs=nnx.Rngs(0))
    rng = np.random.default_rng(1)
    shared = rng.integers(0, 97, 16).tolist()
    prompts = [shared + rng.integers(0, 97, k).tolist() for k in (5, 9)] + [rng.integers(0, 97, 20).tolist()]
    eng = Engine(m, EngineConfig(scheduler="chunked", record_logits=True, block_size=8, num_blocks=7,
                                 sched=sched_cfg(max_num_seqs=2, max_num_batched_tokens=16, max_prefill_seqs=1)))
    first = eng.generate(prompts[:1], SamplingParams(max_tokens=4, temperature=0))  # warms the prefix cache
    res = eng.generate(prompts, SamplingParams(max_tokens=12, temperature=0))
    check_against_generate(m, prompts, res, 12)
    assert res[0].tokens[:4] == first[0].tokens
    assert sum(r.metrics.cached_tokens for r in res) >= 16, [r.metrics.cached_tokens for r in res]
    assert sum(r.metrics.preemptions for r in res) > 0
    assert any(it.prefill_tokens and it.decode_tokens for it in eng.iterations)  # chunks beside decode rows
    eng.alloc.check()
    assert eng.alloc.num_used == 0


def test_layered_kv_equals_one_shot_prefill(model):
    rng = np.random.default_rng(2)
    prompt = rng.integers(0, 97, 37).tolist()
    eng = Engine(model, EngineConfig(scheduler="layered", block_size=8,
                                     sched=sched_cfg(collapse_when_idle=False)))
    eng.add_request(prompt, SamplingParams(max_tokens=3, temperature=0))
    eng.step()
    req = eng.scheduler.prefilling[0]
    groups = []
    while req.status != Status.RUNNING:
        groups.append(eng.iterations[-1].group)
        eng.step()
    groups.append(eng.iterations[-1].group)
    assert len(groups) == 4 and groups[0] == (0, 1) and groups[-1] == (3, 4)
    # prefill-only iterations dispatch no token to the experts of inactive layers
    for it in eng.iterations[:4]:
        lo, hi = it.group
        assert all(c == 0 for i, c in enumerate(it.experts_touched) if not lo <= i < hi), it
        assert all(c > 0 for i, c in enumerate(it.experts_touched) if lo <= i < hi and i > 0), it
    out = model(jnp.asarray([prompt]), cache=model.init_cache(1, 40), cache_index=0)
    slots = np.concatenate([np.arange(b * 8, b * 8 + 8) for b in req.blocks])[:37]
    for r in range(len(model.runs)):
        for got, ref in ((eng.runner.pool.k[r], out.cache.k[r]), (eng.runner.pool.v[r], out.cache.v[r])):
            got = np.asarray(got)[:, slots]
            ref = np.asarray(ref)[:, 0, :37]
            assert np.abs(got - ref).max() <= KV_TOL * max(1.0, np.abs(ref).max())


def test_group_step_without_decode_rows_and_dropped_writes(model):
    """A step with a prefill part through layers [1, 3) and no decode part computes what the same step beside
    padding decode rows computes, writes the prompt's K/V in layers 1-2 only, and leaves every other layer's
    pool untouched (inactive layers drop the prefill writes; only the scratch block may change)."""
    import jax

    from moejax.serve.step import engine_step

    eng = Engine(model, EngineConfig(scheduler="layered", block_size=8, sched=sched_cfg()))
    n = 20
    pf = eng.runner.blank_prefill(1, 32)
    pf.tokens[0, 32 - n:] = np.random.default_rng(9).integers(0, 97, n)  # left-padded
    pf.length[0] = n
    pf.tables[0, :3] = [1, 2, 3]
    rng = np.random.default_rng(10)  # a pool full of old values: a stray write of anything shows
    before = jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(a.dtype), eng.runner.pool)
    outs = []
    for dec in (None, eng.runner.blank_decode(2)):
        eng.runner.pool = jax.tree.map(jnp.asarray, before)
        args, kw = eng.runner._step_args(dec, pf, None, (1, 3), False, None, None)
        outs.append(engine_step(*args, **kw))
    h0, h1 = np.asarray(outs[0].pf_hidden), np.asarray(outs[1].pf_hidden)
    assert np.abs(h0 - h1).max() <= 1e-6 * max(1.0, np.abs(h1).max())
    assert np.asarray(outs[0].experts_touched).tolist() == np.asarray(outs[1].experts_touched).tolist()
    for r, (_, start, count) in enumerate(model.runs):
        for o in outs:
            for got, ref in ((o.pool.k[r], before.k[r]), (o.pool.v[r], before.v[r])):
                got, ref = np.asarray(got)[:, 8:], ref[:, 8:]  # past the scratch block
                for i in range(count):
                    changed = not np.array_equal(got[i], ref[i])
                    assert changed == (1 <= start + i < 3), (start + i, changed)


def test_stop_abort_and_seeded_sampling(model):
    rng = np.random.default_rng(3)
    p = rng.integers(0, 97, 12).tolist()
    eng = Engine(model, EngineConfig(block_size=8, sched=sched_cfg()))
    greedy = eng.generate([p], SamplingParams(max_tokens=6, temperature=0))[0]
    stop = greedy.tokens[2]
    r = eng.generate([p], SamplingParams(max_tokens=6, temperature=0, stop_token_ids=(stop,)))[0]
    assert r.finish_reason == "stop" and r.tokens == greedy.tokens[:greedy.tokens.index(stop) + 1]
    # a seeded sampled request gives the same tokens alone and in a batch with others
    sp = SamplingParams(max_tokens=8, temperature=1.0, top_p=0.9, seed=123)
    alone = eng.generate([p], sp)[0].tokens
    mixed = eng.generate([rng.integers(0, 97, 20).tolist(), p], [SamplingParams(max_tokens=5, seed=1), sp])
    assert mixed[1].tokens == alone
    # abort mid-generation frees the blocks
    rid = eng.add_request(p, SamplingParams(max_tokens=50, temperature=0))
    outs = eng.step() + eng.step()
    assert outs and outs[-1].request_id == rid
    eng.abort(rid)
    outs = eng.step()
    assert outs[-1].finished and outs[-1].finish_reason == "abort"
    assert not eng.has_unfinished() and eng.alloc.num_used == 0
    eng.alloc.check()


def test_bad_requests(model):
    eng = Engine(model, EngineConfig(block_size=8, max_model_len=64))
    with pytest.raises(ValueError, match="max_tokens"):
        eng.add_request([1, 2], SamplingParams(max_tokens=-1))
    with pytest.raises(ValueError, match="temperature"):
        eng.add_request([1, 2], SamplingParams(temperature=-0.5))
    with pytest.raises(ValueError, match="top_p"):
        eng.add_request([1, 2], SamplingParams(top_p=0.0))
    with pytest.raises(ValueError, match="vocabulary"):
        eng.add_request([1, 200])
    with pytest.raises(ValueError, match="context"):
        eng.add_request(list(range(64)))
    with pytest.raises(ValueError, match="at least one token"):
        eng.add_request([])
    with pytest.raises(ValueError, match="scheduler"):
        Engine(model, EngineConfig(scheduler="fifo"))
    with pytest.raises(ValueError, match="layered_thresholds"):
        Engine(model, EngineConfig(sched=SchedulerConfig(layered_thresholds=(4, 2, 8, 16))))
    assert not eng.has_unfinished()


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["alloc", "share", "release"]), st.integers(0, 40)), max_size=40))
def test_block_allocator_never_leaks(ops):
    alloc = BlockAllocator(12, 4)
    held: list[list[int]] = []
    rng = np.random.default_rng(0)
    prefixes = [rng.integers(0, 5, 16).tolist() for _ in range(3)]
    for op, x in ops:
        if op == "alloc":
            try:
                held.append(alloc.allocate(1 + x % 4))
            except NoFreeBlocks:
                assert alloc.num_free < 1 + x % 4
        elif op == "share":
            toks = prefixes[x % 3][: 4 * (1 + x % 4)]
            hashes = prefix_hashes(toks, 4)
            hit = alloc.lookup(hashes)
            need = len(hashes) - len(hit)
            if need > alloc.num_free - sum(b in alloc.evictable for b in hit):
                continue
            alloc.acquire(hit)
            new = alloc.allocate(need)
            for b, h in zip(hit + new, hashes):
                alloc.register(b, h)
            held.append(hit + new)
        elif held:
            alloc.release(held.pop(x % len(held)))
        alloc.check()
    for blocks in held:
        alloc.release(blocks)
    alloc.check()
    assert alloc.num_used == 0 and alloc.num_free == 11


# one layer in the default suite (the kernel itself is checked over a grid in tests/test_pallas_paged_attention.py),
# two layers slow
@pytest.mark.parametrize("n_layers", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_engine_with_pallas_paged_attention_matches_xla(n_layers):
    """attn_impl='pallas' (the Triton-style kernel, interpreted on CPU) gives the XLA path's logits: a prefill of
    two prompts (3 and 21 tokens) and decode steps over two block tables."""
    m = Transformer(small_cfg(n_layers=n_layers, dense_layers=(), head_dim=16), rngs=nnx.Rngs(0))
    rng = np.random.default_rng(4)
    prompts = [rng.integers(0, 97, n).tolist() for n in (3, 21)]
    out = {}
    for impl in ("xla", "pallas"):
        eng = Engine(m, EngineConfig(record_logits=True, block_size=8, attn_impl=impl, sched=sched_cfg()))
        out[impl] = eng.generate(prompts, SamplingParams(max_tokens=4, temperature=0))
    for a, b in zip(out["xla"], out["pallas"], strict=True):
        assert a.tokens == b.tokens
        assert np.abs(a.logits - b.logits).max() <= 1e-5 * max(1.0, np.abs(a.logits).max())


def test_warmup_compiles_every_step_shape(model):
    """After Engine.warmup, serving prompts of any length (long and short, batched and alone, decode with and
    without a prefill beside it) compiles no engine step."""
    import logging

    import jax

    sched = sched_cfg(max_num_seqs=2, max_prefill_seqs=2, max_num_batched_tokens=32)
    eng = Engine(model, EngineConfig(block_size=8, sched=sched))
    keys = eng.warmup_shapes()
    assert keys == [(1, None), (2, None), (2, (1, 16)), (2, (1, 32)), (2, (2, 16)), (2, (2, 32))]
    assert eng.warmup() == len(keys) and eng.warmup() == 0  # compiled once
    msgs = []

    class Catch(logging.Handler):
        def emit(self, record):
            msgs.append(record.getMessage())

    h = Catch()
    logging.getLogger("jax").addHandler(h)
    try:
        with jax.log_compiles(True):
            rng = np.random.default_rng(5)
            prompts = [rng.integers(0, 97, n).tolist() for n in (3, 61, 17, 9, 33)]
            res = eng.generate(prompts, SamplingParams(max_tokens=5, temperature=0))
    finally:
        logging.getLogger("jax").removeHandler(h)
    assert all(len(r.tokens) == 5 for r in res)
    assert set(eng.runner.compiled_shapes) == set(keys)
    assert not [m for m in msgs if "engine_step" in m and "ompil" in m], msgs


def test_multi_step_decode_matches_single_steps(model):
    """EngineConfig.decode_steps=4 (four decode iterations per call, tokens fed back on the device) gives the
    same tokens, log-probabilities and logits as one iteration per call: greedy and seeded sampling, rows that
    finish inside a group (max_tokens not a multiple of 4, a stop token) and a row that reaches the context
    limit (the engine falls back to single steps where a group would not fit)."""
    rng = np.random.default_rng(11)
    prompts = [rng.integers(0, 97, n).tolist() for n in (5, 13, 21, 9, 30)]
    one = Engine(model, EngineConfig(block_size=8, max_model_len=48, record_logits=True, sched=sched_cfg()))
    ref0 = one.generate(prompts[:1], SamplingParams(max_tokens=9, temperature=0))[0].tokens
    params = [SamplingParams(max_tokens=9, temperature=0, stop_token_ids=(ref0[6],)),
              SamplingParams(max_tokens=10, temperature=0), SamplingParams(max_tokens=7, temperature=0),
              SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=7),
              SamplingParams(max_tokens=40, temperature=0)]  # 30 + 40 > 48: stops at the context limit
    one.reset_metrics()
    ref = one.generate(prompts, params)
    four = Engine(model, EngineConfig(block_size=8, max_model_len=48, record_logits=True, sched=sched_cfg(),
                                      decode_steps=4))
    got = four.generate(prompts, params)
    assert any(len(k) == 3 and k[2] == 4 for k in four.runner.compiled_shapes)  # multi-step calls ran
    assert any(len(k) == 2 and k[1] is None for k in four.runner.compiled_shapes)  # and single decode steps
    for a, b in zip(ref, got, strict=True):
        assert b.tokens == a.tokens and b.finish_reason == a.finish_reason
        np.testing.assert_allclose(b.logprobs, a.logprobs, atol=1e-5)
        assert np.abs(b.logits - a.logits).max() <= LOGIT_TOL
    assert got[0].finish_reason == "stop" and got[4].finish_reason == "length" and len(got[4].tokens) == 18
    assert sum(it.decode_tokens for it in four.iterations) == sum(it.decode_tokens for it in one.iterations)
    four.alloc.check()
    assert four.alloc.num_used == 0
    assert (1, None, 4) in four.warmup_shapes()
    with pytest.raises(ValueError, match="decode_steps"):
        Engine(model, EngineConfig(decode_steps=0))


def test_engine_config_kv_block_and_layer_loop_validated(model):
    with pytest.raises(ValueError, match="kv_block"):
        Engine(model, EngineConfig(block_size=8, kv_block=12))
    with pytest.raises(ValueError, match="prefill_kv_block"):
        Engine(model, EngineConfig(block_size=8, prefill_kv_block=20))
    assert Engine(model, EngineConfig(block_size=8)).runner.prefill_kv_block == 128  # min(kv_block 256, 128)
    assert Engine(model, EngineConfig(block_size=8, kv_block=24)).runner.prefill_kv_block == 24
    with pytest.raises(ValueError, match="layer_loop"):
        Engine(model, EngineConfig(layer_loop="vmap"))


def test_layered_batches_prompts_only_within_the_padding_bound(model):
    """Layered prefill rows are padded to the longest prompt: a prompt joins the in-flight batch only while the
    padded size stays within (1 + max_layered_padding) x the real tokens."""
    rng = np.random.default_rng(6)
    for lens, together in (((30, 28), True), ((60, 10), False)):
        eng = Engine(model, EngineConfig(scheduler="layered", block_size=8, sched=sched_cfg()))
        for n in lens:
            eng.add_request(rng.integers(0, 97, n).tolist(), SamplingParams(max_tokens=2, temperature=0))
        eng.step()
        assert eng.iterations[0].prefill_tokens == (sum(lens) if together else lens[0])
    with pytest.raises(ValueError, match="max_layered_padding"):
        sched_cfg(max_layered_padding=-1).validate()


def test_layered_groups_follow_the_batch_total():
    """G follows a layered batch's total prompt tokens (the paper's scheduler): two 400-token prompts
    prefill as 800 tokens in 2 groups, where either alone would take 1."""
    from moejax.serve.scheduler import LayeredPrefillScheduler, Request

    s = LayeredPrefillScheduler(SchedulerConfig(max_num_seqs=8, max_prefill_seqs=4), BlockAllocator(256, 16), 8)
    dec = Request("d", [1] * 20, None, 0.0)
    assert s._admit(dec)
    dec.num_computed, dec.status = 20, Status.RUNNING
    s.running.append(dec)
    assert s.num_groups(400) == 1
    for i in range(2):
        s.add(Request(f"p{i}", list(range(400)), None, 0.0))
    groups = []
    for _ in range(2):
        plan = s.schedule(0.0)
        assert [c.length for c in plan.prefill] == [400, 400] and plan.decode == [dec]
        groups.append(plan.group)
        s.on_step_done(plan)
    assert groups == [(0, 4), (4, 8)] and not s.batch


def test_prefill_token_buckets():
    from moejax.nn.shapes import bucket_edges, shape_bucket

    for step in (256, 512):
        for longest in (100, 300, 4096, 4192):
            edges = bucket_edges(longest, 16, step)
            assert ({shape_bucket(t, 16, step) for t in edges}
                    == {shape_bucket(t, 16, step) for t in range(1, longest + 1)})
    assert shape_bucket(2100, 16, 256) == 2304 and shape_bucket(2100, 16, 512) == 2560
    with pytest.raises(ValueError, match="prefill_token_step"):
        Engine(Transformer(small_cfg(n_layers=1, dense_layers=()), rngs=nnx.Rngs(0)),
               EngineConfig(prefill_token_step=384))


def test_background_warmup_while_serving(model):
    """Engine.warmup(background=True) returns at once with a future; the engine serves meanwhile (a shape not
    compiled yet compiles on first use; the warm-up never touches the live KV pool) with the same tokens as an
    engine without warm-up, and once the future is done every step shape is compiled."""
    from concurrent.futures import Future

    sched = sched_cfg(max_num_seqs=2, max_prefill_seqs=2, max_num_batched_tokens=32)
    eng = Engine(model, EngineConfig(block_size=8, sched=sched))
    fut = eng.warmup(background=True)
    assert isinstance(fut, Future)
    rng = np.random.default_rng(6)
    prompts = [rng.integers(0, 97, n).tolist() for n in (3, 61, 17)]
    sp = SamplingParams(max_tokens=5, temperature=0)
    res = eng.generate(prompts, sp)
    assert eng.warmup_status()["state"] in ("running", "done")
    assert fut.result(timeout=600) == len(eng.warmup_shapes())
    assert set(eng.warmup_shapes()) <= eng.runner.compiled_shapes
    n = len(eng.warmup_shapes())
    assert eng.warmup_status() == {"state": "done", "compiled": n, "shapes": n}
    ref = Engine(model, EngineConfig(block_size=8, sched=sched)).generate(prompts, sp)
    assert [r.tokens for r in res] == [r.tokens for r in ref]
