"""Stochastic rounding of parameter updates (no float32 master weights), against numpy; the
clipping that stores no float32 copy of the gradients."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest

import mpxla.optim as mo

_DTYPES = {"bfloat16": (jnp.bfloat16, ml_dtypes.bfloat16, np.uint16),
           "float16": (jnp.float16, np.float16, np.uint16)}


def _neighbours(x64, np_dtype, uint):
  """The two values of np_dtype bracketing x (lo <= x <= hi), from the dtype's own bits."""
  near = x64.astype(np_dtype)
  bits = near.view(uint).astype(np.int64)
  sign = np.where(np.signbit(near.astype(np.float64)), -1, 1)
  # One code step away from zero grows |value|, toward zero shrinks it (sign-magnitude).
  up_mag = (near.astype(np.float64) * sign) < np.abs(x64)
  other = np.where(up_mag, bits + 1, np.maximum(bits - 1, bits & 0x8000)).astype(uint)
  a, b = near.astype(np.float64), other.view(np_dtype).astype(np.float64)
  return np.minimum(a, b), np.maximum(a, b)


@pytest.mark.parametrize("name", sorted(_DTYPES))
def test_rounding_is_unbiased_and_lands_on_a_neighbour(name):
  jdt, np_dtype, uint = _DTYPES[name]
  rng = np.random.default_rng(0)
  scale = 10.0 ** rng.integers(-6 if name == "float16" else -30, 4, 64)
  p = (rng.standard_normal(64) * scale).astype(np_dtype)
  u = (rng.standard_normal(64) * scale * 0.01).astype(np.float32)
  x64 = (p.astype(np.float32) + u).astype(np.float64)  # The float32 sum being rounded.
  lo, hi = _neighbours(x64, np_dtype, uint)
  assert np.all(lo <= x64) and np.all(x64 <= hi)
  draws = 2000
  step = jax.jit(lambda s: mo.apply_updates_stochastic({"w": jnp.asarray(p)}, {"w": jnp.asarray(u)},
                                                       s)["w"].astype(jnp.float32))
  got = np.stack([np.asarray(step(s), np.float64) for s in range(draws)])
  assert np.all((got == lo) | (got == hi))
  q = np.where(hi > lo, (x64 - lo) / np.where(hi > lo, hi - lo, 1), 0)
  se = (hi - lo) * np.sqrt(q * (1 - q) / draws)
  err = np.abs(got.mean(0) - x64)
  assert np.all(err <= 5 * se + 1e-12 * np.abs(x64)), (err / np.maximum(se, 1e-300)).max()


@pytest.mark.parametrize("name", sorted(_DTYPES))
def test_a_tenth_of_an_ulp_moves_the_weight_on_average(name):
  jdt, np_dtype, _ = _DTYPES[name]
  ulp = float(np.spacing(np.array(1.0, np_dtype)).astype(np.float64))  # spacing above 1
  n, steps = 4096, 40
  p = {"w": jnp.ones((n,), jdt)}
  u = {"w": jnp.full((n,), ulp / 10, jnp.float32)}
  sr = jax.jit(mo.apply_updates_stochastic)
  rn = p
  for s in range(steps):
    p = sr(p, u, s)
    rn = optax.apply_updates(rn, u)
  moved = np.asarray(p["w"], np.float64) - 1.0
  want = steps * ulp / 10
  se = ulp * np.sqrt(steps * 0.1 * 0.9 / n)  # each step: ulp * Bernoulli(0.1), independent
  assert abs(moved.mean() - want) <= 5 * se
  np.testing.assert_array_equal(np.asarray(rn["w"], np.float64), 1.0)  # nearest never moves


def test_float32_parameters_are_optax_apply_updates_bit_for_bit():
  rng = np.random.default_rng(1)
  params = {"a": jnp.asarray(rng.standard_normal((5, 7)), jnp.float32), "b": None,
            "c": jnp.asarray(rng.standard_normal(3), jnp.float32)}
  updates = {"a": jnp.asarray(rng.standard_normal((5, 7)) * 1e-3, jnp.float32), "b": None,
             "c": jnp.asarray(rng.standard_normal(3) * 1e-3, jnp.float32)}
  got = mo.apply_updates_stochastic(params, updates, 7)
  want = optax.apply_updates(params, updates)
  assert got["b"] is None
  for k in ("a", "c"):
    np.testing.assert_array_equal(np.asarray(got[k]).view(np.uint32),
                                  np.asarray(want[k]).view(np.uint32))


def test_draws_depend_on_step_leaf_and_seed_only_and_not_on_sharding():
  mesh = jax.make_mesh((8,), ("fsdp",), (jax.sharding.AxisType.Auto,))
  p = {"x": jnp.ones((64, 32), jnp.bfloat16), "y": jnp.ones((64, 32), jnp.bfloat16)}
  u = jax.tree.map(lambda a: jnp.full(a.shape, 2.0**-9, jnp.float32), p)
  f = jax.jit(mo.apply_updates_stochastic, static_argnames="seed")
  a = f(p, u, 3)
  np.testing.assert_array_equal(np.asarray(a["x"]), np.asarray(f(p, u, 3)["x"]))
  assert not np.array_equal(np.asarray(a["x"]), np.asarray(f(p, u, 4)["x"]))
  assert not np.array_equal(np.asarray(a["x"]), np.asarray(a["y"]))
  assert not np.array_equal(np.asarray(a["x"]), np.asarray(f(p, u, 3, seed=1)["x"]))
  shard = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp"))
  ps, us = jax.device_put((p, u), shard)
  b = f(ps, us, 3)
  for k in p:
    np.testing.assert_array_equal(np.asarray(b[k]), np.asarray(a[k]))


