"""XLA attention path: gather the listed key blocks per query block, attend, scatter back.

Every non-empty (query block, key block) pair of the BlockMask becomes one entry of a flat list
of static capacity `bm.max_pairs` per [batch, mask head]; per pair

    s = scale * q_blk @ k_blk^T   (softcap: s = c * tanh(s / c)),  masked to -inf in partial blocks
    m = segment_max(rowmax(s)) over the pairs of a query block,  p = exp(s - m)
    o = segment_sum(p @ v_blk) / segment_sum(rowsum(p)),  lse = m + log(l)

so the work grows with the number of non-empty blocks; the pairs of a slice are computed
PAIR_CHUNK at a time (partial sums merged), and gathered per batch element. When the capacity
covers most pairs (> DENSE_THRESHOLD) the same math runs against all keys instead ("dense
mode"), one chunk of block_q query rows at a time (a `lax.scan`: the float32 scores of one
[block_q, kv_len] strip per batch and head exist at once, in the backward pass too).
Fully masked rows give output 0 and lse = -inf.

The custom VJP saves only q, k, v, the output and lse (plus the mask's int32 arrays) and
recomputes p in the backward pass:

    p = exp(s - lse), dv = sum p^T do, dp = do v^T, ds = p (dp - rowsum(do * o)),
    dq = scale * sum ds k, dk = scale * sum ds^T q  (times 1 - tanh^2 under softcap).

Computation is in float32 (inputs are upcast; outputs cast back).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mpxla.attention import masks as M
from mpxla.attention.block_mask import DENSE_THRESHOLD, BlockMask
from mpxla.quant.tracing import ATTENTION_LSE, ATTENTION_OUT, after, tag, zero_cotangent

# Checkpoint names of the saved output and log-sum-exp (every implementation's custom VJP):
# under `jax.checkpoint(policy=save_only_these_names(*RESIDUAL_NAMES, ...))` they are kept
# and the attention forward is not recomputed in the backward pass (q, k, v may be).
RESIDUAL_NAMES = (ATTENTION_OUT, ATTENTION_LSE)


def name_residuals(o: jax.Array, lse: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(o, lse) tagged with `RESIDUAL_NAMES` (a no-op outside `jax.checkpoint`)."""
  return tag(o, ATTENTION_OUT), tag(lse, ATTENTION_LSE)


class _Cfg(NamedTuple):
  scale: float
  softcap: float | None
  chunk: int  # dense mode without a BlockMask: query rows per chunk


def attention(q: jax.Array, k: jax.Array, v: jax.Array, bm: BlockMask | None, *,
              scale: float, softcap: float | None = None, block_q: int = 128) -> jax.Array:
  """Attention [B, Tq, H, D] over q [B, Tq, H, D], k/v [B, Tk, Hk, D] with the XLA path.

  block_q: query rows per chunk in dense mode when there is no BlockMask (else its block_q).
  """
  if not (isinstance(block_q, int | np.integer) and block_q >= 1):
    raise ValueError(f"block_q must be a positive int, got {block_q!r}")
  cfg = _Cfg(float(scale), None if softcap is None else float(softcap), int(block_q))
  return _attention(q, k, v, bm, cfg)


def mode(bm: BlockMask | None) -> str:
  """'dense' or 'sparse': how the XLA path computes this mask."""
  if bm is None:
    return "dense"
  return "sparse" if bm.max_pairs <= DENSE_THRESHOLD * bm.num_q_blocks * bm.num_kv_blocks \
      else "dense"


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q, k, v, bm, cfg):
  return _forward(q, k, v, bm, cfg)[0]


def _attention_fwd(q, k, v, bm, cfg):
  o, lse = name_residuals(*_forward(q, k, v, bm, cfg))
  return o, (q, k, v, o, lse, bm)


