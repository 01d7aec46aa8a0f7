"""Property tests (hypothesis) of quantize / dequantize / amax, and the issue-13 odd inputs.

Random shapes (axes of size 0 and 1 included), granularities, formats and margins; the
reference computes the block amax, the scale (s = amax * 2^margin / target; 1 for amax 0;
at least the smallest normal float32), x * (1/s) and the saturating cast in numpy with ml_dtypes /
en_dtypes. Out-of-range arguments raise a ValueError / TypeError naming the argument.
"""

import math

import en_dtypes
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from mpxla import formats, quant

SETTINGS = settings(max_examples=20, deadline=None)
REF = {"e4m3": ml_dtypes.float8_e4m3fn, "e5m2": ml_dtypes.float8_e5m2, "hif8": en_dtypes.hifloat8}
TINY = np.finfo(np.float32).tiny


def np_quantize(x, fmt, group, margin):
  """float32 codes-times-scales of x: per tensor (group None) or 1 x group on the last axis."""
  x = np.asarray(x, np.float32)
  spec = formats.get_format(fmt)
  if group is None:
    blocks = x.reshape(1, x.size)
  else:
    n = -(-x.shape[-1] // group)
    padded = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, n * group - x.shape[-1])])
    blocks = padded.reshape(*x.shape[:-1], n, group)
  amax = np.abs(blocks).max(axis=-1, keepdims=True, initial=0.0)
  s = amax * np.float32(2.0**margin / spec.scale_target)
  s = np.where(amax > 0, np.maximum(s, TINY), 1.0).astype(np.float32)
  q = np.clip(blocks * (np.float32(1) / s), -spec.max, spec.max)  # x * (1/s), as quantize
  q = q.astype(REF[fmt]).astype(np.float32) * s
  if group is None:
    return q.reshape(x.shape)
  return q.reshape(*x.shape[:-1], n * group)[..., : x.shape[-1]]


@SETTINGS
@given(x=hnp.arrays(np.float32, hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=6),
                    # XLA:CPU flushes float32 subnormals to zero; numpy does not.
                    elements=st.floats(-1e4, 1e4, width=32, allow_subnormal=False)),
       fmt=st.sampled_from(sorted(REF)), group=st.sampled_from([None, 1, 4, 128]),
       margin=st.sampled_from([0.0, 1.0, -2.0, 2.5]))
def test_quantize_dequantize_equals_numpy(x, fmt, group, margin):
  g = "tensor" if group is None else quant.PerGroup(group)
  q = quant.quantize(jnp.asarray(x), fmt, g, margin=margin)
  assert q.codes.shape == x.shape
  assert q.scales.shape == quant.scales_shape(x.shape, g)
  y = quant.dequantize(q)
  assert y.shape == x.shape and y.dtype == x.dtype
  np.testing.assert_array_equal(np.asarray(y), np_quantize(x, fmt, group, margin))
  if group is None:
    assert quant.amax(jnp.asarray(x)) == np.abs(x).max(initial=0.0)


@SETTINGS
@given(margin=st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([200, -200]),
       amax=st.floats(allow_nan=True, allow_infinity=True, width=32))
def test_margin_and_amax_must_be_finite(margin, amax):
  x = jnp.array([1.0, 2.0])
  if not abs(margin) <= 40:
    with pytest.raises(ValueError, match="margin=.*must be a finite number"):
      quant.quantize(x, margin=margin)
  else:
    q = quant.quantize(x, margin=margin)
    np.testing.assert_array_equal(np.asarray(quant.dequantize(q)),
                                  np_quantize(np.asarray(x), "e4m3", None, margin))
  if not math.isfinite(amax):
    with pytest.raises(ValueError, match="amax must be finite"):
      quant.quantize(x, amax=jnp.float32(amax))


@pytest.mark.parametrize("margin", [200, float("nan"), -200])
def test_issue_margin_rows(margin):
  """Issue rows: margin 200 / nan gave all-NaN, -200 gave 5e-36 for [1, 2], silently."""
  with pytest.raises(ValueError, match="margin="):
    quant.quantize(jnp.array([1.0, 2.0]), margin=margin)
  with pytest.raises(ValueError, match="amax must be finite"):
    quant.quantize(jnp.array([1.0, 2.0]), amax=jnp.float32(np.inf))


def test_traced_margin_and_amax_show_as_nan_scales():
  """Traced values cannot be checked: a non-finite one gives NaN scales (documented)."""
  f = jax.jit(lambda m, a: quant.quantize(jnp.array([1.0, 2.0]), margin=m, amax=a).all_finite())
  assert bool(f(jnp.float32(0.0), jnp.float32(2.0)))
  assert not bool(f(jnp.float32(np.nan), jnp.float32(2.0)))
  assert not bool(f(jnp.float32(0.0), jnp.float32(np.inf)))


@SETTINGS
@given(dtype=st.sampled_from([np.float32, np.float16, ml_dtypes.bfloat16, np.uint8, np.int32,
                              np.bool_, np.complex64]))
def test_dequantize_takes_floating_dtypes_only(dtype):
  """Issue row: dequantize(q, uint8 / int32 / bool / complex64) truncated the values."""
  q = quant.quantize(jnp.array([1.75, -3.5, 0.0]), "e4m3", "tensor")  # scale 2^-7: exact
  if np.issubdtype(dtype, np.floating) or dtype is ml_dtypes.bfloat16:
    y = quant.dequantize(q, dtype)
    assert y.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(np.asarray(y, np.float32), [1.75, -3.5, 0.0])
  else:
    with pytest.raises(TypeError, match=f"dtype={np.dtype(dtype)} is not a floating-point"):
      quant.dequantize(q, dtype)


@pytest.mark.parametrize("shape", [(0,), (0, 5), (5, 0), (0, 0, 3)])
@pytest.mark.parametrize("granularity", ["tensor", "1x128", "128x128"])
def test_zero_size_arrays(shape, granularity):
  """Issue row: a zero-size array with 'tensor' granularity raised a reshape TypeError."""
  if granularity == "128x128" and len(shape) < 2:
    with pytest.raises(ValueError, match="needs an array with >= 2 axes"):
      quant.quantize(jnp.zeros(shape), "e4m3", granularity)
    return
  q = quant.quantize(jnp.zeros(shape), "e4m3", granularity)
  assert q.codes.shape == shape and q.scales.shape == quant.scales_shape(shape, granularity)
  assert np.all(np.asarray(q.scales) == 1.0)  # amax 0: scale 1
  assert quant.dequantize(q).shape == shape
  assert quant.amax(jnp.zeros(shape), granularity).shape == q.scales.shape
