"""Token permutation and block selection."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_helpers import np_attention_vjp, np_blocks, np_causal, rel_err

import mpxla.attention as A
from mpxla.attention.block_mask import classify


def _inputs(b, t, h, hk, d, seed=0):
  r = np.random.default_rng(seed)
  def mk(*s):
    return jnp.asarray(r.normal(size=s), jnp.float32)
  return mk(b, t, h, d), mk(b, t, hk, d), mk(b, t, hk, d), mk(b, t, h, d)


def test_full_threshold_with_permutation_is_exact_causal_attention():
  """threshold=1 keeps every allowed block: permuting keys must not change the result."""
  b, t, h, hk, d = 2, 100, 4, 2, 16
  q, k, v, do = _inputs(b, t, h, hk, d)

  @jax.jit
  def run(q, k, v, do):
    def f(q, k, v):
      return A.sparse_attention(q, k, v, A.causal(), block_q=16, block_kv=16, segment=32,
                                threshold=1.0, impl="xla")
    o, vjp = jax.vjp(f, q, k, v)
    return o, vjp(do)

  o, grads = run(q, k, v, do)
  o_ref, *grads_ref = np_attention_vjp(q, k, v, do, np_causal(t, t), d ** -0.5)
  assert rel_err(o, o_ref) <= 1e-5
  for g, g_ref in zip(grads, grads_ref, strict=True):
    assert rel_err(g, g_ref) <= 1e-5


def test_permutation_and_selection_structure():
  b, t, h, hk, d = 1, 128, 4, 2, 16
  q, k, v, _ = _inputs(b, t, h, hk, d, seed=1)
  def pk(thr, est="pooled"):
    return A.permute_kv(q, k, v, A.causal(), block_q=16, block_kv=16,
                                                segment=64, threshold=thr, estimate=est)

  @jax.jit
  def run(q, k, v):
    p, p9, pt = pk(0.5), pk(0.9), pk(0.5, "tokens")
    return (p, p.block_mask.block_any(), p9.block_mask.block_any(),
            classify(A.causal(), t, t, 16, 16, kv_perm=p.perm)[0], pt.block_mask.block_any())

  p, sel, sel9, allowed, sel_tok = run(q, k, v)
  perm = np.asarray(p.perm)
  for hh in range(hk):
    for s0 in range(0, t, 64):
      np.testing.assert_array_equal(np.sort(perm[0, hh, s0:s0 + 64]), np.arange(s0, s0 + 64))
  np.testing.assert_array_equal(np.asarray(p.k)[0, :, 1], np.asarray(k)[0, perm[0, 1], 1])
  np.testing.assert_array_equal(np.asarray(p.v)[0, :, 0], np.asarray(v)[0, perm[0, 0], 0])
  sel = np.asarray(sel)[0]  # [H, nq, nk]
  allowed = np.repeat(np.asarray(allowed)[0], h // hk, axis=0)
  sel_tok = np.asarray(sel_tok)[0]
  assert (sel <= allowed).all() and (sel_tok <= allowed).all()
  assert sel[:, :, 0].all() and sel_tok[:, :, 0].all()  # first key block always kept
  # Diagonal: the key blocks holding the query block's own positions.
  kv_pos = np.repeat(perm[0], h // hk, axis=0).reshape(h, 8, 16)
  for hh, i in np.ndindex(h, 8):
    holds = [(kv_pos[hh, j] // 16 == i).any() for j in range(8)]
    assert all(sel[hh, i, j] for j in range(8) if holds[j])
  # A higher threshold selects a superset.
  sel9 = np.asarray(sel9)[0]
  assert (sel9 >= sel).all() and sel9.sum() > sel.sum()


def test_permutation_gathers_heavy_hitters():
  """3% heavy-hitter keys scattered over the sequence: after permuting within segments of 4
  blocks, far fewer key blocks hold 97% of the attention mass."""
  t, d, bs, seg = 512, 16, 32, 128
  r = np.random.default_rng(4)
  u = r.normal(size=d) / np.sqrt(d)
  heavy = r.random(t) < 0.03
  k = r.normal(size=(1, t, 1, d)) * 0.3 + heavy[None, :, None, None] * u * 6
  q = r.normal(size=(1, t, 1, d)) * 0.3 + u * 6
  q, k = jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32)

  def blocks_needed(perm):
    """Mean over query blocks of the key blocks needed for 97% of the attention mass."""
    s = np.einsum("qd,kd->qk", np.asarray(q)[0, :, 0], np.asarray(k)[0, perm, 0]) * d ** -0.5
    prob = np.exp(s - s.max(-1, keepdims=True))
    prob /= prob.sum(-1, keepdims=True)
    mass = prob.reshape(t // bs, bs, t // bs, bs).sum((1, 3)) / bs  # [nq, nk]
    srt = -np.sort(-mass, axis=-1)
    return (np.cumsum(srt, -1) < 0.97).sum(-1).mean() + 1

  p = jax.jit(lambda q, k: A.permute_kv(q, k, k, None, block_q=bs, block_kv=bs, segment=seg))(
      q, k)
  base = blocks_needed(np.arange(t))
  permuted = blocks_needed(np.asarray(p.perm)[0, 0])
  # ~11 of 16 blocks hold a heavy hitter; after permutation ~1 block per segment of 4 does.
  assert permuted * 2 < base, (base, permuted)


@pytest.mark.parametrize("kwargs,match", [
    (dict(segment=40), "segment"),
    (dict(threshold=0.0), "threshold"),
    (dict(threshold=1.5), "threshold"),
    (dict(estimate="max"), "estimate"),
])
def test_bad_input(kwargs, match):
  q = jnp.zeros((1, 64, 2, 8))
  with pytest.raises(ValueError, match=match):
    A.permute_kv(q, q, q, A.causal(), block_q=16, block_kv=16, **kwargs)


def test_bad_blocks_and_mask_batch_are_named():
  q = jnp.zeros((2, 64, 2, 8))
  for kw, match in ((dict(block_q=0), "block_q"), (dict(block_kv=0), "block_kv"),
                    (dict(block_kv=-16), "block_kv"), (dict(block_q=-16), "block_q")):
    with pytest.raises(ValueError, match=match):
      A.permute_kv(q, q, q, A.causal(), segment=32, **{"block_q": 16, "block_kv": 16, **kw})
  with pytest.raises(ValueError, match="mask data has batch 3 but q has batch 2"):
    A.permute_kv(q, q, q, A.prefix_lm(jnp.array([1, 2, 3])), block_q=16, block_kv=16,
                 segment=32)


def test_selected_lists_match_numpy_blocks_of_to_dense():
  """The BlockMask's to_dense (the computed pattern) agrees with its lists, block by block."""
  b, t, h, hk, d = 1, 80, 2, 1, 8
  q, k, v, _ = _inputs(b, t, h, hk, d, seed=5)
  p, dense = jax.jit(lambda q, k, v: (lambda p: (p, p.block_mask.to_dense(h)))(A.permute_kv(
      q, k, v, A.causal(), block_q=16, block_kv=16, segment=32, threshold=0.7)))(q, k, v)
  dense = np.asarray(dense)[0]  # [H, t, t]
  blk_any, blk_all = np_blocks(dense, 16, 16)
  lists_any = np.asarray(p.block_mask.block_any())[0]
  lists_all = np.asarray(p.block_mask.block_all())[0]
  assert (blk_any <= lists_any).all()  # listed blocks may end up empty only via the mask
  np.testing.assert_array_equal(blk_all, lists_all)
