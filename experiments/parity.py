"""Loss parity of the recipes on the default GPT (settings, method: configs/experiments/parity.py).

  python experiments/parity.py [--out DIR] [--steps 300] [--seeds 0,1,2]
      [--recipes bf16,fp8_linear,coat,hif8,bf16_sr,coat_sr] [--eval-every 25] [--reuse] [--quick]

--reuse keeps finished runs: a workdir's, or a run of the saved results.json whose workdir is gone.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shlex
import shutil
import subprocess
import sys
import time
from typing import Any

import harness as H
import numpy as np

NAME = "parity"
TITLE = "2. Loss parity (default GPT, six recipes, three seeds)"
CONFIG = "configs/gpt_tiny.py"
RECIPES = ("bf16", "fp8_linear", "coat", "hif8", "mxfp8", "bf16_sr", "coat_sr")
COUNTERPART = {"bf16_sr": "bf16", "coat_sr": "coat"}  # the same recipe with float32 master weights
DUMP_RECIPES = ("bf16", "coat")  # seed-0 moments written for experiments/state_error.py
GOAL_PCT = 1.0  # coat's final validation loss within 1% of bf16's
QUICK = H.settings(NAME, quick=True)
COLORS = {"bf16": "black", "fp8_linear": "tab:blue", "coat": "tab:red", "hif8": "tab:green",
          "bf16_sr": "tab:gray", "coat_sr": "tab:purple"}


def train_one(recipe: str, seed: int, workdir: pathlib.Path, s: dict[str, Any], reuse: bool = False,
              in_process: bool = False) -> dict[str, Any]:
  """Trains one run (fresh workdir unless `reuse` and it finished) -> its record: a subprocess
  (`python -m mpxla.train ...`, one CPU device), or with in_process=True the same config here."""
  overrides = {"seed": seed, **H.schedule(s["steps"]), "eval_every": s["eval_every"],
               "eval_batches": s["eval_batches"], **H.flatten(s["overrides"] or {})}
  cmd = [sys.executable, "-m", "mpxla.train", f"--config={CONFIG}:{recipe}",
         f"--workdir={H.show(workdir)}"] + [f"--config.{k}={v}" for k, v in overrides.items()]
  summary, timing = workdir / "summary.json", workdir / "parity_timing.json"
  done = reuse and summary.exists() and json.loads(summary.read_text()).get("steps") == s["steps"]
  wall = json.loads(timing.read_text())["process_wall_s"] if done and timing.exists() else None
  if not done:
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    returncode, t0 = 0, time.time()
    with open(workdir / "log.txt", "w") as log:
      if in_process:
        from mpxla.train.trainer import Trainer  # pylint: disable=import-outside-toplevel

        with contextlib.redirect_stdout(log):
          Trainer(H.trainer_config(f"{CONFIG}:{recipe}", overrides), workdir).run()
      else:  # without a forced host device count inherited from tests
        flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
                 if not f.startswith("--xla_force_host_platform_device_count")]
        env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=" ".join(flags))
        returncode = subprocess.run(cmd, cwd=H.ROOT, env=env, stdout=log,
                                    stderr=subprocess.STDOUT, timeout=3600).returncode
    if returncode != 0:
      tail = (workdir / "log.txt").read_text()[-3000:]
      raise RuntimeError(f"run {recipe} seed {seed} failed (exit {returncode}):\n{tail}")
    wall = round(time.time() - t0, 1)
    timing.write_text(json.dumps({"process_wall_s": wall}))
  summary = json.loads(summary.read_text())
  records = [json.loads(ln) for ln in (workdir / "metrics.jsonl").read_text().splitlines() if ln]
  return {"recipe": recipe, "seed": seed, "workdir": str(workdir.relative_to(workdir.parents[1])),
          "command": shlex.join([os.path.relpath(cmd[0], H.ROOT)] + cmd[1:]),
          "val": [(r["step"], r["val_loss"]) for r in records if "val_loss" in r],
          "train": [(r["step"], r["loss"]) for r in records if "loss" in r],
          **{k: summary[k] for k in ("final_val_loss", "final_train_loss")},
          "train_wall_s": summary["wall_time_s"], "tokens_per_s": summary.get("tokens_per_s"),
          "process_wall_s": wall}


def moments(state: Any) -> dict[str, Any]:
  """{'mu/<path>': float32, 'nu/<path>': float32} of the (decompressed) AdamW state."""
  import jax  # pylint: disable=import-outside-toplevel

  from mpxla.optim import decompress  # pylint: disable=import-outside-toplevel

  is_adam = lambda s: hasattr(s, "mu") and hasattr(s, "nu")  # noqa: E731
  opt_state = decompress(state["opt_state"], np.float32)
  adam = [s for s in jax.tree.leaves(opt_state, is_leaf=is_adam) if is_adam(s)]
  if len(adam) != 1:
    raise ValueError(f"expected one AdamW (mu, nu) state in opt_state, found {len(adam)}.")
  return {f"{f}/{jax.tree_util.keystr(path, simple=True, separator='/')}": np.asarray(x, np.float32)
          for f in ("mu", "nu")
          for path, x in jax.tree_util.tree_flatten_with_path(getattr(adam[0], f))[0]}


def dump_moments(workdir: pathlib.Path, path: pathlib.Path) -> dict[str, Any]:
  """Writes the AdamW moments of `workdir`'s last checkpoint to the npz `path` -> a summary."""
  trainer, step, state = H.restore(workdir)
  arrays = moments(state)
  np.savez(path, **arrays)
  n = sum(a.size for k, a in arrays.items() if k.startswith("mu/"))
  return {"path": path.name, "step": int(step), "recipe": trainer.config.recipe,
          "seed": int(trainer.config.seed), "leaves": len(arrays) // 2,
          "elements_per_moment": int(n)}


