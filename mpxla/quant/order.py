"""`after(x, *deps)`: a scheduling hint for XLA that changes no bit of x.

Shared by the FP8 layers (mpxla.nn.flow, see docs/nn.md "Temp bytes") and mpxla.attention's
backward. XLA on CPU removes optimization barriers before fusion, so the hint is an integer
division of x's bit pattern by a runtime one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def after(x: jax.Array, *deps: jax.Array) -> jax.Array:
  """x, unchanged, as a value XLA computes only once `deps` exist (differentiable: identity).

  The bit pattern of x is divided by 1 + [d < -inf] (one for every float, NaN included) over
  one element d of each dep: XLA cannot prove the divisor constant, so it (1) computes x
  after the deps, (2) materializes x as it is: an integer division is never duplicated into
  consumers by fusion, so a cast is not redone in every consumer with its float32 input
  kept alive instead, and bfloat16 is not widened to float32 (XLA on CPU otherwise keeps
  bfloat16 results in float32 and upcasts FP8 operands), and (3) does not merge x with an
  identical computation elsewhere (a forward value with its recomputation in the backward).
  """
  if x.dtype.itemsize not in (1, 2, 4):  # (float64) no such hint: x as it is
    return x
  return _after(x, tuple(jnp.asarray(d).reshape(-1)[:1] for d in deps))


@jax.custom_jvp
def _after(x, firsts):
  one = jnp.ones((), jnp.uint8)
  for d in firsts:
    one = one + (d[0] < -jnp.inf).astype(jnp.uint8)
  bits_dtype = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
  if x.dtype == bits_dtype:
    return x // one.astype(bits_dtype)
  bits = jax.lax.bitcast_convert_type(x, bits_dtype) // one.astype(bits_dtype)
  return jax.lax.bitcast_convert_type(bits, x.dtype)


@_after.defjvp
def _after_jvp(primals, tangents):
  return _after(*primals), tangents[0]
