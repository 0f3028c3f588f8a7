"""Expert-placement load balancing (EPLB): which device's slots hold which logical experts.

Under expert parallelism every device holds ``slots_per_device`` *physical* expert slots; a :class:`Placement`
maps them to *logical* experts (the router's ids), per layer. With more slots than experts
(``num_devices * slots_per_device > num_experts``) the heaviest experts get replicas and a routed token goes to
one of its expert's replicas (:func:`to_physical`), so the per-device load evens out. Host-side numpy,
called between serving iterations; only :func:`to_physical` runs inside the jitted step.

Placement algorithms (each ``[E]`` loads -> :class:`Placement` rows, called per layer by :func:`place`):

- :func:`contiguous` -- no balancing: expert ``e`` on device ``e // (E / D)`` (the plain EP layout; no replicas).
- :func:`greedy` -- xLLM's dynamic EPLB placement: replicas go one at a time to the expert with the largest
  per-replica load (an expert of load ``w`` per replica over ``c`` replicas drops to ``w c / (c + 1)``); then
  replicas, heaviest first, go to the least-loaded device with a free slot that does not hold that expert yet.
- :func:`hierarchical` -- DeepSeek's EPLB algorithm (``deepseek-ai/EPLB``, rewritten here): expert groups
  packed onto nodes by balanced packing, experts replicated within each node, the node's physical experts
  packed onto its devices by balanced packing (each device gets exactly ``slots_per_device``). With one node
  (or groups that do not divide over the nodes) it is the global policy.

:class:`LoadTracker` keeps decayed per-layer loads and decides when to rebalance: the dynamic policy when the
cosine similarity of the current loads and the loads the placement was computed from drops below a threshold
(0.9), the static one every fixed number of steps (vLLM's ``--enable-eplb``) or never (calibrated once).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
from flax import nnx

ALGORITHMS = ("contiguous", "greedy", "hierarchical")
""":func:`place`'s ``algorithm`` names."""


@dataclasses.dataclass(frozen=True)
class Placement:
    """Physical slot -> logical expert, per layer: ``slots[l, d * slots_per_device + s]`` is the logical expert
    in slot ``s`` of device ``d`` at layer ``l`` (``[L, D * S]`` int32).

    Invariants (checked by :meth:`validate`, which the constructors call): every logical expert in
    ``[0, num_experts)`` has at least one slot in every layer, and every slot holds one.
    """

    slots: np.ndarray
    num_experts: int
    num_devices: int

    @property
    def num_layers(self) -> int:
        return self.slots.shape[0]

    @property
    def slots_per_device(self) -> int:
        return self.slots.shape[1] // self.num_devices

    def validate(self) -> Placement:
        s = self.slots
        if s.ndim != 2 or s.shape[1] % self.num_devices:
            raise ValueError(f"Placement.slots must be [layers, num_devices * slots_per_device] with num_devices = "
                             f"{self.num_devices}; got shape {s.shape}")
        if s.size and (s.min() < 0 or s.max() >= self.num_experts):
            raise ValueError(f"Placement.slots: logical ids must lie in [0, {self.num_experts}); got "
                             f"[{s.min()}, {s.max()}]")
        missing = [(layer, sorted(set(range(self.num_experts)) - set(s[layer].tolist())))
                   for layer in range(s.shape[0])]
        missing = [(layer, m) for layer, m in missing if m]
        if missing:
            layer, m = missing[0]
            raise ValueError(f"Placement: layer {layer} has no slot for logical experts {m[:8]}")
        return self

    def replica_counts(self) -> np.ndarray:
        """``[L, E]``: the number of slots holding each logical expert."""
        return np.stack([np.bincount(row, minlength=self.num_experts) for row in self.slots])

    def tables(self) -> tuple[np.ndarray, np.ndarray]:
        """``(log2phy [L, E, R], counts [L, E])`` for :func:`to_physical`: the physical slots of each logical
        expert in slot order, padded with ``-1`` to ``R`` = the most replicas of any expert."""
        counts = self.replica_counts()
        R = int(counts.max()) if counts.size else 1
        log2phy = np.full((self.num_layers, self.num_experts, R), -1, np.int32)
        fill = np.zeros((self.num_layers, self.num_experts), np.int64)
        for layer, row in enumerate(self.slots):
            for p, e in enumerate(row):
                log2phy[layer, e, fill[layer, e]] = p
                fill[layer, e] += 1
        return log2phy, counts.astype(np.int32)

    def device_loads(self, loads: np.ndarray) -> np.ndarray:
        """``[L, D]``: each device's load when every logical expert's load ``loads [L, E]`` is split evenly over
        its replicas (what :func:`to_physical`'s round-robin does in expectation)."""
        loads = np.asarray(loads, np.float64).reshape(self.num_layers, self.num_experts)
        per_replica = loads / self.replica_counts()
        slot_load = np.take_along_axis(per_replica, self.slots.astype(np.int64), axis=1)
        return slot_load.reshape(self.num_layers, self.num_devices, -1).sum(-1)

    def moves(self, other: Placement) -> int:
        """Slots whose logical expert differs between this placement and ``other`` (weights to copy)."""
        if self.slots.shape != other.slots.shape:
            raise ValueError(f"Placement.moves: shapes differ ({self.slots.shape} vs {other.slots.shape})")
        return int(np.sum(self.slots != other.slots))


