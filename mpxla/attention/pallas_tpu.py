"""Block-sparse flash attention for TPUs: Pallas/Mosaic with scalar-prefetched block lists.

The grid is (batch, head, query block, j) with j < L, the static bound on listed blocks per
row. The packed lists [#partial, #full, partial indices, full indices] are prefetched into
SMEM; the key/value BlockSpec index maps read them, so step j DMAs the j-th listed key block
(partial blocks first, then full ones). Steps past the row's count repeat the last index (no
new DMA) and skip the compute. m, l and the output accumulate in VMEM scratch, flash style.
Backward: a dQ kernel with the same grid, and a dK/dV kernel over (batch, head, key block, j)
walking the transposed lists; dK/dV are per query head, summed over each kv head's group.

On a real TPU, block_q must be a multiple of 8 and block_kv of 128. `interpret=True` runs on
CPU; `debug=True` (interpret mode) adds an output listing the visited blocks per row.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from mpxla.attention import _kernel_common as C
from mpxla.attention.block_mask import BlockMask

LANES = 128  # m, l and lse are kept lane-replicated: [rows, 128]


def check_blocks(block_q: int, block_kv: int, interpret: bool) -> None:
  if interpret:
    return
  if block_q % 8 or block_kv % 128:
    raise ValueError(f"impl='pallas_tpu' needs block_q % 8 == 0 and block_kv % 128 == 0 on TPU, "
                     f"got block_q={block_q}, block_kv={block_kv}")


def attention(q, k, v, bm: BlockMask, *, scale: float, softcap: float | None = None,
              interpret: bool = False) -> jax.Array:
  """Attention [B, Tq, H, D] of q [B, Tq, H, D], k/v [B, Tk, Hk, D] over bm's listed blocks."""
  check_blocks(bm.block_q, bm.block_kv, interpret)
  return _ATTENTION(q, k, v, bm, C.Cfg(float(scale), softcap, bool(interpret), False))


# ---------------------------------------------------------------------------------------------


def _heads_major(x, t):
  """[B, T, H, D] -> [B, H, t, D] (zero-padded)."""
  return jnp.swapaxes(C.pad_seq(x, t), 1, 2)


def _div(h, g: int):
  """h // g for the non-negative grid index h (lax.div: no sign correction in index maps)."""
  return h if g == 1 else jax.lax.div(h, jnp.int32(g))


def _listed(lst, row, j, length):
  """(block index, #partial, #full) of step j; past the count, the last listed index."""
  n_p, n_f = lst[row + (0,)], lst[row + (1,)]
  idx_p = lst[row + (2 + jnp.minimum(j, length - 1),)]
  idx_f = lst[row + (2 + length + jnp.clip(j - n_p, 0, length - 1),)]
  idx = jnp.where(j < n_p, idx_p, jnp.where(n_f > 0, idx_f, idx_p))
  return idx, n_p, n_f


