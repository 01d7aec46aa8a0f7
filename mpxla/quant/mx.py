"""OCP Microscaling (MX v1.0): blocks of 32 elements sharing a power-of-two E8M0 scale.

    q = quantize_mx(x, 'e4m3', axis=-1)    # MXFP8: codes like x, uint8 scales [..., ceil(n/32)]
    y = dequantize(q)                      # codes * 2^(scale - 127) (`scale_values(q)`)

Per block of 32 consecutive elements along `axis` (zero-padded at the end), as the
specification's conversion (section 6.3) says:

    X = floor(log2(amax)) - emax_elem          emax_elem: E4M3 8, E5M2 15
    X = -127 if X < -127 (also for an all-zero block);  scale NaN (0xFF) if amax is inf/NaN
    P_i = round_nearest_even(V_i / 2^X), saturated to the element format's max

The scale is stored as its E8M0 code X + 127 (uint8; 0xFF = NaN, so the block
dequantizes to NaN and `QTensor.all_finite()` is False). Finite float32 inputs never need
X > 127. Dequantizing a block with X = -127 multiplies by the float32 subnormal 2^-127,
which CPUs flush to zero.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from mpxla.formats import Format, cast, get_format
from mpxla.quant.granularity import PerGroup, expand_scales, from_blocks, to_blocks
from mpxla.quant.qtensor import QTensor
from mpxla.quant.scaling import amax as compute_amax

MX_BLOCK = 32
E8M0_NAN = 0xFF


def emax(fmt: str | Format) -> int:
  """Exponent of the element format's largest power of two (E4M3 8, E5M2 15)."""
  return math.floor(math.log2(get_format(fmt).max))


def _pow2(e: jax.Array) -> jax.Array:
  """2^e (float32) for integer e in [-126, 127], from the exponent bits."""
  return jax.lax.bitcast_convert_type((e + 127) << 23, jnp.float32)


def quantize_mx(x: jax.Array, fmt: str | Format = "e4m3", axis: int = -1) -> QTensor:
  """MX quantization of x in blocks of 32 along `axis` (see the module docstring).

  Returns a `QTensor` with granularity `PerGroup(32, axis)` and uint8 E8M0 scales.
  """
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"quantize_mx needs a floating-point x, got dtype {x.dtype}.")
  fmt = get_format(fmt)
  if not fmt.is_float8:
    raise ValueError(f"fmt={fmt.name!r}: MXFP8 elements are 'e4m3' or 'e5m2'.")
  g = PerGroup(MX_BLOCK, axis)
  a = compute_amax(x, g)  # inf for a block holding inf or NaN
  bits = jax.lax.bitcast_convert_type(a, jnp.int32)
  floor_log2 = (bits >> 23) - 127  # exact for normal amax; -127 for 0 and subnormals
  e = jnp.maximum(floor_log2 - emax(fmt), -127)
  finite = jnp.isfinite(a)
  # V / 2^e as two exact multiplications by normal powers of two (2^127 and 2^-127 are not
  # both normal float32 numbers, and subnormal constants may be flushed).
  half = (-e) // 2
  inv = expand_scales(_pow2(half), x.shape, g), expand_scales(_pow2(-e - half), x.shape, g)
  xb = to_blocks(x.astype(jnp.float32), g) * inv[0] * inv[1]
  xb = jnp.where(expand_scales(finite, x.shape, g), xb, jnp.nan)
  codes = cast(from_blocks(xb, x), fmt, saturate=True)
  scales = jnp.where(finite, e + 127, E8M0_NAN).astype(jnp.uint8)
  return QTensor(codes, scales, fmt, g, tuple(x.shape), np.dtype(x.dtype))
