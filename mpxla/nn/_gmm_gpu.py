"""Grouped matmul for GPUs (Pallas, Triton lowering) over rows laid out in blocks by expert.

    out_PxN = gmm(x_PxK, w_ExKxN, expert_N, block_rows=B)

x holds N blocks of B rows (P = N B); block n goes through its expert's weight:
out[n B + r] = x[n B + r] @ w[expert_N[n]]. One program per (block, column tile) loops over
K and reads the weight tile of the block's expert straight from w: no per-block weight copy
(the 'blocks' grouped matmul of `mpxla.nn.moe` gathers one per block). FLOPs: P K N.

Backward: dx = dout @ w[e]^T by the same kernel on w transposed; dw[e] = sum over e's blocks
of x_n^T dout_n, one program per (expert, K tile, N tile) looping over the blocks of e (in
block order: `order_N` lists the blocks sorted by expert, `first_E`/`count_E` where each
expert's start and how many). An expert without blocks gets dw = 0.

B must be a power of two >= 16 (Triton `dot`); K and N are zero-padded to tiles.
`interpret=True` runs the kernels on CPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from mpxla.quant.sharding import varying_axes

_TILE_K, _TILE_N = 64, 128


def _triton():
  return pltriton.CompilerParams(num_warps=4, num_stages=2)


def _tile(n: int, cap: int) -> int:
  return min(cap, max(16, pl.next_power_of_2(n)))


def _pad_to(x, axis: int, multiple: int):
  extra = -x.shape[axis] % multiple
  return x if not extra else jnp.pad(x, [(0, extra if a == axis else 0) for a in range(x.ndim)])


def check_block_rows(block_rows: int) -> None:
  if block_rows < 16 or block_rows & (block_rows - 1):
    raise ValueError(f"grouped_matmul='pallas_gpu' needs block_size a power of two >= 16 "
                     f"(Triton dot), got {block_rows}.")


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def gmm(x_PxK, w_ExKxN, expert_N, block_rows: int, interpret: bool = False):
  """out [P, N] in x's dtype: block n of `block_rows` rows of x times w[expert_N[n]]."""
  return _forward(x_PxK, w_ExKxN, expert_N, block_rows, interpret)


