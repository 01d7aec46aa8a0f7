"""Mesh axes as seen by code that must work under `jit` and inside `shard_map` alike.

Manual axes (`shard_map`): `varying_axes(x)` names the axes over which x differs between
devices (JAX's varying-axes tracking), `match_varying(*arrays)` makes arrays vary alike, as
a custom VJP needs.

Explicit axes (JAX's default for `jax.make_mesh`): code that regroups a sharded axis (a
reshape that splits or merges it: statistic groups, attention blocks) has no
sharding-in-types rule for it. `auto_regroup` runs such code with the mesh axes turned Auto
(`jax.sharding.auto_axes`), and `input_mesh` supplies the mesh from the input's type when no
`jax.set_mesh` context is set.

Custom calls (Pallas kernels) are opaque to XLA's SPMD partitioner, which replicates their
operands: `per_batch_shard` runs such a function on each device's batch shard instead.

Shared by mpxla.nn, mpxla.parallel and mpxla.attention.
"""

from __future__ import annotations

import contextlib
import functools
import math

import jax
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

# The mesh axes a batch is split over, outer first (MaxText's layout; mpxla.parallel's meshes).
BATCH_AXES = ("data", "fsdp", "expert")


def varying_axes(x: jax.Array) -> frozenset[str]:
  """The manual mesh axes over which `x` differs between devices (empty outside shard_map)."""
  aval = jax.typeof(x)
  vma = getattr(aval, "vma", None)  # the field's name in older JAX
  if vma is None:
    vma = getattr(getattr(aval, "manual_axis_type", None), "varying", ())
  return frozenset(vma)


def match_varying(*arrays: jax.Array) -> tuple[jax.Array, ...]:
  """The arrays, each made device-varying over the union of their varying mesh axes.

  Inside `shard_map`, a custom VJP's cotangent must vary like its input. A weight (the same
  on every device) meeting a per-device activation gets a per-device gradient, so the weight
  enters the custom VJP as varying; JAX then sums its gradient over the devices, as for any
  replicated input. Outside `shard_map` this does nothing.
  """
  axes = frozenset().union(*(varying_axes(a) for a in arrays))
  out = []
  for a in arrays:
    missing = tuple(sorted(axes - varying_axes(a)))
    out.append(jax.lax.pcast(a, missing, to="varying") if missing else a)
  return tuple(out)


def explicit_sharding(x: jax.Array) -> bool:
  """True if `x` is sharded over Explicit mesh axes (sharding in types)."""
  s = jax.typeof(x).sharding
  mesh = getattr(s, "mesh", None)
  if mesh is None or mesh.empty:
    return False
  explicit = {n for n, t in zip(mesh.axis_names, mesh.axis_types, strict=True)
              if t == AxisType.Explicit}
  used = set()
  for entry in s.spec:
    used.update((entry,) if isinstance(entry, str) else entry or ())
  return bool(explicit & used)


@contextlib.contextmanager
def input_mesh(x: jax.Array):
  """Makes the mesh in `x`'s type the context (abstract) mesh if no context mesh is set.

  Under `jax.jit` an input placed with `NamedSharding(mesh, spec)` carries `mesh` in its type
  (Auto or Explicit axes), also without `jax.set_mesh`; in this context the mesh axis sizes
  are known (device shard counts) and `auto_axes` works. A no-op when a mesh is set
  (`jax.set_mesh`, inside `shard_map`) or `x`'s type has none (e.g. a numpy input).
  """
  mesh = getattr(jax.typeof(x).sharding, "mesh", None)
  if not jax.sharding.get_abstract_mesh().empty or mesh is None or mesh.empty:
    yield
    return
  with jax.sharding.use_abstract_mesh(mesh):
    yield


def auto_regroup(f, x: jax.Array, *args, out_specs):
  """`f(x, *args)`, run with Auto mesh axes if `x` is sharded over Explicit ones.

  The outputs come back with `out_specs` (a PartitionSpec pytree prefix of the outputs) on
  x's mesh; without Explicit sharding this is just `f(x, *args)`.
  """
  if not explicit_sharding(x):
    return f(x, *args)
  with input_mesh(x):
    return jax.sharding.auto_axes(f, out_sharding=out_specs)(x, *args)


def per_batch_shard(f, *args, batch: int, split=None):
  """`f(*args)`, run per batch shard (`shard_map`) when the mesh's batch axes (`BATCH_AXES`,
  not Manual) split `batch`; else `f(*args)` as is.

  The mesh: the context mesh, else the one in the type of the first argument leaf whose
  leading size is `batch` (`input_mesh`). `split`, one entry per argument: True splits every
  leaf's leading axis over those axes, False replicates the argument, None (and `split=None`
  for all) splits the array leaves whose leading size is `batch` and replicates the rest
  (pass `split` where another leaf's leading size may equal `batch`). Arguments are resharded
  to these specs where the batch axes are Explicit. The outputs (leading axis `batch`) are
  split the same way (with Explicit axes, then placed like that first leaf's rows). f must
  treat the batch rows independently. Used for Pallas kernels, which XLA's partitioner would
  otherwise run whole on every device.
  """
  lead = next((x for x in jax.tree.leaves(args)
               if getattr(x, "ndim", 0) >= 1 and x.shape[0] == batch), None)
  with contextlib.nullcontext() if lead is None else input_mesh(lead):
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
      return f(*args)
    axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names and mesh.shape[a] > 1
                 and a not in mesh.manual_axes)
    shards = math.prod(mesh.shape[a] for a in axes)
    if shards == 1 or batch % shards:
      return f(*args)
    explicit = any(t == AxisType.Explicit and a in axes
                   for a, t in zip(mesh.axis_names, mesh.axis_types, strict=True))

    def spec(how, x):
      if how is None:
        how = getattr(x, "ndim", 0) >= 1 and x.shape[0] == batch
      return P(axes) if how else P()

    def place(how, x):  # an Explicit axis: the argument's type must carry its spec
      return jax.reshard(x, spec(how, x)) if explicit and hasattr(x, "ndim") else x

    split = (None,) * len(args) if split is None else split
    in_specs = tuple(jax.tree.map(functools.partial(spec, how), a) for how, a in
                     zip(split, args, strict=True))
    args = tuple(jax.tree.map(functools.partial(place, how), a) for how, a in
                 zip(split, args, strict=True))
    out = jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=P(axes),
                        check_vma=False)(*args)
    if not explicit:
      return out
    back = P(*jax.typeof(lead).sharding.spec[:1])  # the outputs' rows placed like the input's
    return jax.tree.map(lambda o: jax.reshard(o, back), out)
