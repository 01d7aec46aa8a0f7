"""Independent oracles for the attention tests: numpy masks from their definitions, numpy
block any/all, float64 numpy attention, and a relative-error helper."""

from __future__ import annotations

import numpy as np


def np_causal(tq, tk):
  return np.arange(tk)[None, :] <= np.arange(tq)[:, None]


def np_sliding(tq, tk, left, right):
  d = np.arange(tk)[None, :] - np.arange(tq)[:, None]
  return (d >= -left) & (d <= right)


def np_chunked(tq, tk, size):
  return (np.arange(tq)[:, None] // size) == (np.arange(tk)[None, :] // size)


def np_prefix(tq, tk, prefix):
  """prefix: int or [B] -> [B or 1, tq, tk]."""
  p = np.asarray(prefix).reshape(-1, 1, 1)
  return np_causal(tq, tk)[None] | (np.arange(tk)[None, None, :] < p)


def np_document(q_ids, kv_ids):
  return np.asarray(q_ids)[:, :, None] == np.asarray(kv_ids)[:, None, :]


def np_blocks(dense, bq, bk):
  """(any, all) [B, nq, nk] of a dense mask [B, tq, tk]; blocks touching padding are not full."""
  b, tq, tk = dense.shape
  nq, nk = -(-tq // bq), -(-tk // bk)
  d = np.zeros((b, nq * bq, nk * bk), bool)
  d[:, :tq, :tk] = dense
  valid = np.zeros((nq * bq, nk * bk), bool)
  valid[:tq, :tk] = True
  t = d.reshape(b, nq, bq, nk, bk)
  v = valid.reshape(nq, bq, nk, bk)
  blk_any = t.any((2, 4))
  return blk_any, t.all((2, 4)) & v.all((1, 3))[None]


def np_attention(q, k, v, allowed, scale, softcap=None):
  """float64 attention; allowed bool broadcastable to [B, H, tq, tk]; empty rows give 0."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  g = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, g, 2), np.repeat(v, g, 2)
  s = np.einsum("bqhd,bkhd->bhqk", q, k) * scale
  if softcap is not None:
    s = softcap * np.tanh(s / softcap)
  s = np.where(allowed, s, -np.inf)
  m = s.max(-1, keepdims=True)
  p = np.exp(s - np.where(np.isfinite(m), m, 0))
  den = p.sum(-1, keepdims=True)
  return np.einsum("bhqk,bkhd->bqhd", p / np.where(den == 0, 1, den), v)


def rel_err(x, ref):
  """max |x - ref| / max |ref|."""
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  return float(np.abs(x - ref).max() / max(np.abs(ref).max(), 1e-30))


def packed_ids(rng, batch, length, max_docs):
  """Sorted segment ids (contiguous documents) [batch, length]."""
  ids = np.sort(rng.integers(0, max_docs, size=(batch, length)), axis=-1)
  return ids.astype(np.int32)


def np_attention_vjp(q, k, v, do, allowed, scale, softcap=None):
  """float64 (o, dq, dk, dv) by the textbook softmax backward, independent of JAX."""
  q, k, v, do = (np.asarray(x, np.float64) for x in (q, k, v, do))
  b, tq, h, d = q.shape
  hk = k.shape[2]
  g = h // hk
  kk, vv = np.repeat(k, g, 2), np.repeat(v, g, 2)
  raw = np.einsum("bqhd,bkhd->bhqk", q, kk) * scale
  s = raw if softcap is None else softcap * np.tanh(raw / softcap)
  allowed = np.broadcast_to(allowed, s.shape)
  s = np.where(allowed, s, -np.inf)
  m = s.max(-1, keepdims=True)
  p = np.exp(s - np.where(np.isfinite(m), m, 0))
  den = p.sum(-1, keepdims=True)
  p = p / np.where(den == 0, 1, den)
  o = np.einsum("bhqk,bkhd->bqhd", p, vv)
  dv = np.einsum("bhqk,bqhd->bkhd", p, do)
  dp = np.einsum("bqhd,bkhd->bhqk", do, vv)
  ds = p * (dp - (dp * p).sum(-1, keepdims=True))
  if softcap is not None:
    ds = ds * (1 - np.tanh(raw / softcap) ** 2)
  ds = ds * scale
  dq = np.einsum("bhqk,bkhd->bqhd", ds, kk)
  dk = np.einsum("bhqk,bqhd->bkhd", ds, q)
  def fold(x):
    return x.reshape(b, -1, hk, g, d).sum(3)
  return o, dq, fold(dk), fold(dv)
