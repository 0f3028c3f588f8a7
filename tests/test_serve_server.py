"""OpenAI-compatible server: completions, chat, streaming, logprobs/echo, bad input, disconnects, load."""

import asyncio
import json
import time

import httpx
import numpy as np
import pytest
from flax import nnx
from starlette.testclient import TestClient

from moejax.config import ModelConfig, MoEConfig, RouterConfig
from moejax.models.generate import generate
from moejax.models.transformer import Transformer
from moejax.serve.engine import Engine, EngineConfig
from moejax.serve.scheduler import SchedulerConfig
from moejax.serve.server import AsyncEngine, create_app, serve_in_background
from moejax.serve.tokenizer import ByteTokenizer


def small_cfg():
    # vocab 300 > 256: byte tokens plus EOS (256), like the models `moejax train` produces
    return ModelConfig(vocab_size=300, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, max_seq_len=128,
                       moe=MoEConfig(num_experts=4, d_ff=24, router=RouterConfig(type="topk", top_k=2))).validate()


@pytest.fixture(scope="module")
def model():
    return Transformer(small_cfg(), rngs=nnx.Rngs(0))


def make_app(model, **kw):
    eng = Engine(model, EngineConfig(block_size=8, sched=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64),
                                     **kw))
    return create_app(eng, ByteTokenizer(model.cfg.vocab_size), model_name="tiny-test"), eng


@pytest.fixture(scope="module")
def client(model):
    app, eng = make_app(model)
    with TestClient(app) as c:
        c.engine = eng
        yield c


def greedy_text(model, prompt: str, n: int) -> tuple[str, list[int]]:
    ids = list(prompt.encode())
    toks = generate(model, [ids], n).tokens[0].tolist()
    if 256 in toks:
        toks = toks[:toks.index(256) + 1]
    return ByteTokenizer(300).decode(toks), toks


def sse_events(lines):
    out = []
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def test_health_models_metrics(client):
    assert client.get("/health").json()["status"] == "ok"
    m = client.get("/v1/models").json()
    assert m["data"][0]["id"] == "tiny-test"
    r = client.get("/metrics")
    assert r.status_code == 200 and "moejax_iterations_total" in r.text


