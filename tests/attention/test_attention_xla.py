"""XLA path (gathered blocks, custom VJP) and the dense reference, against independent masks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_helpers import (
    np_attention,
    np_attention_vjp,
    np_blocks,
    np_causal,
    np_chunked,
    np_document,
    np_prefix,
    np_sliding,
    packed_ids,
    rel_err,
)
from jax._src.ad_checkpoint import saved_residuals

import mpxla.attention as A
from mpxla.attention import reference, xla
from mpxla.attention.block_mask import make_block_mask

RNG = np.random.default_rng(1)
def hash_fn(q, k):
  return (q * 7919 + k * 104729) % 97 < 60  # pseudo-random, numpy and jnp


def _case(name):
  """(mask, numpy allowed [B|1, tq, tk], tq, tk)."""
  if name == "causal":
    return A.causal(), np_causal(77, 77)[None], 77, 77
  if name == "sliding_q_ne_kv":
    return A.sliding_window(11, 3), np_sliding(45, 83, 11, 3)[None], 45, 83
  if name == "chunked_causal":
    return A.chunked(20) & A.causal(), (np_chunked(70, 70, 20) & np_causal(70, 70))[None], 70, 70
  if name == "document_causal":
    ids = packed_ids(RNG, 2, 90, 4)
    return A.causal() & A.document(ids), np_document(ids, ids) & np_causal(90, 90), 90, 90
  if name == "prefix_lm":
    p = np.array([7, 40], np.int32)
    return A.prefix_lm(jnp.asarray(p)), np_prefix(64, 64, p), 64, 64
  if name == "random_fn":  # no static structure: dense mode
    t = np.arange(66)
    return A.from_fn(hash_fn), hash_fn(t[:, None], t[None])[None], 66, 66
  if name == "sliding_and_random_fn":  # sparse mode, mask evaluated tile by tile
    t = np.arange(66)
    return (A.sliding_window(20) & A.from_fn(hash_fn),
            (np_sliding(66, 66, 20, 0) & hash_fn(t[:, None], t[None]))[None], 66, 66)
  if name == "or_and_document":
    ids = packed_ids(RNG, 2, 80, 3)
    dense = (np_sliding(80, 80, 6, 0) | np_chunked(80, 80, 32)) & np_document(ids, ids)
    return (A.sliding_window(6) | A.chunked(32)) & A.document(ids), dense, 80, 80
  if name == "empty_rows":  # queries of segment 9 have no keys: output 0, no NaN
    q_ids = np.array([[0] * 20 + [9] * 13 + [1] * 17, [9] * 50], np.int32)
    kv_ids = np.array([[0] * 30 + [1] * 31, [0] * 61], np.int32)
    return (A.causal() & A.document(q_ids, kv_ids),
            np_document(q_ids, kv_ids) & np_causal(50, 61), 50, 61)
  raise ValueError(name)


NAMES = ["causal", "sliding_q_ne_kv", "chunked_causal", "document_causal", "prefix_lm",
         "random_fn", "sliding_and_random_fn", "or_and_document", "empty_rows"]


def _inputs(tq, tk, h=4, hk=2, d=16, b=2, dtype=jnp.float32, seed=0):
  r = np.random.default_rng(seed)
  def mk(*s):
    return jnp.asarray(r.normal(size=s), jnp.float32).astype(dtype)
  return mk(b, tq, h, d), mk(b, tk, hk, d), mk(b, tk, hk, d), mk(b, tq, h, d)


def _run(f, q, k, v, do):
  """(o, (dq, dk, dv)) of f in float32."""
  o, vjp = jax.vjp(f, q, k, v)
  return o.astype(jnp.float32), [g.astype(jnp.float32) for g in vjp(do.astype(o.dtype))]


def _compare(mask, allowed, tq, tk, *, dtype=jnp.float32, softcap=None, max_pairs=None, h=4,
             hk=2, expect_mode=None):
  """XLA path forward and gradients vs float64 numpy on the same (bf16-rounded) inputs."""
  q, k, v, do = _inputs(tq, tk, h=h, hk=hk, dtype=dtype)

  @jax.jit
  def run(q, k, v, do, mask):
    bm = make_block_mask(mask, tq, tk, block_q=16, block_kv=16, max_pairs=max_pairs)
    return _run(lambda q, k, v: xla.attention(q, k, v, bm, scale=0.3, softcap=softcap), q, k, v,
                do)

  if expect_mode is not None:
    assert xla.mode(make_block_mask(mask, tq, tk, block_q=16, block_kv=16,
                                    max_pairs=max_pairs)) == expect_mode
  o, grads = run(q, k, v, do, mask)
  def up(x):
    return np.asarray(x.astype(jnp.float32))
  o_ref, *grads_ref = np_attention_vjp(up(q), up(k), up(v), up(do), np.asarray(allowed)[:, None],
                                       0.3, softcap)
  tol_o, tol_g = (1e-5, 1e-5) if dtype == jnp.float32 else (5e-3, 1e-2)
  assert np.isfinite(o).all() and all(np.isfinite(g).all() for g in grads)
  assert rel_err(o, o_ref) <= tol_o
  for g, g_ref in zip(grads, grads_ref, strict=True):
    assert rel_err(g, g_ref) <= tol_g
  return o


@pytest.mark.parametrize("name", NAMES)
def test_xla_matches_dense_reference_f32(name):
  mask, allowed, tq, tk = _case(name)
  o = _compare(mask, allowed, tq, tk, softcap=20.0 if name == "causal" else None,
               hk=1 if name == "prefix_lm" else 2)  # prefix_lm: multi-query (one kv head)
  if name == "empty_rows":
    assert (np.asarray(o)[0, 20:33] == 0).all() and (np.asarray(o)[1] == 0).all()


@pytest.mark.parametrize("name", ["document_causal",
                                  pytest.param("sliding_q_ne_kv", marks=pytest.mark.slow)])
def test_xla_matches_dense_reference_bf16(name):
  mask, allowed, tq, tk = _case(name)
  o = _compare(mask, allowed, tq, tk, dtype=jnp.bfloat16)  # asserts errors vs the reference
  assert o.shape[1] == tq


@pytest.mark.parametrize("name", ["empty_rows", pytest.param("causal", marks=pytest.mark.slow),
                                  pytest.param("or_and_document", marks=pytest.mark.slow)])
def test_pairs_in_several_chunks_match_reference(name, monkeypatch):
  """Sparse mode with the pairs of a slice split into chunks of 4 (query rows whose pairs span
  chunks, padding pairs, rows without keys): the same forward and gradients."""
  monkeypatch.setattr(xla, "PAIR_CHUNK", 4)
  mask, allowed, tq, tk = _case(name)
  bm = make_block_mask(mask, tq, tk, block_q=16, block_kv=16)
  assert bm.max_pairs > 2 * xla.PAIR_CHUNK and bm.max_pairs % xla.PAIR_CHUNK
  o = _compare(mask, allowed, tq, tk, softcap=20.0 if name == "causal" else None,
               expect_mode="sparse")
  if name == "empty_rows":
    assert (np.asarray(o)[0, 20:33] == 0).all() and (np.asarray(o)[1] == 0).all()


def test_dense_mode_and_capacity_fallback():
  mask, allowed, tq, tk = _case("document_causal")
  ids = np.asarray(mask.b.q_ids)
  # Data-dependent mask without structure: the static bound is all pairs -> dense mode.
  _compare(A.document(ids), np_document(ids, ids), tq, tk, expect_mode="dense")
  # Capacity below the actual pair count: this call falls back to dense, still exact.
  _compare(mask, allowed, tq, tk, max_pairs=3, expect_mode="sparse")


def test_reference_matches_float64_numpy():
  mask, allowed, tq, tk = _case("or_and_document")
  q, k, v, _ = _inputs(tq, tk)
  got = reference.attention(q, k, v, mask=mask, scale=0.3, softcap=5.0)
  want = np_attention(q, k, v, allowed[:, None], 0.3, softcap=5.0)
  assert rel_err(got, want) <= 1e-6


def test_no_mask_is_plain_softmax_attention():
  q, k, v, _ = _inputs(40, 40, h=2, hk=2)
  got, want = jax.jit(lambda q, k, v: (A.attention(q, k, v, impl="xla"),
                                       jax.nn.dot_product_attention(q, k, v)))(q, k, v)
  assert rel_err(got, want) <= 1e-5


def test_saved_residuals_are_q_k_v_out_lse():
  """The custom VJP keeps q, k, v, the output and lse, never the probabilities."""
  tq = 64
  q, k, v, _ = _inputs(tq, tq, b=1)
  ids = jnp.asarray(packed_ids(RNG, 1, tq, 3))
  for max_pairs in (None, 1.0):  # sparse and dense modes

    def loss(q, k, v, ids, max_pairs=max_pairs):
      bm = make_block_mask(A.causal() & A.document(ids), tq, tq, block_q=16, block_kv=16,
                           max_pairs=max_pairs)
      return jnp.sum(xla.attention(q, k, v, bm, scale=0.25))

    res = saved_residuals(loss, q, k, v, ids)
    floats = sorted(tuple(a.shape) for a, _ in res if jnp.issubdtype(a.dtype, jnp.floating))
    assert floats == sorted([q.shape, k.shape, v.shape, q.shape, (1, 4, tq)]), floats
    others = [a for a, _ in res if not jnp.issubdtype(a.dtype, jnp.floating)]
    assert all(a.dtype in (jnp.int32, jnp.bool_) for a in others)
    assert all(a.size < tq * tq for a in others)


def test_cost_grows_with_nonempty_blocks():
  """Sparse mode gathers max_pairs block pairs; FLOPs scale with the window, not S^2."""
  s, h, d = 1024, 2, 32
  q = jnp.zeros((1, s, h, d))

  def flops(mask):
    bm = make_block_mask(mask, s, s, block_q=64, block_kv=64)
    lowered = jax.jit(lambda q: xla.attention(q, q, q, bm, scale=0.1)).lower(q)
    return lowered.cost_analysis()["flops"], bm.max_pairs

  f_small, p_small = flops(A.sliding_window(64))
  f_big, p_big = flops(A.sliding_window(256))
  f_dense = jax.jit(lambda q: jax.nn.dot_product_attention(q, q, q)).lower(q).cost_analysis()[
      "flops"]
  assert p_small == np_blocks(np_sliding(s, s, 64, 0)[None], 64, 64)[0].sum() == 31
  assert p_big == np_blocks(np_sliding(s, s, 256, 0)[None], 64, 64)[0].sum() == 70
  assert 0.8 < (f_big / f_small) / (p_big / p_small) < 1.25
  assert 0.8 < (f_big / f_dense) / (p_big / 16**2) < 1.25  # 70 of 256 block pairs
