"""dLLM-Serve on this CPU: logit budgeting, the phase-multiplexed scheduler and head-centric sparse attention
against lockstep batching (issue 25).

A diffusion LM with LLaDA's 126,464-token vocabulary (random weights of the ``tiny`` body, ``--layers`` layers:
nothing downloads; timing does not depend on the weights' values, and no request stops early because stop ids
are not used) served by :class:`moejax.diffusion.engine.DiffusionEngine`:

(a) **memory**: compiled memory analysis (XLA's buffer assignment of the compiled step) of the largest refresh
    iteration, ``--mem-batch`` canvases of ``L`` tokens, with and without logit budgeting; beside it the size of
    the ``[B, L, V]`` float32 logits the head would produce.

(b) **serving**: one memory budget fixed before measuring (the weights + ``--margin-mib``), shared by every
    configuration; each sizes its KV pool from what the budget leaves after the weights and its largest step's
    temporaries (compiled memory analysis) and runs as many requests at once as that holds (at most
    ``--max-seqs``, a power of two). Configurations, each adding one mechanism:

    1. baseline: static lockstep batches with the dual KV cache, the head on every computed position
       (Fast-dLLM-like);
    2. + logit budgeting;
    3. + the phase-multiplexed scheduler (token budget ``--token-budget``);
    4. + head-centric sparse attention (retention ``--retention``): reuse steps attend to each KV head's own
       top-k cached tokens.

    Workloads: ``--requests`` prompts of held-out code (``--prompt-min``..``--prompt-max`` tokens, drawn once),
    ``--gen`` new tokens in blocks of ``--block`` with ``--steps-per-block`` steps: a burst (all at t = 0) and a
    Poisson trace at 1.5x the baseline's saturation rate (its burst throughput in requests/s: heavy contention).
    Throughput (generated tokens/s over the run), p50/p99 request latency (arrival to last block). Each
    configuration first runs the burst once and the Poisson trace until a pass compiles no new step shape (at
    most ``--warm-passes``), untimed, then each timed; the step shapes compiled during a timed run are
    reported (``compiles``): the step's shapes depend on the mix of phases and batch sizes, which arrival
    timing decides, and a compile inside a timed run shows up as latency.

(c) **p99 study** (a sweep, not a mechanism of the paper): the phase-multiplexed configuration with its
    admission capped at ``--cap-sweep`` requests at once, on the same Poisson trace. On a compute-bound CPU an
    iteration's time grows with its rows, so serving every admitted request each iteration shares the
    processor among them (every request slows down), while a cap queues the newest ones first-come
    first-served; the sweep shows where the tail goes with the cap.

Writes ``experiments/results/dllm_serve.{json,md,png}``.

    python experiments/dllm_serve.py [--requests 32] [--margin-mib 1024] [--layers 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments.common import cpu_isa, environment, markdown_table, write_results

LLADA_VOCAB = 126_464
MIB = 2 ** 20


def model_of(args):
    from flax import nnx

    from moejax.config import get_preset
    from moejax.models.transformer import Transformer

    cfg = dataclasses.replace(get_preset("tiny"), vocab_size=LLADA_VOCAB, n_layers=args.layers, causal=False,
                              mask_token_id=LLADA_VOCAB - 128, max_seq_len=args.max_len).validate()
    return Transformer(cfg, rngs=nnx.Rngs(0))


def memory_part(model, args) -> list[dict]:
    from moejax.diffusion.engine import DiffusionEngine, DiffusionEngineConfig

    rows = []
    for L in args.mem_lengths:
        for lb in (False, True):
            eng = DiffusionEngine(model, DiffusionEngineConfig(block_length=args.block, steps_per_block=1,
                                                               max_num_seqs=args.mem_batch, max_model_len=L,
                                                               logit_budget=lb, num_blocks=2))
            m = eng.peak_step_memory()
            rows.append({"canvas L": L, "batch": args.mem_batch, "logit budgeting": lb,
                         "temporaries MiB": m["temp_bytes"] / MIB, "outputs MiB": m["output_bytes"] / MIB,
                         "[B, L, V] f32 logits MiB": args.mem_batch * L * LLADA_VOCAB * 4 / MIB})
            print(rows[-1], flush=True)
    return rows


def workload(args):
    import numpy as np

    from moejax.train import data as data_lib

    streams, _ = data_lib.build_corpus(None)
    val = streams["validation"]
    rng = np.random.default_rng(args.seed)
    lens = rng.integers(args.prompt_min, args.prompt_max + 1, args.requests)
    prompts = [val.sequence(i * 7, int(n))["tokens"].tolist() for i, n in enumerate(lens)]
    return [[t if t < 256 else 10 for t in p] for p in prompts]


def engine_for(model, args, scheduler: str, logit_budget: bool, budget: int, retention: float | None = None,
               cap: int | None = None):
    """The largest power-of-two batch (at most ``cap`` or ``--max-seqs``) whose pool, sized from the budget,
    holds that many canvases."""
    from moejax.diffusion.engine import DiffusionEngine, DiffusionEngineConfig
    from moejax.nn.shapes import pow2_bucket

    best, n = None, 1
    serve_len = pow2_bucket(args.prompt_max + args.gen, 16)  # the longest canvas of the workload
    while n <= (cap or args.max_seqs):
        cfg = DiffusionEngineConfig(block_length=args.block, steps_per_block=args.steps_per_block,
                                    scheduler=scheduler, max_num_seqs=n, token_budget=args.token_budget,
                                    logit_budget=logit_budget, memory_budget=budget, max_model_len=serve_len,
                                    sparse_retention=retention)
        try:
            eng = DiffusionEngine(model, cfg)
        except ValueError:
            break
        if eng.num_blocks - 1 < n * eng.max_pages:
            break
        best, n = eng, n * 2
    if best is None:
        raise SystemExit(f"the memory budget ({budget / MIB:.0f} MiB) does not hold one request: raise --margin-mib")
    return best


def drive(eng, prompts, arrivals, args) -> dict:
    """Submit each prompt at its arrival (seconds after the start) and step until all finish."""
    import numpy as np

    from moejax.diffusion.runner import diffusion_step
    from moejax.serve.engine import SamplingParams

    compiled = diffusion_step._cache_size()
    sp = [SamplingParams(max_tokens=args.gen, temperature=0.0, seed=i) for i in range(len(prompts))]
    order = np.argsort(arrivals, kind="stable")
    t0 = time.perf_counter()
    i, done = 0, {}
    rid_of = {}
    while len(done) < len(prompts):
        now = time.perf_counter() - t0
        while i < len(order) and arrivals[order[i]] <= now:
            j = int(order[i])
            rid_of[eng.add_request(prompts[j], sp[j], arrival=t0 + arrivals[j])] = j
            i += 1
        if eng.has_unfinished():
            for o in eng.step():
                if o.finished:
                    done[rid_of[o.request_id]] = time.perf_counter() - t0
        elif i < len(order):
            time.sleep(max(0.0, min(0.01, arrivals[order[i]] - now)))
    lat = [done[j] - arrivals[j] for j in range(len(prompts))]
    span = max(done.values())
    return {"makespan_s": span, "throughput_tok_s": len(prompts) * args.gen / span,
            "requests_per_s": len(prompts) / span, "p50_latency_s": float(np.percentile(lat, 50)),
            "p99_latency_s": float(np.percentile(lat, 99)), "iterations": len(eng.iterations),
            "compiles": diffusion_step._cache_size() - compiled}


def serving_part(model, args):
    import jax
    import numpy as np
    from flax import nnx

    prompts = workload(args)
    weights = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(nnx.state(model)))
    budget = int(weights + args.margin_mib * MIB)
    configs = [("baseline: static lockstep, dual cache", "static", False, None),
               ("+ logit budgeting", "static", True, None),
               ("+ phase-multiplexed scheduler", "phase", True, None),
               (f"+ sparse attention (retention {args.retention:g})", "phase", True, args.retention)]
    burst = np.zeros(len(prompts))
    rows, rate, poisson = [], None, None

    def run(eng, name, timed_burst=True):
        nonlocal rate, poisson
        info = {"config": name, "max_num_seqs": eng.cfg.max_num_seqs, "kv_blocks": eng.num_blocks}
        print(f"{name}: {eng.cfg.max_num_seqs} requests at once, {eng.num_blocks} KV blocks; warming up ...",
              flush=True)
        drive(eng, prompts, burst, args)  # untimed: compiles the step shapes of this workload
        row = dict(info)
        if timed_burst:
            eng.iterations.clear()
            row.update({f"burst {k}": v for k, v in drive(eng, prompts, burst, args).items()})
        if rate is None:  # the baseline's saturation rate; heavy contention at 1.5x
            rate = 1.5 * row["burst requests_per_s"]
            gaps = np.random.default_rng(args.seed + 1).exponential(1 / rate, len(prompts))
            poisson = np.cumsum(gaps) - gaps[0]
        for _ in range(args.warm_passes):  # untimed: the shapes the trace's mixes of phases and sizes meet
            if drive(eng, prompts, poisson, args)["compiles"] == 0:
                break
        eng.iterations.clear()
        row.update({f"poisson {k}": v for k, v in drive(eng, prompts, poisson, args).items()})
        print(row, flush=True)
        return row

    for name, sched, lb, ret in configs:
        eng = engine_for(model, args, sched, lb, budget, retention=ret)
        rows.append(run(eng, name))
        del eng
        jax.clear_caches()
    sweep = []
    for cap in args.cap_sweep:
        eng = engine_for(model, args, "phase", True, budget, cap=cap)
        sweep.append(run(eng, f"phase-multiplexed, at most {cap} at once", timed_burst=False))
        del eng
        jax.clear_caches()
    base = rows[0]
    for r in rows:
        r["burst throughput x"] = r["burst throughput_tok_s"] / base["burst throughput_tok_s"]
    for r in rows + sweep:
        r["poisson p99 lower x"] = base["poisson p99_latency_s"] / r["poisson p99_latency_s"]
    return rows, sweep, budget, weights, rate


def plot(rows, sweep, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(16, 4.2))
    names = [r["config"].replace(": ", ":\n") for r in rows]
    ax[0].bar(names, [r["burst throughput_tok_s"] for r in rows], color="tab:blue")
    ax[0].set_ylabel("tokens/s (burst)")
    ax[1].bar(names, [r["poisson p99_latency_s"] for r in rows], color="tab:red")
    ax[1].set_ylabel("p99 latency, s (Poisson, 1.5x baseline saturation)")
    caps = [r["max_num_seqs"] for r in sweep]
    ax[2].plot(caps, [r["poisson p99_latency_s"] for r in sweep], "o-", color="tab:red", label="p99")
    ax[2].plot(caps, [r["poisson p50_latency_s"] for r in sweep], "s--", color="tab:orange", label="p50")
    ax[2].axhline(rows[0]["poisson p99_latency_s"], color="gray", ls=":", label="baseline p99")
    ax[2].set_xscale("log", base=2)
    ax[2].set_xlabel("phase-multiplexed: requests at once (cap)")
    ax[2].set_ylabel("latency, s (same Poisson trace)")
    ax[2].legend(fontsize=8)
    for a in ax[:2]:
        a.tick_params(axis="x", labelsize=7)
    fig.suptitle("dLLM-Serve mechanisms on this CPU (vocab 126,464, random weights)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--mem-batch", type=int, default=8)
    ap.add_argument("--mem-lengths", type=lambda s: [int(x) for x in s.split(",")], default=[256, 512, 1024])
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--prompt-min", type=int, default=32)
    ap.add_argument("--prompt-max", type=int, default=160)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--steps-per-block", type=int, default=8)
    ap.add_argument("--max-len", type=int, default=1024)
    ap.add_argument("--max-seqs", type=int, default=32)
    ap.add_argument("--token-budget", type=int, default=2048)
    ap.add_argument("--margin-mib", type=float, default=1024.0, help="memory budget = weights + this")
    ap.add_argument("--retention", type=float, default=0.5, help="sparse attention's retention ratio")
    ap.add_argument("--cap-sweep", type=lambda s: [int(x) for x in s.split(",") if x], default=[2, 4, 8, 16],
                    help="admission caps of the p99 study (comma-separated; empty to skip)")
    ap.add_argument("--warm-passes", type=int, default=4,
                    help="untimed passes of the Poisson trace before the timed one, until one compiles nothing")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-serving", action="store_true")
    args = ap.parse_args(argv)
    model = model_of(args)
    mem = memory_part(model, args)
    out = {"env": environment(), "cpu": cpu_isa(), "args": vars(args), "memory": mem}
    md = (f"# dLLM-Serve on this CPU ({cpu_isa()})\n\nA diffusion LM with LLaDA's vocabulary ({LLADA_VOCAB:,} "
          f"tokens), the `tiny` body with {args.layers} layers, random weights.\n\n## (a) Peak step memory, "
          f"compiled memory analysis\n\nThe largest refresh iteration: {args.mem_batch} canvases of L tokens.\n\n"
          + markdown_table(mem, ["canvas L", "batch", "logit budgeting", "temporaries MiB", "outputs MiB",
                                 "[B, L, V] f32 logits MiB"]))
    if not args.skip_serving:
        rows, sweep, budget, weights, rate = serving_part(model, args)
        out.update(serving=rows, cap_sweep=sweep, memory_budget=budget, weight_bytes=weights, poisson_rate=rate)
        md += (f"\n## (b) Serving under one memory budget\n\nBudget {budget / MIB:.0f} MiB = weights "
               f"{weights / MIB:.0f} MiB + {args.margin_mib:g} MiB, fixed before measuring; {args.requests} requests "
               f"of {args.prompt_min}-{args.prompt_max} prompt tokens (held-out code) + {args.gen} new, blocks of "
               f"{args.block}, {args.steps_per_block} steps each; Poisson rate {rate:.3g} requests/s (1.5x the "
               f"baseline's burst throughput).\n\n"
               + markdown_table(rows, ["config", "max_num_seqs", "kv_blocks", "burst throughput_tok_s",
                                       "burst throughput x", "burst p50_latency_s", "burst p99_latency_s",
                                       "poisson throughput_tok_s", "poisson p50_latency_s", "poisson p99_latency_s",
                                       "poisson p99 lower x", "burst compiles", "poisson compiles"])
               + f"\n`compiles`: step shapes compiled during the timed run (each configuration first runs the burst "
               f"untimed, then the Poisson trace untimed until a pass compiles nothing, at most {args.warm_passes} "
               f"passes: arrival timing decides which mixes of phases and batch sizes occur).\n"
               + "\nTargets (issue 25): >= 1.6x the baseline's throughput, >= 2x lower p99 under heavy contention.\n")
        if sweep:
            md += ("\n## (c) p99 study: admission cap of the phase-multiplexed scheduler (a sweep)\n\nThe same "
                   "Poisson trace; logit budgeting, dense attention; `poisson p99 lower x` against the baseline "
                   "above.\n\n"
                   + markdown_table(sweep, ["config", "max_num_seqs", "poisson throughput_tok_s",
                                            "poisson p50_latency_s", "poisson p99_latency_s", "poisson p99 lower x",
                                            "poisson compiles"]))
        plot(rows, sweep, os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "dllm_serve.png"))
    print(md)
    print("wrote", *write_results("dllm_serve", out, md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