def test_nan_and_inf_pass_through():
  p = {"w": jnp.asarray([1.0, 2.0, 3.0], jnp.bfloat16)}
  u = {"w": jnp.asarray([jnp.nan, jnp.inf, -jnp.inf], jnp.float32)}
  got = np.asarray(mo.apply_updates_stochastic(p, u, 0)["w"], np.float64)
  assert np.isnan(got[0]) and got[1] == np.inf and got[2] == -np.inf


def test_upcast_arithmetic_runs_the_optimizer_in_float32():
  rng = np.random.default_rng(2)
  p32 = {"w": jnp.asarray(rng.standard_normal((4, 128)), jnp.float32)}
  g32 = {"w": jnp.asarray(rng.standard_normal((4, 128)), jnp.float32)}
  p16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), p32)
  g16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), g32)
  tx = mo.upcast_arithmetic(optax.adamw(1e-2))
  state = tx.init(p16)
  assert state[0].mu["w"].dtype == jnp.float32 and state[0].nu["w"].dtype == jnp.float32
  got, _ = tx.update(g16, state, p16)
  ref_tx = optax.adamw(1e-2)
  want, _ = ref_tx.update(jax.tree.map(lambda x: x.astype(jnp.float32), g16), ref_tx.init(p32),
                          jax.tree.map(lambda x: x.astype(jnp.float32), p16))
  assert got["w"].dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(got["w"]), np.asarray(want["w"]))
  # FP8 moments decode to float32 under it.
  state8 = mo.upcast_arithmetic(mo.adamw_fp8(1e-2, config=dict(min_size=0))).init(p16)
  assert mo.decompress(state8)[0].mu["w"].dtype == jnp.float32


def test_clip_by_global_norm_equals_optax():
  """Not clipping: Optax's result bit for bit; clipping: within 2 ulp; None leaves stay None."""
  rng = np.random.default_rng(0)
  grads = {"a": jnp.asarray(rng.normal(size=(64, 48)), jnp.float32),
           "b": jnp.asarray(rng.normal(size=(300,)), jnp.float32), "none": None}
  norm = float(optax.tree.norm(grads))
  for max_norm in (2 * norm, 0.1 * norm):
    ours, state = mo.clip_by_global_norm(max_norm).update(grads, optax.EmptyState())
    ref, _ = optax.clip_by_global_norm(max_norm).update(grads, optax.EmptyState())
    assert ours["none"] is None and state == optax.EmptyState()
    for k in ("a", "b"):
      if max_norm > norm:
        np.testing.assert_array_equal(np.asarray(ours[k]), np.asarray(ref[k]))
      else:
        np.testing.assert_allclose(np.asarray(ours[k]), np.asarray(ref[k]), rtol=2.5e-7, atol=0)
  clipped = mo.clip_by_global_norm(0.1 * norm).update(grads, optax.EmptyState())[0]
  assert float(optax.tree.norm(clipped)) == pytest.approx(0.1 * norm, rel=1e-6)


_CLIP_MEMORY_SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, optax
    import mpxla.optim as mo
    params = {f"w{i}": jnp.zeros((1024, 1024), jnp.bfloat16) for i in range(6)}
    for clip in (mo.clip_by_global_norm, optax.clip_by_global_norm):
      tx = mo.upcast_arithmetic(optax.chain(clip(1.0), mo.adamw_fp8(1e-3)))
      state = jax.eval_shape(tx.init, params)
      def step(p, g, s):
        u, s = tx.update(g, s, p)
        return mo.apply_updates_stochastic(p, u, 0), s
      c = jax.jit(step, donate_argnums=(0, 2)).lower(params, params, state).compile()
      print(c.memory_analysis().temp_size_in_bytes)
""")


def test_clip_by_global_norm_stores_no_float32_copy_of_the_gradients():
  """The BF16-parameter update (upcast, clip, adamw_fp8, stochastic rounding) of six 1M-element
  leaves, memory-minimizing schedule: with mpxla's clip the temps stay below one float32 copy
  of the gradients (25 MB); with Optax's they hold that copy on top."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                      " --xla_cpu_enable_concurrency_optimized_scheduler=false").strip()
  out = subprocess.run([sys.executable, "-c", _CLIP_MEMORY_SCRIPT], env=env, capture_output=True,
                       text=True, timeout=300, check=True)
  ours, theirs = map(int, out.stdout.split()[-2:])
  f32_grads = 6 * 2**20 * 4
  assert ours < f32_grads and theirs - ours >= 0.99 * f32_grads, (ours, theirs)
