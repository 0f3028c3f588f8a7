"""Decode cost of one nested-bit (D²MoE) expert at each width against int8, native ISA and capped to AVX2
(issue 26, item 3).

One expert of the ``tiny`` preset (gate, up and down ``[d_model, d_ff]`` / ``[d_ff, d_model]`` weights, random
values, MWQ planes 2+1+1+4 bits, group 128) decoded to float32 by ``QTensor.dequantize`` in one jitted call, as
the offload runtime's ``_decode_put`` does; beside it the same expert quantized to uniform int8 (one 8-bit
plane). Two unpacking formulations side by side: ``stack`` (the previous ``unpack_plane``: the ``8 / k`` shifted
copies of a plane stacked, which lowers to a concatenate) and ``broadcast`` (one shift per sub-row broadcast
over the plane: the library's now). Each ISA runs in its own process (``XLA_FLAGS=--xla_cpu_max_isa=AVX2`` for
the capped one); best of ``--reps`` batches of 20 calls. Target: every width within 2.5x of int8's decode.

    python experiments/nested_bit_decode.py [--reps 30]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments.common import cpu_isa, environment, markdown_table, write_results

WIDTHS = (2, 3, 4, 8)


def stack_unpack(packed, k, group_size):
    """The previous ``pallas_kernels.dequant_matmul.unpack_plane`` (stacked shifted copies)."""
    import jax.numpy as jnp

    from pallas_kernels.dequant_matmul import _plane_consts

    per, mask, _ = _plane_consts(k)
    *lead, rows, n = packed.shape
    gb = group_size // per
    p = packed.reshape(*lead, rows // gb, gb, n).astype(jnp.int32)
    q = jnp.stack([(p >> (j * k)) & mask for j in range(per)], axis=-3)
    return q.reshape(*lead, rows * per, n)


def measure(reps: int) -> dict:
    """Microseconds per expert decode, ``{impl: {width or "int8": us}}``, in this process's ISA."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import pallas_kernels.dequant_matmul as dm
    from moejax.config import get_preset
    from moejax.quant.mwq import mwq_config, quantize, uniform_config

    cfg = get_preset("tiny")
    D, F = cfg.d_model, cfg.moe.d_ff
    rng = np.random.default_rng(0)
    ws = [rng.standard_normal(s).astype(np.float32) * 0.02 for s in ((D, F), (D, F), (F, D))]
    mwq = [jax.tree.map(jnp.asarray, quantize(w, mwq_config())) for w in ws]
    int8 = [jax.tree.map(jnp.asarray, quantize(w, uniform_config(8))) for w in ws]
    new = dm.unpack_plane
    out, values = {}, {}
    for impl, fn in (("stack", stack_unpack), ("broadcast", new)):
        dm.unpack_plane = fn
        row = {}
        for label, qts, bits in [*((b, mwq, b) for b in WIDTHS), ("int8", int8, 8)]:
            f = jax.jit(lambda qs, bits=bits: [q.dequantize(bits, jnp.float32) for q in qs])
            values[(impl, label)] = [np.asarray(a) for a in jax.block_until_ready(f(qts))]
            best = float("inf")
            for _ in range(reps):
                t = time.perf_counter()
                for _ in range(20):
                    r = f(qts)
                jax.block_until_ready(r)
                best = min(best, (time.perf_counter() - t) / 20)
            row[str(label)] = best * 1e6
        out[impl] = row
    dm.unpack_plane = new
    same = all(all((a == b).all() for a, b in zip(values[("stack", k)], values[("broadcast", k)]))
               for k in [*WIDTHS, "int8"])
    return {"decode_us": out, "identical": same, "shapes": [list(w.shape) for w in ws]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.reps)))
        return 0
    runs = {}
    for isa, flags in (("native", None), ("AVX2 cap", "--xla_cpu_max_isa=AVX2")):
        env = dict(os.environ)
        env.pop("XLA_FLAGS", None)
        if flags:
            env["XLA_FLAGS"] = flags
        p = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", "--reps", str(args.reps)], env=env,
                           capture_output=True, text=True, check=True)
        runs[isa] = json.loads(p.stdout.strip().splitlines()[-1])
        print(isa, runs[isa], flush=True)
    rows = []
    for isa, r in runs.items():
        for impl, us in r["decode_us"].items():
            rows.append({"ISA": isa, "unpack": impl, **{f"{k} bits us" if k != "int8" else "int8 us": v
                                                        for k, v in us.items()},
                         "worst / int8": max(us[str(b)] for b in WIDTHS) / us["int8"], "identical": r["identical"]})
    md = (f"# Nested-bit expert decode on this CPU ({cpu_isa()}; AVX2 cap via XLA_FLAGS)\n\n"
          f"One `tiny` expert (gate/up/down {runs['native']['shapes']}), MWQ planes 2+1+1+4 bits, group 128, decoded "
          f"to float32 in one jitted call; best of {args.reps} x 20 calls. `stack`: the previous unpacking; "
          f"`broadcast`: the library's now; `identical`: both give the same values. Target: every width within "
          f"2.5x of int8 (`worst / int8` <= 2.5).\n\n"
          + markdown_table(rows, ["ISA", "unpack", *(f"{b} bits us" for b in WIDTHS), "int8 us", "worst / int8",
                                  "identical"]))
    print(md)
    print("wrote", *write_results("nested_bit_decode", {"env": environment(), "cpu": cpu_isa(), "runs": runs,
                                                        "rows": rows}, md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
