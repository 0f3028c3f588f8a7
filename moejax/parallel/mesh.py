"""Device meshes and the logical-axis -> mesh-axis rules.

Mesh axes: ``data`` (pure data parallelism), ``node`` and ``expert`` (experts sharded over both, node-major,
so expert parallelism can span nodes: ``node`` is the inter-node level, ``expert`` the intra-node level; both also
split the batch for the non-expert layers), ``tensor`` (expert and attention hidden dimensions). Parameters carry logical axis names
(``logical_axes`` metadata on ``nnx.Param``); :data:`RULES` maps each to a mesh axis (or ``None`` = replicated).

FSDP/ZeRO-style sharding (opt-in: ``MeshConfig(fsdp=True)``, mesh spec ``"data=2,expert=4,fsdp"``) additionally
shards each parameter -- and, following it, its optimizer moments -- over ``data`` along one dimension: the
largest dimension not already sharded whose size the ``data`` size divides (the first such on ties). Parameters
with fewer than :data:`FSDP_MIN_SIZE` elements, or no such dimension, stay replicated over ``data``. The train
step all-gathers those parameters over ``data`` inside its ``shard_map`` and reduce-scatters their gradients
(see :meth:`moejax.train.trainer.Trainer._sharded_grads`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

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

# FSDP leaves parameters with fewer elements than this replicated (norm scales, biases: not worth a collective).
FSDP_MIN_SIZE = 1024


@dataclass(frozen=True)
class MeshConfig:
    """Mesh shape. ``data * node * expert * tensor`` devices are used.

    Attributes:
      data, expert, tensor, node: axis sizes (see the module docstring).
      fsdp: also shard parameters and optimizer state over ``data`` (FSDP/ZeRO-3 style; needs ``data >= 2``);
        in a mesh spec, the bare word ``fsdp`` (``"data=2,expert=4,fsdp"``).
    """

    data: int = 1
    expert: int = 1
    tensor: int = 1
    node: int = 1
    fsdp: bool = False

    @property
    def size(self) -> int:
        return self.data * self.node * self.expert * self.tensor

    @property
    def expert_parallel(self) -> int:
        return self.node * self.expert

    def validate(self, num_experts: int | None = None, n_devices: int | None = None) -> MeshConfig:
        for a in AXES:
            v = getattr(self, a)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"MeshConfig.{a}={v!r} is invalid: must be an integer >= 1")
        if type(self.fsdp) is not bool:
            raise ValueError(f"MeshConfig.fsdp={self.fsdp!r} is invalid: must be True or False")
        if self.fsdp and self.data < 2:
            raise ValueError(f"MeshConfig.fsdp=True is invalid with data={self.data}: FSDP shards parameters and "
                             f"optimizer state over the data axis, so it needs data >= 2 (e.g. 'data=2,expert=4,fsdp')")
        n = jax.device_count() if n_devices is None else n_devices
        if self.size > n:
            raise ValueError(f"mesh {self.spec()} needs {self.size} devices, {n} are available")
        if num_experts is not None and num_experts % self.expert_parallel:
            raise ValueError(f"MeshConfig.expert={self.expert} (x node={self.node}) does not divide "
                             f"num_experts={num_experts}")
        return self

    @property
    def fsdp_size(self) -> int:
        """How many ways parameters are sharded over ``data`` (1 = not at all)."""
        return self.data if self.fsdp else 1

    def spec(self) -> str:
        return ",".join(f"{a}={getattr(self, a)}" for a in AXES) + (",fsdp" if self.fsdp else "")

    @staticmethod
    def parse(text: str) -> MeshConfig:
        """``"data=2,expert=4"`` -> MeshConfig (unnamed axes are 1); a bare ``fsdp`` (or ``fsdp=true|false``)
        sets :attr:`MeshConfig.fsdp`."""
        kw = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            key, _, val = (s.strip() for s in part.partition("="))
            if key == "fsdp":
                flags = {"": True, "1": True, "true": True, "0": False, "false": False}
                if val.lower() not in flags:
                    raise ValueError(f"mesh {text!r}: fsdp takes no value or true/false, got {val!r}")
                kw["fsdp"] = flags[val.lower()]
                continue
            if "=" not in part:
                raise ValueError(f"mesh {text!r}: expected axis=size pairs like 'data=2,expert=4'")
            k, v = (s.strip() for s in part.split("=", 1))
            if k not in AXES:
                raise ValueError(f"mesh {text!r}: unknown axis {k!r}; allowed axes are {', '.join(AXES)} "
                                 f"(and the flag fsdp)")
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


def add_fsdp(spec: P, shape, fsdp: int, min_size: int = FSDP_MIN_SIZE) -> P:
    """``spec`` with ``data`` on the largest not-yet-sharded dimension of ``shape`` divisible by ``fsdp``
    (unchanged when ``fsdp == 1``, the array has fewer than ``min_size`` elements, or no dimension fits)."""
    if fsdp <= 1 or math.prod(shape) < min_size:
        return spec
    entries = tuple(spec) + (None,) * (len(shape) - len(spec))
    free = [d for d, (e, n) in enumerate(zip(entries, shape)) if e is None and n % fsdp == 0]
    if not free:
        return spec
    d = max(free, key=lambda i: (shape[i], -i))
    return P(*(("data" if i == d else e) for i, e in enumerate(entries)))


def fsdp_dim(spec: P) -> int | None:
    """The dimension :func:`add_fsdp` sharded over ``data`` (``None``: not FSDP-sharded)."""
    for i, e in enumerate(spec):
        if e == "data":
            return i
    return None


def _variable_spec(v, rules, fsdp):
    from flax import nnx

    if isinstance(v, nnx.Variable):
        shape = np.shape(v.get_value())
        return add_fsdp(logical_to_spec(v.get_metadata().get("logical_axes"), len(shape), rules), shape, fsdp)
    return logical_to_spec(None, np.ndim(v), rules)


def state_specs(state, rules=RULES, fsdp: int = 1):
    """A PartitionSpec per Variable of an ``nnx.State`` (a prefix tree of it), from ``logical_axes`` metadata;
    ``fsdp > 1`` also shards each large parameter over ``data`` (:func:`add_fsdp`)."""
    from flax import nnx

    return jax.tree.map(lambda v: _variable_spec(v, rules, fsdp), state,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_state(state, mesh: Mesh, rules=RULES, fsdp: int = 1):
    """Place an ``nnx.State`` (or any tree holding ``nnx.Variable`` such as an optimizer state of them) on
    ``mesh`` by its logical axes (and over ``data`` with ``fsdp > 1``); other leaves are replicated."""
    from flax import nnx

    def put(v):
        spec = _variable_spec(v, rules, fsdp)
        if isinstance(v, nnx.Variable):
            return v.replace(jax.device_put(v.get_value(), NamedSharding(mesh, spec)))
        return jax.device_put(v, NamedSharding(mesh, spec))

    return jax.tree.map(put, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def num_batch_shards(mc: MeshConfig) -> int:
    return math.prod(getattr(mc, a) for a in BATCH_AXES)