def test_completion_matches_generate_and_streams(client, model):
    want, toks = greedy_text(model, "def f(x):", 12)
    r = client.post("/v1/completions", json={"model": "tiny-test", "prompt": "def f(x):", "max_tokens": 12,
                                              "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["choices"][0]["text"] == want
    assert body["usage"] == {"prompt_tokens": 9, "completion_tokens": len(toks), "total_tokens": 9 + len(toks)}
    # token-id prompt, streamed: the concatenated deltas equal the non-streamed text
    with client.stream("POST", "/v1/completions", json={"prompt": list(b"def f(x):"), "max_tokens": 12,
                                                        "temperature": 0, "stream": True}) as s:
        ev = sse_events(s.iter_lines())
    assert ev[-1] == "[DONE]"
    assert "".join(e["choices"][0]["text"] for e in ev[:-1]) == want
    assert ev[-2]["choices"][0]["finish_reason"] in ("length", "stop")


def test_stop_strings_n_seed_and_chat(client, model):
    want, _ = greedy_text(model, "abc", 16)
    stop = want[3:5]
    if stop:
        r = client.post("/v1/completions", json={"prompt": "abc", "max_tokens": 16, "temperature": 0,
                                                  "stop": [stop]}).json()
        assert r["choices"][0]["text"] == want[:want.index(stop)]
        assert r["choices"][0]["finish_reason"] == "stop"
    body = {"prompt": "xyz", "max_tokens": 8, "temperature": 1.0, "seed": 7, "n": 3}
    a = client.post("/v1/completions", json=body).json()
    b = client.post("/v1/completions", json=body).json()
    assert [c["text"] for c in a["choices"]] == [c["text"] for c in b["choices"]]
    assert [c["index"] for c in a["choices"]] == [0, 1, 2]
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    c = client.post("/v1/chat/completions", json={"messages": msgs, "max_tokens": 6, "temperature": 0}).json()
    want_chat, _ = greedy_text(model, "system: be brief\nuser: hi\nassistant: ", 6)
    assert c["choices"][0]["message"] == {"role": "assistant", "content": want_chat}
    with client.stream("POST", "/v1/chat/completions", json={"messages": msgs, "max_tokens": 6, "temperature": 0,
                                                             "stream": True, "logprobs": True,
                                                             "top_logprobs": 2}) as s:
        ev = sse_events(s.iter_lines())
    assert ev[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in ev[:-1]) == want_chat
    lps = [x for e in ev[:-1] if e["choices"][0]["logprobs"] for x in e["choices"][0]["logprobs"]["content"]]
    assert len(lps) >= 1 and all(len(x["top_logprobs"]) == 2 for x in lps)


def test_return_token_ids_completions(client, model):
    """vLLM's return_token_ids on /v1/completions: each choice's generated ids (the engine's greedy tokens, EOS
    included) and its prompt's ids, whole and streamed (new ids per event, the prompt's in a choice's first
    event); with echo the generated ids only; with a stop string the ids up to the one that completed it; absent
    without the flag."""
    prompt = "def f(x):"
    want, toks = greedy_text(model, prompt, 12)
    body = {"prompt": prompt, "max_tokens": 12, "temperature": 0}
    ch = client.post("/v1/completions", json={**body, "return_token_ids": True}).json()["choices"][0]
    assert ch["token_ids"] == toks and ch["prompt_token_ids"] == list(prompt.encode())
    assert ch["text"] == want == ByteTokenizer(300).decode(ch["token_ids"])
    for flag in ({}, {"return_token_ids": False}, {"return_token_ids": None}):
        ch = client.post("/v1/completions", json={**body, **flag}).json()["choices"][0]
        assert "token_ids" not in ch and "prompt_token_ids" not in ch
    # streamed, a token-id prompt: the events' ids concatenate to the same; the prompt's ids come once
    with client.stream("POST", "/v1/completions", json={**body, "prompt": list(prompt.encode()), "stream": True,
                                                        "return_token_ids": True}) as s:
        ev = sse_events(s.iter_lines())[:-1]
    assert all("token_ids" in e["choices"][0] for e in ev)
    assert [t for e in ev for t in e["choices"][0]["token_ids"]] == toks
    assert ev[0]["choices"][0]["prompt_token_ids"] == list(prompt.encode())
    assert not any("prompt_token_ids" in e["choices"][0] for e in ev[1:])
    assert "".join(e["choices"][0]["text"] for e in ev) == want
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as s:
        ev = sse_events(s.iter_lines())[:-1]
    assert not any({"token_ids", "prompt_token_ids"} & set(e["choices"][0]) for e in ev)
    # echo: the text starts with the prompt, the ids are the generated ones only
    ch = client.post("/v1/completions", json={**body, "echo": True, "return_token_ids": True}).json()["choices"][0]
    assert ch["text"] == prompt + want and ch["token_ids"] == toks
    with client.stream("POST", "/v1/completions", json={**body, "echo": True, "stream": True,
                                                        "return_token_ids": True}) as s:
        ev = sse_events(s.iter_lines())[:-1]
    assert [t for e in ev for t in e["choices"][0]["token_ids"]] == toks
    # a batch of prompts, n=2: each choice's prompt ids are its own prompt's
    r = client.post("/v1/completions", json={"prompt": [list(prompt.encode()), [1, 2, 3]], "n": 2, "max_tokens": 1,
                                              "return_token_ids": True}).json()
    assert [c["prompt_token_ids"] for c in r["choices"]] == [list(prompt.encode())] * 2 + [[1, 2, 3]] * 2
    assert [len(c["token_ids"]) for c in r["choices"]] == [1] * 4
    # a stop string: the ids up to (and including) the one whose text completed it
    visible = [t for t in toks if t != 256]
    stop = next((ch for i, ch in enumerate(want) if i >= 2 and ch not in want[:i]), None)
    if stop is not None:
        k = next(k for k in range(1, len(visible) + 1) if stop in ByteTokenizer(300).decode(visible[:k]))
        for stream in (False, True):
            req = {**body, "stop": [stop], "return_token_ids": True, "stream": stream}
            if stream:
                with client.stream("POST", "/v1/completions", json=req) as s:
                    got = [t for e in sse_events(s.iter_lines())[:-1] for t in e["choices"][0]["token_ids"]]
            else:
                got = client.post("/v1/completions", json=req).json()["choices"][0]["token_ids"]
            assert got == visible[:k], (stream, stop)


def test_return_token_ids_chat(client, model):
    """return_token_ids on /v1/chat/completions: each choice's generated ids, the prompt's ids at the top level
    (the templated prompt), streamed too (in each choice's first event); absent without the flag."""
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    prompt = "system: be brief\nuser: hi\nassistant: "
    want, toks = greedy_text(model, prompt, 6)
    body = {"messages": msgs, "max_tokens": 6, "temperature": 0}
    r = client.post("/v1/chat/completions", json={**body, "return_token_ids": True}).json()
    assert r["prompt_token_ids"] == list(prompt.encode()) and r["choices"][0]["token_ids"] == toks
    assert r["choices"][0]["message"]["content"] == want and "prompt_token_ids" not in r["choices"][0]
    r = client.post("/v1/chat/completions", json=body).json()
    assert "prompt_token_ids" not in r and "token_ids" not in r["choices"][0]
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True,
                                                             "return_token_ids": True}) as s:
        ev = sse_events(s.iter_lines())[:-1]
    assert ev[0]["prompt_token_ids"] == list(prompt.encode()) and not any("prompt_token_ids" in e for e in ev[1:])
    assert all("token_ids" in e["choices"][0] for e in ev)
    assert [t for e in ev for t in e["choices"][0]["token_ids"]] == toks
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in ev) == want
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as s:
        ev = sse_events(s.iter_lines())[:-1]
    assert not any("prompt_token_ids" in e or "token_ids" in e["choices"][0] for e in ev)


