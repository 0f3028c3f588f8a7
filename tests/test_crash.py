"""Crash consistency: SIGKILL a `moejax train` while an async checkpoint is being written, and a `moejax serve`
under load, then restart each.

Training: a fault-injection point in the checkpoint writer (``MOEJAX_FAULT_CHECKPOINT_STEP``, see
:mod:`moejax.train.checkpoint`) holds the save of one step open after its ``meta`` file is in the step's
temporary directory and writes a marker; the test SIGKILLs the run then. The partial checkpoint must be on disk,
ignored by every reader, removed by the resumed run, and the resumed trajectory must equal an uninterrupted run's
bit for bit (float32 on CPU, same configs and device: as the in-process resume test in test_train.py).

Serving: the server is SIGKILLed with requests in flight and started again on the same port (uvicorn's
listening socket sets SO_REUSEADDR, so the killed server's TIME_WAIT connections do not block the bind); /health
must answer within 60 s and a greedy request must return what it returned before the kill.

Every process runs as a real subprocess of the ``moejax`` CLI. They share one JAX persistent compilation cache
(a deployment would keep one too), so only the first process of the module compiles: the model config is the
same for training and serving. The restart timings are measured with that cache warm; the slow variant
restarts ``--preset tiny`` with no cache.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from moejax.config import ModelConfig, MoEConfig, RouterConfig, TrainConfig, save_config
from moejax.train.checkpoint import (
    FAULT_MARKER_ENV,
    FAULT_MODE_ENV,
    FAULT_STEP_ENV,
    Checkpointer,
    load_model,
    partial_checkpoints,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAULT_VARS = (FAULT_STEP_ENV, FAULT_MODE_ENV, FAULT_MARKER_ENV)

MODEL = ModelConfig(vocab_size=260, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=32, max_seq_len=64,
                    moe=MoEConfig(num_experts=4, d_ff=16, router=RouterConfig(type="topk", top_k=2)))
# checkpoints at 3, 6, 9, 12; the save of step 9 is the one killed mid-write
TRAIN = TrainConfig(steps=12, seq_len=16, global_batch=4, log_every=1, eval_every=6, eval_batches=1, ckpt_every=3,
                    keep=2, warmup_steps=2, val_percent=20.0)
FAULT_STEP = 9


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("crash")
    corpus = d / "corpus"
    corpus.mkdir()
    rng = np.random.default_rng(0)
    words = ["def", "return", "import", "class", "self", "for", "in", "if", "else", "x", "y", "(", ")", ":"]
    for i in range(12):
        (corpus / f"m{i:02d}.py").write_text(" ".join(rng.choice(words, size=int(rng.integers(60, 160)))) + "\n")
    save_config(MODEL.validate(), d / "model.json")
    save_config(TRAIN.validate(), d / "train.json")
    return d


def _env(d, cache=True, **extra):
    env = {k: v for k, v in os.environ.items() if k not in FAULT_VARS}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, XDG_CACHE_HOME=str(d / "xdg"), PYTHONUNBUFFERED="1")
    if cache:
        env.update(JAX_COMPILATION_CACHE_DIR=str(d / "jax_cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _train(d, out, *extra, env):
    cmd = [sys.executable, "-m", "moejax.cli", "train", "--config", str(d / "model.json"), "--train-config",
           str(d / "train.json"), "--corpus", str(d / "corpus"), "--out", str(out), "--no-progress", *extra]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _records(path):
    with open(path) as f:
        recs = [json.loads(line) for line in f]
    losses = [(r["step"], r["loss"]) for r in recs if "loss" in r]
    evals = [(r["step"], r["val_bits_per_byte"]) for r in recs if r.get("event") == "eval"]
    starts = [r["step"] for r in recs if r.get("event") == "start"]
    return losses, evals, starts


def _wait_for(path, proc, timeout):
    t0 = time.perf_counter()
    while not os.path.exists(path):
        if proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.returncode}) before {path} appeared:\n"
                                 f"{proc.stdout.read()[-3000:]}")
        if time.perf_counter() - t0 > timeout:
            proc.kill()
            raise AssertionError(f"{path} did not appear within {timeout} s")
        time.sleep(0.05)


def test_sigkill_during_async_checkpoint_write_then_resume(work):
    d = work
    ck = d / "killed" / "checkpoints"
    marker = d / "fault.json"
    cpu0 = _children_cpu()
    t0 = time.perf_counter()
    proc = _train(d, d / "killed", env=_env(d, **{FAULT_STEP_ENV: FAULT_STEP, FAULT_MARKER_ENV: marker}))
    _wait_for(marker, proc, timeout=240)
    # The marker proves the kill lands mid-write: step 9's meta is on disk in its temporary directory, which
    # orbax has not renamed to its final name (the save is held open on orbax's background thread).
    fault = json.loads(marker.read_text())
    assert fault["step"] == FAULT_STEP and fault["pid"] == proc.pid and proc.poll() is None
    assert os.path.isfile(os.path.join(fault["meta_dir"], "metadata"))
    assert fault["meta_dir"].startswith(str(ck / f"{FAULT_STEP}.orbax-checkpoint-tmp"))
    tmp_dir = os.path.dirname(fault["meta_dir"])
    assert any(n.startswith("state") for n in os.listdir(tmp_dir)), os.listdir(tmp_dir)
    assert not (ck / str(FAULT_STEP)).exists()
    proc.send_signal(signal.SIGKILL)
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == -signal.SIGKILL, out[-3000:]
    t_killed = time.perf_counter() - t0

    # On disk: the complete checkpoints 3 and 6, and the partial one of step 9.
    partial = partial_checkpoints(str(ck))
    assert len(partial) == 1 and partial[0].startswith(f"{FAULT_STEP}.orbax-checkpoint-tmp"), os.listdir(ck)
    assert sorted(n for n in os.listdir(ck) if n.isdigit()) == ["3", "6"]
    # Readers ignore it, and leave it alone (it could be a live run's save in progress).
    reader = Checkpointer(str(ck), async_save=False, clean_partial=False)
    assert reader.latest_step() == 6
    reader.close()
    assert load_model(str(d / "killed"))[2]["step"] == 6
    assert partial_checkpoints(str(ck)) == partial

    # Resume (removes the partial checkpoint, restores step 6) and, beside it, the uninterrupted run.
    t1 = time.perf_counter()
    resumed = _train(d, d / "killed", "--resume", env=_env(d))
    full = _train(d, d / "full", env=_env(d))
    out_r, out_f = resumed.communicate(timeout=300)[0], full.communicate(timeout=300)[0]
    assert resumed.returncode == 0, out_r[-3000:]
    assert full.returncode == 0, out_f[-3000:]
    t_rest = time.perf_counter() - t1
    assert f"removed 1 partial (never finalized) checkpoint(s) in {ck}: {partial[0]}" in out_r
    assert partial_checkpoints(str(ck)) == []
    assert sorted(n for n in os.listdir(ck) if n.isdigit()) == ["12", "9"]  # keep=2

    losses, evals, starts = _records(d / "killed" / "log.jsonl")
    ref_losses, ref_evals, ref_starts = _records(d / "full" / "log.jsonl")
    assert ref_starts == [0] and starts == [0, 6]  # the resumed run started from the last complete checkpoint
    ref = dict(ref_losses)
    assert sorted(ref) == list(range(1, TRAIN.steps + 1))
    # Every step either run logged (the killed run's steps past 6 were computed twice) equals the uninterrupted
    # run's, exactly: float32 on CPU, same configs and device, so the trajectory is bit-identical.
    assert {s for s, _ in losses} == set(ref)
    for s, v in losses:
        assert v == ref[s], (s, v, ref[s])
    ref_ev = dict(ref_evals)
    assert {s for s, _ in evals} == set(ref_ev) == {6, 12}
    for s, v in evals:
        assert v == ref_ev[s], (s, v, ref_ev[s])
    print(f"\n[train: killed at the step-{FAULT_STEP} save after {t_killed:.1f} s; resume + uninterrupted run "
          f"{t_rest:.1f} s; the runs' CPU {_children_cpu() - cpu0:.1f} s]")


# ------------------------------------------------------------------------------------------------ serving
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(args, port, env, log, timeout=60.0):
    """Start ``moejax serve`` on ``port``; returns (process, seconds until /health answered 200)."""
    import httpx

    # no warm-up: the test is about restarting, and a background warm-up would take CPU from the load it times
    cmd = [sys.executable, "-m", "moejax.cli", "serve", *args, "--port", str(port), "--model-name", "m",
           "--warmup", "none"]
    t0 = time.perf_counter()
    with open(log, "ab") as err:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err)
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"server exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1.0).status_code == 200:
                return proc, time.perf_counter() - t0
        except httpx.HTTPError:
            pass
        if time.perf_counter() - t0 > timeout:
            proc.kill()
            raise AssertionError(f"/health not up within {timeout} s:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)


GREEDY = {"model": "m", "prompt": "def main():", "max_tokens": 12, "temperature": 0.0}


def _greedy(url):
    import httpx

    r = httpx.post(url + "/v1/completions", json=GREEDY, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def _kill_under_load_and_restart(args, env, tmp, n_clients=8, max_tokens=40):
    """Start, record a greedy output, SIGKILL under load, restart on the same port; returns timings."""
    import httpx

    cpu0 = _children_cpu()
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp / f"serve-{port}.log"
    stop, outcomes = threading.Event(), []
    proc, t_first = _start_server(args, port, env, log)
    try:
        t0 = time.perf_counter()
        before = _greedy(url)
        t_greedy = time.perf_counter() - t0

        def client(i):
            with httpx.Client(timeout=120) as c:
                while not stop.is_set():
                    try:
                        r = c.post(url + "/v1/completions", json={"model": "m", "prompt": f"x = {i}", "max_tokens":
                                                                  max_tokens, "temperature": 0.8, "seed": i})
                        outcomes.append(r.status_code)
                    except httpx.HTTPError as e:  # the kill drops the connection of an in-flight request
                        outcomes.append(type(e).__name__)
                        return

        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(n_clients)]
        t_load = time.perf_counter()
        for t in threads:
            t.start()
        deadline = time.perf_counter() + 120
        while (h := httpx.get(url + "/health", timeout=5).json())["running"] + h["waiting"] < n_clients // 2:
            assert time.perf_counter() < deadline, h
            time.sleep(0.05)
        t_busy = time.perf_counter() - t_load
        proc.send_signal(signal.SIGKILL)  # mid-load: requests are running in the engine
        proc.wait(timeout=30)
        t_load = time.perf_counter() - t_load
        stop.set()
        for t in threads:
            t.join(timeout=30)
        dropped = [o for o in outcomes if not isinstance(o, int)]
        # requests in flight lost their connection mid-response (not only new ones refused after the kill)
        assert proc.returncode == -signal.SIGKILL and set(dropped) - {"ConnectError"}, outcomes
        # Same port at once: the killed server's connections in TIME_WAIT must not block the bind.
        time_wait = _time_wait_connections(port)
        assert time_wait != 0
        proc, t_restart = _start_server(args, port, env, log)
        assert t_restart < 60.0, t_restart
        t0 = time.perf_counter()
        after = _greedy(url)
        t_greedy_after = time.perf_counter() - t0
        assert after == before and len(before) > 0
    finally:
        stop.set()
        t0 = time.perf_counter()
        proc.terminate()
        proc.wait(timeout=60)
        t_stop = time.perf_counter() - t0
    timings = {"first_health": t_first, "first_greedy": t_greedy, "load_until_busy": t_busy,
               "load_until_dead": t_load, "restart_health": t_restart, "greedy_after_restart": t_greedy_after,
               "stop": t_stop, "children_cpu": _children_cpu() - cpu0}
    return {**{k + "_s": round(v, 1) for k, v in timings.items()}, "dropped_requests": len(dropped),
            "time_wait_connections_at_restart": time_wait}


def _children_cpu():
    """CPU seconds (user + system) of this test process's finished children so far (load-independent cost)."""
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _time_wait_connections(port):
    """Connections on ``port`` in TIME_WAIT (from /proc/net/tcp; -1 where that is not readable)."""
    try:
        with open("/proc/net/tcp") as f:
            rows = [line.split() for line in f.readlines()[1:]]
    except OSError:
        return -1
    return sum(1 for r in rows if int(r[1].split(":")[1], 16) == port and r[3] == "06")


def test_sigkill_serve_under_load_restarts_on_same_port(work):
    t = _kill_under_load_and_restart(["--config", str(work / "model.json"), "--max-num-seqs", "4"], _env(work),
                                     work)
    print(f"\n[serve: {t}]")


@pytest.mark.slow
def test_sigkill_serve_tiny_preset_cold_restart(tmp_path):
    """The tiny preset, no compilation cache: the restart builds and compiles everything again."""
    t = _kill_under_load_and_restart(["--preset", "tiny"], _env(tmp_path, cache=False), tmp_path, n_clients=16,
                                     max_tokens=64)
    print(f"\n[serve tiny, cold: {t}]")
