"""NanoFlow in the serving engine (issue 24): nano-batched steps (EngineConfig.nano_batches) give the plain
step's tokens and logits; asynchronous scheduling (EngineConfig.async_scheduling: iteration i + 1 scheduled and
packed while iteration i runs, its decode rows reading i's tokens on the device) serves the synchronous
engine's outputs."""

import dataclasses
import functools

import numpy as np
import pytest
from flax import nnx

from moejax.config import ModelConfig, MoEConfig, RouterConfig
from moejax.models.transformer import Transformer
from moejax.serve.engine import Engine, EngineConfig, SamplingParams
from moejax.serve.runner import ModelRunner
from moejax.serve.scheduler import PENDING, SchedulerConfig

LOGIT_TOL = 1e-4  # the same compiled step on the same inputs: logits agree far below this


@pytest.fixture(scope="module")
def model():
    cfg = ModelConfig(vocab_size=97, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=48, max_seq_len=256,
                      moe=MoEConfig(num_experts=8, d_ff=24, router=RouterConfig(type="topk", top_k=2)),
                      dense_layers=(0,)).validate()
    return Transformer(cfg, rngs=nnx.Rngs(0))


def ecfg(**kw):
    sched = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=48, max_prefill_seqs=2,
                            layered_thresholds=(8, 16, 32, 64))
    base = EngineConfig(block_size=8, max_model_len=48, record_logits=True, sched=sched)
    return dataclasses.replace(base, **kw)


@pytest.fixture(scope="module")
def workload(model):
    """Prompts and parameters covering: a stop token mid-generation (seen one iteration late), max_tokens of
    1 and not a multiple of 4, seeded sampling, and a row that reaches the context limit."""
    rng = np.random.default_rng(11)
    prompts = [rng.integers(0, 97, n).tolist() for n in (5, 13, 21, 9, 30, 3)]
    ref0 = Engine(model, ecfg()).generate(prompts[:1], SamplingParams(max_tokens=9, temperature=0))[0].tokens
    params = [SamplingParams(max_tokens=9, temperature=0, stop_token_ids=(ref0[4],)),
              SamplingParams(max_tokens=10, temperature=0), SamplingParams(max_tokens=7, temperature=0),
              SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=7),
              SamplingParams(max_tokens=40, temperature=0),  # 30 + 40 > 48: stops at the context limit
              SamplingParams(max_tokens=1, temperature=0)]
    return prompts, params


@pytest.fixture(scope="module")
def plain(model, workload):
    """The synchronous, plain engine's results and iterations on the workload, per (scheduler, decode_steps)."""
    cache = {}

    def get(scheduler="chunked", decode_steps=1):
        key = (scheduler, decode_steps)
        if key not in cache:
            eng = Engine(model, ecfg(scheduler=scheduler, decode_steps=decode_steps))
            cache[key] = (eng.generate(*workload), eng.iterations)
        return cache[key]

    return get


def same(ref, got):
    for a, b in zip(ref, got, strict=True):
        assert b.tokens == a.tokens and b.finish_reason == a.finish_reason
        np.testing.assert_allclose(b.logprobs, a.logprobs, atol=1e-5)
        assert np.abs(b.logits - a.logits).max() <= LOGIT_TOL


@pytest.mark.parametrize(("scheduler", "decode_steps"), [("chunked", 1), ("layered", 1), ("chunked", 4)])
def test_async_equals_sync(model, workload, plain, scheduler, decode_steps):
    """Same tokens, finish reasons, log-probabilities and logits as the synchronous engine; the pool is left
    clean; the asynchronous run overlapped (a step launched while the previous one's tokens were pending)."""
    prompts, params = workload
    ref, _ = plain(scheduler, decode_steps)
    eng = Engine(model, ecfg(async_scheduling=True, scheduler=scheduler, decode_steps=decode_steps))
    seen_pending = []
    orig = eng.runner.dispatch

    def spy(plan, steps=1):
        seen_pending.append(any(r.pending for r in plan.decode))
        return orig(plan, steps)

    eng.runner.dispatch = spy
    got = eng.generate(prompts, params)
    same(ref, got)
    assert got[0].finish_reason == "stop" and got[4].finish_reason == "length" and len(got[4].tokens) == 18
    assert any(seen_pending)  # decode rows read tokens still on the device
    assert all(PENDING not in g.tokens for g in got)
    if decode_steps > 1:
        assert any(len(k) == 3 and k[2] == decode_steps for k in eng.runner.compiled_shapes)
    eng.alloc.check()
    assert eng.alloc.num_used == 0 and not eng.scheduler.has_work() and not eng.has_unfinished()


