"""Tests of the per-group codec (mpxla.optim.expansion) against float64 numpy references."""

import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from mpxla.formats import _bits as fp8bits
from mpxla.formats import cast, get_format, upcast
from mpxla.optim import expansion as ex
from mpxla.optim import fastmath

F32_MAX = float(np.finfo(np.float32).max)


def _np(x):
  return np.asarray(x, np.float64)


_encode = jax.jit(ex.encode, static_argnames=("fmt", "expansion"))
_decode = jax.jit(ex.decode, static_argnames=("fmt", "dtype"))


def _roundtrip(x, fmt="e4m3", expansion=True):
  enc = _encode(jnp.asarray(x, jnp.float32), fmt=fmt, expansion=expansion)
  return enc, _decode(enc, fmt=fmt)


def _coat_reference(x, fmt="e4m3"):
  """COAT's algorithm in float64 numpy: (k, codes as float64, decoded values)."""
  f = get_format(fmt)
  m = f.max
  x = _np(x)
  ax = np.abs(x)
  amax = ax.max(-1, keepdims=True)
  amin = np.where(ax > 0, ax, np.inf).min(-1, keepdims=True)
  ratio = math.log2(m * m / 2) / np.log2(amax / amin)
  k = np.clip(np.floor(ratio * 16), 1, 255) / 16
  c = np.sqrt(amax * amin)
  y = np.sign(x) * (ax / c) ** k
  s = (amax / c) ** k / m
  q = (y / s).astype(ml_dtypes.float8_e4m3fn if fmt == "e4m3" else ml_dtypes.float8_e5m2)
  q = q.astype(np.float64)
  decoded = np.sign(q) * np.abs(q * s) ** (1 / k) * c
  return k, ratio * 16, y / s, q, decoded


def _plain_reference(x):
  """Plain per-group E4M3 in numpy: absmax scaled to 448, round to nearest."""
  x = _np(x)
  scale = 448.0 / np.abs(x).max(-1, keepdims=True)
  return (x * scale).astype(ml_dtypes.float8_e4m3fn).astype(np.float64) / scale


def test_linspace_k_and_c():
  x = jnp.linspace(1.0, 4.0, 128, dtype=jnp.float32)
  p = jax.jit(ex.expansion_params)(x)
  assert float(p.k[0]) == 8.25
  assert float(p.c[0]) == 2.0
  enc = ex.encode(x)
  assert int(enc.k16[0]) == 132
  assert float(enc.amax[0]) == 4.0
  # COAT's decode factor a = s^(1/k) * c equals amax * M^(-1/k).
  np.testing.assert_allclose(float(p.a[0]), 4.0 * 448.0 ** (-1 / 8.25), rtol=1e-6)


def test_matches_float64_coat_reference():
  rng = np.random.default_rng(0)
  sigmas = rng.uniform(0.05, 3.0, (400, 1))
  x = (rng.lognormal(0.0, sigmas, (400, 128)) * rng.choice([-1, 1], (400, 128))).astype(np.float32)
  k_ref, k16_exact, t_ref, q_ref, dec_ref = _coat_reference(x)
  enc, dec = _roundtrip(x)
  # k: equal unless 16 * log2(M^2/2) / log2(R) is within 1e-4 of an integer (float32 vs float64).
  clear = ~(np.abs(k16_exact - np.round(k16_exact)) <= 1e-4) | (k16_exact > 256)
  assert clear.mean() > 0.99
  np.testing.assert_array_equal(_np(enc.k16)[clear] / 16, k_ref[clear])
  # Codes: equal wherever t is not within 1e-5 (relative) of a rounding boundary.
  f8 = ml_dtypes.float8_e4m3fn
  ambiguous = (t_ref * (1 - 1e-5)).astype(f8) != (t_ref * (1 + 1e-5)).astype(f8)
  ok = clear & ~ambiguous
  assert ok.mean() > 0.98
  q = _np(jnp.asarray(enc.codes).astype(jnp.float32))
  np.testing.assert_array_equal(q[ok], q_ref[ok])
  # Decoded values: float32 math against the float64 formula.
  np.testing.assert_allclose(_np(dec)[ok], dec_ref[ok], rtol=2e-6, atol=0)


