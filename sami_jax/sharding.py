"""Meshes and logical-axis sharding rules.

Every parameter (and the key activations) names logical axes (batch, embed, heads, kv_heads, mlp,
vocab, experts, ...). One rules table maps each logical axis to mesh axes; `logical_spec` turns a
shape plus its logical axes into a PartitionSpec. A dim that the assigned mesh axes do not divide
is left replicated on the axes that do not fit (e.g. 3 KV heads on tensor=4), so every config runs
on every mesh; the cost is extra memory, never a wrong answer.

Mode: GSPMD-style automatic sharding. The mesh is built with `AxisType.Auto` on purpose (jax 0.10's
`make_mesh` defaults to Explicit, which rejects matmuls whose contracting dims are sharded); jit
receives in/out shardings and XLA inserts the collectives.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor", "expert")

# logical axis -> mesh axes, sharded jointly in this order.
DEFAULT_RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp", "expert"),
    "embed": ("fsdp",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "mlp": ("tensor",),
    "vocab": ("tensor",),
    "experts": ("expert",),
}


def mesh_shape(axes: Mapping[str, int], num_devices: int) -> dict[str, int]:
    """Resolves a {axis: size} dict over MESH_AXES (missing = 1, one axis may be -1 = fill)."""
    unknown = set(axes) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; known: {MESH_AXES}")
    sizes = {a: int(axes.get(a, 1)) for a in MESH_AXES}
    fill = [a for a, s in sizes.items() if s == -1]
    if len(fill) > 1:
        raise ValueError(f"only one mesh axis may be -1, got {fill}")
    known = math.prod(s for s in sizes.values() if s != -1)
    if fill:
        if num_devices % known:
            raise ValueError(f"{num_devices} devices do not divide into mesh {axes} (fixed axes need {known})")
        sizes[fill[0]] = num_devices // known
    if math.prod(sizes.values()) != num_devices:
        raise ValueError(f"mesh {sizes} needs {math.prod(sizes.values())} devices, have {num_devices}")
    return sizes


def make_mesh(axes: Mapping[str, int] | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over MESH_AXES, e.g. make_mesh({"fsdp": 2, "tensor": 4}); default: FSDP over all devices."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = mesh_shape(axes if axes is not None else {"fsdp": -1}, len(devices))
    grid = np.asarray(devices).reshape([sizes[a] for a in MESH_AXES])
    try:
        auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
        return Mesh(grid, MESH_AXES, axis_types=auto)
    except (AttributeError, TypeError):  # jax without axis types: Auto is the only mode
        return Mesh(grid, MESH_AXES)


@dataclasses.dataclass(frozen=True)
class Sharder:
    """A mesh plus logical-axis rules; hashable so it can be a static jit argument."""

    mesh: Mesh
    rules: tuple[tuple[str, tuple[str, ...]], ...] = tuple(DEFAULT_RULES.items())

    @classmethod
    def create(cls, mesh: Mesh, rules: Mapping[str, Sequence[str]] | None = None) -> Sharder:
        rules = DEFAULT_RULES if rules is None else rules
        return cls(mesh, tuple((k, tuple(v)) for k, v in rules.items()))

    def spec(self, shape: Sequence[int], axes: Sequence[str | None]) -> PartitionSpec:
        """PartitionSpec for an array of `shape` whose dims have logical names `axes`."""
        if len(shape) != len(axes):
            raise ValueError(f"shape {tuple(shape)} and logical axes {tuple(axes)} differ in rank")
        rules, used, out = dict(self.rules), set(), []
        for dim, name in zip(shape, axes, strict=True):
            mesh_axes = [a for a in rules.get(name, ()) if a not in used and self.mesh.shape[a] > 1]
            # Keep the longest prefix of mesh axes whose product divides the dim.
            while mesh_axes and dim % math.prod(self.mesh.shape[a] for a in mesh_axes):
                mesh_axes.pop()
            used.update(mesh_axes)
            out.append(tuple(mesh_axes) if len(mesh_axes) > 1 else (mesh_axes[0] if mesh_axes else None))
        return PartitionSpec(*out)

    def sharding(self, shape: Sequence[int], axes: Sequence[str | None]) -> NamedSharding:
        return NamedSharding(self.mesh, self.spec(shape, axes))

    def constrain(self, x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
        """with_sharding_constraint by logical axes (inside jit)."""
        return jax.lax.with_sharding_constraint(x, self.sharding(x.shape, axes))

    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())


def param_shardings(config, sharder: Sharder):
    """NamedSharding tree matching the params of `config`."""
    from sami_jax.models.params import is_spec, param_specs

    return jax.tree.map(lambda s: sharder.sharding(s.shape, s.axes), param_specs(config), is_leaf=is_spec)
