"""Meshes with named axes, logical-axis rules, train-state shardings and global batches.

Mesh axes, outermost first (the outer axes cross hosts, `tensor`/`expert` stay inside one):

  data    pure data parallelism (replicated parameters)
  fsdp    data parallelism with parameters and optimizer states sharded (ZeRO-3 / FSDP)
  tensor  tensor (model) parallelism: MLP hidden units, attention heads, vocabulary
  expert  expert parallelism: MoE experts; also splits the batch outside MoE layers

The batch is split over `BATCH_AXES = ('data', 'fsdp', 'expert')` (MaxText's layout), so
global-batch statistics reduce over those axes: pass `axis_name=batch_axes(mesh)` to
mpxla.parallel.stats, the BatchNorm and the MoE losses.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, Literal

import flax.linen as nn
import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mpxla.quant.sharding import BATCH_AXES

MESH_AXES = ("data", "fsdp", "tensor", "expert")

# Logical axis -> mesh axes. Parameter axes: embed, mlp, heads, kv, vocab, exp (MoE
# experts), norm (normalization features). Activation axes: batch, length, act_embed,
# act_mlp, act_heads, act_exp. A mesh axis is used at most once per array (the first rule
# that applies wins; later dims that would reuse it stay replicated).
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", BATCH_AXES),
    ("length", None),
    ("act_embed", None),
    ("act_mlp", "tensor"),
    ("act_heads", "tensor"),
    ("act_exp", "expert"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("exp", "expert"),
    ("norm", None),
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Sizes of the mesh axes; one size may be -1 (all remaining devices).

  Attributes:
    data, fsdp, tensor, expert: axis sizes (default: everything on `data`).
    axis_types: 'auto' (classic jit sharding propagation) or 'explicit' (sharding in
      types, JAX's default for `jax.make_mesh`).
  """

  data: int = -1
  fsdp: int = 1
  tensor: int = 1
  expert: int = 1
  axis_types: Literal["auto", "explicit"] = "auto"

  def sizes(self) -> dict[str, int]:
    return {a: getattr(self, a) for a in MESH_AXES}


def make_mesh(
    config: MeshConfig | dict[str, Any] | None = None,
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
  """A mesh with axes MESH_AXES (size-1 axes kept) over `devices` (default: all devices).

  Raises ValueError if the sizes do not multiply to the number of devices.
  """
  if config is None:
    config = MeshConfig()
  elif isinstance(config, dict):
    config = MeshConfig(**config)
  devices = list(jax.devices() if devices is None else devices)
  sizes = config.sizes()
  n = len(devices)
  for name, s in sizes.items():
    if not isinstance(s, int) or (s < 1 and s != -1):
      raise ValueError(f"mesh axis {name}={s!r}: sizes must be positive ints or -1 (fill).")
  fill = [a for a, s in sizes.items() if s == -1]
  if len(fill) > 1:
    raise ValueError(f"only one mesh axis may be -1 (fill), got {fill}.")
  known = math.prod(s for s in sizes.values() if s != -1)
  if fill:
    if n % known:
      raise ValueError(
          f"mesh {sizes} does not fit {n} devices: {n} is not a multiple of {known}."
      )
    sizes[fill[0]] = n // known
  if math.prod(sizes.values()) != n:
    raise ValueError(
        f"mesh {sizes} has {math.prod(sizes.values())} devices but {n} were given "
        f"(jax.device_count()={jax.device_count()}); make the sizes multiply to {n} or set "
        "one of them to -1."
    )
  if config.axis_types not in ("auto", "explicit"):
    raise ValueError(f"axis_types must be 'auto' or 'explicit', got {config.axis_types!r}.")
  kind = AxisType.Auto if config.axis_types == "auto" else AxisType.Explicit
  shape = tuple(sizes[a] for a in MESH_AXES)
  return jax.make_mesh(shape, MESH_AXES, (kind,) * len(MESH_AXES), devices=devices)


def batch_axes(mesh: Mesh | jax.sharding.AbstractMesh) -> tuple[str, ...]:
  """The mesh axes the batch is split over (BATCH_AXES that the mesh has), outer first."""
  return tuple(a for a in BATCH_AXES if a in mesh.axis_names)


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
  """Sharding of a batch array: axis 0 over `batch_axes(mesh)`, other axes replicated."""
  return NamedSharding(mesh, P(batch_axes(mesh), *([None] * (ndim - 1))))


def batch_shards(mesh: Mesh) -> int:
  """Number of device shards of the batch axis."""
  return math.prod(mesh.shape[a] for a in batch_axes(mesh))


def logical_to_spec(
    logical_axes: Sequence[str | None], rules=DEFAULT_RULES, shape: Sequence[int] | None = None,
    mesh: Mesh | None = None,
) -> P:
  """PartitionSpec for logical axis names under `rules`.

  With `shape` and `mesh`, a dimension whose size is not a multiple of its mesh axes'
  size stays replicated (documented fallback: a small dimension, e.g. 3 features on
  fsdp=4, is replicated rather than unevenly sharded).
  """
  spec = nn.logical_to_mesh_axes(tuple(logical_axes), rules)
  if shape is None or mesh is None:
    return spec
  return P(*[axes if dim % spec_size(axes, mesh) == 0 else None for dim, axes in
             zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=False)])


