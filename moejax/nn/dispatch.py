"""The token <-> expert layout shared by every MoE variant.

A routing gives each token ``K`` slots (expert id, weight, mask). Dispatch lays the routed slots out as rows
grouped by expert; experts compute on rows only; combine gathers each slot's row back and sums the slots of a
token with their weights. Two layouts, both built by one stable sort of the slots by expert id:

- **dropless**: rows of expert ``e`` are contiguous and padded up to a multiple of ``block_rows`` (so a row
  tile belongs to one expert); nothing is dropped. ``block_rows=1`` gives the unpadded layout that
  ``lax.ragged_dot`` expects.
- **capacity**: per routing group a fixed ``[E, C]`` buffer; slots beyond an expert's capacity are dropped in
  priority order -- all first choices before second choices, token order within a choice (GShard/Tutel).

Both are plain integer index arrays (a :class:`Layout`), so gather/combine are ``take`` operations whose
gradients are scatter-adds, and every variant is tested against a naive per-token loop.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from moejax.nn.routers import expert_choice_capacity


class Layout(NamedTuple):
    row_token: jax.Array     # [R] int32: token of each row, T for an empty row
    row_slot: jax.Array      # [R] int32: slot (token-major t*K + k) of each row, T*K for an empty row
    slot_row: jax.Array      # [T*K] int32: row of each slot (token-major), R for a dropped/unrouted slot
    group_sizes: jax.Array   # [E] int32: kept rows per expert (summed over routing groups)
    expert_tiles: jax.Array  # [E+1] int32: dropless: tile offsets per expert; capacity: unused (zeros)
    dropped: jax.Array       # [] int32: routed slots dropped by capacity
    capacity_used: jax.Array  # [] int32: capacity: max kept rows of an expert in a group; dropless: max group


def capacity_for(group_tokens: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """Per-expert buffer rows of one routing group (Tutel semantics, see ``MoEConfig.capacity_factor``)."""
    if capacity_factor == 0:
        return group_tokens
    c = math.ceil(abs(capacity_factor) * group_tokens * top_k / num_experts - 1e-9)
    return int(max(1, min(c, group_tokens)))


def layer_capacity(router_type: str, group_tokens: int, num_experts: int, top_k: int,
                   capacity_factor: float) -> int:
    """Per-expert buffer rows of one routing group for a router: Expert Choice's own capacity, else
    :func:`capacity_for`."""
    if router_type == "expert_choice":
        return expert_choice_capacity(group_tokens, num_experts, capacity_factor)
    return capacity_for(group_tokens, num_experts, top_k, capacity_factor)


def default_block_rows(num_slots: int, num_experts: int) -> int:
    """Row tile for the dropless tile loop: about a quarter of the mean rows per expert, in [8, 128]."""
    mean = max(1, num_slots // num_experts)
    return int(min(128, max(8, 2 ** int(math.floor(math.log2(max(1, mean // 4)))))))


def _sort_slots(keys: jax.Array, num_experts: int):
    """Stable sort of slot keys (expert id, ``num_experts`` for unrouted). Returns order, counts, starts."""
    order = jnp.argsort(keys, stable=True)
    counts = jnp.bincount(keys, length=num_experts + 1)[:num_experts].astype(jnp.int32)
    starts = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(counts)[:-1].astype(jnp.int32)])
    return order, counts, starts


def dropless_layout(expert_ids: jax.Array, mask: jax.Array, num_experts: int, block_rows: int) -> Layout:
    """Dropless layout of ``[T, K]`` slots; each expert's rows padded to a multiple of ``block_rows``."""
    T, K = expert_ids.shape
    E, bt = num_experts, block_rows
    n = T * K
    keys = jnp.where(mask, expert_ids, E).reshape(-1).astype(jnp.int32)
    order, counts, starts = _sort_slots(keys, E)
    tiles = (counts + bt - 1) // bt
    expert_tiles = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(tiles).astype(jnp.int32)])
    n_tiles = n if bt == 1 else n // bt + E  # sum_e ceil(n_e / bt) <= n // bt + E
    R = n_tiles * bt
    sorted_keys = keys[order]
    e_sorted = jnp.minimum(sorted_keys, E - 1)
    j = jnp.arange(n, dtype=jnp.int32)
    rows_sorted = expert_tiles[e_sorted] * bt + j - starts[e_sorted]
    rows_sorted = jnp.where(sorted_keys < E, rows_sorted, R)
    slot_row = jnp.zeros(n, jnp.int32).at[order].set(rows_sorted)
    row_slot = jnp.full(R, n, jnp.int32).at[slot_row].set(jnp.arange(n, dtype=jnp.int32), mode="drop")
    return Layout(row_slot // K, row_slot, slot_row, counts, expert_tiles, jnp.zeros((), jnp.int32), jnp.max(counts))


def capacity_layout(expert_ids: jax.Array, mask: jax.Array, num_experts: int, capacity: int) -> Layout:
    """Capacity layout of ``[G, S, K]`` slots into ``[G, E, C]`` rows (row ``(g*E + e)*C + rank``)."""
    G, S, K = expert_ids.shape
    E, C = num_experts, capacity
    keys = jnp.where(mask, expert_ids, E).astype(jnp.int32)
    # Priority order: choice rank k first, then token order (GShard/Tutel).
    kmajor = jnp.swapaxes(keys, 1, 2).reshape(G, K * S)

    def one_group(kk):
        order, counts, starts = _sort_slots(kk, E)
        sk = kk[order]
        e_s = jnp.minimum(sk, E - 1)
        rank = jnp.arange(K * S, dtype=jnp.int32) - starts[e_s]
        keep = (sk < E) & (rank < C)
        row = jnp.where(keep, e_s * C + rank, -1)
        row_k = jnp.zeros(K * S, jnp.int32).at[order].set(row)  # in k-major slot order
        return row_k, jnp.minimum(counts, C), jnp.sum((sk < E) & ~keep)

    row_k, kept, dropped = jax.vmap(one_group)(kmajor)
    R = G * E * C
    row_k = jnp.where(row_k >= 0, row_k + (jnp.arange(G, dtype=jnp.int32) * E * C)[:, None], R)
    slot_row = jnp.swapaxes(row_k.reshape(G, K, S), 1, 2).reshape(-1)  # token-major
    T = G * S
    row_slot = jnp.full(R, T * K, jnp.int32).at[slot_row].set(jnp.arange(T * K, dtype=jnp.int32), mode="drop")
    return Layout(row_slot // K, row_slot, slot_row, jnp.sum(kept, 0).astype(jnp.int32), jnp.zeros(E + 1, jnp.int32),
                  jnp.sum(dropped).astype(jnp.int32), jnp.max(kept).astype(jnp.int32))


def gather_rows(x: jax.Array, layout: Layout) -> jax.Array:
    """Rows ``[R, D]`` of the layout from tokens ``x [T, D]`` (empty rows are zero)."""
    xz = jnp.concatenate([x, jnp.zeros((1,) + x.shape[1:], x.dtype)], 0)
    return jnp.take(xz, layout.row_token, axis=0)


def combine_rows(y: jax.Array, layout: Layout, weights: jax.Array) -> jax.Array:
    """Tokens ``[T, D]``: ``sum_k weights[t, k] * y[row(t, k)]`` (dropped slots contribute zero).

    The weighted sum runs in float32 and is cast back to ``y.dtype``.
    """
    T, K = weights.shape
    yz = jnp.concatenate([y, jnp.zeros((1,) + y.shape[1:], y.dtype)], 0)
    ys = jnp.take(yz, layout.slot_row, axis=0).reshape(T, K, -1)
    out = jnp.einsum("tk,tkd->td", weights.astype(jnp.float32), ys.astype(jnp.float32))
    return out.astype(y.dtype)


def dense_layout(expert_ids: jax.Array, mask: jax.Array, num_experts: int) -> Layout:
    """Statistics-only layout for the ``dense`` path (every expert sees every token; nothing dropped)."""
    T, K = expert_ids.shape
    counts = jnp.bincount(jnp.where(mask, expert_ids, num_experts).reshape(-1), length=num_experts + 1)
    counts = counts[:num_experts].astype(jnp.int32)
    empty = jnp.zeros(0, jnp.int32)
    return Layout(empty, empty, empty, counts, jnp.zeros(num_experts + 1, jnp.int32), jnp.zeros((), jnp.int32),
                  jnp.max(counts))


def dense_combine_weights(weights: jax.Array, expert_ids: jax.Array, num_experts: int) -> jax.Array:
    """``[T, E]`` combine matrix from ``[T, K]`` slot weights (0 for unrouted slots and other experts)."""
    onehot = jax.nn.one_hot(expert_ids, num_experts, dtype=weights.dtype)
    return jnp.einsum("tk,tke->te", weights, onehot)