def _attention_bwd(cfg, res, do):
  q, k, v, o, lse, bm = res
  # Not recognizable by XLA as the forward's q, k, v, o, so their float32 copies are not
  # merged with the forward's and kept alive from one pass to the other (docs/xla_cpu.md);
  # computed once do exists, so that the score blocks recomputed from them (which depend on
  # nothing from the layers above) are not recomputed for every layer at once.
  q, k, v, o = (after(a, lse, do) for a in (q, k, v, o))
  dq, dk, dv = _backward(q, k, v, o, lse, do, bm, cfg)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), zero_cotangent(bm)


_attention.defvjp(_attention_fwd, _attention_bwd)


def _forward(q, k, v, bm, cfg):
  """(o [B, Tq, H, D] in q.dtype, lse float32 [B, H, Tq])."""
  return _dispatch(q, k, v, None, bm, cfg)


def _backward(q, k, v, o, lse, do, bm, cfg):
  return _dispatch(q, k, v, (o, lse, do), bm, cfg)


def _dispatch(q, k, v, bwd, bm, cfg):
  """Dense or sparse; sparse with a capacity below the static bound checks it at run time."""
  if mode(bm) == "dense":
    return _dense(q, k, v, bwd, bm, cfg)
  if bm.max_pairs >= bm.pair_bound:
    return _sparse(q, k, v, bwd, bm, cfg)
  return jax.lax.cond(_overflow(bm), functools.partial(_dense, q, k, v, bwd, bm, cfg),
                      functools.partial(_sparse, q, k, v, bwd, bm, cfg))


def _overflow(bm):
  return jnp.any(jnp.sum(bm.kv_num_blocks + bm.full_kv_num_blocks, -1) > bm.max_pairs)


# ---------------------------------------------------------------------------------------------
# Layout: heads are split into Hm mask-head groups (Hm = 1 or H), each with Hkm kv heads and
# Gp query heads per kv head; sequences into blocks. "Grouped" arrays are
# [B, Hm, n_blocks, Hkm, Gp * block, D].


class _Layout(NamedTuple):
  hm: int
  hkm: int
  gp: int


