"""Optax's convergence cases, for every optimizer of its suite, wrapped: the default tier's version.

Optax's `AliasTest.test_optimization` runs each optimizer of `_OPTIMIZERS_UNDER_TEST` for
10,000 steps on a parabola and on Rosenbrock's function and requires the parameters within
atol = rtol = 3e-2 of the minimizer. Here the optimizer list, the problems, the step count and
the tolerance are read from the installed Optax's test file (`optax_alias_suite.load`), the
optimizer is wrapped in `compress_states(opt, min_size=1)`, and the 10,000 steps run inside
one jitted `lax.fori_loop` (one compilation and no per-step dispatch, instead of 10,000 jitted
calls). The full generated suite, float32 and complex64 and its other tests, is
`test_optim_optax_suite.py` (slow tier).
"""

import jax
import optax_alias_suite
import pytest

# Optax's alias_test.py imports both (the `data` extra installs scikit-learn).
pytest.importorskip("scipy")
pytest.importorskip("sklearn")

_SUITE = optax_alias_suite.load("default")
_STEPS = 10_000  # Optax's `for it in range(10000)`.
_TOL = 3e-2  # Optax's rtol = atol.
_TARGETS = {"parabola": _SUITE._setup_parabola, "rosenbrock": _SUITE._setup_rosenbrock}


def _skipped_by_optax(opt_name, target):
  """Optax's own skips for float32 (see AliasTest.test_optimization)."""
  return opt_name in ("sign_sgd", "signum") and target == "rosenbrock"


def _unchecked_by_optax(opt_name, opt_kwargs):
  """Optax runs these but skips the final check (no learning rate: 'numerically unstable')."""
  return opt_name in ("adadelta", "adafactor") and opt_kwargs.get("learning_rate") is None


def _run(opt, objective, params, with_value):
  def body(_, carry):
    params, state = carry
    value, grads = jax.value_and_grad(objective)(params)
    extra = {"value": value} if with_value else {}
    updates, state = opt.update(grads, state, params, **extra)
    return _SUITE.update.apply_updates(params, updates), state

  return jax.lax.fori_loop(0, _STEPS, body, (params, opt.init(params)))[0]


_CASES = [
    pytest.param(c["opt_name"], c["opt_kwargs"], id=f"{c['opt_name']}-{i}")
    for i, c in enumerate(_SUITE._OPTIMIZERS_UNDER_TEST)
]


@pytest.mark.parametrize("opt_name,opt_kwargs", _CASES)
def test_wrapped_optimizer_converges_like_optax_requires(opt_name, opt_kwargs):
  targets = [t for t in _TARGETS if not _skipped_by_optax(opt_name, t)]
  if _unchecked_by_optax(opt_name, opt_kwargs):
    pytest.skip("Optax runs it without checking the result (no learning rate)")
  factory = getattr(_SUITE.alias, opt_name)
  opt = factory(**opt_kwargs)
  assert "compress_states" in opt.init.__qualname__  # Wrapped by the generated suite's alias.
  runs = {t: _TARGETS[t](jax.numpy.float32) for t in targets}  # (params, minimizer, objective)

  @jax.jit
  def all_targets():
    return {t: _run(opt, obj, p, opt_name == "polyak_sgd") for t, (p, _, obj) in runs.items()}

  got = all_targets()
  for t, (_, final, _) in runs.items():
    _SUITE.test_utils.assert_trees_all_close(got[t], final, rtol=_TOL, atol=_TOL)