def spec_size(axes: str | Sequence[str] | None, mesh) -> int:
  """Devices one PartitionSpec entry (None, an axis name or a tuple of them) splits over."""
  names = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
  return math.prod(mesh.shape[a] for a in names)


def _leaf_names(leaf) -> tuple[Any, tuple[str | None, ...] | None]:
  """(value, logical names or None) for Linen boxes, NNX variables and plain arrays."""
  if isinstance(leaf, nn.LogicallyPartitioned):
    return leaf.value, tuple(leaf.names)
  if isinstance(leaf, nn.Partitioned):  # names are mesh axes already
    return leaf.value, None
  if isinstance(leaf, nnx.Variable):
    names = leaf.get_metadata().get("out_sharding")
    return leaf.get_value(), (tuple(names) if names else None)
  return leaf, None


# Groups of FP8 optimizer states (mpxla.optim) and 1x128 scale blocks run along the last axis
# in tiles of 128: a shard boundary inside a tile makes each update move whole moments.
LAST_AXIS_TILE = 128


def fsdp_spec(shape: Sequence[int], fsdp: int) -> P:
  """The rule for leaves without logical names: the largest dimension divisible by `fsdp`
  (the first of equal ones) over 'fsdp', the last dimension only when its shards are
  multiples of `LAST_AXIS_TILE` (else it is the fallback when no other dimension divides);
  leaves under 1024 elements, or with no divisible dimension, replicated."""
  if fsdp == 1 or not shape or math.prod(shape) < 1024:
    return P()
  last = len(shape) - 1
  divisible = [i for i in range(len(shape)) if shape[i] % fsdp == 0]
  whole = [i for i in divisible if i != last or (shape[i] // fsdp) % LAST_AXIS_TILE == 0]
  if not divisible:
    return P()
  i = min(whole or divisible, key=lambda i: (-shape[i], i))
  return P(*[("fsdp" if j == i else None) for j in range(len(shape))])


def state_shardings(tree: Any, mesh: Mesh, rules=DEFAULT_RULES, *,
                    shard_unannotated: bool = False) -> Any:
  """NamedShardings for a (abstract) train state, matching its structure.

  Leaves annotated with logical names (Linen `nn.with_logical_partitioning` boxes, NNX
  variables with `out_sharding` metadata) are sharded by `rules`; Linen `nn.Partitioned`
  boxes keep their mesh axes; everything else (step counters, unannotated leaves) is
  replicated, or with `shard_unannotated=True` sharded by `fsdp_spec` over the mesh's
  'fsdp' axis (the trainer's choice: stock Flax layers carry no logical names).
  Optimizer states built from boxed parameters inherit their boxes. A Linen
  box is replaced by its NamedSharding (a pytree prefix of the box), an NNX variable keeps
  its wrapper around it. Use with `jax.eval_shape(init_fn, ...)` and pass the result as
  jit's `out_shardings`.
  """

  def is_leaf(x):
    return isinstance(x, nn.Partitioned | nnx.Variable)

  def one(leaf):
    value, names = _leaf_names(leaf)
    if isinstance(leaf, nn.Partitioned) and not isinstance(leaf, nn.LogicallyPartitioned):
      spec = leaf.get_partition_spec()
    elif not hasattr(value, "shape"):
      spec = P()
    elif names is None:
      spec = fsdp_spec(value.shape, mesh.shape.get("fsdp", 1)) if shard_unannotated else P()
    else:
      spec = logical_to_spec(names, rules, value.shape, mesh)
    s = NamedSharding(mesh, spec)
    return leaf.replace(s) if isinstance(leaf, nnx.Variable) else s

  return jax.tree.map(one, tree, is_leaf=is_leaf)


def global_batch(local_batch: Any, mesh: Mesh, *, axes: Sequence[str] | None = None) -> Any:
  """Assembles global batch arrays (axis 0 over `axes`) from this process's rows.

  Every process passes its own `local_batch` (a pytree of arrays with the same per-process
  batch size); process p holds rows [p * b, (p + 1) * b) of the global batch of
  b * jax.process_count() rows. Uses `jax.make_array_from_process_local_data`. Uneven
  per-host data must be padded to the same b and masked (see mpxla.parallel.metrics).
  Raises ValueError if the global batch does not divide the batch axes.
  """
  axes = batch_axes(mesh) if axes is None else tuple(axes)
  shards = math.prod(mesh.shape[a] for a in axes)
  nproc = jax.process_count()

  def one(x):
    x = np.asarray(x)
    if x.ndim == 0:
      raise ValueError("global_batch needs arrays with a batch axis, got a scalar.")
    b = x.shape[0] * nproc
    if b % shards:
      raise ValueError(
          f"global batch of {b} rows ({x.shape[0]} per process x {nproc} processes) does "
          f"not divide the {shards} shards of the batch axes {axes} "
          f"({dict((a, mesh.shape[a]) for a in axes)}); use a global batch that is a "
          f"multiple of {shards}, or pad and mask."
      )
    sharding = NamedSharding(mesh, P(axes, *([None] * (x.ndim - 1))))
    return jax.make_array_from_process_local_data(sharding, x, (b, *x.shape[1:]))

  return jax.tree.map(one, local_batch)
