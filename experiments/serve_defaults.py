"""`moejax serve` with default flags against hand-tuned flags, as a user starts it (issue 19, item 11).

Each configuration starts `python -m moejax.cli serve --preset tiny` as its own process and is measured from
outside with an HTTP client (httpx; the server is a black box): seconds until ``/health`` answers, seconds until
its background warm-up (if any) is done, then bursts of ``--batch`` concurrent ``/v1/completions`` requests of
``--prompt-len`` token ids and ``--new-tokens`` new tokens (greedy, ``ignore_eos``): the first burst (which may
compile) and the median of ``--repeats`` more, in generated tokens per second. Configurations:

- ``defaults``: no flags;
- ``tuned``: ``--warmup blocking --decode-steps 4 --max-num-batched-tokens 2064`` (what the review measured
  as the tuned server);
- ``old defaults``: the defaults before this change, ``--warmup none --decode-steps 1
  --max-num-batched-tokens 512``.

The order of the configurations alternates between ``--rounds``. Target: defaults >= 0.95x tuned tokens/s in the
same run, ``/health`` within 60 s. Writes ``experiments/results/serve_defaults.{json,md}``.

    python experiments/serve_defaults.py [--rounds 3] [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments.common import cpu_isa, environment, markdown_table, write_results
from experiments.serve_throughput import http_batch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {
    "defaults": [],
    "tuned": ["--warmup", "blocking", "--decode-steps", "4", "--max-num-batched-tokens", "2064"],
    "old defaults": ["--warmup", "none", "--decode-steps", "1", "--max-num-batched-tokens", "512"],
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def health(url: str):
    import httpx

    try:
        r = httpx.get(url + "/health", timeout=2)
        return r.json() if r.status_code == 200 else None
    except httpx.HTTPError:
        return None


def wait_until(pred, timeout: float, what: str) -> float:
    t = time.perf_counter()
    while not pred():
        if time.perf_counter() - t > timeout:
            raise TimeoutError(f"{what} not reached in {timeout:.0f} s")
        time.sleep(0.1)
    return time.perf_counter() - t


def measure(name: str, flags: list[str], prompts, args, log) -> dict:
    """Start the server with ``flags``, time it, stop it."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "moejax.cli", "serve", "--preset", "tiny", "--port", str(port), *flags]
    log.write(f"\n### {name}: {' '.join(cmd)}\n")
    log.flush()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONPATH": REPO})
    try:
        wait_until(lambda: health(url) is not None or proc.poll() is not None, 600, "/health")
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode} (see the log)")
        health_s = time.perf_counter() - t0
        warm_s = health_s + wait_until(lambda: (health(url) or {}).get("warmup", {}).get("state") != "running",
                                       1200, "warm-up done")
        n, dt = asyncio.run(http_batch(url, prompts, args.new_tokens))
        first = n / dt
        rates = []
        for _ in range(args.repeats):
            n, dt = asyncio.run(http_batch(url, prompts, args.new_tokens))
            rates.append(n / dt)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    rec = {"config": name, "flags": " ".join(flags) or "(none)", "health_s": health_s, "warm_s": warm_s,
           "first_burst_tok_s": first, "tok_s": statistics.median(rates), "tok_s_repeats": rates}
    print(rec, flush=True)
    return rec


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    args = ap.parse_args(argv)
    import numpy as np

    prompts = np.random.default_rng(0).integers(0, 256, (args.batch, args.prompt_len)).tolist()
    rounds = []
    with open(os.path.join(REPO, "experiments", "results", "serve_defaults.log"), "w") as log:
        for i in range(args.rounds):
            names = list(CONFIGS) if i % 2 == 0 else list(reversed(CONFIGS))
            rounds.append({n: measure(n, CONFIGS[n], prompts, args, log) for n in names})
    rows = []
    for name in CONFIGS:
        recs = [r[name] for r in rounds]
        rows.append({"config": name, "flags": recs[0]["flags"],
                     "health_s (max)": max(r["health_s"] for r in recs),
                     "warm-up done s (median)": statistics.median(r["warm_s"] for r in recs),
                     "first burst tok/s (median)": statistics.median(r["first_burst_tok_s"] for r in recs),
                     "tok/s (median)": statistics.median(r["tok_s"] for r in recs)})
    ratios = [r["defaults"]["tok_s"] / r["tuned"]["tok_s"] for r in rounds]
    ratio, health_max = statistics.median(ratios), max(r["defaults"]["health_s"] for r in rounds)
    met = ratio >= 0.95 and health_max <= 60
    md = ("# `moejax serve`: default flags against tuned flags (tiny preset, HTTP, measured from outside)\n\n"
          f"{args.batch} concurrent requests x ({args.prompt_len} prompt token ids + {args.new_tokens} new "
          f"tokens), greedy; {args.rounds} rounds, order alternating; tok/s = generated tokens per second of a "
          f"burst, median of {args.repeats} after a first burst.\n\n"
          + markdown_table(rows, list(rows[0]))
          + f"\nDefaults / tuned tok/s per round: {', '.join(f'{x:.3f}' for x in ratios)} (median {ratio:.3f}); "
          f"/health within {health_max:.1f} s. Target (>= 0.95x, /health within 60 s): "
          + ("**met**" if met else "**not met**") + ".\n")
    env = environment()
    md += f"\nEnvironment: jax {env['jax']}, {env['cpu_count']} CPUs, {cpu_isa()}.\n"
    print(md)
    print("wrote", *write_results("serve_defaults", {"environment": env, "isa": cpu_isa(), "args": vars(args),
                                                     "rounds": rounds, "rows": rows, "ratios": ratios,
                                                     "target_met": met}, md))


if __name__ == "__main__":
    main()
