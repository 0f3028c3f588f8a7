"""Serving throughput of the tiny Mixtral preset: engine (offline), HTTP server, single stream, roofline.

Workload (issue 5): 16 concurrent requests of 128-token prompts + 64 new tokens, greedy, float32 random
weights of preset ``tiny``; and one request alone (ms per output token). Side by side in the same run:

* ``engine``: ``Engine.generate`` (continuous batching over the paged KV cache, chunked prefill), with
  ``--decode-steps`` (default 4) decode iterations per compiled call once every prompt is in, and the same
  engine with single steps (``decode_steps=1``) as the baseline;
* ``server``: the same engine behind ``moejax serve``'s FastAPI app on loopback (uvicorn in this process),
  16 concurrent non-streaming ``/v1/completions`` clients (httpx, token-id prompts, ``ignore_eos``);
* ``generate``: the core's static-batch ``generate`` (prefill + a ``while_loop`` decode in one program);
* the roofline bound of one decode step, max(weight + KV bytes / bandwidth, FLOPs / matmul rate), with
  bandwidth and matmul rate measured here as in ``generate_bench.py``.

Throughput is generated tokens / wall time of the whole batch (prefill included), median of ``--repeats``
after a warm-up run that compiles every shape bucket.

    python experiments/serve_throughput.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments.common import environment, markdown_table, write_results
from experiments.generate_bench import decode_weight_bytes, measure_machine


async def http_batch(url, prompts, n_new):
    import httpx

    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=64)) as c:
        async def one(p):
            r = await c.post(url + "/v1/completions", json={"prompt": p, "max_tokens": n_new, "temperature": 0,
                                                            "ignore_eos": True})
            r.raise_for_status()
            return r.json()["usage"]["completion_tokens"]
        t = time.perf_counter()
        toks = await asyncio.gather(*(one(p) for p in prompts))
        return sum(toks), time.perf_counter() - t


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--decode-steps", type=int, default=4,
                    help="EngineConfig.decode_steps of the measured engine (>1: multi-step decoding; an engine "
                         "with 1 is then measured first as the baseline)")
    return ap.parse_args(argv)


def make_engine(model, B, P, N, budget, decode_steps):
    """An engine for ``B`` requests of ``P`` prompt + ``N`` new tokens with a ``budget``-token iteration, every
    step shape compiled ahead of time. Returns ``(engine, shapes compiled, warm-up seconds)``."""
    from moejax.serve.engine import Engine, EngineConfig
    from moejax.serve.scheduler import SchedulerConfig

    ecfg = EngineConfig(max_model_len=P + N + 64, enable_prefix_cache=False, decode_steps=decode_steps,
                        sched=SchedulerConfig(max_num_seqs=B, max_num_batched_tokens=budget,
                                              max_prefill_seqs=B))
    engine = Engine(model, ecfg)
    t = time.perf_counter()
    n = engine.warmup(max_prompt_tokens=P)  # every step shape, compiled ahead of time
    print(f"warmup (decode_steps={decode_steps}): {n} step shapes compiled in {time.perf_counter() - t:.1f} s",
          flush=True)
    return engine, n, time.perf_counter() - t


def median_of(f, repeats):
    f()  # warm-up: compiles every bucket
    return statistics.median(f() for _ in range(repeats))


def offline_s(engine, prompts, sp, n_tokens):
    """Wall seconds of ``Engine.generate`` over the whole batch (``n_tokens`` generated tokens expected)."""
    t = time.perf_counter()
    res = engine.generate(prompts, sp)
    dt = time.perf_counter() - t
    assert sum(len(r.tokens) for r in res) == n_tokens
    return dt


def single_tpot_s(engine, prompts, sp):
    """Seconds per output token of the first prompt served alone (first token excluded)."""
    engine.reset_metrics()
    r = engine.generate(prompts[:1], sp)[0]
    m = r.metrics
    return (m.token_times[-1] - m.first_token) / (len(r.tokens) - 1)


def server_s(engine, cfg, prompts, N, repeats):
    """Median wall seconds of the batch as concurrent ``/v1/completions`` clients of the engine's server."""
    from moejax.serve.server import create_app, serve_in_background
    from moejax.serve.tokenizer import ByteTokenizer

    app = create_app(engine, ByteTokenizer(cfg.vocab_size), model_name="tiny")
    with serve_in_background(app) as url:
        def http():
            n, dt = asyncio.run(http_batch(url, prompts, N))
            assert n == len(prompts) * N, n
            return dt
        return median_of(http, repeats)


