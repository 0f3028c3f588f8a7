"""Where tensor parallelism plugs into the layers (``nn`` never imports :mod:`moejax.parallel`).

A layer whose weights may be split over a tensor axis marks the two edges of that region:

- :func:`tensor_input` on the input of a column-parallel projection (Megatron's ``f``), and
- :func:`tensor_output` on the output of a row-parallel one (Megatron's ``g``).

Both are identities unless a :class:`TensorOps` is installed for the trace with :func:`tensor_ops`, which is
what :func:`moejax.parallel.tensor_parallel.tensor_parallel` does (its ``f``/``g`` sum over the mesh axis).
Attention (q/k/v column-parallel over heads, output row-parallel), the dense and shared SwiGLU FFNs and the
routed experts (``d_ff`` column/row-parallel, :mod:`moejax.nn.stages`) use these two edges; nothing else in
``nn`` knows about meshes. Like the MoE stage choices, the installed ops take effect when a function is
*traced*.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable
from dataclasses import dataclass

import jax

from moejax.nn.context import scoped


@dataclass(frozen=True)
class TensorOps:
    """The two edges of a tensor-parallel region over mesh axis ``axis``.

    ``enter(x)``: identity forward, its gradient summed over ``axis`` backward (``f``);
    ``exit(y)``: partial results summed over ``axis`` forward, identity backward (``g``).
    """

    axis: str
    enter: Callable[[jax.Array], jax.Array]
    exit: Callable[[jax.Array], jax.Array]


_OPS: contextvars.ContextVar[TensorOps | None] = contextvars.ContextVar("moejax_tensor_ops", default=None)


@contextlib.contextmanager
def tensor_ops(ops: TensorOps | None):
    """Trace-time context: layers traced inside use ``ops`` at their tensor-parallel edges (None: identities)."""
    if ops is not None and not isinstance(ops, TensorOps):
        raise TypeError(f"tensor_ops takes a moejax.nn.sharding.TensorOps or None, got {type(ops).__name__}")
    with scoped(_OPS, ops):
        yield


def current_tensor_ops() -> TensorOps | None:
    """The :class:`TensorOps` installed for the current trace (None outside tensor parallelism)."""
    return _OPS.get()


def tensor_input(x: jax.Array) -> jax.Array:
    """Megatron's ``f`` on the input of a column-parallel layer (identity without tensor parallelism)."""
    ops = _OPS.get()
    return x if ops is None else ops.enter(x)


def tensor_output(y: jax.Array) -> jax.Array:
    """Megatron's ``g`` on the output of a row-parallel layer (identity without tensor parallelism)."""
    ops = _OPS.get()
    return y if ops is None else ops.exit(y)