def _layout(bm, h, hk) -> _Layout:
  hm = 1 if bm is None else bm.kv_num_blocks.shape[1]
  return _Layout(1, hk, h // hk) if hm == 1 else _Layout(h, 1, 1)


def _to_groups(x, lay: _Layout, gp: int, nb: int, bs: int):
  b, t, _, d = x.shape
  x = jnp.pad(x, ((0, 0), (0, nb * bs - t), (0, 0), (0, 0)))
  x = x.reshape(b, nb, bs, lay.hm, lay.hkm, gp, d).transpose(0, 3, 1, 4, 5, 2, 6)
  return x.reshape(b, lay.hm, nb, lay.hkm, gp * bs, d)


def _from_groups(x, lay: _Layout, gp: int, t: int):
  b, hm, nb, hkm, gbs, d = x.shape
  bs = gbs // gp
  x = x.reshape(b, hm, nb, hkm, gp, bs, d).transpose(0, 2, 5, 1, 3, 4, 6)
  return x.reshape(b, nb * bs, hm * hkm * gp, d)[:, :t]


def _kv_groups(x, lay, h, nb, bs):
  """k or v [B, Tk, Hk, D] -> grouped; per-head masks repeat kv heads to the query heads."""
  if lay.hm > 1:
    x = jnp.repeat(x, h // x.shape[2], axis=2)
  return _to_groups(x, lay, 1, nb, bs)


def _kv_grad(dx, lay, hk, t):
  dx = _from_groups(dx, lay, 1, t)  # [B, Tk, Hm * Hkm, D]
  if lay.hm > 1:
    dx = dx.reshape(dx.shape[:2] + (hk, -1, dx.shape[-1])).sum(3)
  return dx


def _lse_to_bht(lse, t):
  """[B, Hm, nb, Hkm, Gp, bs] -> [B, H, T]."""
  b, hm, nb, hkm, gp, bs = lse.shape
  return lse.transpose(0, 1, 3, 4, 2, 5).reshape(b, hm * hkm * gp, nb * bs)[:, :, :t]


def _lse_from_bht(lse, lay, nb, bs):
  b, _, t = lse.shape
  lse = jnp.pad(lse, ((0, 0), (0, 0), (0, nb * bs - t)))
  lse = lse.reshape(b, lay.hm, lay.hkm, lay.gp, nb, bs)
  return lse.transpose(0, 1, 4, 2, 3, 5)


def _bcast(x, b, hm):
  """Mask arrays [Bm, Hm', ...] -> [b, hm, ...]."""
  return jnp.broadcast_to(x, (b, hm) + x.shape[2:])


# ---------------------------------------------------------------------------------------------
# Shared math on one [batch, mask head] slice


def _scores(qg, kg, cfg, gp):
  """qg [..., Hkm, Gp*bq, D], kg [..., Hkm, bk, D] -> (s, raw) [..., Hkm, Gp, bq, bk] f32."""
  raw = jnp.einsum("...hqd,...hkd->...hqk", qg, kg, preferred_element_type=jnp.float32)
  raw = raw * cfg.scale
  raw = raw.reshape(raw.shape[:-2] + (gp, -1, raw.shape[-1]))
  s = raw if cfg.softcap is None else cfg.softcap * jnp.tanh(raw / cfg.softcap)
  return s, raw


def _grad_scores(ds, raw, cfg):
  """d(loss)/d(q.k) from d(loss)/d(s)."""
  if cfg.softcap is not None:
    t = jnp.tanh(raw / cfg.softcap)
    ds = ds * (1 - t * t)
  return ds * cfg.scale


def _safe(m):
  return jnp.where(jnp.isfinite(m), m, 0.0)


def _pv(p, vg):
  """p [..., Hkm, Gp, bq, bk] @ v [..., Hkm, bk, D] -> [..., Hkm, Gp*bq, D]."""
  p = p.reshape(p.shape[:-3] + (-1, p.shape[-1]))
  return jnp.einsum("...hqk,...hkd->...hqd", p, vg, preferred_element_type=jnp.float32)


def _split(x, gp):
  """[..., Hkm, Gp*bq, D] -> [..., Hkm, Gp, bq, D]."""
  return x.reshape(x.shape[:-2] + (gp, -1, x.shape[-1]))


def _merge(x):
  return x.reshape(x.shape[:-3] + (-1, x.shape[-1]))


# ---------------------------------------------------------------------------------------------
# Dense: all keys per query chunk, one chunk at a time (memory: one [chunk, kv_len] strip)


def _chunk_allowed(bm, hm, i, tk):
  """bool [B', H', block_q, kv_len]: the rows of query block i (traced) of the attention
  pattern (`BlockMask.to_dense`); padding rows past q_len attend nothing."""
  q_tok, kv_tok = bm.tokens(hm if bm.kv_perm is not None else None)
  q_i = jax.lax.dynamic_slice_in_dim(q_tok, i * bm.block_q, bm.block_q, axis=-1)
  allowed = M.eval_tokens(bm.mask, q_i[:, None, :, :, None], kv_tok[:, :, :, None, :tk])
  allowed = allowed & (q_i[:, None, 0, :, None] >= 0)
  if bm.selected:  # only the listed blocks (full ones without the mask)
    rows = lambda a: jnp.repeat(a[:, :, i], bm.block_kv, axis=-1)[:, :, None, :tk]  # noqa: E731
    allowed = rows(bm.block_any()) & (rows(bm.block_all()) | allowed)
  return allowed


def _f32(x):
  return x.astype(jnp.float32)


def _bits(x):
  """A 16-bit float array as its bit pattern (uint16); other arrays as they are.

  Read chunk by chunk inside a loop, a bfloat16 array would be upcast to float32 as a whole
  before the loop by XLA on CPU (twice the bytes for as long as the loop runs); the bits are
  sliced first and upcast one chunk at a time.
  """
  return jax.lax.bitcast_convert_type(x, jnp.uint16) if x.dtype.itemsize == 2 else x


def _from_bits(x, dtype):
  return jax.lax.bitcast_convert_type(x, dtype) if x.dtype != dtype else x


def _neg_inf(i):
  """-inf, as a scalar computed from the loop index i. A constant fill is loop-invariant,
  and JAX's partial evaluation of `scan` under `jax.checkpoint` hoists loop-invariant values
  out of the loop: a [.., chunk, kv_len] float32 buffer kept from the forward to the backward."""
  return jnp.where(i >= 0, -jnp.inf, jnp.inf).astype(jnp.float32)


def _dense(q, k, v, bwd, bm, cfg):
  """Dense mode: a `lax.scan` over chunks of c query rows (c = block_q), each against all keys.

  The float32 scores, probabilities and their gradients exist for one chunk at a time, so the
  working set is [batch, heads, c, kv_len] instead of [batch, heads, q_len, kv_len].
  """
  b, tq, h, _ = q.shape
  tk, hk = k.shape[1], k.shape[2]
  lay = _layout(bm, h, hk)
  gp = lay.gp
  c = cfg.chunk if bm is None else bm.block_q
  nc = -(-tq // c)

  def padded(x):  # [B, Tq, H, D] -> [B, nc * c, H, D], as its bits (see `_bits`)
    x = jnp.pad(x, ((0, 0), (0, nc * c - tq), (0, 0), (0, 0))) if nc * c > tq else x
    return _bits(x)

  def rows(x, i):  # chunk i of a padded x -> [B, Hm, Hkm, Gp * c, D] in float32
    x = _from_bits(jax.lax.dynamic_slice_in_dim(x, i * c, c, axis=1), q.dtype)
    return _f32(_to_groups(x, lay, gp, 1, c)[:, :, 0])

  def unchunk(x):  # [nc, B, Hm, ...] -> [B, Hm, nc, ...]
    return jnp.moveaxis(x, 0, 2)

  kg = _kv_groups(k, lay, h, 1, tk)[:, :, 0]  # [B, Hm, Hkm, Tk, D]
  vg = _kv_groups(v, lay, h, 1, tk)[:, :, 0]

  def masked_scores(qc, i):  # ([B, Hm, Hkm, Gp, c, Tk] masked to -inf, raw)
    s, raw = _scores(qc, _f32(kg), cfg, gp)
    if bm is not None:
      allowed = jnp.broadcast_to(_chunk_allowed(bm, lay.hm, i, tk), (b, lay.hm, c, tk))
      s = jnp.where(allowed[:, :, None, None], s, _neg_inf(i))
    return s, raw

  qp, idx = padded(q), jnp.arange(nc)
  if bwd is None:

    def forward_chunk(_, i):
      s, _ = masked_scores(rows(qp, i), i)
      m = _safe(jnp.max(s, axis=-1))
      p = jnp.exp(s - m[..., None])
      den = jnp.sum(p, axis=-1)
      o = _pv(p, _f32(vg)) / _merge(jnp.where(den == 0, 1.0, den)[..., None])
      return None, (o.astype(q.dtype), jnp.where(den == 0, -jnp.inf, m + jnp.log(den)))

    _, (o, lse) = jax.lax.scan(forward_chunk, None, idx)
    return _from_groups(unchunk(o), lay, gp, tq), _lse_to_bht(unchunk(lse), tq)
  o, lse, do = bwd
  op, dop = padded(o), padded(do)
  lse_c = jnp.moveaxis(_lse_from_bht(lse, lay, nc, c), 2, 0)  # [nc, B, Hm, Hkm, Gp, c]

  def backward_chunk(carry, xs):
    dk, dv = carry
    lsec, i = xs
    qc, oc, doc = rows(qp, i), rows(op, i), rows(dop, i)
    s, raw = masked_scores(qc, i)
    delta = jnp.sum(_split(oc * doc, gp), axis=-1)
    p = jnp.exp(s - _safe(lsec)[..., None])
    # dk, dv accumulate transposed ([D, Tk]): the chunk's p and ds stay [c, Tk] (no
    # transposed copy of a score strip), only the small q and do chunks are transposed.
    dv = dv + jnp.einsum("...hgqd,...hgqk->...hdk", _split(doc, gp), p)
    dp = jnp.einsum("...hgqd,...hkd->...hgqk", _split(doc, gp), _f32(vg))
    ds = _grad_scores(p * (dp - delta[..., None]), raw, cfg)
    dk = dk + jnp.einsum("...hgqd,...hgqk->...hdk", _split(qc, gp), ds)
    dq = _merge(jnp.einsum("...hgqk,...hkd->...hgqd", ds, _f32(kg)))
    return (dk, dv), dq.astype(q.dtype)

  zeros = jnp.zeros(kg.shape[:-2] + kg.shape[-1:] + kg.shape[-2:-1], jnp.float32)
  (dk, dv), dq = jax.lax.scan(backward_chunk, (zeros, zeros), (lse_c, idx))
  dk, dv = jnp.swapaxes(dk, -1, -2), jnp.swapaxes(dv, -1, -2)
  dq = _from_groups(unchunk(dq), lay, gp, tq).astype(jnp.float32)  # as the sparse path's
  return dq, _kv_grad(dk[:, :, None], lay, hk, tk), _kv_grad(dv[:, :, None], lay, hk, tk)


# ---------------------------------------------------------------------------------------------
# Sparse: flat list of non-empty block pairs

PAIR_CHUNK = 32  # block pairs per [batch, mask head] slice computed at once (sparse mode)


def _pairs(bm: BlockMask):
  """rows, cols, full, valid [Bm, Hm, C] from the kv lists (sorted by row)."""
  c = bm.max_pairs
  n_p, n_f = bm.kv_num_blocks, bm.full_kv_num_blocks
  ends = jnp.cumsum(n_p + n_f, axis=-1)
  p = jnp.arange(c, dtype=jnp.int32)
  row = jnp.sum(ends[..., None, :] <= p[:, None], axis=-1, dtype=jnp.int32)
  valid = row < ends.shape[-1]
  row = jnp.minimum(row, ends.shape[-1] - 1)
  j = p - jnp.take_along_axis(ends - n_p - n_f, row, axis=-1)
  np_row = jnp.take_along_axis(n_p, row, axis=-1)
  full = j >= np_row
  length = bm.kv_indices.shape[-1]

  def col_at(indices, jj):  # indices [Bm, Hm, nq, L] at (row, jj)
    flat = indices.reshape(indices.shape[:2] + (-1,))
    return jnp.take_along_axis(flat, row * length + jnp.clip(jj, 0, length - 1), axis=-1)

  col_p, col_f = col_at(bm.kv_indices, j), col_at(bm.full_kv_indices, j - np_row)
  return row, jnp.where(full, col_f, col_p), full & valid, valid


def _pair_mask(mask, q_tok, kv_tok, qi, ki, full, valid, q_len, kv_len):
  """bool [N, bq, bk]: valid & (full | allowed) per pair.

  q_tok [nr, Hm, Tqp], kv_tok [nr, Hm, Tkp] (one batch element); qi, ki: (mask head, slot)
  index pairs [N, bq] / [N, bk] into them.
  """
  (qm, q_slot), (km, kv_slot) = qi, ki
  q_rows = [q_tok[r][qm, q_slot][:, :, None] for r in range(q_tok.shape[0])]
  kv_rows = [kv_tok[r][km, kv_slot][:, None, :] for r in range(kv_tok.shape[0])]
  allowed = M.eval_rows(mask, q_rows, kv_rows)
  allowed = allowed & (q_slot < q_len)[:, :, None] & (kv_slot < kv_len)[:, None, :]
  return valid[:, None, None] & (full[:, None, None] | allowed)


def _sparse(q, k, v, bwd, bm, cfg):
  """Pairs of all [batch, mask head] slices in one flat list of N = B * Hm * C entries.

  The C pairs of each slice are computed about PAIR_CHUNK at a time, one chunk after the
  other (unrolled, so that compiled cost analyses count every chunk): partial softmax sums per
  chunk, merged by their maxima in the forward pass; gradients summed in the backward pass.
  Gathers and segment sums run per batch element (`jax.vmap` over B, local block ids), so a
  batch split over devices stays split.
  """
  b, tq, h, _ = q.shape
  tk, hk = k.shape[1], k.shape[2]
  lay = _layout(bm, h, hk)
  bq, bk, nq, nk = bm.block_q, bm.block_kv, bm.num_q_blocks, bm.num_kv_blocks
  gp = lay.gp
  n_rows, n_cols = lay.hm * nq, lay.hm * nk  # segments per batch element

  def flat(x):  # [B, Hm, n, ...] -> [B * Hm * n, ...]
    return x.reshape((-1,) + x.shape[3:])

  def unflat(x):
    return x.reshape((b, lay.hm, -1) + x.shape[1:])

  def per_example(fn, x, ids):  # fn(x_b, ids_b) for each batch element b of flat x and ids
    out = jax.vmap(fn)(x.reshape((b, -1) + x.shape[1:]), ids.reshape(b, -1))
    return out.reshape((-1,) + out.shape[2:])

  def take(x, ids):  # x[ids] with the ids local to each batch element
    return per_example(lambda xb, i: xb[i], x, ids)

  def seg(x, ids, n, sorted_=False, op=jax.ops.segment_sum):  # n segments per batch element
    return per_example(lambda xb, i: op(xb, i, n, indices_are_sorted=sorted_), x, ids)

  qg = flat(_to_groups(_f32(q), lay, gp, nq, bq))  # [B*Hm*nq, Hkm, Gp*bq, D]
  kg = flat(_kv_groups(_f32(k), lay, h, nk, bk))  # [B*Hm*nk, Hkm, bk, D]
  vg = flat(_kv_groups(_f32(v), lay, h, nk, bk))
  q_tok, kv_tok = bm.tokens(lay.hm if bm.kv_perm is not None else None)
  q_tok = jnp.broadcast_to(q_tok[:, None], (b, lay.hm) + q_tok.shape[1:])  # [B, Hm, nr, T]
  kv_tok = _bcast(kv_tok, b, lay.hm)
  h_idx = jnp.arange(lay.hm, dtype=jnp.int32)[None, :, None]

  def pair_mask(qt, kt, r, c, f, va):  # one batch element's pairs: [Hm * cp, bq, bk]
    pair_h = jnp.repeat(jnp.arange(lay.hm, dtype=jnp.int32), r.shape[0] // lay.hm)[:, None]
    qi = (pair_h, r[:, None] * bq + jnp.arange(bq))
    ki = (pair_h, c[:, None] * bk + jnp.arange(bk))
    return _pair_mask(bm.mask, jnp.moveaxis(qt, 1, 0), jnp.moveaxis(kt, 1, 0), qi, ki, f, va,
                      bm.q_len, bm.kv_len)

  # row, col, full, valid [B, Hm, C] padded to n_chunks * cp pairs (padding: invalid pairs whose
  # rows repeat the last, so rows stay sorted), as n_chunks chunks [B, Hm, cp].
  n_chunks = -(-bm.max_pairs // PAIR_CHUNK)
  cp = -(-bm.max_pairs // n_chunks)
  pad = ((0, 0), (0, 0), (0, n_chunks * cp - bm.max_pairs))
  pairs = [jnp.pad(_bcast(x, b, lay.hm), pad, mode="edge" if i < 2 else "constant")
           for i, x in enumerate(_pairs(bm))]
  chunks = [[x[..., j * cp:(j + 1) * cp] for x in pairs] for j in range(n_chunks)]

  def scores(xs):  # one chunk: rows, cols [N'], s (masked to -inf), raw [N', Hkm, Gp, bq, bk]
    row, col, _, _ = xs
    rows, cols = (row + h_idx * nq).reshape(-1), (col + h_idx * nk).reshape(-1)
    allowed = jax.vmap(pair_mask)(q_tok, kv_tok, *(x.reshape(b, -1) for x in xs))
    s, raw = _scores(take(qg, rows), take(kg, cols), cfg, gp)
    s = jnp.where(allowed.reshape((-1, 1, 1) + allowed.shape[2:]), s, -jnp.inf)
    return rows, cols, s, raw

  def over_chunks(body, merge):  # merge(..merge(body(chunk 0), body(chunk 1)).., body(last))
    out = None
    for row, col, full, valid in chunks:
      if out is not None:  # a chunk's blocks once the previous chunk is merged: one chunk at a time
        row, col = (after(x, jax.tree.leaves(out)[0]) for x in (row, col))
      new = body((row, col, full, valid))
      out = new if out is None else merge(out, new)
    return out

  if bwd is None:

    def forward(xs):  # one chunk: row max m, row sum of exp(s - m), sum of p v
      rows, cols, s, _ = scores(xs)
      m = seg(jnp.max(s, axis=-1), rows, n_rows, True, jax.ops.segment_max)
      p = jnp.exp(s - take(_safe(m), rows)[..., None])
      den = seg(jnp.sum(p, axis=-1), rows, n_rows, True)
      return m, den, seg(_pv(p, take(vg, cols)), rows, n_rows, True)

    def merge(a, c):  # two chunks' partial sums, rescaled to the larger maximum
      m = jnp.maximum(a[0], c[0])
      wa, wc = (jnp.where(jnp.isfinite(x[0]), jnp.exp(x[0] - _safe(m)), 0.0) for x in (a, c))
      return m, a[1] * wa + c[1] * wc, a[2] * _merge(wa[..., None]) + c[2] * _merge(wc[..., None])

    m, den, o = over_chunks(forward, merge)
    o = o / _merge(jnp.where(den == 0, 1.0, den)[..., None])
    lse = jnp.where(den == 0, -jnp.inf, _safe(m) + jnp.log(den))
    return _from_groups(unflat(o), lay, gp, tq).astype(q.dtype), _lse_to_bht(unflat(lse), tq)
  o, lse, do = bwd
  og = flat(_to_groups(_f32(o), lay, gp, nq, bq))
  dog = flat(_to_groups(_f32(do), lay, gp, nq, bq))
  lse_g = _safe(flat(_lse_from_bht(lse, lay, nq, bq)))  # [B*Hm*nq, Hkm, Gp, bq]
  delta = jnp.sum(_split(og * dog, gp), axis=-1)

  def backward(xs):  # one chunk's (dq, dk, dv)
    rows, cols, s, raw = scores(xs)
    dor = _split(take(dog, rows), gp)
    p = jnp.exp(s - take(lse_g, rows)[..., None])
    dv = seg(jnp.einsum("nhgqk,nhgqd->nhkd", p, dor), cols, n_cols)
    dp = jnp.einsum("nhgqd,nhkd->nhgqk", dor, take(vg, cols))
    ds = _grad_scores(p * (dp - take(delta, rows)[..., None]), raw, cfg)
    dq = seg(_merge(jnp.einsum("nhgqk,nhkd->nhgqd", ds, take(kg, cols))), rows, n_rows, True)
    dk = seg(jnp.einsum("nhgqk,nhgqd->nhkd", ds, _split(take(qg, rows), gp)), cols, n_cols)
    return dq, dk, dv

  dq, dk, dv = over_chunks(backward, lambda a, c: tuple(x + y for x, y in zip(a, c, strict=True)))
  return (_from_groups(unflat(dq), lay, gp, tq), _kv_grad(unflat(dk), lay, hk, tk),
          _kv_grad(unflat(dv), lay, hk, tk))
