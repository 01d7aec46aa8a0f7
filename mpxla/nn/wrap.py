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
the model runs under `jax.checkpoint(policy=flow.POLICY)`, which saves only FP8 tensors, and
the backward recomputes the glue from the FP8 linear outputs it consumed.

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
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import threading
import warnings
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mpxla.nn import flow
from mpxla.nn.fp8_dot import fp8_dot_general, fp8_einsum
from mpxla.nn.recipes import Recipe, get_recipe

RuleLike = tuple[str, "str | Recipe | None"]


@dataclasses.dataclass(frozen=True)
class Plan:
  """A recipe and the rules that override it per module path."""

  recipe: Recipe
  rules: tuple[tuple[str, Recipe | None], ...] = ()

  def resolve(self, path: str) -> tuple[Recipe | None, int | None]:
    """(the recipe for a layer at `path` or None for high precision, the matching rule)."""
    for i, (pattern, recipe) in enumerate(self.rules):
      if re.search(pattern, path):
        return recipe, i
    return self.recipe, None

  @property
  def remat(self) -> bool:
    """Whether the model runs under the FP8-only `jax.checkpoint` policy."""
    recipes = [self.recipe] + [r for _, r in self.rules if r is not None]
    return any(r.activations is not None for r in recipes)

  @property
  def quantizes(self) -> bool:
    recipes = [self.recipe] + [r for _, r in self.rules if r is not None]
    return any(r.quantizes for r in recipes)


def make_plan(recipe, rules: Sequence[RuleLike] = (), keep: Sequence[str] = ()) -> Plan:
  """Validates the arguments of `quantize` into a `Plan`."""
  base = get_recipe(recipe)
  if base is None:
    raise ValueError("recipe=None; use 'bf16' for a model that is not quantized.")
  if isinstance(keep, str):
    keep = (keep,)
  compiled = []
  for item in [(p, None) for p in keep] + list(rules):
    if not (isinstance(item, tuple | list) and len(item) == 2 and isinstance(item[0], str)):
      raise ValueError(f"rules entries are (regex, recipe or None) pairs, got {item!r}.")
    try:
      re.compile(item[0])
    except re.error as e:
      raise ValueError(f"rule pattern {item[0]!r} is not a valid regular expression: {e}") from e
    compiled.append((item[0], get_recipe(item[1])))
  return Plan(base, tuple(compiled))


# One quantized call (an init, apply or NNX __call__): what was matched, and flow state.


class Session:
  """Records the layers a quantized call met, and refuses reused delayed-scaling state."""

  def __init__(self, plan: Plan):
    self.plan = plan
    self.report: dict[str, str] = {}
    self.used_rules: set[int] = set()
    self.delayed_calls: set[str] = set()

  def resolve(self, path: str) -> Recipe | None:
    recipe, rule = self.plan.resolve(path)
    if rule is not None:
      self.used_rules.add(rule)
    return recipe

  def saw(self, path: str) -> None:
    """Marks the rules matching a module path (any module: a rule for nn.Embed is no typo)."""
    for i, (pattern, _) in enumerate(self.plan.rules):
      if re.search(pattern, path):
        self.used_rules.add(i)

  def note(self, path: str, what: str) -> None:
    self.report[path] = what

  def delayed_state_used(self, path: str) -> None:
    if path in self.delayed_calls:
      raise ValueError(
          f"layer {path!r} is called twice in one step with delayed scaling; its amax history "
          "would get two updates. Give it per-tensor 'tensor' scaling with a rule.")
    self.delayed_calls.add(path)

  def finish(self, model_name: str) -> None:
    if self.plan.quantizes and not any(v.startswith("fp8") for v in self.report.values()):
      seen = ", ".join(f"{p or '<root>'}: {v}" for p, v in self.report.items()) or "none"
      raise ValueError(
          f"quantize({model_name}, {self.plan.recipe.name!r}): no layer was quantized. "
          "mpxla.nn.quantize finds Dense/Linear, DenseGeneral/LinearGeneral, Einsum, LayerNorm "
          f"and RMSNorm layers; layers met: {seen}. Check the rules/keep patterns, or use "
          "recipe 'bf16' for an unquantized model.")
    for i, (pattern, _) in enumerate(self.plan.rules):
      if i not in self.used_rules:
        warnings.warn(f"mpxla.nn.quantize: rule {pattern!r} matched no module of {model_name}.",
                      stacklevel=3)


_LOCAL = threading.local()


def current_session() -> Session | None:
  stack = getattr(_LOCAL, "stack", [])
  return stack[-1] if stack else None


@contextlib.contextmanager
def session(plan: Plan, model_name: str, check: bool = True) -> Iterator[Session]:
  """Enters a quantized call: a flow scope plus a `Session` that `finish`es on exit."""
  if not hasattr(_LOCAL, "stack"):
    _LOCAL.stack = []
  s = Session(plan)
  _LOCAL.stack.append(s)
  try:
    with flow.scope():
      yield s
  finally:
    _LOCAL.stack.pop()
  if check:
    s.finish(model_name)


