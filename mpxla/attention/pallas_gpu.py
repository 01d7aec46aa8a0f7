"""Block-sparse flash attention for GPUs: Pallas with the Triton lowering.

One program per (batch, head, query block) loops (`fori_loop`) over that block's listed key
blocks, reading their indices from a ref: first the partial blocks (mask evaluated on the
tile), then the full ones (no mask). The backward pass has a dQ kernel of the same shape and
a dK/dV kernel with one program per (batch, head, key block) looping over the transposed
lists; dK/dV are produced per query head and summed over each kv head's group.

Block sizes must be powers of two >= 16 (Triton `dot`); head_dim is zero-padded to one.
`interpret=True` runs the kernels on CPU; `debug=True` (interpret mode) adds an output listing
the blocks each program visited, to check that exactly the non-empty blocks run.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from mpxla.attention import _kernel_common as C
from mpxla.attention.block_mask import BlockMask


def _triton():
  return pltriton.CompilerParams(num_warps=4, num_stages=2)


def check_blocks(block_q: int, block_kv: int) -> None:
  for name, b in (("block_q", block_q), ("block_kv", block_kv)):
    if b < 16 or b & (b - 1):
      raise ValueError(f"impl='pallas_gpu' needs {name} a power of two >= 16 (Triton dot), got "
                       f"{b}; build the mask with e.g. {name}=64")


def attention(q, k, v, bm: BlockMask, *, scale: float, softcap: float | None = None,
              interpret: bool = False) -> jax.Array:
  """Attention [B, Tq, H, D] of q [B, Tq, H, D], k/v [B, Tk, Hk, D] over bm's listed blocks."""
  check_blocks(bm.block_q, bm.block_kv)
  return _ATTENTION(q, k, v, bm, C.Cfg(float(scale), softcap, bool(interpret), False))


# ---------------------------------------------------------------------------------------------


def _geometry(q, k, bm):
  b, tq, h, d = q.shape
  tk, hk = k.shape[1], k.shape[2]
  bq, bk, nq, nk = bm.block_q, bm.block_kv, bm.num_q_blocks, bm.num_kv_blocks
  dp = max(16, pl.next_power_of_2(d))
  return b, h, hk, d, dp, bq, bk, nq, nk, tq, tk


def _pad(x, t, dp):
  x = C.pad_seq(x, t)
  return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, dp - x.shape[-1])))


def _head_maps(bm, h, kv_tok):
  """Index helpers: mask batch/head (broadcast dims index 0) and the kv-token head of head h."""
  sb = int(bm.kv_num_blocks.shape[0] > 1)
  sh = int(bm.kv_num_blocks.shape[1] > 1)
  tb = int(kv_tok.shape[0] > 1)
  g_tok = h // kv_tok.shape[1]
  return sb, sh, tb, g_tok


