"""Token permutation and threshold block selection (PBS-Attn style), forward and backward.

    p = permute_kv(q, k, v, causal(), threshold=0.9, segment=256)
    o = attention(q, p.k, p.v, mask=p.block_mask)      # == sparse_attention(q, k, v, causal())

1. Pool: q_pool[i] = mean of query block i, per head.
2. Permute (optional): the importance of key j is sum_i softmax_j(scale * q_pool[i] . k_j) over
   the keys allowed to block i (summed over the query heads of each kv head). Within aligned
   segments of `segment` keys, keys are sorted by importance (descending, stable), per
   [batch, kv head], so the important keys of a segment gather into its first blocks.
   Queries stay in place: the output is in the original order.
3. Select: block scores over the allowed blocks, softmax_j(scale * q_pool[i] . k_pool[j]
   + log n_j) with mean-pooled keys (estimate='pooled', PBS-Attn), or the pooled query's
   attention mass on each block's keys, sum_{t in j} softmax_t(scale * q_pool[i] . k_t)
   (estimate='tokens': O(q_len / block_q * kv_len) work, sharper when a few keys dominate);
   keep the smallest set of blocks whose scores reach `threshold`, plus the first key block
   and the diagonal blocks (key blocks holding positions of the query block).

Causality and all other masks are evaluated on the keys' original positions (the BlockMask
carries `kv_perm`), so the result is exact attention restricted to the selected blocks.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from mpxla.attention import masks as M
from mpxla.attention.api import _check_mask, attention
from mpxla.attention.block_mask import (
    BlockMask,
    _check_block,
    _kv_ranges,
    classify,
    from_block_flags,
    static_blocks,
)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Permuted:
  """Permuted keys/values with the BlockMask that attends over them."""

  k: jax.Array  # [B, Tk, Hk, D]: k[b, t, h] = k_orig[b, perm[b, h, t], h]
  v: jax.Array
  block_mask: BlockMask  # per [batch, query head]; block_mask.kv_perm is perm (or None)
  perm: jax.Array  # int32 [B, Hk, Tk]: original position of the key in each slot


def permute_kv(q: jax.Array, k: jax.Array, v: jax.Array, mask: M.Mask | None = None, *,
               block_q: int = 128, block_kv: int = 128, threshold: float = 0.9,
               segment: int = 256, permute: bool = True, estimate: str = "pooled",
               scale: float | None = None, max_pairs: int | float | None = None) -> Permuted:
  """Estimates block importance, permutes keys/values within segments, selects blocks.

  Args:
    q: [B, Tq, H, D]; k, v: [B, Tk, Hk, D].
    mask: the exact mask (e.g. causal()); None allows every key.
    threshold: fraction of the estimated attention mass the selected blocks must reach.
    segment: permutation segment length, a multiple of block_kv.
    permute: False keeps the original key order (selection only).
    estimate: 'pooled' (mean-pooled keys per block) or 'tokens' (pooled queries against every
      key, summed per block).
    max_pairs: XLA-path capacity of the returned BlockMask (default: the mask's static bound).
  """
  if k.ndim != 4 or q.ndim != 4 or k.shape != v.shape or q.shape[0] != k.shape[0]:
    raise ValueError(f"q must be [B, Tq, H, D] and k, v [B, Tk, Hk, D] with one batch, got "
                     f"{q.shape}, {k.shape}, {v.shape}")
  if q.shape[2] % k.shape[2] or q.shape[3] != k.shape[3]:
    raise ValueError(f"heads {q.shape[2]} must be a multiple of kv_heads {k.shape[2]} and "
                     f"head_dims must match ({q.shape[3]} vs {k.shape[3]})")
  if not 0 < threshold <= 1:
    raise ValueError(f"threshold must be in (0, 1], got {threshold}")
  if estimate not in ("pooled", "tokens"):
    raise ValueError(f"estimate must be 'pooled' or 'tokens', got {estimate!r}")
  block_q, block_kv = _check_block("block_q", block_q), _check_block("block_kv", block_kv)
  if not isinstance(segment, (int, np.integer)) or segment <= 0 or segment % block_kv:
    raise ValueError(f"segment must be a positive multiple of block_kv={block_kv}, got {segment}")
  mask = M.Full() if mask is None else mask
  b, tq, h, d = q.shape
  tk, hk = k.shape[1], k.shape[2]
  g = h // hk
  _check_mask(mask, b, tq, tk)
  scale = d ** -0.5 if scale is None else scale
  nq, nk = -(-tq // block_q), -(-tk // block_kv)
  q_pool = _pool(jax.lax.stop_gradient(q).astype(jnp.float32), block_q, nq)  # [B, nq, H, D]
  k_est = jax.lax.stop_gradient(k).astype(jnp.float32)  # estimates are not differentiated

  perm = None
  if permute:
    base_any, _ = classify(mask, tq, tk, block_q, block_kv)  # [Bt, 1, nq, nk]
    s = jnp.einsum("bihd,bthd->bhit", q_pool, jnp.repeat(k_est, g, axis=2))
    allowed = jnp.repeat(base_any, block_kv, axis=-1)[..., :tk]  # [Bt, 1, nq, Tk]
    probs = jax.nn.softmax(jnp.where(allowed, s * scale, -jnp.inf), axis=-1)
    probs = jnp.where(allowed, probs, 0.0)
    importance = probs.sum(2).reshape(b, hk, g, tk).sum(2)  # [B, Hk, Tk]
    perm = segment_sort(importance, segment)
    slots = jnp.swapaxes(perm, 1, 2)[..., None]  # [B, Tk, Hk, 1]
    k, v, k_est = (jnp.take_along_axis(x, slots, axis=1) for x in (k, v, k_est))

  blk_any, blk_all = classify(mask, tq, tk, block_q, block_kv, kv_perm=perm)
  if blk_any.shape[1] > 1:  # per kv head (permuted keys) -> per query head
    blk_any, blk_all = jnp.repeat(blk_any, g, axis=1), jnp.repeat(blk_all, g, axis=1)
  if estimate == "pooled":
    k_pool = _pool(k_est, block_kv, nk)  # [B, nk, Hk, D]
    counts = jnp.minimum(block_kv, tk - jnp.arange(nk) * block_kv)
    s_blk = jnp.einsum("bihd,bjhd->bhij", q_pool, jnp.repeat(k_pool, g, axis=2)) * scale
    s_blk = s_blk + jnp.log(counts.astype(jnp.float32))
  else:  # log of the summed exp(score) of each block's keys
    s_tok = jnp.einsum("bihd,bthd->bhit", q_pool, jnp.repeat(k_est, g, axis=2)) * scale
    s_tok = jnp.pad(s_tok, ((0, 0),) * 3 + ((0, nk * block_kv - tk),), constant_values=-jnp.inf)
    s_blk = jax.nn.logsumexp(s_tok.reshape(s_tok.shape[:3] + (nk, block_kv)), axis=-1)
  probs = jax.nn.softmax(jnp.where(blk_any, s_blk, -jnp.inf), axis=-1)
  probs = jnp.where(blk_any, probs, 0.0)  # [B, H, nq, nk]
  order = jnp.argsort(-probs, axis=-1, stable=True)
  before = jnp.cumsum(jnp.take_along_axis(probs, order, -1), axis=-1) - jnp.take_along_axis(
      probs, order, -1)
  keep_sorted = before < threshold
  keep = jnp.zeros_like(keep_sorted).at[
      jnp.arange(b)[:, None, None, None], jnp.arange(h)[None, :, None, None],
      jnp.arange(nq)[None, None, :, None], order].set(keep_sorted)
  keep = keep | _always(tq, tk, block_q, block_kv, nq, nk, perm, g)
  selected = keep & blk_any
  bound = static_blocks(mask, tq, tk, block_q, block_kv)
  if permute:  # keys move between the blocks of a segment: widen the bound over each segment
    per = segment // block_kv
    seg = np.pad(bound, ((0, 0), (0, -nk % per))).reshape(nq, -1, per).any(-1)
    bound = np.repeat(seg, per, axis=1)[:, :nk]
  bm = from_block_flags(selected, blk_all & selected, mask, tq, tk, block_q, block_kv,
                        bound=bound, max_pairs=max_pairs, kv_perm=perm, selected=True)
  if perm is None:
    perm = jnp.broadcast_to(jnp.arange(tk, dtype=jnp.int32), (b, hk, tk))
  return Permuted(k, v, bm, perm)


def sparse_attention(q, k, v, mask: M.Mask | None = None, *, block_q: int = 128,
                     block_kv: int = 128, threshold: float = 0.9, segment: int = 256,
                     permute: bool = True, estimate: str = "pooled",
                     scale: float | None = None, softcap: float | None = None,
                     impl: str = "auto", interpret: bool = False,
                     max_pairs: int | float | None = None) -> jax.Array:
  """`permute_kv` then `attention` over the selected blocks; output in the original order.

  Block selection is not differentiated (it is a discrete choice); gradients flow through
  q, k and v as for any BlockMask.
  """
  p = permute_kv(q, k, v, mask, block_q=block_q, block_kv=block_kv,
                 threshold=threshold, segment=segment, permute=permute, estimate=estimate,
                 scale=scale, max_pairs=max_pairs)
  return attention(q, p.k, p.v, mask=p.block_mask, scale=scale, softcap=softcap, impl=impl,
                   interpret=interpret)


def _pool(x, bs, nb):
  """Mean over each block of axis 1 (valid rows only): [B, T, H, D] -> [B, nb, H, D]."""
  t = x.shape[1]
  x = jnp.pad(x, ((0, 0), (0, nb * bs - t), (0, 0), (0, 0)))
  counts = jnp.minimum(bs, t - jnp.arange(nb) * bs).astype(x.dtype)
  return x.reshape(x.shape[0], nb, bs, *x.shape[2:]).sum(2) / counts[:, None, None]


def segment_sort(importance, segment):
  """int32 [..., Tk]: positions sorted by importance (descending, stable) in each aligned segment
  of `segment` keys; importance must be >= 0 (a short last segment is padded with -1)."""
  tk = importance.shape[-1]
  ns = -(-tk // segment)
  pad = ((0, 0),) * (importance.ndim - 1) + ((0, ns * segment - tk),)
  imp = jnp.pad(importance, pad, constant_values=-1.0)  # padding sorts last
  order = jnp.argsort(-imp.reshape(imp.shape[:-1] + (ns, segment)), axis=-1, stable=True)
  pos = order + (jnp.arange(ns) * segment)[:, None]
  return pos.reshape(imp.shape)[..., :tk].astype(jnp.int32)


def _always(tq, tk, bq, bk, nq, nk, perm, g):
  """bool [., ., nq, nk]: the first key block and key blocks holding the query block's positions."""
  kmin, kmax = _kv_ranges(tk, bk, nk, perm, jnp)  # [Bp, Hk, 1, nk]
  if perm is not None:
    kmin, kmax = jnp.repeat(kmin, g, axis=1), jnp.repeat(kmax, g, axis=1)
  q0 = (jnp.arange(nq) * bq)[:, None]
  q1 = jnp.minimum(q0 + bq, tq) - 1
  diag = (kmin <= q1) & (kmax >= q0)
  return diag | (jnp.arange(nk) == 0)
