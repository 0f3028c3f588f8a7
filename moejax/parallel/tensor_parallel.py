"""Megatron-style tensor parallelism over the ``tensor`` mesh axis (inside the trainer's ``shard_map``).

Attention's q/k/v projections are column-parallel over heads (each ``tensor`` rank holds ``n_heads / t``
query and ``n_kv_heads / t`` key/value heads) and its output projection row-parallel; the dense SwiGLU FFN,
the shared experts and the routed experts are column-parallel over ``d_ff`` (gate, up) and row-parallel
(down). Activations between these layers (the residual stream, norms, router, embeddings) are replicated over
``tensor``. Two operators (Megatron's ``f`` and ``g``) join them:

- :func:`copy_to_tensor` (``f``) on the input of a column-parallel layer: identity forward, ``psum`` over
  ``tensor`` backward (each rank's input gradient covers only its own heads / ``d_ff`` columns).
- :func:`reduce_from_tensor` (``g``) on the output of a row-parallel layer: ``psum`` over ``tensor`` forward,
  identity backward.

Layers use them only under :func:`tensor_parallel` (a trace-time context, like
:func:`moejax.parallel.expert_parallel.expert_parallel`), which installs them at the layers' tensor-parallel
edges (:mod:`moejax.nn.sharding`: ``nn`` itself never imports this module), so single-device code paths are
unchanged. With
them every replicated value -- and so every replicated parameter's gradient -- is identical on all ``tensor``
ranks, and the trainer's gradient reduction (over the batch axes only) needs no ``tensor`` reduction.

In the expert-parallel MoE layer ``f`` is applied to the tokens entering the ``order`` stage (before the
dispatch ``all_to_all``; the dispatch and ``psum`` over ``tensor`` commute) and ``g`` inside the ``expert``
stage, on the expert output rows before the combine ``all_to_all``. ``g`` is written with plain primitives
(``psum``, ``stop_gradient``, ``add``, ``sub``: elementwise along tokens) so the FSMoE pipelining pass
(:func:`moejax.schedule.overlap.pipeline_moe`) can chunk the expert stage that holds it.
"""

from __future__ import annotations

import contextlib
from functools import partial

import jax

from moejax.nn.sharding import TensorOps, current_tensor_ops, tensor_ops


@contextlib.contextmanager
def tensor_parallel(axis: str = "tensor"):
    """Trace-time context: attention, dense SwiGLU and expert layers traced inside run tensor-parallel over the
    mesh axis ``axis`` (their tensor-sharded parameters arrive as local shards). Installs :func:`copy_to_tensor`
    and :func:`reduce_from_tensor` at the layers' tensor-parallel edges (:mod:`moejax.nn.sharding`)."""
    ops = TensorOps(axis, partial(copy_to_tensor, axis=axis), partial(reduce_from_tensor, axis=axis))
    with tensor_ops(ops):
        yield


def current() -> str | None:
    """The tensor-parallel mesh axis of the enclosing :func:`tensor_parallel` block (``None``: not parallel)."""
    ops = current_tensor_ops()
    return None if ops is None else ops.axis


@partial(jax.custom_vjp, nondiff_argnums=(1,))
def _copy(x, axis):
    return x


def _copy_fwd(x, axis):
    return x, None


def _copy_bwd(axis, _, g):
    return (jax.lax.psum(g, axis),)


_copy.defvjp(_copy_fwd, _copy_bwd)


# Inside a ``jit``: the scheduling passes of :mod:`moejax.schedule.overlap` re-bind the equations of the traced
# step one by one, which works for a ``jit`` equation but not for a bare ``custom_vjp_call``.
_copy_jit = jax.jit(_copy, static_argnums=(1,))


def copy_to_tensor(x: jax.Array, axis: str | None = None) -> jax.Array:
    """Megatron's ``f``: identity forward, gradient ``psum`` over the tensor axis backward (no-op outside
    :func:`tensor_parallel` when ``axis`` is not given)."""
    axis = axis or current()
    return x if axis is None else _copy_jit(x, axis)


def reduce_from_tensor(x: jax.Array, axis: str | None = None) -> jax.Array:
    """Megatron's ``g``: ``psum`` over the tensor axis forward, identity backward (no-op outside
    :func:`tensor_parallel` when ``axis`` is not given).

    Plain primitives instead of a custom VJP: ``psum(stop_gradient(x)) + (x - stop_gradient(x))`` is exactly
    ``psum(x)`` forward (``x - x == 0``), and its derivative goes through the second term only."""
    axis = axis or current()
    if axis is None:
        return x
    sx = jax.lax.stop_gradient(x)
    return jax.lax.psum(sx, axis) + (x - sx)


def check_config(cfg, tensor: int) -> None:
    """``ValueError`` naming the field when a model dimension that ``tensor`` shards is not divisible by it."""
    if tensor <= 1:
        return
    dims = [("ModelConfig.n_heads", cfg.n_heads), ("ModelConfig.n_kv_heads", cfg.n_kv_heads)]
    if any(k != "moe" for k in cfg.layer_kinds()):
        dims.append(("ModelConfig.d_ff", cfg.d_ff))
    if cfg.moe is not None:
        dims.append(("MoEConfig.d_ff", cfg.moe.d_ff))
        if cfg.moe.num_shared_experts:
            dims.append(("MoEConfig.num_shared_experts * shared_d_ff",
                         cfg.moe.num_shared_experts * (cfg.moe.shared_d_ff or cfg.moe.d_ff)))
    for name, v in dims:
        if v % tensor:
            raise ValueError(f"{name}={v} is not divisible by MeshConfig.tensor={tensor}: tensor parallelism "
                             f"shards attention heads (n_heads, n_kv_heads) and FFN widths (d_ff) over the "
                             f"tensor axis")
