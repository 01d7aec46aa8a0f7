"""Counter-based random bits for stochastic rounding, and rounding float32 to bf16/fp16.

Bits come from a hash of (leaf salt, step, element index), so the same step of the same
leaf draws the same bits in every process, on every mesh and after a resume, and nothing
random is stored.
"""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import numpy as np


def path_salt(path) -> int:
  """A stable 31-bit hash of a pytree key path (zlib.crc32: the same in every process)."""
  return zlib.crc32(jax.tree_util.keystr(path).encode()) & 0x7FFFFFFF


def hash32(x: jax.Array) -> jax.Array:
  """lowbias32 (C. Wellons' 32-bit integer mixer, a bijection): uint32 -> uint32."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x7FEB352D)
  x = x ^ (x >> 15)
  x = x * jnp.uint32(0x846CA68B)
  return x ^ (x >> 16)


def counter_bits(shape: tuple[int, ...], step: jax.Array, salt: int) -> jax.Array:
  """uint32 bits of `shape`: hash32(index * 0x9E3779B9 + hash32(hash32(salt) ^ step)).

  A counter-based hash of each element's flat index, the step and the leaf's salt (a few
  integer ops per element; threefry costs about 6x the optimizer-state encoder on CPU).
  The index comes from iotas, so a sharded leaf gets the same bits as an unsharded one.
  """
  seed = hash32(hash32(jnp.uint32(salt)) ^ jnp.asarray(step).astype(jnp.uint32))
  index = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(len(shape))):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride)
    stride = (stride * shape[axis]) & 0xFFFFFFFF
  return hash32(index * jnp.uint32(0x9E3779B9) + seed)


def round_stochastic(x: jax.Array, dtype, bits: jax.Array) -> jax.Array:
  """float32 x rounded to bfloat16 or float16 stochastically: E[result] = x.

  x lies between two neighbours lo < hi of `dtype` and becomes hi with probability
  (x - lo) / (hi - lo), from uint32 `bits` (one per element). bfloat16 keeps float32's
  exponent, so rounding is adding 16 random bits below its mantissa and truncating (exact
  for normal and subnormal values). float16: the same on float16's grid (spacing
  2^(e - 10), subnormals below 2^-14), with 24 random bits. Beyond the dtype's largest
  value the result may be inf, as a cast's would; NaN and inf stay as they are.
  """
  dtype = np.dtype(dtype)
  x = x.astype(jnp.float32)
  if dtype == jnp.bfloat16:
    xb = jax.lax.bitcast_convert_type(x, jnp.uint32)
    r = jax.lax.bitcast_convert_type((xb + (bits >> 16)) & jnp.uint32(0xFFFF0000), jnp.float32)
  elif dtype == np.float16:
    a = jnp.abs(x)
    e = jnp.maximum(jax.lax.bitcast_convert_type(a, jnp.int32) >> 23, 127 - 14) - 127
    inv_ulp = jax.lax.bitcast_convert_type((127 - (e - 10)) << 23, jnp.float32)  # 2^(10 - e)
    t = a * inv_ulp
    lo = jnp.floor(t)
    up = (bits >> 8).astype(jnp.float32) * 2.0**-24 < t - lo
    r = jnp.copysign((lo + up.astype(jnp.float32)) / inv_ulp, x)
  else:
    raise ValueError(f"round_stochastic rounds to bfloat16 or float16, not {dtype}")
  return jnp.where(jnp.isfinite(x), r, x).astype(dtype)
