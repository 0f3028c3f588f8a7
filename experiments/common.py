"""Shared helpers for experiments: timing, environment record, JSON + markdown output."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def setup_devices(n: int | None = None) -> None:
    """Set the XLA CPU device count before jax is imported (no-op once jax is loaded)."""
    if n and "jax" not in sys.modules:
        flags = os.environ.get("XLA_FLAGS", "")
        if "xla_force_host_platform_device_count" not in flags:
            os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()


def environment() -> dict:
    import jax
    return {
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "device_kind": jax.devices()[0].device_kind,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def cpu_isa() -> str:
    """The widest x86 vector ISA this CPU has (``AVX-512``/``AVX2``): CPU results differ by 2-4x between them."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return "unknown ISA"
    return "AVX-512" if "avx512f" in flags else ("AVX2" if "avx2" in flags else "no AVX2")


def time_fn(fn: Callable, *args, repeats: int = 5, warmup: int = 1) -> dict:
    """Compile (timed apart), warm up, then return median/min wall time of ``repeats`` calls."""
    import jax
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    compile_s = time.perf_counter() - t0
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t)
    return {"median_s": statistics.median(ts), "min_s": min(ts), "first_call_s": compile_s, "repeats": repeats}


def markdown_table(rows: Sequence[dict], columns: Sequence[str], floatfmt: str = "{:.3g}") -> str:
    def fmt(v):
        return floatfmt.format(v) if isinstance(v, float) else str(v)
    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        out.append("| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |")
    return "\n".join(out) + "\n"


def write_results(name: str, payload: dict, markdown: str) -> tuple[str, str]:
    """Write ``results/<name>.json`` and ``results/<name>.md`` atomically; returns their paths."""
    os.makedirs(RESULTS, exist_ok=True)
    jp, mp = os.path.join(RESULTS, name + ".json"), os.path.join(RESULTS, name + ".md")
    for path, text in ((jp, json.dumps(payload, indent=2) + "\n"), (mp, markdown)):
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    return jp, mp
