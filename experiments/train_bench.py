"""Training throughput across meshes, and MoE vs dense at equal active parameters.

(a) tokens/s and step time of the ``tiny`` preset (seq 256, batch 16) on 1 device, ``expert=8`` and
    ``data=2,expert=4`` over the 8 virtual CPU devices of this 2-core machine (so the multi-device rows measure
    the overhead of sharding and all_to_all on a host that has no more compute, not a speedup).
(b) validation bits/byte after the same number of training tokens for ``tiny`` (8 experts top-2, 4.1M active
    parameters) and ``tiny-dense`` (dense FFN of the same active size).

    python experiments/train_bench.py [--steps 20] [--quality-steps 150]
Writes results/train_bench.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments.common import environment, markdown_table, setup_devices, write_results  # noqa: E402

setup_devices(8)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20, help="timed steps per mesh (after 3 warm-up steps)")
    ap.add_argument("--quality-steps", type=int, default=150)
    args = ap.parse_args(argv)

    import jax

    from moejax.config import TrainConfig, get_preset
    from moejax.models.transformer import active_params
    from moejax.parallel.mesh import MeshConfig
    from moejax.train import data as data_lib
    from moejax.train.trainer import Trainer, train

    streams, info = data_lib.build_corpus(None)
    tc = TrainConfig(steps=1000, seq_len=256, global_batch=16)
    rows = []
    for mesh_spec in ("none", "expert=8", "data=2,expert=4"):
        mesh = None if mesh_spec == "none" else MeshConfig.parse(mesh_spec)
        tr = Trainer(get_preset("tiny"), tc, mesh)
        it = data_lib.BatchIterator(streams["train"], seq_len=tc.seq_len + 1, global_batch=tc.global_batch, seed=0)
        t0 = time.perf_counter()
        jax.block_until_ready(tr.train_step(next(it)))
        compile_s = time.perf_counter() - t0
        for _ in range(2):
            jax.block_until_ready(tr.train_step(next(it)))
        ts, dropped, slots = [], 0.0, 0.0
        for _ in range(args.steps):
            b = next(it)
            t = time.perf_counter()
            m = jax.block_until_ready(tr.train_step(b))
            ts.append(time.perf_counter() - t)
            dropped += float(m["dropped"])
            slots += float(m["expert_load"].sum())
        step_s = statistics.median(ts)
        row = {"mesh": mesh_spec, "devices": 1 if mesh is None else mesh.size, "step_ms": step_s * 1e3,
               "tokens_per_s": tc.global_batch * tc.seq_len / step_s, "compile_s": compile_s,
               "dropped_fraction": dropped / max(slots, 1.0),
               "dispatch": "dropless tiles" if mesh is None else "all_to_all, capacity factor 2.0"}
        rows.append(row)
        print(f"{mesh_spec:16s} step {row['step_ms']:.0f} ms, {row['tokens_per_s']:.0f} tokens/s, "
              f"dropped {row['dropped_fraction']:.4f}", flush=True)
    quality = []
    qtc = TrainConfig(steps=args.quality_steps, seq_len=256, global_batch=16, eval_every=args.quality_steps,
                      ckpt_every=args.quality_steps, log_every=10, warmup_steps=20)
    for preset in ("tiny", "tiny-dense"):
        cfg = get_preset(preset)
        with tempfile.TemporaryDirectory() as d:
            t = time.perf_counter()
            s = train(cfg, qtc, os.path.join(d, preset), progress=False)
            wall = time.perf_counter() - t
        ap_ = active_params(cfg)
        quality.append({"preset": preset, "active_params": ap_["active"], "total_params": ap_["total"],
                        "steps": s["step"], "tokens": s["step"] * qtc.global_batch * qtc.seq_len,
                        "val_bits_per_byte": s["val_bits_per_byte"], "wall_s": wall})
        print(f"{preset:12s} {quality[-1]['val_bits_per_byte']:.4f} bits/byte after {quality[-1]['tokens']} tokens "
              f"({wall:.0f} s)", flush=True)
    env = environment()
    md = ("# Training benchmark (tiny preset, seq 256, batch 16, float32)\n\n"
          "## Throughput by mesh\n\nThe 8 devices are virtual CPU devices on a 2-core machine: the multi-device "
          "rows measure sharding and all_to_all overhead, not a speedup.\n\n"
          + markdown_table(rows, ["mesh", "devices", "dispatch", "step_ms", "tokens_per_s", "compile_s",
                                  "dropped_fraction"])
          + "\n## MoE vs dense at equal active parameters (same tokens)\n\n"
          + markdown_table(quality, ["preset", "active_params", "total_params", "steps", "tokens",
                                     "val_bits_per_byte", "wall_s"])
          + f"\nCorpus: stdlib .py files, hash {info.files_hash}. Environment: jax {env['jax']}, {env['cpu_count']} "
            "CPUs.\n")
    print(md)
    print("wrote", *write_results("train_bench", {"environment": env, "corpus": info.to_dict(), "meshes": rows,
                                                  "moe_vs_dense": quality}, md))


if __name__ == "__main__":
    main()
