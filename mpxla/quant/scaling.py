"""Amax and scales: just-in-time (current amax) and delayed (amax history).

A scale s maps the block's amax onto the format's `scale_target` (its max for
E4M3/E5M2; 15 for HiF8, see `mpxla.formats.Format`), with 2^margin headroom:

    s = amax * 2^margin / fmt.scale_target,     codes = cast(x * (1/s)),     x ~= codes * s

Edge cases (documented results, never a silent NaN or a zero/inf scale):
  * amax == 0 (an all-zero block): s = 1, so codes and the dequantized block are 0.
  * a zero-size array: amax 0 and s = 1 on the scale grid (shape () per tensor), codes
    and the dequantized array are empty arrays of x's shape.
  * amax so small that s would underflow: s is raised to the smallest normal float32.
  * amax inf or NaN (the block holds inf/NaN): s = NaN, so the whole block
    dequantizes to NaN and `QTensor.all_finite()` is False: the bad input shows.

Under `jax.jit` a reduction over a sharded array is already global. Inside
`shard_map`, pass `axis_name` (a mesh axis or tuple of axes) to take the max over
the devices as well (per-tensor scaling only: groups and blocks never straddle
devices when the shard sizes are whole blocks).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mpxla.formats import Format, get_format
from mpxla.quant.granularity import (
    Granularity,
    PerTensor,
    as_granularity,
    block_axes,
    scale_shape,
    to_blocks,
)

_TINY = float(np.finfo(np.float32).tiny)


def amax(
    x: jax.Array,
    granularity: str | Granularity = "tensor",
    *,
    axis_name: str | Sequence[str] | None = None,
) -> jax.Array:
  """Max |x| per block, float32 of the scales' shape (inf if the block holds inf or NaN)."""
  g = as_granularity(granularity)
  # An amax sets a scale; it carries no gradient (and pmax has no differentiation rule).
  x = jnp.abs(jax.lax.stop_gradient(x)).astype(jnp.float32)
  # NaN counts as inf: XLA:CPU's vectorized max may drop a NaN, never an inf (docs/xla_cpu.md).
  if x.size == 0:  # the max of nothing: 0 (scale 1), on the scale grid
    a = jnp.zeros(scale_shape(x.shape, g), jnp.float32)
  else:
    xb = to_blocks(jnp.where(jnp.isnan(x), jnp.inf, x), g)
    a = jnp.max(xb, axis=block_axes(x.ndim)).reshape(scale_shape(x.shape, g))
  if axis_name is not None:
    if not isinstance(g, PerTensor):
      raise ValueError(
          f"axis_name={axis_name!r} is only meaningful with per-tensor scaling, not {g}: "
          "groups and blocks are local to a device when shards are whole blocks."
      )
    a = jax.lax.pmax(a, axis_name)
  return a


MAX_MARGIN = 40  # beyond it every value flushes to 0 (margin > 0) or saturates, in any format


def check_margin(margin) -> None:
  """Raises ValueError unless a concrete `margin` is finite and within +-MAX_MARGIN.

  A traced margin (an argument of a jitted function) is not checked: a non-finite one gives
  NaN scales, so `QTensor.all_finite()` is False.
  """
  if isinstance(margin, jax.core.Tracer):
    return
  m = np.asarray(margin)
  if m.shape or not np.issubdtype(m.dtype, np.number) or not abs(float(m)) <= MAX_MARGIN:
    raise ValueError(
        f"margin={margin!r} must be a finite number of powers of two within +-{MAX_MARGIN}: "
        "beyond that every value flushes to zero (margin > 0) or saturates (margin < 0). "
        "Typical margins are 0 to 2.")


def scale_from_amax(amax_: jax.Array, fmt: str | Format, margin: float = 0.0) -> jax.Array:
  """s = amax * 2^margin / fmt.scale_target, with the edge cases of the module docstring.

  `margin`: see `check_margin` (ValueError for a concrete non-finite or huge margin).
  """
  check_margin(margin)
  fmt = get_format(fmt)
  amax_ = jnp.asarray(amax_, jnp.float32)
  s = amax_ * jnp.float32(2.0**margin / fmt.scale_target)
  s = jnp.where(amax_ > 0, jnp.maximum(s, _TINY), 1.0)
  return jnp.where(jnp.isfinite(amax_), s, jnp.nan).astype(jnp.float32)


# Delayed scaling: the scale of step t comes from the amaxes of steps t-L .. t-1.


def init_amax_history(length: int, shape: tuple[int, ...] = ()) -> jax.Array:
  """A zero amax history of `length` steps (index 0 is the newest)."""
  if length < 1:
    raise ValueError(f"length must be >= 1, got length={length}.")
  return jnp.zeros((length, *shape), jnp.float32)


def update_amax_history(history: jax.Array, new_amax: jax.Array) -> jax.Array:
  """Pushes `new_amax` in front and drops the oldest entry."""
  new_amax = jnp.asarray(new_amax, jnp.float32)
  if new_amax.shape != history.shape[1:]:
    raise ValueError(
        f"new_amax has shape {new_amax.shape}, but the history holds shape {history.shape[1:]}."
    )
  return jnp.concatenate([new_amax[None], history[:-1]], axis=0)


def amax_from_history(history: jax.Array) -> jax.Array:
  """The amax a delayed scale uses: the max over the history (0 while empty)."""
  return jnp.max(history, axis=0)