def test_async_streaming_prefix_cache_and_preemption(model):
    """A pool too small for all requests (preemption while a victim's token is in flight) and shared prefixes
    (prefix-cache hits): the same outputs as the synchronous engine; streamed outputs concatenate to the final
    tokens, each token streamed once, the finished flag last."""
    rng = np.random.default_rng(1)
    shared = rng.integers(0, 97, 24).tolist()
    prompts = [shared + rng.integers(0, 97, k).tolist() for k in (5, 11, 2)] + [rng.integers(0, 97, 30).tolist()]
    sp = SamplingParams(max_tokens=12, temperature=0)
    kw = {"num_blocks": 15, "max_model_len": 64}
    sync = Engine(model, ecfg(**kw))
    ref = sync.generate(prompts, sp)
    assert sum(it.preempted for it in sync.iterations) > 0  # the workload preempts
    eng = Engine(model, ecfg(async_scheduling=True, **kw))
    streams: dict[str, list] = {}
    ids = [eng.add_request(p, sp, callback=lambda o: streams.setdefault(o.request_id, []).append(o))
           for p in prompts]
    while eng.has_unfinished():
        eng.step()
    assert sum(it.preempted for it in eng.iterations) > 0
    for rid, r in zip(ids, ref, strict=True):
        outs = streams[rid]
        assert [t for o in outs for t in o.new_tokens] == r.tokens
        assert outs[-1].finished and outs[-1].finish_reason == r.finish_reason
        assert not any(o.finished for o in outs[:-1])
    assert max(o.num_cached_tokens for outs in streams.values() for o in outs) > 0  # prefix-cache hits
    eng.alloc.check()
    assert eng.alloc.num_used == 0


def test_async_abort_in_flight(model):
    """A request aborted while its step is in flight finishes as "abort" with only tokens that came back; the
    other request is unaffected."""
    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, 97, n).tolist() for n in (7, 11)]
    sp = SamplingParams(max_tokens=8, temperature=0)
    ref = Engine(model, ecfg()).generate(prompts[1:], sp)[0]
    eng = Engine(model, ecfg(async_scheduling=True))
    outs: dict[str, list] = {}
    a = eng.add_request(prompts[0], sp, callback=lambda o: outs.setdefault("a", []).append(o))
    eng.add_request(prompts[1], sp, callback=lambda o: outs.setdefault("b", []).append(o))
    for _ in range(3):
        eng.step()
    assert eng.scheduler.running and eng.scheduler.running[0].pending  # a token is on the device
    eng.abort(a)
    while eng.has_unfinished():
        eng.step()
    got_a = [t for o in outs["a"] for t in o.new_tokens]
    assert outs["a"][-1].finish_reason == "abort" and PENDING not in got_a and len(got_a) < 8
    assert [t for o in outs["b"] for t in o.new_tokens] == ref.tokens
    eng.alloc.check()
    assert eng.alloc.num_used == 0


def test_async_config_errors(model):
    with pytest.raises(TypeError, match="async_scheduling"):
        Engine(model, ecfg(async_scheduling="yes"))

    class HostRunner(ModelRunner):
        supports_async = False

    with pytest.raises(ValueError, match="async_scheduling=True: HostRunner"):
        Engine(model, runner=HostRunner(model, ecfg(async_scheduling=True)))


@pytest.mark.parametrize("nano", [pytest.param(2, marks=pytest.mark.slow), 4])  # 2: the layer test below
def test_nano_batched_engine_equals_plain(model, workload, plain, nano):
    """Steps with prefill and decode rows (several prompts admitted over iterations, chunked) and multi-step
    decode calls: tokens, log-probabilities and logits within 1e-5 of the plain step's; the FFN nano-batches
    re-read experts (touched counts reads: at least the plain step's)."""
    prompts, params = workload
    ref, ref_its = plain("chunked", 4)
    eng = Engine(model, ecfg(decode_steps=4, nano_batches=nano))
    got = eng.generate(prompts, params)
    for a, b in zip(ref, got, strict=True):
        assert b.tokens == a.tokens and b.finish_reason == a.finish_reason
        np.testing.assert_allclose(b.logprobs, a.logprobs, atol=1e-5)
        assert np.abs(b.logits - a.logits).max() <= 1e-5
    assert any(it.prefill_tokens and it.decode_tokens for it in eng.iterations)  # mixed steps ran
    assert any(len(k) == 3 for k in eng.runner.compiled_shapes)  # and multi-step calls
    reads = sum(sum(it.experts_touched) for it in eng.iterations)
    assert reads >= sum(sum(it.experts_touched) for it in ref_its)
    eng.alloc.check()


