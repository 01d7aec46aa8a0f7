"""Rotary embeddings and the Linen / NNX attention layers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_helpers import np_attention, np_causal, np_document, rel_err
from flax import nnx

import mpxla.attention as A

B, T, E, H, HK, DH = 2, 40, 24, 4, 2, 8


def np_rotary(x, pos, theta):
  """Rotary embedding as complex multiplication of (x_i, x_{i+D/2}) by exp(i pos theta^-2i/D)."""
  x = np.asarray(x, np.float64)
  half = x.shape[-1] // 2
  z = x[..., :half] + 1j * x[..., half:]
  freq = theta ** (-np.arange(half) * 2.0 / x.shape[-1])
  z = z * np.exp(1j * np.asarray(pos, np.float64)[:, :, None, None] * freq)
  return np.concatenate([z.real, z.imag], axis=-1)


def test_rotary_matches_complex_rotation():
  r = np.random.default_rng(0)
  x = r.normal(size=(2, 9, 3, 16)).astype(np.float32)
  pos = r.integers(0, 5000, size=(2, 9))
  got = A.rotary_embedding(jnp.asarray(x), jnp.asarray(pos), theta=500000.0)
  assert rel_err(got, np_rotary(x, pos, 500000.0)) <= 2e-5  # float32 angles up to ~5000 rad
  with pytest.raises(ValueError, match="even head_dim"):
    A.rotary_embedding(jnp.zeros((1, 2, 1, 3)), jnp.zeros((1, 2)))


@pytest.fixture(scope="module")
def setup():
  r = np.random.default_rng(1)
  x = jnp.asarray(r.normal(size=(B, T, E)), jnp.float32)
  ids = jnp.asarray(np.repeat([[0] * 15 + [1] * 25], B, 0).astype(np.int32))
  layer = A.Attention(num_heads=H, num_kv_heads=HK, head_dim=DH, block_q=16, block_kv=16,
                      rope_theta=1000.0)
  params = jax.jit(layer.init)(jax.random.key(0), x)
  return x, ids, layer, params


def test_linen_layer_matches_manual_computation_and_nnx(setup):
  x, ids, layer, params = setup
  pos = jnp.asarray(np.tile(np.r_[np.arange(15), np.arange(25)], (B, 1)))  # per-document
  y = jax.jit(lambda p, x: layer.apply(p, x, segment_ids=ids, positions=pos))(params, x)
  w = {n: np.asarray(params["params"][n]["kernel"], np.float64) for n in "qkvo"}
  xs = np.asarray(x, np.float64)
  q = np_rotary((xs @ w["q"]).reshape(B, T, H, DH), pos, 1000.0)
  k = np_rotary((xs @ w["k"]).reshape(B, T, HK, DH), pos, 1000.0)
  v = (xs @ w["v"]).reshape(B, T, HK, DH)
  allowed = (np_document(ids, ids) & np_causal(T, T))[:, None]
  want = np_attention(q, k, v, allowed, DH ** -0.5).reshape(B, T, H * DH) @ w["o"]
  assert rel_err(y, want) <= 1e-5
  assert {n: params["params"][n]["kernel"].shape for n in "qkvo"} == {
      "q": (E, H * DH), "k": (E, HK * DH), "v": (E, HK * DH), "o": (H * DH, E)}

  nnx_layer = A.NnxAttention(E, H, HK, DH, rope_theta=1000.0, block_q=16, block_kv=16,
                             rngs=nnx.Rngs(0))
  for n in "qkvo":
    getattr(nnx_layer, n).kernel.set_value(params["params"][n]["kernel"])
  y_nnx = nnx.jit(lambda m, x: m(x, segment_ids=ids, positions=pos))(nnx_layer, x)
  np.testing.assert_array_equal(np.asarray(y_nnx), np.asarray(y))


def test_layer_gradients_prebuilt_block_mask_and_rope_shift_invariance(setup):
  x, ids, layer, params = setup

  @jax.jit
  def run(params, x, ids):
    bm = A.make_block_mask(A.causal() & A.document(ids), T, T, block_q=16, block_kv=16)
    def loss(p):
      return jnp.sum(layer.apply(p, x, mask=bm) ** 2)
    y_shift = layer.apply(params, x, mask=bm, positions=jnp.arange(T)[None] + 1000)
    return (jax.value_and_grad(loss)(params), layer.apply(params, x, segment_ids=ids), y_shift,
            layer.apply(params, x, mask=bm))

  (loss, grads), y_ids, y_shift, y_bm = run(params, x, ids)
  assert np.isfinite(loss) and all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
  assert all(np.abs(g).max() > 0 for g in jax.tree.leaves(grads))
  assert rel_err(y_bm, y_ids) <= 1e-6  # BlockMask == segment_ids & causal
  assert rel_err(y_shift, y_bm) <= 1e-4  # rotary scores depend on position differences only


def test_layer_bad_config(setup):
  x, ids, layer, params = setup
  bm = jax.jit(lambda: A.make_block_mask(A.causal(), T, T, block_q=16, block_kv=16))()
  with pytest.raises(ValueError, match="not both"):
    layer.apply(params, x, mask=bm, segment_ids=ids)
  with pytest.raises(ValueError, match="num_kv_heads"):
    A.NnxAttention(E, 4, 3, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="multiple of num_heads"):
    A.Attention(num_heads=5).init(jax.random.key(0), x)
