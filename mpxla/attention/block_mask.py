"""`BlockMask`: per query block, the non-empty key blocks (partial and full kept apart), built
on the device inside jit from a `Mask`, plus the transposed lists for the dK/dV pass.

    bm = make_block_mask(causal() & document(ids), q_len=8192, kv_len=8192)
    bm.kv_num_blocks[b, h, i]        # number of partial key blocks of query block i
    bm.kv_indices[b, h, i, :n]       # their indices (ascending); entries past n repeat the last
    bm.full_kv_num_blocks, bm.full_kv_indices   # full blocks: no mask evaluation needed
    bm.q_num_blocks, bm.q_indices, bm.full_q_num_blocks, bm.full_q_indices  # per key block

Leading dims are [Bm, Hm] with Bm in {1, batch}, Hm in {1, heads} (broadcast). Sizes and list
lengths are static (from the mask's structure, computed with numpy at trace time over the
block grid only); counts and indices are arrays, so new segment ids or prefix lengths reuse
the compiled function.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from mpxla.attention import masks as M

# Above this fraction of non-empty block pairs the XLA path computes densely.
DENSE_THRESHOLD = 0.7


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BlockMask:
  """Block-sparse structure of an attention mask (a pytree of int32 arrays and the mask)."""

  kv_num_blocks: jax.Array  # [Bm, Hm, nq] partial key blocks per query block
  kv_indices: jax.Array  # [Bm, Hm, nq, L]
  full_kv_num_blocks: jax.Array  # [Bm, Hm, nq]
  full_kv_indices: jax.Array  # [Bm, Hm, nq, L]
  q_num_blocks: jax.Array  # [Bm, Hm, nk] partial query blocks per key block
  q_indices: jax.Array  # [Bm, Hm, nk, Lq]
  full_q_num_blocks: jax.Array  # [Bm, Hm, nk]
  full_q_indices: jax.Array  # [Bm, Hm, nk, Lq]
  mask: M.Mask  # evaluated elementwise inside partial blocks
  kv_perm: jax.Array | None  # int32 [Bp, Hk, kv_len]: original position of the key in each slot
  q_len: int = dataclasses.field(metadata=dict(static=True))
  kv_len: int = dataclasses.field(metadata=dict(static=True))
  block_q: int = dataclasses.field(metadata=dict(static=True))
  block_kv: int = dataclasses.field(metadata=dict(static=True))
  max_pairs: int = dataclasses.field(metadata=dict(static=True))  # XLA path capacity
  pair_bound: int = dataclasses.field(metadata=dict(static=True))  # static bound on pairs
  selected: bool = dataclasses.field(metadata=dict(static=True))  # lists are a chosen subset

  @property
  def num_q_blocks(self) -> int:
    return -(-self.q_len // self.block_q)

  @property
  def num_kv_blocks(self) -> int:
    return -(-self.kv_len // self.block_kv)

  @property
  def shape(self) -> tuple[int, int, int, int]:
    """(Bm, Hm, q_len, kv_len)."""
    return self.kv_num_blocks.shape[:2] + (self.q_len, self.kv_len)

  def block_any(self) -> jax.Array:
    """bool [Bm, Hm, nq, nk]: listed (partial or full) blocks."""
    return _scatter(self.kv_num_blocks, self.kv_indices, self.num_kv_blocks) | self.block_all()

  def block_all(self) -> jax.Array:
    """bool [Bm, Hm, nq, nk]: full blocks."""
    return _scatter(self.full_kv_num_blocks, self.full_kv_indices, self.num_kv_blocks)

  def density(self) -> jax.Array:
    """Fraction of (query block, key block) pairs that are listed, per [Bm, Hm]."""
    return jnp.mean(self.block_any(), axis=(-2, -1))

  def tokens(self, num_heads: int | None = None) -> tuple[jax.Array, jax.Array]:
    """Padded token rows for kernels: q [Bt, nr_q, nq*bq], kv [Bt, Hkt, nr_kv, nk*bk].

    With num_heads and a per-kv-head permutation, the kv head axis is repeated to num_heads.
    """
    q_tok, kv_tok = M.token_arrays(
        self.mask, self.q_len, self.kv_len, q_pad=self.num_q_blocks * self.block_q - self.q_len,
        kv_pad=self.num_kv_blocks * self.block_kv - self.kv_len, kv_perm=self.kv_perm)
    if num_heads is not None and kv_tok.shape[1] > 1:
      kv_tok = jnp.repeat(kv_tok, num_heads // kv_tok.shape[1], axis=1)
    return q_tok, kv_tok

  def to_dense(self, num_heads: int | None = None) -> jax.Array:
    """bool [B', H', q_len, kv_len]: the attention pattern this BlockMask computes.

    A key is attended iff its block is listed for the query's block and (the block is full or
    the mask allows it). H' is Hm, or num_heads when keys are permuted per head.
    """
    bq, bk = self.block_q, self.block_kv
    heads = num_heads or self.kv_num_blocks.shape[1]
    q_tok, kv_tok = self.tokens(heads if self.kv_perm is not None else None)
    allowed = M.eval_tokens(self.mask, q_tok[:, None, :, :, None], kv_tok[:, :, :, None, :])
    allowed = allowed & (q_tok[:, None, 0, :, None] >= 0) & (kv_tok[:, :, 0, None, :] >= 0)
    listed = jnp.repeat(jnp.repeat(self.block_any(), bq, axis=2), bk, axis=3)
    full = jnp.repeat(jnp.repeat(self.block_all(), bq, axis=2), bk, axis=3)
    out = listed & (full | allowed)
    return out[:, :, :self.q_len, :self.kv_len]


def _scatter(counts, indices, n):
  valid = jnp.arange(indices.shape[-1]) < counts[..., None]
  hot = jax.nn.one_hot(jnp.where(valid, indices, n), n + 1, dtype=jnp.int32)[..., :n]
  return jnp.sum(hot, axis=-2) > 0


# ---------------------------------------------------------------------------------------------
# Construction


def _check_block(name: str, b) -> int:
  if not isinstance(b, (int, np.integer)) or isinstance(b, bool) or b <= 0:
    raise ValueError(f"{name} must be a positive int, got {b!r}")
  return int(b)


def make_block_mask(mask: M.Mask | None, q_len: int, kv_len: int, *, block_q: int = 128,
                    block_kv: int = 128, max_pairs: int | float | None = None) -> BlockMask:
  """Builds the BlockMask of `mask` for q_len x kv_len on the device (jit-friendly).

  Structured masks (causal, sliding_window, chunked, prefix_lm, document and their `&` / `|`)
  classify blocks from per-row index intervals: O(q_len * num_kv_blocks) work, no S x S array.
  Masks involving `from_fn` evaluate [block_q, kv_len] tiles one query block at a time.
  The lists are exact: a block is listed iff some allowed pair lies in it, and full iff every
  pair is allowed (blocks overlapping the padding past q_len / kv_len are never full).

  max_pairs: capacity (pairs of blocks per [batch, head]) of the XLA path; default: the
    static bound from the mask's structure. An int, or a float fraction of all pairs. When a
    call holds more pairs, the XLA path computes that call densely (still exact).
  """
  mask = M.Full() if mask is None else mask
  if not isinstance(mask, M.Mask):
    raise TypeError(f"mask must be an mpxla.attention mask (causal(), document(ids), ...), "
                    f"got {type(mask).__name__}")
  for name, n in (("q_len", q_len), ("kv_len", kv_len)):
    if not isinstance(n, (int, np.integer)) or n <= 0:
      raise ValueError(f"{name} must be a positive int, got {n!r}")
  bq, bk = _check_block("block_q", block_q), _check_block("block_kv", block_kv)
  mask._check(q_len, kv_len)
  blk_any, blk_all = classify(mask, q_len, kv_len, bq, bk)
  bound = static_blocks(mask, q_len, kv_len, bq, bk)
  return from_block_flags(blk_any, blk_all, mask, q_len, kv_len, bq, bk, bound=bound,
                          max_pairs=max_pairs)


def from_block_flags(blk_any, blk_all, mask, q_len, kv_len, bq, bk, *, bound: np.ndarray,
                     max_pairs=None, kv_perm=None, selected=False) -> BlockMask:
  """BlockMask from per-block flags [Bm, Hm, nq, nk] (any: listed; all: full, subset of any)."""
  nq, nk = -(-q_len // bq), -(-kv_len // bk)
  blk_all = blk_all & blk_any
  partial = blk_any & ~blk_all
  rows = max(int(bound.sum(-1).max()), 1)
  cols = max(int(bound.sum(0).max()), 1)
  total = int(bound.sum())
  if max_pairs is None:
    pairs = total
  elif isinstance(max_pairs, float) and 0 < max_pairs <= 1:
    pairs = max(1, int(np.ceil(max_pairs * nq * nk)))
  elif isinstance(max_pairs, (int, np.integer)) and max_pairs > 0:
    pairs = int(max_pairs)
  else:
    raise ValueError(f"max_pairs must be a positive int or a fraction in (0, 1], got {max_pairs!r}")
  pairs = max(1, min(pairs, total))
  tp, ta = jnp.swapaxes(partial, -1, -2), jnp.swapaxes(blk_all, -1, -2)
  return BlockMask(*_compact(partial, rows), *_compact(blk_all, rows), *_compact(tp, cols),
                   *_compact(ta, cols), mask=mask, kv_perm=kv_perm, q_len=q_len, kv_len=kv_len,
                   block_q=bq, block_kv=bk, max_pairs=pairs, pair_bound=total,
                   selected=selected)


def _compact(flags, length):
  """(count [..], indices [.., length]): set positions ascending, padded with the last one."""
  count = jnp.sum(flags, axis=-1, dtype=jnp.int32)
  order = jnp.argsort(~flags, axis=-1, stable=True)[..., :length].astype(jnp.int32)
  last = jnp.take_along_axis(order, jnp.maximum(count - 1, 0)[..., None], axis=-1)
  return count, jnp.where(jnp.arange(length) < count[..., None], order, last)


def classify(mask: M.Mask, q_len, kv_len, bq, bk, kv_perm=None):
  """(any, all) bool [B', H', nq, nk] of the mask; H' = kv heads of kv_perm (or 1)."""
  nq, nk = -(-q_len // bq), -(-kv_len // bk)
  qp = jnp.arange(nq * bq, dtype=jnp.int32)
  ivs = mask._intervals(qp, jnp)
  if ivs is not None:
    return _classify_intervals(ivs, q_len, kv_len, bq, bk, kv_perm, jnp)
  q_tok, kv_tok = M.token_arrays(mask, q_len, kv_len, q_pad=nq * bq - q_len,
                                 kv_pad=nk * bk - kv_len, kv_perm=kv_perm)
  return _classify_tiles(mask, q_tok, kv_tok, q_len, kv_len, bq, bk)


def static_blocks(mask: M.Mask, q_len, kv_len, bq, bk) -> np.ndarray:
  """numpy bool [nq, nk]: blocks that can be non-empty for any data (a superset)."""
  nq, nk = -(-q_len // bq), -(-kv_len // bk)
  if isinstance(mask, M.And):  # also Or (a subclass)
    a = static_blocks(mask.a, q_len, kv_len, bq, bk)
    b = static_blocks(mask.b, q_len, kv_len, bq, bk)
    return (a | b) if isinstance(mask, M.Or) else (a & b)
  ivs = mask._intervals(np.arange(nq * bq, dtype=np.int64), np) if mask._static() else None
  if ivs is None:
    return np.ones((nq, nk), bool)
  return _classify_intervals(ivs, q_len, kv_len, bq, bk, None, np)[0][0, 0]


def _kv_ranges(kv_len, bk, nk, kv_perm, xp):
  """Position range [kmin, kmax] of the keys in each block: [Bp, Hk, 1, nk]."""
  if kv_perm is None:
    kmin = xp.arange(nk) * bk
    kmax = xp.minimum(kmin + bk, kv_len) - 1
    return kmin[None, None, None], kmax[None, None, None]
  pad = nk * bk - kv_len
  p = jnp.pad(kv_perm, ((0, 0), (0, 0), (0, pad)), constant_values=-1)
  p = p.reshape(p.shape[:2] + (nk, bk))
  kmin = jnp.min(jnp.where(p >= 0, p, M.BIG), axis=-1)
  kmax = jnp.max(p, axis=-1)
  return kmin[:, :, None], kmax[:, :, None]


def _classify_intervals(ivs, q_len, kv_len, bq, bk, kv_perm, xp):
  nq, nk = -(-q_len // bq), -(-kv_len // bk)
  kmin, kmax = _kv_ranges(kv_len, bk, nk, kv_perm, xp)

  def col(a):  # [Tqp] or [Bt, Tqp] -> [Bt, 1, Tqp, 1]
    return xp.reshape(a, (-1, 1, nq * bq, 1))

  hit = None
  for olo, ohi, _, _ in ivs:
    olo, ohi = col(olo), col(ohi)
    h = (olo <= kmax) & (ohi >= kmin) & (olo <= ohi)
    hit = h if hit is None else hit | h
  # Coverage of [kmin, kmax] by the union of inner intervals (greedy over intervals by lo).
  bt = max(col(a).shape[0] for iv in ivs for a in iv)
  lo = xp.stack([xp.broadcast_to(col(i[2]), (bt, 1, nq * bq, 1)) for i in ivs])
  hi = xp.stack([xp.broadcast_to(col(i[3]), (bt, 1, nq * bq, 1)) for i in ivs])
  if len(ivs) == 1:
    cover = (lo[0] <= kmin) & (hi[0] >= kmax)
  else:
    order = xp.argsort(lo, axis=0)
    lo, hi = xp.take_along_axis(lo, order, 0), xp.take_along_axis(hi, order, 0)
    reach = kmin - 1 + 0 * lo[0]
    for i in range(len(ivs)):
      reach = xp.where(lo[i] <= reach + 1, xp.maximum(reach, hi[i]), reach)
    cover = reach >= kmax
  q_valid = col(xp.arange(nq * bq) < q_len)
  hit = hit & q_valid
  blk_any = xp.any(xp.reshape(hit, hit.shape[:2] + (nq, bq, nk)), axis=-2)
  q_full = (xp.arange(nq) + 1) * bq <= q_len
  kv_full = (xp.arange(nk) + 1) * bk <= kv_len
  blk_all = xp.all(xp.reshape(cover, cover.shape[:2] + (nq, bq, nk)), axis=-2)
  blk_all = blk_all & q_full[:, None] & kv_full[None, :] & blk_any
  return blk_any, blk_all


def _classify_tiles(mask, q_tok, kv_tok, q_len, kv_len, bq, bk):
  nq, nk = -(-q_len // bq), -(-kv_len // bk)
  kv_valid = jnp.arange(nk * bk) < kv_len

  def one(i):
    qt = jax.lax.dynamic_slice_in_dim(q_tok, i * bq, bq, axis=2)
    allowed = M.eval_tokens(mask, qt[:, None, :, :, None], kv_tok[:, :, :, None, :])
    q_valid = i * bq + jnp.arange(bq) < q_len
    allowed = allowed & q_valid[:, None] & kv_valid
    tiles = allowed.reshape(allowed.shape[:2] + (bq, nk, bk))
    return jnp.any(tiles, axis=(2, 4)), jnp.all(tiles, axis=(2, 4))

  blk_any, blk_all = jax.lax.map(one, jnp.arange(nq))  # [nq, B', H', nk]
  return jnp.moveaxis(blk_any, 0, 2), jnp.moveaxis(blk_all, 0, 2)
