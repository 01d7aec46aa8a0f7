"""Tests for mpxla.formats.hif8 against en_dtypes and float64 references from the spec."""

import functools

import en_dtypes
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from mpxla.formats import hif8

ALL_CODES = np.arange(256, dtype=np.uint8)


def _spec_value(code: int) -> float:
  """Value of a code from its bit string, ignoring the specials (0x6F gives 1.5*2^15)."""
  s = f"{code:08b}"
  sign, rest = (-1.0 if s[0] == "1" else 1.0), s[1:]
  for dot, d in (("11", 4), ("10", 3), ("01", 2), ("001", 1), ("0001", 0)):
    if rest.startswith(dot):
      em, mant = rest[len(dot) : len(dot) + d], rest[len(dot) + d :]
      e = 0 if d == 0 else (-1 if em[0] == "1" else 1) * (2 ** (d - 1) + int("0" + em[1:], 2))
      return sign * 2.0**e * (1 + int(mant, 2) / 2 ** len(mant))
  m = int(rest[4:], 2)
  return sign * 2.0 ** (m - 23) if m else 0.0 * sign


@functools.cache
def _ref_table() -> np.ndarray:
  """float64 reference value of every code, with the specials applied."""
  t = np.array([_spec_value(c) for c in range(256)], np.float64)
  assert t[0x6F] == 1.5 * 2**15 and t[0xEF] == -1.5 * 2**15
  t[0x80], t[0x6F], t[0xEF] = np.nan, np.inf, -np.inf
  return t


@functools.cache
def _grid() -> tuple[np.ndarray, np.ndarray]:
  """Sorted nonnegative magnitudes (0 .. 32768, then 49152 standing for Inf) and their codes."""
  t = _ref_table()
  codes = np.array([c for c in range(0x80) if c != 0x6F] + [0x6F])
  vals = np.concatenate([t[codes[:-1]], [1.5 * 2**15]])
  order = np.argsort(vals, kind="stable")
  return vals[order], codes[order]


def _neighbours(ax: np.ndarray) -> tuple[np.ndarray, ...]:
  """Grid index i with grid[i] <= ax < grid[i + 1] (clipped), lo and hi values."""
  vals, _ = _grid()
  i = np.clip(np.searchsorted(vals, ax, side="right") - 1, 0, len(vals) - 2)
  return i, vals[i], vals[i + 1]


def _with_sign(x: np.ndarray, mag_codes: np.ndarray) -> np.ndarray:
  """Signed codes from unsigned codes (0 stays 0x00) and NaN -> 0x80."""
  neg = np.signbit(x) & (mag_codes != 0)
  out = np.where(neg, mag_codes | 0x80, mag_codes)
  return np.where(np.isnan(x), 0x80, out).astype(np.uint8)


def _ref_ta(x: np.ndarray, saturate: bool = False) -> np.ndarray:
  """Reference 'ta': nearest on the grid, ties up (covers the denormal and overflow rules)."""
  vals, codes = _grid()
  ax = np.abs(_f64(x))
  i, lo, hi = _neighbours(np.where(np.isnan(ax), 0.0, ax))
  j = np.where(ax >= (lo + hi) / 2, i + 1, i)
  j = np.where(ax >= vals[-1], len(vals) - 1, j)
  mag = codes[j]
  if saturate:
    mag = np.where(mag == 0x6F, 0x6E, mag)
  return _with_sign(np.asarray(x, np.float32), mag)


def _f64(x: np.ndarray) -> np.ndarray:
  """float64 copy of float32 x (quietly, signalling NaNs included)."""
  with np.errstate(invalid="ignore"):
    return np.asarray(x, np.float32).astype(np.float64)


def _exponent(ax: np.ndarray) -> np.ndarray:
  """floor(log2(ax)) for positive finite ax (float64)."""
  return np.frexp(np.where(ax > 0, ax, 1.0))[1] - 1


