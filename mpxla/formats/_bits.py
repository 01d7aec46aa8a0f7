"""float32 <-> E4M3 / E5M2 by integer bit arithmetic, equal bit for bit to `cast`/`upcast`.

A private fast path for code that converts large arrays inside bigger fused loops (the
optimizer-state codec): only integer and float ops, which XLA fuses and duplicates freely
(see docs/xla_cpu.md). Every constant comes from the `Format`; HiF8 has no such path.

  to_fp8:   |y| <= fmt.max (callers clip), round to nearest, ties to even;
            normal: round the float32 bits to m mantissa bits and rebias the
            exponent; subnormal (|y| < 2^emin): round(|y| / 2^(emin - m)).
  from_fp8: the exact float32 value of each code (no NaN/inf handling needed:
            callers never store them).
  floor_code / code_value / with_sign: the pieces of stochastic rounding. For t in
            [min_subnormal, max], floor_code(t) is the magnitude code c (0..max_code)
            of the largest value <= t, and c + 1 the next larger value (codes of one
            sign are ordered like their values).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from mpxla.formats.spec import Format, get_format


@functools.cache
def _spec(fmt: Format) -> tuple[int, int, int]:
  """(mantissa bits m, exponent bias, min normal exponent emin) of an IEEE-like format."""
  if not supports(fmt):
    raise ValueError(f"no bit-arithmetic path for fmt={fmt.name!r}; use mpxla.formats.cast")
  emin = int(math.log2(fmt.min_normal))
  return fmt.mantissa_bits, 1 - emin, emin


def supports(fmt: str | Format) -> bool:
  """Whether fmt has the bit-arithmetic path (the native float8 formats)."""
  return get_format(fmt).is_float8


def max_code(fmt: str | Format) -> int:
  """Magnitude code of fmt's largest finite value (E4M3 448: 0x7E, E5M2 57344: 0x7B)."""
  fmt = get_format(fmt)
  m, bias, _ = _spec(fmt)
  frac, exp = math.frexp(fmt.max)  # max = 2 frac * 2^(exp - 1), 2 frac in [1, 2)
  return ((exp - 1 + bias) << m) + int((2 * frac - 1) * (1 << m))


def to_fp8(y: jax.Array, fmt: str | Format) -> jax.Array:
  """float32 y with |y| <= max to fmt's storage dtype, round to nearest even (= cast)."""
  fmt = get_format(fmt)
  m, bias, emin = _spec(fmt)
  drop = 23 - m
  bits = jax.lax.bitcast_convert_type(y.astype(jnp.float32), jnp.uint32)
  sign = (bits >> 24) & 0x80
  a = bits & 0x7FFFFFFF
  normal = ((a + ((1 << (drop - 1)) - 1) + ((a >> drop) & 1)) >> drop) - ((127 - bias) << m)
  ay = jax.lax.bitcast_convert_type(a, jnp.float32)
  sub = jnp.round(ay * (2.0 ** (m - emin))).astype(jnp.uint32)  # Ties to even.
  code = jnp.where(a < ((127 + emin) << 23), sub, normal) | sign
  return jax.lax.bitcast_convert_type(code.astype(jnp.uint8), fmt.storage_dtype)


def from_fp8(codes: jax.Array, fmt: str | Format) -> jax.Array:
  """The float32 value of finite E4M3 / E5M2 codes (= codes.astype(float32))."""
  b = jax.lax.bitcast_convert_type(codes, jnp.uint8).astype(jnp.uint32)
  v = code_value(b & 0x7F, fmt)
  return jnp.where(b >= 0x80, -v, v)


def code_value(mag: jax.Array, fmt: str | Format) -> jax.Array:
  """The float32 value of magnitude codes (uint32, 0..max_code)."""
  m, bias, emin = _spec(get_format(fmt))
  normal = jax.lax.bitcast_convert_type((mag + ((127 - bias) << m)) << (23 - m), jnp.float32)
  sub = mag.astype(jnp.float32) * (2.0 ** (emin - m))
  return jnp.where(mag >= (1 << m), normal, sub)


def floor_code(t: jax.Array, fmt: str | Format) -> jax.Array:
  """Magnitude code (uint32) of the largest fmt value <= float32 t, for 0 <= t <= max."""
  m, bias, emin = _spec(get_format(fmt))
  a = jax.lax.bitcast_convert_type(t.astype(jnp.float32), jnp.uint32)
  normal = (a >> (23 - m)) - ((127 - bias) << m)  # Truncate the mantissa, rebias.
  sub = jnp.floor(t * (2.0 ** (m - emin))).astype(jnp.uint32)  # Exact: a power-of-2 scale.
  return jnp.where(a < ((127 + emin) << 23), sub, normal)


def with_sign(mag: jax.Array, negative: jax.Array, fmt: str | Format) -> jax.Array:
  """Codes in fmt's storage dtype from magnitude codes (uint32) and sign bits."""
  code = (mag | jnp.where(negative, 0x80, 0).astype(jnp.uint32)).astype(jnp.uint8)
  return jax.lax.bitcast_convert_type(code, get_format(fmt).storage_dtype)
