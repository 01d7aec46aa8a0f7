"""Scaling granularities: which elements share one scale.

Every granularity is a *block shape*: the tensor is tiled by blocks (padded with
zeros up to whole blocks where a dimension is not a multiple) and each block gets
one scale. Zero padding never changes an amax, and it never reaches the caller:
codes keep the original shape, only the scale grid is rounded up.

  PerTensor()          one scale (block = the whole tensor)
  PerGroup(G, axis)    1xG: G contiguous elements along `axis` (default last)
  PerBlock((bm, bn))   bm x bn tiles over the last two axes (e.g. 128x128 weights)

Strings work too: 'tensor', '1x128' (= PerGroup(128)), '128x128' (= PerBlock).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P


@dataclasses.dataclass(frozen=True)
class PerTensor:
  """One scale for the whole tensor."""

  def block_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(max(d, 1) for d in shape)


@dataclasses.dataclass(frozen=True)
class PerGroup:
  """One scale per `size` contiguous elements along `axis`."""

  size: int
  axis: int = -1

  def __post_init__(self):
    if not isinstance(self.size, int) or self.size < 1:
      raise ValueError(f"PerGroup size must be a positive int, got size={self.size!r}.")

  def block_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
    if not shape:
      raise ValueError("PerGroup needs an array with at least one axis; got a scalar.")
    axis = _normalize_axis(self.axis, len(shape), "PerGroup axis")
    return tuple(self.size if i == axis else 1 for i in range(len(shape)))


@dataclasses.dataclass(frozen=True)
class PerBlock:
  """One scale per `shape` tile over the last two axes."""

  shape: tuple[int, int]

  def __post_init__(self):
    if len(self.shape) != 2 or any(not isinstance(b, int) or b < 1 for b in self.shape):
      raise ValueError(f"PerBlock shape must be two positive ints, got shape={self.shape!r}.")

  def block_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
    if len(shape) < 2:
      raise ValueError(
          f"PerBlock{self.shape} needs an array with >= 2 axes, got shape {shape}; "
          "use PerGroup for vectors."
      )
    return (1,) * (len(shape) - 2) + tuple(self.shape)


Granularity = PerTensor | PerGroup | PerBlock


def _normalize_axis(axis: int, ndim: int, what: str) -> int:
  if not -ndim <= axis < ndim:
    raise ValueError(f"{what}={axis} is out of range for an array with {ndim} axes.")
  return axis % ndim


def as_granularity(g: str | Granularity) -> Granularity:
  """Parses 'tensor', '1xG' or 'BMxBN' (or passes a granularity object through)."""
  if isinstance(g, PerTensor | PerGroup | PerBlock):
    return g
  if isinstance(g, str):
    s = g.strip().lower()
    if s in ("tensor", "per_tensor"):
      return PerTensor()
    parts = s.split("x")
    if len(parts) == 2 and all(p.isdigit() for p in parts):
      bm, bn = int(parts[0]), int(parts[1])
      return PerGroup(bn) if bm == 1 else PerBlock((bm, bn))
  raise ValueError(
      f"granularity={g!r} is not understood; use 'tensor', '1xG' (e.g. '1x128'), "
      "'BMxBN' (e.g. '128x128'), or PerTensor()/PerGroup(G, axis)/PerBlock((bm, bn))."
  )


def grid_shape(shape: tuple[int, ...], granularity: Granularity) -> tuple[int, ...]:
  """Blocks per axis: ceil(dim / block)."""
  block = granularity.block_shape(shape)
  return tuple(math.ceil(d / b) if d else 0 for d, b in zip(shape, block, strict=True))


def scale_shape(shape: tuple[int, ...], granularity: Granularity) -> tuple[int, ...]:
  """Shape of the scales: the block grid, or () for per-tensor scaling."""
  return () if isinstance(granularity, PerTensor) else grid_shape(shape, granularity)


def to_blocks(x: jax.Array, granularity: Granularity) -> jax.Array:
  """Zero-pads x to whole blocks and returns it as [n0, b0, n1, b1, ...]."""
  block = granularity.block_shape(x.shape)
  grid = grid_shape(x.shape, granularity)
  pad = [(0, n * b - d, 0) for d, n, b in zip(x.shape, grid, block, strict=True)]
  if any(p[1] for p in pad):
    x = jax.lax.pad(x, jnp.zeros((), x.dtype), pad)
  new_shape = tuple(v for n, b in zip(grid, block, strict=True) for v in (n, b))
  return jax.lax.reshape(x, new_shape, out_sharding=_blocked_sharding(x, grid, block))


def _blocked_sharding(x: jax.Array, grid, block) -> NamedSharding:
  """Where a sharded axis goes in the [n0, b0, ...] view (explicit-sharding meshes).

  Shards of whole blocks keep the mesh axes on n_i; a single block spanning the
  shards (e.g. per-tensor) keeps them on b_i. Anything else cannot be expressed.
  """
  sharding = jax.typeof(x).sharding
  spec = tuple(sharding.spec) + (None,) * (x.ndim - len(sharding.spec))
  out = []
  for i, (s, n, b) in enumerate(zip(spec, grid, block, strict=True)):
    names = () if s is None else (s,) if isinstance(s, str) else tuple(s)
    ways = 1
    for name in names:
      ways *= sharding.mesh.shape[name]
    if ways == 1 or n % ways == 0:
      out += [s, None]
    elif n == 1 and b % ways == 0:
      out += [None, s]
    else:
      raise ValueError(
          f"axis {i} of size {x.shape[i]} is split {ways} ways over mesh axes {s!r}, so its "
          f"shards are not whole blocks of {b}: pick a group/block size that divides the "
          f"shard size {x.shape[i] // ways}, or shard another axis."
      )
  return NamedSharding(sharding.mesh, P(*out))


def from_blocks(xb: jax.Array, like: jax.Array) -> jax.Array:
  """Inverse of `to_blocks`: merges [n0, b0, ...] back to `like`'s shape and sharding."""
  ndim = like.ndim
  padded = tuple(xb.shape[2 * i] * xb.shape[2 * i + 1] for i in range(ndim))
  # Explicit-sharding meshes need the merged layout spelled out; it is `like`'s.
  x = jax.lax.reshape(xb, padded, out_sharding=jax.typeof(like).sharding)
  if padded != tuple(like.shape):
    x = x[tuple(slice(0, d) for d in like.shape)]
  return x


def block_axes(ndim: int) -> tuple[int, ...]:
  """The within-block axes of a `to_blocks` view (1, 3, 5, ...)."""
  return tuple(2 * i + 1 for i in range(ndim))


def expand_scales(scales: jax.Array, shape: tuple[int, ...], granularity: Granularity):
  """Scales -> [n0, 1, n1, 1, ...], to broadcast against `to_blocks` of an array of `shape`."""
  if isinstance(granularity, PerTensor):  # one scale, also for a zero-size array
    return scales.reshape((1,) * (2 * len(shape)))
  grid = scales.reshape(grid_shape(shape, granularity))
  return jnp.expand_dims(grid, block_axes(len(shape)))
