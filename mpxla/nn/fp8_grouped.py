"""FP8 grouped matmul for mixture-of-experts layers: `jax.lax.ragged_dot` on FP8 codes.

    y_TxN = fp8_ragged_dot(x_TxK, w_ExKxN, group_sizes_E)   # rows sorted by expert

Rows [o_e, o_e + n_e) of x (o_e = n_0 + ... + n_{e-1}) go through expert e's weight w[e];
rows past sum(n) give 0, as in `ragged_dot`. Each expert's rows of x and its weight get one
E4M3 scale each (per-expert per-tensor just-in-time scaling, s = amax / fmt.max, as
`mpxla.quant`), the output gradient g one E5M2 scale per expert:

    y  = (x8 . w8[e]) * s_x[e] s_w[e]                  forward
    dx = (g8 . w8[e]^T) * s_g[e] s_w[e]                backward, from the saved codes
    dw[e] = (x8_e^T . g8_e) * s_x[e] s_g[e]

The custom VJP saves the FP8 codes and the per-expert scales, never x or w. Every FP8
recipe uses this scaling for expert matmuls (delayed, block and MX scaling are for
Dense/Einsum layers). Under `shard_map` the amaxes are local (pass whole experts' rows).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mpxla import formats, quant
from mpxla.nn.fp8_dot import DotConfig
from mpxla.quant.tracing import zero_cotangent

_RAGGED_CONTRACT = jax.lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(((0,), (0,)), ((), ())), lhs_ragged_dimensions=[0],
    rhs_group_dimensions=[])


def _row_experts(group_sizes_E: jax.Array, num_rows: int) -> jax.Array:
  """Expert of each row (int32 [T]); rows past the last group get E."""
  ends_E = jnp.cumsum(group_sizes_E)
  return jnp.searchsorted(ends_E, jnp.arange(num_rows), side="right").astype(jnp.int32)


def _quantize_rows(x_TxK, expert_T, num_experts: int, fmt):
  """(codes, scales [E]): one scale per expert over its rows."""
  a = jnp.abs(jax.lax.stop_gradient(x_TxK)).astype(jnp.float32)
  row_amax_T = jnp.max(jnp.where(jnp.isnan(a), jnp.inf, a), axis=1, initial=0.0)
  amax_E = jax.ops.segment_max(row_amax_T, expert_T, num_segments=num_experts + 1)
  s_E = quant.scale_from_amax(jnp.maximum(amax_E[:num_experts], 0.0), fmt)
  s_T = jnp.concatenate([s_E, jnp.ones((1,), jnp.float32)])[expert_T]
  return formats.cast(x_TxK.astype(jnp.float32) * (1.0 / s_T)[:, None], fmt), s_E


def _quantize_experts(w_ExKxN, fmt):
  q = quant.quantize(jax.lax.stop_gradient(w_ExKxN), fmt, quant.PerBlock(w_ExKxN.shape[1:]))
  return q.codes, q.scales.reshape(-1)


def _per_row(s_E, expert_T):
  return jnp.concatenate([s_E, jnp.ones((1,), jnp.float32)])[expert_T][:, None]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _grouped(config: DotConfig, dtypes, x, w, group_sizes):
  return _grouped_fwd(config, dtypes, x, w, group_sizes)[0]


def _grouped_fwd(config, dtypes, x, w, group_sizes):
  num_experts = w.shape[0]
  expert_T = _row_experts(group_sizes, x.shape[0])
  cx, sx_E = _quantize_rows(x, expert_T, num_experts, config.fwd_fmt)
  cw, sw_E = _quantize_experts(w, config.fwd_fmt)
  y = jax.lax.ragged_dot(cx, cw, group_sizes, preferred_element_type=jnp.float32)
  y = y * _per_row(sx_E * sw_E, expert_T)
  return y.astype(dtypes[0]), (cx, sx_E, cw, sw_E, group_sizes)


def _grouped_bwd(config, dtypes, res, g):
  cx, sx_E, cw, sw_E, group_sizes = res
  expert_T = _row_experts(group_sizes, cx.shape[0])
  cg, sg_E = _quantize_rows(g, expert_T, cw.shape[0], config.bwd_fmt)
  dw = jax.lax.ragged_dot_general(cx, cg, group_sizes, _RAGGED_CONTRACT,
                                  preferred_element_type=jnp.float32)
  dw = dw * (sx_E * sg_E)[:, None, None]
  dx = jax.lax.ragged_dot(cg, jnp.swapaxes(cw, 1, 2), group_sizes,
                          preferred_element_type=jnp.float32)
  dx = dx * _per_row(sg_E * sw_E, expert_T)
  return dx.astype(dtypes[1]), dw.astype(dtypes[2]), zero_cotangent(group_sizes)


_grouped.defvjp(_grouped_fwd, _grouped_bwd)


def fp8_ragged_dot(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *,
                   config: DotConfig = DotConfig(), preferred_element_type: Any = None
                   ) -> jax.Array:
  """`jax.lax.ragged_dot(lhs [T, K], rhs [E, K, N], group_sizes [E])` on FP8 codes (see the
  module docstring); differentiable in lhs and rhs."""
  lhs, rhs = jnp.asarray(lhs), jnp.asarray(rhs)
  if lhs.ndim != 2 or rhs.ndim != 3 or lhs.shape[1] != rhs.shape[1]:
    raise ValueError(f"fp8_ragged_dot needs lhs [T, K] and rhs [E, K, N], got {lhs.shape} "
                     f"and {rhs.shape}.")
  if group_sizes.shape != (rhs.shape[0],) or not jnp.issubdtype(group_sizes.dtype, jnp.integer):
    raise ValueError(f"group_sizes must be int [{rhs.shape[0]}] (rows per expert), got "
                     f"{group_sizes.dtype}{list(group_sizes.shape)}.")
  out = jnp.result_type(lhs, rhs) if preferred_element_type is None else preferred_element_type
  dtypes = (np.dtype(out), np.dtype(lhs.dtype), np.dtype(rhs.dtype))
  return _grouped(config, dtypes, lhs, rhs, group_sizes.astype(jnp.int32))
