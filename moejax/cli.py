"""The ``moejax`` command.

    moejax generate --preset tiny --prompt-ids 1,2,3 --max-new-tokens 16 --greedy
    moejax generate --hf PATH --prompt "def main():" --max-new-tokens 32
    moejax presets

Subcommands grow with the library (train, eval, serve, profile, bench, ...).
"""

from __future__ import annotations

import argparse
import functools
import importlib
import math
import os
import sys
from collections.abc import Sequence

# --dtype of --preset/--config/--hf when not given (a --ckpt keeps its training compute dtype)
DEFAULT_DTYPE = "float32"


def _span(lo, hi, lo_open: bool = False, hi_open: bool = False) -> str:
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {lo}"
    return f"{'<' if hi_open else '<='} {hi}" if hi is not None else "(any value)"


def int_range(lo: int | None = None, hi: int | None = None):
    """An argparse ``type=``: an integer in ``[lo, hi]`` (``None``: unbounded). A bad value exits 2 with
    ``argument --FLAG: must be an integer >= 1, got 0``."""
    span = _span(lo, hi)

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer {span}, got {text!r}") from None
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"must be an integer {span}, got {v}")
        return v

    parse.__name__ = f"integer {span}"
    return parse


def float_range(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False, hi_open: bool = False):
    """An argparse ``type=``: a finite number in ``[lo, hi]``; ``lo_open``/``hi_open`` exclude a bound."""
    span = _span(lo, hi, lo_open, hi_open)

    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number {span}, got {text!r}") from None
        if (not math.isfinite(v) or (lo is not None and (v <= lo if lo_open else v < lo))
                or (hi is not None and (v >= hi if hi_open else v > hi))):
            raise argparse.ArgumentTypeError(f"must be a number {span}, got {text}")
        return v

    parse.__name__ = f"number {span}"
    return parse


positive_int = int_range(1)
nonneg_int = int_range(0)
positive_float = float_range(0, lo_open=True)
nonneg_float = float_range(0)
port = int_range(1, 65535)
seed32 = int_range(0, 2**32 - 1)  # a PRNG seed (SamplingParams.seed's range)


def nm_ratio(text: str) -> tuple[int, int]:
    """``N:M`` -> ``(n, m)`` with integers ``0 < n <= m`` (``--sparsity``)."""
    parts = text.split(":")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"{text!r} is not N:M (e.g. 2:8)")
    n, m = (int(p) for p in parts)
    if not 0 < n <= m:
        raise argparse.ArgumentTypeError(f"{text!r}: N:M needs 0 < N <= M")
    return n, m


def sparsity_sites(text: str) -> tuple[str, ...]:
    """Comma-separated sites of ``moejax.config.SPARSITY_SITES`` (``--sparsity-layers``)."""
    from moejax.config import SPARSITY_SITES

    sites = tuple(t.strip() for t in text.split(",") if t.strip())
    bad = [t for t in sites if t not in SPARSITY_SITES]
    if not sites or bad:
        raise argparse.ArgumentTypeError(f"{text!r}: sites must be a comma-separated subset of "
                                         f"{', '.join(SPARSITY_SITES)}")
    return sites


def _offload_bits(text: str):
    """``serve --offload-bits``: ``router`` or a width in bits (the store lists the widths it holds)."""
    if text.strip().lower() == "router":
        return "router"
    try:
        v = int(text)
    except ValueError:
        v = 0
    if not 1 <= v <= 32:
        raise argparse.ArgumentTypeError(f"must be 'router' or a bit width in [1, 32] (one the store holds, "
                                         f"e.g. 8), got {text!r}")
    return v


def _model_from_args(args):
    import jax
    from flax import nnx

    from moejax.config import get_preset, load_config
    from moejax.models.transformer import Transformer

    sources = [s for s in (args.preset, args.hf, args.config, getattr(args, "ckpt", None)) if s]
    if len(sources) != 1:
        raise SystemExit("error: give exactly one of --preset, --config, --hf or --ckpt")
    if getattr(args, "ckpt", None):
        from moejax.train.checkpoint import load_model
        model, cfg, _ = load_model(args.ckpt)
        if args.dtype is not None and args.dtype != cfg.dtype:
            model, cfg = _with_compute_dtype(model, cfg, args.dtype)
        return model, cfg, None
    dtype = args.dtype or DEFAULT_DTYPE
    if args.hf:
        from moejax.models.hf import load_hf
        model, cfg = load_hf(args.hf, dtype=dtype)
        return model, cfg, args.hf
    cfg = get_preset(args.preset) if args.preset else load_config(args.config)
    if dtype != cfg.dtype:
        import dataclasses
        cfg = dataclasses.replace(cfg, dtype=dtype).validate()
    print(f"random weights (seed {args.seed}) for {'preset ' + args.preset if args.preset else args.config}; "
          f"backend {jax.default_backend()}", file=sys.stderr)
    return Transformer(cfg, rngs=nnx.Rngs(args.seed)), cfg, None


