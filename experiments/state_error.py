"""Issue 8, section 3: quantization error of real AdamW states by format and expansion.

COAT's Table 1 layout, measured on the parity run's moments.

Input: the float32 moments m (mu) and v (nu) of the parity run's bf16 seed-0 model after its last
step (`<parity>/runs/moments_bf16_s0.npz`, written by experiments/parity.py). In quick mode, or
if that file is missing, a tiny GPT is trained for a few steps here and its moments are used.

Each moment goes through mpxla.optim's codec (compress -> decompress, groups of 128 along each
leaf's last axis, every leaf compressed) in E4M3, E5M2 or HiF8, with or without COAT's dynamic
range expansion. A cell of the table is the error of the update direction

  u = m / (sqrt(v) + eps),   eps = 1e-8 (the config's AdamW eps; raw moments, no bias correction)

  MSE = mean((u_q - u)^2) over all elements,   normalized MSE = MSE / mean(u^2),

u_q from the dequantized moments, u in float64 from the float32 moments. Also the distribution of
the expansion exponent k (stored as k16 = 16 k) over the groups of m and of v.

  .venv/bin/python experiments/state_error.py [--out DIR] [--parity DIR] [--quick]
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import pathlib
import platform
import shlex
import sys
import time
from typing import Any

import _common  # experiments/_common.py

NAME = "state_error"
TITLE = "3. Optimizer-state quantization error (COAT Table 1, from real AdamW states)"

ROOT = pathlib.Path(__file__).resolve().parents[1]
FORMATS = ("e4m3", "e5m2", "hif8")
LABEL = {"e4m3": "E4M3", "e5m2": "E5M2", "hif8": "HiF8",
         "hif8_s15": "HiF8, amax->15", "hif8_q15": "HiF8, amax->15, flush (mpxla.quant)"}
# No-expansion HiF8 variants scaled to HIF8.scale_target = 15 instead of the codec's 2^15.
HIF8_SCALED = ("hif8_s15", "hif8_q15")
# (expand m, expand v) of each column of the table.
EXPANSIONS = {"none": (False, False), "m only": (True, False), "v only": (False, True),
              "both": (True, True)}
GROUP_SIZE = 128
EPS = 1e-8
K_QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
QUICK_STEPS = 20


# --- inputs --------------------------------------------------------------------------------


def load_moments(path: pathlib.Path) -> tuple[dict[str, Any], dict[str, Any]]:
  """({param path: m}, {param path: v}) from a parity moments npz (keys 'mu/...' and 'nu/...')."""
  import numpy as np  # pylint: disable=import-outside-toplevel

  with np.load(path) as z:
    mu = {k[3:]: z[k] for k in z.files if k.startswith("mu/")}
    nu = {k[3:]: z[k] for k in z.files if k.startswith("nu/")}
  if not mu or set(mu) != set(nu):
    raise ValueError(f"{path}: expected matching 'mu/<path>' and 'nu/<path>' arrays.")
  return mu, nu


def train_tiny(steps: int = QUICK_STEPS, seed: int = 0) -> tuple[dict, dict, dict]:
  """Trains a miniature default GPT (the bf16 recipe's AdamW) `steps` steps -> (m, v, info)."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel

  from mpxla.data import BatchIterator, make_source  # pylint: disable=import-outside-toplevel
  from mpxla.train import config as config_lib  # pylint: disable=import-outside-toplevel
  from mpxla.train import recipes  # pylint: disable=import-outside-toplevel
  from mpxla.train.tasks import make_task  # pylint: disable=import-outside-toplevel

  c = config_lib.load(str(ROOT / "configs/gpt_tiny.py"))
  tiny = {"model.d_model": 128, "model.n_layers": 1, "model.d_ff": 256, "data.seq_len": 64,
          "model.attention_impl": "dense_jax",
          "data.batch_size": 8, "optim.warmup_steps": 5, "optim.decay_steps": steps}
  for k, v in tiny.items():
    config_lib.override(c, k, str(v))
  task, tx = make_task(c), recipes.make_optimizer(c)
  data = BatchIterator(make_source(c.data, "train"), c.data.batch_size, seed=seed, shuffle=True)
  batch = {k: jax.numpy.asarray(v) for k, v in next(data).items()}
  params = jax.jit(task.init)(jax.random.key(seed), batch)["params"]
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, batch):
    grads = jax.grad(lambda p: task.loss(p, {}, batch, train=True)[0])(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  for _ in range(steps):
    params, opt_state = step(params, opt_state, batch)
    batch = {k: jax.numpy.asarray(v) for k, v in next(data).items()}
  adam = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda s: hasattr(s, "mu"))
          if hasattr(s, "mu")]

  def flat(t):
    return {"/".join(str(getattr(k, "key", k)) for k in p): np.asarray(x, np.float32)
            for p, x in jax.tree_util.tree_flatten_with_path(t)[0]}

  info = {"source": f"tiny GPT trained here ({steps} steps, {tiny})", "step": steps}
  return flat(adam[0].mu), flat(adam[0].nu), info


