"""D²MoE's bit-width router and HEBF (hottest-expert-bit-first) load ordering; pure Python/numpy, host side.

**Importance.** For one layer and one batch, expert ``e``'s importance is the sum of the routing (combine)
weights of the tokens routed to it; an expert is *activated* if any token routes to it (ids ``< 0`` are
padding and ignored).

**Bit router** (:func:`assign_bits`). Every activated expert needs at least its base plane; the rest of the
budget buys residual planes. Objective: minimize ``sum_e importance_e * err(bits_e)`` within the budget, with
``err(b)`` a per-width error model (default ``4**-b``, the mean-square error of a ``b``-bit uniform grid up
to a constant; pass measured errors as ``level_error``). Greedy: repeatedly buy the next plane with the
largest ``importance * (err(level) - err(level + 1)) / cost(plane)`` that fits, subject to the rule that an
expert never gets more bits than a more important one (ties broken by expert id). So:

- the cost never exceeds the budget (unless the bases alone do: ``strict=True`` raises, ``strict=False``
  returns the bases and ``over_budget=True``), and
- ``importance_a > importance_b`` implies ``bits_a >= bits_b``.

Budgets: ``budget_bytes`` (total bytes of the activated experts' planes, costs from ``plane_nbytes``),
``avg_bits`` (the mean width over activated experts: at most ``avg_bits * n_activated`` nominal bits; costs are
the planes' nominal bits), or both: then a plane is bought only if it fits **both** budgets (the tighter one
binds), and the greedy ranks planes by their byte cost. D²MoE's serving runtime passes both: the memory share
of the layer in bytes and the target average width (``OffloadConfig.avg_bits``).

**HEBF order** (:func:`hebf_order`): the order to fetch ``(expert, plane)`` items from slow storage so the
most useful bytes arrive first and compute can start on them: all base planes, hottest expert first; then the
residual planes by the same importance-times-error-reduction per byte (made non-increasing along each expert's
planes, so an expert's planes always arrive in order). Items already resident are skipped.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence

import numpy as np


def expert_importance(expert_ids, weights, num_experts: int):
    """``(importance [E] float64, counts [E] int64)`` from routing ``expert_ids`` / ``weights`` ``[..., K]``
    (ids ``< 0`` ignored; ``ValueError`` for ids ``>= num_experts`` or mismatched shapes)."""
    ids = np.asarray(expert_ids)
    w = np.asarray(weights, dtype=np.float64)
    if ids.shape != w.shape:
        raise ValueError(f"expert_ids and weights must have the same shape, got {ids.shape} and {w.shape}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"expert_ids must be integers, got {ids.dtype}")
    if not isinstance(num_experts, (int, np.integer)) or num_experts <= 0:
        raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
    ids, w = ids.reshape(-1), w.reshape(-1)
    if ids.size and ids.max() >= num_experts:
        raise ValueError(f"expert_ids contains {int(ids.max())}, outside [0, {num_experts})")
    keep = ids >= 0
    imp = np.zeros(num_experts, np.float64)
    cnt = np.zeros(num_experts, np.int64)
    np.add.at(imp, ids[keep], w[keep])
    np.add.at(cnt, ids[keep], 1)
    return imp, cnt


def _check_bits(allowed_bits) -> tuple:
    bits = tuple(int(b) for b in allowed_bits)
    if not bits or any(b <= 0 for b in bits) or any(b2 <= b1 for b1, b2 in itertools.pairwise(bits)):
        raise ValueError(f"allowed_bits must be positive and strictly increasing, e.g. (2, 3, 4, 8); got {bits}")
    return bits


def _cost_table(E, bits, plane_nbytes, unit):
    P = len(bits)
    if unit == "bits":
        steps = np.array((bits[0],) + tuple(b2 - b1 for b1, b2 in itertools.pairwise(bits)), np.float64)
        return np.broadcast_to(steps, (E, P))
    if plane_nbytes is None:
        raise ValueError("budget_bytes needs plane_nbytes (bytes of each plane per expert, e.g. "
                         "QuantizedExperts.plane_nbytes_list())")
    c = np.asarray(plane_nbytes, np.float64)
    if c.ndim == 1:
        c = np.broadcast_to(c, (E, c.shape[0]))
    if c.shape != (E, P):
        raise ValueError(f"plane_nbytes must have shape ({P},) or ({E}, {P}) (one entry per plane in "
                         f"allowed_bits={bits}), got {c.shape}")
    if np.any(c <= 0):
        raise ValueError("plane_nbytes entries must be positive")
    return c


def _error_table(E, bits, level_error):
    if level_error is None:
        err = 4.0 ** -np.asarray(bits, np.float64)
    else:
        err = np.asarray(level_error, np.float64)
    if err.ndim == 1:
        err = np.broadcast_to(err, (E, err.shape[0]))
    if err.shape != (E, len(bits)):
        raise ValueError(f"level_error must have shape ({len(bits)},) or ({E}, {len(bits)}), got {err.shape}")
    if np.any(np.diff(err, axis=1) > 0):
        raise ValueError("level_error must be non-increasing along the widths")
    return err


@dataclasses.dataclass(frozen=True)
class BitAssignment:
    """A bit router decision for one layer and batch.

    Attributes:
      bits: width per expert (``0`` = not activated), length ``E``.
      importance: summed routing weight per expert.
      cost: total cost of the chosen planes (bytes or nominal bits, per ``unit``).
      budget: the budget in the same unit.
      unit: ``"bytes"`` or ``"bits"`` (``"bytes"`` when a byte budget was given, also together with ``avg_bits``).
      bits_cost, bits_budget: the chosen widths' nominal bits and the ``avg_bits`` budget
        (``avg_bits * n_activated``; ``None`` without ``avg_bits``).
      allowed_bits: the widths (the quantizer's ``config.bits``).
      upgrades: the residual planes in the order the greedy bought them, ``((expert, plane), ...)``.
      over_budget: the bases alone exceeded the budget (only with ``strict=False``).
    """

    bits: tuple
    importance: np.ndarray
    cost: float
    budget: float
    unit: str
    allowed_bits: tuple
    upgrades: tuple
    over_budget: bool
    plane_cost: np.ndarray = dataclasses.field(repr=False, default=None)
    level_error: np.ndarray = dataclasses.field(repr=False, default=None)
    bits_cost: float = 0.0
    bits_budget: float | None = None

    @property
    def mean_bits(self) -> float:
        """Mean width over the activated experts (0.0 if none)."""
        used = [b for b in self.bits if b]
        return float(sum(used)) / len(used) if used else 0.0

    def bits_per_expert(self) -> dict:
        """``{expert: bits}`` for the activated experts."""
        return {e: b for e, b in enumerate(self.bits) if b}

    def load_order(self, resident=()) -> list:
        """HEBF order of this assignment's ``(expert, plane)`` items (see :func:`hebf_order`)."""
        return hebf_order(self.bits, self.importance, self.allowed_bits, plane_cost=self.plane_cost,
                          level_error=self.level_error, resident=resident)


def assign_bits(expert_ids, weights, num_experts: int, *, allowed_bits: Sequence[int] = (2, 3, 4, 8),
                budget_bytes: float | None = None, avg_bits: float | None = None, plane_nbytes=None,
                level_error=None, strict: bool = True) -> BitAssignment:
    """Give each activated expert a width from ``allowed_bits`` by importance, within a budget.

    Args:
      expert_ids, weights: routing of the batch, ``[T, K]`` (any shape, same for both); ids ``< 0`` ignored.
      num_experts: ``E``.
      allowed_bits: the nested widths (``QuantizedExperts.bits``).
      budget_bytes: total bytes allowed for the activated experts' planes (needs ``plane_nbytes``), and/or
      avg_bits: the largest mean width over the activated experts (``avg_bits * n_activated`` nominal bits).
        At least one of the two; with both, every plane bought must fit both budgets (ranked per byte).
      plane_nbytes: bytes of each plane of one expert, ``[P]`` or ``[E, P]``
        (``QuantizedExperts.plane_nbytes_list()``).
      level_error: error model per width, ``[P]`` or ``[E, P]``, non-increasing (default ``4**-bits``).
      strict: if the base planes alone exceed the budget, raise ``ValueError`` (default) or return the bases
        with ``over_budget=True``.

    See the module docstring for the rule; the result's :meth:`BitAssignment.load_order` gives the HEBF order.
    """
    bits = _check_bits(allowed_bits)
    if budget_bytes is None and avg_bits is None:
        raise ValueError("give budget_bytes, avg_bits or both")
    imp, cnt = expert_importance(expert_ids, weights, num_experts)
    E, P = num_experts, len(bits)
    unit = "bytes" if budget_bytes is not None else "bits"
    cost = _cost_table(E, bits, plane_nbytes, unit)
    nominal = _cost_table(E, bits, None, "bits")
    err = _error_table(E, bits, level_error)
    active = [e for e in sorted(range(E), key=lambda e: (-imp[e], e)) if cnt[e] > 0]
    bits_budget = None
    if avg_bits is not None:
        if not isinstance(avg_bits, (int, float, np.integer, np.floating)) or not np.isfinite(avg_bits) \
                or not bits[0] <= avg_bits:
            raise ValueError(f"avg_bits must be >= the base width {bits[0]} (allowed_bits={bits}), got {avg_bits!r}")
        bits_budget = float(avg_bits) * len(active)
    if unit == "bytes":
        budget = float(budget_bytes)
        if not np.isfinite(budget) or budget < 0:
            raise ValueError(f"budget_bytes must be a non-negative number, got {budget_bytes!r}")
    else:
        budget = bits_budget
    tol = 1 + 1e-12
    level = {e: 0 for e in active}
    total = float(sum(cost[e, 0] for e in active))
    nbits = float(sum(nominal[e, 0] for e in active))
    over = total > budget * tol
    if over and strict:
        raise ValueError(f"budget {budget:g} {unit} is below the {total:g} {unit} the base planes of the "
                         f"{len(active)} activated experts need (strict=True)")
    upgrades = []
    while not over:
        best, best_key = None, None
        for i, e in enumerate(active):
            lv = level[e]
            if lv + 1 >= P:
                continue
            if i > 0 and level[active[i - 1]] <= lv:  # a more important expert must stay strictly ahead
                continue
            c = cost[e, lv + 1]
            if total + c > budget * tol:
                continue
            if bits_budget is not None and nbits + nominal[e, lv + 1] > bits_budget * tol:
                continue
            key = (imp[e] * (err[e, lv] - err[e, lv + 1]) / c, -i)
            if best_key is None or key > best_key:
                best, best_key = e, key
        if best is None:
            break
        level[best] += 1
        total += float(cost[best, level[best]])
        nbits += float(nominal[best, level[best]])
        upgrades.append((best, level[best]))
    out = [0] * E
    for e, lv in level.items():
        out[e] = bits[lv]
    return BitAssignment(tuple(out), imp, total, budget, unit, bits, tuple(upgrades), over,
                         plane_cost=np.asarray(cost), level_error=np.asarray(err), bits_cost=nbits,
                         bits_budget=bits_budget)


def hebf_order(bits_per_expert, importance, allowed_bits: Sequence[int] = (2, 3, 4, 8), *, plane_cost=None,
               level_error=None, resident=()) -> list:
    """Hottest-expert-bit-first load order of the ``(expert, plane)`` items needed for ``bits_per_expert``.

    Args:
      bits_per_expert: width per expert (sequence of ``E``, 0/``None`` = not needed) or a mapping
        ``expert -> bits``.
      importance: per-expert importance (e.g. :func:`expert_importance`), length ``E``.
      allowed_bits: the nested widths; plane ``p`` is needed for widths ``>= allowed_bits[p]``.
      plane_cost: bytes (or any cost) per plane, ``[P]`` or ``[E, P]``; default: the planes' nominal bits.
      level_error: error model per width (default ``4**-bits``).
      resident: ``(expert, plane)`` items already in memory, left out of the order.

    Returns ``[(expert, plane), ...]``: every needed base plane (hottest expert first), then the residual
    planes by importance x error reduction per cost (ties: lower plane, hotter expert, lower id). Each expert's
    planes appear in increasing order, base first.
    """
    bits = _check_bits(allowed_bits)
    imp = np.asarray(importance, np.float64)
    E = imp.shape[0]
    if isinstance(bits_per_expert, dict):
        bpe = [bits_per_expert.get(e) or 0 for e in range(E)]
    else:
        bpe = [int(b or 0) for b in bits_per_expert]
    if len(bpe) != E:
        raise ValueError(f"bits_per_expert has {len(bpe)} entries but importance has {E}")
    for e, b in enumerate(bpe):
        if b and b not in bits:
            raise ValueError(f"expert {e}: width {b} is not one of allowed_bits={bits}")
    cost = _cost_table(E, bits, plane_cost, "bits" if plane_cost is None else "bytes")
    err = _error_table(E, bits, level_error)
    resident = {(int(e), int(p)) for e, p in resident}
    keyed = []
    for e, b in enumerate(bpe):
        if not b:
            continue
        keyed.append(((0, -imp[e], 0, e), (e, 0)))
        ratio = np.inf
        for p in range(1, bits.index(b) + 1):
            ratio = min(ratio, imp[e] * (err[e, p - 1] - err[e, p]) / cost[e, p])
            keyed.append(((1, -ratio, p, -imp[e], e), (e, p)))
    keyed.sort(key=lambda kv: kv[0])
    return [item for _, item in keyed if item not in resident]