def _with_compute_dtype(model, cfg, dtype: str):
    """A training checkpoint's model computing in ``dtype`` (``ModelConfig.dtype``, as ``--dtype`` sets it for
    ``--preset``/``--config``); its parameters keep their stored ``param_dtype``."""
    import dataclasses

    from flax import nnx

    from moejax.models.transformer import Transformer

    cfg = dataclasses.replace(cfg, dtype=dtype).validate()
    gdef = nnx.graphdef(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    return nnx.merge(gdef, nnx.state(model)), cfg


def _load_tokenizer(path):
    if not path:
        return None
    tj = os.path.join(path, "tokenizer.json")
    if not os.path.exists(tj):
        return None
    from tokenizers import Tokenizer
    return Tokenizer.from_file(tj)


def cmd_generate(args) -> int:
    from moejax.models.generate import generate

    model, cfg, path = _model_from_args(args)
    if args.eos_id is not None and args.eos_id >= cfg.vocab_size:
        raise SystemExit(f"error: --eos-id {args.eos_id} is outside the vocabulary [0, {cfg.vocab_size})")
    tok = _load_tokenizer(path)
    if args.prompt_ids is not None:
        try:
            ids = [int(t) for t in args.prompt_ids.split(",") if t.strip()]
        except ValueError:
            raise SystemExit(f"error: --prompt-ids must be comma-separated integers, got {args.prompt_ids!r}")
    elif args.prompt is not None:
        if tok is not None:
            ids = tok.encode(args.prompt).ids
        elif cfg.vocab_size >= 256:
            ids = list(args.prompt.encode("utf-8"))  # byte-level models
        else:
            raise SystemExit("error: --prompt needs a tokenizer.json beside the checkpoint; use --prompt-ids")
    else:
        raise SystemExit("error: give --prompt-ids or --prompt")
    if not cfg.causal:  # a diffusion LM: the masked-diffusion sampler
        new = _diffusion_generate(args, model, ids)
    else:
        res = generate(model, [ids], args.max_new_tokens, greedy=args.greedy, temperature=args.temperature,
                       top_p=args.top_p, seed=args.seed, eos_id=args.eos_id)
        new = res.as_lists()[0]
    if tok is not None:
        print(tok.decode(new))
    elif args.prompt is not None:
        print(bytes(t for t in new if t < 256).decode("utf-8", errors="replace"))
    print(",".join(map(str, new)))
    return 0


def _diffusion_generate(args, model, ids):
    """``moejax generate`` on a diffusion LM: ``--max-new-tokens`` masks denoised in ``--block-length`` blocks."""
    from moejax.diffusion.sampler import DiffusionSampler, SamplerConfig

    if args.top_p != 1.0:
        raise SystemExit("error: --top-p does not apply to a diffusion LM (its sampler takes --temperature)")
    sc = SamplerConfig(gen_length=args.max_new_tokens, block_length=args.block_length,
                       steps=args.steps or args.max_new_tokens, temperature=0.0 if args.greedy else args.temperature,
                       remasking=args.remasking, cache=args.cache)
    try:
        sc.validate()
    except ValueError as e:
        raise SystemExit(f"error: {e} (--max-new-tokens, --block-length, --steps)") from None
    res = DiffusionSampler(model).generate([ids], sc, seed=args.seed)
    print(f"[diffusion LM: {res.nfe} denoising steps, {res.refreshes} full-canvas refreshes]", file=sys.stderr)
    return res.as_lists(args.eos_id)[0]


def _train_configs(args):
    import dataclasses

    from moejax.config import TrainConfig, get_preset, load_config

    if bool(args.preset) == bool(args.config):
        raise SystemExit("error: give exactly one of --preset or --config")
    cfg = get_preset(args.preset) if args.preset else load_config(args.config)
    if args.router or args.dispatch:
        if cfg.moe is None:
            raise SystemExit("error: --router/--dispatch need an MoE model (this config is dense)")
        moe = cfg.moe
        if args.router:
            moe = dataclasses.replace(moe, router=dataclasses.replace(moe.router, type=args.router))
        if args.dispatch:
            moe = dataclasses.replace(moe, dispatch=args.dispatch)
        cfg = dataclasses.replace(cfg, moe=moe)
    tc = load_config(args.train_config, TrainConfig) if args.train_config else TrainConfig()
    over = {k: v for k, v in {"steps": args.steps, "minutes": args.minutes, "seq_len": args.seq_len,
                                  "global_batch": args.batch, "lr": args.lr, "seed": args.seed}.items() if v is not None}
    if args.preset == "tiny" and args.steps is None and args.minutes is None and not args.train_config:
        over["steps"] = 200  # the quick default run: ~6 min on 2 AVX-512 cores, ~10 min on 2 AVX2 cores
    if args.objective == "mdm":  # a masked diffusion LM: bidirectional attention
        cfg = dataclasses.replace(cfg, causal=False)
        over["objective"] = "mdm"
    if args.mtp:
        cfg = dataclasses.replace(cfg, mtp_depth=args.mtp)
        over["objective"] = "mtp"
        if args.mtp_weight is not None:
            over["mtp_weight"] = args.mtp_weight
        if args.train_only:
            over["train_only"] = args.train_only
    if args.sparsity is not None:
        from moejax.config import SPARSITY_SITES, SparsityConfig

        n, m = args.sparsity
        over["sparsity"] = SparsityConfig(n=n, m=m, method=args.sparsity_method or "bdwp",
                                          layers=args.sparsity_layers or SPARSITY_SITES)
    return cfg.validate(), dataclasses.replace(tc, **over).validate()


def cmd_train(args) -> int:
    from moejax.parallel.distributed import initialize

    initialize(args.coordinator, args.num_processes, args.process_id)
    from moejax.train.trainer import train

    cfg, tc = _train_configs(args)
    out = args.out or os.path.join("runs", args.preset or os.path.splitext(os.path.basename(args.config))[0])
    mesh = None
    if args.mesh:
        from moejax.parallel.mesh import MeshConfig
        mesh = MeshConfig.parse(args.mesh)
    schedule = _train_schedule(args, cfg, tc, mesh)
    summary = train(cfg, tc, out, corpus=args.corpus, resume=args.resume, progress=not args.no_progress, mesh=mesh,
                    schedule=schedule, init_from=args.init_from)
    import jax
    if jax.process_index() != 0:
        return 0
    print(f"validation bits/byte {summary['val_bits_per_byte']:.4f} after {summary['step']} steps "
          f"({summary['elapsed_s'] / 60:.1f} min)")
    print(f"checkpoint: {summary['checkpoint']}")
    print(f"log: {summary['log']}")
    return 0


def _train_schedule(args, cfg, tc, mesh):
    """``--schedule``: None, explicit degrees, or an FSMoE plan from a (measured or given) profile."""
    spec = (args.schedule or "none").strip().lower()
    if spec == "none":
        return None
    if mesh is None:
        raise SystemExit("--schedule needs --mesh (the passes rewrite the expert-parallel step)")
    from moejax.schedule.overlap import OverlapSchedule, schedule_from_plan

    if spec != "auto":
        try:
            degrees = [int(v) for v in spec.split(",")]
        except ValueError:
            degrees = []
        if len(degrees) not in (1, 2) or min(degrees) < 1:
            raise SystemExit(f"--schedule {args.schedule!r}: expected 'none', 'auto', 'R' or 'RFWD,RBWD' with "
                             f"positive integers")
        return OverlapSchedule(degree_fwd=degrees[0], degree_bwd=degrees[-1], two_level=args.two_level_a2a)
    import jax

    from moejax.schedule import plan as fsmoe_plan
    from moejax.schedule.profile import Profile, run_profile

    if args.profile:
        profile = Profile.load(args.profile)
    else:
        print(f"profiling collectives and expert GEMMs on {mesh.size} devices (quick)...", flush=True)
        profile = run_profile(n_devices=mesh.size, quick=True)
    sizes = {"data": mesh.data, "expert": mesh.node * mesh.expert}  # experts are sharded over (node, expert)
    tokens = tc.global_batch // tc.grad_accum * tc.seq_len // mesh.size
    p = fsmoe_plan(cfg, sizes, profile, tokens, seq_len=tc.seq_len)
    sch = schedule_from_plan(p, two_level=args.two_level_a2a)
    if jax.process_index() == 0:
        print(f"FSMoE plan ({p.profile_source} profile, modelled): forward degrees {p.fwd_degrees}, backward "
              f"{p.bwd_degrees}, {len(p.buckets)} gradient bucket(s); modelled step {p.step_s * 1e3:.2f} ms vs "
              f"{p.no_overlap_step_s * 1e3:.2f} ms without overlap -> applying degrees "
              f"{sch.degree_fwd}/{sch.degree_bwd}, per-layer buckets in the backward loop: {sch.inside_loops}",
              flush=True)
    return sch


def cmd_eval(args) -> int:
    from moejax.train.trainer import evaluate_checkpoint

    r = evaluate_checkpoint(args.ckpt, corpus=args.corpus, batch=args.batch, max_batches=args.max_batches,
                            allow_mismatch=args.allow_corpus_mismatch)
    if r["corpus_mismatch"]:
        print(f"warning: evaluating on another corpus than the checkpoint's (--allow-corpus-mismatch): "
              f"{r['corpus_mismatch']}", file=sys.stderr)
    what = "validation bits/byte" if r["metric"] != "elbo" else "validation ELBO bits/byte (Monte-Carlo)"
    print(f"{what} {r['val_bits_per_byte']:.4f} over {r['val_bytes']} bytes (corpus {r['corpus_root']}, "
          f"content hash {r['corpus_content_hash']}, checkpoint step {r['step']})")
    if args.infill:
        _eval_infill(args, r)
    return 0


def _eval_infill(args, r) -> None:
    """``moejax eval --infill N``: a diffusion LM's infill accuracy on N held-out single-document windows."""
    from moejax.diffusion.evaluate import infill_accuracy, single_document_windows
    from moejax.diffusion.sampler import DiffusionSampler, SamplerConfig
    from moejax.train import data as data_lib
    from moejax.train.checkpoint import load_model

    model, cfg, meta = load_model(args.ckpt)
    if cfg.causal:
        raise SystemExit("error: --infill needs a diffusion LM checkpoint (trained with --objective mdm)")
    streams, _ = data_lib.build_corpus(r["corpus_root"], val_percent=meta["train_config"]["val_percent"])
    windows = single_document_windows(streams["validation"], args.infill_window, args.infill)
    sc = SamplerConfig(gen_length=args.infill_span, block_length=args.infill_span, steps=args.infill_span)
    res = infill_accuracy(DiffusionSampler(model), windows, span=args.infill_span, sc=sc, progress=True)
    print(f"infill accuracy {res['accuracy']:.4f} over {res['masked_tokens']} masked tokens ({res['spans']} spans "
          f"of {res['span']} in {res['window']}-token windows; exact spans {res['exact_spans']:.3f})")


def cmd_export(args) -> int:
    from moejax.models.hf import save_hf
    from moejax.train.checkpoint import load_model

    model, cfg, meta = load_model(args.ckpt)
    save_hf(model, cfg, args.out, layout=args.layout, dtype=args.dtype, model_type=args.model_type,
            overwrite=args.overwrite)
    print(f"exported step {meta['step']} of {args.ckpt} to {args.out} (Hugging Face {args.layout} layout)")
    return 0


def cmd_presets(args) -> int:
    from moejax.config import PRESETS
    from moejax.models.transformer import active_params
    for name, cfg in PRESETS.items():
        p = active_params(cfg)
        moe = (f"{cfg.moe.num_experts} experts top-{cfg.moe.router.effective_top_k}" if cfg.moe else "dense")
        print(f"{name:18s} layers {cfg.n_layers:3d} d_model {cfg.d_model:5d} {moe:22s} "
              f"params {p['total'] / 1e6:10.1f}M active {p['active'] / 1e6:9.1f}M")
    return 0


def cmd_serve(args) -> int:
    import os.path

    from moejax.serve.engine import Engine, EngineConfig
    from moejax.serve.scheduler import SchedulerConfig
    from moejax.serve.server import serve
    from moejax.serve.tokenizer import load_tokenizer

    offload = None
    if args.offload:
        from moejax.offload.runtime import OffloadConfig, load_offloaded_model
        from moejax.offload.store import ExpertStore

        io = args.offload_io or OFFLOAD_DEFAULTS["offload_io"]
        store = ExpertStore(args.offload, io=io)
        model, cfg, path = load_offloaded_model(store), store.config(), None
        total = sum(r["nbytes"] for r in store.manifest["experts"])
        budget = parse_budget(args.expert_memory_budget or OFFLOAD_DEFAULTS["expert_memory_budget"], total)
        bits = args.offload_bits
        if bits is None and store.quant is not None:
            bits = "router" if store.quant["scheme"] == "mwq" else store.quant["bits"][0]
        offload = OffloadConfig(args.offload, budget, policy=args.offload_policy or OFFLOAD_DEFAULTS["offload_policy"],
                                io=io, bits=bits, avg_bits=args.offload_avg_bits)
        args.preset = os.path.basename(os.path.normpath(args.offload))
        print(f"offload: {total / 2**20:.1f} MiB of experts on disk, {budget / 2**20:.1f} MiB in memory",
              file=sys.stderr)
    else:
        model, cfg, path = _model_from_args(args)
    tok = load_tokenizer(path, cfg.vocab_size)
    if not cfg.causal:
        return _serve_diffusion(args, model, tok)
    sched = SchedulerConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens)
    src = args.preset or args.config or args.hf or args.ckpt
    name = args.model_name or os.path.basename(os.path.normpath(src))
    ecfg = EngineConfig(scheduler=args.scheduler, sched=sched, block_size=args.block_size, num_blocks=args.num_blocks,
                        max_model_len=args.max_model_len, enable_prefix_cache=not args.no_prefix_cache,
                        decode_steps=args.decode_steps or (1 if args.speculative else 4),
                        speculative=args.speculative, num_speculative_tokens=args.num_speculative_tokens or 1,
                        speculative_max_batch=args.speculative_max_batch, async_scheduling=args.async_scheduling,
                        nano_batches=args.nano_batches or 1)
    runner = None
    if offload is not None:
        from moejax.offload.runtime import OffloadRunner

        runner = OffloadRunner(model, ecfg, offload)
    elif args.mesh:
        from moejax.serve.ep_runner import EPLBConfig, ExpertParallelRunner

        eplb = None
        if args.eplb is not None:
            slots = 1 if args.eplb_redundant_slots is None else args.eplb_redundant_slots
            eplb = EPLBConfig(redundant_slots=slots, policy=args.eplb,
                              period=SERVE_EPLB_STATIC_PERIOD if args.eplb == "static" else 0)
        try:
            runner = ExpertParallelRunner(model, ecfg, args.mesh, capacity_factor=args.ep_capacity_factor, eplb=eplb)
        except (ValueError, NotImplementedError) as e:
            raise SystemExit(f"--mesh {args.mesh}: {e}") from None
        print(f"expert parallel over {runner.mesh_cfg.expert_parallel} devices ("
              + ("dropless" if not args.ep_capacity_factor else f"capacity factor {args.ep_capacity_factor}")
              + ("" if eplb is None else f"; EPLB {eplb.policy}, {eplb.redundant_slots} redundant slots per device")
              + ")", file=sys.stderr)
    engine = Engine(model, ecfg, runner=runner, model_name=name)
    if offload is None and args.warmup == "blocking":
        import time

        t = time.perf_counter()
        n = engine.warmup(progress=True)
        print(f"compiled {n} engine step shapes in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    elif offload is None and args.warmup == "background":  # the offload step compiles per piece on first use
        engine.warmup(background=True)
        print(f"compiling {len(engine.warmup_shapes())} engine step shapes in the background (/health shows the "
              "progress)", file=sys.stderr)
    print(f"serving '{name}' ({args.scheduler} prefill, {engine.alloc.num_blocks} KV blocks of {args.block_size}) "
          f"on http://{args.host}:{args.port}/v1", file=sys.stderr)
    serve(engine, tok, host=args.host, port=args.port, model_name=name, max_pending=args.max_pending,
          batch_wait_ms=args.batch_wait_ms)
    return 0


def _serve_diffusion(args, model, tok) -> int:
    """``moejax serve`` on a diffusion LM: the :class:`~moejax.diffusion.engine.DiffusionEngine`."""
    import os.path

    from moejax.diffusion.engine import DiffusionEngine, DiffusionEngineConfig
    from moejax.serve.server import serve

    bad = [f for f, v in (("--speculative", args.speculative), ("--mesh", args.mesh),
                          ("--decode-steps", args.decode_steps), ("--no-prefix-cache", args.no_prefix_cache),
                          ("--async-scheduling", args.async_scheduling), ("--nano-batches", args.nano_batches))
           if v]
    if args.scheduler != "chunked":
        bad.append("--scheduler")
    if bad:
        raise SystemExit(f"error: {', '.join(bad)} do not apply to a diffusion LM (it is served by the diffusion "
                         f"engine: see --diffusion-*)")
    src = args.preset or args.config or args.hf or args.ckpt
    name = args.model_name or os.path.basename(os.path.normpath(src))
    dcfg = DiffusionEngineConfig(block_length=args.diffusion_block_length,
                                 steps_per_block=args.diffusion_steps_per_block or args.diffusion_block_length,
                                 scheduler=args.diffusion_scheduler, max_num_seqs=args.max_num_seqs,
                                 token_budget=args.diffusion_token_budget, block_size=args.block_size,
                                 num_blocks=args.num_blocks, max_model_len=args.max_model_len,
                                 memory_budget=None if args.diffusion_memory is None else
                                 parse_budget(args.diffusion_memory, 0))
    try:
        engine = DiffusionEngine(model, dcfg, model_name=name)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"serving diffusion LM '{name}' ({dcfg.scheduler} scheduler, blocks of {dcfg.block_length}, "
          f"{dcfg.steps_per_block} steps each, {engine.num_blocks} KV blocks of {dcfg.block_size}) on "
          f"http://{args.host}:{args.port}/v1", file=sys.stderr)
    serve(engine, tok, host=args.host, port=args.port, model_name=name, max_pending=args.max_pending,
          batch_wait_ms=args.batch_wait_ms)
    return 0


