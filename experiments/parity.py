"""Loss parity of the recipes on the default GPT (settings and method: configs/experiments/parity.py).

  python experiments/parity.py [--out DIR] [--steps 300] [--seeds 0,1,2]
      [--recipes bf16,fp8_linear,coat,hif8,bf16_sr,coat_sr] [--eval-every 25] [--reuse] [--quick]

--reuse keeps finished runs: a workdir's, or a run of the saved results.json whose workdir is gone.
"""

from __future__ import annotations

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

NAME = "parity"
TITLE = "2. Loss parity (default GPT, six recipes, three seeds)"
ROOT = H.ROOT
CONFIG = "configs/gpt_tiny.py"
RECIPES = ("bf16", "fp8_linear", "coat", "hif8", "mxfp8", "bf16_sr", "coat_sr")
COUNTERPART = {"bf16_sr": "bf16", "coat_sr": "coat"}  # the same recipe with float32 master weights
DUMP_RECIPES = ("bf16", "coat")  # seed-0 moments written for experiments/state_error.py
GOAL_PCT = 1.0  # coat's final validation loss within 1% of bf16's
QUICK = H.settings(NAME, quick=True)


def _subprocess_env() -> dict[str, str]:
  """One CPU device per run (drops a forced host device count inherited from tests)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                              if not f.startswith("--xla_force_host_platform_device_count"))
  env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
  return env


def train_one(recipe: str, seed: int, workdir: pathlib.Path, s: dict[str, Any], reuse: bool = False,
              in_process: bool = False, timeout: float = 3600.0) -> dict[str, Any]:
  """Trains one run (fresh workdir unless `reuse` and it finished) -> its record: a subprocess
  (`python -m mpxla.train ...`), or with in_process=True the same config and Trainer here."""
  config_overrides = {"seed": seed, **H.schedule(s["steps"]), "eval_every": s["eval_every"],
                      "eval_batches": s["eval_batches"], **H.flatten(s["overrides"] or {})}
  cmd = [sys.executable, "-m", "mpxla.train", f"--config={CONFIG}:{recipe}",
         f"--workdir={H.show(workdir)}"] + [f"--config.{k}={v}" for k, v in config_overrides.items()]
  summary_path, timing_path = workdir / "summary.json", workdir / "parity_timing.json"
  done = (reuse and summary_path.exists()
          and json.loads(summary_path.read_text()).get("steps") == s["steps"])
  wall = json.loads(timing_path.read_text())["process_wall_s"] if done and timing_path.exists() else None
  if not done:
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    t0 = time.time()
    if in_process:
      import contextlib  # pylint: disable=import-outside-toplevel

      from mpxla.train.trainer import Trainer  # pylint: disable=import-outside-toplevel

      with open(workdir / "log.txt", "w") as log, contextlib.redirect_stdout(log):
        Trainer(H.trainer_config(f"{CONFIG}:{recipe}", config_overrides), workdir).run()
      returncode = 0
    else:
      with open(workdir / "log.txt", "w") as log:
        returncode = subprocess.run(cmd, cwd=ROOT, env=_subprocess_env(), stdout=log,
                                    stderr=subprocess.STDOUT, timeout=timeout).returncode
    wall = round(time.time() - t0, 1)
    if returncode != 0:
      tail = (workdir / "log.txt").read_text()[-3000:]
      raise RuntimeError(f"run {recipe} seed {seed} failed (exit {returncode}):\n{tail}")
    timing_path.write_text(json.dumps({"process_wall_s": wall}))
  summary = json.loads(summary_path.read_text())
  records = [json.loads(ln) for ln in (workdir / "metrics.jsonl").read_text().splitlines() if ln]
  return {"recipe": recipe, "seed": seed, "workdir": str(workdir.relative_to(workdir.parents[1])),
          "command": shlex.join([os.path.relpath(cmd[0], ROOT)] + cmd[1:]),
          "val": [(r["step"], r["val_loss"]) for r in records if "val_loss" in r],
          "train": [(r["step"], r["loss"]) for r in records if "loss" in r],
          "final_val_loss": summary["final_val_loss"],
          "final_train_loss": summary["final_train_loss"],
          "train_wall_s": summary["wall_time_s"], "tokens_per_s": summary.get("tokens_per_s"),
          "process_wall_s": wall}


# --- moments -------------------------------------------------------------------------------


def restore_state(workdir: pathlib.Path) -> tuple[int, Any, Any]:
  """(step, state, config) of a trainer workdir's latest checkpoint."""
  trainer, step, state = H.restore(workdir)
  return step, state, trainer.config


