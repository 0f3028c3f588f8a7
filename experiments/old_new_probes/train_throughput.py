"""train_bench's throughput loop alone (tokens/s of the tiny preset's train step, seq 256, batch 16, on 1 device,
``expert=8`` and ``data=2,expert=4`` of 8 virtual CPU devices; median of 10 steps after 3 warm-up steps).
Prints one JSON line ``{mesh: tokens/s}``. Run by ``experiments/one_forward_old_new.py`` in both trees."""

import json
import os
import statistics
import time

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import jax

from moejax.config import TrainConfig, get_preset
from moejax.parallel.mesh import MeshConfig
from moejax.train import data as data_lib
from moejax.train.trainer import Trainer

streams, _ = data_lib.build_corpus(None)
tc = TrainConfig(steps=1000, seq_len=256, global_batch=16)
out = {}
for spec in ("none", "expert=8", "data=2,expert=4"):
    tr = Trainer(get_preset("tiny"), tc, None if spec == "none" else MeshConfig.parse(spec))
    it = data_lib.BatchIterator(streams["train"], seq_len=tc.seq_len + 1, global_batch=tc.global_batch, seed=0)
    for _ in range(3):
        jax.block_until_ready(tr.train_step(next(it)))
    ts = []
    for _ in range(10):
        b = next(it)
        t = time.perf_counter()
        jax.block_until_ready(tr.train_step(b))
        ts.append(time.perf_counter() - t)
    out[spec] = tc.global_batch * tc.seq_len / statistics.median(ts)
    jax.clear_caches()
print(json.dumps(out))
