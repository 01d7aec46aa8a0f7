"""The GPU grouped matmul (`mpxla.nn._gmm_gpu.gmm`, Pallas/Triton) in interpret mode against a
float64 numpy reference, forward and both gradients, with an expert that owns no block and
K, N that are not tile multiples; and its three kernels lower to Triton without a GPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mpxla.nn._gmm_gpu import gmm

E, K, N, BM = 4, 40, 70, 16
EXPERT = np.array([0, 0, 2, 2, 2, 3], np.int32)  # expert 1 owns no block
P = len(EXPERT) * BM


def data():
  rng = np.random.default_rng(0)
  return (rng.standard_normal((P, K)).astype(np.float32),
          rng.standard_normal((E, K, N)).astype(np.float32),
          rng.standard_normal((P, N)).astype(np.float32))


def blocks(a):
  return [np.float64(a[n * BM:(n + 1) * BM]) for n in range(len(EXPERT))]


def test_forward_and_gradients_match_float64():
  x, w, dy = data()
  out = gmm(jnp.asarray(x), jnp.asarray(w), jnp.asarray(EXPERT), BM, True)
  w64 = np.float64(w)
  want = np.concatenate([xb @ w64[e] for xb, e in zip(blocks(x), EXPERT, strict=True)])
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-4)
  dx, dw = jax.grad(lambda a, b: jnp.sum(gmm(a, b, jnp.asarray(EXPERT), BM, True) * dy),
                    (0, 1))(jnp.asarray(x), jnp.asarray(w))
  dx_want = np.concatenate([g @ w64[e].T for g, e in zip(blocks(dy), EXPERT, strict=True)])
  dw_want = np.zeros((E, K, N))
  for xb, g, e in zip(blocks(x), blocks(dy), EXPERT, strict=True):
    dw_want[e] += xb.T @ g
  np.testing.assert_allclose(dx, dx_want, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(dw, dw_want, rtol=1e-5, atol=1e-4)
  assert not np.asarray(dw[1]).any()  # no block: exactly zero


def test_bad_block_rows_and_row_count_raise():
  x, w, _ = data()
  with pytest.raises(ValueError, match="block_size"):
    gmm(jnp.asarray(x), jnp.asarray(w), jnp.asarray(EXPERT), 24, True)
  with pytest.raises(ValueError, match="blocks of 16 rows"):
    gmm(jnp.asarray(x[:-1]), jnp.asarray(w), jnp.asarray(EXPERT), BM, True)


def test_kernels_lower_to_triton():
  x, w, dy = data()
  grads = jax.grad(lambda a, b: jnp.sum(gmm(a, b, jnp.asarray(EXPERT), BM, False) * dy), (0, 1))
  text = jax.jit(grads).trace(jnp.asarray(x), jnp.asarray(w)).lower(
      lowering_platforms=("cuda",)).as_text()
  assert text.count("__gpu$xla.gpu.triton") == 3  # forward, dx (the forward on w^T), dw


@pytest.mark.slow  # ~25 s: interpret mode on 8 devices; the same wrapper as attention's
def test_moe_runs_the_kernels_per_batch_shard():
  """Under a mesh splitting the batch, the MoE's 'pallas_gpu' kernels run on each device's
  dispatch groups (`shard_map`: XLA cannot split a custom call), equal to the dense layer."""
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from mpxla.nn.moe import MoE

  x = jnp.asarray(np.random.default_rng(1).standard_normal((8, 12, 16)), jnp.float32)
  dense, sparse = MoE(4, 24, dispatch="dense"), MoE(4, 24, grouped_matmul="pallas_gpu")
  params = dense.init(jax.random.key(0), x)["params"]

  def grads(model):
    return jax.jit(jax.grad(lambda p, x: jnp.sum(jnp.sin(model.apply(
        {"params": p}, x, mutable=["intermediates"])[0])), (0, 1)))

  want = grads(dense)(params, x)
  mesh = jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  with jax.set_mesh(mesh):
    xs = jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp"))))
    got = grads(sparse)(params, xs)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
