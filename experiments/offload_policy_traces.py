"""Pre-gate routing traces for cache-policy studies (a cached artifact; no policy decisions here).

Re-runs the Read-ME part of ``experiments/expert_offload.py`` up to the pre-gate (same seeds), then writes
``runs/readme-offload/pregate_traces.npz`` with

* ``train_seqs``: pre-gate expert sequences of TRAINING-split text (64 texts x 1024 tokens; for estimating
  transition statistics honestly);
* ``val_seqs``: the same for validation text (32 texts x 1024 tokens);
* ``served_steps`` / ``served_offsets``: the exact served access trace of the experiment's requests (6
  single-stream requests, 128 prompt + 48 generated tokens): every engine iteration's (layer, expert) accesses
  in execution order, as the offload runtime issues them (flattened ``[n, 2]``; iteration ``i`` is
  ``served_steps[served_offsets[i]:served_offsets[i + 1]]``);
* ``conc_*``: the same requests served concurrently (one batch) with the predictive policy: each iteration's
  accesses (``conc_steps``/``conc_offsets``), its current experts (``conc_states``/``conc_state_offsets``) and
  the transitions learned when it starts (``conc_learn``/``conc_learn_offsets``);

and the gate's parameters (``gate_*``) so the served experiment can reuse it.

    python experiments/offload_policy_traces.py
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
    import numpy as np
    from flax import nnx

    from experiments.expert_offload import build_readme, offload_engine, route_texts
    from moejax.offload.runtime import (
        OffloadConfig,
        OffloadRunner,
        load_offloaded_model,
    )
    from moejax.offload.store import ExpertStore, prepare
    from moejax.serve.engine import SamplingParams
    from moejax.train.checkpoint import load_model

    t0 = time.perf_counter()
    dense, _, _ = load_model(os.path.join("runs", "readme-dense"))
    moe, _info, gate, gstats, train_dom, val_dom, rng = build_readme(dense, 600, progress=False)
    E = moe.cfg.moe.num_experts
    print("pre-gate:", gstats, f"({time.perf_counter() - t0:.0f} s)", flush=True)

    trng = np.random.default_rng(123)
    train_seqs = np.stack(route_texts(gate, train_dom, 64, trng)).astype(np.int8)
    val_seqs = np.stack(route_texts(gate, val_dom, 32, trng)).astype(np.int8)

    # the experiment's served requests (same rng draws as experiments/expert_offload.py after the pre-gate)
    vwin = np.stack([d[i:i + 257] for d in val_dom if len(d) > 600 for i in rng.integers(0, len(d) - 257, 2)])
    del vwin
    for _ in range(4):  # the offline-trace draws (one per cache size and text)
        for i in range(6):
            d = val_dom[i % len(val_dom)]
            int(rng.integers(0, len(d) - 1024))
    prompts = []
    for i in range(6):
        d = val_dom[i % len(val_dom)]
        s = int(rng.integers(0, len(d) - 128))
        prompts.append(d[s:s + 128].astype(int).tolist())
    store_dir = prepare(moe, os.path.join("runs", "readme-offload", "store"), overwrite=True)
    store = ExpertStore(store_dir)
    om = load_offloaded_model(store)
    L = moe.cfg.n_layers
    steps = []
    orig = OffloadRunner.lookahead

    def rec(self, *a):
        seq = orig(self, *a)
        steps.append(seq)
        return seq

    OffloadRunner.lookahead = rec
    eng = offload_engine(om, OffloadConfig(store_dir, 2 * L * store.record_bytes, policy="belady", io="buffered"),
                         pregate=gate)
    sp = SamplingParams(max_tokens=48, temperature=0)
    for p in prompts:
        eng.generate([p], sp)
    eng.runner.close()
    OffloadRunner.lookahead = orig
    # the same requests served concurrently (one batch): every iteration's accesses, the predictive policy's
    # current experts and the transitions it learns (recorded from the runtime's calls)
    from moejax.offload.cache import ExpertCache, transition_matrix

    conc = {"steps": [], "states": [], "learn": []}
    orig_sf, orig_ss, orig_ot = ExpertCache.set_future, ExpertCache.set_state, ExpertCache.observe_transitions

    def sf(self, keys):
        keys = list(keys)
        conc["steps"].append(keys)
        conc["learn"].append([])
        return orig_sf(self, keys)

    def ss(self, experts):
        experts = sorted(experts)
        conc["states"].append(experts)
        return orig_ss(self, experts)

    def ot(self, pairs):
        pairs = list(pairs)
        conc["learn"][-1] += pairs
        return orig_ot(self, pairs)

    ExpertCache.set_future, ExpertCache.set_state, ExpertCache.observe_transitions = sf, ss, ot
    P = transition_matrix(train_seqs.astype(np.int64), E)
    eng = offload_engine(om, OffloadConfig(store_dir, 2 * L * store.record_bytes, policy="predictive", io="buffered",
                                           transitions=tuple(map(tuple, P.tolist()))), pregate=gate)
    eng.generate(prompts, sp)
    eng.runner.close()
    ExpertCache.set_future, ExpertCache.set_state, ExpertCache.observe_transitions = orig_sf, orig_ss, orig_ot

    def pack(lists, width):
        return (np.asarray([x for li in lists for x in li], np.int16).reshape(-1, width),
                np.cumsum([0] + [len(li) for li in lists]))

    c_steps, c_off = pack(conc["steps"], 2)
    c_states, c_soff = pack([[(e,) for e in x] for x in conc["states"]], 1)
    c_learn, c_loff = pack(conc["learn"], 2)
    flat = np.asarray([k for s in steps for k in s], np.int16).reshape(-1, 2)
    offsets = np.cumsum([0] + [len(s) for s in steps])
    gstate = {"gate_" + ".".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(gate))}
    out = os.path.join("runs", "readme-offload", "pregate_traces.npz")
    np.savez_compressed(out, train_seqs=train_seqs, val_seqs=val_seqs, served_steps=flat, served_offsets=offsets,
                        conc_steps=c_steps, conc_offsets=c_off, conc_states=c_states, conc_state_offsets=c_soff,
                        conc_learn=c_learn, conc_learn_offsets=c_loff, n_layers=L, num_experts=E, **gstate)
    print("wrote", out, "iterations", len(steps), "accesses", len(flat), f"({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