def imbalance(device_loads: np.ndarray) -> np.ndarray:
    """max / mean device load per row of ``device_loads [..., D]`` (1.0 is perfect balance; rows of zero
    load count as balanced)."""
    d = np.asarray(device_loads, np.float64)
    mean = d.mean(-1)
    return np.where(mean > 0, d.max(-1) / np.where(mean > 0, mean, 1.0), 1.0)


# ---------------------------------------------------------------------------------------------- algorithms

def _check(loads, num_devices, slots_per_device, *, exact=False):
    w = np.asarray(loads, np.float64)
    if w.ndim != 1 or not w.size:
        raise ValueError(f"EPLB: loads must be a non-empty [num_experts] vector, got shape {w.shape}")
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError("EPLB: loads must be finite and >= 0")
    if num_devices < 1 or slots_per_device < 1:
        raise ValueError(f"EPLB: num_devices and slots_per_device must be >= 1, got {num_devices}, "
                         f"{slots_per_device}")
    E, P = w.size, num_devices * slots_per_device
    if (E != P) if exact else (P < E):
        need = "equal" if exact else "be at least"
        raise ValueError(f"EPLB: num_devices * slots_per_device = {P} must {need} num_experts = {E}")
    return w


def contiguous(loads: np.ndarray, num_devices: int, slots_per_device: int) -> np.ndarray:
    """No balancing: ``[D * S]`` slots holding experts ``0..E-1`` in order (``E == D * S``)."""
    w = _check(loads, num_devices, slots_per_device, exact=True)
    return np.arange(w.size, dtype=np.int32)


def replicate(loads: np.ndarray, num_slots: int) -> np.ndarray:
    """Replica counts ``[E]`` summing to ``num_slots``: each extra slot goes to the expert with the largest
    per-replica load ``w / c`` (ties to the lower id)."""
    w = np.asarray(loads, np.float64)
    counts = np.ones(w.size, np.int64)
    for _ in range(num_slots - w.size):
        counts[np.argmax(w / counts)] += 1
    return counts


def greedy(loads: np.ndarray, num_devices: int, slots_per_device: int) -> np.ndarray:
    """xLLM's placement: :func:`replicate`, then replicas heaviest first onto the least-loaded device that has
    a free slot and does not hold that expert yet (any device with a free slot if none qualifies)."""
    w = _check(loads, num_devices, slots_per_device)
    counts = replicate(w, num_devices * slots_per_device)
    reps = np.repeat(np.arange(w.size), counts)
    per = (w / counts)[reps]
    order = np.lexsort((reps, -per))  # heaviest first, ties by id: deterministic
    dev_load = np.zeros(num_devices)
    held: list[list[int]] = [[] for _ in range(num_devices)]
    for i in order:
        e = int(reps[i])
        free = [d for d in range(num_devices) if len(held[d]) < slots_per_device]
        fresh = [d for d in free if e not in held[d]] or free
        d = min(fresh, key=lambda k: (dev_load[k], k))
        held[d].append(e)
        dev_load[d] += per[i]
    return np.concatenate([np.asarray(h, np.int32) for h in held])


