"""FP8 optimizer states on the mesh matrix (tests/parallel/mesh_matrix.py) equal one device.

Parameters FSDP-sharded over every mesh axis (their first axis), one replicated, the state
initialized on one device and placed like them; two AdamW-FP8 steps, each one jitted call or
one shard_map body (each device updates its own rows: groups run along the last axis, so no
group straddles devices). Params and states equal the single-device run bit for bit.
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

_OPT = mo.adamw_fp8(1e-2, config=dict(min_size=256))


def params():
  k = jax.random.split(jax.random.key(0), 2)
  return {"w": np.asarray(jax.random.normal(k[0], (32, 256))),  # 4 rows x 2 groups per device
          "b": np.asarray(jnp.linspace(-1.0, 1.0, 16))}  # small: replicated, uncompressed


def step(p, state, i):
  g = jax.tree.map(lambda x: jnp.sin(3.0 * x + i) * (1.0 + x * x), p)
  updates, state = _OPT.update(g, state, p)
  return optax.apply_updates(p, updates), state


@functools.cache
def single_device():
  """(params, initial state, params and state after two steps on one device)."""
  p = params()
  state = jax.device_get(jax.jit(_OPT.init)(p))
  out = (p, state)
  for i in (0.0, 1.0):
    out = jax.device_get(jax.jit(step)(*out, np.float32(i)))
  return p, state, out


def specs(tree, ax):
  """Rows over the mesh axes for arrays with 32 rows (params, codes, scales), else replicated."""
  return jax.tree.map(lambda a: P(ax) if a.ndim and a.shape[0] == 32 else P(), tree)


@pytest.mark.parametrize("cell", cells())
def test_compressed_adamw(cell):
  if cell.view == "shard_map":  # not supported: a clear error says what to do instead
    p, state, _ = single_device()
    with pytest.raises(ValueError, match="inside shard_map.*run the optimizer update under "
                       "jax.jit on sharded arrays"):
      cell.run(step, (p, state, np.float32(0.0)), (specs(p, cell.axes), specs(state, cell.axes),
                                                    P()), specs((p, state), cell.axes))
    return
  ax = cell.axes
  p, state, want = single_device()
  out = (p, state)
  for i in (0.0, 1.0):  # one jitted step at a time, as a training loop (and single_device) runs
    out = cell.run(step, (*out, np.float32(i)), (specs(p, ax), specs(state, ax), P()),
                   specs(want, ax))
  assert jax.tree.structure(out) == jax.tree.structure(want)
  for got, exp in zip(jax.tree.leaves(out), jax.tree.leaves(want), strict=True):  # same bits
    got, exp = np.asarray(got), np.asarray(exp)
    assert got.dtype == exp.dtype and got.shape == exp.shape
    np.testing.assert_array_equal(got.reshape(-1).view(np.uint8), exp.reshape(-1).view(np.uint8))
