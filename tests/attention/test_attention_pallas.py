"""Pallas GPU (Triton) and TPU (Mosaic) kernels in interpret mode on CPU, plus lowering checks.

Each kernel must give the dense result and visit exactly the non-empty blocks: the debug
outputs list, per program, the key (or query) blocks it executed.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_helpers import (
    np_attention_vjp,
    np_blocks,
    np_causal,
    np_document,
    np_sliding,
    packed_ids,
    rel_err,
)

import mpxla.attention as A
from mpxla.attention import _kernel_common as C
from mpxla.attention import pallas_gpu, pallas_tpu
from mpxla.attention.block_mask import make_block_mask

RNG = np.random.default_rng(2)
KERNELS = {"gpu": pallas_gpu, "tpu": pallas_tpu}


def _inputs(b, tq, tk, h, hk, d, dtype, seed=0):
  r = np.random.default_rng(seed)
  def mk(*s):
    return jnp.asarray(r.normal(size=s), jnp.float32).astype(dtype)
  return mk(b, tq, h, d), mk(b, tk, hk, d), mk(b, tk, hk, d), mk(b, tq, h, d)


def _check_visits(visits, blk_any):
  """visits [B, H, rows, n] (-1 padded) list exactly the blocks blk_any[B|1, rows, cols] marks."""
  visits = np.asarray(visits)
  for b, h, i in np.ndindex(visits.shape[:3]):
    got = visits[b, h, i][visits[b, h, i] >= 0]
    want = np.nonzero(blk_any[min(b, blk_any.shape[0] - 1), i])[0]
    assert len(got) == len(set(got.tolist()))  # each block once
    np.testing.assert_array_equal(np.sort(got), want)


def _run_kernel(kernel, mask, allowed, b, tq, tk, h, hk, d, bq, bk, dtype=jnp.float32,
                softcap=None):
  q, k, v, do = _inputs(b, tq, tk, h, hk, d, dtype)
  cfg = C.Cfg(0.35, softcap, True, True)

  @jax.jit
  def run(q, k, v, do, mask):
    bm = make_block_mask(mask, tq, tk, block_q=bq, block_kv=bk)
    o, lse, fwd_visits = kernel.forward(q, k, v, bm, cfg)
    dq, dk, dv, dq_visits, dkv_visits = kernel.backward(q, k, v, o, lse, do, bm, cfg)
    return o, (dq, dk, dv), (fwd_visits, dq_visits, dkv_visits)

  o, grads, visits = run(q, k, v, do, mask)
  def up(x):
    return np.asarray(x.astype(jnp.float32))
  o_ref, *grads_ref = np_attention_vjp(up(q), up(k), up(v), up(do), allowed[:, None], 0.35,
                                       softcap)
  tol_o, tol_g = (1e-5, 1e-5) if dtype == jnp.float32 else (5e-3, 1e-2)
  assert rel_err(up(o), o_ref) <= tol_o
  for g, g_ref in zip(grads, grads_ref, strict=True):
    assert np.isfinite(up(g)).all() and rel_err(up(g), g_ref) <= tol_g
  blk_any, _ = np_blocks(allowed, bq, bk)
  _check_visits(visits[0], blk_any)
  _check_visits(visits[1], blk_any)
  _check_visits(visits[2], np.swapaxes(blk_any, 1, 2))
  return up(o)


def _document_case(tq, tk):
  q_ids = packed_ids(RNG, 2, tq, 3)
  q_ids[1, : tq // 3] = 7  # segment 7 has no keys in batch 1: fully masked rows
  kv_ids = packed_ids(RNG, 2, tk, 3)
  mask = A.causal() & A.document(q_ids, kv_ids)
  return mask, np_document(q_ids, kv_ids) & np_causal(tq, tk)


@pytest.mark.parametrize("name", ["gpu", "tpu"])
def test_kernel_document_causal_gqa_odd_lengths(name):
  """q_len != kv_len, not multiples of the blocks, GQA, softcap, empty rows; f32."""
  tq, tk = 45, 70
  mask, allowed = _document_case(tq, tk)
  o = _run_kernel(KERNELS[name], mask, allowed, 2, tq, tk, h=4, hk=2, d=16, bq=16, bk=16,
                  softcap=10.0)
  assert (o[1, : tq // 3] == 0).all()


def test_gpu_kernel_sliding_window_bf16():
  t = 96
  # _run_kernel asserts forward and gradient errors against the dense reference.
  o = _run_kernel(pallas_gpu, A.sliding_window(20, 5), np_sliding(t, t, 20, 5)[None], 1, t, t,
                  h=2, hk=1, d=32, bq=16, bk=32, dtype=jnp.bfloat16)
  assert o.shape == (1, t, 2, 32)


@pytest.mark.slow
def test_tpu_kernel_sliding_window_bf16():
  t = 96
  # _run_kernel asserts forward and gradient errors against the dense reference.
  o = _run_kernel(pallas_tpu, A.sliding_window(20, 5), np_sliding(t, t, 20, 5)[None], 1, t, t,
                  h=2, hk=1, d=32, bq=16, bk=32, dtype=jnp.bfloat16)
  assert o.shape == (1, t, 2, 32)


def test_gpu_kernel_with_permuted_keys_matches_xla():
  """Per-head BlockMask with kv_perm (from permute_kv): kernel == XLA path == reference."""
  b, t, h, hk, d = 1, 64, 2, 1, 16
  q, k, v, _ = _inputs(b, t, t, h, hk, d, jnp.float32, seed=3)

  @jax.jit
  def run(q, k, v):
    p = A.permute_kv(q, k, v, A.causal(), block_q=16, block_kv=16, segment=32, threshold=0.6)
    def attend(impl):
      return A.attention(q, p.k, p.v, mask=p.block_mask, impl=impl, interpret=True)
    return p.block_mask, attend("pallas_gpu"), attend("xla"), attend("reference")

  bm, got, got_xla, want = run(q, k, v)
  assert bm.kv_num_blocks.shape[:2] == (b, h) and bm.selected
  assert float(bm.density().mean()) < 0.9 * float(  # the selection dropped blocks
      make_block_mask(A.causal(), t, t, block_q=16, block_kv=16).density().mean())
  assert rel_err(got, want) <= 1e-5
  assert rel_err(got_xla, want) <= 1e-5


def _lower(kernel, platform, bq, bk):
  b, t, h, hk, d = 1, 256, 4, 2, 64
  q = jnp.zeros((b, t, h, d), jnp.bfloat16)
  k = jnp.zeros((b, t, hk, d), jnp.bfloat16)
  ids = jnp.zeros((b, t), jnp.int32)

  def loss_grads(q, k, v, ids):
    bm = make_block_mask(A.causal() & A.document(ids), t, t, block_q=bq, block_kv=bk)
    def f(q, k, v):
      return kernel.attention(q, k, v, bm, scale=0.125, softcap=30.0)
    return jax.grad(lambda *a: f(*a).astype(jnp.float32).sum(), (0, 1, 2))(q, k, v)

  return jax.jit(loss_grads).trace(q, k, k, ids).lower(lowering_platforms=(platform,)).as_text()


def test_gpu_kernels_lower_to_triton():
  """Forward, dQ and dK/dV kernels pass the Pallas -> Triton lowering (no GPU needed)."""
  text = _lower(pallas_gpu, "cuda", 64, 64)
  assert text.count("__gpu$xla.gpu.triton") == 3


def test_tpu_kernels_lower_to_mosaic():
  """Forward, dQ and dK/dV kernels pass the Pallas -> Mosaic lowering (no TPU needed)."""
  text = _lower(pallas_tpu, "tpu", 128, 128)
  assert text.count("tpu_custom_call") == 3


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU: compiles and runs the "
                    "Triton kernels (interpret mode is tested above)")
def test_gpu_kernel_on_device():
  t = 512
  q, k, v, _ = _inputs(1, t, t, 4, 2, 64, jnp.bfloat16)
  got = A.attention(q, k, v, mask=A.causal(), impl="pallas_gpu", block_q=64, block_kv=64)
  want = A.attention(q, k, v, mask=A.causal(), impl="reference")
  assert rel_err(got.astype(jnp.float32), want.astype(jnp.float32)) <= 1e-2


@pytest.mark.skipif(jax.default_backend() != "tpu", reason="needs a TPU: compiles and runs the "
                    "Mosaic kernels (interpret mode is tested above)")
def test_tpu_kernel_on_device():
  t = 512
  q, k, v, _ = _inputs(1, t, t, 4, 2, 128, jnp.bfloat16)
  got = A.attention(q, k, v, mask=A.causal(), impl="pallas_tpu")
  want = A.attention(q, k, v, mask=A.causal(), impl="reference")
  assert rel_err(got.astype(jnp.float32), want.astype(jnp.float32)) <= 1e-2


def test_kernel_block_size_errors():
  bm = make_block_mask(A.causal(), 64, 64, block_q=24, block_kv=16)
  q = jnp.zeros((1, 64, 2, 16))
  with pytest.raises(ValueError, match="block_q a power of two"):
    A.attention(q, q, q, mask=bm, impl="pallas_gpu", interpret=True)
  with pytest.raises(ValueError, match="block_kv % 128"):
    A.attention(q, q, q, mask=A.causal(), impl="pallas_tpu", block_q=16, block_kv=64)
