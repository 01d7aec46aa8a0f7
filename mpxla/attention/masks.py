"""Attention masks: builders, `&` / `|` combinators, elementwise and per-block evaluation.

    m = causal() & document(segment_ids)        # packed sequences
    m = sliding_window(512)                     # q - 512 <= kv <= q
    m = causal() & from_fn(lambda q, kv: (q - kv) % 3 != 1)

A mask is a pytree (its arrays, e.g. segment ids, are leaves; sizes and functions are static),
so new segment ids or prefix lengths never retrace a jitted function. Masks are aligned
top-left: query i and key j have positions i and j (a causal mask with q_len != kv_len keeps
kv <= q). Keys at positions >= kv_len and queries >= q_len (block padding) are always masked.

Each mask answers three questions:

- elementwise `allowed(q_pos, kv_pos)` (`_eval`), with per-token data ("tokens": segment ids,
  per-batch prefix lengths) passed alongside, so kernels evaluate it tile by tile;
- per-row key intervals (`_intervals`, structured masks only): row q allows
  `union_i [lo_i(q), hi_i(q)]`, given as an outer bound (a superset of the allowed keys) and an
  inner bound (a subset); they are equal except for `document` ids that are not contiguous.
  Block emptiness comes from these index ranges, never from an S x S array;
- a static numpy bound on the blocks that can be non-empty (`_static_blocks`), used to size
  loops and gathers at trace time.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

BIG = 1 << 30  # "unbounded" interval end; positions are int32 and below this (`check_lengths`).
MAX_INTERVALS = 8  # more (from `|` of `&`s) falls back to tile-by-tile evaluation

Interval = tuple[Any, Any, Any, Any]  # (outer_lo, outer_hi, inner_lo, inner_hi), [Bt, Tq] or [Tq]


class Mask:
  """Base class of attention masks; combine with `&` (both allow) and `|` (either allows)."""

  def __and__(self, other: Mask) -> Mask:
    return And(self, _as_mask(other, "&"))

  def __or__(self, other: Mask) -> Mask:
    return Or(self, _as_mask(other, "|"))

  # --- interface implemented by the leaves and combinators ---

  def _tokens(self) -> tuple[list[jax.Array], list[jax.Array]]:
    """Per-token int32 data: (q-side arrays [Bt, q_len], kv-side arrays [Bt, kv_len])."""
    return [], []

  def _eval(self, qp, kp, qt: Iterator, kt: Iterator):
    """Elementwise `allowed` for broadcastable positions; pulls its tokens from qt / kt."""
    raise NotImplementedError

  def _intervals(self, qp, xp) -> list[Interval] | None:
    """Allowed key positions per query as a union of intervals, or None (unstructured)."""
    return None

  def _static(self) -> bool:
    """True when the mask has no array data (its block pattern is known at trace time)."""
    return True

  def _check(self, q_len: int, kv_len: int) -> None:
    """Raises ValueError when the mask does not fit these lengths."""

  # --- public helpers ---

  def dense(self, q_len: int, kv_len: int) -> jax.Array:
    """The boolean mask [Bt, q_len, kv_len] (Bt = 1 unless the mask holds per-batch data)."""
    check_lengths(q_len, kv_len)
    self._check(q_len, kv_len)
    q_tok, kv_tok = token_arrays(self, q_len, kv_len)
    allowed = eval_tokens(self, q_tok[:, :, :, None], kv_tok[:, 0, :, None, :])
    return jnp.broadcast_to(allowed, (max(q_tok.shape[0], kv_tok.shape[0]), q_len, kv_len))

  @property
  def batch_size(self) -> int:
    """Leading batch size of the mask's data (1 when it has none)."""
    qs, ks = self._tokens()
    return max([a.shape[0] for a in qs + ks], default=1)