def forward(q, k, v, bm: BlockMask, cfg: C.Cfg):
  """(o [B, Tq, H, D], lse float32 [B, H, Tq], visits int32 [B, H, nq, 2L] if cfg.debug)."""
  b, h, hk, d, dp, bq, bk, nq, nk, tq, tk = _geometry(q, k, bm)
  g = h // hk
  lists = C.kv_lists(bm)
  length = bm.kv_indices.shape[-1]
  q_tok, kv_tok = bm.tokens()
  nrq, nrk = q_tok.shape[1], kv_tok.shape[2]
  sb, sh, tb, g_tok = _head_maps(bm, h, kv_tok)
  qp, kp, vp = _pad(q, nq * bq, dp), _pad(k, nk * bk, dp), _pad(v, nk * bk, dp)

  in_specs = [
      pl.BlockSpec((None, None, None, lists.shape[-1]), lambda b, h, i: (b * sb, h * sh, i, 0)),
      pl.BlockSpec((None, bq, None, dp), lambda b, h, i: (b, i, h, 0)),
      pl.BlockSpec((None, nk * bk, None, dp), lambda b, h, i: (b, 0, h // g, 0)),
      pl.BlockSpec((None, nk * bk, None, dp), lambda b, h, i: (b, 0, h // g, 0)),
      pl.BlockSpec((None, nrq, bq), lambda b, h, i: (b * tb, 0, i)),
      pl.BlockSpec((None, None, nrk, nk * bk), lambda b, h, i: (b * tb, h // g_tok, 0, 0)),
  ]
  out_shape = [jax.ShapeDtypeStruct((b, nq * bq, h, dp), q.dtype),
               jax.ShapeDtypeStruct((b, h, nq * bq), jnp.float32)]
  out_specs = [pl.BlockSpec((None, bq, None, dp), lambda b, h, i: (b, i, h, 0)),
               pl.BlockSpec((None, None, bq), lambda b, h, i: (b, h, i))]
  if cfg.debug:
    out_shape.append(jax.ShapeDtypeStruct((b, h, nq, 2 * length), jnp.int32))
    out_specs.append(pl.BlockSpec((None, None, None, 2 * length), lambda b, h, i: (b, h, i, 0)))
  kernel = functools.partial(_fwd_kernel, mask=bm.mask, cfg=cfg, bq=bq, bk=bk, length=length,
                             q_len=tq, kv_len=tk, nrq=nrq, nrk=nrk)
  outs = pl.pallas_call(kernel, grid=(b, h, nq), in_specs=in_specs, out_specs=out_specs,
                        out_shape=out_shape, interpret=cfg.interpret, compiler_params=_triton(),
                        name="mpxla_block_sparse_fwd")(lists, qp, kp, vp, q_tok, kv_tok)
  o, lse = outs[0][:, :tq, :, :d], outs[1][:, :, :tq]
  return (o, lse) + tuple(outs[2:])


def _fwd_kernel(lst_ref, q_ref, k_ref, v_ref, qt_ref, kt_ref, o_ref, lse_ref, *dbg, mask, cfg,
                bq, bk, length, q_len, kv_len, nrq, nrk):
  i = pl.program_id(2)
  q = q_ref[...]
  q_slot = (i * bq + jnp.arange(bq, dtype=jnp.int32))[:, None]
  q_rows = [qt_ref[r, :][:, None] for r in range(nrq)]
  n_p, n_f = lst_ref[0], lst_ref[1]
  if dbg:
    dbg[0][...] = jnp.full(dbg[0].shape, -1, jnp.int32)

  def body(j, carry, full):
    idx = lst_ref[2 + length + j] if full else lst_ref[2 + j]
    start = pl.multiple_of(idx * bk, bk)
    s, _ = C.scores(q, k_ref[pl.ds(start, bk), :], cfg)
    if not full:
      kv_rows = [kt_ref[r, pl.ds(start, bk)][None, :] for r in range(nrk)]
      kv_slot = (start + jnp.arange(bk, dtype=jnp.int32))[None, :]
      s = jnp.where(C.tile_mask(mask, q_rows, kv_rows, q_slot, kv_slot, q_len, kv_len), s,
                    -jnp.inf)
    if dbg:
      dbg[0][j + n_p if full else j] = idx
    return C.online_softmax_step(s, v_ref[pl.ds(start, bk), :], *carry)

  carry = (jnp.zeros(o_ref.shape, jnp.float32), jnp.full((bq, 1), -jnp.inf, jnp.float32),
           jnp.zeros((bq, 1), jnp.float32))
  carry = jax.lax.fori_loop(0, n_p, functools.partial(body, full=False), carry)
  carry = jax.lax.fori_loop(0, n_f, functools.partial(body, full=True), carry)
  o, lse = C.finalize(*carry)
  o_ref[...] = o.astype(o_ref.dtype)
  lse_ref[...] = lse[:, 0]


# ---------------------------------------------------------------------------------------------


def backward(q, k, v, o, lse, do, bm: BlockMask, cfg: C.Cfg):
  """(dq, dk, dv) [+ dq visits [B, H, nq, 2L], dkv visits [B, H, nk, 2Lq] if cfg.debug)."""
  b, h, hk, d, dp, bq, bk, nq, nk, tq, tk = _geometry(q, k, bm)
  g = h // hk
  q_tok, kv_tok = bm.tokens()
  nrq, nrk = q_tok.shape[1], kv_tok.shape[2]
  sb, sh, tb, g_tok = _head_maps(bm, h, kv_tok)
  delta = jnp.einsum("bqhd,bqhd->bhq", o.astype(jnp.float32), do.astype(jnp.float32))
  tqp, tkp = nq * bq, nk * bk
  qp, dop = _pad(q, tqp, dp), _pad(do, tqp, dp)
  kp, vp = _pad(k, tkp, dp), _pad(v, tkp, dp)
  lse_p = jnp.pad(lse, ((0, 0), (0, 0), (0, tqp - tq)))
  delta_p = jnp.pad(delta, ((0, 0), (0, 0), (0, tqp - tq)))
  common = dict(mask=bm.mask, cfg=cfg, bq=bq, bk=bk, q_len=tq, kv_len=tk, nrq=nrq, nrk=nrk)

  # dQ: one program per query block, over its key blocks.
  lists = C.kv_lists(bm)
  length = bm.kv_indices.shape[-1]
  q_blk = pl.BlockSpec((None, bq, None, dp), lambda b, h, i: (b, i, h, 0))
  kv_all = pl.BlockSpec((None, tkp, None, dp), lambda b, h, i: (b, 0, h // g, 0))
  vec = pl.BlockSpec((None, None, bq), lambda b, h, i: (b, h, i))
  in_specs = [
      pl.BlockSpec((None, None, None, lists.shape[-1]), lambda b, h, i: (b * sb, h * sh, i, 0)),
      q_blk, kv_all, kv_all, q_blk, vec, vec,
      pl.BlockSpec((None, nrq, bq), lambda b, h, i: (b * tb, 0, i)),
      pl.BlockSpec((None, None, nrk, tkp), lambda b, h, i: (b * tb, h // g_tok, 0, 0)),
  ]
  out_shape = [jax.ShapeDtypeStruct((b, tqp, h, dp), jnp.float32)]
  out_specs = [q_blk]
  if cfg.debug:
    out_shape.append(jax.ShapeDtypeStruct((b, h, nq, 2 * length), jnp.int32))
    out_specs.append(pl.BlockSpec((None, None, None, 2 * length), lambda b, h, i: (b, h, i, 0)))
  dq_out = pl.pallas_call(
      functools.partial(_dq_kernel, length=length, **common), grid=(b, h, nq),
      in_specs=in_specs, out_specs=out_specs, out_shape=out_shape, interpret=cfg.interpret,
      compiler_params=_triton(), name="mpxla_block_sparse_dq")(
          lists, qp, kp, vp, dop, lse_p, delta_p, q_tok, kv_tok)

  # dK, dV: one program per (query head, key block), over its query blocks.
  lists_t = C.q_lists(bm)
  length_t = bm.q_indices.shape[-1]
  q_all = pl.BlockSpec((None, tqp, None, dp), lambda b, h, j: (b, 0, h, 0))
  vec_all = pl.BlockSpec((None, None, tqp), lambda b, h, j: (b, h, 0))
  kv_blk = pl.BlockSpec((None, bk, None, dp), lambda b, h, j: (b, j, h // g, 0))
  in_specs = [
      pl.BlockSpec((None, None, None, lists_t.shape[-1]), lambda b, h, j: (b * sb, h * sh, j, 0)),
      q_all, kv_blk, kv_blk, q_all, vec_all, vec_all,
      pl.BlockSpec((None, nrq, tqp), lambda b, h, j: (b * tb, 0, 0)),
      pl.BlockSpec((None, None, nrk, bk), lambda b, h, j: (b * tb, h // g_tok, 0, j)),
  ]
  dkv_spec = pl.BlockSpec((None, bk, None, dp), lambda b, h, j: (b, j, h, 0))
  out_shape = [jax.ShapeDtypeStruct((b, tkp, h, dp), jnp.float32)] * 2
  out_specs = [dkv_spec, dkv_spec]
  if cfg.debug:
    out_shape.append(jax.ShapeDtypeStruct((b, h, nk, 2 * length_t), jnp.int32))
    out_specs.append(pl.BlockSpec((None, None, None, 2 * length_t), lambda b, h, j: (b, h, j, 0)))
  dkv_out = pl.pallas_call(
      functools.partial(_dkv_kernel, length=length_t, **common), grid=(b, h, nk),
      in_specs=in_specs, out_specs=out_specs, out_shape=out_shape, interpret=cfg.interpret,
      compiler_params=_triton(), name="mpxla_block_sparse_dkv")(
          lists_t, qp, kp, vp, dop, lse_p, delta_p, q_tok, kv_tok)

  dq = dq_out[0][:, :tq, :, :d].astype(q.dtype)
  dk, dv = (x[:, :tk, :, :d].reshape(b, tk, hk, g, d).sum(3).astype(k.dtype)
            for x in dkv_out[:2])
  return (dq, dk, dv) + tuple(dq_out[1:]) + tuple(dkv_out[2:])


def _probs(q, k, lse, q_rows, kv_rows, q_slot, kv_slot, full, mask, cfg, q_len, kv_len):
  """(p, raw): p = exp(s - lse) on allowed entries, 0 elsewhere."""
  s, raw = C.scores(q, k, cfg)
  p = jnp.exp(s - jnp.where(lse == -jnp.inf, 0.0, lse))
  if not full:
    p = jnp.where(C.tile_mask(mask, q_rows, kv_rows, q_slot, kv_slot, q_len, kv_len), p, 0.0)
  return p, raw


def _dq_kernel(lst_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qt_ref, kt_ref, dq_ref,
               *dbg, mask, cfg, bq, bk, length, q_len, kv_len, nrq, nrk):
  i = pl.program_id(2)
  q, do = q_ref[...], do_ref[...]
  lse, delta = lse_ref[...][:, None], delta_ref[...][:, None]
  q_slot = (i * bq + jnp.arange(bq, dtype=jnp.int32))[:, None]
  q_rows = [qt_ref[r, :][:, None] for r in range(nrq)]
  n_p, n_f = lst_ref[0], lst_ref[1]
  if dbg:
    dbg[0][...] = jnp.full(dbg[0].shape, -1, jnp.int32)

  def body(j, dq, full):
    idx = lst_ref[2 + length + j] if full else lst_ref[2 + j]
    start = pl.multiple_of(idx * bk, bk)
    k, v = k_ref[pl.ds(start, bk), :], v_ref[pl.ds(start, bk), :]
    kv_rows = [kt_ref[r, pl.ds(start, bk)][None, :] for r in range(nrk)]
    kv_slot = (start + jnp.arange(bk, dtype=jnp.int32))[None, :]
    p, raw = _probs(q, k, lse, q_rows, kv_rows, q_slot, kv_slot, full, mask, cfg, q_len, kv_len)
    dp = jax.lax.dot_general(do, v, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    ds = C.grad_scores(p * (dp - delta), raw, cfg)
    if dbg:
      dbg[0][j + n_p if full else j] = idx
    return dq + jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

  dq = jnp.zeros(dq_ref.shape, jnp.float32)
  dq = jax.lax.fori_loop(0, n_p, functools.partial(body, full=False), dq)
  dq = jax.lax.fori_loop(0, n_f, functools.partial(body, full=True), dq)
  dq_ref[...] = dq


def _dkv_kernel(lst_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qt_ref, kt_ref,
                dk_ref, dv_ref, *dbg, mask, cfg, bq, bk, length, q_len, kv_len, nrq, nrk):
  j_blk = pl.program_id(2)
  k, v = k_ref[...], v_ref[...]
  kv_slot = (j_blk * bk + jnp.arange(bk, dtype=jnp.int32))[None, :]
  kv_rows = [kt_ref[r, :][None, :] for r in range(nrk)]
  n_p, n_f = lst_ref[0], lst_ref[1]
  if dbg:
    dbg[0][...] = jnp.full(dbg[0].shape, -1, jnp.int32)

  def body(j, carry, full):
    dk, dv = carry
    idx = lst_ref[2 + length + j] if full else lst_ref[2 + j]
    start = pl.multiple_of(idx * bq, bq)
    q, do = q_ref[pl.ds(start, bq), :], do_ref[pl.ds(start, bq), :]
    lse = lse_ref[pl.ds(start, bq)][:, None]
    delta = delta_ref[pl.ds(start, bq)][:, None]
    q_rows = [qt_ref[r, pl.ds(start, bq)][:, None] for r in range(nrq)]
    q_slot = (start + jnp.arange(bq, dtype=jnp.int32))[:, None]
    p, raw = _probs(q, k, lse, q_rows, kv_rows, q_slot, kv_slot, full, mask, cfg, q_len, kv_len)
    tn = (((0,), (0,)), ((), ()))  # contract the query axis: p^T @ do, ds^T @ q
    dv = dv + jax.lax.dot_general(p.astype(do.dtype), do, tn, preferred_element_type=jnp.float32)
    dp = jax.lax.dot_general(do, v, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    ds = C.grad_scores(p * (dp - delta), raw, cfg)
    dk = dk + jax.lax.dot_general(ds.astype(q.dtype), q, tn, preferred_element_type=jnp.float32)
    if dbg:
      dbg[0][j + n_p if full else j] = idx
    return dk, dv

  zeros = jnp.zeros(dk_ref.shape, jnp.float32)
  carry = jax.lax.fori_loop(0, n_p, functools.partial(body, full=False), (zeros, zeros))
  dk, dv = jax.lax.fori_loop(0, n_f, functools.partial(body, full=True), carry)
  dk_ref[...] = dk
  dv_ref[...] = dv


_ATTENTION = C.differentiable(forward, backward)
