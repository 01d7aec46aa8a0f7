"""What a matched layer computes, shared by the Linen (`wrap_linen`) and NNX (`wrap_nnx`) backends.

* `describe_recipe`: the line `describe` reports for a layer.
* `layer_dot_general` / `layer_einsum` (`fp8_op`): the FP8 drop-ins a linear layer gets (FP8
  matmul, then its output in FP8 under activation-saving recipes); `keep_dot_general` /
  `keep_einsum` (`keep_op`): the drop-ins of a layer kept in high precision under remat (its
  input is saved as it is).
* `last_axis_only`, `fp8_norm`: which norms get an FP8-saving replacement, and that replacement.
* `checkpointed`: a call under the FP8-only remat policy, arrays and static values mixed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mpxla.nn import flow, fp8_act, fp8_stats
from mpxla.nn.fp8_dot import fp8_dot_general, fp8_einsum
from mpxla.nn.recipes import Recipe
from mpxla.quant import tracing


def describe_recipe(recipe: Recipe | None, kind: str) -> str:
  if recipe is None:
    return f"kept ({kind} in high precision)"
  if kind == "norm" and recipe.activations:
    return f"fp8-saved {kind} (1x{recipe.group} {recipe.activations})"
  if kind == "norm":
    return f"kept ({kind}: recipe {recipe.name!r} saves no activations)"
  if recipe.linear is None:
    return f"kept ({kind}: recipe {recipe.name!r} has no FP8 matmul)"
  out = f", output 1x{recipe.group} {recipe.activations}" if recipe.activations else ""
  return f"fp8 {kind} ({recipe.linear.scaling}{out})"


def _output(y: jax.Array, recipe: Recipe) -> jax.Array:
  return flow.output_point(y, recipe.activations, recipe.group) if recipe.activations else y


def layer_dot_general(recipe: Recipe, state=None, probe=None):
  """A `dot_general` drop-in for a linear layer under `recipe` (FP8 matmul, FP8 output flow)."""

  def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None,
                  out_sharding=None):
    return _output(fp8_dot_general(lhs, rhs, dimension_numbers, precision,
                                   preferred_element_type, out_sharding, config=recipe.linear,
                                   state=state, stats_probe=probe), recipe)

  return dot_general


def layer_einsum(recipe: Recipe, state=None, probe=None):
  """An `einsum` drop-in for an Einsum layer under `recipe`."""

  def einsum(subscripts, lhs, rhs, precision=None, preferred_element_type=None,
             out_sharding=None):
    return _output(fp8_einsum(subscripts, lhs, rhs, precision=precision,
                              preferred_element_type=preferred_element_type,
                              out_sharding=out_sharding, config=recipe.linear, state=state,
                              stats_probe=probe), recipe)

  return einsum


def wants_stats(recipe: Recipe) -> bool:
  """Whether a layer under `recipe` reads an fp8_stats probe (inside `fp8_stats.collecting()`)."""
  return fp8_stats.enabled() and recipe.linear.scaling in ("tensor", "delayed")


def moe_fp8(layer, recipe: Recipe | None):
  """The `DotConfig` an MoE layer's expert matmuls get under `recipe`, or None (kept): FP8
  recipes, sparse dispatch with 'ragged_dot', no FP8 config of its own."""
  if recipe is None or recipe.linear is None or layer.fp8 is not None:
    return None
  if layer.dispatch != "sparse" or layer.grouped_matmul != "ragged_dot":
    return None
  return recipe.linear


def describe_moe(recipe: Recipe | None, config) -> str:
  if config is not None:
    return "fp8 MoE experts (grouped matmuls, per-expert tensor scaling)"
  if recipe is None or recipe.linear is None:
    return "kept (MoE experts in high precision)"
  return "kept (MoE experts: FP8 needs dispatch='sparse', grouped_matmul='ragged_dot')"


def keep_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None,
                     out_sharding=None):
  """`lax.dot_general` whose input is saved as it is under the FP8 remat policy."""
  kwargs = {} if out_sharding is None else {"out_sharding": out_sharding}
  return jax.lax.dot_general(tracing.tag(lhs, tracing.KEEP), rhs, dimension_numbers, precision,
                             preferred_element_type, **kwargs)


def keep_einsum(subscripts, lhs, rhs, precision=None, preferred_element_type=None,
                out_sharding=None):
  return jnp.einsum(subscripts, tracing.tag(lhs, tracing.KEEP), rhs, precision=precision,
                    preferred_element_type=preferred_element_type, out_sharding=out_sharding)


def fp8_op(recipe: Recipe, state, einsum: bool, probe=None):
  """`layer_einsum` or `layer_dot_general` of `recipe` with delayed-scaling `state` (or None)
  and an fp8_stats `probe` (or None)."""
  return (layer_einsum if einsum else layer_dot_general)(recipe, state, probe)


def keep_op(einsum: bool):
  return keep_einsum if einsum else keep_dot_general


def last_axis_only(norm) -> bool:
  """Whether a Flax RMSNorm/LayerNorm (Linen or NNX) normalizes over the last axis, unsharded:
  the only configuration `fp8_act`'s norms compute."""
  return all(a in (-1, (-1,), [-1]) for a in (norm.reduction_axes, norm.feature_axes)) and (
      norm.axis_name is None)


def fp8_norm(kind: str, x, scale, bias, *, eps: float, dtype, recipe: Recipe) -> jax.Array:
  """`fp8_act.rms_norm` (kind 'rms_norm') or `layer_norm` with a norm layer's own parameters."""
  common = dict(eps=eps, dtype=dtype, fmt=recipe.activations, group=recipe.group,
                linear_input=recipe.linear)
  if kind == "rms_norm":
    return fp8_act.rms_norm(x, scale, **common)
  return fp8_act.layer_norm(x, scale, bias, **common)


def _split_static(args: tuple, kwargs: dict):
  """(array leaves, rebuild): rebuild(arrays) gives back (args, kwargs) with static leaves kept."""
  leaves, tree = jax.tree.flatten((args, kwargs))
  is_array = [isinstance(x, jax.Array | np.ndarray | np.generic) for x in leaves]

  def rebuild(arrays):
    it = iter(arrays)
    return jax.tree.unflatten(tree, [next(it) if a else x for a, x in zip(is_array, leaves,
                                                                          strict=True)])

  return [x for x, a in zip(leaves, is_array, strict=True) if a], rebuild


def checkpointed(remat, fn, lead: tuple, args: tuple, kwargs: dict):
  """fn(*lead, *args, **kwargs) under `remat(policy=tracing.POLICY)`.

  `remat` is `jax.checkpoint` or `nnx.remat`; `lead` passes to it as it is (an NNX module);
  the non-array leaves of args and kwargs stay static (Python values a model call may take).
  """
  arrays, rebuild = _split_static(args, kwargs)

  def run(*lead_and_arrays):
    a, k = rebuild(lead_and_arrays[-1])
    return fn(*lead_and_arrays[:-1], *a, **k)

  return remat(run, policy=tracing.POLICY, prevent_cse=True)(*lead, arrays)
