"""FP8 grouped matmul for mixture-of-experts layers: `ragged_dot` on FP8 codes.

    y_GxMxN = fp8_grouped_matmul(x_GxMxK, w_ExKxN, group_sizes_GxE)   # rows sorted by expert
    y_TxN = fp8_ragged_dot(x_TxK, w_ExKxN, group_sizes_E)             # one dispatch group

In dispatch group g, rows [o_ge, o_ge + n_ge) of x (o_ge = n_g0 + ... + n_g(e-1)) go through
expert e's weight w[e]; rows past sum_e n_ge give 0, as in `ragged_dot`. Each expert's rows of
x (over all groups) and its weight get one E4M3 scale each (per-expert per-tensor
just-in-time scaling, s = amax / fmt.max, as `mpxla.quant`), the output gradient g one E5M2
scale per expert:

    y  = (x8 . w8[e]) * s_x[e] s_w[e]                  forward
    dx = (g8 . w8[e]^T) * s_g[e] s_w[e]                backward, from the saved codes
    dw[e] = (sum_g x8_ge^T . g8_ge) * s_x[e] s_g[e]

x and w are quantized before the custom VJP and kept as tagged FP8 residuals (as
`fp8_dot_general` does), so FP8 remat policies save the codes, never x or w. Every FP8 recipe
uses this scaling for expert matmuls (delayed, block and MX scaling are for Dense/Einsum
layers). Under `shard_map` the amaxes are local to a device's experts.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mpxla import formats, quant
from mpxla.nn import flow
from mpxla.nn.fp8_dot import DotConfig
from mpxla.quant.tracing import zero_cotangent

_ROWS = jax.lax.RaggedDotDimensionNumbers(  # [G, M, K] x [E, K, N] -> [G, M, N]
    dot_dimension_numbers=(([2], [1]), ([], [])), lhs_ragged_dimensions=[1],
    rhs_group_dimensions=[0])
_WEIGHTS = jax.lax.RaggedDotDimensionNumbers(  # [G, M, K] x [G, M, N] -> [E, K, N]
    dot_dimension_numbers=(((0, 1), (0, 1)), ((), ())), lhs_ragged_dimensions=[1],
    rhs_group_dimensions=[])


def _row_experts(group_sizes_GxE: jax.Array, rows: int) -> jax.Array:
  """Expert of each row (int32 [G, M]); rows past a group's last expert get E."""
  ends_GxE = jnp.cumsum(group_sizes_GxE, axis=1)
  find = lambda ends: jnp.searchsorted(ends, jnp.arange(rows), side="right")  # noqa: E731
  return jax.vmap(find)(ends_GxE).astype(jnp.int32)


def _per_row(s_E, expert_GxM):
  return jnp.concatenate([s_E, jnp.ones((1,), jnp.float32)])[expert_GxM][..., None]


def _quantize_rows(x_GxMxK, expert_GxM, num_experts: int, fmt) -> quant.QTensor:
  """One scale per expert over its rows in every group (QTensor with scales [E])."""
  a = jnp.abs(jax.lax.stop_gradient(x_GxMxK)).astype(jnp.float32)
  row_amax = jnp.max(jnp.where(jnp.isnan(a), jnp.inf, a), axis=-1, initial=0.0)
  amax_E = jax.ops.segment_max(row_amax.reshape(-1), expert_GxM.reshape(-1),
                               num_segments=num_experts + 1)[:num_experts]
  s_E = quant.scale_from_amax(jnp.maximum(amax_E, 0.0), fmt)
  codes = formats.cast(x_GxMxK.astype(jnp.float32) * (1.0 / _per_row(s_E, expert_GxM)), fmt)
  return quant.QTensor(codes, s_E, formats.get_format(fmt), quant.PerTensor(),
                       tuple(x_GxMxK.shape), np.dtype(x_GxMxK.dtype))


_DEFAULT_CONFIG = DotConfig()  # per-tensor E4M3 / E5M2 (frozen: safe to share)


@dataclasses.dataclass(frozen=True)
class _Spec:
  config: DotConfig
  out_dtype: Any
  x_dtype: Any
  w_dtype: Any


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _grouped(spec: _Spec, x, w, group_sizes, xq, wq):
  return _grouped_fwd(spec, x, w, group_sizes, xq, wq)[0]