def test_multi_step_decoding_serves_the_same_responses(model):
    """decode_steps=4 (several tokens per engine output) answers as decode_steps=1: text, finish reason, usage
    and logprobs, with a stop string that completes inside a group; its streams carry fewer, larger events."""
    want, _ = greedy_text(model, "abc", 16)
    # a stop string past the first group of tokens: the first new printable character from position 4 on
    stop = next((ch for i, ch in enumerate(want) if i >= 4 and ch not in want[:i] and ch.isprintable()), None)
    assert stop is not None
    bodies = [{"prompt": "abc", "max_tokens": 16, "temperature": 0, "logprobs": 2},
              {"prompt": "xyz", "max_tokens": 9, "temperature": 1.0, "seed": 3}]
    if stop:
        bodies.append({"prompt": "abc", "max_tokens": 16, "temperature": 0, "stop": [stop], "logprobs": 1,
                       "return_token_ids": True})
    got = {}
    for k in (1, 4):
        app, _ = make_app(model, decode_steps=k)
        with TestClient(app) as c:
            res = [c.post("/v1/completions", json=b).json() for b in bodies]
            with c.stream("POST", "/v1/completions", json={**bodies[0], "stream": True,
                                                           "return_token_ids": True}) as st:
                ev = sse_events(st.iter_lines())
        got[k] = (res, ev)
    for r1, r4 in zip(got[1][0], got[4][0]):
        c1, c4 = r1["choices"][0], r4["choices"][0]
        assert (c4["text"], c4["finish_reason"], r4["usage"]) == (c1["text"], c1["finish_reason"], r1["usage"])
        assert c4.get("token_ids") == c1.get("token_ids")  # a stop string inside a group: the same ids
        if c1.get("logprobs"):
            assert c4["logprobs"]["tokens"] == c1["logprobs"]["tokens"]
            np.testing.assert_allclose(c4["logprobs"]["token_logprobs"], c1["logprobs"]["token_logprobs"], atol=1e-5)
    if stop:
        assert got[4][0][2]["choices"][0]["finish_reason"] == "stop"
    text = {k: "".join(e["choices"][0]["text"] for e in got[k][1][:-1]) for k in got}
    assert text[4] == text[1] == got[1][0][0]["choices"][0]["text"]
    ids = {k: [t for e in got[k][1][:-1] for t in e["choices"][0]["token_ids"]] for k in got}
    assert ids[4] == ids[1] and len(ids[1]) == got[1][0][0]["usage"]["completion_tokens"]
    assert len(got[4][1]) < len(got[1][1])  # tokens arrive in groups


