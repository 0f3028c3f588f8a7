"""Paged KV cache: a preallocated pool of fixed-size blocks, per-request block tables, prefix sharing.

Two halves:

* :class:`BlockAllocator` (host, pure Python): free list, reference counts, and a prefix cache keyed by
  *block hashes* (the hash of a block's token ids chained with its prefix's hash, as in vLLM). A full block
  whose hash is known can be shared by any request whose prompt starts with the same tokens. Blocks whose
  reference count drops to zero stay in the prefix cache (evictable, least recently used first) until the
  pool needs them.
* :class:`KVPool` (device): per run of layers (see :func:`moejax.models.transformer.layer_runs`) keys and
  values ``[n_layers_in_run, num_blocks * block_size, n_kv_heads, head_dim]``; a token's *slot* is
  ``block_id * block_size + offset``. Block 0 is reserved as a scratch block: padding tokens write there and
  no block table points at it for real data (attention may gather it under a mask, so it must stay finite).

The layout per layer, viewed as ``[num_blocks, block_size, n_kv_heads, head_dim]``, is the one the paged
attention kernels in ``pallas_kernels.paged_attention`` read through ``block_tables``.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

SCRATCH_BLOCK = 0


class NoFreeBlocks(RuntimeError):
    """The pool has no free or evictable block; the scheduler must preempt or wait."""


def block_hash(parent: bytes | None, tokens: Sequence[int]) -> bytes:
    """Chained hash of one full block: depends on every token of the prefix, not just this block's."""
    h = hashlib.blake2b(digest_size=16)
    h.update(parent or b"root")
    h.update(b",".join(str(int(t)).encode() for t in tokens))
    return h.digest()


