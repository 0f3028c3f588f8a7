"""N:M weight sparsity in the layers: the hook every projection goes through, and the training methods.

Every projection weight a layer multiplies by goes through :func:`sparse_weight` first, naming its *site*
(``"attention"``, ``"mlp"`` for dense and shared SwiGLU FFNs, ``"experts"`` for routed experts) and the two
axes that matter for N:M groups: the weight's reduction axis in the forward GEMM (``Y = X W``) and its output
axis (the reduction axis of the activation-gradient GEMM ``dX = dY W^T``). Without an installed
:class:`SparseOps` (the default) it returns the weight unchanged and the layer runs its plain ``einsum``: not a
single extra op. :func:`sparse_training` installs one for the trace; it returns either one
weight (used by both GEMMs: SR-STE, transposable masks) or a :class:`Dual` pair (BDWP: the forward GEMM uses
``Dual.fwd``, the activation gradient ``Dual.bwd``), and the layer multiplies with :func:`einsum` or
:func:`dual`, whose custom VJP computes ``dX`` with ``Dual.bwd`` and the weight gradient with the forward
input (so it reaches the dense weight through ``Dual.fwd``). Router and embedding weights never pass through
here. Like the other trace-time settings (:mod:`moejax.nn.context`), the installed ops take effect when a
function is *traced*.

The methods (``SparsityConfig.method``; masks from :mod:`moejax.nn.nm_masks`), for a weight ``W`` with
reduction axis ``r`` (forward GEMM ``Y = X W``) and output axis ``o``:

- ``srste`` (SR-STE, Zhou et al. 2021; ``aojunzz/NM-sparsity``): both GEMMs use ``mask_r(W) * W``; the weight
  gradient is straight-through plus the sparse-refined decay on the pruned weights,
  ``g + decay * (1 - mask) * W``. Only the forward GEMM is N:M along its reduction axis.
- ``bdwp`` (bidirectional weight pruning): the forward GEMM uses ``mask_r(W) * W``, the activation-gradient GEMM
  ``dX = dY (mask_o(W) * W)^T`` (groups along ``o``, the reduction axis of ``W^T``), the weight gradient is
  dense (straight through to ``W``); both masks come from the dense weights each step.
- ``transposable`` (Hubara et al. 2021): one mask N:M along ``r`` and ``o`` at once, used by both GEMMs;
  straight-through weight gradient.
- ``dense``: nothing is installed (the plain layers run, bit for bit).

:func:`forward_mask` is the mask the forward GEMM (and so inference) uses.

They live in ``nn`` rather than in the :mod:`moejax.sparsity` paper package because the trainer applies
``TrainConfig.sparsity`` and ``train`` may not import paper packages; :mod:`moejax.sparsity` holds the MAC
accounting, mask statistics and the inference-time masking built on them.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp

from moejax.config import SPARSITY_SITES as SITES
from moejax.config import SparsityConfig
from moejax.nn.context import scoped
from moejax.nn.nm_masks import nm_mask, transposable_mask


class Dual(NamedTuple):
    """A projection weight seen differently by the two GEMMs that read it: ``fwd`` in ``Y = X W`` (and the
    weight gradient flows to it), ``bwd`` in ``dX = dY W^T`` (no gradient flows to it)."""

    fwd: jax.Array
    bwd: jax.Array

    def astype(self, dtype) -> Dual:
        return Dual(self.fwd.astype(dtype), self.bwd.astype(dtype))

    @property
    def shape(self):
        return self.fwd.shape

    @property
    def dtype(self):
        return self.fwd.dtype


@dataclass(frozen=True)
class SparseOps:
    """Sparsity for the sites in ``sites``: ``weight(w, reduce_axis, out_axis)`` returns what the layer
    multiplies by (an array or a :class:`Dual`)."""

    sites: frozenset[str]
    weight: Callable[[jax.Array, int, int], jax.Array | Dual]


_OPS: contextvars.ContextVar[SparseOps | None] = contextvars.ContextVar("moejax_sparse_ops", default=None)


@contextlib.contextmanager
def sparse_ops(ops: SparseOps | None):
    """Trace-time context: projections traced inside at ``ops.sites`` use ``ops.weight`` (None: dense)."""
    if ops is not None and not isinstance(ops, SparseOps):
        raise TypeError(f"sparse_ops takes a moejax.nn.sparse.SparseOps or None, got {type(ops).__name__}")
    if ops is not None and not ops.sites <= set(SITES):
        raise ValueError(f"SparseOps.sites={sorted(ops.sites)}; allowed: {', '.join(map(repr, SITES))}")
    with scoped(_OPS, ops):
        yield


def current_sparse_ops() -> SparseOps | None:
    """The :class:`SparseOps` installed for the current trace (None: every weight dense)."""
    return _OPS.get()


def sparse_weight(w: jax.Array, site: str, reduce_axis: int, out_axis: int) -> jax.Array | Dual:
    """What a projection at ``site`` multiplies by: ``w`` itself unless sparsity is installed for ``site``.
    Axes may be negative; leading axes not named (experts) are independent batches of the mask."""
    ops = _OPS.get()
    if ops is None or site not in ops.sites:
        return w
    return ops.weight(w, reduce_axis % w.ndim, out_axis % w.ndim)


def dual(f: Callable, x: jax.Array, w, *aux):
    """``f(x, w, *aux)`` for ``f`` linear in ``x`` and in ``w`` (a matmul, an einsum, a gathered einsum).

    For a plain array ``w`` this *is* ``f(x, w, *aux)``. For a :class:`Dual`, the value is ``f(x, w.fwd)``, the
    input's cotangent is the one of ``f(., w.bwd)`` (the activation-gradient GEMM with the backward weight) and
    the weight's is the one of ``f(x, .)`` at ``w.fwd``; ``aux`` (integer indices) get none.
    """
    if not isinstance(w, Dual):
        return f(x, w, *aux)
    return _dual(f, x, w.fwd, w.bwd, *aux)


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _dual(f, x, wf, wb, *aux):
    return f(x, wf, *aux)


def _dual_fwd(f, x, wf, wb, *aux):
    return f(x, wf, *aux), (x, wf, wb, aux)


def _dual_bwd(f, res, dy):
    x, wf, wb, aux = res
    dx = jax.linear_transpose(lambda x_: f(x_, wb, *aux), x)(dy)[0]
    dw = jax.linear_transpose(lambda w_: f(x, w_, *aux), wf)(dy)[0]
    return (dx, dw, jnp.zeros_like(wb)) + tuple(None for _ in aux)


_dual.defvjp(_dual_fwd, _dual_bwd)


def einsum(spec: str, x: jax.Array, w, **kwargs) -> jax.Array:
    """``jnp.einsum(spec, x, w, **kwargs)`` where ``w`` may be a :class:`Dual` (see :func:`dual`)."""
    if not isinstance(w, Dual):
        return jnp.einsum(spec, x, w, **kwargs)
    return _dual(partial(jnp.einsum, spec, **kwargs), x, w.fwd, w.bwd)


# ------------------------------------------------------------------------------------------ methods

@partial(jax.custom_vjp, nondiff_argnums=(2,))
def masked(w: jax.Array, mask: jax.Array, decay: float = 0.0) -> jax.Array:
    """``where(mask, w, 0)`` whose gradient reaches every element of ``w`` (straight through), plus
    ``decay * w`` on the pruned elements (SR-STE's sparse-refined term; 0: plain STE)."""
    return jnp.where(mask, w, jnp.zeros((), w.dtype))


def _masked_fwd(w, mask, decay):
    return masked(w, mask, decay), (w, mask)


def _masked_bwd(decay, res, g):
    w, mask = res
    if decay:
        g = g + jnp.where(mask, jnp.zeros((), w.dtype), decay * w).astype(g.dtype)
    return g, None


masked.defvjp(_masked_fwd, _masked_bwd)


def forward_mask(w: jax.Array, sc: SparsityConfig, reduce_axis: int, out_axis: int) -> jax.Array:
    """The mask the forward GEMM multiplies ``w`` by under ``sc`` (all True for ``dense``)."""
    w = jax.lax.stop_gradient(w)
    if sc.method == "dense":
        return jnp.ones(w.shape, bool)
    if sc.method == "transposable":
        return transposable_mask(w, sc.n, sc.m, (reduce_axis, out_axis))
    return nm_mask(w, sc.n, sc.m, reduce_axis)


def backward_mask(w: jax.Array, sc: SparsityConfig, reduce_axis: int, out_axis: int) -> jax.Array:
    """The mask of the weight the activation-gradient GEMM uses (BDWP: groups along the output axis)."""
    if sc.method == "bdwp":
        return nm_mask(jax.lax.stop_gradient(w), sc.n, sc.m, out_axis)
    return forward_mask(w, sc, reduce_axis, out_axis)


def sparse_weight_fn(sc: SparsityConfig):
    """``weight(w, reduce_axis, out_axis)`` of :class:`~moejax.nn.sparse.SparseOps` for ``sc``."""

    def weight(w, reduce_axis, out_axis):
        fm = forward_mask(w, sc, reduce_axis, out_axis)
        if sc.method == "bdwp":
            bm = backward_mask(w, sc, reduce_axis, out_axis)
            return Dual(masked(w, fm), jax.lax.stop_gradient(jnp.where(bm, w, jnp.zeros((), w.dtype))))
        return masked(w, fm, sc.srste_decay if sc.method == "srste" else 0.0)

    return weight


def make_sparse_ops(sc: SparsityConfig | None) -> SparseOps | None:
    """The :class:`~moejax.nn.sparse.SparseOps` for ``sc`` (None for ``dense`` or no config)."""
    if sc is None or sc.method == "dense":
        return None
    return SparseOps(frozenset(sc.layers), sparse_weight_fn(sc.validate()))


@contextlib.contextmanager
def sparse_training(sc: SparsityConfig | None):
    """Trace-time context: the layers traced inside run ``sc``'s N:M method (nothing for ``dense``/None)."""
    with sparse_ops(make_sparse_ops(sc)):
        yield


# ------------------------------------------------------------------------------------------ whole models

def sparse_weights(model, sc: SparsityConfig):
    """``(param, reduce_axis, out_axis)`` for every projection weight of ``model`` that ``sc`` makes sparse.

    A module takes part by declaring ``SPARSE_SITE`` (one of :data:`SITES`) and ``SPARSE_WEIGHTS``
    (``{attribute: (reduce_axis, out_axis)}``, negative axes so stacked layers count too), as
    :class:`~moejax.nn.attention.Attention`, :class:`~moejax.nn.experts.SwiGLU` and
    :class:`~moejax.nn.experts.SwiGLUExperts` do.
    """
    from flax import nnx

    out = []
    for _, node in nnx.iter_graph(model):
        site = getattr(type(node), "SPARSE_SITE", None)
        if site is not None and site in sc.layers:
            out.extend((getattr(node, a), r, o) for a, (r, o) in type(node).SPARSE_WEIGHTS.items())
    return out


def apply_forward_masks(model, sc: SparsityConfig | None) -> int:
    """Zero the weights ``sc``'s forward masks prune, in place: the N:M-sparse model that inference serves.
    Returns how many weights were zeroed (0 for ``dense`` or None)."""
    if sc is None or sc.method == "dense":
        return 0
    zeroed = 0
    for p, r, o in sparse_weights(model, sc):
        keep = forward_mask(p[...], sc, r, o)
        zeroed += int(keep.size - jnp.sum(keep))
        p[...] = jnp.where(keep, p[...], jnp.zeros((), p.dtype))
    return zeroed


def mask_flip_rate(old_model, new_model, sc: SparsityConfig) -> jax.Array:
    """Share of forward-mask entries that differ between two versions of a model (one optimizer step apart)."""
    flips, total = jnp.float32(0), 0
    for (a, r, o), (b, _, _) in zip(sparse_weights(old_model, sc), sparse_weights(new_model, sc), strict=True):
        flips = flips + jnp.sum(forward_mask(a[...], sc, r, o) != forward_mask(b[...], sc, r, o))
        total += a.size
    return flips / max(total, 1)
