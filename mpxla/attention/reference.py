"""Dense reference attention: the whole [q_len, kv_len] score matrix, plain autodiff.

    o = softmax(where(mask, scale * q k^T (softcapped), -inf)) v,  fully masked rows -> 0

Computed in float32 from the inputs' values; the result is cast to q's dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mpxla.attention import masks as M
from mpxla.attention.block_mask import BlockMask


def dense_mask(mask: M.Mask | BlockMask | None, q_len: int, kv_len: int,
               num_heads: int) -> jax.Array | None:
  """bool [B', H', q_len, kv_len] (broadcastable to [batch, heads, ...]) or None.

  `mask` may also be such a boolean array already.
  """
  if mask is None:
    return None
  if not isinstance(mask, (M.Mask, BlockMask)):
    allowed = jnp.asarray(mask)
    if allowed.dtype != jnp.bool_ or allowed.ndim != 4 or allowed.shape[2:] != (q_len, kv_len):
      raise ValueError(f"a dense mask must be bool [B, H, {q_len}, {kv_len}], got "
                       f"{allowed.dtype}{list(allowed.shape)}")
    return allowed
  if isinstance(mask, BlockMask):
    return mask.to_dense(num_heads)
  return mask.dense(q_len, kv_len)[:, None]


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
              mask: M.Mask | BlockMask | jax.Array | None = None, scale: float | None = None,
              softcap: float | None = None) -> jax.Array:
  """Dense attention [B, Tq, H, D]; k, v [B, Tk, Hk, D] with H a multiple of Hk."""
  b, tq, h, d = q.shape
  tk, hk = k.shape[1], k.shape[2]
  dtype = q.dtype
  scale = d ** -0.5 if scale is None else scale
  q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
  kk = jnp.repeat(k, h // hk, axis=2)
  vv = jnp.repeat(v, h // hk, axis=2)
  s = jnp.einsum("bqhd,bkhd->bhqk", q, kk, precision="highest") * scale
  if softcap is not None:
    s = softcap * jnp.tanh(s / softcap)
  allowed = dense_mask(mask, tq, tk, h)
  if allowed is not None:
    s = jnp.where(allowed, s, -jnp.inf)
  m = jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
  p = jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0))
  den = jnp.sum(p, axis=-1, keepdims=True)
  o = jnp.einsum("bhqk,bkhd->bqhd", p / jnp.where(den == 0, 1.0, den), vv, precision="highest")
  return o.astype(dtype)
