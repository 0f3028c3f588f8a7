"""EPLB placement (moejax.parallel.eplb): capacity, coverage, balance, the logical -> physical map, the policy."""

from __future__ import annotations

import itertools

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moejax.parallel import eplb


@st.composite
def cases(draw):
    D = draw(st.sampled_from([1, 2, 4, 8]))
    per = draw(st.integers(1, 4))
    extra = draw(st.integers(0, 3))
    E = D * per
    loads = draw(st.lists(st.one_of(st.just(0.0), st.floats(0.0, 1000.0)), min_size=E, max_size=E))
    return np.asarray(loads), D, per + extra


@settings(max_examples=60, deadline=None)
@given(case=cases(), algorithm=st.sampled_from(["greedy", "hierarchical"]))
def test_placement_fills_every_slot_and_covers_every_expert(case, algorithm):
    loads, D, S = case
    p = eplb.place(loads, D, S, algorithm=algorithm)
    assert p.slots.shape == (1, D * S) and p.slots_per_device == S
    counts = p.replica_counts()[0]
    assert counts.sum() == D * S and counts.min() >= 1  # capacity exactly used, every expert placed
    assert np.array_equal(counts, eplb.replicate(loads, D * S))
    np.testing.assert_allclose(p.device_loads(loads[None]).sum(), loads.sum(), rtol=1e-9, atol=1e-9)
    if algorithm == "greedy":  # a replica never lands beside another copy of itself while a device is free
        for e in np.flatnonzero(counts <= D):
            held = p.slots[0].reshape(D, S) == e
            assert held.sum(-1).max() <= 1


@settings(max_examples=40, deadline=None)
@given(loads=st.lists(st.floats(0.0, 100.0), min_size=1, max_size=4), extra=st.integers(0, 4))
def test_replicate_minimizes_the_largest_per_replica_load(loads, extra):
    w = np.asarray(loads)
    counts = eplb.replicate(w, w.size + extra)
    best = min(max(w / np.asarray(c)) for c in itertools.product(range(1, extra + 2), repeat=w.size)
               if sum(c) == w.size + extra)
    assert counts.sum() == w.size + extra
    assert max(w / counts) == pytest.approx(best)


def test_contiguous_is_the_plain_expert_parallel_layout():
    p = eplb.place(np.ones((2, 8)), 4, 2, algorithm="contiguous")
    assert p.slots.tolist() == [list(range(8))] * 2
    with pytest.raises(ValueError, match="must equal num_experts"):
        eplb.place(np.ones(8), 4, 3, algorithm="contiguous")


def test_balance_on_a_skewed_load():
    rng = np.random.default_rng(0)
    loads = rng.permutation(1.0 / np.arange(1, 65) ** 1.2)  # Zipf-like, 64 experts
    none = eplb.imbalance(eplb.place(loads, 8, 8, algorithm="contiguous").device_loads(loads[None]))[0]
    greedy = eplb.imbalance(eplb.place(loads, 8, 10, algorithm="greedy").device_loads(loads[None]))[0]
    deepseek = eplb.imbalance(eplb.place(loads, 8, 10, algorithm="hierarchical").device_loads(loads[None]))[0]
    assert none >= 1.4 and greedy <= 1.05 and deepseek <= 1.05, (none, greedy, deepseek)


def test_hierarchical_keeps_each_group_on_one_node():
    rng = np.random.default_rng(1)
    loads = rng.random(16) * 10
    p = eplb.place(loads, 4, 5, algorithm="hierarchical", num_groups=4, num_nodes=2)
    per_node = p.slots[0].reshape(2, 10)
    for g in range(4):
        on = [n for n in range(2) if np.any((per_node[n] // 4) == g)]
        assert len(on) == 1, (g, per_node)
    assert (p.replica_counts()[0] >= 1).all()


def test_to_physical_maps_to_a_replica_and_spreads_evenly():
    loads = np.array([40.0, 1, 1, 1, 1, 1, 1, 10])
    p = eplb.place(loads, 2, 6, algorithm="greedy")
    log2phy, counts = p.tables()
    assert counts[0].tolist() == eplb.replicate(loads, 12).tolist()
    T, K = 60, 2
    ids = np.zeros((T, K), np.int32)
    ids[:, 1] = 7
    phys = np.asarray(eplb.to_physical(jnp.asarray(ids), jnp.asarray(log2phy[0]), jnp.asarray(counts[0]),
                                       jnp.arange(T)))
    assert np.array_equal(p.slots[0][phys], ids)  # the slot holds the logical expert
    for e in (0, 7):
        hits = np.bincount(phys[ids == e], minlength=12)[log2phy[0, e, :counts[0, e]]]
        assert hits.max() - hits.min() <= 1 and hits.sum() == T


def test_validate_and_bad_input_name_the_problem():
    with pytest.raises(ValueError, match="no slot for logical experts"):
        eplb.Placement(np.array([[0, 0, 1, 1]]), 3, 2).validate()
    with pytest.raises(ValueError, match="must be at least num_experts"):
        eplb.place(np.ones(8), 2, 3)
    with pytest.raises(ValueError, match="algorithm='lpt'; allowed"):
        eplb.place(np.ones(8), 2, 4, algorithm="lpt")
    with pytest.raises(ValueError, match="finite and >= 0"):
        eplb.place(np.array([1.0, -1.0]), 1, 2)
    with pytest.raises(ValueError, match="policy='sometimes'"):
        eplb.LoadTracker(1, 4, policy="sometimes")


def test_tracker_rebalances_on_drift_only():
    a = np.array([[10.0, 1, 1, 1]])
    b = np.array([[1.0, 1, 1, 10]])
    t = eplb.LoadTracker(1, 4, policy="dynamic", decay=0.5, check_every=1, min_steps=1)
    assert not t.due()  # no load seen yet
    t.update(a)
    assert t.due()  # first placement
    t.rebalanced()
    for _ in range(5):
        t.update(a)
        assert not t.due()  # same distribution: similarity stays 1
    steps = 0
    while not t.due():
        t.update(b)
        steps += 1
    assert 1 <= steps <= 4 and t.similarity() < 0.9
    t.rebalanced()
    assert not t.due()

    s = eplb.LoadTracker(1, 4, policy="static", period=3)
    s.update(a)
    assert s.due()
    s.rebalanced()
    s.update(b), s.update(b)
    assert not s.due()
    s.update(b)
    assert s.due()
    once = eplb.LoadTracker(1, 4, policy="static", period=0)
    once.update(a)
    once.rebalanced()
    for _ in range(20):
        once.update(b)
        assert not once.due()
    never = eplb.LoadTracker(1, 4, policy="none")
    never.update(a)
    assert not never.due()
