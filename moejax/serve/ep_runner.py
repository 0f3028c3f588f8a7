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

The step runs the scanned layer stack (``layer_loop`` is ignored) and one iteration per call
(``decode_steps`` > 1 falls back to single steps).
"""

from __future__ import annotations

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from moejax.parallel import mesh as mesh_lib
from moejax.parallel.expert_parallel import EP_A2A_MODES, expert_parallel_serving
from moejax.serve.runner import ModelRunner
from moejax.serve.step import StepOutput, _engine_step


class ExpertParallelRunner(ModelRunner):
    """Serve a MoE model expert-parallel over ``mesh`` (a :class:`~moejax.parallel.mesh.MeshConfig` or its
    text, e.g. ``"expert=8"``: only the ``expert`` (and ``node``) axes may exceed 1).

    ``capacity_factor``: 0 (default) dropless; ``> 0`` the per-expert capacity of each device's rows (Tutel
    semantics, as in training), dropped rows counted in the engine's metrics. ``a2a``: the exchange
    (:data:`~moejax.parallel.expert_parallel.A2A_MODES`; ``fixed`` runs everywhere).
    """

    supports_multi_step = False

    def __init__(self, model, cfg, mesh="expert=8", *, capacity_factor: float = 0.0, a2a: str = "fixed",
                 devices=None):
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
        self._specs = mesh_lib.state_specs(self.state)
        self.state = mesh_lib.shard_state(self.state, self.mesh)
        rep = NamedSharding(self.mesh, P())
        self.pool = jax.device_put(self.pool, rep)
        self._pool_spec = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep), self.pool)
        self._jit = jax.jit(self._step, static_argnames=("kw",), donate_argnames=("pool",))

    def _layer_states(self, model):
        return None  # the scanned stack: its expert weights are sharded along the expert axis

    # ------------------------------------------------------------------------------------------ the step
    def _step(self, state, pool, dec, pf, hidden, group, dec_ids, pf_ids, *, kw):
        kw = dict(kw)

        def local(state, pool, dec, pf, hidden, group, dec_ids, pf_ids):
            with expert_parallel_serving(mesh_lib.EXPERT_AXES, self.capacity_factor, self.a2a):
                return _engine_step(self.gdef, state, pool, dec, pf, hidden, group, dec_ids, pf_ids, None, **kw)

        rep = P()
        f = jax.shard_map(local, mesh=self.mesh, in_specs=(self._specs, rep, rep, rep, rep, rep, rep, rep),
                          out_specs=rep, check_vma=False)
        return f(state, pool, dec, pf, hidden, group, dec_ids, pf_ids)

    def run_step(self, dec, pf, hidden, group, use_hidden: bool, dec_ids=None, pf_ids=None) -> StepOutput:
        args, kw = self._step_args(dec, pf, hidden, group, use_hidden, dec_ids, pf_ids)
        _, state, pool, dec, pf, hidden, g, dec_ids, pf_ids, _ = args
        return self._jit(state, pool, dec, pf, hidden, g, dec_ids, pf_ids, kw=tuple(sorted(kw.items())))

    def _lower(self, key: tuple):
        bd, pfs = key[:2]
        dec = None if bd is None else self.blank_decode(bd)
        pf = None if pfs is None else self.blank_prefill(*pfs)
        args, kw = self._step_args(dec, pf, None, (0, self.mcfg.n_layers), False, None, None)
        _, state, _, dec, pf, hidden, g, dec_ids, pf_ids, _ = args
        return self._jit.lower(state, self._pool_spec, dec, pf, hidden, g, dec_ids, pf_ids,
                               kw=tuple(sorted(kw.items())))
