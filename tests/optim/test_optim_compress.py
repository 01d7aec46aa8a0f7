"""Tests of compress_states / adamw_fp8 / compress / decompress with Optax transforms."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import mpxla.optim as mo

_KEYS = jax.random.split(jax.random.key(0), 4)
_TARGET = jax.random.normal(_KEYS[1], (32, 128))


_ADAMW8 = mo.adamw_fp8(1e-2)  # The default: stochastic rounding.
_ADAMW8_UPDATE = jax.jit(_ADAMW8.update)  # Shared: one compilation for several tests.
# Round to nearest: the elementwise comparisons with float32 below (after a few steps, stochastic
# rounding moves a few elements in 4096 by up to 2x the atol; see test_optim_rounding.py).
_NEAREST = {"rounding": "nearest"}
_ADAMW8N = mo.adamw_fp8(1e-2, config=_NEAREST)


def _params():
  return {
      "w": jax.random.normal(_KEYS[0], (32, 128)),  # 4096 elements: compressed.
      "b": jnp.linspace(-1.0, 1.0, 128),  # 128 elements: stays float32.
  }


def _grads(params, step):
  """Gradient of a quadratic with a multiplicative lognormal noise per step."""
  noise = jnp.exp(jax.random.normal(jax.random.fold_in(_KEYS[2], step), (32, 128)))
  return {"w": (params["w"] - _TARGET) * noise, "b": params["b"] * 0.5}


def _train(opt, steps=5, params=None, update=None):
  """Runs `steps` updates, eagerly unless `update` is given (op compiles are cached across tests)."""
  params = _params() if params is None else params
  state = opt.init(params)
  update = opt.update if update is None else update
  for i in range(steps):
    updates, state = update(_grads(params, i), state, params)
    params = optax.apply_updates(params, updates)
  return params, state


def _assert_close_to_group_max(actual, desired, group=128):
  """|actual - desired| <= 2^-4 * (max |desired| of its group): E4M3's half step at the top.

  A bound for one encode/decode round trip with k >= 1 (see expansion.py).
  """
  desired = np.asarray(desired, np.float64)
  n = desired.shape[-1]
  g = min(group, n)
  pad = -(-n // g) * g - n
  padded = np.pad(np.abs(desired), [(0, 0)] * (desired.ndim - 1) + [(0, pad)])
  gmax = padded.reshape(desired.shape[:-1] + (-1, g)).max(-1, keepdims=True)
  bound = np.broadcast_to(gmax, gmax.shape[:-1] + (g,)).reshape(padded.shape)[..., :n]
  assert np.all(np.abs(np.asarray(actual, np.float64) - desired) <= 2.0**-4 * bound)


def _assert_same_moves(p8, p32, p0, rel=0.05):
  """The total parameter change agrees to `rel` in L2 (and is not trivially zero)."""
  for k in p0:
    d8, d32 = np.asarray(p8[k] - p0[k]), np.asarray(p32[k] - p0[k])
    assert np.linalg.norm(d32) > 0
    assert np.linalg.norm(d8 - d32) / np.linalg.norm(d32) < rel, k


def _bits(x):
  return np.asarray(x).reshape(-1).view(np.uint8)


def _assert_trees_bit_equal(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(la, lb, strict=True):
    assert np.asarray(x).dtype == np.asarray(y).dtype
    np.testing.assert_array_equal(_bits(x), _bits(y))


def test_adamw_fp8_matches_adamw_five_steps():
  p0 = _params()
  p32, _ = _train(optax.adamw(1e-2))
  p8n, _ = _train(_ADAMW8N, update=jax.jit(_ADAMW8N.update))
  np.testing.assert_allclose(p8n["w"], p32["w"], rtol=2e-2, atol=2e-3)
  np.testing.assert_allclose(p8n["b"], p32["b"], rtol=2e-2, atol=2e-3)
  # The parameters moved, and the moves agree to a few percent overall (both roundings).
  p8, state = _train(_ADAMW8, update=_ADAMW8_UPDATE)
  for p in (p8n, p8):
    d8, d32 = np.asarray(p["w"] - p0["w"]), np.asarray(p32["w"] - p0["w"])
    assert np.abs(d32).max() > 0.04
    assert np.linalg.norm(d8 - d32) / np.linalg.norm(d32) < 0.05
  assert isinstance(state[0].mu["w"], mo.CompressedArray)
  assert not mo.is_compressed(state[0].mu["b"])


def test_state_layout_and_bytes():
  state = mo.adamw_fp8(1e-3).init(_params())
  mu = state[0].mu["w"]
  assert mu.codes.dtype == jnp.float8_e4m3fn and mu.codes.shape == (32, 128)
  assert mu.k16.dtype == jnp.uint8 and mu.k16.shape == (32, 1)
  assert mu.amax.dtype == jnp.float32 and mu.amax.shape == (32, 1)
  assert mu.step.dtype == jnp.uint32 and mu.step.shape == ()  # Stochastic rounding's counter.
  assert mu.nbytes == 4096 + 32 * 5 + 4  # 1 byte per element + 5 per group + the step.
  assert state[0].count.dtype == jnp.int32
  np.testing.assert_array_equal(state[0].mu["b"], jnp.zeros(128))
  # Two moments at 1 + 5/128 bytes each (and a 4-byte step per leaf): 2.078 bytes per parameter.
  assert (mu.nbytes + state[0].nu["w"].nbytes) / 4096 == 2 + 10 / 128 + 8 / 4096


def test_padding_and_short_last_axis():
  params = {"odd": jnp.ones((40, 200)), "short": jnp.ones((100, 50)), "col": jnp.ones((5000, 1))}
  state = jax.jit(mo.compress_states(optax.adam(1e-2), min_size=1000).init)(params)
  odd, short = state[0].mu["odd"], state[0].mu["short"]
  assert odd.codes.shape == (40, 256) and odd.amax.shape == (40, 2)  # Padded, never truncated.
  assert short.group_size == 50 and short.codes.shape == (100, 50)  # One group per row.
  assert not mo.is_compressed(state[0].mu["col"])  # Would not be smaller: stays float32.
  x = jax.random.normal(_KEYS[3], (40, 200))
  c = jax.jit(lambda t: mo.compress(t, min_size=1000))({"x": x})["x"]
  y = jax.jit(mo.decompress)({"x": c})["x"]
  assert y.shape == x.shape and y.dtype == x.dtype
  _assert_close_to_group_max(y, x)
  assert np.linalg.norm(y - x) / np.linalg.norm(x) < 0.03


def test_compress_decompress_existing_state_and_continue():
  opt = optax.adam(1e-2)
  params, state = _train(opt, steps=3)
  cstate = jax.jit(mo.compress)(state)
  plain = jax.jit(mo.decompress)(cstate)
  assert jax.tree.structure(plain) == jax.tree.structure(state)
  np.testing.assert_array_equal(plain[0].count, state[0].count)
  np.testing.assert_array_equal(plain[0].mu["b"], state[0].mu["b"])  # Small leaf untouched.
  _assert_close_to_group_max(plain[0].mu["w"], state[0].mu["w"])
  _assert_close_to_group_max(plain[0].nu["w"], state[0].nu["w"])
  # The running job continues on FP8 states and stays close to the float32 run.
  fp8 = mo.compress_states(opt)
  g = _grads(params, 3)
  u8, s8 = fp8.update(g, cstate, params)
  u32, _ = opt.update(g, state, params)
  np.testing.assert_allclose(u8["w"], u32["w"], rtol=0.1, atol=1e-3)
  assert int(s8[0].count) == 4


def test_overrides_by_field_name_and_callable():
  opt = mo.compress_states(
      optax.adam(1e-2), overrides={"nu": {"fmt": "e5m2", "expansion": False}, "b": {"min_size": 1}}
  )
  state = opt.init(_params())
  assert state[0].mu["w"].fmt == "e4m3" and state[0].mu["w"].expansion
  assert state[0].nu["w"].fmt == "e5m2" and state[0].nu["w"].k16 is None
  assert mo.is_compressed(state[0].mu["b"])  # min_size lowered for params named 'b'.
  params, state = _train(opt, steps=3)
  assert np.all(np.isfinite(np.asarray(mo.decompress(state)[0].nu["w"])))

  def keep_nu(path, leaf):
    del leaf
    names = [getattr(k, "name", None) for k in path]
    return {"compress": False} if "nu" in names else None

  state = mo.compress_states(optax.adam(1e-2), overrides=keep_nu).init(_params())
  assert mo.is_compressed(state[0].mu["w"]) and not mo.is_compressed(state[0].nu["w"])
  with pytest.raises(ValueError, match="unknown keys"):
    mo.compress_states(optax.adam(1e-2), overrides={"nu": {"bits": 4}}).init(_params())
  with pytest.raises(ValueError, match="not a known 8-bit format"):
    mo.compress_states(optax.adam(1e-2), fmt="e3m4")


def test_bfloat16_moment_keeps_its_dtype():
  opt = mo.compress_states(optax.adam(1e-2, mu_dtype=jnp.bfloat16))
  _, state = _train(opt, steps=2)
  assert state[0].mu["w"].dtype == jnp.bfloat16
  assert mo.decompress(state)[0].mu["w"].dtype == jnp.bfloat16
  assert mo.decompress(state)[0].nu["w"].dtype == jnp.float32


@pytest.mark.parametrize(
    "name,make",
    [
        ("adam", lambda: optax.adam(1e-2)),
        ("adamw", lambda: optax.adamw(1e-2, weight_decay=0.1)),
        ("sgd_momentum", lambda: optax.sgd(1e-3, momentum=0.9)),
        ("chain_inner", lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.scale_by_adam(),
                                            optax.scale(-1e-2))),
    ],
)
def test_optimizers_match_float32(name, make):
  p32, s32 = _train(make())
  p8, s8 = _train(mo.compress_states(make()))
  _assert_same_moves(p8, p32, _params())
  if name != "sgd_momentum":  # Normalized updates of size ~lr: the AdamW tolerance applies.
    p8n, _ = _train(mo.compress_states(make(), **_NEAREST))
    np.testing.assert_allclose(p8n["w"], p32["w"], rtol=2e-2, atol=2e-3)
  assert any(mo.is_compressed(x) for x in jax.tree.leaves(s8, is_leaf=mo.is_compressed))
  assert jax.tree.structure(mo.decompress(s8)) == jax.tree.structure(s32)


def test_chain_with_compressed_inner_and_clipping():
  opt = optax.chain(optax.clip_by_global_norm(1.0),
                    mo.compress_states(optax.scale_by_adam(), **_NEAREST), optax.scale(-1e-2))
  ref = optax.chain(optax.clip_by_global_norm(1.0), optax.scale_by_adam(), optax.scale(-1e-2))
  p8, s8 = _train(opt)
  p32, _ = _train(ref)
  np.testing.assert_allclose(p8["w"], p32["w"], rtol=2e-2, atol=2e-3)
  assert mo.is_compressed(s8[1].mu["w"])


def test_lion_momentum_and_update_signs():
  p32, s32 = _train(optax.lion(1e-3))
  p8, s8 = _train(mo.compress_states(optax.lion(1e-3)))
  mu8 = np.asarray(mo.decompress(s8)[0].mu["w"])
  mu32 = np.asarray(s32[0].mu["w"])
  assert np.linalg.norm(mu8 - mu32) / np.linalg.norm(mu32) < 0.05
  # Lion's update is lr * sign(...): nearly all signs agree, so params agree.
  same = np.isclose(np.asarray(p8["w"]), np.asarray(p32["w"]), rtol=0, atol=1e-6)
  assert same.mean() > 0.99


def test_adafactor_small_factored_leaves_stay():
  params = {"mat": jax.random.normal(_KEYS[0], (128, 128)), "vec": jax.random.normal(_KEYS[1], (4096,))}
  opt = mo.compress_states(optax.adafactor(1e-2))
  state = opt.init(params)
  update = jax.jit(opt.update)
  fact = state[0]
  assert not mo.is_compressed(fact.v_row["mat"]) and fact.v_row["mat"].shape == (128,)
  assert not mo.is_compressed(fact.v_col["mat"])
  assert mo.is_compressed(fact.v["vec"])  # The unfactored second moment.
  ref = optax.adafactor(1e-2)
  rstate = ref.init(params)
  p8, p32 = params, params
  for i in range(3):
    g = jax.tree.map(lambda p, c=float(i + 2): jnp.sin(p * c), params)
    u8, state = update(g, state, p8)
    u32, rstate = ref.update(g, rstate, p32)
    p8, p32 = optax.apply_updates(p8, u8), optax.apply_updates(p32, u32)
  for k in params:
    np.testing.assert_allclose(p8[k], p32[k], rtol=2e-2, atol=2e-3)


def test_masked_and_multi_transform():
  mask = {"w": True, "b": False}
  p8, s8 = _train(optax.masked(_ADAMW8N, mask))
  p32, _ = _train(optax.masked(optax.adamw(1e-2), mask))
  np.testing.assert_allclose(p8["w"], p32["w"], rtol=2e-2, atol=2e-3)
  np.testing.assert_array_equal(p8["b"], p32["b"])  # Masked out: same pass-through.
  assert mo.is_compressed(s8.inner_state[0].mu["w"])
  labels = {"w": "fp8", "b": "sgd"}
  mt = optax.multi_transform({"fp8": _ADAMW8N, "sgd": optax.sgd(1e-2)}, labels)
  ref = optax.multi_transform({"fp8": optax.adamw(1e-2), "sgd": optax.sgd(1e-2)}, labels)
  p8, s8 = _train(mt)
  p32, _ = _train(ref)
  np.testing.assert_allclose(p8["w"], p32["w"], rtol=2e-2, atol=2e-3)
  np.testing.assert_allclose(p8["b"], p32["b"], rtol=1e-6)


def test_inject_hyperparams_both_ways():
  params = _params()
  g = _grads(params, 0)
  outer = optax.inject_hyperparams(mo.adamw_fp8)(learning_rate=0.1, config=dict(group_size=64))
  state = outer.init(params)
  assert state.inner_state[0].mu["w"].group_size == 64
  update = jax.jit(outer.update)  # One program; the learning rate is state, not a constant.
  u1, state = update(g, state, params)
  assert float(jnp.abs(u1["w"]).max()) > 0.05
  state.hyperparams["learning_rate"] = jnp.asarray(0.0)
  u2, state = update(g, state, params)
  np.testing.assert_array_equal(u2["w"], 0.0)
  inner = mo.compress_states(optax.inject_hyperparams(optax.adam)(learning_rate=0.1))
  state = inner.init(params)
  assert mo.is_compressed(state.inner_state[0].mu["w"])
  state.hyperparams["learning_rate"] = jnp.asarray(0.0)
  u3, state = inner.update(g, state, params)
  np.testing.assert_array_equal(u3["w"], 0.0)
  state.hyperparams["learning_rate"] = jnp.asarray(0.1)
  u4, _ = inner.update(g, state, params)
  assert float(jnp.abs(u4["w"]).max()) > 0.05


def test_multisteps_both_orders():
  # jit: MultiSteps builds new lax.cond branches per call, which eager mode recompiles.
  def train(opt):
    return _train(opt, steps=4, update=jax.jit(opt.update))

  p32, _ = train(optax.MultiSteps(optax.adam(1e-2), every_k_schedule=2))
  p8, s8 = train(optax.MultiSteps(mo.compress_states(optax.adam(1e-2)), every_k_schedule=2))
  np.testing.assert_allclose(p8["w"], p32["w"], rtol=2e-2, atol=2e-3)
  assert mo.is_compressed(s8.inner_opt_state[0].mu["w"])
  assert not mo.is_compressed(s8.acc_grads["w"])
  outer = mo.compress_states(optax.MultiSteps(optax.adam(1e-2), every_k_schedule=2),
                             overrides={"acc_grads": {"compress": False}})
  p8, s8 = train(outer)
  np.testing.assert_allclose(p8["w"], p32["w"], rtol=2e-2, atol=2e-3)
  assert mo.is_compressed(s8.inner_opt_state[0].mu["w"]) and not mo.is_compressed(s8.acc_grads["w"])


def test_apply_if_finite_keeps_state_bit_exact():
  opt = optax.apply_if_finite(_ADAMW8, max_consecutive_errors=3)
  update = jax.jit(opt.update)
  params, state = _train(opt, steps=2, update=update)
  g = _grads(params, 2)
  g["w"] = g["w"].at[3, 7].set(jnp.nan)
  updates, new_state = update(g, state, params)
  _assert_trees_bit_equal(new_state.inner_state, state.inner_state)
  np.testing.assert_array_equal(updates["w"], 0.0)
  assert int(new_state.notfinite_count) == 1 and not bool(new_state.last_finite)


def test_nan_gradient_without_guard_poisons_its_group_visibly():
  params, state = _train(_ADAMW8, steps=2, update=_ADAMW8_UPDATE)
  g = _grads(params, 2)
  g["w"] = g["w"].at[3, 7].set(jnp.inf)
  updates, new_state = _ADAMW8_UPDATE(g, state, params)
  mu = np.asarray(mo.decompress(new_state)[0].mu["w"])
  assert np.all(np.isnan(mu[3]))  # Row 3 is one group of 128: all NaN.
  assert np.all(np.isfinite(np.delete(mu, 3, axis=0)))
  assert np.isnan(np.asarray(updates["w"])[3, 7])
  assert np.isnan(np.asarray(new_state[0].mu["w"].amax)[3, 0])


def test_wrong_tree_structure_gives_clear_error():
  opt = _ADAMW8
  params = _params()
  state = opt.init(params)
  g = _grads(params, 0)
  with pytest.raises(ValueError, match="updates and params have different tree structures"):
    opt.update({"w": g["w"]}, state, params)
  with pytest.raises(ValueError, match="state does not match"):
    opt.update({"w": g["w"]}, state, {"w": params["w"]})
  with pytest.raises(ValueError, match=r"expected compressed.*got uncompressed"):
    opt.update(g, optax.adamw(1e-2).init(params), params)
  other = {"w": params["w"][:16], "b": params["b"]}
  with pytest.raises(ValueError, match="state does not match"):
    opt.update(jax.tree.map(jnp.zeros_like, other), state, other)


def test_orbax_roundtrip_bit_exact(tmp_path):
  params, state = _train(_ADAMW8, steps=2, update=_ADAMW8_UPDATE)
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(tmp_path / "step2", {"params": params, "opt": state})
  ckptr.wait_until_finished()
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                        {"params": params, "opt": state})
  restored = ckptr.restore(tmp_path / "step2", target)
  _assert_trees_bit_equal(restored, {"params": params, "opt": state})
  assert isinstance(restored["opt"][0].mu["w"], mo.CompressedArray)
  # Training continues identically from the restored state.
  g = _grads(params, 2)
  u1, s1 = _ADAMW8_UPDATE(g, state, params)
  u2, s2 = _ADAMW8_UPDATE(g, restored["opt"], restored["params"])
  _assert_trees_bit_equal((u1, s1), (u2, s2))


_MEMORY_SCRIPT = textwrap.dedent("""
    import os
    flag = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
    assert flag in os.environ.get("XLA_FLAGS", ""), "flag not set before jax import"
    import jax, jax.numpy as jnp
    import mpxla.optim as mo
    shapes = {"emb": (2048, 768), "a": (768, 1536), "b": (256, 768), "n": (768,)}
    params = {k: jnp.full(s, 0.01) for k, s in shapes.items()}
    opt = mo.adamw_fp8(1e-3)
    state = jax.jit(opt.init)(params)
    c = jax.jit(opt.update).lower(params, state, params).compile()
    big = max(p.size for p in params.values())
    print(c.memory_analysis().temp_size_in_bytes, 8 * big, 8 * sum(p.size for p in params.values()))
