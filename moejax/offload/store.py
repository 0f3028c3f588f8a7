"""Expert weights on disk: the layout ``moejax offload prepare`` writes and a reader that really hits storage.

Layout of an offload directory::

    manifest.json      model config, non-expert parameter index, one record per (layer, expert):
                       offset, nbytes, crc32, and the (name, shape, dtype) of each tensor in the record
    dense.safetensors  every parameter except the routed experts (attention, norms, router, shared experts...)
    experts.bin        the expert records, each starting at a multiple of 4096 bytes (O_DIRECT alignment)

The directory is written under a temporary name and renamed when complete, so a crash never leaves a
half-written store behind.

Reading (:class:`ExpertStore`): ``io="direct"`` opens ``experts.bin`` with ``O_DIRECT`` (reads bypass the page
cache, so every load really reaches the device; falls back to ``fadvise`` where the filesystem refuses it);
``io="fadvise"`` reads normally and drops the pages with ``posix_fadvise(DONTNEED)`` after each read;
``io="buffered"`` leaves the page cache alone (a warm cache turns loads into memory copies). ``bandwidth``
(bytes/s) additionally throttles reads to a stated storage speed (e.g. a phone's UFS): results using it are
*modelled*, and say so. The throttle models **one** device shared by all loader threads: each read occupies it
for ``nbytes / bandwidth`` seconds, reads queue in the order they are issued, and a read returns no earlier than
its modelled transfer ends (nor before the real read does), so concurrent reads never exceed ``bandwidth``
together. Each record's CRC32 is checked; a missing, truncated or corrupt record raises
:class:`ExpertStoreError` naming the layer and expert.
"""

from __future__ import annotations

import json
import mmap
import os
import shutil
import tempfile
import threading
import time
import zlib
from dataclasses import dataclass

import numpy as np

ALIGN = 4096
IO_MODES = ("direct", "fadvise", "buffered")  # how ExpertStore reads experts.bin (module docstring)
EXPERT_TENSORS = ("w_gate", "w_up", "w_down")


class ExpertStoreError(RuntimeError):
    """A missing, truncated or corrupt offload store or expert record."""


def _round_up(n: int, a: int = ALIGN) -> int:
    return (n + a - 1) // a * a


