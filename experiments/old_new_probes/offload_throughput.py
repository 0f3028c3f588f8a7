"""Offloaded serving throughput: the tiny preset's experts in a store, half of them in memory (LRU, buffered
reads), 4 prompts of 128 tokens, 32 new tokens, greedy; tokens/s served one request at a time and as one batch
(median of 3 after a warm-up pass that compiles every shape). Prints one JSON line. Run by
``experiments/one_forward_old_new.py`` in both trees (either engine API)."""

import json
import os
import statistics
import tempfile
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")

import numpy as np
from flax import nnx

from moejax.config import get_preset
from moejax.models.transformer import Transformer
from moejax.offload.runtime import OffloadConfig, load_offloaded_model
from moejax.offload.store import ExpertStore, prepare
from moejax.serve.engine import Engine, EngineConfig, SamplingParams

try:
    from moejax.offload.runtime import OffloadRunner
except ImportError:  # before the redesign
    OffloadRunner = None

model = Transformer(get_preset("tiny"), rngs=nnx.Rngs(0))
prompts = np.random.default_rng(0).integers(0, 256, (4, 128)).tolist()
sp = SamplingParams(max_tokens=32, temperature=0)
with tempfile.TemporaryDirectory() as d:
    store_dir = prepare(model, os.path.join(d, "store"))
    store = ExpertStore(store_dir)
    om = load_offloaded_model(store)
    total = sum(r["nbytes"] for r in store.manifest["experts"])
    ecfg = EngineConfig(block_size=16, max_model_len=256)
    ocfg = OffloadConfig(store_dir, total // 2, io="buffered")

    def engine():
        if OffloadRunner is not None:
            return Engine(om, runner=OffloadRunner(om, ecfg, ocfg))
        return Engine(om, EngineConfig(**{**ecfg.__dict__, "offload": ocfg}))

    def close(e):
        (e.runner if OffloadRunner is not None else e.runtime).close()

    def single():
        e = engine()
        t = time.perf_counter()
        n = sum(len(e.generate([p], sp)[0].tokens) for p in prompts)
        dt = time.perf_counter() - t
        close(e)
        return n / dt

    def batch():
        e = engine()
        t = time.perf_counter()
        n = sum(len(r.tokens) for r in e.generate(prompts, sp))
        dt = time.perf_counter() - t
        close(e)
        return n / dt

    single(), batch()  # compile
    out = {"single stream tok/s": statistics.median(single() for _ in range(3)),
           "batch of 4 tok/s": statistics.median(batch() for _ in range(3))}
print(json.dumps(out))
