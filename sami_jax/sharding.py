"""Meshes and logical-axis sharding rules.

Every parameter (and the key activations) names logical axes (batch, embed, heads, kv_heads, mlp,
vocab, experts, ...). One rules table maps each logical axis to mesh axes; `Sharder.spec` turns a
shape plus its logical axes into a PartitionSpec.

Mesh: four axes (data, fsdp, tensor, expert). `make_mesh` takes their sizes within one slice (ICI) and,
for a job over several slices, their sizes across slices (DCN; by default all slices on `data`, i.e.
data parallelism over the slow network and everything else inside a slice). One axis of each may be
-1 = the remaining chips (or slices). A mesh axis of size 1 drops out of every rule, so one table
serves the three strategies of DESIGN.md, chosen by the mesh sizes in the config file:

    Mistral-7B     FSDP over all chips     mesh fsdp=-1              embed on fsdp
    Llama-3-70B    FSDP x tensor (<= 8)    mesh fsdp=-1, tensor=8    + heads, mlp, vocab (and KV heads) on tensor
    Mixtral-8x7B   experts x FSDP          mesh expert=8, fsdp=-1    experts on expert; the dims of weights
                                                                     without an experts dim (attention,
                                                                     embeddings) FSDP over fsdp x expert

The batch is split over data x fsdp x expert, the axes that hold no model dim of the activations.

Divisibility: a mesh axis that a rule asks for must divide the dim, or `spec` raises ShardingError
naming the dim and the axis (a silently replicated embed dim would undo FSDP and run out of memory
far from the cause). Two logical axes may instead stay replicated on the axes that do not fit:
  kv_heads  GQA models have few KV heads (8 for all three paper models); tensor > KV heads
            replicates the small K/V projections and the cache's head dim, the usual practice;
  batch     so that any batch runs through `Model.logits`. The run's own batches (the training
            micro-batch, the sampling batch) are checked by `check_batch` when the mesh is built,
            because compute replicated over chips is never what a job on a pod wants.

Mode: GSPMD-style automatic sharding. The mesh is built with `AxisType.Auto` on purpose (jax 0.10's
`make_mesh` defaults to Explicit, which rejects matmuls whose contracting dims are sharded); jit
receives in/out shardings and XLA inserts the collectives.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from collections.abc import Mapping, Sequence

import jax
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor", "expert")

# logical axis -> mesh axes, sharded jointly in this order (an axis already used by an earlier dim of
# the same array is skipped, so an expert weight's embed dim falls back to fsdp alone).
DEFAULT_RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp", "expert"),
    "embed": ("fsdp", "expert"),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "mlp": ("tensor",),
    "vocab": ("tensor",),
    "experts": ("expert",),
}

# Logical axes left replicated on mesh axes that do not divide them (see the module docstring).
REPLICABLE = frozenset({"batch", "kv_heads"})


class ShardingError(ValueError):
    """A mesh that cannot shard what the rules ask for; the message says which size to change."""


def mesh_shape(axes: Mapping[str, int], count: int, what: str = "mesh", unit: str = "devices") -> dict[str, int]:
    """Resolves a {axis: size} dict over MESH_AXES (missing = 1, one axis may be -1 = fill) for `count`
    `unit`; `what` names the setting in errors (e.g. "config.mesh")."""
    unknown = set(axes) - set(MESH_AXES)
    if unknown:
        raise ShardingError(f"{what}: unknown mesh axes {sorted(unknown)}; known: {MESH_AXES}")
    sizes = {a: int(axes.get(a, 1)) for a in MESH_AXES}
    bad = {a: s for a, s in sizes.items() if s < 1 and s != -1}
    if bad:
        raise ShardingError(f"{what}: axis sizes must be >= 1 or -1 (fill), got {bad}")
    fill = [a for a, s in sizes.items() if s == -1]
    if len(fill) > 1:
        raise ShardingError(f"{what}: only one mesh axis may be -1, got {fill}")
    known = math.prod(s for s in sizes.values() if s != -1)
    fixed = ", ".join(f"{a}={s}" for a, s in sizes.items() if s > 1) or "none"
    change = f"set --{what}.AXIS=N" if what.startswith("config.") else "change the axis sizes"
    if fill:
        if count % known:
            raise ShardingError(f"{what} {dict(axes)}: {count} {unit} cannot be split over the fixed axes ({fixed}, "
                                f"product {known}); {change} so that their product divides {count}")
        sizes[fill[0]] = count // known
    if math.prod(sizes.values()) != count:
        raise ShardingError(f"{what} {sizes} needs {math.prod(sizes.values())} {unit}, have {count}: {change} so "
                            f"that the product is {count}, or one axis to -1 to fill")
    return sizes


def slices_of(devices: Sequence[jax.Device]) -> list[list[jax.Device]]:
    """The devices grouped by slice (TPU multislice: `slice_index`; anything else is one slice)."""
    groups: dict[int, list] = collections.defaultdict(list)
    for d in devices:
        groups[getattr(d, "slice_index", 0)].append(d)
    return [groups[k] for k in sorted(groups)]


def make_mesh(axes: Mapping[str, int] | None = None, devices: Sequence[jax.Device] | None = None,
              dcn: Mapping[str, int] | None = None, what: str = "mesh") -> Mesh:
    """A mesh over MESH_AXES, e.g. make_mesh({"fsdp": 2, "tensor": 4}).

    axes: sizes within one slice (default: FSDP over all its devices); dcn: sizes across slices
    (default {"data": -1}: data parallel over the slices). The mesh's size on each axis is the product
    of the two. `what` names the config setting in errors.
    """
    devices = list(devices if devices is not None else jax.devices())
    slices = slices_of(devices)
    per_slice = len(slices[0])
    if any(len(s) != per_slice for s in slices):
        raise ShardingError(f"{what}: slices of unequal size {[len(s) for s in slices]}")
    dcn_sizes = mesh_shape(dcn if dcn is not None else {"data": -1}, len(slices), f"{what}.dcn", "slices")
    ici_sizes = mesh_shape(axes if axes is not None else {"fsdp": -1}, per_slice, what,
                           "devices per slice" if len(slices) > 1 else "devices")
    ici = [ici_sizes[a] for a in MESH_AXES]
    # Topology-aware device order on TPUs (neighbours on the ICI torus share the inner axes); elsewhere
    # this is the devices in order (GPUs: by id).
    if len(slices) == 1:
        grid = mesh_utils.create_device_mesh(ici, devices, allow_split_physical_axes=True)
    else:
        grid = mesh_utils.create_hybrid_device_mesh(ici, [dcn_sizes[a] for a in MESH_AXES], devices,
                                                    allow_split_physical_axes=True)
    try:
        auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
        return Mesh(grid, MESH_AXES, axis_types=auto)
    except (AttributeError, TypeError):  # jax without axis types: Auto is the only mode
        return Mesh(grid, MESH_AXES)


def batch_shards(mesh: Mesh, rules: Mapping[str, Sequence[str]] = DEFAULT_RULES) -> int:
    """How many ways the batch is split on `mesh`: the product of its batch axes."""
    return math.prod(mesh.shape[a] for a in rules["batch"])


def check_batch(mesh: Mesh, batches: Mapping[str, int], rules: Mapping[str, Sequence[str]] = DEFAULT_RULES) -> None:
    """Raises ShardingError unless every batch size in `batches` ({setting name: size}) is a multiple of
    the batch shards of `mesh`."""
    n = batch_shards(mesh, rules)
    axes = " x ".join(f"{a} {mesh.shape[a]}" for a in rules["batch"])
    for name, size in batches.items():
        if size % n:
            raise ShardingError(
                f"{name}={size} is not a multiple of the {n} batch shards of the mesh ({axes}): set it to a "
                f"multiple of {n}, or move chips from those axes to mesh.tensor")


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
        """PartitionSpec for an array of `shape` whose dims have logical names `axes`. Raises ShardingError
        when the mesh axes of a dim do not divide it, unless the dim's name is in REPLICABLE."""
        if len(shape) != len(axes):
            raise ValueError(f"shape {tuple(shape)} and logical axes {tuple(axes)} differ in rank")
        rules, used, out = dict(self.rules), set(), []
        for dim, name in zip(shape, axes, strict=True):
            mesh_axes = [a for a in rules.get(name, ()) if a not in used and self.mesh.shape[a] > 1]
            ways = math.prod(self.mesh.shape[a] for a in mesh_axes)
            if dim % ways and name not in REPLICABLE:
                sizes = ", ".join(f"{a}={self.mesh.shape[a]}" for a in mesh_axes)
                raise ShardingError(f"{name} dim of size {dim} cannot be split {ways} ways over mesh axes {sizes}; "
                                    f"choose mesh sizes whose product divides {dim}")
            # Replicable dims keep the longest prefix of mesh axes whose product divides them.
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
    """NamedSharding tree matching the params of `config`; a param the mesh cannot shard as the rules ask
    raises ShardingError naming it."""
    from sami_jax.models.params import is_spec, param_specs

    def one(path, s):
        try:
            return sharder.sharding(s.shape, s.axes)
        except ShardingError as e:
            raise ShardingError(f"param {jax.tree_util.keystr(path, simple=True, separator='/')} "
                                f"{s.shape}: {e}") from None

    return jax.tree_util.tree_map_with_path(one, param_specs(config), is_leaf=is_spec)
