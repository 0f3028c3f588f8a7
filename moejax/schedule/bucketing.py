"""The gradient-bucketing pass (:func:`bucket_gradients`), built on :mod:`moejax.schedule.rewrite`.

In a gradient function whose data-parallel reduction is a set of ``psum`` s (the trainer's ``shard_map`` body),
the pass groups the reduced values into buckets (given explicitly, e.g. by the FSMoE planner, or by a byte
budget, in the order the backward produces them) and emits one ``psum`` per bucket (flatten -> concatenate ->
``psum`` -> split), placed right after the equation that produces the bucket's last member, so the reduction of
the gradients of late layers can overlap the backward of earlier ones. With a *scanned* layer stack the
per-layer gradients leave the backward loop only when it ends, so ``inside_loops=True`` moves each reduction of
a stacked loop output into the loop body (``psum`` commutes with stacking) and buckets the per-layer reductions
there: one bucket reduction per layer iteration, overlapping the next iteration's backward.

The pass is a function transformation with the same outputs, bit for bit; XLA's latency-hiding scheduler
(GPU/TPU) is then free to overlap a bucket's reduction with the backward. XLA:CPU runs collectives
synchronously and its ``cpu-all-reduce-combiner`` merges all-reduces, so on CPU the pass can be checked for
equality and HLO structure only (see ``../shared/notes/jax-scheduling-passes.md``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from moejax.schedule.rewrite import Handler, Plan, Visitor, run_pass, var_consumers

__all__ = ["bucket_gradients"]


def bucket_gradients(fn: Callable, *, bucket_bytes: int | None = None,
                     buckets: Sequence[Sequence[int]] | None = None, inside_loops: bool = False,
                     reduce_prims: tuple[str, ...] = ("psum", "psum_invariant")) -> Callable:
    """Return ``fn`` with its data-parallel gradient ``psum`` s merged into buckets.

    The reductions considered are the ``psum`` equations (single operand or several) over the same mesh axes
    at one level of the jaxpr -- in practice the body of the ``shard_map`` that computes and reduces the
    gradients -- ordered by when their operands are produced. ``buckets`` gives the bucket members explicitly
    (indices into that order, e.g. from :func:`moejax.schedule.plan`); otherwise consecutive reductions are
    grouped until a bucket holds at least ``bucket_bytes`` bytes (``None``: one bucket). Each bucket is one
    ``psum`` of the concatenated flattened members, emitted right after the equation that produces its last
    member.

    ``inside_loops=True``: a reduction whose operand is a stacked output of a ``scan`` (the per-layer gradients
    of a scanned layer stack) is moved into the loop body (``psum`` commutes with stacking), and the moved
    reductions of one iteration are bucketed together by the same rule; reductions left outside loops are
    bucketed as above.

    Results equal ``fn``'s exactly (each element is reduced over the same devices; concatenation does not
    reorder any element's sum).
    """
    if bucket_bytes is not None and (not isinstance(bucket_bytes, int) or isinstance(bucket_bytes, bool)
                                     or bucket_bytes < 1):
        raise ValueError(f"bucket_gradients: bucket_bytes must be a positive int or None, got {bucket_bytes!r}")
    if buckets is not None and bucket_bytes is not None:
        raise ValueError("bucket_gradients: pass buckets or bucket_bytes, not both")

    def plan_buckets(sizes: list[int], explicit=True):
        if buckets is not None and explicit:
            flat = sorted(i for b in buckets for i in b)
            if flat != list(range(len(sizes))):
                raise ValueError(f"bucket_gradients: buckets must partition the {len(sizes)} reductions "
                                 f"(indices 0..{len(sizes) - 1}), got {[list(b) for b in buckets]}")
            return [list(b) for b in buckets]
        out, cur, size = [], [], 0
        for i, nbytes in enumerate(sizes):
            cur.append(i)
            size += nbytes
            if bucket_bytes is not None and size >= bucket_bytes:
                out.append(cur)
                cur, size = [], 0
        if cur:
            out.append(cur)
        return out

    def decide(jaxpr):
        replace, skip = {}, set()
        if inside_loops:
            replace, skip = _move_reductions_into_loops(jaxpr, reduce_prims,
                                                        lambda sizes: plan_buckets(sizes, explicit=False))
        return _bucket_plan(jaxpr, plan_buckets, reduce_prims, replace, skip)

    visit = Visitor(decide, tuple(reduce_prims))

    def wrapped(*args, **kwargs):
        return run_pass(fn, visit, args, kwargs)

    return wrapped


def _nbytes(aval) -> int:
    return int(np.prod(aval.shape)) * np.dtype(aval.dtype).itemsize


def _reduce_key(eqn):
    return (eqn.primitive.name, tuple(sorted((k, repr(v)) for k, v in eqn.params.items())))


class _Bucket:
    """One bucketed reduction: concatenate the members, reduce once, split back."""

    def __init__(self, prim, params, invars, outvars):
        self.prim, self.params, self.invars, self.outvars = prim, params, invars, outvars

    def __call__(self, read):
        return _reduce_concat(self.prim, self.params, [read(v) for v in self.invars])


def _reduce_concat(prim, params, vals):
    if len(vals) == 1:
        out = prim.bind(vals[0], **params)
        return [out[0] if isinstance(out, (list, tuple)) else out]
    dt = jnp.result_type(*[v.dtype for v in vals])
    flat = jnp.concatenate([jnp.ravel(v).astype(dt) for v in vals])
    red = prim.bind(flat, **params)
    red = red[0] if isinstance(red, (list, tuple)) else red
    outs, off = [], 0
    for v in vals:
        n = int(np.prod(v.shape))
        outs.append(red[off:off + n].reshape(v.shape).astype(v.dtype))
        off += n
    return outs


def _bucket_plan(jaxpr, plan_buckets, reduce_prims, replace, skip):
    producer = {v: i for i, e in enumerate(jaxpr.eqns) for v in e.outvars}
    first_use: dict[Any, int] = {}
    for i, e in enumerate(jaxpr.eqns):
        for v in e.invars:
            if isinstance(v, jcore.Var) and v not in first_use:
                first_use[v] = i
    groups: dict[tuple, list[tuple]] = {}
    for i, e in enumerate(jaxpr.eqns):
        if e.primitive.name in reduce_prims and i not in skip and i not in replace:
            for v, o in zip(e.invars, e.outvars):
                if isinstance(v, jcore.Literal):
                    continue
                key = (_reduce_key(e), np.dtype(v.aval.dtype).name)  # a bucket holds one dtype
                groups.setdefault(key, []).append((producer.get(v, -1), i, v, o))
    after: dict[int, list] = {}
    for members in groups.values():
        members.sort(key=lambda m: (m[0], m[1]))
        e0 = jaxpr.eqns[members[0][1]]
        for b in plan_buckets([_nbytes(m[2].aval) for m in members]):
            # A bucket runs after its last member is produced; a member whose reduced value is needed earlier
            # than that (e.g. a reduction the backward itself consumes) closes the bucket before it.
            cur: list = []
            for m in sorted((members[k] for k in b), key=lambda m: (m[0], m[1])):
                need = min([first_use.get(x[3], len(jaxpr.eqns)) for x in cur + [m]])
                if cur and max(x[0] for x in cur + [m]) >= need:
                    _emit(after, e0, cur)
                    cur = []
                cur.append(m)
            _emit(after, e0, cur)
        skip.update(m[1] for m in members)
    return Plan(replace, skip, after)


def _emit(after, e0, ms):
    if ms:
        after.setdefault(max(m[0] for m in ms), []).append(
            _Bucket(e0.primitive, dict(e0.params), [m[2] for m in ms], [m[3] for m in ms]))


def _move_reductions_into_loops(jaxpr, reduce_prims, plan_sizes):
    """Replace ``scan`` equations whose stacked outputs feed only a reduction with a scan that reduces (in
    buckets) inside its body; the reductions outside are skipped."""
    consumers = var_consumers(jaxpr)
    replace, skip = {}, set()
    for si, se in enumerate(jaxpr.eqns):
        if se.primitive.name != "scan":
            continue
        p = se.params
        nc, ncar = p["num_consts"], p["num_carry"]
        moved = {}
        for k, y in enumerate(se.outvars[ncar:]):
            cs = consumers.get(y, [])
            if len(cs) == 1:
                re = jaxpr.eqns[cs[0]]
                if re.primitive.name in reduce_prims and len(re.invars) == 1:
                    moved[k] = cs[0]
        if not moved:
            continue
        body_closed = p["jaxpr"]
        reds = {k: jaxpr.eqns[i] for k, i in moved.items()}

        def run(*invals, p=p, nc=nc, ncar=ncar, reds=reds, body_closed=body_closed):
            consts, carry, xs = invals[:nc], invals[nc:nc + ncar], invals[nc + ncar:]
            order = sorted(reds)
            by_key: dict[tuple, list[int]] = {}
            for k in order:
                by_key.setdefault(_reduce_key(reds[k]), []).append(k)

            def body(c, x):
                outs = jcore.jaxpr_as_fun(body_closed)(*consts, *c, *x)
                cy, yy = list(outs[:ncar]), list(outs[ncar:])
                for ks in by_key.values():
                    e = reds[ks[0]]
                    for g in plan_sizes([int(np.prod(np.shape(yy[k]))) * np.dtype(yy[k].dtype).itemsize
                                         for k in ks]):
                        sel = [ks[j] for j in g]
                        for k, rv in zip(sel, _reduce_concat(e.primitive, e.params, [yy[k] for k in sel])):
                            yy[k] = rv
                return cy, yy

            c_out, ys = jax.lax.scan(body, list(carry), list(xs), length=p["length"], reverse=p["reverse"],
                                     unroll=p["unroll"])
            return [*c_out, *ys]

        outvars = list(se.outvars)
        for k, ri in moved.items():
            outvars[ncar + k] = jaxpr.eqns[ri].outvars[0]
            skip.add(ri)
        replace[si] = Handler(run, list(se.invars), outvars)
    return replace, skip
