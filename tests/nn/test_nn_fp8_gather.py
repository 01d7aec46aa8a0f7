"""FP8 weight all-gather under FSDP (`DotConfig(gather_weight=True)`): 1-byte collectives, and
the same numbers as letting XLA gather the weight."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from mpxla.nn import fp8_dot
from mpxla.train import monitor

DN = (((1,), (0,)), ((), ()))


def _replicated(w):
  """w gathered in its own dtype (the reference: gather first, quantize after)."""
  if jax.typeof(w).sharding.mesh.axis_types[0] == AxisType.Explicit:
    return jax.sharding.reshard(w, P())
  return jax.lax.with_sharding_constraint(w, P())


def _grads(gather: bool, mesh, x, w):
  """(y, dx, dw) with the output gradient cos(column), and the compiled HLO. gather=False:
  w is all-gathered in float32 before the FP8 matmul quantizes it."""
  cfg = fp8_dot.DotConfig(gather_weight=gather)

  def f(x, w):
    def dot(x, w):
      return fp8_dot.fp8_dot_general(x, w if gather else _replicated(w), DN, config=cfg)

    y, vjp = jax.vjp(dot, x, w)
    g = jnp.cos(jnp.arange(y.shape[1], dtype=jnp.float32)) * jnp.ones_like(y)
    return (y, *vjp(g.astype(y.dtype)))

  f = jax.jit(f)
  with jax.set_mesh(mesh):
    return f(x, w), f.lower(x, w).compile().as_text()


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit])
def test_gathered_codes_are_uint8_and_the_result_is_bit_exact(axis_type):
  mesh = jax.make_mesh((8,), ("fsdp",), (axis_type,))
  rng = np.random.default_rng(0)
  x = jax.device_put(jnp.asarray(rng.standard_normal((64, 256)), jnp.bfloat16),
                     NamedSharding(mesh, P("fsdp")))
  # The trainer's FSDP layout: the largest dimension over 'fsdp'.
  w = jax.device_put(jnp.asarray(rng.standard_normal((256, 512)) * 0.05, jnp.float32),
                     NamedSharding(mesh, P(None, "fsdp")))
  (y8, dx8, dw8), hlo = _grads(True, mesh, x, w)
  (y, dx, dw), _ = _grads(False, mesh, x, w)
  np.testing.assert_array_equal(np.asarray(y8, np.float32), np.asarray(y, np.float32))
  np.testing.assert_array_equal(np.asarray(dx8, np.float32), np.asarray(dx, np.float32))
  np.testing.assert_array_equal(np.asarray(dw8), np.asarray(dw))
  gathers = monitor.all_gathers(hlo)
  assert gathers, "no all-gather in the compiled step"
  assert ("u8", (256, 512)) in gathers, gathers  # the whole weight, 1 byte per element
  assert all(t == "u8" for t, _ in gathers), gathers


def test_without_a_mesh_gather_weight_changes_nothing():
  x, w = jnp.ones((4, 32)), jnp.full((32, 8), 0.5)
  a = fp8_dot.fp8_dot_general(x, w, DN, config=fp8_dot.DotConfig(gather_weight=True))
  b = fp8_dot.fp8_dot_general(x, w, DN)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
