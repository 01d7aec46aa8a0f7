"""`QTensor`: an 8-bit tensor with its scales, as a pytree.

    q = quantize(x, 'e4m3', '1x128')     # codes [*x.shape] + scales [..., ceil(n/128)]
    y = dequantize(q)                    # x's shape and dtype, |y - x| within one rounding

The codes keep x's shape (so they shard like x); the scales live on the
granularity's grid. Format, granularity, shape and dtype are static metadata, so
a QTensor passes through jit, vmap, shard_map and Orbax checkpoints as two arrays.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mpxla.formats import Format, cast, float_dtype, get_format, upcast
from mpxla.quant.granularity import (
    Granularity,
    as_granularity,
    expand_scales,
    from_blocks,
    scale_shape,
    to_blocks,
)
from mpxla.quant.scaling import amax as compute_amax
from mpxla.quant.scaling import scale_from_amax


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QTensor:
  """Codes (x's shape, the format's storage dtype) and float32 scales (block grid; () per tensor)."""

  codes: jax.Array
  scales: jax.Array
  fmt: Format = dataclasses.field(metadata=dict(static=True))
  granularity: Granularity = dataclasses.field(metadata=dict(static=True))
  shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
  dtype: np.dtype = dataclasses.field(metadata=dict(static=True))

  def all_finite(self) -> jax.Array:
    """False if any block held inf or NaN (its scale is NaN)."""
    return jnp.all(jnp.isfinite(scale_values(self)))

  @property
  def nbytes(self) -> int:
    """Bytes of codes and scales."""
    return int(self.codes.size * self.codes.dtype.itemsize
               + self.scales.size * self.scales.dtype.itemsize)


def scale_values(q: QTensor) -> jax.Array:
  """q's scales as float32: as stored, or decoded from uint8 E8M0 codes (MX, `quant.mx`)."""
  if q.scales.dtype != jnp.uint8:
    return q.scales
  s = q.scales.astype(jnp.int32)  # 2^(s - 127); 0xFF is NaN; s = 0 is the subnormal 2^-127
  v = jax.lax.bitcast_convert_type(jnp.where(s == 0, 0x00400000, s << 23), jnp.float32)
  return jnp.where(s == 0xFF, jnp.nan, v)


def quantize(
    x: jax.Array,
    fmt: str | Format = "e4m3",
    granularity: str | Granularity = "tensor",
    *,
    amax: jax.Array | None = None,
    margin: float = 0.0,
    rounding: str = "nearest",
    key: jax.Array | None = None,
    axis_name: str | Sequence[str] | None = None,
) -> QTensor:
  """Scales x per block and casts it to `fmt` (saturating).

  Args:
    x: floating-point array.
    fmt: 'e4m3', 'e5m2', 'hif8' or a `Format`.
    granularity: 'tensor', '1xG', 'BMxBN' or a granularity object.
    amax: precomputed amax on the scale grid (delayed scaling, e.g.
      `amax_from_history(h)`); blocks whose given amax is 0 (an empty history) use
      their current amax. Values above the given amax saturate. None: current amax.
      A concrete amax must be finite (ValueError); a traced inf/NaN gives NaN scales
      (`QTensor.all_finite()` is False).
    margin: headroom in powers of two (s = amax * 2^margin / fmt.scale_target); a finite
      number within +-40 (ValueError otherwise; traced values are not checked).
    rounding, key: as in `mpxla.formats.cast`.
    axis_name: mesh axes to take the amax over inside shard_map (per-tensor only).
  """
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(
        f"quantize needs a floating-point x, got dtype {x.dtype}; integers carry no "
        "scale to quantize: convert with x.astype(jnp.float32) if that is meant."
    )
  fmt, g = get_format(fmt), as_granularity(granularity)
  if amax is None:
    amax = compute_amax(x, g, axis_name=axis_name)
  else:
    if not isinstance(amax, jax.core.Tracer) and not np.all(np.isfinite(np.asarray(amax))):
      raise ValueError(
          f"amax must be finite, got {amax!r}: an inf or NaN amax gives NaN scales. Pass the "
          "amax of finite data (e.g. amax_from_history of finite steps), or 0 to use the "
          "current amax.")
    amax = jnp.asarray(amax, jnp.float32)
    grid = scale_shape(tuple(x.shape), g)
    if amax.shape != grid:
      raise ValueError(
          f"amax has shape {amax.shape}, but {g} on x of shape {x.shape} needs "
          f"the scale-grid shape {grid}."
      )
    amax = jnp.where(amax > 0, amax, compute_amax(x, g, axis_name=axis_name))
  return quantize_with_amax(x, fmt, g, amax, margin=margin, rounding=rounding, key=key)


def quantize_with_amax(
    x: jax.Array,
    fmt: str | Format,
    granularity: str | Granularity,
    amax: jax.Array,
    *,
    margin: float = 0.0,
    rounding: str = "nearest",
    key: jax.Array | None = None,
) -> QTensor:
  """`quantize` with `amax` (on the scale grid) used as it is: no reduction over x.

  For callers that already hold the amax (FP8 matmuls, group-derived amaxes, delayed
  scaling with its own fallback). amax 0 gives scale 1 (zero codes), a non-finite amax NaN
  scales; nothing is checked against x, and values above the amax saturate.
  """
  fmt, g = get_format(fmt), as_granularity(granularity)
  scales = scale_from_amax(amax, fmt, margin)
  # x * (1/s), written out: what XLA makes of x / broadcast(s) anyway (docs/xla_cpu.md), so
  # the codes are defined by this line on every backend.
  xb = to_blocks(x.astype(jnp.float32), g) * (1.0 / expand_scales(scales, x.shape, g))
  codes = cast(from_blocks(xb, x), fmt, rounding=rounding, key=key, saturate=True)
  return QTensor(codes, scales, fmt, g, tuple(x.shape), np.dtype(x.dtype))


def dequantize(q: QTensor, dtype=None) -> jax.Array:
  """codes * scales, as `dtype` (a floating dtype; default: the original dtype)."""
  dtype = q.dtype if dtype is None else float_dtype(dtype)
  values = to_blocks(upcast(q.codes, q.fmt, jnp.float32), q.granularity)
  x = from_blocks(values * expand_scales(scale_values(q), q.shape, q.granularity), q.codes)
  return x.astype(dtype)


def scales_shape(shape: tuple[int, ...], granularity: str | Granularity) -> tuple[int, ...]:
  """Shape of the scales `quantize` makes for an array of `shape`."""
  return scale_shape(tuple(shape), as_granularity(granularity))