def test_all_zero_group_decodes_to_exact_zeros():
  x = np.zeros((3, 128), np.float32)
  x[1] = -0.0
  enc, dec = _roundtrip(x)
  d = np.asarray(dec)
  np.testing.assert_array_equal(d, x)
  np.testing.assert_array_equal(np.signbit(d), np.signbit(x))
  np.testing.assert_array_equal(np.asarray(enc.amax), 0.0)
  assert np.all(np.isfinite(np.asarray(enc.amax)))


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2", "hif8"])
@pytest.mark.parametrize("expansion", [True, False])
def test_constant_group_decodes_exactly(fmt, expansion):
  vals = [3.7, -3.7, 1e-20, 6.0e37, 1.0, 2.0**-126]
  x = np.array([[v] * 128 for v in vals], np.float32)
  x[0, ::2] *= -1  # Same magnitude, mixed signs.
  x[2, :64] = 0.0  # Zeros do not break constancy.
  _, dec = _roundtrip(x, fmt, expansion)
  np.testing.assert_array_equal(np.asarray(dec), x)


def test_zeros_do_not_change_k():
  rng = np.random.default_rng(1)
  v = rng.lognormal(0, 1.0, (50, 64)).astype(np.float32)
  with_zeros = np.concatenate([v, np.zeros_like(v)], -1)
  doubled = np.concatenate([v, v], -1)
  e1, d1 = _roundtrip(with_zeros)
  e2, d2 = _roundtrip(doubled)
  np.testing.assert_array_equal(np.asarray(e1.k16), np.asarray(e2.k16))
  np.testing.assert_array_equal(np.asarray(d1)[:, :64], np.asarray(d2)[:, :64])
  np.testing.assert_array_equal(np.asarray(d1)[:, 64:], 0.0)


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2", "hif8"])
def test_no_nonzero_decodes_to_zero_and_nothing_nonfinite(fmt):
  rng = np.random.default_rng(2)
  wide = rng.lognormal(0, 12.0, (200, 128)).clip(2.0**-126, F32_MAX).astype(np.float32)
  extremes = np.array(
      [[F32_MAX, -(2.0**-126)] + [1.0] * 126,
       [2.0**-126, 1.0] + [0.0] * 126,
       [1e30, -1e-30, 3.0] + [0.0] * 125,
       [F32_MAX, -F32_MAX] + [2.0**-100] * 126],
      np.float32,
  )
  x = np.concatenate([wide * rng.choice([-1, 1], wide.shape), extremes])
  for expansion in (True, False):
    _, dec = _roundtrip(x, fmt, expansion)
    d = np.asarray(dec)
    assert np.all(np.isfinite(d))
    np.testing.assert_array_equal(d != 0, x != 0)
    np.testing.assert_array_equal(np.signbit(d), np.signbit(x))


def test_saturation_and_exact_group_max():
  x = np.array([[F32_MAX, -F32_MAX, 1.0] + [0.5] * 125, [-7.0, 500.0, 1e6, 3.0] + [1.0] * 124],
               np.float32)
  for fmt in ("e4m3", "e5m2", "hif8"):
    enc, dec = _roundtrip(x, fmt)
    d = np.asarray(dec)
    f = get_format(fmt)
    q = np.abs(_np(upcast(enc.codes, fmt)))
    assert q.max() <= f.max  # Codes never exceed the format's max.
    assert np.all(np.isfinite(d))
    np.testing.assert_array_equal(d[0, :2], x[0, :2])  # +-FLT_MAX decode exactly.
    assert d[1, 2] == x[1, 2]
    assert np.all(np.abs(d) <= np.abs(x).max(-1, keepdims=True))


