"""The quantization plan (recipe and rules) and the per-call session that applies it.

`make_plan` validates `quantize`'s arguments into a `Plan`: a recipe, and (regex, recipe or
None) rules that override it per module path. A `Session` is one quantized call (a Linen
`init`/`apply`, an NNX `__call__`): it records what each layer got, which rules matched, and
refuses delayed-scaling state read twice; `session()` enters one together with a
`flow.scope()`. Both backends (`wrap_linen`, `wrap_nnx`) import this module; it imports
neither.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import threading
import warnings
from collections.abc import Iterator, Sequence

from mpxla.nn import flow
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
  def _recipes(self) -> list[Recipe]:
    return [self.recipe] + [r for _, r in self.rules if r is not None]

  @property
  def remat(self) -> bool:
    """Whether the model runs under the FP8-only `jax.checkpoint` policy."""
    return any(r.activations is not None for r in self._recipes)

  @property
  def quantizes(self) -> bool:
    return any(r.quantizes for r in self._recipes)


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


class Session:
  """Records the layers a quantized call met, and refuses reused delayed-scaling state."""

  def __init__(self, plan: Plan):
    self.plan = plan
    self.report: dict[str, str] = {}
    self.used_rules: set[int] = set()
    self.delayed_calls: list[tuple] = []  # (path, trace state): the states do not hash

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
    """Refuses a second call of the layer in one trace (a body that Flax traces twice, as
    `nn.scan` does, is two traces)."""
    trace = flow._trace_state()
    if any(p == path and t == trace for p, t in self.delayed_calls):
      raise ValueError(
          f"layer {path!r} is called twice in one step with delayed scaling; its amax history "
          "would get two updates. Give it per-tensor 'tensor' scaling with a rule.")
    self.delayed_calls.append((path, trace))

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


_LOCAL = threading.local()  # the stack of open sessions, per thread


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
