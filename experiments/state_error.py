"""Quantization error of real AdamW states by format and expansion (COAT's Table 1 layout).

Settings and method: configs/experiments/state_error.py.

  python experiments/state_error.py [--out DIR] [--parity DIR] [--quick]
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import tempfile
from typing import Any

import harness as H
import numpy as np

NAME = "state_error"
TITLE = "3. Optimizer-state quantization error (COAT Table 1, from real AdamW states)"
_S = H.settings(NAME, quick=False)
FORMATS = tuple(_S["formats"])
GROUP_SIZE, EPS = _S["group_size"], _S["eps"]
LABEL = {"e4m3": "E4M3", "e5m2": "E5M2", "hif8": "HiF8",
         "hif8_s15": "HiF8, amax->15", "hif8_q15": "HiF8, amax->15, flush (mpxla.quant)"}
HIF8_SCALED = ("hif8_s15", "hif8_q15")  # no-expansion HiF8 scaled to amax -> 15, not 2^15
EXPANSIONS = {"none": (False, False), "m only": (True, False), "v only": (False, True),
              "both": (True, True)}  # table column -> (expand m, expand v)
K_QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def train_tiny(steps: int = _S["train_steps"], seed: int = 0) -> tuple[dict, dict]:
  """Trains a miniature default GPT (bf16: AdamW) `steps` steps with mpxla's Trainer in a
  temporary workdir -> (parity.moments of its last checkpoint, info)."""
  import parity  # pylint: disable=import-outside-toplevel

  from mpxla.train.trainer import Trainer  # pylint: disable=import-outside-toplevel

  tiny = dict(H.flatten(_S["tiny"]), **{"optim.decay_steps": steps})
  c = H.trainer_config("configs/gpt_tiny.py", H.schedule(steps), {"eval_batches": 1}, tiny,
                       {"seed": seed})
  with tempfile.TemporaryDirectory(prefix="mpxla_state_error_") as wd:
    Trainer(c, wd).run()
    arrays = parity.moments(H.restore(wd)[2])
  return arrays, {"source": f"tiny GPT trained here ({steps} steps, {tiny})", "step": steps}


@functools.cache
def _codec(fmt: str, expansion: bool):
  """jit(tree -> (decompress(compress(tree)), compress(tree))), cached per setting; for
  HIF8_SCALED (no compressed state: None) each leaf through per-group HiF8 with amax -> 15."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from mpxla import formats, optim, quant  # pylint: disable=import-outside-toplevel
  from mpxla.optim import expansion as ex  # pylint: disable=import-outside-toplevel

  hif8_15 = dataclasses.replace(formats.HIF8, max=formats.HIF8.scale_target)

  def scaled(x):  # x: (rows, n)
    (r, n), g = x.shape, min(GROUP_SIZE, x.shape[-1])
    if fmt == "hif8_q15":  # mpxla.quant's scaling
      return quant.dequantize(quant.quantize(x, "hif8", quant.PerGroup(g, axis=-1)), x.dtype)
    # The codec without expansion (nonzero never decodes to 0), HiF8's max replaced by 15.
    xg = jnp.pad(x, [(0, 0), (0, -n % g)]).reshape(r, -1, g)
    return ex.fake_quantize(xg, hif8_15, expansion=False).reshape(r, -1)[:, :n].astype(x.dtype)

  def f(tree):
    if fmt in HIF8_SCALED:
      return jax.tree.map(scaled, tree), None
    c = optim.compress(tree, fmt=fmt, expansion=expansion, group_size=GROUP_SIZE, min_size=0)
    return optim.decompress(c), c

  return jax.jit(f)


