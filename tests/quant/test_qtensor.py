"""quantize / dequantize against a numpy + ml_dtypes reference and analytic bounds."""

import math

import en_dtypes
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mpxla import formats, quant

TINY = np.finfo(np.float32).tiny


def np_blocks(shape, granularity):
  """Block shape per axis, from the granularity's definition."""
  g = quant.as_granularity(granularity)
  if isinstance(g, quant.PerTensor):
    return tuple(shape)
  if isinstance(g, quant.PerGroup):
    axis = g.axis % len(shape)
    return tuple(g.size if i == axis else 1 for i in range(len(shape)))
  return (1,) * (len(shape) - 2) + tuple(g.shape)


def np_quantize(x, fmt, granularity, margin=0.0):
  """Reference: per-block amax by explicit loops over block slices, then cast."""
  fmt = formats.get_format(fmt)
  x = np.asarray(x, np.float32)
  block = np_blocks(x.shape, granularity)
  grid = tuple(math.ceil(d / b) for d, b in zip(x.shape, block, strict=True))
  per_tensor = isinstance(quant.as_granularity(granularity), quant.PerTensor)
  scales = np.zeros(grid, np.float32)
  deq = np.zeros(x.shape, np.float32)
  for idx in np.ndindex(*grid):
    sl = tuple(slice(i * b, (i + 1) * b) for i, b in zip(idx, block, strict=True))
    blk = x[sl]
    a = np.max(np.abs(blk))
    s = np.float32(a) * np.float32(2.0**margin / fmt.scale_target)
    s = np.float32(max(s, TINY)) if a > 0 else np.float32(1.0)
    scales[idx] = s
    y = np.clip(blk / s, -fmt.max, fmt.max)
    if fmt.name == "hif8":
      q = y.astype(en_dtypes.hifloat8).astype(np.float32)
    else:
      q = y.astype(fmt.storage_dtype).astype(np.float32)
    deq[sl] = q * s
  return (scales.reshape(()) if per_tensor else scales), deq


GRANULARITIES = ["tensor", "1x16", "1x128", "128x128", "4x8", quant.PerGroup(16, axis=0)]


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("fmt", ["e4m3", "e5m2", "hif8"])
@pytest.mark.parametrize("shape", [(130, 300), (7, 33)])
def test_matches_reference_bit_for_bit(fmt, granularity, shape):
  x = np.asarray(jax.random.normal(jax.random.key(0), shape) * jnp.exp(
      jax.random.normal(jax.random.key(1), shape) * 2))
  q = jax.jit(quant.quantize, static_argnums=(1, 2))(x, fmt, granularity)
  ref_scales, ref_deq = np_quantize(x, fmt, granularity)
  assert q.codes.shape == x.shape  # never truncated, never padded for the caller
  assert q.codes.dtype == formats.get_format(fmt).storage_dtype
  assert q.scales.shape == ref_scales.shape == quant.scales_shape(shape, granularity)
  np.testing.assert_array_equal(np.asarray(q.scales), ref_scales)
  np.testing.assert_array_equal(np.asarray(quant.dequantize(q)), ref_deq)


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("granularity", ["tensor", "1x16", "1x128", "32x32"])
def test_error_within_analytic_bound(fmt, granularity):
  """|x - deq| <= max(|x| 2^-(m+1), s * min_subnormal / 2), plus float32 rounding."""
  f = formats.get_format(fmt)
  x = jax.random.normal(jax.random.key(2), (96, 200)) * jnp.exp(
      jax.random.normal(jax.random.key(3), (96, 200)))
  q = quant.quantize(x, fmt, granularity)
  err = np.abs(np.asarray(quant.dequantize(q)) - np.asarray(x))
  block = np_blocks(x.shape, granularity)
  s = np.asarray(q.scales).reshape(-1, 1) if np.ndim(q.scales) == 0 else np.asarray(q.scales)
  for ax, b in enumerate(block):
    s = np.repeat(s, b, axis=ax)
  s = s[: x.shape[0], : x.shape[1]]
  ax_ = np.abs(np.asarray(x))
  bound = np.maximum(ax_ * 2.0 ** -(f.mantissa_bits + 1), s * f.min_subnormal / 2)
  bound = bound * (1 + 2.0**-20) + ax_ * 2.0**-22
  assert np.all(err <= bound)
  assert err.max() > 0  # it really quantized


def test_hif8_relative_error_follows_tapered_precision():
  x = jax.random.uniform(jax.random.key(5), (4096,), minval=0.5, maxval=15.0)
  q = quant.quantize(x, "hif8", "tensor")
  np.testing.assert_allclose(float(q.scales), float(jnp.max(x)) / 15.0, rtol=1e-7)
  rel = np.abs(np.asarray(quant.dequantize(q)) / np.asarray(x) - 1)
  # Scaled values lie in [2^-5, 15]: at most 2 bits lost (|e| <= 7 keeps 2 mantissa bits).
  assert rel.max() <= 2.0**-3 * (1 + 1e-6)


def test_zero_tensor_has_unit_scale_and_zero_codes():
  for g in ["tensor", "1x16"]:
    q = quant.quantize(jnp.zeros((4, 32)), "e4m3", g)
    assert np.all(np.asarray(q.scales) == 1.0)
    assert np.all(np.asarray(quant.dequantize(q)) == 0.0)
    assert bool(q.all_finite())