def _params(cfg):
  return None if cfg.interpret else pltpu.CompilerParams(
      dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"))


class _Geo:
  """Sizes and index helpers shared by the three kernels."""

  def __init__(self, q, k, bm):
    self.b, self.tq, self.h, self.d = q.shape
    self.tk, self.hk = k.shape[1], k.shape[2]
    self.g = self.h // self.hk
    self.bq, self.bk = bm.block_q, bm.block_kv
    self.nq, self.nk = bm.num_q_blocks, bm.num_kv_blocks
    self.tqp, self.tkp = self.nq * self.bq, self.nk * self.bk
    self.sb = int(bm.kv_num_blocks.shape[0] > 1)
    self.sh = int(bm.kv_num_blocks.shape[1] > 1)
    q_tok, kv_tok = bm.tokens()
    self.q_tok = jnp.swapaxes(q_tok, 1, 2)  # [Bt, Tqp, nrq]: a column per token row
    self.kv_tok = kv_tok  # [Bt, Hkt, nrk, Tkp]
    self.nrq, self.nrk = q_tok.shape[1], kv_tok.shape[2]
    self.tb = int(kv_tok.shape[0] > 1)
    self.g_tok = self.h // kv_tok.shape[1]

  def row(self, b, h, i):
    return (b * self.sb, h * self.sh, i)


def forward(q, k, v, bm: BlockMask, cfg: C.Cfg):
  """(o [B, Tq, H, D], lse float32 [B, H, Tq], visits int32 [B, H, nq, L] if cfg.debug)."""
  geo = _Geo(q, k, bm)
  bq, bk, d, length = geo.bq, geo.bk, geo.d, bm.kv_indices.shape[-1]
  g, g_tok, tb = geo.g, geo.g_tok, geo.tb

  def kv_map(b, h, i, j, lst):
    return (b, _div(h, g), _listed(lst, geo.row(b, h, i), j, length)[0], 0)

  def kvtok_map(b, h, i, j, lst):
    return (b * tb, _div(h, g_tok), 0, _listed(lst, geo.row(b, h, i), j, length)[0])

  in_specs = [
      pl.BlockSpec((None, None, bq, d), lambda b, h, i, j, lst: (b, h, i, 0)),
      pl.BlockSpec((None, None, bk, d), kv_map),
      pl.BlockSpec((None, None, bk, d), kv_map),
      pl.BlockSpec((None, bq, geo.nrq), lambda b, h, i, j, lst: (b * tb, i, 0)),
      pl.BlockSpec((None, None, geo.nrk, bk), kvtok_map),
  ]
  out_shape = [jax.ShapeDtypeStruct((geo.b, geo.h, geo.tqp, d), q.dtype),
               jax.ShapeDtypeStruct((geo.b, geo.h, geo.tqp, LANES), jnp.float32)]
  out_specs = [pl.BlockSpec((None, None, bq, d), lambda b, h, i, j, lst: (b, h, i, 0)),
               pl.BlockSpec((None, None, bq, LANES), lambda b, h, i, j, lst: (b, h, i, 0))]
  if cfg.debug:
    out_shape.append(jax.ShapeDtypeStruct((geo.b, geo.h, geo.nq, length), jnp.int32))
    out_specs.append(pl.BlockSpec((None, None, None, length),
                                  lambda b, h, i, j, lst: (b, h, i, 0)))
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1, grid=(geo.b, geo.h, geo.nq, length), in_specs=in_specs,
      out_specs=out_specs,
      scratch_shapes=[pltpu.VMEM((bq, LANES), jnp.float32), pltpu.VMEM((bq, LANES), jnp.float32),
                      pltpu.VMEM((bq, d), jnp.float32)])
  kernel = functools.partial(_fwd_kernel, geo=geo, mask=bm.mask, cfg=cfg, length=length)
  outs = pl.pallas_call(kernel, grid_spec=grid_spec, out_shape=out_shape,
                        interpret=cfg.interpret, compiler_params=_params(cfg),
                        name="mpxla_block_sparse_fwd_tpu")(
      C.kv_lists(bm), _heads_major(q, geo.tqp), _heads_major(k, geo.tkp),
      _heads_major(v, geo.tkp), geo.q_tok, geo.kv_tok)
  o = jnp.swapaxes(outs[0], 1, 2)[:, :geo.tq]
  return (o, outs[1][:, :, :geo.tq, 0]) + tuple(outs[2:])


def _q_rows(qt_ref, nrq):
  return [qt_ref[:, r:r + 1] for r in range(nrq)]  # [bq, 1] each


def _kv_rows(kt_ref, nrk):
  return [kt_ref[r:r + 1, :] for r in range(nrk)]  # [1, bk] each