WARMUP_MODES = ("background", "blocking", "none")

# serve --eplb static: DeepSeek's placement rerun every this many iterations on the decayed loads (vLLM's
# --enable-eplb reruns its rebalancing on a fixed step interval)
SERVE_EPLB_STATIC_PERIOD = 1000

# serve's --offload-* flags: None when not given (so a flag given without --offload is an error); these defaults
# apply with --offload
OFFLOAD_DEFAULTS = {"expert_memory_budget": "100%", "offload_policy": "lru", "offload_io": "direct"}
OFFLOAD_FLAGS = ("expert_memory_budget", "offload_policy", "offload_io", "offload_bits", "offload_avg_bits")


def _check_serve(parser, args) -> None:
    """Flag combinations ``serve`` cannot honour: an argparse error (exit 2) naming the flag they need."""
    if args.ep_capacity_factor and not args.mesh:
        parser.error("--ep-capacity-factor needs --mesh (it caps the expert-parallel buffers)")
    if (args.eplb is not None or args.eplb_redundant_slots is not None) and not args.mesh:
        parser.error("--eplb/--eplb-redundant-slots need --mesh (expert placement balances an expert-parallel mesh)")
    if args.eplb_redundant_slots is not None and args.eplb is None:
        parser.error("--eplb-redundant-slots needs --eplb POLICY")
    if args.offload and args.mesh:
        parser.error("--mesh does not combine with --offload (offloaded experts are served on one device)")
    if args.speculative is None and (args.num_speculative_tokens is not None or args.speculative_max_batch is not None):
        parser.error("--num-speculative-tokens/--speculative-max-batch need --speculative mtp")
    if args.speculative is not None:
        if args.mesh or args.offload:
            parser.error("--speculative runs on the in-memory single-device engine: not with --mesh or --offload")
        if args.decode_steps not in (None, 1):
            parser.error("--speculative with --decode-steps > 1: choose one (both emit several tokens per step)")
        if args.scheduler != "chunked":
            parser.error("--speculative needs --scheduler chunked (the MTP heads draft from whole prompt chunks)")
        if args.async_scheduling:
            parser.error("--speculative with --async-scheduling: choose one (the next step depends on how many "
                         "drafts were accepted)")
    if args.nano_batches not in (None, 1):
        if args.scheduler != "chunked":
            parser.error("--nano-batches needs --scheduler chunked (a nano-batched layer would compute layered "
                         "prefill's held-back prompt rows in every layer)")
        if args.speculative or args.offload or args.mesh:
            parser.error("--nano-batches runs on the in-memory single-device engine without --speculative: not "
                         "with --speculative, --offload or --mesh")
    if args.async_scheduling and args.offload:
        parser.error("--async-scheduling does not combine with --offload (the offloaded step moves experts on "
                     "the host layer by layer)")
    if not args.offload:
        given = [_flag(d) for d in OFFLOAD_FLAGS if getattr(args, d) is not None]
        if given:
            what = "it configures" if len(given) == 1 else "they configure"
            parser.error(f"{', '.join(given)} need{'s' if len(given) == 1 else ''} --offload ({what} serving from an "
                         f"offload store)")
        return
    if any((args.preset, args.config, args.hf, args.ckpt)):
        parser.error("--offload replaces --preset/--config/--hf/--ckpt (the store holds the model)")
    if args.dtype is not None:
        parser.error("--dtype does not apply with --offload (the store holds the model and its dtype): pass --dtype "
                     "to `moejax offload prepare`")
    # a warm-up asked for on the command line (compared with the parser's default, so the check holds whatever
    # --warmup's default is; False/"none" ask for none)
    if args.warmup not in (False, None, "none") and args.warmup != parser.get_default("warmup"):
        parser.error("--warmup is not available with --offload (the offloaded step runs layer by layer and loads "
                     "experts on demand); it needs a model source (--preset/--config/--hf/--ckpt) instead")


