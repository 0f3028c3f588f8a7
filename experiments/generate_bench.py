"""Generation speed of the tiny Mixtral preset, beside a roofline bound measured in the same run.

Model: preset ``tiny`` (hidden 256, 4 layers, 8 experts top-2, 8 heads / 2 KV heads, intermediate 512,
vocab 512), float32, random weights. Workloads: batch 16 x 128-token prompts + 64 new tokens, and batch 1.
Reports TTFT (prefill + first token), ms per decode step, generated tokens/s, compile time apart.

Roofline for one decode step: max(weight bytes / memory bandwidth, FLOPs / matmul rate), with bandwidth the
higher of a large array reduction and a read of the model's weights, and the matmul rate from a large dense
matmul, all measured here. Weight bytes count
every parameter except the embedding table (a decode step gathers only B rows of it) and, of the routed
experts, the expected number a step touches: per layer ``E (1 - (1 - k/E)^B)`` (uniform routing), i.e. 7.9 of
8 experts at batch 16 and 2 at batch 1. KV-cache bytes are added. This machine's measured bandwidth moves
between runs (a shared VM: 35-68 GB/s for the same reduction), so it is measured at the start and at the end
of the run and the higher reading is used: the tighter (lower) roofline.

Expert floor: the batch-16 decode step is measured a second time with its expert product (the ``dense``
grouped compute it runs at 16 tokens) replaced by every expert on exactly its share of the rows (``B k / E``),
one batched product per weight, with no routing or combine (the tokens it computes are garbage; only its time
is used). No dropless implementation can do less expert work on XLA:CPU, so this is the step's floor here.

    python experiments/generate_bench.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments.common import environment, markdown_table, time_fn, write_results


def measure_machine(jax, jnp, repeats, model=None):
    """Memory bandwidth and dense matmul rate (2048^3), medians of ``repeats``.

    Bandwidth: the higher of a 256 MiB reduction and, given ``model``, one jitted read of all its weights but
    the embedding (what a decode step streams). On this VM the single large reduction sometimes reads half
    what the many-array weight read does in the same minute; the higher reading gives the tighter roofline.
    """
    x = jnp.ones((64 * 1024 * 1024,), jnp.float32)
    bw = x.nbytes / time_fn(jax.jit(jnp.sum), x, repeats=repeats)["median_s"]
    if model is not None:
        from flax import nnx

        flat = jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]
        ws = [w for path, w in flat if not jax.tree_util.keystr(path).startswith("['embed']")]
        nbytes = sum(w.nbytes for w in ws)
        read = jax.jit(lambda ws: sum(jnp.sum(w) for w in ws))
        bw = max(bw, nbytes / time_fn(read, ws, repeats=max(repeats, 20))["median_s"])
    a = jnp.ones((2048, 2048), jnp.float32)
    rate = 2 * 2048 ** 3 / time_fn(jax.jit(lambda a: a @ a), a, repeats=repeats)["median_s"]
    return bw, rate


def decode_weight_bytes(model, batch: int) -> float:
    """Weight bytes one decode step of ``batch`` tokens reads: every parameter but the embedding table, with
    the routed experts counted at the expected number touched (``E (1 - (1 - k/E)^batch)`` per MoE layer)."""
    import jax
    from flax import nnx

    cfg = model.cfg
    total = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model, nnx.Param))) - model.embed[...].nbytes
    if cfg.moe is None:
        return float(total)
    E, k = cfg.moe.num_experts, cfg.moe.router.effective_top_k
    expert = 3 * cfg.d_model * cfg.moe.d_ff * model.embed[...].dtype.itemsize
    n_moe = sum(kind == "moe" for kind in cfg.layer_kinds())
    touched = E * (1.0 - (1.0 - k / E) ** batch)
    return float(total - n_moe * (E - touched) * expert)


def floor_experts(x, wg, wu, wd, rows: int):
    """The expert floor's product: every expert on the first ``rows`` tokens of ``x [T, D]`` (``[E, rows, D]``
    out), one batched einsum per weight."""
    import jax
    import jax.numpy as jnp

    xe = jnp.broadcast_to(x[:rows], (wg.shape[0], rows, x.shape[-1]))
    a = jnp.einsum("erd,edf->erf", xe, wg.astype(x.dtype))
    b = jnp.einsum("erd,edf->erf", xe, wu.astype(x.dtype))
    return jnp.einsum("erf,efd->erd", jax.nn.silu(a) * b, wd.astype(x.dtype))


def floor_rows(cfg, batch: int) -> int:
    """Rows per expert at the expert floor: each expert's share ``B k / E`` of a batch's routed slots."""
    return share_rows(batch, cfg.moe.router.effective_top_k, cfg.moe.num_experts)


def share_rows(tokens: int, top_k: int, experts: int) -> int:
    """``tokens k / E`` rows (at least one): an expert's share of ``tokens`` routed ``top_k`` ways."""
    return max(1, tokens * top_k // experts)


def expert_floor_alone_ms(model, batch: int, repeats: int) -> float:
    """Median ms of the expert floor's products alone for every MoE layer of ``model`` (``batch`` tokens)."""
    import jax
    import jax.numpy as jnp

    cfg = model.cfg
    rows = floor_rows(cfg, batch)
    ws = [tuple(w[i] for w in model.stacks[r].moe.experts.weights())  # each layer's own [E, ...] weights
          for r, (kind, _, n) in enumerate(model.runs) if kind == "moe" for i in range(n)]

    @jax.jit
    def chain(ws, x):
        for wg, wu, wd in ws:
            x = x + jnp.sum(floor_experts(x, wg, wu, wd, rows), axis=0).mean(0)
        return x

    x = jnp.ones((batch, cfg.d_model), jnp.dtype(cfg.dtype))
    return time_fn(chain, ws, x, repeats=max(repeats, 50))["median_s"] * 1e3


@contextlib.contextmanager
def expert_floor_patch(top_k: int):
    """Within the block, the ``dense`` grouped compute (what a batch-16 decode step runs) is replaced by the
    *expert floor*: each expert on exactly ``T k / E`` of the rows, one batched einsum per weight, no routing
    and no combine weights; its output (the right shape, the wrong values) keeps the rest of the step as it
    is. jax's caches are cleared on entry and exit so that nothing traced with one version runs with the
    other. A benchmark device only: the step computes garbage tokens."""
    import jax
    import jax.numpy as jnp

    from moejax.nn.experts import GROUPED_IMPLS

    def floor(x, w, layout, ids, slot_weights, block_rows):
        wg, wu, wd = w
        T, D = x.shape
        rows = share_rows(T, top_k, wg.shape[0])
        y = floor_experts(x, wg, wu, wd, rows).reshape(-1, D)
        return jnp.sum(y[: T * top_k].reshape(T, -1, D), axis=1) if y.shape[0] >= T * top_k else y[:T]

    real = GROUPED_IMPLS["dense"]
    jax.clear_caches()
    GROUPED_IMPLS["dense"] = dataclasses.replace(real, run=floor)
    try:
        yield
    finally:
        GROUPED_IMPLS["dense"] = real
        jax.clear_caches()


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
    bw0, rate0 = measure_machine(jax, jnp, args.repeats, model)
    print(f"memory bandwidth {bw0 / 1e9:.1f} GB/s, matmul {rate0 / 1e9:.1f} GFLOP/s", flush=True)
    rng = np.random.default_rng(0)
    P, N = args.prompt_len, args.new_tokens
    records = []
    def measure(B, prompts):
        def run(n):
            t = time.perf_counter()
            generate(model, prompts, n)
            return time.perf_counter() - t

        c1 = run(1)
        cN = run(N)
        t1 = sorted(run(1) for _ in range(args.repeats))[args.repeats // 2]
        tN = sorted(run(N) for _ in range(args.repeats))[args.repeats // 2]
        return c1, cN, t1, tN

    for B in (16, 1):
        prompts = rng.integers(0, cfg.vocab_size, (B, P)).tolist()
        c1, cN, t1, tN = measure(B, prompts)
        step = (tN - t1) / (N - 1)
        records.append({"batch": B, "prompt_len": P, "new_tokens": N, "ttft_ms": t1 * 1e3,
                        "decode_step_ms": step * 1e3, "tokens_per_s": B * N / tN, "decode_tokens_per_s": B / step,
                        "compile_s": c1 + cN - t1 - tN})
        if B == 16:
            with expert_floor_patch(cfg.moe.router.effective_top_k):
                _, _, f1, fN = measure(B, prompts)
            floor_step = (fN - f1) / (N - 1)
            _, _, t1b, tNb = measure(B, prompts)  # the real step again, after the floor (noise check)
            records[-1]["decode_step_ms_again"] = (tNb - t1b) / (N - 1) * 1e3
            records[-1]["floor_step_ms"] = floor_step * 1e3
            records[-1]["expert_floor_alone_ms"] = expert_floor_alone_ms(model, B, args.repeats)
            records[-1]["floor_rows_per_expert"] = floor_rows(cfg, B)
    bw1, rate1 = measure_machine(jax, jnp, args.repeats, model)
    bw, rate = max(bw0, bw1), max(rate0, rate1)
    print(f"memory bandwidth {bw1 / 1e9:.1f} GB/s, matmul {rate1 / 1e9:.1f} GFLOP/s (end of run)", flush=True)
    act = active_params(cfg)["active"] - cfg.vocab_size * cfg.d_model  # embedding lookup is not a matmul
    for rec in records:
        B, step = rec["batch"], rec["decode_step_ms"] / 1e3
        weight_bytes = decode_weight_bytes(model, B)
        flops = 2 * B * act + 4 * B * cfg.n_layers * cfg.n_heads * cfg.resolved_head_dim * (P + N)
        kv_bytes = 2 * cfg.n_layers * B * (P + N) * cfg.n_kv_heads * cfg.resolved_head_dim * 4
        bound = max((weight_bytes + kv_bytes) / bw, flops / rate)
        rec.update({"roofline_step_ms": bound * 1e3, "step_over_roofline": step / bound,
                    "weight_mb": weight_bytes / 1e6, "kv_mb": kv_bytes / 1e6, "flops_per_step": flops})
        print(f"batch {B:2d}: TTFT {rec['ttft_ms']:.1f} ms, decode step {rec['decode_step_ms']:.2f} ms "
              f"(roofline {rec['roofline_step_ms']:.2f} ms, ratio {rec['step_over_roofline']:.2f}), "
              f"{rec['tokens_per_s']:.0f} tok/s end-to-end, compile {rec['compile_s']:.1f} s", flush=True)
    r16 = records[0]
    r16["floor_step_over_roofline"] = r16["floor_step_ms"] / r16["roofline_step_ms"]
    print(f"batch 16: decode step {r16['decode_step_ms']:.2f} / {r16['decode_step_ms_again']:.2f} ms (before / after), "
          f"with the expert floor {r16['floor_step_ms']:.2f} ms = {r16['floor_step_over_roofline']:.2f}x roofline "
          f"(the floor's products alone: {r16['expert_floor_alone_ms']:.2f} ms)", flush=True)
    env = environment()
    md = ("# Generation benchmark: tiny Mixtral preset (float32, random weights)\n\n"
          f"Measured here: memory bandwidth {bw0 / 1e9:.1f} GB/s at the start and {bw1 / 1e9:.1f} GB/s at the "
          f"end of the run (each the higher of a 256 MiB reduction and a read of the model's weights; the "
          f"roofline uses the higher, {bw / 1e9:.1f} GB/s), matmul "
          f"{rate / 1e9:.1f} GFLOP/s (2048^3, the higher of the two). Weight bytes count the experts a step is "
          "expected to touch (all 8 at batch 16, 2 at batch 1). Target: batch-16 decode step within 2x of the "
          "roofline max(weight+KV bytes / bandwidth, FLOPs / matmul rate).\n\n"
          + markdown_table(records, ["batch", "prompt_len", "new_tokens", "ttft_ms", "decode_step_ms",
                                     "roofline_step_ms", "step_over_roofline", "tokens_per_s", "compile_s"])
          + f"\nExpert floor (batch 16): the same decode step with only its expert product replaced by each "
          f"expert on exactly {r16['floor_rows_per_expert']} rows (one batched einsum "
          f"per weight, no routing or combine) takes {r16['floor_step_ms']:.2f} ms = "
          f"{r16['floor_step_over_roofline']:.2f}x the roofline (the real step measured again after it: "
          f"{r16['decode_step_ms_again']:.2f} ms). No dropless grouped-compute method can do less expert work, so "
          "this bounds what the step can reach with XLA:CPU's kernels. The floor's products alone take "
          f"{r16['expert_floor_alone_ms']:.2f} ms of the {2 * r16['roofline_step_ms']:.2f} ms that 2x the roofline "
          "allows the whole step.\n"
          + f"\nEnvironment: jax {env['jax']}, backend {env['backend']}, {env['cpu_count']} CPUs.\n")
    payload = {"environment": env, "bandwidth_bytes_per_s": bw, "matmul_flops_per_s": rate,
               "bandwidth_start_end": [bw0, bw1], "matmul_start_end": [rate0, rate1], "records": records}
    print(md)
    print("wrote", *write_results("generate_bench", payload, md))


if __name__ == "__main__":
    main()