def _fwd_kernel(lst, q_ref, k_ref, v_ref, qt_ref, kt_ref, o_ref, lse_ref, *rest, geo, mask, cfg,
                length):
  *dbg, m_scr, l_scr, acc_scr = rest
  b, h, i, j = (pl.program_id(a) for a in range(4))
  idx, n_p, n_f = _listed(lst, geo.row(b, h, i), j, length)

  @pl.when(j == 0)
  def _init():
    m_scr[...] = jnp.full(m_scr.shape, -jnp.inf, jnp.float32)
    l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
    acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)
    if dbg:
      dbg[0][...] = jnp.full(dbg[0].shape, -1, jnp.int32)

  def compute(full):
    s, _ = C.scores(q_ref[...], k_ref[...], cfg)
    if not full:
      q_slot = i * geo.bq + jax.lax.broadcasted_iota(jnp.int32, (geo.bq, 1), 0)
      kv_slot = idx * geo.bk + jax.lax.broadcasted_iota(jnp.int32, (1, geo.bk), 1)
      allowed = C.tile_mask(mask, _q_rows(qt_ref, geo.nrq), _kv_rows(kt_ref, geo.nrk), q_slot,
                            kv_slot, geo.tq, geo.tk)
      s = jnp.where(allowed, s, -jnp.inf)
    acc, m, den = C.online_softmax_step(s, v_ref[...], acc_scr[...], m_scr[:, :1], l_scr[:, :1])
    acc_scr[...] = acc
    m_scr[...] = jnp.broadcast_to(m, m_scr.shape)
    l_scr[...] = jnp.broadcast_to(den, l_scr.shape)
    if dbg:
      dbg[0][j] = idx

  pl.when(j < n_p)(lambda: compute(False))
  pl.when((j >= n_p) & (j < n_p + n_f))(lambda: compute(True))

  @pl.when(j == length - 1)
  def _end():
    o, lse = C.finalize(acc_scr[...], m_scr[:, :1], l_scr[:, :1])
    o_ref[...] = o.astype(o_ref.dtype)
    lse_ref[...] = jnp.broadcast_to(lse, lse_ref.shape)


# ---------------------------------------------------------------------------------------------


