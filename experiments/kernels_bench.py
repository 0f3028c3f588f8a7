"""CPU regression benchmark of the XLA reference paths behind ``pallas_kernels`` (no kernels are timed here).

Times, with compile apart and the median of repeats, the ``impl="xla"`` paths of
``pallas_kernels.grouped_matmul`` (``gmm`` = ``lax.ragged_dot``, ``tgmm`` = ``lax.ragged_dot_general``,
``gmm`` forward+backward) next to a dense ``jnp.dot`` with the same useful FLOPs, and
``pallas_kernels.paged_attention`` with ``impl="xla"`` (gather the pages, dense masked attention) for decode
and a prefill chunk, reporting useful GB/s of KV read. On CPU ``ragged_dot`` is a dense masked product
(``G`` times the useful work), which the ``useful GFLOP/s`` column makes visible. Pallas kernels only run in
interpret mode on CPU, which says nothing about their speed, so they are not benchmarked here (see
``experiments/gpu_check.py``). Writes ``results/kernels_bench.{json,md}``.

    python experiments/kernels_bench.py [--repeats 5] [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments.common import environment, markdown_table, time_fn, write_results

# name -> (M rows = tokens * top_k, K, N, groups)
GMM_SHAPES = {
    "8e-top2": (2048 * 2, 512, 1024, 8),
    "64e-top8": (1024 * 8, 512, 256, 64),
}
# name -> (batch, q tokens, heads, kv heads, head_dim, page_size, context)
PA_SHAPES = {
    "decode": (16, 1, 16, 4, 64, 16, 1024),
    "spec4": (16, 4, 16, 4, 64, 16, 1024),
    "prefill-chunk64": (2, 64, 16, 4, 64, 16, 1024),
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="tiny shapes (a smoke run of the script)")
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np

    from pallas_kernels.grouped_matmul import gmm, tgmm
    from pallas_kernels.paged_attention import paged_attention

    gmm_shapes = {k: (v[0] // 16, v[1] // 4, v[2] // 4, v[3]) for k, v in GMM_SHAPES.items()} if args.quick \
        else GMM_SHAPES
    pa_shapes = {k: v[:-1] + (v[-1] // 8,) for k, v in PA_SHAPES.items()} if args.quick else PA_SHAPES
    rows = []
    dt = jnp.float32
    for name, (M, K, N, G) in gmm_shapes.items():
        kx, kw, ky = jax.random.split(jax.random.PRNGKey(0), 3)
        x = jax.random.normal(kx, (M, K), dt)
        w = jax.random.normal(kw, (G, K, N), dt) / np.sqrt(K)
        dy = jax.random.normal(ky, (M, N), dt)
        gs = jnp.full((G,), M // G, jnp.int32)
        flops = 2 * M * K * N
        w0 = w[0]
        cases = {
            "dense jnp.dot (same FLOPs)": (jax.jit(lambda x, w0: x @ w0), (x, w0), flops),
            "gmm xla (ragged_dot)": (jax.jit(lambda x, w, gs: gmm(x, w, gs, impl="xla")), (x, w, gs), flops),
            "tgmm xla (ragged_dot_general)": (jax.jit(lambda x, dy, gs: tgmm(x, dy, gs, impl="xla")),
                                              (x, dy, gs), flops),
            "gmm xla fwd+bwd": (jax.jit(jax.grad(lambda x, w, gs, dy: jnp.sum(gmm(x, w, gs, impl="xla") * dy),
                                                 (0, 1))), (x, w, gs, dy), 3 * flops),
        }
        for cname, (fn, fargs, fl) in cases.items():
            t = time_fn(fn, *fargs, repeats=args.repeats)
            rec = {"op": "grouped_matmul", "shape": name, "M": M, "K": K, "N": N, "G": G, "path": cname,
                   "median_ms": t["median_s"] * 1e3, "compile_s": t["first_call_s"],
                   "useful_gflops": fl / t["median_s"] / 1e9}
            rows.append(rec)
            print(f"[{name}] {cname}: {rec['median_ms']:.2f} ms, {rec['useful_gflops']:.1f} useful GFLOP/s",
                  flush=True)

    rng = np.random.default_rng(0)
    for name, (B, Tq, H, KVH, D, ps, ctx) in pa_shapes.items():
        maxp = ctx // ps
        P = B * maxp + 1
        q = jnp.asarray(rng.normal(size=(B, Tq, H, D)), dt)
        kp = jnp.asarray(rng.normal(size=(P, ps, KVH, D)), dt)
        vp = jnp.asarray(rng.normal(size=(P, ps, KVH, D)), dt)
        bt = jnp.asarray(1 + rng.permutation(B * maxp).reshape(B, maxp), jnp.int32)
        ln = jnp.full((B,), ctx, jnp.int32)
        fn = jax.jit(lambda q, k, v, bt, ln: paged_attention(q, k, v, bt, ln, impl="xla"))
        t = time_fn(fn, q, kp, vp, bt, ln, repeats=args.repeats)
        kv_bytes = 2 * B * ctx * KVH * D * jnp.dtype(dt).itemsize
        flops = 4 * B * Tq * H * ctx * D
        rec = {"op": "paged_attention", "shape": name, "B": B, "Tq": Tq, "H": H, "KVH": KVH, "D": D,
               "page_size": ps, "context": ctx, "path": "xla (gather + dense)", "median_ms": t["median_s"] * 1e3,
               "compile_s": t["first_call_s"], "kv_gbps": kv_bytes / t["median_s"] / 1e9,
               "useful_gflops": flops / t["median_s"] / 1e9}
        rows.append(rec)
        print(f"[{name}] paged attention xla: {rec['median_ms']:.2f} ms, {rec['kv_gbps']:.2f} GB/s of KV",
              flush=True)

    env = environment()
    payload = {"env": env, "dtype": "float32", "repeats": args.repeats, "quick": args.quick,
               "gmm_shapes": gmm_shapes, "pa_shapes": pa_shapes, "results": rows}
    md = (f"# kernels_bench: XLA reference paths on CPU\n\n{env['device_kind']} x{len(env['devices'])}, "
          f"jax {env['jax']}, {env['cpu_count']} CPUs, float32, median of {args.repeats}.\n"
          "Pallas kernels are not timed on CPU (interpret mode only); see gpu_check.\n\n"
          "## Grouped matmul (uniform routing)\n\n"
          + markdown_table([r for r in rows if r["op"] == "grouped_matmul"],
                           ["shape", "M", "K", "N", "G", "path", "median_ms", "useful_gflops", "compile_s"])
          + "\n## Paged attention (all sequences at full context)\n\n"
          + markdown_table([r for r in rows if r["op"] == "paged_attention"],
                           ["shape", "B", "Tq", "H", "KVH", "D", "page_size", "context", "median_ms", "kv_gbps",
                            "compile_s"]))
    name = "kernels_bench_quick" if args.quick else "kernels_bench"
    print("wrote", *write_results(name, payload, md))


if __name__ == "__main__":
    main()
