"""The dropless (ragged) expert-parallel exchange: ``jax.lax.ragged_all_to_all`` and a CPU emulation of it.

Used by the ``expert_parallel_ragged`` path of :mod:`moejax.nn.stages` (``expert_parallel(a2a="ragged")``).
Each device sorts its ``(token, slot)`` rows by expert (the dropless layout of :mod:`moejax.nn.dispatch`);
experts are sharded contiguously over the EP axis (device ``j`` owns experts ``[j*E/n, (j+1)*E/n)``), so the
rows for device ``j`` are one contiguous slice. :func:`make_plan` exchanges the per-expert row counts with an
``all_to_all`` and derives every offset and size; :func:`exchange` sends the rows, which arrive grouped by
``(source device, local expert)``, source-major, in a receive buffer of static size ``M``; the reverse
exchange (:func:`exchange` with :meth:`RaggedPlan.reverse`) returns the expert outputs to their rows.

The receive buffer holds at most ``M`` rows. When more would arrive, the receiver keeps the first ``M`` in
(source, local expert, token) order and the rest are *dropped*: their outputs are zero, like a capacity drop,
and they are counted in ``RaggedPlan.dropped`` (the layer's ``aux["dropped"]``). With the worst-case bound
``M = n * T * K`` nothing can be dropped.

XLA:CPU does not implement ``ragged_all_to_all`` (it fails at compile time); :func:`ragged_all_to_all_emulated`
implements the documented semantics with ``all_gather`` and masked gathers, which run everywhere (at ``n`` times
the traffic and memory): it is the path the CPU tests run (``a2a="ragged_emulated"``). The real primitive has
JVP and transpose rules in jax (the transpose is the reverse ragged exchange), so gradients need no custom VJP.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


def ragged_all_to_all_emulated(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, axis_name):
    """``jax.lax.ragged_all_to_all`` with ops every backend runs (all_gather + masked gathers).

    Same arguments and result as the primitive (see its docstring): every device sends
    ``operand[input_offsets[i] : input_offsets[i] + send_sizes[i]]`` to device ``i // (N / n)``, which writes it
    at ``output_offsets[i]`` (an offset in the *receiver's* buffer) with ``recv_sizes`` rows (its entry
    ``s * N/n + j`` for the ``j``-th slice from device ``s``); the rest of ``output`` is unchanged. Rows that
    would fall outside the receiver's buffer are not written.
    """
    N = input_offsets.shape[0]
    n = jax.lax.psum(1, axis_name)
    if N % n:
        raise ValueError(f"ragged_all_to_all: {N} offsets are not divisible by the axis size {n}")
    spd = N // n
    me = jax.lax.axis_index(axis_name)
    ops = jax.lax.all_gather(operand, axis_name)                    # [n, R, ...]
    in_off = jax.lax.all_gather(input_offsets, axis_name)           # [n, N]
    out_off = jax.lax.all_gather(output_offsets, axis_name)         # [n, N]
    R, M = operand.shape[0], output.shape[0]
    m = jnp.arange(M, dtype=jnp.int32)
    bshape = (M,) + (1,) * (output.ndim - 1)
    result = output
    for s in range(n):
        for j in range(spd):
            i = me * spd + j                                        # the sender's entry for this receiver
            start = jax.lax.dynamic_index_in_dim(out_off[s], i, keepdims=False).astype(jnp.int32)
            src = jax.lax.dynamic_index_in_dim(in_off[s], i, keepdims=False).astype(jnp.int32)
            size = recv_sizes[s * spd + j].astype(jnp.int32)
            hit = (m >= start) & (m < start + size)
            rows = jnp.take(ops[s], jnp.clip(src + m - start, 0, R - 1), axis=0)
            result = jnp.where(hit.reshape(bshape), rows.astype(output.dtype), result)
    return result


def exchange(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, axis_name, *,
             emulated: bool):
    """The ragged exchange: the real ``jax.lax.ragged_all_to_all`` or (``emulated``) its CPU emulation."""
    if emulated:
        return ragged_all_to_all_emulated(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes,
                                          axis_name)
    return jax.lax.ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes,
                                     axis_name=axis_name)


class RaggedPlan(NamedTuple):
    """Offsets and sizes of one ragged EP exchange (all int32, per peer device ``[n]`` unless noted).

    Dispatch (this device as sender): rows ``send_offsets[j] : + send_sizes[j]`` of the expert-sorted rows go
    to device ``j``, at ``remote_offsets[j]`` in its receive buffer. As receiver: device ``s``'s rows are at
    ``recv_offsets[s] : + recv_sizes[s]``; ``source_offsets[s]`` is where they came from in ``s``'s rows (the
    return exchange writes them back there). ``row_expert [M]``: the local expert of each receive-buffer row
    (``E/n`` for an empty row). ``dropped []``: rows this device sent that did not fit the receiver's buffer.
    """

    send_offsets: jax.Array
    send_sizes: jax.Array
    remote_offsets: jax.Array
    recv_offsets: jax.Array
    recv_sizes: jax.Array
    source_offsets: jax.Array
    row_expert: jax.Array
    dropped: jax.Array

    def forward_args(self):
        """``(input_offsets, send_sizes, output_offsets, recv_sizes)`` of the dispatch exchange."""
        return self.send_offsets, self.send_sizes, self.remote_offsets, self.recv_sizes

    def reverse_args(self):
        """``(input_offsets, send_sizes, output_offsets, recv_sizes)`` of the return exchange."""
        return self.recv_offsets, self.recv_sizes, self.source_offsets, self.send_sizes


def _exclusive_cumsum(x, axis=-1):
    return jnp.cumsum(x, axis=axis) - x


def receive_rows(num_rows: int, n: int, bound_factor: float | None) -> int:
    """Static receive-buffer rows ``M`` for ``num_rows = T*K`` local rows on ``n`` devices.

    ``bound_factor=None``: the worst case ``n * T * K`` (every device sends every row here; nothing can be
    dropped). Otherwise ``ceil(bound_factor * T * K)`` (the balanced load is ``T * K``), at most the worst
    case and at least 1.
    """
    worst = n * num_rows
    if bound_factor is None:
        return max(1, worst)
    if not bound_factor > 0:
        raise ValueError(f"EPContext.ragged_bound={bound_factor!r} is invalid: must be > 0 or None")
    return int(max(1, min(worst, -(-bound_factor * num_rows // 1))))


def make_plan(group_sizes: jax.Array, axis_name, n: int, recv_rows: int) -> RaggedPlan:
    """The exchange plan from this device's rows per expert ``group_sizes [E]`` (expert-sorted rows).

    One ``all_to_all`` of the per-expert counts tells each device what it receives; the receiver keeps the
    first ``recv_rows`` rows in (source, local expert) order, and two small ``all_to_all`` ops tell each sender
    how many rows are kept and where they land, and each receiver where its rows came from.
    """
    E = group_sizes.shape[0]
    El = E // n
    M = recv_rows
    counts = group_sizes.astype(jnp.int32).reshape(n, El)
    send_req = jnp.sum(counts, 1)                                   # rows for each destination
    send_offsets = _exclusive_cumsum(send_req)
    recv_counts = jax.lax.all_to_all(counts, axis_name, 0, 0, tiled=True)  # [n(source), El]
    recv_req = jnp.sum(recv_counts, 1)
    recv_start = _exclusive_cumsum(recv_req)
    recv_sizes = jnp.clip(M - recv_start, 0, recv_req).astype(jnp.int32)
    recv_offsets = jnp.where(recv_sizes > 0, recv_start, 0).astype(jnp.int32)
    send_sizes = jax.lax.all_to_all(recv_sizes, axis_name, 0, 0, tiled=True)
    send_offsets = jnp.where(send_sizes > 0, send_offsets, 0)  # empty slices at offset 0 (never past the end)
    remote_offsets = jax.lax.all_to_all(recv_offsets, axis_name, 0, 0, tiled=True)
    source_offsets = jax.lax.all_to_all(send_offsets, axis_name, 0, 0, tiled=True)
    # kept rows per (source, local expert): the first recv_sizes[s] rows of s's block, in local-expert order
    kept = jnp.clip(recv_sizes[:, None] - _exclusive_cumsum(recv_counts), 0, recv_counts).reshape(-1)
    group_end = jnp.cumsum(kept)                                    # blocks are contiguous from row 0
    rows = jnp.arange(M, dtype=jnp.int32)
    g = jnp.searchsorted(group_end, rows, side="right")
    row_expert = jnp.where(rows < group_end[-1], g % El, El).astype(jnp.int32)
    dropped = jnp.sum(send_req - send_sizes).astype(jnp.int32)
    return RaggedPlan(send_offsets.astype(jnp.int32), send_sizes.astype(jnp.int32),
                      remote_offsets.astype(jnp.int32), recv_offsets, recv_sizes,
                      source_offsets.astype(jnp.int32), row_expert, dropped)
