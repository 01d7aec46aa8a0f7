"""mpxla.quant.tracing.after: a scheduling hint that changes no bit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mpxla.nn import flow
from mpxla.quant.tracing import after


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float8_e4m3fn, jnp.uint8])
def test_after_keeps_every_bit_and_passes_gradients(dtype):
  """`after` only orders and materializes: same bits (NaN, inf, -0, subnormals), and the
  derivative is the identity."""
  special = [np.nan, np.inf, -np.inf, -0.0, 1e-40, 3.5, -448.0, 0.0]
  x = jnp.asarray(np.array(special if dtype != jnp.uint8 else [0, 1, 7, 255, 128, 2, 3, 4]),
                  dtype)
  if dtype == jnp.float8_e4m3fn:  # no inf in E4M3
    x = jnp.where(jnp.isinf(x.astype(jnp.float32)), jnp.float8_e4m3fn(1.0), x)
  deps = (jnp.array([jnp.nan, 1.0]), jnp.array([-jnp.inf]), jnp.array([2], jnp.int32))
  got = jax.jit(lambda x, *d: after(x, *d))(x, *deps)
  assert got.dtype == x.dtype
  width = {1: np.uint8, 2: np.uint16, 4: np.uint32}[x.dtype.itemsize]
  np.testing.assert_array_equal(np.asarray(got).view(width), np.asarray(x).view(width))
  if dtype in (jnp.float32, jnp.bfloat16):
    w = jnp.arange(8.0, dtype=dtype)
    g = jax.grad(lambda x: jnp.sum(after(x, *deps) * w).astype(jnp.float32))(x)
    np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32))


def test_after_is_not_folded_away_by_xla():
  """The divisor must be a run-time value, else XLA folds the division and nothing is gained."""
  hlo = jax.jit(lambda x, d: after(x, d)).lower(
      jnp.ones((64, 64), jnp.bfloat16), jnp.ones(3)).compile().as_text()
  assert "divide(" in hlo and "u16[64,64]" in hlo


def test_nn_flow_reexports_after():
  assert flow.after is after
