"""Byte-budgeted expert cache with LRU, LFU, Belady and predictive eviction, and an exact offline optimum for tests.

Items are hashable keys (e.g. ``(layer, expert)`` or ``(layer, expert, bit_plane)``) with a size in bytes. The
cache holds at most ``budget`` bytes. :meth:`ExpertCache.access` records one access and returns whether it
hit; on a miss the item is inserted and victims are evicted by the policy:

* ``lru``: least recently used first;
* ``lfu``: fewest accesses since insertion first (ties: least recently used);
* ``random``: a uniformly random unpinned item (seeded; the baseline of Read-ME's comparison);
* ``belady``: the item whose next use is farthest in the future (never used again first). It needs the
  future: :meth:`set_future` gives the upcoming access sequence (known in advance when routing is decided
  before the model runs, as with Read-ME's pre-gating router), and every :meth:`access` consumes one entry.
  For equal-size items this is optimal (Belady's MIN); with mixed sizes it is a heuristic (farthest next
  use, ties to the larger item), compared in tests against an exact search.
* ``predictive``: Belady with an *estimated* future beyond the announced one, for serving where only each
  iteration's accesses are truly known (Read-ME's pre-gate knows a token's experts for every layer once the
  token is sampled, not the tokens after it). Keys are ``(layer, expert, ...)``. An item whose next use is in
  the announced future keeps that exact next use; every other item is ranked by a first-order Markov model of
  the pre-gate's expert sequence, ``transitions[i, j] = P(next token's expert = j | this token's expert = i)``
  (e.g. :func:`transition_matrix` of routing traces of training text): its value is the discounted
  first-passage value ``V[i, j] = E[discount ** (T_ij - 1)]`` (``T_ij`` = tokens until expert ``j`` is next
  used, from the current token's expert ``i`` given by :meth:`ExpertCache.set_state`; with several current
  tokens, i.e. concurrent requests, the largest ``V[i, j]``: a lower bound of the value of the soonest of their
  next uses), times ``discount ** (layer / n_layers)`` (a later layer is used later in a step). Items without
  a known next use are evicted first, lowest value first (ties: least recently used); when every candidate
  has a known next use, the farthest goes (Belady). With the whole future announced it is Belady. With
  ``online_prior`` the model also learns from the transitions of the tokens served so far
  (:meth:`ExpertCache.observe_transitions`; ``online_prior`` = the pseudo-count weight of ``transitions``).

``pinned`` keys (e.g. the experts of the layer being computed) are never evicted.
"""

from __future__ import annotations

import itertools
import random
from collections import OrderedDict, defaultdict, deque
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

POLICIES = ("lru", "lfu", "belady", "random", "predictive")


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    bytes_loaded: int = 0
    evictions: int = 0

    @property
    def accesses(self) -> int:
        return self.hits + self.misses

    @property
    def hit_rate(self) -> float:
        return self.hits / self.accesses if self.accesses else 0.0


class CacheTooSmall(ValueError):
    """An item (or the set of pinned items) does not fit in the budget."""


