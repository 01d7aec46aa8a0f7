"""Per-group FP8 codec with COAT's dynamic range expansion.

The codec works on groups along the last axis of `x` (shape `(..., G)`). With
M = fmt.max (448 for E4M3) and, per group, amax = max|x| and amin = the smallest
nonzero |x| (zeros are ignored), COAT (arXiv 2410.19313) expands the group with

  R = amax / amin,  c = sqrt(amax * amin),
  k = floor(16 * log2(M^2 / 2) / log2(R)) / 16,
  y = sign(x) * (|x| / c)^k,  s = (amax / c)^k / M,  code = fmt(y / s),

and decodes sign(q) * |q * s|^(1/k) * c. Since y / s = M * (|x| / amax)^k, c and
s cancel out: a group is fully described by (k, amax). We store

  k16 = 16 * k  as uint8 (k on its 1/16 grid, k in [1/16, 255/16]),
  amax          as float32 (exact),

i.e. 5 bytes per group instead of COAT's three float32 (12 bytes), and compute

  encode: t = 2^(log2 M + k * (log2|x| - log2 amax)),  code = fmt(sign(x) * t)
  decode: x' = sign(q) * 2^(log2 amax + (log2|q| - log2 M) / k)

in float32, exponents added in the log domain so nothing under- or overflows
(per-element log2/exp2 from `fastmath` and E4M3/E5M2 conversions from `formats._bits`,
bit-exact with mpxla.formats, so XLA fuses the decode into each of its consumers
instead of storing it). Policies (the fixes to COAT's reference code):

- zeros (and padding) never enter amin, so they do not change k; zero codes
  decode to exact zeros (-0.0 stays -0.0) and an all-zero group decodes to
  zeros (stored amax = 0, k16 = 255).
- |x| = amax encodes to M and |q| = M decodes to amax exactly (by a select, not
  through exp/log): the group maximum is exact and a constant group (R = 1,
  every code +-M) decodes exactly.
- R ~ 1 (k would exceed 255/16, or be infinite): k is clamped to 255/16.
- R > M^2 / 2 gives k < 1: allowed down to 1/16, which squeezes the range into
  the format (relative error grows like 1/k). For float32 inputs with normal
  values log2 R < 254, so k >= 1/16 always keeps R^k <= M^2 / 2 and the
  smallest element at t >= 2 / M, above fmt.min_subnormal.
- nonzero x never encodes to a zero code (t is at least fmt.min_subnormal) and a
  nonzero code never decodes to 0 (magnitudes are at least 2^-126, float32's
  smallest normal). float32 subnormal inputs count as zeros (XLA on CPU flushes
  them).
- codes saturate at +-M (t <= M by construction, and `cast` clips); no finite
  input gives NaN or inf.
- a group holding NaN or +-inf stores amax = NaN, so the whole group decodes to
  NaN: a non-finite state is visible, never silently clipped.

`encode(x, bits=...)` rounds stochastically instead (E4M3 / E5M2): unbiased in
x's own domain, between the two codes whose decoded values bracket |x| (see
`encode`); the caller supplies the random bits.

Without expansion (`expansion=False`) the codec is plain per-group absmax
scaling: t = |x| * (M / amax), x' = |q| * (amax / M), with the same zero,
maximum, nonzero and non-finite policies (k16 is not stored).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mpxla.formats import Format, _bits, cast, get_format, upcast
from mpxla.optim import fastmath

K_DENOM = 16  # k is stored on a 1/16 grid.
K16_MIN = 1  # k >= 1/16.
K16_MAX = 255  # k <= 255/16 = 15.9375, the largest uint8.
_F32_TINY = 2.0**-126  # float32's smallest normal.
_F32_MAX = float(np.finfo(np.float32).max)


class Encoded(NamedTuple):
  """A group-encoded array.

  Attributes:
    codes: 8-bit codes, the shape of x (..., G), in fmt's storage dtype.
    k16: uint8 (..., 1): 16 * k, or None without expansion.
    amax: float32 (..., 1): the group's max |x| (NaN for non-finite groups).
  """

  codes: jax.Array
  k16: jax.Array | None
  amax: jax.Array


class ExpansionParams(NamedTuple):
  """COAT's per-group quantities (for analysis; the codec stores only k and amax).

  Attributes:
    k: expansion exponent, on its 1/16 grid.
    c: sqrt(amax * amin), COAT's centre.
    s: COAT's scale (amax / c)^k / M.
    a: the decode factor s^(1/k) * c = amax * M^(-1/k).
  """

  k: jax.Array
  c: jax.Array
  s: jax.Array
  a: jax.Array


def group_range(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(amax, amin) over the last axis (kept, size 1): max |x| and the smallest nonzero |x|.

  Zeros count as FLT_MAX in the min, so an all-zero group has amin = FLT_MAX
  (and amax = 0). One variadic reduction: XLA fuses the producer of x into it,
  so x is never stored. NaN in x makes amax NaN.
  """
  ax = jnp.abs(x.astype(jnp.float32))
  nz = jnp.where(ax > 0, ax, _F32_MAX)
  amax, amin = jax.lax.reduce(
      (ax, nz), (np.float32(-np.inf), np.float32(np.inf)), _max_min, (x.ndim - 1,)
  )
  return amax[..., None], amin[..., None]


