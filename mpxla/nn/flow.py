"""FP8 precision flow: quantize each activation once, and name what the backward keeps.

Pieces shared by the FP8 matmul (`fp8_dot`), the FP8-saved activations (`fp8_act`)
and the model wrapper (`quantize`):

* **Names.** Every FP8 tensor kept for the backward pass is tagged with
  `jax.ad_checkpoint.checkpoint_name(.., RESIDUAL)`. Under `jax.checkpoint(policy=POLICY)`
  those are the only values saved (with the inputs of layers kept in high precision, `KEEP`,
  and mpxla.attention's output and log-sum-exp, so that attention is not run twice);
  everything else the backward needs is recomputed from them (elementwise glue such as
  `silu(gate) * up` or rotary embeddings).
* **Memory.** `after(x, *deps)` gives XLA a data dependency and a value it must materialize
  as it is, without changing a bit; the FP8 matmul and activations use it so that compiled
  temp bytes follow the bytes saved (see docs/nn.md, "Temp bytes").
* **Once per tensor.** Inside a `scope()`, `quantize_once(x, ...)` returns the same
  `QTensor` for the same array and the same format/granularity/margin, so a norm's output
  feeding three projections is quantized (and saved) once, and a linear layer's FP8 output
  feeding an activation is not quantized again. Arrays are matched by identity, and only
  within the JAX trace that quantized them.
* **Group scaling** (COAT): a per-tensor amax derived from per-group maxima, the max of the
  1xG maxima, then a `pmax` over `axis_name` inside `shard_map` (under `jit` the reduction
  over a sharded array is already global). max is exact, so it equals a direct max bit for bit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from mpxla import formats, quant
from mpxla.attention import RESIDUAL_NAMES as ATTENTION_RESIDUALS
from mpxla.quant.order import after  # noqa: F401  (re-exported: flow.after)

RESIDUAL = "mpxla_fp8"  # FP8 codes, scales and amaxes kept for the backward pass.
KEEP = "mpxla_keep"  # Inputs of layers kept in high precision (saved as they are).
# mpxla.attention's output and log-sum-exp are kept too (its forward is then not recomputed).
POLICY = jax.checkpoint_policies.save_only_these_names(RESIDUAL, KEEP, *ATTENTION_RESIDUALS)

AxisName = str | Sequence[str] | None


def tag(tree: Any, name: str = RESIDUAL) -> Any:
  """Names every array of `tree` for `jax.checkpoint` policies (a no-op outside remat)."""
  return jax.tree.map(lambda a: checkpoint_name(a, name), tree)


def stored(q: quant.QTensor) -> quant.QTensor:
  """q whose codes XLA materializes as the 1-byte codes (`after` its scales).

  Otherwise XLA may fuse the FP8 cast into every consumer of the codes and keep the float32
  tensor before the cast alive instead (it does on CPU): 4 bytes an element instead of 1.
  """
  return dataclasses.replace(q, codes=after(q.codes, q.scales))


def residual(q: quant.QTensor) -> quant.QTensor:
  """A QTensor kept for the backward pass: its codes `stored` as they are, everything tagged.

  The tagged tensor is the uint8 bit pattern, not the float8 codes: `jax.checkpoint` passes
  saved floats through `reduce_precision` with the dtype's exponent/mantissa widths, which
  turns float8_e4m3fn's top binade [256, 448] into NaN (it has no inf).
  """
  is_bits = q.codes.dtype == jnp.uint8
  bits = q.codes if is_bits else jax.lax.bitcast_convert_type(q.codes, jnp.uint8)
  bits = checkpoint_name(after(bits, q.scales), RESIDUAL)
  codes = bits if is_bits else jax.lax.bitcast_convert_type(bits, q.codes.dtype)
  return dataclasses.replace(q, codes=codes, scales=tag(q.scales))


def _trace_state():
  return jax.extend.core.get_opaque_trace_state(convention="mpxla")


@dataclasses.dataclass
class _Entry:
  x: jax.Array
  key: tuple
  q: quant.QTensor
  group_amax: jax.Array | None
  trace: Any


class _Scope:
  def __init__(self):
    self.entries: list[_Entry] = []

  def find(self, x, key=None, pred=None) -> _Entry | None:
    trace = _trace_state()
    for e in reversed(self.entries):
      if e.x is x and e.trace == trace and (key is None or e.key == key):
        if pred is None or pred(e):
          return e
    return None


_LOCAL = threading.local()


def _scopes() -> list[_Scope]:
  if not hasattr(_LOCAL, "stack"):
    _LOCAL.stack = []
  return _LOCAL.stack


@contextlib.contextmanager
def scope() -> Iterator[None]:
  """Within this context each array is quantized at most once per format and granularity."""
  _scopes().append(_Scope())
  try:
    yield
  finally:
    _scopes().pop()


def _current() -> _Scope | None:
  stack = _scopes()
  return stack[-1] if stack else None


def _key(fmt, granularity, margin, axis_name) -> tuple:
  axis = tuple(axis_name) if isinstance(axis_name, list | tuple) else axis_name
  return (formats.get_format(fmt).name, quant.as_granularity(granularity), float(margin), axis)


def register(x: jax.Array, q: quant.QTensor, *, margin: float = 0.0, axis_name: AxisName = None,
             group_amax: jax.Array | None = None) -> None:
  """Declares that `q` is x's quantization (used by later `quantize_once` calls in the scope)."""
  s = _current()
  if s is not None:
    s.entries.append(_Entry(x, _key(q.fmt, q.granularity, margin, axis_name), q, group_amax,
                            _trace_state()))


