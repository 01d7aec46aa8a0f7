"""What the FP8 code tells JAX's autodiff and XLA, in one place for nn, attention and parallel.

* `after(x, *deps)`: x unchanged, computed once `deps` exist and materialized as it is (a
  scheduling hint; why it is written this way: docs/xla_cpu.md).
* Checkpoint names of what the backward pass keeps: `FP8` (codes, scales, amaxes), `KEEP`
  (inputs of layers kept in high precision), `ATTENTION_OUT` / `ATTENTION_LSE` (mpxla.attention's
  output and log-sum-exp), and `POLICY`, the `jax.checkpoint` policy that saves only those.
* `zero_cotangent(tree)`: the zero cotangents a custom VJP returns for arrays that get no
  gradient (codes, scales, block masks).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

from mpxla.quant.sharding import explicit_sharding, input_mesh

FP8 = "mpxla_fp8"  # FP8 codes, scales and amaxes kept for the backward pass.
KEEP = "mpxla_keep"  # Inputs of layers kept in high precision (saved as they are).
ATTENTION_OUT = "mpxla_attention_out"
ATTENTION_LSE = "mpxla_attention_lse"
# Saves only the named values; the backward recomputes everything else from them (elementwise
# glue such as `silu(gate) * up` or rotary embeddings), and the attention forward does not run
# again because its output and log-sum-exp are kept.
POLICY = jax.checkpoint_policies.save_only_these_names(FP8, KEEP, ATTENTION_OUT, ATTENTION_LSE)


def tag(tree: Any, name: str = FP8) -> Any:
  """Names every array of `tree` for `jax.checkpoint` policies (a no-op outside remat)."""
  return jax.tree.map(lambda a: checkpoint_name(a, name), tree)


def after(x: jax.Array, *deps: jax.Array) -> jax.Array:
  """x, unchanged, as a value XLA computes only once `deps` exist (differentiable: identity).

  The bit pattern of x is divided by 1 + [d < -inf] (one for every float, NaN included) over
  one element d of each dep. XLA cannot prove the divisor constant, so it computes x after
  the deps, materializes x at its own dtype (not fused into each consumer, not widened), and
  does not merge x with an identical computation elsewhere (docs/xla_cpu.md).
  """
  if x.dtype.itemsize not in (1, 2, 4):  # (float64) no such hint: x as it is
    return x
  return _after(x, tuple(_first(d) for d in deps))


def _first(d) -> jax.Array:
  """d's first element as a [1] array. Indexed, not flattened: on a sharded d the partitioner
  then moves one element (flattening first all-gathers the whole of d)."""
  d = jnp.asarray(d)
  if d.size == 0:  # nothing to wait for
    return jnp.zeros((1,), d.dtype)
  if not explicit_sharding(d):
    return d[(0,) * d.ndim].reshape(1)
  with input_mesh(d):
    return jax.sharding.auto_axes(lambda a: a[(0,) * a.ndim].reshape(1), out_sharding=P())(d)


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


def zero_cotangent(tree: Any) -> Any:
  """Zero cotangents for a pytree of arrays (float0 for integer arrays such as HiF8 codes)."""

  def zero(a):
    if jnp.issubdtype(a.dtype, jnp.inexact):
      return jnp.zeros_like(a)
    return np.zeros(a.shape, jax.dtypes.float0)

  return jax.tree.map(zero, tree)
