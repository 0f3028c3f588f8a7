"""Online profiling of MoE communication and compute: alpha-beta models ``t = alpha + beta * n``.

FSMoE (arXiv 2501.10714) schedules from linear performance models fitted online. This module

* times ``all_to_all``, ``all_gather``, ``reduce_scatter`` (``psum_scatter``), ``all_reduce`` (``psum``) inside
  ``jax.shard_map`` on a mesh axis, and the batched expert GEMM ``[E, n, d_model] x [E, d_model, d_ff]`` on one
  device, over a sweep of sizes (warm-up, ``block_until_ready``, median of repeats; compile time excluded);
* fits ``t = alpha + beta * n`` per operation by non-negative least squares on relative residuals, with fit
  quality (``r2``, ``max_rel_residual``);
* stores the fits in a :class:`Profile` (JSON save/load with atomic writes, strict validation), and builds
  profiles by hand from published bandwidth/latency figures (:meth:`Profile.from_published`), marked
  ``source="published"`` so modelled hardware is never confused with measured hardware.

Units. ``n`` is bytes for collectives and FLOPs for ``gemm``. For collectives ``n`` follows the nccl-tests
convention: the per-device size of the *full* buffer (the input of ``all_to_all``, ``all_reduce`` and
``reduce_scatter``, the output of ``all_gather``). Operations named ``*_inter`` are optional inter-node
variants (the cross-node phase of a 2-level collective) used for clusters of several nodes.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

COLLECTIVE_OPS = ("all_to_all", "all_gather", "reduce_scatter", "all_reduce")
REQUIRED_OPS = COLLECTIVE_OPS + ("gemm",)
INTER_OPS = tuple(f"{op}_inter" for op in COLLECTIVE_OPS)
ALL_OPS = REQUIRED_OPS + INTER_OPS
SOURCES = ("measured", "published")
FORMAT_VERSION = 1

# Sweeps (bytes per device for collectives, tokens per expert for the GEMM).
DEFAULT_COLLECTIVE_BYTES = tuple(2 ** k for k in range(12, 25, 2))      # 4 KiB .. 16 MiB
QUICK_COLLECTIVE_BYTES = (1 << 12, 1 << 15, 1 << 18, 1 << 20)            # 4 KiB .. 1 MiB
DEFAULT_GEMM_TOKENS = (16, 32, 64, 128, 256, 512)
QUICK_GEMM_TOKENS = (16, 64, 128, 256)


def unit_of(op: str) -> str:
    """``"flops"`` for ``gemm``, ``"bytes"`` for the collectives."""
    return "flops" if op == "gemm" else "bytes"


def collective_factor(op: str, group: int) -> float:
    """nccl-tests bus-bandwidth factor: ``time = size * factor / busbw`` for a group of ``group`` devices."""
    base = op.removesuffix("_inter")
    if group <= 1:
        return 0.0
    if base == "all_reduce":
        return 2.0 * (group - 1) / group
    if base in ("all_gather", "reduce_scatter", "all_to_all"):
        return (group - 1) / group
    raise ValueError(f"collective_factor: op {op!r} is not a collective; allowed: {COLLECTIVE_OPS + INTER_OPS}")


@dataclass(frozen=True)
class OpFit:
    """The fitted (or published) linear time model of one operation: ``time_s = alpha_s + beta_s_per_unit * n``.

    Attributes:
      alpha_s: fixed cost per call in seconds (launch + latency), ``>= 0``.
      beta_s_per_unit: seconds per unit of ``n`` (per byte for collectives, per FLOP for ``gemm``), ``>= 0``.
      unit: ``"bytes"`` or ``"flops"`` (see module docstring for what ``n`` counts).
      r2: coefficient of determination of the fit on the measured points (``None`` for published figures).
      max_rel_residual: the largest ``|t_fit - t_measured| / t_measured`` over the points (``None`` if published).
      n_points: number of sizes measured (0 for published figures).
      sizes: the sizes ``n`` measured (empty for published figures).
      times_s: the median measured time of each size.
      source: ``"measured"`` (timed on this machine) or ``"published"`` (from vendor/paper figures).
      notes: free text: how the figure was obtained, its sources.
    """

    alpha_s: float
    beta_s_per_unit: float
    unit: str
    r2: float | None = None
    max_rel_residual: float | None = None
    n_points: int = 0
    sizes: tuple[float, ...] = ()
    times_s: tuple[float, ...] = ()
    source: str = "measured"
    notes: str = ""

    def time(self, n: float) -> float:
        """Modelled seconds for size ``n`` (0 for ``n <= 0``: no call is made)."""
        return 0.0 if n <= 0 else self.alpha_s + self.beta_s_per_unit * float(n)


def _isnum(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_nonneg(where: str, name: str, value) -> None:
    if not _isnum(value):
        raise ValueError(f"{where}.{name}: must be a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{where}.{name}: must be finite and >= 0, got {value!r}")


def _validate_op(op: str, fit: Any) -> None:
    where = f"Profile.ops[{op!r}]"
    if not isinstance(fit, OpFit):
        raise ValueError(f"{where}: must be an OpFit, got {type(fit).__name__}")  # noqa: TRY004
    _check_nonneg(where, "alpha_s", fit.alpha_s)
    _check_nonneg(where, "beta_s_per_unit", fit.beta_s_per_unit)
    if fit.alpha_s == 0 and fit.beta_s_per_unit == 0:
        raise ValueError(f"{where}: alpha_s and beta_s_per_unit are both 0 (an operation cannot be free)")
    if fit.unit != unit_of(op):
        raise ValueError(f"{where}.unit: must be {unit_of(op)!r} for {op!r}, got {fit.unit!r}")
    if fit.source not in SOURCES:
        raise ValueError(f"{where}.source: must be one of {SOURCES}, got {fit.source!r}")
    if fit.r2 is not None and not (_isnum(fit.r2) and math.isfinite(fit.r2) and fit.r2 <= 1.0 + 1e-9):
        raise ValueError(f"{where}.r2: must be a finite number <= 1 or null, got {fit.r2!r}")
    if fit.max_rel_residual is not None:
        _check_nonneg(where, "max_rel_residual", fit.max_rel_residual)
    if not isinstance(fit.n_points, int) or isinstance(fit.n_points, bool) or fit.n_points < 0:
        raise ValueError(f"{where}.n_points: must be an int >= 0, got {fit.n_points!r}")
    if len(fit.sizes) != len(fit.times_s):
        raise ValueError(f"{where}.sizes/times_s: lengths differ ({len(fit.sizes)} vs {len(fit.times_s)})")
    if not isinstance(fit.notes, str):
        raise ValueError(f"{where}.notes: must be a string, got {type(fit.notes).__name__}")  # noqa: TRY004


@dataclass(frozen=True)
class Profile:
    """Alpha-beta models of the MoE operations on one machine or modelled cluster.

    Attributes:
      ops: operation name -> :class:`OpFit`; must hold every name in ``REQUIRED_OPS`` (``all_to_all``,
        ``all_gather``, ``reduce_scatter``, ``all_reduce``, ``gemm``), may hold ``INTER_OPS`` (inter-node
        phases of 2-level collectives, needed when ``nodes > 1``).
      source: ``"measured"`` or ``"published"`` (the whole profile; each op also says its own).
      device_kind: e.g. ``"cpu"`` or ``"NVIDIA A100-SXM4-80GB"``.
      platform: jax backend (``cpu``, ``gpu``, ``tpu``) or ``"modelled"`` for published profiles.
      nodes: number of nodes the collectives span (1 for a single host).
      devices_per_node: devices in one node (the group of the intra-node collectives).
      axis_name: the mesh axis the collectives were timed over (measured profiles).
      dtype: element type used for the measurements / GEMM rate.
      jax_version: jax version that measured it (empty for published).
      created: ISO-8601 UTC timestamp.
      notes: free text (for published profiles: every figure and its source).
    """

    ops: Mapping[str, OpFit]
    source: str = "measured"
    device_kind: str = ""
    platform: str = ""
    nodes: int = 1
    devices_per_node: int = 1
    axis_name: str = ""
    dtype: str = "float32"
    jax_version: str = ""
    created: str = ""
    notes: str = ""

    @property
    def n_devices(self) -> int:
        """Devices in the whole modelled group (``nodes * devices_per_node``)."""
        return self.nodes * self.devices_per_node

    def validate(self) -> Profile:
        """Raise ``ValueError`` naming the field if anything is malformed; return ``self``."""
        if not isinstance(self.ops, Mapping):
            raise ValueError(f"Profile.ops: must be a mapping of op name -> OpFit, got {type(self.ops).__name__}")  # noqa: TRY004
        unknown = sorted(set(self.ops) - set(ALL_OPS))
        if unknown:
            raise ValueError(f"Profile.ops: unknown op name(s) {unknown}; allowed: {list(ALL_OPS)}")
        missing = [op for op in REQUIRED_OPS if op not in self.ops]
        if missing:
            raise ValueError(f"Profile.ops: missing required op(s) {missing}; required: {list(REQUIRED_OPS)}")
        for op, fit in self.ops.items():
            _validate_op(op, fit)
        if self.source not in SOURCES:
            raise ValueError(f"Profile.source: must be one of {SOURCES}, got {self.source!r}")
        for name in ("nodes", "devices_per_node"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"Profile.{name}: must be an int >= 1, got {v!r}")
        if self.nodes > 1:
            missing = [op for op in INTER_OPS if op not in self.ops]
            if missing:
                raise ValueError(f"Profile.ops: nodes={self.nodes} > 1 needs the inter-node op(s) {missing}")
        for name in ("device_kind", "platform", "axis_name", "dtype", "jax_version", "created", "notes"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"Profile.{name}: must be a string, got {type(getattr(self, name)).__name__}")  # noqa: TRY004
        return self

    def fit(self, op: str) -> OpFit:
        """The :class:`OpFit` of ``op`` (``ValueError`` naming the allowed ops if absent)."""
        if op not in self.ops:
            raise ValueError(f"Profile.ops: no op {op!r}; this profile has {sorted(self.ops)}")
        return self.ops[op]

    def time(self, op: str, n: float) -> float:
        """Modelled seconds of ``op`` at size ``n`` (bytes or FLOPs)."""
        return self.fit(op).time(n)

    # --- serialization -------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in ("source", "device_kind", "platform", "nodes", "devices_per_node",
                                           "axis_name", "dtype", "jax_version", "created", "notes")}
        d["format_version"] = FORMAT_VERSION
        d["ops"] = {op: {**dataclasses.asdict(f), "sizes": list(f.sizes), "times_s": list(f.times_s)}
                    for op, f in self.ops.items()}
        return d

    @classmethod
    def from_dict(cls, d: Any) -> Profile:
        """Build and validate a profile from parsed JSON; malformed input raises ``ValueError`` naming the field."""
        if not isinstance(d, Mapping):
            raise ValueError(f"Profile: the JSON must be an object, got {type(d).__name__}")  # noqa: TRY004
        if "ops" not in d:
            raise ValueError("Profile.ops: missing")
        raw_ops = d["ops"]
        if not isinstance(raw_ops, Mapping):
            raise ValueError(f"Profile.ops: must be an object of op name -> fit, got {type(raw_ops).__name__}")  # noqa: TRY004
        known = {f.name for f in dataclasses.fields(OpFit)}
        ops = {}
        for op, raw in raw_ops.items():
            where = f"Profile.ops[{op!r}]"
            if not isinstance(raw, Mapping):
                raise ValueError(f"{where}: must be an object, got {type(raw).__name__}")  # noqa: TRY004
            extra = sorted(set(raw) - known)
            if extra:
                raise ValueError(f"{where}: unknown field(s) {extra}; allowed: {sorted(known)}")
            for req in ("alpha_s", "beta_s_per_unit"):
                if req not in raw:
                    raise ValueError(f"{where}.{req}: missing")
                if raw[req] is None:
                    raise ValueError(f"{where}.{req}: must be a number, got null")
            kw = dict(raw)
            kw.setdefault("unit", unit_of(op))
            for name in ("sizes", "times_s"):
                v = kw.get(name, ())
                if not isinstance(v, (list, tuple)) or not all(_isnum(x) for x in v):
                    raise ValueError(f"{where}.{name}: must be a list of numbers")
                kw[name] = tuple(float(x) for x in v)
            ops[op] = OpFit(**kw)
        top = {f.name for f in dataclasses.fields(cls)} | {"format_version"}
        extra = sorted(set(d) - top)
        if extra:
            raise ValueError(f"Profile: unknown field(s) {extra}; allowed: {sorted(top)}")
        fv = d.get("format_version", FORMAT_VERSION)
        if fv != FORMAT_VERSION:
            raise ValueError(f"Profile.format_version: {fv!r} is not supported (this moejax reads {FORMAT_VERSION})")
        kw = {k: v for k, v in d.items() if k not in ("ops", "format_version")}
        return cls(ops=ops, **kw).validate()

    def save(self, path: str | os.PathLike) -> None:
        """Validate, then write JSON atomically (temporary file in the same directory + ``os.replace``)."""
        self.validate()
        path = os.fspath(path)
        d = os.path.dirname(os.path.abspath(path))
        os.makedirs(d, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-profile-", suffix=".json")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(self.to_dict(), f, indent=2)
                f.write("\n")
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike) -> Profile:
        """Read and validate a profile JSON (``FileNotFoundError`` if absent, ``ValueError`` if malformed)."""
        path = os.fspath(path)
        with open(path) as f:
            try:
                d = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"profile {path!r}: not valid JSON ({e})") from None
        return cls.from_dict(d)

    # --- published figures --------------------------------------------------------------------------------
    @classmethod
    def from_published(cls, *, device_kind: str, nodes: int, devices_per_node: int,
                       intra_busbw_GBps: float, intra_latency_s: float,
                       gemm_tflops: float, gemm_latency_s: float,
                       inter_busbw_GBps: float | None = None, inter_latency_s: float | None = None,
                       dtype: str = "bfloat16", notes: str = "") -> Profile:
        """A profile written by hand from published figures (``source="published"`` on every op).

        Collectives inside a node use ``beta = factor(G) / intra_busbw`` with the nccl-tests bus-bandwidth factor
        for a group of ``G = devices_per_node`` (``2(G-1)/G`` for all-reduce, ``(G-1)/G`` otherwise) and
        ``alpha = intra_latency_s``. With ``nodes > 1`` the ``*_inter`` ops model the cross-node phase of a
        2-level collective over ``nodes`` peers at ``inter_busbw_GBps`` per device (one NIC per GPU), with the
        same factors over ``nodes``. The GEMM runs at ``gemm_tflops`` sustained (``beta = 1 / rate``).
        Bandwidths are in GB/s (1e9 bytes/s).
        """
        for name, v in (("intra_busbw_GBps", intra_busbw_GBps), ("intra_latency_s", intra_latency_s),
                        ("gemm_tflops", gemm_tflops), ("gemm_latency_s", gemm_latency_s)):
            _check_nonneg("Profile.from_published", name, v)
        if intra_busbw_GBps <= 0 or gemm_tflops <= 0:
            raise ValueError("Profile.from_published: intra_busbw_GBps and gemm_tflops must be > 0")
        if nodes > 1 and (inter_busbw_GBps is None or inter_latency_s is None or inter_busbw_GBps <= 0):
            raise ValueError("Profile.from_published.inter_busbw_GBps: nodes > 1 needs inter_busbw_GBps > 0 "
                             "and inter_latency_s")
        note = "published figures, not measured"
        ops: dict[str, OpFit] = {}
        g = max(devices_per_node, 2)
        for op in COLLECTIVE_OPS:
            ops[op] = OpFit(alpha_s=float(intra_latency_s),
                            beta_s_per_unit=collective_factor(op, g) / (intra_busbw_GBps * 1e9),
                            unit="bytes", source="published", notes=f"{note}: intra-node, group {g}")
        if nodes > 1:
            for op in INTER_OPS:
                ops[op] = OpFit(alpha_s=float(inter_latency_s),
                                beta_s_per_unit=collective_factor(op, nodes) / (inter_busbw_GBps * 1e9),
                                unit="bytes", source="published", notes=f"{note}: inter-node, {nodes} peers")
        ops["gemm"] = OpFit(alpha_s=float(gemm_latency_s), beta_s_per_unit=1.0 / (gemm_tflops * 1e12),
                            unit="flops", source="published", notes=f"{note}: {gemm_tflops} TFLOP/s sustained")
        return cls(ops=ops, source="published", device_kind=device_kind, platform="modelled", nodes=nodes,
                   devices_per_node=devices_per_node, dtype=dtype, created=_now(), notes=notes).validate()


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def packaged_profiles() -> list[str]:
    """Names of the profiles shipped in ``moejax/schedule/profiles/`` (without ``.json``)."""
    d = os.path.join(os.path.dirname(__file__), "profiles")
    return sorted(f[:-5] for f in os.listdir(d) if f.endswith(".json")) if os.path.isdir(d) else []


def load_packaged(name: str) -> Profile:
    """Load a shipped profile by name, e.g. ``load_packaged("a100_4x8_ib200")``."""
    names = packaged_profiles()
    if name not in names:
        raise ValueError(f"profile name {name!r}: not shipped; available: {names}")
    return Profile.load(os.path.join(os.path.dirname(__file__), "profiles", name + ".json"))


# --- fitting -------------------------------------------------------------------------------------------------
def fit_alpha_beta(sizes: Sequence[float], times_s: Sequence[float], *, relative: bool = True):
    """Fit ``t = alpha + beta * n`` with ``alpha, beta >= 0`` (non-negative least squares).

    ``relative=True`` weights each point by ``1 / t`` (minimizes relative residuals, so small sizes, which pin
    ``alpha``, count as much as large ones). Returns ``(alpha, beta, r2, max_rel_residual)``; ``r2`` is computed
    on the unweighted times.
    """
    from scipy.optimize import nnls

    n = np.asarray(sizes, dtype=np.float64)
    t = np.asarray(times_s, dtype=np.float64)
    if n.ndim != 1 or n.shape != t.shape:
        raise ValueError(f"fit_alpha_beta: sizes and times_s must be 1-D of equal length, got {n.shape}, {t.shape}")
    if len(n) < 2:
        raise ValueError(f"fit_alpha_beta: need >= 2 points, got {len(n)}")
    if not (np.all(np.isfinite(n)) and np.all(np.isfinite(t)) and np.all(t > 0) and np.all(n >= 0)):
        raise ValueError("fit_alpha_beta: sizes must be finite >= 0 and times finite > 0")
    # Scale columns so NNLS is well conditioned when n spans many orders of magnitude.
    scale = float(n.max()) or 1.0
    a = np.stack([np.ones_like(n), n / scale], axis=1)
    w = 1.0 / t if relative else np.ones_like(t)
    coef, _ = nnls(a * w[:, None], t * w)
    alpha, beta = float(coef[0]), float(coef[1]) / scale
    pred = alpha + beta * n
    ss_res = float(np.sum((t - pred) ** 2))
    ss_tot = float(np.sum((t - t.mean()) ** 2))
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else (1.0 if ss_res == 0 else 0.0)
    max_rel = float(np.max(np.abs(pred - t) / t))
    return alpha, beta, r2, max_rel


# --- measuring -----------------------------------------------------------------------------------------------
def time_fn(fn: Callable, *args, warmup: int = 2, repeats: int = 5) -> float:
    """Median wall seconds of ``fn(*args)`` (already compiled) over ``repeats`` after ``warmup`` calls."""
    import jax

    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _collective_fn(op: str, mesh, axis: str):
    import jax
    from jax.sharding import PartitionSpec as P

    def body(x):
        if op == "all_to_all":
            return jax.lax.all_to_all(x, axis, 0, 0, tiled=True)
        if op == "all_gather":
            return jax.lax.all_gather(x, axis, axis=0, tiled=True)
        if op == "reduce_scatter":
            return jax.lax.psum_scatter(x, axis, scatter_dimension=0, tiled=True)
        if op == "all_reduce":
            return jax.lax.psum(x, axis)
        raise ValueError(f"op: {op!r} is not a collective; allowed: {COLLECTIVE_OPS}")

    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P(axis), out_specs=P(axis), check_vma=False))


def measure_collective(op: str, mesh, axis: str, nbytes: int, *, dtype: str = "float32",
                       warmup: int = 2, repeats: int = 5) -> float:
    """Median seconds of one ``op`` over mesh axis ``axis`` with a per-device full buffer of ~``nbytes``."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    d = mesh.shape[axis]
    itemsize = jnp.dtype(dtype).itemsize
    elems = max(d, (nbytes // itemsize) // d * d)          # full per-device buffer, divisible by d
    per_dev_in = elems // d if op == "all_gather" else elems
    x = jax.device_put(jnp.ones((d * per_dev_in,), dtype), NamedSharding(mesh, P(axis)))
    fn = _collective_fn(op, mesh, axis)
    return time_fn(fn, x, warmup=warmup, repeats=repeats)


def gemm_flops(experts: int, tokens: int, d_model: int, d_ff: int) -> float:
    """FLOPs of the batched expert GEMM ``[E, n, d_model] x [E, d_model, d_ff]``."""
    return 2.0 * experts * tokens * d_model * d_ff


def measure_gemm(experts: int, tokens: int, d_model: int, d_ff: int, *, dtype: str = "float32",
                 device=None, warmup: int = 2, repeats: int = 5) -> float:
    """Median seconds of the batched expert GEMM on one device."""
    import jax
    import jax.numpy as jnp

    device = device or jax.devices()[0]
    x = jax.device_put(jnp.ones((experts, tokens, d_model), dtype), device)
    w = jax.device_put(jnp.full((experts, d_model, d_ff), 0.01, dtype), device)
    fn = jax.jit(lambda a, b: jnp.einsum("end,edf->enf", a, b))
    return time_fn(fn, x, w, warmup=warmup, repeats=repeats)


def run_profile(mesh=None, *, axis_name: str = "x", n_devices: int | None = None, quick: bool = False,
                collective_bytes: Sequence[int] | None = None, gemm_tokens: Sequence[int] | None = None,
                gemm_shape: tuple[int, int, int] = (2, 256, 512), dtype: str = "float32",
                warmup: int = 2, repeats: int | None = None,
                progress: Callable[[str], None] | None = None) -> Profile:
    """Measure every op of ``REQUIRED_OPS`` on this machine and fit alpha-beta models.

    Args:
      mesh: a ``jax.sharding.Mesh``; the collectives run over ``axis_name`` (default: a 1-D mesh named
        ``axis_name`` over the first ``n_devices`` devices, default all).
      quick: few sizes and repeats (a CPU run takes seconds).
      collective_bytes / gemm_tokens: explicit sweeps (override ``quick``).
      gemm_shape: ``(E_local, d_model, d_ff)`` of the expert GEMM; the sweep varies tokens per expert.
      progress: called with one line per measured point.
    Returns a validated ``Profile`` with ``source="measured"``.
    """
    import jax
    from jax.sharding import Mesh

    say = progress or (lambda s: None)
    if mesh is None:
        devs = jax.devices()
        n = len(devs) if n_devices is None else n_devices
        if not (isinstance(n, int) and 1 <= n <= len(devs)):
            raise ValueError(f"n_devices: must be an int in [1, {len(devs)}], got {n_devices!r}")
        mesh = Mesh(np.array(devs[:n]), (axis_name,))
    if axis_name not in mesh.shape:
        raise ValueError(f"axis_name: {axis_name!r} is not a mesh axis; mesh axes: {tuple(mesh.shape)}")
    d = mesh.shape[axis_name]
    sizes = tuple(collective_bytes or (QUICK_COLLECTIVE_BYTES if quick else DEFAULT_COLLECTIVE_BYTES))
    toks = tuple(gemm_tokens or (QUICK_GEMM_TOKENS if quick else DEFAULT_GEMM_TOKENS))
    repeats = repeats or (3 if quick else 7)
    itemsize = np.dtype(dtype).itemsize
    ops: dict[str, OpFit] = {}
    for op in COLLECTIVE_OPS:
        ns, ts = [], []
        for nb in sizes:
            elems = max(d, (nb // itemsize) // d * d)
            t = measure_collective(op, mesh, axis_name, nb, dtype=dtype, warmup=warmup, repeats=repeats)
            ns.append(float(elems * itemsize))
            ts.append(t)
            say(f"{op:>15} {elems * itemsize:>11,d} B/device  {t * 1e6:10.1f} us")
        alpha, beta, r2, mr = fit_alpha_beta(ns, ts)
        ops[op] = OpFit(alpha, beta, "bytes", r2, mr, len(ns), tuple(ns), tuple(ts), "measured",
                        f"shard_map over axis {axis_name!r} of {d} devices, {dtype}")
    e, dm, dff = gemm_shape
    ns, ts = [], []
    for tk in toks:
        t = measure_gemm(e, tk, dm, dff, dtype=dtype, device=mesh.devices.flat[0], warmup=warmup, repeats=repeats)
        ns.append(gemm_flops(e, tk, dm, dff))
        ts.append(t)
        say(f"{'gemm':>15} E={e} n={tk} d={dm} f={dff}  {t * 1e6:10.1f} us")
    alpha, beta, r2, mr = fit_alpha_beta(ns, ts)
    ops["gemm"] = OpFit(alpha, beta, "flops", r2, mr, len(ns), tuple(ns), tuple(ts), "measured",
                        f"batched einsum [E,n,d]x[E,d,f] on one device, E={e} d={dm} f={dff}, {dtype}")
    dev = mesh.devices.flat[0]
    return Profile(ops=ops, source="measured", device_kind=str(getattr(dev, "device_kind", dev.platform)),
                   platform=dev.platform, nodes=1, devices_per_node=d, axis_name=axis_name, dtype=dtype,
                   jax_version=jax.__version__, created=_now(),
                   notes=f"measured by moejax.schedule.profile.run_profile (quick={quick}, repeats={repeats}); "
                         "median wall time incl. dispatch, compile excluded").validate()


__all__ = ["ALL_OPS", "COLLECTIVE_OPS", "INTER_OPS", "REQUIRED_OPS", "SOURCES", "OpFit", "Profile",
           "collective_factor", "fit_alpha_beta", "gemm_flops", "load_packaged", "measure_collective",
           "measure_gemm", "packaged_profiles", "run_profile", "time_fn", "unit_of"]

