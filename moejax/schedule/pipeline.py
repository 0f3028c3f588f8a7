"""FSMoE's MoE all-to-all/expert pipelining pass (:func:`pipeline_moe`), built on :mod:`moejax.schedule.rewrite`.

The pass is a function transformation: it traces the given function to a jaxpr, rewrites it, and returns a
function with the same outputs and gradients that emits ordinary collectives in a new arrangement. XLA's
latency-hiding scheduler (GPU/TPU) is then free to overlap a chunk's collective with another chunk's compute;
XLA:CPU runs collectives synchronously, so on CPU the pass can be checked for equality and HLO structure only
(see ``../shared/notes/jax-scheduling-passes.md``).

An expert-parallel MoE layer traces to a *span*::

    xr = all_to_all(xb, split_axis=s, concat_axis=c)   # dispatch: [E, T, D] -> [E/n, n*T, D]
    y  = F(xr, weights)                                # the experts, row-wise along the token axis
    yb = all_to_all(y, split_axis=c, concat_axis=s)    # combine: back to [E, T, D]

The pass finds every such span (also inside ``scan``/``shard_map``/``jit``/``checkpoint``/``cond`` bodies),
splits the token axis ``c`` of ``xb`` into ``r`` chunks and emits, per chunk, dispatch -> experts -> combine,
then concatenates: chunk ``i``'s experts can run while chunk ``i+1`` is being dispatched and chunk ``i-1``
combined. ``F`` is re-evaluated at chunk shape by an interpreter with per-primitive rules for the primitives
that carry shapes (``reshape``, ``broadcast_in_dim``, ``squeeze``, ``dot_general``, ``reduce_*``, ``slice``;
nested ``jit`` and ``custom_jvp_call`` bodies are inlined); a primitive that would mix rows across the token
axis, or has no rule, makes the pass raise :class:`NotChunkable` naming it.

Forward and backward degrees are chosen separately, as FSMoE does: each span becomes a ``jax.custom_vjp``
whose forward runs ``r_fwd`` chunks and saves the dispatched activations, and whose backward runs ``r_bwd``
chunks of (transposed combine -> expert VJP -> transposed dispatch), summing the weight gradients over
chunks. A training step built as ``jax.grad`` of a pipelined loss therefore has ``2 r_fwd`` all-to-alls per
MoE layer in its forward and ``2 r_bwd`` in its backward. (The pass is applied to the loss *before*
``jax.grad`` rather than to the gradient jaxpr: rewriting transposed primitives would need chunking rules for
every backward op, while the custom VJP gives the same separate degrees with rules for the forward only.)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from moejax.schedule.rewrite import (
    Handler,
    Plan,
    RewriteError,
    Visitor,
    bind_eqn,
    open_jaxpr,
    read_var,
    run_pass,
    sub_jaxprs,
    var_consumers,
)

__all__ = ["NotChunkable", "PipelineStats", "find_moe_spans", "pipeline_moe", "two_level_all_to_all"]


class NotChunkable(RewriteError):
    """A MoE span contains an operation the pipelining pass cannot split along the token axis."""


# ------------------------------------------------------------------------------------------ span detection

@dataclasses.dataclass(frozen=True)
class _Span:
    dispatch: int  # equation index of the dispatch all_to_all
    combine: int  # equation index of the combine all_to_all
    body: tuple[int, ...]  # equation indices strictly between (the experts), in order
    consts: tuple  # vars (or literals) the body reads from outside the span
    chunk_axis: int  # token axis of the dispatch input (= its concat_axis)


def _a2a_axes(eqn):
    p = eqn.params
    return p["split_axis"], p["concat_axis"]


def _find_spans(jaxpr) -> list[_Span]:
    """Dispatch -> experts -> combine spans at this level of ``jaxpr`` (not in sub-jaxprs)."""
    eqns = jaxpr.eqns
    consumers = var_consumers(jaxpr)
    outvars = {v for v in jaxpr.outvars if isinstance(v, jcore.Var)}
    spans, used = [], set()
    for d, de in enumerate(eqns):
        if de.primitive.name != "all_to_all" or d in used:
            continue
        s_ax, c_ax = _a2a_axes(de)
        if s_ax == c_ax or not de.params.get("tiled", False):
            continue
        # forward closure from the dispatch output until an all_to_all that reverses it
        desc, frontier, combine = set(), [de.outvars[0]], None
        while frontier:
            v = frontier.pop()
            for c in consumers.get(v, []):
                ce = eqns[c]
                if ce.primitive.name == "all_to_all":
                    if (_a2a_axes(ce) == (c_ax, s_ax) and ce.params["axis_name"] == de.params["axis_name"]
                            and combine in (None, c)):
                        combine = c
                        continue
                    desc = None
                    break
                if c not in desc:
                    desc.add(c)
                    frontier.extend(ce.outvars)
            if desc is None:
                break
        if desc is None or combine is None:
            continue
        body = tuple(sorted(desc))
        if any(b > combine for b in body):
            continue
        # every body value must be consumed only inside the span (the combine input included)
        inside = set(body) | {combine}
        leak = any(any(c not in inside for c in consumers.get(v, [])) or v in outvars
                   for b in body for v in eqns[b].outvars)
        if leak or any(c not in inside for c in consumers.get(de.outvars[0], [])) or de.outvars[0] in outvars:
            continue
        body_out = {v for b in body for v in eqns[b].outvars} | {de.outvars[0]}
        consts, seen = [], set()
        for b in body:
            for v in eqns[b].invars:
                if isinstance(v, jcore.Literal):
                    continue
                if v not in body_out and v not in seen:
                    seen.add(v)
                    consts.append(v)
        cv = eqns[combine].invars[0]
        if cv not in body_out:
            continue
        spans.append(_Span(d, combine, body, tuple(consts), c_ax))
        used.update({d, combine})
    return spans


def find_moe_spans(fn: Callable, *args, **kwargs) -> int:
    """Number of dispatch -> experts -> combine spans :func:`pipeline_moe` would rewrite in ``fn(*args)``,
    counting each occurrence in the jaxpr once (a span inside a scanned layer stack counts once)."""
    closed = jax.make_jaxpr(fn)(*args, **kwargs)

    def count(j):
        j = open_jaxpr(j)
        n = len(_find_spans(j))
        for e in j.eqns:
            for s in sub_jaxprs(e):
                n += count(s)
        return n

    return count(closed)


# ------------------------------------------------------------------------------------------ chunk interpreter

_ELEMENTWISE = {
    "add", "add_any", "sub", "mul", "div", "rem", "max", "min", "neg", "sign", "abs", "exp", "exp2", "log", "log1p",
    "expm1", "logistic", "tanh", "sin", "cos", "sqrt", "rsqrt", "cbrt", "pow", "integer_pow", "square", "erf",
    "erfc", "erf_inv", "convert_element_type", "copy", "copy_p", "select_n", "stop_gradient", "and", "or", "not",
    "xor", "eq", "ne", "lt", "le", "gt", "ge", "is_finite", "floor", "ceil", "round", "nextafter", "clamp",
    "reduce_precision", "real", "imag", "atan2", "tan", "asin", "acos", "atan", "sinh", "cosh", "asinh", "acosh",
    "atanh", "shift_left", "shift_right_logical", "shift_right_arithmetic", "population_count", "optimization_barrier",
    "pvary", "psum_invariant", "psum",
}
_REDUCE = {"reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and", "reduce_or", "argmax", "argmin"}


def _ndim(x):
    return np.ndim(x)


def _chunk_rule(eqn, axes: list, vals: list, r: int):
    """New params and the output chunk axis for ``eqn`` given its inputs' chunk axes (None = not chunked)."""
    name = eqn.primitive.name
    p = dict(eqn.params)
    chunked = [a for a in axes if a is not None]
    if not chunked:
        return p, None
    if name in _ELEMENTWISE:
        if len(set(chunked)) != 1:
            raise NotChunkable(f"'{name}' mixes operands chunked on different axes {chunked}")
        a = chunked[0]
        for ax, v in zip(axes, vals):
            if ax is None and _ndim(v) > 0:
                raise NotChunkable(f"'{name}' combines a chunked operand with an unchunked array of shape "
                                   f"{np.shape(v)}")
        return p, a
    if name == "broadcast_in_dim":
        a, dims = axes[0], p["broadcast_dimensions"]
        out_a = dims[a]
        shape = list(p["shape"])
        shape[out_a] = np.shape(vals[0])[a]
        p["shape"] = tuple(shape)
        return p, out_a
    if name == "transpose":
        return p, list(p["permutation"]).index(axes[0])
    if name == "squeeze":
        a = axes[0]
        dims = p["dimensions"]
        if a in dims:
            raise NotChunkable("'squeeze' removes the token axis")
        return p, a - sum(d < a for d in dims)
    if name == "reshape":
        if p.get("dimensions") is not None:
            raise NotChunkable("'reshape' with dimensions")
        a = axes[0]
        in_full = list(np.shape(vals[0]))
        in_full[a] *= r
        out_full = list(p["new_sizes"])
        pre = math.prod(in_full[:a])
        for j in range(len(out_full)):
            if math.prod(out_full[:j]) == pre and out_full[j] != 1 and out_full[j] % r == 0:
                out = list(out_full)
                out[j] //= r
                p["new_sizes"] = tuple(out)
                return p, j
            if math.prod(out_full[:j]) > pre:
                break
        raise NotChunkable(f"'reshape' {tuple(in_full)} -> {tuple(out_full)} does not keep the token axis "
                           f"{a} as a leading factor")
    if name == "dot_general":
        (lc, rc), (lb, rb) = p["dimension_numbers"]
        la, ra = axes
        lnd, rnd = _ndim(vals[0]), _ndim(vals[1])
        if la is not None and la in lc or ra is not None and ra in rc:
            raise NotChunkable("'dot_general' contracts over the token axis")
        if la is not None and la in lb or ra is not None and ra in rb:
            if la is None or ra is None or lb.index(la) != rb.index(ra):
                raise NotChunkable("'dot_general' batches over the token axis of one operand only")
            return p, lb.index(la)
        if la is not None and ra is not None:
            raise NotChunkable("'dot_general' with both operands chunked on free axes")
        if la is not None:
            free = [d for d in range(lnd) if d not in lc and d not in lb]
            return p, len(lb) + free.index(la)
        lfree = lnd - len(lc) - len(lb)
        free = [d for d in range(rnd) if d not in rc and d not in rb]
        return p, len(lb) + lfree + free.index(ra)
    if name in _REDUCE:
        a = axes[0]
        red = p["axes"]
        if a in red:
            raise NotChunkable(f"'{name}' reduces over the token axis")
        return p, a - sum(d < a for d in red)
    if name == "slice":
        a = axes[0]
        full = np.shape(vals[0])[a] * r
        st, lim = list(p["start_indices"]), list(p["limit_indices"])
        strides = p.get("strides")
        if st[a] != 0 or lim[a] != full or (strides is not None and strides[a] != 1):
            raise NotChunkable("'slice' along the token axis")
        lim[a] = np.shape(vals[0])[a]
        p["limit_indices"] = tuple(lim)
        return p, a
    raise NotChunkable(f"no chunking rule for primitive '{name}' inside a MoE span")


