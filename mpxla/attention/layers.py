"""Llama-style attention layers (Flax Linen and NNX): q/k/v/o projections, rotary embeddings,
grouped-query heads and a mask argument, on top of `mpxla.attention.attention`.

    layer = Attention(num_heads=8, num_kv_heads=2, head_dim=64)          # Linen
    y = layer.apply(params, x, segment_ids=ids, positions=pos)           # x [B, T, E]
    layer = NNXAttention(512, num_heads=8, num_kv_heads=2, rngs=nnx.Rngs(0))
    y = layer(x, segment_ids=ids)

Both use the same parameters (kernels q [E, H*Dh], k/v [E, Hk*Dh], o [H*Dh, E]) and the same
function `attend`, so they give identical outputs for identical weights.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from mpxla.attention import masks as M
from mpxla.attention.api import attention
from mpxla.attention.block_mask import BlockMask


def rotary_embedding(x: jax.Array, positions: jax.Array, *, theta: float = 10000.0) -> jax.Array:
  """Rotary position embedding (Llama "rotate half" layout) of x [B, T, H, D] at positions [B, T].

  With half = D // 2 and f_i = theta^(-2i / D), pair (x_i, x_{i+half}) is rotated by angle
  positions * f_i: (x_i cos - x_{i+half} sin, x_{i+half} cos + x_i sin). Computed in float32.
  """
  d = x.shape[-1]
  if d % 2:
    raise ValueError(f"rotary_embedding needs an even head_dim, got {d}")
  positions = jnp.broadcast_to(positions, x.shape[:2])
  freq = theta ** (-jnp.arange(0, d // 2, dtype=jnp.float32) * 2.0 / d)
  angle = positions.astype(jnp.float32)[..., None, None] * freq  # [B, T, 1, half]
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def resolve_mask(mask: M.Mask | BlockMask | None, segment_ids: jax.Array | None,
                 causal: bool) -> M.Mask | BlockMask | None:
  """The layer's mask: `mask` (or causal() when causal=True) & document(segment_ids)."""
  if isinstance(mask, BlockMask):
    if segment_ids is not None:
      raise ValueError("pass segment_ids or a prebuilt BlockMask, not both: build the BlockMask "
                       "with document(segment_ids) in its mask")
    return mask
  if mask is not None and not isinstance(mask, M.Mask):
    raise TypeError(f"mask must be None, a mask or a BlockMask, got {type(mask).__name__}")
  if mask is None and causal:
    mask = M.causal()
  if segment_ids is not None:
    doc = M.document(segment_ids)
    mask = doc if mask is None else mask & doc
  return mask


def attend(q, k, v, *, positions, mask, segment_ids, rope_theta, causal, impl, block_q,
           block_kv, softcap, interpret):
  """Rotary embedding on q [B, T, H, Dh] and k, then masked attention."""
  if rope_theta is not None:
    pos = jnp.arange(q.shape[1], dtype=jnp.int32)[None] if positions is None else positions
    q = rotary_embedding(q, pos, theta=rope_theta)
    k = rotary_embedding(k, pos, theta=rope_theta)
  return attention(q, k, v, mask=resolve_mask(mask, segment_ids, causal), softcap=softcap,
                   impl=impl, block_q=block_q, block_kv=block_kv, interpret=interpret)


def _heads(num_heads, num_kv_heads, head_dim, features):
  num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
  if num_heads % num_kv_heads:
    raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads "
                     f"({num_kv_heads})")
  if head_dim is None:
    if features % num_heads:
      raise ValueError(f"features ({features}) must be a multiple of num_heads ({num_heads}) "
                       "or pass head_dim")
    head_dim = features // num_heads
  return num_kv_heads, head_dim


_LECUN = nn.initializers.lecun_normal()


