"""Block-sparse attention benchmark (CPU): XLA path vs jax.nn.dot_product_attention, BlockMask
construction from segment ids, and the block savings of token permutation.

    .venv/bin/python experiments/attention_bench.py            # full (several minutes)
    .venv/bin/python experiments/attention_bench.py --quick    # small sizes, smoke test

Times are the minimum over --reps runs after compilation (the CPU may be shared: the minimum
is the least disturbed run); compare ratios within one run only.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import harness as H
import jax
import jax.numpy as jnp
import numpy as np
import permutation_real as PR

from mpxla import attention as A
from mpxla.attention import xla


def _time(f, *args, reps):
  jax.block_until_ready(f(*args))
  best = float("inf")
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(f(*args))
    best = min(best, time.perf_counter() - t)
  return best


def _fwd_bwd(attn):
  return jax.jit(lambda q, k, v, do: jax.vjp(attn, q, k, v)[1](do))


def _pair(mask, s):
  """(dense attention, ours, block density, XLA mode) for a mask (None: no mask, impl auto)."""
  bm = None if mask is None else jax.jit(lambda: A.make_block_mask(mask, s, s))()
  allowed = None if mask is None else jax.jit(lambda: mask.dense(s, s)[None])()

  def dense(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, mask=allowed)

  def ours(q, k, v):
    return A.attention(q, k, v, mask=bm, impl="auto")

  return dense, ours, 1.0 if bm is None else float(bm.density().mean()), xla.mode(bm)


def _header(title, cells):
  print(title)
  print("\n".join(H.table(cells, [])))


def _row(*cells):
  print(H.table(cells, [])[0], flush=True)


def bench_speed(seqs, heads, head_dim, reps):
  _header("\n## XLA path vs jax.nn.dot_product_attention (same dense mask), batch 1, "
          f"heads {heads}, head_dim {head_dim}, float32", [
              "S", "mask", "block density", "XLA mode", "dense fwd s", "ours fwd s", "fwd speedup",
              "dense fwd+bwd s", "ours fwd+bwd s", "fwd+bwd speedup"])
  for s in seqs:
    ks = jax.random.split(jax.random.key(0), 4)
    q, k, v, do = (jax.random.normal(kk, (1, s, heads, head_dim), jnp.float32) for kk in ks)
    for name, mask in (("sliding_window(512)", A.sliding_window(512)), ("causal", A.causal()),
                       ("none (auto)", None)):
      dense, ours, density, mode = _pair(mask, s)
      (t_dense, t_dense_b), (t_ours, t_ours_b) = [
          (_time(jax.jit(f), q, k, v, reps=reps), _time(_fwd_bwd(f), q, k, v, do, reps=reps))
          for f in (dense, ours)]
      _row(s, name, f"{density:.3f}", mode, f"{t_dense:.3f}", f"{t_ours:.3f}",
           f"{t_dense / t_ours:.2f}x", f"{t_dense_b:.3f}", f"{t_ours_b:.3f}",
           f"{t_dense_b / t_ours_b:.2f}x")


def bench_block_mask(s, block, reps):
  _header(f"\n## BlockMask construction from segment ids on device (causal & document), S = {s}, "
          f"block {block}", ["documents", "non-empty blocks", "full blocks",
                             "time after compile (ms)"])
  r = np.random.default_rng(0)
  lengths = r.geometric(1 / 2048, size=s)
  ids = np.repeat(np.arange(len(lengths)), lengths)[:s].astype(np.int32)[None]
  ids2 = np.sort(r.integers(0, 40, size=(1, s)), axis=-1).astype(np.int32)
  build = jax.jit(lambda ids: A.make_block_mask(A.causal() & A.document(ids), s, s,
                                                block_q=block, block_kv=block))
  times = [_time(build, jnp.asarray(i), reps=reps) for i in (ids, ids2)]  # ids2: same executable
  for i, t in zip((ids, ids2), times, strict=True):
    bm = build(jnp.asarray(i))
    _row(int(i.max()) + 1, int(bm.block_any().sum()), int(bm.block_all().sum()), f"{t * 1e3:.1f}")


def bench_permutation(s, block, heads, head_dim, segments, heavy_frac, recall):
  r = np.random.default_rng(0)
  u = r.normal(size=(heads, head_dim))
  u /= np.linalg.norm(u, axis=-1, keepdims=True)
  heavy = r.random((s,)) < heavy_frac
  # Heavy keys align with a per-head direction every query leans to: score gap ~ 8 nats.
  k = r.normal(size=(1, s, heads, head_dim)) + heavy[None, :, None, None] * u * 8.0
  q = r.normal(size=(1, s, heads, head_dim)) + u * 8.0
  q, k = jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32)
  nb = s // block
  block_mass = jax.jit(lambda q_h, k_h, perm: PR.block_mass(PR.causal_probs(q_h, k_h), perm,
                                                           block, block))

  def mass(perm, h):
    return np.asarray(block_mass(q[0, :, h], k[0, :, h], jnp.asarray(perm[h])))

  def needed(perm):
    """Mean over (head, query block) of the fewest key blocks reaching `recall` of the mass."""
    return float(np.mean([PR.blocks_for_recall(mass(perm, h), recall) for h in range(heads)]))

  def achieved(p):
    """'recall / density' of the BlockMask that permute_kv selected (true recall, mean)."""
    bm_any, perm = np.asarray(p.block_mask.block_any())[0], np.asarray(p.perm)[0]
    rec = np.mean([(mass(perm, h) * bm_any[h]).sum(-1) for h in range(heads)])
    return f"{float(rec):.3f} / {float(bm_any.mean()):.3f}"

  def select(seg, est, permute=True):
    return jax.jit(lambda q, k: A.permute_kv(
        q, k, k, A.causal(), block_q=block, block_kv=block, segment=seg, threshold=recall,
        permute=permute, estimate=est))

  base = needed(np.tile(np.arange(s), (heads, 1)))
  _header(f"\n## Token permutation: {heavy_frac:.0%} heavy-hitter keys scattered over S = {s}, "
          f"causal, block {block}, heads {heads}, head_dim {head_dim}", [
              "segment", f"blocks for {recall:.0%} recall (no permutation)", "with permutation",
              "ratio", "permute_kv s", "selection at threshold 0.97, recall / density: pooled "
              "estimate", "tokens estimate"])
  for seg in segments:
    f = select(seg, "pooled")
    t_perm = _time(f, q, k, reps=1)
    p = f(q, k)
    got = needed(np.asarray(p.perm)[0])
    _row(seg, f"{base:.1f}", f"{got:.1f}", f"{base / got:.2f}x", f"{t_perm:.2f}", achieved(p),
         achieved(select(seg, "tokens")(q, k)))
  _row("none (selection only)", f"{base:.1f}", "-", "-", "-",
       *(achieved(select(segments[0], est, permute=False)(q, k)) for est in ("pooled", "tokens")))
  print(f"(causal block density: {float(np.tril(np.ones((nb, nb))).mean()):.3f})")


def main():
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
  ap.add_argument("--reps", type=int, default=3)
  args = ap.parse_args()
  print("$ " + " ".join([os.path.relpath(sys.executable)] + sys.argv))
  print(f"jax {jax.__version__}, backend {jax.default_backend()}, {os.cpu_count()} CPUs")
  if args.quick:
    bench_speed([1024], 2, 64, args.reps)
    bench_block_mask(4096, 128, args.reps)
    bench_permutation(1024, 64, 2, 64, [128, 256], 0.03, 0.97)
  else:
    bench_speed([4096, 8192], 8, 64, args.reps)
    bench_block_mask(32768, 128, max(args.reps, 10))
    bench_permutation(8192, 128, 4, 64, [256, 1024], 0.03, 0.97)


if __name__ == "__main__":
  main()
