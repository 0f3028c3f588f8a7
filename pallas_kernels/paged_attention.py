"""Paged attention over the serving engine's KV pool: decode, speculative decode and chunked prefill.

Layout (fixed by ``moejax.serve.kv_cache``; per layer):

- ``q [B, Tq, H, D]``: ``Tq`` new query tokens per sequence (1 for decode, a few for speculative decoding, a
  chunk for chunked / layered prefill) at positions ``lengths[b] - Tq`` to ``lengths[b] - 1`` inclusive (rows
  are left-padded: where ``lengths[b] < Tq`` the first ``Tq - lengths[b]`` queries sit at negative positions,
  see no key and output zeros);
- ``k_pages, v_pages [num_pages, page_size, KVH, D]``: the paged pool (token ``s`` of sequence ``b`` lives in
  page ``block_tables[b, s // page_size]`` at offset ``s % page_size``);
- ``block_tables`` int32 ``[B, max_pages]`` (entries past a sequence's last page are ignored);
- ``lengths`` int32 ``[B]``: valid cached tokens *including* the ``Tq`` just written. A padding slot with
  length 0 outputs zeros (never NaN).

Each query attends causally to cached positions ``<=`` its own; grouped-query heads (``H % KVH == 0``, head
``h`` reads KV head ``h // (H // KVH)``); softmax scale ``1/sqrt(D)``; float32 softmax and accumulation;
output ``[B, Tq, H, D]`` in ``q.dtype``.

Implementations (``impl``): ``"xla"`` = :func:`paged_attention_reference` (gather the KV pages of each
sequence, then dense masked attention); ``"pallas"`` with ``variant``:

- ``"gpu"``: a **Triton**-backend kernel (plain ``pl.pallas_call``). Grid ``(B, KVH, row blocks,
  kv_splits)``: the ``Tq * (H / KVH)`` query rows that share one KV head are stacked (time-major) into blocks
  of ``block_rows`` rows, so one read of each K/V block serves every query head of the group. Each program
  walks the KV blocks of ``pages_per_block`` pages up to its last query's position (gathering token rows
  through the block table) with an online softmax; with ``kv_splits > 1`` the KV range is split over more
  programs and their partial results are merged (flash-decoding). Runs in interpret mode on CPU. (jax 0.11
  deprecates the Triton backend: a ``DeprecationWarning`` at lowering; it still works.)
- ``"tpu"``: a **Mosaic** kernel; block tables and lengths are scalar-prefetched and the K/V ``BlockSpec``
  index maps read the page id, so the pipeline DMAs one page per grid step (steps past the causal limit
  repeat the last page, which is not re-fetched, and skip compute). Never run on a TPU; on CPU it runs in the
  TPU interpreter.

``"auto"`` uses the kernel only where ``(variant, backend)`` is in :data:`VALIDATED_FASTER`, else ``"xla"``:
the GPU variant on GPUs. On one H100 (jax 0.11.2, ``experiments/results/gpu_check.md``) it passed the decode,
speculative and prefill-chunk checks, and paged decode at batch 64, context 4096, 32/8 heads, head dim 128
read KV at 2.7-2.8 TB/s, 0.94-0.96 of the copy bandwidth measured in the same run and about 3.1x the XLA
gather path (0.31 of copy). The TPU variant has never run on a TPU.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import _compat, common
from pallas_kernels._compat import SUPPORTED_DTYPES, VARIANTS, pltpu
from pallas_kernels.common import MASK_VALUE

IMPLS = ("xla", "pallas", "auto")
VALIDATED_FASTER: frozenset = frozenset({("gpu", "gpu")})
_F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class PagedAttentionConfig:
    """Block sizes of the paged-attention kernels.

    Attributes:
      pages_per_block: KV pages per inner step (GPU variant; the TPU variant always steps one page).
        ``None``: enough pages for about 64 tokens (on an H100, 64 tokens per step read KV at 0.95 of the copy
        bandwidth, 128 tokens at 0.85-0.89). Must be a power of two.
      block_rows: stacked query rows (``Tq * H / KVH``) per program. ``None``: the row count rounded up to a
        power of two, clamped to [16, 64] (GPU) or to a multiple of 8, at most 128 (TPU). GPU: a power of two
        >= 16; TPU: a multiple of 8.
      num_warps, num_stages: Triton launch parameters (GPU only; ``None`` = defaults).
      kv_splits: GPU only: split each sequence's KV range over this many programs and merge their partial
        softmax results afterwards (flash-decoding), for more parallelism when ``batch * kv_heads`` is small.
    """

    pages_per_block: int | None = None
    block_rows: int | None = None
    num_warps: int | None = None
    num_stages: int | None = None
    kv_splits: int = 1

    def validate(self, variant: str) -> PagedAttentionConfig:
        for name in ("pages_per_block", "block_rows", "num_warps", "num_stages"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
                raise ValueError(f"PagedAttentionConfig.{name} must be None or a positive int, got {v!r}")
        if not isinstance(self.kv_splits, int) or isinstance(self.kv_splits, bool) or self.kv_splits <= 0:
            raise ValueError(f"PagedAttentionConfig.kv_splits must be a positive int, got {self.kv_splits!r}")
        if variant == "tpu" and self.kv_splits != 1:
            raise ValueError(f"PagedAttentionConfig.kv_splits={self.kv_splits}: only the GPU variant splits KV")
        if self.pages_per_block is not None and not common.is_pow2(self.pages_per_block):
            raise ValueError(f"PagedAttentionConfig.pages_per_block={self.pages_per_block} must be a power of two")
        if self.block_rows is not None:
            if variant == "gpu" and (not common.is_pow2(self.block_rows) or self.block_rows < 16):
                raise ValueError(f"PagedAttentionConfig.block_rows={self.block_rows}: the GPU (Triton) variant "
                                 "needs a power of two >= 16")
            if variant == "tpu" and self.block_rows % 8:
                raise ValueError(f"PagedAttentionConfig.block_rows={self.block_rows}: the TPU variant needs a "
                                 "multiple of 8")
        return self


# ------------------------------------------------------------------------------------------ validation

def _validate(q, k_pages, v_pages, block_tables, lengths):
    for name, a in (("q", q), ("k_pages", k_pages), ("v_pages", v_pages), ("block_tables", block_tables),
                    ("lengths", lengths)):
        if not hasattr(a, "shape") or not hasattr(a, "dtype"):
            raise TypeError(f"{name} must be an array, got {type(a).__name__}")
    if q.ndim != 4:
        raise ValueError(f"q must be [batch, q_tokens, n_heads, head_dim], got shape {tuple(q.shape)}")
    if k_pages.ndim != 4:
        raise ValueError(f"k_pages must be [num_pages, page_size, n_kv_heads, head_dim], got shape "
                         f"{tuple(k_pages.shape)}")
    if v_pages.shape != k_pages.shape:
        raise ValueError(f"v_pages shape {tuple(v_pages.shape)} must equal k_pages shape {tuple(k_pages.shape)}")
    if jnp.dtype(q.dtype) not in SUPPORTED_DTYPES:
        raise TypeError(f"q dtype must be one of float32, bfloat16, float16; got {q.dtype}")
    if k_pages.dtype != q.dtype or v_pages.dtype != q.dtype:
        raise TypeError(f"k_pages/v_pages dtype ({k_pages.dtype}/{v_pages.dtype}) must equal q dtype ({q.dtype})")
    B, Tq, H, D = q.shape
    P, ps, KVH, Dk = k_pages.shape
    if Dk != D:
        raise ValueError(f"head_dim mismatch: q has {D}, k_pages has {Dk}")
    if H % KVH:
        raise ValueError(f"n_heads ({H}) must be a multiple of n_kv_heads ({KVH})")
    if block_tables.dtype != jnp.int32 or block_tables.ndim != 2 or block_tables.shape[0] != B:
        raise ValueError(f"block_tables must be int32 [batch={B}, max_pages], got {block_tables.dtype} "
                         f"{tuple(block_tables.shape)}")
    if lengths.dtype != jnp.int32 or lengths.shape != (B,):
        raise ValueError(f"lengths must be int32 [batch={B}], got {lengths.dtype} {tuple(lengths.shape)}")
    if min(B, Tq, P, ps, block_tables.shape[1]) < 1:
        raise ValueError("q, k_pages and block_tables must have non-empty dimensions")


def _validate_kernel_shapes(variant, q, k_pages, config):
    D = q.shape[-1]
    ps = k_pages.shape[1]
    if variant == "gpu":
        if not common.is_pow2(D) or D < 16:
            raise ValueError(f"head_dim={D}: the GPU (Triton) variant needs a power of two >= 16")
        if not common.is_pow2(ps):
            raise ValueError(f"page_size={ps}: the GPU (Triton) variant needs a power of two")
        if config.pages_per_block is not None and config.pages_per_block * ps < 16:
            raise ValueError(f"PagedAttentionConfig.pages_per_block={config.pages_per_block} with page_size={ps}: "
                             "the GPU (Triton) variant needs pages_per_block * page_size >= 16 (tl.dot minimum)")
    else:
        if ps % 8:
            raise ValueError(f"page_size={ps}: the TPU variant needs a multiple of 8")


# ------------------------------------------------------------------------------------------ reference

def paged_attention_reference(q, k_pages, v_pages, block_tables, lengths):
    """Pure-JAX paged attention: gather each sequence's pages into ``[B, S, KVH, D]``, then dense causal
    attention with a length mask (float32 softmax; zero output for rows with no visible key)."""
    B, Tq, H, D = q.shape
    _, ps, KVH, _ = k_pages.shape
    G = H // KVH
    S = block_tables.shape[1] * ps
    # Batch axes (b, kv head) leading and the (g, t) query rows stacked: one batched matmul each way, a
    # layout XLA:CPU runs well (non-leading batch axes are slow or unsupported there).
    k = jnp.take(k_pages, block_tables, axis=0).reshape(B, S, KVH, D).transpose(0, 2, 1, 3)  # [B, KVH, S, D]
    v = jnp.take(v_pages, block_tables, axis=0).reshape(B, S, KVH, D).transpose(0, 2, 1, 3)
    qg = q.reshape(B, Tq, KVH, G, D).transpose(0, 2, 3, 1, 4).reshape(B, KVH, G * Tq, D)
    s = jnp.einsum("bkrd,bksd->bkrs", qg, k, preferred_element_type=_F32) * (1.0 / math.sqrt(D))
    qpos = lengths[:, None] - Tq + jnp.arange(Tq, dtype=jnp.int32)[None]  # [B, Tq]
    qpos = jnp.tile(qpos, (1, G))  # row r = g * Tq + t
    kpos = jnp.arange(S, dtype=jnp.int32)
    mask = (kpos[None, None, :] <= qpos[:, :, None]) & (kpos[None, None, :] < lengths[:, None, None])
    mask = mask[:, None]  # [B, 1, G*Tq, S]
    m = jnp.max(jnp.where(mask, s, MASK_VALUE), axis=-1, keepdims=True)
    p = jnp.where(mask, jnp.exp(s - m), 0.0)
    l = jnp.sum(p, axis=-1, keepdims=True)
    o = jnp.einsum("bkrs,bksd->bkrd", p, v.astype(_F32), preferred_element_type=_F32)
    o = jnp.where(l > 0, o / jnp.where(l > 0, l, 1.0), 0.0)  # [B, KVH, G*Tq, D]
    o = o.reshape(B, KVH, G, Tq, D).transpose(0, 3, 1, 2, 4)
    return o.reshape(B, Tq, H, D).astype(q.dtype)


# ------------------------------------------------------------------------------------------ kernels

def _stack_rows(q, KVH, Rp):
    """``q [B, Tq, H, D]`` -> ``[B, KVH, Rp, D]`` with row ``t * G + g`` (zero-padded to ``Rp`` rows)."""
    B, Tq, H, D = q.shape
    G = H // KVH
    qs = q.reshape(B, Tq, KVH, G, D).transpose(0, 2, 1, 3, 4).reshape(B, KVH, Tq * G, D)
    return jnp.pad(qs, ((0, 0), (0, 0), (0, Rp - Tq * G), (0, 0)))


def _unstack_rows(o, Tq, G):
    B, KVH, _, D = o.shape
    o = o[:, :, :Tq * G].reshape(B, KVH, Tq, G, D).transpose(0, 2, 1, 3, 4)
    return o.reshape(B, Tq, KVH * G, D)


def _gpu_call(q, k_pages, v_pages, block_tables, lengths, cfg: PagedAttentionConfig, interpret: bool):
    B, Tq, H, D = q.shape
    P, ps, KVH, _ = k_pages.shape
    G = H // KVH
    R = Tq * G
    br = cfg.block_rows or min(64, max(16, common.next_pow2(R)))
    ppb = cfg.pages_per_block or max(1, 64 // ps)
    bk = ppb * ps
    splits = cfg.kv_splits
    Rp = common.round_up(R, br)
    maxp = common.round_up(block_tables.shape[1], ppb * splits)
    blocks_per_split = maxp // ppb // splits
    max_keys = block_tables.shape[1] * ps
    bt = jnp.pad(block_tables, ((0, 0), (0, maxp - block_tables.shape[1])))
    qs = _stack_rows(q, KVH, Rp)
    k2 = k_pages.reshape(P * ps, KVH * D)  # free: rows are tokens (page * ps + offset), columns head-major
    v2 = v_pages.reshape(P * ps, KVH * D)
    scale = 1.0 / math.sqrt(D)

    def kernel(len_ref, bt_ref, q_ref, k_ref, v_ref, *out_refs):
        b, i, sp = pl.program_id(0), pl.program_id(2), pl.program_id(3)
        L = len_ref[b]
        qv = q_ref[...]
        rows = i * br + lax.broadcasted_iota(jnp.int32, (br, bk), 0)
        qpos = L - Tq + rows // G
        last_row = jnp.minimum(i * br + br - 1, R - 1)
        n_keys = jnp.clip(L - Tq + last_row // G + 1, 0, max_keys)  # causal limit of this row block
        j0 = sp * blocks_per_split
        j1 = jnp.minimum((n_keys + bk - 1) // bk, j0 + blocks_per_split)

        def body(j, carry):
            m, l, acc = carry
            kidx = j * bk + lax.broadcasted_iota(jnp.int32, (bk,), 0)
            tok = bt_ref[kidx // ps] * ps + kidx % ps
            k = k_ref[tok, :]
            v = v_ref[tok, :]
            s = lax.dot_general(qv, k, (((1,), (1,)), ((), ())), preferred_element_type=_F32) * scale
            kpos = j * bk + lax.broadcasted_iota(jnp.int32, (br, bk), 1)
            mask = kpos <= qpos
            m_new = jnp.maximum(m, jnp.max(jnp.where(mask, s, MASK_VALUE), axis=1))
            p = jnp.where(mask, jnp.exp(s - m_new[:, None]), 0.0)
            corr = jnp.exp(m - m_new)
            l = l * corr + jnp.sum(p, axis=1)
            acc = acc * corr[:, None] + lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                                                        preferred_element_type=_F32)
            return m_new, l, acc

        init = (jnp.full((br,), MASK_VALUE, _F32), jnp.zeros((br,), _F32), jnp.zeros((br, D), _F32))
        m, l, acc = lax.fori_loop(j0, j1, body, init)
        if splits == 1:
            (o_ref,) = out_refs
            out = acc / jnp.where(l > 0, l, 1.0)[:, None]
            o_ref[...] = jnp.where((l > 0)[:, None], out, 0.0).astype(o_ref.dtype)
        else:  # partial results of this KV split, merged below
            o_ref, m_ref, l_ref = out_refs
            o_ref[...] = acc
            m_ref[...] = m
            l_ref[...] = l

    o_spec = pl.BlockSpec((None, None, None, br, D), lambda b, h, i, sp: (sp, b, h, i, 0))
    ml_spec = pl.BlockSpec((None, None, None, br), lambda b, h, i, sp: (sp, b, h, i))
    if splits == 1:
        out_specs = pl.BlockSpec((None, None, br, D), lambda b, h, i, sp: (b, h, i, 0))
        out_shape = jax.ShapeDtypeStruct((B, KVH, Rp, D), q.dtype)
    else:
        out_specs = [o_spec, ml_spec, ml_spec]
        out_shape = [jax.ShapeDtypeStruct((splits, B, KVH, Rp, D), _F32),
                     jax.ShapeDtypeStruct((splits, B, KVH, Rp), _F32),
                     jax.ShapeDtypeStruct((splits, B, KVH, Rp), _F32)]
    out = pl.pallas_call(
        kernel,
        grid=(B, KVH, Rp // br, splits),
        in_specs=[
            pl.BlockSpec(),                                                      # lengths [B]
            pl.BlockSpec((None, maxp), lambda b, h, i, sp: (b, 0)),              # this sequence's block table
            pl.BlockSpec((None, None, br, D), lambda b, h, i, sp: (b, h, i, 0)),  # stacked query rows
            pl.BlockSpec((P * ps, D), lambda b, h, i, sp: (0, h)),               # kv head h of the pool
            pl.BlockSpec((P * ps, D), lambda b, h, i, sp: (0, h)),
        ],
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=_compat.gpu_compiler_params(cfg.num_warps, cfg.num_stages),
        interpret=interpret,
        name=f"paged_attention_gpu_br{br}_bk{bk}_s{splits}",
    )(lengths, bt, qs, k2, v2)
    if splits > 1:  # flash-decoding merge of the per-split (acc, max, sum)
        acc, m, l = out
        m_all = jnp.max(m, axis=0)
        corr = jnp.exp(m - m_all[None])
        l_all = jnp.sum(l * corr, axis=0)
        o = jnp.sum(acc * corr[..., None], axis=0)
        out = jnp.where((l_all > 0)[..., None], o / jnp.where(l_all > 0, l_all, 1.0)[..., None], 0.0)
        out = out.astype(q.dtype)
    return _unstack_rows(out, Tq, G)


def _tpu_call(q, k_pages, v_pages, block_tables, lengths, cfg: PagedAttentionConfig, interpret: bool):
    B, Tq, H, D = q.shape
    P, ps, KVH, _ = k_pages.shape
    G = H // KVH
    R = Tq * G
    maxp = block_tables.shape[1]
    br = cfg.block_rows or min(128, common.round_up(R, 8))
    Rp = common.round_up(R, br)
    # KV heads per program: the K/V block's last dim (hb * D) must be a multiple of 128 lanes or the whole
    # KVH * D row (Mosaic tiling rule), so head_dim 64 takes heads in pairs.
    hb = next((c for c in range(1, KVH + 1) if KVH % c == 0 and ((c * D) % 128 == 0 or c == KVH)), KVH)
    qs = _stack_rows(q, KVH, Rp)
    k3 = k_pages.reshape(P, ps, KVH * D)  # free reshape
    v3 = v_pages.reshape(P, ps, KVH * D)
    row_t = (jnp.arange(Rp, dtype=jnp.int32) // G)[:, None]  # query token of each stacked row
    scale = 1.0 / math.sqrt(D)

    # Non-negative integer division as lax.div (floor_divide's sign handling needs TPU info to lower).
    def n_keys_of(L, i):
        last_row = jnp.minimum(i * br + br - 1, R - 1)
        return jnp.clip(L - Tq + lax.div(last_row, G) + 1, 0, maxp * ps)

    def kv_map(b, h, i, j, len_ref, bt_ref):
        last_page = jnp.maximum(lax.div(n_keys_of(len_ref[b], i) + ps - 1, ps) - 1, 0)
        return bt_ref[b * maxp + jnp.minimum(j, last_page)], 0, h

    def kernel(len_ref, bt_ref, t_ref, q_ref, k_ref, v_ref, o_ref, m_ref, l_ref, acc_ref):
        b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
        L = len_ref[b]

        @pl.when(j == 0)
        def _():
            m_ref[...] = jnp.full_like(m_ref, MASK_VALUE)
            l_ref[...] = jnp.zeros_like(l_ref)
            acc_ref[...] = jnp.zeros_like(acc_ref)

        @pl.when(j * ps < n_keys_of(L, i))
        def _():
            kpos = j * ps + lax.broadcasted_iota(jnp.int32, (br, ps), 1)
            mask = kpos <= (L - Tq) + t_ref[...]
            for hh in range(hb):
                k = k_ref[:, hh * D:(hh + 1) * D]
                v = v_ref[:, hh * D:(hh + 1) * D]
                s = lax.dot_general(q_ref[hh], k, (((1,), (1,)), ((), ())), preferred_element_type=_F32) * scale
                m_prev = m_ref[hh]
                m_new = jnp.maximum(m_prev, jnp.max(jnp.where(mask, s, MASK_VALUE), axis=1, keepdims=True))
                p = jnp.where(mask, jnp.exp(s - m_new), 0.0)
                corr = jnp.exp(m_prev - m_new)
                l_ref[hh] = l_ref[hh] * corr + jnp.sum(p, axis=1, keepdims=True)
                acc_ref[hh] = acc_ref[hh] * corr + lax.dot_general(
                    p.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=_F32)
                m_ref[hh] = m_new

        @pl.when(j == pl.num_programs(3) - 1)
        def _():
            l = l_ref[...]
            out = acc_ref[...] / jnp.where(l > 0, l, 1.0)
            o_ref[...] = jnp.where(l > 0, out, 0.0).astype(o_ref.dtype)

    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((B, KVH, Rp, D), q.dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(B, KVH // hb, Rp // br, maxp),
            in_specs=[
                pl.BlockSpec((br, 1), lambda b, h, i, j, *_: (i, 0)),
                pl.BlockSpec((None, hb, br, D), lambda b, h, i, j, *_: (b, h, i, 0)),
                pl.BlockSpec((None, ps, hb * D), kv_map),
                pl.BlockSpec((None, ps, hb * D), kv_map),
            ],
            out_specs=pl.BlockSpec((None, hb, br, D), lambda b, h, i, j, *_: (b, h, i, 0)),
            scratch_shapes=[_compat.tpu_vmem((hb, br, 1), _F32), _compat.tpu_vmem((hb, br, 1), _F32),
                            _compat.tpu_vmem((hb, br, D), _F32)],
        ),
        compiler_params=_compat.tpu_compiler_params(("parallel", "parallel", "parallel", "arbitrary")),
        interpret=_compat.tpu_interpret_arg(interpret),
        name=f"paged_attention_tpu_br{br}_hb{hb}",
    )(lengths, block_tables.reshape(-1), row_t, qs, k3, v3)
    return _unstack_rows(out, Tq, G)


# ------------------------------------------------------------------------------------------ public entry

def resolve_impl(impl: str, variant: str | None = None) -> str:
    """``"auto"`` -> ``"pallas"`` only where ``(variant, backend)`` is in :data:`VALIDATED_FASTER`."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl != "auto":
        return impl
    v = variant or _compat.default_variant()
    return "pallas" if (v, _compat.backend()) in VALIDATED_FASTER else "xla"


