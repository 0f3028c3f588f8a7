"""`moejax` flag validation: numeric ranges and flag combinations a command cannot honour exit 2 at parse time,
naming the flag (and the allowed range or the flag it needs), before any model is built."""

import pytest

from moejax.cli import build_parser, main


def _exit_message(capsys, argv) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2, argv
    return capsys.readouterr().err


@pytest.mark.parametrize("value", ["0", "-1", "x"])
def test_serve_max_pending_below_one_is_rejected(capsys, value):
    err = _exit_message(capsys, ["serve", "--preset", "tiny", "--max-pending", value])
    assert "--max-pending" in err and ">= 1" in err


def test_async_engine_rejects_max_pending_below_one():
    from moejax.serve.server import AsyncEngine

    for bad in (0, -3, 1.5, True):
        with pytest.raises(ValueError, match="max_pending"):
            AsyncEngine(None, max_pending=bad)


@pytest.mark.parametrize("argv, flag, allowed", [
    (["serve", "--preset", "tiny", "--port", "0"], "--port", "[1, 65535]"),
    (["serve", "--preset", "tiny", "--port", "65536"], "--port", "[1, 65535]"),
    (["serve", "--preset", "tiny", "--block-size", "0"], "--block-size", ">= 1"),
    (["serve", "--preset", "tiny", "--num-blocks", "1"], "--num-blocks", ">= 2"),
    (["serve", "--preset", "tiny", "--max-num-seqs", "0"], "--max-num-seqs", ">= 1"),
    (["serve", "--preset", "tiny", "--max-num-batched-tokens", "-5"], "--max-num-batched-tokens", ">= 1"),
    (["serve", "--preset", "tiny", "--max-model-len", "1"], "--max-model-len", ">= 2"),
    (["serve", "--preset", "tiny", "--batch-wait-ms", "-1"], "--batch-wait-ms", "[0, 1000]"),
    (["serve", "--preset", "tiny", "--batch-wait-ms", "1001"], "--batch-wait-ms", "[0, 1000]"),
    (["serve", "--preset", "tiny", "--decode-steps", "0"], "--decode-steps", ">= 1"),
    (["serve", "--offload", "store", "--offload-avg-bits", "0"], "--offload-avg-bits", "> 0"),
    (["serve", "--offload", "store", "--offload-bits", "fast"], "--offload-bits", "'router'"),
    (["train", "--preset", "tiny", "--steps", "0"], "--steps", ">= 1"),
    (["train", "--preset", "tiny", "--batch", "0"], "--batch", ">= 1"),
    (["train", "--preset", "tiny", "--seq-len", "-1"], "--seq-len", ">= 1"),
    (["train", "--preset", "tiny", "--minutes", "0"], "--minutes", "> 0"),
    (["train", "--preset", "tiny", "--lr", "-0.1"], "--lr", "> 0"),
    (["train", "--preset", "tiny", "--lr", "nan"], "--lr", "> 0"),
    (["train", "--preset", "tiny", "--seed", "-1"], "--seed", ">= 0"),
    (["generate", "--preset", "tiny", "--max-new-tokens", "0"], "--max-new-tokens", ">= 1"),
    (["generate", "--preset", "tiny", "--temperature", "-0.5"], "--temperature", ">= 0"),
    (["generate", "--preset", "tiny", "--top-p", "0"], "--top-p", "(0, 1]"),
    (["generate", "--preset", "tiny", "--top-p", "1.5"], "--top-p", "(0, 1]"),
    (["eval", "--ckpt", "run", "--batch", "0"], "--batch", ">= 1"),
    (["eval", "--ckpt", "run", "--max-batches", "0"], "--max-batches", ">= 1"),
    (["profile", "--devices", "0"], "--devices", ">= 1"),
])
def test_numeric_flags_out_of_range_are_rejected(capsys, argv, flag, allowed):
    err = _exit_message(capsys, argv)
    assert f"argument {flag}:" in err and allowed in err


def test_numeric_flags_in_range_parse():
    args = build_parser().parse_args(["serve", "--preset", "tiny", "--max-pending", "1", "--port", "65535",
                                      "--batch-wait-ms", "0", "--num-blocks", "2", "--max-model-len", "2",
                                      "--offload-bits", "router"])
    assert (args.max_pending, args.port, args.batch_wait_ms, args.num_blocks, args.max_model_len) == (1, 65535, 0.0,
                                                                                                     2, 2)
    assert args.offload_bits == "router"
    assert build_parser().parse_args(["serve", "--offload", "s", "--offload-bits", "8"]).offload_bits == 8
    args = build_parser().parse_args(["generate", "--preset", "tiny", "--top-p", "1", "--temperature", "0"])
    assert (args.top_p, args.temperature) == (1.0, 0.0)


