"""Speed and outputs before and after the one-forward redesign (issue 18): an old revision against HEAD.

Both revisions are checked out in temporary git worktrees (so neither run writes into this checkout's results),
then, in ``--rounds`` rounds, each benchmark runs in both trees back to back, the order flipping from benchmark
to benchmark and from round to round (ABBA: a drift of the shared machine's speed during a round favours
neither tree):

- ``experiments/serve_throughput.py --repeats 1``: offline engine tok/s (multi-step and single-step), HTTP
  server tok/s, single-stream tokens/s, and the static ``generate`` beside them;
- ``experiments/generate_bench.py --repeats 3``: decode steps/s and tokens/s at batch 1 and 16;
- ``experiments/moe_layer_bench.py --repeats 3 --paths dropless,capacity-1.0,capacity-1.25``: MoE layer forward
  and forward+backward GFLOP/s (``ragged_dot`` left out: on CPU it is a dense masked product nobody runs);
- train_bench's throughput loop (tokens/s of the tiny preset's train step on 1 device, ``expert=8`` and
  ``data=2,expert=4``; its 150-step quality runs left out: they measure the loss, not speed);
- offloaded serving: the tiny preset's experts in a store, half of them in memory, one stream and a batch of
  four, tokens/s.

Every metric is a speed (higher is better); the table gives the median, min and max over rounds of new/old.
Before the rounds, a parity probe runs in both trees on serve_throughput's prompts: engine tokens, logits and
logprobs (multi-step, single-step, chunked with a small budget, layered, sampled), ``generate`` and offloaded
serving, compared for equality. Writes ``experiments/results/one_forward_old_new.{json,md}``.

    python experiments/one_forward_old_new.py [--old-rev 726b6ec] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments.common import cpu_isa, markdown_table, write_results

HERE = os.path.dirname(os.path.abspath(__file__))
PROBES = os.path.join(HERE, "old_new_probes")


def worktree(rev: str, base: str) -> str:
    """A detached worktree of ``rev`` under ``base``."""
    path = os.path.join(base, rev.replace("/", "_"))
    subprocess.run(["git", "worktree", "add", "--detach", path, rev], check=True, capture_output=True)
    return path


def run(tree: str, argv: list[str], log) -> str:
    """Run ``python argv`` in ``tree`` (its own code first on the path); returns stdout."""
    env = {**os.environ, "PYTHONPATH": tree}
    env.pop("XLA_FLAGS", None)
    t = time.perf_counter()
    p = subprocess.run([sys.executable, *argv], cwd=tree, env=env, capture_output=True, text=True, check=False)
    log.write(f"\n### {tree}: {' '.join(argv)} ({time.perf_counter() - t:.0f} s, rc {p.returncode})\n"
              + p.stdout[-4000:] + p.stderr[-4000:])
    log.flush()
    if p.returncode:
        raise RuntimeError(f"{argv} failed in {tree}:\n{p.stderr[-3000:]}")
    return p.stdout


def results(tree: str, name: str) -> dict:
    with open(os.path.join(tree, "experiments", "results", name + ".json")) as f:
        return json.load(f)


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def bench_serve(tree: str, log) -> dict[str, float]:
    m = {}
    run(tree, ["experiments/serve_throughput.py", "--repeats", "1"], log)
    s = results(tree, "serve_throughput")
    a, sec = s["args"], s["seconds"]
    toks = a["batch"] * a["new_tokens"]
    m["serve: offline engine tok/s (decode_steps=4)"] = toks / sec["engine_s"]
    m["serve: offline engine tok/s (decode_steps=1)"] = toks / sec["engine_1step_s"]
    m["serve: HTTP server tok/s"] = toks / sec["server_s"]
    m["serve: single stream tokens/s"] = 1 / sec["single_tpot_s"]
    m["serve: static generate tok/s"] = toks / sec["static_s"]
    return m


def bench_generate(tree: str, log) -> dict[str, float]:
    m = {}
    run(tree, ["experiments/generate_bench.py", "--repeats", "3"], log)
    for r in results(tree, "generate_bench")["records"]:
        m[f"generate: batch {r['batch']} decode steps/s"] = 1e3 / r["decode_step_ms"]
        m[f"generate: batch {r['batch']} tok/s"] = r["tokens_per_s"]
    return m


def bench_moe_layer(tree: str, log) -> dict[str, float]:
    m = {}
    run(tree, ["experiments/moe_layer_bench.py", "--repeats", "3", "--paths", "dropless,capacity-1.0,capacity-1.25"],
        log)
    for r in results(tree, "moe_layer_bench")["records"]:
        m[f"moe layer {r['config']} {r['path']}: fwd GFLOP/s"] = r["fwd_gflops"]
        m[f"moe layer {r['config']} {r['path']}: fwd+bwd GFLOP/s"] = r["fwd_bwd_gflops"]
    return m


def bench_train(tree: str, log) -> dict[str, float]:
    return {f"train: {mesh} tokens/s": tps
            for mesh, tps in last_json(run(tree, [os.path.join(PROBES, "train_throughput.py")], log)).items()}


def bench_offload(tree: str, log) -> dict[str, float]:
    return {f"offloaded serving: {k}": v
            for k, v in last_json(run(tree, [os.path.join(PROBES, "offload_throughput.py")], log)).items()}


BENCHES = (bench_serve, bench_generate, bench_moe_layer, bench_train, bench_offload)


def measure_round(trees: dict[str, str], i: int, log) -> dict[str, dict[str, float]]:
    """One round: each benchmark in both trees back to back, the order flipping from benchmark to benchmark and
    from round to round (ABBA), so a slow drift of the shared machine's speed does not favour one tree."""
    out = {"old": {}, "new": {}}
    for j, bench in enumerate(BENCHES):
        order = ("old", "new") if (i + j) % 2 == 0 else ("new", "old")
        for name in order:
            out[name].update(bench(trees[name], log))
    return out