def _forward(x_PxK, w_ExKxN, expert_N, bm, interpret):
  check_block_rows(bm)
  if any(varying_axes(a) for a in (x_PxK, w_ExKxN, expert_N)):
    raise ValueError("grouped_matmul='pallas_gpu' inside jax.shard_map needs check_vma=False "
                     "on that shard_map (Pallas kernels carry no varying-axes types), or "
                     "grouped_matmul='ragged_dot'.")
  (p, k), (e, _, n) = x_PxK.shape, w_ExKxN.shape
  if p != expert_N.shape[0] * bm:
    raise ValueError(f"x has {p} rows, expert_N {expert_N.shape[0]} blocks of {bm} rows.")
  tk, tn = _tile(k, _TILE_K), _tile(n, _TILE_N)
  x = _pad_to(x_PxK, 1, tk)
  w = _pad_to(_pad_to(w_ExKxN, 1, tk), 2, tn)
  kp, np_ = x.shape[1], w.shape[2]
  kernel = functools.partial(_fwd_kernel, tk=tk, steps=kp // tk)
  out = pl.pallas_call(
      kernel, grid=(expert_N.shape[0], np_ // tn),
      in_specs=[pl.BlockSpec((expert_N.shape[0],), lambda i, j: (0,)),
                pl.BlockSpec((bm, kp), lambda i, j: (i, 0)),
                pl.BlockSpec((e, kp, tn), lambda i, j: (0, 0, j))],
      out_specs=pl.BlockSpec((bm, tn), lambda i, j: (i, j)),
      out_shape=jax.ShapeDtypeStruct((p, np_), x_PxK.dtype), interpret=interpret,
      compiler_params=_triton(), name="mpxla_gmm")(expert_N.astype(jnp.int32), x, w)
  return out[:, :n]


def _fwd_kernel(e_ref, x_ref, w_ref, o_ref, *, tk, steps):
  expert = e_ref[pl.program_id(0)]

  def body(t, acc):
    k0 = pl.multiple_of(t * tk, tk)
    return acc + jax.lax.dot_general(x_ref[:, pl.ds(k0, tk)], w_ref[expert, pl.ds(k0, tk), :],
                                     (((1,), (0,)), ((), ())),
                                     preferred_element_type=jnp.float32)

  acc = jax.lax.fori_loop(0, steps, body, jnp.zeros(o_ref.shape, jnp.float32))
  o_ref[...] = acc.astype(o_ref.dtype)


def _weight_grad(x_PxK, dy_PxN, expert_N, num_experts, bm, interpret, dtype):
  """dw [E, K, N]: sum over the blocks n of expert e of x_n^T dy_n."""
  (p, k), n = x_PxK.shape, dy_PxN.shape[1]
  tk, tn = _tile(k, _TILE_K), _tile(n, _TILE_N)
  x, dy = _pad_to(x_PxK, 1, tk), _pad_to(dy_PxN, 1, tn)
  kp, np_ = x.shape[1], dy.shape[1]
  expert_N = expert_N.astype(jnp.int32)
  order_N = jnp.argsort(expert_N, stable=True).astype(jnp.int32)
  count_E = jnp.bincount(expert_N, length=num_experts).astype(jnp.int32)
  first_E = (jnp.cumsum(count_E) - count_E).astype(jnp.int32)
  nb = expert_N.shape[0]
  kernel = functools.partial(_dw_kernel, bm=bm)
  dw = pl.pallas_call(
      kernel, grid=(num_experts, kp // tk, np_ // tn),
      in_specs=[pl.BlockSpec((nb,), lambda e, a, b: (0,)),
                pl.BlockSpec((num_experts,), lambda e, a, b: (0,)),
                pl.BlockSpec((num_experts,), lambda e, a, b: (0,)),
                pl.BlockSpec((p, tk), lambda e, a, b: (0, a)),
                pl.BlockSpec((p, tn), lambda e, a, b: (0, b))],
      out_specs=pl.BlockSpec((None, tk, tn), lambda e, a, b: (e, a, b)),
      out_shape=jax.ShapeDtypeStruct((num_experts, kp, np_), dtype), interpret=interpret,
      compiler_params=_triton(), name="mpxla_gmm_dw")(order_N, first_E, count_E, x, dy)
  return dw[:, :k, :n]


def _dw_kernel(order_ref, first_ref, count_ref, x_ref, dy_ref, dw_ref, *, bm):
  e = pl.program_id(0)
  first = first_ref[e]

  def body(i, acc):
    r0 = pl.multiple_of(order_ref[first + i] * bm, bm)
    return acc + jax.lax.dot_general(x_ref[pl.ds(r0, bm), :], dy_ref[pl.ds(r0, bm), :],
                                     (((0,), (0,)), ((), ())),
                                     preferred_element_type=jnp.float32)

  acc = jax.lax.fori_loop(0, count_ref[e], body, jnp.zeros(dw_ref.shape, jnp.float32))
  dw_ref[...] = acc.astype(dw_ref.dtype)


def _gmm_fwd(x, w, expert_N, bm, interpret):
  return _forward(x, w, expert_N, bm, interpret), (x, w, expert_N)


def _gmm_bwd(bm, interpret, res, dy):
  x, w, expert_N = res
  dx = _forward(dy.astype(x.dtype), jnp.swapaxes(w, 1, 2), expert_N, bm, interpret)
  dw = _weight_grad(x, dy.astype(x.dtype), expert_N, w.shape[0], bm, interpret, w.dtype)
  return dx, dw, None


gmm.defvjp(_gmm_fwd, _gmm_bwd)
