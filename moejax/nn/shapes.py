"""Shape buckets: the few padded sizes compiled programs are built for, so similar requests share a program.

One helper for everything that pads a size before jitting (``generate``, the serving engine's step shapes,
prompt scoring): powers of two up to ``linear_from``, then its multiples (long prompts then waste less than
``1/k`` of their length in padding instead of up to half).
"""

from __future__ import annotations


def pow2_bucket(n: int, minimum: int = 1) -> int:
    """Smallest ``minimum * 2**k >= n`` (the smallest power of two >= ``max(n, minimum)`` when ``minimum`` is
    one)."""
    b = minimum
    while b < n:
        b *= 2
    return b


def shape_bucket(n: int, minimum: int = 1, linear_from: int = 512) -> int:
    """Shape bucket: powers of two (at least ``minimum``) up to ``linear_from``, then multiples of it."""
    if n <= linear_from:
        return pow2_bucket(n, minimum)
    return -(-n // linear_from) * linear_from


def bucket_edges(longest: int, minimum: int, linear_from: int = 512) -> list[int]:
    """Lengths that reach every bucket of :func:`shape_bucket` up to ``longest`` (one length per bucket, for
    compiling them all ahead of time)."""
    edges, b = [], minimum
    while b < min(longest, linear_from):
        edges.append(b)
        b *= 2
    edges.append(min(longest, max(b, minimum)))
    edges += list(range(linear_from * 2, longest, linear_from))
    return sorted(set(edges + [longest]))