def paired(runs: list[dict[str, Any]], seeds, recipe: str, base: str) -> dict[str, float] | None:
  """Stats over seeds of recipe's final validation loss vs base's of the same seed, in %."""
  final = {(x["recipe"], x["seed"]): x["final_val_loss"] for x in runs}
  pct = [100.0 * (final[recipe, s] / final[base, s] - 1.0) for s in seeds
         if (recipe, s) in final and (base, s) in final]
  return H.stats(pct) if pct else None


def aggregate(runs: list[dict[str, Any]], recipes, seeds) -> dict[str, Any]:
  """Per recipe: final losses over seeds, % difference to bf16 (of the means; paired by seed)."""
  loss = lambda r, key: H.stats([x[key] for x in runs if x["recipe"] == r])  # noqa: E731
  table = {r: {"final_val_loss": loss(r, "final_val_loss"),
               "final_train_loss": loss(r, "final_train_loss")} for r in recipes}
  if "bf16" in table:
    base = table["bf16"]["final_val_loss"]["mean"]
    for r, row in table.items():
      row["rel_to_bf16_pct"] = 100.0 * (row["final_val_loss"]["mean"] / base - 1.0)
      row["paired_rel_to_bf16_pct"] = paired(runs, seeds, r, "bf16")
  return table


