"""Training without float32 master weights: float32 optimizer arithmetic for low-precision
parameters, updates rounded stochastically back to the parameters' dtype, and gradient
clipping that does not store a clipped copy of every gradient.

    tx = upcast_arithmetic(adamw_fp8(lr))                 # or any Optax transform
    updates, opt_state = tx.update(grads_bf16, opt_state, params_bf16)
    params_bf16 = apply_updates_stochastic(params_bf16, updates, step)

`apply_updates_stochastic` computes p + u in float32 and rounds it to p's dtype:
stochastically for bfloat16 and float16 (E[p'] = p + u, so updates far below p's spacing
are not lost on average, as round to nearest would lose them), exactly as
`optax.apply_updates` for float32 and other dtypes. The random bits come from
(seed, step, leaf path, element index) (`mpxla.formats._random.counter_bits`): the same in
every process, on every mesh and after a resume, and nothing is stored.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mpxla.formats import _random

_STOCHASTIC_DTYPES = (np.dtype(jnp.bfloat16), np.dtype(np.float16))


def _salt(path, seed: int) -> int:
  return (_random.path_salt(path) + 0x9E3779B1 * int(seed)) & 0x7FFFFFFF


def apply_updates_stochastic(params: optax.Params, updates: optax.Updates, step: jax.Array | int,
                             *, seed: int = 0) -> optax.Params:
  """params + updates, each leaf rounded to its parameter's dtype (see the module docstring).

  Args:
    params: the parameters (any float dtypes; None leaves stay None).
    updates: the updates, same structure (any float dtype; computed in float32).
    step: the optimizer step (int scalar, traced or not): a new draw each step.
    seed: mixed into the draw (e.g. the run's seed).
  """

  def one(path, p, u):
    if p is None:
      return None
    p = jnp.asarray(p)
    if p.dtype not in _STOCHASTIC_DTYPES:
      return jnp.asarray(p + u).astype(p.dtype)  # = optax.apply_updates
    total = p.astype(jnp.float32) + jnp.asarray(u).astype(jnp.float32)
    bits = _random.counter_bits(p.shape, jnp.asarray(step), _salt(path, seed))
    return _random.round_stochastic(total, p.dtype, bits)

  return jax.tree_util.tree_map_with_path(one, params, updates, is_leaf=lambda x: x is None)


def upcast_arithmetic(inner: optax.GradientTransformation,
                      dtype: Any = jnp.float32) -> optax.GradientTransformationExtraArgs:
  """`inner` run on `dtype` copies of the updates and parameters.

  init builds the state from `dtype` parameters (so Adam's moments are float32 however the
  parameters are stored, and FP8-compressed moments decode to float32); update casts the
  incoming gradients and parameters (floating leaves only) and returns `dtype` updates.
  For float32 parameters and gradients it is `inner` itself.
  """
  inner = optax.with_extra_args_support(inner)

  def cast(tree):
    return jax.tree.map(
        lambda x: x.astype(dtype) if x is not None and jnp.issubdtype(x.dtype, jnp.floating)
        else x, tree)

  def init_fn(params):
    return inner.init(cast(params))

  def update_fn(updates, state, params=None, **extra_args):
    return inner.update(cast(updates), state, None if params is None else cast(params),
                        **extra_args)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
  """`optax.clip_by_global_norm` applied as one multiplication per element:

    u <- u * min(1, max_norm / ||u||),   ||u|| the 2-norm over all leaves (`optax.tree.norm`).

  Optax writes the clipped leaf as (u / ||u||) * max_norm, a division per element, and XLA
  then stores every clipped leaf (float32: 4 bytes per parameter) before the optimizer reads
  it, all leaves at once; a multiplication by one scalar is fused into each leaf's update
  instead (docs/optim.md, "Training without float32 master weights"). Equal to Optax's
  result when not clipping, within 2 ulp when clipping.
  """

  def update_fn(updates, state, params=None):
    del params
    norm = optax.tree.norm(updates)
    scale = jnp.where(norm < max_norm, 1.0, max_norm / norm)
    return jax.tree.map(lambda u: None if u is None else u * scale.astype(u.dtype), updates,
                        is_leaf=lambda x: x is None), state

  return optax.GradientTransformation(optax.init_empty_state, update_fn)