def balanced_packing(weights: np.ndarray, num_packs: int) -> np.ndarray:
    """Pack ``n`` items into ``num_packs`` packs of exactly ``n / num_packs`` items: heaviest first, each into
    the lightest pack that is not full. Returns each item's pack ``[n]``."""
    w = np.asarray(weights, np.float64)
    if w.size % num_packs:
        raise ValueError(f"balanced_packing: {w.size} items do not split into {num_packs} equal packs")
    cap = w.size // num_packs
    pack = np.empty(w.size, np.int64)
    load, size = np.zeros(num_packs), np.zeros(num_packs, np.int64)
    for i in np.lexsort((np.arange(w.size), -w)):
        p = min((k for k in range(num_packs) if size[k] < cap), key=lambda k: (load[k], k))
        pack[i] = p
        load[p] += w[i]
        size[p] += 1
    return pack


def hierarchical(loads: np.ndarray, num_devices: int, slots_per_device: int, *, num_groups: int = 1,
                 num_nodes: int = 1) -> np.ndarray:
    """DeepSeek's EPLB: ``num_groups`` expert groups (consecutive ids) packed onto ``num_nodes`` nodes,
    replicas made within each node (:func:`replicate`), each node's physical experts packed onto its devices
    (:func:`balanced_packing`, exactly ``slots_per_device`` per device). When the groups do not divide over the
    nodes, one node and one group (the global policy)."""
    w = _check(loads, num_devices, slots_per_device)
    E = w.size
    if num_nodes < 1 or num_devices % num_nodes:
        raise ValueError(f"hierarchical: num_nodes = {num_nodes} must divide num_devices = {num_devices}")
    if num_groups < 1 or E % num_groups or num_groups % num_nodes:
        num_groups, num_nodes = 1, 1
    per_group, dev_per_node = E // num_groups, num_devices // num_nodes
    slots_per_node = dev_per_node * slots_per_device
    if slots_per_node < (num_groups // num_nodes) * per_group:
        raise ValueError(f"hierarchical: {slots_per_node} slots per node cannot hold "
                         f"{(num_groups // num_nodes) * per_group} experts")
    group_node = balanced_packing(w.reshape(num_groups, per_group).sum(-1), num_nodes)
    out = []
    for node in range(num_nodes):
        experts = np.concatenate([np.arange(g * per_group, (g + 1) * per_group)
                                  for g in np.flatnonzero(group_node == node)])
        counts = replicate(w[experts], slots_per_node)
        phys = np.repeat(experts, counts)
        dev = balanced_packing(np.repeat(w[experts] / counts, counts), dev_per_node)
        for d in range(dev_per_node):
            out.append(phys[dev == d])
    return np.concatenate(out).astype(np.int32)


def place(loads: np.ndarray, num_devices: int, slots_per_device: int, *, algorithm: str = "greedy",
          **kwargs) -> Placement:
    """A :class:`Placement` from per-layer loads ``[L, E]`` (or ``[E]``: one layer) by ``algorithm``
    (:data:`ALGORITHMS`; ``kwargs`` go to :func:`hierarchical`)."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"EPLB: algorithm={algorithm!r}; allowed: {', '.join(map(repr, ALGORITHMS))}")
    w = np.atleast_2d(np.asarray(loads, np.float64))
    fn = {"contiguous": contiguous, "greedy": greedy, "hierarchical": hierarchical}[algorithm]
    rows = [fn(row, num_devices, slots_per_device, **kwargs) for row in w]
    return Placement(np.stack(rows).astype(np.int32), w.shape[1], num_devices).validate()


class ExpertSlots(nnx.Variable):
    """EPLB serving state of a MoE layer (not a parameter): ``eplb_log2phy [E, R]`` and ``eplb_counts [E]``
    (int32, :meth:`Placement.tables`), attached by the expert-parallel runner; their presence makes the
    expert-parallel path map logical ids to physical slots (``moejax.parallel.expert_parallel.physical_order``)."""


def to_physical(expert_ids: jnp.ndarray, log2phy: jnp.ndarray, counts: jnp.ndarray,
                token_index: jnp.ndarray) -> jnp.ndarray:
    """Logical expert ids ``[T, K]`` -> physical slots, one layer: a token's ``k``-th expert ``e`` goes to
    replica ``(token_index + k) mod counts[e]`` of ``e`` (``log2phy [E, R]``, ``counts [E]`` from
    :meth:`Placement.tables`). Deterministic in the token's global index, so the choice does not depend on how
    the batch is split; spreads an expert's tokens evenly over its replicas."""
    k = jnp.arange(expert_ids.shape[-1], dtype=jnp.int32)
    rep = (token_index.astype(jnp.int32)[:, None] + k[None]) % counts[expert_ids]
    return jnp.take_along_axis(log2phy[expert_ids], rep[..., None], axis=-1)[..., 0]


# ---------------------------------------------------------------------------------------------- policy

POLICIES = ("none", "static", "dynamic")
""":class:`LoadTracker` policies: never rebalance (contiguous), periodic static (``hierarchical`` every
``period`` steps, or once when ``period`` is 0), dynamic (``greedy`` when the loads drift)."""


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two load vectors (flattened); 1.0 when either is all zero."""
    a, b = np.ravel(np.asarray(a, np.float64)), np.ravel(np.asarray(b, np.float64))
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    return 1.0 if na == 0 or nb == 0 else float(a @ b / (na * nb))


class LoadTracker:
    """Per-layer expert loads, decayed, and the rebalancing decision.

    ``update(counts [L, E])`` after each serving iteration: ``load = decay * load + counts``. ``due()`` says
    whether to rebalance now: ``dynamic`` when the cosine similarity of ``load`` and the loads of the last
    placement is below ``threshold`` (checked every ``check_every`` steps, at least ``min_steps`` after the
    last rebalance); ``static`` every ``period`` steps (0: never after the first); ``none`` never.
    ``rebalanced(placement)`` records the new placement's loads.
    """

    def __init__(self, num_layers: int, num_experts: int, *, policy: str = "dynamic", decay: float = 0.95,
                 threshold: float = 0.9, check_every: int = 10, min_steps: int = 10, period: int = 0):
        if policy not in POLICIES:
            raise ValueError(f"LoadTracker: policy={policy!r}; allowed: {', '.join(map(repr, POLICIES))}")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"LoadTracker: decay must be in [0, 1), got {decay}")
        if not -1.0 <= threshold <= 1.0:
            raise ValueError(f"LoadTracker: threshold is a cosine similarity in [-1, 1], got {threshold}")
        if check_every < 1 or min_steps < 0 or period < 0:
            raise ValueError(f"LoadTracker: check_every >= 1, min_steps >= 0, period >= 0; got {check_every}, "
                             f"{min_steps}, {period}")
        self.policy, self.decay, self.threshold = policy, decay, threshold
        self.check_every, self.min_steps, self.period = check_every, min_steps, period
        self.load = np.zeros((num_layers, num_experts))
        self.placed_load: np.ndarray | None = None
        self.step = self.last = 0

    def update(self, counts: np.ndarray) -> None:
        counts = np.asarray(counts, np.float64)
        if counts.shape != self.load.shape:
            raise ValueError(f"LoadTracker.update: counts must be {self.load.shape}, got {counts.shape}")
        self.load = self.decay * self.load + counts
        self.step += 1

    def similarity(self) -> float:
        """The lowest per-layer cosine similarity of the current and the placed loads."""
        if self.placed_load is None:
            return 1.0
        return min(cosine(a, b) for a, b in zip(self.load, self.placed_load, strict=True))

    def due(self) -> bool:
        if self.policy == "none" or not self.load.any():
            return False
        since = self.step - self.last
        if self.placed_load is None:
            return True
        if self.policy == "static":
            return self.period > 0 and since >= self.period
        return since >= self.min_steps and self.step % self.check_every == 0 and self.similarity() < self.threshold

    def rebalanced(self) -> None:
        self.placed_load = self.load.copy()
        self.last = self.step
