"""Which state leaves are compressed: classification by meaning, overrides, non-float leaves."""

import importlib
import inspect
import pkgutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.contrib
import pytest
from jax.tree_util import DictKey, GetAttrKey, SequenceKey

import mpxla.optim as mo

# Fields of Optax states that hold no parameter-shaped float array of their own: counters,
# flags, scalars, keys and the containers of inner states. classify() skips them.
_NEUTRAL = frozenset({
    "count", "count_m2", "t", "step", "step_count", "mini_step", "gradient_step", "iter_num",
    "skip_state", "inner_state", "inner_states", "inner_opt_state", "base_optimizer_state",
    "fast_state", "opt_state", "adv_state", "hyperparams", "hyperparams_states",
    "hessian_fn_state", "measure_states", "steps_since_sync", "notfinite_count",
    "last_finite", "total_notfinite", "found_nan", "ready", "micro_step", "is_initial_step",
    "is_init_step", "rng_key", "key", "ema_decay", "b1", "weight_sum", "max_lr", "best_value",
    "plateau_count", "cooldown_count", "avg_value", "estim_lr", "numerator_weighted",
    "max_dist", "sum_sq_norm_grads", "grad_sum_of_squares", "weighted_sq_norm_grads",
    "estim_sq_dist", "barf", "gamma", "lb", "ns_coeffs", "r", "decrease_error",
    "curvature_error", "error", "interval_found", "done", "failed", "num_linesearch_steps",
})


def _optax_state_classes():
  """Every NamedTuple state class (name ending in 'State') defined in the installed optax."""
  found = {}
  for m in pkgutil.walk_packages(optax.__path__, "optax."):
    if "test" in m.name:
      continue
    try:
      module = importlib.import_module(m.name)
    except ImportError:  # Optional dependencies of a few contrib modules.
      continue
    for name, cls in vars(module).items():
      if (inspect.isclass(cls) and issubclass(cls, tuple) and hasattr(cls, "_fields")
          and cls.__module__ == module.__name__ and name.endswith("State")):
        found[f"{module.__name__}.{name}"] = cls._fields
  return found


def test_every_optax_state_field_is_classified():
  classes = _optax_state_classes()
  assert len(classes) > 30  # optax._src, transforms, schedules, contrib, experimental
  known = mo.MOMENT_FIELDS | mo.EXACT_FIELDS | _NEUTRAL
  missing = {c: f for c, fields in classes.items() for f in fields if f not in known}
  assert not missing, f"classify these Optax state fields in mpxla/optim/compress.py: {missing}"
  assert not mo.MOMENT_FIELDS & mo.EXACT_FIELDS


@pytest.mark.parametrize("path,kind", [
    ((SequenceKey(0), GetAttrKey("mu"), DictKey("w")), "moment"),
    ((GetAttrKey("inner_opt_state"), SequenceKey(0), GetAttrKey("nu"), DictKey("w")), "moment"),
    ((GetAttrKey("acc_grads"), DictKey("w")), "exact"),
    ((SequenceKey(1), GetAttrKey("diff_params_memory"), DictKey("w")), "exact"),
    ((GetAttrKey("z"), DictKey("w")), "exact"),
    ((GetAttrKey("base_optimizer_state"), SequenceKey(0), GetAttrKey("mu")), "moment"),
    # Outermost field first: a parameter tree's own attribute names never decide.
    ((SequenceKey(0), GetAttrKey("mu"), GetAttrKey("params"), GetAttrKey("v")), "moment"),
    ((GetAttrKey("params"), GetAttrKey("mu")), "exact"),
    # Dict keys (parameter names, multi_transform labels) do not count; nothing known: moment.
    ((DictKey("params"), DictKey("updates")), "moment"),
    ((), "moment"),
])
def test_classify(path, kind):
  assert mo.classify(path) == kind


def _kinds(opt, params=None):
  """{path: compressed?} of the array leaves of opt.init(params) (abstractly evaluated)."""
  state = jax.eval_shape(opt.init, _P if params is None else params)
  flat = jax.tree_util.tree_flatten_with_path(state, is_leaf=mo.is_compressed)[0]
  return {jax.tree_util.keystr(p): mo.is_compressed(x) for p, x in flat if hasattr(x, "shape")}


_P = {"w": jnp.ones((8, 128)), "b": jnp.ones((128,))}