# --- the codec -----------------------------------------------------------------------------


@functools.cache
def _codec(fmt: str, expansion: bool):
  """jit(tree -> (decompress(compress(tree)), compress(tree))), cached per setting."""
  import jax  # pylint: disable=import-outside-toplevel

  from mpxla import optim  # pylint: disable=import-outside-toplevel

  def f(tree):
    c = optim.compress(tree, fmt=fmt, expansion=expansion, group_size=GROUP_SIZE, min_size=0)
    return optim.decompress(c), c

  return jax.jit(f)


@functools.cache
def _quant_hif8():
  """jit(tree -> per-group HiF8 fake-quantized tree), mpxla.quant's scaling (amax -> 15)."""
  import jax  # pylint: disable=import-outside-toplevel

  from mpxla import quant  # pylint: disable=import-outside-toplevel

  def one(x):
    g = quant.PerGroup(min(GROUP_SIZE, x.shape[-1]), axis=-1)
    return quant.dequantize(quant.quantize(x, "hif8", g), x.dtype)

  return jax.jit(lambda tree: jax.tree.map(one, tree))


@functools.cache
def _scaled_hif8():
  """jit(tree -> tree through per-group HiF8 with amax -> 15), the codec's no-expansion policies.

  As expansion.encode/decode with expansion=False except the target: t = |x| * 15 / amax (the
  group max exactly 15), nonzero t clipped up to HiF8's smallest subnormal (never flushed to 0).
  """
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from mpxla import formats  # pylint: disable=import-outside-toplevel

  target = formats.HIF8.scale_target

  def one(x):
    g = min(GROUP_SIZE, x.shape[-1])
    n_pad = -(-x.shape[-1] // g) * g
    xg = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, n_pad - x.shape[-1])])
    xg = xg.reshape(*x.shape[:-1], n_pad // g, g).astype(jnp.float32)
    ax = jnp.abs(xg)
    amax = jnp.max(ax, -1, keepdims=True)
    safe = jnp.where(amax > 0, amax, 1.0)
    t = jnp.where(ax == amax, target, ax * (target / safe))
    t = jnp.clip(t, formats.HIF8.min_subnormal, formats.HIF8.max) * jnp.sign(xg)
    q = formats.upcast(formats.cast(t, "hif8"), "hif8", jnp.float32)
    y = jnp.where(jnp.abs(q) == target, amax * jnp.sign(q), q * (safe / target))
    return y.reshape(*x.shape[:-1], n_pad)[..., : x.shape[-1]].astype(x.dtype)

  return jax.jit(lambda tree: jax.tree.map(one, tree))


def pack(tree: dict[str, Any]) -> tuple[dict[str, Any], list[tuple[str, tuple, int, int]]]:
  """Rows of equal last-axis length from all leaves stacked into one 2-D array per length.

  The codec groups along the last axis only (groups never cross rows), so packing gives the same
  groups, codes and decoded values as compressing each leaf, with far fewer leaves to compile.
  Returns ({str(n): (rows, n) array}, layout) for `unpack`.
  """
  import numpy as np  # pylint: disable=import-outside-toplevel

  rows: dict[str, list] = {}
  layout = []
  for k in sorted(tree):
    x = np.asarray(tree[k])
    x2 = x.reshape(-1, x.shape[-1]) if x.ndim else x.reshape(1, 1)
    n = str(x2.shape[1])
    start = sum(r.shape[0] for r in rows.get(n, []))
    rows.setdefault(n, []).append(x2)
    layout.append((k, x.shape, start, start + x2.shape[0]))
  return {n: np.concatenate(r) for n, r in rows.items()}, layout


def unpack(packed: dict[str, Any], layout, rows_only: bool = False) -> dict[str, Any]:
  """The inverse of `pack` (rows_only: each leaf's rows of `packed`, not reshaped)."""
  out = {}
  for k, shape, a, b in layout:
    rows = packed[str(shape[-1]) if shape else "1"][a:b]
    out[k] = rows if rows_only else rows.reshape(shape)
  return out


def roundtrip(tree: dict[str, Any], fmt: str, expansion: bool):
  """(decoded tree, k16 tree or None, amax tree) of `tree` through mpxla.optim compress/decompress.

  k16 and amax hold each leaf's groups as (rows, groups per row). For comparison, two
  no-expansion HiF8 variants scale each group's amax to HIF8.scale_target = 15 (the top of
  HiF8's 3-mantissa-bit band) instead of to HiF8's max 2^15: 'hif8_s15' keeps the codec's
  policies (nonzero stays nonzero), 'hif8_q15' is mpxla.quant's per-group quantize/dequantize
  (tiny values flush to zero).
  """
  import numpy as np  # pylint: disable=import-outside-toplevel

  from mpxla import optim  # pylint: disable=import-outside-toplevel

  packed, layout = pack(tree)
  if fmt in HIF8_SCALED:
    if expansion:
      raise ValueError(f"fmt={fmt!r} is a no-expansion comparison only.")
    decoded = (_scaled_hif8() if fmt == "hif8_s15" else _quant_hif8())(packed)
    return unpack({n: np.asarray(x, np.float64) for n, x in decoded.items()}, layout), None, None
  decoded, comp = _codec(fmt, bool(expansion))(packed)
  not_compressed = [n for n, c in comp.items() if not optim.is_compressed(c)]
  if not_compressed:
    raise ValueError(f"rows of length {not_compressed} were left uncompressed by the codec")
  decoded = unpack({n: np.asarray(x, np.float64) for n, x in decoded.items()}, layout)
  def meta(field):
    return unpack({n: np.asarray(getattr(c, field)) for n, c in comp.items()}, layout,
                  rows_only=True)

  return decoded, (meta("k16") if expansion else None), meta("amax")


def _flat(tree: dict[str, Any]):
  import numpy as np  # pylint: disable=import-outside-toplevel

  return np.concatenate([np.asarray(tree[k], np.float64).ravel() for k in sorted(tree)])


def update_direction(m, v, eps: float = EPS):
  """u = m / (sqrt(v) + eps) in float64."""
  import numpy as np  # pylint: disable=import-outside-toplevel

  return np.asarray(m, np.float64) / (np.sqrt(np.asarray(v, np.float64)) + eps)


def error_table(mu: dict[str, Any], nu: dict[str, Any], eps: float = EPS,
                formats: tuple[str, ...] = FORMATS) -> dict[str, Any]:
  """Every (fmt_m, fmt_v, expansion column) cell, per-moment errors and k distributions."""
  import numpy as np  # pylint: disable=import-outside-toplevel

  m, v = _flat(mu), _flat(nu)
  u = update_direction(m, v, eps)
  mean_u2 = float(np.mean(u * u))
  dq = {}  # (moment, fmt, expansion) -> flat decoded values
  k_stats, k_hist, k_by_leaf = {}, {}, {}
  per_moment = []
  variants = [(f, e) for f in formats for e in (False, True)]
  if "hif8" in formats:
    variants += [(f, False) for f in HIF8_SCALED]
  for fmt, exp in variants:
    for name, tree, ref in (("m", mu, m), ("v", nu, v)):
      decoded, k16, amax = roundtrip(tree, fmt, exp)
      x = _flat(decoded)
      dq[name, fmt, exp] = x
      nz = ref != 0
      per_moment.append({
          "moment": name, "fmt": fmt, "expansion": exp,
          "nmse": float(np.sum((x - ref) ** 2) / np.sum(ref ** 2)),
          "mean_abs_rel_err": float(np.mean(np.abs(x[nz] - ref[nz]) / np.abs(ref[nz]))),
          "zeroed": int(np.sum(nz & (x == 0)))})
      if exp:
        k16_all = np.concatenate([k16[k].ravel() for k in sorted(k16)])
        used = np.concatenate([amax[k].ravel() for k in sorted(amax)]) > 0
        k_by_leaf.setdefault(name, {}).setdefault(fmt, {
            leaf: float(np.median(k16[leaf][amax[leaf] > 0]) / 16.0) if np.any(amax[leaf] > 0)
            else None for leaf in sorted(k16)})
        k = k16_all[used].astype(np.float64) / 16.0
        k_stats[f"{name}/{fmt}"] = {
            "groups": int(k16_all.size), "zero_groups": int((~used).sum()),
            "mean": float(k.mean()), "clamped_max": int((k16_all[used] == 255).sum()),
            "quantiles": {str(q): float(np.quantile(k, q)) for q in K_QUANTILES}}
        k_hist[f"{name}/{fmt}"] = np.bincount(k16_all[used], minlength=256).tolist()

  def mse(var_m, var_v):
    uq = update_direction(dq[("m", *var_m)], dq[("v", *var_v)], eps)
    e = float(np.mean((uq - u) ** 2))
    return {"mse": e, "nmse": e / mean_u2}

  cells = [{"fmt_m": fm, "fmt_v": fv, "expansion": col, **mse((fm, em), (fv, ev))}
           for fm in formats for fv in formats for col, (em, ev) in EXPANSIONS.items()]
  # HiF8 without expansion, scaled as mpxla.quant does (amax -> 15) instead of to 2^15.
  extra = []
  if "hif8" in formats and "e4m3" in formats:
    for var_m, var_v in ((("hif8_s15", False), ("hif8_s15", False)),
                         (("hif8_q15", False), ("hif8_q15", False)),
                         (("e4m3", True), ("hif8_s15", False)),
                         (("hif8_s15", False), ("e4m3", True)),
                         (("e4m3", False), ("hif8_s15", False))):
      extra.append({"m": list(var_m), "v": list(var_v), **mse(var_m, var_v)})
  return {"elements": int(m.size), "leaves": len(mu), "mean_u2": mean_u2, "eps": eps,
          "cells": cells, "extra_cells": extra, "per_moment": per_moment, "k": k_stats,
          "k_hist": k_hist, "k_median_by_leaf": k_by_leaf}


def cell(res: dict[str, Any], fmt_m: str, fmt_v: str, expansion: str) -> dict[str, float]:
  """The table cell for (fmt_m, fmt_v, expansion column)."""
  for c in res["cells"]:
    if (c["fmt_m"], c["fmt_v"], c["expansion"]) == (fmt_m, fmt_v, expansion):
      return c
  raise KeyError((fmt_m, fmt_v, expansion))


# --- the experiment ------------------------------------------------------------------------


def run(out_dir: pathlib.Path, quick: bool = False, *, parity: pathlib.Path | None = None,
        command: str | None = None) -> dict[str, Any]:
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  parity = pathlib.Path(parity or ROOT / "experiments/results/parity")
  npz = parity / "runs" / "moments_bf16_s0.npz"
  t0 = time.time()
  if not quick and npz.exists():
    mu, nu = load_moments(npz)
    info = {"source": str(npz.relative_to(ROOT) if npz.is_relative_to(ROOT) else npz)}
    summary = parity / "runs" / "bf16_s0" / "summary.json"
    if summary.exists():
      info["step"] = json.loads(summary.read_text())["steps"]
  else:
    if not quick:
      print(f"[state_error] {npz} not found: training a tiny model here instead", flush=True)
    mu, nu, info = train_tiny()
  res = error_table(mu, nu)
  import jax  # pylint: disable=import-outside-toplevel

  res.update({
      "name": NAME, "quick": quick, "input": info, "group_size": GROUP_SIZE,
      "command": command or f"python experiments/state_error.py --out {out_dir}"
      + (" --quick" if quick else ""),
      "jax_version": jax.__version__, "python": platform.python_version(),
      "cpu_count": os.cpu_count(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
      "wall_time_s": round(time.time() - t0, 1)})
  (out_dir / "results.json").write_text(json.dumps(res, indent=1))
  return res


# --- rendering -----------------------------------------------------------------------------


def plot_k(res: dict[str, Any], path: pathlib.Path) -> None:
  """Histograms of the expansion exponent k over the groups of m and of v (E4M3 and HiF8)."""
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
  grid = np.arange(256) / 16.0
  for ax, name, title in zip(axes, ("m", "v"), ("first moment m", "second moment v"), strict=True):
    for fmt, color in (("e4m3", "tab:red"), ("hif8", "tab:green"), ("e5m2", "tab:blue")):
      key = f"{name}/{fmt}"
      if key not in res["k_hist"]:
        continue
      counts = np.asarray(res["k_hist"][key], np.float64)
      med = res["k"][key]["quantiles"]["0.5"]
      ax.step(grid, counts / counts.sum(), where="mid", color=color,
              label=f"{LABEL[fmt]} (median {med:.2f})")
    ax.set_xlabel("k (expansion exponent, 1/16 grid)")
    ax.set_ylabel("fraction of groups")
    ax.set_title(f"{title}: k per group (<= {res['group_size']} elements)")
    ax.set_xlim(0, 16)
    ax.legend()
    ax.grid(alpha=0.3)
  _common.save_figure(fig, path, dpi=90)


def render(out_dir: pathlib.Path) -> str:
  out_dir, res = _common.load_results(out_dir)
  png = out_dir / "state_error_k.png"
  plot_k(res, png)
  src = res["input"]
  lines = [f"Command ({res['wall_time_s']:.0f} s on {res['cpu_count']} CPU cores shared with other "
           f"jobs, jax {res['jax_version']}, {res['date'][:10]}):", "",
           "```", res["command"], "```", "",
           f"Input: {src['source']} (step {src.get('step')}), {res['leaves']} parameter leaves, "
           f"{res['elements']:,} elements per moment; codec `mpxla.optim.compress`/`decompress`, "
           f"groups of {res['group_size']} along each leaf's last axis, every leaf compressed. "
           f"Cell = MSE of u = m/(sqrt(v)+eps), eps = {res['eps']:g}, after quantize->dequantize, "
           "against u from the float32 moments (in float64). **Normalized** = MSE / mean(u^2) "
           f"(mean(u^2) = {res['mean_u2']:.4g}); absolute MSE in the second table. Columns: which "
           "moments use dynamic range expansion.", ""]
  cols = list(EXPANSIONS)
  fmts = sorted({c["fmt_m"] for c in res["cells"]}, key=FORMATS.index)
  for key, title in (("nmse", "Normalized MSE of m/(sqrt(v)+eps)"),
                     ("mse", "Absolute MSE of m/(sqrt(v)+eps)")):
    lines += [f"**{title}**", "", "| m format | v format | " + " | ".join(
        f"expansion: {c}" for c in cols) + " |", "|---|---|" + "---|" * len(cols)]
    for fm in fmts:
      for fv in fmts:
        vals = [cell(res, fm, fv, c)[key] for c in cols]
        best = min(vals)
        lines.append(f"| {LABEL[fm]} | {LABEL[fv]} | " + " | ".join(
            (f"**{x:.4g}**" if x == best else f"{x:.4g}") for x in vals) + " |")
    lines.append("")
  lines += ["**Each moment alone**: normalized MSE = sum((x_q-x)^2)/sum(x^2), mean |relative "
            "error| over the nonzero elements, and how many nonzero elements decode to 0.", "",
            "| moment | format | expansion | normalized MSE | mean abs rel. error | nonzero -> 0 |",
            "|---|---|---|---|---|---|"]
  for r in res["per_moment"]:
    lines.append(f"| {r['moment']} | {LABEL[r['fmt']]} | {'yes' if r['expansion'] else 'no'} | "
                 f"{r['nmse']:.3g} | {r['mean_abs_rel_err']:.3g} | {r['zeroed']:,} |")
  if res.get("extra_cells"):
    lines += ["", "**HiF8 scaled into its precise band.** The codec maps each group's amax to the "
              "format's largest value M; for HiF8 that is 2^15 = 32768, where HiF8 has 1 mantissa "
              "bit left. These cells scale HiF8 groups (no expansion) to amax -> 15 instead, the "
              "top of its 3-mantissa-bit band, with about 26 binades of range below it down to "
              "the smallest subnormal 2^-22 (`HIF8.scale_target`, what `mpxla.quant` uses): "
              "'amax->15' keeps the codec's policy that a nonzero value never decodes to 0; "
              "'flush' is `mpxla.quant.quantize`/`dequantize` as is, where values below HiF8's "
              "smallest subnormal become 0.", "",
              "| m | v | normalized MSE | absolute MSE |", "|---|---|---|---|"]

    def name(var):
      return LABEL[var[0]] + (" + expansion" if var[1] else "")

    for e in res["extra_cells"]:
      lines.append(f"| {name(e['m'])} | {name(e['v'])} | {e['nmse']:.4g} | {e['mse']:.4g} |")
  lines += ["", f"![expansion exponent k]({png.name})", "",
            "**Expansion exponent k** over groups (all-zero groups excluded; k is capped at "
            "255/16 = 15.94 when a group's range is tiny):", "",
            "| moment | format | groups | mean | " + " | ".join(
                f"q{float(q) * 100:g}" for q in K_QUANTILES) + " | at cap |",
            "|---|---|---|---|" + "---|" * len(K_QUANTILES) + "---|"]
  for key, s in res["k"].items():
    name, fmt = key.split("/")
    lines.append(f"| {name} | {LABEL[fmt]} | {s['groups'] - s['zero_groups']:,} | "
                 f"{s['mean']:.2f} | "
                 + " | ".join(f"{s['quantiles'][str(q)]:.2f}" for q in K_QUANTILES)
                 + f" | {s['clamped_max']:,} |")
  lines += ["", *_interpretation(res)]
  return "\n".join(lines) + "\n"


def headline(out_dir: pathlib.Path) -> dict[str, str]:
  """Headline figures for the report's header table (label -> value)."""
  res = _common.load_results(out_dir)[1]
  if not {"e4m3", "hif8"} <= {c["fmt_m"] for c in res["cells"]}:
    return {}
  c = lambda fm, fv, e: cell(res, fm, fv, e)["nmse"]  # noqa: E731
  return {
      "Normalized MSE of m/sqrt(v), E4M3/E4M3 without -> with expansion (COAT: 20.10 -> 12.31)":
          f"{c('e4m3', 'e4m3', 'none'):.3g} -> {c('e4m3', 'e4m3', 'both'):.3g}",
      "HiF8/HiF8 without expansion vs E4M3/E4M3 with it":
          f"{c('hif8', 'hif8', 'none'):.3g} vs {c('e4m3', 'e4m3', 'both'):.3g}"}


def _extra(res: dict[str, Any], m: tuple[str, bool], v: tuple[str, bool]) -> float | None:
  for e in res.get("extra_cells", []):
    if tuple(e["m"]) == m and tuple(e["v"]) == v:
      return e["nmse"]
  return None


def _moment(res: dict[str, Any], name: str, fmt: str, expansion: bool) -> dict[str, Any]:
  return next(r for r in res["per_moment"]
              if (r["moment"], r["fmt"], r["expansion"]) == (name, fmt, expansion))


def _k_by_kind(res: dict[str, Any], moment: str, fmt: str) -> list[tuple[str, float]]:
  """[(leaf kind without 'layer_N/', median over layers of the leaf's median k)], by k."""
  import numpy as np  # pylint: disable=import-outside-toplevel

  leaves = res.get("k_median_by_leaf", {}).get(moment, {}).get(fmt, {})
  kinds: dict[str, list[float]] = {}
  for leaf, k in leaves.items():
    if k is not None:
      parts = leaf.split("/")
      kind = "/".join(parts[1:] if parts[0].startswith("layer_") else parts)
      kinds.setdefault(kind.removesuffix("/kernel"), []).append(k)
  return sorted(((kind, float(np.median(ks))) for kind, ks in kinds.items()), key=lambda t: t[1])


def _interpretation(res: dict[str, Any]) -> list[str]:
  """Sentences computed from the numbers (so quick mode's text is as true as the full run's)."""
  if not {"e4m3", "hif8"} <= {c["fmt_m"] for c in res["cells"]}:
    return []
  c = lambda fm, fv, e: cell(res, fm, fv, e)["nmse"]  # noqa: E731
  x = lambda a, b: (f"{a / b:.1f}x above" if a >= b  # noqa: E731
                    else f"{b / a:.1f}x below")
  e4_none, e4_both = c("e4m3", "e4m3", "none"), c("e4m3", "e4m3", "both")
  e4_m, e4_v = c("e4m3", "e4m3", "m only"), c("e4m3", "e4m3", "v only")
  h_none, h_both = c("hif8", "hif8", "none"), c("hif8", "hif8", "both")
  best = min(res["cells"], key=lambda r: r["nmse"])
  km, kv = res["k"]["m/e4m3"]["quantiles"]["0.5"], res["k"]["v/e4m3"]["quantiles"]["0.5"]
  v_plain = _moment(res, "v", "e4m3", False)["mean_abs_rel_err"]
  v_exp = _moment(res, "v", "e4m3", True)["mean_abs_rel_err"]
  out = []
  if res["quick"]:
    out += ["*Quick mode: moments of a tiny model after a few steps; only the pipeline is "
            "meaningful.*", ""]
  out.append(
      f"**Expansion (E4M3/E4M3):** on both moments it lowers the normalized error of m/sqrt(v) "
      f"from {e4_none:.3g} to {e4_both:.3g}, {e4_none / e4_both:.1f}x less (COAT's Table 1: "
      f"20.10 -> 12.31, 1.6x). Expanding v alone gives {e4_v:.3g}, m alone {e4_m:.3g}: the "
      f"second moment is where the range problem is. v spans a wider range inside a group "
      f"than E4M3 holds below its amax (448/2^-9 = 2^17.8), so plain E4M3 lifts its small "
      f"entries to the smallest code (mean relative error of v {v_plain:.3g} without "
      f"expansion, {v_exp:.3g} with). Lowest cell overall: "
      f"{LABEL[best['fmt_m']]}/{LABEL[best['fmt_v']]}, expansion {best['expansion']} "
      f"({best['nmse']:.3g}).")
  out.append("")
  ans = "no" if h_none > e4_both else "yes"
  out.append(
      f"**Does HiF8's wider range make expansion unnecessary? {ans.capitalize()}, by these "
      f"numbers.** Through the codec, HiF8/HiF8 without expansion gives {h_none:.3g}, "
      f"{x(h_none, e4_both)} E4M3/E4M3 with expansion ({e4_both:.3g}); with expansion HiF8 "
      f"gives {h_both:.3g}, {x(h_both, h_none)} HiF8 without it and {x(h_both, e4_both)} "
      f"E4M3 with expansion.")
  s15 = _extra(res, ("hif8_s15", False), ("hif8_s15", False))
  q15 = _extra(res, ("hif8_q15", False), ("hif8_q15", False))
  mixed = _extra(res, ("e4m3", False), ("hif8_s15", False))
  if s15 is not None:
    out[-1] += (
        f" The codec puts each group's amax at HiF8's max (2^15), where HiF8 has 1 mantissa bit; "
        f"scaled to amax -> 15 instead (the top of its 3-bit band, no expansion) HiF8/HiF8 gives "
        f"{s15:.3g}: {x(s15, h_none)} the codec's plain HiF8 and {x(s15, e4_both)} E4M3 with "
        f"expansion. So HiF8's range does fix plain E4M3's problem ({x(s15, e4_none)} plain "
        f"E4M3/E4M3; plain E4M3 for m with that HiF8 for v: {mixed:.3g}), but its tapered "
        f"mantissa (3 bits only down to about 2^-7 of the group's amax, fewer below) keeps it "
        f"behind E4M3 with expansion.")
  if q15 is not None:
    zeroed = _moment(res, "v", "hif8_q15", False)["zeroed"]
    out[-1] += (
        f" Flushing values below HiF8's smallest subnormal to 0 (mpxla.quant as is) sets "
        f"{zeroed:,} nonzero entries of v to 0, and m/(sqrt(v)+eps) there becomes m/eps: "
        f"{q15:.3g}. The codec's rule that a nonzero value never decodes to 0 matters.")
  out.append("")
  out.append(
      f"**Expansion exponent k (E4M3):** median {km:.2f} for m and {kv:.2f} for v (COAT: about 2 "
      "and 10). m matches COAT; v's groups span a wider range here (smaller k).")
  by_kind = _k_by_kind(res, "v", "e4m3")
  if by_kind:
    out[-1] += (" Median k of v by parameter kind (median over layers): " + ", ".join(
        f"{kind} {k:.2f}" for kind, k in by_kind) + " (groups run along each leaf's last axis: "
        "a head's 32 entries for attention q/k/v, 128 elsewhere).")
  out.append("")
  out.append(
      f"Scale: the moments of one {res['elements'] / 1e6:.2f}M-parameter GPT after "
      f"{res['input'].get('step')} steps ({res['input']['source']}), not of a 7B model after "
      "billions of tokens. COAT's absolute MSE values depend on its models' moments (and a "
      "normalization its paper does not state), so compare the ratios between formats, not the "
      "values.")
  return out


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", type=pathlib.Path, default=ROOT / "experiments/results" / NAME)
  parser.add_argument("--parity", type=pathlib.Path, default=ROOT / "experiments/results/parity",
                      help="the parity section's output dir (its runs/moments_bf16_s0.npz)")
  parser.add_argument("--quick", action="store_true", help="moments of a tiny model trained here")
  args = parser.parse_args(argv)
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  argv = sys.argv[1:] if argv is None else argv
  run(args.out, args.quick, parity=args.parity,
      command=shlex.join(["python", "experiments/state_error.py", *argv]))
  print(render(args.out))


if __name__ == "__main__":
  main()
