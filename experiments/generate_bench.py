"""Generation speed of the tiny Mixtral preset, beside a roofline bound measured in the same run.

Model: preset ``tiny`` (hidden 256, 4 layers, 8 experts top-2, 8 heads / 2 KV heads, intermediate 512,
vocab 512), float32, random weights. Workloads: batch 16 x 128-token prompts + 64 new tokens, and batch 1.
Reports TTFT (prefill + first token), ms per decode step, generated tokens/s, compile time apart.

Roofline for one decode step: max(weight bytes / memory bandwidth, FLOPs / matmul rate), with bandwidth from
a large array reduction and the matmul rate from a large dense matmul, both measured here. Weight bytes count
every parameter except the embedding table (a decode step gathers only B rows of it); with 16 tokens x top-2
over 8 experts every expert is touched with probability 1 - (6/8)^16 = 99%. KV-cache bytes are added.

    python experiments/generate_bench.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments.common import environment, markdown_table, time_fn, write_results  # noqa: E402


def measure_machine(jax, jnp, repeats):
    """Memory bandwidth (a 256 MiB reduction) and dense matmul rate (2048^3), median of ``repeats``."""
    x = jnp.ones((64 * 1024 * 1024,), jnp.float32)
    bw = x.nbytes / time_fn(jax.jit(jnp.sum), x, repeats=repeats)["median_s"]
    a = jnp.ones((2048, 2048), jnp.float32)
    rate = 2 * 2048 ** 3 / time_fn(jax.jit(lambda a: a @ a), a, repeats=repeats)["median_s"]
    return bw, rate


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from moejax.config import get_preset
    from moejax.models.generate import generate
    from moejax.models.transformer import Transformer, active_params

    cfg = get_preset("tiny")
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(params)) - model.embed[...].nbytes
    bw, rate = measure_machine(jax, jnp, args.repeats)
    print(f"memory bandwidth {bw / 1e9:.1f} GB/s, matmul {rate / 1e9:.1f} GFLOP/s", flush=True)
    rng = np.random.default_rng(0)
    P, N = args.prompt_len, args.new_tokens
    records = []
    for B in (16, 1):
        prompts = rng.integers(0, cfg.vocab_size, (B, P)).tolist()

        def run(n):
            t = time.perf_counter()
            generate(model, prompts, n)
            return time.perf_counter() - t

        c1 = run(1)
        cN = run(N)
        t1 = sorted(run(1) for _ in range(args.repeats))[args.repeats // 2]
        tN = sorted(run(N) for _ in range(args.repeats))[args.repeats // 2]
        step = (tN - t1) / (N - 1)
        act = active_params(cfg)["active"] - cfg.vocab_size * cfg.d_model  # embedding lookup is not a matmul
        flops = 2 * B * act + 4 * B * cfg.n_layers * cfg.n_heads * cfg.resolved_head_dim * (P + N)
        kv_bytes = 2 * cfg.n_layers * B * (P + N) * cfg.n_kv_heads * cfg.resolved_head_dim * 4
        bound = max((weight_bytes + kv_bytes) / bw, flops / rate)
        rec = {"batch": B, "prompt_len": P, "new_tokens": N, "ttft_ms": t1 * 1e3, "decode_step_ms": step * 1e3,
               "tokens_per_s": B * N / tN, "decode_tokens_per_s": B / step, "compile_s": c1 + cN - t1 - tN,
               "roofline_step_ms": bound * 1e3, "step_over_roofline": step / bound,
               "weight_mb": weight_bytes / 1e6, "kv_mb": kv_bytes / 1e6, "flops_per_step": flops}
        records.append(rec)
        print(f"batch {B:2d}: TTFT {rec['ttft_ms']:.1f} ms, decode step {rec['decode_step_ms']:.2f} ms "
              f"(roofline {rec['roofline_step_ms']:.2f} ms, ratio {rec['step_over_roofline']:.2f}), "
              f"{rec['tokens_per_s']:.0f} tok/s end-to-end, compile {rec['compile_s']:.1f} s", flush=True)
    env = environment()
    md = ("# Generation benchmark: tiny Mixtral preset (float32, random weights)\n\n"
          f"Measured here: memory bandwidth {bw / 1e9:.1f} GB/s (256 MiB reduction), "
          f"matmul {rate / 1e9:.1f} GFLOP/s (2048^3). Target: batch-16 decode step within 2x of the roofline "
          "max(weight+KV bytes / bandwidth, FLOPs / matmul rate).\n\n"
          + markdown_table(records, ["batch", "prompt_len", "new_tokens", "ttft_ms", "decode_step_ms",
                                     "roofline_step_ms", "step_over_roofline", "tokens_per_s", "compile_s"])
          + f"\nEnvironment: jax {env['jax']}, backend {env['backend']}, {env['cpu_count']} CPUs.\n")
    payload = {"environment": env, "bandwidth_bytes_per_s": bw, "matmul_flops_per_s": rate, "records": records}
    print(md)
    print("wrote", *write_results("generate_bench", payload, md))


if __name__ == "__main__":
    main()