def _eval_chunked(jaxpr, consts, args, axes, r):
    """Evaluate ``jaxpr`` on chunk-sized ``args`` (token axis ``axes[i]`` or None); returns (outs, out_axes)."""
    env, ax = {}, {}
    for v, c in zip(jaxpr.constvars, consts):
        env[v], ax[v] = c, None
    for v, a, x in zip(jaxpr.invars, axes, args):
        env[v], ax[v] = x, a
    for eqn in jaxpr.eqns:
        invals = [read_var(env, v) for v in eqn.invars]
        inax = [None if isinstance(v, jcore.Literal) else ax[v] for v in eqn.invars]
        name = eqn.primitive.name
        if name in ("jit", "pjit", "closed_call", "core_call", "custom_jvp_call", "checkpoint", "remat"):
            sub = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr", eqn.params.get("fun_jaxpr")))
            sc = sub.consts if isinstance(sub, jcore.ClosedJaxpr) else []
            outs, oax = _eval_chunked(open_jaxpr(sub), sc, invals, inax, r)
        elif all(a is None for a in inax):
            outs, oax = bind_eqn(eqn, invals), [None] * len(eqn.outvars)
        else:
            if eqn.primitive.multiple_results:
                raise NotChunkable(f"no chunking rule for multi-output primitive '{name}' inside a MoE span")
            params, out_a = _chunk_rule(eqn, inax, invals, r)
            outs = eqn.primitive.bind(*invals, **params)
            outs, oax = [outs], [out_a]
        for v, o, a in zip(eqn.outvars, outs, oax):
            env[v], ax[v] = o, a
    return [read_var(env, v) for v in jaxpr.outvars], [None if isinstance(v, jcore.Literal) else ax[v]
                                                    for v in jaxpr.outvars]


