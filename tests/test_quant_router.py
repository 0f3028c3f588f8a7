"""D²MoE bit-width router and HEBF load ordering (pure numpy)."""

import itertools

import numpy as np
import pytest

from moejax.quant import assign_bits, expert_importance, hebf_order

BITS = (2, 3, 4, 8)
PLANE_BYTES = [1000, 500, 500, 2000]  # a (2, 3, 4, 8) MWQ expert: base 2 bits, two 1-bit planes, a 4-bit one


def routing(seed, T=32, K=2, E=8, skew=1.0):
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.full(E, skew))
    ids = np.stack([rng.choice(E, size=K, replace=False, p=p) for _ in range(T)])
    w = rng.dirichlet(np.ones(K), size=T)
    return ids, w


def check_assignment(a, imp, cnt, bits=BITS):
    active = cnt > 0
    assert all((b in bits) == bool(act) for b, act in zip(a.bits, active))
    assert all(b == 0 for b, act in zip(a.bits, active) if not act)
    # more important experts never get fewer bits
    for e, f in itertools.permutations(np.flatnonzero(active), 2):
        if imp[e] > imp[f]:
            assert a.bits[e] >= a.bits[f], (e, f, a.bits)


@pytest.mark.parametrize("seed", range(12))
def test_budget_bytes_respected_and_monotone(seed):
    ids, w = routing(seed, skew=0.3 + seed / 4)
    imp, cnt = expert_importance(ids, w, 8)
    n_act = int((cnt > 0).sum())
    base = n_act * PLANE_BYTES[0]
    full = n_act * sum(PLANE_BYTES)
    for budget in np.linspace(base, full, 7):
        a = assign_bits(ids, w, 8, allowed_bits=BITS, budget_bytes=budget, plane_nbytes=PLANE_BYTES)
        assert a.unit == "bytes" and not a.over_budget
        cost = sum(sum(PLANE_BYTES[:BITS.index(b) + 1]) for b in a.bits if b)
        assert cost == a.cost <= budget
        check_assignment(a, imp, cnt)
        # greedy stops only when no allowed upgrade fits: every next plane of an eligible expert is too big
        order = sorted((e for e in range(8) if cnt[e]), key=lambda e: (-imp[e], e))
        for i, e in enumerate(order):
            lv = BITS.index(a.bits[e])
            eligible = lv + 1 < len(BITS) and (i == 0 or BITS.index(a.bits[order[i - 1]]) > lv)
            if eligible:
                assert a.cost + PLANE_BYTES[lv + 1] > budget
    top = assign_bits(ids, w, 8, budget_bytes=full, plane_nbytes=PLANE_BYTES)
    assert all(b in (0, 8) for b in top.bits)
    bases = assign_bits(ids, w, 8, budget_bytes=base, plane_nbytes=PLANE_BYTES)
    assert all(b in (0, 2) for b in bases.bits)


@pytest.mark.parametrize("avg", [2.0, 2.5, 3.0, 4.0, 5.5, 8.0])
def test_avg_bits_budget(avg):
    ids, w = routing(7, T=64, E=16, skew=0.5)
    imp, cnt = expert_importance(ids, w, 16)
    a = assign_bits(ids, w, 16, avg_bits=avg)
    n_act = int((cnt > 0).sum())
    assert a.unit == "bits" and a.budget == avg * n_act
    assert sum(a.bits) == a.cost <= avg * n_act
    check_assignment(a, imp, cnt)
    if avg == 8.0:
        assert set(a.bits) <= {0, 8}


@pytest.mark.parametrize("seed", range(6))
def test_byte_and_avg_bits_budgets_together(seed):
    # both budgets: every plane bought fits both, so the tighter one binds; neither alone is exceeded
    ids, w = routing(seed, T=48, E=8, skew=0.4 + seed / 5)
    imp, cnt = expert_importance(ids, w, 8)
    n_act = int((cnt > 0).sum())
    for budget in (n_act * 1000, n_act * 1800, n_act * 2500, n_act * 4000):
        for avg in (2.0, 3.0, 4.0, 5.5, 8.0):
            a = assign_bits(ids, w, 8, budget_bytes=budget, avg_bits=avg, plane_nbytes=PLANE_BYTES)
            cost = sum(sum(PLANE_BYTES[:BITS.index(b) + 1]) for b in a.bits if b)
            assert a.unit == "bytes" and cost == a.cost <= budget
            assert sum(a.bits) == a.bits_cost <= avg * n_act and a.bits_budget == avg * n_act
            assert a.mean_bits <= avg + 1e-12
            check_assignment(a, imp, cnt)
            if avg == 8.0:  # the bit budget cannot bind: the byte budget alone decides
                assert a.bits == assign_bits(ids, w, 8, budget_bytes=budget, plane_nbytes=PLANE_BYTES).bits


