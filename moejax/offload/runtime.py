"""Serving with experts offloaded to storage: a layer-by-layer engine step over a byte-budgeted expert cache.

:class:`OffloadRunner` is a :class:`~moejax.serve.runner.ModelRunner` for the serving engine:
``Engine(model, runner=OffloadRunner(model, engine_cfg, OffloadConfig(...)))``. The in-memory engine step
(:func:`moejax.serve.step.engine_step`) is one jitted program over all layers. With offloading, the experts a
layer needs are known only after its router runs, so the step runs layer by layer, composing the model's own
serving entry points (:class:`~moejax.models.transformer.Block`: ``paged_attention``, ``ffn_input``, ``route``,
``apply_experts``):

1. attention of the decode rows (and of the prefill rows when the layer is in the active prefill group), the
   FFN norm and the router: one jitted call;
2. the host reads the routed expert ids, and the :class:`~moejax.offload.cache.ExpertCache` decides hits,
   misses and evictions (each distinct ``(layer, expert)`` is one access per iteration); misses are read from
   the :class:`~moejax.offload.store.ExpertStore` by a pool of loader threads into free *slots* of a
   preallocated buffer ``[n_slots, ...]`` whose size is the memory budget;
3. the experts run over the slot buffer (token -> expert ids remapped to slot ids, the same dropless tile loop
   as in memory) plus shared experts and the residual: one jitted call.

The dense part (embeddings, attention, norms, routers, shared experts) stays in memory. The slots must hold the
distinct experts one layer needs in one iteration (checked per layer; a clear error otherwise). The same tokens come out as with all experts in memory (tests compare them).
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moejax.models.transformer import add_residual
from moejax.nn import dispatch as dsp
from moejax.nn.attention import PagedSpec
from moejax.offload.cache import ExpertCache
from moejax.offload.pregate import plan_expert_ids
from moejax.offload.store import (
    EXPERT_TENSORS,
    ExpertStore,
    anon_rss_bytes,
)
from moejax.serve.kv_cache import KVPool
from moejax.serve.runner import ModelRunner
from moejax.serve.step import StepOutput, finish_step, prepare_rows


@dataclass(frozen=True)
class OffloadConfig:
    """Expert offloading for :class:`moejax.serve.engine.Engine`.

    Attributes:
      store: an offload directory written by ``moejax offload prepare``.
      budget_bytes: bytes of expert weights kept in memory (the slot buffer); at least one layer's experts.
      policy: cache eviction policy: ``"lru"``, ``"lfu"``, ``"random"`` or ``"belady"``. Belady needs future routing: the
        engine must have a pre-gating router (``EngineConfig.pregate``), whose ids give each iteration's exact
        (layer, expert) access sequence before it runs; beyond that horizon it falls back to LRU order.
        ``"predictive"`` (also pre-gated): the same exact lookahead, and beyond it a Markov model of the pre-gate's
        expert sequence (``transitions``) ranks the other cached experts by how soon they are likely needed
        (:class:`~moejax.offload.cache.ExpertCache`); it uses only the tokens known at each iteration.
      io: ``"direct"`` (O_DIRECT), ``"fadvise"`` or ``"buffered"`` (see :class:`ExpertStore`).
      bandwidth: throttle reads to this many bytes/s (a modelled storage device); None = the real device.
      loader_threads: concurrent reads.
      bits: for a quantized store (``prepare(..., quant=...)``): a fixed width for every expert (e.g. 8), or
        ``"router"``: D²MoE's bit-width router gives each activated expert a width by its routing weight within
        the layer's share of the budget, and bit-planes load hottest-expert-bit-first (HEBF). Cache items are
        then single planes. Must be None for a float store.
      avg_bits: with ``bits="router"``: D²MoE's bit budget, the largest mean width (in bits) of the activated
        experts of a layer in one iteration. The router's budget per layer and iteration is then the tighter of
        two: the layer's share of the memory (``budget_bytes / number of MoE layers``, in plane bytes) and
        ``avg_bits x activated experts`` nominal bits; a residual plane is bought only if it fits both (see
        :func:`moejax.quant.assign_bits`), so the widths chosen average at most ``avg_bits`` per layer and
        iteration. Must lie between the store's base and top widths (e.g. ``[2, 8]`` for ``(2, 3, 4, 8)``).
        None (default): the memory share alone, which rarely binds in single-stream decode (a few active
        experts per layer), so nearly every expert gets the top width.
      transitions: for ``policy="predictive"``: ``[E, E]`` row-stochastic ``P(next token's expert | this
        token's expert)`` (nested tuples or an array), e.g. :func:`moejax.offload.cache.transition_matrix` of
        pre-gate routing traces of training text.
      discount: for ``policy="predictive"``: per-token discount of the predicted next use (in (0, 1)).
      online_prior: for ``policy="predictive"``: also learn the transitions of the served tokens (each request's
        consecutive pre-gated experts, prompt included, once known), ``transitions`` weighing this many
        pseudo-counts per row; None = the fixed ``transitions``.
    """

    store: str
    budget_bytes: int
    policy: str = "lru"
    io: str = "direct"
    bandwidth: float | None = None
    loader_threads: int = 4
    bits: int | str | None = None
    transitions: tuple | None = None
    discount: float = 0.8
    online_prior: float | None = 20.0
    avg_bits: float | None = None

    def __post_init__(self):
        if self.avg_bits is None:
            return
        if self.bits != "router":
            raise ValueError(f"OffloadConfig.avg_bits={self.avg_bits!r} needs bits='router' (the bit-width router "
                             f"chooses the widths it averages); got bits={self.bits!r}")
        a = self.avg_bits
        if isinstance(a, bool) or not isinstance(a, (int, float, np.integer, np.floating)) or not np.isfinite(a):
            raise ValueError(f"OffloadConfig.avg_bits must be a finite number of bits between the store's base and "
                             f"top widths (e.g. 2 to 8), got {a!r}")


@dataclass
class OffloadStats:
    hits: int = 0
    misses: int = 0
    bytes_read: int = 0
    stall_s: float = 0.0        # time the step waited for expert reads
    step_s: float = 0.0
    peak_anon_rss: int = 0
    bits_used: dict = dataclasses.field(default_factory=dict)  # width -> expert activations decoded at it

    @property
    def hit_rate(self) -> float:
        n = self.hits + self.misses
        return self.hits / n if n else 0.0


def load_offloaded_model(store: ExpertStore):
    """A :class:`Transformer` with the store's dense parameters and empty placeholders for the experts."""
    from moejax.models.transformer import Transformer

    cfg = store.config()
    abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    gdef, state = nnx.split(abstract)
    dense = store.dense_params()
    flat = []
    for path, var in nnx.to_flat_state(state):
        name = ".".join(map(str, path))
        if name.split(".")[-2:-1] == ["experts"] and name.rsplit(".", 1)[-1] in EXPERT_TENSORS:
            v = var.get_raw_value() if hasattr(var, "get_raw_value") else var.raw_value
            flat.append((path, var.replace(jnp.zeros((v.shape[0], 0), v.dtype))))
        elif name in dense:
            flat.append((path, var.replace(jnp.asarray(dense[name]))))
        else:
            raise RuntimeError(f"parameter {name} is missing from {store.path}/dense.safetensors")
    return nnx.merge(gdef, nnx.from_flat_state(flat))


# ------------------------------------------------------------------------------------------------ jitted pieces
@partial(jax.jit, static_argnames=("gdef", "block_size", "use_hidden"))
def _prepare(gdef, state, dec, pf, pf_hidden, dec_ids, pf_ids, *, block_size, use_hidden):
    return prepare_rows(nnx.merge(gdef, state), dec, pf, pf_hidden, block_size=block_size, use_hidden=use_hidden,
                        dec_ids=dec_ids, pf_ids=pf_ids)


@partial(jax.jit, static_argnames=("gdef", "spec", "route"), donate_argnames=("kp", "vp"))
def _attention(gdef, st, kp, vp, li, parts, *, spec, route):
    """The attention sublayer of each part, then the FFN input of all of them (and their routing)."""
    blk = nnx.merge(gdef, st)
    xs = []
    for part in parts:
        x, kp, vp = blk.paged_attention(part.x, part.rows, kp, vp, li, spec)
        xs.append(x)
    y, m, ids = blk.ffn_input([(x, p.rows.valid, p.expert_ids) for x, p in zip(xs, parts, strict=True)])
    return xs, kp, vp, y, m, (blk.route(y, token_mask=m, expert_ids=ids) if route else None)


@partial(jax.jit, static_argnames=("gdef", "block_rows"))
def _experts(gdef, st, y, ids, w, rm, id_map, swg, swu, swd, *, block_rows):
    """The routed experts from the slot buffer (expert ids remapped to slots) plus the shared experts."""
    return nnx.merge(gdef, st).apply_experts(y, id_map[ids], w, rm, expert_weights=(swg, swu, swd), method="tiles",
                                             block_rows=block_rows)


@partial(jax.jit, static_argnames=("gdef",))
def _mlp(gdef, st, y):
    return nnx.merge(gdef, st).ffn(y)[0]


_residual = jax.jit(add_residual)


@partial(jax.jit, donate_argnums=(0, 1, 2))
def _put(swg, swu, swd, slot, wg, wu, wd):
    return swg.at[slot].set(wg), swu.at[slot].set(wu), swd.at[slot].set(wd)


@partial(jax.jit, static_argnames=("bits", "dtype"), donate_argnums=(0, 1, 2))
def _decode_put(swg, swu, swd, slot, qts, *, bits, dtype):
    """Decode one expert's ``{name: QTensor}`` at ``bits`` into slot ``slot`` of the compute buffers."""
    wg, wu, wd = (qts[n].dequantize(bits, dtype) for n in EXPERT_TENSORS)
    return swg.at[slot].set(wg), swu.at[slot].set(wu), swd.at[slot].set(wd)


@partial(jax.jit, static_argnames=("gdef", "return_logits"))
def _finish(gdef, state, xd, xp, dec, pf, touched, *, return_logits):
    return finish_step(nnx.merge(gdef, state), xd, xp, dec, pf, touched, None, return_logits)


class OffloadRunner(ModelRunner):
    """A :class:`~moejax.serve.runner.ModelRunner` whose step runs layer by layer with the experts read from
    storage into a budgeted slot buffer (see the module docstring).

    ``model``: :func:`load_offloaded_model` of the store (its expert weights are empty placeholders); ``cfg``:
    the engine's :class:`~moejax.serve.engine.EngineConfig`; ``offload``: the :class:`OffloadConfig`;
    ``pregate``: a :class:`~moejax.offload.pregate.PreGate` whose experts every MoE layer uses (Read-ME; the
    Belady and predictive policies need it). No ahead-of-time warm-up (the pieces compile on first use), no
    multi-step decoding, no prompt scoring.
    """

    pad_decode_with_prefill = False
    supports_multi_step = False
    supports_speculative = False
    supports_async = False  # the step moves experts layer by layer on the host: nothing to overlap
    supports_nano_batches = False  # its own layer-by-layer step

    def __init__(self, model, cfg, offload: OffloadConfig, *, pregate=None):
        if model.cfg.moe is None:
            raise ValueError("expert offloading needs an MoE model")
        super().__init__(model, cfg)
        self.offload, self.pregate = offload, pregate
        cfg = offload
        self.store = ExpertStore(cfg.store, io=cfg.io, bandwidth=cfg.bandwidth)
        mcfg = model.cfg
        scfg = self.store.config()
        for f in ("d_model", "n_layers", "vocab_size"):
            if getattr(scfg, f) != getattr(mcfg, f):
                raise ValueError(f"the offload store {cfg.store} was written for a different model "
                                 f"({f}={getattr(scfg, f)} vs {getattr(mcfg, f)})")
        if mcfg.moe.dispatch != "dropless":
            raise ValueError("expert offloading supports MoEConfig.dispatch='dropless' only")
        self.spec = PagedSpec(self.cfg.block_size, self.cfg.attn_impl, self.cfg.kv_block)
        self.E = mcfg.moe.num_experts
        self.quant = self.store.quant
        if (self.quant is None) != (cfg.bits is None):
            raise ValueError("OffloadConfig.bits must be set (an int width or 'router') exactly when the store is "
                             f"quantized (this store is {'quantized' if self.quant else 'float'})")
        if self.quant is not None:
            self.qbits = tuple(self.quant["bits"])
            if cfg.bits != "router" and cfg.bits not in self.qbits:
                raise ValueError(f"OffloadConfig.bits={cfg.bits!r}; allowed: 'router' or one of {self.qbits}")
            if cfg.policy in ("belady", "predictive") and cfg.bits == "router":
                raise ValueError(f"the {cfg.policy} policy is not supported with the bit-width router")
            if cfg.avg_bits is not None and not self.qbits[0] <= cfg.avg_bits <= self.qbits[-1]:
                raise ValueError(f"OffloadConfig.avg_bits={cfg.avg_bits!r} must be >= the store's base width "
                                 f"{self.qbits[0]} and <= its top width {self.qbits[-1]} (widths {self.qbits})")
            self.plane_bytes = [self.store.plane_nbytes(p) for p in range(len(self.qbits))]
            self.n_moe = sum(n for kind, _, n in model.runs if kind == "moe")
            self.resident: dict = {}
            self._qtemplates: dict = {}
        self.expert_bytes = self.store.record_bytes if self.quant is None else sum(self.plane_bytes)
        self.n_slots = int(cfg.budget_bytes // self.expert_bytes) if self.quant is None else self.E
        if self.quant is not None and cfg.budget_bytes < self.plane_bytes[0]:
            raise ValueError(f"OffloadConfig.budget_bytes={cfg.budget_bytes} is smaller than one base plane "
                             f"({self.plane_bytes[0]} bytes)")
        if self.n_slots < 1:
            raise ValueError(f"OffloadConfig.budget_bytes={cfg.budget_bytes} is smaller than one expert "
                             f"({self.expert_bytes} bytes)")
        pred = {}
        if cfg.policy == "predictive":
            if cfg.transitions is None:
                raise ValueError("the predictive policy needs OffloadConfig.transitions (an [E, E] matrix)")
            tr = np.asarray(cfg.transitions, np.float64)
            if tr.shape != (self.E, self.E):
                raise ValueError(f"OffloadConfig.transitions has shape {tr.shape}; expected ({self.E}, {self.E})")
            pred = {"transitions": tr, "discount": cfg.discount, "n_layers": mcfg.n_layers,
                    "online_prior": cfg.online_prior}
        self._last_expert: dict = {}  # (kv block, position) -> pre-gated expert of that token (online learning)
        self._n_steps = 0
        self.cache = ExpertCache(self.n_slots * self.expert_bytes if self.quant is None else cfg.budget_bytes,
                                 cfg.policy, **pred)
        # per-layer (graphdef, state) of the blocks; expert weights are excluded (they live in the slots)
        self.layers = []
        for r, (kind, first, n) in enumerate(model.runs):
            gd, st = nnx.split(model.stacks[r])
            if kind == "moe":
                st = _drop_experts(st)
            for li in range(n):
                self.layers.append((r, li, kind, gd, jax.tree.map(lambda a, li=li: a[li], st)))
        D, F = mcfg.d_model, mcfg.moe.d_ff
        pdt = jnp.dtype(mcfg.param_dtype)
        self.swg = jnp.zeros((self.n_slots, D, F), pdt)
        self.swu = jnp.zeros((self.n_slots, D, F), pdt)
        self.swd = jnp.zeros((self.n_slots, F, D), pdt)
        self.slot_of: dict[tuple[int, int], int] = {}
        self.free_slots = list(range(self.n_slots - 1, -1, -1))
        self.loaders = ThreadPoolExecutor(max_workers=cfg.loader_threads, thread_name_prefix="moejax-expert-io")
        self.stats = OffloadStats()

    # ----------------------------------------------------------------------------------------- cache
    def _access(self, pinned, size_of, on_evict) -> list:
        """One cache access per key of ``pinned`` (in order); returns the misses (the caller loads them)."""
        misses = []
        for key in pinned:
            hit, evicted = self.cache.access(key, size_of(key), pinned=pinned)
            for v in evicted:
                on_evict(v)
            if hit:
                self.stats.hits += 1
            else:
                self.stats.misses += 1
                misses.append(key)
        return misses

    def _read(self, keys, size_of) -> list:
        """Read ``keys`` from the store with the loader threads (in order); counts bytes and stall time."""
        if not keys:
            return []
        t0 = time.perf_counter()
        futs = [(k, self.loaders.submit(self.store.read, *k)) for k in keys]
        out = [(k, fut.result()) for k, fut in futs]
        self.stats.bytes_read += sum(size_of(k) for k in keys)
        self.stats.stall_s += time.perf_counter() - t0
        return out

    def ensure(self, layer: int, experts) -> np.ndarray:
        """Make ``experts`` of ``layer`` resident; returns the expert -> slot map ``[E]`` (int32)."""
        pinned = [(layer, e) for e in experts]
        if len(pinned) > self.n_slots:
            raise ValueError(f"layer {layer} needs {len(pinned)} experts this iteration but the budget holds "
                             f"{self.n_slots} ({self.offload.budget_bytes} bytes); raise budget_bytes or lower the batch")
        misses = self._access(pinned, lambda k: self.expert_bytes,
                              lambda v: self.free_slots.append(self.slot_of.pop(v)))
        for k in misses:
            self.slot_of[k] = self.free_slots.pop()
        for k, w in self._read(misses, lambda k: self.expert_bytes):
            self.swg, self.swu, self.swd = _put(self.swg, self.swu, self.swd, self.slot_of[k],
                                                *(w[t] for t in EXPERT_TENSORS))
        id_map = np.zeros(self.E, np.int32)
        for (_, e) in pinned:
            id_map[e] = self.slot_of[(layer, e)]
        return id_map

    def ensure_quantized(self, layer: int, ids_h, w_h, rm_h) -> np.ndarray:
        """Quantized store: choose widths, make the needed bit-planes resident (reads submitted in HEBF order),
        decode the layer's activated experts into the compute slots; returns the expert -> slot map.

        Experts are decoded hottest first, each as soon as its own planes are in (the decode is dispatched
        asynchronously, so it overlaps the reads of the colder experts' planes)."""
        from moejax.quant import assign_bits, hebf_order

        E, bits_set = self.E, self.qbits
        ids = np.where(rm_h, ids_h, -1)
        active = sorted(set(ids[ids >= 0].tolist()))
        if self.offload.bits == "router":
            # the tighter of the layer's memory share (bytes) and the average-width budget (OffloadConfig.avg_bits)
            a = assign_bits(ids, np.where(rm_h, w_h, 0.0), E, allowed_bits=bits_set,
                            budget_bytes=self.offload.budget_bytes / self.n_moe, plane_nbytes=self.plane_bytes,
                            avg_bits=self.offload.avg_bits, strict=False)
            bits = [int(b or 0) for b in a.bits]
            order = hebf_order(bits, a.importance, bits_set, plane_cost=self.plane_bytes)
            hot = sorted(active, key=lambda e: (-a.importance[e], e))
        else:
            bits = [self.offload.bits if e in active else 0 for e in range(E)]
            order = [(e, p) for e in active for p in range(bits_set.index(self.offload.bits) + 1)]
            hot = active
        pinned = [(layer, e, p) for e, p in order]
        need = sum(self.plane_bytes[p] for _, _, p in pinned)
        if need > self.offload.budget_bytes:
            raise ValueError(f"layer {layer} needs {need} bytes of planes this iteration but "
                             f"OffloadConfig.budget_bytes={self.offload.budget_bytes}")
        plane_size = lambda k: self.plane_bytes[k[2]]
        misses = self._access(pinned, plane_size, lambda v: self.resident.pop(v, None))
        futs = {k: self.loaders.submit(self.store.read, *k) for k in misses}  # HEBF order
        self.stats.bytes_read += sum(plane_size(k) for k in misses)
        for e in hot:
            n = bits_set.index(bits[e]) + 1
            for k in [(layer, e, p) for p in range(n) if (layer, e, p) in futs]:
                t0 = time.perf_counter()
                self.resident[k] = futs.pop(k).result()
                self.stats.stall_s += time.perf_counter() - t0
            self._decode_into(layer, e, bits[e], [self.resident[(layer, e, p)] for p in range(n)])
            self.stats.bits_used[bits[e]] = self.stats.bits_used.get(bits[e], 0) + 1
        return np.arange(E, dtype=np.int32)

    def _decode_into(self, layer: int, slot: int, bits: int, planes: list) -> None:
        """Decode one expert from its plane records (``planes[p]``: plane ``p``'s arrays, base first) at ``bits``
        straight into compute slot ``slot``: one jitted call per width (decode + slot update, buffers donated).
        The QTensors are assembled from the cached per-layer config and shapes without re-validating."""
        from moejax.quant import QTensor, expert_from_arrays

        tmpl = self._qtemplates.get(layer)
        if tmpl is None:  # once per layer: parse the metadata (and check the arrays against it)
            qts = expert_from_arrays({**self.store.quant_meta(layer), **planes[0]})
            tmpl = self._qtemplates[layer] = {n: (qt.config, qt.shape) for n, qt in qts.items()}
        qts = {}
        for name, (qcfg, shape) in tmpl.items():
            qts[name] = QTensor(tuple(pl[f"{name}.p{p}.q"] for p, pl in enumerate(planes)),
                                tuple(pl[f"{name}.p{p}.scale"] for p, pl in enumerate(planes)),
                                planes[0][f"{name}.zero"], qcfg, shape)
        self.swg, self.swu, self.swd = _decode_put(self.swg, self.swu, self.swd, np.int32(slot), qts, bits=bits,
                                                   dtype=jnp.dtype(self.mcfg.param_dtype))

    # ----------------------------------------------------------------------------------------- step
    # ----------------------------------------------------------------------------------------- runner
    def _layer_states(self, model):
        return None  # the step runs layer by layer on per-layer states of its own (``self.layers``)

    def expert_ids(self, plan, dec, pf):
        if self.pregate is None:
            return None, None
        return plan_expert_ids(self.pregate, plan, dec, pf)

    def run_step(self, dec, pf, hidden, group, use_hidden: bool, dec_ids=None, pf_ids=None) -> StepOutput:
        return self.step(self.pool, dec, pf, hidden, group, use_hidden=use_hidden,
                         return_logits=self.cfg.record_logits, dec_ids=dec_ids, pf_ids=pf_ids)

    def warmup(self, shapes, **kwargs):
        raise ValueError("warm-up is not available with offloaded experts (the offload step runs layer by layer "
                         "and compiles its pieces on first use)")

    def score_prompt(self, ids):
        raise NotImplementedError("prompt log-probabilities (echo with logprobs) are not available with "
                                  "offloaded experts")

    def step(self, pool: KVPool, dec, pf, pf_hidden, group, *, use_hidden: bool, return_logits: bool,
             dec_ids=None, pf_ids=None):
        """One engine iteration over ``pool`` (the runner's own for :meth:`run_step`); returns a
        :class:`moejax.serve.step.StepOutput`.

        With pre-gated expert ids (``dec_ids [Bd]``, ``pf_ids [Bp, Tp]`` as numpy arrays) every layer's experts
        are known before the step runs: the Belady policy gets this iteration's exact access sequence.
        """
        t0 = time.perf_counter()
        mcfg = self.mcfg
        lo, hi = int(group[0]), int(group[1])
        if self.offload.policy in ("belady", "predictive"):
            if dec_ids is None and pf_ids is None:
                raise ValueError(f"the {self.offload.policy} policy needs future routing: serve with a pre-gating router")
            self.cache.set_future(self.lookahead(dec, pf, dec_ids, pf_ids, lo, hi))
            if self.offload.policy == "predictive":
                if self.offload.online_prior is not None:
                    self.cache.observe_transitions(self.known_transitions(dec, pf, dec_ids, pf_ids, lo))
                self.cache.set_state(self.current_experts(dec, pf, dec_ids, pf_ids))
        dpart, ppart = _prepare(self.gdef, self.state, dec, pf, pf_hidden,
                                None if dec_ids is None else jnp.asarray(dec_ids),
                                None if pf_ids is None else jnp.asarray(pf_ids),
                                block_size=self.cfg.block_size, use_hidden=use_hidden)
        ks, vs = list(pool.k), list(pool.v)
        touched = np.zeros(mcfg.n_layers, np.int32)
        for layer, (r, li, kind, gd, st) in enumerate(self.layers):
            names = (["d"] if dec is not None else []) + (["p"] if pf is not None and lo <= layer < hi else [])
            if not names:
                continue
            parts = [dpart if n == "d" else ppart for n in names]
            xs, ks[r], vs[r], y, _, routing = _attention(gd, st, ks[r], vs[r], jnp.int32(li), parts, spec=self.spec,
                                                         route=kind == "moe")
            if kind == "moe":
                f = self._moe_layer(layer, gd, st, y, routing, touched)
            else:
                f = _mlp(gd, st, y)
            for n, x in zip(names, _residual(xs, f), strict=True):
                if n == "d":
                    dpart = dpart._replace(x=x)
                else:
                    ppart = ppart._replace(x=x)
        xd = None if dpart is None else dpart.x
        xp = None if ppart is None else ppart.x
        out = _finish(self.gdef, self.state, xd, xp, dec, pf, jnp.asarray(touched), return_logits=return_logits)
        self.stats.step_s += time.perf_counter() - t0
        self.stats.peak_anon_rss = max(self.stats.peak_anon_rss, anon_rss_bytes())
        return out._replace(pool=KVPool(tuple(ks), tuple(vs)))

    def _moe_layer(self, layer, gd, st, y, routing, touched):
        """Make the routed experts of ``layer`` resident (cache decisions, reads, decoding) and run them."""
        ids, w, rm = routing
        ids_h, w_h, rm_h = jax.device_get((ids, w, rm))
        needed = sorted(set(ids_h[rm_h].tolist()))
        touched[layer] = len(needed)
        if self.quant is not None:
            id_map = self.ensure_quantized(layer, ids_h, w_h, rm_h)
        else:
            id_map = self.ensure(layer, needed)
        T, K = ids_h.shape
        bt = self.mcfg.moe.block_rows or dsp.default_block_rows(T * K, self.E)
        return _experts(gd, st, y, ids, w, rm, jnp.asarray(id_map), self.swg, self.swu, self.swd, block_rows=bt)

    def lookahead(self, dec, pf, dec_ids, pf_ids, lo, hi) -> list[tuple[int, int]]:
        """This iteration's (layer, expert) accesses in execution order, from pre-gated ids."""
        dec_set = set() if dec is None else set(np.asarray(dec_ids)[np.asarray(dec.valid)].tolist())
        pf_set = set()
        if pf is not None:
            Tp = pf.tokens.shape[1]
            valid = np.arange(Tp)[None, :] >= (Tp - np.asarray(pf.length))[:, None]  # left-padded rows
            pf_set = set(np.asarray(pf_ids)[valid].tolist())
        seq = []
        for layer, (_, _, kind, _, _) in enumerate(self.layers):
            if kind == "moe":
                ids = dec_set | pf_set if lo <= layer < hi else dec_set
                seq += [(layer, e) for e in sorted(ids)]
        return seq

    @staticmethod
    def current_experts(dec, pf, dec_ids, pf_ids) -> set[int]:
        """The pre-gated experts of each row's newest known token (decode rows: the token being computed;
        prefill rows: the chunk's last token): the predictive policy's Markov states."""
        cur = set()
        if dec is not None:
            cur |= set(np.asarray(dec_ids)[np.asarray(dec.valid)].tolist())
        if pf is not None:
            ok = np.asarray(pf.length) > 0
            cur |= set(np.asarray(pf_ids)[ok, -1].tolist())  # left-padded: the last column is the newest token
        return cur

    def known_transitions(self, dec, pf, dec_ids, pf_ids, lo: int = 0) -> list[tuple[int, int]]:
        """(expert of a token, expert of its request's next token) for the tokens this iteration computes: within
        prefill chunks, and from each row's previous token (remembered by its KV block and position for two
        iterations) to its first token here. Only tokens already known are used. A prefill chunk continuing in
        a later layer group (``lo > 0``) was counted when its first group ran."""
        bs, step = self.cfg.block_size, self._n_steps
        self._n_steps += 1
        seen, pairs = self._last_expert, []

        def link(tables, pos, e):
            if pos > 0:
                prev = seen.pop((int(tables[(pos - 1) // bs]), pos - 1), None)
                if prev is not None:
                    pairs.append((prev[0], e))

        new = {}
        if dec is not None:
            tabs, pos, valid, ids = (np.asarray(a) for a in (dec.tables, dec.pos, dec.valid, dec_ids))
            for i in np.flatnonzero(valid):
                p, e = int(pos[i]), int(ids[i])
                link(tabs[i], p, e)
                new[(int(tabs[i][p // bs]), p)] = (e, step)
        if pf is not None:
            tabs, start, length, ids = (np.asarray(a) for a in (pf.tables, pf.start, pf.length, pf_ids))
            Tp = ids.shape[1]
            for i in np.flatnonzero(length > 0):
                n, s0 = int(length[i]), int(start[i])
                seq = [int(x) for x in ids[i, Tp - n:]]
                if lo == 0:
                    link(tabs[i], s0, seq[0])
                    pairs += list(itertools.pairwise(seq))
                last = s0 + n - 1
                new[(int(tabs[i][last // bs]), last)] = (seq[-1], step)
        for k in [k for k, (_, s) in seen.items() if s < step - 1]:  # not continued within two iterations
            del seen[k]
        seen.update(new)
        return pairs

    def close(self) -> None:
        """Stop the loader threads and close the store."""
        self.loaders.shutdown(wait=True)
        self.store.close()


def _drop_experts(state):
    """A block state without the routed expert tensors (shape-[n, 0] placeholders keep the graph mergeable)."""
    flat = []
    for path, var in nnx.to_flat_state(state):
        if len(path) >= 2 and path[-2] == "experts" and path[-1] in EXPERT_TENSORS:
            v = var[...]
            var = var.replace(jnp.zeros((v.shape[0], 0), v.dtype))
        flat.append((path, var))
    return nnx.from_flat_state(flat)
