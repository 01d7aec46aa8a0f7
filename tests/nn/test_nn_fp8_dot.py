"""FP8 matmul: forward and VJP against a float64 numpy reference of the same quantization."""

import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax._src.ad_checkpoint import saved_residuals

from mpxla import nn as mnn
from mpxla.nn.fp8_dot import _transpose_lhs, _transpose_rhs, einsum_dimension_numbers

E4M3, E5M2 = ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2
MAX = {E4M3: 448.0, E5M2: 57344.0}
DN_2D = (((1,), (0,)), ((), ()))
DIMENSION_NUMBERS = [
    ((8, 16), (16, 4), DN_2D),
    ((2, 8, 16), (16, 3, 4), (((2,), (0,)), ((), ()))),
    ((3, 5, 7), (3, 7, 6), (((2,), (1,)), ((0,), (0,)))),
    ((5, 3, 7, 2), (2, 7, 6, 3), (((2, 3), (1, 0)), ((1,), (3,)))),
]


def np_quantize(x, dtype, axis=None):
  """(codes as float64, float32 scales) per tensor (axis=None) or per slice along `axis`."""
  x32 = np.asarray(x, np.float32)
  amax = np.max(np.abs(x32), axis=axis, keepdims=axis is not None).astype(np.float32)
  s = amax * np.float32(1.0 / MAX[dtype])
  s = np.where(amax > 0, np.maximum(s, np.finfo(np.float32).tiny), np.float32(1)).astype(np.float32)
  codes = np.clip(x32 / s, -MAX[dtype], MAX[dtype]).astype(dtype)
  return codes.astype(np.float64), s.astype(np.float64)


def np_dot(a, b, dn):
  return np.asarray(jax.lax.dot_general(jnp.asarray(a), jnp.asarray(b), dn,
                                        precision=jax.lax.Precision.HIGHEST))


def rand(shape, seed, scale=1.0):
  return jax.random.normal(jax.random.key(seed), shape) * scale


def value_and_vjp(f, x, w, g_scale=1.0, seed=2):
  """(f(x, w), d/dx, d/dw) for a random output cotangent g, in one compiled function."""

  @jax.jit
  def run(x, w):
    out, vjp = jax.vjp(f, x, w)
    g = rand(out.shape, seed, g_scale)
    return out, g, *vjp(g)

  return run(x, w)