def check_lengths(q_len: int, kv_len: int) -> None:
  """Raises ValueError unless 0 <= q_len, kv_len < 2^30 (int32 positions, `BIG`)."""
  for name, n in (("q_len", q_len), ("kv_len", kv_len)):
    if not 0 <= n < BIG:
      raise ValueError(f"{name}={n}: masks handle sequence lengths from 0 to 2^30 - 1.")


def _as_mask(m: Any, op: str) -> Mask:
  if not isinstance(m, Mask):
    raise TypeError(f"mask {op} expects another mask (causal(), document(ids), ...), got {m!r}")
  return m


def _pytree(cls=None, *, data=(), meta=()):
  """Registers a frozen dataclass as a pytree with `data` fields as leaves."""

  def wrap(c):
    c = dataclasses.dataclass(frozen=True, eq=False)(c)
    return jax.tree_util.register_dataclass(c, data_fields=list(data), meta_fields=list(meta))

  return wrap if cls is None else wrap(cls)


# ---------------------------------------------------------------------------------------------
# Leaves


@_pytree
class Full(Mask):
  """Every key allowed (used for `mask=None`)."""

  def _eval(self, qp, kp, qt, kt):
    return jnp.ones(jnp.broadcast_shapes(jnp.shape(qp), jnp.shape(kp)), bool)

  def _intervals(self, qp, xp):
    lo = xp.full(qp.shape, -BIG, qp.dtype)
    hi = xp.full(qp.shape, BIG, qp.dtype)
    return [(lo, hi, lo, hi)]


@_pytree
class Causal(Mask):
  """kv <= q."""

  def _eval(self, qp, kp, qt, kt):
    return kp <= qp

  def _intervals(self, qp, xp):
    lo = xp.full(qp.shape, -BIG, qp.dtype)
    return [(lo, qp, lo, qp)]


@_pytree(meta=("left", "right"))
class SlidingWindow(Mask):
  """q - left <= kv <= q + right."""

  left: int
  right: int

  def _eval(self, qp, kp, qt, kt):
    return (kp >= qp - self.left) & (kp <= qp + self.right)

  def _intervals(self, qp, xp):
    return [(qp - self.left, qp + self.right, qp - self.left, qp + self.right)]