def test_lbfgs_and_multisteps_keep_exact_state_float_unless_forced():
  lbfgs = optax.lbfgs()
  kinds = _kinds(mo.compress_states(lbfgs, min_size=1))
  assert kinds and not any(kinds.values()), kinds  # params, updates, memories, line search
  forced = _kinds(mo.compress_states(lbfgs, min_size=1,
                                     overrides={"diff_params_memory": {"compress": True}}))
  assert {p for p, c in forced.items() if c} == {"[0].diff_params_memory['b']",
                                                 "[0].diff_params_memory['w']"}
  everything = _kinds(mo.compress_states(lbfgs, min_size=1, compress=True))
  assert everything["[0].params['w']"] and everything["[0].updates['w']"]
  ms = optax.MultiSteps(optax.adam(1e-2), every_k_schedule=2)
  kinds = _kinds(mo.compress_states(ms, min_size=1))
  assert kinds[".inner_opt_state[0].mu['w']"] and kinds[".inner_opt_state[0].nu['b']"]
  assert not kinds[".acc_grads['w']"]
  kinds = _kinds(mo.compress_states(ms, min_size=1, overrides={"acc_grads": {"compress": True}}))
  assert kinds[".acc_grads['w']"]
  # A moment can be kept too, by name or with the callable hook.
  keep = mo.compress_states(optax.adam(1e-2), min_size=1,
                            overrides=lambda path, leaf: ({"compress": False}
                                                          if mo.classify(path) == "moment"
                                                          and leaf.ndim == 1 else None))
  kinds = _kinds(keep)
  assert kinds["[0].mu['w']"] and not kinds["[0].mu['b']"]


def test_schedule_free_keeps_its_iterate_and_compresses_the_base_moments():
  kinds = _kinds(mo.compress_states(optax.contrib.schedule_free_adamw(1e-2), min_size=1))
  assert not kinds[".z['w']"]
  assert kinds[".base_optimizer_state[0].nu['w']"]


@pytest.mark.parametrize("min_size", [1, 4096])
def test_prng_keys_and_non_float_leaves_pass_through(min_size):
  state = {"key": jax.random.PRNGKey(0), "i": jnp.arange(5000), "b": jnp.ones(5000, bool),
           "c": jnp.ones(5000, jnp.complex64), "f8": jnp.ones(5000, jnp.float8_e4m3fn),
           "typed": jax.random.split(jax.random.key(0), 5000)}
  out = mo.compress(state, min_size=min_size)
  for k, x in state.items():
    assert out[k] is x, k
  params = {"w": jnp.ones((8, 128))}
  chain = optax.chain(optax.add_noise(0.01, 0.55, key=jax.random.key(1)), optax.adam(1e-3))
  kinds = _kinds(mo.compress_states(chain, min_size=min_size), params)
  assert kinds["[0].rng_key"] is False and kinds["[1][0].mu['w']"] is (min_size == 1)
  assert mo.nbytes(optax.noisy_sgd(1e-3, key=0).init(params)) == 4 + 8  # count + threefry key


def test_noisy_sgd_and_add_noise_run_wrapped_with_the_same_noise():
  params, g = {"w": jnp.ones((8, 128))}, {"w": jnp.full((8, 128), 0.1)}
  for opt in (optax.noisy_sgd(1e-3, key=0),
              optax.chain(optax.add_noise(0.01, 0.55, key=jax.random.key(1)), optax.sgd(1e-3))):
    wrapped = mo.compress_states(opt, min_size=1)
    u, new = jax.jit(wrapped.update)(g, wrapped.init(params), params)
    u32, ref = jax.jit(opt.update)(g, opt.init(params), params)
    np.testing.assert_array_equal(u["w"], u32["w"])  # The same noise: the key passed through.
    _bits = lambda k: np.asarray(jax.random.key_data(k))  # noqa: E731
    keys = [x for x in jax.tree.leaves(new) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)]
    refs = [x for x in jax.tree.leaves(ref) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)]
    assert len(keys) == 1 and np.array_equal(_bits(keys[0]), _bits(refs[0]))


def test_shape_mismatch_names_the_leaf_and_both_shapes():
  params = {"a": jnp.ones((64, 128)), "b": jnp.ones((64, 128))}
  bad = {"a": jnp.ones((64, 128)), "b": jnp.ones((64, 64))}
  opt = mo.adamw_fp8(1e-3)
  state = jax.eval_shape(opt.init, params)  # The checks run while tracing.
  with pytest.raises(ValueError, match=r"updates\['b'\] has shape \(64, 64\) but "
                                       r"params\['b'\] has shape \(64, 128\)"):
    jax.eval_shape(opt.update, bad, state, params)
  # Without params, the state's leaves are compared with what init makes for the updates.
  opt = mo.compress_states(optax.adam(1e-3))
  with pytest.raises(ValueError, match=r"\[0\]\.mu\['b'\]: expected compressed, shape \(64, 64\), "
                                       r"got compressed, shape \(64, 128\)"):
    jax.eval_shape(opt.update, bad, jax.eval_shape(opt.init, params))