def parity(trees: dict[str, str], tmp: str, log) -> dict:
    """The parity probe in both trees; per output, whether old and new are identical (and the largest gap)."""
    import numpy as np

    paths = {}
    for name, tree in trees.items():
        paths[name] = os.path.join(tmp, f"parity_{name}.npz")
        run(tree, [os.path.join(PROBES, "parity.py"), paths[name]], log)
    a, b = np.load(paths["old"]), np.load(paths["new"])
    out = {}
    for k in sorted(set(a) | set(b)):
        same = k in a and k in b and a[k].shape == b[k].shape and bool(np.array_equal(a[k], b[k]))
        gap = float(np.abs(a[k].astype(np.float64) - b[k].astype(np.float64)).max()) if same or (
            k in a and k in b and a[k].shape == b[k].shape) else None
        out[k] = {"identical": same, "max_abs_diff": gap, "shape": list(a[k].shape) if k in a else None}
    return out


def summarize(rounds: list[dict]) -> list[dict]:
    rows = []
    for metric in rounds[0]["old"]:
        ratios = [r["new"][metric] / r["old"][metric] for r in rounds]
        rows.append({"metric": metric, "old (median)": statistics.median(r["old"][metric] for r in rounds),
                     "new (median)": statistics.median(r["new"][metric] for r in rounds),
                     "new/old median": statistics.median(ratios), "min": min(ratios), "max": max(ratios),
                     ">= 0.97": statistics.median(ratios) >= 0.97})
    return rows


def report(args, rows, par, rounds, cpu) -> None:
    ok = sum(r[">= 0.97"] for r in rows)
    same = all(v["identical"] for v in par.values())
    md = (f"# One forward: speed and outputs, {args.old_rev} against the new main\n\n"
          f"Measured on this machine ({cpu}), {args.rounds} rounds, each benchmark run in both trees back to back, "
          "the order flipping per benchmark and per round; every metric is a speed (higher is better), the ratio "
          "is new/old per round.\n\n"
          f"**{ok} of {len(rows)} metrics have a median ratio >= 0.97.**\n\n"
          + markdown_table(rows, ["metric", "old (median)", "new (median)", "new/old median", "min", "max",
                                  ">= 0.97"])
          + f"\n## Outputs (parity probe on serve_throughput's prompts)\n\nAll identical: **{same}**.\n\n"
          + markdown_table([{"output": k, **v} for k, v in par.items()],
                           ["output", "shape", "identical", "max_abs_diff"]))
    print(md)
    print("wrote", *write_results("one_forward_old_new", {"args": vars(args), "cpu": cpu, "rows": rows,
                                                          "parity": par, "rounds": rounds}, md))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old-rev", default="726b6ec")
    ap.add_argument("--new-rev", default="HEAD")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="old_new_") as tmp, open(os.path.join(HERE, "results",
                                                                                    "one_forward_old_new.log"),
                                                                       "w") as log:
        trees = {"old": worktree(args.old_rev, tmp), "new": worktree(args.new_rev, tmp)}
        try:
            par = parity(trees, tmp, log)
            print("parity:", {k: v["identical"] for k, v in par.items()}, flush=True)
            rounds = []
            for i in range(args.rounds):
                rounds.append(measure_round(trees, i, log))
                print(f"round {i + 1}: " + ", ".join(f"{k[:40]} {rounds[-1]['new'][k] / rounds[-1]['old'][k]:.3f}"
                                                     for k in rounds[-1]["old"]), flush=True)
        finally:
            for t in trees.values():
                subprocess.run(["git", "worktree", "remove", "--force", t], capture_output=True, check=False)
    report(args, summarize(rounds), par, rounds, cpu_isa())


if __name__ == "__main__":
    main()
