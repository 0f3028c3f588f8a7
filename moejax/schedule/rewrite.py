"""The jaxpr-rewriting core that the scheduling passes are built on.

A scheduling pass (:mod:`moejax.schedule.pipeline`, :mod:`moejax.schedule.bucketing`) is a function
transformation: it traces a function to a jaxpr, re-emits every equation through JAX's public API -- changing
the ones it targets -- and so returns a function with the same outputs and a new arrangement of operations.
This module holds everything that is not specific to one pass:

* an interpreter (:func:`eval_rewritten`) that walks a jaxpr and re-binds its equations, asking the pass, once
  per jaxpr, what to do (a :class:`Plan`);
* recursion into structured equations (:func:`rewrite_structured`): a ``scan``, ``shard_map``, ``jit``/``pjit``,
  ``checkpoint``, ``cond``, ``while`` or ``custom_jvp_call`` whose body contains a target of the pass is
  re-expressed with ``jax.lax.scan``, ``jax.shard_map``, ``jax.checkpoint``, ... around the rewritten body;
  structured equations without targets are re-bound unchanged;
* the visitor/handler protocol a pass implements (:class:`Visitor`, :class:`Handler`, :class:`Plan`) and
  :func:`run_pass`, which traces the function and evaluates it under the pass;
* helpers for reading jaxprs (:func:`sub_jaxprs`, :func:`open_jaxpr`, :func:`contains_primitive`,
  :func:`var_consumers`, :func:`read_var`, :func:`bind_eqn`) and for checking a pass's result in HLO text
  (:func:`count_collectives`).

The jaxpr types are JAX internals (``jax.extend.core``) that change between releases; see
``../shared/notes/jax-scheduling-passes.md`` and the version bounds in ``pyproject.toml``.

**Writing a new pass.** A new pass is a new module in :mod:`moejax.schedule` that uses this core; it does not
edit it. It provides one function ``decide(jaxpr) -> Plan``, called for the top-level jaxpr and for every
sub-jaxpr the interpreter descends into, which says, by equation index at this level of ``jaxpr`` only:

* ``replace[i]``: a :class:`Handler` evaluated *instead of* equation ``i`` (it may produce the outputs of
  several equations, e.g. a whole span, and may read any value available at ``i``);
* ``skip``: equations not evaluated (their outputs come from a handler);
* ``after[i]``: handlers evaluated right after equation ``i`` (``-1``: before the first equation), e.g. to
  emit a new collective as soon as its operands exist.

Everything not mentioned is re-bound unchanged; a structured equation is descended into when its body
contains one of the pass's *target primitives*. A skeleton::

    from moejax.schedule.rewrite import Handler, Plan, Visitor, run_pass

    def my_pass(fn):
        def decide(jaxpr):
            replace = {}
            for i, eqn in enumerate(jaxpr.eqns):
                if eqn.primitive.name == "psum":
                    replace[i] = Handler(my_psum, list(eqn.invars), list(eqn.outvars))
            return Plan(replace, set(), {})

        visit = Visitor(decide, ("psum",))          # descend only into bodies that contain a psum

        def wrapped(*args, **kwargs):
            return run_pass(fn, visit, args, kwargs)  # traces fn once per call, like jax.jit's tracing

        return wrapped

A handler's function receives the *values* of its ``invars`` (traced arrays when the rewritten function is
itself traced, e.g. under ``jax.jit``) and returns one value per ``outvar``. Build the :class:`Visitor` once,
outside ``wrapped``: it caches which sub-jaxprs contain targets. Test a pass as the others are tested: equal
outputs (and gradients) to the original function, and the intended collective structure in the lowered or
compiled HLO (:func:`count_collectives`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
from jax.extend import core as jcore

__all__ = ["Handler", "Plan", "RewriteError", "Visitor", "bind_eqn", "closed_fn", "contains_primitive",
           "count_collectives", "eval_rewritten", "open_jaxpr", "read_var", "rewrite_structured", "run_pass",
           "sub_jaxprs", "var_consumers"]


class RewriteError(ValueError):
    """The core cannot re-express a structured equation whose body contains a target of the pass.

    A pass may name a subclass to raise instead (:class:`Visitor`'s ``error``), e.g.
    :class:`moejax.schedule.pipeline.NotChunkable`."""


# ------------------------------------------------------------------------------------------ reading jaxprs


def sub_jaxprs(eqn) -> list:
    """The jaxprs (``Jaxpr`` or ``ClosedJaxpr``) held in ``eqn``'s params: a ``scan``/``jit`` body, the
    branches of a ``cond``, ..."""
    out = []
    for v in eqn.params.values():
        if isinstance(v, (jcore.Jaxpr, jcore.ClosedJaxpr)):
            out.append(v)
        elif isinstance(v, (tuple, list)):
            out.extend(x for x in v if isinstance(x, (jcore.Jaxpr, jcore.ClosedJaxpr)))
    return out


def open_jaxpr(j):
    """The ``Jaxpr`` of a ``ClosedJaxpr`` (a ``Jaxpr`` is returned as it is)."""
    return j.jaxpr if isinstance(j, jcore.ClosedJaxpr) else j


def contains_primitive(jaxpr, names: tuple[str, ...]) -> bool:
    """Whether ``jaxpr`` or any jaxpr nested in its equations has an equation whose primitive is named in
    ``names``."""
    for eqn in open_jaxpr(jaxpr).eqns:
        if eqn.primitive.name in names:
            return True
        if any(contains_primitive(s, names) for s in sub_jaxprs(eqn)):
            return True
    return False


def var_consumers(jaxpr) -> dict[Any, list[int]]:
    """For each variable of ``jaxpr`` (an open ``Jaxpr``), the indices of the equations that read it, in
    order (an equation reading it twice is listed twice)."""
    consumers: dict[Any, list[int]] = {}
    for i, e in enumerate(jaxpr.eqns):
        for v in e.invars:
            if isinstance(v, jcore.Var):
                consumers.setdefault(v, []).append(i)
    return consumers


def read_var(env, v):
    """The value of ``v`` in the environment ``env`` (a ``Literal`` is its own value)."""
    return v.val if isinstance(v, jcore.Literal) else env[v]


def bind_eqn(eqn, invals) -> list:
    """Re-emit ``eqn`` unchanged on ``invals``; always a list of outputs."""
    outs = eqn.primitive.bind(*invals, **eqn.params)
    return outs if eqn.primitive.multiple_results else [outs]


def count_collectives(hlo_text: str) -> dict[str, int]:
    """Count collective ops in HLO / StableHLO text (``all-to-all``, ``all-reduce``, ``all-gather``, ...).

    Counts the op names as they appear in compiled HLO (``all-to-all(``) and in StableHLO
    (``stablehlo.all_to_all``); async pairs count once (by their ``-start``)."""
    import re

    kinds = {"all_to_all": r"(?:all-to-all(?:-start)?\(|stablehlo\.all_to_all\b)",
             "all_reduce": r"(?:all-reduce(?:-start)?\(|stablehlo\.all_reduce\b)",
             "all_gather": r"(?:all-gather(?:-start)?\(|stablehlo\.all_gather\b)",
             "reduce_scatter": r"(?:reduce-scatter\(|stablehlo\.reduce_scatter\b)",
             "collective_permute": r"(?:collective-permute(?:-start)?\(|stablehlo\.collective_permute\b)"}
    return {k: len(re.findall(p, hlo_text)) for k, p in kinds.items()}


# ------------------------------------------------------------------------------------------ the pass protocol


@dataclasses.dataclass
class Plan:
    """A pass's decisions for one jaxpr: equations replaced by handlers, equations skipped (their outputs
    come from a handler), and extra handlers run right after an equation (index -1: before the first).

    Attributes:
      replace: equation index -> :class:`Handler` evaluated instead of that equation.
      skip: equation indices not evaluated.
      after: equation index (or -1) -> list of handlers evaluated right after that equation.
    """

    replace: dict
    skip: set
    after: dict


class Handler:
    """A piece of a rewritten jaxpr: ``fn(*values of invars)`` gives the values of ``outvars`` (a single
    non-list result is taken as the one output)."""

    def __init__(self, fn, invars, outvars):
        self.fn, self.invars, self.outvars = fn, invars, outvars

    def __call__(self, read):
        out = self.fn(*[read(v) for v in self.invars])
        return out if isinstance(out, (list, tuple)) else [out]


class Visitor:
    """Per-jaxpr decisions of a pass, with a cache of "does this sub-jaxpr contain a target".

    Args:
      decide: ``decide(jaxpr) -> Plan`` for one (open) jaxpr.
      target_prims: names of the primitives the pass rewrites; the interpreter descends into a structured
        equation only when its body contains one of them.
      error: the exception raised when a structured equation with a target cannot be re-expressed
        (:class:`RewriteError` or a subclass).
    """

    def __init__(self, decide: Callable, target_prims: tuple[str, ...], *, error: type = RewriteError):
        self._decide, self._targets, self._wants = decide, target_prims, {}
        self.error = error

    def wants(self, j) -> bool:
        """Whether ``j`` (or a jaxpr nested in it) contains a target primitive."""
        key = id(open_jaxpr(j))
        if key not in self._wants:
            self._wants[key] = contains_primitive(j, self._targets)
        return self._wants[key]

    def __call__(self, jaxpr):
        return self._decide(jaxpr)


# ------------------------------------------------------------------------------------------ the interpreter


def eval_rewritten(jaxpr, consts, args, visit: Visitor) -> list:
    """Evaluate ``jaxpr`` under a pass: ``visit(jaxpr) -> Plan``; equations with sub-jaxprs that contain
    targets of the pass are re-expressed through the public API with rewritten bodies
    (:func:`rewrite_structured`); everything else is re-bound unchanged."""
    plan = visit(jaxpr)
    env = {}
    for v, c in zip(jaxpr.constvars, consts):
        env[v] = c
    for v, a in zip(jaxpr.invars, args):
        env[v] = a
    read = lambda v: read_var(env, v)

    def run_after(i):
        for h in plan.after.get(i, ()):
            for v, o in zip(h.outvars, h(read)):
                env[v] = o

    run_after(-1)
    for i, eqn in enumerate(jaxpr.eqns):
        if i in plan.replace:
            h = plan.replace[i]
            for v, o in zip(h.outvars, h(read)):
                env[v] = o
        elif i not in plan.skip:
            invals = [read(v) for v in eqn.invars]
            subs = sub_jaxprs(eqn)
            if subs and any(visit.wants(s) for s in subs):
                outs = rewrite_structured(eqn, invals, visit)
            else:
                outs = bind_eqn(eqn, invals)
            for v, o in zip(eqn.outvars, outs):
                env[v] = o
        run_after(i)
    return [read(v) for v in jaxpr.outvars]


def closed_fn(closed, visit: Visitor) -> Callable:
    """A function evaluating the (closed or open) jaxpr ``closed`` on its arguments under the pass."""
    j = open_jaxpr(closed)
    consts = closed.consts if isinstance(closed, jcore.ClosedJaxpr) else []
    return lambda *a: eval_rewritten(j, consts, a, visit)


def rewrite_structured(eqn, invals, visit: Visitor) -> list:
    """Re-express the structured equation ``eqn`` (``scan``, ``shard_map``, ``jit``/``pjit``/``closed_call``/
    ``core_call``, ``checkpoint``/``remat``, ``cond``, ``while``, ``custom_jvp_call``) on ``invals`` with its
    bodies evaluated under the pass. A ``custom_jvp_call`` loses its custom rule (the rewritten body is
    differentiated directly: the same math). Any other primitive raises ``visit.error``."""
    name = eqn.primitive.name
    p = eqn.params
    if name == "scan":
        nc, ncar = p["num_consts"], p["num_carry"]
        consts, carry, xs = invals[:nc], invals[nc:nc + ncar], invals[nc + ncar:]
        f = closed_fn(p["jaxpr"], visit)

        def body(c, x):
            outs = f(*consts, *c, *x)
            return outs[:ncar], outs[ncar:]

        c_out, ys = jax.lax.scan(body, list(carry), list(xs), length=p["length"], reverse=p["reverse"],
                                 unroll=p["unroll"])
        return [*c_out, *ys]
    if name == "shard_map":
        f = closed_fn(p["jaxpr"], visit)
        kw = {}
        if p.get("newly_manual_axes") is not None:
            kw["axis_names"] = set(p["newly_manual_axes"])
        elif p.get("manual_axes") is not None:
            kw["axis_names"] = set(p["manual_axes"])
        sm = jax.shard_map(lambda *a: tuple(f(*a)), mesh=p["mesh"], in_specs=tuple(p["in_specs"]),
                           out_specs=tuple(p["out_specs"]), check_vma=p.get("check_vma", False), **kw)
        return list(sm(*invals))
    if name in ("jit", "pjit", "closed_call", "core_call"):
        return closed_fn(p.get("jaxpr", p.get("call_jaxpr")), visit)(*invals)
    if name in ("checkpoint", "remat"):
        f = closed_fn(p["jaxpr"], visit)
        return list(jax.checkpoint(lambda *a: tuple(f(*a)), prevent_cse=p.get("prevent_cse", True),
                                   policy=p.get("policy"))(*invals))
    if name == "cond":
        fs = [closed_fn(b, visit) for b in p["branches"]]
        return list(jax.lax.switch(invals[0], [lambda *a, f=f: tuple(f(*a)) for f in fs], *invals[1:]))
    if name == "while":
        cn, bn = p["cond_nconsts"], p["body_nconsts"]
        cc, bc, init = invals[:cn], invals[cn:cn + bn], invals[cn + bn:]
        cf, bf = closed_fn(p["cond_jaxpr"], visit), closed_fn(p["body_jaxpr"], visit)
        return list(jax.lax.while_loop(lambda s: cf(*cc, *s)[0], lambda s: tuple(bf(*bc, *s)), tuple(init)))
    if name == "custom_jvp_call":
        # the custom rule is lost; the rewritten body is differentiated directly (same math)
        return closed_fn(p["call_jaxpr"], visit)(*invals)
    raise visit.error(f"cannot rewrite inside '{name}' (it contains a target of the pass)")


def run_pass(fn: Callable, visit: Visitor, args: tuple, kwargs: dict):
    """Trace ``fn(*args, **kwargs)`` once and evaluate its jaxpr under the pass ``visit``; returns ``fn``'s
    outputs (same pytree structure)."""
    closed, out_shape = jax.make_jaxpr(lambda *a: fn(*a, **kwargs), return_shape=True)(*args)
    outs = eval_rewritten(closed.jaxpr, closed.consts, jax.tree.leaves(args), visit)
    return jax.tree.unflatten(jax.tree.structure(out_shape), outs)