def backward(q, k, v, o, lse, do, bm: BlockMask, cfg: C.Cfg):
  """(dq, dk, dv) [+ dq visits [B, H, nq, L], dkv visits [B, H, nk, Lq] if cfg.debug)."""
  geo = _Geo(q, k, bm)
  bq, bk, d = geo.bq, geo.bk, geo.d
  g, g_tok, tb = geo.g, geo.g_tok, geo.tb
  delta = jnp.einsum("bqhd,bqhd->bhq", o.astype(jnp.float32), do.astype(jnp.float32))
  qh, doh = _heads_major(q, geo.tqp), _heads_major(do, geo.tqp)
  kh, vh = _heads_major(k, geo.tkp), _heads_major(v, geo.tkp)
  pad_q = ((0, 0), (0, 0), (0, geo.tqp - geo.tq))
  lse_l, delta_l = (jnp.broadcast_to(jnp.pad(x, pad_q)[..., None], x.shape[:2] + (geo.tqp, LANES))
                    for x in (lse, delta))  # lane-replicated [B, H, Tqp, 128]
  params = _params(cfg)

  # dQ
  length = bm.kv_indices.shape[-1]

  def kv_map(b, h, i, j, lst):
    return (b, _div(h, g), _listed(lst, geo.row(b, h, i), j, length)[0], 0)

  def kvtok_map(b, h, i, j, lst):
    return (b * tb, _div(h, g_tok), 0, _listed(lst, geo.row(b, h, i), j, length)[0])

  def q_map(b, h, i, j, lst):
    return (b, h, i, 0)

  in_specs = [
      pl.BlockSpec((None, None, bq, d), q_map), pl.BlockSpec((None, None, bk, d), kv_map),
      pl.BlockSpec((None, None, bk, d), kv_map), pl.BlockSpec((None, None, bq, d), q_map),
      pl.BlockSpec((None, None, bq, LANES), q_map), pl.BlockSpec((None, None, bq, LANES), q_map),
      pl.BlockSpec((None, bq, geo.nrq), lambda b, h, i, j, lst: (b * tb, i, 0)),
      pl.BlockSpec((None, None, geo.nrk, bk), kvtok_map),
  ]
  out_shape = [jax.ShapeDtypeStruct((geo.b, geo.h, geo.tqp, d), jnp.float32)]
  out_specs = [pl.BlockSpec((None, None, bq, d), q_map)]
  if cfg.debug:
    out_shape.append(jax.ShapeDtypeStruct((geo.b, geo.h, geo.nq, length), jnp.int32))
    out_specs.append(pl.BlockSpec((None, None, None, length),
                                  lambda b, h, i, j, lst: (b, h, i, 0)))
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1, grid=(geo.b, geo.h, geo.nq, length), in_specs=in_specs,
      out_specs=out_specs, scratch_shapes=[pltpu.VMEM((bq, d), jnp.float32)])
  dq_out = pl.pallas_call(
      functools.partial(_dq_kernel, geo=geo, mask=bm.mask, cfg=cfg, length=length),
      grid_spec=grid_spec, out_shape=out_shape, interpret=cfg.interpret, compiler_params=params,
      name="mpxla_block_sparse_dq_tpu")(C.kv_lists(bm), qh, kh, vh, doh, lse_l, delta_l,
                                        geo.q_tok, geo.kv_tok)

  # dK, dV
  length_t = bm.q_indices.shape[-1]

  def qb(b, h, i, j, lst):  # the query block of step j for key block i
    return _listed(lst, geo.row(b, h, i), j, length_t)[0]

  def q_map_t(b, h, i, j, lst):
    return (b, h, qb(b, h, i, j, lst), 0)

  def kv_map_t(b, h, i, j, lst):
    return (b, _div(h, g), i, 0)

  in_specs = [
      pl.BlockSpec((None, None, bq, d), q_map_t), pl.BlockSpec((None, None, bk, d), kv_map_t),
      pl.BlockSpec((None, None, bk, d), kv_map_t), pl.BlockSpec((None, None, bq, d), q_map_t),
      pl.BlockSpec((None, None, bq, LANES), q_map_t),
      pl.BlockSpec((None, None, bq, LANES), q_map_t),
      pl.BlockSpec((None, bq, geo.nrq), lambda b, h, i, j, lst: (b * tb, qb(b, h, i, j, lst), 0)),
      pl.BlockSpec((None, None, geo.nrk, bk),
                   lambda b, h, i, j, lst: (b * tb, _div(h, g_tok), 0, i)),
  ]
  out_shape = [jax.ShapeDtypeStruct((geo.b, geo.h, geo.tkp, d), jnp.float32)] * 2
  out_specs = [pl.BlockSpec((None, None, bk, d), lambda b, h, i, j, lst: (b, h, i, 0))] * 2
  if cfg.debug:
    out_shape.append(jax.ShapeDtypeStruct((geo.b, geo.h, geo.nk, length_t), jnp.int32))
    out_specs.append(pl.BlockSpec((None, None, None, length_t),
                                  lambda b, h, i, j, lst: (b, h, i, 0)))
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1, grid=(geo.b, geo.h, geo.nk, length_t), in_specs=in_specs,
      out_specs=out_specs,
      scratch_shapes=[pltpu.VMEM((bk, d), jnp.float32), pltpu.VMEM((bk, d), jnp.float32)])
  dkv_out = pl.pallas_call(
      functools.partial(_dkv_kernel, geo=geo, mask=bm.mask, cfg=cfg, length=length_t),
      grid_spec=grid_spec, out_shape=out_shape, interpret=cfg.interpret, compiler_params=params,
      name="mpxla_block_sparse_dkv_tpu")(C.q_lists(bm), qh, kh, vh, doh, lse_l, delta_l,
                                         geo.q_tok, geo.kv_tok)

  dq = jnp.swapaxes(dq_out[0], 1, 2)[:, :geo.tq].astype(q.dtype)
  dk, dv = (jnp.swapaxes(x, 1, 2)[:, :geo.tk].reshape(geo.b, geo.tk, geo.hk, g, d).sum(3)
            .astype(k.dtype) for x in dkv_out[:2])
  return (dq, dk, dv) + tuple(dq_out[1:]) + tuple(dkv_out[2:])


