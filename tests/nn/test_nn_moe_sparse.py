"""Sparse MoE dispatch (sorted pairs, grouped matmuls) vs the dense reference; capacity drops.

Outputs and gradients (input, router kernel, expert weights) of the sparse layer, with both
grouped matmuls ('ragged_dot', 'blocks', 'pallas_gpu'), equal the dense-dispatch layer's within 1e-5 in
float32, Linen and NNX; the capacity's drops match a numpy count and a per-token reference.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mpxla.nn.moe import MoE, NNXMoE, expert_capacity, top_k_route
from mpxla.parallel import moe as pmoe

B, T, D, E, F = 3, 7, 6, 4, 5  # 21 tokens: divisible by nothing convenient
TOL = dict(rtol=1e-5, atol=1e-5)
IMPLS = [dict(dispatch="sparse"), dict(grouped_matmul="blocks", block_size=2),
         dict(grouped_matmul="pallas_gpu", block_size=16)]  # interpret mode on CPU


def tokens(seed=0):
  x = np.random.default_rng(seed).standard_normal((B, T, D)).astype(np.float32)
  x[..., 0] = 1.0  # a constant feature: row 0 of the router kernel acts as a bias
  return jnp.asarray(x)


@functools.cache
def params(k, routing):
  """Parameters of MoE(E, F, k); `routing` biases the router through the constant feature."""
  v = jax.jit(MoE(num_experts=E, d_ff=F, top_k=k).init)(jax.random.key(k), tokens())
  p = jax.tree.map(jnp.asarray, v["params"])
  kernel = np.array(p["router"]["kernel"])
  if routing == "skewed":  # expert E-1 receives no token, expert 2 every token (slot 0)
    kernel[0, E - 1] = -50.0
    kernel[0, 2] = 50.0
  elif routing == "unused":
    kernel[0, E - 1] = -50.0
  return {**p, "router": {"kernel": jnp.asarray(kernel)}}


def probe():
  return jnp.asarray(np.random.default_rng(9).standard_normal((B, T, D)), jnp.float32)


@functools.partial(jax.jit, static_argnums=0)
def linen_grads(model, p, x, r):
  def loss(p_, x_):
    y, inter = model.apply({"params": p_}, x_, mutable=["intermediates"])
    return jnp.sum(y * r), (y, inter["intermediates"])
  return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(p, x)


def assert_close(got, want):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(g, w, **TOL)


def test_same_parameters_as_the_dense_layer():
  dense = jax.eval_shape(MoE(E, F, dispatch="dense").init, jax.random.key(0), tokens())
  sparse = jax.eval_shape(MoE(E, F).init, jax.random.key(0), tokens())
  assert jax.tree.map(lambda a: (a.shape, a.dtype), dense) == jax.tree.map(
      lambda a: (a.shape, a.dtype), sparse)


@pytest.mark.parametrize("k,routing", [(2, "skewed"), (1, "unused"), (E, "random")])
def test_linen_sparse_equals_dense_outputs_and_gradients(k, routing):
  p, x, r = params(k, routing), tokens(), probe()
  (_, (y_ref, _)), g_ref = linen_grads(MoE(E, F, k, dispatch="dense"), p, x, r)
  idx = np.asarray(top_k_route(jnp.einsum("btd,de->bte", x, p["router"]["kernel"]), k)[1])
  if routing in ("skewed", "unused"):
    assert not (idx == E - 1).any()
  if routing == "skewed":
    assert (idx[..., 0] == 2).all()
  for impl in IMPLS:
    (_, (y, _)), g = linen_grads(MoE(E, F, k, **impl), p, x, r)
    np.testing.assert_allclose(y, y_ref, **TOL)
    assert_close(g, g_ref)


@nnx.jit
def nnx_grads(m, x, r):
  def loss(m_, x_):
    y, _ = nnx.capture(m_, nnx.Intermediate)(x_)
    return jnp.sum(y * r), y
  (value, y), (gm, gx) = nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True)(m, x)
  return y, nnx.state(gm, nnx.Param), gx


def nnx_model(p, k, **kw):
  m = NNXMoE(D, E, F, k, rngs=nnx.Rngs(0), **kw)
  m.router.kernel[...] = p["router"]["kernel"]
  for name in ("gate", "up", "down"):
    getattr(m, name)[...] = p[name]
  return m


def test_nnx_sparse_equals_dense_and_linen():
  p, x, r = params(2, "unused"), tokens(), probe()
  y_ref, g_ref, gx_ref = nnx_grads(nnx_model(p, 2, dispatch="dense"), x, r)
  (_, (y_linen, _)), (_, gx_linen) = linen_grads(MoE(E, F, 2), p, x, r)
  for impl in IMPLS[:2]:  # (the grouped matmul is shared with Linen, tested above)
    y, g, gx = nnx_grads(nnx_model(p, 2, **impl), x, r)
    np.testing.assert_allclose(y, y_ref, **TOL)
    np.testing.assert_allclose(gx, gx_ref, **TOL)
    assert_close(g, g_ref)
  np.testing.assert_allclose(y_linen, y_ref, **TOL)
  np.testing.assert_allclose(gx_linen, gx_ref, **TOL)


def np_capacity(x, p, k, cf, mask):
  """Per group (row of the batch): pairs admitted token-major while the expert has room."""
  w, idx, _ = top_k_route(jnp.einsum("btd,de->bte", x, p["router"]["kernel"]), k)
  w, idx, x64 = np.float64(w), np.asarray(idx), np.float64(x)
  cap = int(np.ceil(cf * T * k / E))
  y, dropped = np.zeros_like(x64), 0
  for b in range(B):
    used = np.zeros(E, int)
    for t in range(T):
      for j in range(k):
        if not mask[b, t]:
          continue
        e = idx[b, t, j]
        if used[e] >= cap:
          dropped += 1
          continue
        used[e] += 1
        a = x64[b, t] @ np.float64(p["gate"][e])
        h = a / (1 + np.exp(-a)) * (x64[b, t] @ np.float64(p["up"][e]))
        y[b, t] += w[b, t, j] * (h @ np.float64(p["down"][e]))
  return y, dropped / (mask.sum() * k), idx


def test_capacity_drops_match_a_numpy_count(cf=0.75):
  p, x = params(2, "skewed"), tokens()
  mask = np.ones((B, T), bool)
  mask[1, 4:] = False
  y_np, frac, idx = np_capacity(x, p, 2, cf, mask)
  assert frac > 0
  assert expert_capacity(cf, T, 2, E) == int(np.ceil(cf * T * 2 / E))
  dense = jax.jit(lambda p_, x_: MoE(E, F, dispatch="dense", capacity_factor=cf).apply(
      {"params": p_}, x_, mask=jnp.asarray(mask), mutable=["intermediates"]))(p, x)
  np.testing.assert_allclose(dense[0] * mask[..., None], y_np, **TOL)
  for impl in IMPLS:
    model = MoE(E, F, accumulate_counts=True, capacity_factor=cf, **impl)
    v = {"params": p, "moe_counts": {"counts": pmoe.init_count_buffer(E)}}
    y, upd = jax.jit(lambda v_, x_, m=model: m.apply(
        v_, x_, mask=jnp.asarray(mask), mutable=["intermediates", "moe_counts"]))(v, x)
    np.testing.assert_allclose(y, dense[0], **TOL)
    np.testing.assert_allclose(y * mask[..., None], y_np, **TOL)
    (got,) = upd["intermediates"]["dropped_fraction"]
    np.testing.assert_allclose(got, frac, rtol=1e-6)
    # The load-balancing counts are the routed pairs before any drop.
    np.testing.assert_array_equal(upd["moe_counts"]["counts"],
                                  np.bincount(idx[mask].reshape(-1), minlength=E))
  m = nnx_model(p, 2, capacity_factor=cf)
  y_nnx, captured = nnx.jit(lambda m_, x_: nnx.capture(m_, nnx.Intermediate)(
      x_, mask=jnp.asarray(mask)))(m, x)
  np.testing.assert_allclose(y_nnx, dense[0], **TOL)
  np.testing.assert_allclose(captured["dropped_fraction"][0], frac, rtol=1e-6)


def test_large_capacity_drops_nothing_and_equals_dropless():
  p, x, r = params(2, "skewed"), tokens(), probe()
  (_, (y_free, inter)), g_free = linen_grads(MoE(E, F), p, x, r)
  assert "dropped_fraction" not in inter
  (_, (y, inter)), g = linen_grads(MoE(E, F, capacity_factor=E / 2), p, x, r)  # C = T
  assert inter["dropped_fraction"][0] == 0.0
  np.testing.assert_allclose(y, y_free, **TOL)
  assert_close(g, g_free)


def test_bad_arguments_raise_value_errors_naming_them():
  x, v = tokens(), {"params": params(2, "random")}
  cases = [(dict(capacity_factor=0), "capacity_factor"), (dict(capacity_factor=-1.0),
           "capacity_factor"), (dict(dispatch="gather"), "dispatch"),
           (dict(grouped_matmul="loop"), "grouped_matmul"), (dict(block_size=0), "block_size"),
           (dict(grouped_matmul="pallas_gpu", block_size=24), "block_size")]
  for kw, name in cases:
    with pytest.raises(ValueError, match=name):
      MoE(E, F, **kw).apply(v, x, mutable=["intermediates"])
    with pytest.raises(ValueError, match=name):
      NNXMoE(D, E, F, rngs=nnx.Rngs(0), **kw)
  for k in (0, E + 1):
    with pytest.raises(ValueError, match="top_k"):
      MoE(E, F, top_k=k).apply(v, x, mutable=["intermediates"])


def test_unbounded_capacity_and_numpy_scalars():
  """capacity_factor inf or beyond int32 (C is at most the group's tokens: no drop) and
  NumPy scalars for capacity_factor and top_k: the dropless result."""
  p, x, r = params(2, "skewed"), tokens(), probe()
  (_, (y_free, _)), g_free = linen_grads(MoE(E, F), p, x, r)
  assert expert_capacity(float("inf"), 12, 2, E) == 12
  assert expert_capacity(1e12, 12, 2, E) == 12
  for kw in (dict(capacity_factor=float("inf")), dict(capacity_factor=1e12),
             dict(capacity_factor=np.float32(E / 2)), dict(top_k=np.int64(2))):
    (_, (y, inter)), g = linen_grads(MoE(E, F, **kw), p, x, r)
    assert inter.get("dropped_fraction", [0.0])[0] == 0.0, kw
    np.testing.assert_allclose(y, y_free, **TOL)
    assert_close(g, g_free)
  for bad in (float("nan"), True):
    with pytest.raises(ValueError, match="capacity_factor"):
      MoE(E, F, capacity_factor=bad).apply({"params": p}, x, mutable=["intermediates"])
