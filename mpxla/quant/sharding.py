"""Mesh axes as seen by code that must work under `jit` and inside `shard_map` alike.

Manual axes (`shard_map`): `varying_axes(x)` names the axes over which x differs between
devices (JAX's varying-axes tracking), `match_varying(*arrays)` makes arrays vary alike, as
a custom VJP needs.

Explicit axes (JAX's default for `jax.make_mesh`): code that regroups a sharded axis (a
reshape that splits or merges it: statistic groups, attention blocks) has no
sharding-in-types rule for it. `auto_regroup` runs such code with the mesh axes turned Auto
(`jax.sharding.auto_axes`), and `input_mesh` supplies the mesh from the input's type when no
`jax.set_mesh` context is set.

Shared by mpxla.nn, mpxla.parallel and mpxla.attention.
"""

from __future__ import annotations

import contextlib

import jax
from jax.sharding import AxisType


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