def _max_min(a, b):
  # Module-level (stable identity), so eager calls hit the compilation cache.
  return jnp.maximum(a[0], b[0]), jnp.minimum(a[1], b[1])


def _usable(amax: jax.Array) -> jax.Array:
  return jnp.isfinite(amax) & (amax > 0)


def expansion_k16(amax: jax.Array, amin: jax.Array, fmt: str | Format = "e4m3") -> jax.Array:
  """16 * k as uint8: floor(16 * log2(M^2 / 2) / log2(amax / amin)), clipped to [1, 255].

  log2(amax / amin) is computed as log2(amax) - log2(amin) (no overflow); R = 1,
  all-zero and non-finite groups get 255 (the ratio is +inf there, never NaN). The ratio
  ends in a division, which XLA stores once per group: the logs before it would
  otherwise be re-evaluated for every element of the encoder's loop.
  """
  fmt = get_format(fmt)
  l16 = float(K_DENOM * math.log2(fmt.max**2 / 2.0))
  ok = _usable(amax) & (amin <= amax)
  lr = fastmath.log2(jnp.where(ok, amax, 1.0)) - fastmath.log2(jnp.where(ok, amin, 1.0))
  ratio = l16 / jnp.where(ok & (lr > 0), lr, 0.0)  # l16 / 0 = +inf.
  return jnp.clip(jnp.floor(ratio), K16_MIN, K16_MAX).astype(jnp.uint8)


def expansion_params(x: jax.Array, fmt: str | Format = "e4m3") -> ExpansionParams:
  """COAT's (k, c, s, a) for each group of x (last axis), in float32."""
  fmt = get_format(fmt)
  amax, amin = group_range(x)
  k = expansion_k16(amax, amin, fmt).astype(jnp.float32) / K_DENOM
  c = jnp.sqrt(amax * amin)
  s = (amax / c) ** k / fmt.max
  a = amax * jnp.float32(fmt.max) ** (-1.0 / k)
  return ExpansionParams(k=k, c=c, s=s, a=a)


def encode(
    x: jax.Array, fmt: str | Format = "e4m3", *, expansion: bool = True,
    bits: jax.Array | None = None,
) -> Encoded:
  """Encodes groups along the last axis of x (see module docstring for the formula).

  bits: None rounds to nearest (ties to even) in the expanded domain. A uint32
  array of x's shape (random bits) selects stochastic rounding, unbiased in x's
  own domain: with lo < hi the two neighbouring codes around t and d(q) the
  decoded magnitude of code q, |x| is stored as hi with probability

    p = (|x| - d(lo)) / (d(hi) - d(lo)),   so E[decode] = x exactly,

  decided by u < p with u = (bits >> 8) * 2^-24 (E4M3 / E5M2 only). Rounding t
  itself without bias would leave decode biased low by the curvature of
  |q|^(1/k) (about 1e-4 relative per encode, which an EMA with decay b
  accumulates to 1e-4 / (1 - b)).
  """
  fmt = get_format(fmt)
  x = x.astype(jnp.float32)
  amax, amin = group_range(x)
  return encode_in_range(x, amax, amin, fmt, expansion=expansion, bits=bits)


