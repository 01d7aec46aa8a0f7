"""Optax's own alias_test.py, generated from the installed Optax with every optimizer wrapped.

Every optimizer built through `alias` is `compress_states(opt, min_size=1)` (default leaf
classification and rounding); tests, problems and tolerances are Optax's. See
optax_alias_suite.py for the generation and its other modes; the default tier runs the
convergence cases in test_optim_optax_convergence.py. Slow tier: about 7 minutes on 2 cores.
"""

import optax_alias_suite
import pytest

# Optax's alias_test.py imports both (the `data` extra installs scikit-learn).
pytest.importorskip("scipy")
pytest.importorskip("sklearn")

pytestmark = pytest.mark.slow

_SUITE = optax_alias_suite.load("default")
AliasTest = _SUITE.AliasTest
LBFGSTest = _SUITE.LBFGSTest