def roundtrip(tree: dict[str, Any], fmt: str, expansion: bool):
  """(decoded tree, k16 tree or None, amax tree; k16, amax: (rows, groups per row) per leaf) of
  `tree` through mpxla.optim's compress and decompress (HIF8_SCALED: see _codec, no k16, amax).
  The rows of all leaves of one last-axis length are compressed as one 2-D array (groups never
  cross rows: each leaf's codes are its own), with far fewer leaves to compile."""
  from mpxla import optim  # pylint: disable=import-outside-toplevel

  if fmt in HIF8_SCALED and expansion:
    raise ValueError(f"fmt={fmt!r} is a no-expansion comparison only.")
  rows = {k: np.asarray(x).reshape(-1, (np.shape(x) or (1,))[-1]) for k, x in tree.items()}
  by_n: dict[str, list] = {}
  for k in sorted(tree):
    by_n.setdefault(str(rows[k].shape[1]), []).append(k)
  decoded, comp = _codec(fmt, bool(expansion))(
      {n: np.concatenate([rows[k] for k in ks]) for n, ks in by_n.items()})

  def unpack(arrays, dtype=None, reshape=True):  # packed rows -> {leaf: its rows or array}
    out = {}
    for n, ks in by_n.items():
      parts = np.split(np.asarray(arrays[n], dtype), np.cumsum([len(rows[k]) for k in ks])[:-1])
      out.update({k: p.reshape(np.shape(tree[k])) if reshape else p
                  for k, p in zip(ks, parts, strict=True)})
    return out

  if comp is None:
    return unpack(decoded, np.float64), None, None
  not_compressed = [n for n, c in comp.items() if not optim.is_compressed(c)]
  if not_compressed:
    raise ValueError(f"rows of length {not_compressed} were left uncompressed by the codec")
  meta = lambda f: unpack({n: getattr(c, f) for n, c in comp.items()}, reshape=False)  # noqa: E731
  return unpack(decoded, np.float64), (meta("k16") if expansion else None), meta("amax")


def _flat(tree: dict[str, Any]):
  return np.concatenate([np.asarray(tree[k], np.float64).ravel() for k in sorted(tree)])


def update_direction(m, v, eps: float = EPS):
  """u = m / (sqrt(v) + eps) in float64."""
  return np.asarray(m, np.float64) / (np.sqrt(np.asarray(v, np.float64)) + eps)


def error_table(mu: dict[str, Any], nu: dict[str, Any], eps: float = EPS,
                formats: tuple[str, ...] = FORMATS) -> dict[str, Any]:
  """Every (fmt_m, fmt_v, expansion column) cell, per-moment errors and k distributions."""
  m, v = _flat(mu), _flat(nu)
  u = update_direction(m, v, eps)
  mean_u2 = float(np.mean(u * u))
  dq, per_moment, k_stats, k_hist, k_by_leaf = {}, [], {}, {}, {}  # dq: (moment, fmt, exp) -> x
  variants = [(f, e) for f in formats for e in (False, True)]
  variants += [(f, False) for f in HIF8_SCALED if "hif8" in formats]
  for fmt, exp in variants:
    for name, tree, ref in (("m", mu, m), ("v", nu, v)):
      decoded, k16, amax = roundtrip(tree, fmt, exp)
      x = dq[name, fmt, exp] = _flat(decoded)
      nz = ref != 0
      per_moment.append({
          "moment": name, "fmt": fmt, "expansion": exp,
          "nmse": float(np.sum((x - ref) ** 2) / np.sum(ref ** 2)),
          "mean_abs_rel_err": float(np.mean(np.abs(x[nz] - ref[nz]) / np.abs(ref[nz]))),
          "zeroed": int(np.sum(nz & (x == 0)))})
      if exp:
        k16_all = np.concatenate([k16[k].ravel() for k in sorted(k16)])
        used = np.concatenate([amax[k].ravel() for k in sorted(amax)]) > 0
        k_by_leaf.setdefault(name, {})[fmt] = {
            leaf: float(np.median(k16[leaf][amax[leaf] > 0]) / 16.0) if np.any(amax[leaf] > 0)
            else None for leaf in sorted(k16)}
        k = k16_all[used].astype(np.float64) / 16.0
        k_stats[f"{name}/{fmt}"] = {
            "groups": int(k16_all.size), "zero_groups": int((~used).sum()),
            "mean": float(k.mean()), "clamped_max": int((k16_all[used] == 255).sum()),
            "quantiles": {str(q): float(np.quantile(k, q)) for q in K_QUANTILES}}
        k_hist[f"{name}/{fmt}"] = np.bincount(k16_all[used], minlength=256).tolist()

  def mse(var_m, var_v):
    e = float(np.mean((update_direction(dq[("m", *var_m)], dq[("v", *var_v)], eps) - u) ** 2))
    return {"mse": e, "nmse": e / mean_u2}

  cells = [{"fmt_m": fm, "fmt_v": fv, "expansion": col, **mse((fm, em), (fv, ev))}
           for fm in formats for fv in formats for col, (em, ev) in EXPANSIONS.items()]
  # HiF8 without expansion, scaled as mpxla.quant does (amax -> 15) instead of to 2^15.
  s15, q15, e4m3 = ("hif8_s15", False), ("hif8_q15", False), ("e4m3", False)
  extra = [{"m": list(a), "v": list(b), **mse(a, b)} for a, b in (
      (s15, s15), (q15, q15), (("e4m3", True), s15), (s15, ("e4m3", True)), (e4m3, s15))
           ] if {"hif8", "e4m3"} <= set(formats) else []
  return {"elements": int(m.size), "leaves": len(mu), "mean_u2": mean_u2, "eps": eps,
          "cells": cells, "extra_cells": extra, "per_moment": per_moment, "k": k_stats,
          "k_hist": k_hist, "k_median_by_leaf": k_by_leaf}


