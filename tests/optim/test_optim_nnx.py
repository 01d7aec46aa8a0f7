"""FP8 optimizer states under `flax.nnx.Optimizer`: the state holds plain arrays and
CompressedArrays (not nnx Variables), several steps run, and the parameters equal the same
optimizer driven by hand on the pure parameter tree, bit for bit."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import mpxla.optim as mo


class _Model(nnx.Module):
  def __init__(self, rngs):
    self.l1 = nnx.Linear(64, 128, rngs=rngs)
    self.l2 = nnx.Linear(128, 8, rngs=rngs)

  def __call__(self, x):
    return self.l2(jax.nn.relu(self.l1(x)))


def _loss(model, x):
  return jnp.mean(model(x) ** 2)


def test_nnx_optimizer_with_fp8_states_matches_the_optimizer_by_hand():
  x = jax.random.normal(jax.random.key(1), (4, 64))
  for tx in (mo.adamw_fp8(1e-2), mo.compress_states(optax.sgd(1e-2, momentum=0.9))):
    model = _Model(nnx.Rngs(0))
    graph, params = nnx.split(model, nnx.Param)
    pure = nnx.as_pure(params)
    state = tx.init(pure)
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
    for _ in range(3):
      opt.update(model, nnx.grad(_loss)(model, x))
      grads = jax.grad(lambda p, g=graph: _loss(nnx.merge(g, p), x))(pure)
      updates, state = tx.update(grads, state, pure)
      pure = optax.apply_updates(pure, updates)
    got = nnx.as_pure(nnx.state(model, nnx.Param))
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(pure), strict=True):
      np.testing.assert_array_equal(g, w)
    assert any(mo.is_compressed(c) for c in jax.tree.leaves(
        nnx.as_pure(opt.opt_state), is_leaf=mo.is_compressed))


def test_flax_serialization_round_trip_is_bit_exact():
  """flax.serialization.to_bytes / from_bytes of FP8 states (stochastic and nearest rounding,
  with and without expansion): the restored state equals the saved one and continues alike."""
  from flax import serialization

  params = {"w": jax.random.normal(jax.random.key(0), (64, 300)), "b": jnp.zeros((7,))}
  grads = jax.tree.map(lambda p: jnp.cos(p) + 0.1, params)
  for tx in (mo.adamw_fp8(1e-3), mo.adamw_fp8(1e-3, config={"rounding": "nearest"}),
             mo.compress_states(optax.adam(1e-3), expansion=False)):
    state = tx.init(params)
    for _ in range(2):
      _, state = tx.update(grads, state, params)
    restored = serialization.from_bytes(tx.init(params), serialization.to_bytes(state))
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
      np.testing.assert_array_equal(a, b)
    step = jax.jit(tx.update)
    for a, b in zip(jax.tree.leaves(step(grads, restored, params)),
                    jax.tree.leaves(step(grads, state, params)), strict=True):
      np.testing.assert_array_equal(a, b)