def quantize_once(
    x: jax.Array,
    fmt: str | formats.Format,
    granularity: str | quant.Granularity,
    *,
    margin: float = 0.0,
    axis_name: AxisName = None,
) -> quant.QTensor:
  """`quant.quantize(stop_gradient(x), ...)`, tagged, and reused for the same x in the scope.

  A per-tensor request for an x whose 1xG group amaxes are known (`group_scaled_quantize`)
  takes its amax from them instead of reducing x again. Per tensor, a NaN in x counts as inf
  (`amax`), so the scale, and everything computed from the codes, is NaN.
  """
  g = quant.as_granularity(granularity)
  key = _key(fmt, g, margin, axis_name)
  s = _current()
  if s is not None:
    hit = s.find(x, key)
    if hit is not None:
      return hit.q
  x_sg = jax.lax.stop_gradient(x)
  if isinstance(g, quant.PerTensor):
    group = s.find(x, pred=lambda e: e.group_amax is not None) if s is not None else None
    a = (amax(x_sg, g, axis_name) if group is None else
         tensor_amax_from_groups(group.group_amax, axis_name))
    q = quantize_tensor_with_amax(x_sg, fmt, a, margin)
  else:
    q = quant.quantize(x_sg, fmt, g, margin=margin, axis_name=axis_name)
  q = residual(q)
  if s is not None:
    s.entries.append(_Entry(x, key, q, None, _trace_state()))
  return q


def _nan_as_inf(x: jax.Array) -> jax.Array:
  # XLA's vectorized max reductions on CPU do not propagate NaN; as +inf it cannot be lost.
  return jnp.where(jnp.isnan(x), jnp.inf, x)


def amax(x: jax.Array, granularity="tensor", axis_name: AxisName = None) -> jax.Array:
  """`quant.amax` in which a NaN element counts as inf: a non-finite input gives an inf amax."""
  return quant.amax(_nan_as_inf(x), granularity, axis_name=axis_name)


def group_amax(x: jax.Array, group: int = 16) -> jax.Array:
  """Pass 1 of group scaling: max |x| over each 1 x `group` slice of the last axis (NaN: inf)."""
  return amax(x, quant.PerGroup(group))


