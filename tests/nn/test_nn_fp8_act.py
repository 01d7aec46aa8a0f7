"""FP8-saved activations: exact forward, backward at the 1x16-dequantized input, FP8 residuals."""

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax._src.ad_checkpoint import saved_residuals

from mpxla import formats
from mpxla import nn as mnn
from mpxla.nn import flow


def np_dequant_1x16(x, fmt="e4m3"):
  """Independent 1x16 quantize -> dequantize of the last axis (numpy / ml_dtypes / HiF8 table)."""
  x = np.asarray(x, np.float32)
  xb = x.reshape(*x.shape[:-1], -1, 16)
  amax = np.max(np.abs(xb), axis=-1, keepdims=True)
  target = {"e4m3": 448.0, "hif8": 15.0}[fmt]
  s = np.where(amax > 0, np.maximum(amax * np.float32(1 / target), np.finfo(np.float32).tiny),
               np.float32(1)).astype(np.float32)
  if fmt == "e4m3":
    q = np.clip(xb / s, -448, 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
  else:
    q = formats.hif8.decode_table()[np.asarray(formats.hif8.encode(xb / s, saturate=True))]
  return (q * s).reshape(x.shape)


def ref_rms(x, scale, eps=1e-6):
  x = x.astype(jnp.float32)
  return x / jnp.sqrt(jnp.mean(x * x, -1, keepdims=True) + eps) * scale


def ref_ln(x, scale, bias, eps=1e-6):
  x = x.astype(jnp.float32)
  c = x - jnp.mean(x, -1, keepdims=True)
  return c / jnp.sqrt(jnp.mean(c * c, -1, keepdims=True) + eps) * scale + bias


def ref_swiglu(g, u):
  return g * jax.nn.sigmoid(g) * u


def ref_geglu(g, u):
  return 0.5 * g * (1 + jnp.tanh(np.sqrt(2 / np.pi) * (g + 0.044715 * g**3))) * u


D = 64
CASES = {  # name: (fp8 op, reference, n activation inputs, params)
    "gelu": (mnn.gelu, lambda x: ref_geglu(x, 1.0), 1, ()),
    "silu": (mnn.silu, lambda x: ref_swiglu(x, 1.0), 1, ()),
    "swiglu": (mnn.swiglu, ref_swiglu, 2, ()),
    "geglu": (mnn.geglu, ref_geglu, 2, ()),
    "rms_norm": (mnn.rms_norm, ref_rms, 1, (1 + 0.1 * np.arange(D, dtype=np.float32),)),
    "layer_norm": (mnn.layer_norm, ref_ln, 1, (1 + 0.1 * np.arange(D, dtype=np.float32),
                                               np.linspace(-1, 1, D, dtype=np.float32))),
}


def inputs(n):
  keys = jax.random.split(jax.random.key(0), n)
  # Rows of very different scales: per-group scaling keeps each accurate.
  return [jax.random.normal(k, (4, 8, D)) * jnp.exp(jnp.linspace(-4, 4, 8))[:, None]
          for k in keys]


@pytest.mark.parametrize("fmt", ["e4m3", "hif8"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_forward_exact_backward_at_dequantized_input(name, fmt):
  op, ref, n, params = CASES[name]
  acts = inputs(n)
  params = tuple(jnp.asarray(p) for p in params)

  @jax.jit
  def run(*args):
    out, vjp = jax.vjp(lambda *a: op(*a, fmt=fmt), *args)
    g = jax.random.normal(jax.random.key(1), out.shape)
    return out, g, vjp(g)

  out, g, grads = run(*acts, *params)
  np.testing.assert_allclose(out, ref(*acts, *params), rtol=2e-5, atol=2e-5)
  hats = [jnp.asarray(np_dequant_1x16(a, fmt)) for a in acts]
  _, ref_vjp = jax.vjp(ref, *hats, *params)
  for got, want in zip(grads, ref_vjp(g), strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(want))))


@pytest.mark.parametrize("name", ["swiglu", "rms_norm"])
def test_residuals_are_codes_and_scales(name):
  op, _, n, params = CASES[name]
  acts = [a.astype(jnp.bfloat16) for a in inputs(n)]
  f = lambda *a: jnp.sum(op(*a).astype(jnp.float32))  # noqa: E731  (linear: saves nothing itself)
  res = [(a, d) for a, d in saved_residuals(f, *acts, *params)
         if not d.startswith("from the argument")]
  act_shape = acts[0].shape
  codes = [a for a, _ in res if a.shape == act_shape]
  assert len(codes) == n and all(a.dtype.itemsize == 1 for a in codes)
  scales = [a for a, _ in res if a.shape == (*act_shape[:-1], D // 16)]
  assert len(scales) == n and all(a.dtype == jnp.float32 for a in scales)
  total = sum(a.size * a.dtype.itemsize for a, _ in res)
  assert total <= n * (np.prod(act_shape) * 1.25) + 64  # 1 byte + 4/16 byte per element


def test_fp8_output_of_a_linear_layer_is_not_quantized_again():
  x = jax.random.normal(jax.random.key(0), (32, 64)).astype(jnp.bfloat16)
  w1 = jax.random.normal(jax.random.key(1), (64, 128)).astype(jnp.bfloat16)
  w2 = jax.random.normal(jax.random.key(2), (64, 128)).astype(jnp.bfloat16)
  dn = (((1,), (0,)), ((), ()))

  def f(x):
    with flow.scope():
      gate = flow.output_point(mnn.fp8_dot_general(x, w1, dn))
      up = flow.output_point(mnn.fp8_dot_general(x, w2, dn))
      return jnp.sum(mnn.swiglu(gate, up).astype(jnp.float32))

  res = [a for a, d in saved_residuals(f, x) if not d.startswith("from the argument")]
  # x once (shared by both matmuls), w1, w2, gate and up once each: 5 code arrays.
  assert sorted(a.shape for a in res if a.dtype.itemsize == 1) == [
      (32, 64), (32, 128), (32, 128), (64, 128), (64, 128)]


def test_norm_hands_its_output_to_the_linear_layer_once():
  x = jax.random.normal(jax.random.key(0), (32, 64)).astype(jnp.bfloat16)
  ws = [jax.random.normal(jax.random.key(i), (64, 48)).astype(jnp.bfloat16) for i in (1, 2, 3)]
  cfg = mnn.DotConfig()

  def f(x):
    with flow.scope():
      h = mnn.rms_norm(x, jnp.ones(64), dtype=jnp.bfloat16, linear_input=cfg)
      return sum(jnp.sum(mnn.fp8_dot_general(h, w, (((1,), (0,)), ((), ()))).astype(jnp.float32))
                 for w in ws)

  res = [a for a, d in saved_residuals(f, x) if not d.startswith("from the argument")]
  codes = sorted(a.shape for a in res if a.dtype.itemsize == 1)
  assert codes == [(32, 64), (32, 64), (64, 48), (64, 48), (64, 48)]  # x (1x16), h (tensor), w


def test_gradient_passes_straight_through_the_output_point():
  y = jax.random.normal(jax.random.key(0), (8, 32))
  out, vjp = jax.vjp(flow.output_point, y)
  np.testing.assert_array_equal(out, np_dequant_1x16(y))
  g = jax.random.normal(jax.random.key(1), y.shape)
  np.testing.assert_array_equal(vjp(g)[0], g)


def test_bad_arguments_are_refused():
  with pytest.raises(TypeError, match="floating"):
    mnn.silu(jnp.ones((4, 16), jnp.int32))
  with pytest.raises(ValueError, match="group"):
    mnn.silu(jnp.ones((4, 16)), group=0)
  with pytest.raises(ValueError, match="fmt"):
    mnn.silu(jnp.ones((4, 16)), fmt="e3m4")


def test_nonfinite_activation_gives_nan_gradient_in_its_group_only():
  x = jnp.ones((2, 32)).at[0, 3].set(jnp.inf)
  _, vjp = jax.vjp(functools.partial(mnn.silu), x)
  dx = vjp(jnp.ones_like(x))[0]
  assert bool(jnp.all(jnp.isnan(dx[0, :16]))) and bool(jnp.all(jnp.isfinite(dx[0, 16:])))
  assert bool(jnp.all(jnp.isfinite(dx[1])))