def cell(res: dict[str, Any], fmt_m: str, fmt_v: str, expansion: str) -> dict[str, float]:
  """The table cell for (fmt_m, fmt_v, expansion column); KeyError if there is none."""
  cells = {(c["fmt_m"], c["fmt_v"], c["expansion"]): c for c in res["cells"]}
  return cells[fmt_m, fmt_v, expansion]


def run(out_dir: pathlib.Path, quick: bool = False, *, parity: pathlib.Path | None = None,
        command: str | None = None) -> dict[str, Any]:
  """The error table of the parity run's bf16 seed-0 moments (quick, or if they are missing: of
  a tiny GPT trained here) -> out_dir/results.json."""
  parity = pathlib.Path(parity or H.RESULTS / "parity")
  npz, summary = parity / "runs" / "moments_bf16_s0.npz", parity / "runs/bf16_s0/summary.json"
  start = H.clock()
  if not quick and npz.exists():
    with np.load(npz) as z:
      arrays = dict(z)
    info = {"source": H.show(npz)}
    if summary.exists():
      info["step"] = json.loads(summary.read_text())["steps"]
  else:
    if not quick:
      print(f"[state_error] {npz} not found: training a tiny model here instead", flush=True)
    arrays, info = train_tiny()
  mu, nu = ({k[3:]: a for k, a in arrays.items() if k.startswith(f)} for f in ("mu/", "nu/"))
  if not mu or set(mu) != set(nu):
    raise ValueError(f"{info['source']}: expected matching 'mu/<path>' and 'nu/<path>' arrays.")
  return H.save(out_dir, {
      **error_table(mu, nu), "name": NAME, "quick": quick, "input": info,
      "group_size": GROUP_SIZE, **H.metadata(start, command or (
          f"python experiments/state_error.py --out {out_dir}" + (" --quick" if quick else "")))})


def plot_k(res: dict[str, Any], path: pathlib.Path) -> None:
  """Histograms of the expansion exponent k over the groups of m and of v (E4M3 and HiF8)."""
  fig, axes = H.pyplot().subplots(1, 2, figsize=(10, 3.6))
  for ax, name, title in zip(axes, ("m", "v"), ("first moment m", "second moment v"), strict=True):
    for fmt, color in (("e4m3", "tab:red"), ("hif8", "tab:green"), ("e5m2", "tab:blue")):
      if f"{name}/{fmt}" in res["k_hist"]:
        counts = np.asarray(res["k_hist"][f"{name}/{fmt}"], np.float64)
        med = res["k"][f"{name}/{fmt}"]["quantiles"]["0.5"]
        ax.step(np.arange(256) / 16.0, counts / counts.sum(), where="mid", color=color,
                label=f"{LABEL[fmt]} (median {med:.2f})")
    ax.set_xlim(0, 16)
    H.style(ax, "k (expansion exponent, 1/16 grid)", "fraction of groups",
            f"{title}: k per group (<= {res['group_size']} elements)")
  H.save_figure(fig, path, dpi=90)