def tensor_amax_from_groups(group_amax_: jax.Array, axis_name: AxisName = None) -> jax.Array:
  """Pass 2: the per-tensor amax, max over the group maxima (and over `axis_name` devices)."""
  a = jnp.max(_nan_as_inf(group_amax_)) if group_amax_.size else jnp.float32(0)
  return jax.lax.pmax(a, axis_name) if axis_name is not None else a


def quantize_tensor_with_amax(x: jax.Array, fmt, amax: jax.Array, margin: float = 0.0):
  """Per-tensor `QTensor` of x with a given amax (same codes as `quant.quantize` with that amax)."""
  fmt = formats.get_format(fmt)
  scale = quant.scale_from_amax(amax, fmt, margin)
  codes = formats.cast(x.astype(jnp.float32) / scale, fmt)
  return quant.QTensor(codes, scale, fmt, quant.PerTensor(), tuple(x.shape), np.dtype(x.dtype))


def group_scaled_quantize(
    x: jax.Array,
    fmt: str | formats.Format = "e4m3",
    *,
    group: int = 16,
    margin: float = 0.0,
    axis_name: AxisName = None,
) -> quant.QTensor:
  """Per-tensor quantization of x with the two-pass (group-derived) amax, registered in the scope.

  This is how an FP8 op hands its output to the next linear layer: the linear layer's
  `quantize_once` finds it and does not quantize x again.
  """
  x_sg = jax.lax.stop_gradient(x)
  ga = group_amax(x_sg, group)
  q = residual(quantize_tensor_with_amax(x_sg, fmt, tensor_amax_from_groups(ga, axis_name),
                                         margin))
  register(x, q, margin=margin, axis_name=axis_name, group_amax=ga)
  return q


@jax.custom_vjp
def _straight_through(x: jax.Array, x_hat: jax.Array) -> jax.Array:
  return x_hat


def _st_fwd(x, x_hat):
  return x_hat, None


def _st_bwd(_, g):
  return g, jnp.zeros_like(g)


_straight_through.defvjp(_st_fwd, _st_bwd)


def output_point(y: jax.Array, fmt: str | formats.Format = "e4m3", group: int = 16) -> jax.Array:
  """A linear layer's output in FP8 (COAT's precision flow): dequant(quantize(y, 1 x group)).

  The forward value is the FP8 value; the gradient passes straight through to y. The codes
  are tagged, so under `jax.checkpoint(policy=POLICY)` the backward recomputes whatever it
  needs downstream (activations, gating products) from them instead of saving it. The
  result is registered, so an FP8 activation applied to it reuses the same codes.
  """
  q = quantize_once(y, fmt, quant.PerGroup(group))
  y_hat = _straight_through(y, quant.dequantize(q, y.dtype))
  register(y_hat, q)
  return y_hat


def varying_axes(a: jax.Array) -> frozenset:
  """The manual mesh axes over which `a` differs between devices (empty outside shard_map)."""
  mat = getattr(jax.typeof(a), "mat", None)
  return frozenset(getattr(mat, "varying", ()))


def match_varying(*arrays: jax.Array) -> tuple[jax.Array, ...]:
  """The arrays, each made device-varying over the union of their varying mesh axes.

  Inside `shard_map`, a custom VJP's cotangent must vary like its input. A weight (the same
  on every device) meeting a per-device activation gets a per-device gradient, so the weight
  enters the custom VJP as varying; JAX then sums its gradient over the devices, as for any
  replicated input. Outside `shard_map` this does nothing.
  """
  axes = frozenset().union(*(varying_axes(a) for a in arrays))
  out = []
  for a in arrays:
    missing = tuple(sorted(axes - varying_axes(a)))
    out.append(jax.lax.pcast(a, missing, to="varying") if missing else a)
  return tuple(out)


def zero_cotangent(tree: Any) -> Any:
  """Zero cotangents for a pytree of arrays (float0 for integer arrays such as HiF8 codes)."""

  def zero(a):
    if jnp.issubdtype(a.dtype, jnp.inexact):
      return jnp.zeros_like(a)
    return np.zeros(a.shape, jax.dtypes.float0)

  return jax.tree.map(zero, tree)
