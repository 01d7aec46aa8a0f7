"""FSDP sharding of compressed states on 8 simulated CPU devices, and Orbax restore onto a new mesh.

Needs XLA_FLAGS=--xla_force_host_platform_device_count=8 before jax is imported
(tests/conftest.py sets it; otherwise set it on the command line).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import mpxla.optim as mo

pytestmark = pytest.mark.skipif(
    jax.device_count() < 8,
    reason="needs 8 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8 before importing jax",
)

_OPT = mo.adamw_fp8(1e-2, config=dict(min_size=1024))
_STEPS = 3


def _params():
  k = jax.random.split(jax.random.key(0), 3)
  return {
      "w": jax.random.normal(k[0], (64, 384)),  # FSDP: first axis sharded.
      "v": jax.random.normal(k[1], (4096,)),  # 1-D: the last axis is the sharded one (512 / shard).
      "u": jax.random.normal(k[2], (1000,)),  # 125 / shard: groups of the padded 1024 straddle.
      "b": jnp.linspace(-1.0, 1.0, 16),  # Small: replicated, uncompressed.
  }


def _grads(params, step):
  return jax.tree.map(lambda p: jnp.sin(3.0 * p + step) * (1.0 + p * p), params)


def _specs(axis):
  return {"w": P(axis, None), "v": P(axis), "u": P(axis), "b": P()}


@functools.cache
def _step_fn():
  def step(params, state, i):
    updates, state = _OPT.update(_grads(params, i), state, params)
    return optax.apply_updates(params, updates), state

  return jax.jit(step)


def _run(params, steps=_STEPS):
  state = jax.jit(_OPT.init)(params)
  for i in range(steps):
    params, state = _step_fn()(params, state, jnp.float32(i))
  return params, state


@functools.cache
def _unsharded():
  return jax.device_get(_run(_params()))


def _assert_bit_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(x.reshape(-1).view(np.uint8), y.reshape(-1).view(np.uint8))


@pytest.mark.parametrize("axis,axis_type", [("fsdp", AxisType.Auto), ("data", AxisType.Explicit)])
def test_sharded_like_params_and_bit_identical(axis, axis_type):
  mesh = jax.make_mesh((8,), (axis,), axis_types=(axis_type,))
  with jax.set_mesh(mesh):
    params = jax.device_put(_params(), {k: NamedSharding(mesh, s) for k, s in _specs(axis).items()})
    p, state = _run(params)
  mu = state[0].mu
  for name, spec in (("w", P(axis, None)), ("v", P(axis))):
    c = mu[name]
    for arr in (c.codes, c.k16, c.amax):
      assert arr.sharding.is_equivalent_to(NamedSharding(mesh, spec), arr.ndim), (name, arr.sharding)
  # Each device holds whole groups: 8 rows x 3 groups of 'w', 4 groups of 'v'.
  assert {s.data.shape for s in mu["w"].codes.addressable_shards} == {(8, 384)}
  assert {s.data.shape for s in mu["w"].amax.addressable_shards} == {(8, 3)}
  assert {s.data.shape for s in mu["v"].codes.addressable_shards} == {(512,)}
  assert {s.data.shape for s in mu["v"].k16.addressable_shards} == {(4,)}
  assert p["w"].sharding.is_equivalent_to(NamedSharding(mesh, P(axis, None)), 2)
  _assert_bit_equal(jax.device_get((p, state)), _unsharded())


def test_orbax_restore_onto_another_mesh(tmp_path):
  mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(AxisType.Auto,))
  params = jax.device_put(_params(), {k: NamedSharding(mesh, s) for k, s in _specs("fsdp").items()})
  params, state = _run(params, steps=2)
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(tmp_path / "ckpt", {"params": params, "opt": state})
  ckptr.wait_until_finished()

  mesh2 = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)

  def target(x):
    spec = P("data") if x.ndim and x.shape[0] % 2 == 0 and x.size > 16 else P()
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh2, spec))

  restored = ckptr.restore(tmp_path / "ckpt", jax.tree.map(target, {"params": params, "opt": state}))
  assert restored["opt"][0].mu["w"].codes.sharding.mesh.shape == {"data": 2, "model": 4}
  _assert_bit_equal(jax.device_get(restored), jax.device_get({"params": params, "opt": state}))
  # One more step on the new mesh gives the same bits as on the old one.
  p_old, s_old = _step_fn()(params, state, jnp.float32(2))
  p_new, s_new = _step_fn()(restored["params"], restored["opt"], jnp.float32(2))
  _assert_bit_equal(jax.device_get((p_new, s_new)), jax.device_get((p_old, s_old)))
