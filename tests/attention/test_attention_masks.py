"""Mask builders and BlockMask construction against numpy definitions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_helpers import (
    np_blocks,
    np_causal,
    np_chunked,
    np_document,
    np_prefix,
    np_sliding,
    packed_ids,
)

import mpxla.attention as A
from mpxla.attention.block_mask import static_blocks

RNG = np.random.default_rng(0)
IDS = packed_ids(RNG, 2, 100, 5)
KV_IDS = packed_ids(RNG, 2, 77, 5)
# id 0 occupies two runs (not contiguous), ids 1 and 2 one run each
SHUFFLED = np.array([[0] * 40 + [1] * 30 + [0] * 30, [2] * 50 + [0] * 20 + [2] * 30], np.int32)
PREFIX = np.array([13, 60], np.int32)
def f_mod(q, k):
  return (q * 7 + k * 3) % 5 < 2  # numpy- and jnp-compatible


def _cases():
  """(name, mask, numpy dense [B|1, tq, tk], tq, tk)."""
  t = 100
  c = np_causal(t, t)[None]
  yield "causal", A.causal(), c, t, t
  yield "causal_q_ne_kv", A.causal(), np_causal(60, t)[None], 60, t
  yield "sliding", A.sliding_window(9, 4), np_sliding(t, t, 9, 4)[None], t, t
  yield "chunked", A.chunked(24), np_chunked(t, t, 24)[None], t, t
  yield "chunked_causal", A.chunked(24) & A.causal(), (np_chunked(t, t, 24) & c[0])[None], t, t
  yield "prefix_int", A.prefix_lm(30), np_prefix(t, t, 30), t, t
  yield "prefix_array", A.prefix_lm(jnp.asarray(PREFIX)), np_prefix(t, t, PREFIX), t, t
  yield "document", A.document(IDS), np_document(IDS, IDS), t, t
  yield "document_causal", A.causal() & A.document(IDS), np_document(IDS, IDS) & c, t, t
  yield "document_q_ne_kv", A.document(IDS, KV_IDS), np_document(IDS, KV_IDS), t, 77
  yield "document_shuffled", A.document(SHUFFLED), np_document(SHUFFLED, SHUFFLED), t, t
  yield "from_fn", A.from_fn(f_mod), f_mod(np.arange(t)[:, None], np.arange(t))[None], t, t
  yield ("causal_and_fn", A.causal() & A.from_fn(f_mod),
         (c[0] & f_mod(np.arange(t)[:, None], np.arange(t)))[None], t, t)
  yield ("sliding_or_chunked", A.sliding_window(5) | A.chunked(32),
         (np_sliding(t, t, 5, 0) | np_chunked(t, t, 32))[None], t, t)
  yield ("or_and_document", (A.sliding_window(5) | A.chunked(32)) & A.document(IDS),
         ((np_sliding(t, t, 5, 0) | np_chunked(t, t, 32)) & np_document(IDS, IDS)), t, t)
  yield ("causal_or_reverse", A.causal() | A.sliding_window(0, 200),  # union covers everything
         np.ones((1, t, t), bool), t, t)


CASES = list(_cases())


def test_dense_matches_definition():
  got_all = jax.jit(lambda masks: [
      m.dense(c[3], c[4]) for c, m in zip(CASES, masks, strict=True)])([c[1] for c in CASES])
  for (name, _, dense, _, _), got in zip(CASES, got_all, strict=True):
    got = np.asarray(got)
    np.testing.assert_array_equal(got, np.broadcast_to(dense, got.shape), err_msg=name)


BLOCKS = [(16, 16), (8, 32), (32, 8)]
LIST_CASES = [c + BLOCKS[i % 3] for i, c in enumerate(CASES)] + [
    c + (16, 16) for c in CASES if c[0] in ("document_causal", "from_fn", "or_and_document")]


@pytest.fixture(scope="module")
def built():
  """All BlockMasks of LIST_CASES with their block_any / block_all, from one jit."""

  @jax.jit
  def build(masks):
    out = []
    for (_, _, _, tq, tk, bq, bk), m in zip(LIST_CASES, masks, strict=True):
      bm = A.make_block_mask(m, tq, tk, block_q=bq, block_kv=bk)
      out.append((bm, bm.block_any(), bm.block_all()))
    return out

  return jax.tree.map(np.asarray, build([c[1] for c in LIST_CASES]))


@pytest.mark.parametrize("i", range(len(LIST_CASES)),
                         ids=[f"{c[0]}-{c[5]}x{c[6]}" for c in LIST_CASES])
def test_block_lists_match_numpy(built, i):
  name, mask, dense, tq, tk, bq, bk = LIST_CASES[i]
  bm, got_any, got_all = built[i]
  got_any, got_all = got_any[:, 0], got_all[:, 0]
  want_any, want_all = np_blocks(dense, bq, bk)
  if name == "document_shuffled":  # non-contiguous ids: conservative, never wrong
    assert (got_any >= want_any).all() and (got_all <= want_all).all()
  else:
    np.testing.assert_array_equal(got_any, np.broadcast_to(want_any, got_any.shape))
    np.testing.assert_array_equal(got_all, np.broadcast_to(want_all, got_all.shape))
  # The static bound covers every non-empty block.
  assert (static_blocks(mask, tq, tk, bq, bk)[None] | ~want_any).all()
  # List layout: ascending, padded with the last entry; transposed lists are the transpose.
  for num, idx in ((bm.kv_num_blocks, bm.kv_indices), (bm.full_kv_num_blocks, bm.full_kv_indices),
                   (bm.q_num_blocks, bm.q_indices), (bm.full_q_num_blocks, bm.full_q_indices)):
    num, idx = np.asarray(num), np.asarray(idx)
    for row_n, row in zip(num.reshape(-1), idx.reshape(-1, idx.shape[-1]), strict=True):
      assert (np.diff(row[:row_n]) > 0).all()
      assert (row[row_n:] == (row[row_n - 1] if row_n else 0)).all()
  # Transposed lists (for dK/dV) list exactly the transposed blocks.
  qn, qi = np.asarray(bm.q_num_blocks), np.asarray(bm.q_indices)
  fn, fi = np.asarray(bm.full_q_num_blocks), np.asarray(bm.full_q_indices)
  q_any = np.zeros(qn.shape[:1] + qn.shape[2:] + (-(-tq // bq),), bool)
  for b, j in np.ndindex(q_any.shape[:2]):
    q_any[b, j, qi[b, 0, j, :qn[b, 0, j]]] = True
    q_any[b, j, fi[b, 0, j, :fn[b, 0, j]]] = True
  np.testing.assert_array_equal(q_any, np.swapaxes(got_any, 1, 2))


def test_to_dense_is_the_mask():
  cases = [c for c in CASES if c[0] in ("causal_q_ne_kv", "document_causal", "or_and_document")]
  dense_all = jax.jit(lambda masks: [
      A.make_block_mask(m, c[3], c[4], block_q=16, block_kv=16).to_dense()
      for c, m in zip(cases, masks, strict=True)])([c[1] for c in cases])
  for (name, _, dense, _, _), got in zip(cases, dense_all, strict=True):
    got = np.asarray(got)[:, 0]
    np.testing.assert_array_equal(got, np.broadcast_to(dense, got.shape), err_msg=name)


def test_full_blocks_found_inside_a_contiguous_run():
  """Ids with a repeated (non-contiguous) id still get exact full blocks for the other ids."""
  got_any, got_all = jax.jit(lambda ids: (lambda bm: (bm.block_any(), bm.block_all()))(
      A.make_block_mask(A.document(ids), 100, 100, block_q=8, block_kv=8)))(SHUFFLED)
  want_any, want_all = np_blocks(np_document(SHUFFLED, SHUFFLED), 8, 8)
  got_any, got_all = np.asarray(got_any)[:, 0], np.asarray(got_all)[:, 0]
  assert got_all[0, 6, 6] and want_all[0, 6, 6]  # rows/cols 48..55 hold id 1 only
  assert (got_all <= want_all).all() and (got_any >= want_any).all()


def test_no_retrace_for_new_segment_ids_or_prefix():
  traces = []

  @jax.jit
  def f(ids, prefix, q):
    traces.append(1)
    mask = (A.causal() & A.document(ids)) | A.prefix_lm(prefix)
    bm = A.make_block_mask(mask, q.shape[1], q.shape[1], block_q=16, block_kv=16)
    return A.attention(q, q, q, mask=bm, impl="xla"), bm.block_any()

  q = jnp.ones((2, 64, 1, 8))
  outs = []
  for seed in range(3):
    r = np.random.default_rng(seed)
    outs.append(f(packed_ids(r, 2, 64, 4), r.integers(0, 64, size=2).astype(np.int32), q)[1])
  assert len(traces) == 1
  assert not all((np.asarray(outs[0]) == np.asarray(o)).all() for o in outs[1:])


def test_segment_ids_block_mask_is_linear_not_quadratic():
  """S = 32768: builds from index ranges (an S x S bool array would need 1 GiB)."""
  s = 32768
  ids = jnp.repeat(jnp.arange(64, dtype=jnp.int32), s // 64)[None]
  f = jax.jit(lambda ids: A.make_block_mask(A.causal() & A.document(ids), s, s))
  mem = f.lower(ids).compile().memory_analysis()
  assert mem.temp_size_in_bytes < 200 * 2**20
  bm = f(ids)
  # 64 documents of 512 tokens = 4 blocks: 10 (lower triangle incl. diagonal) per document.
  assert int(bm.block_any().sum()) == 64 * 10
  assert int(bm.block_all().sum()) == 64 * 6


@pytest.mark.parametrize("make,match", [
    (lambda: A.sliding_window(-1), "left"),
    (lambda: A.sliding_window(3, 1.5), "right"),
    (lambda: A.chunked(0), "size"),
    (lambda: A.prefix_lm(-2), "prefix_len"),
    (lambda: A.prefix_lm(jnp.ones((2, 2), jnp.int32)), "prefix_len"),
    (lambda: A.document(jnp.ones((2, 3, 4), jnp.int32)), "segment_ids"),
    (lambda: A.document(jnp.ones((2, 8))), "segment_ids"),
    (lambda: A.from_fn(3), "mask_fn"),
    (lambda: A.causal() & np.ones((4, 4), bool), "another mask"),
    (lambda: A.make_block_mask(A.document(jnp.zeros((1, 10), jnp.int32)), 12, 12), "q_len is 12"),
    (lambda: A.make_block_mask(A.document(jnp.zeros((1, 10), jnp.int32)), 10, 12),
     "kv_segment_ids"),
    (lambda: A.make_block_mask(A.causal(), 10, 10, block_q=0), "block_q"),
    (lambda: A.make_block_mask(A.causal(), 10, 10, block_kv=2.5), "block_kv"),
    (lambda: A.make_block_mask(A.causal(), 0, 10), "q_len"),
    (lambda: A.make_block_mask(A.causal(), 10, 10, max_pairs=-3), "max_pairs"),
    (lambda: A.make_block_mask("causal", 10, 10), "mask must be"),
])
def test_bad_input(make, match):
  with pytest.raises((ValueError, TypeError), match=match):
    make()


def test_from_fn_must_return_bool():
  with pytest.raises(TypeError, match="bool"):
    A.from_fn(lambda q, k: q - k).dense(4, 4)
