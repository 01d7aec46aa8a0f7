"""Global metrics: weighted means with padding, token counts, sharded gradient norms."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mpxla.parallel import (
  Average,
  MeshConfig,
  batch_axes,
  count,
  global_norm,
  make_mesh,
  weighted_mean,
)

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (conftest)")


def padded_losses():
  """Per-token losses [16, 8] where each device of 8 holds a different number of real tokens."""
  rng = np.random.default_rng(3)
  loss = rng.random((16, 8)).astype(np.float32) * 4
  lengths = np.array([8, 1, 3, 0, 8, 5, 2, 7, 6, 8, 4, 1, 0, 0, 8, 2])  # row 3 etc. empty
  mask = np.arange(8)[None] < lengths[:, None]
  loss[~mask] = 1e6  # padding holds garbage that must not leak in
  return loss, mask


@pytest.mark.parametrize("mesh_shape", [dict(data=1), dict(data=2, fsdp=4), dict(data=8),
                                        dict(data=4, expert=2)])
@pytest.mark.parametrize("view", ["shard_map", "jit"])
def test_weighted_mean_and_count_with_uneven_padding(mesh_shape, view):
  n = int(np.prod(list(mesh_shape.values())))
  mesh = make_mesh(MeshConfig(**mesh_shape), devices=jax.devices()[:n])
  ax = batch_axes(mesh)
  loss, mask = padded_losses()

  def f(v, m):
    return (weighted_mean(v, m, axis_name=ax), count(m, axis_name=ax),
            Average.from_values(v, m).psum(ax).compute())

  if view == "shard_map":
    f = jax.shard_map(f, mesh=mesh, in_specs=(P(ax), P(ax)), out_specs=(P(), P(), P()))
  with jax.set_mesh(mesh):
    put = lambda a: jax.device_put(a, NamedSharding(mesh, P(ax)))  # noqa: E731
    mean, tokens, avg = jax.jit(f)(put(loss), put(mask))
  ref = np.float64(loss)[mask].mean()
  np.testing.assert_allclose(mean, ref, rtol=1e-6)
  np.testing.assert_allclose(avg, ref, rtol=1e-6)
  assert tokens == mask.sum() and tokens.dtype == jnp.int32


def test_all_padding_gives_zero_not_nan():
  loss, _ = padded_losses()
  none = np.zeros_like(loss, bool)
  assert weighted_mean(loss, none) == 0.0
  assert Average.from_values(loss, none).compute() == 0.0
  assert Average.empty().compute() == 0.0


def test_average_merges_steps_in_any_order():
  loss, mask = padded_losses()
  parts = [Average.from_values(loss[i:i + 4], mask[i:i + 4]) for i in range(0, 16, 4)]
  a = parts[0].merge(parts[1]).merge(parts[2].merge(parts[3]))
  np.testing.assert_allclose(a.compute(), np.float64(loss)[mask].mean(), rtol=1e-6)
  assert a.across_processes() is a  # one process: nothing to combine


def test_global_norm_of_fsdp_and_tensor_sharded_grads():
  mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
  rng = np.random.default_rng(4)
  grads = {"w1": rng.standard_normal((16, 12)).astype(np.float32),  # fsdp x tensor
           "w2": rng.standard_normal((12, 4)).astype(np.float32),  # tensor
           "b": rng.standard_normal((4,)).astype(np.float32)}  # replicated
  specs = {"w1": P("fsdp", "tensor"), "w2": P("tensor", None), "b": P()}
  ref = float(np.sqrt(sum(np.sum(np.float64(g) ** 2) for g in grads.values())))

  inside = jax.jit(jax.shard_map(lambda g: global_norm(g), mesh=mesh, in_specs=(specs,),
                                 out_specs=P()))
  np.testing.assert_allclose(inside(grads), ref, rtol=1e-6)
  with jax.set_mesh(mesh):
    put = {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in grads.items()}
    np.testing.assert_allclose(jax.jit(global_norm)(put), ref, rtol=1e-6)
  np.testing.assert_allclose(global_norm(grads), optax.tree.norm(grads), rtol=1e-6)
  assert global_norm({}) == 0.0


def test_forgotten_axis_name_raises():
  mesh = make_mesh(MeshConfig(data=8))
  loss, mask = padded_losses()
  with pytest.raises(ValueError, match="weighted_mean: the input is split over mesh axes"):
    jax.jit(jax.shard_map(lambda v, m: weighted_mean(v, m), mesh=mesh,
                          in_specs=(P("data"), P("data")), out_specs=P()))(loss, mask)
