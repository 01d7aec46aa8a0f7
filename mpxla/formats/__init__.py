"""8-bit number formats and exact casts.

`cast(x, fmt)` stores x in an 8-bit format; `upcast(y, fmt)` reads it back.

| fmt    | storage               | max   | min normal | min subnormal | mantissa bits | inf |
|--------|-----------------------|-------|------------|---------------|---------------|-----|
| 'e4m3' | float8_e4m3fn         | 448   | 2^-6       | 2^-9          | 3             | no  |
| 'e5m2' | float8_e5m2           | 57344 | 2^-14      | 2^-16         | 2             | yes |
| 'hif8' | uint8 codes (`hif8`)  | 32768 | 2^-15      | 2^-22         | 3 / 2 / 1     | yes |
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mpxla.formats import hif8
from mpxla.formats.fp8 import cast_fp8
from mpxla.formats.spec import E4M3, E5M2, FORMATS, HIF8, Format, float_dtype, get_format

__all__ = [
    "E4M3",
    "E5M2",
    "FORMATS",
    "HIF8",
    "Format",
    "cast",
    "float_dtype",
    "fake_cast",
    "get_format",
    "hif8",
    "upcast",
]

_ROUNDINGS = ("nearest", "stochastic")
_HIF8_ROUNDINGS = {"nearest": "ta", "ta": "ta", "hybrid": "hybrid", "stochastic": "stochastic"}


def cast(
    x: jax.Array,
    fmt: str | Format,
    *,
    rounding: str = "nearest",
    key: jax.Array | None = None,
    saturate: bool = True,
) -> jax.Array:
  """Casts x to the 8-bit format `fmt`, returning its storage array.

  Args:
    x: floating-point array (float32, bfloat16, float16, ...).
    fmt: 'e4m3', 'e5m2', 'hif8' or a `Format`.
    rounding: 'nearest' (E4M3/E5M2: ties to even; HiF8: ties away, i.e. 'ta') or
      'stochastic' (unbiased; needs `key`). HiF8 also takes 'ta' and 'hybrid'.
    key: PRNG key, required by 'stochastic' and refused otherwise.
    saturate: clip to ±max (±inf gives ±max). If False, overflow gives inf (E5M2,
      HiF8) or NaN (E4M3, which has no inf). NaN stays NaN either way.

  Returns:
    float8_e4m3fn / float8_e5m2 array, or uint8 HiF8 codes, of x's shape.
  """
  fmt = get_format(fmt)
  if fmt is HIF8 or fmt.name == "hif8":
    if rounding not in _HIF8_ROUNDINGS:
      raise ValueError(
          f"rounding={rounding!r} is not valid for hif8; use one of {sorted(_HIF8_ROUNDINGS)}."
      )
    return hif8.encode(x, _HIF8_ROUNDINGS[rounding], saturate, key=key)
  if rounding not in _ROUNDINGS:
    raise ValueError(f"rounding={rounding!r} is not valid for {fmt.name}; use one of {_ROUNDINGS}.")
  if (rounding == "stochastic") != (key is not None):
    raise ValueError(
        "rounding='stochastic' needs key=jax.random.key(...); other roundings take no key "
        f"(got rounding={rounding!r}, key={'None' if key is None else 'given'})."
    )
  return cast_fp8(x, fmt, rounding=rounding, key=key, saturate=saturate)


def upcast(y: jax.Array, fmt: str | Format, dtype=jnp.float32) -> jax.Array:
  """Reads an 8-bit storage array back as `dtype` (floating; exact for float32)."""
  fmt, dtype = get_format(fmt), float_dtype(dtype)
  if fmt.name == "hif8":
    return hif8.decode(y, dtype)
  y = jnp.asarray(y)
  if y.dtype != fmt.storage_dtype:
    raise TypeError(f"y has dtype {y.dtype}, but fmt={fmt.name!r} is stored as {fmt.storage_dtype}.")
  return y.astype(dtype)


def fake_cast(x: jax.Array, fmt: str | Format, **kwargs) -> jax.Array:
  """Rounds x to the values of `fmt`, keeping x's dtype: upcast(cast(x, fmt), fmt)."""
  x = jnp.asarray(x)
  return upcast(cast(x, fmt, **kwargs), fmt, x.dtype)
