"""Per-stage timing of MoE layers from their named scopes (FSMoE's per-sub-module profile).

The MoE layer runs its six stages (gate, order, dispatch, expert, combine, inverse_order) under
``jax.named_scope("moe/<stage>")`` (:mod:`moejax.nn.stages`). XLA keeps the scope in each HLO instruction's
``op_name`` metadata, and ``jax.profiler`` records one trace event per executed HLO instruction. This module runs
a jitted function under the profiler, maps every executed instruction back to its stage through the compiled
HLO's metadata, and sums the event durations per stage: timing comes from the trace, not from hooks (hooks run
at trace time only).

Instructions that XLA fused across stages are attributed to the stage of the fusion's own metadata (its root
op); instructions outside any ``moe/`` scope are reported under ``"other"``.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable

import jax

_SCOPE = re.compile(r"moe/(gate|order|dispatch|expert|combine|inverse_order)\b")
_NAME = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=")
_INSTR = re.compile(_NAME.pattern + r".*?metadata=\{[^}]*op_name=\"([^\"]*)\"")


def instruction_stages(hlo_text: str) -> dict[str, str]:
    """``{HLO instruction name: stage}`` for the instructions whose ``op_name`` carries a ``moe/<stage>`` scope."""
    out = {}
    for line in hlo_text.splitlines():
        m = _INSTR.match(line)
        if not m:
            continue
        s = _SCOPE.findall(m.group(2))
        if s:
            out[m.group(1)] = s[-1]  # the innermost MoE stage scope
    return out


def stage_times(fn: Callable, *args, repeats: int = 3, per_device: bool = True) -> dict[str, float]:
    """Seconds per call spent in each MoE stage of ``jax.jit(fn)(*args)``, read from a profiler trace.

    Returns ``{stage: seconds}`` for the stages that executed, plus ``"other"`` (instructions outside the MoE
    scopes) and ``"total"``. With ``per_device`` the sums over devices' execution threads are divided by the
    number of devices the computation ran on (a per-device time). The function is compiled and run once
    before tracing (warm-up).
    """
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"stage_times: repeats must be a positive int, got {repeats!r}")
    jf = jax.jit(fn)
    hlo = jf.lower(*args).compile().as_text()
    stages = instruction_stages(hlo)
    names = {m.group(1) for m in map(_NAME.match, hlo.splitlines()) if m}
    jax.block_until_ready(jf(*args))
    tmp = tempfile.mkdtemp(prefix="moejax_stage_profile_")
    try:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            for _ in range(repeats):
                jax.block_until_ready(jf(*args))
        files = glob.glob(os.path.join(tmp, "**", "perfetto_trace.json.gz"), recursive=True)
        if not files:
            raise RuntimeError("stage_times: the profiler wrote no perfetto trace")
        with gzip.open(files[0]) as f:
            trace = json.load(f)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    totals: dict[str, float] = {}
    for e in events:
        if e.get("ph") != "X":
            continue
        name = e.get("name", "")
        if name not in names:
            continue
        key = stages.get(name, "other")
        totals[key] = totals.get(key, 0.0) + float(e.get("dur", 0.0)) * 1e-6
    n_dev = 1
    if per_device:
        leaves = [a for a in jax.tree.leaves(args) if hasattr(a, "sharding")]
        n_dev = max([len(a.sharding.device_set) for a in leaves] or [1])
    out = {k: v / repeats / n_dev for k, v in totals.items()}
    out["total"] = sum(out.values())
    return out

