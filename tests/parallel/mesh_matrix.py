"""The mesh matrix: how users run the library on 8 devices (docs/parallel.md, "Meshes").

A cell is a mesh made with `jax.make_mesh` ((8,) over 'data', or (2, 4) over 'data' x 'fsdp',
the batch split over every axis), its axis types (Auto or Explicit, JAX's default), whether
the call runs under `jax.set_mesh(mesh)`, and the view: `jax.jit` on inputs placed with
`jax.device_put(x, NamedSharding(mesh, spec))`, or a `jax.shard_map` body (inputs placed
the same way). `Cell.run` calls one function the same way in every cell, so a test compares
each cell with the single-device full-batch result.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools

import jax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

MESHES = {"8": ((8,), ("data",)), "2x4": ((2, 4), ("data", "fsdp"))}


@dataclasses.dataclass(frozen=True)
class Cell:
  mesh_name: str
  axis_type: str  # 'auto' | 'explicit'
  set_mesh: bool
  view: str  # 'jit' | 'shard_map'

  @property
  def axes(self) -> tuple[str, ...]:
    """The mesh axes, all of them batch axes."""
    return MESHES[self.mesh_name][1]

  @property
  def manual(self) -> tuple[str, ...] | None:
    """`axis_name` for functions that take it only inside shard_map (quant, FP8 dots)."""
    return self.axes if self.view == "shard_map" else None

  def mesh(self) -> jax.sharding.Mesh:
    shape, names = MESHES[self.mesh_name]
    kind = AxisType.Auto if self.axis_type == "auto" else AxisType.Explicit
    return jax.make_mesh(shape, names, (kind,) * len(names), devices=jax.devices()[:8])

  def run(self, f, args, in_specs, out_specs):
    """f(*args) in this cell; in_specs/out_specs: PartitionSpec pytree prefixes of args/outputs.

    Under jit the outputs' specs only serve shard_map; the results come back as arrays.
    """
    mesh = self.mesh()
    with jax.set_mesh(mesh) if self.set_mesh else contextlib.nullcontext():
      placed = jax.tree.map(lambda s, a: jax.device_put(a, NamedSharding(mesh, s)), in_specs,
                            args, is_leaf=lambda s: isinstance(s, P))
      if self.view == "shard_map":
        f = jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs)
      return jax.device_get(jax.jit(f)(*placed))

  def __str__(self):
    return f"{self.mesh_name}-{self.axis_type}-{'set_mesh' if self.set_mesh else 'no_mesh'}-{self.view}"


def cells():
  """Every cell of the matrix as pytest params (ids like '2x4-explicit-no_mesh-jit'), all in
  the default tier (about 30 s of the tier for the 8-device cells on 2 cores)."""
  out = []
  for m, t, s, v in itertools.product(MESHES, ("auto", "explicit"), (True, False),
                                      ("jit", "shard_map")):
    c = Cell(m, t, s, v)
    out.append(pytest.param(c, id=str(c)))
  return out
