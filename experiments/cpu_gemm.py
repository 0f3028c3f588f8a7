"""float32 GEMM rates on this CPU: jax's dot against numpy (OpenBLAS) and torch, native ISA and capped to AVX2
(issue 26: the measurement first; the library's chosen GEMM path joins this table once it exists).

Shapes (``M x K @ K x N``): issue 26's reference GEMM (8192 x 512 @ 512 x 1024), the per-expert GEMMs of
``moe_layer_bench``'s layer A (4,096 tokens, top-2 of 8 experts, d 512, ff 1,024: ~1,024 rows an expert) and
layer B (top-8 of 64, d 512, ff 256: ~512 rows an expert), and the ``tiny`` preset's serving GEMMs (a 16-row
decode batch through an expert, a 2,048-token prefill through the QKV projection). Each library runs in its own
child process per ISA, 2 threads; the AVX2 cap is ``XLA_FLAGS=--xla_cpu_max_isa=AVX2``,
``ATEN_CPU_CAPABILITY=avx2`` + ``ONEDNN_MAX_CPU_ISA=AVX2`` for torch, ``OPENBLAS_CORETYPE=Haswell`` for numpy;
on the native run any preset ``OPENBLAS_CORETYPE`` / ``OPENBLAS_L2_SIZE`` is removed for the peer measurement
(what was preset is recorded). GFLOP/s = 2 M K N / best time of ``--reps`` batches (each long enough to take
~50 ms). Libraries that are not installed are skipped.

    python experiments/cpu_gemm.py [--reps 7]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments.common import cpu_isa, environment, markdown_table, write_results

SHAPES = {
    "reference 8192x512x1024": (8192, 512, 1024),
    "layer A expert up (1024x512x1024)": (1024, 512, 1024),
    "layer A expert down (1024x1024x512)": (1024, 1024, 512),
    "layer B expert up (512x512x256)": (512, 512, 256),
    "layer B expert down (512x256x512)": (512, 256, 512),
    "tiny decode expert (16x256x512)": (16, 256, 512),
    "tiny prefill qkv (2048x256x768)": (2048, 256, 768),
}
LIBS = ("jax", "numpy", "torch")
CAP_ENV = {"jax": {"XLA_FLAGS": "--xla_cpu_max_isa=AVX2"},
           "torch": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
           "numpy": {"OPENBLAS_CORETYPE": "Haswell"}}
PRESET_VARS = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "XLA_FLAGS")


def timed(fn, reps: int) -> float:
    """Best seconds per call over ``reps`` batches sized to ~50 ms."""
    fn()
    t = time.perf_counter()
    fn()
    one = max(time.perf_counter() - t, 1e-6)
    n = max(1, int(0.05 / one))
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t) / n)
    return best


def child(lib: str, reps: int) -> dict:
    """GFLOP/s of each shape with ``lib`` in this process."""
    import numpy as np

    rng = np.random.default_rng(0)
    out = {}
    for name, (M, K, N) in SHAPES.items():
        a = rng.standard_normal((M, K), dtype=np.float32)
        b = rng.standard_normal((K, N), dtype=np.float32)
        if lib == "jax":
            import jax
            import jax.numpy as jnp

            f = jax.jit(jnp.dot)
            ja, jb = jnp.asarray(a), jnp.asarray(b)
            s = timed(lambda f=f, ja=ja, jb=jb: f(ja, jb).block_until_ready(), reps)
        elif lib == "numpy":
            s = timed(lambda a=a, b=b: np.dot(a, b), reps)
        else:
            import torch

            torch.set_num_threads(2)
            ta, tb = torch.from_numpy(a), torch.from_numpy(b)
            s = timed(lambda ta=ta, tb=tb: torch.mm(ta, tb), reps)
        out[name] = 2 * M * K * N / s / 1e9
    return out


def run_child(lib: str, capped: bool, reps: int, extra_env: dict | None = None) -> dict | None:
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "XLA_FLAGS")}
    env.update({"OMP_NUM_THREADS": "2", "OPENBLAS_NUM_THREADS": "2"})
    if capped:
        env.update(CAP_ENV[lib])
    env.update(extra_env or {})
    p = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", lib, "--reps", str(reps)], env=env,
                       capture_output=True, text=True, check=False)
    if p.returncode:
        print(f"{lib} ({'AVX2' if capped else 'native'}) skipped: {p.stderr.strip().splitlines()[-1:]}", flush=True)
        return None
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--child", choices=LIBS, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.reps)))
        return 0
    preset = {k: os.environ[k] for k in PRESET_VARS if k in os.environ}
    results = {}
    for capped in (False, True):
        for lib in LIBS:  # one library at a time (2 cores)
            r = run_child(lib, capped, args.reps)
            if r is not None:
                results[(lib, capped)] = r
                print(lib, "AVX2" if capped else "native", {k: round(v, 1) for k, v in r.items()}, flush=True)
    # does the cap reach XLA:CPU's GEMM? jax once more with the ISA capped far lower (SSE4.2)
    sse = run_child("jax", False, args.reps, {"XLA_FLAGS": "--xla_cpu_max_isa=SSE4_2"})
    rows = []
    for name in SHAPES:
        for capped in (False, True):
            row = {"shape": name, "ISA": "AVX2 cap" if capped else f"native ({cpu_isa()})"}
            for lib in LIBS:
                if (lib, capped) in results:
                    row[f"{lib} GFLOP/s"] = results[(lib, capped)][name]
            peers = [row[f"{p} GFLOP/s"] for p in ("numpy", "torch") if f"{p} GFLOP/s" in row]
            if "jax GFLOP/s" in row and peers:
                row["jax / best peer"] = row["jax GFLOP/s"] / max(peers)
            if not capped and sse is not None:
                row["jax GFLOP/s, SSE4.2 cap"] = sse[name]
            rows.append(row)
    md = (f"# float32 GEMM on this CPU ({cpu_isa()}), native and capped to AVX2\n\n2 threads; best of {args.reps} "
          f"batches; each library in its own process. Preset environment: {preset or 'none'} (removed for the "
          f"runs; the caps set as the script's docstring says).\n\n"
          + markdown_table(rows, ["shape", "ISA", *(f"{lib} GFLOP/s" for lib in LIBS), "jax / best peer",
                                  "jax GFLOP/s, SSE4.2 cap"])
          + "\n`jax GFLOP/s, SSE4.2 cap`: if XLA's ISA cap governed the GEMM, capping to SSE4.2 would cut the large "
            "GEMMs' rate several-fold; where it does not, `--xla_cpu_max_isa` limits only the code XLA generates "
            "(fusions), not the GEMM library it calls, and the AVX2-capped column does not stand for an AVX2 "
            "machine's jax.\n")
    print(md)
    print("wrote", *write_results("cpu_gemm", {"env": environment(), "cpu": cpu_isa(), "preset_env": preset,
                                               "rows": rows}, md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