# ------------------------------------------------------------------------------------------ 2-level all-to-all

def two_level_all_to_all(x, axis_names, split_axis: int, concat_axis: int):
    """A tiled ``all_to_all`` over two mesh axes ``(outer, inner)`` (e.g. ``("node", "expert")``) done as an
    intra-node exchange over ``inner`` then an inter-node exchange over ``outer``; equal to
    ``jax.lax.all_to_all(x, axis_names, split_axis, concat_axis, tiled=True)`` (flat device index
    ``outer * n_inner + inner``). Call inside ``shard_map``."""
    outer, inner = axis_names
    n_o, n_i = jax.lax.psum(1, outer), jax.lax.psum(1, inner)
    n = n_o * n_i
    sh = list(x.shape)
    s, c = split_axis, concat_axis
    if sh[s] % n:
        raise ValueError(f"two_level_all_to_all: split axis {s} of size {sh[s]} is not divisible by {n} devices")
    k = sh[s] // n
    y = x.reshape(sh[:s] + [n_o, n_i, k] + sh[s + 1:])
    y = jax.lax.all_to_all(y, inner, s + 1, s + 1, tiled=True)  # intra-node: dim s+1 now indexes the source
    y = jax.lax.all_to_all(y, outer, s, s, tiled=True)  # inter-node: dim s now indexes the source node
    y = y.reshape(sh[:s] + [n, k] + sh[s + 1:])  # dim s: flat source index, dim s+1: this device's slab
    # move the source dim in front of the concat dim and merge them (source-major, as the flat all_to_all)
    c_pos = c + 1 if c > s else c  # position of the concat dim in y
    y = jnp.moveaxis(y, s, c_pos - 1 if c_pos > s else c_pos)
    out = list(y.shape)
    j = c_pos - 1 if c_pos > s else c_pos  # the source dim, now directly before the concat dim
    return y.reshape(out[:j] + [out[j] * out[j + 1]] + out[j + 2:])