""")


def test_update_temp_memory_below_largest_leaf_moments():
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                      " --xla_cpu_enable_concurrency_optimized_scheduler=false").strip()
  out = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT], env=env, capture_output=True,
                       text=True, timeout=300, check=True)
  temp, largest_moments, all_moments = map(int, out.stdout.split()[-3:])
  assert temp < largest_moments, (temp, largest_moments)
  assert temp < all_moments / 4


def test_derivatives_through_the_state_raise_and_through_one_update_are_exact():
  """d(update)/d(gradient) with the state fixed equals plain Optax's (compressed momentum
  decodes the same in both); d(second update)/d(first gradient) would flow through the codes
  (integers) and raises instead of returning a wrong derivative."""
  params = {"w": jnp.zeros((8, 256))}
  g0 = jax.random.normal(jax.random.key(1), (8, 256))
  fp8 = mo.compress_states(optax.sgd(1.0, momentum=0.9), min_size=0)
  state = fp8.init(params)
  _, state = fp8.update({"w": g0}, state, params)
  plain_state = (optax.TraceState(trace=mo.decompress(state)[0].trace), optax.EmptyState())
  one = lambda opt, st: jax.grad(  # noqa: E731
      lambda g: jnp.sum(jnp.sin(opt.update({"w": g}, st, params)[0]["w"])))(g0)
  np.testing.assert_allclose(one(fp8, state), one(optax.sgd(1.0, momentum=0.9), plain_state),
                             rtol=1e-6)

  def two(g):
    st = fp8.update({"w": g}, fp8.init(params), params)[1]
    return jnp.sum(fp8.update({"w": jnp.ones_like(g)}, st, params)[0]["w"])

  with pytest.raises(ValueError, match="differentiating through FP8-compressed"):
    jax.grad(two)(g0)