def _flat_params(model):
    """``{dotted.path: np.ndarray}`` of all parameters (paths like ``stacks.0.moe.experts.w_gate``)."""
    from flax import nnx

    return {".".join(map(str, path)): np.asarray(v[...])
            for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def expert_param_names(model) -> dict[str, tuple[int, str]]:
    """Flat names of the routed-expert tensors -> (run index, tensor name)."""
    out = {}
    for r, (kind, _, _) in enumerate(model.runs):
        if kind == "moe":
            for t in EXPERT_TENSORS:
                out[f"stacks.{r}.moe.experts.{t}"] = (r, t)
    return out


def prepare(model, out_dir: str, *, overwrite: bool = False, progress: bool = False, quant=None) -> str:
    """Write ``model``'s experts (one aligned record per layer and expert) and the rest to ``out_dir``.

    ``quant`` (a :class:`moejax.quant.QuantConfig`, e.g. ``mwq_config((2, 3, 4, 8))`` or ``uniform_config(8)``)
    stores each expert quantized instead, one record per *bit-plane* (``plane`` in the manifest), so a reader
    can fetch just the planes a width needs (D²MoE); the per-layer metadata arrays go to the manifest.
    """
    from safetensors.numpy import save_file

    from moejax.config import config_to_dict

    cfg = model.cfg
    if cfg.moe is None:
        raise ValueError("the model has no MoE layers: nothing to offload")
    if cfg.moe.expert_type != "swiglu":
        raise ValueError(f"MoEConfig.expert_type={cfg.moe.expert_type!r}: offloading stores whole SwiGLU experts; "
                         "an atomic expert is one row of U and V, read per token pair (keep them in memory)")
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir} exists (pass overwrite=True / --overwrite to replace it)")
    flat = _flat_params(model)
    names = expert_param_names(model)
    missing = [n for n in names if n not in flat]
    if missing:
        raise RuntimeError(f"expert parameters not found in the model state: {missing}")
    parent = os.path.dirname(out_dir) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".offload-", dir=parent)
    try:
        dense = {k: v for k, v in flat.items() if k not in names}
        save_file(dense, os.path.join(tmp, "dense.safetensors"))
        records = []
        meta: dict = {}
        offset = 0
        layers = [(r, first, n) for r, (kind, first, n) in enumerate(model.runs) if kind == "moe"]
        total = sum(n for _, _, n in layers) * cfg.moe.num_experts
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=total, desc="writing experts", unit="expert")
        with open(os.path.join(tmp, "experts.bin"), "wb") as f:
            for r, first, n in layers:
                arrs = {t: flat[f"stacks.{r}.moe.experts.{t}"] for t in EXPERT_TENSORS}
                for li in range(n):
                    if quant is not None:
                        from moejax.quant import quantize_experts

                        qe = quantize_experts(tuple(arrs[t][li] for t in EXPERT_TENSORS), quant)
                        meta[str(first + li)] = {k: v.tolist() for k, v in qe.expert_meta_arrays(0).items()}
                    for e in range(cfg.moe.num_experts):
                        if quant is None:
                            items = [(None, {t: arrs[t][li, e] for t in EXPERT_TENSORS})]
                        else:
                            items = [(p, qe.expert_plane_arrays(e, p)) for p in range(qe.num_planes)]
                        for plane, arrays in items:
                            parts = [(k, np.ascontiguousarray(a)) for k, a in arrays.items()]
                            blob = b"".join(a.tobytes() for _, a in parts)
                            rec = {"layer": first + li, "expert": e, "offset": offset, "nbytes": len(blob),
                                   "crc32": zlib.crc32(blob),
                                   "tensors": [[k, list(a.shape), str(a.dtype)] for k, a in parts]}
                            if plane is not None:
                                rec["plane"] = plane
                            records.append(rec)
                            f.write(blob)
                            pad = _round_up(len(blob)) - len(blob)
                            f.write(b"\0" * pad)
                            offset += len(blob) + pad
                        if bar is not None:
                            bar.update(1)
        if bar is not None:
            bar.close()
        manifest = {"format": "moejax-offload-v1", "align": ALIGN, "config": config_to_dict(cfg),
                    "expert_param_names": {k: list(v) for k, v in names.items()}, "experts": records}
        if quant is not None:
            manifest["quant"] = {"scheme": quant.scheme, "bits": list(quant.bits), "group_size": quant.group_size,
                                 "scale_dtype": quant.scale_dtype, "meta": meta}
        with open(os.path.join(tmp, "manifest.json"), "w") as f:
            json.dump(manifest, f)
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


@dataclass
class ReadStats:
    reads: int = 0
    bytes_read: int = 0
    read_s: float = 0.0        # time spent in reads (including throttling)