class ExpertCache:
    """Byte-budgeted cache of expert weights (the bookkeeping; the engine keeps the arrays in slots)."""

    def __init__(self, budget: int, policy: str = "lru", seed: int = 0, *, transitions=None,
                 discount: float = 0.8, n_layers: int = 1, online_prior: float | None = None):
        if policy not in POLICIES:
            raise ValueError(f"policy={policy!r}; allowed: {list(POLICIES)}")
        self._value = None
        if policy == "predictive":
            if transitions is None:
                raise ValueError("the predictive policy needs transitions (an [E, E] expert transition matrix)")
            if not 0 < discount < 1:
                raise ValueError(f"discount={discount} must be in (0, 1)")
            if online_prior is not None and online_prior <= 0:
                raise ValueError(f"online_prior={online_prior} must be > 0 (or None: no online learning)")
            self._p0 = np.asarray(transitions, np.float64)
            self._value = hitting_values(self._p0, discount)
            self._prior = self._value.mean(axis=0)  # before any state is known
            self.discount, self.n_layers = float(discount), int(n_layers)
            self.online_prior = online_prior
            self._counts = np.zeros_like(self._p0)
            self._stale = False
        self._state_value = None
        if budget <= 0:
            raise ValueError(f"budget={budget} bytes must be > 0")
        self.budget, self.policy = int(budget), policy
        self.items: OrderedDict[Hashable, int] = OrderedDict()   # key -> size, LRU order (oldest first)
        self.freq: dict[Hashable, int] = defaultdict(int)
        self.used = 0
        self.stats = CacheStats()
        self._future: deque = deque()
        self._next_use: dict[Hashable, deque] = defaultdict(deque)
        self._clock = 0
        self._rng = random.Random(seed)

    # ----------------------------------------------------------------------------------------- future
    def set_future(self, keys: Iterable[Hashable]) -> None:
        """The upcoming access sequence (Belady). Later :meth:`extend_future` calls append to it."""
        self._future.clear()
        self._next_use.clear()
        self._clock = 0
        self.extend_future(keys)

    def extend_future(self, keys: Iterable[Hashable]) -> None:
        for k in keys:
            self._next_use[k].append(self._clock + len(self._future))
            self._future.append(k)

    def _consume_future(self, key) -> None:
        if self._future:
            k = self._future.popleft()
            if k != key:
                raise RuntimeError(f"access to {key!r} but the announced future expected {k!r}")
            self._next_use[k].popleft()
            self._clock += 1

    def observe_transitions(self, pairs: Iterable[tuple[int, int]]) -> None:
        """Predictive policy with ``online_prior``: count observed ``(expert of a token, expert of the next
        token)`` pairs of known tokens; the model becomes ``(online_prior * transitions[i] + counts[i]) /
        (online_prior + n_i)`` per row (ignored without ``online_prior``)."""
        if self._value is None or self.online_prior is None:
            return
        for a, b in pairs:
            self._counts[int(a), int(b)] += 1.0
            self._stale = True

    @property
    def transitions(self) -> np.ndarray | None:
        """Predictive policy: the current transition model (with the online counts)."""
        if self._value is None:
            return None
        if self.online_prior is None:
            return self._p0
        w = self.online_prior
        return (w * self._p0 + self._counts) / (w + self._counts.sum(axis=1, keepdims=True))

    def set_state(self, experts: Iterable[int]) -> None:
        """Predictive policy: the experts of the tokens being computed now (the Markov chain's current states)."""
        ex = sorted({int(e) for e in experts})
        if self._value is not None and self._stale:
            self._value = hitting_values(self.transitions, self.discount)
            self._prior = self._value.mean(axis=0)
            self._stale = False
        if self._value is None or not ex:
            self._state_value = None
            return
        self._state_value = self._value[ex].max(axis=0)  # the soonest of the rows' chains: >= each one's value

    def predicted_value(self, key) -> float:
        """Predictive policy: the discounted value of keeping ``key`` (higher = needed sooner, more surely)."""
        v = self._prior if self._state_value is None else self._state_value
        return float(v[key[1]]) * self.discount ** (key[0] / self.n_layers)

    def next_use(self, key) -> float:
        q = self._next_use.get(key)
        return q[0] if q else float("inf")

    # ----------------------------------------------------------------------------------------- access
    def __contains__(self, key) -> bool:
        return key in self.items

    def access(self, key: Hashable, size: int, pinned: Sequence[Hashable] = ()) -> tuple[bool, list]:
        """Record an access. Returns ``(hit, evicted_keys)``; a miss inserts ``key`` (the caller loads it)."""
        if self.policy in ("belady", "predictive") and self._future:
            self._consume_future(key)
        if key in self.items:
            self.items.move_to_end(key)
            self.freq[key] += 1
            self.stats.hits += 1
            return True, []
        if size > self.budget:
            raise CacheTooSmall(f"item {key!r} of {size} bytes exceeds the cache budget of {self.budget} bytes")
        evicted = self._make_room(size, set(pinned) | {key})
        self.items[key] = size
        self.freq[key] = 1
        self.used += size
        self.stats.misses += 1
        self.stats.bytes_loaded += size
        return False, evicted

    def _victim(self, protected):
        cands = [k for k in self.items if k not in protected]
        if not cands:
            return None
        if self.policy == "lru":
            return cands[0]
        if self.policy == "lfu":
            return min(cands, key=lambda k: self.freq[k])  # stable: least recently used among ties
        if self.policy == "random":
            return self._rng.choice(cands)
        if self.policy == "predictive":
            unknown = [k for k in cands if not self._next_use.get(k)]
            if unknown:
                return min(unknown, key=self.predicted_value)  # stable: least recently used among ties
        return max(cands, key=lambda k: (self.next_use(k), self.items[k]))

    def _make_room(self, size, protected) -> list:
        evicted = []
        while self.used + size > self.budget:
            v = self._victim(protected)
            if v is None:
                raise CacheTooSmall(f"cannot fit {size} more bytes: the pinned items already use {self.used} of "
                                    f"{self.budget} bytes")
            self.used -= self.items.pop(v)
            self.freq.pop(v, None)
            self.stats.evictions += 1
            evicted.append(v)
        return evicted


