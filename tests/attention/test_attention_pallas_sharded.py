"""Pallas attention kernels under a mesh: XLA's partitioner cannot split a custom call (it
would run the kernel on the whole batch on every device), so `attention` runs the kernels per
batch shard (`shard_map`); values and gradients equal the dense reference, on Auto and
Explicit meshes, and the kernels' operands hold one device's rows."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import mpxla.attention as A

B, T, H, D = 8, 64, 2, 16
BATCH = ("data", "fsdp")


def _inputs():
  r = np.random.default_rng(0)
  q, k, v = (jnp.asarray(r.standard_normal((B, T, H, D)), jnp.float32) for _ in range(3))
  ids = jnp.asarray(np.sort(r.integers(0, 3, (B, T)), axis=1), jnp.int32)
  return q, k, v, ids


def _loss(q, k, v, ids, impl, interpret=True):
  o = A.attention(q, k, v, mask=A.causal() & A.document(ids), impl=impl, block_q=16,
                  block_kv=16, interpret=interpret)
  return jnp.sum(o * jnp.sin(o)), o


_grads = jax.grad(_loss, (0, 1, 2), has_aux=True)


def _mesh(axis_type):
  return jax.make_mesh((2, 4), BATCH, axis_types=(axis_type,) * 2)


@pytest.mark.parametrize("axis_type", [AxisType.Auto, pytest.param(
    AxisType.Explicit, marks=pytest.mark.slow)])  # (the wrapper runs under Auto axes in both)
def test_kernels_per_batch_shard_match_reference(axis_type):
  args = _inputs()
  want = _grads(*args, "reference")
  mesh = _mesh(axis_type)
  sharded = [jax.device_put(a, NamedSharding(mesh, P(BATCH))) for a in args]
  impls = ("pallas_gpu",) if axis_type == AxisType.Auto else ("pallas_gpu", "pallas_tpu")
  for impl in impls:  # (one wrapper for both; the default tier runs one kernel)
    with jax.set_mesh(mesh):
      got = jax.jit(_grads, static_argnums=4)(*sharded, impl)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
      np.testing.assert_allclose(g, w, rtol=1e-5, atol=2e-5)


def _kernel_operands(mesh, batch):
  args = [a[:batch] for a in _inputs()]
  with jax.set_mesh(mesh):
    sharded = [jax.device_put(a, NamedSharding(mesh, P(BATCH))) for a in args] \
        if batch % 8 == 0 else args
    text = jax.jit(_grads, static_argnums=(4, 5)).trace(*sharded, "pallas_gpu", False).lower(
        lowering_platforms=("cuda",)).as_text()
  calls = [line for line in text.splitlines() if "__gpu$xla.gpu.triton" in line]
  assert len(calls) == 3  # forward, dQ, dK/dV
  return [re.findall(r"tensor<(\d+)x[0-9x]*(?:f32|i32)>", c) for c in calls]


def test_gpu_kernels_lower_with_one_devices_rows():
  mesh = _mesh(AxisType.Auto)
  for batch_sizes in _kernel_operands(mesh, B):
    assert batch_sizes and set(batch_sizes) == {"1"}, batch_sizes  # B / 8 devices
  # A batch the mesh does not split (4 rows on 8 devices): the kernel sees the whole batch.
  for batch_sizes in _kernel_operands(mesh, 4):
    assert "4" in batch_sizes, batch_sizes


def test_prefix_lengths_are_split_with_the_batch():
  """prefix_lm(lengths [B]): each shard's kernel reads its own rows' prefix lengths."""
  q, k, v, _ = _inputs()
  lengths = jnp.asarray([4, 60, 17, 33, 0, 64, 9, 48], jnp.int32)
  want = A.attention(q, k, v, mask=A.prefix_lm(lengths), impl="reference")
  mesh = _mesh(AxisType.Auto)
  sharded = [jax.device_put(a, NamedSharding(mesh, P(BATCH))) for a in (q, k, v)]
  with jax.set_mesh(mesh):
    got = jax.jit(lambda q, k, v, n: A.attention(
        q, k, v, mask=A.prefix_lm(n), impl="pallas_gpu", block_q=16, block_kv=16,
        interpret=True))(*sharded, lengths)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-5)


def test_explicit_mesh_with_replicated_inputs():
  """Inputs an Explicit mesh does not split (e.g. made inside jit): split for the kernels,
  the output replicated like them."""
  args = _inputs()
  want = _loss(*args, "reference")[1]
  with jax.set_mesh(_mesh(AxisType.Explicit)):
    got = jax.jit(lambda *a: _loss(*a, "pallas_gpu")[1])(*args)
  assert not any(tuple(jax.typeof(got).sharding.spec))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit])
def test_gpu_kernel_lowers_per_shard_without_set_mesh(axis_type):
  """Inputs placed on a mesh, no `jax.set_mesh`: the mesh in their type splits the kernel."""
  mesh = _mesh(axis_type)
  sharded = [jax.device_put(a, NamedSharding(mesh, P(BATCH))) for a in _inputs()]
  text = jax.jit(lambda *a: _loss(*a, "pallas_gpu", False)[1]).trace(*sharded).lower(
      lowering_platforms=("cuda",)).as_text()
  calls = [line for line in text.splitlines() if "__gpu$xla.gpu.triton" in line]
  assert len(calls) == 1
  assert set(re.findall(r"tensor<(\d+)x[0-9x]*(?:f32|i32)>", calls[0])) == {"1"}