def test_burst_of_requests_is_prefilled_together(model):
    """An idle engine's first step waits out a burst (requests arriving within ``batch_wait_ms`` of each other):
    the burst's prompts share one prefill iteration, and each answer equals ``generate``'s."""
    from moejax.serve.engine import SamplingParams

    with pytest.raises(ValueError, match="batch_wait_ms"):
        AsyncEngine(None, batch_wait_ms=-1)
    eng = Engine(model, EngineConfig(block_size=8, sched=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64,
                                                                         max_prefill_seqs=8)))
    ae = AsyncEngine(eng, batch_wait_ms=100)  # far above the gaps below, so the test is not timing-sensitive
    prompts = [[1 + i, 2, 3, 4, 5] for i in range(4)]
    ae.start()
    try:
        loop = asyncio.new_event_loop()
        q = asyncio.Queue()
        for i, p in enumerate(prompts):
            ae.submit(p, SamplingParams(max_tokens=3, temperature=0), loop, q, i)
            time.sleep(0.01)
        got = {}

        async def drain():
            while len([o for o in got.values() if o[-1].finished]) < len(prompts):
                tag, out = await asyncio.wait_for(q.get(), 60)
                got.setdefault(tag, []).append(out)
        loop.run_until_complete(drain())
        loop.close()
    finally:
        ae.stop()
    assert eng.iterations[0].prefill_tokens == sum(map(len, prompts))
    for i, p in enumerate(prompts):
        toks = [t for o in got[i] for t in o.new_tokens]
        assert toks == generate(model, [p], 3).tokens[0].tolist()


def test_logprobs_and_echo(client, model):
    prompt = "hello"
    r = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 1})
    assert r.status_code == 200, r.text
    ch = r.json()["choices"][0]
    assert ch["text"] == prompt
    lp = ch["logprobs"]
    assert lp["token_logprobs"][0] is None and len(lp["token_logprobs"]) == len(prompt)
    ids = np.array([list(prompt.encode())])
    ref = np.asarray(model(ids).logits[0], np.float64)
    ref = ref - np.log(np.exp(ref - ref.max(-1, keepdims=True)).sum(-1, keepdims=True)) - ref.max(-1, keepdims=True)
    want = [ref[i, ids[0, i + 1]] for i in range(len(prompt) - 1)]
    np.testing.assert_allclose(lp["token_logprobs"][1:], want, atol=1e-4)
    r = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 3, "temperature": 0, "logprobs": 2,
                                              "echo": True}).json()["choices"][0]
    assert r["text"].startswith(prompt) and len(r["logprobs"]["tokens"]) == len(prompt) + 3
    assert all(len(t) == 2 for t in r["logprobs"]["top_logprobs"][1:])


def test_bad_input_gets_4xx_and_server_keeps_serving(client):
    cases = [
        ({"content": b"{not json"}, 400),
        ({"content": b'{"prompt": "\xff\xfe", "max_tokens": 2}'}, 400),           # invalid UTF-8
        ({"json": {"prompt": "a", "model": "gpt-9"}}, 404),
        ({"json": {"prompt": "a" * 200, "max_tokens": 2}}, 400),                  # longer than the context
        ({"json": {"prompt": "a", "max_tokens": -1}}, 400),
        ({"json": {"prompt": "a", "temperature": 5}}, 400),
        ({"json": {"prompt": "a", "temperature": "hot"}}, 400),
        ({"json": {"prompt": [1, 2, 999]}}, 400),                                  # token id outside the vocab
        ({"json": {"prompt": "a", "top_p": 0}}, 400),
        ({"json": {"prompt": "a", "n": 0}}, 400),
        ({"json": {"max_tokens": 2}}, 400),                                        # no prompt
        ({"json": {"prompt": "a", "stop": [""]}}, 400),
    ]
    for kw, code in cases:
        r = client.post("/v1/completions", headers={"content-type": "application/json"}, **kw)
        assert r.status_code == code, (kw, r.status_code, r.text)
        e = r.json()["error"]
        assert e["message"] and e["type"] == "invalid_request_error"
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "wizard", "content": "x"}]})
    assert r.status_code == 400 and "messages" in r.json()["error"]["param"]
    r = client.post("/v1/chat/completions", json={"messages": []})
    assert r.status_code == 400
    assert client.post("/v1/completions", json={"prompt": "ok", "max_tokens": 2}).status_code == 200
    assert client.get("/health").status_code == 200


def wait_idle(eng, timeout=20.0):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if not eng.has_unfinished() and eng.alloc.num_used == 0:
            return True
        time.sleep(0.05)
    return False


def test_client_disconnect_mid_stream_frees_blocks(model):
    app, eng = make_app(model)
    with serve_in_background(app) as url:
        with httpx.Client(timeout=30) as c:
            with c.stream("POST", url + "/v1/completions", json={"prompt": "abc", "max_tokens": 100,
                                                                 "temperature": 0, "stream": True,
                                                                 "ignore_eos": True}) as s:
                for line in s.iter_lines():
                    if line.startswith("data: "):
                        break  # drop the connection after the first event
            assert wait_idle(eng), (eng.num_running, eng.alloc.num_used)
            assert eng.finished_metrics  # the request was aborted, not left running
            r = c.post(url + "/v1/completions", json={"prompt": "abc", "max_tokens": 3})
            assert r.status_code == 200
        eng.alloc.check()