def prefix_hashes(tokens: Sequence[int], block_size: int) -> list[bytes]:
    """Hashes of the full blocks of ``tokens`` (a trailing partial block has none)."""
    out, parent = [], None
    for i in range(len(tokens) // block_size):
        parent = block_hash(parent, tokens[i * block_size:(i + 1) * block_size])
        out.append(parent)
    return out


class BlockAllocator:
    """Reference-counted block allocator with an LRU prefix cache.

    Invariants (checked by :meth:`check`): every block other than the scratch block is in exactly one of
    {free list, evictable cache, in use (refcount > 0)}; cached hashes map to distinct blocks.
    """

    def __init__(self, num_blocks: int, block_size: int, *, enable_prefix_cache: bool = True):
        if num_blocks < 2:
            raise ValueError(f"num_blocks={num_blocks} must be >= 2 (block 0 is the scratch block)")
        if block_size < 1:
            raise ValueError(f"block_size={block_size} must be >= 1")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_cache = enable_prefix_cache
        self.free: list[int] = list(range(num_blocks - 1, 0, -1))   # pop() hands out low ids first
        self.ref = [0] * num_blocks
        self.hash_of: dict[int, bytes] = {}                # block -> hash (registered full blocks)
        self.block_of: dict[bytes, int] = {}               # hash -> block
        self.evictable: OrderedDict[int, None] = OrderedDict()  # refcount-0 cached blocks, LRU first
        self.hits = 0                                       # prefix-cache hit blocks (for metrics)

    # ----------------------------------------------------------------------------------------- queries
    @property
    def num_free(self) -> int:
        """Blocks that can be handed out now (free or evictable)."""
        return len(self.free) + len(self.evictable)

    @property
    def num_used(self) -> int:
        return self.num_blocks - 1 - self.num_free

    def lookup(self, hashes: Sequence[bytes]) -> list[int]:
        """Cached blocks for the longest prefix of ``hashes`` that is in the cache (not yet referenced)."""
        out = []
        if not self.enable_prefix_cache:
            return out
        for h in hashes:
            b = self.block_of.get(h)
            if b is None:
                break
            out.append(b)
        return out

    # ----------------------------------------------------------------------------------------- updates
    def acquire(self, blocks: Sequence[int]) -> None:
        """Take a reference on cached blocks (from :meth:`lookup`)."""
        for b in blocks:
            if self.ref[b] == 0:
                self.evictable.pop(b, None)
            self.ref[b] += 1
            self.hits += 1

    def allocate(self, n: int) -> list[int]:
        """``n`` fresh blocks (refcount 1), evicting least recently used cached blocks if needed."""
        if n > self.num_free:
            raise NoFreeBlocks(f"need {n} blocks, {self.num_free} free")
        out = []
        for _ in range(n):
            if self.free:
                b = self.free.pop()
            else:
                b, _ = self.evictable.popitem(last=False)
                del self.block_of[self.hash_of.pop(b)]
            self.ref[b] = 1
            out.append(b)
        return out

    def register(self, block: int, h: bytes) -> None:
        """Record that ``block`` (full, in use) holds the tokens whose chained hash is ``h``."""
        if not self.enable_prefix_cache or block in self.hash_of:
            return
        if h in self.block_of:  # another block already holds these tokens: keep the first
            return
        self.hash_of[block] = h
        self.block_of[h] = block

    def release(self, blocks: Sequence[int]) -> None:
        """Drop one reference on each block; unreferenced blocks become evictable (if cached) or free."""
        for b in reversed(list(blocks)):
            if self.ref[b] <= 0:
                raise RuntimeError(f"block {b} released more often than acquired")
            self.ref[b] -= 1
            if self.ref[b] == 0:
                if b in self.hash_of:
                    self.evictable[b] = None
                else:
                    self.free.append(b)

    def clear_cache(self) -> None:
        """Forget every evictable cached block (they become free)."""
        for b in list(self.evictable):
            del self.block_of[self.hash_of.pop(b)]
            self.free.append(b)
        self.evictable.clear()

    def check(self) -> None:
        """Assert the allocator's invariants (used by tests)."""
        in_use = {b for b in range(1, self.num_blocks) if self.ref[b] > 0}
        free, ev = set(self.free), set(self.evictable)
        assert len(free) == len(self.free), "duplicate block in the free list"
        assert not (free & ev) and not (free & in_use) and not (ev & in_use), "block in two states"
        assert free | ev | in_use == set(range(1, self.num_blocks)), "leaked block"
        assert all(self.ref[b] == 0 for b in free | ev)
        assert set(self.block_of.values()) == set(self.hash_of), "hash maps disagree"
        assert ev <= set(self.hash_of), "evictable block without a hash"


class KVPool(NamedTuple):
    """Device-side paged keys/values, one array pair per run of layers."""

    k: tuple  # each [n_layers_in_run, num_blocks * block_size, n_kv_heads, head_dim]
    v: tuple

    @staticmethod
    def create(runs, num_blocks: int, block_size: int, n_kv_heads: int, head_dim: int, dtype=jnp.float32,
               sharding=None) -> KVPool:
        shape = lambda n: (n, num_blocks * block_size, n_kv_heads, head_dim)
        mk = (lambda s: jnp.zeros(s, dtype)) if sharding is None else (
            lambda s: jax.device_put(jnp.zeros(s, dtype), sharding))
        return KVPool(tuple(mk(shape(n)) for _, _, n in runs), tuple(mk(shape(n)) for _, _, n in runs))

    def nbytes(self) -> int:
        return sum(a.size * a.dtype.itemsize for a in self.k + self.v)


def block_bytes(n_layers: int, block_size: int, n_kv_heads: int, head_dim: int, dtype=jnp.float32) -> int:
    """Bytes of one block's keys and values over all layers."""
    return 2 * n_layers * block_size * n_kv_heads * head_dim * jnp.dtype(dtype).itemsize


def blocks_for_budget(bytes_budget: int, n_layers: int, block_size: int, n_kv_heads: int, head_dim: int,
                      dtype=jnp.float32) -> int:
    """How many blocks fit in ``bytes_budget`` bytes of K+V over all layers."""
    return max(2, int(bytes_budget // block_bytes(n_layers, block_size, n_kv_heads, head_dim, dtype)))
