"""FP8 grouped matmul (MoE experts) against a float64 numpy reference with per-expert scales."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from mpxla.nn.fp8_grouped import fp8_ragged_dot


def _q(a, dtype, fmax):
  """Per-tensor FP8 fake quantization in numpy: scale amax / max, round to nearest even."""
  amax = np.max(np.abs(a)) if a.size else 0.0
  s = amax / fmax if amax > 0 else 1.0
  return np.clip(a / s, -fmax, fmax).astype(np.float32).astype(dtype).astype(np.float64) * s


def _reference(x, w, sizes, g):
  E4, E5 = (ml_dtypes.float8_e4m3fn, 448.0), (ml_dtypes.float8_e5m2, 57344.0)
  T, N = x.shape[0], w.shape[2]
  y, dx, dw = np.zeros((T, N)), np.zeros(x.shape), np.zeros(w.shape)
  start = 0
  for e, n in enumerate(sizes):
    r = slice(start, start + n)
    xe, ge, we = _q(x[r], *E4), _q(g[r], *E5), _q(w[e], *E4)
    y[r], dx[r], dw[e] = xe @ we, ge @ we.T, xe.T @ ge
    start += n
  return y, dx, dw


@pytest.mark.parametrize("sizes", [(5, 0, 9, 3), (0, 0, 17, 0), (4, 4, 4, 4), (2, 3, 1, 0)])
def test_fp8_ragged_dot_matches_per_expert_fp8_reference(sizes):
  rng = np.random.default_rng(sum(sizes))
  T, K, N, E = 17, 24, 40, 4  # (2, 3, 1, 0): rows past the groups give 0
  x = (rng.standard_normal((T, K)) * rng.uniform(0.1, 10, (T, 1))).astype(np.float32)
  w = (rng.standard_normal((E, K, N)) * rng.uniform(0.01, 1, (E, 1, 1))).astype(np.float32)
  g = rng.standard_normal((T, N)).astype(np.float32)
  gs = jnp.asarray(sizes, jnp.int32)
  y, vjp = jax.vjp(jax.jit(lambda x, w: fp8_ragged_dot(x, w, gs)), jnp.asarray(x), jnp.asarray(w))
  dx, dw = vjp(jnp.asarray(g))
  want = _reference(x.astype(np.float64), w.astype(np.float64), sizes, g.astype(np.float64))
  for got, ref in zip((y, dx, dw), want, strict=True):
    np.testing.assert_allclose(np.asarray(got, np.float64), ref, rtol=2e-6, atol=1e-6)


def test_fp8_ragged_dot_saves_fp8_codes_and_checks_arguments():
  from jax._src.ad_checkpoint import saved_residuals

  x, w = jnp.ones((8, 16)), jnp.ones((2, 16, 4))
  gs = jnp.asarray([3, 5], jnp.int32)
  saved = saved_residuals(lambda x, w: fp8_ragged_dot(x, w, gs).sum(), x, w)
  assert {str(a.dtype) for a, _ in saved if a.size > 8} == {"float8_e4m3fn"}, saved
  with pytest.raises(ValueError, match="group_sizes"):
    fp8_ragged_dot(x, w, jnp.asarray([8], jnp.int32))
  with pytest.raises(ValueError, match="lhs"):
    fp8_ragged_dot(x, jnp.ones((2, 8, 4)), gs)


def test_fp8_grouped_matmul_shares_each_experts_scale_across_dispatch_groups():
  from mpxla.nn.fp8_grouped import fp8_grouped_matmul

  rng = np.random.default_rng(7)
  G, M, K, N, E = 3, 9, 16, 24, 4
  sizes = np.array([[2, 3, 0, 4], [0, 0, 9, 0], [1, 1, 1, 5]])  # row 2: 8 of 9 rows used
  x = (rng.standard_normal((G, M, K)) * rng.uniform(0.1, 10, (G, M, 1))).astype(np.float32)
  w = (rng.standard_normal((E, K, N)) * 0.1).astype(np.float32)
  g = rng.standard_normal((G, M, N)).astype(np.float32)
  y, vjp = jax.vjp(lambda x, w: fp8_grouped_matmul(x, w, jnp.asarray(sizes)), jnp.asarray(x),
                   jnp.asarray(w))
  dx, dw = vjp(jnp.asarray(g))
  # Reference: stack each expert's rows from all groups, then the single-group reference.
  rows = [[] for _ in range(E)]
  for gi in range(G):
    start = 0
    for e in range(E):
      rows[e] += [(gi, r) for r in range(start, start + sizes[gi, e])]
      start += sizes[gi, e]
  order = [p for e in range(E) for p in rows[e]]
  xs = np.stack([x[p] for p in order]).astype(np.float64)
  gs_ = np.stack([g[p] for p in order]).astype(np.float64)
  want_y, want_dx, want_dw = _reference(xs, w.astype(np.float64), [len(r) for r in rows], gs_)
  got_y, got_dx = np.asarray(y, np.float64), np.asarray(dx, np.float64)
  for i, p in enumerate(order):
    np.testing.assert_allclose(got_y[p], want_y[i], rtol=2e-6, atol=1e-6)
    np.testing.assert_allclose(got_dx[p], want_dx[i], rtol=2e-6, atol=1e-6)
  np.testing.assert_array_equal(got_y[2, 8], 0.0)  # a row past its group's experts
  np.testing.assert_allclose(np.asarray(dw, np.float64), want_dw, rtol=2e-6, atol=1e-6)
