"""Shape arithmetic, numeric constants and small formulas shared by the kernels and by moejax (jax is imported
inside the functions that use it, not at module level: cheap to load).

moejax imports these from here rather than keeping its own copies (``pallas_kernels`` imports nothing from
moejax, so the shared pieces live at this, the lower, level).
"""

from __future__ import annotations

MASK_VALUE = -1e30
"""Finite "minus infinity" for masked attention logits (probabilities of masked keys are zeroed explicitly, so
a row with no visible key gives zeros rather than NaN)."""


def next_pow2(n: int) -> int:
    """Smallest power of two >= ``n`` (1 for ``n <= 1``)."""
    return 1 << max(0, int(n) - 1).bit_length()


def is_pow2(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


def round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def silu_grad(a):
    """d silu(a) / da = sigmoid(a) * (1 + a * (1 - sigmoid(a))), elementwise (used by hand-written backwards)."""
    import jax

    s = jax.nn.sigmoid(a)
    return s * (1.0 + a * (1.0 - s))