def _check_train(parser, args) -> None:
    """``--profile`` and ``--two-level-a2a`` configure ``--schedule``: an error without the schedule using them."""
    spec = (args.schedule or "none").strip().lower()
    if args.profile and spec != "auto":
        parser.error(f"--profile needs --schedule auto (the FSMoE planner reads it; --schedule is {args.schedule!r})")
    if args.sparsity is None and (args.sparsity_method or args.sparsity_layers):
        parser.error("--sparsity-method/--sparsity-layers need --sparsity N:M (they configure N:M sparse training)")
    if args.sparsity is not None and args.sparsity_method == "transposable" and args.sparsity[1] > 4:
        parser.error(f"--sparsity-method transposable needs M <= 4 (exact block-pattern masks); got "
                     f"--sparsity {args.sparsity[0]}:{args.sparsity[1]}")
    if args.objective == "mdm" and args.mtp:
        parser.error("--objective mdm trains a diffusion LM: --mtp (next-token drafting heads) does not apply")
    if not args.mtp and (args.mtp_weight is not None or args.train_only):
        parser.error("--mtp-weight and --train-only need --mtp K")
    if args.train_only and not args.init_from:
        parser.error("--train-only mtp trains MTP heads on a frozen trained model: give --init-from RUN")
    if args.two_level_a2a and spec == "none":
        parser.error("--two-level-a2a needs --schedule (auto, R or RFWD,RBWD; --schedule 1 exchanges in two levels "
                     "without pipelining) and a --mesh with a node axis")


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def parse_budget(text: str, total: int) -> int:
    """``"50%"`` of ``total`` bytes, or a size like ``"2GB"``, ``"512MiB"``, ``"1000000"``."""
    t = text.strip()
    try:
        if t.endswith("%"):
            v = float(t[:-1])
            if not 0 < v <= 100:
                raise ValueError
            return int(total * v / 100)
        units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 10**3, "mb": 10**6, "gb": 10**9, "b": 1}
        for u, m in units.items():
            if t.lower().endswith(u):
                return int(float(t[:-len(u)]) * m)
        return int(t)
    except ValueError:
        raise ValueError(f"--expert-memory-budget={text!r}: give a percentage in (0, 100] (e.g. 50%) or a size "
                         "(e.g. 2GB, 512MiB, or bytes)") from None