@pytest.mark.parametrize("extra, given", [
    (["--expert-memory-budget", "50%"], "--expert-memory-budget"),
    (["--offload-policy", "lru"], "--offload-policy"),  # the default value, given explicitly: still an error
    (["--offload-io", "direct"], "--offload-io"),
    (["--offload-bits", "8"], "--offload-bits"),
    (["--offload-avg-bits", "3"], "--offload-avg-bits"),
])
def test_serve_offload_flags_need_offload(capsys, extra, given):
    err = _exit_message(capsys, ["serve", "--preset", "tiny", *extra])
    assert f"{given} needs --offload" in err


@pytest.mark.parametrize("extra, given, needed", [
    (["--warmup"], "--warmup", "--preset/--config/--hf/--ckpt"),
    (["--dtype", "bfloat16"], "--dtype", "offload prepare"),
    (["--preset", "tiny"], "--offload replaces", "--preset/--config/--hf/--ckpt"),
])
def test_serve_flags_that_do_not_apply_with_offload(capsys, extra, given, needed):
    err = _exit_message(capsys, ["serve", "--offload", "store", *extra])
    assert given in err and needed in err


@pytest.mark.parametrize("extra, needed", [
    (["--two-level-a2a"], "--two-level-a2a needs --schedule"),
    (["--profile", "p.json"], "--profile needs --schedule auto"),
    (["--profile", "p.json", "--schedule", "4,2", "--mesh", "expert=8"], "--profile needs --schedule auto"),
])
def test_train_schedule_flags_need_schedule(capsys, extra, needed):
    err = _exit_message(capsys, ["train", "--preset", "tiny", *extra])
    assert needed in err


def test_flag_defaults_resolve_when_not_given():
    """Flags whose use depends on another are None when not given (the command resolves their defaults), and the
    combinations that work pass the checks."""
    args = build_parser().parse_args(["serve", "--preset", "tiny"])
    assert args.dtype is None and args.offload_policy is None and args.offload_io is None
    args.check(args)
    args = build_parser().parse_args(["serve", "--offload", "store", "--offload-policy", "lfu",
                                      "--expert-memory-budget", "50%"])
    args.check(args)
    args = build_parser().parse_args(["train", "--preset", "tiny", "--two-level-a2a", "--schedule", "1",
                                      "--mesh", "node=2,expert=4"])
    args.check(args)
    args = build_parser().parse_args(["train", "--preset", "tiny", "--profile", "p.json", "--schedule", "auto",
                                      "--mesh", "expert=8"])
    args.check(args)


@pytest.mark.parametrize("extra, needed", [
    (["--sparsity", "2:0"], "argument --sparsity: '2:0': N:M needs 0 < N <= M"),
    (["--sparsity", "3:2"], "N:M needs 0 < N <= M"),
    (["--sparsity", "2-8"], "is not N:M"),
    (["--sparsity", "2:8", "--sparsity-method", "bdwp2"], "argument --sparsity-method: invalid choice"),
    (["--sparsity", "2:8", "--sparsity-layers", "router"], "subset of attention, mlp, experts"),
    (["--sparsity-method", "srste"], "--sparsity-method/--sparsity-layers need --sparsity N:M"),
    (["--sparsity", "2:8", "--sparsity-method", "transposable"], "transposable needs M <= 4"),
])
def test_train_sparsity_flags(capsys, extra, needed):
    err = _exit_message(capsys, ["train", "--preset", "tiny", *extra])
    assert needed in err


def test_train_sparsity_flags_build_the_config():
    from moejax.cli import _train_configs
    from moejax.config import SparsityConfig

    args = build_parser().parse_args(["train", "--preset", "tiny", "--sparsity", "2:8"])
    args.check(args)
    assert _train_configs(args)[1].sparsity == SparsityConfig(n=2, m=8, method="bdwp")
    args = build_parser().parse_args(["train", "--preset", "tiny", "--sparsity", "1:4", "--sparsity-method",
                                      "srste", "--sparsity-layers", "experts,mlp"])
    assert _train_configs(args)[1].sparsity == SparsityConfig(n=1, m=4, method="srste", layers=("experts", "mlp"))
    assert _train_configs(build_parser().parse_args(["train", "--preset", "tiny"]))[1].sparsity is None


@pytest.mark.parametrize("argv, needed", [
    (["serve", "--preset", "tiny", "--ep-capacity-factor", "1"], "--ep-capacity-factor needs --mesh"),
    (["serve", "--offload", "store", "--mesh", "expert=8"], "--mesh does not combine with --offload"),
    (["serve", "--preset", "tiny", "--mesh", "expert=8", "--ep-capacity-factor", "-1"], "--ep-capacity-factor"),
])
def test_serve_mesh_flags(capsys, argv, needed):
    assert needed in _exit_message(capsys, argv)


@pytest.mark.parametrize("argv, needed", [
    (["serve", "--preset", "tiny", "--eplb", "dynamic"], "--eplb/--eplb-redundant-slots need --mesh"),
    (["serve", "--preset", "tiny", "--mesh", "expert=8", "--eplb-redundant-slots", "2"],
     "--eplb-redundant-slots needs --eplb"),
    (["serve", "--preset", "tiny", "--mesh", "expert=8", "--eplb", "sometimes"], "--eplb"),
])
def test_serve_eplb_flags(capsys, argv, needed):
    assert needed in _exit_message(capsys, argv)


