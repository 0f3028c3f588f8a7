"""Checkpoints with orbax: async saves every N steps, keep the last K, atomic, full resume state.

A checkpoint step directory holds ``state`` (parameters, non-trainable state such as router biases, optimizer
state: an orbax PyTree) and ``meta`` (JSON: step, model and train configs, data-iterator state, corpus info).
Orbax writes each step into a temporary directory and renames it when complete, so a run killed during a save
resumes from the last complete checkpoint and never overwrites a good one.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from moejax.config import ModelConfig, TrainConfig, config_from_dict, config_to_dict


class Checkpointer:
    """Save/restore training state under ``directory`` (created if missing)."""

    def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "meta"))

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


def load_model(directory: str, step: int | None = None):
    """The model of a training checkpoint (``directory`` is a run's output dir or its ``checkpoints`` dir)."""
    from flax import nnx

    from moejax.models.transformer import Transformer

    if not os.path.isdir(directory):
        raise FileNotFoundError(f"checkpoint directory {directory!r} does not exist")
    sub = os.path.join(directory, "checkpoints")
    ck = Checkpointer(sub if os.path.isdir(sub) else directory, async_save=False)
    try:
        meta = ck.read_meta(step)
        cfg, _ = configs_from_meta(meta)
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
    return nnx.merge(gdef, state["params"], state["rest"]), cfg, meta
