"""Checkpoints with orbax: async saves every N steps, keep the last K, atomic, full resume state.

A checkpoint step directory holds ``state`` (parameters, non-trainable state such as router biases, optimizer
state: an orbax PyTree) and ``meta`` (JSON: step, model and train configs, data-iterator state, corpus info).
Orbax writes each step into a temporary directory (``<step>.orbax-checkpoint-tmp``, with a ``-<timestamp>``
suffix in older orbax) and renames it when complete, so a run killed during a save resumes from the last
complete checkpoint and never overwrites a good one. Orbax skips such partial directories when listing steps
but leaves them on disk; opening a :class:`Checkpointer` for writing removes them.

Fault injection (tests/test_crash.py): with ``MOEJAX_FAULT_CHECKPOINT_STEP=N`` set, the save of step ``N``
writes its ``meta`` file into the temporary directory, writes ``MOEJAX_FAULT_MARKER`` (a JSON file naming the
step, the temporary directory and the pid) and then, by ``MOEJAX_FAULT_CHECKPOINT_MODE``: ``hang`` (default)
blocks the save (on orbax's background thread, before it is finalized) for up to ``MOEJAX_FAULT_HANG_S``
seconds (default 600), so that a test can SIGKILL the process while the write is provably in progress;
``kill`` SIGKILLs the process itself at that point. Without ``MOEJAX_FAULT_CHECKPOINT_STEP`` nothing changes:
the checkpoint manager is built exactly as it would be otherwise.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import sys
import time
from typing import Any

import jax
import orbax.checkpoint as ocp

from moejax.config import ModelConfig, TrainConfig, config_from_dict, config_to_dict


class Checkpointer:
    """Save/restore training state under ``directory`` (created if missing)."""

    def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True, clean_partial: bool = True):
        """``clean_partial``: remove the temporary directories of saves that never completed (a killed run);
        readers that may run beside a live training run (``load_model``) pass ``False``, since the newest
        temporary directory may be a save in progress."""
        self.directory = os.path.abspath(directory)
        self.removed_partial = remove_partial_checkpoints(self.directory) if clean_partial else []
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        fault = _fault_handler_registry()
        if fault is None:
            self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))
        else:
            self.manager = ocp.CheckpointManager(self.directory, options=options, handler_registry=fault)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, meta: dict, *, force: bool = False) -> None:
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.PyTreeSave(state),
                                                        meta=ocp.args.JsonSave(meta)), force=force)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
        """Restore ``(state, meta)`` at ``step`` (default latest) into the structure/shardings of
        ``abstract_state`` (e.g. ``jax.eval_shape`` of the current state, possibly on another mesh)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint in {self.directory!r}")
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
                              abstract_state)
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(target, restore_args=ocp.checkpoint_utils.construct_restore_args(target)),
                meta=ocp.args.JsonRestore()))
        except Exception as e:  # orbax/tensorstore raise ValueError, KeyError or a bare Exception
            raise ValueError(f"checkpoint {self.directory!r} step {step} is incompatible with this model or "
                             f"corrupt: {_first_line(e)}") from e
        return out.state, out.meta

    def read_meta(self, step: int | None = None) -> dict:
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint in {self.directory!r}")
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


_PARTIAL = re.compile(r"^\d+\.orbax-checkpoint-tmp")  # a step's temporary directory (see orbax path/step.py)


def partial_checkpoints(directory: str) -> list[str]:
    """Names of the step directories under ``directory`` that orbax never finalized (saves cut off mid-write)."""
    if not os.path.isdir(directory):
        return []
    return sorted(n for n in os.listdir(directory) if _PARTIAL.match(n))


def remove_partial_checkpoints(directory: str) -> list[str]:
    """Delete the never-finalized step directories under ``directory`` (process 0 only); returns their names.

    Orbax's ``latest_step`` already skips them, so this is housekeeping: a run killed mid-save would otherwise
    leave a partial copy of its state behind on every kill."""
    names = partial_checkpoints(directory)
    if not names or jax.process_index() != 0:
        return names
    for n in names:
        shutil.rmtree(os.path.join(directory, n), ignore_errors=True)
    print(f"checkpoints: removed {len(names)} partial (never finalized) checkpoint(s) in {directory}: "
          f"{', '.join(names)}", file=sys.stderr)
    return names


# ------------------------------------------------------------------------------------------------ fault injection
FAULT_STEP_ENV = "MOEJAX_FAULT_CHECKPOINT_STEP"
FAULT_MODE_ENV = "MOEJAX_FAULT_CHECKPOINT_MODE"
FAULT_MARKER_ENV = "MOEJAX_FAULT_MARKER"
FAULT_HANG_ENV = "MOEJAX_FAULT_HANG_S"
FAULT_MODES = ("hang", "kill")


