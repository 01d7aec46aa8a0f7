"""Group scaling (two-pass amax) and the quantize-once scope, on 8 simulated CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mpxla import quant
from mpxla.nn import flow

needs_8 = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (tests/conftest.py)")


def bits(a):
  return np.asarray(a).view(np.uint32)


def make_x(shape=(64, 200)):
  x = jax.random.normal(jax.random.key(0), shape) * jnp.exp(jax.random.normal(jax.random.key(1),
                                                                               (shape[0], 1)))
  return x.at[37, 151].set(-987.25)  # one outlier decides the amax


@pytest.mark.parametrize("shape", [(64, 200), (3, 5, 16), (1, 7)])
def test_two_pass_amax_equals_direct_max(shape):
  x = make_x(shape) if shape == (64, 200) else jax.random.normal(jax.random.key(2), shape)
  ga = flow.group_amax(x, 16)
  assert ga.shape == (*shape[:-1], -(-shape[-1] // 16))
  np.testing.assert_array_equal(bits(flow.tensor_amax_from_groups(ga)),
                                bits(np.max(np.abs(np.asarray(x)))))


def test_two_pass_amax_of_nan_is_not_finite():
  x = make_x().at[3, 3].set(jnp.nan)
  ga = flow.group_amax(x)
  assert int(jnp.sum(~jnp.isfinite(ga))) == 1 and not bool(jnp.isfinite(ga[3, 0]))
  assert not bool(jnp.isfinite(flow.tensor_amax_from_groups(ga)))
  assert not bool(jnp.isfinite(flow.tensor_amax_from_groups(jnp.array([1.0, jnp.nan]))))


def test_group_scaled_quantize_equals_per_tensor_quantize():
  x = make_x()
  q = flow.group_scaled_quantize(x)
  ref = quant.quantize(x, "e4m3", "tensor")
  np.testing.assert_array_equal(bits(q.scales), bits(ref.scales))
  np.testing.assert_array_equal(np.asarray(q.codes).view(np.uint8),
                                np.asarray(ref.codes).view(np.uint8))


@needs_8
@pytest.mark.parametrize("mesh_shape", [(8,), (2, 4)])
def test_two_pass_amax_is_global_under_jit(mesh_shape):
  x = make_x()
  names = ("a", "b")[: len(mesh_shape)]
  mesh = jax.make_mesh(mesh_shape, names, (jax.sharding.AxisType.Auto,) * len(names),
                       devices=jax.devices()[:8])
  spec = P(*names) if len(names) == 2 else P("a")
  xs = jax.device_put(x, NamedSharding(mesh, spec))
  f = jax.jit(lambda v: flow.tensor_amax_from_groups(flow.group_amax(v)))
  np.testing.assert_array_equal(bits(f(xs)), bits(np.float32(987.25)))


@needs_8
def test_two_pass_amax_inside_shard_map_needs_axis_name():
  mesh = jax.make_mesh((2, 4), ("data", "model"), devices=jax.devices()[:8])
  x = jax.device_put(make_x(), NamedSharding(mesh, P("data", "model")))

  def run(axis_name):
    local = lambda v: flow.tensor_amax_from_groups(flow.group_amax(v), axis_name)[None, None]  # noqa: E731
    f = jax.shard_map(local, mesh=mesh, in_specs=P("data", "model"),
                      out_specs=P("data", "model"))
    return np.asarray(jax.jit(f)(x))

  assert np.all(run(("data", "model")) == np.float32(987.25))  # every device: the global amax
  local = run(None)
  assert local.min() < 987.25 and local.max() == np.float32(987.25)


def test_quantize_once_reuses_within_a_scope_and_trace_only():
  x = make_x()
  with flow.scope():
    a = flow.quantize_once(x, "e4m3", "tensor")
    assert flow.quantize_once(x, "e4m3", "tensor") is a
    assert flow.quantize_once(x, "e4m3", "1x16") is not a
    assert flow.quantize_once(x + 0, "e4m3", "tensor") is not a  # another array

    @jax.jit
    def inner(y):  # a jit trace never sees the outer trace's entries
      return flow.quantize_once(x, "e4m3", "tensor").scales + y

    np.testing.assert_array_equal(inner(0.0), a.scales)
  b = flow.quantize_once(x, "e4m3", "tensor")
  assert b is not a  # outside a scope nothing is cached
