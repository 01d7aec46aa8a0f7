"""FP8-saved activations: non-linear ops whose backward keeps their inputs as 1x16 FP8.

    y = gelu(x)                        # forward exact; saves x as E4M3 codes + 1x16 scales
    y = swiglu(gate, up)               # silu(gate) * up; saves gate and up
    y = rms_norm(x, scale)             # saves x (the statistics are recomputed from it)

Each op is a `jax.custom_vjp` whose forward computes the usual function of its exact
inputs and whose residuals are the inputs' per-group quantization (1 x `group` along the last
axis, `fmt` = 'e4m3' or 'hif8'; COAT's fine-grained granularity for non-linear layers) plus
any parameters (norm scale and bias, already kept as parameters). The backward dequantizes
the codes and takes the VJP of the same function there: it *recomputes from* the FP8 input.

Precision flow (`mpxla.nn.flow`): the input quantization goes through `flow.quantize_once`,
so an input that is already the FP8 output of a linear layer (`flow.output_point`) reuses
its codes instead of being quantized twice. With `linear_input=DotConfig(...)` an op also
hands its output to the next FP8 matmul: the output is quantized per tensor with the
group-scaled (two-pass) amax once, and the matmul saves that as its input.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mpxla import formats, quant
from mpxla.nn import flow
from mpxla.nn.fp8_dot import DotConfig
from mpxla.quant.sharding import match_varying
from mpxla.quant.tracing import after, zero_cotangent


@dataclasses.dataclass(frozen=True)
class _Spec:
  fn: Callable[..., jax.Array]
  act_dtypes: tuple[Any, ...]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _saved_call(spec: _Spec, acts, qs, params):
  return spec.fn(*acts, *params)


def _saved_fwd(spec, acts, qs, params):
  return spec.fn(*acts, *params), (qs, params)


def _saved_bwd(spec, res, g):
  qs, params = res
  acts_hat = [quant.dequantize(q, jnp.float32) for q in qs]
  out, vjp = jax.vjp(spec.fn, *acts_hat, *params)
  grads = vjp(g.astype(out.dtype))
  n = len(acts_hat)
  d_acts = tuple(d.astype(t) for d, t in zip(grads[:n], spec.act_dtypes, strict=True))
  d_params = tuple(d.astype(p.dtype) for d, p in zip(grads[n:], params, strict=True))
  return d_acts, zero_cotangent(qs), d_params


_saved_call.defvjp(_saved_fwd, _saved_bwd)


def _check(fmt, group):
  fmt = formats.get_format(fmt)
  if not isinstance(group, int) or group < 1:
    raise ValueError(f"group={group!r} must be a positive int (COAT uses 16).")
  return fmt


def fp8_saved(
    fn: Callable[..., jax.Array],
    acts: tuple[jax.Array, ...],
    params: tuple[jax.Array, ...] = (),
    *,
    fmt: str | formats.Format = "e4m3",
    group: int = 16,
    linear_input: DotConfig | None = None,
) -> jax.Array:
  """fn(*acts, *params) with `acts` saved for the backward as 1 x `group` FP8 (see module doc).

  Args:
    fn: a differentiable function of the activations, then the parameters. It must be a
      hashable callable (a function or a `functools.partial` of hashable values).
    acts: activation inputs (floating, quantized along their last axis).
    params: parameters, saved as they are.
    fmt: 'e4m3' (COAT) or 'hif8' (codes in uint8).
    group: group size along the last axis.
    linear_input: if set, also quantize the output per tensor for an FP8 matmul with this
      config (group-scaled amax) and register it with `mpxla.nn.flow`.
  """
  fmt = _check(fmt, group)
  acts = tuple(jnp.asarray(a) for a in acts)
  for a in acts:
    if not jnp.issubdtype(a.dtype, jnp.floating):
      raise TypeError(f"FP8-saved activations must be floating, got {a.dtype}.")
  qs = tuple(flow.quantize_once(a, fmt, quant.PerGroup(group)) for a in acts)
  spec = _Spec(fn, tuple(np.dtype(a.dtype) for a in acts))
  both = match_varying(*acts, *(jnp.asarray(p) for p in params))
  y = _saved_call(spec, both[:len(acts)], qs, both[len(acts):])
  # The codes are computed now, in the forward pass, not from the high-precision input kept
  # alive until the backward pass (docs/xla_cpu.md).
  y = after(y, *(q.codes for q in qs))
  if linear_input is not None and linear_input.scaling == "tensor":
    flow.group_scaled_quantize(y, linear_input.fwd_fmt, group=group, margin=linear_input.margin,
                               axis_name=linear_input.axis_name)
  return y


def gelu(x: jax.Array, approximate: bool = True, **kwargs) -> jax.Array:
  """`jax.nn.gelu(x, approximate)`, saving x as 1x16 FP8."""
  return fp8_saved(functools.partial(jax.nn.gelu, approximate=approximate), (x,), **kwargs)


def silu(x: jax.Array, **kwargs) -> jax.Array:
  """`jax.nn.silu(x)` = x * sigmoid(x), saving x as 1x16 FP8."""
  return fp8_saved(jax.nn.silu, (x,), **kwargs)


def _swiglu(gate, up):
  return jax.nn.silu(gate) * up


def _geglu(gate, up, approximate=True):
  return jax.nn.gelu(gate, approximate=approximate) * up


def swiglu(gate: jax.Array, up: jax.Array, **kwargs) -> jax.Array:
  """silu(gate) * up (Llama's gated MLP), saving gate and up as 1x16 FP8."""
  return fp8_saved(_swiglu, (gate, up), **kwargs)


def geglu(gate: jax.Array, up: jax.Array, approximate: bool = True, **kwargs) -> jax.Array:
  """gelu(gate) * up, saving gate and up as 1x16 FP8."""
  return fp8_saved(functools.partial(_geglu, approximate=approximate), (gate, up), **kwargs)


def _rms_norm(x, *params, eps, dtype, has_scale):
  xf = x.astype(jnp.float32)
  y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
  if has_scale:
    y = y * params[0].astype(jnp.float32)
  return y.astype(dtype)


def _layer_norm(x, *params, eps, dtype, has_scale, has_bias):
  xf = x.astype(jnp.float32)
  mean = jnp.mean(xf, axis=-1, keepdims=True)
  xc = xf - mean
  y = xc * jax.lax.rsqrt(jnp.mean(xc * xc, axis=-1, keepdims=True) + eps)
  if has_scale:
    y = y * params[0].astype(jnp.float32)
  if has_bias:
    y = y + params[-1].astype(jnp.float32)
  return y.astype(dtype)


def _out_dtype(x, params, dtype):
  return np.dtype(jnp.result_type(x, *params) if dtype is None else dtype)


def rms_norm(x: jax.Array, scale: jax.Array | None = None, *, eps: float = 1e-6, dtype=None,
             **kwargs) -> jax.Array:
  """x / sqrt(mean(x^2, -1) + eps) * scale over the last axis (float32 math), saving x as FP8.

  dtype: output dtype (default: promoted dtype of x and scale, as Flax's RMSNorm).
  """
  params = () if scale is None else (scale,)
  fn = functools.partial(_rms_norm, eps=float(eps), dtype=_out_dtype(x, params, dtype),
                         has_scale=scale is not None)
  return fp8_saved(fn, (x,), params, **kwargs)


def layer_norm(x: jax.Array, scale: jax.Array | None = None, bias: jax.Array | None = None, *,
               eps: float = 1e-6, dtype=None, **kwargs) -> jax.Array:
  """(x - mean) / sqrt(var + eps) * scale + bias over the last axis, saving x as FP8."""
  params = tuple(p for p in (scale, bias) if p is not None)
  fn = functools.partial(_layer_norm, eps=float(eps), dtype=_out_dtype(x, params, dtype),
                         has_scale=scale is not None, has_bias=bias is not None)
  return fp8_saved(fn, (x,), params, **kwargs)
