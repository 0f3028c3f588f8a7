"""Device meshes and the logical-axis -> mesh-axis rules.

Mesh axes: ``data`` (pure data parallelism), ``node`` and ``expert`` (experts sharded over both, node-major,
so expert parallelism can span nodes: ``node`` is the inter-node level, ``expert`` the intra-node level; both also
split the batch for the non-expert layers), ``tensor`` (expert and attention hidden dimensions). Parameters carry logical axis names
(``logical_axes`` metadata on ``nnx.Param``); :data:`RULES` maps each to a mesh axis (or ``None`` = replicated).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "node", "expert", "tensor")
BATCH_AXES = ("data", "node", "expert")
EXPERT_AXES = ("node", "expert")

# logical axis -> mesh axis
RULES: dict[str, str | None] = {
    "batch": BATCH_AXES,
    "expert": EXPERT_AXES,
    "mlp": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "embed": None,
    "vocab": None,
    "head_dim": None,
    "layers": None,
}


@dataclass(frozen=True)
class MeshConfig:
    """Mesh shape. ``data * node * expert * tensor`` devices are used."""

    data: int = 1
    expert: int = 1
    tensor: int = 1
    node: int = 1

    @property
    def size(self) -> int:
        return self.data * self.node * self.expert * self.tensor

    @property
    def expert_parallel(self) -> int:
        return self.node * self.expert

    def validate(self, num_experts: int | None = None, n_devices: int | None = None) -> "MeshConfig":
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"MeshConfig.{f.name}={v!r} is invalid: must be an integer >= 1")
        n = jax.device_count() if n_devices is None else n_devices
        if self.size > n:
            raise ValueError(f"mesh {self.spec()} needs {self.size} devices, {n} are available")
        if num_experts is not None and num_experts % self.expert_parallel:
            raise ValueError(f"MeshConfig.expert={self.expert} (x node={self.node}) does not divide "
                             f"num_experts={num_experts}")
        return self

    def spec(self) -> str:
        return ",".join(f"{a}={getattr(self, a)}" for a in AXES)

    @staticmethod
    def parse(text: str) -> "MeshConfig":
        """``"data=2,expert=4"`` -> MeshConfig (unnamed axes are 1)."""
        kw = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            if "=" not in part:
                raise ValueError(f"mesh {text!r}: expected axis=size pairs like 'data=2,expert=4'")
            k, v = (s.strip() for s in part.split("=", 1))
            if k not in AXES:
                raise ValueError(f"mesh {text!r}: unknown axis {k!r}; allowed axes are {', '.join(AXES)}")
            try:
                kw[k] = int(v)
            except ValueError:
                raise ValueError(f"mesh {text!r}: size of {k!r} must be an integer, got {v!r}") from None
        return MeshConfig(**kw)


def make_mesh(mc: MeshConfig, devices=None) -> Mesh:
    """A ``Mesh`` with axes ``(data, node, expert, tensor)`` over the first ``mc.size`` devices."""
    mc.validate()
    devs = np.asarray(devices if devices is not None else jax.devices()[:mc.size]).reshape(
        mc.data, mc.node, mc.expert, mc.tensor)
    return Mesh(devs, AXES)


def logical_to_spec(logical_axes, ndim: int, rules=RULES) -> P:
    """PartitionSpec for an array with ``logical_axes`` (leading extra dims, e.g. stacked layers, replicated)."""
    names = tuple(logical_axes or ())
    names = (None,) * (ndim - len(names)) + names
    return P(*(rules.get(n) if n is not None else None for n in names))


def state_specs(state, rules=RULES):
    """A PartitionSpec per Variable of an ``nnx.State`` (a prefix tree of it), from ``logical_axes`` metadata."""
    from flax import nnx

    def spec(v):
        if isinstance(v, nnx.Variable):
            return logical_to_spec(v.get_metadata().get("logical_axes"), np.ndim(v.get_value()), rules)
        return logical_to_spec(None, np.ndim(v), rules)

    return jax.tree.map(spec, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_state(state, mesh: Mesh, rules=RULES):
    """Place an ``nnx.State`` on ``mesh`` by its logical axes."""
    from flax import nnx

    def put(v):
        spec = logical_to_spec(v.get_metadata().get("logical_axes"), np.ndim(v.get_value()), rules)
        return v.replace(jax.device_put(v.get_value(), NamedSharding(mesh, spec)))

    return jax.tree.map(put, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def num_batch_shards(mc: MeshConfig) -> int:
    return math.prod(getattr(mc, a) for a in BATCH_AXES)