def _ref_random(x: np.ndarray, u_up: np.ndarray, bands: np.ndarray) -> np.ndarray:
  """Rounds up one grid step where `u_up` (and in `bands`), else down; 'ta' elsewhere."""
  x = np.asarray(x, np.float32)
  _, codes = _grid()
  ax = np.abs(_f64(x))
  i, _, _ = _neighbours(np.where(np.isfinite(ax), ax, 0.0))
  mag = codes[np.where(u_up, i + 1, i)]
  return np.where(bands, _with_sign(x, mag), _ref_ta(x))


def _frac(x: np.ndarray) -> np.ndarray:
  """(|x| - lo) / (hi - lo) between the grid neighbours of |x| (exact in float64)."""
  ax = np.abs(_f64(x))
  _, lo, hi = _neighbours(np.where(np.isfinite(ax), ax, 0.0))
  return (ax - lo) / (hi - lo)


def _ref_hybrid(x: np.ndarray) -> np.ndarray:
  """Reference 'hybrid': F = floor(frac * 2^14) against T = low 14 mantissa bits."""
  x = np.asarray(x, np.float32)
  ax = np.abs(_f64(x))
  e = _exponent(ax)
  bands = np.isfinite(ax) & (e >= -23) & (np.abs(e) >= 4) & (e < 15)
  f = np.floor(_frac(x) * 2**14)
  t = (x.view(np.uint32) & 0x3FFF).astype(np.float64)
  return _ref_random(x, f > t, bands)


def _ref_stochastic(x: np.ndarray, rbits: np.ndarray) -> np.ndarray:
  """Reference 'stochastic': up iff rbits / 2^32 < frac (in every band from e = -23 to 14)."""
  x = np.asarray(x, np.float32)
  ax = np.abs(_f64(x))
  e = _exponent(ax)
  bands = np.isfinite(ax) & (e >= -23) & (e < 15)
  return _ref_random(x, rbits.astype(np.float64) / 2**32 < _frac(x), bands)


def _oracle(x: np.ndarray) -> np.ndarray:
  """en_dtypes' codes for float32 x ('ta', overflow to Inf)."""
  with np.errstate(invalid="ignore"):
    return np.asarray(x, np.float32).astype(en_dtypes.hifloat8).view(np.uint8)


_jit_encode = jax.jit(hif8.encode, static_argnames=("rounding", "saturate"))


def _enc(x, **kw) -> np.ndarray:
  return np.asarray(_jit_encode(jnp.asarray(np.asarray(x, np.float32)), **kw))


def _finite_values() -> np.ndarray:
  t = _ref_table()
  return t[np.isfinite(t)].astype(np.float32)


def _boundary_values() -> np.ndarray:
  """Midpoints of neighbouring grid values (incl. 2^-23 and 40960), +-1 ulp, both signs."""
  vals, _ = _grid()
  mids = ((vals[:-1] + vals[1:]) / 2).astype(np.float32)
  assert 2.0**-23 in mids and 40960.0 in mids and 1.5 * 2**-16 in mids
  pts = np.concatenate(
      [mids, np.nextafter(mids, np.float32(0)), np.nextafter(mids, np.float32(np.inf))]
  )
  return np.concatenate([pts, -pts, _finite_values()])


SPECIALS = np.array(
    [0.0, -0.0, np.inf, -np.inf, np.nan, -np.nan, 1e-30, -1e-30, 1e-45, -1e-45,
     1.1754942e-38, -1.1754942e-38, 2.0**-24, -(2.0**-24), 1e30, -1e30,
     3.4028235e38, -3.4028235e38, 65536.0, -65536.0, 49152.0, 57344.0],
    np.float32,
)  # fmt: skip


