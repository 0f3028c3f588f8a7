"""Expert-parallel serving (moejax.serve.ep_runner): the engine on an 8-device expert mesh equals one device."""

import numpy as np
import pytest
from flax import nnx
from test_serve_engine import LOGIT_TOL, NEAR_TIE, sched_cfg, small_cfg

from moejax.models.transformer import Transformer
from moejax.serve.engine import Engine, EngineConfig, SamplingParams
from moejax.serve.ep_runner import ExpertParallelRunner


@pytest.fixture(scope="module")
def model():
    return Transformer(small_cfg(), rngs=nnx.Rngs(0))


def check_same_serving(res, ref):
    """Tokens equal up to the first near tie of the reference's logits; logits within LOGIT_TOL up to there."""
    for a, b in zip(res, ref, strict=True):
        top2 = np.sort(b.logits, axis=-1)[:, -2:]
        tie = (top2[:, 1] - top2[:, 0]) < NEAR_TIE
        n = min(int(np.argmax(tie)) + 1 if tie.any() else len(b.tokens), len(b.tokens))
        assert a.tokens[:n] == b.tokens[:n], (a.tokens, b.tokens)
        assert np.abs(a.logits[:n] - b.logits[:n]).max() <= LOGIT_TOL


def test_expert_parallel_engine_matches_one_device(model):
    """Dropless EP over 8 devices (one expert each): concurrent requests through the chunked scheduler (decode
    rows beside prefill chunks) give one device's engine tokens and logits."""
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 97, n).tolist() for n in (3, 30, 12)]
    cfg = EngineConfig(scheduler="chunked", record_logits=True, block_size=8, kv_block=16, layer_loop="scan",
                       sched=sched_cfg(max_num_batched_tokens=16, max_prefill_seqs=1))
    runner = ExpertParallelRunner(model, cfg, "expert=8")
    wg = runner.state["stacks"][1]["moe"]["experts"]["w_gate"][...]
    assert tuple(wg.sharding.spec)[:2] == (None, ("node", "expert")) and len(wg.sharding.device_set) == 8
    eng = Engine(model, runner=runner)
    assert runner.warmup([(runner.decode_rows(1, False), None)]) == 1  # ahead-of-time compile of the EP step
    params = SamplingParams(max_tokens=6, temperature=0)
    res = eng.generate(prompts, params)
    assert any(it.prefill_tokens and it.decode_tokens for it in eng.iterations)  # mixed iterations happened
    one = Engine(model, cfg)
    check_same_serving(res, one.generate(prompts, params))
    eng.alloc.check()
    assert eng.metrics()["dropped_rows_total"] == 0 == one.metrics()["dropped_rows_total"]
    assert [i.experts_touched for i in eng.iterations] == [i.experts_touched for i in one.iterations]


def test_expert_parallel_capacity_drops_are_counted(model):
    """A capacity below the balanced share drops rows: the step still serves, the drops reach the metrics."""
    cfg = EngineConfig(block_size=8, record_logits=False, layer_loop="scan", sched=sched_cfg())
    eng = Engine(model, runner=ExpertParallelRunner(model, cfg, "expert=8", capacity_factor=0.25))
    res = eng.generate([list(range(1, 33))], SamplingParams(max_tokens=2, temperature=0))
    assert len(res[0].tokens) == 2
    dropped = [i.dropped for i in eng.iterations]
    assert dropped[0] > 0 and eng.metrics()["dropped_rows_total"] == sum(dropped)
    line = next(ln for ln in eng.prom.render().decode().splitlines() if ln.startswith("moejax_moe_dropped_rows_total"))
    assert float(line.split()[-1]) == sum(dropped)


def test_expert_parallel_runner_rejects_bad_settings(model):
    cfg = EngineConfig(block_size=8)
    with pytest.raises(ValueError, match="serving shards experts only"):
        ExpertParallelRunner(model, cfg, "data=2,expert=4")
    with pytest.raises(ValueError, match="does not divide num_experts"):
        ExpertParallelRunner(model, cfg, "expert=3")
    with pytest.raises(ValueError, match="capacity_factor=-1"):
        ExpertParallelRunner(model, cfg, "expert=8", capacity_factor=-1)
    with pytest.raises(ValueError, match="a2a='bogus'"):
        ExpertParallelRunner(model, cfg, "expert=8", a2a="bogus")
    dense = Transformer(small_cfg(moe=None, dense_layers=()), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="no MoE layers"):
        ExpertParallelRunner(dense, cfg, "expert=8")


def test_eplb_rebalances_mid_stream_without_changing_tokens(model):
    """EPLB with one redundant slot per device (16 slots for 8 experts): the dynamic tracker set to rebalance
    whenever the loads move at all, so placements change between iterations while requests decode; tokens and
    logits stay one device's, every placement fills every slot and places every expert, no recompilation."""
    from moejax.serve.ep_runner import EPLBConfig

    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, 97, n).tolist() for n in (5, 21, 12)]
    cfg = EngineConfig(scheduler="chunked", record_logits=True, block_size=8, kv_block=16, layer_loop="scan",
                       sched=sched_cfg(max_num_batched_tokens=16, max_prefill_seqs=1))
    ec = EPLBConfig(redundant_slots=1, policy="dynamic", threshold=1.0, check_every=1, min_steps=1, decay=0.5)
    runner = ExpertParallelRunner(model, cfg, "expert=8", eplb=ec)
    assert runner.placement.slots.shape == (3, 16)  # 3 MoE layers x (8 devices x 2 slots)
    eng = Engine(model, runner=runner)
    params = SamplingParams(max_tokens=6, temperature=0)
    res = eng.generate(prompts, params)
    assert len(runner.rebalances) >= 3 and sum(r["moved_slots"] for r in runner.rebalances) > 0
    runner.placement.validate()
    assert (runner.placement.replica_counts() >= 1).all()
    check_same_serving(res, Engine(model, cfg).generate(prompts, params))
    assert runner._jit._cache_size() == len(runner.compiled_shapes)  # a placement change compiled nothing
    ids = prompts[1]
    for a, b in zip(runner.score_prompt(ids), Engine(model, cfg).runner.score_prompt(ids), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)  # echo/logprobs scoring sees the logical experts
    moe = model.stacks[1].moe  # the served model itself is untouched (the runner placed a copy)
    assert moe.experts.w_gate[...].shape[1] == 8 and not hasattr(moe, "eplb_log2phy")
