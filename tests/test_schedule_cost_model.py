"""FSMoE cost model: the degree solver against brute force, gradient bucketing against brute force, plan(),
and malformed profiles failing with a ValueError that names the field. Everything here is modelled."""

import dataclasses
import json
import math
import random

import pytest

from moejax.config import PRESETS
from moejax.schedule import plan as plan_export
from moejax.schedule.cost_model import (
    AlphaBeta,
    MoELayerTerms,
    brute_force_partition,
    bucket_tail,
    continuous_optimum,
    exhaustive_degree,
    layer_time,
    partition_gradients,
    plan,
    solve_degree,
)
from moejax.schedule.profile import Profile, load_packaged


def _random_terms(rng):
    return MoELayerTerms(AlphaBeta(rng.uniform(0, 1e-4), rng.uniform(1e-12, 1e-9)), rng.uniform(1e4, 1e8),
                         AlphaBeta(rng.uniform(0, 1e-4), rng.uniform(1e-15, 1e-12)), rng.uniform(1e8, 1e13))


def test_layer_time_closed_form_cases():
    t = MoELayerTerms(AlphaBeta(1.0, 0.0), 1.0, AlphaBeta(0.5, 0.0), 1.0)
    # a = 1, e = 0.5 per chunk: r=1 sequential 2a + e; r>=2 network-bound 2ra.
    assert layer_time(t, 1) == 2.5
    assert layer_time(t, 4) == 8.0
    # gradient traffic on the link adds to the network-bound term only
    assert layer_time(t, 4, grad_s=1.0) == 9.0
    assert layer_time(t, 1, backward=True) == 3.0  # 2a + 2e


def test_solver_matches_brute_force_on_random_profiles():
    rng = random.Random(0)
    for _ in range(40):
        terms = _random_terms(rng)
        for backward in (False, True):
            g = rng.choice([0.0, rng.uniform(0, 1e-2)])
            sol = solve_degree(terms, backward=backward, grad_s=g)
            d, t = exhaustive_degree(terms, backward=backward, grad_s=g)
            assert sol.degree == d
            assert sol.time_s == pytest.approx(t, rel=1e-12)
            # the continuous optimum is a lower bound and lies between the evaluated neighbours
            assert sol.time_continuous_s <= t * (1 + 1e-9)
            assert min(sol.evaluated) <= sol.r_continuous + 1e-9 and max(sol.evaluated) >= sol.r_continuous - 1e-9


def test_solver_other_candidate_sets():
    rng = random.Random(1)
    for _ in range(10):
        terms = _random_terms(rng)
        cands = (1, 3, 6, 16)
        assert solve_degree(terms, candidates=cands).degree == exhaustive_degree(terms, candidates=cands)[0]
    with pytest.raises(ValueError, match="candidates"):
        solve_degree(terms, candidates=(0, 2))


def test_continuous_optimum_sanity():
    # compute-bound with negligible alphas: T(r) ~ 2 b/r + r*ea + const -> optimum sqrt(2 b / ea)
    t = MoELayerTerms(AlphaBeta(0.0, 1.0), 8.0, AlphaBeta(1.0, 1.0), 100.0)
    r, val, case = continuous_optimum(t, r_min=1, r_max=64)
    assert r == pytest.approx(4.0, rel=1e-3)
    assert val == pytest.approx(2 * 8 / 4 + 4 + 100, rel=1e-6)
    assert case == "compute"
    # network-bound and alpha-dominated: no pipelining
    t2 = MoELayerTerms(AlphaBeta(1.0, 1e-9), 1.0, AlphaBeta(1e-3, 1e-9), 1.0)
    assert solve_degree(t2).degree == 1


def test_gradient_partition_dp_and_search_vs_brute_force():
    rng = random.Random(2)
    for _ in range(60):
        n = rng.randint(1, 8)
        w = [rng.uniform(0, 1e-3) for _ in range(n)]
        s = [rng.choice([0.0, rng.uniform(0, 1e8)]) for _ in range(n)]
        ar = AlphaBeta(rng.uniform(0, 3e-4), rng.uniform(1e-12, 2e-11))
        bf = brute_force_partition(w, s, ar)
        dp = partition_gradients(w, s, ar, method="dp")
        gr = partition_gradients(w, s, ar, method="greedy")
        gs = partition_gradients(w, s, ar, method="greedy+search")
        assert dp.tail_s == pytest.approx(bf.tail_s, abs=1e-12)
        assert bf.tail_s - 1e-12 <= gs.tail_s <= gr.tail_s + 1e-15
        for p in (dp, gr, gs):  # buckets cover every step once, in order
            assert [k for b in p.buckets for k in b] == list(range(n))
            assert p.tail_s == pytest.approx(bucket_tail([b[-1] for b in p.buckets], w, s, ar), abs=1e-15)


