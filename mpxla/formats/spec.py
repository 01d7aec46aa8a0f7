"""Descriptors of the 8-bit formats: range, precision and storage dtype."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Format:
  """An 8-bit floating-point format.

  Attributes:
    name: short name ('e4m3', 'e5m2', 'hif8').
    max: largest finite value.
    min_normal: smallest positive normal value.
    min_subnormal: smallest positive value.
    mantissa_bits: stored mantissa bits (for HiF8, the most any exponent has).
    has_inf: whether the format encodes infinities.
    storage_dtype: dtype of the stored 8-bit array (HiF8 is stored as uint8 codes).
    scale_target: the value a block's amax is scaled to by `mpxla.quant`. For
      E4M3/E5M2 it is `max`. For HiF8 it is 15 = 1.875 * 2^3, the top of the
      3-mantissa-bit band: scaling to HiF8's max (2^15) would put the largest
      values where only 1 mantissa bit is left, and HiF8 has range to spare below.
  """

  name: str
  max: float
  min_normal: float
  min_subnormal: float
  mantissa_bits: int
  has_inf: bool
  storage_dtype: np.dtype
  scale_target: float

  def __repr__(self) -> str:
    return f"Format({self.name!r})"

  @property
  def is_float8(self) -> bool:
    """True when the storage dtype is a native JAX float8 dtype."""
    return self.storage_dtype != np.dtype(np.uint8)


E4M3 = Format(name="e4m3", max=448.0, min_normal=2.0**-6, min_subnormal=2.0**-9,
              mantissa_bits=3, has_inf=False, storage_dtype=np.dtype(jnp.float8_e4m3fn),
              scale_target=448.0)
E5M2 = Format(name="e5m2", max=57344.0, min_normal=2.0**-14, min_subnormal=2.0**-16,
              mantissa_bits=2, has_inf=True, storage_dtype=np.dtype(jnp.float8_e5m2),
              scale_target=57344.0)
HIF8 = Format(name="hif8", max=32768.0, min_normal=2.0**-15, min_subnormal=2.0**-22,
              mantissa_bits=3, has_inf=True, storage_dtype=np.dtype(np.uint8),
              scale_target=15.0)

FORMATS = {f.name: f for f in (E4M3, E5M2, HIF8)}
_ALIASES = {
    "float8_e4m3fn": E4M3,
    "e4m3fn": E4M3,
    "float8_e5m2": E5M2,
    "hifloat8": HIF8,
}


def get_format(fmt: str | Format) -> Format:
  """Returns the `Format` named by `fmt` ('e4m3', 'e5m2', 'hif8'), or `fmt` itself."""
  if isinstance(fmt, Format):
    return fmt
  if isinstance(fmt, str):
    key = fmt.lower()
    if key in FORMATS:
      return FORMATS[key]
    if key in _ALIASES:
      return _ALIASES[key]
  raise ValueError(
      f"fmt={fmt!r} is not a known 8-bit format; use one of {sorted(FORMATS)} "
      "or an mpxla.formats.Format."
  )


def float_dtype(dtype, name: str = "dtype") -> np.dtype:
  """`dtype` as a numpy dtype if it is a real floating-point type, else a TypeError naming `name`.

  Decoding to an integer, bool or complex type would truncate or misread the values.
  """
  try:
    d = np.dtype(dtype)
  except TypeError:
    raise TypeError(f"{name}={dtype!r} is not a dtype; pass a floating dtype such as "
                    "jnp.float32 or jnp.bfloat16.") from None
  if not jnp.issubdtype(d, jnp.floating):
    raise TypeError(f"{name}={d} is not a floating-point dtype; decoded values would be "
                    "truncated. Pass a floating dtype such as jnp.float32 or jnp.bfloat16.")
  return d
