"""Expert-parallel serving: a runner whose step runs on a device mesh with the routed experts sharded.

:class:`ExpertParallelRunner` is a :class:`~moejax.serve.runner.ModelRunner` that places the model on a mesh
(``MeshConfig(expert=n)``: the experts' stacked weights sharded over ``expert`` by their logical axes, every
other parameter and the KV pool replicated) and runs the same engine step (:func:`moejax.serve.step.engine_step`'s
body: the Block entry points, nothing re-implemented) inside ``jax.shard_map`` under
:func:`moejax.parallel.expert_parallel.expert_parallel_serving`: attention and the KV cache are replicated, and
every MoE layer splits the step's rows over the devices, exchanges them with the training path's two
``all_to_all`` ops and gathers the outputs back (:func:`~moejax.parallel.expert_parallel.ep_moe_replicated`).

``capacity_factor`` 0 (default) is dropless (each expert's buffer holds all of a device's rows); a positive
value caps the rows per expert and device as in training, and the rows it drops are counted: per layer in each
step's ``StepResult.dropped``, in the engine's metrics (``dropped_rows_total``, ``/metrics``'
``moejax_moe_dropped_rows_total``).

With ``eplb`` (:class:`EPLBConfig`, xLLM's expert-placement load balancing) every device holds
``E / n + redundant_slots`` physical expert slots: a :class:`~moejax.parallel.eplb.Placement` per MoE layer
says which logical expert each slot holds (the heaviest experts replicated), the layers carry its tables as
:class:`~moejax.parallel.eplb.ExpertSlots` state and the expert-parallel path maps each routed (token, expert)
to one of the expert's replicas (``physical_order``, a stage). After every iteration the runner feeds the
step's per-layer expert loads to a :class:`~moejax.parallel.eplb.LoadTracker`; when it says so (the dynamic
policy: cosine similarity of the current and the placed loads below 0.9; the static one: every ``period``
steps or never) it computes a new placement and installs it between iterations: the moved slots' weights are
copied from the host's logical weights into the sharded slot arrays and the tables updated, with the shapes
unchanged (no recompilation, the engine never stops). :attr:`ExpertParallelRunner.rebalances` records each.

The step runs the scanned layer stack (``layer_loop`` is ignored) and one iteration per call
(``decode_steps`` > 1 falls back to single steps).
"""

from __future__ import annotations

import dataclasses
import time

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from moejax.parallel import eplb as eplb_lib
from moejax.parallel import mesh as mesh_lib
from moejax.parallel.expert_parallel import EP_A2A_MODES, expert_parallel_serving
from moejax.serve.runner import ModelRunner
from moejax.serve.step import _STATIC, _engine_step

_WEIGHTS = ("w_gate", "w_up", "w_down")  # a MoE layer's expert weight stacks (physical slots under EPLB)
_TABLES = ("eplb_log2phy", "eplb_counts")  # the placement tables a MoE layer carries under EPLB


@dataclasses.dataclass(frozen=True)
class EPLBConfig:
    """Expert-placement load balancing for :class:`ExpertParallelRunner`.

    Attributes:
      redundant_slots: extra expert slots per device (replicas of the heaviest experts), >= 0.
      policy: :data:`~moejax.parallel.eplb.POLICIES`: ``dynamic`` (rebalance when the loads drift),
        ``static`` (every ``period`` steps; ``period=0``: only the initial placement) or ``none``.
      algorithm: :data:`~moejax.parallel.eplb.ALGORITHMS` used to place (default: ``greedy`` for dynamic,
        ``hierarchical``, DeepSeek's, otherwise).
      initial_loads: ``[moe_layers, E]`` (or ``[E]``) loads of a calibration trace for the first placement
        (default: uniform).
      decay, threshold, check_every, min_steps, period: the :class:`~moejax.parallel.eplb.LoadTracker`'s.
    """

    redundant_slots: int = 1
    policy: str = "dynamic"
    algorithm: str | None = None
    initial_loads: tuple | None = None
    decay: float = 0.95
    threshold: float = 0.9
    check_every: int = 10
    min_steps: int = 10
    period: int = 0

    def resolved_algorithm(self) -> str:
        return self.algorithm or ("greedy" if self.policy == "dynamic" else "hierarchical")

    def validate(self) -> EPLBConfig:
        if isinstance(self.redundant_slots, bool) or not isinstance(self.redundant_slots, int) \
                or self.redundant_slots < 0:
            raise ValueError(f"EPLBConfig.redundant_slots={self.redundant_slots!r} must be an integer >= 0")
        if self.policy not in eplb_lib.POLICIES:
            raise ValueError(f"EPLBConfig.policy={self.policy!r}; allowed: {', '.join(map(repr, eplb_lib.POLICIES))}")
        if self.resolved_algorithm() not in eplb_lib.ALGORITHMS:
            raise ValueError(f"EPLBConfig.algorithm={self.algorithm!r}; allowed: "
                             f"{', '.join(map(repr, eplb_lib.ALGORITHMS))}")
        return self