def cmd_offload_prepare(args) -> int:
    from moejax.offload.store import prepare
    from moejax.quant import mwq_config, uniform_config

    model, _, _ = _model_from_args(args)
    quant = {"none": None, "mwq": mwq_config((2, 3, 4, 8)), "int8": uniform_config(8),
             "int4": uniform_config(4)}[args.quant]
    out = prepare(model, args.out, overwrite=args.overwrite, progress=True, quant=quant)
    print(f"wrote {out}")
    return 0


def cmd_profile(args) -> int:
    """Measure collectives and the expert GEMM on this machine's devices, fit alpha-beta models, save JSON."""
    if args.host_devices and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={args.host_devices}").strip()
    import time

    from moejax.schedule.profile import run_profile
    t0 = time.perf_counter()
    prof = run_profile(n_devices=args.devices, axis_name="x", quick=args.quick, dtype=args.dtype,
                       progress=None if args.no_progress else (lambda line: print(line, flush=True)))
    prof.save(args.out)
    print(f"measured profile: {prof.devices_per_node} x {prof.device_kind} ({prof.platform}), "
          f"{time.perf_counter() - t0:.1f} s")
    for op, f in prof.ops.items():
        print(f"  {op:15s} alpha {f.alpha_s * 1e6:9.2f} us  beta {f.beta_s_per_unit:.3e} s/{f.unit[:-1]}  "
              f"r2 {f.r2:.4f}  max rel residual {f.max_rel_residual:.3f}")
    print(f"wrote {args.out}")
    return 0


def _add_dtype(parser, dtypes) -> None:
    """``--dtype`` of a command with a model source (``None`` when not given: see :func:`_model_from_args`)."""
    parser.add_argument("--dtype", choices=dtypes, default=None,
                        help=f"compute dtype (default {DEFAULT_DTYPE}; --hf: also the parameters'; --ckpt: default "
                             "the checkpoint's training compute dtype)")


def _add_model_source(parser) -> None:
    """The ``--preset/--config/--hf/--ckpt`` group read by :func:`_model_from_args`."""
    src = parser.add_argument_group("model (exactly one)")
    src.add_argument("--preset", help="named preset with random weights, e.g. tiny")
    src.add_argument("--config", help="model config JSON/YAML (random weights)")
    src.add_argument("--hf", help="local Hugging Face directory (config.json + *.safetensors [+ tokenizer.json])")
    src.add_argument("--ckpt", help="a moejax training run directory (its latest checkpoint)")