def test_k_policy_at_range_extremes():
  near_one = np.full((1, 128), 5.0, np.float32)
  near_one[0, :64] = np.nextafter(np.float32(5.0), np.float32(0))
  huge_range = np.array([[F32_MAX, 2.0**-126] + [1.0] * 126], np.float32)
  e1 = _encode(jnp.asarray(near_one))
  e2 = _encode(jnp.asarray(huge_range))
  assert int(e1.k16[0, 0]) == 255  # R ~ 1: k clamped to 255/16.
  assert 1 <= int(e2.k16[0, 0]) < 16  # R ~ 2^254: k < 1, at least 1/16.
  # R^k stays within M^2/2, so the smallest element gets a nonzero code.
  d2 = np.asarray(_decode(e2))
  assert d2[0, 1] > 0 and d2[0, 0] == F32_MAX


def test_non_finite_group_decodes_to_nan_and_others_unaffected():
  x = np.ones((3, 128), np.float32)
  x[0, 5] = np.nan
  x[1, 7] = np.inf
  x[1, 9] = 0.0
  enc, dec = _roundtrip(x)
  d = np.asarray(dec)
  assert np.all(np.isnan(d[:2]))
  np.testing.assert_array_equal(d[2], x[2])
  assert np.isnan(np.asarray(enc.amax)[:2]).all()


@pytest.mark.parametrize("sigma,bound", [(0.5, 10.0), (1.0, 3.0), (2.0, 0.9)])
def test_error_ratio_against_plain_e4m3(sigma, bound):
  """MSE(plain per-group E4M3) / MSE(E4M3 + expansion) on lognormal 128-element groups."""
  for seed in range(3):
    rng = np.random.default_rng(10 + seed)
    x = rng.lognormal(0.0, sigma, (4000, 128)).astype(np.float32)
    mse_plain = np.mean((_plain_reference(x) - _np(x)) ** 2)
    mse_exp = np.mean((_np(_roundtrip(x)[1]) - _np(x)) ** 2)
    assert mse_plain / mse_exp >= bound, (seed, mse_plain / mse_exp)


def _adam_like_states(rng, n_groups=500, group=128, steps=100, b1=0.9, b2=0.999):
  """float64 Adam moments of noisy gradients with per-element scales spread over decades."""
  scale = rng.lognormal(0, 1.0, (n_groups, group)) * 1e-3
  mean = rng.normal(0, 1, (n_groups, group)) * scale * 0.3
  m = np.zeros((n_groups, group))
  v = np.zeros((n_groups, group))
  for _ in range(steps):
    g = mean + scale * rng.standard_normal((n_groups, group))
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
  return m, v


def test_adam_update_error_lower_with_expansion():
  eps = 1e-8
  for seed in range(3):
    m, v = _adam_like_states(np.random.default_rng(seed))
    ref = m / (np.sqrt(v) + eps)

    err = {}
    for expansion in (False, True):
      mq = _np(_roundtrip(m, expansion=expansion)[1])
      vq = _np(_roundtrip(v, expansion=expansion)[1])
      err[expansion] = np.mean((mq / (np.sqrt(vq) + eps) - ref) ** 2)
    assert err[False] >= 1.5 * err[True], (seed, err)


