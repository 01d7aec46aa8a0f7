"""E4M3 / E5M2 casts against a float64 reference built from the formats' spec."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from mpxla import formats

# (exponent bits, mantissa bits, bias, has_inf) per the OCP FP8 spec.
SPEC = {"e4m3": (4, 3, 7, False), "e5m2": (5, 2, 15, True)}


def spec_values(name):
  """All non-negative finite values of the format, by code 0x00..0x7F, from the bit fields."""
  ebits, mbits, bias, has_inf = SPEC[name]
  vals = []
  for code in range(128):
    e, m = code >> mbits, code & ((1 << mbits) - 1)
    if has_inf and e == (1 << ebits) - 1:
      continue  # inf / NaN
    if not has_inf and code == 0x7F:
      continue  # E4M3fn: S.1111.111 is NaN
    if e == 0:
      vals.append(m * 2.0 ** (1 - bias - mbits))
    else:
      vals.append((1 + m / 2**mbits) * 2.0 ** (e - bias))
  return np.array(vals)


def reference_cast(x, name, saturate):
  """Round-to-nearest-even in float64; returns float64 values (inf/NaN for overflow)."""
  vals = spec_values(name)
  x = np.asarray(x, np.float64)
  a = np.abs(x)
  if saturate:
    a = np.minimum(a, vals[-1])
  overflow_value = vals[-1] + (vals[-1] - vals[-2])  # the next grid point above max
  grid = np.append(vals, overflow_value)
  idx = np.clip(np.searchsorted(grid, a), 1, len(grid) - 1)
  lo, hi = grid[idx - 1], grid[idx]
  take_hi = (a - lo > hi - a) | ((a - lo == hi - a) & (idx % 2 == 0))
  r = np.where(take_hi, hi, lo)
  r = np.where(a > overflow_value, overflow_value, r)
  over = np.inf if SPEC[name][3] else np.nan
  r = np.where(r >= overflow_value, over, r)
  r = np.where(np.isnan(x), np.nan, r)
  return np.copysign(r, x)


def midpoint_inputs(name):
  vals = spec_values(name)
  grid = np.append(vals, vals[-1] + (vals[-1] - vals[-2]))
  mids = ((grid[1:] + grid[:-1]) / 2).astype(np.float32)
  pts = np.concatenate([mids, np.nextafter(mids, np.inf), np.nextafter(mids, -np.inf), vals])
  pts = pts.astype(np.float32)
  return np.concatenate([pts, -pts])


def assert_same(got_f8, ref, name):
  got = np.asarray(got_f8).astype(np.float64)
  ref = np.asarray(ref, np.float64)
  np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
  ok = ~np.isnan(ref)
  np.testing.assert_array_equal(got[ok], ref[ok])
  np.testing.assert_array_equal(np.signbit(got[ok]), np.signbit(ref[ok]))


@pytest.mark.parametrize("name", ["e4m3", "e5m2"])
def test_spec_values_match_ml_dtypes(name):
  # The spec reference itself agrees with the oracle package's decoding.
  dt = formats.get_format(name).storage_dtype
  codes = np.arange(128, dtype=np.uint8).view(dt).astype(np.float64)
  finite = codes[np.isfinite(codes)]
  np.testing.assert_array_equal(spec_values(name), finite)


@pytest.mark.parametrize("name", ["e4m3", "e5m2"])
def test_descriptor_matches_spec(name):
  fmt = formats.get_format(name)
  vals = spec_values(name)
  assert fmt.max == vals[-1]
  assert fmt.min_subnormal == vals[1]
  fi = ml_dtypes.finfo(fmt.storage_dtype)
  assert fmt.min_normal == float(fi.smallest_normal)
  assert fmt.mantissa_bits == fi.nmant


@pytest.mark.parametrize("name", ["e4m3", "e5m2"])
@pytest.mark.parametrize("saturate", [True, False])
def test_nearest_on_every_midpoint(name, saturate):
  x = midpoint_inputs(name)
  got = jax.jit(lambda v: formats.cast(v, name, saturate=saturate))(x)
  assert got.dtype == formats.get_format(name).storage_dtype
  assert_same(got, reference_cast(x, name, saturate), name)


@pytest.mark.parametrize("name", ["e4m3", "e5m2"])
@pytest.mark.parametrize("saturate", [True, False])
def test_nearest_on_random_float32_bits(name, saturate):
  bits = np.random.default_rng(0).integers(0, 2**32, size=1 << 18, dtype=np.uint64)
  x = bits.astype(np.uint32).view(np.float32)
  x = np.where(np.isnan(x), np.float32(np.nan), x)  # one NaN payload: numpy warns on others
  got = formats.cast(x, name, saturate=saturate)
  assert_same(got, reference_cast(x, name, saturate), name)
  if not saturate:  # the oracle package's own conversion
    with np.errstate(invalid="ignore"):
      oracle = x.astype(formats.get_format(name).storage_dtype)
    assert_same(got, oracle.astype(np.float64), name)


def test_saturation_specials():
  x = jnp.array([500.0, -500.0, 1e30, jnp.inf, -jnp.inf, jnp.nan, 464.0, 465.0])
  e4 = np.asarray(formats.cast(x, "e4m3")).astype(np.float32)
  np.testing.assert_array_equal(e4[:5], [448, -448, 448, 448, -448])
  assert np.isnan(e4[5])
  np.testing.assert_array_equal(e4[6:], [448, 448])
  # Non-saturating: E4M3 has no inf, overflow is NaN (and plain astype agrees).
  e4n = np.asarray(formats.cast(x, "e4m3", saturate=False)).astype(np.float32)
  assert np.isnan(e4n[[0, 1, 2, 3, 4, 5, 7]]).all() and e4n[6] == 448
  e5n = np.asarray(formats.cast(x, "e5m2", saturate=False)).astype(np.float32)
  np.testing.assert_array_equal(e5n[[0, 1, 2, 3, 4]], [512, -512, np.inf, np.inf, -np.inf])


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("name", ["e4m3", "e5m2"])
def test_low_precision_inputs_round_like_their_float32_value(dtype, name):
  x = jax.random.normal(jax.random.key(1), (4096,), jnp.float32) * 300
  xl = x.astype(dtype)
  a = np.asarray(formats.cast(xl, name)).astype(np.float32)
  b = np.asarray(formats.cast(xl.astype(jnp.float32), name)).astype(np.float32)
  np.testing.assert_array_equal(a, b)


def grid_neighbours(x, name):
  vals = spec_values(name)
  a = np.abs(x)
  idx = np.searchsorted(vals, a, side="right")
  return np.copysign(vals[idx - 1], x), np.copysign(vals[np.minimum(idx, len(vals) - 1)], x)


@pytest.mark.parametrize("name", ["e4m3", "e5m2"])
@pytest.mark.parametrize("value", [1.3, -1.3, 0.0213, 3e-3, 300.1, 2.0**-10 * 1.7])
def test_stochastic_is_unbiased(name, value):
  n = 1 << 16
  x = jnp.full((n,), value, jnp.float32)
  y = np.asarray(formats.cast(x, name, rounding="stochastic", key=jax.random.key(7)))
  y = y.astype(np.float64)
  lo, hi = grid_neighbours(np.float32(value), name)
  assert set(np.unique(y)) <= {lo, hi}
  p = (np.float64(np.float32(value)) - lo) / (hi - lo)
  stderr = abs(hi - lo) * np.sqrt(p * (1 - p) / n)
  assert abs(y.mean() - np.float32(value)) <= 5 * stderr + 1e-12


@pytest.mark.parametrize("name", ["e4m3", "e5m2"])
def test_stochastic_keeps_exact_values_and_is_deterministic(name):
  vals = spec_values(name)
  x = jnp.asarray(np.concatenate([vals, -vals]).astype(np.float32))
  k = jax.random.key(3)
  y = formats.cast(x, name, rounding="stochastic", key=k)
  np.testing.assert_array_equal(np.asarray(y).astype(np.float64), np.asarray(x, np.float64))
  r = jax.random.normal(jax.random.key(4), (1000,)) * 10
  a = formats.cast(r, name, rounding="stochastic", key=k)
  b = formats.cast(r, name, rounding="stochastic", key=k)
  np.testing.assert_array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8))
  # Saturation holds under stochastic rounding too.
  big = formats.cast(jnp.array([1e6, -1e6, jnp.inf]), name, rounding="stochastic", key=k)
  fmax = formats.get_format(name).max
  np.testing.assert_array_equal(np.asarray(big).astype(np.float64), [fmax, -fmax, fmax])


def test_bad_input_errors():
  with pytest.raises(TypeError, match="floating-point"):
    formats.cast(jnp.arange(4), "e4m3")
  with pytest.raises(ValueError, match="key"):
    formats.cast(jnp.ones(4), "e4m3", rounding="stochastic")
  with pytest.raises(ValueError, match="key"):
    formats.cast(jnp.ones(4), "e5m2", key=jax.random.key(0))
  with pytest.raises(ValueError, match="rounding"):
    formats.cast(jnp.ones(4), "e4m3", rounding="up")
  with pytest.raises(ValueError, match="known 8-bit format"):
    formats.cast(jnp.ones(4), "e3m4")
  with pytest.raises(TypeError, match="stored as"):
    formats.upcast(jnp.ones(4), "e4m3")


def test_fake_cast_keeps_dtype():
  x = jnp.array([1.0, 1.0625, 1.1875, 500.0], jnp.bfloat16)
  y = formats.fake_cast(x, "e4m3")
  assert y.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(y, np.float32), [1.0, 1.0, 1.25, 448.0])
