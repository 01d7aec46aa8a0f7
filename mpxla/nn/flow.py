"""FP8 precision flow (COAT): each activation quantized once, and kept for the backward as FP8.

Shared by the FP8 matmul (`fp8_dot`), the FP8-saved activations (`fp8_act`) and the model
wrapper (`quantize`):

* **Kept as codes.** `residual(q)` is a `QTensor` kept for the backward pass: its codes
  materialized as the 1-byte codes (`stored`) and named `tracing.FP8`, which the remat policy
  `tracing.POLICY` saves (mpxla.quant.tracing).
* **Once per tensor.** Inside a `scope()`, `quantize_once(x, ...)` returns the same
  `QTensor` for the same array and the same format/granularity/margin, so a norm's output
  feeding three projections is quantized (and saved) once, and a linear layer's FP8 output
  feeding an activation is not quantized again. Arrays are matched by identity, and only
  within the JAX trace that quantized them.
* **Group scaling.** `group_scaled_quantize` quantizes per tensor with an amax derived in two
  passes: the 1xG group maxima (`group_amax`), then their max (`tensor_amax_from_groups`,
  with a `pmax` over `axis_name` inside `shard_map`; under `jit` the reduction over a sharded
  array is already global). max is exact, so it equals a direct max bit for bit, and a later
  per-tensor request for the same x takes its amax from the group maxima.
* **Output point.** `output_point(y)`: a linear layer's output continues in FP8 (1xG).
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from mpxla import formats, quant
from mpxla.quant.tracing import FP8, after, tag

AxisName = str | Sequence[str] | None


def stored(q: quant.QTensor) -> quant.QTensor:
  """q whose codes XLA materializes as the 1-byte codes (`after` its scales).

  Otherwise XLA may fuse the FP8 cast into every consumer of the codes and keep the float32
  tensor before the cast alive instead, 4 bytes an element instead of 1 (docs/xla_cpu.md).
  """
  return dataclasses.replace(q, codes=after(q.codes, q.scales))


def residual(q: quant.QTensor) -> quant.QTensor:
  """A QTensor kept for the backward pass: its codes `stored` as they are, everything tagged.

  The tagged tensor is the uint8 bit pattern, not the float8 codes: `jax.checkpoint` would
  turn float8_e4m3fn's top binade into NaN (docs/xla_cpu.md).
  """
  is_bits = q.codes.dtype == jnp.uint8
  bits = q.codes if is_bits else jax.lax.bitcast_convert_type(q.codes, jnp.uint8)
  bits = tag(after(bits, q.scales), FP8)
  codes = bits if is_bits else jax.lax.bitcast_convert_type(bits, q.codes.dtype)
  return dataclasses.replace(q, codes=codes, scales=tag(q.scales))


# The quantize-once cache: a thread-local stack of scopes, each a list of entries.


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
  """`quant.quantize(stop_gradient(x), ...)`, kept as a `residual`, reused for x in the scope.

  A per-tensor request for an x whose 1xG group amaxes are known (`group_scaled_quantize`)
  takes its amax from them instead of reducing x again. A NaN in x counts as inf in the amax
  (`quant.amax`), so the scale, and everything computed from the codes, is NaN.
  """
  g = quant.as_granularity(granularity)
  key = _key(fmt, g, margin, axis_name)
  s = _current()
  if s is not None:
    hit = s.find(x, key)
    if hit is not None:
      return hit.q
  x_sg = jax.lax.stop_gradient(x)
  group = None
  if isinstance(g, quant.PerTensor) and s is not None:
    group = s.find(x, pred=lambda e: e.group_amax is not None)
  a = (quant.amax(x_sg, g, axis_name=axis_name) if group is None else
       tensor_amax_from_groups(group.group_amax, axis_name))
  q = residual(quant.quantize_with_amax(x_sg, fmt, g, a, margin=margin))
  if s is not None:
    s.entries.append(_Entry(x, key, q, None, _trace_state()))
  return q


def group_amax(x: jax.Array, group: int = 16) -> jax.Array:
  """Pass 1 of group scaling: max |x| over each 1 x `group` slice of the last axis (NaN: inf)."""
  return quant.amax(x, quant.PerGroup(group))


def tensor_amax_from_groups(group_amax_: jax.Array, axis_name: AxisName = None) -> jax.Array:
  """Pass 2: the per-tensor amax, max over the group maxima (and over `axis_name` devices)."""
  return quant.amax(group_amax_, "tensor", axis_name=axis_name)


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
  a = tensor_amax_from_groups(ga, axis_name)
  q = residual(quant.quantize_with_amax(x_sg, fmt, "tensor", a, margin=margin))
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
  are tagged, so under `jax.checkpoint(policy=tracing.POLICY)` the backward recomputes
  whatever it needs downstream (activations, gating products) from them instead of saving
  it. The result is registered, so an FP8 activation applied to it reuses the same codes.
  """
  q = quantize_once(y, fmt, quant.PerGroup(group))
  y_hat = _straight_through(y, quant.dequantize(q, y.dtype))
  register(y_hat, q)
  return y_hat
