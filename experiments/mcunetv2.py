"""MCUNetV2 patch-based inference: analytic peak memory and MAC overhead vs the paper, XLA-measured buffers,
wall time, and accuracy of a small trained model (original vs redistributed, int8 vs float32).

1. Analytic (moejax.vision.planner), MobileNetV2 width 1.0 at 224, int8: layer-by-layer vs 4x4 patches
   (paper: 1372 kB -> 172 kB); MAC overhead of the patch stage and of the network before/after receptive-field
   redistribution (paper: +42% -> +18% and +10% -> +3%), under both patch-size conventions.
2. XLA: ``jit(...).lower(...).compile().memory_analysis()`` temporary-buffer bytes and wall time of the
   float32 whole-image forward vs the patch-based forward (``lax.fori_loop`` over patches) at 224 and 896.
3. Accuracy: MobileNetV2 (width 0.35) and its redistributed variant trained on scikit-learn's digits
   (8x8 upsampled to 32x32, 1 channel); float32 vs int8 PTQ, whole-image vs patch-based.

Writes results/mcunetv2.{json,md,png}.

    python experiments/mcunetv2.py [--epochs 15] [--repeats 3] [--high-res 896] [--skip-train]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments.common import (
    RESULTS,
    environment,
    markdown_table,
    time_fn,
    write_results,
)

PAPER = {"peak_layer_kB": 1372.0, "peak_patch_kB": 172.0, "stage_overhead": 0.42, "total_overhead": 0.10,
         "stage_overhead_rd": 0.18, "total_overhead_rd": 0.03}


def pct_dev(measured, paper):
    return 100.0 * (measured - paper) / paper


def analytic(K=5, n=4):
    from moejax.vision import planner as pl
    from moejax.vision.redistribute import MBV2_RD, redistribute
    from moejax.vision.spec import mobilenetv2

    base = mobilenetv2(1.0, 224)
    cfg = dict(MBV2_RD)
    rd, K_rd = redistribute(base, cfg.pop("K"), **cfg)
    rows, reports = [], {}
    for name, spec, k in (("MobileNetV2", base, K), ("MobileNetV2-RD", rd, K_rd)):
        for sizes in ("uniform", "exact"):
            r = pl.plan(spec, k, n, pl.CountingRules(patch_sizes=sizes))
            reports[(name, sizes)] = r
            s = r.summary()
            rows.append({"model": name, "patch sizes": sizes, "K": k, "n": n, "rf_px": s["rf"],
                         "layer peak int8 kB": s["peak_layer_kB"], "patch peak int8 kB": s["peak_patch_kB"],
                         "layer peak fp32 kB": r.kb(r.peak_layer, "float32"),
                         "patch peak fp32 kB": r.kb(r.peak_patch, "float32"),
                         "reduction": s["reduction"], "total MMAC": s["total_MMACs"],
                         "stage MMAC": s["stage_MMACs"], "stage patch MMAC": s["stage_patch_MMACs"],
                         "stage overhead %": 100 * s["stage_overhead"],
                         "network overhead %": 100 * s["total_overhead"]})
    # rule sensitivity: what the layer-by-layer peak would be under other counting rules
    rules = []
    for label, cr in (("paper rules (dw in place, residual counted, fused add)", pl.CountingRules()),
                      ("depthwise not in place", pl.CountingRules(dw_in_place=False)),
                      ("residual buffers not counted", pl.CountingRules(residual=False)),
                      ("residual add not fused", pl.CountingRules(fuse_residual_add=False)),
                      ("patch: whole input image resident", pl.CountingRules(patch_full_input=True))):
        r = pl.plan(base, K, n, cr)
        rules.append({"rules": label, "layer peak kB": r.kb(r.peak_layer), "patch peak kB": r.kb(r.peak_patch)})
    best, cands = pl.search(base, max_total_overhead=0.10, max_n=8)
    search = {"limit": 0.10, "K": best.K, "n": best.n, "peak_kB": best.kb(best.peak_patch),
              "network_overhead": best.total_overhead, "candidates": len(cands)}
    return rows, rules, reports, search, rd


def xla_measure(resolutions, grids, repeats):
    import jax
    import numpy as np

    from moejax.vision import executor as ex
    from moejax.vision import planner as pl
    from moejax.vision import rf
    from moejax.vision.models import random_folded
    from moejax.vision.spec import mobilenetv2

    xla_rules = pl.CountingRules(dw_in_place=False, fuse_residual_add=False)
    out = []
    for res in resolutions:
        spec = mobilenetv2(1.0, res)
        net = random_folded(spec, seed=0)
        x = jax.numpy.asarray(np.random.default_rng(0).standard_normal((1, res, res, 3)), jax.numpy.float32)
        cases = [("network", "whole-image", None, None, jax.jit(ex.forward))]
        for K, n in grids[res]:
            cases.append(("network", f"patch K={K} {n}x{n} (loop)", K, n,
                          jax.jit(lambda net, x, K=K, n=n: ex.forward_patch(net, x, K, n, "loop"))))
        K0 = grids[res][0][0]
        cases.append(("stage only", f"whole-image blocks 0..{K0 - 1}", K0, None,
                      jax.jit(lambda net, x, K=K0: ex.stage_output(net, x, K))))
        for K, n in grids[res]:
            cases.append(("stage only", f"patch K={K} {n}x{n} (loop)", K, n,
                          jax.jit(lambda net, x, K=K, n=n: ex.patch_stage(net, net.prepare_input(x), K, n, "loop"))))
        refs = {}
        for scope, label, K, n, fn in cases:
            t0 = time.perf_counter()
            compiled = fn.lower(net, x).compile()
            compile_s = time.perf_counter() - t0
            ma = compiled.memory_analysis()
            t = time_fn(compiled, net, x, repeats=repeats)
            y = compiled(net, x)
            refs.setdefault(scope, y)
            rec = {"resolution": res, "scope": scope, "schedule": label, "K": K, "n": n,
                   "temp_MB": ma.temp_size_in_bytes / 2**20, "args_MB": ma.argument_size_in_bytes / 2**20,
                   "output_B": ma.output_size_in_bytes, "compile_s": compile_s, "wall_ms": 1e3 * t["median_s"],
                   "max_abs_diff_vs_whole": float(jax.numpy.max(jax.numpy.abs(y - refs[scope])))}
            for key, rules in (("analytic_fp32_MB", pl.CountingRules()), ("analytic_fp32_xla_rules_MB", xla_rules)):
                steps = pl.patch_steps(spec, K, n, rules) if n else pl.layer_steps(spec, 0, rules)
                if scope != "network":
                    steps = steps[:len(rf.stage_convs(spec, K))]
                rec[key] = pl.peak(steps) * 4 / 2**20
            out.append(rec)
            print(f"  [{res}] {scope:10s} {label:28s} temp {rec['temp_MB']:8.2f} MB (analytic fp32 "
                  f"{rec['analytic_fp32_MB']:7.2f}, XLA-like rules {rec['analytic_fp32_xla_rules_MB']:7.2f}) wall "
                  f"{rec['wall_ms']:8.1f} ms compile {compile_s:5.1f} s", flush=True)
        for scope in ("network", "stage only"):
            recs = [r for r in out if r["resolution"] == res and r["scope"] == scope]
            for r in recs:
                r["temp_reduction"] = recs[0]["temp_MB"] / r["temp_MB"] if r["temp_MB"] else float("inf")
    return out


def digits(res):
    import numpy as np
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)
    f = res // 8
    x = np.kron(x, np.ones((f, f), np.float32))[..., None]  # nearest-neighbour upsampling
    x = (x - 0.5) / 0.5
    return train_test_split(x, d.target.astype(np.int32), test_size=0.2, random_state=0, stratify=d.target)


def shift_augment(x, rng, max_shift=1, background=-1.0):
    """Random translation by up to ``max_shift`` pixels (background fill), per image."""
    import numpy as np

    m = max_shift
    h, w = x.shape[1], x.shape[2]
    padded = np.pad(x, ((0, 0), (m, m), (m, m), (0, 0)), constant_values=background)
    offs = rng.integers(0, 2 * m + 1, size=(len(x), 2))
    return np.stack([padded[i, a:a + h, b:b + w] for i, (a, b) in enumerate(offs)])


def train_eval(spec, K, n, data, epochs, seed=0, batch=64, lr=5e-3):
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx

    from moejax.vision import executor as ex
    from moejax.vision.models import VisionNet, fold_bn
    from moejax.vision.quant import quantize

    xtr, xte, ytr, yte = data
    model = VisionNet(spec, rngs=nnx.Rngs(seed))
    model.train()
    steps_per_epoch = len(xtr) // batch
    tx = optax.adamw(optax.cosine_decay_schedule(lr, epochs * steps_per_epoch), weight_decay=1e-4)
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, x, y):
        def loss_fn(m):
            return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()
        loss, g = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, g)
        return loss

    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    for _ in range(epochs):
        perm = rng.permutation(len(xtr))
        for i in range(steps_per_epoch):
            idx = perm[i * batch:(i + 1) * batch]
            loss = step(model, opt, jnp.asarray(shift_augment(xtr[idx], rng)), jnp.asarray(ytr[idx]))
    train_s = time.perf_counter() - t0
    model.eval()
    folded = fold_bn(model)
    q = quantize(folded, xtr[:256])
    xte_j = jnp.asarray(xte)
    fwd = jax.jit(ex.forward)
    fwd_p = jax.jit(lambda net, x: ex.forward_patch(net, x, K, n, "loop"))

    def acc(logits):
        return float(np.mean(np.asarray(jnp.argmax(logits, -1)) == yte))

    train_acc = float(np.mean(np.asarray(jnp.argmax(fwd(folded, jnp.asarray(xtr)), -1)) == ytr))
    lf, lq = fwd(folded, xte_j), fwd(q, xte_j)
    lfp, lqp = fwd_p(folded, xte_j), fwd_p(q, xte_j)
    return {"model": spec.name, "K": K, "n": n, "train_s": train_s, "final_loss": float(loss), "fp32_train_acc": train_acc,
            "fp32_acc": acc(lf), "int8_acc": acc(lq), "fp32_patch_acc": acc(lfp), "int8_patch_acc": acc(lqp),
            "int8_patch_bitwise_equal": bool(jnp.array_equal(lq, lqp)),
            "fp32_patch_max_abs_diff": float(jnp.max(jnp.abs(lf - lfp))),
            "int8_vs_fp32_argmax_agree": float(np.mean(np.asarray(jnp.argmax(lf, -1) == jnp.argmax(lq, -1))))}


def plot(reports, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(14, 4.5), sharey=True)
    for ax, name in zip(axes, ("MobileNetV2", "MobileNetV2-RD")):
        r = reports[(name, "uniform")]
        xs = range(len(r.layer))
        ax.plot(xs, [r.kb(s.live) for s in r.layer], "o-", ms=3, label="layer-by-layer")
        ax.plot(xs, [r.kb(s.live) for s in r.patch], "s-", ms=3, label=f"patch-based ({r.n}x{r.n}, K={r.K})")
        nstage = sum(1 for s in r.patch if s.stage == "patch")
        ax.axvspan(-0.5, nstage - 0.5, color="orange", alpha=0.12, label="patch stage")
        ax.set_yscale("log")
        ax.set_title(f"{name} @224, int8: peak {r.kb(r.peak_layer):.0f} kB -> {r.kb(r.peak_patch):.1f} kB")
        ax.set_xlabel("step (convolution), stem -> classifier")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("live activation memory (kB, int8)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--train-res", type=int, default=32)
    ap.add_argument("--train-width", type=float, default=0.35)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--high-res", type=int, default=896)
    ap.add_argument("--skip-train", action="store_true")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()

    print("[1] analytic memory / MACs (MobileNetV2 w1.0 @224)", flush=True)
    rows, rules, reports, search, rd_spec = analytic()
    for r in rows:
        print(f"  {r['model']:15s} {r['patch sizes']:8s} K={r['K']} peak {r['layer peak int8 kB']:.1f} -> "
              f"{r['patch peak int8 kB']:.1f} kB, overhead stage {r['stage overhead %']:+.1f}% "
              f"network {r['network overhead %']:+.1f}%", flush=True)
    mb_u = rows[0]
    mb_e = rows[1]
    rd_u = rows[2]
    rd_e = rows[3]
    compare = [
        {"quantity": "layer-by-layer peak (kB)", "paper": PAPER["peak_layer_kB"], "measured": mb_u["layer peak int8 kB"]},
        {"quantity": "patch-based 4x4 peak (kB)", "paper": PAPER["peak_patch_kB"], "measured": mb_u["patch peak int8 kB"]},
        {"quantity": "patch-stage MAC overhead, MbV2 (%)", "paper": 100 * PAPER["stage_overhead"],
         "measured": mb_u["stage overhead %"], "exact-patch variant": mb_e["stage overhead %"]},
        {"quantity": "network MAC overhead, MbV2 (%)", "paper": 100 * PAPER["total_overhead"],
         "measured": mb_u["network overhead %"], "exact-patch variant": mb_e["network overhead %"]},
        {"quantity": "patch-stage MAC overhead, MbV2-RD (%)", "paper": 100 * PAPER["stage_overhead_rd"],
         "measured": rd_u["stage overhead %"], "exact-patch variant": rd_e["stage overhead %"]},
        {"quantity": "network MAC overhead, MbV2-RD (%)", "paper": 100 * PAPER["total_overhead_rd"],
         "measured": rd_u["network overhead %"], "exact-patch variant": rd_e["network overhead %"]},
    ]
    for c in compare:
        c["deviation %"] = pct_dev(c["measured"], c["paper"])
        c["within 2%"] = "yes" if abs(c["deviation %"]) <= 2.0 else "no"

    print("[2] XLA memory_analysis + wall time (float32, batch 1)", flush=True)
    hr = args.high_res
    xla = xla_measure([224, hr], {224: [(5, 4)], hr: [(5, 4), (5, 8)]}, args.repeats)

    train = []
    if not args.skip_train:
        print(f"[3] digits @{args.train_res}: train MobileNetV2 w{args.train_width} and its RD variant", flush=True)
        from moejax.vision.redistribute import MBV2_RD, redistribute
        from moejax.vision.spec import mobilenetv2
        data = digits(args.train_res)
        base = mobilenetv2(args.train_width, args.train_res, 10, in_channels=1)
        cfg = dict(MBV2_RD)
        rd, K_rd = redistribute(base, cfg.pop("K"), **cfg)
        n = 2
        for spec, K in ((base, 5), (rd, K_rd)):
            rec = train_eval(spec, K, n, data, args.epochs)
            train.append(rec)
            print(f"  {rec['model']}: fp32 {rec['fp32_acc']:.4f} int8 {rec['int8_acc']:.4f} "
                  f"(patch fp32 {rec['fp32_patch_acc']:.4f}, int8 {rec['int8_patch_acc']:.4f}, bitwise "
                  f"{rec['int8_patch_bitwise_equal']}) train {rec['train_s']:.0f}s", flush=True)

    os.makedirs(RESULTS, exist_ok=True)
    png = os.path.join(RESULTS, "mcunetv2.png")
    plot(reports, png)
    payload = {"environment": environment(), "paper": PAPER, "analytic": rows, "rules": rules, "search": search,
               "paper_comparison": compare, "redistributed_spec": rd_spec.describe().splitlines(), "xla": xla,
               "digits": train, "args": vars(args), "runtime_s": time.perf_counter() - t_start}
    md = [
        "# MCUNetV2: patch-based inference (MobileNetV2, int8)\n",
        "\nProduced by `python experiments/mcunetv2.py`; all numbers below are computed by this run.\n\n",
        "## Paper vs measured (MobileNetV2 w1.0, 224x224, int8, 4x4 patches)\n\n",
        markdown_table(compare, ["quantity", "paper", "measured", "deviation %", "within 2%", "exact-patch variant"],
                       "{:.1f}"),
        (f"\nThe paper's two MobileNetV2 overheads imply a patch stage of {PAPER['total_overhead']:.2f} x "
         f"{mb_u['total MMAC']:.1f} / {PAPER['stage_overhead']:.2f} = "
         f"{PAPER['total_overhead'] * mb_u['total MMAC'] / PAPER['stage_overhead']:.1f} MMAC, while the 5-block stage"
         f" whose 4x4 split gives the paper's 172 kB has {mb_u['stage MMAC']:.1f} MMAC, so no single stage definition"
         " reproduces both +42% and +10% with a ~300 MMAC network: uniform patches match the stage figure, exact"
         " (clipped) patches come closer to the network figure. The paper's redistributed configuration is only"
         " shown as a figure; ours is described at the end, so its overheads are not expected to match exactly.\n"),
        ("\n`measured` uses uniform patches (every patch computed at the interior size, halo over the border computed on"
        " zero padding, as fixed-size MCU patch buffers do); `exact-patch variant` clips regions at the border.\n"),
        "\n## Analytic schedules\n\n",
        markdown_table(rows, ["model", "patch sizes", "K", "n", "rf_px", "layer peak int8 kB", "patch peak int8 kB",
                              "layer peak fp32 kB", "patch peak fp32 kB", "reduction", "total MMAC", "stage MMAC",
                              "stage patch MMAC", "stage overhead %", "network overhead %"], "{:.1f}"),
        (f"\nSearch (min peak, network MAC overhead <= 10%, n <= 8): K={search['K']}, n={search['n']}, "
        f"peak {search['peak_kB']:.1f} kB, overhead {100 * search['network_overhead']:.1f}%.\n"),
        "\n## Counting rules\n\n",
        ("- kB = 1024 bytes; int8 = 1 byte per activation element, float32 = 4. 1372 kB = 112*112*(16+96)/1024: the"
        " expand 1x1 conv of the first 24-channel block reads 16x112x112 and writes 96x112x112.\n"
        "- A step is one convolution; live memory = its input + output, plus the block input kept for the residual"
        " while a residual block runs (residual buffers count).\n"
        "- Depthwise convolutions run in place (max(in, out)), as TinyEngine does; without this the stride-2 depthwise"
        " conv of that block would need 96x112x112 + 96x56x56 = 1470 kB and the paper's 1372 kB could not hold.\n"
        "- The projection of a residual block accumulates into the residual buffer (in + residual); otherwise the"
        " 28x28 blocks would need 196 kB and the paper's 172 kB could not hold.\n"
        "- Patch-based: per-patch buffers + the whole stage output buffer; only the current patch's input region is"
        " resident (the image is streamed); the later stage runs layer by layer.\n"
        "- MACs: convolutions + classifier (bias, activations, adds, pooling not counted). Stage overhead = patch MACs"
        " / stage MACs - 1; network overhead = extra MACs / network MACs.\n"),
        "\n",
        markdown_table(rules, ["rules", "layer peak kB", "patch peak kB"], "{:.1f}"),
        "\n## XLA measured (float32, batch 1, `compiled.memory_analysis().temp_size_in_bytes`)\n\n",
        markdown_table(xla, ["resolution", "scope", "schedule", "temp_MB", "temp_reduction", "analytic_fp32_MB",
                             "analytic_fp32_xla_rules_MB", "wall_ms", "compile_s", "max_abs_diff_vs_whole"],
                       "{:.3g}"),
        ("\nPatch-based = `forward_patch(..., mode=\"loop\")`: a `lax.fori_loop` over uniform patches whose carry is the"
        " stage output buffer, then the remaining blocks layer by layer. Random weights (memory and time do not"
        " depend on them). For `stage only` the stage output is the program's output, so XLA's temp bytes exclude it"
        " while the analytic columns include it. `analytic_fp32_xla_rules_MB` is the planner with depthwise convolutions not in place and"
        " the residual add not fused into the projection, which is what XLA's buffer assignment can do.\n"
        " `max_abs_diff_vs_whole` compares with the whole-image output of the same program scope: XLA's"
        " convolutions do not promise a summation order independent of the input size, so float32 equality is"
        " guaranteed only with `conv_impl=\"exact\"` (tests/test_vision.py checks it bitwise) and int8 (exact"
        " integer accumulation).\n"),
    ]
    if train:
        md += [("\n## Accuracy on scikit-learn digits (8x8 upsampled to "
               f"{args.train_res}x{args.train_res}, 1437 train / 360 test, width {args.train_width}, {args.epochs} epochs,"
                " AdamW + cosine decay, random shifts of up to 1 px)\n\n"),
               markdown_table(train, ["model", "K", "n", "fp32_train_acc", "fp32_acc", "int8_acc", "fp32_patch_acc", "int8_patch_acc",
                                      "int8_patch_bitwise_equal", "int8_vs_fp32_argmax_agree", "train_s"], "{:.4f}"),
               ("\nint8: per-channel symmetric weights, per-tensor symmetric activations calibrated (max |x|) on 256"
               " training images; the classifier runs in float32 on dequantized features.\n")]
    md += ["\n## Redistributed MobileNetV2 (our choice; the paper shows its configuration only as a figure)\n\n",
           "```\n" + rd_spec.describe() + "\n```\n",
           (f"\n![memory per layer](mcunetv2.png)\n\nEnvironment: {payload['environment']['backend']}, "
           f"{payload['environment']['cpu_count']} CPUs, jax {payload['environment']['jax']}; runtime "
           f"{payload['runtime_s']:.0f} s.\n")]
    jp, mp = write_results("mcunetv2", payload, "".join(md))
    print(f"wrote {jp}, {mp}, {png} in {payload['runtime_s']:.0f} s")


if __name__ == "__main__":
    main()