# What a matched layer computes (shared by the Linen and NNX paths).


def describe_recipe(recipe: Recipe | None, kind: str) -> str:
  if recipe is None:
    return f"kept ({kind} in high precision)"
  if kind == "norm":
    return (f"fp8-saved {kind} (1x{recipe.group} {recipe.activations})"
            if recipe.activations else f"kept ({kind}: recipe {recipe.name!r} saves no activations)")
  if recipe.linear is None:
    return f"kept ({kind}: recipe {recipe.name!r} has no FP8 matmul)"
  out = f", output 1x{recipe.group} {recipe.activations}" if recipe.activations else ""
  return f"fp8 {kind} ({recipe.linear.scaling}{out})"


def layer_dot_general(recipe: Recipe, state=None):
  """A `dot_general` drop-in for a linear layer under `recipe` (FP8 matmul, FP8 output flow)."""

  def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None,
                  out_sharding=None):
    y = fp8_dot_general(lhs, rhs, dimension_numbers, precision, preferred_element_type,
                        out_sharding, config=recipe.linear, state=state)
    return flow.output_point(y, recipe.activations, recipe.group) if recipe.activations else y

  return dot_general


def layer_einsum(recipe: Recipe, state=None):
  """An `einsum` drop-in for an Einsum layer under `recipe`."""

  def einsum(subscripts, lhs, rhs, precision=None, preferred_element_type=None,
             out_sharding=None):
    y = fp8_einsum(subscripts, lhs, rhs, precision=precision,
                   preferred_element_type=preferred_element_type, out_sharding=out_sharding,
                   config=recipe.linear, state=state)
    return flow.output_point(y, recipe.activations, recipe.group) if recipe.activations else y

  return einsum


def keep_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None,
                     out_sharding=None):
  """`lax.dot_general` whose input is saved as it is under the FP8 remat policy."""
  kwargs = {} if out_sharding is None else {"out_sharding": out_sharding}
  return jax.lax.dot_general(flow.tag(lhs, flow.KEEP), rhs, dimension_numbers, precision,
                             preferred_element_type, **kwargs)


def keep_einsum(subscripts, lhs, rhs, precision=None, preferred_element_type=None,
                out_sharding=None):
  return jnp.einsum(subscripts, flow.tag(lhs, flow.KEEP), rhs, precision=precision,
                    preferred_element_type=preferred_element_type, out_sharding=out_sharding)


# jax.checkpoint over a call whose arguments mix arrays and static Python values.


def split_static(args: tuple, kwargs: dict):
  """(array leaves, rebuild): rebuild(arrays) gives back (args, kwargs) with static leaves kept."""
  leaves, tree = jax.tree.flatten((args, kwargs))
  is_array = [isinstance(x, jax.Array | np.ndarray | np.generic) for x in leaves]

  def rebuild(arrays):
    it = iter(arrays)
    return jax.tree.unflatten(tree, [next(it) if a else x for a, x in zip(is_array, leaves,
                                                                          strict=True)])

  return [x for x, a in zip(leaves, is_array, strict=True) if a], rebuild


def checkpointed(fn, *args, **kwargs):
  """fn(*args, **kwargs) under `jax.checkpoint(policy=flow.POLICY)`; non-arrays stay static."""
  arrays, rebuild = split_static(args, kwargs)

  def run(arrays):
    a, k = rebuild(arrays)
    return fn(*a, **k)

  return jax.checkpoint(run, policy=flow.POLICY, prevent_cse=True)(arrays)


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
  import flax.linen as nn
  from flax import nnx

  if isinstance(model, nn.Module):
    from mpxla.nn.wrap_linen import QuantizedModule

    return QuantizedModule(model, plan)
  if isinstance(model, nnx.Module):
    from mpxla.nn.wrap_nnx import quantize_nnx

    return quantize_nnx(model, plan)
  raise TypeError(f"quantize needs a flax.linen.Module or flax.nnx.Module, got {type(model)}.")


def describe(qmodel, *args, **kwargs) -> dict[str, str]:
  """{module path: what `quantize` does to it} for the layers met when calling it on args.

  Linen: traces `qmodel.init(jax.random.key(0), *args, **kwargs)` abstractly. NNX: reports
  the rewrite done by `quantize` (args are not needed).
  """
  from mpxla.nn.wrap_linen import QuantizedModule

  if isinstance(qmodel, QuantizedModule):
    return qmodel.describe(*args, **kwargs)
  report = getattr(qmodel, "mpxla_report", None)
  if report is None:
    raise TypeError("describe() takes a model returned by mpxla.nn.quantize.")
  return dict(report)