def run(out_dir: pathlib.Path, quick: bool = False, *, reuse: bool = False,
        command: str | None = None, **given) -> dict[str, Any]:
  """Trains every (recipe, seed) and the longer runs (settings updated with `given`: steps, seeds,
  recipes, eval_every), dumps seed-0 moments -> out_dir/results.json; reuse keeps finished runs
  (wall times: their workdir's or the last results')."""
  out_dir, s, start = H.begin(NAME, quick, out_dir, **given)
  H.check_choice("recipes", s["recipes"], RECIPES)
  (out_dir / "runs").mkdir(parents=True, exist_ok=True)
  previous, dumps = {}, []
  if reuse and (out_dir / "results.json").exists():
    old = H.load(out_dir)[1]
    if old.get("steps") == s["steps"]:
      previous = {r["workdir"]: r for r in old["runs"] + (old.get("long") or {}).get("runs", [])}
      dumps = old.get("moments", [])

  def one(seed, recipe, prefix="", **over):  # seed-major: seed 0 (and its moments) first
    wd, s1 = out_dir / "runs" / f"{prefix}{recipe}_s{seed}", {**s, **over}
    old = previous.get(f"runs/{wd.name}")
    if old and old["val"][-1][0] == s1["steps"] and not (wd / "summary.json").exists():
      return old  # a finished run of the saved results whose workdir is gone
    rec = train_one(recipe, seed, wd, s1, reuse=reuse, in_process=quick)
    rec["process_wall_s"] = rec["process_wall_s"] or (old or {}).get("process_wall_s")
    if not prefix and seed == s["seeds"][0] and recipe in DUMP_RECIPES:
      dumps[:] = [m for m in dumps if m["recipe"] != recipe] + [
          dump_moments(wd, out_dir / "runs" / f"moments_{recipe}_s{seed}.npz")]
    return rec

  log = lambda r: (f"{r['workdir']}: final val {r['final_val_loss']:.4f} "  # noqa: E731
                   f"(process {r['process_wall_s']} s)")
  runs = H.sweep(one, NAME, log, seed=s["seeds"], recipe=s["recipes"])
  cfg, long = s["long"], None  # one longer run per recipe of cfg (if they are all run)
  if cfg and set(cfg["recipes"]) <= set(s["recipes"]):
    long = dict(cfg, runs=H.sweep(lambda recipe: one(
        cfg["seed"], recipe, "long_", steps=cfg["steps"], eval_every=cfg["eval_every"]),
        NAME, log, recipe=cfg["recipes"]))
  c = H.trainer_config(CONFIG, s["overrides"])
  return H.save(out_dir, {
      "name": NAME, "quick": quick, "config": CONFIG, "recipes": s["recipes"], "seeds": s["seeds"],
      "steps": s["steps"], "eval_every": s["eval_every"], "eval_batches": s["eval_batches"],
      "model_overrides": H.flatten(s["overrides"]), "runs": runs,
      "table": aggregate(runs, s["recipes"], s["seeds"]), "moments": dumps, "goal_pct": GOAL_PCT,
      "no_master": [r for r in s["no_master"] if r in s["recipes"]], "long": long,
      "tokens_per_run": s["steps"] * c.data.batch_size * c.data.seq_len,
      "params": int(sum(x.size for _, x in H.param_leaves(c))),
      **H.metadata(start, command or f"python experiments/parity.py --out {out_dir}"
                   + (" --quick" if quick else ""))})


def plot(res: dict[str, Any], path: pathlib.Path, long: bool = False) -> None:
  """Validation loss per recipe (left, band: min..max over seeds) and its % gap per step to the
  base's mean (right): bf16, or for the longer run (one seed) its first recipe."""
  if long:
    recipes, runs, base = res["long"]["recipes"], res["long"]["runs"], res["long"]["recipes"][0]
  else:
    recipes = [r for r in res["recipes"] if r not in res.get("no_master", ())]
    runs, base = [x for x in res["runs"] if x["recipe"] in recipes], "bf16"
  steps = {x["recipe"]: [s for s, _ in x["val"]] for x in runs[::-1]}  # the first run's
  ys = {r: np.array([[v for _, v in x["val"]] for x in runs if x["recipe"] == r], np.float64)
        for r in recipes}
  fig, (ax, ax2) = H.pyplot().subplots(1, 2, figsize=(11, 4.2))
  for r, y in ys.items():
    H.band(ax, steps[r], y, COLORS.get(r), r if long else f"{r} ({y.shape[0]} seeds)")
    if base in ys and not (long and r == base):
      H.band(ax2, steps[r], 100.0 * (y / ys[base].mean(0) - 1.0), COLORS.get(r),
             f"{r} vs {base}" if long else r, alpha=0.12, marker="o" if long else None, ms=3)
  top = (ys[base][0, max(0, min(1, ys[base].shape[1] - 2))] if long
         else max(x["val"][min(1, len(x["val"]) - 1)][1] for x in runs))  # 2nd evaluation
  ax.set_ylim(min(y.min() for y in ys.values()) - 0.05, top + 0.05)
  title = (f"seed {res['long']['seed']}, {res['long']['steps']} steps" if long
           else "validation loss: mean over seeds, band = min..max")
  H.style(ax, "step", "validation loss (nats/byte)", title)
  p = long and paired(res["runs"], res["seeds"], recipes[-1], base)
  if p:
    ax2.axhspan(p["min"], p["max"], color="gray", alpha=0.15,
                label=f"{res['steps']}-step runs: min..max over seeds")
  ax2.axhline(0.0, color="black", lw=0.8)
  if not long:
    ax2.axhline(res["goal_pct"], color="gray", lw=0.8, ls="--", label=f"+{res['goal_pct']:g}% goal")
  H.style(ax2, "step", *(("% vs the same step", "relative gap (same seed, same batches)") if long
                         else ("% vs bf16 mean (same step)",
                               "relative to bf16 (band: min..max over seeds)")))
  H.save_figure(fig, path, dpi=90)