def encode_in_range(
    x: jax.Array, amax: jax.Array, amin: jax.Array, fmt: str | Format = "e4m3", *,
    expansion: bool = True, bits: jax.Array | None = None,
) -> Encoded:
  """`encode` of float32 x with its groups' (amax, amin) given (shape (..., 1), as `group_range`).

  The fused optimizer kernel (`mpxla.optim._fused`) reduces each group itself and calls this,
  so its codes are the same op for op.
  """
  fmt = get_format(fmt)
  stored_amax = jnp.where(jnp.isfinite(amax), amax, jnp.nan)
  safe_amax = jnp.where(_usable(amax), amax, 1.0)
  # Per-group values end in an op XLA deems expensive (log, divide), so they are
  # computed once per group instead of inside the per-element loop.
  if expansion:
    k16 = expansion_k16(amax, amin, fmt)
    k = k16.astype(jnp.float32) * (1.0 / K_DENOM)  # Exact: k16 / 16.
    # t = M * (|x| / amax)^k = 2^(log2 M + k (log2|x| - log2 amax)).
    lmax = jnp.log2(safe_amax)
  else:
    k16 = None
    scale = fmt.max / safe_amax
  ax = jnp.abs(x)
  if expansion:
    t = fastmath.exp2(math.log2(fmt.max) + k * (fastmath.log2(ax) - lmax))
  else:
    t = ax * scale
  # Clipped with compare-and-select (cheaper than NaN-propagating min/max): a
  # nonzero x gets at least the smallest nonzero code, the group max maps to M.
  t = jnp.where(t < fmt.min_subnormal, fmt.min_subnormal, t)
  t = jnp.where((t > fmt.max) | (ax == amax), fmt.max, t)
  if bits is None:
    # Zeros (and -0.0) stay exact zeros. Non-finite groups give arbitrary codes:
    # their stored amax is NaN.
    codes = _to_codes(jnp.where(ax == 0, x, jnp.where(x < 0, -t, t)), fmt)
  else:
    if not _bits.supports(fmt):
      raise ValueError(f"stochastic rounding supports fmt 'e4m3' and 'e5m2', not {fmt.name!r}.")
    lo = _bits.floor_code(t, fmt)
    hi = jnp.minimum(lo + 1, _bits.max_code(fmt))
    dec = _decode_params(k16, stored_amax, fmt)
    d_lo = _magnitude(_bits.code_value(lo, fmt), stored_amax, dec, fmt)
    d_hi = _magnitude(_bits.code_value(hi, fmt), stored_amax, dec, fmt)
    u = (bits >> 8).astype(jnp.float32) * 2.0**-24
    mag = jnp.where(u * (d_hi - d_lo) < ax - d_lo, hi, lo)  # P(hi) = p, without a division.
    codes = _bits.with_sign(jnp.where(ax == 0, 0, mag), jnp.signbit(x), fmt)
  return Encoded(codes=codes, k16=k16, amax=stored_amax)


def _decode_params(
    k16: jax.Array | None, amax: jax.Array, fmt: Format
) -> tuple[jax.Array, jax.Array | None]:
  """Per-group decode constants: (a, 1/k) with |x'| = 2^(a + log2|q| / k), or (amax / M, None).

  a = log2 amax - log2 M / k; amax * 0 makes it NaN for a non-finite group (stored
  amax = NaN), which makes the group's whole decode NaN. log2 M / k is one division
  (16 log2 M) / k16, not a product with 1/k: a product feeding the subtraction may or may
  not be contracted into an FMA depending on how the compiler fuses the program, and the
  decoded values (and stochastic rounding's decisions) must not depend on that.
  """
  if k16 is None:
    return amax / fmt.max, None
  k16 = k16.astype(jnp.float32)
  a = (jnp.log2(jnp.where(_usable(amax), amax, 1.0)) + amax * 0.0
       - (K_DENOM * math.log2(fmt.max)) / k16)
  return a, K_DENOM / k16


def _magnitude(
    aq: jax.Array, amax: jax.Array, params: tuple[jax.Array, jax.Array | None], fmt: Format
) -> jax.Array:
  """Decoded |x'| of code magnitudes aq > 0: amax at aq = M (exact), else at least 2^-126."""
  a, inv_k = params
  mag = aq * a if inv_k is None else fastmath.exp2(a + inv_k * fastmath.log2(aq))
  return jnp.where(aq == fmt.max, amax, jnp.maximum(mag, _F32_TINY))


def decode(enc: Encoded, fmt: str | Format = "e4m3", dtype=jnp.float32) -> jax.Array:
  """Decodes `encode`'s output: sign(q) * amax * (|q| / M)^(1/k), exact at q = 0 and |q| = M."""
  fmt = get_format(fmt)
  params = _decode_params(enc.k16, enc.amax, fmt)  # Per group (see encode).
  q = _from_codes(enc.codes, fmt)
  mag = _magnitude(jnp.abs(q), enc.amax, params, fmt)
  # sign(q) = 0 for zero codes gives 0 (or NaN in a non-finite group, where amax is NaN).
  return (mag * jnp.sign(q)).astype(dtype)


def _to_codes(y: jax.Array, fmt: Format) -> jax.Array:
  """cast(y, fmt) for |y| <= fmt.max (or NaN); bit arithmetic for E4M3/E5M2 (see formats._bits)."""
  return _bits.to_fp8(y, fmt) if _bits.supports(fmt) else cast(y, fmt)


def _from_codes(codes: jax.Array, fmt: Format) -> jax.Array:
  """upcast(codes, fmt) for finite codes."""
  if _bits.supports(fmt):
    return _bits.from_fp8(codes, fmt)
  return upcast(codes, fmt, jnp.float32)


def fake_quantize(
    x: jax.Array, fmt: str | Format = "e4m3", *, expansion: bool = True,
    bits: jax.Array | None = None,
) -> jax.Array:
  """decode(encode(x)): x rounded through the codec, groups along the last axis."""
  return decode(encode(x, fmt, expansion=expansion, bits=bits), fmt, x.dtype)
