"""Recipes: how a config's `recipe` field turns into a model wrapper and an optimizer.

| recipe       | model                                   | optimizer states            |
|--------------|-----------------------------------------|-----------------------------|
| `bf16`       | BF16 compute, float32 master weights    | AdamW, float32 moments      |
| `fp8_linear` | `mpxla.nn.quantize(model, 'fp8_linear')`| AdamW, float32 moments      |
| `fp8_delayed`| `mpxla.nn.quantize(model, 'fp8_delayed')`| AdamW, float32 moments     |
| `fp8_block`  | `mpxla.nn.quantize(model, 'fp8_block')` | AdamW, float32 moments      |
| `mxfp8`      | `mpxla.nn.quantize(model, 'mxfp8')`     | AdamW, float32 moments      |
| `coat`       | `mpxla.nn.quantize(model, 'coat')`      | `adamw_fp8` (E4M3 + expansion) |
| `hif8`       | `mpxla.nn.quantize(model, 'hif8')`      | `adamw_fp8` (E4M3 + expansion) |
| `bf16_sr`    | as `bf16`, BF16 parameters, no float32 copy | AdamW, float32 moments  |
| `coat_sr`    | as `coat`, BF16 parameters, no float32 copy | `adamw_fp8` (E4M3 + expansion) |

The recipe names are `mpxla.nn.RECIPES` (one registry); `FP8_STATE_RECIPES` says which of
them also keep the optimizer's moments in FP8, `BF16_PARAM_RECIPES` which store the
parameters in BF16 without a float32 master copy: gradients come out in BF16, the optimizer
computes in float32 (`mpxla.optim.upcast_arithmetic`) and the new parameters are rounded
to BF16 stochastically (`mpxla.optim.apply_updates_stochastic`, bits from the step and the
leaf, so a resume is bit-exact).

Embeddings and the output head stay in high precision (`HIGH_PRECISION_PATHS`).
`fp8_delayed` keeps amax histories in the model's 'fp8_state' collection; the trainer
differentiates the loss with respect to it and stores the result (its next value).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from mpxla.nn.recipes import RECIPES as MODEL_RECIPES
from mpxla.nn.recipes import get_recipe as mpxla_nn_recipe

RECIPES = tuple(MODEL_RECIPES)
FP8_STATE_RECIPES = ("coat", "hif8", "coat_sr")  # optimizer moments in FP8 (adamw_fp8)
BF16_PARAM_RECIPES = ("bf16_sr", "coat_sr")  # parameters in BF16, updated stochastically
# Module paths kept in high precision by the FP8 recipes (COAT keeps them too).
HIGH_PRECISION_PATHS = ("embed", "lm_head", "head")


def schedule(optim) -> optax.Schedule:
  """Linear warmup to `lr`, cosine decay to `lr * final_lr_fraction`."""
  return optax.warmup_cosine_decay_schedule(
      0.0, optim.lr, optim.warmup_steps, max(optim.decay_steps, optim.warmup_steps + 1),
      end_value=optim.lr * optim.final_lr_fraction)


def decay_mask(params):
  """Weight decay on matrices only (not on norms' scales or biases)."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(config) -> optax.GradientTransformation:
  recipe, o = config.recipe, config.optim
  _check(recipe)
  kwargs = dict(b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, mask=decay_mask)
  if recipe in FP8_STATE_RECIPES:
    from mpxla.optim import adamw_fp8

    adam = adamw_fp8(schedule(o), **kwargs)
  else:
    adam = optax.adamw(schedule(o), **kwargs)
  tx = adam
  if o.grad_clip:
    from mpxla.optim import clip_by_global_norm

    tx = optax.chain(clip_by_global_norm(o.grad_clip), adam)
  if recipe in BF16_PARAM_RECIPES:
    from mpxla.optim import upcast_arithmetic

    tx = upcast_arithmetic(tx)
  return tx


def param_dtype(recipe: str):
  """The dtype the trainer stores floating parameters in: BF16 or float32."""
  return jnp.bfloat16 if recipe in BF16_PARAM_RECIPES else jnp.float32


def wrap_model(model, recipe: str, gather_weight: bool = False):
  """The model with the recipe's FP8 matmuls and activations (unchanged for bf16).

  gather_weight: FSDP meshes: per-tensor-scaled FP8 matmuls all-gather their weights' FP8
  codes as uint8 (`DotConfig.gather_weight`).
  """
  _check(recipe)
  r = mpxla_nn_recipe(recipe)
  if not r.quantizes:
    return model
  from mpxla import nn as mpxla_nn

  if gather_weight and r.linear is not None and r.linear.scaling in ("tensor", "delayed"):
    r = dataclasses.replace(r, linear=dataclasses.replace(r.linear, gather_weight=True))
  return mpxla_nn.quantize(model, r, keep=HIGH_PRECISION_PATHS)


def _check(recipe: str) -> None:
  if recipe not in RECIPES:
    raise ValueError(f"recipe={recipe!r}; use one of {RECIPES}.")