def test_decode_table_matches_spec_and_oracle():
  t = hif8.decode_table()
  assert t.shape == (256,) and t.dtype == np.float32
  ref = _ref_table()
  np.testing.assert_array_equal(t, ref.astype(np.float32))
  oracle = ALL_CODES.view(en_dtypes.hifloat8).astype(np.float32)
  np.testing.assert_array_equal(t, oracle)
  assert np.flatnonzero(np.isnan(t)).tolist() == [hif8.NAN_CODE]
  assert t[hif8.POS_INF_CODE] == np.inf and t[hif8.NEG_INF_CODE] == -np.inf
  assert np.isinf(t).sum() == 2
  assert t[hif8.MAX_CODE] == 32768.0 and t[0x7E] == 2.0**-15 and t[0x01] == 2.0**-22
  assert np.flatnonzero(t == 0).tolist() == [0]
  with pytest.raises(ValueError):
    t[0] = 1.0  # read-only


def test_decode_jax_and_dtypes():
  codes = jnp.asarray(ALL_CODES)
  np.testing.assert_array_equal(np.asarray(hif8.decode(codes)), _ref_table().astype(np.float32))
  for dtype in (jnp.bfloat16, jnp.float16):
    out = jax.jit(hif8.decode, static_argnums=1)(codes.reshape(16, 16), dtype)
    assert out.dtype == dtype and out.shape == (16, 16)
    np.testing.assert_array_equal(
        np.asarray(out, np.float32).ravel(), _ref_table().astype(dtype).astype(np.float32)
    )


@pytest.mark.parametrize(
    "make", [_finite_values, _boundary_values, lambda: SPECIALS], ids=["values", "mids", "specials"]
)
def test_ta_matches_oracle_and_reference(make):
  x = make()
  got = _enc(x)
  np.testing.assert_array_equal(got, _oracle(x))
  np.testing.assert_array_equal(got, _ref_ta(x))


def test_ta_specials_explicit():
  got = _enc(SPECIALS)
  assert got[:6].tolist() == [0x00, 0x00, 0x6F, 0xEF, 0x80, 0x80]
  assert got[6:14].tolist() == [0] * 8  # tiny, float32 subnormals, 2^-24
  assert got[14:].tolist() == [0x6F, 0xEF] * 3 + [0x6F, 0x6F]
  near = np.array([2.0**-23, np.nextafter(np.float32(2.0**-23), np.float32(0)), 40960.0,
                   np.nextafter(np.float32(40960.0), np.float32(0)), -(2.0**-23)], np.float32)  # fmt: skip
  assert _enc(near).tolist() == [0x01, 0x00, 0x6F, 0x6E, 0x81]


def test_ta_random_bit_patterns():
  rng = np.random.default_rng(0)
  x = rng.integers(0, 2**32, size=2**20, dtype=np.uint32).view(np.float32)
  got = _enc(x)
  np.testing.assert_array_equal(got, _oracle(x))
  assert np.array_equal(got[:4096], _ref_ta(x[:4096]))


def test_round_trip_all_codes():
  decoded = hif8.decode(jnp.asarray(ALL_CODES))
  np.testing.assert_array_equal(np.asarray(hif8.encode(decoded)), ALL_CODES)
  sat = np.asarray(hif8.encode(decoded, saturate=True))
  expected = ALL_CODES.copy()
  expected[[0x6F, 0xEF]] = [0x6E, 0xEE]
  np.testing.assert_array_equal(sat, expected)


def test_saturate():
  x = np.array([40960.0, 1e6, np.inf, -40960.0, -3e38, -np.inf, np.nan, 40959.996, 32768.0],
               np.float32)  # fmt: skip
  for rounding in ("ta", "hybrid"):
    got = _enc(x, rounding=rounding, saturate=True)
    assert got.tolist() == [0x6E, 0x6E, 0x6E, 0xEE, 0xEE, 0xEE, 0x80, 0x6E, 0x6E]
  got = _enc(x, rounding="stochastic", saturate=True, key=jax.random.key(0))
  assert got.tolist() == [0x6E, 0x6E, 0x6E, 0xEE, 0xEE, 0xEE, 0x80, 0x6E, 0x6E]
  b = _boundary_values()
  np.testing.assert_array_equal(_enc(b, saturate=True), _ref_ta(b, saturate=True))


