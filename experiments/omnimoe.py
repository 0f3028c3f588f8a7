"""OmniMoE (issue 20): atomic experts and the Cartesian product router, measured on this machine.

Parts (``--parts``, default all):

- ``a`` (latency): at ``--tokens`` tokens of width ``--d``, for ``N`` in ``--log2n`` and ``K`` in ``--ks``:
  the atomic expert layer's forward, expert-centric against token-centric (routing ids uniform at random,
  as a freshly initialized router gives them), beside the reuse ``T * K / N``; the Cartesian product router
  (two heads of ``sqrt(N)``, batch norm, log_softmax, exact product top-K) against a flat router over all ``N``
  (one ``[d, N]`` gate, log_softmax, top-K; chunked over ``--flat-chunk`` tokens so the ``[tokens, N]`` logits
  fit; ``N`` above ``2^--flat-max-log2n`` skipped, too slow here); and a dense ``[T, d] @ [d, 4d]`` matmul in
  the same run for active-FLOP efficiency (the atomic layer's ``4 T K d`` FLOPs). Targets: expert-centric
  ``>= 2x`` token-centric wherever ``T K / N >= 8``; the Cartesian router ``>= 10x`` faster than the flat one at
  ``N = 2^16`` (paper: 6.7 ms against PEER's 73 ms, 10.9x; without the Cartesian router 30.6x slower).
- ``b`` (quality): ``tiny``, ``tiny-dense`` and ``tiny-omni`` trained on the stdlib corpus (seq 256, batch 16)
  for ``--steps`` steps each, then for ``--minutes`` of training each: validation bits/byte, tokens/s, total and
  active parameters. Target: ``tiny-omni`` within 2% of ``tiny`` at equal steps.
- ``c`` (peer): the reference ``OmniMoE_Pytorch`` (flash-algo/omni-moe) forward at ``N <= 2^16`` beside
  moejax's layer, loaded from a clone given by ``--omni-ref`` (or ``$OMNIMOE_REF``) outside the repo; skipped
  when absent or when torch is not installed.

Writes ``experiments/results/omnimoe.{json,md,png}``.

    python experiments/omnimoe.py [--parts a,b,c] [--tokens 4096] [--log2n 14,16,18,20] [--ks 16,64,256]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments.common import (
    cpu_isa,
    environment,
    markdown_table,
    time_fn,
    write_results,
)

# ------------------------------------------------------------------------------------------------ (a)

def flat_router(x, w, k, chunk):
    """The baseline: one ``[d, N]`` gate over all experts, log_softmax, top-k; ``chunk`` tokens at a time."""
    import jax

    T, d = x.shape

    def one(xc):
        z = jax.nn.log_softmax(xc @ w, axis=-1)
        return jax.lax.top_k(z, k)

    s, i = jax.lax.map(one, x.reshape(T // chunk, chunk, d))
    return s.reshape(T, k), i.reshape(T, k)


def part_a(args) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from moejax.nn.experts import atomic_expert_centric, atomic_token_centric
    from moejax.nn.routers import CartesianRouter

    T, d = args.tokens, args.d
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(T, d)), jnp.float32)
    dense = jax.jit(lambda a, b: a @ b)
    wd = jnp.asarray(rng.normal(size=(d, 4 * d)), jnp.float32)
    dense_s = time_fn(dense, x, wd, repeats=args.repeats)["median_s"]
    dense_gflops = 2 * T * d * 4 * d / dense_s / 1e9
    print(f"dense [{T},{d}]@[{d},{4 * d}]: {dense_gflops:.1f} GFLOP/s", flush=True)
    ec, tc = jax.jit(atomic_expert_centric), jax.jit(atomic_token_centric)
    rows = []
    for lg in args.log2n:
        N = 2**lg
        u = jnp.asarray(rng.normal(0, 0.02, (N, d)), jnp.float32)
        v = jnp.asarray(rng.normal(0, 0.02, (N, d)), jnp.float32)
        w_flat = jnp.asarray(rng.normal(0, 0.02, (d, N)), jnp.float32) if lg <= args.flat_max_log2n else None
        for K in args.ks:
            ids = jnp.asarray(rng.integers(0, N, (T, K)), jnp.int32)
            g = jnp.asarray(rng.random((T, K)) / K, jnp.float32)
            t_ec = time_fn(ec, x, u, v, ids, g, repeats=args.repeats)["median_s"]
            t_tc = time_fn(tc, x, u, v, ids, g, repeats=args.repeats)["median_s"]
            router = CartesianRouter(d, N, K, rngs=nnx.Rngs(0))
            gdef, state = nnx.split(router)
            cart = jax.jit(lambda st, x, gdef=gdef: nnx.merge(gdef, st)(x).weights)
            t_cart = time_fn(cart, state, x, repeats=args.repeats)["median_s"]
            t_flat = None
            if w_flat is not None:
                fl = jax.jit(lambda x, w, K=K: flat_router(x, w, K, args.flat_chunk))
                t_flat = time_fn(fl, x, w_flat, repeats=max(1, args.repeats // 2))["median_s"]
            flops = 4 * T * K * d
            row = {"N": N, "log2N": lg, "K": K, "reuse TK/N": T * K / N,
                   "expert-centric ms": t_ec * 1e3, "token-centric ms": t_tc * 1e3, "EC speedup": t_tc / t_ec,
                   "EC eff. vs dense": flops / t_ec / 1e9 / dense_gflops,
                   "cartesian router ms": t_cart * 1e3,
                   "flat router ms": None if t_flat is None else t_flat * 1e3,
                   "router speedup": None if t_flat is None else t_flat / t_cart}
            rows.append(row)
            print(json.dumps(row), flush=True)
        del u, v, w_flat
    return rows, dense_gflops


# ------------------------------------------------------------------------------------------------ (b)

def train_arm(name, args, *, steps=None, minutes=None):
    from moejax.config import TrainConfig, get_preset
    from moejax.models.transformer import active_params
    from moejax.train.trainer import train

    cfg = get_preset(name)
    steps = steps or 10**6
    tc = TrainConfig(steps=steps, minutes=minutes, seq_len=256, global_batch=16, eval_every=steps,
                     ckpt_every=steps, eval_batches=args.eval_batches, log_every=10, warmup_steps=50)
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        s = train(cfg, tc, os.path.join(d, "run"), progress=args.progress, cache_dir=args.cache_dir)
        wall = time.perf_counter() - t
        with open(s["log"]) as f:
            recs = [json.loads(line) for line in f]
    steps_log = [r for r in recs if "loss" in r and "step" in r and "event" not in r]
    tok_s = statistics.median(r["tokens_per_s"] for r in steps_log[1:]) if len(steps_log) > 1 else None
    p = active_params(cfg)
    return {"model": name, "budget": f"{steps} steps" if minutes is None else f"{minutes} min",
            "steps": s["step"], "val_bits_per_byte": s["val_bits_per_byte"], "tokens_per_s": tok_s,
            "params_M": p["total"] / 1e6, "active_M": p["active"] / 1e6, "wall_s": wall,
            "curve": [(r["step"], r["loss"]) for r in steps_log]}


def part_b(args) -> list[dict]:
    rows = []
    budgets = {"steps": {"steps": args.steps}, "minutes": {"minutes": args.minutes}}
    partial = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", args.out + ".b-partial.jsonl")
    for key in args.b_order.split(","):
        budget = budgets[key]
        for name in ("tiny", "tiny-dense", "tiny-omni"):
            print(f"[b] {name} {budget} ...", flush=True)
            r = train_arm(name, args, **budget)
            print(f"    {r['val_bits_per_byte']:.4f} bits/byte after {r['steps']} steps, "
                  f"{r['tokens_per_s']} tok/s", flush=True)
            rows.append(r)
            with open(partial, "a") as f:  # each arm as it ends (a crash later does not lose it)
                f.write(json.dumps(r) + "\n")
    return rows


# ------------------------------------------------------------------------------------------------ (c)

_REF_TRITON_OPS = {"omni_mlp": "triton_omni_mlp_func", "omni_router": "triton_omni_router_func",
                   "omni_expert": "triton_omni_expert_func"}


def _load_reference():
    """``(OmniMoE_Pytorch, OmniMoEConfig, stubbed)`` from the clone on ``sys.path``.

    ``omni_moe/modules/omni_moe.py`` imports its three Triton ops at module level (for the ``OmniMoE`` class
    beside the pure-PyTorch ``OmniMoE_Pytorch``). Where Triton is absent (a CPU machine), those three op
    modules are replaced by stubs whose functions raise when called, so that the module imports; only
    ``OmniMoE_Pytorch``, which calls none of them, is used. ``stubbed`` says whether that was done."""
    import importlib
    import types

    try:
        mod = importlib.import_module("omni_moe.modules.omni_moe")
        return mod.OmniMoE_Pytorch, mod.OmniMoEConfig, False
    except ModuleNotFoundError as e:
        if e.name != "triton" and not (e.name or "").startswith("triton."):
            raise
    for sub, fn in _REF_TRITON_OPS.items():
        name = f"omni_moe.ops.triton.{sub}"
        stub = types.ModuleType(name)

        def unavailable(*a, _fn=fn, **k):
            raise RuntimeError(f"{_fn}: Triton is not installed (stubbed by experiments/omnimoe.py)")

        setattr(stub, fn, unavailable)
        sys.modules[name] = stub
    sys.modules.pop("omni_moe.modules.omni_moe", None)
    mod = importlib.import_module("omni_moe.modules.omni_moe")
    return mod.OmniMoE_Pytorch, mod.OmniMoEConfig, True


def _copy_reference_weights(ref, layer):
    """Copy an ``OmniMoE_Pytorch``'s weights and batch-norm running statistics into an ``AtomicMoE`` (same
    expert numbering: ``i * sqrt(N) + j``; torch Linear weights are ``[out, in]``)."""
    import jax.numpy as jnp

    def t(p):
        return jnp.asarray(p.detach().numpy())

    layer.router.w1[...] = t(ref.router_gate_x.weight).T
    layer.router.w2[...] = t(ref.router_gate_y.weight).T
    for norm, bn in ((layer.router.norm1, ref.router_norm_x), (layer.router.norm2, ref.router_norm_y)):
        norm.mean[...], norm.var[...] = t(bn.running_mean), t(bn.running_var)
        norm.epsilon = bn.eps
    layer.u[...], layer.v[...] = t(ref.up_embed.weight), t(ref.down_embed.weight)
    layer.shared.w_gate[...] = t(ref.gate_proj.weight).T
    layer.shared.w_up[...] = t(ref.up_proj.weight).T
    layer.shared.w_down[...] = t(ref.down_proj.weight).T


def part_c(args) -> dict:
    path = args.omni_ref
    if not path or not os.path.isdir(path):
        return {"skipped": f"no reference clone (--omni-ref / $OMNIMOE_REF: {path!r})"}
    try:
        import torch
    except ImportError:
        return {"skipped": "torch is not installed"}
    sys.path.insert(0, path)
    try:
        OmniMoE_Pytorch, OmniMoEConfig, stubbed = _load_reference()
    except Exception as e:  # noqa: BLE001 -- report why the peer cannot run, do not fail the other parts
        return {"skipped": f"the reference does not import here: {type(e).__name__}: {e}"}
    import jax
    import numpy as np
    from flax import nnx

    from moejax.config import MoEConfig, RouterConfig
    from moejax.nn.moe import AtomicMoE

    T, d = args.tokens, args.d
    torch.manual_seed(0)
    rows = []
    for lg in [n for n in args.log2n if n <= 16]:
        N = 2**lg
        for K in args.ks:
            conf = OmniMoEConfig(hidden_size=d, intermediate_size=4 * d, hidden_act="silu", num_experts=N,
                                 num_experts_per_token=K)
            ref = OmniMoE_Pytorch(conf).eval()  # eval: the batch norms use their running statistics
            with torch.no_grad():  # a trained-looking router: its BN running statistics away from (0, 1)
                for bn in (ref.router_norm_x, ref.router_norm_y):
                    bn.running_mean.normal_(0.0, 0.05)
                    bn.running_var.uniform_(0.5, 2.0)
            xt = torch.randn(1, T, d)
            with torch.no_grad():
                y_ref = ref(xt)[0].numpy()
                ts = []
                for _ in range(args.repeats):
                    t = time.perf_counter()
                    ref(xt)
                    ts.append(time.perf_counter() - t)
            mc = MoEConfig(num_experts=N, d_ff=4 * d, num_shared_experts=1, shared_d_ff=4 * d,
                           expert_type="atomic", router=RouterConfig(type="cartesian", top_k=K))
            layer = AtomicMoE(d, mc, rngs=nnx.Rngs(0))
            _copy_reference_weights(ref, layer)
            xj = np.asarray(xt[0].numpy())
            row = {"N": N, "K": K, "reference ms": statistics.median(ts) * 1e3}
            for method in ("expert_centric", "token_centric"):
                gdef, state = nnx.split(layer)

                def fwd(st, x, gdef=gdef, method=method):
                    m = nnx.merge(gdef, st)
                    r, _ = m.route(x)
                    return m.apply_experts(x, r.expert_ids, r.weights, r.mask, method=method)

                f = jax.jit(fwd)
                y = np.asarray(f(state, xj))
                row[f"moejax {method} ms"] = time_fn(f, state, xj, repeats=args.repeats)["median_s"] * 1e3
                row[f"rel. diff {method}"] = float(np.max(np.abs(y - y_ref)) / np.max(np.abs(y_ref)))
            row["ratio ref / EC"] = row["reference ms"] / row["moejax expert_centric ms"]
            rows.append(row)
            print(json.dumps(row), flush=True)
            del ref, layer
    return {"rows": rows, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "triton_ops_stubbed": stubbed}


# ------------------------------------------------------------------------------------------------ report

def plot(a_rows, b_rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2 if b_rows else 1, figsize=(12 if b_rows else 6, 4.5), squeeze=False)
    ax = axes[0, 0]
    if a_rows:
        for K in sorted({r["K"] for r in a_rows}):
            rs = [r for r in a_rows if r["K"] == K]
            ax.plot([r["reuse TK/N"] for r in rs], [r["EC speedup"] for r in rs], "o-", label=f"K={K}")
        ax.axhline(2.0, color="C3", ls="--", label="target 2x (reuse >= 8)")
        ax.axvline(8.0, color="grey", ls=":")
        ax.set_xscale("log")
        ax.set_xlabel("reuse T*K/N")
        ax.set_ylabel("token-centric / expert-centric time")
        ax.legend(fontsize=8)
    if b_rows:
        ax = axes[0, 1]
        for r in b_rows:
            if r["curve"]:
                ax.plot(*zip(*r["curve"], strict=True), label=f"{r['model']} ({r['budget']})", lw=1)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def report(args, a, dense_gflops, b, c) -> str:
    isa = cpu_isa()
    md = [f"# OmniMoE: atomic experts and the Cartesian product router ({isa}, {os.cpu_count()} CPUs)\n"]
    summary = {}
    if a:
        hi = [r for r in a if r["reuse TK/N"] >= 8]
        summary["ec_target_met"] = bool(hi) and all(r["EC speedup"] >= 2 for r in hi)
        at16 = [r for r in a if r["log2N"] == 16 and r["router speedup"] is not None]
        summary["router_target_met"] = bool(at16) and all(r["router speedup"] >= 10 for r in at16)
        cols = ["N", "K", "reuse TK/N", "expert-centric ms", "token-centric ms", "EC speedup", "EC eff. vs dense",
                "cartesian router ms", "flat router ms", "router speedup"]
        md += [f"## (a) Layer latency, {args.tokens} tokens, d = {args.d} (forward, float32)\n",
               (f"Routing ids uniform at random; dense matmul in the same run {dense_gflops:.1f} GFLOP/s "
                f"(efficiency: the layer's 4 T K d FLOPs per second over it); the flat router chunked over "
                f"{args.flat_chunk} tokens, not run above N = 2^{args.flat_max_log2n}.\n"),
               markdown_table(a, cols),
               (f"\nExpert-centric >= 2x token-centric wherever T K / N >= 8: **{summary['ec_target_met']}**. "
                f"Cartesian router >= 10x the flat router at N = 2^16: **{summary['router_target_met']}**.\n")]
    if b:
        cols = ["model", "budget", "steps", "val_bits_per_byte", "tokens_per_s", "params_M", "active_M", "wall_s"]
        by = {(r["model"], r["budget"]): r for r in b}
        eq = f"{args.steps} steps"
        if ("tiny", eq) in by and ("tiny-omni", eq) in by:
            rel = by[("tiny-omni", eq)]["val_bits_per_byte"] / by[("tiny", eq)]["val_bits_per_byte"] - 1
            summary["omni_vs_tiny_equal_steps"] = rel
            summary["quality_target_met"] = rel <= 0.02
        md += ["## (b) Quality on the stdlib corpus (seq 256, batch 16)\n", markdown_table(b, cols)]
        if "omni_vs_tiny_equal_steps" in summary:
            md.append(f"\ntiny-omni against tiny at equal steps: {summary['omni_vs_tiny_equal_steps']:+.2%} "
                      f"bits/byte (target <= +2%: **{summary['quality_target_met']}**).\n")
    if c is not None:
        md.append("## (c) Reference OmniMoE_Pytorch as a peer\n")
        if "skipped" in c:
            md.append(c["skipped"] + "\n")
        else:
            md.append(f"The reference's pure-PyTorch class (torch {c['torch']}, {c['threads']} threads, eval mode: "
                      f"running batch-norm statistics; its router scores all N pairs per token, its experts are "
                      f"token-centric) and moejax's AtomicMoE (router + experts + dense branch, jitted) with the "
                      f"same weights copied in, on the same {args.tokens} tokens of width {args.d}"
                      + (" (the reference's Triton op modules stubbed: never called by OmniMoE_Pytorch)"
                         if c.get("triton_ops_stubbed") else "") + ". rel. diff: max abs difference of the outputs over the reference's max abs output.\n")
            md.append(markdown_table(c["rows"], list(c["rows"][0])))
    md.append(f"\nEnvironment: jax {environment()['jax']}, {os.cpu_count()} CPUs, {isa}.\n")
    return "\n".join(md), summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="a,b,c", help="comma-separated parts to run: a (latency), b (quality), "
                                                     "c (reference peer)")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--d", type=int, default=256, help="model width of the latency study (tiny's)")
    ap.add_argument("--log2n", default="14,16,18,20", help="log2 of the expert counts")
    ap.add_argument("--ks", default="16,64,256", help="experts per token")
    ap.add_argument("--flat-chunk", type=int, default=256, help="tokens per chunk of the flat router")
    ap.add_argument("--flat-max-log2n", type=int, default=18, help="largest log2 N the flat router runs at")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=300, help="(b) the equal-steps budget")
    ap.add_argument("--minutes", type=float, default=10.0, help="(b) the equal-wall-time budget, per model")
    ap.add_argument("--b-order", default="minutes,steps",
                    help="(b) the order of the two budgets (the equal-wall-time arms first: they need a quiet machine)")
    ap.add_argument("--eval-batches", type=int, default=16)
    ap.add_argument("--omni-ref", default=os.environ.get("OMNIMOE_REF"), help="(c) a clone of flash-algo/omni-moe")
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--out", default="omnimoe")
    args = ap.parse_args(argv)
    parts = set(args.parts.split(","))
    bad = parts - {"a", "b", "c"}
    if bad:
        ap.error(f"--parts: unknown {sorted(bad)}; allowed a, b, c")
    args.log2n = [int(v) for v in args.log2n.split(",")]
    args.ks = [int(v) for v in args.ks.split(",")]
    if sorted(args.b_order.split(",")) != ["minutes", "steps"]:
        ap.error(f"--b-order {args.b_order!r}: give both budgets, 'minutes,steps' or 'steps,minutes'")
    if args.tokens % args.flat_chunk:
        ap.error(f"--flat-chunk {args.flat_chunk} must divide --tokens {args.tokens}")
    a, dense_gflops = part_a(args) if "a" in parts else ([], None)
    b = part_b(args) if "b" in parts else []
    c = part_c(args) if "c" in parts else None
    md, summary = report(args, a, dense_gflops, b, c)
    payload = {"args": vars(args), "latency": a, "dense_gflops": dense_gflops, "quality": b, "peer": c,
               "summary": summary, "environment": environment(), "isa": cpu_isa()}
    jp, mp = write_results(args.out, payload, md)
    if a or b:
        plot(a, b, os.path.join(os.path.dirname(jp), args.out + ".png"))
    print(md)
    print("wrote", jp, mp)
    return 0


if __name__ == "__main__":
    sys.exit(main())
