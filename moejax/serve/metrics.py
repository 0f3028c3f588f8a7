"""Serving metrics: per-request latencies, per-iteration work and expert-weight traffic, Prometheus export.

Definitions (as in vLLM's and JetStream's benchmark scripts):

* **TTFT**: arrival -> first output token. **TPOT**: (last token - first token) / (output tokens - 1).
* **ITL**: the gaps between consecutive output tokens of a request. **E2E**: arrival -> last token.
* **Throughput**: output tokens (and prompt + output tokens) per second of wall time over the run.
* **Goodput**: requests per second that met every SLO given (TTFT, TPOT, E2E, each optional).
* **Expert-weight bytes per iteration**: each distinct expert an iteration routes at least one token to
  counts once per layer per iteration (the bytes a grouped GEMM streams from memory), times the expert's
  weight bytes (gate, up and down projections).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np


@dataclass
class RequestMetrics:
    arrival: float
    prompt_tokens: int
    cached_tokens: int = 0
    first_token: float | None = None
    token_times: list[float] = field(default_factory=list)
    finish: float | None = None
    preemptions: int = 0

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.arrival

    @property
    def tpot(self) -> float | None:
        n = len(self.token_times)
        return None if n < 2 else (self.token_times[-1] - self.token_times[0]) / (n - 1)

    @property
    def itl(self) -> list[float]:
        return list(np.diff(self.token_times)) if len(self.token_times) > 1 else []

    @property
    def e2e(self) -> float | None:
        return None if not self.token_times else self.token_times[-1] - self.arrival


@dataclass
class IterationStats:
    start: float
    end: float
    decode_tokens: int
    prefill_tokens: int
    group: tuple[int, int]
    experts_touched: list[int]      # per layer
    expert_bytes: int
    preempted: int = 0
    decode_context: int = 0         # cached tokens the decode rows attend over (summed over rows)
    prefill_context: int = 0        # cached + new tokens the prefill rows attend over
    prefill_pairs: int = 0          # causal (query, key) pairs of the prefill rows
    dropped: int = 0                # (token, slot) rows the MoE dispatch dropped (capacity), all layers
    spec_rows: int = 0              # speculative step: decode rows that verified drafts
    spec_draft_tokens: int = 0      # drafts verified
    spec_accepted_tokens: int = 0   # drafts accepted


def _pct(xs, q):
    return float(np.percentile(xs, q)) if len(xs) else math.nan


def _mean(xs):
    return float(np.mean(xs)) if len(xs) else math.nan


def summarize(requests: list[RequestMetrics], iterations: list[IterationStats], *, slo_ttft: float | None = None,
              slo_tpot: float | None = None, slo_e2e: float | None = None) -> dict:
    """Aggregate metrics over finished requests and iterations (times in seconds, sizes in bytes)."""
    done = [r for r in requests if r.token_times]
    out_tok = sum(len(r.token_times) for r in done)
    in_tok = sum(r.prompt_tokens for r in done)
    t0 = min((r.arrival for r in done), default=0.0)
    t1 = max((r.token_times[-1] for r in done), default=0.0)
    wall = max(t1 - t0, 1e-9)
    ttft = [r.ttft for r in done]
    tpot = [r.tpot for r in done if r.tpot is not None]
    e2e = [r.e2e for r in done]
    itl = [x for r in done for x in r.itl]

    def ok(r):
        return ((slo_ttft is None or r.ttft <= slo_ttft) and (slo_tpot is None or r.tpot is None or r.tpot <= slo_tpot)
                and (slo_e2e is None or r.e2e <= slo_e2e))

    ebytes = sum(i.expert_bytes for i in iterations)
    pf_tok = sum(i.prefill_tokens for i in iterations)
    dec_tok = sum(i.decode_tokens for i in iterations)
    res = {
        "requests": len(done), "output_tokens": out_tok, "prompt_tokens": in_tok, "wall_s": wall,
        "output_tok_per_s": out_tok / wall, "total_tok_per_s": (out_tok + in_tok) / wall,
        "request_per_s": len(done) / wall,
        "goodput_req_per_s": sum(ok(r) for r in done) / wall,
        "slo": {"ttft_s": slo_ttft, "tpot_s": slo_tpot, "e2e_s": slo_e2e},
        "iterations": len(iterations), "preemptions": sum(r.preemptions for r in done),
        "cached_prompt_tokens": sum(r.cached_tokens for r in done),
        "expert_bytes_total": ebytes,
        "expert_bytes_per_iteration": ebytes / max(len(iterations), 1),
        "expert_bytes_per_output_token": ebytes / max(out_tok, 1),
        "expert_bytes_per_prompt_token": ebytes / max(in_tok, 1),
        "prefill_tokens_run": pf_tok, "decode_tokens_run": dec_tok,
        "dropped_rows_total": sum(i.dropped for i in iterations),
    }
    rows = sum(i.spec_rows for i in iterations)
    if rows:  # speculative decoding: acceptance (vLLM's spec-decode metrics)
        drafts = sum(i.spec_draft_tokens for i in iterations)
        acc = sum(i.spec_accepted_tokens for i in iterations)
        res.update(spec_steps=sum(1 for i in iterations if i.spec_rows), spec_draft_tokens=drafts,
                   spec_accepted_tokens=acc, spec_acceptance_rate=acc / max(drafts, 1),
                   spec_mean_accepted_length=1 + acc / rows)
    for name, xs in (("ttft", ttft), ("tpot", tpot), ("itl", itl), ("e2e", e2e)):
        res[f"{name}_mean_s"] = _mean(xs)
        res[f"{name}_p50_s"] = _pct(xs, 50)
        res[f"{name}_p99_s"] = _pct(xs, 99)
    return res


class PrometheusMetrics:
    """The engine's counters and histograms in a private ``prometheus_client`` registry."""

    def __init__(self, model_name: str = "moejax"):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        lat = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
        kw = {"registry": self.registry, "labelnames": ("model",)}
        self.model = model_name
        self.prompt_tokens = Counter("moejax_prompt_tokens", "prompt tokens of finished requests", **kw)
        self.generation_tokens = Counter("moejax_generation_tokens", "generated tokens", **kw)
        self.requests = Counter("moejax_requests", "finished requests by reason", registry=self.registry,
                                labelnames=("model", "finish_reason"))
        self.iterations = Counter("moejax_iterations", "engine iterations", **kw)
        self.expert_bytes = Counter("moejax_expert_weight_bytes", "expert-weight bytes touched", **kw)
        self.preemptions = Counter("moejax_preemptions", "requests preempted (recompute)", **kw)
        self.dropped = Counter("moejax_moe_dropped_rows", "(token, expert) rows the MoE dispatch dropped "
                               "(capacity; 0 when dropless)", **kw)
        self.spec_drafts = Counter("moejax_spec_decode_num_draft_tokens", "draft tokens verified (speculative "
                                   "decoding)", **kw)
        self.spec_accepted = Counter("moejax_spec_decode_num_accepted_tokens", "draft tokens accepted "
                                     "(speculative decoding)", **kw)
        self.running = Gauge("moejax_num_requests_running", "requests decoding", **kw)
        self.waiting = Gauge("moejax_num_requests_waiting", "requests waiting", **kw)
        self.kv_usage = Gauge("moejax_kv_cache_usage", "fraction of KV blocks in use", **kw)
        self.ttft = Histogram("moejax_time_to_first_token_seconds", "TTFT", buckets=lat, **kw)
        self.tpot = Histogram("moejax_time_per_output_token_seconds", "TPOT", buckets=lat, **kw)
        self.e2e = Histogram("moejax_e2e_request_latency_seconds", "end-to-end latency", buckets=lat, **kw)
        self.step = Histogram("moejax_iteration_seconds", "engine iteration time", buckets=lat, **kw)

    def on_iteration(self, it: IterationStats, running: int, waiting: int, kv_usage: float) -> None:
        m = self.model
        self.iterations.labels(m).inc()
        self.expert_bytes.labels(m).inc(it.expert_bytes)
        self.preemptions.labels(m).inc(it.preempted)
        self.dropped.labels(m).inc(it.dropped)
        self.spec_drafts.labels(m).inc(it.spec_draft_tokens)
        self.spec_accepted.labels(m).inc(it.spec_accepted_tokens)
        self.step.labels(m).observe(it.end - it.start)
        self.running.labels(m).set(running)
        self.waiting.labels(m).set(waiting)
        self.kv_usage.labels(m).set(kv_usage)

    def on_finish(self, r: RequestMetrics, reason: str) -> None:
        m = self.model
        self.requests.labels(m, reason).inc()
        self.prompt_tokens.labels(m).inc(r.prompt_tokens)
        self.generation_tokens.labels(m).inc(len(r.token_times))
        if r.ttft is not None:
            self.ttft.labels(m).observe(r.ttft)
        if r.tpot is not None:
            self.tpot.labels(m).observe(r.tpot)
        if r.e2e is not None:
            self.e2e.labels(m).observe(r.e2e)

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


def as_dict(x) -> dict:
    return asdict(x)