def _probs(q, k, lse, q_rows, kv_rows, q_slot, kv_slot, full, geo, mask, cfg):
  s, raw = C.scores(q, k, cfg)
  p = jnp.exp(s - jnp.where(lse == -jnp.inf, 0.0, lse))
  if not full:
    allowed = C.tile_mask(mask, q_rows, kv_rows, q_slot, kv_slot, geo.tq, geo.tk)
    p = jnp.where(allowed, p, 0.0)
  return p, raw


def _dq_kernel(lst, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qt_ref, kt_ref, dq_ref,
               *rest, geo, mask, cfg, length):
  *dbg, acc_scr = rest
  b, h, i, j = (pl.program_id(a) for a in range(4))
  idx, n_p, n_f = _listed(lst, geo.row(b, h, i), j, length)

  @pl.when(j == 0)
  def _init():
    acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)
    if dbg:
      dbg[0][...] = jnp.full(dbg[0].shape, -1, jnp.int32)

  def compute(full):
    q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
    q_slot = i * geo.bq + jax.lax.broadcasted_iota(jnp.int32, (geo.bq, 1), 0)
    kv_slot = idx * geo.bk + jax.lax.broadcasted_iota(jnp.int32, (1, geo.bk), 1)
    p, raw = _probs(q, k, lse_ref[:, :1], _q_rows(qt_ref, geo.nrq), _kv_rows(kt_ref, geo.nrk),
                    q_slot, kv_slot, full, geo, mask, cfg)
    dp = jax.lax.dot_general(do, v, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    ds = C.grad_scores(p * (dp - delta_ref[:, :1]), raw, cfg)
    acc_scr[...] += jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)
    if dbg:
      dbg[0][j] = idx

  pl.when(j < n_p)(lambda: compute(False))
  pl.when((j >= n_p) & (j < n_p + n_f))(lambda: compute(True))

  @pl.when(j == length - 1)
  def _end():
    dq_ref[...] = acc_scr[...]


def _dkv_kernel(lst, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qt_ref, kt_ref, dk_ref,
                dv_ref, *rest, geo, mask, cfg, length):
  *dbg, dk_scr, dv_scr = rest
  b, h, i, j = (pl.program_id(a) for a in range(4))
  idx, n_p, n_f = _listed(lst, geo.row(b, h, i), j, length)

  @pl.when(j == 0)
  def _init():
    dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
    dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)
    if dbg:
      dbg[0][...] = jnp.full(dbg[0].shape, -1, jnp.int32)

  def compute(full):
    q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
    q_slot = idx * geo.bq + jax.lax.broadcasted_iota(jnp.int32, (geo.bq, 1), 0)
    kv_slot = i * geo.bk + jax.lax.broadcasted_iota(jnp.int32, (1, geo.bk), 1)
    p, raw = _probs(q, k, lse_ref[:, :1], _q_rows(qt_ref, geo.nrq), _kv_rows(kt_ref, geo.nrk),
                    q_slot, kv_slot, full, geo, mask, cfg)
    tn = (((0,), (0,)), ((), ()))  # contract the query axis: p^T @ do, ds^T @ q
    dv_scr[...] += jax.lax.dot_general(p.astype(do.dtype), do, tn,
                                       preferred_element_type=jnp.float32)
    dp = jax.lax.dot_general(do, v, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    ds = C.grad_scores(p * (dp - delta_ref[:, :1]), raw, cfg)
    dk_scr[...] += jax.lax.dot_general(ds.astype(q.dtype), q, tn,
                                       preferred_element_type=jnp.float32)
    if dbg:
      dbg[0][j] = idx

  pl.when(j < n_p)(lambda: compute(False))
  pl.when((j >= n_p) & (j < n_p + n_f))(lambda: compute(True))

  @pl.when(j == length - 1)
  def _end():
    dk_ref[...] = dk_scr[...]
    dv_ref[...] = dv_scr[...]


_ATTENTION = C.differentiable(forward, backward)
