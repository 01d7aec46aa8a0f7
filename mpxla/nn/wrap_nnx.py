"""`quantize` for NNX: a rewritten copy of the model, with the original's state paths.

NNX modules exist as objects before they are called, so `quantize_nnx` rewrites a clone:

* Linear, LinearGeneral: `dot_general` is set to an `Fp8Dot` (an `nnx.Module` holding the
  delayed-scaling `Fp8State` histories when the recipe uses them); Einsum: `einsum_op`.
* RMSNorm, LayerNorm over the last axis: the instance's class becomes an FP8-saving
  subclass (same attributes and parameters, so same state paths).
* The root's class becomes a subclass whose `__call__` runs the original one inside the
  FP8 flow context, under `nnx.remat(policy=mpxla.quant.tracing.POLICY)` for
  activation-saving recipes.
"""

from __future__ import annotations

import functools

import jax
from flax import nnx

from mpxla import quant
from mpxla.nn import _layers
from mpxla.nn._plan import Plan, Session, current_session, session
from mpxla.nn.delayed import HISTORY_NAMES, Fp8State
from mpxla.nn.moe import NNXMoE
from mpxla.nn.recipes import Recipe
from mpxla.quant import tracing


class Fp8Dot(nnx.Module):
  """The FP8 `dot_general` (or `einsum`) of one NNX linear layer, with its delayed state."""

  def __init__(self, recipe: Recipe, path: str, einsum: bool = False):
    self.recipe = recipe
    self.path = path
    self.einsum = einsum
    if recipe.linear.scaling == "delayed":
      for name in HISTORY_NAMES.values():
        setattr(self, name, Fp8State(quant.init_amax_history(recipe.linear.history)))

  def _state(self):
    if self.recipe.linear.scaling != "delayed":
      return None
    sess = current_session()
    if sess is not None:
      sess.delayed_state_used(self.path)
    return {k: getattr(self, name)[...] for k, name in HISTORY_NAMES.items()}

  def __call__(self, *args, **kwargs):
    return _layers.fp8_op(self.recipe, self._state(), self.einsum)(*args, **kwargs)


def _remat_active() -> bool:
  sess = current_session()
  return sess is not None and sess.plan.remat


def _norm_call(module, base_call, x, mask, kind: str):
  recipe = module.mpxla_recipe
  if mask is not None or recipe is None or recipe.activations is None:
    if _remat_active():
      x = tracing.tag(x, tracing.KEEP)
    return base_call(module, x, mask=mask)
  scale = module.scale[...] if module.use_scale else None
  bias = module.bias[...] if kind == "layer_norm" and module.use_bias else None
  return _layers.fp8_norm(kind, x, scale, bias, eps=module.epsilon, dtype=module.dtype,
                          recipe=recipe)


class Fp8RMSNorm(nnx.RMSNorm):
  """`nnx.RMSNorm` whose input is saved as 1x16 FP8 (the class `quantize` gives RMSNorms)."""

  def __call__(self, x, *, mask=None):
    return _norm_call(self, nnx.RMSNorm.__call__, x, mask, "rms_norm")


class Fp8LayerNorm(nnx.LayerNorm):
  """`nnx.LayerNorm` whose input is saved as 1x16 FP8."""

  def __call__(self, x, *, mask=None):
    return _norm_call(self, nnx.LayerNorm.__call__, x, mask, "layer_norm")


_NORMS = {nnx.RMSNorm: Fp8RMSNorm, nnx.LayerNorm: Fp8LayerNorm}


@functools.cache
def _root_class(cls: type) -> type:
  """A subclass of the model's class whose `__call__` runs in the FP8 context."""

  def __call__(self, *args, **kwargs):
    plan: Plan = self.mpxla_plan

    def run(module, *a, **k):
      with session(plan, cls.__name__, check=False):
        return cls.__call__(module, *a, **k)

    if plan.remat:
      return _layers.checkpointed(nnx.remat, run, (self,), args, kwargs)
    return run(self, *args, **kwargs)

  return type(f"Quantized{cls.__name__}", (cls,),
              {"__call__": __call__, "__module__": cls.__module__,
               "__qualname__": f"Quantized{cls.__qualname__}"})


def quantize_nnx(model: nnx.Module, plan: Plan) -> nnx.Module:
  """A rewritten copy of `model` (see the module docstring); `model` is not changed."""
  model = nnx.clone(model)
  name = type(model).__name__
  sess = Session(plan)
  for path_parts, node in list(nnx.iter_graph(model)):
    if not isinstance(node, nnx.Module):
      continue
    path = "/".join(str(p) for p in path_parts)
    sess.saw(path)
    if isinstance(node, nnx.Linear | nnx.LinearGeneral | nnx.Einsum):
      kind = type(node).__name__
      einsum = isinstance(node, nnx.Einsum)
      custom = not einsum and (
          node.dot_general is not jax.lax.dot_general and node.dot_general is not None
          or getattr(node, "dot_general_cls", None) is not None)
      if custom:
        sess.note(path, f"skipped ({kind} already has a custom dot_general)")
        continue
      recipe = sess.resolve(path)
      sess.note(path, _layers.describe_recipe(recipe, kind))
      if recipe is None or recipe.linear is None:
        op = _layers.keep_op(einsum) if plan.remat else None
      else:
        op = Fp8Dot(recipe, path, einsum=einsum)
      if isinstance(op, nnx.Module):
        op = nnx.data(op)  # a graph node (it may hold Fp8State), where a function was static
      if op is not None and einsum:
        node.einsum_op = op
      elif op is not None:
        node.dot_general = op
        if isinstance(node, nnx.LinearGeneral):
          node.dot_general_cls = None
    elif isinstance(node, NNXMoE):
      recipe = sess.resolve(path)
      config = _layers.moe_fp8(node, recipe)
      sess.note(path, _layers.describe_moe(recipe, config))
      if config is not None:
        node.fp8 = config
    elif type(node) in _NORMS:
      recipe = sess.resolve(path)
      if not _layers.last_axis_only(node):
        sess.note(path, "kept (norm over other axes than the last)")
        recipe = None
      else:
        sess.note(path, _layers.describe_recipe(recipe, "norm"))
      node.mpxla_recipe = recipe
      node.__class__ = _NORMS[type(node)]
  sess.finish(name)
  model.mpxla_plan = plan
  model.mpxla_report = tuple(sess.report.items())
  model.__class__ = _root_class(type(model))
  return model
