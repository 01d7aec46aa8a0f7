"""FP8 statistics (`mpxla.nn.fp8_stats`): the probe gradient against numpy, off = unchanged."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from mpxla import nn as mnn
from mpxla.nn import fp8_stats


class Model(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(8, use_bias=False, name="out")(nn.Dense(32, use_bias=False, name="hidden")(x))


def _np_stats(x, fmt_dtype, fmax):
  """amax, scale, saturated, underflow of per-tensor just-in-time FP8 scaling, in numpy."""
  x = np.asarray(x, np.float64)
  amax = np.abs(x).max()
  scale = amax / fmax
  codes = (np.clip(x / scale, -fmax, fmax)).astype(np.float32).astype(fmt_dtype)
  underflow = np.sum((x != 0) & (codes.astype(np.float64) == 0)) / max(np.sum(x != 0), 1)
  return amax, scale, np.mean(np.abs(x) / scale > fmax), underflow


def test_probe_gradient_is_the_statistics_of_input_weight_and_output_gradient():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((16, 64)).astype(np.float32)
  x[0, :20] = 1e-6  # some inputs underflow E4M3 at this scale (2^-9 * amax / 448 ~ 2e-5)
  r = rng.standard_normal((16, 8)).astype(np.float32)  # loss = sum(y * r): dL/dy = r
  q = mnn.quantize(Model(), "fp8_linear")
  v = q.init(jax.random.key(1), jnp.asarray(x))
  assert fp8_stats.COLLECTION not in v  # off unless collecting
  probes = fp8_stats.probe_shapes(q.apply, v, jnp.asarray(x))
  assert jax.tree.map(lambda a: a.shape, probes) == {"hidden": {"probe": (3, 5)},
                                                       "out": {"probe": (3, 5)}}

  def loss(params, probes):
    with fp8_stats.collecting():
      y = q.apply({"params": params, fp8_stats.COLLECTION: probes}, jnp.asarray(x))
    return jnp.sum(y * r)

  grads, stats = jax.grad(loss, argnums=(0, 1))(v["params"], probes)
  flat = fp8_stats.flatten(stats)
  assert len(flat) == 2 * 3 * 5
  e4, e5 = (ml_dtypes.float8_e4m3fn, 448.0), (ml_dtypes.float8_e5m2, 57344.0)
  w_out = np.asarray(v["params"]["out"]["kernel"])
  for name, tensor, fmt in (("hidden/input", x, e4),
                            ("hidden/weight", v["params"]["hidden"]["kernel"], e4),
                            ("out/weight", w_out, e4), ("out/grad", r, e5)):
    want = _np_stats(tensor, *fmt)
    got = [flat[f"{name}/{s}"] for s in ("amax", "scale", "saturated", "underflow")]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7, err_msg=name)
    assert flat[f"{name}/amax_ratio"] == 1.0
  assert flat["hidden/input/underflow"] > 0
  # The gradient of the hidden layer's output is r . W_out^T in FP8 (E5M2 r, E4M3 W_out).
  assert flat["hidden/grad/amax"] > 0
  # Collecting changes nothing else: same parameter gradients as without probes.
  plain = jax.grad(lambda p: jnp.sum(q.apply({"params": p}, jnp.asarray(x)) * r))(v["params"])
  jax.tree.map(np.testing.assert_array_equal, grads, plain)


def test_delayed_scaling_reports_the_ratio_to_its_history():
  x = jnp.ones((4, 64)) * 2.0
  q = mnn.quantize(Model(), "fp8_delayed")
  v = q.init(jax.random.key(0), x)
  hist = jax.tree.map(lambda h: h.at[0].set(4.0), v[mnn.COLLECTION])  # history amax 4
  probes = fp8_stats.probe_shapes(q.apply, {**v, mnn.COLLECTION: hist}, x)

  def loss(probes):
    with fp8_stats.collecting():
      return q.apply({**v, mnn.COLLECTION: hist, fp8_stats.COLLECTION: probes}, x).sum()

  flat = fp8_stats.flatten(jax.grad(loss)(probes))
  assert flat["hidden/input/amax"] == 2.0 and flat["hidden/input/amax_ratio"] == 0.5
  np.testing.assert_allclose(flat["hidden/input/scale"], 4.0 / 448, rtol=1e-6)
