"""MXFP8 matmuls (`DotConfig(scaling='mx')`): forward and gradients against float64 compositions
of the MX quantizer (itself checked bit for bit against the specification in tests/quant)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.ad_checkpoint import saved_residuals

from mpxla import quant
from mpxla.nn import fp8_dot

MX = fp8_dot.DotConfig(scaling="mx")


def _mx64(a, axis, fmt):
  return np.asarray(quant.dequantize(quant.quantize_mx(jnp.asarray(a, jnp.float32), fmt, axis),
                                     jnp.float32), np.float64)


def test_mx_dot_forward_and_gradients_are_mx_blocks_along_each_contraction():
  rng = np.random.default_rng(0)
  M, K, N = 48, 80, 40  # K, M, N not multiples of 32: padded blocks
  x = rng.standard_normal((M, K)).astype(np.float32)
  w = (rng.standard_normal((K, N)) * 0.05).astype(np.float32)
  g = (rng.standard_normal((M, N)) * 1e-3).astype(np.float32)
  dn = (((1,), (0,)), ((), ()))
  f = lambda x, w: fp8_dot.fp8_dot_general(x, w, dn, config=MX)  # noqa: E731
  y, vjp = jax.vjp(jax.jit(f), jnp.asarray(x), jnp.asarray(w))
  dx, dw = vjp(jnp.asarray(g))
  want_y = _mx64(x, 1, "e4m3") @ _mx64(w, 0, "e4m3")
  np.testing.assert_allclose(np.asarray(y, np.float64), want_y, rtol=1e-5, atol=1e-5)
  x_hat, w_hat = _mx64(x, 1, "e4m3"), _mx64(w, 0, "e4m3")
  want_dw = _mx64(x_hat, 0, "e4m3").T @ _mx64(g, 0, "e5m2")
  want_dx = _mx64(g, 1, "e5m2") @ _mx64(w_hat, 1, "e4m3").T
  np.testing.assert_allclose(np.asarray(dw, np.float64), want_dw, rtol=1e-5, atol=1e-9)
  np.testing.assert_allclose(np.asarray(dx, np.float64), want_dx, rtol=1e-5, atol=1e-9)
  # Close to the float64 matmul and its gradients. Rounding to m mantissa bits leaves a
  # relative RMS error of about 2^-(m+1) / sqrt(3) per operand (E4M3 0.036, E5M2 0.072), so
  # cosine ~ 1 - (sum of squares) / 2: >= 0.998 forward (E4M3 x E4M3), >= 0.99 for the
  # gradients (E5M2, and x or w quantized twice).
  for got, ref, bound in ((y, x @ w, 0.998), (dx, g @ w.T, 0.99), (dw, x.T @ g, 0.99)):
    got, ref = np.asarray(got, np.float64).ravel(), np.asarray(ref, np.float64).ravel()
    assert got @ ref / np.linalg.norm(got) / np.linalg.norm(ref) > bound


def test_mx_dot_saves_codes_and_uint8_scales_only():
  x = jnp.ones((64, 64), jnp.float32)
  w = jnp.ones((64, 32), jnp.float32)
  f = lambda x, w: fp8_dot.fp8_dot_general(x, w, (((1,), (0,)), ((), ())), config=MX).sum()  # noqa
  saved = saved_residuals(f, x, w)
  dtypes = {str(a.dtype) for a, _ in saved if a.size > 4}
  assert dtypes <= {"float8_e4m3fn", "uint8"}, saved


def test_mx_config_refuses_state_and_axis_name():
  with pytest.raises(ValueError, match="local"):
    fp8_dot.DotConfig(scaling="mx", axis_name="data")
  with pytest.raises(ValueError, match="keeps no state"):
    fp8_dot.fp8_dot_general(jnp.ones((2, 32)), jnp.ones((32, 2)), (((1,), (0,)), ((), ())),
                            config=MX, state={})