def render(out_dir: pathlib.Path) -> str:
  out_dir, res = H.load(out_dir)
  plot_k(res, out_dir / "state_error_k.png")
  src = res["input"]
  lines = H.command_block(res, f"{res['wall_time_s']:.0f} s on {res['cpu_count']} CPU cores "
                          "shared with other jobs") + [
      f"Input: {src['source']} (step {src.get('step')}), {res['leaves']} parameter leaves, "
      f"{res['elements']:,} elements per moment; codec `mpxla.optim.compress`/`decompress`, "
      f"groups of {res['group_size']} along each leaf's last axis, every leaf compressed. "
      f"Cell = MSE of u = m/(sqrt(v)+eps), eps = {res['eps']:g}, after quantize->dequantize, "
      "against u from the float32 moments (in float64). **Normalized** = MSE / mean(u^2) "
      f"(mean(u^2) = {res['mean_u2']:.4g}); absolute MSE in the second table. Columns: which "
      "moments use dynamic range expansion.", ""]
  fmts = sorted({c["fmt_m"] for c in res["cells"]}, key=FORMATS.index)
  bold = lambda x, xs: f"**{x:.4g}**" if x == min(xs) else f"{x:.4g}"  # noqa: E731
  for key, title in (("nmse", "Normalized MSE"), ("mse", "Absolute MSE")):
    vals = {(fm, fv): [cell(res, fm, fv, c)[key] for c in EXPANSIONS] for fm in fmts for fv in fmts}
    lines += [f"**{title} of m/(sqrt(v)+eps)**", ""] + H.table(
        ["m format", "v format"] + [f"expansion: {c}" for c in EXPANSIONS],
        [[LABEL[fm], LABEL[fv], *(bold(x, xs) for x in xs)] for (fm, fv), xs in vals.items()])
    lines += [""]
  lines += [H.prose(NAME, "per_moment"), ""] + H.table(
      ["moment", "format", "expansion", "normalized MSE", "mean abs rel. error", "nonzero -> 0"],
      [[r["moment"], LABEL[r["fmt"]], "yes" if r["expansion"] else "no", f"{r['nmse']:.3g}",
        f"{r['mean_abs_rel_err']:.3g}", f"{r['zeroed']:,}"] for r in res["per_moment"]])
  if res.get("extra_cells"):
    name = lambda var: LABEL[var[0]] + (" + expansion" if var[1] else "")  # noqa: E731
    lines += ["", H.prose(NAME, "hif8"), ""] + H.table(
        ["m", "v", "normalized MSE", "absolute MSE"],
        [[name(e["m"]), name(e["v"]), f"{e['nmse']:.4g}", f"{e['mse']:.4g}"]
         for e in res["extra_cells"]])
  lines += ["", "![expansion exponent k](state_error_k.png)", "", H.prose(NAME, "k"), ""]
  lines += H.table(
      ["moment", "format", "groups", "mean"] + [f"q{q * 100:g}" for q in K_QUANTILES] + ["at cap"],
      [[key.split("/")[0], LABEL[key.split("/")[1]], f"{s['groups'] - s['zero_groups']:,}",
        f"{s['mean']:.2f}", *(f"{s['quantiles'][str(q)]:.2f}" for q in K_QUANTILES),
        f"{s['clamped_max']:,}"] for key, s in res["k"].items()])
  if {"e4m3", "hif8"} <= set(fmts):
    lines += ["", H.prose(NAME, "reading", res["quick"])]
  return "\n".join(lines) + "\n"


def headline(out_dir: pathlib.Path) -> dict[str, str]:
  """Headline figures for the report's header table (label -> value)."""
  res = H.load(out_dir)[1]
  if not {"e4m3", "hif8"} <= {c["fmt_m"] for c in res["cells"]}:
    return {}
  c = lambda fm, fv, e: f"{cell(res, fm, fv, e)['nmse']:.3g}"  # noqa: E731
  return {
      "Normalized MSE of m/sqrt(v), E4M3/E4M3 without -> with expansion (COAT: 20.10 -> 12.31)":
          f"{c('e4m3', 'e4m3', 'none')} -> {c('e4m3', 'e4m3', 'both')}",
      "HiF8/HiF8 without expansion vs E4M3/E4M3 with it":
          f"{c('hif8', 'hif8', 'none')} vs {c('e4m3', 'e4m3', 'both')}"}


def main(argv: list[str] | None = None) -> None:
  args, command = H.cli(__doc__, NAME, argv, options=(
      ("--parity", dict(type=pathlib.Path, default=H.RESULTS / "parity",
                        help="the parity section's output dir (its runs/moments_bf16_s0.npz)")),))
  run(args.out, args.quick, parity=args.parity, command=command)
  print(render(args.out))


if __name__ == "__main__":
  main()