def static_s(model, prompts, N):
    from moejax.models.generate import generate

    t = time.perf_counter()
    generate(model, prompts, N)
    return time.perf_counter() - t


def static_single_step_s(model, prompts, N):
    """Seconds per decode step of the core's ``generate`` for one prompt (a 1-token run subtracted)."""
    from moejax.models.generate import generate

    t1 = time.perf_counter()
    generate(model, prompts[:1], 1)
    t1 = time.perf_counter() - t1
    t = time.perf_counter()
    generate(model, prompts[:1], N)
    return (time.perf_counter() - t - t1) / (N - 1)


def measure(args, model, cfg, prompts, sp, budget):
    """Every timed path, in order: the decode_steps=1 baseline engine (if ``--decode-steps`` > 1), the measured
    engine offline, behind the HTTP server and alone, then the core's static ``generate``. Returns ``(seconds,
    engine, shapes compiled at warm-up, warm-up seconds)``."""
    import jax

    B, P, N, k = args.batch, args.prompt_len, args.new_tokens, args.decode_steps
    res = {}
    if k > 1:  # the single-step engine first, as the baseline
        engine, _, _ = make_engine(model, B, P, N, budget, 1)
        res["engine_1step_s"] = median_of(functools.partial(offline_s, engine, prompts, sp, B * N), args.repeats)
        res["single_1step_tpot_s"] = median_of(functools.partial(single_tpot_s, engine, prompts, sp), args.repeats)
        print(f"engine offline, decode_steps=1: {B * N / res['engine_1step_s']:.0f} tok/s", flush=True)
        del engine
        jax.clear_caches()  # its compiled steps' JIT code (see Engine.warmup on memory maps)
    engine, n_shapes, warmup_s = make_engine(model, B, P, N, budget, k)
    res.update({"warmup_s": warmup_s, "warmup_shapes": n_shapes})
    res["engine_s"] = median_of(functools.partial(offline_s, engine, prompts, sp, B * N), args.repeats)
    print(f"engine offline: {B * N / res['engine_s']:.0f} tok/s", flush=True)
    res["server_s"] = server_s(engine, cfg, prompts, N, args.repeats)
    print(f"server: {B * N / res['server_s']:.0f} tok/s", flush=True)
    res["single_tpot_s"] = median_of(functools.partial(single_tpot_s, engine, prompts, sp), args.repeats)
    res["static_s"] = median_of(functools.partial(static_s, model, prompts, N), args.repeats)
    res["static_single_step_s"] = median_of(functools.partial(static_single_step_s, model, prompts, N),
                                            args.repeats)
    return res, engine, n_shapes, warmup_s


def roofline_bound(model, cfg, P, N, bw, rate):
    """Seconds of one decode step at batch ``b``: max(weight + KV bytes / ``bw``, FLOPs / ``rate``)."""
    from moejax.models.transformer import active_params

    act = active_params(cfg)["active"] - cfg.vocab_size * cfg.d_model

    def bound(b):
        flops = 2 * b * act + 4 * b * cfg.n_layers * cfg.n_heads * cfg.resolved_head_dim * (P + N)
        kv = 2 * cfg.n_layers * b * (P + N) * cfg.n_kv_heads * cfg.resolved_head_dim * 4
        return max((decode_weight_bytes(model, b) + kv) / bw, flops / rate)

    return bound


def result_rows(res, B, N, k, bound):
    """The batch table, the single-request table and which targets were met."""
    rows = [
        {"path": f"engine (offline, continuous batching, decode_steps={k})", "batch": B,
         "gen tok/s": B * N / res["engine_s"], "target": ">= 3000"},
        {"path": f"HTTP server (16 concurrent clients, decode_steps={k})", "batch": B,
         "gen tok/s": B * N / res["server_s"], "target": ">= 2500"},
        {"path": "static-batch generate (core)", "batch": B, "gen tok/s": B * N / res["static_s"], "target": ""},
        {"path": "roofline decode-only bound", "batch": B, "gen tok/s": B / bound(B), "target": ""},
    ]
    if k > 1:
        rows.insert(1, {"path": "engine (offline, decode_steps=1)", "batch": B,
                        "gen tok/s": B * N / res["engine_1step_s"], "target": ""})
    single_rows = [
        {"path": f"engine, one request, decode_steps={k}", "ms/token": 1e3 * res["single_tpot_s"],
         "target": "<= 2.5"},
        *([{"path": "engine, one request, decode_steps=1", "ms/token": 1e3 * res["single_1step_tpot_s"],
            "target": ""}] if k > 1 else []),
        {"path": "static generate, one request", "ms/token": 1e3 * res["static_single_step_s"], "target": ""},
        {"path": "roofline bound", "ms/token": 1e3 * bound(1), "target": ""},
    ]
    met = {"offline": B * N / res["engine_s"] >= 3000, "server": B * N / res["server_s"] >= 2500,
           "single": 1e3 * res["single_tpot_s"] <= 2.5}
    return rows, single_rows, met