@functools.partial(jax.jit, static_argnames=("variant", "config", "interpret"))
def _pallas(q, k_pages, v_pages, block_tables, lengths, *, variant, config, interpret):
    call = _gpu_call if variant == "gpu" else _tpu_call
    return call(q, k_pages, v_pages, block_tables, lengths, config, interpret)


def paged_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, block_tables: jax.Array,
                    lengths: jax.Array, *, impl: str = "auto", variant: str | None = None,
                    config: PagedAttentionConfig | None = None, interpret: bool | None = None) -> jax.Array:
    """Causal GQA attention of ``q [B, Tq, H, D]`` over a paged KV pool (layout in the module docstring).

    Args:
      q: queries at positions ``lengths[b] - Tq`` to ``lengths[b] - 1`` inclusive (already RoPE'd; left-padded
        rows: queries at negative positions output zeros).
      k_pages, v_pages: ``[num_pages, page_size, KVH, D]``, same dtype as ``q``.
      block_tables: int32 ``[B, max_pages]`` page ids per sequence.
      lengths: int32 ``[B]`` valid tokens per sequence including the ``Tq`` new ones (0 = padding slot).
      impl: ``"xla"`` (:func:`paged_attention_reference`), ``"pallas"`` or ``"auto"``.
      variant: ``"gpu"`` (Triton backend) or ``"tpu"`` (Mosaic backend); ``None`` picks by backend.
      config: :class:`PagedAttentionConfig` block sizes.
      interpret: Pallas interpret mode; ``None`` = interpret unless on the variant's backend.

    Returns ``[B, Tq, H, D]`` in ``q.dtype``. Arguments are validated before anything is traced.
    """
    _validate(q, k_pages, v_pages, block_tables, lengths)
    impl = resolve_impl(impl, variant)
    if variant is None:
        variant = _compat.default_variant()
    elif variant not in VARIANTS:
        raise ValueError(f"variant must be None or one of {VARIANTS}, got {variant!r}")
    if config is None:
        config = PagedAttentionConfig()
    if not isinstance(config, PagedAttentionConfig):
        raise TypeError(f"config must be a PagedAttentionConfig or None, got {type(config).__name__}")
    config.validate(variant)
    interpret = _compat.resolve_interpret(interpret, variant)
    if impl == "xla":
        return paged_attention_reference(q, k_pages, v_pages, block_tables, lengths)
    _validate_kernel_shapes(variant, q, k_pages, config)
    return _pallas(q, k_pages, v_pages, block_tables, lengths, variant=variant, config=config,
                   interpret=interpret)
