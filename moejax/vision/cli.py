"""``moejax vision`` subcommands: ``plan`` prints the memory/MAC table of a patch-based schedule.

    moejax vision plan --model mobilenetv2 --resolution 224 --patches 4
    moejax vision plan --model mobilenetv2-rd --resolution 224 --patches 4 --dtype float32
    moejax vision plan --model mobilenetv2 --search --max-overhead 0.1
"""

from __future__ import annotations

import argparse


def best_K(spec, n: int, rules, resolution: int | None = None) -> int:
    """Patch-stage depth with the lowest patch-based peak for an ``n x n`` grid (ties: fewer MACs)."""
    from moejax.vision import planner

    sizes = spec.feature_sizes(resolution)
    cands = [K for K in range(1, spec.num_blocks + 1) if sizes[K - 1] >= n]
    if not cands:
        raise ValueError(f"--patches={n} is out of range: the input's largest feature map is {max(sizes)} pixels "
                         f"wide, so allowed 1..{max(sizes)}")
    reps = [planner.plan(spec, K, n, rules, resolution) for K in cands]
    return min(reps, key=lambda r: (r.peak_patch, r.stage_patch_macs)).K


def cmd_plan(args) -> int:
    from moejax.vision import planner
    from moejax.vision.zoo import get_model_spec

    spec = get_model_spec(args.model, args.width, args.resolution, args.num_classes)
    rules = planner.CountingRules(patch_sizes=args.patch_sizes, dw_in_place=not args.no_inplace_dw,
                                  residual=not args.no_residual)
    if args.search:
        best, _rows = planner.search(spec, args.max_overhead, args.max_patches, rules)
        print(f"search over K=1..{spec.num_blocks}, n=1..{args.max_patches}, network MAC overhead <= "
              f"{100 * args.max_overhead:.1f}%: best K={best.K}, n={best.n}")
        report = best
    else:
        K = args.blocks if args.blocks is not None else best_K(spec, args.patches, rules)
        report = planner.plan(spec, K, args.patches, rules)
    print(report.table(args.dtype))
    return 0


def register(subparsers) -> None:
    """Add the ``vision`` command (with its ``plan`` subcommand) to the ``moejax`` argument parser."""
    from moejax.vision.zoo import MODELS  # pure Python (spec, rf, redistribute): no jax at parser-build time

    v = subparsers.add_parser("vision", help="patch-based CNN inference (MCUNetV2): memory/MAC planning")
    vsub = v.add_subparsers(dest="vision_command", required=True)
    p = vsub.add_parser("plan", help="analytic peak activation memory and MACs, layer-by-layer vs patch-based",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="mobilenetv2", choices=tuple(MODELS))
    p.add_argument("--width", type=float, default=1.0, help="width multiplier")
    p.add_argument("--resolution", type=int, default=224, help="input height = width")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--patches", type=int, default=4, help="patches per side (n x n grid)")
    p.add_argument("--blocks", type=int, default=None,
                   help="blocks in the patch stage, K (default: the K with the lowest peak for --patches)")
    p.add_argument("--dtype", choices=("int8", "float32"), default="int8")
    p.add_argument("--patch-sizes", choices=("uniform", "exact"), default="uniform",
                   help="uniform: every patch at the interior size (MCU buffers); exact: clipped at the border")
    p.add_argument("--no-inplace-dw", action="store_true", help="depthwise convs need input + output")
    p.add_argument("--no-residual", action="store_true", help="do not count residual buffers")
    p.add_argument("--search", action="store_true", help="search (K, n) for the lowest peak under --max-overhead")
    p.add_argument("--max-overhead", type=float, default=0.1, help="whole-network MAC overhead limit (0.1 = 10%%)")
    p.add_argument("--max-patches", type=int, default=8)
    p.set_defaults(func=cmd_plan)
