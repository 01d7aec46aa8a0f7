"""float32 <-> E4M3 / E5M2 by integer bit arithmetic, equal bit for bit to mpxla.formats.

XLA:CPU lowers float8 converts to code that keeps a large fused loop from being
vectorized; these versions use only integer and float ops that vectorize, and
XLA treats them as cheap (so they fuse and duplicate freely). They are used by
the optimizer-state codec; HiF8 goes through mpxla.formats.

  to_fp8:   |y| <= fmt.max (callers clip), round to nearest, ties to even;
            normal: round the float32 bits to m mantissa bits and rebias the
            exponent; subnormal (|y| < 2^emin): round(|y| / 2^(emin - m)).
  from_fp8: the exact float32 value of each code (no NaN/inf handling needed:
            the codec never stores them for finite groups).
  floor_code / code_value / with_sign: the pieces of stochastic rounding. For t in
            [min_subnormal, max], floor_code(t) is the magnitude code c (0..max code)
            of the largest value <= t, and c + 1 the next larger value (codes of one
            sign are ordered like their values).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# fmt name -> (mantissa bits, exponent bias, min normal exponent, storage dtype)
_SPECS = {
    "e4m3": (3, 7, -6, jnp.float8_e4m3fn),
    "e5m2": (2, 15, -14, jnp.float8_e5m2),
}
# fmt name -> magnitude code of the largest finite value (448 = 0x7E, 57344 = 0x7B).
MAX_CODE = {"e4m3": 0x7E, "e5m2": 0x7B}


def supports(fmt_name: str) -> bool:
  """Whether fmt has a bit-arithmetic fast path here."""
  return fmt_name in _SPECS


def to_fp8(y: jax.Array, fmt_name: str) -> jax.Array:
  """float32 y with |y| <= max to fmt's storage dtype, round to nearest even (= formats.cast)."""
  m, bias, emin, dtype = _SPECS[fmt_name]
  drop = 23 - m
  bits = jax.lax.bitcast_convert_type(y.astype(jnp.float32), jnp.uint32)
  sign = (bits >> 24) & 0x80
  a = bits & 0x7FFFFFFF
  normal = ((a + ((1 << (drop - 1)) - 1) + ((a >> drop) & 1)) >> drop) - ((127 - bias) << m)
  ay = jax.lax.bitcast_convert_type(a, jnp.float32)
  sub = jnp.round(ay * (2.0 ** (m - emin))).astype(jnp.uint32)  # Ties to even.
  code = jnp.where(a < ((127 + emin) << 23), sub, normal) | sign
  return jax.lax.bitcast_convert_type(code.astype(jnp.uint8), dtype)


def from_fp8(codes: jax.Array, fmt_name: str) -> jax.Array:
  """The float32 value of finite E4M3 / E5M2 codes (= codes.astype(float32))."""
  b = jax.lax.bitcast_convert_type(codes, jnp.uint8).astype(jnp.uint32)
  v = code_value(b & 0x7F, fmt_name)
  return jnp.where(b >= 0x80, -v, v)


def code_value(mag: jax.Array, fmt_name: str) -> jax.Array:
  """The float32 value of magnitude codes (uint32, 0..max code)."""
  m, bias, emin, _ = _SPECS[fmt_name]
  normal = jax.lax.bitcast_convert_type((mag + ((127 - bias) << m)) << (23 - m), jnp.float32)
  sub = mag.astype(jnp.float32) * (2.0 ** (emin - m))
  return jnp.where(mag >= (1 << m), normal, sub)


def floor_code(t: jax.Array, fmt_name: str) -> jax.Array:
  """Magnitude code (uint32) of the largest fmt value <= float32 t, for 0 <= t <= max."""
  m, bias, emin, _ = _SPECS[fmt_name]
  a = jax.lax.bitcast_convert_type(t.astype(jnp.float32), jnp.uint32)
  normal = (a >> (23 - m)) - ((127 - bias) << m)  # Truncate the mantissa, rebias.
  sub = jnp.floor(t * (2.0 ** (m - emin))).astype(jnp.uint32)  # Exact: a power-of-2 scale.
  return jnp.where(a < ((127 + emin) << 23), sub, normal)


def with_sign(mag: jax.Array, negative: jax.Array, fmt_name: str) -> jax.Array:
  """Codes in fmt's storage dtype from magnitude codes (uint32) and sign bits."""
  code = (mag | jnp.where(negative, 0x80, 0).astype(jnp.uint32)).astype(jnp.uint8)
  return jax.lax.bitcast_convert_type(code, _SPECS[fmt_name][3])
