"""Multi-controller training: 2 processes x 4 CPU devices (gloo collectives) == 1 process x 8 devices."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from moejax.config import ModelConfig, MoEConfig, RouterConfig, TrainConfig, save_config
from moejax.parallel.mesh import MeshConfig
from moejax.train.trainer import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(path):
    return {r["step"]: r["loss"] for r in map(json.loads, open(path)) if "loss" in r}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("mp")
    corpus = d / "corpus"
    corpus.mkdir()
    rng = np.random.default_rng(0)
    for i in range(16):
        (corpus / f"m{i}.py").write_text("".join(rng.choice(list("abcdef ()\n:"), 400)))
    cfg = ModelConfig(vocab_size=260, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, max_seq_len=64,
                      moe=MoEConfig(num_experts=8, d_ff=32, router=RouterConfig(type="topk", top_k=2)))
    tc = TrainConfig(steps=4, seq_len=16, global_batch=8, log_every=1, eval_every=4, eval_batches=1, ckpt_every=4,
                     warmup_steps=1, val_percent=25.0)
    save_config(cfg, d / "model.json")
    save_config(tc, d / "train.json")
    return d, corpus, cfg, tc


def test_two_processes_match_one_process(setup):
    d, corpus, cfg, tc = setup
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu",
           "XDG_CACHE_HOME": str(d / "cache"), "PYTHONPATH": ROOT}
    port = _free_port()
    out_mp = d / "mp_run"
    cmd = [sys.executable, "-m", "moejax.cli", "train", "--config", str(d / "model.json"), "--train-config",
           str(d / "train.json"), "--corpus", str(corpus), "--out", str(out_mp), "--mesh", "expert=8",
           "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--no-progress"]
    procs = [subprocess.Popen(cmd + ["--process-id", str(i)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, o in zip(procs, outs):
        assert p.returncode == 0, o[-3000:]
    out_one = d / "one_run"
    train(cfg, tc, str(out_one), corpus=str(corpus), cache_dir=str(d / "cache1"), progress=False,
          mesh=MeshConfig(expert=8))
    a, b = _losses(out_mp / "log.jsonl"), _losses(out_one / "log.jsonl")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for k in a:
        assert abs(a[k] - b[k]) <= 1e-6 * abs(b[k]), (k, a[k], b[k])
    # The 2-process checkpoint restores in this single process and gives the same logits as the 1-process one.
    import jax.numpy as jnp

    from moejax.train.checkpoint import load_model
    m_mp, _, meta = load_model(str(out_mp))
    m_one, _, _ = load_model(str(out_one))
    assert meta["step"] == 4
    tok = jnp.array([[1, 2, 3, 4, 5]])
    la, lb = np.asarray(m_mp(tok).logits), np.asarray(m_one(tok).logits)
    assert np.max(np.abs(la - lb)) <= 1e-6 * max(1.0, np.max(np.abs(lb)))