class _LibraryChoices(Sequence):
    """An option's ``choices`` read from a library module when argparse first needs them (checking a given value,
    formatting help or an error). Building the parser then imports no module that imports jax or numpy (the
    scheduler registry, the HF importer, the offload store do), so ``moejax --help`` and the other subcommands
    stay fast; a command that gets the option imports that module anyway. Attach with :func:`_add_lazy_choices`."""

    def __init__(self, module: str, pick):
        self._module, self._pick, self._values = module, pick, None

    def _get(self) -> tuple:
        if self._values is None:
            self._values = tuple(self._pick(importlib.import_module(self._module)))
        return self._values

    def __getitem__(self, i):
        return self._get()[i]

    def __len__(self) -> int:
        return len(self._get())


def _add_lazy_choices(parser, flag: str, module: str, pick, **kwargs):
    """``parser.add_argument(flag, **kwargs)`` with ``choices=_LibraryChoices(module, pick)``, set after the call:
    add_argument formats the option's metavar, which would read the choices at once."""
    action = parser.add_argument(flag, **kwargs)
    action.choices = _LibraryChoices(module, pick)
    return action


def _servable_policies(cache_module):
    """`serve --offload-policy`: the cache policies the served model can run. Belady and predictive need each
    iteration's future routing from a pre-gating router, which the CLI does not build (the engine refuses them)."""
    return (p for p in cache_module.POLICIES if p not in ("belady", "predictive"))


# `offload prepare --quant`: the CLI's named presets (cmd_offload_prepare maps each to a moejax.quant.QuantConfig;
# the library has quantization schemes, moejax.quant.mwq.SCHEMES, not these names).
QUANT_PRESETS = ("none", "mwq", "int8", "int4")