async def _load(url, clients: int, seconds: float, max_tokens: int):
    codes: dict[int, int] = {}
    t_end = time.time() + seconds
    limits = httpx.Limits(max_connections=clients + 8, max_keepalive_connections=clients + 8)

    async def one(c, i):
        while time.time() < t_end:
            body = {"prompt": f"def f{i}(x):", "max_tokens": max_tokens, "stream": True, "temperature": 0.7,
                    "seed": i}
            try:
                async with c.stream("POST", url + "/v1/completions", json=body) as r:
                    async for _ in r.aiter_lines():
                        pass
                    codes[r.status_code] = codes.get(r.status_code, 0) + 1
                    if r.status_code in (429, 503):
                        await asyncio.sleep(float(r.headers.get("retry-after", "1")))
            except httpx.HTTPError:
                codes[-1] = codes.get(-1, 0) + 1

    async with httpx.AsyncClient(timeout=120, limits=limits) as c:
        await asyncio.gather(*(one(c, i) for i in range(clients)))
    return codes


@pytest.mark.slow
def test_load_200_streaming_clients(model):
    """200 concurrent streaming clients for 2 minutes: no 5xx other than 503 (with Retry-After); blocks freed."""
    app, eng = make_app(model, num_blocks=200)
    with serve_in_background(app) as url:
        codes = asyncio.run(_load(url, clients=200, seconds=120, max_tokens=16))
        assert wait_idle(eng, 60)
    print("status codes:", codes)
    assert codes.get(200, 0) > 0
    assert not any(500 <= k < 600 and k != 503 for k in codes), codes
    assert codes.get(-1, 0) == 0, codes
    eng.alloc.check()
    assert eng.alloc.num_used == 0  # every block free or held only by the evictable prefix cache


def test_prompt_longer_than_context_small_max_model_len(model):
    app, _ = make_app(model, max_model_len=32)
    with TestClient(app) as c:
        r = c.post("/v1/completions", json={"prompt": "x" * 30, "max_tokens": 8})
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "y" * 40}]})
        assert r.status_code == 400




def test_overload_answers_503_with_retry_after_then_serves_again(model):
    """``max_pending=1`` and one request held in flight (the engine's step waits on a gate): a completion, a
    streamed completion and a chat request each get 503 with ``Retry-After`` and code ``overloaded`` (the
    status comes before any stream starts); once the held request finishes, a new one is served (200). The
    slow load test (200 clients, the default max_pending of 512) never overloads the server."""
    import threading

    eng = Engine(model, EngineConfig(block_size=8, sched=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64)))
    app = create_app(eng, ByteTokenizer(model.cfg.vocab_size), model_name="tiny-test", max_pending=1)
    aengine = app.state.async_engine
    gate, step = threading.Event(), eng.step

    def gated_step():
        gate.wait(timeout=60)
        return step()

    eng.step = gated_step
    held = {}
    with serve_in_background(app) as url, httpx.Client(timeout=60) as c:
        t = threading.Thread(target=lambda: held.update(r=c.post(url + "/v1/completions", json={
            "prompt": "abc", "max_tokens": 3, "temperature": 0, "ignore_eos": True})))
        t.start()
        try:
            t0 = time.time()
            while aengine.pending < 1 and time.time() - t0 < 30:
                time.sleep(0.01)
            assert aengine.pending == 1 and not gate.is_set()  # the held request is in flight
            refused = [c.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}),
                       c.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 2, "stream": True}),
                       c.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                                  "max_tokens": 2})]
            for r in refused:
                assert r.status_code == 503, (r.status_code, r.text)
                assert r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "overloaded"
            assert aengine.pending == 1  # the refused requests never reached the engine
        finally:
            gate.set()  # never leave the engine thread waiting, even after a failed assertion
            t.join(timeout=60)
        assert held["r"].status_code == 200 and held["r"].json()["usage"]["completion_tokens"] == 3
        assert wait_idle(eng) and aengine.pending == 0
        r = c.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 2})
        assert r.status_code == 200, r.text
    eng.alloc.check()
