"""Property tests (hypothesis) of cast / upcast / fake_cast / hif8.decode on random inputs.

Random shapes (axes of size 0 and 1 included), input dtypes and values (specials included);
the reference is ml_dtypes (E4M3/E5M2, after clipping to +-max: cast saturates) or en_dtypes
(HiF8). Dtype arguments that are not floating raise a TypeError naming the argument.
"""

import en_dtypes
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from mpxla import formats

SETTINGS = settings(max_examples=40, deadline=None)
REF = {"e4m3": ml_dtypes.float8_e4m3fn, "e5m2": ml_dtypes.float8_e5m2, "hif8": en_dtypes.hifloat8}
FLOATS = [np.float32, np.float16, ml_dtypes.bfloat16]
NOT_FLOATING = [np.int32, np.uint8, np.bool_, np.complex64, "not a dtype"]
shapes = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5)


@st.composite
def float_arrays(draw):
  dtype = draw(st.sampled_from(FLOATS))
  values = st.floats(width=16, allow_nan=True, allow_infinity=True) | st.floats(
      -1e6, 1e6, width=32)
  x = draw(hnp.arrays(np.float32, draw(shapes), elements=values))
  with np.errstate(over="ignore"):  # beyond float16's range: inf, an input like any other
    return x.astype(dtype)


def reference(x, fmt):
  """Saturating nearest cast of x (as float32) by the oracle, as float32."""
  f32 = np.asarray(x, np.float32)
  top = float(formats.get_format(fmt).max)
  clipped = np.where(np.isnan(f32), f32, np.clip(f32, -top, top))
  return clipped.astype(REF[fmt]).astype(np.float32)


@SETTINGS
@given(x=float_arrays(), fmt=st.sampled_from(sorted(REF)))
def test_cast_then_upcast_equals_the_oracle(x, fmt):
  y = formats.upcast(formats.cast(jnp.asarray(x), fmt), fmt, jnp.float32)
  assert y.shape == x.shape and y.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(y), reference(x, fmt))
  fake = formats.fake_cast(jnp.asarray(x), fmt)
  assert fake.dtype == x.dtype  # rounds to the format, keeps x's dtype
  np.testing.assert_array_equal(np.asarray(fake, np.float32), reference(x, fmt).astype(x.dtype)
                                .astype(np.float32))


@SETTINGS
@given(shape=shapes, fmt=st.sampled_from(sorted(REF)),
       dtype=st.sampled_from(FLOATS + NOT_FLOATING))
def test_upcast_and_decode_take_floating_dtypes_only(shape, fmt, dtype):
  storage = formats.get_format(fmt).storage_dtype
  codes = np.arange(int(np.prod(shape)), dtype=np.uint8).reshape(shape).view(storage)
  calls = [lambda: formats.upcast(jnp.asarray(codes), fmt, dtype)]
  if fmt == "hif8":
    calls.append(lambda: formats.hif8.decode(jnp.asarray(codes), dtype))
  for call in calls:
    if dtype in NOT_FLOATING:
      with pytest.raises(TypeError, match=r"dtype=.*(not a floating-point dtype|not a dtype)"):
        call()
    else:
      y = call()
      want = codes.view(REF[fmt]).astype(np.float32).astype(dtype)
      assert y.dtype == np.dtype(dtype) and y.shape == tuple(shape)
      np.testing.assert_array_equal(np.asarray(y, np.float32), want.astype(np.float32))


def test_hif8_decode_to_int_is_refused_not_truncated():
  """Issue row: hif8.decode(codes, jnp.int32) returned zeros."""
  codes = formats.cast(jnp.array([1.5, -3.0]), "hif8")
  with pytest.raises(TypeError, match="dtype=int32 is not a floating-point dtype"):
    formats.hif8.decode(codes, jnp.int32)
  np.testing.assert_array_equal(formats.hif8.decode(codes, jnp.float32), [1.5, -3.0])