def write_report(args, res, rows, single_rows, met, *, budget, n_shapes, warmup_s, n_compiled, bw, rate, bw0, bw1):
    """Print the markdown and write ``results/serve_throughput.{json,md}``; ``n_compiled``: the step shapes
    the engine holds at the end (warm-up and serving)."""
    B, P, N, k = args.batch, args.prompt_len, args.new_tokens, args.decode_steps
    env = environment()
    md = ("# Serving throughput: tiny Mixtral preset (float32, random weights)\n\n"
          f"{B} requests x ({P}-token prompt + {N} new tokens), greedy; measured on this machine "
          f"({env['cpu_count']} CPUs, backend {env['backend']}); bandwidth {bw / 1e9:.1f} GB/s, matmul "
          f"{rate / 1e9:.1f} GFLOP/s measured in the same run (the higher of the readings at its start, "
          f"{bw0 / 1e9:.1f} GB/s, and end, {bw1 / 1e9:.1f} GB/s; the roofline counts the experts a step is "
          "expected to touch: all 8 at batch 16, 2 at batch 1). "
          f"Chunked prefill with a {budget}-token budget (every prompt in one iteration). "
          f"Median of {args.repeats} after a warm-up. "
          f"The engine compiled its {n_shapes} step shapes ahead of time ({warmup_s:.0f} s; "
          f"{n_compiled - n_shapes} more were compiled while serving). "
          + (f"decode_steps={k}: multi-step decoding (k decode iterations per compiled call once every prompt "
             "is in; streams get tokens in groups of k); the decode_steps=1 engine is measured in the same run "
             "as the baseline. " if k > 1 else "") + "\n\n"
          + markdown_table(rows, list(rows[0])) + "\n" + markdown_table(single_rows, list(single_rows[0]))
          + f"\nTargets met: {met}.\n")
    payload = {"environment": env, "args": vars(args), "seconds": res, "rows": rows, "single": single_rows,
               "bandwidth_bytes_per_s": bw, "matmul_flops_per_s": rate, "bandwidth_start_end": [bw0, bw1],
               "targets_met": met}
    print(md)
    print("wrote", *write_results("serve_throughput", payload, md))


def main(argv=None):
    args = parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from moejax.config import get_preset
    from moejax.models.transformer import Transformer
    from moejax.serve.engine import SamplingParams

    cfg = get_preset("tiny")
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    B, P, N = args.batch, args.prompt_len, args.new_tokens
    rng = np.random.default_rng(0)
    prompts = rng.integers(0, 256, (B, P)).tolist()
    sp = SamplingParams(max_tokens=N, temperature=0)
    bw0, rate0 = measure_machine(jax, jnp, 5, model)  # again at the end (this machine's bandwidth moves between runs)
    # token budget: every prompt (plus the decode rows) fits one iteration, as suits a throughput run where all
    # requests arrive at once (a half-size budget splits the batch's prefill over three iterations)
    budget = B * (P + 1)
    res, engine, n_shapes, warmup_s = measure(args, model, cfg, prompts, sp, budget)
    bw1, rate1 = measure_machine(jax, jnp, 5, model)
    bw, rate = max(bw0, bw1), max(rate0, rate1)  # the higher readings: the tighter bound
    rows, single_rows, met = result_rows(res, B, N, args.decode_steps, roofline_bound(model, cfg, P, N, bw, rate))
    write_report(args, res, rows, single_rows, met, budget=budget, n_shapes=n_shapes, warmup_s=warmup_s,
                 n_compiled=len(engine.runner.compiled_shapes), bw=bw, rate=rate, bw0=bw0, bw1=bw1)


if __name__ == "__main__":
    main()
