"""Small shims over Pallas API differences between the jax releases we support (0.10 and 0.11).

Everything version-dependent in :mod:`pallas_kernels` goes through here, so a rename in a new jax release is
one edit. Nothing in this module traces or compiles anything.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

try:  # the Triton-style GPU backend (present in CPU wheels too; the lowering itself needs CUDA)
    from jax.experimental.pallas import triton as plgpu
except ImportError:  # pragma: no cover - very old or stripped jax
    plgpu = None

try:  # the Mosaic TPU backend (importable without a TPU)
    from jax.experimental.pallas import tpu as pltpu
except ImportError:  # pragma: no cover
    pltpu = None

SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
VARIANTS = ("gpu", "tpu")


def backend() -> str:
    """The default jax backend name (``cpu``, ``gpu`` or ``tpu``)."""
    return jax.default_backend()


def default_variant() -> str:
    """Kernel variant for this backend: ``tpu`` on TPU, else ``gpu`` (the Triton-style kernels, which also
    run in interpret mode on CPU)."""
    return "tpu" if backend() == "tpu" else "gpu"


def resolve_interpret(interpret, variant: str) -> bool:
    """``interpret=None`` means: interpret unless the backend is the one the variant compiles for."""
    if interpret is None:
        return backend() != variant
    if not isinstance(interpret, bool):
        raise TypeError(f"interpret must be None, True or False, got {interpret!r}")
    return interpret


def gpu_compiler_params(num_warps: int | None, num_stages: int | None):
    """Triton compiler params (``plgpu.CompilerParams``; ``TritonCompilerParams`` in older releases)."""
    cls = getattr(plgpu, "CompilerParams", None) or getattr(plgpu, "TritonCompilerParams", None)
    if cls is None:  # pragma: no cover
        return None
    return cls(num_warps=num_warps, num_stages=num_stages)


def tpu_compiler_params(dimension_semantics):
    cls = getattr(pltpu, "CompilerParams", None) or getattr(pltpu, "TPUCompilerParams", None)
    return cls(dimension_semantics=dimension_semantics)


def tpu_interpret_arg(interpret: bool):
    """The ``interpret=`` argument for a Mosaic kernel: the TPU interpreter (``pltpu.InterpretParams``, which
    poisons uninitialized memory with NaN and raises on out-of-bounds reads) where this jax has it, else the
    generic interpreter."""
    if not interpret:
        return False
    params = getattr(pltpu, "InterpretParams", None)
    return params() if params is not None else True


def tpu_vmem(shape, dtype):
    vmem = getattr(pltpu, "VMEM", None)
    if vmem is None:  # pragma: no cover - newer spelling
        vmem = pltpu.MemorySpace.VMEM
    return vmem(shape, dtype)
