"""Delayed-scaling state: amax histories in their own Flax collection, updated through the gradient.

A layer with `DotConfig(scaling='delayed')` keeps three float32 histories of length L
(index 0 newest): of its input ('lhs'), its weight ('rhs') and its output gradient ('grad').
Step t scales with the max over the history (while the history is all zero, with the current
amax). The gradient amax is only known in the backward pass, so the state is updated the
way Flax's own FP8 layers do it: the state is an *input* of the FP8 matmul, and its gradient
is its next value (overwrite-with-gradient). In Linen the histories live in the collection
`COLLECTION` ('fp8_state'); in NNX they are `Fp8State` variables.

What a trainer must do (the state is not a parameter):

    # Linen
    def loss_fn(params, fp8_state, batch):
      out = qmodel.apply({'params': params, COLLECTION: fp8_state}, batch['x'])
      ...
    loss, (grads, new_fp8_state) = jax.value_and_grad(loss_fn, argnums=(0, 1))(params, fp8_state, batch)
    updates, opt_state = tx.update(grads, opt_state, params)      # params only
    fp8_state = jax.lax.cond(all_finite(new_fp8_state), lambda: new_fp8_state, lambda: fp8_state)

    # NNX
    diff = nnx.DiffState(0, nnx.Any(nnx.Param, Fp8State))
    grads = nnx.grad(loss_fn, argnums=diff)(model)
    optimizer.update(model, nnx.filter_state(grads, nnx.Param))   # nnx.Optimizer(wrt=nnx.Param)
    nnx.update(model, nnx.filter_state(grads, Fp8State))

* Never hand the state to the optimizer (no Adam moments, no weight decay): its "gradient"
  is a replacement value, not a direction.
* Checkpoint it with the parameters (it is ordinary float32 arrays); a resumed run then
  continues bit for bit.
* Under `jit` the amaxes are global over the batch (a reduction over a sharded array), and
  inside `shard_map` `DotConfig.axis_name` makes them a `pmax`: every device holds the same
  state.
* A non-finite amax (inf/NaN in an input, weight or gradient) enters the history and makes
  the next scales NaN for up to L steps: check `all_finite(new_state)` and keep the old
  state (and skip the step) when it is False, as with loss scaling.
* Each layer's state must be read once per step: a layer called twice in one forward pass
  would receive the sum of two updates. `mpxla.nn.quantize` refuses that case.
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
