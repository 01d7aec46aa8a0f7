"""Edge cases of the FP8 layers: inf with a warm delayed-scaling history, zero-size batches,
and the saturation statistic at an amax that rounds just above the format's max."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mpxla import nn as mnn
from mpxla import quant
from mpxla.nn import fp8_stats


def test_delayed_scaling_does_not_hide_inf_once_the_history_is_warm():
  """An inf in x (or in the output gradient) after a step: the outputs (gradients) are not
  finite, as with stock Flax and with an empty history; never finite values clipped to the
  stale scale."""
  q = mnn.quantize(nn.Dense(8), "fp8_delayed")
  x = jax.random.normal(jax.random.key(0), (4, 16))
  v = q.init(jax.random.key(0), x)

  def loss(p, s, x, g):
    return jnp.sum(q.apply({"params": p, "fp8_state": s}, x) * g)

  ones = jnp.ones((4, 8))
  _, warm = jax.grad(loss, argnums=(0, 1))(v["params"], v["fp8_state"], x, ones)
  assert float(warm["lhs_amax_history"][0]) > 0
  y = q.apply({"params": v["params"], "fp8_state": warm}, x.at[0, 0].set(jnp.inf))
  assert not np.isfinite(np.asarray(y)).any()
  grads, _ = jax.grad(loss, argnums=(0, 1))(v["params"], warm, x, ones.at[0, 0].set(jnp.inf))
  assert not np.isfinite(np.asarray(grads["kernel"])).all()


@pytest.mark.parametrize("recipe", ["coat", "fp8_block", "hif8"])
def test_zero_size_batch_gives_an_empty_output(recipe):
  q = mnn.quantize(nn.Dense(8), recipe)
  v = q.init(jax.random.key(0), jnp.ones((2, 16)))
  y = q.apply(v, jnp.zeros((0, 16)))
  assert y.shape == (0, 8)
  assert mnn.rms_norm(jnp.zeros((0, 16)), jnp.ones((16,))).shape == (0, 16)


def test_saturation_counts_nothing_when_the_amax_rounds_to_the_top_code():
  """amax 44.285282: amax / scale rounds to just above 448 in float32, yet the element is
  the top code, not clipped; the statistic reports 0 saturated (and 1/n past a real clip)."""
  amax = np.float32(44.285282)
  scale = np.asarray(quant.scale_from_amax(jnp.asarray(amax), "e4m3"))
  assert amax * (np.float32(1) / scale) > 448  # the rounding this guards against
  rng = np.random.default_rng(0)
  x = rng.standard_normal((8, 16)).astype(np.float32)
  x = jnp.asarray(x / np.abs(x).max() * amax)
  qt = quant.quantize(x, "e4m3")
  stats = fp8_stats.tensor_stats(x, qt.codes, qt.scales, "e4m3", quant.amax(x))
  assert float(stats[2]) == 0.0
  clipped = fp8_stats.tensor_stats(x.at[0, 0].set(2 * amax), qt.codes, qt.scales, "e4m3",
                                   quant.amax(x))
  assert float(clipped[2]) == 1 / x.size


class _Block(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    return x + nn.Dense(16, name="up")(x), None


class _Scanned(nn.Module):
  @nn.compact
  def __call__(self, x):
    layers = nn.scan(_Block, variable_axes={"params": 0, "fp8_state": 0},
                     split_rngs={"params": True}, length=3)
    return layers(name="layers")(x, None)[0]


class _Unrolled(nn.Module):
  @nn.compact
  def __call__(self, x):
    for i in range(3):
      x, _ = _Block(name=f"layers_{i}")(x, None)
    return x


def test_delayed_scaling_under_nn_scan_equals_the_unrolled_layers():
  """nn.scan traces its body twice (not two calls in one step): delayed scaling works, and
  every layer's new amax histories equal those of the same layers unrolled: the forward
  ones bit for bit, the gradient's within float32 rounding (XLA computes the backward of the
  scan and of the unrolled layers as different programs)."""
  x = jax.random.normal(jax.random.key(1), (4, 16))
  scanned = mnn.quantize(_Scanned(), "fp8_delayed")
  v = scanned.init(jax.random.key(0), x)
  unrolled = mnn.quantize(_Unrolled(), "fp8_delayed")
  take = lambda tree, i: jax.tree.map(lambda a: a[i], tree)  # noqa: E731
  params_u = {f"layers_{i}": take(v["params"]["layers"], i) for i in range(3)}
  state_u = {f"layers_{i}": take(v["fp8_state"]["layers"], i) for i in range(3)}

  def new_state(model, p, s):
    return jax.grad(lambda p, s: jnp.sum(model.apply({"params": p, "fp8_state": s}, x) ** 2),
                    argnums=1)(p, s)

  for step in range(2):  # the second step reads the histories the first wrote
    got = new_state(scanned, v["params"], v["fp8_state"])
    want = new_state(unrolled, params_u, state_u)
    for i in range(3):
      for name, h in want[f"layers_{i}"]["up"].items():
        np.testing.assert_allclose(got["layers"]["up"][name][i], h, err_msg=f"{step} {i}",
                                   rtol=1e-6 if name.startswith("grad") else 0)
    v = {**v, "fp8_state": got}
    state_u = want
