"""Trace-time settings: values a layer reads from a context variable when it is traced (MoE hooks, stage
implementations and executors in :mod:`moejax.nn.stages`, tensor-parallel edges in :mod:`moejax.nn.sharding`).
They take effect for functions traced inside the ``with`` block, not for cached ``jax.jit`` traces."""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any


@contextlib.contextmanager
def scoped(var: contextvars.ContextVar, value: Any):
    """Set ``var`` to ``value`` for the duration of the block (restored on exit, also on an exception)."""
    tok = var.set(value)
    try:
        yield
    finally:
        var.reset(tok)
