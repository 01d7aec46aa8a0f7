"""`quantize` for Linen: method interception, same `init` / `apply` and variable tree.

Linen builds submodules inside its parents' methods, so there is nothing to rewrite before
a call. `QuantizedModule.init/apply` run the original module's `init/apply` inside
`flax.linen.intercept_methods`, which catches each layer's `__call__`:

* Dense, DenseGeneral: the layer's own `dot_general` field is set to the FP8 matmul for the
  duration of the call (the layer then runs its own code: same parameters, same shapes).
  Layers that already carry a custom `dot_general`/`dot_general_cls` are left alone.
* Einsum (no `dot_general` field): recomputed here with the layer's own parameters and
  `fp8_einsum`.
* RMSNorm, LayerNorm over the last axis: recomputed with their own parameters by the
  FP8-saving `fp8_act.rms_norm/layer_norm`; other configurations run as they are.

Delayed scaling keeps its amax histories in the 'fp8_state' collection of each layer
(`mpxla.nn.delayed`). Under activation-saving recipes `apply` runs under
`jax.checkpoint(policy=mpxla.quant.tracing.POLICY)` (see `mpxla.nn.quantize`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp

from mpxla import quant
from mpxla.nn import _layers, fp8_stats
from mpxla.nn._plan import Plan, Session, session
from mpxla.nn.delayed import COLLECTION, HISTORY_NAMES
from mpxla.nn.moe import MoE
from mpxla.quant import tracing

_NORMS = {nn.RMSNorm: "rms_norm", nn.LayerNorm: "layer_norm"}


@contextlib.contextmanager
def _fields(module: nn.Module, **values) -> Iterator[None]:
  """Temporarily sets dataclass fields of a bound module (restored afterwards)."""
  old = {k: getattr(module, k) for k in values}
  for k, v in values.items():
    object.__setattr__(module, k, v)
  try:
    yield
  finally:
    for k, v in old.items():
      object.__setattr__(module, k, v)


def _path(m: nn.Module) -> str:
  return "/".join(str(p) for p in m.path)


def _delayed_state(m: nn.Module, recipe, sess: Session, path: str):
  if recipe.linear.scaling != "delayed":
    return None
  sess.delayed_state_used(path)
  state = {}
  for key, name in HISTORY_NAMES.items():
    if not m.has_variable(COLLECTION, name) and not m.is_mutable_collection(COLLECTION):
      raise ValueError(
          f"layer {path!r} uses delayed scaling, but the variables have no {COLLECTION!r} "
          "collection: apply the variables returned by the quantized model's init().")
    state[key] = m.variable(COLLECTION, name, quant.init_amax_history, recipe.linear.history).value
  return state


def _linear_op(m, sess: Session, path: str, kind: str, remat: bool, einsum: bool):
  """The dot_general (or einsum) a linear layer runs with; None: it runs as it is."""
  recipe = sess.resolve(path)
  sess.note(path, _layers.describe_recipe(recipe, kind))
  if recipe is None or recipe.linear is None:
    return _layers.keep_op(einsum) if remat else None
  probe = None
  if _layers.wants_stats(recipe):
    probe = m.variable(fp8_stats.COLLECTION, fp8_stats.PROBE, jnp.zeros,
                       (len(fp8_stats.TENSORS), len(fp8_stats.STATS)), jnp.float32).value
  return _layers.fp8_op(recipe, _delayed_state(m, recipe, sess, path), einsum, probe)


def _dense(m, next_fun, args, kwargs, sess: Session, remat: bool):
  path = _path(m)
  kind = type(m).__name__
  if m.dot_general is not None or m.dot_general_cls is not None:
    sess.note(path, f"skipped ({kind} already has a custom dot_general)")
    return next_fun(*args, **kwargs)
  fn = _linear_op(m, sess, path, kind, remat, einsum=False)
  if fn is None:
    return next_fun(*args, **kwargs)
  with _fields(m, dot_general=fn):
    return next_fun(*args, **kwargs)


def _einsum(m, next_fun, args, kwargs, sess: Session, remat: bool):
  path = _path(m)
  op = _linear_op(m, sess, path, "Einsum", remat, einsum=True)
  if op is None:
    return next_fun(*args, **kwargs)
  inputs = args[0] if args else kwargs["inputs"]
  einsum_str = args[1] if len(args) > 1 else kwargs.get("einsum_str")
  einsum_str = nn.merge_param("einsum_str", m.einsum_str, einsum_str).replace(" ", "")
  if "->" not in einsum_str or einsum_str.count(",") != 1:
    raise ValueError(f"Einsum at {path!r}: einsum_str {einsum_str!r} must be explicit with two "
                     "operands.")
  kernel = m.param("kernel", m.kernel_init, m.shape, m.param_dtype)
  bias = None
  if m.use_bias:
    bias_shape, broadcast_shape = m._get_bias_shape(einsum_str, inputs, kernel)
    bias = m.param("bias", m.bias_init, bias_shape, m.param_dtype)
  inputs, kernel, bias = m.promote_dtype(inputs, kernel, bias, dtype=m.dtype)
  y = op(einsum_str, inputs, kernel, precision=m.precision,
         preferred_element_type=m.preferred_element_type)
  if bias is not None:
    y = y + jnp.reshape(bias, broadcast_shape)
  return y


def _moe(m, next_fun, args, kwargs, sess: Session):
  """An MoE layer's expert matmuls in FP8 (per-expert scales) under an FP8 recipe."""
  path = _path(m)
  recipe = sess.resolve(path)
  config = _layers.moe_fp8(m, recipe)
  sess.note(path, _layers.describe_moe(recipe, config))
  if config is None:
    return next_fun(*args, **kwargs)
  with _fields(m, fp8=config):
    return next_fun(*args, **kwargs)