def transition_matrix(seqs: Iterable[Sequence[int]], num_experts: int, alpha: float = 0.5) -> np.ndarray:
    """Row-stochastic ``[E, E]`` first-order transition matrix of expert sequences (``alpha`` = additive
    smoothing of every count)."""
    t = np.full((num_experts, num_experts), float(alpha))
    for s in seqs:
        s = np.asarray(s, np.int64)
        np.add.at(t, (s[:-1], s[1:]), 1.0)
    return t / t.sum(axis=1, keepdims=True)


def hitting_values(transitions, discount: float) -> np.ndarray:
    """``V[i, j] = E[discount ** (T_ij - 1)]``, ``T_ij >= 1`` the first step at which a Markov chain started in
    ``i`` is in ``j`` (0 when never). Per target ``j``: ``V[., j] = P[., j] + discount * P[., -j] V[-j, j]``."""
    p = np.asarray(transitions, np.float64)
    n = p.shape[0]
    if p.shape != (n, n) or np.any(p < 0) or not np.allclose(p.sum(axis=1), 1.0, atol=1e-6):
        raise ValueError(f"transitions must be a row-stochastic square matrix, got shape {p.shape}")
    v = np.zeros((n, n))
    for j in range(n):
        o = np.arange(n) != j
        x = np.linalg.solve(np.eye(n - 1) - discount * p[np.ix_(o, o)], p[o, j])
        v[o, j] = x
        v[j, j] = p[j, j] + discount * p[j, o] @ x
    return v


def simulate(trace: Sequence[Hashable], budget: int, policy: str, sizes: dict | None = None) -> CacheStats:
    """Replay ``trace`` through a fresh cache (Belady sees the whole trace as its future)."""
    c = ExpertCache(budget, policy)
    if policy == "belady":
        c.set_future(trace)
    for k in trace:
        c.access(k, 1 if sizes is None else sizes[k])
    return c.stats


def simulate_served(iterations: Sequence[Sequence[Hashable]], budget: int, policy: str, *,
                    sizes: dict | None = None, states: Sequence[Iterable[int]] | None = None,
                    learn: Sequence[Iterable[tuple[int, int]]] | None = None, log: list | None = None,
                    **cache_kwargs) -> CacheStats:
    """Replay served iterations as the offload runtime issues them: keys ``(layer, expert, ...)``; each
    iteration's accesses are announced when it starts (belady/predictive know nothing beyond it), the keys of
    the layer being computed are pinned, and (predictive) ``states[i]`` are iteration ``i``'s current experts
    (default: the experts it accesses) and ``learn[i]`` the ``(expert, next expert)`` pairs of tokens known when
    iteration ``i`` starts (for ``online_prior``). ``log`` (if given) receives ``(access index, evicted keys)``."""
    c = ExpertCache(budget, policy, **cache_kwargs)
    n = 0
    for i, it in enumerate(iterations):
        it = list(it)
        if policy in ("belady", "predictive"):
            c.set_future(it)
        if policy == "predictive":
            if learn is not None:
                c.observe_transitions(learn[i])
            c.set_state({k[1] for k in it} if states is None else states[i])
        for k in it:
            pinned = [x for x in it if x[0] == k[0]]
            _, ev = c.access(k, 1 if sizes is None else sizes[k], pinned=pinned)
            if log is not None:
                log.append((n, ev))
            n += 1
    return c.stats


def optimal_misses(trace: Sequence[Hashable], budget: int, sizes: dict | None = None) -> int:
    """Exact minimum number of misses by exhaustive search over eviction choices (small traces only).

    Demand paging (an item is loaded only when accessed, and must then be resident). Dynamic programming over
    the set of resident items after each access.
    """
    size = (lambda k: 1) if sizes is None else (lambda k: sizes[k])
    states = {frozenset(): 0}
    for k in trace:
        nxt: dict[frozenset, int] = {}
        for s, cost in states.items():
            if k in s:
                cands = [(s, cost)]
            else:
                cands = []
                others = list(s)
                for r in range(len(others) + 1):
                    for drop in itertools.combinations(others, r):
                        keep = s.difference(drop) | {k}
                        if sum(size(x) for x in keep) <= budget:
                            cands.append((frozenset(keep), cost + 1))
            for st, c in cands:
                if c < nxt.get(st, 1 << 60):
                    nxt[st] = c
        states = nxt
    return min(states.values())
