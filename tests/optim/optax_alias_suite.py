"""Optax's own optimizer test suite, run on optimizers wrapped in `mpxla.optim.compress_states`.

`source(mode)` reads the installed Optax's `optax/_src/alias_test.py` (so it follows the
installed version) and changes one line: `from optax._src import alias` becomes a stand-in
whose factories (`alias.adam(...)`, `alias.lbfgs(...)`, ...) return the optimizer wrapped
as `mode` says. Tests, problems and tolerances are Optax's, unchanged.

  mode        every optimizer built through `alias` becomes
  'none'      itself (Optax's suite as installed: the baseline)
  'default'   compress_states(opt, min_size=1): default classification and rounding
  'nearest'   compress_states(opt, min_size=1, rounding='nearest')
  'stochastic' compress_states(opt, min_size=1, rounding='stochastic')
  'all'       compress_states(opt, min_size=1, compress=True): every floating leaf in FP8,
              moments or not; the tests in NOT_APPLICABLE are skipped with their reason

Run one mode and print its counts (a pytest run of the generated file):

  .venv/bin/python tests/optim/optax_alias_suite.py --mode default [-- PYTEST_ARGS]

`tests/optim/test_optim_optax_suite.py` collects the 'default' mode (slow tier);
`tests/optim/test_optim_optax_convergence.py` is the default tier's fast equivalent of its
convergence cases.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import linecache
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import types
import unittest

import optax

import mpxla.optim as mo

MODES = ("none", "default", "nearest", "stochastic", "all")
_IMPORT = "from optax._src import alias\n"

# Tests that cannot hold when every floating state leaf is lossy (mode 'all'), with the
# reason; each passes with the default classification (mode 'default'), which keeps the
# leaves named here in float. Keys: 'Class.test_method' (every parameterization).
# Found by running mode 'all': these are its only failures.
NOT_APPLICABLE = {
    "LBFGSTest.test_against_plain_implementation": (
        "compares L-BFGS to a float32 re-implementation at 1e-5; the stored params, updates "
        "and curvature pairs (EXACT_FIELDS) in FP8 move the iterates by ~1e-2 relative"),
    "LBFGSTest.test_against_scipy": (
        "minimizer within 1e-5 of scipy's BFGS: FP8 curvature memories and line-search "
        "values cannot resolve 1e-5"),
    "LBFGSTest.test_handling_pytrees": (
        "the same L-BFGS run on a (2, 4) array and on a tuple of its rows must agree to 5e-5; "
        "FP8 iterates and memories round differently in the two layouts (~5e-2 apart)"),
    "LBFGSTest.test_binary_logreg": (
        "L-BFGS to a gradient norm of 1e-6 and sklearn's solution within 5e-2: with FP8 "
        "iterates (params, updates) the line search stops far from the minimizer"),
    "LBFGSTest.test_multiclass_logreg": (
        "L-BFGS must reach a gradient norm <= 1e-2: with FP8 iterates and memories it stalls "
        "above it (one of its two settings)"),
}


def alias_test_path() -> pathlib.Path:
  """The installed Optax's alias_test.py."""
  return pathlib.Path(optax.__file__).parent / "_src" / "alias_test.py"


def wrap(opt: optax.GradientTransformation, mode: str) -> optax.GradientTransformation:
  """`opt` as `mode` says (see the module docstring)."""
  settings = {
      "none": None,
      "default": {},
      "nearest": {"rounding": "nearest"},
      "stochastic": {"rounding": "stochastic"},
      "all": {"compress": True},
  }[mode]
  return opt if settings is None else mo.compress_states(opt, min_size=1, **settings)


class WrappedAlias(types.ModuleType):
  """optax._src.alias whose factories return `wrap(factory(...), mode)`."""

  def __init__(self, mode: str):
    super().__init__("optax._src.alias")
    self._mode = mode

  def __getattr__(self, name: str):
    attr = getattr(optax._src.alias, name)  # pylint: disable=protected-access
    if name.startswith("_") or not callable(attr):
      return attr

    @functools.wraps(attr)  # Keeps the signature: inject_hyperparams reads it.
    def factory(*args, **kwargs):
      opt = attr(*args, **kwargs)
      if isinstance(opt, optax.GradientTransformation):
        return wrap(opt, self._mode)
      return opt

    return factory