def _norm(m, next_fun, args, kwargs, sess: Session, remat: bool):
  path = _path(m)
  kind = _NORMS[type(m)]
  x = args[0] if args else kwargs["x"]
  mask = args[1] if len(args) > 1 else kwargs.get("mask")
  recipe = sess.resolve(path)
  if mask is not None or not _layers.last_axis_only(m):
    sess.note(path, f"kept ({kind} with a mask or over other axes than the last)")
    recipe = None
  else:
    sess.note(path, _layers.describe_recipe(recipe, "norm"))
  if recipe is None or recipe.activations is None:
    if remat:  # its input is saved as it is instead of recomputed from far away
      if args:
        args = (tracing.tag(x, tracing.KEEP), *args[1:])
      else:
        kwargs = {**kwargs, "x": tracing.tag(x, tracing.KEEP)}
    return next_fun(*args, **kwargs)
  features = (x.shape[-1],)
  scale = m.param("scale", m.scale_init, features, m.param_dtype) if m.use_scale else None
  bias = None
  if kind == "layer_norm" and m.use_bias:
    bias = m.param("bias", m.bias_init, features, m.param_dtype)
  return _layers.fp8_norm(kind, x, scale, bias, eps=m.epsilon, dtype=m.dtype, recipe=recipe)


def _interceptor(sess: Session, remat: bool):
  def intercept(next_fun, args, kwargs, context):
    m = context.module
    if context.method_name == "__call__":
      sess.saw(_path(m))
      if isinstance(m, nn.Dense | nn.DenseGeneral):
        return _dense(m, next_fun, args, kwargs, sess, remat)
      if type(m) is nn.Einsum:
        return _einsum(m, next_fun, args, kwargs, sess, remat)
      if type(m) in _NORMS:
        return _norm(m, next_fun, args, kwargs, sess, remat)
      if isinstance(m, MoE):
        return _moe(m, next_fun, args, kwargs, sess)
    return next_fun(*args, **kwargs)

  return intercept


@contextlib.contextmanager
def _intercepting(plan: Plan, name: str, remat: bool) -> Iterator[Session]:
  with session(plan, name) as sess, nn.intercept_methods(_interceptor(sess, remat)):
    yield sess


class QuantizedModule(nn.Module):
  """A Linen module with FP8 matmuls / activations; same `init`, `apply` and variables as `module`.

  Used as a submodule (called inside another module's method) it shares `module`'s scope,
  so parameter paths do not change; the FP8-only checkpoint then applies only when the
  quantized module itself is `apply`-ed.
  """

  module: nn.Module
  plan: Plan

  def setup(self):
    nn.share_scope(self, self.module)

  def __call__(self, *args, **kwargs):
    with _intercepting(self.plan, type(self.module).__name__, remat=False):
      return self.module(*args, **kwargs)

  @nn.nowrap
  def init_with_output(self, rngs, *args, **kwargs):
    with _intercepting(self.plan, type(self.module).__name__, remat=False):
      return self.module.init_with_output(rngs, *args, **kwargs)

  @nn.nowrap
  def init(self, rngs, *args, **kwargs):
    with _intercepting(self.plan, type(self.module).__name__, remat=False):
      return self.module.init(rngs, *args, **kwargs)

  @nn.nowrap
  def apply(self, variables, *args, **kwargs):
    remat = self.plan.remat

    def run(variables, *args, **kwargs):
      with _intercepting(self.plan, type(self.module).__name__, remat=remat):
        return self.module.apply(variables, *args, **kwargs)

    if remat:
      return _layers.checkpointed(jax.checkpoint, run, (), (variables, *args), kwargs)
    return run(variables, *args, **kwargs)

  @nn.nowrap
  def describe(self, *args, **kwargs) -> dict[str, str]:
    """{module path: what quantize does} from an abstract `init` on these arguments."""
    found = []

    def run():
      with _intercepting(self.plan, type(self.module).__name__, remat=self.plan.remat) as s:
        found.append(s)
        return self.module.init(jax.random.key(0), *args, **kwargs)

    jax.eval_shape(run)
    return dict(found[0].report)
