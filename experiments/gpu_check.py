"""Device check of the Pallas kernels: compile for real, validate against the references, time against XLA.

Run on a lent GPU (or TPU) with the project as a working tree::

    PYTHONPATH=. python experiments/gpu_check.py            # about 2-4 minutes on one H100
    PYTHONPATH=. python experiments/gpu_check.py --smoke    # tiny shapes; on CPU the kernels run interpreted

Steps (each one is wrapped: a failure is recorded with its traceback and the next step runs; the JSON is
rewritten after every step, so a timeout still leaves the finished steps on disk):

1. ``copy_bandwidth``: ``x + 1`` over a large bfloat16 array (read + write bytes / time) -- the bandwidth
   the paged-attention target is measured against, in the same run.
2. ``dense_matmul``: one large bfloat16 ``jnp.dot`` (context for the device's achievable peak).
3. ``check_*``: every kernel compiled with ``interpret=False`` (on a GPU/TPU) and compared with its
   pure-JAX reference over a few shapes: ``gmm`` (incl. ``transpose_rhs``), ``tgmm``, the ``gmm`` gradient
   (which runs the ``gmm`` and ``tgmm`` kernels), and ``paged_attention`` for decode, speculative decoding
   and a prefill chunk. Tolerances (max-abs error relative to ``max(1, max|ref|)``): bfloat16 2e-2, float32
   5e-3 (GPU float32 dots may use TF32 on both sides).
4. ``gmm_tiling_sweep``: a few ``GmmTiling`` candidates at the first timing shape; the best is used below.
5. ``gmm_*``: bfloat16 grouped matmul at 16384 tokens, d_model 4096 -- d_ff 14336 with 8 experts top-2 and
   d_ff 1536 with 64 experts top-8 -- with uniform and skewed (Zipf-like) routing: the Pallas ``gmm`` and
   ``tgmm`` against ``lax.ragged_dot`` / ``lax.ragged_dot_general`` and against a dense ``jnp.dot`` with
   the same FLOPs, all measured in this run. Targets: >= 0.85 of dense and >= 1.2x ``ragged_dot``.
6. ``paged_decode``: paged decode attention at batch 64, context 4096, 32 query / 8 KV heads, head dim 128,
   16-token pages, against the XLA path (gather KV + dense attention); GB/s of KV read and the ratio to the
   copy bandwidth of step 1 (target >= 0.70), with a small ``pages_per_block`` x ``kv_splits`` sweep.

7. ``check_dequant_matmul`` / ``dequant_matmul`` / ``dequant_tiling_sweep``: the dequant-matmul kernel
   (int8, int4 and MWQ 2+1+1-bit planes, groups of 128) against its reference, then timed against the XLA
   path (dequantize + dot) and a dense bf16 matmul at K 4096, N 14336 for 16 rows (decode) and 2048 rows
   (prefill), and a tiling sweep at 2048 rows.

8. ``ep_ragged``: the dropless expert-parallel MoE (``expert_parallel(a2a="ragged")``) with the real
   ``jax.lax.ragged_all_to_all`` on a 1-device mesh (``expert=1``), forward and gradients, against the
   fixed-capacity ``all_to_all`` path with a capacity that drops nothing, and with a receive bound that drops
   rows against the all_gather emulation of the primitive (max errors and pass/fail in the JSON; float32 at
   ``highest`` matmul precision, tolerance 1e-4). Skipped, with the reason recorded, on CPU (XLA:CPU has no
   ``ragged_all_to_all``). When it passes on a GPU, add ``"gpu"`` to
   ``moejax.parallel.expert_parallel.RAGGED_VALIDATED_BACKENDS`` so ``a2a="auto"`` picks the ragged path.

9. ``serve_step``: the serving engine's jitted iteration on the layered-prefill experiment's model (128
   experts top-8): decode only, a 512-token chunk through all layers (chunked prefill) and a 2,100-token prompt
   through one layer (layered prefill at G = 8, whose inactive layers drop the prompt's K/V writes), beside
   decode rows. ``--only serve_step`` runs it alone.

10. ``nm_sparse``: N:M sparse training (issue 21): the routes from JAX to 2:4 sparse tensor cores found by
   introspection (``jax.lax``, ``jax.experimental.sparse``, Pallas Mosaic GPU's ``wgmma``/``tcgen05_mma``
   sparse operands) with the device's compute capability; the forward and activation-gradient bfloat16 GEMMs
   of a BDWP step with a dense and a 2:4-masked (densely stored) weight; the cost of recomputing BDWP's two
   masks of one weight.

11. ``omnimoe``: OmniMoE's atomic experts (issue 20): the expert-centric XLA path and the Pallas kernel
   (``pallas_kernels.atomic_experts``, Triton) against token-centric, forward in bfloat16 at 4096 tokens, d 1024,
   N = 2^16, K 16 and 64, checked against each other, and the Cartesian product router against a flat router.

12. ``speculative``: MTP speculative decoding (issue 22): a speculative step (verify 1 + K positions, the MTP
   blocks, drafting) against a plain decode step on the tiny preset with 2 MTP heads, batch 1 and 16, K 1 and 2,
   and the TPOT ratio at the acceptance ``experiments/speculative.py`` measured on CPU.

Each step is a function of the run's :class:`Context` returning its record; ``STEPS`` lists them in run order.
``--only a,b`` runs only the steps whose names start with those prefixes, ``--skip`` the others; ``--out``
names the results file (so a partial run does not overwrite the full one).

Prints TFLOP/s, GB/s and ratios to the device's peak (from a table of known devices; ``null`` if unknown)
and writes ``experiments/results/gpu_check.{json,md}`` (``gpu_check_smoke.*`` with ``--smoke``).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import statistics
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments.common import environment, markdown_table, write_results

# Dense bfloat16 tensor-core peak (TFLOP/s, no sparsity) and HBM bandwidth (GB/s), matched by substring of
# jax's device_kind (first match wins, so specific names come first).
PEAKS = [
    ("H100 PCIe", 756.0, 2000.0),
    ("H100 NVL", 835.0, 3900.0),
    ("H100", 989.0, 3350.0),
    ("H200", 989.0, 4800.0),
    ("GH200", 989.0, 4000.0),
    ("A100-SXM4-40GB", 312.0, 1555.0),
    ("A100", 312.0, 2039.0),
    ("L40S", 362.0, 864.0),
    ("L4", 121.0, 300.0),
    ("TPU v5 lite", 197.0, 819.0),
    ("TPU v5", 459.0, 2765.0),
    ("TPU v4", 275.0, 1228.0),
    ("TPU v6", 918.0, 1640.0),
]

FULL = {
    "copy_bytes": 2 << 30,
    "dense": 8192,
    "gmm": {"8e-top2": {"T": 16384, "D": 4096, "F": 14336, "E": 8, "k": 2},
            "64e-top8": {"T": 16384, "D": 4096, "F": 1536, "E": 64, "k": 8}},
    "pa": {"B": 64, "ctx": 4096, "H": 32, "KVH": 8, "D": 128, "ps": 16},
    "iters": 10, "reps": 3,
}
SMOKE = {
    "copy_bytes": 4 << 20,
    "dense": 256,
    "gmm": {"8e-top2": {"T": 128, "D": 64, "F": 96, "E": 8, "k": 2},
            "64e-top8": {"T": 64, "D": 64, "F": 32, "E": 16, "k": 4}},
    "pa": {"B": 4, "ctx": 128, "H": 8, "KVH": 2, "D": 64, "ps": 16},
    "iters": 1, "reps": 1,
}


EP_RAGGED_TOL = 1e-4


def ep_ragged_compare(mode="ragged", *, T=256, D=64, F=96, E=8, top_k=2, bound=0.5):
    """The ``ep_ragged`` step: the ragged EP MoE (``mode``: ``ragged`` = the real primitive, or
    ``ragged_emulated``) on a 1-device mesh vs the fixed path (capacity = group size, nothing dropped), outputs
    and loss gradients w.r.t. params and input; then with ``ragged_bound=bound`` (rows dropped) vs the
    emulation. Errors are max-abs relative to ``max(1, max|ref|)``."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import PartitionSpec as P

    from moejax.config import MoEConfig, RouterConfig
    from moejax.nn.moe import MoE
    from moejax.parallel.expert_parallel import expert_parallel
    from moejax.parallel.mesh import (
        BATCH_AXES,
        EXPERT_AXES,
        MeshConfig,
        make_mesh,
        state_specs,
    )

    mesh = make_mesh(MeshConfig())  # every axis 1: one device
    cfg = MoEConfig(num_experts=E, d_ff=F, router=RouterConfig(type="topk", top_k=top_k), dispatch="dropless")
    model = MoE(D, cfg, init_std=0.3, rngs=nnx.Rngs(0))
    gdef, params, rest = nnx.split(model, nnx.Param, ...)
    pspec, rspec = state_specs(params), state_specs(rest)
    x = jax.random.normal(jax.random.PRNGKey(1), (T, D), jnp.float32)
    cot = jax.random.normal(jax.random.PRNGKey(2), (T, D), jnp.float32)

    def run(ep_kw):
        def body(params, rest, x, cot):
            with expert_parallel(axis=EXPERT_AXES, batch_axes=BATCH_AXES, **ep_kw):
                y, aux = nnx.merge(gdef, params, rest)(x)
            return y, jnp.sum(y * cot)[None], jax.lax.psum(aux["dropped"], BATCH_AXES)

        f = jax.shard_map(body, mesh=mesh, in_specs=(pspec, rspec, P(BATCH_AXES), P(BATCH_AXES)),
                          out_specs=(P(BATCH_AXES), P(BATCH_AXES), P()), check_vma=False)

        def loss(params, x):
            y, l, dropped = f(params, rest, x, cot)
            return jnp.sum(l), (y, dropped)

        g = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
        with jax.default_matmul_precision("highest"):
            hlo = g.trace(params, x).lower().as_text()
            (_, (y, dropped)), (gp, gx) = g(params, x)
        return {"y": y, "gx": gx, "gp": jax.tree.leaves(gp), "dropped": int(dropped),
                "has_ragged_a2a": "ragged_all_to_all" in hlo}

    def errs(a, b):
        e = {"out": rel_err(a["y"], b["y"]), "dx": rel_err(a["gx"], b["gx"]),
             "dparams": max(rel_err(u, v) for u, v in zip(a["gp"], b["gp"]))}
        return e, max(e.values())

    cases = []
    rag = run({"a2a": mode})
    fixed = run({"a2a": "fixed", "capacity_factor": 0})
    e, m = errs(rag, fixed)
    ok = (m <= EP_RAGGED_TOL and rag["dropped"] == 0 == fixed["dropped"]
          and (mode != "ragged" or rag["has_ragged_a2a"]))
    cases.append({"case": f"{mode} vs fixed (no drops) T={T} E={E} k={top_k}", **e, "max_err": m,
                  "dropped": rag["dropped"], "primitive_in_hlo": rag["has_ragged_a2a"], "ok": ok})
    rb = run({"a2a": mode, "ragged_bound": bound})
    em = run({"a2a": "ragged_emulated", "ragged_bound": bound})
    e, m = errs(rb, em)
    ok2 = m <= EP_RAGGED_TOL and rb["dropped"] == em["dropped"] > 0
    cases.append({"case": f"{mode} vs emulation, ragged_bound={bound}", **e, "max_err": m,
                  "dropped": rb["dropped"], "dropped_emulated": em["dropped"], "ok": ok2})
    worst = max(c["max_err"] for c in cases)
    return {"cases": cases, "max_err": worst, "tol": EP_RAGGED_TOL, "all_ok": bool(ok and ok2)}


