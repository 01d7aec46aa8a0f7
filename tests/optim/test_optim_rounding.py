"""Stochastic rounding of compressed moments: unbiased codec, the EMA stall, determinism, resume."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import mpxla.optim as mo
from mpxla.optim import expansion as ex
from mpxla.optim.compress import encode_leaf

_M = 448.0  # E4M3's largest value.


def _e4m3_magnitudes():
  """The 127 finite non-negative E4M3 values, float64, ascending (independent of fp8bits)."""
  import ml_dtypes

  codes = np.arange(127, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn)
  return codes.astype(np.float64)


def _neighbours(x, k, amax):
  """float64 (d_lo, d_hi): the decoded values of the codes around |x| in its group.

  Decoded magnitudes are amax * (q / M)^(1/k) for the E4M3 values q (COAT's decode).
  """
  q = _e4m3_magnitudes()
  d = amax[..., None] * (q / _M) ** (1.0 / k[..., None])  # (..., groups, 1, 127)
  ax = np.abs(x)[..., None]
  below = np.where(d <= ax * (1 + 1e-6), d, -np.inf).max(-1)
  above = np.where(d >= ax * (1 - 1e-6), d, np.inf).min(-1)
  return below, above


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_floor_code_and_code_value_against_ml_dtypes(fmt):
  import ml_dtypes

  from mpxla.formats import _bits as fp8bits

  dtype = {"e4m3": ml_dtypes.float8_e4m3fn, "e5m2": ml_dtypes.float8_e5m2}[fmt]
  top = fp8bits.max_code(fmt)
  values = np.arange(top + 1, dtype=np.uint8).view(dtype).astype(np.float64)  # Ascending.
  assert float(values[-1]) == float(ml_dtypes.finfo(dtype).max)
  np.testing.assert_array_equal(
      np.asarray(fp8bits.code_value(jnp.arange(top + 1, dtype=jnp.uint32), fmt)), values)
  rng = np.random.default_rng(0)
  t = np.concatenate([values[1:], values[1:] * (1 + 1e-3), values[1:-1] * (1 - 1e-3),
                      np.exp(rng.uniform(np.log(values[1]), np.log(values[-1]), 20000))])
  t = t[(t >= values[1]) & (t <= values[-1])].astype(np.float32)
  want = np.searchsorted(values, t.astype(np.float64), side="right") - 1  # Largest value <= t.
  np.testing.assert_array_equal(np.asarray(fp8bits.floor_code(jnp.asarray(t), fmt)), want)


def test_stochastic_codes_bracket_and_are_unbiased():
  rng = np.random.default_rng(0)
  x = rng.lognormal(0.0, rng.uniform(0.2, 2.0, (16, 1)), (16, 128)) * rng.choice([-1, 1], (16, 128))
  x[3, :10] = 0.0
  x = x.astype(np.float32)
  draws = 256
  bits = jax.random.bits(jax.random.key(1), (draws, 16, 128), jnp.uint32)
  enc = jax.jit(jax.vmap(lambda b: ex.encode(jnp.asarray(x), bits=b)))(bits)
  dec = np.asarray(jax.jit(jax.vmap(ex.decode))(enc), np.float64)
  # Per group k and amax do not depend on the random bits.
  k16, amax = np.asarray(enc.k16[0], np.float64), np.asarray(enc.amax[0], np.float64)
  assert np.all(np.asarray(enc.k16) == k16) and np.all(np.asarray(enc.amax) == amax)
  lo, hi = _neighbours(np.abs(x.astype(np.float64)), k16 / 16, amax)
  near = lambda a, b: np.isclose(a, b[None], rtol=2e-6, atol=0)  # noqa: E731  fastmath vs pow
  ad = np.abs(dec)
  assert np.all(near(ad, lo) | near(ad, hi)), "a decoded value is not a neighbour of |x|"
  assert np.all(np.sign(dec)[:, x != 0] == np.sign(x)[None, x != 0])
  assert np.all(dec[:, x == 0] == 0)
  # Both neighbours occur, each with the probability that makes the mean |x|.
  inside = (hi > lo * (1 + 1e-5)) & (x != 0)
  assert near(ad, hi)[:, inside].mean() > 0.2 and near(ad, lo)[:, inside].mean() > 0.2
  err = (ad[:, inside] - np.abs(x)[inside]) / (hi - lo)[inside]  # Step-normalized, each draw unbiased.
  mean, se = err.mean(), err.std() / math.sqrt(err.size)
  assert abs(mean) < 5 * se, (mean, se)
  # Round to nearest picks one of the same two values: the closer in the expanded domain,
  # t = M (|x| / amax)^k.
  dn = np.abs(np.asarray(jax.jit(ex.decode)(jax.jit(ex.encode)(jnp.asarray(x))), np.float64))
  k = k16 / 16
  t, t_lo, t_hi = (_M * (v / amax) ** k for v in (np.abs(x), lo, hi))
  want = np.where(t - t_lo <= t_hi - t, lo, hi)
  clear = (np.abs((t - t_lo) - (t_hi - t)) > 1e-5 * t) & (x != 0)
  assert clear.mean() > 0.9
  np.testing.assert_allclose(dn[clear], want[clear], rtol=2e-6)


_STALL_B2, _STALL_STEPS = 0.99, 300


def _stall_state():
  """A second moment whose groups span 5 decades (k <= 1), and a fixed gradient.

  Columns 0 and 1 hold each group's max (1) and min (1e-5) with g^2 = v: they stay put,
  and so do k and amax. The others start at v0 in [1e-5, 0.4] with g^2 = 2 v0: per step
  v <- b2 v + (1 - b2) g^2 changes by (1 - b2)(g^2 / v - 1) <= 1% < 2^-5, less than
  half an E4M3 step at k <= 1 (2^-5 to 2^-4 relative).
  """
  rng = np.random.default_rng(3)
  v0 = 10.0 ** rng.uniform(-5.0, math.log10(0.4), (64, 128))
  v0[:, 0], v0[:, 1] = 1.0, 1e-5
  g2 = 2.0 * v0
  g2[:, :2] = v0[:, :2]
  return v0.astype(np.float32), np.sqrt(g2).astype(np.float32)


def _stall_run(rounding):
  """(decoded initial v, final v, k16) of compress_states(scale_by_rms) from v0, g fixed."""
  v0, g = _stall_state()
  opt = mo.compress_states(optax.scale_by_rms(decay=_STALL_B2, eps=0.0), min_size=1,
                           rounding=rounding)
  state = mo.compress(optax.ScaleByRmsState(nu=jnp.asarray(v0)), min_size=1, rounding=rounding)

  @jax.jit
  def run(state):
    def step(s, _):
      return opt.update(jnp.asarray(g), s)[1], None

    return jax.lax.scan(step, state, None, length=_STALL_STEPS)[0]

  final = run(state)
  return (np.asarray(mo.decompress(state).nu, np.float64),
          np.asarray(mo.decompress(final).nu, np.float64), np.asarray(final.nu.k16))


def test_ema_stall_nearest_vs_stochastic():
  _, g = _stall_state()
  rms = {}
  for rounding in ("nearest", "stochastic"):
    start, final, k16 = _stall_run(rounding)
    assert np.all(k16 <= 16)  # k <= 1: the coarse case.
    # Reference: the same EMA in float64 from the same (decoded) start.
    ref = start.copy()
    change = 0.0
    for _ in range(_STALL_STEPS):
      new = _STALL_B2 * ref + (1 - _STALL_B2) * np.float64(g) ** 2
      change = max(change, float(np.max(np.abs(new / ref - 1))))
      ref = new
    assert change < 2.0**-5
    rel = (final / ref - 1.0)[:, 2:]  # Columns 0, 1 hold each group's exact max and min.
    mean, se = rel.mean(), rel.std() / math.sqrt(rel.size)
    rms[rounding] = np.sqrt(np.mean(rel**2))
    if rounding == "nearest":
      # Stalled: far behind the EMA (which nearly doubled), and not by chance.
      assert mean < -0.2 and abs(mean) > 5 * se, (mean, se)
    else:
      assert abs(mean) < 5 * se, (mean, se)
  assert rms["stochastic"] < rms["nearest"] / 3, rms  # Noise of a few % per entry, no drift.


def _params():
  k = jax.random.split(jax.random.key(0), 2)
  return {"w": jax.random.normal(k[0], (32, 256)), "b": jax.random.normal(k[1], (16,))}


def _grads(params, i):
  return jax.tree.map(lambda p: jnp.sin(3.0 * p + i) * (1.0 + p * p), params)


_SR_ADAM = mo.compress_states(optax.adam(1e-2), min_size=1024, rounding="stochastic")


@jax.jit
def _sr_step(params, state, i):
  updates, state = _SR_ADAM.update(_grads(params, i), state, params)
  return optax.apply_updates(params, updates), state


def _bits_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(x.reshape(-1).view(np.uint8), y.reshape(-1).view(np.uint8))


def test_stochastic_is_deterministic_per_step_and_leaf_and_resumes_bit_exact(tmp_path):
  params, state = _params(), _SR_ADAM.init(_params())
  mu = state[0].mu["w"]
  assert mu.rounding == "stochastic" and mu.step.dtype == jnp.uint32 and int(mu.step) == 0
  run = [(params, state)]
  for i in range(4):
    run.append(_sr_step(*run[-1], jnp.float32(i)))
  params4, state4 = run[-1]
  assert int(state4[0].mu["w"].step) == 4 and int(state4[0].nu["w"].step) == 4
  # The same inputs give the same bits: a second run is identical.
  _bits_equal(_sr_step(*run[2], jnp.float32(2)), run[3])
  # The bits depend on the step and on the leaf (its path's hash), nothing else.
  cfg = state4[0].mu["w"].config
  x = mo.decompress(state4)[0].mu["w"] * 1.01  # Off the grid.
  enc = jax.jit(encode_leaf, static_argnames=("cfg", "salt"))
  codes = lambda step, salt: np.asarray(enc(x, cfg, step=step, salt=salt).codes)  # noqa: E731
  np.testing.assert_array_equal(codes(5, 7), codes(5, 7))
  assert np.any(codes(5, 7) != codes(6, 7)) and np.any(codes(5, 7) != codes(5, 8))
  # The first encode rounds to nearest and stores step 0.
  first = mo.compress({"x": x}, min_size=1, rounding="stochastic")["x"]
  assert int(first.step) == 0
  np.testing.assert_array_equal(first.codes, mo.compress({"x": x}, min_size=1,
                                                         rounding="nearest")["x"].codes)
  # Orbax: 2 steps, save, restore, 2 more steps == 4 steps, bit for bit.
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(tmp_path / "s2", {"params": run[2][0], "opt": run[2][1]})
  ckptr.wait_until_finished()
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                        {"params": run[2][0], "opt": run[2][1]})
  restored = ckptr.restore(tmp_path / "s2", target)
  resumed = (restored["params"], restored["opt"])
  for i in (2, 3):
    resumed = _sr_step(*resumed, jnp.float32(i))
  _bits_equal(resumed, (params4, state4))


def test_rounding_settings_and_errors():
  state = mo.compress_states(optax.adam(1e-2), min_size=1024, rounding="stochastic",
                             overrides={"mu": {"rounding": "nearest"}}).init(_params())
  assert state[0].mu["w"].rounding == "nearest" and state[0].mu["w"].step is None
  assert state[0].nu["w"].rounding == "stochastic"
  # 4 bytes for the step counter, per leaf.
  assert state[0].nu["w"].nbytes == state[0].mu["w"].nbytes + 4
  # The default: stochastic for E4M3 / E5M2, nearest for HiF8 (no stochastic path).
  assert mo.compress_states(optax.adam(1e-2)).init(_params())[0].nu["w"].rounding == "stochastic"
  hif8 = mo.compress_states(optax.adam(1e-2), fmt="hif8").init(_params())
  assert hif8[0].nu["w"].rounding == "nearest"
  mixed = mo.compress_states(optax.adam(1e-2), overrides={"nu": {"fmt": "hif8"}}).init(_params())
  assert mixed[0].nu["w"].rounding == "nearest" and mixed[0].mu["w"].rounding == "stochastic"
  with pytest.raises(ValueError, match="rounding must be one of"):
    mo.compress_states(optax.adam(1e-2), rounding="up")
  with pytest.raises(ValueError, match="rounding='stochastic' supports fmt 'e4m3' and 'e5m2'"):
    mo.compress_states(optax.adam(1e-2), fmt="hif8", rounding="stochastic")
  with pytest.raises(ValueError, match=r"overrides for .*rounding must be one of"):
    mo.compress_states(optax.adam(1e-2), overrides={"nu": {"rounding": "up"}}).init(_params())
