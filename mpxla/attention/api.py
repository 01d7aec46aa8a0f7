"""`attention(q, k, v, mask=..., impl=...)`: one entry point for every implementation."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mpxla.attention import masks as M
from mpxla.attention import pallas_gpu, pallas_tpu, reference, xla
from mpxla.attention.block_mask import BlockMask, make_block_mask
from mpxla.quant.sharding import auto_regroup, per_batch_shard

IMPLS = ("auto", "xla", "pallas_gpu", "pallas_tpu", "reference")


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: M.Mask | BlockMask | None = None,
              scale: float | None = None, softcap: float | None = None, impl: str = "auto",
              block_q: int = 128, block_kv: int = 128, max_pairs: int | float | None = None,
              interpret: bool = False) -> jax.Array:
  """Block-sparse attention: softmax(mask(scale * q k^T)) v, differentiable.

  Args:
    q: [batch, q_len, heads, head_dim].
    k, v: [batch, kv_len, kv_heads, head_dim]; kv_heads divides heads (grouped-query).
    mask: None (all keys), a mask (`causal() & document(ids)`, ...) or a prebuilt BlockMask
      (reuse it across layers). Fully masked rows give 0.
    scale: score scale, default head_dim ** -0.5.
    softcap: if set, scores become softcap * tanh(scores / softcap).
    impl: 'xla' (gathered blocks; CPU path and fallback), 'pallas_gpu', 'pallas_tpu',
      'reference' (dense), or 'auto': the Pallas kernel of the default backend on GPU/TPU,
      'xla' elsewhere (which computes densely when the mask's block density is high).
    block_q, block_kv: block sizes when `mask` is not already a BlockMask; the XLA path's
      dense mode handles block_q query rows at a time (also with mask=None).
    max_pairs: XLA-path capacity (see `make_block_mask`).
    interpret: run the Pallas kernels in interpret mode (CPU).

  Returns:
    [batch, q_len, heads, head_dim] in q's dtype. Zero-size inputs: batch, q_len, heads or
    head_dim 0 give the empty array of that shape; kv_len 0 (no keys) gives zeros, as a fully
    masked row. Gradients are zero (empty) then too.
  """
  _check_inputs(q, k, v, scale, softcap, impl)
  if not (mask is None or isinstance(mask, M.Mask | BlockMask)):
    raise TypeError(f"mask must be None, a mask (causal(), document(ids), ...) or a BlockMask, "
                    f"got {type(mask).__name__}")
  if q.size == 0 or k.size == 0:  # nothing to attend to, or an empty output
    return jnp.zeros_like(q)
  kw = dict(scale=scale, softcap=softcap, impl=impl, block_q=block_q, block_kv=block_kv,
            max_pairs=max_pairs, interpret=interpret)
  # On Explicit meshes the blocking reshapes run with Auto axes; o keeps q's sharding.
  return auto_regroup(lambda q, k, v, mask: _attention(q, k, v, mask, **kw), q, k, v, mask,
                      out_specs=jax.typeof(q).sharding.spec)


def _attention(q, k, v, mask, *, scale, softcap, impl, block_q, block_kv, max_pairs, interpret):
  b, tq, h, d = q.shape
  tk, hk = k.shape[1], k.shape[2]
  scale = d ** -0.5 if scale is None else float(scale)
  if impl == "auto":
    backend = jax.default_backend()
    impl = {"gpu": "pallas_gpu", "tpu": "pallas_tpu"}.get(backend, "xla")
  if impl == "reference":
    if isinstance(mask, BlockMask):
      _check_block_mask(mask, b, tq, tk, h, hk)
    elif mask is not None:
      _check_mask(mask, b, tq, tk)
    return reference.attention(q, k, v, mask=mask, scale=scale, softcap=softcap)
  if impl == "xla" and mask is None:
    return xla.attention(q, k, v, None, scale=scale, softcap=softcap, block_q=block_q)
  bq, bk = (mask.block_q, mask.block_kv) if isinstance(mask, BlockMask) else (block_q, block_kv)
  if impl == "pallas_gpu":
    pallas_gpu.check_blocks(bq, bk)
  elif impl == "pallas_tpu":
    pallas_tpu.check_blocks(bq, bk, interpret)
  if isinstance(mask, BlockMask):
    bm = mask
  else:
    if mask is not None:
      _check_mask(mask, b, tq, tk)
    bm = make_block_mask(mask, tq, tk, block_q=block_q, block_kv=block_kv, max_pairs=max_pairs)
  _check_block_mask(bm, b, tq, tk, h, hk)
  if impl == "xla":
    return xla.attention(q, k, v, bm, scale=scale, softcap=softcap)
  kernel = (pallas_gpu if impl == "pallas_gpu" else pallas_tpu).attention
  return per_batch_shard(  # a kernel is one custom call: per batch shard, not replicated
      lambda q, k, v, bm: kernel(q, k, v, bm, scale=scale, softcap=softcap,
                                 interpret=interpret), q, k, v, bm, batch=b)


def _check_inputs(q, k, v, scale, softcap, impl):
  for name, x in (("q", q), ("k", k), ("v", v)):
    if getattr(x, "ndim", None) != 4:
      raise ValueError(f"{name} must be [batch, seq_len, heads, head_dim], got shape "
                       f"{getattr(x, 'shape', type(x).__name__)}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"{name} must be a floating-point array, got {x.dtype}")
  if k.shape != v.shape:
    raise ValueError(f"k and v must have the same shape, got k {k.shape} and v {v.shape}")
  if not q.dtype == k.dtype == v.dtype:
    raise ValueError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}; "
                     "cast them first")
  if q.shape[0] != k.shape[0]:
    raise ValueError(f"q batch {q.shape[0]} != k/v batch {k.shape[0]}")
  if q.shape[3] != k.shape[3]:
    raise ValueError(f"q head_dim {q.shape[3]} != k/v head_dim {k.shape[3]}")
  if q.shape[2] % k.shape[2]:
    raise ValueError(f"heads ({q.shape[2]}) must be a multiple of kv_heads ({k.shape[2]}) "
                     "for grouped-query attention")
  if impl not in IMPLS:
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
  if scale is not None and not float(scale) > 0:
    raise ValueError(f"scale must be > 0, got {scale}")
  if softcap is not None and not float(softcap) > 0:
    raise ValueError(f"softcap must be > 0 or None, got {softcap}")


def _check_mask(mask: M.Mask, b, tq, tk):
  if not isinstance(mask, M.Mask):
    raise TypeError(f"mask must be None, a mask (causal(), document(ids), ...) or a BlockMask, "
                    f"got {type(mask).__name__}")
  M.check_lengths(tq, tk)
  mask._check(tq, tk)
  if mask.batch_size not in (1, b):
    raise ValueError(f"mask data has batch {mask.batch_size} but q has batch {b}")


def _check_block_mask(bm: BlockMask, b, tq, tk, h, hk):
  if (bm.q_len, bm.kv_len) != (tq, tk):
    raise ValueError(f"BlockMask was built for q_len={bm.q_len}, kv_len={bm.kv_len} but q/k "
                     f"have q_len={tq}, kv_len={tk}; rebuild it with make_block_mask")
  bm_b, bm_h = bm.kv_num_blocks.shape[:2]
  if bm_b not in (1, b) or bm_h not in (1, h):
    raise ValueError(f"BlockMask has [batch, heads] = [{bm_b}, {bm_h}]; expected 1 or {b} "
                     f"and 1 or {h}")
  if bm.mask.batch_size not in (1, b):
    raise ValueError(f"mask data has batch {bm.mask.batch_size} but q has batch {b}")
  if bm.kv_perm is not None:
    pb, ph = bm.kv_perm.shape[:2]
    if pb not in (1, b) or ph not in (1, hk) or (ph > 1 and bm_h != h):
      raise ValueError(f"BlockMask kv_perm has [batch, kv_heads] = [{pb}, {ph}]; expected "
                       f"1 or {b} and 1 or {hk}, with per-head lists when kv_heads > 1")