def peak_for(kind: str):
    for name, tflops, gbps in PEAKS:
        if name.lower() in kind.lower():
            return {"match": name, "bf16_tflops": tflops, "hbm_gbps": gbps}
    return None


def bench(fn, *args, iters=10, reps=3):
    """Compile (timed apart), warm up, then ``reps`` batches of ``iters`` back-to-back calls."""
    import jax
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    compile_s = time.perf_counter() - t0
    jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(iters):
            out = fn(*args)
        jax.block_until_ready(out)
        ts.append((time.perf_counter() - t) / iters)
    return {"median_s": statistics.median(ts), "min_s": min(ts), "compile_s": compile_s}


def rel_err(a, b):
    import numpy as np
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if not np.all(np.isfinite(a)):
        return float("inf")
    return float(np.max(np.abs(a - b))) / max(1.0, float(np.max(np.abs(b))))


def skewed_sizes(M, E, alpha=1.2):
    """Zipf-like group sizes summing to M (expert e gets a share proportional to 1/(e+1)^alpha)."""
    import numpy as np
    w = 1.0 / np.arange(1, E + 1) ** alpha
    sizes = np.floor(w / w.sum() * M).astype(np.int64)
    sizes[0] += M - sizes.sum()
    return sizes.astype(np.int32)


class Runner:
    def __init__(self, out_name, payload, budget_s):
        self.out_name, self.payload, self.budget_s = out_name, payload, budget_s
        self.t_start = time.perf_counter()

    def step(self, name, fn):
        elapsed = time.perf_counter() - self.t_start
        if elapsed > self.budget_s:
            self.payload["steps"][name] = {"ok": False, "skipped": f"time budget ({self.budget_s}s) used up"}
            print(f"-- {name}: skipped (budget)", flush=True)
            return None
        print(f"-- {name}", flush=True)
        t = time.perf_counter()
        try:
            res = fn()
            rec = {"ok": True, **(res or {})}
        except Exception as e:  # noqa: BLE001 - one failed step must not lose the others
            res = None
            rec = {"ok": False, "error": f"{type(e).__name__}: {str(e)[:2000]}",
                   "traceback": traceback.format_exc()[-4000:]}
            print(f"   FAILED: {rec['error'][:500]}", flush=True)
        rec["wall_s"] = time.perf_counter() - t
        self.payload["steps"][name] = rec
        self.write()
        return res

    def write(self):
        self.payload["total_wall_s"] = time.perf_counter() - self.t_start
        write_results(self.out_name, self.payload, to_markdown(self.payload))


