"""The training loop: jitted AdamW step with MoE aux losses, validation in bits/byte, JSONL logs, checkpoints.

The step is a pure function ``(params, rest, opt_state, batch, step) -> (params, rest, opt_state, metrics)``:
parameters (``nnx.Param``) are optimized; ``rest`` holds non-trainable state such as the aux-loss-free router
bias (updated from the step's expert loads). Gradient accumulation is a ``lax.scan`` over micro-batches.
Router randomness for step ``s`` is ``fold_in(PRNGKey(seed), s)``, so a resumed run repeats an uninterrupted
one exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from moejax.config import ModelConfig, TrainConfig
from moejax.models.transformer import Transformer, count_params
from moejax.nn.routers import aux_free_bias_update
from moejax.nn.sparse import mask_flip_rate, sparse_training
from moejax.train import data as data_lib
from moejax.train.objectives import elbo_sums, get_objective, split_batch, token_ce

LN2 = math.log(2.0)


def make_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
    """AdamW with linear warmup + cosine decay, global-norm clipping, no decay on vectors (norms, biases)."""
    sched = optax.warmup_cosine_decay_schedule(0.0, tc.lr, max(tc.warmup_steps, 1), max(tc.steps, tc.warmup_steps + 1),
                                               end_value=tc.lr * tc.min_lr_ratio)
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
    parts = [optax.clip_by_global_norm(tc.clip_norm)] if tc.clip_norm > 0 else []
    parts.append(optax.adamw(sched, b1=tc.b1, b2=tc.b2, eps=tc.eps, weight_decay=tc.weight_decay, mask=decay_mask))
    opt = optax.chain(*parts)
    if tc.train_only is None:
        return opt

    def labels(params):  # TrainConfig.train_only: only the parameters under that attribute (``mtp``) move
        def label(path, _):
            return "train" if any(getattr(k, "key", getattr(k, "name", None)) == tc.train_only for k in path) \
                else "freeze"
        return jax.tree_util.tree_map_with_path(label, params)

    return optax.multi_transform({"train": opt, "freeze": optax.set_to_zero()}, labels)


def eval_sums(model, batch, *, elbo_samples: int = 2, seed: int = 0):
    """Summed next-token cross-entropy (nats) over non-pad targets and the number of byte targets; for a
    diffusion LM (``ModelConfig.causal=False``) its Monte-Carlo negative ELBO
    (:func:`moejax.train.objectives.elbo_sums`, ``elbo_samples`` draws per sequence from a fixed ``seed``)."""
    if not model.cfg.causal:
        return elbo_sums(model, batch, jax.random.PRNGKey(seed), elbo_samples)
    inp, tgt = split_batch(batch)
    out = model(inp["tokens"], segment_ids=inp["segment_ids"], positions=inp["positions"])
    return token_ce(out.logits, tgt)[0], jnp.sum(tgt < 256)


class Trainer:
    """Builds the model, optimizer and jitted steps for a (ModelConfig, TrainConfig) pair."""

    def __init__(self, cfg: ModelConfig, tc: TrainConfig, mesh_cfg=None, schedule=None):
        """``schedule``: an :class:`moejax.schedule.overlap.OverlapSchedule` applied to the expert-parallel
        step (MoE all-to-all/expert pipelining and gradient bucketing); ``None`` = the plain step."""
        cfg.validate()
        tc.validate()
        if tc.compute_dtype != cfg.dtype:
            cfg = dataclasses.replace(cfg, dtype=tc.compute_dtype)
        if tc.seq_len > cfg.max_seq_len:
            raise ValueError(f"TrainConfig.seq_len={tc.seq_len} exceeds ModelConfig.max_seq_len={cfg.max_seq_len}")
        if cfg.vocab_size < data_lib.BYTE_VOCAB:
            raise ValueError(f"ModelConfig.vocab_size={cfg.vocab_size} is too small for byte-level data "
                             f"(needs >= {data_lib.BYTE_VOCAB})")
        if (mesh_cfg is not None and cfg.moe is not None and cfg.moe.expert_type == "atomic"
                and (mesh_cfg.expert > 1 or mesh_cfg.node > 1 or mesh_cfg.tensor > 1)):
            raise ValueError(f"MoEConfig.expert_type='atomic' (OmniMoE) trains data parallel only: the mesh "
                             f"{mesh_cfg} shards experts or tensors (atomic U/V tables are replicated); use "
                             f"e.g. data={mesh_cfg.expert * mesh_cfg.node * mesh_cfg.data}")
        self.cfg, self.tc = cfg, tc
        model = Transformer(cfg, rngs=nnx.Rngs(tc.seed))
        self.n_params = count_params(model)
        self.gdef, self.params, self.rest = nnx.split(model, nnx.Param, ...)
        self.objective = get_objective(tc.objective)
        if tc.objective == "mtp" and cfg.mtp_depth < 1:
            raise ValueError("TrainConfig.objective='mtp' needs ModelConfig.mtp_depth >= 1 (moejax train --mtp K)")
        if (tc.objective == "mdm") == cfg.causal:
            raise ValueError(f"TrainConfig.objective={tc.objective!r} with ModelConfig.causal={cfg.causal}: the "
                             f"masked-diffusion objective 'mdm' trains a bidirectional model (causal=False) and a "
                             f"bidirectional model trains only with it (moejax train --objective mdm sets both)")
        if tc.train_only == "mtp" and tc.objective != "mtp":
            raise ValueError(f"TrainConfig.train_only='mtp' trains the MTP modules alone: it needs objective='mtp' "
                             f"(got {tc.objective!r})")
        self.opt = make_optimizer(tc)
        self.opt_state = self.opt.init(self.params)
        self.step = 0
        self.base_key = jax.random.PRNGKey(tc.seed)
        self.mesh = None
        self.fsdp = 1  # ways parameters and optimizer state are sharded over ``data`` (MeshConfig.fsdp)
        if schedule is not None:
            schedule.validate()
            from moejax.parallel.expert_parallel import EPContext

            if ((schedule.degree_fwd > 1 or schedule.degree_bwd > 1 or schedule.two_level)
                    and EPContext(a2a=tc.ep_a2a).resolved_a2a() != "fixed"):
                raise ValueError(f"TrainConfig.ep_a2a={tc.ep_a2a!r} with MoE pipelining (schedule degrees "
                                 f"{schedule.degree_fwd}/{schedule.degree_bwd}, two_level={schedule.two_level}): "
                                 f"pipeline_moe rewrites the fixed all_to_all exchange only; use ep_a2a='fixed'")
        self.schedule = schedule
        if mesh_cfg is not None and mesh_cfg.size > 1:
            self._setup_mesh(mesh_cfg)
        self._train_step = jax.jit(self._step_impl, donate_argnums=(0, 1, 2))
        self._eval_step = jax.jit(self._eval_impl)

    def _setup_mesh(self, mesh_cfg):
        from moejax.parallel import mesh as mesh_lib

        cfg, tc = self.cfg, self.tc
        mesh_cfg.validate(cfg.moe.num_experts if cfg.moe is not None else None)
        from moejax.parallel.tensor_parallel import check_config

        check_config(cfg, mesh_cfg.tensor)
        n = mesh_lib.num_batch_shards(mesh_cfg)
        if (tc.global_batch // tc.grad_accum) % n:
            raise ValueError(f"micro-batch {tc.global_batch // tc.grad_accum} (TrainConfig.global_batch / grad_accum) "
                             f"is not divisible by the {n} batch shards of mesh {mesh_cfg.spec()}")
        self.mesh_cfg, self.mesh, self.n_shards = mesh_cfg, mesh_lib.make_mesh(mesh_cfg), n
        self.fsdp = mesh_cfg.fsdp_size
        self.params = mesh_lib.shard_state(self.params, self.mesh, fsdp=self.fsdp)
        self.rest = mesh_lib.shard_state(self.rest, self.mesh)
        # moments (nnx.Param-typed leaves, with the parameters' logical axes) follow the parameters, FSDP
        # included; scalars (step counts) are replicated
        self.opt_state = mesh_lib.shard_state(jax.jit(self.opt.init)(self.params), self.mesh, fsdp=self.fsdp)
        self.batch_sharding = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec(mesh_lib.BATCH_AXES))

    # ------------------------------------------------------------------------------------------------ model
    def model(self) -> Transformer:
        return nnx.merge(self.gdef, self.params, self.rest)

    def _loss(self, params, rest, batch, key, axes=None, n_shards=1):
        """This shard's share of the loss: summed over shards (``axes``) it is the global mean objective."""
        cfg = self.cfg
        B, S = batch["tokens"].shape[0], batch["tokens"].shape[1] - 1
        tidx = None
        if axes:  # global token index for per-token router randomness
            row0 = jax.lax.axis_index(axes) * B
            tidx = ((row0 + jnp.arange(B, dtype=jnp.int32))[:, None] * S + jnp.arange(S, dtype=jnp.int32))
        with sparse_training(self.tc.sparsity):
            res = self.objective(nnx.merge(self.gdef, params, rest), batch, rng=key, token_index=tidx, tc=self.tc)
        out = res.out
        loss, metrics = 0.0, {}
        for name, (total, count, weight) in res.terms.items():
            n_all = jax.lax.psum(count, axes) if axes else count
            mean = total / jnp.maximum(n_all, 1)
            loss = loss + weight * mean
            metrics[name] = mean
            if name == "ce":
                metrics["tokens"] = count
        if out.aux:
            # per-device (per routing group) statistics: the mean over shards is the global value; MoE layers
            # beyond the main stack (MTP blocks) add their aux losses
            auxes = [out.aux, *res.extra_aux]
            lb = jnp.mean(jnp.concatenate([jnp.ravel(a["load_balance_loss"]) for a in auxes])) / n_shards
            z = jnp.mean(jnp.concatenate([jnp.ravel(a["z_loss"]) for a in auxes])) / n_shards
            loss = loss + cfg.moe.aux_loss_coef * lb + cfg.moe.z_loss_coef * z
            metrics.update(aux_loss=lb, z_loss=z, expert_load=out.aux["expert_load"],
                           dropped=jnp.sum(out.aux["dropped"]))
            if "norm_stats" in out.aux:  # atomic experts: the router's running batch-norm statistics
                metrics["norm_stats"] = out.aux["norm_stats"]
        return loss, metrics

    def _grads(self, params, rest, batch, key, axes=None, n_shards=1):
        """Gradients and metrics of one step (accumulated over micro-batches) for this shard's batch."""
        A = self.tc.grad_accum
        micro = jax.tree.map(lambda a: a.reshape((A, a.shape[0] // A) + a.shape[1:]), batch)
        loss_fn = partial(self._loss, axes=axes, n_shards=n_shards)
        sch = self.schedule
        if axes and sch is not None and (sch.degree_fwd > 1 or sch.degree_bwd > 1 or sch.two_level):
            from moejax.schedule.pipeline import pipeline_moe

            loss_fn = pipeline_moe(loss_fn, sch.degree_fwd, bwd_degree=sch.degree_bwd, two_level=sch.two_level,
                                   strict=False)
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

        def body(acc, xs):
            mb, i = xs
            (loss, m), g = grad_fn(params, rest, mb, jax.random.fold_in(key, i))
            acc = jax.tree.map(jnp.add, acc, (g, loss, m))
            return acc, None

        if A == 1:  # no accumulation loop: the gradients leave the backward layer scan directly (so a
            # gradient-bucketing pass can move their reductions into that loop)
            (loss, m), g = grad_fn(params, rest, jax.tree.map(lambda a: a[0], micro), jax.random.fold_in(key, 0))
            m = dict(m)
            m["loss"] = loss
            return g, m
        zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(lambda: grad_fn(params, rest, jax.tree.map(
            lambda a: a[0], micro), key)))
        (g, loss, m), _ = jax.lax.scan(body, (zeros[1], zeros[0][0], zeros[0][1]), (micro, jnp.arange(A)))
        g = jax.tree.map(lambda x: x / A, g)
        m = {k: (v if k in ("tokens", "expert_load", "dropped") else v / A) for k, v in m.items()}
        m["loss"] = loss / A
        return g, m

    def _sharded_grads(self, params, rest, batch, key):
        """``_grads`` under ``shard_map``: experts sharded over ``expert`` (all_to_all MoE layers), the batch over
        ``(data, expert)``, and an explicit data-parallel gradient reduction: each gradient is ``psum``-ed over
        the batch axes its parameter is replicated on.

        With ``MeshConfig.tensor > 1`` the layers run Megatron-style tensor parallel over ``tensor``
        (:mod:`moejax.parallel.tensor_parallel`): the batch is replicated over it, attention heads and FFN/expert
        ``d_ff`` are sharded, and replicated parameters get identical gradients on every tensor rank, so the
        reduction stays over the batch axes only.

        With FSDP (``MeshConfig.fsdp``) the parameters come in sharded over ``data`` too: the step first
        all-gathers each such parameter over ``data`` (``all_gather(tiled=True)`` along its FSDP dimension), and
        reduces its gradient with a ``psum_scatter`` over ``data`` back to the shard (then a ``psum`` over the
        remaining batch axes), so the optimizer update runs on shards."""
        from jax.sharding import PartitionSpec as P

        from moejax.parallel import mesh as mesh_lib
        from moejax.parallel.expert_parallel import expert_parallel
        from moejax.parallel.tensor_parallel import tensor_parallel

        axes = mesh_lib.BATCH_AXES
        pspec, rspec = mesh_lib.state_specs(params, fsdp=self.fsdp), mesh_lib.state_specs(rest)

        def is_spec(x):
            return isinstance(x, P)

        def local(params, rest, batch, key):
            if self.fsdp > 1:
                def gather(spec, pi):
                    d = mesh_lib.fsdp_dim(spec)
                    return pi if d is None else jax.tree.map(
                        lambda v: jax.lax.all_gather(v, "data", axis=d, tiled=True), pi)

                params = jax.tree.map(gather, pspec, params, is_leaf=is_spec)
            with expert_parallel(axis=mesh_lib.EXPERT_AXES, batch_axes=axes, a2a=self.tc.ep_a2a), \
                    (tensor_parallel("tensor") if self.mesh_cfg.tensor > 1 else contextlib.nullcontext()):
                g, m = self._grads(params, rest, batch, key, axes=axes, n_shards=self.n_shards)

            def reduce(spec, gi):  # gi: the gradient Variable of one parameter
                used = {a for e in spec if e is not None for a in ((e,) if isinstance(e, str) else e)}
                red = tuple(a for a in axes if a not in used)
                d = mesh_lib.fsdp_dim(spec)
                if d is not None:  # FSDP: reduce-scatter over data to this device's shard
                    gi = jax.tree.map(lambda v: jax.lax.psum_scatter(v, "data", scatter_dimension=d, tiled=True), gi)
                return jax.tree.map(lambda v: jax.lax.psum(v, red), gi) if red else gi

            g = jax.tree.map(reduce, pspec, g, is_leaf=is_spec)
            m = {k: jax.lax.psum(v, axes) for k, v in m.items()}
            return g, m

        sch = self.schedule
        if sch is not None and sch.bucketing:
            from moejax.schedule.bucketing import bucket_gradients

            local = bucket_gradients(local, bucket_bytes=None if sch.buckets else sch.bucket_bytes,
                                     buckets=sch.buckets, inside_loops=sch.inside_loops)
        m_spec = jax.tree.map(lambda _: P(), jax.eval_shape(lambda: self._metric_shapes()))
        f = jax.shard_map(local, mesh=self.mesh, in_specs=(pspec, rspec, P(axes), P()),
                          out_specs=(pspec, m_spec), check_vma=False)
        return f(params, rest, batch, key)

    def _constrain(self, state):
        """``with_sharding_constraint`` of a state tree (parameters or optimizer state) to its mesh placement."""
        from jax.sharding import NamedSharding
        from jax.sharding import PartitionSpec as P

        from moejax.parallel import mesh as mesh_lib

        def pin(spec, v):
            return jax.tree.map(lambda a: jax.lax.with_sharding_constraint(a, NamedSharding(self.mesh, spec)), v)

        return jax.tree.map(pin, mesh_lib.state_specs(state, fsdp=self.fsdp), state,
                            is_leaf=lambda x: isinstance(x, P))

    def _metric_shapes(self):
        m = {"ce": 0.0, "tokens": 0, "loss": 0.0}
        if self.tc.objective == "mtp":
            m.update({f"mtp_ce_{k}": 0.0 for k in range(1, self.cfg.mtp_depth + 1)})
        if self.cfg.moe is not None:
            n_moe = sum(k == "moe" for k in self.cfg.layer_kinds())
            m.update(aux_loss=0.0, z_loss=0.0, expert_load=jnp.zeros((n_moe, self.cfg.moe.num_experts)), dropped=0)
            if self.cfg.moe.expert_type == "atomic":
                n = math.isqrt(self.cfg.moe.num_experts)
                m["norm_stats"] = jnp.zeros((n_moe, 2, 2, n))
        return m

    def _step_impl(self, params, rest, opt_state, batch, step):
        key = jax.random.fold_in(self.base_key, step)
        if self.mesh is not None:
            g, m = self._sharded_grads(params, rest, batch, key)
        else:
            g, m = self._grads(params, rest, batch, key)
        loss = m.pop("loss")
        updates, opt_state = self.opt.update(g, opt_state, params)
        old_params, params = params, optax.apply_updates(params, updates)
        sc = self.tc.sparsity
        if sc is not None and sc.method != "dense":  # how many forward-mask entries this step changed
            m["mask_flip_rate"] = mask_flip_rate(nnx.merge(self.gdef, old_params, rest),
                                                 nnx.merge(self.gdef, params, rest), sc)
        if self.fsdp > 1:  # keep parameters and moments sharded over data (jit would propagate it; this pins it)
            params, opt_state = self._constrain(params), self._constrain(opt_state)
        if "expert_load" in m:
            rest = self._update_router_bias(params, rest, m["expert_load"])
        if "norm_stats" in m:  # the same global statistics on every shard: the psum over shards counted each
            rest = self._update_norm_stats(params, rest, m.pop("norm_stats") / (self.n_shards if self.mesh else 1))
        m["loss"] = loss
        m["grad_norm"] = optax.global_norm(g)
        return params, rest, opt_state, m

    def _update_router_bias(self, params, rest, expert_load):
        """Aux-loss-free bias step for sigmoid routers, from this step's per-layer expert loads."""
        cfg = self.cfg
        if cfg.moe is None or cfg.moe.router.type != "sigmoid":
            return rest
        model = nnx.merge(self.gdef, params, rest)
        layer = 0
        for (kind, _, n), stack in zip(model.runs, model.stacks):
            if kind != "moe":
                continue
            bias = stack.moe.router.bias
            bias.value = aux_free_bias_update(bias.value, expert_load[layer:layer + n], cfg.moe.router.bias_update_rate)
            layer += n
        return nnx.split(model, nnx.Param, ...)[2]

    def _update_norm_stats(self, params, rest, stats):
        """Store the Cartesian routers' running batch-norm statistics of this step (``[layers, 2 heads,
        2 (mean, var), n]``, averaged over micro-batches) in the model state."""
        model = nnx.merge(self.gdef, params, rest)
        layer = 0
        for (kind, _, n), stack in zip(model.runs, model.stacks, strict=True):
            if kind != "moe":
                continue
            for h, norm in enumerate((stack.moe.router.norm1, stack.moe.router.norm2)):
                norm.mean.value = stats[layer:layer + n, h, 0]
                norm.var.value = stats[layer:layer + n, h, 1]
            layer += n
        return nnx.split(model, nnx.Param, ...)[2]

    def _eval_impl(self, params, rest, batch):
        with sparse_training(self.tc.sparsity):  # the forward masks: the sparse model being trained
            return eval_sums(nnx.merge(self.gdef, params, rest), batch, elbo_samples=self.tc.elbo_samples)

    def init_from(self, run: str) -> None:
        """Start from a trained run's weights (its model config must equal this one's apart from ``mtp_depth``);
        parameters the run lacks (new MTP modules) keep their initialization."""
        from moejax.config import config_to_dict
        from moejax.train.checkpoint import load_model

        src, scfg, _ = load_model(run, apply_sparsity=False)
        a, b = config_to_dict(dataclasses.replace(scfg, mtp_depth=0)), config_to_dict(
            dataclasses.replace(self.cfg, mtp_depth=0, dtype=scfg.dtype))
        if a != b:
            diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            raise ValueError(f"init_from={run!r}: its model config differs from this run's in {', '.join(diff)} "
                             f"(only mtp_depth may differ)")
        if scfg.mtp_depth > self.cfg.mtp_depth:
            raise ValueError(f"init_from={run!r} has mtp_depth={scfg.mtp_depth} > this run's {self.cfg.mtp_depth}")
        model = self.model()
        nnx.update(model, nnx.state(src))  # a run with fewer MTP modules fills this one's first ones
        _, params, rest = nnx.split(model, nnx.Param, ...)
        if self.mesh is not None:
            from moejax.parallel import mesh as mesh_lib
            params = mesh_lib.shard_state(params, self.mesh, fsdp=self.fsdp)
            rest = mesh_lib.shard_state(rest, self.mesh)
        self.params, self.rest = params, rest
        self.opt_state = self.opt.init(self.params) if self.mesh is None else mesh_lib.shard_state(
            jax.jit(self.opt.init)(self.params), self.mesh, fsdp=self.fsdp)

    # ------------------------------------------------------------------------------------------------ API
    def place(self, batch: dict, process_local: bool = False) -> dict:
        """Host batch -> device arrays sharded over the batch axes of the mesh.

        ``process_local``: ``batch`` holds only this process's rows (multi-process runs, rows in process order);
        otherwise every process passes the whole global batch.
        """
        if self.mesh is None:
            return jax.tree.map(jnp.asarray, batch)
        if process_local and jax.process_count() > 1:
            return jax.tree.map(lambda a: jax.make_array_from_process_local_data(self.batch_sharding, a), batch)
        return jax.tree.map(lambda a: jax.make_array_from_callback(a.shape, self.batch_sharding, lambda i: a[i]),
                            batch)

    def train_step(self, batch: dict, process_local: bool = False) -> dict:
        batch = self.place(batch, process_local)
        self.params, self.rest, self.opt_state, m = self._train_step(self.params, self.rest, self.opt_state, batch,
                                                                     jnp.int32(self.step))
        self.step += 1
        return m

    def evaluate(self, batches) -> dict:
        """Validation bits per byte: summed next-token cross-entropy (bits) over the predicted bytes."""
        nats, n = 0.0, 0
        for b in batches:
            s, c = self._eval_step(self.params, self.rest, self.place(b))
            nats += float(s)
            n += int(c)
        if n == 0:
            raise ValueError("validation produced no batches: the validation split is shorter than one batch")
        return {"val_bits_per_byte": nats / LN2 / n, "val_bytes": n}


def evaluate_checkpoint(ckpt: str, *, corpus: str | None = None, batch: int = 16, max_batches: int | None = None,
                        allow_mismatch: bool = False, cache_dir: str | None = None) -> dict:
    """Validation bits/byte of a training checkpoint over its corpus's validation split (all of it by default).

    ``corpus``: ``None`` evaluates on the corpus recorded in the checkpoint (its root, checked against its content
    hash); a path evaluates on that corpus, which must have the recorded content hash unless ``allow_mismatch``.
    A checkpoint without a recorded corpus needs an explicit ``corpus`` and ``allow_mismatch=True``.
    Raises ValueError naming both hashes on a mismatch, FileNotFoundError when the recorded corpus is gone.
    """
    from moejax.train.checkpoint import load_model

    model, cfg, meta = load_model(ckpt)
    tc = meta["train_config"]
    recorded = meta.get("corpus") or None
    flag = "pass allow_mismatch=True (moejax eval --allow-corpus-mismatch) to evaluate on it anyway"
    if corpus is None:
        if recorded is None or not recorded.get("root"):
            raise ValueError(f"checkpoint {ckpt!r} records no training corpus (content hash: none): pass "
                             f"corpus=PATH (--corpus) and allow_mismatch=True (--allow-corpus-mismatch)")
        if not os.path.exists(recorded["root"]):
            raise FileNotFoundError(f"checkpoint {ckpt!r} was trained on corpus {recorded['root']!r} (content hash "
                                    f"{recorded.get('content_hash') or 'none recorded'}), which is not on this "
                                    f"machine: pass corpus=PATH (--corpus) with the same files")
        corpus = recorded["root"]
    streams, info = data_lib.build_corpus(corpus, val_percent=tc["val_percent"], cache_dir=cache_dir)
    why = data_lib.corpus_mismatch(recorded, info)
    if why is not None and not allow_mismatch:
        raise ValueError(f"checkpoint {ckpt!r} was not trained on this corpus: {why}; {flag}")
    gdef, state = nnx.split(model)

    ev = jax.jit(lambda state, b: eval_sums(nnx.merge(gdef, state), b, elbo_samples=tc.get("elbo_samples", 2)))

    nats, n = 0.0, 0
    for b in data_lib.validation_batches(streams["validation"], seq_len=tc["seq_len"] + 1, batch=batch,
                                         max_batches=max_batches):
        s, c = ev(state, jax.tree.map(jnp.asarray, b))
        nats, n = nats + float(s), n + int(c)
    if n == 0:
        raise ValueError("the validation split is shorter than one batch")
    return {"val_bits_per_byte": nats / LN2 / n, "val_bytes": n, "corpus_root": info.root,
            "corpus_files_hash": info.files_hash, "corpus_content_hash": info.content_hash,
            "corpus_mismatch": why, "step": meta["step"], "metric": "elbo" if not cfg.causal else "next_token_ce"}


def expert_histogram(expert_load: np.ndarray) -> list[list[float]]:
    """Per-layer share of routed slots per expert."""
    load = np.asarray(expert_load, np.float64)
    return (load / np.maximum(load.sum(-1, keepdims=True), 1)).round(4).tolist()


def to_jsonable(x: Any):
    if isinstance(x, (np.ndarray, jax.Array)):
        return np.asarray(x).tolist()
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    return x


def write_json_atomic(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def now() -> float:
    return time.perf_counter()


# ---------------------------------------------------------------------------------------------------- run

def _compatible(saved: dict, current: dict, what: str, ignore=()) -> None:
    diff = sorted(k for k in set(saved) | set(current) if k not in ignore and saved.get(k) != current.get(k))
    if diff:
        raise ValueError(f"cannot resume: the checkpoint's {what} differs in {diff} "
                         f"(saved {[saved.get(k) for k in diff]}, now {[current.get(k) for k in diff]})")


def train(cfg: ModelConfig, tc: TrainConfig, out_dir: str, *, corpus: str | None = None, resume: bool = False,
          cache_dir: str | None = None, progress: bool = True, max_steps: int | None = None, mesh=None,
          schedule=None, init_from: str | None = None) -> dict:
    """Train on a byte-level corpus (default: the stdlib's .py files); logs and checkpoints go to ``out_dir``.

    ``resume=True`` continues from the latest complete checkpoint in ``out_dir`` (same configs required, except
    the step/time budget). ``max_steps`` stops this call early (the schedule still spans ``tc.steps``), as a
    kill would. ``mesh`` (a :class:`~moejax.parallel.mesh.MeshConfig`) trains expert-parallel on several
    devices; ``schedule`` (an :class:`~moejax.schedule.overlap.OverlapSchedule`, needs ``mesh``) applies the
    FSMoE passes to its step. ``init_from``: a trained run whose weights start this one (the same model config
    apart from ``mtp_depth``; modules it lacks, e.g. new MTP heads, keep their initialization), as MTP heads are
    trained on a frozen model (``TrainConfig.train_only="mtp"``). Returns a summary dict (also written to
    ``out_dir/summary.json``).
    """
    from moejax.config import config_to_dict
    from moejax.train.checkpoint import Checkpointer, configs_from_meta, meta_dict

    tc.validate()
    cfg.validate()
    if mesh is not None:
        mesh.validate(cfg.moe.num_experts if cfg.moe is not None else None)
    streams, info = data_lib.build_corpus(corpus, val_percent=tc.val_percent, cache_dir=cache_dir)
    if schedule is not None and mesh is None:
        raise ValueError("schedule needs a mesh (e.g. --mesh expert=8): the FSMoE passes rewrite the expert-parallel "
                         "step")
    trainer = Trainer(cfg, tc, mesh, schedule=schedule)
    # Each process reads only its rows of every global batch (rows in process order match the mesh layout).
    nproc, pid = jax.process_count(), jax.process_index()
    it = data_lib.BatchIterator(streams["train"], seq_len=tc.seq_len + 1, global_batch=tc.global_batch,
                                seed=tc.seed, rank=pid, num_ranks=nproc)
    writer = pid == 0
    os.makedirs(out_dir, exist_ok=True)
    ckpt = Checkpointer(os.path.join(out_dir, "checkpoints"), keep=tc.keep)
    if ckpt.latest_step() is not None and not resume:
        raise ValueError(f"{out_dir!r} already holds checkpoints (latest step {ckpt.latest_step()}): pass "
                         f"resume=True (--resume) to continue, or choose another output directory")
    if resume and ckpt.latest_step() is not None:
        meta = ckpt.read_meta()
        # Round-trip the saved configs so fields added since the checkpoint compare at their defaults.
        saved_cfg, saved_tc = configs_from_meta(meta)
        _compatible(config_to_dict(saved_cfg), config_to_dict(trainer.cfg), "model config")
        _compatible(config_to_dict(saved_tc), config_to_dict(tc), "train config", ignore=("steps", "minutes"))
        why = data_lib.corpus_mismatch(meta.get("corpus"), info)  # old checkpoints: by file list
        if why is not None:
            raise ValueError(f"cannot resume: the corpus changed: {why}")
        abstract = {"params": trainer.params, "rest": trainer.rest, "opt_state": trainer.opt_state}
        state, meta = ckpt.restore(abstract)
        trainer.params, trainer.rest, trainer.opt_state = state["params"], state["rest"], state["opt_state"]
        trainer.step = int(meta["step"])
        it.restore(meta["data_state"])
    elif init_from is not None:
        trainer.init_from(init_from)
    log_path = os.path.join(os.path.abspath(out_dir), "log.jsonl")
    header = {"event": "start", "step": trainer.step, "corpus": info.to_dict(), "params": trainer.n_params,
              "model_config": config_to_dict(trainer.cfg), "train_config": config_to_dict(tc),
              "backend": jax.default_backend(), "devices": jax.device_count(),
              "mesh": None if trainer.mesh is None else trainer.mesh_cfg.spec()}
    if trainer.mesh is not None and cfg.moe is not None:
        from moejax.parallel.expert_parallel import EPContext, ep_capacity_factor
        header["ep_capacity_factor"] = ep_capacity_factor(cfg.moe, EPContext())
    val_batch = max(1, min(tc.global_batch, streams["validation"].num_sequences(tc.seq_len + 1) // tc.eval_batches))
    if trainer.mesh is not None:
        val_batch = max(trainer.n_shards, val_batch // trainer.n_shards * trainer.n_shards)

    def evaluate():
        return trainer.evaluate(data_lib.validation_batches(streams["validation"], seq_len=tc.seq_len + 1,
                                                            batch=val_batch, max_batches=tc.eval_batches))

    def save(force=False):
        ckpt.save(trainer.step, {"params": trainer.params, "rest": trainer.rest, "opt_state": trainer.opt_state},
                  meta_dict(trainer.step, trainer.cfg, tc, it.state(), info.to_dict()), force=force)

    bar = None
    if progress and writer:
        from tqdm import tqdm
        bar = tqdm(total=tc.steps, initial=trainer.step, desc="train", unit="step", dynamic_ncols=True)
    t_start, last_t, last_tokens, tokens = now(), now(), 0, 0
    last_eval = None
    stop_at = tc.steps if max_steps is None else min(tc.steps, trainer.step + max_steps)
    with open(log_path if writer else os.devnull, "a") as log:
        log.write(json.dumps(header) + "\n")
        while trainer.step < stop_at:
            if tc.minutes is not None and now() - t_start > tc.minutes * 60:
                break
            m = trainer.train_step(next(it), process_local=True)
            tokens += tc.global_batch * tc.seq_len
            step = trainer.step
            if step % tc.log_every == 0 or step == stop_at:
                m = jax.device_get(m)
                t = now()
                rec = {"step": step, "loss": float(m["loss"]), "ce": float(m["ce"]),
                       "grad_norm": float(m["grad_norm"]), "tokens_per_s": (tokens - last_tokens) / (t - last_t),
                       "elapsed_s": t - t_start}
                if "expert_load" in m:
                    rec.update(aux_loss=float(m["aux_loss"]), z_loss=float(m["z_loss"]),
                               dropped_fraction=float(m["dropped"]) / max(1.0, float(np.sum(m["expert_load"]))),
                               expert_load=expert_histogram(m["expert_load"]))
                if "mask_flip_rate" in m:  # N:M sparse training: share of forward-mask entries this step flipped
                    rec["mask_flip_rate"] = float(m["mask_flip_rate"])
                log.write(json.dumps(rec) + "\n")
                log.flush()
                last_t, last_tokens = t, tokens
                if bar is not None:
                    bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}")
            if bar is not None:
                bar.update(1)
            if step % tc.eval_every == 0:
                last_eval = {**evaluate(), "step": step}
                log.write(json.dumps({"event": "eval", **last_eval}) + "\n")
                log.flush()
            if step % tc.ckpt_every == 0:
                save()
        if bar is not None:
            bar.close()
        if last_eval is None or last_eval.get("step") != trainer.step:
            last_eval = {**evaluate(), "step": trainer.step}
            log.write(json.dumps({"event": "eval", **last_eval}) + "\n")
        if ckpt.latest_step() != trainer.step:
            save(force=True)
        ckpt.close()
        summary = {"step": trainer.step, "elapsed_s": now() - t_start, **last_eval, "out_dir": os.path.abspath(out_dir),
                   "checkpoint": os.path.join(ckpt.directory, str(trainer.step)), "log": log_path,
                   "corpus_files_hash": info.files_hash, "params": trainer.n_params,
                   "schedule": dataclasses.asdict(schedule) if schedule is not None else None}
        log.write(json.dumps({"event": "end", **summary}) + "\n")
    if writer:
        write_json_atomic(os.path.join(out_dir, "summary.json"), summary)
    return summary
