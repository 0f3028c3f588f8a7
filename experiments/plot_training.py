"""Turn a training log (``log.jsonl`` written by ``moejax train``) into PNG curves and a summary.

    python experiments/plot_training.py RUN_DIR [--name NAME] [--zlib]

Writes ``experiments/results/<name>.png`` (training loss in bits/byte, validation bits/byte, tokens/s, and
the per-layer expert-load spread), ``<name>.json`` (final numbers) and ``<name>.md``, and copies the log to
``<name>.log.jsonl``. ``--zlib`` adds the zlib -9 bits/byte of the same validation bytes as a reference line.
``--full-eval`` evaluates the final checkpoint on the whole validation split of the corpus recorded in the run
(checked by content hash; ``--corpus PATH --allow-corpus-mismatch`` evaluates on another one).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments.common import RESULTS, environment, markdown_table, write_results  # noqa: E402


def read_log(path):
    steps, evals, start, end = [], [], None, None
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            ev = r.get("event")
            if ev == "start":
                start = start or r
            elif ev == "end":
                end = r
            elif ev == "eval":
                evals.append(r)
            elif "loss" in r:
                steps.append(r)
    return start, steps, evals, end


def zlib_bits_per_byte(start) -> float | None:
    """zlib -9 on the validation split's bytes (documents concatenated), in bits per byte."""
    import zlib

    from moejax.train import data as data_lib
    corpus = start["corpus"]
    streams, info = data_lib.build_corpus(corpus["root"], val_percent=start["train_config"]["val_percent"])
    why = data_lib.corpus_mismatch(corpus, info)
    if why is not None:
        print(f"--zlib skipped: the corpus at the run's root is not the one it trained on: {why}", file=sys.stderr)
        return None
    toks = streams["validation"].tokens
    raw = bytes(int(t) for t in toks if t < 256)
    return 8 * len(zlib.compress(raw, 9)) / len(raw)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir")
    ap.add_argument("--name", default=None)
    ap.add_argument("--zlib", action="store_true")
    ap.add_argument("--full-eval", action="store_true",
                    help="also evaluate the final checkpoint on the whole validation split (of the corpus the run "
                         "recorded, checked by content hash)")
    ap.add_argument("--corpus", default=None, help="--full-eval on this corpus instead (needs "
                                                   "--allow-corpus-mismatch when its content hash differs)")
    ap.add_argument("--allow-corpus-mismatch", action="store_true")
    args = ap.parse_args(argv)
    log = os.path.join(args.run_dir, "log.jsonl")
    if not os.path.exists(log):
        raise SystemExit(f"error: {log} does not exist")
    name = args.name or os.path.basename(os.path.normpath(args.run_dir))
    start, steps, evals, end = read_log(log)
    zb = zlib_bits_per_byte(start) if args.zlib else None
    full = None
    if args.full_eval:
        from moejax.train.trainer import evaluate_checkpoint
        try:
            full = evaluate_checkpoint(args.run_dir, corpus=args.corpus, allow_mismatch=args.allow_corpus_mismatch)
        except (ValueError, FileNotFoundError) as e:
            raise SystemExit(f"error: --full-eval: {e}") from None

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    x = [r["step"] for r in steps]
    axes[0].plot(x, [r["ce"] / math.log(2) for r in steps], label="train (bits/token)", alpha=0.7)
    axes[0].plot([e["step"] for e in evals], [e["val_bits_per_byte"] for e in evals], "o-", label="validation bits/byte")
    if zb:
        axes[0].axhline(zb, color="gray", ls="--", label=f"zlib -9, whole validation split ({zb:.3f})")
    if full:
        axes[0].plot([full["step"]], [full["val_bits_per_byte"]], "r*", ms=12,
                     label=f"final, whole validation split ({full['val_bits_per_byte']:.3f})")
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("bits")
    axes[0].set_ylim(bottom=1.5, top=min(8.5, max(r["ce"] for r in steps) / math.log(2) + 0.5))
    axes[0].legend()
    axes[0].set_title("loss")
    axes[1].plot(x, [r["tokens_per_s"] for r in steps])
    axes[1].set_xlabel("step")
    axes[1].set_title("tokens/s")
    if steps and "expert_load" in steps[-1]:
        for layer in range(len(steps[-1]["expert_load"])):
            axes[2].plot(x, [max(r["expert_load"][layer]) for r in steps], label=f"layer {layer}")
        axes[2].set_title("largest expert share of routed slots")
        axes[2].set_xlabel("step")
        axes[2].legend()
    fig.tight_layout()
    os.makedirs(RESULTS, exist_ok=True)
    png = os.path.join(RESULTS, name + ".png")
    fig.savefig(png, dpi=100)
    shutil.copyfile(log, os.path.join(RESULTS, name + ".log.jsonl"))
    final = evals[-1] if evals else {}
    tok_s = sorted(r["tokens_per_s"] for r in steps[1:]) or [float("nan")]
    summary = {"run": name, "steps": final.get("step"), "val_bits_per_byte": final.get("val_bits_per_byte"),
               "val_bytes": final.get("val_bytes"),
               "full_val_bits_per_byte": full and full["val_bits_per_byte"], "full_val_bytes": full and full["val_bytes"],
               "zlib9_bits_per_byte": zb, "median_tokens_per_s": tok_s[len(tok_s) // 2],
               "train_minutes": (end or {}).get("elapsed_s", float("nan")) / 60, "params": start.get("params"),
               "corpus_files_hash": start["corpus"]["files_hash"],
               "corpus_content_hash": start["corpus"].get("content_hash"),
               "full_eval_corpus_content_hash": full and full["corpus_content_hash"],
               "corpus_tokens": start["corpus"]["n_tokens"]}
    md = (f"# Training run `{name}`\n\n`val_bits_per_byte` is the in-training validation subset "
          f"({summary['val_bytes']} bytes); `full_val_bits_per_byte` the whole validation split, the split zlib -9 "
          "is measured on.\n\n" + markdown_table([summary], [k for k in summary if k != "corpus_tokens"]) +
          f"\n![curves]({name}.png)\n\nValidation curve:\n\n" +
          markdown_table(evals, ["step", "val_bits_per_byte"]))
    paths = write_results(name, {"environment": environment(), "summary": summary, "evals": evals,
                                 "model_config": start.get("model_config"), "train_config": start.get("train_config")},
                          md)
    print(json.dumps(summary, indent=2))
    print("wrote", png, *paths)


if __name__ == "__main__":
    main()
