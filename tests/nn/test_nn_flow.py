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


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float8_e4m3fn, jnp.uint8])
def test_after_keeps_every_bit_and_passes_gradients(dtype):
  """`flow.after` only orders and materializes: same bits (NaN, inf, -0, subnormals), and the
  derivative is the identity."""
  special = [np.nan, np.inf, -np.inf, -0.0, 1e-40, 3.5, -448.0, 0.0]
  x = jnp.asarray(np.array(special if dtype != jnp.uint8 else [0, 1, 7, 255, 128, 2, 3, 4]),
                  dtype)
  if dtype == jnp.float8_e4m3fn:  # no inf in E4M3
    x = jnp.where(jnp.isinf(x.astype(jnp.float32)), jnp.float8_e4m3fn(1.0), x)
  deps = (jnp.array([jnp.nan, 1.0]), jnp.array([-jnp.inf]), jnp.array([2], jnp.int32))
  got = jax.jit(lambda x, *d: flow.after(x, *d))(x, *deps)
  assert got.dtype == x.dtype
  width = {1: np.uint8, 2: np.uint16, 4: np.uint32}[x.dtype.itemsize]
  np.testing.assert_array_equal(np.asarray(got).view(width), np.asarray(x).view(width))
  if dtype in (jnp.float32, jnp.bfloat16):
    w = jnp.arange(8.0, dtype=dtype)
    g = jax.grad(lambda x: jnp.sum(flow.after(x, *deps) * w).astype(jnp.float32))(x)
    np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32))


def test_after_is_not_folded_away_by_xla():
  """The divisor must be a run-time value, else XLA folds the division and nothing is gained."""
  hlo = jax.jit(lambda x, d: flow.after(x, d)).lower(
      jnp.ones((64, 64), jnp.bfloat16), jnp.ones(3)).compile().as_text()
  assert "divide(" in hlo and "u16[64,64]" in hlo