def to_markdown(p):
    env = p["env"]
    lines = [f"# gpu_check ({p['mode']})\n", (f"Device: {env.get('device_kind')} ({env.get('backend')}), "
             f"jax {env.get('jax')}, kernel variant `{p['variant']}`, interpret={p['interpret']}, "
             f"peak: {p['peak']}.\n")]
    if p["mode"] == "smoke":
        lines.append("Smoke run: tiny shapes, kernels interpreted on CPU; timings are meaningless.\n")
    checks, timings = [], []
    for name, r in p["steps"].items():
        if name.startswith("check_"):
            for c in r.get("cases", []):
                checks.append({"step": name, **c})
            if not r.get("ok"):
                checks.append({"step": name, "case": "-", "ok": False, "error": r.get("error", r.get("skipped"))})
        elif name.startswith(("gmm_", "paged_", "dequant_")) and name != "gmm_tiling_sweep":
            for c in r.get("rows", []):
                timings.append({"step": name, **c})
            if not r.get("ok"):
                timings.append({"step": name, "path": "-", "error": r.get("error", r.get("skipped"))})
    for name in ("copy_bandwidth", "dense_matmul", "gmm_tiling_sweep", "ep_ragged"):
        r = p["steps"].get(name, {})
        lines.append(f"- **{name}**: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                     for k, v in r.items() if k not in ("traceback", "sweep", "cases")))
    for c in p["steps"].get("ep_ragged", {}).get("cases", []):
        lines.append(f"  - ep_ragged {c['case']}: max_err={c['max_err']:.3g} dropped={c['dropped']} ok={c['ok']}")
    sw = p["steps"].get("gmm_tiling_sweep", {}).get("sweep", {})
    if sw:
        lines.append("\n## Tiling sweep (8 experts top-2, uniform)\n")
        lines.append(markdown_table([{"kernel": k, **r} for k, v in sw.items() for r in v["sweep"]],
                                    ["kernel", "tiling", "median_ms", "tflops", "error"]))
    lines.append("\n## Correctness (kernel vs reference)\n")
    lines.append(markdown_table(checks, ["step", "case", "dtype", "rel_err", "tol", "ok", "error"]))
    lines.append("\n## Timings\n")
    lines.append(markdown_table(timings, ["step", "M", "path", "median_ms", "tflops", "gbps", "vs_dense", "vs_xla",
                                          "vs_peak", "vs_copy", "target_met", "error"]))
    return "\n".join(lines) + "\n"


# -- the steps: one function per step, each taking the run's context and returning its record ----------------


@dataclasses.dataclass
class Context:
    """What the steps share: the parsed arguments, the shape set (``FULL`` or ``SMOKE``), the timing repeats,
    the kernel variant and interpret switch, the device's peak, the check tolerances, and ``shared``: values one
    step leaves for a later one (``copy_gbps`` for the bandwidth ratios, the best ``tiling``/``tgmm_tiling``)."""

    args: argparse.Namespace
    S: dict
    it: dict
    variant: str
    interpret: bool
    peak: dict | None
    tol: dict
    shared: dict

    @property
    def smoke(self) -> bool:
        return self.args.smoke

    def vs_peak(self, tflops=None, gbps=None):
        if self.peak is None:
            return None
        return tflops / self.peak["bf16_tflops"] if tflops is not None else gbps / self.peak["hbm_gbps"]


# 1. copy bandwidth -------------------------------------------------------------------------------------------
def copy_bandwidth(ctx):
    import jax
    import jax.numpy as jnp

    n = ctx.S["copy_bytes"] // 2
    x = jnp.ones((n // 1024, 1024), jnp.bfloat16)
    t = bench(jax.jit(lambda x: x + 1), x, **ctx.it)
    gbps = 2 * n * 2 / t["median_s"] / 1e9
    ctx.shared["copy_gbps"] = gbps
    print(f"   copy: {gbps:.1f} GB/s", flush=True)
    return {"bytes_moved": 4 * n, "median_ms": t["median_s"] * 1e3, "gbps": gbps, "vs_peak": ctx.vs_peak(gbps=gbps)}


# 2. dense matmul ---------------------------------------------------------------------------------------------
def dense_matmul(ctx):
    import jax
    import jax.numpy as jnp

    n = ctx.S["dense"]
    a = jnp.ones((n, n), jnp.bfloat16)
    t = bench(jax.jit(lambda a, b: a @ b), a, a, **ctx.it)
    tf = 2 * n ** 3 / t["median_s"] / 1e12
    print(f"   dense {n}^3: {tf:.1f} TFLOP/s", flush=True)
    return {"n": n, "median_ms": t["median_s"] * 1e3, "tflops": tf, "vs_peak": ctx.vs_peak(tflops=tf)}


# 3. correctness ----------------------------------------------------------------------------------------------
def gmm_inputs(M, K, N, sizes, dtype, seed=0):
    import jax
    import jax.numpy as jnp
    import numpy as np

    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    x = jax.random.normal(k1, (M, K), jnp.float32).astype(dtype)
    w = (jax.random.normal(k2, (len(sizes), K, N), jnp.float32) / np.sqrt(K)).astype(dtype)
    dy = jax.random.normal(k3, (M, N), jnp.float32).astype(dtype)
    return x, w, dy, jnp.asarray(sizes, jnp.int32)


def gmm_check_cases(smoke):
    """``(name, M, K, N, group sizes)`` of the ``gmm``/``tgmm`` checks."""
    import numpy as np

    if smoke:
        return [("ragged+empty", 100, 48, 40, [0, 10, 33, 0, 25, 1, 20, 0])]
    rng = np.random.default_rng(0)
    return [("ragged+empty", 1000, 256, 384, [0, 100, 333, 0, 250, 1, 200, 0]),
            ("uniform-8", 4096, 512, 1024, [512] * 8),
            ("random-64", 2048, 128, 256, list(rng.multinomial(1900, np.ones(64) / 64)))]


def check_gmm(ctx):
    import jax
    import jax.numpy as jnp

    from pallas_kernels.grouped_matmul import gmm, gmm_reference

    cases, ok, tol, interpret = [], True, ctx.tol, ctx.interpret
    f = jax.jit(lambda x, w, gs: gmm(x, w, gs, impl="pallas", interpret=interpret))
    ft = jax.jit(lambda x, w, gs: gmm(x, jnp.swapaxes(w, 1, 2), gs, impl="pallas", transpose_rhs=True,
                                      interpret=interpret))
    for cname, M, K, N, sizes in gmm_check_cases(ctx.smoke):
        for dtype in (jnp.bfloat16, jnp.float32):
            x, w, _, gs = gmm_inputs(M, K, N, sizes, dtype)
            ref = gmm_reference(x.astype(jnp.float32), w.astype(jnp.float32), gs)
            for label, fn in (("", f), ("transpose_rhs ", ft)):
                e = rel_err(fn(x, w, gs), ref)
                cases.append({"case": f"{label}{cname} {M}x{K}x{N} G={len(sizes)}", "dtype": jnp.dtype(dtype).name,
                              "rel_err": e, "tol": tol[dtype], "ok": e <= tol[dtype]})
                ok &= e <= tol[dtype]
    return {"cases": cases, "all_ok": bool(ok)}


def check_tgmm(ctx):
    import jax
    import jax.numpy as jnp

    from pallas_kernels.grouped_matmul import tgmm, tgmm_reference

    cases, ok, tol, interpret = [], True, ctx.tol, ctx.interpret
    f = jax.jit(lambda x, dy, gs: tgmm(x, dy, gs, impl="pallas", interpret=interpret))
    for cname, M, K, N, sizes in gmm_check_cases(ctx.smoke):
        for dtype in (jnp.bfloat16, jnp.float32):
            x, _, dy, gs = gmm_inputs(M, K, N, sizes, dtype, seed=1)
            e = rel_err(f(x, dy, gs), tgmm_reference(x.astype(jnp.float32), dy.astype(jnp.float32), gs))
            cases.append({"case": f"{cname} {M}x{K}x{N} G={len(sizes)}", "dtype": jnp.dtype(dtype).name,
                          "rel_err": e, "tol": tol[dtype], "ok": e <= tol[dtype]})
            ok &= e <= tol[dtype]
    return {"cases": cases, "all_ok": bool(ok)}


def check_gmm_grad(ctx):
    import jax
    import jax.numpy as jnp

    from pallas_kernels.grouped_matmul import gmm, gmm_reference

    cases, ok, interpret = [], True, ctx.interpret
    cname, M, K, N, sizes = gmm_check_cases(ctx.smoke)[0]
    x, w, dy, gs = gmm_inputs(M, K, N, sizes, jnp.float32, seed=2)

    def loss(impl):
        return lambda x, w: jnp.sum(gmm(x, w, gs, impl=impl, interpret=interpret) * dy)

    gk = jax.jit(jax.grad(loss("pallas"), (0, 1)))(x, w)
    gr = jax.jit(jax.grad(lambda x, w: jnp.sum(gmm_reference(x, w, gs) * dy), (0, 1)))(x, w)
    for label, a, b in (("d lhs", gk[0], gr[0]), ("d rhs", gk[1], gr[1])):
        e = rel_err(a, b)
        cases.append({"case": f"{label} {cname}", "dtype": "float32", "rel_err": e, "tol": 5e-3, "ok": e <= 5e-3})
        ok &= e <= 5e-3
    return {"cases": cases, "all_ok": bool(ok)}


def pa_inputs(B, Tq, H, KVH, D, ps, lengths, dtype, seed=0):
    import jax.numpy as jnp
    import numpy as np

    r = np.random.default_rng(seed)
    maxp = max(1, -(-max(lengths) // ps))
    P = B * maxp + 1
    q = jnp.asarray(r.normal(size=(B, Tq, H, D)), dtype)
    kp = jnp.asarray(r.normal(size=(P, ps, KVH, D)), dtype)
    vp = jnp.asarray(r.normal(size=(P, ps, KVH, D)), dtype)
    bt = jnp.asarray(1 + r.permutation(B * maxp).reshape(B, maxp), jnp.int32)
    return q, kp, vp, bt, jnp.asarray(lengths, jnp.int32)


def pa_check_cases(smoke):
    """``(name, B, Tq, H, KVH, D, page size, lengths)`` of the paged-attention check."""
    if smoke:
        return [("decode GQA4", 3, 1, 8, 2, 32, 16, [0, 7, 45]), ("chunk12 GQA8", 2, 12, 8, 1, 16, 16, [12, 37])]
    return [("decode GQA4", 8, 1, 32, 8, 128, 16, [0, 1, 15, 16, 17, 300, 1024, 2048]),
            ("spec4 GQA4 hd64 p32", 4, 4, 16, 4, 64, 32, [4, 33, 500, 1999]),
            ("prefill-chunk128 GQA8", 2, 128, 16, 2, 128, 16, [128, 900])]


def check_paged_attention(ctx):
    import jax
    import jax.numpy as jnp

    from pallas_kernels.paged_attention import (
        paged_attention,
        paged_attention_reference,
    )

    cases, ok, tol, interpret = [], True, ctx.tol, ctx.interpret
    f = jax.jit(lambda *a: paged_attention(*a, impl="pallas", interpret=interpret))
    for cname, *shape, lengths in pa_check_cases(ctx.smoke):
        for dtype in (jnp.bfloat16, jnp.float32):
            a = pa_inputs(*shape, lengths, dtype)
            ref = paged_attention_reference(*(x.astype(jnp.float32) if x.dtype == dtype else x for x in a))
            e = rel_err(f(*a), ref)
            cases.append({"case": cname, "dtype": jnp.dtype(dtype).name, "rel_err": e, "tol": tol[dtype],
                          "ok": e <= tol[dtype]})
            ok &= e <= tol[dtype]
    return {"cases": cases, "all_ok": bool(ok)}


# 4-5. grouped matmul timings ---------------------------------------------------------------------------------
def gmm_setup(c, routing):
    import jax
    import jax.numpy as jnp
    import numpy as np

    M, D, F, E = c["T"] * c["k"], c["D"], c["F"], c["E"]
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(3), 3)
    x = jax.random.normal(k1, (M, D), jnp.bfloat16)
    w = (jax.random.normal(k2, (E, D, F), jnp.bfloat16) * 0.02).astype(jnp.bfloat16)
    dy = jax.random.normal(k3, (M, F), jnp.bfloat16)
    sizes = np.full(E, M // E, np.int32) if routing == "uniform" else skewed_sizes(M, E)
    sizes[0] += M - sizes.sum()
    return x, w, dy, jnp.asarray(sizes, jnp.int32), 2 * M * D * F


def gmm_tilings(variant, smoke):
    """The ``gmm`` and ``tgmm`` tiling candidates of the sweep; the first of each is the default."""
    from pallas_kernels.grouped_matmul import GmmTiling

    tilings = [GmmTiling(128, 128, 128), GmmTiling(128, 128, 128, num_warps=8),
               GmmTiling(128, 64, 256, num_warps=8, num_stages=3), GmmTiling(128, 64, 256, num_warps=8, num_stages=4),
               GmmTiling(256, 64, 128, num_warps=8, num_stages=3), GmmTiling(256, 64, 128, num_warps=8, num_stages=4),
               GmmTiling(256, 64, 256, num_warps=8, num_stages=3), GmmTiling(256, 128, 128, num_warps=8)]
    tgmm_tilings = [GmmTiling(128, 128, 128, num_warps=8), GmmTiling(128, 128, 256, num_warps=8),
                    GmmTiling(64, 128, 256, num_warps=8, num_stages=3), GmmTiling(64, 256, 128, num_warps=8, num_stages=3),
                    GmmTiling(64, 128, 256, num_warps=8, num_stages=4), GmmTiling(32, 256, 256, num_warps=8, num_stages=3),
                    GmmTiling(128, 256, 128, num_warps=8), GmmTiling(64, 256, 256, num_warps=8)]
    if variant == "tpu":
        tilings = [GmmTiling(128, 128, 128), GmmTiling(256, 512, 512), GmmTiling(512, 1024, 1024)]
        tgmm_tilings = tilings
    if smoke:
        tilings = tilings[:2] if variant == "gpu" else tilings[:1]
        tgmm_tilings = tgmm_tilings[:2] if variant == "gpu" else tgmm_tilings[:1]
    return tilings, tgmm_tilings


def gmm_tiling_sweep(ctx):
    import jax

    from pallas_kernels.grouped_matmul import gmm, tgmm

    interpret, shared = ctx.interpret, ctx.shared
    tilings, tgmm_tilings = gmm_tilings(ctx.variant, ctx.smoke)
    x, w, dy, gs, flops = gmm_setup(ctx.S["gmm"]["8e-top2"], "uniform")
    out = {}
    for kname, key, cands, fn, args_ in (
            ("gmm", "tiling", tilings, lambda t: lambda x, w, gs: gmm(x, w, gs, impl="pallas", tiling=t,
                                                             interpret=interpret), (x, w, gs)),
            ("tgmm", "tgmm_tiling", tgmm_tilings, lambda t: lambda x, dy, gs: tgmm(x, dy, gs, impl="pallas", tiling=t,
                                                                   interpret=interpret), (x, dy, gs))):
        rows = []
        for t in cands:
            try:
                r = bench(jax.jit(fn(t)), *args_, **ctx.it)
                rows.append({"tiling": str(t), "median_ms": r["median_s"] * 1e3,
                             "tflops": flops / r["median_s"] / 1e12})
                print(f"   {kname} {t}: {rows[-1]['tflops']:.1f} TFLOP/s", flush=True)
            except Exception as e:  # noqa: BLE001
                rows.append({"tiling": str(t), "error": f"{type(e).__name__}: {str(e)[:300]}"})
        good = [(r["median_ms"], i) for i, r in enumerate(rows) if "median_ms" in r]
        if good:
            shared[key] = cands[min(good)[1]]
        out[kname] = {"sweep": rows, "best": str(shared[key])}
    return {"sweep": out, "best": str(shared["tiling"]), "best_tgmm": str(shared["tgmm_tiling"])}


def gmm_timing(ctx, cname, routing):
    """The ``gmm_<cname>_<routing>`` step: Pallas gmm/tgmm (at the sweep's best tilings) vs the XLA paths and
    a dense matmul of the same FLOPs."""
    import jax

    from pallas_kernels.grouped_matmul import gmm, tgmm

    interpret = ctx.interpret
    x, w, dy, gs, flops = gmm_setup(ctx.S["gmm"][cname], routing)
    t, tt = ctx.shared["tiling"], ctx.shared["tgmm_tiling"]
    M, D = x.shape
    F = w.shape[2]
    w0 = w[0]
    paths = {
        "dense jnp.dot": (jax.jit(lambda x, w0: x @ w0), (x, w0)),
        "ragged_dot": (jax.jit(lambda x, w, gs: gmm(x, w, gs, impl="xla")), (x, w, gs)),
        "pallas gmm": (jax.jit(lambda x, w, gs: gmm(x, w, gs, impl="pallas", tiling=t, interpret=interpret)),
                       (x, w, gs)),
        "ragged_dot_general (tgmm)": (jax.jit(lambda x, dy, gs: tgmm(x, dy, gs, impl="xla")), (x, dy, gs)),
        "pallas tgmm": (jax.jit(lambda x, dy, gs: tgmm(x, dy, gs, impl="pallas", tiling=tt,
                                                       interpret=interpret)), (x, dy, gs)),
    }
    res = {}
    for pname, (f, a) in paths.items():
        try:
            res[pname] = bench(f, *a, **ctx.it)
        except Exception as e:  # noqa: BLE001
            res[pname] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    rows = []
    dense_s = res["dense jnp.dot"].get("median_s")
    for pname, r in res.items():
        if "error" in r:
            rows.append({"path": pname, "error": r["error"]})
            continue
        tf = flops / r["median_s"] / 1e12
        row = {"path": pname, "median_ms": r["median_s"] * 1e3, "compile_s": r["compile_s"], "tflops": tf,
               "vs_peak": ctx.vs_peak(tflops=tf), "vs_dense": dense_s / r["median_s"] if dense_s else None}
        xla = {"pallas gmm": "ragged_dot", "pallas tgmm": "ragged_dot_general (tgmm)"}.get(pname)
        if xla and "median_s" in res[xla]:
            row["vs_xla"] = res[xla]["median_s"] / r["median_s"]
            row["target_met"] = bool(row["vs_dense"] and row["vs_dense"] >= 0.85 and row["vs_xla"] >= 1.2)
        rows.append(row)
        print(f"   {pname}: {row['median_ms']:.3f} ms {tf:.1f} TFLOP/s vs dense "
              f"{row['vs_dense'] or float('nan'):.2f} vs xla {row.get('vs_xla', float('nan')):.2f}", flush=True)
    return {"M": M, "D": D, "F": F, "E": w.shape[0], "group_sizes": [int(v) for v in gs],
            "tiling": str(t), "tgmm_tiling": str(tt), "rows": rows}


# 6. paged decode ---------------------------------------------------------------------------------------------
def paged_decode(ctx):
    import jax
    import jax.numpy as jnp

    from pallas_kernels.paged_attention import PagedAttentionConfig, paged_attention

    interpret = ctx.interpret
    c = ctx.S["pa"]
    B, ctx_len, H, KVH, D, ps = c["B"], c["ctx"], c["H"], c["KVH"], c["D"], c["ps"]
    a = pa_inputs(B, 1, H, KVH, D, ps, [ctx_len] * B, jnp.bfloat16, seed=5)
    kv_bytes = 2 * B * ctx_len * KVH * D * 2
    copy = ctx.shared.get("copy_gbps")
    rows = []
    paths = {"xla (gather + dense)": jax.jit(lambda *a: paged_attention(*a, impl="xla"))}
    if ctx.variant != "gpu":
        configs = [(None, 1)]
    elif ctx.smoke:
        configs = [(None, 1), (None, 2)]
    else:
        configs = [(4, 1), (8, 1), (16, 1), (8, 2), (8, 4)]
    for ppb, splits in configs:
        cfg = PagedAttentionConfig(pages_per_block=ppb, kv_splits=splits)
        paths[f"pallas ppb={ppb} splits={splits}"] = jax.jit(
            lambda *a, cfg=cfg: paged_attention(*a, impl="pallas", config=cfg, interpret=interpret))
    xla_s = None
    for pname, f in paths.items():
        try:
            r = bench(f, *a, **ctx.it)
        except Exception as e:  # noqa: BLE001
            rows.append({"path": pname, "error": f"{type(e).__name__}: {str(e)[:300]}"})
            continue
        gbps = kv_bytes / r["median_s"] / 1e9
        row = {"path": pname, "median_ms": r["median_s"] * 1e3, "compile_s": r["compile_s"], "gbps": gbps,
               "vs_peak": ctx.vs_peak(gbps=gbps), "vs_copy": gbps / copy if copy else None}
        if pname.startswith("xla"):
            xla_s = r["median_s"]
        else:
            row["vs_xla"] = xla_s / r["median_s"] if xla_s else None
            row["target_met"] = bool(row["vs_copy"] and row["vs_copy"] >= 0.70)
        rows.append(row)
        print(f"   {pname}: {row['median_ms']:.3f} ms {gbps:.1f} GB/s vs copy "
              f"{row['vs_copy'] or float('nan'):.2f}", flush=True)
    return {**c, "kv_bytes": kv_bytes, "rows": rows}


# 7. dequant-matmul (D2MoE / uniform int-k expert weights) ----------------------------------------------------
DQ_BITS = [("int8", (8,), 0.0), ("int4", (4,), 0.0), ("mwq 2+1+1", (2, 1, 1), 0.5)]  # (label, plane bits, offset)


def dq_inputs(M, K, N, bits, gsz, seed=0):
    import jax.numpy as jnp
    import numpy as np

    rng_ = np.random.default_rng(seed)
    planes = tuple(jnp.asarray(rng_.integers(0, 256, (K * b // 8, N), dtype=np.uint8)) for b in bits)
    scales = tuple(jnp.asarray(rng_.uniform(0.5, 1.5, (K // gsz, N)) * 0.01 / 2 ** sum(bits[:i + 1]),
                               jnp.float16) for i in range(len(bits)))
    zero = jnp.asarray(rng_.normal(0, 0.01, (K // gsz, N)), jnp.float16)
    x = jnp.asarray(rng_.normal(0, 1, (M, K)), jnp.bfloat16)
    wbytes = sum(p.size for p in planes) + 2 * (sum(s_.size for s_ in scales) + zero.size)
    return x, planes, scales, zero, wbytes


def check_dequant_matmul(ctx):
    import jax
    import jax.numpy as jnp

    from pallas_kernels.dequant_matmul import dequant_matmul, dequant_matmul_reference

    cases, ok, tol, interpret = [], True, ctx.tol, ctx.interpret
    M, K, N, gsz = (64, 1024, 512, 128) if not ctx.smoke else (16, 256, 64, 128)
    for label, bits, off in DQ_BITS:
        x, planes, scales, zero, _ = dq_inputs(M, K, N, bits, gsz, seed=2)
        kw = {"plane_bits": bits, "group_size": gsz, "base_offset": off}
        ref = dequant_matmul_reference(x.astype(jnp.float32), planes, scales, zero, **kw)
        for dtype in (jnp.bfloat16, jnp.float32):
            out = jax.jit(lambda x, pl_, sc, z, kw=kw: dequant_matmul(x, pl_, sc, z, impl="pallas",
                                                                      interpret=interpret, **kw))(x.astype(dtype), planes, scales, zero)
            e = rel_err(out, ref)
            cases.append({"case": f"{label} {M}x{K}x{N} G={gsz}", "dtype": jnp.dtype(dtype).name,
                          "rel_err": e, "tol": tol[dtype], "ok": e <= tol[dtype]})
            ok &= e <= tol[dtype]
    return {"cases": cases, "all_ok": bool(ok)}


def dequant_matmul_timing(ctx):
    """The ``dequant_matmul`` step: XLA vs Pallas dequant-matmul per width beside a dense bf16 matmul."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from pallas_kernels.dequant_matmul import dequant_matmul

    interpret, it = ctx.interpret, ctx.it
    K, N, gsz = (4096, 14336, 128) if not ctx.smoke else (256, 128, 128)
    Ms = (16, 2048) if not ctx.smoke else (16,)
    copy = ctx.shared.get("copy_gbps")
    rows = []
    for M in Ms:
        x0 = jnp.asarray(np.random.default_rng(4).normal(0, 1, (M, K)), jnp.bfloat16)
        wd = jnp.zeros((K, N), jnp.bfloat16)
        r = bench(jax.jit(lambda x, w: x @ w), x0, wd, **it)
        dense_s = r["median_s"]
        rows.append({"M": M, "path": "dense bf16 x @ w", "median_ms": dense_s * 1e3,
                     "gbps": K * N * 2 / dense_s / 1e9, "tflops": 2 * M * K * N / dense_s / 1e12})
        for label, bits, off in DQ_BITS:
            x, planes, scales, zero, wbytes = dq_inputs(M, K, N, bits, gsz, seed=3)
            kw = {"plane_bits": bits, "group_size": gsz, "base_offset": off}
            res = {}
            for impl in ("xla", "pallas"):
                f = jax.jit(lambda x, pl_, sc, z, impl=impl, kw=kw: dequant_matmul(
                    x, pl_, sc, z, impl=impl, interpret=interpret if impl == "pallas" else None, **kw))
                try:
                    res[impl] = bench(f, x, planes, scales, zero, **it)["median_s"]
                except Exception as e:  # noqa: BLE001
                    rows.append({"M": M, "path": f"{impl} {label}", "error": f"{type(e).__name__}: {str(e)[:300]}"})
                    continue
                gbps = wbytes / res[impl] / 1e9
                row = {"M": M, "path": f"{impl} {label}", "median_ms": res[impl] * 1e3, "gbps": gbps,
                       "vs_copy": gbps / copy if copy else None, "vs_dense": dense_s / res[impl],
                       "tflops": 2 * M * K * N / res[impl] / 1e12}
                if impl == "pallas" and "xla" in res:
                    row["vs_xla"] = res["xla"] / res[impl]
                rows.append(row)
                print(f"   M={M} {impl} {label}: {row['median_ms']:.3f} ms {gbps:.0f} GB/s "
                      f"vs dense {row['vs_dense']:.2f} vs xla {row.get('vs_xla', float('nan')):.2f}", flush=True)
    return {"K": K, "N": N, "group_size": gsz, "rows": rows}


def dequant_tiling_sweep(ctx):
    import jax

    from pallas_kernels.dequant_matmul import DequantTiling, dequant_matmul

    interpret = ctx.interpret
    K, N, gsz, M = (4096, 14336, 128, 2048) if not ctx.smoke else (256, 128, 128, 64)
    cands = [DequantTiling(64, 128), DequantTiling(128, 128, num_warps=8), DequantTiling(128, 256, num_warps=8),
             DequantTiling(256, 128, num_warps=8), DequantTiling(256, 256, num_warps=8)]
    if ctx.smoke:
        cands = cands[:2]
    rows = []
    for label, bits, off in DQ_BITS[1:]:
        x, planes, scales, zero, _ = dq_inputs(M, K, N, bits, gsz, seed=3)
        for t in cands:
            f = jax.jit(lambda x, pl_, sc, z, t=t, bits=bits, off=off: dequant_matmul(
                x, pl_, sc, z, impl="pallas", tiling=t, interpret=interpret, plane_bits=bits, group_size=gsz,
                base_offset=off))
            try:
                r = bench(f, x, planes, scales, zero, **ctx.it)
                rows.append({"M": M, "path": f"pallas {label} {t}", "median_ms": r["median_s"] * 1e3,
                             "tflops": 2 * M * K * N / r["median_s"] / 1e12})
                print(f"   {label} {t}: {rows[-1]['median_ms']:.3f} ms", flush=True)
            except Exception as e:  # noqa: BLE001
                rows.append({"M": M, "path": f"pallas {label} {t}", "error": f"{type(e).__name__}: {str(e)[:300]}"})
    return {"rows": rows}


# 8. ragged expert parallelism --------------------------------------------------------------------------------
def ep_ragged(ctx):
    import jax

    if jax.default_backend() == "cpu":
        return {"skipped": "XLA:CPU does not implement ragged_all_to_all (the CPU tests use the emulation: "
                           "tests/test_ragged_ep.py)", "all_ok": True}
    return ep_ragged_compare("ragged", T=64 if ctx.smoke else 256)


# 9. serving engine steps (layered vs chunked prefill iterations) ---------------------------------------------
def serve_batch(runner, tp, real, n_dec):
    """An 8-row decode batch with ``n_dec`` live rows and, unless ``tp`` is None, a one-row prefill batch of
    ``tp`` tokens holding a ``real``-token prompt (right-aligned)."""
    import numpy as np

    dec = runner.blank_decode(8)
    for i in range(n_dec):
        dec.valid[i], dec.pos[i], dec.tokens[i] = True, 100, 5
        dec.tables[i, :8] = np.arange(1000 + 8 * i, 1008 + 8 * i)
    if tp is None:
        return dec, None
    pf = runner.blank_prefill(1, tp)
    pf.tokens[0, tp - real:] = np.arange(real) % 256
    pf.length[0] = real
    pf.tables[0, :(real + 15) // 16] = np.arange(1, (real + 15) // 16 + 1)
    return dec, pf


def serve_step(ctx):
    """Time the engine's jitted iteration on the layered-prefill experiment's model (128 experts top-8):
    decode only (8 rows), a 512-token chunk through every layer beside 6 decode rows (chunked prefill),
    and a whole prompt through one layer beside 6 decode rows (layered prefill at G = 8; the other 7
    layers drop the prompt's K/V writes, a scatter worth timing on a GPU)."""
    from flax import nnx

    from experiments.layered_prefill import model_config
    from moejax.models.transformer import Transformer
    from moejax.serve.engine import Engine, EngineConfig
    from moejax.serve.scheduler import SchedulerConfig

    cfg = model_config(ctx.smoke, 128)
    eng = Engine(Transformer(cfg, rngs=nnx.Rngs(0)),
                 EngineConfig(scheduler="layered", block_size=16, enable_prefix_cache=False,
                              num_blocks=1 + 8 * (cfg.max_seq_len // 16),
                              sched=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=512)))
    prompt, chunk = (256, 64) if ctx.smoke else (2100, 512)
    runner = eng.runner
    tp = runner.prefill_shape(1, prompt)[1]  # the engine's own bucket for the prompt
    cases = {"decode only, 8 rows": (serve_batch(runner, None, 0, 8), (0, cfg.n_layers)),
             f"chunk {chunk} x {cfg.n_layers} layers + 6 decode": (serve_batch(runner, chunk, chunk, 6),
                                                                   (0, cfg.n_layers)),
             f"prompt {prompt} x 1 layer + 6 decode": (serve_batch(runner, tp, prompt, 6), (3, 4))}
    rows = []
    for name, ((dec, pf), group) in cases.items():

        def call(dec=dec, pf=pf, group=group):
            o = runner.run_step(dec, pf, None, group, False)
            runner.pool = o.pool
            return o.dec_next

        r = bench(call, **ctx.it)
        rows.append({"case": name, "median_ms": r["median_s"] * 1e3, "compile_s": r["compile_s"]})
        print(f"   {name}: {r['median_s'] * 1e3:.2f} ms", flush=True)
    return {"experts": 128, "rows": rows}


# 10. N:M sparsity ---------------------------------------------------------------------------------------------
def sparse_paths() -> dict:
    """Which routes from JAX to 2:4 sparse tensor cores exist in this jax, found by introspection (not assumed)."""
    import inspect

    import jax

    out = {"jax": jax.__version__,
           "lax_nm_sparse_dot": [n for n in dir(jax.lax) if "sparse" in n.lower()] or "none in jax.lax"}
    try:
        from jax.experimental import sparse as jsparse

        out["jax.experimental.sparse"] = ("unstructured BCOO/BCSR (cuSPARSE SpMM), no N:M format: "
                                          + ", ".join(n for n in ("BCOO", "BCSR", "nm_spmm") if hasattr(jsparse, n)))
    except ImportError as e:
        out["jax.experimental.sparse"] = f"import failed: {e}"
    try:
        from jax.experimental.pallas import mosaic_gpu as plgpu

        for fn in ("wgmma", "tcgen05_mma"):
            f = getattr(plgpu, fn, None)
            out[f"pallas mosaic_gpu.{fn}"] = ("absent" if f is None else
                                              [p for p in inspect.signature(f).parameters if "sparse" in p]
                                              or "no sparse operand")
    except ImportError as e:
        out["pallas mosaic_gpu"] = f"import failed: {e}"
    return out


def nm_sparse(ctx):
    """Issue 21 item 6: whether JAX reaches 2:4 sparse tensor cores here (the routes, by introspection, and the
    device's compute capability: Mosaic GPU's sparse MMA is ``tcgen05`` -- sm_100, Blackwell), then the GEMMs a
    BDWP step runs, timed: forward ``X W`` and activation gradient ``dY W^T`` in bfloat16 with a dense ``W``
    and with a 2:4-masked ``W`` held densely (what XLA runs: no gain expected), and the per-step cost of
    recomputing the two masks from the dense weight."""
    import jax
    import jax.numpy as jnp

    from moejax.nn.nm_masks import nm_mask

    M, K, N = (256, 128, 256) if ctx.smoke else (8192, 4096, 14336)
    dev = jax.devices()[0]
    paths = sparse_paths()
    paths["compute_capability"] = getattr(dev, "compute_capability", None)
    ks = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(ks[0], (M, K), jnp.bfloat16)
    dy = jax.random.normal(ks[1], (M, N), jnp.bfloat16)
    w = jax.random.normal(ks[2], (K, N), jnp.float32)
    ws = jnp.where(nm_mask(w, 2, 4, 0), w, 0).astype(jnp.bfloat16)
    wd = w.astype(jnp.bfloat16)
    fwd = jax.jit(lambda x, w: x @ w)
    bwd = jax.jit(lambda d, w: d @ w.T)
    rows = []
    for name, fn, a in (("forward X W", fwd, x), ("act. grad dY W^T", bwd, dy)):
        td = bench(fn, a, wd, **ctx.it)["median_s"]
        ts = bench(fn, a, ws, **ctx.it)["median_s"]
        rows.append({"gemm": name, "M": M, "K": K, "N": N, "dense_ms": td * 1e3, "masked_2of4_ms": ts * 1e3,
                     "dense_tflops": 2 * M * K * N / td / 1e12, "masked_over_dense": ts / td})
        print(f"   {name}: dense {td * 1e3:.2f} ms, 2:4-masked (dense storage) {ts * 1e3:.2f} ms", flush=True)
    masks = jax.jit(lambda w: (nm_mask(w, 2, 4, 0), nm_mask(w, 2, 4, 1)))
    tm = bench(masks, w, **ctx.it)["median_s"]
    print(f"   BDWP's two masks of a {K}x{N} weight: {tm * 1e3:.2f} ms; routes: {paths}", flush=True)
    tc05 = paths.get("pallas mosaic_gpu.tcgen05_mma")
    blackwell = str(paths["compute_capability"] or "").startswith("10")
    note = ("the masked GEMMs above run densely (XLA has no N:M dot); moejax has no sparse-MMA kernel: "
            + ("Mosaic GPU's tcgen05_mma takes a sparse operand and this device is sm_100, so one could be "
               "written here" if isinstance(tc05, list) and blackwell else
               "the only sparse-MMA route found (Mosaic GPU tcgen05_mma) needs sm_100, which this device is not"))
    return {"paths": paths, "rows": rows, "mask_recompute_ms": tm * 1e3, "sparse_kernel": None, "note": note}


def omnimoe(ctx):
    """Issue 20: OmniMoE's atomic experts on this device: the expert-centric XLA path and the Pallas kernel
    (:mod:`pallas_kernels.atomic_experts`) against token-centric, forward at 4096 tokens, d 1024, N 2^16, K 16
    and 64 (bf16), checked against each other, and the Cartesian product router against a flat router over all
    N (the paper: 6.7 ms against PEER's 73 ms on its GPU)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from experiments.omnimoe import flat_router
    from moejax.nn.experts import (
        atomic_expert_centric,
        atomic_pallas,
        atomic_token_centric,
    )
    from moejax.nn.routers import CartesianRouter

    T, d, lg, Ks = (256, 64, 10, (16,)) if ctx.smoke else (4096, 1024, 16, (16, 64))
    N = 2**lg
    rng = np.random.default_rng(0)
    bf = jnp.bfloat16
    x = jnp.asarray(rng.normal(size=(T, d)), bf)
    u = jnp.asarray(rng.normal(0, 0.02, (N, d)), bf)
    v = jnp.asarray(rng.normal(0, 0.02, (N, d)), bf)
    ec, tc = jax.jit(atomic_expert_centric), jax.jit(atomic_token_centric)
    rows, ok = [], True
    for K in Ks:
        ids = jnp.asarray(rng.integers(0, N, (T, K)), jnp.int32)
        g = jnp.asarray(rng.random((T, K)) / K, jnp.float32)
        err = rel_err(ec(x, u, v, ids, g).astype(jnp.float32), tc(x, u, v, ids, g).astype(jnp.float32))
        ok = ok and err <= 2e-2
        t_ec = bench(ec, x, u, v, ids, g, **ctx.it)["median_s"]
        t_tc = bench(tc, x, u, v, ids, g, **ctx.it)["median_s"]
        pk = jax.jit(lambda *a: atomic_pallas(*a, interpret=ctx.interpret))
        err_k = rel_err(pk(x, u, v, ids, g).astype(jnp.float32), tc(x, u, v, ids, g).astype(jnp.float32))
        ok = ok and err_k <= 2e-2
        t_k = bench(pk, x, u, v, ids, g, **ctx.it)["median_s"]
        router = CartesianRouter(d, N, K, rngs=nnx.Rngs(0))
        gdef, state = nnx.split(router)
        cart = jax.jit(lambda st, x, gdef=gdef: nnx.merge(gdef, st)(x).weights)
        t_cart = bench(cart, state, x.astype(jnp.float32), **ctx.it)["median_s"]
        w = jnp.asarray(rng.normal(0, 0.02, (d, N)), jnp.float32)
        fl = jax.jit(lambda x, w, K=K: flat_router(x, w, K, min(T, 512)))
        t_flat = bench(fl, x.astype(jnp.float32), w, **ctx.it)["median_s"]
        rows.append({"T": T, "d": d, "N": N, "K": K, "reuse": T * K / N, "ec_vs_tc_rel_err": err,
                     "expert_centric_ms": t_ec * 1e3, "token_centric_ms": t_tc * 1e3, "ec_speedup": t_tc / t_ec,
                     "kernel_vs_tc_rel_err": err_k, "kernel_ms": t_k * 1e3, "kernel_speedup": t_tc / t_k,
                     "cartesian_router_ms": t_cart * 1e3, "flat_router_ms": t_flat * 1e3,
                     "router_speedup": t_flat / t_cart})
        print(f"   K={K}: EC {t_ec * 1e3:.2f} ms, TC {t_tc * 1e3:.2f} ms (err {err:.1e}), kernel {t_k * 1e3:.2f} ms "
              f"(err {err_k:.1e}); router cartesian "
              f"{t_cart * 1e3:.2f} ms, flat {t_flat * 1e3:.2f} ms", flush=True)
    return {"rows": rows, "all_ok": ok, "kernel": "pallas_kernels.atomic_experts (Triton)",
            "interpret": ctx.interpret}


# 12. MTP speculative decoding ----------------------------------------------------------------------------------
def speculative(ctx):
    """Issue 22 item 4: the cost of a speculative step against a plain decode step on the device, on the tiny
    preset with 2 MTP heads (random weights: the acceptance comes from ``experiments/speculative.py``'s CPU run
    when its results exist, else 0.5, labelled assumed). Per batch (1, 16) and K (1, 2): plain decode step ms,
    speculative step ms (verify 1 + K positions, K MTP blocks, drafting), and TPOT / plain =
    ``spec / (plain x (1 + accepted))`` with accepted = sum of acceptance^j, j = 1..K."""
    import dataclasses
    import json
    import os

    import numpy as np
    from flax import nnx

    from moejax.config import get_preset
    from moejax.models.transformer import Transformer
    from moejax.serve.engine import EngineConfig
    from moejax.serve.runner import ModelRunner
    from moejax.serve.scheduler import SchedulerConfig
    from moejax.serve.speculative import SpecPrefill, spec_step

    cfg = dataclasses.replace(get_preset("tiny"), mtp_depth=2, max_seq_len=512)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    acc, src = {1: 0.5, 2: 0.5}, "assumed"
    res = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "speculative.json")
    if os.path.exists(res):
        with open(res) as f:
            rows = {int(r["engine"].split("=")[1]): r["acceptance per draft"] for r in json.load(f)["batch1"]
                    if r.get("acceptance per draft") is not None}
        if set(rows) >= {1, 2}:
            acc, src = rows, "measured on CPU (experiments/results/speculative.json)"
    out = []
    for B in (1, 16):
        runner = ModelRunner(model, EngineConfig(speculative="mtp", num_speculative_tokens=2, max_model_len=512,
                                                 sched=SchedulerConfig(max_num_seqs=16)))
        dec = runner.blank_decode(B)
        for i in range(B):
            dec.valid[i], dec.pos[i], dec.tokens[i] = True, 200, 5
            dec.tables[i, :16] = np.arange(1 + 16 * i, 17 + 16 * i)

        def plain(dec=dec, runner=runner):
            o = runner.run_step(dec, None, None, (0, cfg.n_layers), False)
            runner.pool = o.pool
            return o.dec_next

        t_plain = bench(plain, **ctx.it)["median_s"]
        for k in (1, 2):
            sd = dec._replace(tokens=np.full((B, 1 + k), 5, np.int32))

            def spec(sd=sd, runner=runner, k=k):
                o = spec_step(runner.gdef, runner.state, runner.pool, sd, None, SpecPrefill(
                    np.zeros((0, k), np.int32), np.zeros(0, bool)), runner.layer_states, **runner._static_kw(),
                    prefill_kv_block=runner.prefill_kv_block)
                runner.pool = o.pool
                return o.tokens

            t_spec = bench(spec, **ctx.it)["median_s"]
            accepted = sum(acc[k] ** j for j in range(1, k + 1))
            out.append({"batch": B, "K": k, "plain_step_ms": t_plain * 1e3, "spec_step_ms": t_spec * 1e3,
                        "step_ratio": t_spec / t_plain, "tpot_ratio": t_spec / (t_plain * (1 + accepted))})
            print(f"   batch {B} K={k}: plain {t_plain * 1e3:.2f} ms, speculative {t_spec * 1e3:.2f} ms, "
                  f"TPOT ratio {out[-1]['tpot_ratio']:.2f} at acceptance {acc[k]:.2f}", flush=True)
    return {"rows": out, "acceptance": acc, "acceptance_source": src}


def dllm(ctx):
    """Issue 25 (c): a diffusion LM of LLaDA-8B's shape (d_model 4096, 32 layers, 32 heads, dense FFN 12,288,
    vocabulary 126,464; random bfloat16 weights) served by ``DiffusionEngine``: the largest refresh step's
    compiled temporaries with and without logit budgeting, and generated tokens/s of a burst of requests under
    the lockstep baseline (no logit budgeting) and the phase-multiplexed scheduler with logit budgeting. Smoke:
    the tiny body with a 1,024-token vocabulary."""
    import dataclasses
    import time

    from flax import nnx

    from moejax.config import ModelConfig, get_preset
    from moejax.diffusion.engine import DiffusionEngine, DiffusionEngineConfig
    from moejax.models.transformer import Transformer
    from moejax.serve.engine import SamplingParams

    if ctx.smoke:
        cfg = dataclasses.replace(get_preset("tiny"), vocab_size=1024, n_layers=2, causal=False, max_seq_len=256)
        B, prompt, gen, block, spb = 4, 32, 32, 16, 4
    else:
        cfg = ModelConfig(vocab_size=126_464, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, d_ff=12_288,
                          max_seq_len=1024, rope_theta=500_000.0, moe=None, causal=False, mask_token_id=126_336,
                          dtype="bfloat16", param_dtype="bfloat16")
        B, prompt, gen, block, spb = 16, 256, 256, 32, 16
    model = Transformer(cfg.validate(), rngs=nnx.Rngs(0))
    prompts = [[(7 * i + j) % 250 for j in range(prompt)] for i in range(B)]
    out = []
    for name, sched, lb in (("static, full logits", "static", False), ("phase, logit budgeting", "phase", True)):
        ecfg = DiffusionEngineConfig(block_length=block, steps_per_block=spb, scheduler=sched, max_num_seqs=B,
                                     token_budget=B * (prompt + gen), logit_budget=lb,
                                     max_model_len=prompt + gen)
        eng = DiffusionEngine(model, ecfg)
        mem = eng.peak_step_memory()
        sp = SamplingParams(max_tokens=gen, temperature=0.0, seed=0)
        eng.generate(prompts, sp)  # compiles
        t = time.perf_counter()
        eng.generate(prompts, sp)
        dt = time.perf_counter() - t
        out.append({"config": name, "tokens_per_s": B * gen / dt, "seconds": dt,
                    "peak_temp_gib": mem["temp_bytes"] / 2**30})
        print(f"   {name}: {out[-1]['tokens_per_s']:.1f} tok/s, step temporaries {out[-1]['peak_temp_gib']:.2f} GiB",
              flush=True)
        del eng
    return {"rows": out, "shape": "tiny body, V=1024" if ctx.smoke else "LLaDA-8B (random bf16 weights)",
            "requests": B, "prompt": prompt, "gen": gen, "block": block, "steps_per_block": spb,
            "speedup": out[1]["tokens_per_s"] / out[0]["tokens_per_s"]}


def nanoflow(ctx):
    """Issue 24 (c): the nano-batched step against the plain one on a GPU, where operations of different
    nano-batches may overlap: Mixtral-8x7B-shaped layers (d_model 4096, 8 experts top-2, d_ff 14,336; 4 layers,
    random bfloat16 weights), a step of 2 prompt chunks of 512 tokens beside 62 decode rows, timed for 1, 2 and
    4 nano-batches (with the same tokens); and offline tokens/s of 32 requests (256 + 64 tokens) with and
    without asynchronous scheduling. Smoke: the tiny preset, small batches."""
    import dataclasses
    import time

    import numpy as np
    from flax import nnx

    from moejax.config import ModelConfig, MoEConfig, RouterConfig, get_preset
    from moejax.models.transformer import Transformer
    from moejax.serve.engine import Engine, EngineConfig, SamplingParams
    from moejax.serve.scheduler import SchedulerConfig

    if ctx.smoke:
        cfg = dataclasses.replace(get_preset("tiny"), max_seq_len=512)
        B, chunk, n_req, prompt, gen = 8, 64, 4, 32, 8
    else:
        cfg = ModelConfig(vocab_size=32_000, d_model=4096, n_layers=4, n_heads=32, n_kv_heads=8, d_ff=14_336,
                          max_seq_len=2048, moe=MoEConfig(num_experts=8, d_ff=14_336,
                                                          router=RouterConfig(type="topk", top_k=2)),
                          dtype="bfloat16", param_dtype="bfloat16")
        B, chunk, n_req, prompt, gen = 64, 512, 32, 256, 64
    model = Transformer(cfg.validate(), rngs=nnx.Rngs(0))
    sched = SchedulerConfig(max_num_seqs=B, max_num_batched_tokens=4 * chunk, max_prefill_seqs=2)
    rows, tokens = [], None
    for nano in (1, 2, 4):
        eng = Engine(model, EngineConfig(nano_batches=nano, enable_prefix_cache=False, sched=sched))
        runner = eng.runner
        dec, pf = runner.blank_decode(B), runner.blank_prefill(2, chunk)
        for i in range(B - 2):
            dec.valid[i], dec.pos[i], dec.tokens[i] = True, 300, 5
            dec.tables[i, :20] = np.arange(1 + 20 * i, 21 + 20 * i)
        for i in range(2):
            pf.tokens[i] = np.arange(chunk) % 250
            pf.length[i] = chunk
            pf.tables[i, :chunk // 16] = np.arange(1, chunk // 16 + 1) + 20 * B + i * (chunk // 16)

        def call(runner=runner, dec=dec, pf=pf):
            o = runner.run_step(dec, pf, None, (0, cfg.n_layers), False)
            runner.pool = o.pool
            return o.dec_next

        r = bench(call, **ctx.it)
        got = np.asarray(call())
        same = tokens is None or bool((got == tokens).all())
        tokens = got if tokens is None else tokens
        rows.append({"nano_batches": nano, "median_ms": r["median_s"] * 1e3, "same_tokens": same})
        print(f"   nano_batches={nano}: {rows[-1]['median_ms']:.2f} ms, same tokens {same}", flush=True)
        del eng
    prompts = [[(7 * i + j) % 250 for j in range(prompt)] for i in range(n_req)]
    sp = SamplingParams(max_tokens=gen, temperature=0.0)
    serving = []
    for asy in (False, True):
        eng = Engine(model, EngineConfig(async_scheduling=asy, enable_prefix_cache=False,
                                         sched=SchedulerConfig(max_num_seqs=n_req, max_prefill_seqs=n_req,
                                                               max_num_batched_tokens=n_req * (prompt + 1))))
        eng.generate(prompts, sp)  # compiles
        t = time.perf_counter()
        eng.generate(prompts, sp)
        dt = time.perf_counter() - t
        serving.append({"async_scheduling": asy, "tokens_per_s": n_req * gen / dt})
        print(f"   async_scheduling={asy}: {serving[-1]['tokens_per_s']:.1f} tok/s", flush=True)
        del eng
    return {"shape": "tiny" if ctx.smoke else "Mixtral-8x7B layers x 4 (random bf16)", "step": rows,
            "serving": serving, "nano_speedup": {r["nano_batches"]: rows[0]["median_ms"] / r["median_ms"]
                                                 for r in rows},
            "async_speedup": serving[1]["tokens_per_s"] / serving[0]["tokens_per_s"]}


# -- the table of steps, in run order; ``--only``/``--skip`` match name prefixes -----------------------------
assert SMOKE["gmm"].keys() == FULL["gmm"].keys(), "the gmm timing steps are named after FULL's shapes"

STEPS = [
    ("copy_bandwidth", copy_bandwidth),
    ("dense_matmul", dense_matmul),
    ("check_gmm", check_gmm),
    ("check_tgmm", check_tgmm),
    ("check_gmm_grad", check_gmm_grad),
    ("check_paged_attention", check_paged_attention),
    ("gmm_tiling_sweep", gmm_tiling_sweep),
    *((f"gmm_{cname}_{routing}", functools.partial(gmm_timing, cname=cname, routing=routing))
      for cname in FULL["gmm"] for routing in ("uniform", "skewed")),
    ("paged_decode", paged_decode),
    ("check_dequant_matmul", check_dequant_matmul),
    ("dequant_matmul", dequant_matmul_timing),
    ("dequant_tiling_sweep", dequant_tiling_sweep),
    ("ep_ragged", ep_ragged),
    ("serve_step", serve_step),
    ("nm_sparse", nm_sparse),
    ("omnimoe", omnimoe),
    ("speculative", speculative),
    ("dllm", dllm),
    ("nanoflow", nanoflow),
]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (interpreted on CPU); writes *_smoke")
    ap.add_argument("--budget-s", type=float, default=270.0, help="skip remaining steps after this many seconds")
    ap.add_argument("--skip", default="", help="comma-separated step-name prefixes to skip")
    ap.add_argument("--only", default="", help="comma-separated step-name prefixes to run (default: all)")
    ap.add_argument("--out", default=None, help="results name under experiments/results (default gpu_check)")
    return ap.parse_args(argv)


def start(args):
    """Record the environment, print the device line, and return the run's ``Runner`` (its clock starts here)
    and the steps' ``Context``."""
    import jax.numpy as jnp

    from pallas_kernels import _compat

    S = SMOKE if args.smoke else FULL
    env = environment()
    variant = _compat.default_variant()
    interpret = _compat.resolve_interpret(None, variant)
    peak = peak_for(env["device_kind"])
    payload = {"env": env, "mode": "smoke" if args.smoke else "full", "variant": variant, "interpret": interpret,
               "peak": peak, "steps": {}}
    print(f"device {env['device_kind']} backend {env['backend']} variant {variant} interpret {interpret} "
          f"peak {peak}", flush=True)
    if not args.smoke and interpret:
        print("WARNING: no GPU/TPU backend: the kernels run interpreted; use --smoke on CPU", flush=True)
    run = Runner(args.out or ("gpu_check_smoke" if args.smoke else "gpu_check"), payload, args.budget_s)
    ctx = Context(args=args, S=S, it={"iters": S["iters"], "reps": S["reps"]}, variant=variant,
                  interpret=interpret, peak=peak, tol={jnp.bfloat16: 2e-2, jnp.float32: 5e-3}, shared={})
    tilings, tgmm_tilings = gmm_tilings(variant, args.smoke)  # the defaults until the sweep picks the best
    ctx.shared["tiling"], ctx.shared["tgmm_tiling"] = tilings[0], tgmm_tilings[0]
    return run, ctx


def main(argv=None):
    args = parse_args(argv)
    run, ctx = start(args)
    payload = run.payload
    skip = tuple(s for s in args.skip.split(",") if s)
    only = tuple(s for s in args.only.split(",") if s)
    for name, fn in STEPS:
        if (skip and name.startswith(skip)) or (only and not name.startswith(only)):
            payload["steps"][name] = {"ok": True, "skipped": "--skip/--only"}
            continue
        run.step(name, functools.partial(fn, ctx))
    run.write()
    failed = [n for n, r in payload["steps"].items() if not r.get("ok")]
    bad_checks = [n for n, r in payload["steps"].items() if (n.startswith("check_") or n == "ep_ragged")
                  and not r.get("skipped") and not r.get("all_ok", False)]
    print(f"done in {payload['total_wall_s']:.0f}s; failed steps: {failed or 'none'}; "
          f"checks not passing: {bad_checks or 'none'}", flush=True)
    return 0 if not failed and not bad_checks else 1


if __name__ == "__main__":
    sys.exit(main())