def test_tiny_amax_never_gives_zero_or_inf_scale():
  x = jnp.array([[1e-44, -3e-45, 0.0, 1e-40]], jnp.float32)
  q = quant.quantize(x, "e4m3", "tensor")
  s = float(q.scales)
  assert 0 < s < np.inf
  assert np.all(np.isfinite(np.asarray(quant.dequantize(q))))


def test_nonfinite_input_marks_only_its_block():
  x = jnp.ones((2, 32)).at[0, 3].set(jnp.inf).at[1, 20].set(jnp.nan)
  q = quant.quantize(x, "e4m3", "1x16")
  assert not bool(q.all_finite())
  d = np.asarray(quant.dequantize(q))
  assert np.isnan(d[0, :16]).all() and np.isnan(d[1, 16:]).all()
  np.testing.assert_array_equal(d[0, 16:], 1.0)
  np.testing.assert_array_equal(d[1, :16], 1.0)


@pytest.mark.parametrize("shape", [(64, 208), (1, 4096)])
def test_one_nan_in_a_large_tensor_shows(shape):
  x = jnp.ones(shape).at[shape[0] // 2, 77].set(jnp.nan)
  assert float(quant.amax(x)) == np.inf
  q = quant.quantize(x, "e4m3", "tensor")
  assert not bool(q.all_finite())
  assert np.isnan(np.asarray(quant.dequantize(q))).all()


def test_bad_input_errors():
  with pytest.raises(TypeError, match="floating-point"):
    quant.quantize(jnp.arange(8), "e4m3")
  with pytest.raises(ValueError, match="granularity"):
    quant.quantize(jnp.ones(8), "e4m3", "per_row")
  with pytest.raises(ValueError, match=">= 2 axes"):
    quant.quantize(jnp.ones(8), "e4m3", "128x128")
  with pytest.raises(ValueError, match="scale-grid shape"):
    quant.quantize(jnp.ones((4, 32)), "e4m3", "1x16", amax=jnp.ones(3))
  with pytest.raises(ValueError, match="positive int"):
    quant.PerGroup(0)
  with pytest.raises(ValueError, match="out of range"):
    quant.quantize(jnp.ones((4, 32)), "e4m3", quant.PerGroup(16, axis=2))


def test_delayed_scaling_history_and_saturation():
  h = quant.init_amax_history(3)
  np.testing.assert_array_equal(np.asarray(h), [0, 0, 0])
  for a in [2.0, 5.0, 1.0, 0.5]:
    h = quant.update_amax_history(h, a)
  np.testing.assert_array_equal(np.asarray(h), [0.5, 1.0, 5.0])
  assert float(quant.amax_from_history(h)) == 5.0
  # Delayed scale from the history: values above the stale amax saturate at fmt.max.
  x = jnp.array([1.0, -2.0, 10.0])
  q = quant.quantize(x, "e4m3", "tensor", amax=quant.amax_from_history(h))
  np.testing.assert_allclose(float(q.scales), 5.0 / 448, rtol=1e-7)
  d = np.asarray(quant.dequantize(q))
  np.testing.assert_allclose(d, [1.0, -2.0, 5.0], rtol=2**-4)
  # An empty (all-zero) history falls back to the current amax.
  q0 = quant.quantize(x, "e4m3", "tensor", amax=quant.amax_from_history(quant.init_amax_history(4)))
  np.testing.assert_allclose(float(q0.scales), 10.0 / 448, rtol=1e-7)
  with pytest.raises(ValueError, match="history holds shape"):
    quant.update_amax_history(h, jnp.ones(2))


def test_margin_gives_headroom():
  x = jnp.linspace(-3.0, 3.0, 64)
  q = quant.quantize(x, "e4m3", "tensor", margin=2)
  assert float(jnp.max(jnp.abs(formats.upcast(q.codes, "e4m3")))) == 112.0  # 448 / 4


def test_jit_vmap_and_dtypes():
  x = jax.random.normal(jax.random.key(9), (3, 5, 64)).astype(jnp.bfloat16)
  q = quant.quantize(x, "e4m3", "1x32")
  qv = jax.vmap(lambda v: quant.quantize(v, "e4m3", "1x32"))(x)
  np.testing.assert_array_equal(np.asarray(qv.scales), np.asarray(q.scales))
  np.testing.assert_array_equal(
      np.asarray(qv.codes).view(np.uint8), np.asarray(q.codes).view(np.uint8))
  d = jax.jit(quant.dequantize)(q)
  assert d.dtype == jnp.bfloat16 and d.shape == x.shape
  assert quant.dequantize(q, jnp.float32).dtype == jnp.float32
  leaves, treedef = jax.tree.flatten(q)
  assert len(leaves) == 2
  assert jax.tree.unflatten(treedef, leaves).granularity == quant.PerGroup(32)


def test_stochastic_quantize_is_unbiased():
  x = jnp.full((1 << 15,), 0.3) .at[0].set(1.0)  # amax 1 -> s = 1/448, 0.3/s = 134.4
  q = quant.quantize(x, "e4m3", "tensor", rounding="stochastic", key=jax.random.key(0))
  d = np.asarray(quant.dequantize(q))[1:]
  s = np.float32(q.scales)
  lo, hi = np.float32(128) * s, np.float32(144) * s  # neighbours of 134.4 on the E4M3 grid
  assert set(np.unique(d)) <= {lo, hi}
  p = (0.3 - lo) / (hi - lo)
  assert abs(d.mean() - 0.3) < 5 * (hi - lo) * math.sqrt(p * (1 - p) / d.size)
