"""log2 and exp2 on float32 built from cheap XLA ops (bit operations and polynomials).

XLA treats exp and log as expensive and will not recompute them inside several
fusions, so a decoded optimizer moment that feeds a reduction, an encoder and
the update would be materialized as a full float32 array. These versions use
only ops XLA duplicates freely (integer/bit ops, multiply, add, floor, select),
so the decode fuses into each consumer and nothing full-size is stored. They
are also identical on every backend (no dependence on a libm).

  log2(x) = e + u * P7(u),  x = 2^e * (1 + u), 1 + u in [sqrt(1/2), sqrt(2))
  exp2(y) = 2^n * (1 + f * P5(f)),  n = floor(y), f = y - n

P7 and P5 are Chebyshev fits (|error| < 1e-7 in log2 units, relative error
< 1e-8 for exp2 before float32 rounding). Exact cases: log2(2^n) = n and
exp2(n) = 2^n for integers n.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# log2(1 + u) / u on [sqrt(1/2) - 1, sqrt(2) - 1], degree 7 (lowest order first).
_LOG2_COEFFS = (
    1.442694902420044,
    -0.721352756023407,
    0.4809240400791168,
    -0.36024197936058044,
    0.28707554936408997,
    -0.2488219141960144,
    0.23421040177345276,
    -0.1462038904428482,
)
# (2^f - 1) / f on [0, 1], degree 5.
_EXP2_COEFFS = (
    0.6931471824645996,
    0.24022720754146576,
    0.055495936423540115,
    0.009652439504861832,
    0.0012689359718933702,
    0.00020829170534852892,
)
_SQRT_HALF_BITS = 0x3F3504F3  # float32 bits of sqrt(1/2).


def _horner(u: jax.Array, coeffs: tuple[float, ...]) -> jax.Array:
  acc = jnp.full_like(u, coeffs[-1])
  for c in coeffs[-2::-1]:
    acc = acc * u + c
  return acc


def log2(x: jax.Array) -> jax.Array:
  """log2(x) for positive normal float32 x (x = 0 gives -127, not -inf; NaN/inf: garbage)."""
  bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
  e = (bits - _SQRT_HALF_BITS) >> 23  # Arithmetic shift: floor.
  m = jax.lax.bitcast_convert_type(bits - (e << 23), jnp.float32)  # In [sqrt(1/2), sqrt(2)).
  u = m - 1.0
  return e.astype(jnp.float32) + u * _horner(u, _LOG2_COEFFS)


def exp2(y: jax.Array) -> jax.Array:
  """2^y for float32 y < 128; y < -126 gives 0 or a value below 2^-126 (flushed on CPU)."""
  y = jnp.maximum(y.astype(jnp.float32), -127.0)
  n = jnp.floor(y)
  f = y - n
  scale = jax.lax.bitcast_convert_type((n.astype(jnp.int32) + 127) << 23, jnp.float32)
  return scale * (1.0 + f * _horner(f, _EXP2_COEFFS))
