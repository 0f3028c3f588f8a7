"""N:M sparse training (issue 21): BDWP against SR-STE, transposable masks and dense, at equal steps.

Arms (the ``tiny`` preset on the stdlib corpus, seq 256, batch 16, the same ``--steps`` each, in this order):
dense (seed 0 and seed 1: the noise floor), SR-STE 2:4 and 2:8, BDWP 2:4 and 2:8, transposable 2:4. Sparsity
covers attention q/k/v/o, the dense/shared MLPs and the routed experts; router and embeddings stay dense.

Per arm: validation bits/byte at the end of training (the trainer's own evaluation, under the forward masks) and
of the saved checkpoint loaded as the N:M-sparse model (:func:`moejax.train.checkpoint.load_model` zeroes the
pruned weights; the two must agree), the mean mask flip rate, the measured step time on this CPU (median over
logging windows after the first), and the *implied* training speedup from MAC accounting
(:mod:`moejax.sparsity.macs`: N:M GEMMs at n/m of their dense time, everything else unchanged). XLA:CPU runs the
masked weights densely, so the measured step is no faster (the masks add work); the implied speedup is what a
kernel that skips the zeros would give.

Targets: BDWP 2:8 within 3% relative bits/byte of dense (mean of the two seeds); the BDWP - SR-STE gap at
equal N:M is reported beside the dense seeds' spread. Each finished arm is kept in
``experiments/results/nm_sparsity.partial.json`` so an interrupted run continues with ``--resume``; the final
JSON, markdown and plot are written at the end.

``--steps 300`` (the default) is what fits the ~100-minute budget here: the seven arms took 85 minutes on a
2-core AVX-512 machine (10-13 minutes each); an AVX2 machine takes longer.

    python experiments/nm_sparsity.py [--steps 300] [--resume]
    python experiments/nm_sparsity.py --probe          # then: step times side by side, added to the results
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
    RESULTS,
    cpu_isa,
    environment,
    markdown_table,
    write_results,
)

ARMS = [
    ("dense seed 0", "dense", 2, 4, 0),
    ("dense seed 1", "dense", 2, 4, 1),
    ("SR-STE 2:4", "srste", 2, 4, 0),
    ("SR-STE 2:8", "srste", 2, 8, 0),
    ("BDWP 2:4", "bdwp", 2, 4, 0),
    ("BDWP 2:8", "bdwp", 2, 8, 0),
    ("transposable 2:4", "transposable", 2, 4, 0),
]
PARTIAL = os.path.join(RESULTS, "nm_sparsity.partial.json")


def run_arm(name, method, n, m, seed, args, cfg) -> dict:
    from moejax.config import SparsityConfig, TrainConfig
    from moejax.sparsity import step_macs
    from moejax.train.trainer import evaluate_checkpoint, train

    sc = None if method == "dense" else SparsityConfig(n=n, m=m, method=method)
    tc = TrainConfig(steps=args.steps, seq_len=256, global_batch=16, eval_every=args.steps, ckpt_every=args.steps,
                     eval_batches=args.eval_batches, log_every=10, warmup_steps=50, seed=seed, sparsity=sc)
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        s = train(cfg, tc, os.path.join(d, "run"), progress=args.progress, cache_dir=args.cache_dir)
        wall = time.perf_counter() - t
        loaded = evaluate_checkpoint(s["out_dir"], batch=16, max_batches=args.eval_batches,
                                     cache_dir=args.cache_dir)
        with open(s["log"]) as f:
            recs = [json.loads(line) for line in f]
    steps = [r for r in recs if "loss" in r and "step" in r and "event" not in r]
    step_s = statistics.median(tc.global_batch * tc.seq_len / r["tokens_per_s"] for r in steps[1:])
    flips = [r["mask_flip_rate"] for r in steps if "mask_flip_rate" in r]
    macs = step_macs(cfg, sc, tokens=tc.global_batch * tc.seq_len, seq_len=tc.seq_len)
    return {"arm": name, "method": method, "n": n if sc else None, "m": m if sc else None, "seed": seed,
            "steps": s["step"], "val_bits_per_byte": s["val_bits_per_byte"],
            "loaded_val_bits_per_byte": loaded["val_bits_per_byte"], "step_ms": step_s * 1e3,
            "mean_mask_flip_rate": statistics.mean(flips) if flips else None,
            "final_mask_flip_rate": flips[-1] if flips else None,
            "implied_speedup": macs["implied_speedup"], "macs": {k: macs[k] for k in ("dense", "sparse")},
            "wall_s": wall, "curve": [(r["step"], r["loss"]) for r in steps]}


def summarize(rows: list[dict]) -> dict:
    by = {r["arm"]: r for r in rows}
    dense = [by[a]["val_bits_per_byte"] for a in ("dense seed 0", "dense seed 1") if a in by]
    out = {}
    if dense:
        ref = statistics.mean(dense)
        out["dense_mean"] = ref
        out["dense_spread"] = max(dense) - min(dense)
        for r in rows:
            r["rel_to_dense"] = r["val_bits_per_byte"] / ref - 1
        if "BDWP 2:8" in by:
            out["bdwp_2_8_rel"] = by["BDWP 2:8"]["rel_to_dense"]
            out["bdwp_2_8_target_met"] = out["bdwp_2_8_rel"] <= 0.03
    for nm in ("2:4", "2:8"):
        if f"BDWP {nm}" in by and f"SR-STE {nm}" in by:
            out[f"bdwp_minus_srste_{nm}"] = by[f"BDWP {nm}"]["val_bits_per_byte"] - by[f"SR-STE {nm}"]["val_bits_per_byte"]
    return out


def plot(rows, summary, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = [r["arm"] for r in rows]
    a1.bar(names, [r["val_bits_per_byte"] for r in rows], color=["grey" if r["method"] == "dense" else "C0"
                                                                   for r in rows])
    if "dense_mean" in summary:
        lo = summary["dense_mean"] - summary["dense_spread"] / 2
        a1.axhspan(lo, lo + max(summary["dense_spread"], 1e-4), color="grey", alpha=0.3, label="dense seeds")
        a1.axhline(summary["dense_mean"] * 1.03, color="C3", ls="--", label="dense + 3%")
        a1.legend()
    vals = [r["val_bits_per_byte"] for r in rows]
    a1.set_ylim(min(vals) * 0.98, max(vals) * 1.02)
    a1.set_ylabel("validation bits/byte")
    a1.tick_params(axis="x", rotation=30)
    for r in rows:
        a2.plot(*zip(*r["curve"], strict=True), label=r["arm"], lw=1)
    a2.set_xlabel("step")
    a2.set_ylabel("training loss")
    a2.set_ylim(top=min(6.0, max(v for r in rows for _, v in r["curve"])))
    a2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300, help="optimizer steps per arm (the same for every arm)")
    ap.add_argument("--eval-batches", type=int, default=16)
    ap.add_argument("--arms", default="all", help="comma-separated arm names to run (default: all)")
    ap.add_argument("--resume", action="store_true", help=f"keep the arms already in {PARTIAL} (same --steps)")
    ap.add_argument("--progress", action="store_true", help="a progress bar per arm")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--out", default="nm_sparsity", help="results name (experiments/results/<out>.{json,md,png})")
    ap.add_argument("--probe", action="store_true",
                    help="only add the side-by-side step-time probe to the existing results file")
    ap.add_argument("--probe-steps", type=int, default=8, help="timed steps per method and round of the probe")
    args = ap.parse_args(argv)
    if args.probe:
        return probe_only(args)

    from moejax.config import get_preset

    cfg = get_preset("tiny")
    arms = ARMS if args.arms == "all" else [a for a in ARMS if a[0] in args.arms.split(",")]
    if not arms:
        raise SystemExit(f"--arms {args.arms!r}: none of {[a[0] for a in ARMS]}")
    done = {}
    if args.resume and os.path.exists(PARTIAL):
        with open(PARTIAL) as f:
            saved = json.load(f)
        if saved.get("steps") == args.steps:
            done = {r["arm"]: r for r in saved["rows"]}
    rows = []
    for i, arm in enumerate(arms):
        if arm[0] in done:
            rows.append(done[arm[0]])
            print(f"[{i + 1}/{len(arms)}] {arm[0]}: kept from {PARTIAL}", flush=True)
            continue
        print(f"[{i + 1}/{len(arms)}] {arm[0]}: training {args.steps} steps ...", flush=True)
        r = run_arm(*arm, args, cfg)
        rows.append(r)
        print(f"    val {r['val_bits_per_byte']:.4f} bits/byte (loaded sparse checkpoint "
              f"{r['loaded_val_bits_per_byte']:.4f}), step {r['step_ms']:.0f} ms, implied speedup "
              f"{r['implied_speedup']:.2f}x, {r['wall_s']:.0f} s", flush=True)
        os.makedirs(RESULTS, exist_ok=True)
        with open(PARTIAL + ".tmp", "w") as f:
            json.dump({"steps": args.steps, "rows": rows}, f)
        os.replace(PARTIAL + ".tmp", PARTIAL)
    summary = summarize(rows)
    report(args, rows, summary, None)
    if os.path.exists(PARTIAL) and len(rows) == len(ARMS):
        os.remove(PARTIAL)


def timing_probe(cfg, steps: int, rounds: int = 2) -> dict:
    """Step time of every method side by side in one process: one :class:`Trainer` per distinct (method, n, m)
    (compiled once, two warm-up steps), then ``rounds`` rounds, the order reversed each round, of ``steps``
    timed steps on a fixed random batch. Returns ``{(method, n, m): median ms}``. The long arms' own step times
    are medians over their run, which other work on this shared machine can inflate; this probe compares the
    methods within a few minutes of each other."""
    import jax
    import numpy as np

    from moejax.config import SparsityConfig, TrainConfig
    from moejax.train.trainer import Trainer

    keys = list(dict.fromkeys((m, n if m != "dense" else None, mm if m != "dense" else None)
                              for _, m, n, mm, _ in ARMS))
    rng = np.random.default_rng(0)
    tok = rng.integers(0, 256, (16, 257)).astype(np.int32)
    batch = {"tokens": tok, "segment_ids": np.ones_like(tok),
             "positions": np.tile(np.arange(257, dtype=np.int32), (16, 1))}
    trainers = {}
    for k in keys:
        sc = None if k[0] == "dense" else SparsityConfig(n=k[1], m=k[2], method=k[0])
        tr = Trainer(cfg, TrainConfig(steps=1000, seq_len=256, global_batch=16, warmup_steps=10, sparsity=sc))
        for _ in range(2):
            jax.block_until_ready(tr.train_step(batch)["loss"])
        trainers[k] = tr
    times = {k: [] for k in keys}
    for r in range(rounds):
        for k in (keys if r % 2 == 0 else keys[::-1]):
            for _ in range(steps):
                t = time.perf_counter()
                jax.block_until_ready(trainers[k].train_step(batch)["loss"])
                times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def report(args, rows, summary, probe) -> None:
    env = environment()
    isa = cpu_isa()
    dense_ms = statistics.mean(r["step_ms"] for r in rows if r["method"] == "dense") if any(
        r["method"] == "dense" for r in rows) else None
    for r in rows:
        r["measured_speedup"] = dense_ms / r["step_ms"] if dense_ms else None
    cols = ["arm", "val_bits_per_byte", "rel_to_dense", "loaded_val_bits_per_byte", "implied_speedup",
            "step_ms", "measured_speedup", "mean_mask_flip_rate"]
    probe_md = ""
    if probe:
        base = probe[("dense", None, None)]
        for r in rows:
            k = (r["method"], r["n"], r["m"])
            r["probe_step_ms"] = probe[k]
            r["probe_speedup"] = base / probe[k]
        cols += ["probe_step_ms", "probe_speedup"]
        probe_md = (f" `probe_step_ms`/`probe_speedup`: every method's step timed side by side in one process "
                    f"after the runs ({args.probe_steps} steps x 2 rounds, order reversed per round, median), the "
                    "fair comparison of step time; `step_ms` is each long run's own median, which other work on "
                    "this shared machine inflated for some arms.")
    md = (f"# N:M sparse training: BDWP vs SR-STE vs transposable vs dense (tiny preset, {args.steps} steps)\n\n"
          f"Each arm trains `tiny` (8 experts top-2) for {args.steps} steps of 16 x 256 tokens on the stdlib corpus "
          f"on this machine ({env['cpu_count']} CPUs, {isa}, jax {env['jax']}). Sparse: attention q/k/v/o, MLPs and "
          "experts; router and embeddings dense. `implied_speedup`: MAC accounting with N:M GEMMs at n/m of their "
          "dense time (BDWP and transposable save in the forward and activation-gradient GEMMs, SR-STE in the "
          "forward only; weight gradients dense) -- modelled, not measured. `step_ms`/`measured_speedup`: this "
          "CPU, which runs the masked weights densely (no gain expected; the masks cost extra work)."
          + probe_md + "\n\n"
          + markdown_table(rows, cols, floatfmt="{:.4g}")
          + "\n" + "\n".join(f"- {k}: {v:.4g}" if isinstance(v, float) else f"- {k}: {v}"
                              for k, v in summary.items()) + "\n")
    print(md)
    payload = {"environment": env, "isa": isa, "steps": args.steps, "summary": summary,
               "probe_steps": args.probe_steps if probe else None,
               "rows": [{k: v for k, v in r.items()} for r in rows]}
    paths = write_results(args.out, payload, md)
    png = os.path.join(RESULTS, args.out + ".png")
    plot(rows, summary, png)
    print("wrote", *paths, png)


def probe_only(args) -> None:
    """``--probe``: add the side-by-side step-time probe to an existing results file and rewrite it."""
    from moejax.config import get_preset

    path = os.path.join(RESULTS, args.out + ".json")
    with open(path) as f:
        saved = json.load(f)
    args.steps = saved["steps"]
    probe = timing_probe(get_preset("tiny"), args.probe_steps)
    report(args, saved["rows"], saved["summary"], probe)


if __name__ == "__main__":
    main()
