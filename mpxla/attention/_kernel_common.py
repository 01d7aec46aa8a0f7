"""Pieces shared by the Pallas kernels: padding, list packing and the per-tile math."""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from mpxla.attention import masks as M
from mpxla.attention.block_mask import BlockMask
from mpxla.attention.xla import name_residuals
from mpxla.quant.tracing import zero_cotangent


class Cfg(NamedTuple):
  """Static kernel configuration."""

  scale: float
  softcap: float | None
  interpret: bool
  debug: bool  # extra output: the key (or query) blocks each program visited, in order


def pad_seq(x: jax.Array, n: int) -> jax.Array:
  """Pads axis 1 of [B, T, H, D] to n."""
  return jnp.pad(x, ((0, 0), (0, n - x.shape[1]), (0, 0), (0, 0)))


def packed_lists(num_p, idx_p, num_f, idx_f) -> jax.Array:
  """int32 [Bm, Hm, n, 2 + 2L]: [#partial, #full, partial indices (L), full indices (L)]."""
  return jnp.concatenate([num_p[..., None], num_f[..., None], idx_p, idx_f], axis=-1)


def kv_lists(bm: BlockMask) -> jax.Array:
  return packed_lists(bm.kv_num_blocks, bm.kv_indices, bm.full_kv_num_blocks, bm.full_kv_indices)


def q_lists(bm: BlockMask) -> jax.Array:
  return packed_lists(bm.q_num_blocks, bm.q_indices, bm.full_q_num_blocks, bm.full_q_indices)


def scores(q, k, cfg: Cfg):
  """(s, raw): raw = scale * q k^T in float32 [bq, bk]; s = softcapped raw."""
  raw = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())),
                            preferred_element_type=jnp.float32) * cfg.scale
  s = raw if cfg.softcap is None else cfg.softcap * jnp.tanh(raw / cfg.softcap)
  return s, raw


def grad_scores(ds, raw, cfg: Cfg):
  if cfg.softcap is not None:
    t = jnp.tanh(raw / cfg.softcap)
    ds = ds * (1.0 - t * t)
  return ds * cfg.scale


def tile_mask(mask: M.Mask, q_rows, kv_rows, q_slot, kv_slot, q_len: int, kv_len: int):
  """bool [bq, bk] for a partial block: the mask on token rows, and both slots in range."""
  allowed = M.eval_rows(mask, q_rows, kv_rows)
  return allowed & (q_slot < q_len) & (kv_slot < kv_len)


def online_softmax_step(s, v, acc, m, den):
  """One flash-attention update; s [bq, bk] (-inf where masked), acc [bq, D], m, den [bq, 1].

  m is the running row max, den the running sum of exp(s - m).
  """
  m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
  m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
  alpha = jnp.exp(m - m_safe)
  p = jnp.exp(s - m_safe)
  den = alpha * den + jnp.sum(p, axis=1, keepdims=True)
  acc = alpha * acc + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return acc, m_new, den


def finalize(acc, m, den):
  """(o [bq, D], lse [bq, 1]); rows with nothing allowed give o = 0, lse = -inf."""
  empty = den == 0.0
  o = acc / jnp.where(empty, 1.0, den)
  lse = jnp.where(empty, -jnp.inf, jnp.where(m == -jnp.inf, 0.0, m) + jnp.log(den))
  return o, lse


def differentiable(forward, backward):
  """attention(q, k, v, bm, cfg) with a custom VJP over a kernel's forward and backward passes.

  Saves q, k, v, the output and lse (never the probabilities; the output and lse carry the
  checkpoint names `xla.RESIDUAL_NAMES`); the BlockMask gets no gradient.
  """

  @functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
  def attention(q, k, v, bm, cfg):
    return forward(q, k, v, bm, cfg)[0]

  def fwd(q, k, v, bm, cfg):
    o, lse = name_residuals(*forward(q, k, v, bm, cfg)[:2])
    return o, (q, k, v, o, lse, bm)

  def bwd(cfg, res, do):
    q, k, v, o, lse, bm = res
    dq, dk, dv = backward(q, k, v, o, lse, do, bm, cfg)[:3]
    return dq, dk, dv, zero_cotangent(bm)

  attention.defvjp(fwd, bwd)
  return attention