def test_nano_batched_layer_equals_plain_layer(model):
    """One layer (the dense one and a MoE one) on fixed rows (3 decode rows in a bucket of 4, 2 prefill rows)
    with layered prefill's group mask on and off: outputs and pool within 1e-5 of :meth:`Block.paged_layer`
    (the mask off: prefill rows unchanged); expert reads at least the plain layer's."""
    import jax
    import jax.numpy as jnp

    from moejax.serve.runner import ModelRunner
    from moejax.serve.step import attention_specs, prepare_rows

    runner = ModelRunner(model, ecfg())
    dec, pf = runner.blank_decode(4), runner.blank_prefill(2, 16)
    rng = np.random.default_rng(5)
    for i, n in enumerate((9, 20, 5)):  # decode rows at positions n - 1, each over its own pages
        dec.tokens[i], dec.pos[i], dec.valid[i] = rng.integers(0, 97), n - 1, True
        dec.tables[i, :3] = [1 + 3 * i, 2 + 3 * i, 3 + 3 * i]
    for i, (start, length) in enumerate(((0, 16), (8, 7))):
        pf.tokens[i, 16 - length:] = rng.integers(0, 97, length)
        pf.start[i], pf.length[i] = start, length
        pf.tables[i, :3] = [10 + 3 * i, 11 + 3 * i, 12 + 3 * i]
    keys = jax.random.split(jax.random.PRNGKey(0), 2 * len(runner.pool.k))
    kps = [jax.random.normal(k, a.shape, a.dtype) for k, a in zip(keys, runner.pool.k)]
    vps = [jax.random.normal(k, a.shape, a.dtype) for k, a in zip(keys[len(kps):], runner.pool.v)]
    dpart, ppart = prepare_rows(model, dec, pf, None, block_size=8, use_hidden=False)
    dspec, pspec = attention_specs(8, "xla", 16, 16, 16)
    for r, (kind, _, _) in enumerate(model.runs):
        gd, st = nnx.split(model.stacks[r])
        first = jax.tree.map(lambda a: a[0], st)  # the run's first layer

        @functools.partial(jax.jit, static_argnames="nano")
        def layer(first, kp, vp, active, nano, gd=gd):  # the group mask a run-time value, as in the engine
            blk = nnx.merge(gd, first)
            if nano == 1:
                return blk.paged_layer(kp, vp, 0, dpart, ppart, active, dec_spec=dspec, pf_spec=pspec)
            return blk.paged_layer_nano(kp, vp, 0, dpart, ppart, active, nano=nano, dec_spec=dspec, pf_spec=pspec)

        for active in (jnp.bool_(True), jnp.bool_(False)):
            ref = layer(first, kps[r], vps[r], active, 1)
            for nano in (2, 4):
                got = layer(first, kps[r], vps[r], active, nano)
                # the pools compared past block 0, the scratch block every padding position writes to (in
                # either order: its contents are never read)
                for x, y in (ref[0], got[0]), (ref[1], got[1]), (ref[2][:, 8:], got[2][:, 8:]), (ref[3][:, 8:],
                                                                                                  got[3][:, 8:]):
                    scale = max(1.0, float(jnp.abs(x).max()))
                    assert float(jnp.abs(x - y).max()) <= 1e-5 * scale, (kind, bool(active), nano)
                assert int(got[4].touched) >= int(ref[4].touched)
                np.testing.assert_allclose(np.asarray(got[4].load), np.asarray(ref[4].load), atol=1e-6)
            if not bool(active):
                np.testing.assert_array_equal(np.asarray(ref[1]), np.asarray(ppart.x))


def test_nano_batches_config_errors(model):
    with pytest.raises(ValueError, match="nano_batches=0"):
        Engine(model, ecfg(nano_batches=0))
    with pytest.raises(ValueError, match="needs scheduler='chunked'"):
        Engine(model, ecfg(nano_batches=2, scheduler="layered"))
