"""`quantize(model, recipe, rules=...)`: FP8 matmuls and FP8-saved activations for unmodified models.

    qmodel = quantize(model, 'coat', keep=('embed', 'lm_head'))
    variables = qmodel.init(key, x)            # Linen: same init/apply, same variable tree
    y = qmodel.apply(variables, x)
    qmodel = quantize(nnx_model, 'coat')       # NNX: a rewritten copy, called like the original

Layers found (by type, in both APIs): Dense / Linear, DenseGeneral / LinearGeneral and
Einsum get an FP8 matmul (`fp8_dot`); LayerNorm and RMSNorm save their input as 1x16 FP8
(`fp8_act`); MultiHeadDotProductAttention / MultiHeadAttention are covered through their
DenseGeneral/LinearGeneral projections. Activation functions (`jax.nn.gelu`, `silu`, ...)
and other elementwise glue need no hook: under an activation-saving recipe ('coat', 'hif8')
the model runs under `jax.checkpoint(policy=mpxla.quant.tracing.POLICY)`, which saves only
FP8 tensors, and the backward recomputes the glue from the FP8 linear outputs it consumed.

Rules pick layers by module path ('/'-joined names, e.g. 'layer_0/mlp/gate'):
`rules=[(regex, recipe or None), ...]`, first `re.search` match wins; `keep=(regex, ...)` is
shorthand for `(regex, None)` (high precision) and is checked first. Unmatched layers get
`recipe`. A model in which no layer gets quantized is refused with an error, and a rule
that matches no module at all is reported with a warning.

How: Linen modules are created inside their parents' methods, so they cannot be replaced
ahead of time; `flax.linen.intercept_methods` catches each layer's `__call__` instead (the
FP8 matmul enters through the layer's own `dot_general` field for Dense/DenseGeneral; Einsum
and the norms are recomputed with the layer's own parameters). NNX modules exist as objects,
so `quantize` rewrites a copy: it sets `dot_general` / `einsum_op` of linear layers, swaps
norms to FP8-saving subclasses, and subclasses the root to run its `__call__` in the
FP8 context. Parameter trees stay exactly those of the original model either way.

This module is the entry only: the plan and per-call session are in `_plan`, the layer
operations both backends share in `_layers`, the backends in `wrap_linen` and `wrap_nnx`.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
from flax import nnx

from mpxla.nn._plan import RuleLike, make_plan
from mpxla.nn.recipes import Recipe
from mpxla.nn.wrap_linen import QuantizedModule
from mpxla.nn.wrap_nnx import quantize_nnx


def quantize(model, recipe: str | Recipe = "coat", *, rules: Sequence[RuleLike] = (),
             keep: Sequence[str] = ()):
  """Returns `model` with FP8 matmuls and FP8-saved activations per `recipe` (module docstring).

  Args:
    model: a `flax.linen.Module` or `flax.nnx.Module` built from stock Flax layers.
    recipe: 'bf16', 'fp8_linear', 'fp8_delayed', 'fp8_block', 'coat', 'hif8' or a `Recipe`.
    rules: (regex, recipe or None) pairs selecting a recipe per module path; first match wins.
    keep: regexes of module paths kept in high precision (e.g. ('embed', 'lm_head')).

  Returns:
    Linen: a module with the same `init`/`apply` (and variable tree) as `model`. NNX: a
    rewritten copy of `model`, called like it. 'bf16' without rules returns `model` itself.
  """
  plan = make_plan(recipe, rules, keep)
  if not plan.quantizes:
    return model
  if isinstance(model, nn.Module):
    return QuantizedModule(model, plan)
  if isinstance(model, nnx.Module):
    return quantize_nnx(model, plan)
  raise TypeError(f"quantize needs a flax.linen.Module or flax.nnx.Module, got {type(model)}.")


def describe(qmodel, *args, **kwargs) -> dict[str, str]:
  """{module path: what `quantize` does to it} for the layers met when calling it on args.

  Linen: traces `qmodel.init(jax.random.key(0), *args, **kwargs)` abstractly. NNX: reports
  the rewrite done by `quantize` (args are not needed).
  """
  if isinstance(qmodel, QuantizedModule):
    return qmodel.describe(*args, **kwargs)
  report = getattr(qmodel, "mpxla_report", None)
  if report is None:
    raise TypeError("describe() takes a model returned by mpxla.nn.quantize.")
  return dict(report)