# ------------------------------------------------------------------------------------------ the span as a custom VJP

@dataclasses.dataclass
class PipelineStats:
    """What :func:`pipeline_moe` rewrote on its last trace: spans found (per jaxpr occurrence) and degrees."""

    spans: int = 0
    degree_fwd: int = 1
    degree_bwd: int = 1


def _a2a(x, params, split_axis, concat_axis, two_level):
    names = params["axis_name"]
    if two_level and isinstance(names, tuple) and len(names) == 2 and params.get("axis_index_groups") is None:
        return two_level_all_to_all(x, names, split_axis, concat_axis)
    return jax.lax.all_to_all(x, names, split_axis, concat_axis, tiled=True,
                              axis_index_groups=params.get("axis_index_groups"))


def _fit_degree(r: int, T: int, what: str, strict: bool) -> int:
    if T % r == 0:
        return r
    if strict:
        raise NotChunkable(f"pipeline degree {what}={r} does not divide the {T} tokens per expert buffer")
    best = max(d for d in range(1, r + 1) if T % d == 0)
    import warnings

    warnings.warn(f"pipeline degree {what}={r} does not divide the {T}-token expert buffers: using {best}",
                  stacklevel=3)
    return best


_GROUP_IDS = iter(range(1, 1 << 30))


def _group(annotate: bool):
    """A context attaching a fresh ``_scheduling_group_id`` to the ops emitted in it (or a no-op)."""
    import contextlib

    if not annotate:
        return contextlib.nullcontext()
    from jax.experimental.xla_metadata import set_xla_metadata

    return set_xla_metadata(_scheduling_group_id=str(next(_GROUP_IDS)))