def _grouped_fwd(spec, x, w, group_sizes, xq, wq):
  expert = _row_experts(group_sizes, x.shape[1])
  y = jax.lax.ragged_dot_general(xq.codes, wq.codes, group_sizes, _ROWS,
                                 preferred_element_type=jnp.float32)
  y = y * _per_row(xq.scales * wq.scales.reshape(-1), expert)
  return y.astype(spec.out_dtype), (group_sizes, xq, wq)


def _grouped_bwd(spec, res, g):
  group_sizes, xq, wq = res
  expert = _row_experts(group_sizes, g.shape[1])
  gq = flow.stored(_quantize_rows(g, expert, wq.codes.shape[0], spec.config.bwd_fmt))
  sw_E = wq.scales.reshape(-1)
  dw = jax.lax.ragged_dot_general(xq.codes, gq.codes, group_sizes, _WEIGHTS,
                                  preferred_element_type=jnp.float32)
  dw = dw * (xq.scales * gq.scales)[:, None, None]
  dx = jax.lax.ragged_dot_general(gq.codes, jnp.swapaxes(wq.codes, 1, 2), group_sizes, _ROWS,
                                  preferred_element_type=jnp.float32)
  dx = dx * _per_row(gq.scales * sw_E, expert)
  return (dx.astype(spec.x_dtype), dw.astype(spec.w_dtype), zero_cotangent(group_sizes),
          zero_cotangent(xq), zero_cotangent(wq))


_grouped.defvjp(_grouped_fwd, _grouped_bwd)


def fp8_grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array, *,
                       config: DotConfig = _DEFAULT_CONFIG, preferred_element_type: Any = None
                       ) -> jax.Array:
  """x [G, M, K] (rows sorted by expert in each group) x w [E, K, N] with group_sizes [G, E]
  -> [G, M, N] on FP8 codes (see the module docstring); differentiable in x and w."""
  x, w = jnp.asarray(x), jnp.asarray(w)
  if x.ndim != 3 or w.ndim != 3 or x.shape[2] != w.shape[1]:
    raise ValueError(f"fp8_grouped_matmul needs x [G, M, K] and w [E, K, N], got {x.shape} "
                     f"and {w.shape}.")
  if group_sizes.shape != (x.shape[0], w.shape[0]) or not jnp.issubdtype(group_sizes.dtype,
                                                                          jnp.integer):
    raise ValueError(f"group_sizes must be int [{x.shape[0]}, {w.shape[0]}] (rows per group "
                     f"and expert), got {group_sizes.dtype}{list(group_sizes.shape)}.")
  group_sizes = group_sizes.astype(jnp.int32)
  out = jnp.result_type(x, w) if preferred_element_type is None else preferred_element_type
  expert = _row_experts(group_sizes, x.shape[1])
  xq = flow.residual(_quantize_rows(x, expert, w.shape[0], config.fwd_fmt))
  wq = flow.residual(quant.quantize(jax.lax.stop_gradient(w), config.fwd_fmt,
                                    quant.PerBlock(w.shape[1:])))
  spec = _Spec(config, np.dtype(out), np.dtype(x.dtype), np.dtype(w.dtype))
  return _grouped(spec, x, w, group_sizes, xq, wq)


def fp8_ragged_dot(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *,
                   config: DotConfig = _DEFAULT_CONFIG, preferred_element_type: Any = None
                   ) -> jax.Array:
  """`jax.lax.ragged_dot(lhs [T, K], rhs [E, K, N], group_sizes [E])` on FP8 codes: one
  dispatch group of `fp8_grouped_matmul`."""
  lhs, rhs = jnp.asarray(lhs), jnp.asarray(rhs)
  if lhs.ndim != 2 or rhs.ndim != 3 or lhs.shape[1] != rhs.shape[1]:
    raise ValueError(f"fp8_ragged_dot needs lhs [T, K] and rhs [E, K, N], got {lhs.shape} "
                     f"and {rhs.shape}.")
  if group_sizes.shape != (rhs.shape[0],):
    raise ValueError(f"group_sizes must be int [{rhs.shape[0]}] (rows per expert), got "
                     f"{group_sizes.dtype}{list(group_sizes.shape)}.")
  return fp8_grouped_matmul(lhs[None], rhs, group_sizes[None], config=config,
                            preferred_element_type=preferred_element_type)[0]