def moments(state: Any) -> dict[str, Any]:
  """{'mu/<path>': float32, 'nu/<path>': float32} of the (decompressed) AdamW state."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  from mpxla.optim import decompress  # pylint: disable=import-outside-toplevel

  adam = [s for s in jax.tree.leaves(decompress(state["opt_state"], np.float32),
                                     is_leaf=lambda s: hasattr(s, "mu") and hasattr(s, "nu"))
          if hasattr(s, "mu") and hasattr(s, "nu")]
  if len(adam) != 1:
    raise ValueError(f"expected one AdamW (mu, nu) state in opt_state, found {len(adam)}.")
  key = lambda k: str(next((getattr(k, a) for a in ("key", "name", "idx") if hasattr(k, a)), k))  # noqa: E731
  return {f + "/" + "/".join(key(k) for k in path): np.asarray(x, np.float32) for f in ("mu", "nu")
          for path, x in jax.tree_util.tree_flatten_with_path(getattr(adam[0], f))[0]}


def dump_moments(workdir: pathlib.Path, path: pathlib.Path) -> dict[str, Any]:
  """Writes the AdamW moments of `workdir`'s last checkpoint to the npz `path` -> a summary."""
  import numpy as np  # pylint: disable=import-outside-toplevel

  step, state, config = restore_state(workdir)
  arrays = moments(state)
  np.savez(path, **arrays)
  n = sum(a.size for k, a in arrays.items() if k.startswith("mu/"))
  return {"path": path.name, "step": int(step), "recipe": config.recipe, "seed": int(config.seed),
          "leaves": len(arrays) // 2, "elements_per_moment": int(n)}


# --- the experiment ------------------------------------------------------------------------


def aggregate(runs: list[dict[str, Any]], recipes) -> dict[str, Any]:
  """Per recipe: final val loss over seeds, % difference to bf16 (of the means; paired by seed)."""
  final = {r: {x["seed"]: x["final_val_loss"] for x in runs if x["recipe"] == r} for r in recipes}
  base = final.get("bf16")
  table = {}
  for r in recipes:
    row = {"final_val_loss": H.stats(list(final[r].values())),
           "final_train_loss": H.stats([x["final_train_loss"] for x in runs if x["recipe"] == r])}
    if base:
      row["rel_to_bf16_pct"] = 100.0 * (row["final_val_loss"]["mean"] / H.stats(list(base.values()))["mean"] - 1.0)
      paired = [100.0 * (final[r][s] / base[s] - 1.0) for s in final[r] if s in base]
      row["paired_rel_to_bf16_pct"] = H.stats(paired) if paired else None
    table[r] = row
  return table


def run(out_dir: pathlib.Path, quick: bool = False, *, steps: int | None = None, seeds=None,
        recipes=None, eval_every: int | None = None, reuse: bool = False,
        command: str | None = None) -> dict[str, Any]:
  """Trains every (recipe, seed), dumps seed-0 moments, writes out_dir/results.json.

  reuse keeps finished runs; their wall times come from their workdir or the last results.
  """
  out_dir, s, start = H.begin(NAME, quick, out_dir, steps=steps, seeds=seeds, recipes=recipes,
                              eval_every=eval_every)
  H.check_choice("recipes", s["recipes"], RECIPES)
  (out_dir / "runs").mkdir(parents=True, exist_ok=True)
  previous, dumps = {}, []
  if reuse and (out_dir / "results.json").exists():
    old = H.load(out_dir)[1]
    if old.get("steps") == s["steps"]:
      previous = {r["workdir"]: r for r in old["runs"] + old.get("long", {}).get("runs", [])}
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
  long = s["long"] if s["long"] and set(s["long"]["recipes"]) <= set(s["recipes"]) else None
  long = long and dict(long, runs=H.sweep(
      lambda recipe: one(s["long"]["seed"], recipe, "long_", steps=s["long"]["steps"],
                         eval_every=s["long"]["eval_every"]), NAME, log, recipe=s["long"]["recipes"]))
  c = H.trainer_config(CONFIG, s["overrides"])
  return H.save(out_dir, {
      "name": NAME, "quick": quick, "config": CONFIG, "recipes": s["recipes"], "seeds": s["seeds"],
      "steps": s["steps"], "eval_every": s["eval_every"], "eval_batches": s["eval_batches"],
      "model_overrides": H.flatten(s["overrides"]), "runs": runs,
      "table": aggregate(runs, s["recipes"]), "moments": dumps, "goal_pct": GOAL_PCT,
      "no_master": [r for r in s["no_master"] if r in s["recipes"]], "long": long,
      "tokens_per_run": s["steps"] * c.data.batch_size * c.data.seq_len,
      "params": int(sum(x.size for _, x in H.param_leaves(c))),
      **H.metadata(start, command or f"python experiments/parity.py --out {out_dir}"
                   + (" --quick" if quick else ""))})


# --- rendering -----------------------------------------------------------------------------

_COLORS = {"bf16": "black", "fp8_linear": "tab:blue", "coat": "tab:red", "hif8": "tab:green",
           "bf16_sr": "tab:gray", "coat_sr": "tab:purple"}


def _curves(res: dict[str, Any], recipe: str):
  import numpy as np  # pylint: disable=import-outside-toplevel

  runs = [r for r in res["runs"] if r["recipe"] == recipe]
  return (np.asarray([s for s, _ in runs[0]["val"]]),
          np.array([[v for _, v in r["val"]] for r in runs], np.float64))


def plot(res: dict[str, Any], path: pathlib.Path) -> None:
  """Validation loss per recipe (mean over seeds, shaded min..max) and its % gap to bf16."""
  fig, (ax, ax2) = H.pyplot().subplots(1, 2, figsize=(11, 4.2))
  base = _curves(res, "bf16")[1].mean(0) if "bf16" in res["recipes"] else None
  recipes = [r for r in res["recipes"] if r not in res.get("no_master", ())]
  for recipe in recipes:
    steps, ys = _curves(res, recipe)
    H.band(ax, steps, ys, _COLORS.get(recipe), f"{recipe} ({ys.shape[0]} seeds)")
    if base is not None:
      H.band(ax2, steps, 100.0 * (ys / base - 1.0), _COLORS.get(recipe), recipe, alpha=0.12)
  runs = [r for r in res["runs"] if r["recipe"] in recipes]
  lo = min(min(v for _, v in r["val"]) for r in runs)
  early = max(r["val"][min(1, len(r["val"]) - 1)][1] for r in runs)  # 2nd evaluation
  ax.set_ylim(lo - 0.05, early + 0.05)
  H.style(ax, "step", "validation loss (nats/byte)", "validation loss: mean over seeds, band = min..max")
  ax2.axhline(0.0, color="black", lw=0.8)
  ax2.axhline(res["goal_pct"], color="gray", lw=0.8, ls="--", label=f"+{res['goal_pct']:g}% goal")
  H.style(ax2, "step", "% vs bf16 mean (same step)", "relative to bf16 (band: min..max over seeds)")
  H.save_figure(fig, path, dpi=90)


def render(out_dir: pathlib.Path) -> str:
  out_dir, res = H.load(out_dir)
  plot(res, out_dir / "parity_val_loss.png")
  t = res["table"]
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
  for r in [r for r in res["recipes"] if r not in res.get("no_master", ())]:
    v, rel, p = t[r]["final_val_loss"], t[r].get("rel_to_bf16_pct"), t[r].get("paired_rel_to_bf16_pct")
    rows.append([f"`{r}`", f"{v['mean']:.4f}", f"{v['std']:.4f}", f"{v['min']:.4f} .. {v['max']:.4f}",
                 "—" if r == "bf16" or rel is None else f"{rel:+.2f}%",
                 "—" if r == "bf16" or not p else f"{p['mean']:+.2f}% ({p['min']:+.2f} .. {p['max']:+.2f})",
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
        f"leaves, {m['elements_per_moment']:,} elements per moment)" for m in res["moments"]) + ".", ""]
  lines += [H.prose(NAME, "reading", res["quick"]), ""]
  if res.get("no_master"):
    lines += _no_master_markdown(res, out_dir)
  return "\n".join(lines).rstrip() + "\n"


def _paired(res: dict[str, Any], recipe: str, base: str) -> dict[str, float] | None:
  """Stats over seeds of recipe's final validation loss vs base's of the same seed, in %."""
  final = {(x["recipe"], x["seed"]): x["final_val_loss"] for x in res["runs"]}
  pct = [100.0 * (final[recipe, s] / final[base, s] - 1.0) for s in res["seeds"]
         if (recipe, s) in final and (base, s) in final]
  return H.stats(pct) if pct else None


def _no_master_markdown(res: dict[str, Any], out_dir: pathlib.Path) -> list[str]:
  """The table of the recipes without float32 master weights and the longer run."""
  def pct(p):
    return "—" if p is None else f"{p['mean']:+.2f}% ± {p['std']:.2f}% ({p['min']:+.2f} .. {p['max']:+.2f})"

  t = res["table"]
  lines = ["**Without float32 master weights** (`bf16_sr`, `coat_sr`: the parameters are stored in "
           "BF16 only and updated by stochastic rounding of p + u), the same seeds, steps and "
           "validation batches as above; % paired by seed (mean ± std over seeds, min .. max):", ""]
  lines += H.table(["recipe", "final val loss, mean", "std", "vs bf16, paired by seed",
                    "vs its float32-master counterpart, paired", "final train loss, mean"], [
      [f"`{r}`", f"{t[r]['final_val_loss']['mean']:.4f}", f"{t[r]['final_val_loss']['std']:.4f}",
       pct(_paired(res, r, "bf16")),
       f"vs `{COUNTERPART[r]}`: " + pct(_paired(res, r, COUNTERPART[r])) if r in COUNTERPART else "—",
       f"{t[r]['final_train_loss']['mean']:.4f}"] for r in res["no_master"] if r in t])
  long = res.get("long")
  if not long:
    return lines + [""]
  runs = {x["recipe"]: x for x in long["runs"]}
  base, other = long["recipes"][0], long["recipes"][-1]
  plot_long(res, out_dir / "parity_long.png")
  gap = {st: 100.0 * (v / b - 1.0) for (st, v), (_, b) in zip(runs[other]["val"], runs[base]["val"],
                                                              strict=True)}
  marks = [st for st, _ in runs[base]["val"] if st % (long["steps"] // 6) == 0]
  lines += ["", f"**Longer run**: `{base}` and `{other}`, seed {long['seed']}, {long['steps']} steps "
            f"({long['steps'] // res['steps']}x; warmup and cosine stretched to them), validation "
            f"every {long['eval_every']} steps on the same batches:", "",
            "![longer run](parity_long.png)", ""]
  val = {r: dict(x["val"]) for r, x in runs.items()}
  lines += H.table(["step", f"`{base}` val loss", f"`{other}` val loss", f"`{other}` vs `{base}`"],
                   [[st, f"{val[base][st]:.4f}", f"{val[other][st]:.4f}", f"{gap[st]:+.2f}%"]
                    for st in marks])
  p, b = _paired(res, other, base), t[base]["final_val_loss"]
  lines += ["", "Final train loss: " + ", ".join(
      f"`{r}` {runs[r]['final_train_loss']:.4f}" for r in long["recipes"]) + "; for scale, the "
      f"seed-to-seed std of `{other}` vs `{base}` at {res['steps']} steps (paired) is "
      + (f"{p['std']:.2f}%" if p else "—") + f", that of `{base}` alone "
      f"{100 * b['std'] / b['mean']:.2f}% of its mean.", "", H.prose(NAME, "no_master")]
  return lines


def plot_long(res: dict[str, Any], path: pathlib.Path) -> None:
  """The longer run: validation loss per recipe and the % gap to the first recipe per step."""
  import numpy as np  # pylint: disable=import-outside-toplevel

  long = res["long"]
  runs = {x["recipe"]: np.asarray(x["val"], np.float64) for x in long["runs"]}
  base = runs[long["recipes"][0]]
  fig, (ax, ax2) = H.pyplot().subplots(1, 2, figsize=(11, 4.2))
  for r, v in runs.items():
    ax.plot(v[:, 0], v[:, 1], color=_COLORS.get(r), label=r)
    if r != long["recipes"][0]:
      ax2.plot(v[:, 0], 100.0 * (v[:, 1] / base[:, 1] - 1.0), color=_COLORS.get(r), marker="o",
               ms=3, label=f"{r} vs {long['recipes'][0]}")
  ax.set_ylim(min(v[:, 1].min() for v in runs.values()) - 0.05, base[max(0, min(1, len(base) - 2)), 1] + 0.05)
  H.style(ax, "step", "validation loss (nats/byte)", f"seed {long['seed']}, {long['steps']} steps")
  p = _paired(res, long["recipes"][-1], long["recipes"][0])
  if p:
    ax2.axhspan(p["min"], p["max"], color="gray", alpha=0.15,
                label=f"{res['steps']}-step runs: min..max over seeds")
  ax2.axhline(0.0, color="black", lw=0.8)
  H.style(ax2, "step", "% vs the same step", "relative gap (same seed, same batches)")
  H.save_figure(fig, path, dpi=90)


def headline(out_dir: pathlib.Path) -> dict[str, str]:
  """Headline figures for the report's header table (label -> value)."""
  res = H.load(out_dir)[1]
  t = res["table"]
  if "coat" not in t or "bf16" not in t:
    return {}
  b, c = t["bf16"]["final_val_loss"], t["coat"]["final_val_loss"]
  label = (f"Final validation loss, bf16 -> coat ({len(res['seeds'])} seeds, {res['steps']} steps; "
           f"goal within {res['goal_pct']:g}%)")
  out = {label: f"{b['mean']:.4f} -> {c['mean']:.4f} ({t['coat']['rel_to_bf16_pct']:+.2f}%)"}
  if "coat_sr" in t:
    out[label.replace("-> coat", "-> coat_sr (no float32 master weights)")] = (
        f"{b['mean']:.4f} -> {t['coat_sr']['final_val_loss']['mean']:.4f} "
        f"({t['coat_sr']['rel_to_bf16_pct']:+.2f}%)")
  return out


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
