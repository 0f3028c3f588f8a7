"""Online profiler: alpha-beta fitting, profile JSON round trip, a quick measured profile on the 8 CPU devices,
the shipped published profile, and the `moejax profile` CLI."""

import json
import math
import os

import numpy as np
import pytest

from moejax.schedule.profile import (
    REQUIRED_OPS,
    OpFit,
    Profile,
    collective_factor,
    fit_alpha_beta,
    load_packaged,
    packaged_profiles,
    run_profile,
)


@pytest.mark.parametrize("alpha, beta", [(2e-5, 1e-10), (3e-4, 4e-12), (0.0, 1e-9)])
def test_fit_recovers_known_coefficients(alpha, beta):
    rng = np.random.default_rng(0)
    n = np.geomspace(1e3, 1e8, 12)
    t = (alpha + beta * n) * (1 + 0.01 * rng.standard_normal(n.shape))  # 1% multiplicative noise
    a, b, r2, mr = fit_alpha_beta(n, t)
    assert b == pytest.approx(beta, rel=0.03)
    assert a == pytest.approx(alpha, rel=0.05, abs=1e-7)
    assert r2 > 0.99 and mr < 0.05
    # exact data: exact fit
    a, b, r2, mr = fit_alpha_beta(n, alpha + beta * n + (1e-9 if alpha == 0 else 0))
    assert b == pytest.approx(beta, rel=1e-6) and mr < 1e-6


def test_fit_is_nonnegative_and_validates():
    a, b, *_ = fit_alpha_beta([1, 2, 3, 4], [4.0, 3.0, 2.0, 1.0])  # decreasing data: beta clamped at 0
    assert a > 0 and b == 0.0
    with pytest.raises(ValueError, match="2 points"):
        fit_alpha_beta([1.0], [1.0])
    with pytest.raises(ValueError, match="times"):
        fit_alpha_beta([1.0, 2.0], [1.0, -1.0])


def test_profile_json_round_trip(tmp_path):
    ops = {op: OpFit(1e-5 * (i + 1), 1e-10 * (i + 1), "flops" if op == "gemm" else "bytes", 0.99, 0.02, 3,
                     (1.0, 2.0, 3.0), (1.0, 2.0, 3.0)) for i, op in enumerate(REQUIRED_OPS)}
    p = Profile(ops=ops, device_kind="cpu", platform="cpu", devices_per_node=8, axis_name="x", notes="t")
    path = tmp_path / "sub" / "p.json"
    p.save(path)
    assert not [f for f in os.listdir(path.parent) if f.startswith(".tmp")]  # atomic write left nothing behind
    q = Profile.load(path)
    assert q == p
    assert q.time("gemm", 10.0) == pytest.approx(5e-5 + 5e-10 * 10)
    assert q.time("all_to_all", 0) == 0.0
    assert json.loads(path.read_text())["format_version"] == 1
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        Profile.load(tmp_path / "bad.json")


def test_published_profile_shipped():
    assert "a100_4x8_ib200" in packaged_profiles()
    p = load_packaged("a100_4x8_ib200")
    assert p.source == "published" and all(f.source == "published" for f in p.ops.values())
    assert p.nodes == 4 and p.devices_per_node == 8
    assert "not the paper's testbed" in p.notes.lower() or "NOT the paper's testbed" in p.notes
    # 1 GiB all-reduce inside a node at 230 GB/s busbw: 2*7/8 * 2^30 / 230e9 s + latency
    assert p.time("all_reduce", 2 ** 30) == pytest.approx(20e-6 + 1.75 * 2 ** 30 / 230e9)
    assert p.time("gemm", 230e12) == pytest.approx(1.0 + 10e-6)
    assert collective_factor("all_to_all_inter", 4) == 0.75
    with pytest.raises(ValueError, match="not shipped"):
        load_packaged("h100_made_up")
    with pytest.raises(ValueError, match="inter_busbw_GBps"):
        Profile.from_published(device_kind="x", nodes=2, devices_per_node=8, intra_busbw_GBps=100,
                               intra_latency_s=1e-5, gemm_tflops=100, gemm_latency_s=1e-5)


def test_quick_measured_profile_on_cpu_devices():
    import jax
    progress = []
    p = run_profile(quick=True, collective_bytes=(1 << 12, 1 << 16, 1 << 19), gemm_tokens=(16, 64, 256),
                    repeats=2, warmup=1, progress=progress.append)
    assert p.source == "measured" and p.devices_per_node == len(jax.devices()) == 8
    assert len(progress) == 4 * 3 + 3
    for op in REQUIRED_OPS:
        f = p.ops[op]
        assert f.source == "measured" and f.n_points == 3
        assert math.isfinite(f.alpha_s) and math.isfinite(f.beta_s_per_unit)
        assert f.alpha_s + f.beta_s_per_unit > 0 and f.alpha_s >= 0 and f.beta_s_per_unit >= 0
        assert all(t > 0 for t in f.times_s)
    assert Profile.from_dict(json.loads(json.dumps(p.to_dict()))) == p
    with pytest.raises(ValueError, match="axis_name"):
        run_profile(mesh=jax.sharding.Mesh(np.array(jax.devices()), ("expert",)), axis_name="x", quick=True)


def test_cli_profile_quick(tmp_path, capsys):
    from moejax.cli import main
    out = tmp_path / "prof.json"
    assert main(["profile", "--quick", "--devices", "4", "--out", str(out), "--no-progress"]) == 0
    p = Profile.load(out)
    assert p.devices_per_node == 4 and p.source == "measured"
    assert "wrote" in capsys.readouterr().out