def test_plain_codec_matches_numpy_reference():
  rng = np.random.default_rng(3)
  x = (rng.lognormal(0, 0.7, (200, 128)) * rng.choice([-1, 1], (200, 128))).astype(np.float32)
  _, dec = _roundtrip(x, expansion=False)
  ref = _plain_reference(x)
  # Equal up to float32 rounding of the scale (one rounding of amax/448 or 448/amax).
  np.testing.assert_allclose(_np(dec), ref, rtol=3e-7, atol=0)


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2", "hif8"])
def test_codes_are_nearest_and_decode_follows_formula(fmt):
  """In the expanded domain t = M (|x| / amax)^k, each code is a nearest format value."""
  f = get_format(fmt)
  all_codes = np.arange(256, dtype=np.uint8)
  storage = all_codes if fmt == "hif8" else all_codes.view(f.storage_dtype)
  values = _np(upcast(jnp.asarray(storage), fmt))
  grid = np.unique(np.abs(values[np.isfinite(values)]))
  grid = grid[grid <= f.max]
  rng = np.random.default_rng(4)
  x = (rng.lognormal(0, 1.5, (200, 128)) * rng.choice([-1, 1], (200, 128))).astype(np.float32)
  enc, dec = _roundtrip(x, fmt)
  k = _np(enc.k16)[:, None] / 16 if enc.k16.ndim == 1 else _np(enc.k16) / 16
  amax = _np(enc.amax)
  t = f.max * (np.abs(_np(x)) / amax) ** k
  q = np.abs(_np(upcast(enc.codes, fmt)))
  nearest = np.abs(grid[None, None, :] - t[..., None]).min(-1)
  assert np.all(np.abs(q - t) <= nearest + 1e-5 * t)
  expected = np.sign(_np(x)) * amax * (q / f.max) ** (1 / k)
  np.testing.assert_allclose(_np(dec), expected, rtol=2e-6, atol=0)


def test_fastmath_against_float64():
  rng = np.random.default_rng(5)
  x = np.exp(rng.uniform(-87, 88, 200_000)).astype(np.float32)
  np.testing.assert_allclose(_np(fastmath.log2(jnp.asarray(x))), np.log2(_np(x)), rtol=0, atol=1e-5)
  y = rng.uniform(-120, 120, 200_000).astype(np.float32)
  np.testing.assert_allclose(_np(fastmath.exp2(jnp.asarray(y))), np.exp2(_np(y)), rtol=3e-7)
  ints = np.arange(-126, 128).astype(np.float32)
  powers = np.exp2(ints.astype(np.float64)).astype(np.float32)  # Exact in float32.
  np.testing.assert_array_equal(np.asarray(fastmath.exp2(jnp.asarray(ints))), powers)
  np.testing.assert_array_equal(np.asarray(fastmath.log2(jnp.asarray(powers))), ints)


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_fp8bits_equal_formats_cast_and_upcast(fmt):
  f = get_format(fmt)
  rng = np.random.default_rng(7)
  grid = np.arange(256, dtype=np.uint8).view(f.storage_dtype).astype(np.float32)
  grid = np.unique(grid[np.isfinite(grid) & (np.abs(grid) <= f.max)])
  mids = ((grid[1:] + grid[:-1]) / 2).astype(np.float32)
  y = np.concatenate([
      rng.uniform(-f.max, f.max, 200_000).astype(np.float32),
      (np.exp(rng.uniform(-40, np.log(f.max), 200_000)) * rng.choice([-1, 1], 200_000)).astype(np.float32),
      grid, mids, np.nextafter(mids, np.float32(np.inf)), np.nextafter(mids, np.float32(-np.inf)),
      np.float32([0.0, -0.0, f.max, -f.max]),
  ]).astype(np.float32)
  y = y[np.abs(y) <= f.max]
  fast = jax.jit(lambda v: fp8bits.to_fp8(v, fmt))(jnp.asarray(y))
  ref = jax.jit(lambda v: cast(v, fmt))(jnp.asarray(y))
  np.testing.assert_array_equal(np.asarray(fast).view(np.uint8), np.asarray(ref).view(np.uint8))
  codes = jnp.asarray(np.arange(256, dtype=np.uint8).view(f.storage_dtype))
  back = np.asarray(jax.jit(lambda c: fp8bits.from_fp8(c, fmt))(codes))
  exact = np.asarray(codes.astype(jnp.float32))
  finite = np.isfinite(exact)
  np.testing.assert_array_equal(back[finite].view(np.uint32), exact[finite].view(np.uint32))