class Attention(nn.Module):
  """Linen attention layer; config at construction, arrays at call.

  Attributes:
    num_heads, num_kv_heads (default num_heads), head_dim (default features // num_heads).
    rope_theta: rotary base; None disables rotary embeddings.
    causal: default mask when `mask` is not given at call.
    impl, block_q, block_kv, softcap, interpret: passed to `attention`.
    dtype: computation dtype; param_dtype: parameter dtype.
    dot_general: the projections' dot (e.g. an FP8 dot).
  """

  num_heads: int
  num_kv_heads: int | None = None
  head_dim: int | None = None
  rope_theta: float | None = 10000.0
  causal: bool = True
  impl: str = "auto"
  block_q: int = 128
  block_kv: int = 128
  softcap: float | None = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  use_bias: bool = False
  kernel_init: Callable = _LECUN
  dot_general: Callable = jax.lax.dot_general
  interpret: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, *, mask: M.Mask | BlockMask | None = None,
               segment_ids: jax.Array | None = None,
               positions: jax.Array | None = None) -> jax.Array:
    """x [B, T, E] -> [B, T, E]; segment_ids, positions int [B, T]."""
    b, t, e = x.shape
    hk, dh = _heads(self.num_heads, self.num_kv_heads, self.head_dim, e)

    def dense(n, name):
      return nn.Dense(n, use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype,
                      kernel_init=self.kernel_init, dot_general=self.dot_general, name=name)

    q = dense(self.num_heads * dh, "q")(x).reshape(b, t, self.num_heads, dh)
    k = dense(hk * dh, "k")(x).reshape(b, t, hk, dh)
    v = dense(hk * dh, "v")(x).reshape(b, t, hk, dh)
    y = attend(q, k, v, positions=positions, mask=mask, segment_ids=segment_ids,
               rope_theta=self.rope_theta, causal=self.causal, impl=self.impl,
               block_q=self.block_q, block_kv=self.block_kv, softcap=self.softcap,
               interpret=self.interpret)
    return dense(e, "o")(y.reshape(b, t, self.num_heads * dh))


class NNXAttention(nnx.Module):
  """NNX attention layer with the same parameters and call signature as `Attention`."""

  def __init__(self, features: int, num_heads: int, num_kv_heads: int | None = None,
               head_dim: int | None = None, *, rope_theta: float | None = 10000.0,
               causal: bool = True, impl: str = "auto", block_q: int = 128, block_kv: int = 128,
               softcap: float | None = None, dtype: Any = jnp.float32,
               param_dtype: Any = jnp.float32, use_bias: bool = False,
               kernel_init: Callable = _LECUN,
               dot_general: Callable = jax.lax.dot_general, interpret: bool = False,
               rngs: nnx.Rngs):
    self.num_heads = num_heads
    self.num_kv_heads, self.head_dim = _heads(num_heads, num_kv_heads, head_dim, features)
    self.rope_theta, self.causal, self.impl = rope_theta, causal, impl
    self.block_q, self.block_kv = block_q, block_kv
    self.softcap, self.interpret = softcap, interpret

    def dense(i, o):
      return nnx.Linear(i, o, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                        kernel_init=kernel_init, dot_general=dot_general, rngs=rngs)

    self.q = dense(features, num_heads * self.head_dim)
    self.k = dense(features, self.num_kv_heads * self.head_dim)
    self.v = dense(features, self.num_kv_heads * self.head_dim)
    self.o = dense(num_heads * self.head_dim, features)

  def __call__(self, x: jax.Array, *, mask: M.Mask | BlockMask | None = None,
               segment_ids: jax.Array | None = None,
               positions: jax.Array | None = None) -> jax.Array:
    """x [B, T, E] -> [B, T, E]; segment_ids, positions int [B, T]."""
    b, t, _ = x.shape
    h, hk, dh = self.num_heads, self.num_kv_heads, self.head_dim
    y = attend(self.q(x).reshape(b, t, h, dh), self.k(x).reshape(b, t, hk, dh),
               self.v(x).reshape(b, t, hk, dh), positions=positions, mask=mask,
               segment_ids=segment_ids, rope_theta=self.rope_theta, causal=self.causal,
               impl=self.impl, block_q=self.block_q, block_kv=self.block_kv,
               softcap=self.softcap, interpret=self.interpret)
    return self.o(y.reshape(b, t, h * dh))


NnxAttention = NNXAttention  # the earlier spelling