class ExpertStore:
    """Reads expert records from an offload directory (see the module docstring for ``io`` and ``bandwidth``)."""

    def __init__(self, path: str, *, io: str = "direct", bandwidth: float | None = None):
        if io not in IO_MODES:
            raise ValueError(f"io={io!r}; allowed: {', '.join(map(repr, IO_MODES))}")
        if bandwidth is not None and bandwidth <= 0:
            raise ValueError(f"bandwidth={bandwidth} must be > 0 bytes/s")
        self.path = os.path.abspath(path)
        mpath = os.path.join(self.path, "manifest.json")
        if not os.path.exists(mpath):
            raise ExpertStoreError(f"{self.path} is not an offload store (no manifest.json); "
                                   "create one with `moejax offload prepare`")
        try:
            with open(mpath) as f:
                self.manifest = json.load(f)
        except json.JSONDecodeError as e:
            raise ExpertStoreError(f"{mpath} is corrupt: {e}") from e
        self.records = {(r["layer"], r["expert"], r.get("plane")): r for r in self.manifest["experts"]}
        self.quant = self.manifest.get("quant")
        self.bin_path = os.path.join(self.path, "experts.bin")
        if not os.path.exists(self.bin_path):
            raise ExpertStoreError(f"{self.bin_path} is missing")
        size = os.path.getsize(self.bin_path)
        last = max(self.manifest["experts"], key=lambda r: r["offset"])
        if size < last["offset"] + last["nbytes"]:
            raise ExpertStoreError(f"{self.bin_path} is truncated ({size} bytes; layer {last['layer']} expert "
                                   f"{last['expert']} needs {last['offset'] + last['nbytes']})")
        self.io, self.bandwidth = io, bandwidth
        self._device_lock = threading.Lock()
        self._device_free_at = 0.0  # perf_counter time at which the modelled device finishes its queued reads
        self.stats = ReadStats()
        self._fd = None
        if io == "direct":
            try:
                self._fd = os.open(self.bin_path, os.O_RDONLY | os.O_DIRECT)
            except (OSError, AttributeError):
                self.io = "fadvise"
        if self._fd is None:
            self._fd = os.open(self.bin_path, os.O_RDONLY)
        self.record_bytes = max(r["nbytes"] for r in self.manifest["experts"])

    def close(self, _close=os.close) -> None:
        if getattr(self, "_fd", None) is not None:
            _close(self._fd)
            self._fd = None

    def __del__(self):
        self.close()

    def config(self):
        from moejax.config import ModelConfig, config_from_dict

        return config_from_dict(ModelConfig, self.manifest["config"])

    def expert_nbytes(self, layer: int, expert: int, plane: int | None = None) -> int:
        return self.records[(layer, expert, plane)]["nbytes"]

    def plane_nbytes(self, plane: int) -> int:
        """Bytes of one expert's plane ``plane`` record (quantized stores; the same for every expert)."""
        return max(r["nbytes"] for r in self.manifest["experts"] if r.get("plane") == plane)

    def quant_meta(self, layer: int) -> dict[str, np.ndarray]:
        """The ``{tensor}.meta`` arrays of a quantized layer's experts."""
        return {k: np.asarray(v, np.int64) for k, v in self.quant["meta"][str(layer)].items()}

    def read(self, layer: int, expert: int, plane: int | None = None) -> dict[str, np.ndarray]:
        """The expert's tensors ``{w_gate, w_up, w_down}`` (float stores) or plane ``plane``'s arrays
        (quantized stores), verified by CRC32."""
        rec = self.records.get((layer, expert, plane))
        if rec is None:
            what = f"layer {layer} expert {expert}" + ("" if plane is None else f" plane {plane}")
            raise ExpertStoreError(f"{what} is not in the store {self.path}")
        t0 = time.perf_counter()
        n, off = rec["nbytes"], rec["offset"]
        if self.bandwidth:  # reserve the modelled device: queue behind the reads already issued
            with self._device_lock:
                done_at = max(t0, self._device_free_at) + n / self.bandwidth
                self._device_free_at = done_at
        if self.io == "direct":
            buf = mmap.mmap(-1, _round_up(n))  # page-aligned buffer, as O_DIRECT requires
            got = os.preadv(self._fd, [buf], off)
            data = bytes(memoryview(buf)[:n])
            buf.close()
        else:
            data = os.pread(self._fd, n, off)
            got = len(data)
            if self.io == "fadvise":
                os.posix_fadvise(self._fd, off, _round_up(n), os.POSIX_FADV_DONTNEED)
        if got < n:
            raise ExpertStoreError(f"layer {layer} expert {expert}: short read ({got} of {n} bytes) from "
                                   f"{self.bin_path}")
        if zlib.crc32(data) != rec["crc32"]:
            raise ExpertStoreError(f"layer {layer} expert {expert} in {self.bin_path} is corrupt "
                                   "(CRC32 mismatch)")
        out, pos = {}, 0
        for name, shape, dtype in rec["tensors"]:
            dt = np.dtype(dtype) if dtype != "bfloat16" else _bf16()
            k = int(np.prod(shape)) * dt.itemsize
            out[name] = np.frombuffer(data, dt, count=int(np.prod(shape)), offset=pos).reshape(shape)
            pos += k
        if self.bandwidth:
            wait = done_at - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
        self.stats.reads += 1
        self.stats.bytes_read += n
        self.stats.read_s += time.perf_counter() - t0
        return out

    def dense_params(self) -> dict[str, np.ndarray]:
        from safetensors.numpy import load_file

        p = os.path.join(self.path, "dense.safetensors")
        if not os.path.exists(p):
            raise ExpertStoreError(f"{p} is missing")
        return load_file(p)


def _bf16():
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16)


def anon_rss_bytes() -> int:
    """Anonymous resident memory of this process (RssAnon: excludes file-backed and page-cache pages)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return -1