def _fault_handler_registry():
    """The handler registry with the fault-injecting ``meta`` handler, or None when no fault is requested."""
    step = os.environ.get(FAULT_STEP_ENV)
    if not step:
        return None
    mode = os.environ.get(FAULT_MODE_ENV, "hang")
    if not step.isdigit() or mode not in FAULT_MODES:
        raise ValueError(f"{FAULT_STEP_ENV}={step!r} must be a step number and {FAULT_MODE_ENV}={mode!r} one of "
                         f"{FAULT_MODES}")
    reg = ocp.handlers.DefaultCheckpointHandlerRegistry()
    pytree = ocp.PyTreeCheckpointHandler()
    meta = _FaultInjectingJsonHandler(int(step), mode, os.environ.get(FAULT_MARKER_ENV),
                                      float(os.environ.get(FAULT_HANG_ENV, "600")))
    for item, handler, save, restore in (("state", pytree, ocp.args.PyTreeSave, ocp.args.PyTreeRestore),
                                         ("meta", meta, ocp.args.JsonSave, ocp.args.JsonRestore)):
        reg.add(item, save, handler)
        reg.add(item, restore, handler)
    return reg


class _FaultInjectingJsonHandler(ocp.JsonCheckpointHandler):
    """Orbax's JSON handler, interrupted after writing the ``meta`` of step ``step`` (see the module docstring).

    Its write runs as one of the save's commit futures (orbax's background thread in async mode): blocking here
    keeps the step's temporary directory, with this file in it, unfinalized."""

    def __init__(self, step: int, mode: str, marker: str | None, hang_s: float):
        super().__init__()
        self.fault_step, self.mode, self.marker, self.hang_s = step, mode, marker, hang_s

    async def _save_fn(self, x, directory):
        await super()._save_fn(x, directory)
        if x.get("step") == self.fault_step:
            await asyncio.to_thread(self._fault, str(directory))

    def _fault(self, directory: str) -> None:
        if self.marker:
            tmp = self.marker + ".tmp"
            with open(tmp, "w") as f:
                json.dump({"step": self.fault_step, "pid": os.getpid(), "meta_dir": directory, "mode": self.mode}, f)
            os.replace(tmp, self.marker)
        if self.mode == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(self.hang_s)


def _first_line(e: BaseException, limit: int = 300) -> str:
    """A short reason: the root cause's first line (orbax wraps tensorstore errors in long spec dumps)."""
    while e.__cause__ is not None:
        e = e.__cause__
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text if len(text) <= limit else text[:limit] + " ..."


def meta_dict(step: int, cfg: ModelConfig, tc: TrainConfig, data_state: dict, corpus: dict | None) -> dict:
    return {"step": step, "model_config": config_to_dict(cfg), "train_config": config_to_dict(tc),
            "data_state": data_state, "corpus": corpus}


def configs_from_meta(meta: dict) -> tuple[ModelConfig, TrainConfig]:
    return (config_from_dict(ModelConfig, meta["model_config"]).validate(),
            config_from_dict(TrainConfig, meta["train_config"]).validate())


def load_model(directory: str, step: int | None = None, *, apply_sparsity: bool = True):
    """The model of a training checkpoint (``directory`` is a run's output dir or its ``checkpoints`` dir).

    A run trained with N:M sparsity (``TrainConfig.sparsity``) loads as the sparse model it trained: the
    weights its forward masks prune are zero (:func:`moejax.nn.sparse.apply_forward_masks`), so ``generate``,
    ``serve``, ``eval`` and ``export`` all see the N:M-sparse model. ``apply_sparsity=False``: the dense
    master weights as saved (to continue training or inspect them)."""
    from flax import nnx

    from moejax.models.transformer import Transformer
    from moejax.nn.sparse import apply_forward_masks

    if not os.path.isdir(directory):
        raise FileNotFoundError(f"checkpoint directory {directory!r} does not exist")
    sub = os.path.join(directory, "checkpoints")
    ck = Checkpointer(sub if os.path.isdir(sub) else directory, async_save=False, clean_partial=False)
    try:
        meta = ck.read_meta(step)
        cfg, tc = configs_from_meta(meta)
        model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
        gdef, params, rest = nnx.split(model, nnx.Param, ...)
        dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=dev),
                              {"params": params, "rest": rest})
        step = meta["step"] if step is None else step
        restored = ck.manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True)))
        state = restored.state
    except FileNotFoundError:
        raise
    except Exception as e:  # orbax/tensorstore raise ValueError, KeyError or a bare Exception
        raise ValueError(f"checkpoint {directory!r} is incompatible or corrupt: {_first_line(e)}") from e
    finally:
        ck.close()
    model = nnx.merge(gdef, state["params"], state["rest"])
    if apply_sparsity:
        apply_forward_masks(model, tc.sparsity)
    return model, cfg, meta
