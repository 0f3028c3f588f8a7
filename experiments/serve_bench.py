"""Benchmark client for an OpenAI-compatible server: Poisson arrivals, ShareGPT-like lengths or a trace.

Sends ``/v1/completions`` requests with streaming, measuring on the client side (as vLLM's
``benchmark_serving.py`` does): TTFT (send -> first token chunk), TPOT, inter-token latency, end-to-end
latency, throughput and goodput under SLOs; then reads the server's ``/metrics`` for the expert-weight bytes
counted by the engine. Writes JSON + markdown + a latency plot to ``experiments/results/<name>.*``.

Lengths: ``--dataset synthetic`` draws prompt and output lengths from log-normal fits to ShareGPT's
conversation turns (medians about 250 prompt / 200 output tokens, long tails), clipped to the context;
``--dataset trace.jsonl`` replays lines ``{"timestamp": s, "input_length": n, "output_length": m}``.
Prompts are random byte strings of the given length (the byte tokenizer maps 1 byte -> 1 token).

    # against a running server
    python experiments/serve_bench.py --url http://127.0.0.1:8000 --rate 4 --requests 64
    # or start the tiny preset in-process
    python experiments/serve_bench.py --preset tiny --scheduler layered --rate 4 --requests 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments.common import environment, markdown_table, write_results


def synthetic_lengths(n, rng, max_len):
    """ShareGPT-like: log-normal prompt (median ~250) and output (median ~200) lengths, clipped."""
    import numpy as np

    p = np.clip(rng.lognormal(np.log(250), 0.9, n), 4, max_len // 2).astype(int)
    o = np.clip(rng.lognormal(np.log(200), 0.8, n), 4, max_len // 2).astype(int)
    o = np.minimum(o, max_len - p - 1)
    return list(zip(p.tolist(), o.tolist()))


def load_trace(path):
    rows = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
                rows.append((float(r["timestamp"]), int(r["input_length"]), int(r["output_length"])))
            except (ValueError, KeyError) as e:
                raise SystemExit(f"{path}:{i}: expected {{timestamp, input_length, output_length}}: {e}")
    if not rows:
        raise SystemExit(f"{path}: no requests")
    t0 = min(r[0] for r in rows)
    return [(t - t0, p, o) for t, p, o in sorted(rows)]


async def one_request(client, url, prompt, max_tokens, t_send, rec):
    rec.update({"sent": t_send, "prompt_len": len(prompt), "max_tokens": max_tokens, "token_times": [],
                "status": None})
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True, "ignore_eos": True}
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            rec["status"] = r.status_code
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                rec["token_times"].append(time.perf_counter())
    except Exception as e:  # noqa: BLE001 - a benchmark records every failure kind
        rec["status"] = f"error: {type(e).__name__}"


async def run(url, schedule, rng_seed):
    import httpx
    import numpy as np

    rng = np.random.default_rng(rng_seed)
    recs = [{} for _ in schedule]
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=1024)) as c:
        t0 = time.perf_counter()
        tasks = []
        for (t, p, o), rec in zip(schedule, recs):
            delay = t0 + t - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            prompt = rng.integers(32, 127, p).tolist()  # printable bytes as token ids
            tasks.append(asyncio.create_task(one_request(c, url, prompt, o, time.perf_counter(), rec)))
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - t0
        metrics = (await c.get(url + "/metrics")).text
    return recs, wall, metrics


def summarize(recs, wall, slo_ttft, slo_tpot):
    import numpy as np

    ok = [r for r in recs if r["status"] == 200 and r["token_times"]]
    ttft = [r["token_times"][0] - r["sent"] for r in ok]
    tpot = [(r["token_times"][-1] - r["token_times"][0]) / (len(r["token_times"]) - 1)
            for r in ok if len(r["token_times"]) > 1]
    itl = [b - a for r in ok for a, b in zip(r["token_times"], r["token_times"][1:])]
    e2e = [r["token_times"][-1] - r["sent"] for r in ok]
    chunks = sum(len(r["token_times"]) for r in ok)
    good = sum(1 for r, t in zip(ok, ttft) if t <= slo_ttft and (
        len(r["token_times"]) < 2 or (r["token_times"][-1] - r["token_times"][0]) / (len(r["token_times"]) - 1)
        <= slo_tpot))

    def st(x):
        return {"mean": float(np.mean(x)) if x else None, "p50": float(np.percentile(x, 50)) if x else None,
                "p99": float(np.percentile(x, 99)) if x else None}

    codes = {}
    for r in recs:
        codes[str(r["status"])] = codes.get(str(r["status"]), 0) + 1
    return {"requests": len(recs), "completed": len(ok), "status_codes": codes, "wall_s": wall,
            "output_chunks_per_s": chunks / wall, "request_per_s": len(ok) / wall,
            "goodput_req_per_s": good / wall, "slo": {"ttft_s": slo_ttft, "tpot_s": slo_tpot},
            "ttft_s": st(ttft), "tpot_s": st(tpot), "itl_s": st(itl), "e2e_s": st(e2e)}


def prom_value(text, name):
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="server base URL (default: start --preset in this process)")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--scheduler", choices=("chunked", "layered"), default="chunked")
    ap.add_argument("--dataset", default="synthetic", help="'synthetic' or a JSONL trace")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--rate", type=float, default=4.0, help="Poisson arrivals per second (synthetic)")
    ap.add_argument("--max-len", type=int, default=1024)
    ap.add_argument("--slo-ttft", type=float, default=2.0)
    ap.add_argument("--slo-tpot", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default="serve_bench")
    args = ap.parse_args(argv)

    import numpy as np

    rng = np.random.default_rng(args.seed)
    if args.dataset == "synthetic":
        lens = synthetic_lengths(args.requests, rng, args.max_len)
        t = np.cumsum(rng.exponential(1.0 / args.rate, args.requests))
        schedule = [(float(a - t[0]), p, o) for a, (p, o) in zip(t, lens)]
    else:
        schedule = load_trace(args.dataset)
    if args.url is None:
        from flax import nnx

        from moejax.config import get_preset
        from moejax.models.transformer import Transformer
        from moejax.serve.engine import Engine, EngineConfig
        from moejax.serve.server import create_app, serve_in_background
        from moejax.serve.tokenizer import ByteTokenizer

        cfg = get_preset(args.preset)
        engine = Engine(Transformer(cfg, rngs=nnx.Rngs(0)),
                        EngineConfig(scheduler=args.scheduler, max_model_len=min(args.max_len, cfg.max_seq_len)))
        with serve_in_background(create_app(engine, ByteTokenizer(cfg.vocab_size), model_name=args.preset)) as url:
            recs, wall, prom = asyncio.run(run(url, schedule, args.seed))
    else:
        recs, wall, prom = asyncio.run(run(args.url.rstrip("/"), schedule, args.seed))
    res = summarize(recs, wall, args.slo_ttft, args.slo_tpot)
    res["expert_weight_bytes"] = prom_value(prom, "moejax_expert_weight_bytes_total")
    res["engine_iterations"] = prom_value(prom, "moejax_iterations_total")
    rows = [{"metric": k, "mean": v["mean"], "p50": v["p50"], "p99": v["p99"]}
            for k, v in res.items() if isinstance(v, dict) and "mean" in v]
    md = (f"# serve_bench: {len(schedule)} requests ({args.dataset}), {args.scheduler} scheduler\n\n"
          f"Completed {res['completed']}/{res['requests']} (status codes {res['status_codes']}) in "
          f"{wall:.1f} s: {res['request_per_s']:.2f} req/s, {res['output_chunks_per_s']:.0f} streamed chunks/s, "
          f"goodput {res['goodput_req_per_s']:.2f} req/s under TTFT <= {args.slo_ttft} s and TPOT <= "
          f"{args.slo_tpot} s. Expert-weight bytes (engine): {res['expert_weight_bytes'] / 2 ** 20:.1f} MiB over "
          f"{res['engine_iterations']:.0f} iterations.\n\nLatencies in seconds (client side):\n\n"
          + markdown_table(rows, ["metric", "mean", "p50", "p99"]))
    payload = {"environment": environment(), "args": vars(args), "results": res,
               "requests": [{k: v for k, v in r.items() if k != "token_times"} | {"tokens": len(r["token_times"])}
                            for r in recs]}
    jp, _ = write_results(args.name, payload, md)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        ok = [r for r in recs if r["status"] == 200 and r["token_times"]]
        fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
        ax[0].hist([r["token_times"][0] - r["sent"] for r in ok], bins=30)
        ax[0].set_xlabel("TTFT (s)")
        ax[1].scatter([r["prompt_len"] for r in ok], [r["token_times"][-1] - r["sent"] for r in ok], s=8)
        ax[1].set_xlabel("prompt tokens")
        ax[1].set_ylabel("end-to-end latency (s)")
        fig.tight_layout()
        fig.savefig(os.path.splitext(jp)[0] + ".png", dpi=110)
    except ImportError:
        pass
    print(md)


if __name__ == "__main__":
    main()