@pytest.mark.parametrize("ls,rs,dn", DIMENSION_NUMBERS)
def test_transposes_match_jax(ls, rs, dn):
  x, w = rand(ls, 0), rand(rs, 1)
  _, g, dx, dw = value_and_vjp(lambda a, b: jax.lax.dot_general(a, b, dn), x, w)
  mine = jax.jit(lambda g, x, w: (_transpose_lhs(g, w, dn, x.ndim), _transpose_rhs(g, x, dn, w.ndim)))
  mine_dx, mine_dw = mine(g, x, w)
  np.testing.assert_allclose(mine_dx, dx, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(mine_dw, dw, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ls,rs,dn", DIMENSION_NUMBERS)
def test_tensor_scaling_matches_reference(ls, rs, dn):
  x, w = rand(ls, 0, 3.0), rand(rs, 1, 0.1)
  out, g, dx, dw = value_and_vjp(lambda a, b: mnn.fp8_dot_general(a, b, dn), x, w, 1e-3)
  (xc, sx), (wc, sw), (gc, sg) = np_quantize(x, E4M3), np_quantize(w, E4M3), np_quantize(g, E5M2)
  np.testing.assert_allclose(out, np_dot(xc, wc, dn) * (sx * sw), rtol=2e-6, atol=0)
  _, ref_vjp = jax.vjp(lambda a, b: jax.lax.dot_general(a, b, dn, precision="highest"),
                       jnp.asarray(xc, jnp.float32), jnp.asarray(wc, jnp.float32))
  ref_dx, ref_dw = ref_vjp(jnp.asarray(gc, jnp.float32))
  np.testing.assert_allclose(dx, np.asarray(ref_dx) * (sg * sw), rtol=2e-6, atol=1e-30)
  np.testing.assert_allclose(dw, np.asarray(ref_dw) * (sg * sx), rtol=2e-6, atol=1e-30)


def np_grouped_dot(a, sa, b, sb, group):
  """sum over K-groups of (a_k @ b_k) * sa_k * sb_k; a [M,K] with sa [M,nK], b [K,N], sb [nK,N]."""
  out = np.zeros((a.shape[0], b.shape[1]))
  for k in range(0, a.shape[1], group):
    kb = k // group
    out += (a[:, k:k + group] @ b[k:k + group]) * sa[:, kb:kb + 1] * sb[kb:kb + 1]
  return out


def np_group_quantize(x, dtype, group, axis):
  """1 x group quantization along `axis` of a 2-D array (zero-padded), as float64."""
  x = np.asarray(x, np.float32)
  n = x.shape[axis]
  pad = -n % group
  xp = np.pad(x, [(0, pad) if a == axis else (0, 0) for a in range(2)])
  xb = np.moveaxis(xp, axis, -1).reshape(xp.shape[1 - axis], -1, group)
  codes, s = np_quantize(xb, dtype, axis=-1)
  codes = np.moveaxis(codes.reshape(xp.shape[1 - axis], -1), -1, axis)
  codes = codes[:, :n] if axis == 1 else codes[:n]
  s = s[..., 0]  # [rows, groups]
  return codes, (s if axis == 1 else s.T)


def test_block_scaling_matches_reference():
  bs = 8
  M, K, N = 20, 28, 12  # K and M not multiples of the block: padding
  x, w = rand((M, K), 0, 2.0), rand((K, N), 1)
  w = w.at[:8, :8].multiply(100.0)  # one tile far larger than the others
  cfg = mnn.DotConfig(scaling="block", block=bs)
  out, g, dx, dw = value_and_vjp(lambda a, b: mnn.fp8_dot_general(a, b, DN_2D, config=cfg), x, w)
  xc, sx = np_group_quantize(x, E4M3, bs, axis=1)  # [M, nK]
  wp = np.pad(np.asarray(w), [(0, -K % bs), (0, -N % bs)])
  tiles = wp.reshape(wp.shape[0] // bs, bs, wp.shape[1] // bs, bs).transpose(0, 2, 1, 3)
  wcodes, ws = np_quantize(tiles.reshape(*tiles.shape[:2], -1), E4M3, axis=-1)
  wc = wcodes.reshape(tiles.shape).transpose(0, 2, 1, 3).reshape(wp.shape)[:K, :N]
  ws = ws[..., 0]  # [nK, nN]
  ws_n = np.repeat(ws, bs, axis=1)[:, :N]
  np.testing.assert_allclose(out, np_grouped_dot(xc, sx, wc, ws_n, bs), rtol=1e-5, atol=1e-6)
  # dx = g . w^T with g in 1 x bs groups along N and w's tiles transposed.
  gc, sg = np_group_quantize(g, E5M2, bs, axis=1)
  ws_k = np.repeat(ws.T, bs, axis=1)[:, :K]  # [nN, K]
  np.testing.assert_allclose(dx, np_grouped_dot(gc, sg, wc.T, ws_k, bs), rtol=1e-5, atol=1e-6)
  # dw = x^T . g with the dequantized x and g requantized in bs x 1 groups along M.
  x_hat = xc.astype(np.float32) * np.repeat(sx, bs, axis=1)[:, :K].astype(np.float32)
  x2c, sx2 = np_group_quantize(x_hat, E4M3, bs, axis=0)
  g2c, sg2 = np_group_quantize(g, E5M2, bs, axis=0)
  np.testing.assert_allclose(dw, np_grouped_dot(x2c.T, sx2.T, g2c, sg2, bs), rtol=1e-5, atol=1e-6)


def grad_hlo(cfg, state=None):
  x, w = jnp.ones((16, 32), jnp.bfloat16), jnp.ones((32, 8), jnp.bfloat16)
  f = lambda a, b, s: jnp.sum(  # noqa: E731
      mnn.fp8_dot_general(a, b, DN_2D, config=cfg, state=s).astype(jnp.float32) ** 2)
  return jax.jit(jax.grad(f, argnums=(0, 1))).lower(x, w, state).as_text()


@pytest.mark.parametrize("scaling", ["tensor", "delayed", "block"])
def test_hlo_dots_have_fp8_operands(scaling):
  cfg = mnn.DotConfig(scaling=scaling, block=16)
  state = mnn.init_delayed_state(cfg) if scaling == "delayed" else None
  dots = [line for line in grad_hlo(cfg, state).splitlines() if "stablehlo.dot_general" in line]
  operand_types = [re.search(r": \((.*)\) ->", line).group(1) for line in dots]
  assert len(dots) == 3, dots  # forward, dx, dw
  assert all("f8E4M3FN" in t for t in operand_types)
  assert sum("f8E5M2" in t for t in operand_types) == 2  # the two backward dots
  assert not any("bf16" in t or "f32" in t for t in operand_types)


@pytest.mark.parametrize("scaling", ["tensor", "delayed", "block"])
def test_saves_fp8_codes_not_inputs(scaling):
  cfg = mnn.DotConfig(scaling=scaling, block=16)
  state = mnn.init_delayed_state(cfg) if scaling == "delayed" else None
  x, w = rand((64, 32), 0).astype(jnp.bfloat16), rand((32, 48), 1).astype(jnp.bfloat16)
  f = lambda a, b: jnp.sum(mnn.fp8_dot_general(a, b, DN_2D, config=cfg, state=state) ** 2)  # noqa: E731
  res = [(a, d) for a, d in saved_residuals(f, x, w)  # without inputs, state and (out ** 2)'s
         if not d.startswith(("from the argument", "from a constant")) and a.shape != (64, 48)]
  big = [a for a, _ in res if a.size >= 32 * 32]
  assert sorted(tuple(a.shape) for a in big) == [(1, 32, 48), (1, 64, 32)] if scaling == "block" \
      else sorted(tuple(a.shape) for a in big) == [(32, 48), (64, 32)]
  assert all(a.dtype.itemsize == 1 for a in big)  # codes only: 1 byte per element
  # Codes (1 byte each) plus float32 scales: one per tensor, or per 1x16 group / 16x16 tile.
  scales = 2 if scaling != "block" else 64 * 2 + 2 * 3
  extra = 2 if scaling == "delayed" else 0  # the two current amaxes for the history update
  assert sum(a.size * a.dtype.itemsize for a, _ in res) == 64 * 32 + 32 * 48 + 4 * (scales + extra)


def test_nonfinite_input_or_gradient_gives_nan():
  x, w = rand((8, 16), 0), rand((16, 4), 1)

  @jax.jit
  def run(x, g):
    out, vjp = jax.vjp(lambda a, b: mnn.fp8_dot_general(a, b, DN_2D), x, w)
    return out, *vjp(g)

  ones = jnp.ones((8, 4))
  assert bool(jnp.all(jnp.isnan(run(x.at[3, 5].set(jnp.inf), ones)[0])))
  assert bool(jnp.all(jnp.isnan(run(x.at[3, 5].set(jnp.nan), ones)[0])))
  _, dx, dw = run(x, ones.at[0, 0].set(jnp.nan))
  assert bool(jnp.all(jnp.isnan(dx))) and bool(jnp.all(jnp.isnan(dw)))
  assert all(bool(jnp.all(jnp.isfinite(a))) for a in run(x, ones))


def test_delayed_scaling_state_is_updated_through_the_gradient():
  cfg = mnn.DotConfig(scaling="delayed", history=3)
  state = mnn.init_delayed_state(cfg)
  x, w = rand((8, 16), 0), rand((16, 4), 1)

  def loss(a, b, s):
    return jnp.sum(mnn.fp8_dot_general(a, b, DN_2D, config=cfg, state=s) * 0.5)

  step = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
  # Empty history: the current amax is used, exactly as per-tensor just-in-time scaling.
  dx, dw, new = step(x, w, state)
  dx_t, dw_t = jax.grad(lambda a, b: jnp.sum(mnn.fp8_dot_general(a, b, DN_2D) * 0.5),
                        argnums=(0, 1))(x, w)
  np.testing.assert_array_equal(dx, dx_t)
  np.testing.assert_array_equal(dw, dw_t)
  np.testing.assert_array_equal(new["lhs"], [np.max(np.abs(x)), 0, 0])
  np.testing.assert_array_equal(new["rhs"], [np.max(np.abs(w)), 0, 0])
  np.testing.assert_array_equal(new["grad"], [0.5, 0, 0])
  # Next step with a 10x larger input: the stale amax makes the large values saturate at 448.
  out = mnn.fp8_dot_general(10 * x, w, DN_2D, config=cfg, state=new)
  xc = np.clip(np.asarray(10 * x, np.float32) / (new["lhs"][0] / np.float32(448)), -448, 448)
  wc, sw = np_quantize(w, E4M3)
  ref = xc.astype(E4M3).astype(np.float64) @ wc * (new["lhs"][0] / np.float32(448) * sw)
  np.testing.assert_allclose(out, ref, rtol=1e-5)
  _, _, newer = step(10 * x, w, new)
  np.testing.assert_allclose(newer["lhs"], [10 * np.max(np.abs(x)), np.max(np.abs(x)), 0],
                             rtol=1e-6)
  assert bool(mnn.all_finite(newer))
  assert not bool(mnn.all_finite(step(x.at[0, 0].set(jnp.nan), w, newer)[2]))


def test_einsum_is_dot_general_plus_transpose():
  x, w = rand((2, 3, 4), 0), rand((4, 5, 6), 1)
  out, ref = jax.jit(lambda x, w: (mnn.fp8_einsum("btd,dhe->bthe", x, w), mnn.fp8_dot_general(
      x, w, (((2,), (0,)), ((), ())))))(x, w)
  np.testing.assert_array_equal(out, ref)
  out = jax.eval_shape(lambda a, b: mnn.fp8_einsum("bhtd,dh->bht", a, b), rand((2, 6, 3, 4), 2),
                       rand((4, 6), 3))
  assert out.shape == (2, 6, 3)
  dn, perm = einsum_dimension_numbers("...d,dk->...k", 4, 2)
  assert dn == (((3,), (0,)), ((), ())) and perm == (0, 1, 2, 3)
  with pytest.raises(ValueError, match="summed within one operand"):
    mnn.fp8_einsum("btd,de->be", x, rand((4, 5), 4))
  with pytest.raises(ValueError, match="explicit"):
    mnn.fp8_einsum("btd,de", x, rand((4, 5), 4))


def test_bad_arguments_are_refused():
  with pytest.raises(ValueError, match="scaling"):
    mnn.DotConfig(scaling="jit")
  with pytest.raises(ValueError, match="HiF8"):
    mnn.DotConfig(fwd_fmt="hif8")
  with pytest.raises(TypeError, match="floating"):
    mnn.fp8_dot_general(jnp.ones((2, 2), jnp.int32), jnp.ones((2, 2)), DN_2D)
  with pytest.raises(ValueError, match="needs state"):
    mnn.fp8_dot_general(jnp.ones((2, 2)), jnp.ones((2, 2)), DN_2D,
                        config=mnn.DotConfig(scaling="delayed"))