def test_serve_mesh_builds_the_expert_parallel_runner(monkeypatch, capsys, tmp_path):
    """`moejax serve --mesh expert=8 --eplb dynamic` builds the engine on an ExpertParallelRunner with EPLB (the
    HTTP server itself replaced: the test stops where it would listen)."""
    import json

    from moejax.serve import server
    from moejax.serve.ep_runner import ExpertParallelRunner

    seen = {}
    monkeypatch.setattr(server, "serve", lambda engine, *a, **k: seen.setdefault("engine", engine))
    cfg = {"vocab_size": 64, "d_model": 16, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1, "d_ff": 32,
           "max_seq_len": 64, "moe": {"num_experts": 8, "d_ff": 16, "router": {"type": "topk", "top_k": 2}}}
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(cfg))
    assert main(["serve", "--config", str(path), "--mesh", "expert=8", "--eplb", "dynamic", "--warmup", "none"]) == 0
    runner = seen["engine"].runner
    assert isinstance(runner, ExpertParallelRunner) and runner.eplb.policy == "dynamic"
    assert runner.eplb.redundant_slots == 1 and runner.placement.slots.shape[1] == 16
    assert "EPLB dynamic, 1 redundant slots per device" in capsys.readouterr().err


@pytest.mark.parametrize("argv, needed", [
    (["serve", "--preset", "tiny", "--num-speculative-tokens", "2"], "need --speculative mtp"),
    (["serve", "--preset", "tiny", "--speculative", "mtp", "--mesh", "expert=8"], "not with --mesh"),
    (["serve", "--preset", "tiny", "--speculative", "mtp", "--decode-steps", "4"], "choose one"),
    (["serve", "--preset", "tiny", "--speculative", "mtp", "--async-scheduling"], "choose one"),
    (["serve", "--preset", "tiny", "--nano-batches", "2", "--scheduler", "layered"], "--scheduler chunked"),
    (["serve", "--preset", "tiny", "--nano-batches", "2", "--mesh", "expert=8"], "not with --speculative"),
    (["serve", "--preset", "tiny", "--nano-batches", "17"], "--nano-batches"),
    (["serve", "--preset", "tiny", "--speculative", "mtp", "--scheduler", "layered"], "--scheduler chunked"),
    (["serve", "--preset", "tiny", "--speculative", "eagle"], "--speculative"),
    (["serve", "--preset", "tiny", "--speculative", "mtp", "--num-speculative-tokens", "9"],
     "--num-speculative-tokens"),
    (["train", "--preset", "tiny", "--mtp", "0"], "--mtp"),
    (["train", "--preset", "tiny", "--train-only", "mtp"], "need --mtp K"),
    (["train", "--preset", "tiny", "--mtp", "1", "--train-only", "mtp"], "give --init-from RUN"),
])
def test_speculative_and_mtp_flags(capsys, argv, needed):
    assert needed in _exit_message(capsys, argv)


def test_train_mtp_and_serve_speculative_configs(monkeypatch, tmp_path):
    """`train --mtp 2` sets mtp_depth and the mtp objective; `serve --speculative mtp` builds a speculative engine
    with decode_steps 1 (server replaced)."""
    import json

    from moejax.cli import _train_configs
    from moejax.serve import server

    cfg, tc = _train_configs(build_parser().parse_args(["train", "--preset", "tiny", "--mtp", "2", "--mtp-weight",
                                                        "0.5"]))
    assert cfg.mtp_depth == 2 and tc.objective == "mtp" and tc.mtp_weight == 0.5
    mcfg = {"vocab_size": 64, "d_model": 16, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1, "d_ff": 32,
            "max_seq_len": 64, "mtp_depth": 2, "moe": None}
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(mcfg))
    seen = {}
    monkeypatch.setattr(server, "serve", lambda engine, *a, **k: seen.setdefault("engine", engine))
    assert main(["serve", "--config", str(path), "--speculative", "mtp", "--num-speculative-tokens", "2",
                 "--speculative-max-batch", "8", "--warmup", "none"]) == 0
    ec = seen["engine"].cfg
    assert (ec.speculative, ec.num_speculative_tokens, ec.speculative_max_batch, ec.decode_steps) == ("mtp", 2, 8, 1)


def test_serve_async_scheduling_and_nano_batches_build_the_engine(monkeypatch):
    """`serve --async-scheduling --nano-batches 4` builds an engine with both set (server replaced)."""
    from moejax.serve import server

    seen = {}
    monkeypatch.setattr(server, "serve", lambda engine, *a, **k: seen.setdefault("engine", engine))
    assert main(["serve", "--preset", "tiny", "--async-scheduling", "--nano-batches", "4", "--warmup", "none"]) == 0
    ec = seen["engine"].cfg
    assert ec.async_scheduling and ec.nano_batches == 4
