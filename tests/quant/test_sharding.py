"""Sharded quantization on 8 simulated CPU devices equals the unsharded result, bit for bit."""

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mpxla import quant

pytestmark = pytest.mark.skipif(
    jax.device_count() < 8, reason="needs 8 devices (tests/conftest.py sets XLA_FLAGS)"
)


def bits(a):
  a = np.asarray(a)
  return a.view(np.uint8) if a.dtype.itemsize == 1 else a.view(np.uint32)


def make_x():
  x = jax.random.normal(jax.random.key(0), (64, 1024))
  # A single large outlier on one device decides the global amax.
  return x.at[37, 901].set(1234.5)


@pytest.mark.parametrize("axis_type", ["explicit", "auto"])
@pytest.mark.parametrize("mesh_shape", [(8,), (2, 4), (4, 2), (1, 8)])
@pytest.mark.parametrize("granularity", ["tensor", "1x128", "32x128"])
@pytest.mark.parametrize("fmt", ["e4m3", "hif8"])
def test_sharded_quantize_equals_unsharded(mesh_shape, granularity, fmt, axis_type):
  x = make_x()
  names = ("a", "b")[: len(mesh_shape)]
  kind = jax.sharding.AxisType.Explicit if axis_type == "explicit" else jax.sharding.AxisType.Auto
  mesh = jax.make_mesh(mesh_shape, names, (kind,) * len(names), devices=jax.devices()[:8])
  spec = P(*names) if len(names) == 2 else P(None, "a")
  xs = jax.device_put(x, NamedSharding(mesh, spec))
  f = jax.jit(lambda v: quant.quantize(v, fmt, granularity))
  if axis_type == "explicit" and granularity == "32x128" and mesh_shape == (4, 2):
    # 64 rows over 4 devices: 16-row shards cannot hold whole 32-row blocks.
    with pytest.raises(ValueError, match="not whole blocks of 32"):
      f(xs)
    return
  q_sharded = f(xs)
  q_single = f(jax.device_put(x, jax.devices()[0]))
  np.testing.assert_array_equal(bits(q_sharded.scales), bits(q_single.scales))
  np.testing.assert_array_equal(bits(q_sharded.codes), bits(q_single.codes))
  assert q_sharded.codes.sharding.is_equivalent_to(xs.sharding, x.ndim)
  np.testing.assert_array_equal(bits(jax.jit(quant.amax)(xs)), bits(jnp.float32(1234.5)))
  d_sharded = jax.jit(quant.dequantize)(q_sharded)
  np.testing.assert_array_equal(bits(d_sharded), bits(quant.dequantize(q_single)))


def test_amax_inside_shard_map_needs_axis_name():
  mesh = jax.make_mesh((2, 4), ("data", "fsdp"), devices=jax.devices()[:8])
  x = jax.device_put(make_x(), NamedSharding(mesh, P("data", "fsdp")))

  def local(v, axis_name):
    return quant.amax(v, "tensor", axis_name=axis_name)[None, None]

  def run(axis_name):
    f = jax.shard_map(lambda v: local(v, axis_name), mesh=mesh,
                      in_specs=P("data", "fsdp"), out_specs=P("data", "fsdp"))
    return np.asarray(jax.jit(f)(x))

  global_ = run(("data", "fsdp"))
  assert np.all(global_ == np.float32(1234.5))  # every device agrees on the global amax
  local_ = run(None)
  assert local_.min() < 1234.5 and local_.max() == np.float32(1234.5)  # per-device otherwise

  with pytest.raises(ValueError, match="per-tensor"):
    quant.amax(x, "1x128", axis_name="data")


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2", "hif8"])
def test_orbax_roundtrip_is_bit_exact(tmp_path, fmt):
  mesh = jax.make_mesh((8,), ("data",), devices=jax.devices()[:8])
  x = jax.device_put(make_x(), NamedSharding(mesh, P("data")))
  q = jax.jit(lambda v: quant.quantize(v, fmt, "1x128"))(x)
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(tmp_path / "q", q)
  ckpt.wait_until_finished()
  # Restore onto a different mesh layout.
  mesh2 = jax.make_mesh((2, 4), ("a", "b"), devices=jax.devices()[:8])
  target = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(mesh2, P("a", "b"))),
      q)
  r = ckpt.restore(tmp_path / "q", target)
  assert isinstance(r, quant.QTensor) and r.fmt == q.fmt and r.granularity == q.granularity
  assert r.codes.dtype == q.codes.dtype
  np.testing.assert_array_equal(bits(r.codes), bits(q.codes))
  np.testing.assert_array_equal(bits(r.scales), bits(q.scales))
  assert r.codes.sharding.spec == P("a", "b")
