"""Event-level step simulator (modelled): sum of parts, schedule ordering, resource exclusivity."""

import dataclasses
import itertools

import pytest

from moejax.config import PRESETS
from moejax.schedule.profile import load_packaged
from moejax.schedule.simulate import RESOURCES, SCHEDULES, simulate_step

PROF = load_packaged("a100_4x8_ib200")
TINY = PRESETS["tiny"]
TINY32 = dataclasses.replace(TINY, moe=dataclasses.replace(TINY.moe, num_experts=32))
WIDE = dataclasses.replace(TINY32, d_model=1024, n_heads=16, n_kv_heads=4, d_ff=4096,
                           moe=dataclasses.replace(TINY32.moe, d_ff=2048))
CONFIGS = [  # (config, mesh, tokens per device)
    (TINY32, {"expert": 32}, 4096),           # 2-level all-to-all across 4 nodes
    (WIDE, {"expert": 32}, 8192),
    (TINY, {"data": 4, "expert": 8}, 4096),   # experts inside a node, gradients across nodes
]


def _no_overlap_on_resources(events):
    for r in RESOURCES:
        ev = sorted((e for e in events if e.resource == r), key=lambda e: e.start_s)
        for a, b in itertools.pairwise(ev):
            assert b.start_s >= a.end_s - 1e-12, (a, b)


@pytest.mark.parametrize("cfg, mesh, tokens", CONFIGS)
def test_schedule_ordering_and_resources(cfg, mesh, tokens):
    res = {s: simulate_step(cfg, PROF, tokens, s, mesh=mesh) for s in SCHEDULES}
    no = res["no_overlap"]
    assert no.step_time_s == pytest.approx(no.sum_of_parts_s, rel=1e-12)   # all sequential
    assert res["fsmoe"].step_time_s <= res["pipemoe"].step_time_s * (1 + 1e-9)
    assert res["pipemoe"].step_time_s <= no.step_time_s * (1 + 1e-9)
    assert res["fixed_degree"].step_time_s <= no.step_time_s * (1 + 1e-9)
    for r in res.values():
        _no_overlap_on_resources(r.events)
        assert r.step_time_s == pytest.approx(max(e.end_s for e in r.events))
        assert all(e.end_s >= e.start_s >= 0 for e in r.events)
    assert len(res["fsmoe"].buckets) >= 1 and res["fixed_degree"].fwd_degrees == (2,) * len(no.fwd_degrees)


def test_no_overlap_sum_of_parts_components():
    r = simulate_step(TINY32, PROF, 1024, "no_overlap", mesh={"expert": 32})
    assert sum(e.end_s - e.start_s for e in r.events) == pytest.approx(r.step_time_s, rel=1e-12)
    names = {e.name.split("[")[0] for e in r.events}
    assert {"L0.fwd.other", "L0.fwd.dispatch.intra", "L0.fwd.dispatch.inter", "L0.fwd.expert",
            "L0.bwd.combine.inter", "grad.all_reduce"} <= names


def test_fsmoe_overlaps_gradients_with_backward():
    r = simulate_step(WIDE, PROF, 8192, "fsmoe", mesh={"expert": 32})
    grads = [e for e in r.events if e.phase == "grad"]
    last_bwd = max(e.end_s for e in r.events if e.phase == "bwd")
    assert grads and min(e.start_s for e in grads) < last_bwd   # some reduction runs during the backward


def test_bad_inputs():
    with pytest.raises(ValueError, match="schedule"):
        simulate_step(TINY, PROF, 128, "megablocks", mesh={"data": 4, "expert": 8})
    with pytest.raises(ValueError, match="mesh"):
        simulate_step(TINY, PROF, 128, "fsmoe", mesh={"expert": 8})
    with pytest.raises(ValueError, match="fixed_degree"):
        simulate_step(TINY, PROF, 128, "fixed_degree", mesh={"data": 4, "expert": 8}, fixed_degree=0)
