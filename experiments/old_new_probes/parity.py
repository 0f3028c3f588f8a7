"""Outputs of the serving engine, offloaded serving and ``generate`` on serve_throughput's prompts, saved to the
``.npz`` named on the command line. Run by ``experiments/one_forward_old_new.py`` in both trees (it speaks the
engine API of either side of the redesign: ``EngineConfig(offload=...)`` before, ``OffloadRunner`` after)."""
import os
import sys
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
import numpy as np
from flax import nnx

from moejax.config import get_preset
from moejax.models.generate import generate
from moejax.models.transformer import Transformer
from moejax.offload.runtime import OffloadConfig, load_offloaded_model
from moejax.offload.store import ExpertStore, prepare
from moejax.serve.engine import Engine, EngineConfig, SamplingParams
from moejax.serve.scheduler import SchedulerConfig

try:
    from moejax.offload.runtime import OffloadRunner
except ImportError:  # before the redesign
    OffloadRunner = None

out = sys.argv[1]
cfg = get_preset("tiny")
model = Transformer(cfg, rngs=nnx.Rngs(0))
B, P, N = 16, 128, 64
rng = np.random.default_rng(0)
prompts = rng.integers(0, 256, (B, P)).tolist()
sp = SamplingParams(max_tokens=N, temperature=0)
res = {}

def engine_run(name, ecfg, prompts, sp):
    eng = Engine(model, ecfg)
    r = eng.generate(prompts, sp)
    res[name + "/tokens"] = np.array([x.tokens for x in r])
    res[name + "/logits"] = np.stack([x.logits for x in r])
    res[name + "/logprobs"] = np.array([x.logprobs for x in r])
    print(name, "done", flush=True)

base = {"max_model_len": P + N + 64, "enable_prefix_cache": False, "record_logits": True,
        "sched": SchedulerConfig(max_num_seqs=B, max_num_batched_tokens=B * (P + 1), max_prefill_seqs=B)}
engine_run("chunked_k4", EngineConfig(decode_steps=4, **base), prompts, sp)
engine_run("chunked_k1", EngineConfig(decode_steps=1, **base), prompts, sp)
# small budget: chunks + decode mixing; layered scheduler
small = dict(base, sched=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=96, max_prefill_seqs=4))
engine_run("chunked_small", EngineConfig(**small), prompts[:8], SamplingParams(max_tokens=16, temperature=0))
lay = dict(base, sched=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=96, max_prefill_seqs=4,
                                       collapse_when_idle=False, layered_thresholds=(32, 64, 96, 128)))
engine_run("layered", EngineConfig(scheduler="layered", **lay), prompts[:8], SamplingParams(max_tokens=16, temperature=0))
# sampling
engine_run("sampled", EngineConfig(**small), prompts[:8], SamplingParams(max_tokens=16, temperature=0.8, top_p=0.9, seed=3))
g = generate(model, prompts, N, return_logits=True)
res["generate/tokens"] = g.tokens
res["generate/logits"] = g.logits
print("generate done", flush=True)
# offloaded serving
with tempfile.TemporaryDirectory() as d:
    store_dir = prepare(model, os.path.join(d, "store"))
    store = ExpertStore(store_dir)
    om = load_offloaded_model(store)
    total = sum(r["nbytes"] for r in store.manifest["experts"])
    ecfg = EngineConfig(record_logits=True, block_size=16, max_model_len=P + N + 64)
    ocfg = OffloadConfig(store_dir, total // 2, io="buffered")
    if OffloadRunner is not None:
        eng = Engine(om, runner=OffloadRunner(om, ecfg, ocfg))
    else:
        eng = Engine(om, EngineConfig(**{**ecfg.__dict__, "offload": ocfg}))
    r = eng.generate(prompts[:4], SamplingParams(max_tokens=16, temperature=0))
    res["offload/tokens"] = np.array([x.tokens for x in r])
    res["offload/logits"] = np.stack([x.logits for x in r])
    (eng.runner if OffloadRunner else eng.runtime).close()
print("offload done", flush=True)
np.savez(out, **res)