def _wide_random(n: int, seed: int) -> np.ndarray:
  """Random float32 with exponents 2^-26 .. 2^17, random mantissas and signs, plus raw bits."""
  rng = np.random.default_rng(seed)
  bits = (rng.integers(127 - 26, 127 + 18, n, dtype=np.uint32) << 23) | rng.integers(
      0, 2**23, n, dtype=np.uint32
  )
  bits |= rng.integers(0, 2, n, dtype=np.uint32) << 31
  raw = rng.integers(0, 2**32, n // 8, dtype=np.uint32)
  return np.concatenate([bits, raw]).view(np.float32)


def test_hybrid_matches_reference():
  x = np.concatenate([_wide_random(2**18, 1), _boundary_values(), SPECIALS])
  got = _enc(x, rounding="hybrid")
  np.testing.assert_array_equal(got, _ref_hybrid(x))
  assert not np.array_equal(got, _ref_ta(x))  # It does differ from 'ta' somewhere.


def test_hybrid_exact_values_stay_exact():
  x = np.concatenate([_finite_values(), [np.inf, -np.inf, np.nan]]).astype(np.float32)
  np.testing.assert_array_equal(_enc(x, rounding="hybrid"), _ref_ta(x))
  np.testing.assert_array_equal(_enc(x, rounding="hybrid"), _enc(x))


def test_hybrid_equals_ta_for_small_exponents():
  rng = np.random.default_rng(2)
  x = (rng.uniform(2.0**-3, 2.0**4, 2**16) * rng.choice([-1, 1], 2**16)).astype(np.float32)
  np.testing.assert_array_equal(_enc(x, rounding="hybrid"), _oracle(x))
  top = np.linspace(32768.0, 65535.0, 4096, dtype=np.float32)  # e = 15: as 'ta'.
  np.testing.assert_array_equal(_enc(top, rounding="hybrid"), _oracle(top))


def test_stochastic_matches_reference_bits():
  x = np.concatenate([_wide_random(2**17, 3), _boundary_values(), SPECIALS])
  key = jax.random.key(7)
  got = _enc(x, rounding="stochastic", key=key)
  rbits = np.asarray(jax.random.bits(key, x.shape, jnp.uint32))
  np.testing.assert_array_equal(got, _ref_stochastic(x, rbits))
  # Only ever the two grid neighbours (or 'ta' at the edges), never beyond.
  _, lo, hi = _neighbours(np.abs(_f64(x)))
  v = np.abs(_ref_table()[got])
  ok = (v == lo) | (v == hi) | (got == _ref_ta(x))
  assert ok.all()
  np.testing.assert_array_equal(_enc(x, rounding="stochastic", key=key), got)  # deterministic
  assert not np.array_equal(_enc(x, rounding="stochastic", key=jax.random.key(8)), got)


def test_stochastic_threshold_is_exact():
  """Inputs built so the discarded bits equal R (rounds down) or R + 1 (rounds up)."""
  n = 2**14
  key = jax.random.key(3)
  u = np.asarray(jax.random.bits(key, (n,), jnp.uint32)).astype(np.float64) / 2**32
  rng = np.random.default_rng(4)
  x0 = (2.0 ** rng.integers(-22, 15, n) * rng.uniform(1, 2, n)).astype(np.float32)
  _, lo, hi = _neighbours(_f64(x0))
  ulp = 2.0 ** (_exponent(_f64(x0)) - 23)
  x_eq = lo + np.floor(u * (hi - lo) / ulp) * ulp
  sign = rng.choice([-1.0, 1.0], n)
  for x, want in ((x_eq, lo), (x_eq + ulp, hi)):
    keep = x < hi
    x32 = (sign * x).astype(np.float32)
    got = _enc(x32, rounding="stochastic", key=key)
    np.testing.assert_array_equal(np.abs(_ref_table()[got])[keep], want[keep])
    np.testing.assert_array_equal(got, _ref_stochastic(x32, (u * 2**32).astype(np.uint32)))


def test_stochastic_exact_values_stay_exact():
  x = np.concatenate([_finite_values(), [np.inf, -np.inf, np.nan]]).astype(np.float32)
  for k in range(3):
    np.testing.assert_array_equal(
        _enc(x, rounding="stochastic", key=jax.random.key(k)), _ref_ta(x)
    )


@pytest.mark.parametrize(
    "value",
    [1.3 * 2**5, -1.7 * 2**-10, 1.1 * 2**13, 1.37 * 2**-15, 1.3 * 2**-20, -1.9 * 2**-17,
     0.7 * 2**-22, 0.5000001 * 2**-22, 1.01, 3.3],
)  # fmt: skip
def test_stochastic_unbiased(value):
  n = 2**16
  x32 = np.float32(value)
  x = jnp.full((n,), x32)
  out = _f64(hif8.decode(hif8.encode(x, "stochastic", key=jax.random.key(11))))
  _, lo, hi = _neighbours(np.abs(_f64([x32])))
  lo, hi = lo[0] * np.sign(x32), hi[0] * np.sign(x32)
  assert set(np.unique(out)) <= {lo, hi}
  p = (float(x32) - lo) / (hi - lo)
  se = abs(hi - lo) * np.sqrt(p * (1 - p) / n)
  assert abs(out.mean() - float(x32)) <= 5 * se
  assert 0 < (out == hi).mean() < 1


def test_bad_inputs():
  with pytest.raises(TypeError, match="x"):
    hif8.encode(jnp.arange(4))
  with pytest.raises(TypeError, match="x"):
    hif8.encode(np.arange(4, dtype=np.int8))
  with pytest.raises(ValueError, match="key"):
    hif8.encode(jnp.ones(3), "stochastic")
  with pytest.raises(ValueError, match="key"):
    hif8.encode(jnp.ones(3), "ta", key=jax.random.key(0))
  with pytest.raises(ValueError, match="hybrid"):
    hif8.encode(jnp.ones(3), "nearest")
  with pytest.raises(TypeError, match="uint8"):
    hif8.decode(jnp.zeros(3, jnp.int32))
  with pytest.raises(TypeError, match="uint8"):
    hif8.decode(jnp.zeros(3, jnp.int8))


@pytest.mark.parametrize("dtype", [ml_dtypes.bfloat16, np.float16])
def test_half_precision_inputs(dtype):
  x16 = np.arange(2**16, dtype=np.uint16).view(dtype)
  x32 = x16.astype(np.float32)
  for rounding in ("ta", "hybrid"):
    got = np.asarray(hif8.encode(jnp.asarray(x16), rounding))
    np.testing.assert_array_equal(got, np.asarray(hif8.encode(jnp.asarray(x32), rounding)))
  np.testing.assert_array_equal(np.asarray(hif8.encode(jnp.asarray(x16))), _oracle(x32))


def test_jit_and_vmap():
  x = jnp.asarray(_wide_random(4096, 5).reshape(64, 72))
  for rounding in ("ta", "hybrid"):
    want = np.asarray(hif8.encode(x, rounding))
    assert want.shape == x.shape and want.dtype == np.uint8
    f = functools.partial(hif8.encode, rounding=rounding)
    np.testing.assert_array_equal(np.asarray(jax.vmap(f)(x)), want)
    np.testing.assert_array_equal(np.asarray(jax.jit(f)(x)), want)
  keys = jax.random.split(jax.random.key(0), 64)
  per_row = jax.vmap(lambda xi, k: hif8.encode(xi, "stochastic", key=k))(x, keys)
  for r in (0, 63):
    np.testing.assert_array_equal(
        np.asarray(per_row[r]), np.asarray(hif8.encode(x[r], "stochastic", key=keys[r]))
    )
  round_trip = jax.jit(lambda c: hif8.encode(hif8.decode(c)))(jnp.asarray(ALL_CODES))
  np.testing.assert_array_equal(np.asarray(round_trip), ALL_CODES)
