"""Global metrics: loss, token counts, gradient norm, weighted means over the global batch.

All functions follow mpxla.parallel.stats: under `jax.jit` with global arrays leave
`axis_name=None` (reductions are global); inside `shard_map` pass the batch axes and the
result is the global value on every device. Padding is handled by weights/masks, never by
dividing by the padded size, so means are right for uneven per-host data (each host pads
its rows to the same size and masks the padding).

Across processes outside jit (e.g. an evaluation loop on host numpy values), accumulate an
`Average` per process and combine with `Average.across_processes()`.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from mpxla.parallel.stats import AxisName, axis_names, batch_view, check_global, weighted
from mpxla.quant.sharding import varying_axes


def weighted_mean(
    values: jax.Array, weights: jax.Array | None = None, *, axis_name: AxisName = None
) -> jax.Array:
  """sum(w * v) / sum(w) over every element of the global batch (float32).

  `weights` broadcasts to `values` (a 0/1 padding mask, or token counts). The total
  weight 0 (everything padded) gives 0, not NaN. One collective of 2 floats.
  """
  check_global(values, axis_name, "weighted_mean")
  v = jnp.asarray(values, jnp.float32)
  w = jnp.ones_like(v) if weights is None else jnp.broadcast_to(
      jnp.asarray(weights, jnp.float32), v.shape)
  sw = jnp.stack([jnp.sum(weighted(v, w)), jnp.sum(w)])
  manual = batch_view(axis_name).manual
  if manual:
    sw = jax.lax.psum(sw, manual)
  return jnp.where(sw[1] > 0, sw[0] / jnp.where(sw[1] > 0, sw[1], 1.0), 0.0)


def count(mask: jax.Array, *, axis_name: AxisName = None) -> jax.Array:
  """Number of true (nonzero) entries of `mask` in the global batch, int32 (e.g. tokens)."""
  check_global(mask, axis_name, "count")
  c = jnp.sum(jnp.asarray(mask) != 0, dtype=jnp.int32)
  manual = batch_view(axis_name).manual
  return jax.lax.psum(c, manual) if manual else c


def global_norm(tree: Any, *, axis_name: AxisName = None) -> jax.Array:
  """sqrt(sum of squares of every leaf), float32, over sharded leaves too.

  Under jit: optax.global_norm in float32. Inside `shard_map` each leaf's local sum of
  squares is summed over the mesh axes the leaf is split over (FSDP/tensor shards), read
  from JAX's varying-axes tracking; with `shard_map(check_vma=False)` pass `axis_name`,
  the axes every leaf is split over. Pass reduced (already averaged) gradients.
  """
  leaves = jax.tree.leaves(tree)
  if not leaves:
    return jnp.float32(0.0)
  explicit = axis_names(axis_name)
  total = jnp.float32(0.0)
  for leaf in leaves:
    sq = jnp.sum(jnp.square(jnp.asarray(leaf, jnp.float32)))
    axes = tuple(sorted(varying_axes(leaf))) if not explicit else batch_view(explicit).manual
    total = total + (jax.lax.psum(sq, axes) if axes else sq)
  return jnp.sqrt(total)


@flax.struct.dataclass
class Average:
  """A weighted mean under construction: sum(w * v) and sum(w), float32 (a pytree).

  Merge partial averages from steps, devices or hosts in any order; `compute()` at the end.
  """

  total: jax.Array
  weight: jax.Array

  @classmethod
  def empty(cls) -> Average:
    return cls(jnp.float32(0.0), jnp.float32(0.0))

  @classmethod
  def from_values(cls, values, weights=None) -> Average:
    v = jnp.asarray(values, jnp.float32)
    w = jnp.ones_like(v) if weights is None else jnp.broadcast_to(
        jnp.asarray(weights, jnp.float32), v.shape)
    return cls(jnp.sum(weighted(v, w)), jnp.sum(w))

  def merge(self, other: Average) -> Average:
    return Average(self.total + other.total, self.weight + other.weight)

  def psum(self, axis_name: AxisName) -> Average:
    """Sums over the batch axes inside `shard_map` (a no-op in a global view)."""
    manual = batch_view(axis_name).manual
    if not manual:
      return self
    s = jax.lax.psum(jnp.stack([self.total, self.weight]), manual)
    return Average(s[0], s[1])

  def across_processes(self) -> Average:
    """Sums host-local averages over all processes (outside jit; one small all-gather)."""
    if jax.process_count() == 1:
      return self
    from jax.experimental import multihost_utils

    both = np.asarray(multihost_utils.process_allgather(
        np.stack([np.float32(self.total), np.float32(self.weight)])))
    return Average(jnp.float32(both[:, 0].sum()), jnp.float32(both[:, 1].sum()))

  def compute(self) -> jax.Array:
    """total / weight; 0 when the weight is 0 (everything padded)."""
    return jnp.where(self.weight > 0, self.total / jnp.where(self.weight > 0, self.weight, 1.0),
                     0.0)