def _pipelined(parts, first, middle, last, annotate):
    """Software-pipelined emission: ``first(0)``; then per chunk ``i`` one scheduling group holding
    ``first(i+1)``, ``middle(i)`` and ``last(i-1)`` (the collectives a chunk's compute should overlap); finally
    ``last(r-1)``. Returns the outputs of ``last`` in chunk order."""
    r = len(parts)
    a, b, out = {0: first(parts[0])}, {}, {}
    for i in range(r):
        with _group(annotate and r > 1):
            if i + 1 < r:
                a[i + 1] = first(parts[i + 1])
            b[i] = middle(a.pop(i), i)
            if i >= 1:
                out[i - 1] = last(b.pop(i - 1), i - 1)
    out[r - 1] = last(b.pop(r - 1), r - 1)
    return [out[i] for i in range(r)]


def _span_fn(jaxpr, span: _Span, r_fwd: int, r_bwd: int, two_level: bool = False, strict: bool = True,
             annotate: bool = False):
    """A ``custom_vjp`` function ``(xb, *consts) -> yb`` computing the span in chunks."""
    eqns = jaxpr.eqns
    de, ce = eqns[span.dispatch], eqns[span.combine]
    d_params, c_params = de.params, ce.params
    body_eqns = [eqns[i] for i in span.body]
    body_jaxpr = jcore.Jaxpr(constvars=[], invars=[de.outvars[0], *span.consts], outvars=[ce.invars[0]],
                             eqns=body_eqns)
    cax = span.chunk_axis  # token axis of the dispatch input and of the combine output
    s_ax = d_params["split_axis"]
    T = de.invars[0].aval.shape[cax]
    r_fwd, r_bwd = _fit_degree(r_fwd, T, "r_fwd", strict), _fit_degree(r_bwd, T, "r_bwd", strict)

    def dispatch(x):
        return _a2a(x, d_params, d_params["split_axis"], d_params["concat_axis"], two_level)

    def combine(y):
        return _a2a(y, c_params, c_params["split_axis"], c_params["concat_axis"], two_level)

    def experts(xr, consts, r):
        outs, oax = _eval_chunked(body_jaxpr, [], [xr, *consts], [cax] + [None] * len(consts), r)
        if oax[0] != cax:
            raise NotChunkable(f"the experts move the token axis from {cax} to {oax[0]}")
        return outs[0]

    def chunks(x, r, axis):
        return jnp.split(x, r, axis=axis) if r > 1 else [x]

    def n_devices(xb, xr):
        return xr.shape[cax] // xb.shape[cax]

    def to_canonical(parts, n):
        # chunked dispatch outputs [.., n*T/r, ..] (chunk-major) -> the unchunked layout [.., n*T, ..]
        r = len(parts)
        if r == 1:
            return parts[0]
        x = jnp.stack(parts, axis=cax)  # [.., r, n*T/r, ..]
        sh = list(x.shape)
        x = x.reshape(sh[:cax] + [r, n, sh[cax + 1] // n] + sh[cax + 2:])
        x = jnp.swapaxes(x, cax, cax + 1)  # [.., n, r, T/r, ..]
        return x.reshape(sh[:cax] + [r * sh[cax + 1]] + sh[cax + 2:])

    def chunk_of_canonical(x, n, r, i):
        # rows of chunk i (of r) of every source device, in the chunked dispatch output's layout
        if r == 1:
            return x
        sh = list(x.shape)
        T = sh[cax] // n
        x = x.reshape(sh[:cax] + [n, r, T // r] + sh[cax + 1:])
        x = jax.lax.index_in_dim(x, i, axis=cax + 1, keepdims=False)
        return x.reshape(sh[:cax] + [T // r * n] + sh[cax + 1:])

    @jax.custom_vjp
    def span(xb, *consts):
        return fwd(xb, *consts)[0]

    def fwd(xb, *consts):
        xrs = {}

        def first(xc):
            return dispatch(xc)

        def middle(xr, i):
            xrs[i] = xr
            return experts(xr, consts, r_fwd)

        def last(y, i):
            return combine(y)

        ys = _pipelined(chunks(xb, r_fwd, cax), first, middle, last, annotate)
        parts = [xrs[i] for i in range(r_fwd)]
        n = parts[0].shape[cax] // (xb.shape[cax] // r_fwd)
        yb = jnp.concatenate(ys, axis=cax) if r_fwd > 1 else ys[0]
        return yb, (to_canonical(parts, n), consts, n)

    def bwd(res, g):
        xr_all, consts, n = res
        dcs = {}

        def first(gc):  # transposed combine
            return _a2a(gc, c_params, c_params["concat_axis"], c_params["split_axis"], two_level)

        def middle(gy, i):
            xr = chunk_of_canonical(xr_all, n, r_bwd, i)
            _, vjp = jax.vjp(lambda x, *c: experts(x, c, r_bwd), xr, *consts)
            dxr, *dc = vjp(gy)
            dcs[i] = [None if d is None or _is_float0(d) else d for d in dc]
            return dxr

        def last(dxr, i):  # transposed dispatch
            return _a2a(dxr, d_params, d_params["concat_axis"], s_ax, two_level)

        dxs = _pipelined(chunks(g, r_bwd, cax), first, middle, last, annotate)
        dconsts = None
        for i in range(r_bwd):
            dc = dcs[i]
            dconsts = dc if dconsts is None else [a if b is None else (b if a is None else a + b)
                                                  for a, b in zip(dconsts, dc)]
        dxb = jnp.concatenate(dxs, axis=cax) if r_bwd > 1 else dxs[0]
        dconsts = [_zero_cotangent(c) if d is None else d for c, d in zip(consts, dconsts)]
        return (dxb, *dconsts)

    span.defvjp(fwd, bwd)
    return span


def _is_float0(x):
    return getattr(x, "dtype", None) == jax.dtypes.float0


def _zero_cotangent(c):
    c = jnp.asarray(c) if not hasattr(c, "dtype") else c
    if jnp.issubdtype(c.dtype, jnp.inexact):
        return jnp.zeros_like(c)
    return np.zeros(np.shape(c), jax.dtypes.float0)


# ------------------------------------------------------------------------------------------ the pass

def pipeline_moe(fn: Callable, degree: int = 2, *, bwd_degree: int | None = None, two_level: bool = False,
                 strict: bool = True, annotate: bool = False, stats: PipelineStats | None = None) -> Callable:
    """Return ``fn`` with every expert-parallel MoE span pipelined in ``degree`` chunks (``bwd_degree`` in
    the backward pass; default ``degree``). ``two_level``: dispatch/combine all-to-alls over two mesh axes
    (the trainer's ``("node", "expert")``) become :func:`two_level_all_to_all` (intra-node, then inter-node).
    The chunks are emitted software-pipelined (dispatch of chunk ``i+1``, experts of ``i``, combine of
    ``i-1``); ``annotate=True`` also tags each such triple with an XLA ``_scheduling_group_id`` frontend
    attribute (``jax.experimental.xla_metadata``) for the latency-hiding scheduler -- opt-in: it has only been
    checked to appear in the lowered module, not yet compiled on a GPU/TPU.

    ``fn`` is any function whose trace contains the dispatch/combine ``all_to_all`` pair of
    :func:`moejax.parallel.expert_parallel.ep_moe` (typically the loss inside the trainer's ``shard_map``, or a
    whole ``shard_map``-ed function). Outputs and gradients equal ``fn``'s up to float reassociation. Degree 1
    leaves the computation as it is (the span is still routed through the custom VJP).

    Raises :class:`NotChunkable` if a span contains an op with no chunking rule or (``strict``) a degree does
    not divide the per-expert token buffer (``strict=False``: warn and use the largest divisor below it), and
    ``ValueError`` for a degree that is not a positive int.
    """
    for name, v in (("degree", degree), ("bwd_degree", bwd_degree)):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise ValueError(f"pipeline_moe: {name} must be a positive int, got {v!r}")
    r_f, r_b = degree, bwd_degree or degree

    def decide(jaxpr):
        spans = _find_spans(jaxpr)
        handlers, skip = {}, set()
        for s in spans:
            f = _span_fn(jaxpr, s, r_f, r_b, two_level, strict, annotate)
            # evaluated at the combine's position: every input of the span is available there
            handlers[s.combine] = Handler(f, [jaxpr.eqns[s.dispatch].invars[0], *s.consts],
                                          jaxpr.eqns[s.combine].outvars)
            skip.update(s.body)
            skip.add(s.dispatch)
        if stats is not None:
            stats.spans += len(spans)
        return Plan(handlers, skip, {})

    visit = Visitor(decide, ("all_to_all",), error=NotChunkable)

    def wrapped(*args, **kwargs):
        if stats is not None:
            stats.spans, stats.degree_fwd, stats.degree_bwd = 0, r_f, r_b
        return run_pass(fn, visit, args, kwargs)

    return wrapped


