"""Casts to the OCP FP8 formats E4M3 (`float8_e4m3fn`) and E5M2 (`float8_e5m2`).

Rounding:
  'nearest'     round to nearest, ties to even (XLA's convert, checked bit for bit
                against the format's spec in the tests).
  'stochastic'  round |x| down or up to a neighbouring representable value with
                probability proportional to proximity, E[cast(x)] = x (up to 2^-24 ulp),
                from an explicit PRNG key.

Saturation: with `saturate=True` (the default) x is clipped to [-max, max] before
rounding, so overflow and ±inf give ±max; NaN stays NaN. With `saturate=False`
overflow follows the format: E5M2 gives ±inf, E4M3 (no inf) gives NaN.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mpxla.formats.spec import Format


def _check_float(x: jax.Array, name: str = "x") -> jax.Array:
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(
        f"{name} must be a floating-point array, got dtype {x.dtype}; "
        f"convert it first, e.g. {name}.astype(jnp.float32)."
    )
  return x


def _exponent(a_f32: jax.Array) -> jax.Array:
  """floor(log2(a)) for positive normal float32 a (int32); -127 for 0/subnormals."""
  bits = jax.lax.bitcast_convert_type(a_f32, jnp.int32)
  return (bits >> 23) - 127


def _stochastic_round(x: jax.Array, fmt: Format, key: jax.Array) -> jax.Array:
  """Rounds float32 x to `fmt`'s grid stochastically; returns float32 on the grid."""
  a = jnp.abs(x)
  emin = int(round(jnp.log2(fmt.min_normal)))
  e = jnp.maximum(_exponent(a), emin)
  # Target spacing at a: 2^(e - mantissa_bits); scaling by it is exact in float32.
  inv_ulp = jax.lax.bitcast_convert_type(
      (127 - (e - fmt.mantissa_bits)) << 23, jnp.float32
  )
  t = a * inv_ulp
  lo = jnp.floor(t)
  u = (jax.random.bits(key, x.shape, jnp.uint32) >> 8).astype(jnp.float32) * 2.0**-24
  up = u < (t - lo)
  r = (lo + up.astype(jnp.float32)) / inv_ulp
  return jnp.where(jnp.isfinite(a), jnp.copysign(r, x), x)


def cast_fp8(
    x: jax.Array,
    fmt: Format,
    *,
    rounding: str = "nearest",
    key: jax.Array | None = None,
    saturate: bool = True,
) -> jax.Array:
  """Casts x to E4M3 or E5M2 storage (see module docstring)."""
  x = _check_float(x)
  if saturate:
    x = jnp.clip(x, -fmt.max, fmt.max)  # NaN passes through unchanged.
  if rounding == "stochastic":
    x = _stochastic_round(x.astype(jnp.float32), fmt, key)
  return x.astype(fmt.storage_dtype)