def test_gradient_partition_limits():
    ar = AlphaBeta(1.0, 1.0)
    # no free link time: one bucket (one alpha) is best; tail = alpha + beta * total
    p = partition_gradients([0, 0, 0], [1, 1, 1], ar)
    assert len(p.buckets) == 1 and p.tail_s == pytest.approx(4.0)
    # ample free time: every bucket but the last hides; the last step's gradient is always exposed
    p = partition_gradients([100, 100, 100], [1, 1, 1], ar)
    assert p.tail_s == pytest.approx(2.0)
    with pytest.raises(ValueError, match="method"):
        partition_gradients([1], [1], ar, method="magic")
    with pytest.raises(ValueError, match="windows_s"):
        partition_gradients([1, 2], [1], ar)


def test_plan_on_presets():
    prof = load_packaged("a100_4x8_ib200")
    tiny = PRESETS["tiny"]
    cfg = dataclasses.replace(tiny, moe=dataclasses.replace(tiny.moe, num_experts=32))
    p = plan(cfg, {"expert": 32}, prof, 4096)  # experts across nodes: 2-level all-to-all
    assert plan_export is plan
    assert p.moe_layers == tuple(i for i, k in enumerate(cfg.layer_kinds()) if k == "moe")
    assert all(d in (1, 2, 4, 8) for d in p.fwd_degrees + p.bwd_degrees)
    assert sorted(i for b in p.buckets for i in b) == list(range(cfg.n_layers))
    assert p.buckets[0][0] == cfg.n_layers - 1  # backward production order
    assert 0 < p.step_s <= p.no_overlap_step_s
    assert p.step_s == pytest.approx(p.fwd_s + p.bwd_s + p.grad_tail_s)
    assert p.profile_source == "published" and "modelled" in p.notes
    json.dumps(p.to_dict())
    p2 = plan(tiny, {"data": 4, "expert": 8}, prof, 2048, partition_method="greedy+search")
    assert p2.expert_parallel == 8 and p2.n_devices == 32
    with pytest.raises(ValueError, match="mesh"):
        plan(cfg, "expert=8", prof, 128)
    with pytest.raises(ValueError, match="model_cfg.moe"):
        plan(PRESETS["tiny-dense"], {"expert": 8}, prof, 128)


def _good_dict():
    return load_packaged("a100_4x8_ib200").to_dict()


@pytest.mark.parametrize("mutate, field", [
    (lambda d: d["ops"].pop("all_to_all"), "Profile.ops"),
    (lambda d: d["ops"]["gemm"].update(alpha_s=-1.0), "alpha_s"),
    (lambda d: d["ops"]["all_reduce"].update(beta_s_per_unit=float("nan")), "beta_s_per_unit"),
    (lambda d: d["ops"]["all_gather"].update(alpha_s="fast"), "alpha_s"),
    (lambda d: d["ops"].update(broadcast=d["ops"]["all_gather"]), "unknown op"),
    (lambda d: d["ops"]["gemm"].update(unit="bytes"), "unit"),
    (lambda d: d.update(source="guessed"), "Profile.source"),
    (lambda d: d.update(nodes=0), "Profile.nodes"),
    (lambda d: d["ops"].pop("all_to_all_inter"), "inter-node"),
    (lambda d: d["ops"]["gemm"].pop("beta_s_per_unit"), "beta_s_per_unit"),
    (lambda d: d.update(ops=[1, 2]), "Profile.ops"),
])
def test_malformed_profile_raises_naming_field(mutate, field):
    d = _good_dict()
    mutate(d)
    with pytest.raises(ValueError, match=field.replace("(", r"\(")):
        Profile.from_dict(d)


def test_plan_rejects_malformed_profile():
    prof = load_packaged("a100_4x8_ib200")
    bad = Profile(ops={k: v for k, v in prof.ops.items() if k != "gemm"}, nodes=1, devices_per_node=8)
    with pytest.raises(ValueError, match="gemm"):
        plan(PRESETS["tiny"], {"expert": 8}, bad, 128)
    assert math.isfinite(prof.time("all_to_all", 1 << 20))