class ExpertParallelRunner(ModelRunner):
    """Serve a MoE model expert-parallel over ``mesh`` (a :class:`~moejax.parallel.mesh.MeshConfig` or its
    text, e.g. ``"expert=8"``: only the ``expert`` (and ``node``) axes may exceed 1).

    ``capacity_factor``: 0 (default) dropless; ``> 0`` the per-expert capacity of each device's rows (Tutel
    semantics, as in training), dropped rows counted in the engine's metrics. ``a2a``: the exchange
    (:data:`~moejax.parallel.expert_parallel.A2A_MODES`; ``fixed`` runs everywhere). ``eplb``: an
    :class:`EPLBConfig` (None: the plain layout, expert ``e`` on device ``e // (E / n)``).
    """

    supports_multi_step = False
    supports_speculative = False
    supports_nano_batches = False  # its step inside shard_map takes no nano_batches (yet)

    def __init__(self, model, cfg, mesh="expert=8", *, capacity_factor: float = 0.0, a2a: str = "fixed",
                 devices=None, eplb: EPLBConfig | None = None):
        mcfg = model.cfg
        if mcfg.moe is None:
            raise ValueError("ExpertParallelRunner: the model has no MoE layers (ModelConfig.moe is None)")
        if mcfg.moe.expert_type != "swiglu":
            raise NotImplementedError(f"ExpertParallelRunner: expert_type={mcfg.moe.expert_type!r}; expert-parallel "
                                      f"serving shards SwiGLU expert stacks only")
        mc = mesh if isinstance(mesh, mesh_lib.MeshConfig) else mesh_lib.MeshConfig.parse(mesh)
        if mc.data != 1 or mc.tensor != 1 or mc.fsdp:
            raise ValueError(f"ExpertParallelRunner: mesh {mc.spec()}: serving shards experts only (data=1, "
                             f"tensor=1, no fsdp); attention and the KV cache are replicated")
        mc.validate(mcfg.moe.num_experts, None if devices is None else len(devices))
        if not (isinstance(capacity_factor, (int, float)) and capacity_factor >= 0):
            raise ValueError(f"ExpertParallelRunner: capacity_factor={capacity_factor!r} must be a number >= 0 "
                             f"(0: dropless)")
        if a2a not in EP_A2A_MODES:
            raise ValueError(f"ExpertParallelRunner: a2a={a2a!r}; allowed: {', '.join(EP_A2A_MODES)}")
        super().__init__(model, cfg)
        self.mesh_cfg, self.mesh = mc, mesh_lib.make_mesh(mc, devices)
        self.capacity_factor, self.a2a = float(capacity_factor), a2a
        self.eplb = None if eplb is None else eplb.validate()
        self.tracker, self.placement, self.rebalances = None, None, []
        self._logical_graph = None
        self.moe_rows = np.concatenate([np.arange(first, first + c) for _, first, c in self._moe_layers()])
        if self.eplb is not None:
            self._init_eplb()
        self._specs = mesh_lib.state_specs(self.state)
        self.state = mesh_lib.shard_state(self.state, self.mesh)
        rep = NamedSharding(self.mesh, P())
        self.pool = jax.device_put(self.pool, rep)
        self._pool_spec = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep), self.pool)
        self._jit = jax.jit(self._step, static_argnames=(*_STATIC, "prefill_kv_block"), donate_argnames=("pool",))

    # ------------------------------------------------------------------------------------------ EPLB
    def _moe_layers(self):
        """``[(stack index, first layer, count)]`` of the MoE stacks."""
        return [(r, first, n) for r, (kind, first, n) in enumerate(self.model.runs) if kind == "moe"]

    def _init_eplb(self):
        ec, E, n = self.eplb, self.mcfg.moe.num_experts, self.mesh_cfg.expert_parallel
        self.slots_per_device = E // n + ec.redundant_slots
        stacks = self._moe_layers()
        L = sum(c for _, _, c in stacks)
        self.tracker = eplb_lib.LoadTracker(L, E, policy=ec.policy, decay=ec.decay, threshold=ec.threshold,
                                            check_every=ec.check_every, min_steps=ec.min_steps, period=ec.period)
        # the logical weights, on the host: the source every placement gathers its slots from
        self._logical = {r: dict(zip(_WEIGHTS, map(np.asarray, self.model.stacks[r].moe.experts.weights()),
                                     strict=True)) for r, _, _ in stacks}
        loads = np.ones((L, E)) if ec.initial_loads is None else np.broadcast_to(
            np.asarray(ec.initial_loads, np.float64), (L, E))
        placement = self._place(loads)
        # a model copy whose MoE layers hold physical slots and carry the tables (the runner's own graph)
        clone = nnx.merge(self.gdef, self.state, copy=True)  # new Variables: the served model is not touched
        for r, values in self._slot_values(placement).items():
            moe = clone.stacks[r].moe
            for k in _WEIGHTS:
                getattr(moe.experts, k).set_value(values[k])
            for k in _TABLES:
                setattr(moe, k, eplb_lib.ExpertSlots(values[k]))
        self.gdef, self.state = nnx.split(clone)
        self.placement = placement
        if self.tracker.policy != "none" and ec.initial_loads is not None:
            self.tracker.load = loads.copy()
            self.tracker.rebalanced()

    def _place(self, loads) -> eplb_lib.Placement:
        algorithm = "contiguous" if self.tracker.policy == "none" and not self.eplb.redundant_slots \
            else self.eplb.resolved_algorithm()
        return eplb_lib.place(loads, self.mesh_cfg.expert_parallel, self.slots_per_device, algorithm=algorithm)

    def _slot_values(self, placement) -> dict:
        """Per MoE stack index: its layers' slot weights (``_WEIGHTS``, ``[count, P, ...]``, gathered from the
        host's logical weights) and tables (``_TABLES``: ``log2phy [count, E, R]`` padded to the most replicas
        any placement can give, ``P - E + 1``, so a new placement never changes the shapes; ``counts [count, E]``)."""
        log2phy, counts = placement.tables()
        R = placement.slots.shape[1] - placement.num_experts + 1
        log2phy = np.pad(log2phy, ((0, 0), (0, 0), (0, R - log2phy.shape[2]))).astype(np.int32)
        out, i = {}, 0
        for r, _, c in self._moe_layers():
            rows = placement.slots[i:i + c]
            out[r] = {k: np.stack([self._logical[r][k][j][row] for j, row in enumerate(rows)]) for k in _WEIGHTS}
            out[r].update(eplb_log2phy=log2phy[i:i + c], eplb_counts=counts[i:i + c])
            i += c
        return out

    def _install(self, placement) -> int:
        """Copy ``placement``'s slot weights and tables into the (sharded) state; returns the slots moved."""
        moved = self.placement.moves(placement)
        for r, values in self._slot_values(placement).items():
            moe = self.state["stacks"][r]["moe"]
            for v, new in [(moe["experts"][k], values[k]) for k in _WEIGHTS] + [(moe[k], values[k]) for k in _TABLES]:
                v.set_value(jax.device_put(new.astype(v.get_value().dtype), v.get_value().sharding))
        self.placement = placement
        return moved

    def score_graph(self):
        """Prompt scoring runs the dense forward: under EPLB on the served model's logical experts (the runner's
        own graph holds physical slots that only the expert-parallel path reads)."""
        if self.eplb is None:
            return super().score_graph()
        if self._logical_graph is None:
            self._logical_graph = nnx.split(self.model)
        return self._logical_graph

    def rebalance(self) -> dict:
        """Place by the tracker's current loads and install it now (between iterations)."""
        t = time.perf_counter()
        sim = self.tracker.similarity()
        new = self._place(self.tracker.load)
        moved = self._install(new)
        self.tracker.rebalanced()
        rec = {"step": self.tracker.step, "similarity": sim, "moved_slots": moved, "seconds": time.perf_counter() - t}
        self.rebalances.append(rec)
        return rec

    def fetch(self, launched):
        res = super().fetch(launched)
        if self.tracker is not None and res.expert_load is not None:
            self.tracker.update(res.expert_load[self.moe_rows])
            if self.tracker.due():
                self.rebalance()
        return res

    def _layer_states(self, model):
        return None  # the scanned stack: its expert weights are sharded along the expert axis

    # ------------------------------------------------------------------------------------------ the step
    def step_fn(self):
        return self._jit

    def _step(self, gdef, state, pool, dec, pf, hidden, group, dec_ids=None, pf_ids=None, layer_states=None, *,
              block_size: int, return_logits: bool = False, attn_impl: str = "xla", kv_block: int | None = None,
              prefill_kv_block: int | None = None):
        """:func:`~moejax.serve.step.engine_step` inside ``shard_map`` over the mesh (the same signature;
        ``layer_states`` is always None here: the scanned stack)."""
        kw = {"block_size": block_size, "return_logits": return_logits, "attn_impl": attn_impl,
              "kv_block": kv_block, "prefill_kv_block": prefill_kv_block}

        def local(state, pool, dec, pf, hidden, group, dec_ids, pf_ids):
            with expert_parallel_serving(mesh_lib.EXPERT_AXES, self.capacity_factor, self.a2a):
                return _engine_step(gdef, state, pool, dec, pf, hidden, group, dec_ids, pf_ids, None, **kw)

        rep = P()
        f = jax.shard_map(local, mesh=self.mesh, in_specs=(self._specs, rep, rep, rep, rep, rep, rep, rep),
                          out_specs=rep, check_vma=False)
        return f(state, pool, dec, pf, hidden, group, dec_ids, pf_ids)
