"""HiF8 (Huawei HiFloat8, arXiv 2409.16626) stored as uint8 codes.

A code is `S | Dot | Em | M`: sign, a prefix code for the exponent width D,
a D-bit sign-magnitude exponent with hidden leading magnitude 1
(|E| = 2^(D-1) + low D-1 bits; top bit 1 means E < 0) and a mantissa with a
hidden leading 1. Normal values are (-1)^S * 2^E * 1.M:

  Dot   D  exponents E       mantissa bits
  11    4  +-8 .. +-15       1
  10    3  +-4 .. +-7        2
  01    2  +-2, +-3          3
  001   1  +-1               3
  0001  0  0                 3
  0000  -  denormal: 2^(M-23), M = 1..7 (2^-22 .. 2^-16)

Specials: 0x00 is the only zero, 0x80 the only NaN, 0x6F / 0xEF (nominally
+-1.5*2^15) are +-Inf. Largest finite 0x6E = 32768, smallest normal
0x7E = 2^-15, smallest positive 0x01 = 2^-22.

Rounding modes (e = floor(log2|x|) of the float32 input):
- 'ta': round to nearest, ties away from zero; in the denormal band
  (e in [-22, -16]) the tie point is the midpoint 1.5*2^e; [2^-23, 2^-22)
  gives 2^-22.
- 'hybrid' (backward passes): 'ta' where |e| < 4 and for e >= 15; elsewhere
  input-derived stochastic rounding: F = top 14 discarded bits,
  T = lowest 14 bits of the float32 mantissa, round up one ulp iff F > T.
  Strict > keeps exactly representable inputs (F = T = 0) exact; for e = -23
  F = top 14 bits of the fraction of x / 2^-22, neighbours 0 and 2^-22.
- 'stochastic' (needs `key`): for e in [-23, 14], round up iff R < discarded
  bits with R uniform in [0, 2^shift), so E[decode(encode(x))] == x; e >= 15
  as 'ta'.
All modes: |x| < 2^-23 (incl. float32 subnormals) gives 0; a rounded
magnitude >= 40960 (and +-Inf input) gives +-Inf, or +-32768 with
saturate=True; [32768, 40960) gives +-32768; NaN gives 0x80 (whatever
saturate); -0.0 and negatives that round to zero give 0x00, never 0x80.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from mpxla.formats.spec import float_dtype

NAN_CODE = 0x80
POS_INF_CODE = 0x6F
NEG_INF_CODE = 0xEF
MAX_CODE = 0x6E

ROUNDING_MODES = ("ta", "hybrid", "stochastic")

_F32_INF_BITS = 0x7F800000
_F32_OVERFLOW_BITS = 0x47200000  # 40960.0: rounded magnitudes from here on overflow.
_F32_MIN_SUB_BITS = 0x34800000  # 2**-22, the smallest positive HiF8 value.


def _decode_code(code: int) -> float:
  """Value of one HiF8 code, from its bit fields."""
  if code == 0:
    return 0.0
  if code == NAN_CODE:
    return float("nan")
  sign = -1.0 if code & 0x80 else 1.0
  b = code & 0x7F
  if b == POS_INF_CODE:
    return sign * float("inf")
  if b >> 5 == 0b11:
    d, m = 4, 1
  elif b >> 5 == 0b10:
    d, m = 3, 2
  elif b >> 5 == 0b01:
    d, m = 2, 3
  elif b >> 4 == 0b001:
    d, m = 1, 3
  elif b >> 3 == 0b0001:
    d, m = 0, 3
  else:
    return sign * 2.0 ** ((b & 0x7) - 23)
  mant = b & ((1 << m) - 1)
  e = 0
  if d:
    em = (b >> m) & ((1 << d) - 1)
    mag = (1 << (d - 1)) + (em & ((1 << (d - 1)) - 1))
    e = -mag if em >> (d - 1) else mag
  return sign * 2.0**e * (1.0 + mant / 2**m)


@functools.cache
def _table() -> np.ndarray:
  """The cached read-only [256] float32 decode table."""
  table = np.array([_decode_code(c) for c in range(256)], dtype=np.float32)
  table.flags.writeable = False
  return table


def decode_table() -> np.ndarray:
  """Returns the [256] float32 table of HiF8 code values (read-only)."""
  return _table()


def decode(codes: jax.Array, dtype: jnp.dtype = jnp.float32) -> jax.Array:
  """Decodes uint8 HiF8 codes to values of `dtype` (a floating dtype; TypeError otherwise)."""
  dtype = float_dtype(dtype)
  codes = jnp.asarray(codes)
  if codes.dtype != jnp.uint8:
    raise TypeError(f"codes must have dtype uint8, got {codes.dtype}.")
  table = jnp.asarray(_table())
  # The gather's output is laid out like the codes (needed on explicit-sharding meshes).
  values = table.at[codes.astype(jnp.int32)].get(out_sharding=jax.typeof(codes).sharding)
  return values.astype(dtype)


def _mantissa_bits(e: jax.Array) -> jax.Array:
  """HiF8 mantissa bits kept at float32 exponent `e` (0 in the denormal band)."""
  ae = jnp.abs(e)
  return jnp.where(ae <= 3, 3, jnp.where(ae <= 7, 2, jnp.where(e >= -15, 1, 0)))


def _assemble(r: jax.Array) -> jax.Array:
  """Unsigned HiF8 code of a rounded, representable, nonzero magnitude `r` (bits)."""
  e = (r >> 23) - 127
  m = _mantissa_bits(e)
  mant = (r >> (23 - m)) & ((1 << m) - 1)
  ae = jnp.abs(e)
  d = (ae >= 1).astype(jnp.int32) + (ae >= 2) + (ae >= 4) + (ae >= 8)
  dot = jnp.where(d >= 3, 0x20 * d - 0x20, jnp.where(d == 0, 0x08, 0x10 * d))  # 08 10 20 40 60
  hidden = (1 << d) >> 1
  esign = (e < 0).astype(jnp.int32) << jnp.maximum(m + d - 1, 0)
  code = dot | esign | ((ae - hidden) << m) | mant
  return jnp.where(e < -15, e + 23, code)


@functools.partial(jax.jit, static_argnames=("rounding", "saturate"))
def _encode(x: jax.Array, rounding: str, saturate: bool, key: jax.Array | None) -> jax.Array:
  """Encodes float32 `x` (rounding, saturate validated by `encode`)."""
  bits = jax.lax.bitcast_convert_type(x, jnp.int32)
  sign = (bits < 0).astype(jnp.int32)
  a = bits & 0x7FFFFFFF
  mant = a & 0x7FFFFF
  e = (a >> 23) - 127
  shift = 23 - _mantissa_bits(e)
  low = (1 << shift) - 1
  disc = a & low
  up = disc >= (1 << (shift - 1))  # 'ta'
  up_tiny = jnp.ones_like(up)  # e == -23: 'ta' always gives 2^-22.
  if rounding == "hybrid":
    thresh = a & 0x3FFF
    use_random = (jnp.abs(e) >= 4) & (e < 15)
    up = jnp.where(use_random, (disc >> (shift - 14)) > thresh, up)
    up_tiny = ((1 << 13) | (mant >> 10)) > thresh
  elif rounding == "stochastic":
    rnd = jax.random.bits(key, x.shape, jnp.uint32)
    r_shift = (rnd >> (32 - shift).astype(jnp.uint32)).astype(jnp.int32)
    up = jnp.where(e < 15, r_shift < disc, up)
    up_tiny = (rnd >> 8).astype(jnp.int32) < (mant | 0x800000)
  r = (a & ~low) + jnp.where(up, 1 << shift, 0)
  r = jnp.where(e == -23, jnp.where(up_tiny, _F32_MIN_SUB_BITS, 0), r)
  r = jnp.where(e < -23, 0, r)
  code = jnp.where(r == 0, 0, _assemble(r) | (sign << 7))
  big = MAX_CODE if saturate else POS_INF_CODE
  code = jnp.where(r >= _F32_OVERFLOW_BITS, big | (sign << 7), code)
  code = jnp.where(a > _F32_INF_BITS, NAN_CODE, code)
  return code.astype(jnp.uint8)


def encode(
    x: jax.Array,
    rounding: str = "ta",
    saturate: bool = False,
    *,
    key: jax.Array | None = None,
) -> jax.Array:
  """Encodes floating `x` to uint8 HiF8 codes of the same shape.

  Args:
    x: floating array (float32, bfloat16, float16; converted to float32).
    rounding: 'ta', 'hybrid' or 'stochastic' (see the module docstring).
    saturate: map results that would be +-Inf to +-32768.
    key: JAX PRNG key; required by 'stochastic', refused otherwise.

  Returns:
    uint8 codes, same shape as `x`.
  """
  if rounding not in ROUNDING_MODES:
    raise ValueError(f"rounding={rounding!r} is not one of {ROUNDING_MODES}.")
  if rounding == "stochastic" and key is None:
    raise ValueError("rounding='stochastic' requires a PRNG `key`.")
  if rounding != "stochastic" and key is not None:
    raise ValueError(f"key is only used by rounding='stochastic', not {rounding!r}.")
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"x must have a floating dtype, got {x.dtype}.")
  return _encode(x.astype(jnp.float32), rounding, bool(saturate), key)
