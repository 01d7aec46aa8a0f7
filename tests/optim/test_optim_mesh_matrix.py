"""FP8 optimizer states on the mesh matrix (tests/parallel/mesh_matrix.py) equal one device.

Parameters FSDP-sharded over every mesh axis (their first axis), one replicated, the state
initialized on one device and placed like them; two AdamW-FP8 steps in one jitted function,
or in a shard_map body (each device updates its own rows: groups run along the last axis, so
no group straddles devices). The result equals the single-device run.
"""

import functools
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import mpxla.optim as mo

sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "parallel"))
from mesh_matrix import cells  # noqa: E402

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (conftest)")

_OPT = mo.adamw_fp8(1e-2, min_size=256)


def params():
  k = jax.random.split(jax.random.key(0), 2)
  return {"w": np.asarray(jax.random.normal(k[0], (32, 256))),  # 4 rows x 2 groups per device
          "b": np.asarray(jnp.linspace(-1.0, 1.0, 16))}  # small: replicated, uncompressed


def train(p, state):
  for i in (0.0, 1.0):
    g = jax.tree.map(lambda x, i=i: jnp.sin(3.0 * x + i) * (1.0 + x * x), p)
    updates, state = _OPT.update(g, state, p)
    p = optax.apply_updates(p, updates)
  return p, state


@functools.cache
def single_device():
  """(params, initial state, params and state after two steps on one device)."""
  p = params()
  state = jax.device_get(jax.jit(_OPT.init)(p))
  return p, state, jax.device_get(jax.jit(train)(p, state))


def specs(tree, ax):
  """Rows over the mesh axes for leaves (and compressed states) with 32 rows, else replicated."""
  return jax.tree.map(lambda a: P(ax) if a.ndim and a.shape[0] == 32 else P(), tree,
                      is_leaf=mo.is_compressed)


@pytest.mark.parametrize("cell", cells())
def test_compressed_adamw(cell, request):
  if cell.view == "shard_map":  # reported to mpxla.optim's owner, not fixed here
    request.applymarker(pytest.mark.xfail(
        raises=ValueError, strict=True,
        reason="CompressedArray keeps the global shape as static metadata, so a shard_map "
               "body sees codes of the local shape: compress_states raises 'changed shape'"))
  ax = cell.axes
  p, state, want = single_device()
  out = cell.run(train, (p, state), (specs(p, ax), specs(state, ax)), specs(want, ax))
  assert jax.tree.structure(out) == jax.tree.structure(want)
  # The compressed states: the same bits. Params: the update's last rounding may differ by an
  # ulp between the sharded and the one-device program (XLA fuses them differently).
  np.testing.assert_allclose(out[0]["w"], want[0]["w"], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(out[0]["b"], want[0]["b"], rtol=1e-6, atol=1e-6)
  for got, exp in zip(jax.tree.leaves(out[1]), jax.tree.leaves(want[1]), strict=True):
    got, exp = np.asarray(got), np.asarray(exp)
    assert got.dtype == exp.dtype and got.shape == exp.shape
    np.testing.assert_array_equal(got.reshape(-1).view(np.uint8), exp.reshape(-1).view(np.uint8))