@_pytree(meta=("size",))
class Chunked(Mask):
  """q // size == kv // size (bidirectional inside each chunk; `& causal()` for Llama 4)."""

  size: int

  def _eval(self, qp, kp, qt, kt):
    # lax.div truncates; positions are >= 0 (padding slots, -1, are masked separately).
    return jax.lax.div(qp, jnp.int32(self.size)) == jax.lax.div(kp, jnp.int32(self.size))

  def _intervals(self, qp, xp):
    lo = (qp // self.size) * self.size
    return [(lo, lo + self.size - 1, lo, lo + self.size - 1)]


@_pytree(data=("prefix_len",), meta=("static_len",))
class PrefixLM(Mask):
  """kv <= q or kv < prefix_len (bidirectional prefix, causal after it)."""

  prefix_len: jax.Array | None  # int32 [Bt] when given as an array
  static_len: int | None  # when given as a Python int

  def _tokens(self):
    return ([] if self.prefix_len is None else [self.prefix_len[:, None]]), []

  def _length(self, qt):
    return self.static_len if self.prefix_len is None else next(qt)

  def _eval(self, qp, kp, qt, kt):
    return (kp <= qp) | (kp < self._length(qt))

  def _intervals(self, qp, xp):
    p = self.static_len if self.prefix_len is None else self.prefix_len[:, None]
    lo = xp.full(qp.shape, -BIG, qp.dtype)
    hi = xp.maximum(qp, p - 1)
    return [(lo, hi, lo, hi)]

  def _static(self):
    return self.prefix_len is None


@_pytree(data=("q_ids", "kv_ids"))
class Document(Mask):
  """q_ids[q] == kv_ids[kv] (packed sequences)."""

  q_ids: jax.Array  # int32 [Bt, q_len]
  kv_ids: jax.Array  # int32 [Bt, kv_len]

  def _tokens(self):
    return [self.q_ids], [self.kv_ids]

  def _eval(self, qp, kp, qt, kt):
    return next(qt) == next(kt)

  def _intervals(self, qp, xp):
    if xp is np:
      return None  # data-dependent: no static pattern
    # The allowed keys of query q are the positions holding id q_ids[q]: [first, last] of
    # them is exact when each id is one contiguous run (packing), a superset otherwise.
    bt = max(self.q_ids.shape[0], self.kv_ids.shape[0])
    q_ids = jnp.broadcast_to(self.q_ids, (bt, self.q_ids.shape[1]))
    kv_ids = jnp.broadcast_to(self.kv_ids, (bt, self.kv_ids.shape[1]))
    kv_len, q_len = kv_ids.shape[-1], q_ids.shape[-1]
    order = jnp.argsort(kv_ids, axis=-1, stable=True)
    sorted_ids = jnp.take_along_axis(kv_ids, order, axis=-1)

    def search(side):
      one = lambda s, v: jnp.searchsorted(s, v, side=side, method="scan_unrolled")  # noqa: E731
      return jax.vmap(one)(sorted_ids, q_ids)

    first, last = search("left"), search("right") - 1
    found = last >= first
    lo = jnp.take_along_axis(order, jnp.clip(first, 0, kv_len - 1), axis=-1)
    hi = jnp.take_along_axis(order, jnp.clip(last, 0, kv_len - 1), axis=-1)
    lo = jnp.where(found, lo, BIG).astype(jnp.int32)
    hi = jnp.where(found, hi, -BIG).astype(jnp.int32)
    contiguous = (hi - lo + 1) == (last - first + 1)
    ilo = jnp.where(contiguous, lo, BIG)
    ihi = jnp.where(contiguous, hi, -BIG)
    pad = qp.shape[-1] - q_len  # block padding of the query axis: rows allow nothing
    if pad:
      lo, hi, ilo, ihi = (jnp.pad(a, ((0, 0), (0, pad)), constant_values=c)
                          for a, c in ((lo, BIG), (hi, -BIG), (ilo, BIG), (ihi, -BIG)))
    return [(lo, hi, ilo, ihi)]

  def _static(self):
    return False

  def _check(self, q_len, kv_len):
    if self.q_ids.shape[-1] != q_len:
      raise ValueError(f"document(segment_ids): segment_ids has length {self.q_ids.shape[-1]} "
                       f"but q_len is {q_len}; pass ids of shape [batch, q_len]")
    if self.kv_ids.shape[-1] != kv_len:
      raise ValueError(f"document(...): kv_segment_ids has length {self.kv_ids.shape[-1]} but "
                       f"kv_len is {kv_len}; pass kv_segment_ids of shape [batch, kv_len] "
                       "when q_len != kv_len")


@_pytree(meta=("fn",))
class FromFn(Mask):
  """mask_fn(q_idx, kv_idx) -> bool, vectorized; evaluated tile by tile."""

  fn: Callable[[jax.Array, jax.Array], jax.Array]

  def _eval(self, qp, kp, qt, kt):
    out = self.fn(qp, kp)
    if jnp.result_type(out) != jnp.bool_:
      raise TypeError(f"from_fn: mask_fn must return bool, got {jnp.result_type(out)}")
    return out

  def _static(self):
    return False


# ---------------------------------------------------------------------------------------------
# Combinators


@_pytree(data=("a", "b"))
class And(Mask):
  a: Mask
  b: Mask

  def _tokens(self):
    (qa, ka), (qb, kb) = self.a._tokens(), self.b._tokens()
    return qa + qb, ka + kb

  def _eval(self, qp, kp, qt, kt):
    x = self.a._eval(qp, kp, qt, kt)
    return x & self.b._eval(qp, kp, qt, kt)

  def _intervals(self, qp, xp):
    ia, ib = self.a._intervals(qp, xp), self.b._intervals(qp, xp)
    if ia is None or ib is None or len(ia) * len(ib) > MAX_INTERVALS:
      return None
    return [tuple(f(x, y) for f, x, y in zip((xp.maximum, xp.minimum) * 2, s, t, strict=True))
            for s in ia for t in ib]

  def _static(self):
    return self.a._static() and self.b._static()

  def _check(self, q_len, kv_len):
    self.a._check(q_len, kv_len)
    self.b._check(q_len, kv_len)


@_pytree(data=("a", "b"))
class Or(And):

  def _eval(self, qp, kp, qt, kt):
    x = self.a._eval(qp, kp, qt, kt)
    return x | self.b._eval(qp, kp, qt, kt)

  def _intervals(self, qp, xp):
    ia, ib = self.a._intervals(qp, xp), self.b._intervals(qp, xp)
    if ia is None or ib is None or len(ia) + len(ib) > MAX_INTERVALS:
      return None
    return ia + ib


# ---------------------------------------------------------------------------------------------
# Public builders


def causal() -> Mask:
  """Causal mask: key kv is visible from query q iff kv <= q."""
  return Causal()


def sliding_window(left: int, right: int = 0) -> Mask:
  """Local window: q - left <= kv <= q + right (right=0 is causal with `left` keys of history).

  Any int bound works: bounds above 2^30 (e.g. `sys.maxsize`, "unbounded") are clamped to
  2^30, beyond every position (sequences are shorter than 2^30, see `check_lengths`).
  """
  for name, w in (("left", left), ("right", right)):
    if not isinstance(w, (int, np.integer)) or w < 0:
      raise ValueError(f"sliding_window: {name} must be an int >= 0, got {w!r}")
  return SlidingWindow(min(int(left), BIG), min(int(right), BIG))


def chunked(size: int) -> Mask:
  """Chunked attention: q // size == kv // size (combine with `causal()` for Llama 4 style)."""
  if not isinstance(size, (int, np.integer)) or size <= 0:
    raise ValueError(f"chunked: size must be a positive int, got {size!r}")
  return Chunked(min(int(size), BIG))  # a chunk of 2^30 holds every sequence


def prefix_lm(prefix_len: int | jax.Array) -> Mask:
  """Prefix-LM: kv <= q or kv < prefix_len; prefix_len is an int or an int array [batch]."""
  if isinstance(prefix_len, (int, np.integer)):
    if prefix_len < 0:
      raise ValueError(f"prefix_lm: prefix_len must be >= 0, got {prefix_len}")
    return PrefixLM(None, min(int(prefix_len), BIG))  # 2^30: the whole sequence
  try:
    p = jnp.asarray(prefix_len)
  except (TypeError, ValueError):
    p = None
  if p is None or not jnp.issubdtype(p.dtype, jnp.integer) or p.ndim > 1:
    got = f"{p.dtype}{list(p.shape)}" if p is not None else repr(prefix_len)
    raise ValueError(f"prefix_lm: prefix_len must be an int or an int array [batch], got {got}")
  return PrefixLM(p.reshape(-1).astype(jnp.int32), None)


def document(segment_ids: jax.Array, kv_segment_ids: jax.Array | None = None) -> Mask:
  """Packed documents: q attends to kv iff their segment ids are equal.

  segment_ids: int [batch, q_len] (or [q_len]); kv_segment_ids defaults to segment_ids.
  Blocks are skipped exactly when each id occupies one contiguous run (the packing layout,
  padding included); other layouts stay exact but skip fewer blocks.
  """
  def prep(ids, name):
    ids = jnp.asarray(ids)
    if not jnp.issubdtype(ids.dtype, jnp.integer) or ids.ndim not in (1, 2):
      raise ValueError(f"document: {name} must be an int array [batch, length], got "
                       f"{ids.dtype}{list(ids.shape)}")
    return (ids[None] if ids.ndim == 1 else ids).astype(jnp.int32)

  q_ids = prep(segment_ids, "segment_ids")
  kv_ids = q_ids if kv_segment_ids is None else prep(kv_segment_ids, "kv_segment_ids")
  if q_ids.shape[0] != kv_ids.shape[0] and 1 not in (q_ids.shape[0], kv_ids.shape[0]):
    raise ValueError(f"document: segment_ids batch {q_ids.shape[0]} != kv_segment_ids batch "
                     f"{kv_ids.shape[0]}")
  return Document(q_ids, kv_ids)


def from_fn(mask_fn: Callable[[jax.Array, jax.Array], jax.Array]) -> Mask:
  """Arbitrary mask from a vectorized `mask_fn(q_idx, kv_idx) -> bool` (int32 broadcastable).

  Block emptiness is found by evaluating tiles [block_q, kv_len] one query block at a time;
  the function is also traced into kernels, so use jnp elementwise ops only.
  """
  if not callable(mask_fn):
    raise TypeError(f"from_fn: mask_fn must be callable, got {mask_fn!r}")
  return FromFn(mask_fn)


# ---------------------------------------------------------------------------------------------
# Tokens: per-token int32 data laid out for kernels (row 0 is the position)


def token_arrays(mask: Mask, q_len: int, kv_len: int, *, q_pad: int = 0, kv_pad: int = 0,
                 kv_perm: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Returns q_tok int32 [Bt, 1 + nq_tok, q_len + q_pad], kv_tok int32 [Bt, Hk, 1 + nkv_tok, ...].

  Row 0 holds positions (the query index; the key's original position, i.e. kv_perm when keys
  were permuted per [batch, kv_head]); the other rows are the mask's per-token data, gathered
  by kv_perm. Padding slots hold position -1 and data 0.
  """
  qs, ks = mask._tokens()
  bt = max([a.shape[0] for a in qs + ks] + [1 if kv_perm is None else kv_perm.shape[0]])
  q_rows = [jnp.arange(q_len, dtype=jnp.int32)[None]] + [a.astype(jnp.int32) for a in qs]
  q_tok = jnp.stack([jnp.broadcast_to(a, (bt, q_len)) for a in q_rows], axis=1)
  if kv_perm is None:
    k_rows = [jnp.arange(kv_len, dtype=jnp.int32)[None]] + [a.astype(jnp.int32) for a in ks]
    kv_tok = jnp.stack([jnp.broadcast_to(a, (bt, kv_len)) for a in k_rows], axis=1)[:, None]
  else:
    perm = jnp.broadcast_to(kv_perm, (bt,) + kv_perm.shape[1:]).astype(jnp.int32)
    k_rows = [perm] + [jnp.take_along_axis(jnp.broadcast_to(a, (bt, kv_len))[:, None], perm, -1)
                       for a in ks]
    kv_tok = jnp.stack(k_rows, axis=2)
  q_tok = jnp.pad(q_tok, ((0, 0), (0, 0), (0, q_pad)), constant_values=0)
  q_tok = q_tok.at[:, 0, q_len:].set(-1)
  kv_tok = jnp.pad(kv_tok, ((0, 0), (0, 0), (0, 0), (0, kv_pad)), constant_values=0)
  kv_tok = kv_tok.at[:, :, 0, kv_len:].set(-1)
  return q_tok, kv_tok


def eval_tokens(mask: Mask, q_tok: Any, kv_tok: Any):
  """`allowed` from token rows: q_tok[..., r, :, :] (row r first after leading dims), kv_tok."""
  qt = iter([q_tok[..., r, :, :] for r in range(1, q_tok.shape[-3])])
  kt = iter([kv_tok[..., r, :, :] for r in range(1, kv_tok.shape[-3])])
  return mask._eval(q_tok[..., 0, :, :], kv_tok[..., 0, :, :], qt, kt)


def eval_rows(mask: Mask, q_rows: Sequence[Any], kv_rows: Sequence[Any]):
  """`allowed` from lists of token rows (position first), already broadcastable ([bq,1], [1,bk])."""
  return mask._eval(q_rows[0], kv_rows[0], iter(q_rows[1:]), iter(kv_rows[1:]))
