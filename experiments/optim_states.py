"""Benchmark of FP8-compressed AdamW states on a GPT-shaped pytree (~110M parameters).

optax.adamw vs mpxla.optim.adamw_fp8 (stochastic and nearest rounding): state bytes, the update's
temp bytes and time, codec errors; --breakdown: the codec's pieces, --stall: the EMA stall case.
Tables and their reading: docs/optim.md.

  .venv/bin/python experiments/optim_states.py [--layers 12 --d-model 768 --vocab 32000]
  [--bias] [--no-timing] [--breakdown] [--stall]
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import shlex
import sys
import time

import harness as H

H.set_xla_flags(None, "--xla_cpu_enable_concurrency_optimized_scheduler=false")  # before jax

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import mpxla.optim as mo  # noqa: E402
from mpxla.optim import expansion as ex  # noqa: E402

codec = importlib.import_module("mpxla.optim.compress")  # the module (mpxla.optim has a function)


def gpt_shapes(layers: int, d: int, vocab: int, ctx: int, bias: bool) -> dict:
  """Parameter shapes of a GPT-2-style decoder (tied embeddings, LayerNorm scales)."""
  shapes = {"wte": (vocab, d), "wpe": (ctx, d), "ln_f": {"scale": (d,)}}
  for i in range(layers):
    shapes[f"h{i}"] = block = {
        "ln1": {"scale": (d,)}, "attn": {"qkv": (d, 3 * d), "proj": (d, d)},
        "ln2": {"scale": (d,)}, "mlp": {"fc": (d, 4 * d), "proj": (4 * d, d)}}
    if bias:
      block["ln1"]["bias"] = block["ln2"]["bias"] = (d,)
      block["attn"].update(qkv_bias=(3 * d,), proj_bias=(d,))
      block["mlp"].update(fc_bias=(4 * d,), proj_bias=(d,))
  return shapes


def print_table(header, rows) -> None:
  """A blank line and the markdown table."""
  print("", *H.table(header, rows), sep="\n")


def _median_times(fns: dict, args: dict, warmup: int, iters: int, donated: bool = False) -> dict:
  """Median (wall, CPU) seconds of each fns[name](*args[name]), runs interleaved so load changes
  hit all alike; donated: the state (args[1]) is fed back from each update, as in a train step."""
  args = {name: list(a) for name, a in args.items()}
  times = {name: [] for name in fns}
  for i in range(warmup + iters):
    for name, f in fns.items():
      t, c = time.perf_counter(), time.process_time()
      out = jax.block_until_ready(f(*args[name]))
      if donated:
        args[name][1] = out[1]
      if i >= warmup:
        times[name].append((time.perf_counter() - t, time.process_time() - c))
  return {name: tuple(np.median(np.asarray(ts), axis=0)) for name, ts in times.items()}


def _codec_costs(rows: int = 16384, iters: int = 7) -> list[tuple[str, float, float]]:
  """(piece, wall ns, CPU ns) per element of one (rows, 1024) leaf, median of iters runs. Each
  piece ends in a 1-byte output (a compare, or the codes), so the figures are the arithmetic and
  the reads, not the page faults of a fresh float32 output buffer."""
  cfg = codec.LeafConfig()
  x = 0.01 * jax.random.normal(jax.random.key(0), (rows, 1024))
  enc = jax.jit(lambda a: codec.encode_leaf(a, cfg))(x)
  flag = lambda a: (a > 0.003).astype(jnp.uint8)  # noqa: E731
  pieces = {
      "read float32 (reference)": (lambda a: flag(a), x),
      "read codes (reference)": (lambda c: flag(c.codes.astype(jnp.float32)), enc),
      "decode (codes -> float32)": (lambda c: flag(codec.decode_leaf(c)), enc),
      "group max / nonzero min": (lambda a: ex.group_range(a.reshape(rows, 8, 128)), x),
      "encode (float32 -> codes, k, amax)": (lambda a: codec.encode_leaf(a, cfg), x),
      "encode, stochastic rounding": (
          lambda a: codec.encode_leaf(a, cfg, step=jnp.uint32(1), salt=0), x),
  }
  med = _median_times({name: jax.jit(f) for name, (f, _) in pieces.items()},
                      {name: (a,) for name, (_, a) in pieces.items()}, 1, iters)
  return [(name, wall / x.size * 1e9, cpu / x.size * 1e9) for name, (wall, cpu) in med.items()]


def _stall(steps: int = 300, b2: float = 0.99) -> list[tuple[str, float, float, float]]:
  """The EMA stall case of docs/optim.md ("Stochastic rounding and the EMA stall"): (rounding,
  mean, standard error, RMS) of the relative error after `steps` vs the float64 EMA."""
  rng = np.random.default_rng(3)
  v0 = 10.0 ** rng.uniform(-5.0, np.log10(0.4), (64, 128))
  v0[:, 0], v0[:, 1] = 1.0, 1e-5  # each group's max and min, with g^2 = v: they stay put
  g2 = 2.0 * v0
  g2[:, :2] = v0[:, :2]
  g = np.sqrt(g2).astype(np.float32)
  out = []
  for rounding in ("nearest", "stochastic"):
    opt = mo.compress_states(optax.scale_by_rms(decay=b2, eps=0.0), min_size=1,
                             rounding=rounding)
    state = mo.compress(optax.ScaleByRmsState(nu=v0.astype(np.float32)), min_size=1,
                        rounding=rounding)
    final = jax.jit(lambda s, opt=opt: jax.lax.scan(
        lambda c, _: (opt.update(g, c)[1], None), s, None, length=steps)[0])(state)
    ref = np.asarray(mo.decompress(state).nu, np.float64)
    for _ in range(steps):
      ref = b2 * ref + (1 - b2) * g2.astype(np.float32).astype(np.float64)
    rel = (np.asarray(mo.decompress(final).nu, np.float64) / ref - 1)[:, 2:]
    out.append((rounding, rel.mean(), rel.std() / np.sqrt(rel.size), np.sqrt(np.mean(rel**2))))
  return out


def _codec_errors() -> list[tuple[str, float]]:
  """(label, ratio): MSE of plain per-group E4M3 over E4M3 with expansion (lognormal data), and
  the MSE ratio of m/(sqrt(v)+eps) without / with expansion on Adam-like moments."""
  fq = jax.jit(ex.fake_quantize, static_argnames=("fmt", "expansion"))

  def plain(x):  # Per-group absmax to 448, round to nearest (numpy reference).
    scale = 448.0 / np.abs(x).max(-1, keepdims=True)
    return (x * scale).astype(ml_dtypes.float8_e4m3fn).astype(np.float64) / scale

  rows = []
  for sigma in (0.5, 1.0, 2.0):
    x = np.random.default_rng(10).lognormal(0, sigma, (4000, 128)).astype(np.float32)
    xd = x.astype(np.float64)
    mse_exp = np.mean((np.asarray(fq(jnp.asarray(x)), np.float64) - xd) ** 2)
    rows.append((f"MSE plain E4M3 / E4M3+expansion, lognormal sigma={sigma}",
                 np.mean((plain(xd) - xd) ** 2) / mse_exp))
  rng = np.random.default_rng(0)
  scale = rng.lognormal(0, 1.0, (500, 128)) * 1e-3
  mean = rng.normal(0, 1, (500, 128)) * scale * 0.3
  m, v = np.zeros_like(scale), np.zeros_like(scale)
  for _ in range(100):
    g = mean + scale * rng.standard_normal(scale.shape)
    m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g * g
  ref = m / (np.sqrt(v) + 1e-8)

  def upd_mse(expansion):
    mq, vq = (np.asarray(fq(jnp.asarray(a, jnp.float32), expansion=expansion), np.float64)
              for a in (m, v))
    return np.mean((mq / (np.sqrt(vq) + 1e-8) - ref) ** 2)

  rows.append(("MSE of m/(sqrt(v)+eps), no expansion / expansion (Adam-like states)",
               upd_mse(False) / upd_mse(True)))
  return rows


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  for flag, default in (("--layers", 12), ("--d-model", 768), ("--vocab", 32000), ("--ctx", 1024),
                        ("--warmup", 2), ("--iters", 5)):
    parser.add_argument(flag, type=int, default=default)
  for flag, text in (
      ("--bias", "add biases (GPT-2 style)"), ("--no-timing", "skip the wall-time table"),
      ("--breakdown", "also time the codec's pieces per element (one 16M-element leaf)"),
      ("--stall", "also print the EMA stall case (nearest vs stochastic rounding)")):
    parser.add_argument(flag, action="store_true", help=text)
  args = parser.parse_args(argv)

  print("$ " + shlex.join([".venv/bin/python"] + sys.argv))
  print(f"XLA_FLAGS={os.environ['XLA_FLAGS']}")
  print(f"jax {jax.__version__}, optax {optax.__version__}, {jax.devices()[0].device_kind}, "
        f"{os.cpu_count()} CPUs")
  shapes = gpt_shapes(args.layers, args.d_model, args.vocab, args.ctx, args.bias)
  leaves, treedef = jax.tree.flatten(shapes, is_leaf=lambda s: isinstance(s, tuple))
  params = jax.tree.unflatten(treedef, [0.02 * jax.random.normal(
      jax.random.fold_in(jax.random.key(0), i), s) for i, s in enumerate(leaves)])
  grads = jax.tree.map(lambda p: 0.1 * p + 1e-3 * jnp.sign(p), params)
  n, largest = sum(map(math.prod, leaves)), max(map(math.prod, leaves))
  print(f"GPT pytree: {args.layers} layers, d={args.d_model}, vocab={args.vocab}, ctx={args.ctx}, "
        f"bias={args.bias}: {len(leaves)} leaves, {n:,} parameters, largest leaf {largest:,}")

  opts = {"optax.adamw": optax.adamw(1e-3), "mpxla adamw_fp8": mo.adamw_fp8(1e-3),
          "mpxla adamw_fp8, nearest": mo.adamw_fp8(1e-3, config=dict(rounding="nearest"))}
  states = {name: jax.jit(opt.init)(params) for name, opt in opts.items()}
  compiled = {name: jax.jit(opt.update).lower(grads, states[name], params).compile()
              for name, opt in opts.items()}

  # Bytes per parameter; COAT: same leaves compressed, 1 byte + 3 float32 per 128-group.
  fp8_state = states["mpxla adamw_fp8"]
  comp = [c for c in jax.tree.leaves(fp8_state, is_leaf=mo.is_compressed) if mo.is_compressed(c)]
  n_comp = sum(c.size for c in comp) // 2  # Two moments per compressed parameter.
  coat_comp = sum(c.codes.size + 12 * c.amax.size for c in comp)
  coat = mo.nbytes(states["optax.adamw"]) - 8 * n_comp + coat_comp
  print_table(["optimizer state", "bytes/param (all leaves)", "bytes/param (compressed leaves)"], [
      ["optax.adamw (float32 m, v)", f"{mo.nbytes(states['optax.adamw']) / n:.4f}", "8.0000"],
      ["COAT layout (E4M3 + 3 float32 / group)", f"{coat / n:.4f}", f"{coat_comp / n_comp:.4f}"],
      ["mpxla adamw_fp8 (E4M3 + uint8 k + float32 amax / group)",
       f"{mo.nbytes(fp8_state) / n:.4f}", f"{sum(c.nbytes for c in comp) / n_comp:.4f}"]])
  print(f"({n_comp:,} of {n:,} parameters have compressed moments; the rest stay float32; "
        f"rounding='nearest': {mo.nbytes(states['mpxla adamw_fp8, nearest']) / n:.4f}.)")

  temps = {name: c.memory_analysis().temp_size_in_bytes for name, c in compiled.items()}
  print_table(["update (jit)", "temp bytes", "largest leaf's fp32 m+v", "all fp32 m+v",
               "temp / largest"], [[name, f"{temp:,}", f"{8 * largest:,}", f"{8 * n:,}",
                                    f"{temp / (8 * largest):.4f}"] for name, temp in temps.items()])

  if not args.no_timing:
    call_args = {name: (grads, states[name], params) for name in compiled}
    med = _median_times(compiled, call_args, args.warmup, args.iters)
    del states, compiled
    donated = _median_times({n: jax.jit(o.update, donate_argnums=(1,)) for n, o in opts.items()},
                            {n: (grads, jax.jit(o.init)(params), params) for n, o in opts.items()},
                            args.warmup, args.iters, donated=True)
    ref, dref = med["optax.adamw"], donated["optax.adamw"]
    cells = lambda t, r: [f"{t[0] * 1e3:.1f} ms", f"{t[0] / r[0]:.2f}x",  # noqa: E731
                          f"{t[1] * 1e3:.0f} ms", f"{t[1] / r[1]:.2f}x"]
    print_table([
        "update (jit)", f"wall time (median of {args.iters} after {args.warmup} warm-up)", "ratio",
        "CPU time (all threads)", "ratio", "state donated: wall", "ratio", "CPU", "ratio"],
        [[name, *cells(med[name], ref), *cells(donated[name], dref)] for name in med])
    fp8 = donated["mpxla adamw_fp8"]
    print(f"(per parameter, state donated: optax.adamw {dref[0] / n * 1e9:.2f} ns wall, "
          f"{dref[1] / n * 1e9:.2f} ns CPU; adamw_fp8 {fp8[0] / n * 1e9:.2f} ns wall, "
          f"{fp8[1] / n * 1e9:.2f} ns CPU)")

  if args.stall:
    print_table(["EMA stall case, 300 steps, b2 = 0.99", "mean relative error vs float64 EMA",
                 "standard error", "mean / SE", "RMS"],
                [[r, f"{mean:+.4f}", f"{se:.4f}", f"{mean / se:+.1f}", f"{rms:.4f}"]
                 for r, mean, se, rms in _stall()])
  if args.breakdown:
    print_table(["codec piece (16M-element leaf, 1-byte output)", "wall ns / element",
                 "CPU ns / element"],
                [[name, f"{wall:.2f}", f"{cpu:.2f}"] for name, wall, cpu in _codec_costs()])
  print_table(["codec error", "ratio"], [[label, f"{r:.2f}"] for label, r in _codec_errors()])


if __name__ == "__main__":
  main()
