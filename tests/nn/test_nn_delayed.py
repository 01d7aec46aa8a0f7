"""Delayed scaling in Linen: the 'fp8_state' collection in training, checkpoints and on 8 devices."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mpxla import nn as mnn

needs_8 = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (tests/conftest.py)")
TX = optax.adamw(1e-2, weight_decay=0.1)


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(8, name="out")(jax.nn.gelu(nn.Dense(32, name="hidden")(x)))


def batch(step, n=16):
  kx, ky = jax.random.split(jax.random.key(step))
  return jax.random.normal(kx, (n, 12)) * (1 + step), jax.random.normal(ky, (n, 8))


def make_step(qmodel):
  @jax.jit
  def step(params, fp8_state, opt_state, x, y):
    def loss_fn(params, fp8_state):
      out = qmodel.apply({"params": params, mnn.COLLECTION: fp8_state}, x)
      return jnp.mean((out - y) ** 2)

    grads, new_state = jax.grad(loss_fn, argnums=(0, 1))(params, fp8_state)
    updates, opt_state = TX.update(grads, opt_state, params)  # the state never reaches it
    new_state = jax.lax.cond(mnn.all_finite(new_state), lambda: new_state, lambda: fp8_state)
    return optax.apply_updates(params, updates), new_state, opt_state

  return step


def init(qmodel):
  variables = qmodel.init(jax.random.key(0), batch(0)[0])
  return variables["params"], variables[mnn.COLLECTION], TX.init(variables["params"])


def run(step, carry, steps):
  for s in steps:
    carry = step(*carry, *batch(s))
  return carry


def test_state_collection_updates_each_step():
  qmodel = mnn.quantize(MLP(), "fp8_delayed")
  params, state, opt_state = init(qmodel)
  assert set(state) == {"hidden", "out"}
  assert set(state["hidden"]) == {"lhs_amax_history", "rhs_amax_history", "grad_amax_history"}
  assert not any(np.any(h) for h in jax.tree.leaves(state))
  params, state, _ = run(make_step(qmodel), (params, state, opt_state), range(3))
  lhs = np.asarray(state["hidden"]["lhs_amax_history"])
  expected = [float(jnp.max(jnp.abs(batch(s)[0]))) for s in (2, 1, 0)]
  np.testing.assert_array_equal(lhs[:3], np.float32(expected))
  assert np.all(lhs[3:] == 0)
  for name in ("rhs_amax_history", "grad_amax_history"):
    h = np.asarray(state["out"][name])
    assert np.all(h[:3] > 0) and np.all(h[3:] == 0)


def test_nonfinite_step_keeps_the_old_state():
  qmodel = mnn.quantize(MLP(), "fp8_delayed")
  params, state, opt_state = init(qmodel)
  step = make_step(qmodel)
  params, state, opt_state = step(params, state, opt_state, *batch(0))
  x, y = batch(1)
  _, kept, _ = step(params, state, opt_state, x.at[0, 0].set(jnp.inf), y)
  jax.tree.map(np.testing.assert_array_equal, kept, state)


def test_checkpoint_and_resume_is_bit_exact(tmp_path):
  qmodel = mnn.quantize(MLP(), "fp8_delayed")
  step = make_step(qmodel)
  straight = run(step, init(qmodel), range(4))
  half = run(step, init(qmodel), range(2))
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(tmp_path / "ckpt", half)
  with ocp.StandardCheckpointer() as ckpt:
    restored = ckpt.restore(tmp_path / "ckpt", jax.tree.map(ocp.utils.to_shape_dtype_struct, half))
  resumed = run(step, restored, range(2, 4))
  jax.tree.map(np.testing.assert_array_equal, resumed, straight)


@needs_8
def test_data_parallel_state_agrees_with_one_device():
  qmodel = mnn.quantize(MLP(), "fp8_delayed")
  step = make_step(qmodel)
  carry = init(qmodel)
  one = step(*carry, *batch(5))
  mesh = jax.make_mesh((8,), ("data",), (jax.sharding.AxisType.Auto,), devices=jax.devices()[:8])
  x, y = (jax.device_put(a, NamedSharding(mesh, P("data"))) for a in batch(5))
  replicated = jax.device_put(carry, NamedSharding(mesh, P()))
  eight = step(*replicated, x, y)
  # Amaxes are maxima over the global batch: the histories agree bit for bit.
  jax.tree.map(np.testing.assert_array_equal, eight[1], one[1])


@needs_8
def test_state_inside_shard_map_is_the_same_on_every_device():
  recipe = mnn.Recipe("delayed_dp", linear=mnn.DotConfig(scaling="delayed", axis_name="data"))
  qmodel = mnn.quantize(MLP(), recipe)  # runs inside shard_map only (its amax needs the axis)
  plain = mnn.quantize(MLP(), "fp8_delayed")
  params, state, opt_state = init(plain)  # the same variables
  mesh = jax.make_mesh((8,), ("data",), (jax.sharding.AxisType.Auto,), devices=jax.devices()[:8])

  def local(params, state, x, y):
    def loss_fn(params, state):  # this device's part of the global mean
      out = qmodel.apply({"params": params, mnn.COLLECTION: state}, x)
      return jnp.sum((out - y) ** 2) / (32 * 8)

    _, new_state = jax.grad(loss_fn, argnums=(0, 1))(params, state)
    return jax.tree.map(lambda h: h[None], new_state)  # one copy per device

  f = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(), P(), P("data"), P("data")),
                            out_specs=P("data")))
  x, y = batch(3, n=32)
  per_device = f(params, state, x, y)
  _, single, _ = make_step(plain)(params, state, opt_state, x, y)
  for got, want in zip(jax.tree.leaves(per_device), jax.tree.leaves(single), strict=True):
    for d in range(8):  # every device holds the global (pmax) amaxes, i.e. the 1-device state
      np.testing.assert_array_equal(got[d], want)
