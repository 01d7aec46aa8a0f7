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
  def f(q, k, v, do):
    o, vjp = jax.vjp(attn, q, k, v)
    return vjp(do)
  return jax.jit(f)


def _pair(mask, s):
  """(dense attention, ours, block density, XLA mode) for a mask (None: no mask, impl auto)."""
  if mask is None:
    def dense(q, k, v):
      return jax.nn.dot_product_attention(q, k, v)

    def ours(q, k, v):
      return A.attention(q, k, v, impl="auto")

    return dense, ours, 1.0, xla.mode(None)
  bm = jax.jit(lambda: A.make_block_mask(mask, s, s))()
  allowed = jax.jit(lambda: mask.dense(s, s)[None])()

  def dense(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, mask=allowed)

  def ours(q, k, v):
    return A.attention(q, k, v, mask=bm, impl="auto")

  return dense, ours, float(bm.density().mean()), xla.mode(bm)


def bench_speed(seqs, heads, head_dim, reps):
  print("\n## XLA path vs jax.nn.dot_product_attention (same dense mask), batch 1, "
        f"heads {heads}, head_dim {head_dim}, float32")
  print("| S | mask | block density | XLA mode | dense fwd s | ours fwd s | fwd speedup "
        "| dense fwd+bwd s | ours fwd+bwd s | fwd+bwd speedup |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  for s in seqs:
    ks = jax.random.split(jax.random.key(0), 4)
    q, k, v, do = (jax.random.normal(kk, (1, s, heads, head_dim), jnp.float32) for kk in ks)
    cases = [("sliding_window(512)", A.sliding_window(512)), ("causal", A.causal()),
             ("none (auto)", None)]
    for name, mask in cases:
      dense, ours, density, mode = _pair(mask, s)
      t_dense = _time(jax.jit(dense), q, k, v, reps=reps)
      t_ours = _time(jax.jit(ours), q, k, v, reps=reps)
      t_dense_b = _time(_fwd_bwd(dense), q, k, v, do, reps=reps)
      t_ours_b = _time(_fwd_bwd(ours), q, k, v, do, reps=reps)
      print(f"| {s} | {name} | {density:.3f} | {mode} | {t_dense:.3f} | {t_ours:.3f} | "
            f"{t_dense / t_ours:.2f}x | {t_dense_b:.3f} | {t_ours_b:.3f} | "
            f"{t_dense_b / t_ours_b:.2f}x |", flush=True)


def bench_block_mask(s, block, reps):
  print(f"\n## BlockMask construction from segment ids on device (causal & document), S = {s}, "
        f"block {block}")
  r = np.random.default_rng(0)
  lengths = r.geometric(1 / 2048, size=s)
  ids = np.repeat(np.arange(len(lengths)), lengths)[:s].astype(np.int32)[None]
  build = jax.jit(lambda ids: A.make_block_mask(A.causal() & A.document(ids), s, s,
                                                block_q=block, block_kv=block))
  t = _time(build, jnp.asarray(ids), reps=reps)
  ids2 = np.sort(r.integers(0, 40, size=(1, s)), axis=-1).astype(np.int32)
  t2 = _time(build, jnp.asarray(ids2), reps=reps)  # new ids: same executable
  bm = build(jnp.asarray(ids))
  print("| documents | non-empty blocks | full blocks | time after compile (ms) |")
  print("|---|---|---|---|")
  print(f"| {int(ids.max()) + 1} | {int(bm.block_any().sum())} | {int(bm.block_all().sum())} | "
        f"{t * 1e3:.1f} |")
  print(f"| {int(ids2.max()) + 1} | {int(build(jnp.asarray(ids2)).block_any().sum())} | "
        f"{int(build(jnp.asarray(ids2)).block_all().sum())} | {t2 * 1e3:.1f} |")


def bench_permutation(s, block, heads, head_dim, segments, heavy_frac, recall):
  print(f"\n## Token permutation: {heavy_frac:.0%} heavy-hitter keys scattered over S = {s}, "
        f"causal, block {block}, heads {heads}, head_dim {head_dim}")
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

  def needed(perm):
    """Mean over (head, query block) of the fewest key blocks reaching `recall` of the mass."""
    return float(np.mean([PR.blocks_for_recall(np.asarray(block_mass(
        q[0, :, h], k[0, :, h], jnp.asarray(perm[h]))), recall) for h in range(heads)]))

  def achieved(bm_any, perm):
    """Mean recall and density of a selected BlockMask."""
    rec = []
    for h in range(heads):
      mass = np.asarray(block_mass(q[0, :, h], k[0, :, h], jnp.asarray(perm[h])))
      rec.append((mass * bm_any[h]).sum(-1))
    return float(np.mean(rec)), float(bm_any.mean())

  identity = np.tile(np.arange(s), (heads, 1))
  base = needed(identity)
  print(f"| segment | blocks for {recall:.0%} recall (no permutation) | with permutation | "
        "ratio | permute_kv s | selection at threshold 0.97, recall / density: pooled estimate "
        "| tokens estimate |")
  print("|---|---|---|---|---|---|---|")
  def sel(seg, est, permute=True):
    return jax.jit(lambda q, k: A.permute_kv(
        q, k, k, A.causal(), block_q=block, block_kv=block, segment=seg, threshold=recall,
        permute=permute, estimate=est))
  for seg in segments:
    f = sel(seg, "pooled")
    p = f(q, k)
    t0 = time.perf_counter()
    jax.block_until_ready(f(q, k))
    t_perm = time.perf_counter() - t0
    perm = np.asarray(p.perm)[0]
    got = needed(perm)
    rec, dens = achieved(np.asarray(p.block_mask.block_any())[0], perm)
    pt = sel(seg, "tokens")(q, k)
    rec_t, dens_t = achieved(np.asarray(pt.block_mask.block_any())[0], np.asarray(pt.perm)[0])
    print(f"| {seg} | {base:.1f} | {got:.1f} | {base / got:.2f}x | {t_perm:.2f} | "
          f"{rec:.3f} / {dens:.3f} | {rec_t:.3f} / {dens_t:.3f} |", flush=True)
  res = []
  for est in ("pooled", "tokens"):
    p = sel(segments[0], est, permute=False)(q, k)
    res.append(achieved(np.asarray(p.block_mask.block_any())[0], identity))
  print(f"| none (selection only) | {base:.1f} | - | - | - | {res[0][0]:.3f} / {res[0][1]:.3f} | "
        f"{res[1][0]:.3f} / {res[1][1]:.3f} |")
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