def source(mode: str) -> str:
  """The installed alias_test.py with `alias` replaced by WrappedAlias(mode)."""
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
  text = alias_test_path().read_text()
  if text.count(_IMPORT) != 1:
    raise RuntimeError(f"{alias_test_path()} no longer has the line {_IMPORT!r} once; "
                       "update tests/optim/optax_alias_suite.py.")
  header = (f"# Generated from {alias_test_path()} by tests/optim/optax_alias_suite.py, "
            f"mode {mode!r}.\n")
  stand_in = (f"import optax_alias_suite as _mpxla_suite\n"
              f"alias = _mpxla_suite.WrappedAlias({mode!r})\n"
              f"_mpxla_suite.mark_not_applicable(globals(), {mode!r})\n")
  text = text.replace(_IMPORT, "", 1)
  # The stand-in goes after the test classes are defined (before `if __name__ ...`).
  main = "\nif __name__ == '__main__':"
  if text.count(main) != 1:
    raise RuntimeError(f"{alias_test_path()} has no single {main.strip()!r} block.")
  head, tail = text.split(main)
  return header + head + "\n" + stand_in + main + tail


def mark_not_applicable(namespace: dict, mode: str) -> None:
  """In mode 'all', replaces the NOT_APPLICABLE tests by skips carrying their reason."""
  if mode != "all":
    return
  for key, reason in NOT_APPLICABLE.items():
    cls_name, method = key.split(".")
    cls = namespace[cls_name]
    names = [n for n in dir(cls) if re.fullmatch(re.escape(method) + r"\d*", n)]
    if not names:
      raise RuntimeError(f"NOT_APPLICABLE names {key}, which Optax's suite no longer has.")
    for n in names:
      setattr(cls, n, unittest.skip(f"not applicable: {reason}")(getattr(cls, n)))


def load(mode: str) -> types.ModuleType:
  """The generated suite as a module (its source registered for tracebacks)."""
  name = f"optax_alias_test_{mode}"
  if name in sys.modules:
    return sys.modules[name]
  text = source(mode)
  filename = f"<{name}: generated from {alias_test_path()}>"
  linecache.cache[filename] = (len(text), None, text.splitlines(True), filename)
  module = types.ModuleType(name)
  module.__file__ = filename
  sys.modules[name] = module
  exec(compile(text, filename, "exec"), module.__dict__)  # pylint: disable=exec-used
  return module


def _main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--mode", choices=MODES, default="default")
  parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
  args = parser.parse_args()
  here = pathlib.Path(__file__).resolve().parent
  with tempfile.TemporaryDirectory() as tmp:
    path = pathlib.Path(tmp) / f"alias_test_{args.mode}.py"
    path.write_text(source(args.mode))
    env_path = [str(here)] + sys.path
    cmd = [sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider",
           "-rfEs", "--rootdir", tmp, str(path), *args.pytest_args]
    print("$", " ".join(cmd), flush=True)
    out = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": os.pathsep.join(env_path)},
                         capture_output=True, text=True, check=False)
  summary_at = out.stdout.find("short test summary info")
  print(out.stdout[max(0, summary_at - 80) if summary_at >= 0 else -20000:], out.stderr[-5000:],
        sep="\n")
  summary = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""
  # pytest may label these lines SUBSKIPPED[<a previous subtest>] (a subtests quirk).
  not_applicable = sum(int(n) for n in re.findall(
      r"SKIPPED(?:\[[^\]]*\])? \[(\d+)\].*not applicable", out.stdout))
  print(f"optax {optax.__version__}, mode {args.mode!r}: {summary}; of the skips, "
        f"{not_applicable} not applicable")
  return out.returncode


if __name__ == "__main__":
  if importlib.util.find_spec("optax_alias_suite") is None:
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
  sys.exit(_main())
