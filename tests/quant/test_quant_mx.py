"""MXFP8 (`quant.quantize_mx`) bit for bit against a float64 numpy reading of OCP MX v1.0."""

import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from mpxla import quant

# Element formats from their definitions (not from mpxla.formats): mantissa bits, min
# normal exponent, max, emax = exponent of the largest power of two.
_ELEM = {"e4m3": dict(m=3, emin=-6, max=448.0, emax=8, dtype=ml_dtypes.float8_e4m3fn),
         "e5m2": dict(m=2, emin=-14, max=57344.0, emax=15, dtype=ml_dtypes.float8_e5m2)}


def _round_elem(v, f):
  """Round float64 v to the element format: nearest, ties to even, saturating at +-max."""
  out = np.empty_like(v)
  for i, x in enumerate(v.ravel()):
    if math.isnan(x):
      out.flat[i] = np.nan
      continue
    a = min(abs(x), f["max"] * 2)  # inf saturates like any value above max
    e = max(math.frexp(a)[1] - 1, f["emin"]) if a > 0 else f["emin"]
    ulp = 2.0 ** (e - f["m"])
    q = a / ulp
    r = math.floor(q)
    if q - r > 0.5 or (q - r == 0.5 and r % 2 == 1):
      r += 1
    out.flat[i] = math.copysign(min(r * ulp, f["max"]), x)
  return out


def _reference(x, fmt):
  """(element values float64 [..., n], E8M0 codes [..., nb]) of x blocked along the last axis."""
  f = _ELEM[fmt]
  x = np.asarray(x, np.float64)
  n = x.shape[-1]
  nb = -(-n // 32)
  xp = np.concatenate([x, np.zeros(x.shape[:-1] + (nb * 32 - n,))], -1).reshape(-1, nb, 32)
  vals, codes = np.empty_like(xp), np.empty(xp.shape[:2], np.uint8)
  for r in range(xp.shape[0]):
    for b in range(nb):
      blk = xp[r, b]
      amax = np.max(np.abs(blk))  # NaN if the block holds a NaN
      if not np.isfinite(amax):
        codes[r, b], vals[r, b] = 0xFF, np.nan
        continue
      X = (math.frexp(amax)[1] - 1 - f["emax"]) if amax > 0 else -127
      X = max(X, -127)
      codes[r, b] = X + 127
      vals[r, b] = _round_elem(blk / 2.0**X, f)  # exact: a power of two
  vals = vals.reshape(x.shape[:-1] + (nb * 32,))[..., :n]
  return vals, codes.reshape(x.shape[:-1] + (nb,))


def _edge_cases():
  rng = np.random.default_rng(0)
  rows = [rng.standard_normal(70) * 10.0 ** rng.integers(-30, 30)]
  rows.append(np.zeros(70))  # all-zero blocks
  row = rng.standard_normal(70)
  row[:32] *= 0
  row[32:64] = 2.0 ** 5  # amax exactly a power of two
  row[40] = -2.0 ** 5
  rows.append(row)
  row = rng.standard_normal(70)
  row[3] = np.nan
  row[40] = np.inf
  rows.append(row)  # NaN block, inf block, finite tail
  # Rounding edges: after scaling, values midway between element neighbours (ties), just
  # above and below, the largest values of a block (saturation), subnormal results.
  for fmt in ("e4m3", "e5m2"):
    f = _ELEM[fmt]
    vals = np.arange(256, dtype=np.uint8).view(f["dtype"]).astype(np.float64)
    vals = np.unique(vals[np.isfinite(vals) & (vals >= 0)])
    mids = (vals[:-1] + vals[1:]) / 2
    pts = np.concatenate([mids, mids * (1 + 2**-20), mids * (1 - 2**-20), vals])
    pts = pts[pts <= f["max"]]
    for start in range(0, len(pts), 31):
      chunk = pts[start:start + 31]
      blk = np.zeros(32)
      blk[:len(chunk)] = chunk * rng.choice([-1, 1], size=len(chunk))
      blk[31] = 2.0 ** f["emax"] * 1.9  # amax: X = 0, so the others keep their scaled value
      rows.append(np.concatenate([blk, blk * 2.0**-100, blk[:6] * 3.0]))  # + a tiny block
  rows.append(np.full(70, 3.0e38))  # large: X = 127 - emax
  rows.append(np.full(70, 2.0**-126) * np.arange(70))  # tiny amax: X = -127
  return np.stack(rows)


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_mx_quantize_is_the_specification_bit_for_bit(fmt):
  x64 = _edge_cases().astype(np.float32).astype(np.float64)  # the float32 inputs, exactly
  q = jax.jit(lambda x: quant.quantize_mx(x, fmt))(jnp.asarray(x64, jnp.float32))
  want_vals, want_codes = _reference(x64, fmt)
  assert q.scales.dtype == jnp.uint8 and q.scales.shape == want_codes.shape
  np.testing.assert_array_equal(np.asarray(q.scales), want_codes)
  got = np.asarray(q.codes).astype(np.float64)
  nan = np.isnan(want_vals)
  np.testing.assert_array_equal(np.isnan(got), nan)
  np.testing.assert_array_equal(got[~nan], want_vals[~nan])
  # Dequantize: codes * 2^X (X = -127 blocks are below float32's normal range: not checked).
  deq = np.asarray(quant.dequantize(q, jnp.float32), np.float64)
  X = np.repeat(want_codes.astype(np.int64) - 127, 32, axis=-1)[..., :x64.shape[-1]]
  ok = ~nan & (X > -127)
  np.testing.assert_array_equal(deq[ok], (want_vals * 2.0**X.astype(np.float64))[ok])
  assert not bool(q.all_finite())


def test_mx_blocks_along_any_axis_and_error_bound():
  rng = np.random.default_rng(1)
  x = rng.standard_normal((96, 40)).astype(np.float32)
  q = quant.quantize_mx(jnp.asarray(x), "e4m3", axis=0)
  assert q.scales.shape == (3, 40) and bool(q.all_finite())
  want, codes = _reference(x.T.astype(np.float64), "e4m3")
  np.testing.assert_array_equal(np.asarray(q.scales).T, codes)
  np.testing.assert_array_equal(np.asarray(q.codes).astype(np.float64).T, want)
  y = np.asarray(quant.dequantize(q))
  # E4M3 keeps 3 mantissa bits: relative error <= 2^-4 where V / 2^X is in the normal range
  # and below 448 (between 448 and 2^9 it saturates, as the specification's X allows).
  scaled = np.abs(x) / 2.0 ** np.repeat(np.asarray(q.scales, np.float64) - 127, 32, axis=0)
  normal = (scaled >= 2.0**-6) & (scaled <= 448)
  assert normal.mean() > 0.9
  assert np.all(np.abs(y - x)[normal] <= 2.0**-4 * np.abs(x)[normal])
  clipped = scaled > 448
  np.testing.assert_array_equal(np.abs(y)[clipped], (448 * 2.0 ** (np.asarray(
      q.scales, np.float64) - 127)).repeat(32, 0)[clipped])
  assert q.nbytes == 96 * 40 + 3 * 40


def test_mx_refuses_non_fp8_elements_and_integers():
  with pytest.raises(ValueError, match="e4m3"):
    quant.quantize_mx(jnp.ones(32), "hif8")
  with pytest.raises(TypeError, match="floating"):
    quant.quantize_mx(jnp.ones(32, jnp.int32))
