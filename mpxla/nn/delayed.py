"""Delayed-scaling state: amax histories in their own Flax collection, updated through the gradient.

A layer with `DotConfig(scaling='delayed')` keeps three float32 histories of length L
(index 0 newest): of its input ('lhs'), its weight ('rhs') and its output gradient ('grad').
The gradient amax is only known in the backward pass, so, as in Flax's own FP8 layers, the
state is an *input* of the FP8 matmul whose gradient is its next value. In Linen the
histories live in the collection `COLLECTION` ('fp8_state'); in NNX they are `Fp8State`
variables. The state is not a parameter: keep it out of the optimizer, overwrite it with its
gradient each step when `all_finite`, checkpoint it with the parameters. The training step
for both APIs and the reasons: docs/nn.md, "Delayed scaling state".
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

COLLECTION = "fp8_state"
HISTORY_NAMES = {"lhs": "lhs_amax_history", "rhs": "rhs_amax_history",
                 "grad": "grad_amax_history"}


class Fp8State(nnx.Variable):
  """NNX variable type of the delayed-scaling amax histories (not an `nnx.Param`)."""


def all_finite(state: Any) -> jax.Array:
  """True when every amax in `state` (any pytree of histories) is finite."""
  leaves = jax.tree.leaves(state)
  if not leaves:
    return jnp.bool_(True)
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def split_variables(variables: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
  """Linen variables -> (variables without the FP8 state, the FP8 state collection)."""
  rest = {k: v for k, v in variables.items() if k != COLLECTION}
  return rest, variables.get(COLLECTION, {})