def build_parser() -> argparse.ArgumentParser:
    from moejax.config import (
        ALL_ROUTER_TYPES,
        DISPATCH_TYPES,
        DTYPES,
        MAX_MTP_DEPTH,
        OBJECTIVES,
        SPARSITY_METHODS,
        SPARSITY_SITES,
        TRAIN_ONLY,
    )

    ap = argparse.ArgumentParser(prog="moejax", description="Mixture-of-Experts training and serving in JAX")
    sub = ap.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate tokens from a preset (random weights) or an HF checkpoint")
    _add_model_source(g)
    g.add_argument("--prompt-ids", help="comma-separated prompt token ids, e.g. 1,2,3")
    g.add_argument("--prompt", help="prompt text (tokenizer.json of the checkpoint, or bytes for byte-level models)")
    g.add_argument("--max-new-tokens", type=positive_int, default=32)
    g.add_argument("--greedy", action="store_true", help="greedy decoding (default: sample)")
    g.add_argument("--temperature", type=nonneg_float, default=1.0)
    g.add_argument("--top-p", type=float_range(0, 1, lo_open=True), default=1.0)
    g.add_argument("--seed", type=seed32, default=0)
    g.add_argument("--eos-id", type=nonneg_int, default=None)
    dg = g.add_argument_group("diffusion LM (a checkpoint trained with --objective mdm)")
    dg.add_argument("--block-length", type=positive_int, default=32,
                    help="tokens per semi-autoregressive block (--max-new-tokens must be a multiple of it)")
    dg.add_argument("--steps", type=positive_int, default=None,
                    help="denoising steps over the whole generation (default: --max-new-tokens, one token a step)")
    _add_lazy_choices(dg, "--cache", "moejax.diffusion.sampler", lambda m: m.CACHE_MODES, default="dual",
                      help="KV cache (Fast-dLLM): none, prefix, or dual (default)")
    _add_lazy_choices(dg, "--remasking", "moejax.diffusion.sampler", lambda m: m.REMASKING, default="low_confidence",
                      help="rank masked positions by confidence (default) or at random")
    _add_dtype(g, DTYPES)
    g.set_defaults(func=cmd_generate)

    t = sub.add_parser("train", help="train on a byte-level corpus (default: this Python's stdlib sources)")
    t.add_argument("--preset", help="model preset, e.g. tiny")
    t.add_argument("--config", help="model config JSON/YAML")
    t.add_argument("--train-config", help="TrainConfig JSON/YAML (flags below override it)")
    t.add_argument("--steps", type=positive_int)
    t.add_argument("--minutes", type=positive_float,
                   help="training time budget in minutes (--preset tiny defaults to 200 steps: ~6 min on 2 AVX-512 cores, ~10 on AVX2)")
    t.add_argument("--seq-len", type=positive_int)
    t.add_argument("--batch", type=positive_int, help="global batch (sequences per step)")
    t.add_argument("--lr", type=positive_float)
    t.add_argument("--seed", type=nonneg_int)
    t.add_argument("--router", choices=ALL_ROUTER_TYPES)
    t.add_argument("--dispatch", choices=DISPATCH_TYPES)
    t.add_argument("--sparsity", type=nm_ratio, metavar="N:M",
                   help="N:M sparse training: N weights kept in every M along each GEMM's reduction axis (e.g. 2:8); "
                        "attention, MLP and expert projections (router and embeddings dense)")
    t.add_argument("--sparsity-method", choices=SPARSITY_METHODS,
                   help="N:M method (default bdwp with --sparsity): srste, bdwp (bidirectional: the activation-gradient "
                        "GEMM sparse too), transposable (m <= 4), dense")
    t.add_argument("--sparsity-layers", type=sparsity_sites, metavar="SITES",
                   help=f"comma-separated sites made sparse, of {','.join(SPARSITY_SITES)} (default: all)")
    t.add_argument("--mtp", type=int_range(1, MAX_MTP_DEPTH), metavar="K",
                   help=f"add K (1..{MAX_MTP_DEPTH}) DeepSeek-V3 multi-token-prediction heads, trained with a weighted "
                        "extra loss (they draft tokens for serve --speculative mtp)")
    t.add_argument("--mtp-weight", type=positive_float, help="weight of the MTP losses (default 0.3, split over K)")
    t.add_argument("--train-only", choices=TRAIN_ONLY,
                   help="train only these parameters on a frozen model (mtp: the heads; needs --init-from)")
    t.add_argument("--init-from", metavar="RUN", help="start from a trained run's weights (same model apart from --mtp)")
    t.add_argument("--objective", choices=tuple(o for o in OBJECTIVES if o != "mtp"), default=None,
                   help="next_token (default; --mtp K adds multi-token prediction) or mdm: a masked diffusion LM "
                        "(LLaDA: bidirectional attention, masked-token loss weighted 1/t; validation reports its "
                        "ELBO in bits/byte; generate/serve then use the diffusion sampler)")
    t.add_argument("--corpus", help="text file or directory (default: the stdlib's .py files)")
    t.add_argument("--out", help="output directory (default runs/<preset>)")
    t.add_argument("--mesh", help="device mesh, e.g. expert=8 or data=2,expert=4 (CPU: set XLA_FLAGS="
                                  "--xla_force_host_platform_device_count=8)")
    t.add_argument("--schedule", default="none",
                   help="FSMoE scheduling of the expert-parallel step (needs --mesh): 'none', 'auto' (profile, "
                        "plan pipeline degrees and gradient buckets with the FSMoE cost model), or explicit "
                        "degrees 'R' or 'RFWD,RBWD' (e.g. 4,2)")
    t.add_argument("--profile", help="profile JSON for --schedule auto (default: measure a quick one on this mesh; "
                                     "see `moejax profile`); needs --schedule auto")
    t.add_argument("--two-level-a2a", action="store_true",
                   help="2-level (intra-node then inter-node) all-to-all on meshes with a node axis; needs --schedule "
                        "(e.g. --schedule 1: no pipelining)")
    t.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    t.add_argument("--coordinator", help="multi-process: coordinator host:port (or JAX_COORDINATOR_ADDRESS etc.)")
    t.add_argument("--num-processes", type=positive_int)
    t.add_argument("--process-id", type=nonneg_int)
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(func=cmd_train, check=functools.partial(_check_train, t))

    e = sub.add_parser("eval", help="validation bits/byte of a training checkpoint")
    e.add_argument("--ckpt", required=True, help="training run directory")
    e.add_argument("--corpus", help="text file or directory (default: the corpus recorded in the checkpoint; another "
                                    "corpus needs --allow-corpus-mismatch)")
    e.add_argument("--allow-corpus-mismatch", action="store_true",
                   help="evaluate on --corpus although its content hash differs from the checkpoint's corpus")
    e.add_argument("--batch", type=positive_int, default=16)
    e.add_argument("--max-batches", type=positive_int, default=None)
    e.add_argument("--infill", type=positive_int, metavar="N", default=None,
                   help="diffusion LM: infill accuracy on N held-out windows (one masked span each, one token a step)")
    e.add_argument("--infill-span", type=positive_int, default=32, help="masked tokens per window (default 32)")
    e.add_argument("--infill-window", type=positive_int, default=256, help="window length (default 256)")
    e.set_defaults(func=cmd_eval)

    x = sub.add_parser("export", help="export a training checkpoint as a Hugging Face directory")
    x.add_argument("--ckpt", required=True, help="training run directory")
    x.add_argument("--out", required=True, help="output directory (config.json + model.safetensors)")
    _add_lazy_choices(x, "--layout", "moejax.models.hf", lambda m: m.LAYOUTS, default="per_expert")
    x.add_argument("--dtype", choices=DTYPES, default=None)
    _add_lazy_choices(x, "--model-type", "moejax.models.hf", lambda m: m.SUPPORTED_MODEL_TYPES, default=None)
    x.add_argument("--overwrite", action="store_true")
    x.set_defaults(func=cmd_export)

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server (continuous batching, paged KV cache)")
    _add_model_source(s)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=port, default=8000)
    s.add_argument("--model-name", default=None, help="name clients use in 'model' (default: the source's name)")
    _add_lazy_choices(s, "--scheduler", "moejax.serve.scheduler", lambda m: sorted(m.SCHEDULERS), default="chunked")
    s.add_argument("--block-size", type=positive_int, default=16, help="tokens per KV block")
    s.add_argument("--num-blocks", type=int_range(2), default=None,
                   help="KV blocks in the pool (default: max-num-seqs full-length sequences)")
    s.add_argument("--max-num-seqs", type=positive_int, default=16, help="running requests (decode batch bound)")
    s.add_argument("--max-num-batched-tokens", type=positive_int, default=2048,
                   help="chunked prefill's token budget per iteration (default 2048: the up to 4 prompts one "
                        "iteration admits prefill whole, not cut into chunks, up to ~500 tokens each). Cost of larger: "
                        "a prefill iteration takes longer, so decoding requests see a longer gap between tokens "
                        "while prompts arrive, and more step shapes compile; of smaller: a prompt takes more "
                        "iterations")
    s.add_argument("--max-model-len", type=int_range(2), default=None, help="context length (default: the model's)")
    s.add_argument("--max-pending", type=positive_int, default=512, help="requests in flight before 503 + Retry-After")
    s.add_argument("--batch-wait-ms", type=float_range(0, 1000), default=2.0,
                   help="an idle engine's first step waits until no request has arrived for this long (at most 10x), "
                        "so a burst of concurrent requests is prefilled together; 0: no wait")
    s.add_argument("--no-prefix-cache", action="store_true")
    s.add_argument("--decode-steps", type=positive_int, default=None,
                   help="multi-step decoding: decode iterations per compiled call when every request is decoding "
                        "and nothing waits to be admitted (default 4, 1 with --speculative: the host's scheduling "
                        "and dispatch paid once per 4 tokens). Cost: streams receive tokens in groups of up to this many, a request that "
                        "arrives meanwhile waits for the group to end, and a request finishing inside a group costs "
                        "its row the rest of the group; 1 turns it off")
    s.add_argument("--async-scheduling", action="store_true",
                   help="schedule and pack the next iteration while the current one runs (NanoFlow / vLLM async "
                        "scheduling): hides the host's per-iteration work behind the step; a stop token is seen "
                        "one iteration late (that iteration's token for the request is discarded); outputs are "
                        "unchanged")
    s.add_argument("--nano-batches", type=int_range(1, 16), default=None,
                   help="NanoFlow nano-batching: each layer splits a step's rows into this many nano-batches for "
                        "attention and half as many for the FFN, so a GPU can overlap their operations (on "
                        "XLA:CPU nothing overlaps and 4 cost 0.5-0.8x the throughput here); default 1 (off)")
    s.add_argument("--warmup", nargs="?", const="blocking", choices=WARMUP_MODES, default="background",
                   help="compile the engine's step shapes ahead of use. background (default): /health answers at "
                        "once and the shapes compile on a thread while serving (until then a request whose shape is "
                        "not compiled yet waits for its compile, and compiling takes CPU from serving; /health "
                        "shows the progress); blocking (also plain --warmup): compile every shape before listening "
                        "(no compile pause while serving, but no /health for a minute or more on a small CPU); "
                        "none: compile each shape on first use")
    s.add_argument("--mesh", help="expert-parallel serving: a device mesh with only expert (and node) axes, e.g. "
                                  "expert=8: routed experts sharded, attention and KV cache replicated (CPU: set "
                                  "XLA_FLAGS=--xla_force_host_platform_device_count=8)")
    s.add_argument("--ep-capacity-factor", type=float_range(0, 1e6), default=0.0,
                   help="with --mesh: per-expert buffer rows per device as a multiple of the balanced share "
                        "(default 0: dropless, every buffer holds all of a device's rows)")
    _add_lazy_choices(s, "--eplb", "moejax.parallel.eplb", lambda m: m.POLICIES, default=None,
                      help="with --mesh: expert-placement load balancing (xLLM): dynamic (rebalance when the "
                           "decayed expert loads drift: cosine similarity below 0.9), static (DeepSeek's placement, "
                           "rerun every 1000 iterations as vLLM's --enable-eplb), none (redundant slots, never "
                           "rebalanced)")
    s.add_argument("--eplb-redundant-slots", type=int_range(0), default=None,
                   help="with --eplb: extra expert slots per device for replicas of the heaviest experts (default 1)")
    _add_lazy_choices(s, "--speculative", "moejax.serve.speculative", lambda m: m.SPECULATIVE_METHODS, default=None,
                      help="speculative decoding: mtp (the checkpoint's MTP heads, `moejax train --mtp K`, draft "
                           "tokens; one forward verifies them; greedy output unchanged, sampled output has the same "
                           "distribution)")
    s.add_argument("--num-speculative-tokens", type=int_range(1, MAX_MTP_DEPTH), default=None,
                   help="with --speculative: drafts per request and step (default 1; at most the model's MTP heads)")
    s.add_argument("--speculative-max-batch", type=positive_int, default=None,
                   help="with --speculative: plain steps while more requests than this decode (default: always "
                        "speculate)")
    s.add_argument("--seed", type=seed32, default=0)
    _add_dtype(s, DTYPES)
    s.add_argument("--offload", help="serve from an offload store (`moejax offload prepare`): experts on disk")
    s.add_argument("--expert-memory-budget", help="expert bytes kept in memory with --offload: a percentage of "
                                                  "all expert bytes (e.g. 50%%) or a size (e.g. 2GB, 512MiB); "
                                                  "default 100%%")
    _add_lazy_choices(s, "--offload-policy", "moejax.offload.cache", _servable_policies, default=None,
                      help=f"expert cache policy with --offload (default {OFFLOAD_DEFAULTS['offload_policy']})")
    _add_lazy_choices(s, "--offload-io", "moejax.offload.store", lambda m: m.IO_MODES, default=None,
                      help=f"how --offload reads experts (default {OFFLOAD_DEFAULTS['offload_io']})")
    s.add_argument("--offload-bits", type=_offload_bits, default=None,
                   help="quantized stores: a fixed width (e.g. 8) or 'router' (D2MoE bit-width router + HEBF)")
    s.add_argument("--offload-avg-bits", type=positive_float, default=None,
                   help="with the bit-width router: the mean width of the activated experts per layer and step "
                        "(D2MoE's bit budget, e.g. 3); default: only the memory budget bounds the widths")
    dg = s.add_argument_group("diffusion LM (a checkpoint trained with --objective mdm)")
    dg.add_argument("--diffusion-block-length", type=positive_int, default=32,
                    help="tokens per block; a request's max_tokens must be a multiple of it (default 32)")
    dg.add_argument("--diffusion-steps-per-block", type=positive_int, default=None,
                    help="denoising steps per block (default: the block length, one token a step); a request may "
                         "send 'steps' over its whole generation instead")
    _add_lazy_choices(dg, "--diffusion-scheduler", "moejax.diffusion.engine", lambda m: m.DIFFUSION_SCHEDULERS,
                      default="phase", help="phase: phase-multiplexed (dLLM-Serve, default); static: lockstep batches")
    dg.add_argument("--diffusion-token-budget", type=positive_int, default=4096,
                    help="tokens per iteration (a refresh step costs the canvas, a reuse step the block)")
    dg.add_argument("--diffusion-memory", metavar="SIZE", default=None,
                    help="memory the engine may use (e.g. 4GiB): the KV pool gets what is left after the weights and "
                         "the largest step's temporaries (compiled memory analysis); default: a pool for "
                         "--max-num-seqs canvases of --max-model-len")
    s.set_defaults(func=cmd_serve, check=functools.partial(_check_serve, s))

    o = sub.add_parser("offload", help="expert offloading tools")
    osub = o.add_subparsers(dest="offload_command", required=True)
    op = osub.add_parser("prepare", help="write a model's experts to an aligned on-disk store")
    _add_model_source(op)
    op.add_argument("--out", required=True, help="output directory")
    op.add_argument("--overwrite", action="store_true")
    op.add_argument("--quant", choices=QUANT_PRESETS, default="none",
                    help="store experts quantized: D2MoE nested bit-planes (mwq: 2/3/4/8 bits) or uniform int8/int4")
    op.add_argument("--seed", type=seed32, default=0)
    _add_dtype(op, DTYPES)
    op.set_defaults(func=cmd_offload_prepare)

    pr = sub.add_parser("profile", help="time collectives and expert GEMMs on this machine, fit alpha-beta "
                                        "models (FSMoE online profiling), write a profile JSON")
    pr.add_argument("--devices", type=positive_int, default=None,
                    help="devices on the profiled mesh axis (default: all)")
    pr.add_argument("--host-devices", type=positive_int, default=None,
                    help="CPU: virtual host devices (sets --xla_force_host_platform_device_count if unset)")
    pr.add_argument("--out", default="profile.json", help="output JSON path (written atomically)")
    pr.add_argument("--quick", action="store_true", help="few sizes and repeats (seconds on CPU)")
    pr.add_argument("--dtype", choices=DTYPES, default="float32")
    pr.add_argument("--no-progress", action="store_true")
    pr.set_defaults(func=cmd_profile)

    p = sub.add_parser("presets", help="list model presets with parameter counts")
    p.set_defaults(func=cmd_presets)

    from moejax.vision.cli import register as register_vision
    register_vision(sub)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    check = getattr(args, "check", None)
    if check is not None:  # flag combinations a command cannot honour: exit 2 before any work
        check(args)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