def test_hot_expert_gets_more_bits():
    # expert 0 takes almost all of the routing weight
    ids = np.array([[0, 1], [0, 2], [0, 3], [0, 1]])
    w = np.array([[0.9, 0.1], [0.95, 0.05], [0.9, 0.1], [0.8, 0.2]])
    a = assign_bits(ids, w, 4, avg_bits=3.0)
    assert a.bits[0] == max(a.bits) and a.bits[0] > min(b for b in a.bits if b)


def test_budget_too_small_and_bad_args():
    ids, w = routing(0)
    with pytest.raises(ValueError, match="below the .* base planes"):
        assign_bits(ids, w, 8, budget_bytes=10, plane_nbytes=PLANE_BYTES)
    a = assign_bits(ids, w, 8, budget_bytes=10, plane_nbytes=PLANE_BYTES, strict=False)
    assert a.over_budget and set(a.bits) <= {0, 2}
    with pytest.raises(ValueError, match="give budget_bytes, avg_bits or both"):
        assign_bits(ids, w, 8)
    with pytest.raises(ValueError, match="needs plane_nbytes"):
        assign_bits(ids, w, 8, budget_bytes=1e9)
    with pytest.raises(ValueError, match=r"plane_nbytes must have shape \(4,\)"):
        assign_bits(ids, w, 8, budget_bytes=1e9, plane_nbytes=[1, 2])
    with pytest.raises(ValueError, match="avg_bits must be >= the base width 2"):
        assign_bits(ids, w, 8, avg_bits=1.5)
    with pytest.raises(ValueError, match=r"outside \[0, 4\)"):
        assign_bits(ids, w, 4, avg_bits=4)
    with pytest.raises(ValueError, match="strictly increasing"):
        assign_bits(ids, w, 8, avg_bits=4, allowed_bits=(4, 2))
    with pytest.raises(ValueError, match="level_error must be non-increasing"):
        assign_bits(ids, w, 8, avg_bits=4, level_error=[1, 2, 0.5, 0.1])


def test_padding_ids_ignored():
    ids = np.array([[0, -1], [1, -1]])
    w = np.array([[1.0, 0.3], [0.5, 0.7]])
    imp, cnt = expert_importance(ids, w, 3)
    np.testing.assert_allclose(imp, [1.0, 0.5, 0.0])
    assert list(cnt) == [1, 1, 0]
    assert assign_bits(ids, w, 3, avg_bits=8).bits == (8, 8, 0)


@pytest.mark.parametrize("seed", range(8))
def test_hebf_order(seed):
    ids, w = routing(seed, E=10, skew=0.4)
    imp, cnt = expert_importance(ids, w, 10)
    a = assign_bits(ids, w, 10, budget_bytes=(cnt > 0).sum() * 2200, plane_nbytes=PLANE_BYTES)
    order = a.load_order()
    # exactly the planes the assignment needs
    need = {(e, p) for e, b in enumerate(a.bits) if b for p in range(BITS.index(b) + 1)}
    assert len(order) == len(need) and set(order) == need
    pos = {item: i for i, item in enumerate(order)}
    for e, p in need:
        if p:
            assert pos[(e, p - 1)] < pos[(e, p)]  # each expert's planes in order, base first
    # all base planes first, hottest expert first
    n_act = int((cnt > 0).sum())
    bases = order[:n_act]
    assert all(p == 0 for _, p in bases)
    assert [imp[e] for e, _ in bases] == sorted((imp[e] for e, _ in bases), reverse=True)
    # residual planes of the same level: hotter experts first
    for (e1, p1), (e2, p2) in zip(order[n_act:], order[n_act + 1:]):
        if p1 == p2:
            assert imp[e1] >= imp[e2]
    # resident items are skipped, the rest keep their order
    resident = set(order[::3])
    assert a.load_order(resident=resident) == [it for it in order if it not in resident]


def test_hebf_order_fixed_bits():
    imp = np.array([0.1, 3.0, 0.0, 1.0])
    order = hebf_order([8, 4, 0, 2], imp, BITS)
    assert order[:3] == [(1, 0), (3, 0), (0, 0)]
    assert set(order[3:]) == {(1, 1), (1, 2), (0, 1), (0, 2), (0, 3)}
    assert order[3] == (1, 1)
    with pytest.raises(ValueError, match="width 5 is not one of allowed_bits"):
        hebf_order([5, 0, 0, 0], imp, BITS)