def _pct(p: dict[str, float] | None, std: bool = True) -> str:
  """'+mean% ± std% (min .. max)' of paired stats in % (without std), '—' for None."""
  spread = f" ± {p['std']:.2f}%" if p and std else ""
  return f"{p['mean']:+.2f}%{spread} ({p['min']:+.2f} .. {p['max']:+.2f})" if p else "—"


def render(out_dir: pathlib.Path) -> str:
  out_dir, res = H.load(out_dir)
  plot(res, out_dir / "parity_val_loss.png")
  t, pair = res["table"], lambda r, base: paired(res["runs"], res["seeds"], r, base)  # noqa: E731
  train_wall = [r["process_wall_s"] for r in res["runs"]]
  wall = (f"{sum(train_wall) / 60:.0f} min of training processes" if all(train_wall)
          else f"{res['wall_time_s'] / 60:.0f} min, reusing finished runs")
  lines = H.command_block(res, f"regenerates this section: {wall} on {res['cpu_count']} CPU cores "
                          "shared with other jobs") + [
      f"Each run is `python -m mpxla.train --config={res['config']}:RECIPE --config.seed=S` "
      f"for {res['steps']} steps (validation every {res['eval_every']} steps on the same "
      f"{res['eval_batches']} validation batches for every run), e.g.", "",
      "```", res["runs"][0]["command"], "```", "",
      "![validation loss per recipe](parity_val_loss.png)", ""]
  rows = []
  for r in (r for r in res["recipes"] if r not in res.get("no_master", ())):
    v, rel = t[r]["final_val_loss"], t[r].get("rel_to_bf16_pct")
    rows.append([f"`{r}`", f"{v['mean']:.4f}", f"{v['std']:.4f}",
                 f"{v['min']:.4f} .. {v['max']:.4f}",
                 "—" if r == "bf16" or rel is None else f"{rel:+.2f}%",
                 "—" if r == "bf16" else _pct(t[r].get("paired_rel_to_bf16_pct"), std=False),
                 f"{t[r]['final_train_loss']['mean']:.4f}"])
  lines += H.table(["recipe", "final val loss, mean", "std", "min .. max", "vs bf16 (means)",
                    "vs bf16, paired by seed (mean, min .. max)", "final train loss, mean"], rows)
  speed = {r: [x["tokens_per_s"] for x in res["runs"] if x["recipe"] == r] for r in res["recipes"]}
  lines += ["", f"std over {len(res['seeds'])} seeds (ddof=1); 'paired' compares each seed's run "
            "with the bf16 run of the same seed (same initialization and data order).", "",
            "Training throughput on this CPU (median tokens/s of each run, mean over seeds; a CPU "
            "proxy only, FP8 is emulated): " + ", ".join(
                f"`{r}` {sum(s) / len(s):,.0f}" for r, s in speed.items() if all(s)) + ".", ""]
  if res.get("moments"):
    lines += ["Moments dumped for section 3: " + ", ".join(
        f"`runs/{m['path']}` ({m['recipe']} seed {m['seed']}, step {m['step']}, {m['leaves']} "
        f"leaves, {m['elements_per_moment']:,} elements per moment)" for m in res["moments"])
              + ".", ""]
  lines += [H.prose(NAME, "reading", res["quick"]), ""]
  if res.get("no_master"):  # the recipes without float32 master weights, and the longer run
    lines += [H.prose(NAME, "no_master_intro"), ""] + H.table(
        ["recipe", "final val loss, mean", "std", "vs bf16, paired by seed",
         "vs its float32-master counterpart, paired", "final train loss, mean"],
        [[f"`{r}`", *(f"{t[r]['final_val_loss'][k]:.4f}" for k in ("mean", "std")),
          _pct(pair(r, "bf16")), f"vs `{COUNTERPART[r]}`: " + _pct(pair(r, COUNTERPART[r]))
          if r in COUNTERPART else "—", f"{t[r]['final_train_loss']['mean']:.4f}"]
         for r in res["no_master"] if r in t])
  long = res.get("no_master") and res.get("long")
  if long:
    val = {x["recipe"]: dict(x["val"]) for x in long["runs"]}
    base, other = long["recipes"][0], long["recipes"][-1]
    p, b = pair(other, base), t[base]["final_val_loss"]
    plot(res, out_dir / "parity_long.png", long=True)
    lines += ["", f"**Longer run**: `{base}` and `{other}`, seed {long['seed']}, "
              f"{long['steps']} steps ({long['steps'] // res['steps']}x; warmup and cosine "
              f"stretched to them), validation every {long['eval_every']} steps on the same "
              "batches:", "", "![longer run](parity_long.png)", ""]
    lines += H.table(["step"] + [f"`{r}` val loss" for r in (base, other)]
                     + [f"`{other}` vs `{base}`"],
                     [[st, f"{val[base][st]:.4f}", f"{val[other][st]:.4f}",
                       f"{100.0 * (val[other][st] / val[base][st] - 1.0):+.2f}%"]
                      for st in val[base] if st % (long["steps"] // 6) == 0])
    lines += ["", "Final train loss: " + ", ".join(
        f"`{x['recipe']}` {x['final_train_loss']:.4f}" for x in long["runs"]) + "; for scale, "
        f"the seed-to-seed std of `{other}` vs `{base}` at {res['steps']} steps (paired) is "
        + (f"{p['std']:.2f}%" if p else "—") + f", that of `{base}` alone "
        f"{100 * b['std'] / b['mean']:.2f}% of its mean.", "", H.prose(NAME, "no_master")]
  return "\n".join(lines + [""]).rstrip() + "\n"


def headline(out_dir: pathlib.Path) -> dict[str, str]:
  """Headline figures for the report's header table (label -> value)."""
  res = H.load(out_dir)[1]
  t, out = res["table"], {}
  for r, note in (("coat", ""), ("coat_sr", " (no float32 master weights)")):
    if r in t and "bf16" in t:
      out[f"Final validation loss, bf16 -> {r}{note} ({len(res['seeds'])} seeds, "
          f"{res['steps']} steps; goal within {res['goal_pct']:g}%)"] = (
          f"{t['bf16']['final_val_loss']['mean']:.4f} -> {t[r]['final_val_loss']['mean']:.4f} "
          f"({t[r]['rel_to_bf16_pct']:+.2f}%)")
  return out if "coat" in t else {}


def main(argv: list[str] | None = None) -> None:
  args, command = H.cli(__doc__, NAME, argv, drop=("--reuse",), options=(
      ("--steps", dict(type=int, help="training steps per run (300)")),
      ("--seeds", dict(type=H.ints, help="comma-separated seeds (0,1,2)")),
      ("--recipes", dict(type=H.strs, help="comma-separated (" + ",".join(RECIPES) + ")")),
      ("--eval-every", dict(type=int, help="(25)")),
      ("--reuse", dict(action="store_true", help="keep finished runs of the same step count"))))
  run(args.out, args.quick, steps=args.steps, seeds=args.seeds, recipes=args.recipes,
      eval_every=args.eval_every, reuse=args.reuse, command=command)
  print(render(args.out))


if __name__ == "__main__":
  main()
