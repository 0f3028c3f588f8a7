"""MoE layer throughput: active GFLOP/s of each dispatch path vs a dense matmul measured in the same run.

Configs (float32): A = 4096 tokens, d_model 512, d_ff 1024, 8 experts top-2; B = 4096 tokens, d_model 512,
d_ff 256, 64 experts top-8. Active FLOPs per forward: 2 * T * k * 3 * D * F; forward+backward counts 3x.
The dense reference is a (T*k, D) @ (D, F) matmul. Writes results/moe_layer_bench.{json,md}.

    python experiments/moe_layer_bench.py [--configs A,B] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments.common import environment, markdown_table, time_fn, write_results  # noqa: E402

CONFIGS = {"A": dict(T=4096, D=512, F=1024, E=8, k=2), "B": dict(T=4096, D=512, F=256, E=64, k=8)}
# path name -> (dispatch, grouped_impl, capacity_factor)
PATHS = {
    "dropless": ("dropless", "tiles", 1.0),
    "dropless-ragged_dot": ("dropless", "ragged_dot", 1.0),
    "capacity-1.0": ("capacity", "auto", 1.0),
    "capacity-1.25": ("capacity", "auto", 1.25),
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="A,B")
    ap.add_argument("--paths", default=",".join(PATHS))
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from moejax.config import MoEConfig, RouterConfig
    from moejax.nn.moe import MoE

    records = []
    for cname in args.configs.split(","):
        c = CONFIGS[cname]
        T, D, F, E, k = c["T"], c["D"], c["F"], c["E"], c["k"]
        flops = 2 * T * k * 3 * D * F
        key = jax.random.PRNGKey(0)
        xd = jax.random.normal(key, (T * k, D), jnp.float32)
        wd = jax.random.normal(key, (D, F), jnp.float32) * 0.02
        dense_fn = jax.jit(lambda a, b: a @ b)

        def dense_rate():
            return 2 * T * k * D * F / time_fn(dense_fn, xd, wd, repeats=args.repeats)["median_s"] / 1e9

        print(f"[{cname}] dense ({T * k},{D})@({D},{F}): {dense_rate():.1f} GFLOP/s", flush=True)
        x = jax.random.normal(jax.random.PRNGKey(1), (T, D), jnp.float32)
        for pname in args.paths.split(","):
            dispatch, impl, cf = PATHS[pname]
            cfg = MoEConfig(num_experts=E, d_ff=F, dispatch=dispatch, grouped_impl=impl, capacity_factor=cf,
                            router=RouterConfig(type="topk", top_k=k))
            model = MoE(D, cfg, rngs=nnx.Rngs(0))
            gdef, state = nnx.split(model)

            def fwd(state, x):
                return nnx.merge(gdef, state)(x)[0]

            def loss(state, x):
                y, aux = nnx.merge(gdef, state)(x)
                return jnp.sum(y * y) + aux["load_balance_loss"]

            reps = 1 if impl == "ragged_dot" else args.repeats
            # The dense reference is re-measured beside each path (this machine is shared and noisy).
            dense_gflops = dense_rate()
            tf = time_fn(jax.jit(fwd), state, x, repeats=reps)
            _, aux = jax.jit(lambda s, x: nnx.merge(gdef, s)(x))(state, x)
            rec = {"config": cname, "path": pname, **c, "dense_gflops": dense_gflops,
                   "fwd_s": tf["median_s"], "fwd_compile_s": tf["first_call_s"],
                   "fwd_gflops": flops / tf["median_s"] / 1e9,
                   "dropped_fraction": float(aux["dropped"]) / (T * k)}
            rec["fwd_ratio"] = rec["fwd_gflops"] / dense_gflops
            if impl != "ragged_dot" or E <= 8:
                tb = time_fn(jax.jit(jax.grad(loss, argnums=(0, 1))), state, x, repeats=reps)
                rec.update(fwd_bwd_s=tb["median_s"], fwd_bwd_compile_s=tb["first_call_s"],
                           fwd_bwd_gflops=3 * flops / tb["median_s"] / 1e9)
                rec["fwd_bwd_ratio"] = rec["fwd_bwd_gflops"] / dense_gflops
            print(f"[{cname}] {pname:22s} fwd {rec['fwd_gflops']:7.1f} GFLOP/s ratio {rec['fwd_ratio']:.2f}"
                  + (f" | fwd+bwd {rec['fwd_bwd_gflops']:7.1f} ratio {rec['fwd_bwd_ratio']:.2f}"
                     if "fwd_bwd_ratio" in rec else " | fwd+bwd skipped (E x dense work on CPU)")
                  + f" | dropped {rec['dropped_fraction']:.3f}", flush=True)
            records.append(rec)
    md = ("# MoE layer benchmark (float32)\n\nActive GFLOP/s and ratio to a dense (T*k, D)@(D, F) matmul "
          "measured in the same run. Targets for the dropless path: fwd >= 0.85, fwd+bwd >= 0.75.\n\n"
          + markdown_table(records, ["config", "path", "dense_gflops", "fwd_gflops", "fwd_ratio",
                                     "fwd_bwd_gflops", "fwd_bwd_ratio", "dropped_fraction"]))
    env = environment()
    md += f"\nEnvironment: jax {env['jax']}, backend {env['backend']}, {env['cpu_count']} CPUs.\n"
    paths = write_results("moe_layer_bench", {"environment": env, "records": records}, md)
    print(md)
    print("wrote", *paths)


if __name__ == "__main__":
    main()
