"""Issue 8, section 6: Ghost BatchNorm at a large global batch (CNN on the 8x8 digits).

    .venv/bin/python experiments/ghost_bn.py [--out DIR] [--steps 60] [--seeds 0,1,2]
        [--variants global,local,ghost] [--quick]

Each run is mpxla's own Trainer (`configs/cnn_digits.py:VARIANT`) in this process on 8 simulated
CPU devices (mesh data=8), global batch `BATCH` = 1024 images (128 per device; the training set
has 1617 images), for the variants

  global  BatchNorm statistics over the whole global batch of 1024
  local   statistics per device shard (128 images)
  ghost   statistics per ghost batch of 16 consecutive images (64 groups)

at two learning rates: the config's 3e-3 and 3e-3 * sqrt(8) ~ 8.5e-3 (square-root scaling for an
8x larger batch than the config's 128, as Hoffer et al. 2017 pair with ghost batches). The
warmup/cosine schedule is stretched to the step count. Validation (the 180 held-out images, one
exact pass, BatchNorm with running averages) runs every `EVAL_EVERY` steps; the table gives final
accuracy and loss with mean and spread over seeds.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import shlex
import shutil
import sys
import time
from typing import Any

import _common  # experiments/_common.py

NAME = "ghost_bn"
TITLE = "6. Ghost BatchNorm at a large global batch (CNN, digits, 8 devices)"
ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "experiments" / "results" / NAME
CONFIG = "configs/cnn_digits.py"
VARIANTS = ("global", "local", "ghost")
DEVICES = 8

FULL = dict(batch=1024, steps=60, eval_every=6, seeds=(0, 1, 2), lrs=(3e-3, 3e-3 * 8 ** 0.5),
            widths=None)
QUICK = dict(batch=128, steps=3, eval_every=3, seeds=(0,), lrs=(3e-3,), widths=[8])


def make_config(variant: str, seed: int, lr: float, s: dict[str, Any]):
  """The cnn_digits config of one run (large batch, schedule stretched to the step count)."""
  from mpxla.train import config as config_lib  # pylint: disable=import-outside-toplevel

  c = config_lib.load(str(ROOT / f"{CONFIG}:{variant}"))
  c.seed = seed
  c.total_steps = s["steps"]
  c.eval_every = s["eval_every"]
  c.log_every = s["eval_every"]
  c.checkpoint_every = s["steps"]
  c.keep_checkpoints = 1
  c.progress = False
  c.plot = False
  c.data.batch_size = s["batch"]
  c.optim.lr = float(lr)
  c.optim.decay_steps = s["steps"]
  c.optim.warmup_steps = max(1, s["steps"] // 10)
  if s["widths"]:
    c.model.widths = list(s["widths"])
  return c


def train_one(variant: str, seed: int, lr: float, s: dict[str, Any],
              workdir: pathlib.Path) -> dict[str, Any]:
  """Trains one run with mpxla.train.Trainer (fresh workdir) -> its record."""
  from mpxla.train import monitor  # pylint: disable=import-outside-toplevel
  from mpxla.train.trainer import Trainer  # pylint: disable=import-outside-toplevel

  if workdir.exists():
    shutil.rmtree(workdir)
  config = make_config(variant, seed, lr, s)
  t0, c0 = time.time(), time.process_time()
  summary = Trainer(config, workdir).run()
  records = monitor.read_metrics(workdir)
  val = [(r["step"], r["val_accuracy"], r["val_loss"]) for r in records if "val_loss" in r]
  train = [(r["step"], r["loss"], r["accuracy"]) for r in records if "loss" in r]
  return {"variant": variant, "seed": seed, "lr": float(lr),
          "bn_scope": config.model.bn_scope, "ghost_batch_size": config.model.ghost_batch_size,
          "val": val, "train": train,
          "final_val_accuracy": summary["final_val_accuracy"],
          "final_val_loss": summary["final_val_loss"],
          "final_train_loss": summary["final_train_loss"],
          "wall_s": round(time.time() - t0, 1), "cpu_s": round(time.process_time() - c0, 1)}


def aggregate(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """One row per (lr, variant): final val accuracy / loss and train loss over seeds."""
  rows = []
  for lr in sorted({r["lr"] for r in runs}):
    for v in VARIANTS:
      sel = [r for r in runs if r["lr"] == lr and r["variant"] == v]
      if not sel:
        continue
      mid = len(sel[0]["val"]) // 2 - 1  # the evaluation halfway through
      rows.append({
          "lr": lr, "variant": v, "seeds": [r["seed"] for r in sel],
          "val_accuracy": _common.stats([r["final_val_accuracy"] for r in sel]),
          "val_loss": _common.stats([r["final_val_loss"] for r in sel]),
          "train_loss": _common.stats([r["final_train_loss"] for r in sel]),
          "mid_step": sel[0]["val"][mid][0],
          "mid_val_accuracy": _common.stats([r["val"][mid][1] for r in sel]),
          "mid_val_loss": _common.stats([r["val"][mid][2] for r in sel])})
  return rows


def run(out_dir: pathlib.Path, quick: bool = False, *, steps: int | None = None,
        seeds: tuple[int, ...] | None = None, variants: tuple[str, ...] = VARIANTS,
        command: str | None = None) -> dict[str, Any]:
  """Trains every (lr, variant, seed) and writes out_dir/results.json."""
  bad = [v for v in variants if v not in VARIANTS]
  if bad or not variants:
    raise ValueError(f"variants={variants!r}: choose from {VARIANTS}.")
  import jax  # pylint: disable=import-outside-toplevel

  _common.require_devices("ghost_bn", DEVICES)
  out_dir = pathlib.Path(out_dir)
  s = _common.settings(quick, QUICK, FULL, steps=steps, seeds=seeds, evals=10)
  runs_dir = out_dir / "runs"
  runs_dir.mkdir(parents=True, exist_ok=True)
  from mpxla.data.digits import Digits  # pylint: disable=import-outside-toplevel

  n_train, n_val = len(Digits("train")), len(Digits("validation"))
  t0, c0 = time.time(), time.process_time()
  runs = []
  for lr in s["lrs"]:
    for seed in s["seeds"]:
      for v in variants:
        rec = train_one(v, seed, lr, s, runs_dir / f"{v}_lr{lr:.1e}_s{seed}")
        runs.append(rec)
        print(f"[ghost_bn] lr {lr:.2e} {v:6s} seed {seed}: val acc "
              f"{rec['final_val_accuracy']:.4f} loss {rec['final_val_loss']:.4f} "
              f"({rec['cpu_s']} CPU s)", flush=True)
  results = {
      "name": NAME, "quick": quick, "config": CONFIG, "variants": list(variants),
      "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in s.items()},
      "devices": DEVICES, "per_device_batch": s["batch"] // DEVICES,
      "n_train": n_train, "n_val": n_val, "runs": runs, "table": aggregate(runs),
      "command": command or (f"python experiments/ghost_bn.py --out {out_dir}"
                             + (" --quick" if quick else "")),
      "jax_version": jax.__version__, "python": platform.python_version(),
      "cpu_count": os.cpu_count(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
      "wall_time_s": round(time.time() - t0, 1), "cpu_time_s": round(time.process_time() - c0, 1)}
  ghost = [r["ghost_batch_size"] for r in runs if r["variant"] == "ghost"]
  results["ghost_batch_size"] = ghost[0] if ghost else None
  (out_dir / "results.json").write_text(json.dumps(results, indent=1))
  return results


# --- rendering -----------------------------------------------------------------------------

_COLORS = {"global": "black", "local": "tab:blue", "ghost": "tab:red"}


def plot(res: dict[str, Any], path: pathlib.Path) -> None:
  """Per lr: validation accuracy and loss per variant (mean over seeds, band min..max), and the
  validation loss of each variant minus `global`, paired by seed."""
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  lrs = sorted({r["lr"] for r in res["runs"]})
  fig, axes = plt.subplots(len(lrs), 3, figsize=(13.5, 3.3 * len(lrs)), squeeze=False)
  for i, lr in enumerate(lrs):
    for v in res["variants"]:
      sel = [r for r in res["runs"] if r["lr"] == lr and r["variant"] == v]
      if not sel:
        continue
      steps = np.array([x[0] for x in sel[0]["val"]])
      for j, col in enumerate((1, 2)):
        ys = np.array([[x[col] for x in r["val"]] for r in sel], np.float64)
        ax = axes[i, j]
        ax.plot(steps, ys.mean(0), color=_COLORS[v], label=f"{v} ({len(sel)} seeds)")
        ax.fill_between(steps, ys.min(0), ys.max(0), color=_COLORS[v], alpha=0.15)
    ax = axes[i, 2]
    base = {r["seed"]: r for r in res["runs"] if r["lr"] == lr and r["variant"] == "global"}
    for v in res["variants"]:
      sel = [r for r in res["runs"] if r["lr"] == lr and r["variant"] == v and r["seed"] in base]
      if v == "global" or not sel:
        continue
      steps = np.array([x[0] for x in sel[0]["val"]])
      d = np.array([[x[2] - b[2] for x, b in zip(r["val"], base[r["seed"]]["val"], strict=True)]
                    for r in sel], np.float64)
      ax.plot(steps, d.mean(0), color=_COLORS[v], label=f"{v} - global")
      ax.fill_between(steps, d.min(0), d.max(0), color=_COLORS[v], alpha=0.15)
    ax.axhline(0.0, color="black", lw=0.8)
    ax.set_ylabel("validation loss difference")
    ax.set_title(f"lr {lr:.2g}: paired by seed (band min..max)")
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
      ax.legend()
    axes[i, 0].set_ylabel("validation accuracy")
    axes[i, 0].set_ylim(0.8, 1.0)
    axes[i, 1].set_ylabel("validation loss")
    axes[i, 1].set_yscale("log")
    for j in range(2):
      axes[i, j].set_title(f"lr {lr:.2g}, global batch {res['settings']['batch']}")
      axes[i, j].set_xlabel("step")
      axes[i, j].grid(alpha=0.3)
      axes[i, j].legend()
  _common.save_figure(fig, path, dpi=75)


def _pm(st: dict[str, float], fmt: str = ".4f") -> str:
  return (f"{st['mean']:{fmt}} ± {st['std']:{fmt}} ({st['min']:{fmt}} .. {st['max']:{fmt}})")


def render(out_dir: pathlib.Path) -> str:
  out_dir, res = _common.load_results(out_dir)
  png = out_dir / "ghost_bn_val.png"
  plot(res, png)
  s = res["settings"]
  n_seeds = len(s["seeds"])
  lines = [
      f"Command ({res['cpu_time_s'] / 60:.1f} CPU-min, {res['wall_time_s'] / 60:.1f} min wall on "
      f"{res['cpu_count']} shared CPU cores, jax {res['jax_version']}, {res['date'][:10]}):", "",
      "```", res["command"], "```", "",
      f"`mpxla.train.Trainer` on `{res['config']}:VARIANT`, 8 simulated CPU devices (mesh "
      f"data={res['devices']}), global batch {s['batch']} ({res['per_device_batch']} per device; "
      f"the training set has {res['n_train']} images, so one step sees "
      f"{s['batch'] / res['n_train']:.0%} of it), {s['steps']} steps, warmup {max(1, s['steps'] // 10)}"
      f" + cosine, {n_seeds} seed(s). BatchNorm statistics: `global` over all {s['batch']} images, "
      f"`local` over each device's {res['per_device_batch']}, `ghost` over groups of "
      f"{res['ghost_batch_size']}. Validation: the {res['n_val']} held-out images (one exact pass, "
      "running averages), so one image is "
      f"{1 / res['n_val']:.4f} of accuracy.", "",
      f"![validation accuracy and loss]({png.name})", "",
      "Final (step {}) and halfway (step {}) validation; mean ± std over seeds (ddof=1), "
      "(min .. max):".format(s["steps"], res["table"][0]["mid_step"] if res["table"] else "-"), "",
      "| lr | BN statistics | val accuracy | val loss | halfway val accuracy | halfway val loss "
      "| final train loss |",
      "|---|---|---|---|---|---|---|"]
  for row in res["table"]:
    lines.append(f"| {row['lr']:.2g} | `{row['variant']}` | {_pm(row['val_accuracy'])} | "
                 f"{_pm(row['val_loss'])} | {_pm(row['mid_val_accuracy'])} | "
                 f"{_pm(row['mid_val_loss'])} | {_pm(row['train_loss'])} |")
  lines += ["", "Per seed (final val accuracy / loss):", "",
            "| lr | seed | " + " | ".join(f"`{v}`" for v in res["variants"]) + " |",
            "|---|---|" + "---|" * len(res["variants"])]
  for lr in sorted({r["lr"] for r in res["runs"]}):
    for seed in s["seeds"]:
      cells = []
      for v in res["variants"]:
        r = [x for x in res["runs"] if x["lr"] == lr and x["seed"] == seed and x["variant"] == v]
        cells.append(f"{r[0]['final_val_accuracy']:.4f} / {r[0]['final_val_loss']:.4f}" if r else "-")
      lines.append(f"| {lr:.2g} | {seed} | " + " | ".join(cells) + " |")
  lines += [""] + _interpretation(res)
  return "\n".join(lines) + "\n"


def _paired(res: dict[str, Any], lr: float, variant: str, key: str, base: str = "global"):
  """Per seed: `variant` minus `base` of a final metric (same seed: same init and batches)."""
  out = []
  for seed in res["settings"]["seeds"]:
    r = {x["variant"]: x for x in res["runs"] if x["lr"] == lr and x["seed"] == seed}
    if variant in r and base in r:
      out.append(r[variant][key] - r[base][key])
  return out


def _interpretation(res: dict[str, Any]) -> list[str]:
  if res["quick"]:
    return ["*Quick mode: a miniature (narrow CNN, batch 128, a few steps); the numbers only show "
            "that the pipeline works.*"]
  out = []
  by = {(r["lr"], r["variant"]): r for r in res["table"]}
  n_val = res["n_val"]
  for lr in sorted({r["lr"] for r in res["table"]}):
    acc = {v: by[(lr, v)]["val_accuracy"] for v in res["variants"] if (lr, v) in by}
    best_acc = max(acc, key=lambda v: acc[v]["mean"])
    spread_imgs = (acc[best_acc]["mean"] - min(a["mean"] for a in acc.values())) * n_val
    line = (f"- lr {lr:.2g}: mean accuracies differ by at most {spread_imgs:.1f} validation "
            f"images (best `{best_acc}`).")
    for v in res["variants"]:
      if v == "global" or (lr, v) not in by or (lr, "global") not in by:
        continue
      dl = _paired(res, lr, v, "final_val_loss")
      dt = _paired(res, lr, v, "final_train_loss")
      sign = ("lower in every seed" if all(x < 0 for x in dl) else
              "higher in every seed" if all(x > 0 for x in dl) else "mixed in sign")
      line += (f" `{v}` minus `global`, paired by seed: validation loss " +
               ", ".join(f"{x:+.4f}" for x in dl) + f" ({sign}; mean "
               f"{100 * sum(dl) / len(dl) / by[(lr, 'global')]['val_loss']['mean']:+.0f}%), "
               "final training loss " + ", ".join(f"{x:+.4f}" for x in dt) + ".")
    mid = {v: by[(lr, v)]["mid_val_loss"]["mean"] for v in res["variants"] if (lr, v) in by}
    line += (f" Halfway (step {by[(lr, res['variants'][0])]['mid_step']}) the validation losses "
             "are " + ", ".join(f"`{v}` {x:.4f}" for v, x in mid.items()) + ".")
    out.append(line)
  lo_acc = min(r["final_val_accuracy"] for r in res["runs"])
  hi_acc = max(r["final_val_accuracy"] for r in res["runs"])
  out += ["",
          "Reading it honestly: the digits are easy, and 180 validation images resolve accuracy "
          f"only to {1 / n_val:.4f} per image, so accuracy cannot separate the variants here "
          f"(every run ends between {lo_acc:.1%} and {hi_acc:.1%}); the validation loss, paired by seed (the three variants of a seed share the "
          "initialization and the batches), is the finer measure. `local` statistics are over "
          f"{res['per_device_batch']} images per device, which estimate the batch statistics "
          "almost as well as the global "
          f"{res['settings']['batch']}, so `local` tracks `global`; the ghost batches of "
          f"{res['ghost_batch_size']} have noisier statistics, which act as a regularizer "
          "(Hoffer et al. 2017): compare the sign of the training-loss and validation-loss "
          "differences above. Scale: the config's small CNN on 8x8 images, "
          f"{res['n_train']} training images, {res['settings']['steps']} steps on CPU; the "
          "large-batch generalization gap that ghost batches address was measured on ImageNet-"
          "scale training, far from this."]
  return out


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT)
  parser.add_argument("--quick", action="store_true", help="a miniature: narrow CNN, few steps")
  parser.add_argument("--steps", type=int, default=None, help=f"steps per run ({FULL['steps']})")
  parser.add_argument("--seeds", default=None, help="comma-separated seeds (0,1,2)")
  parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated")
  args = parser.parse_args(argv)
  flag = f"--xla_force_host_platform_device_count={DEVICES}"
  if flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  sys.path.insert(0, str(ROOT))
  argv = sys.argv[1:] if argv is None else argv
  seeds = tuple(int(x) for x in args.seeds.split(",")) if args.seeds else None
  run(args.out, args.quick, steps=args.steps, seeds=seeds,
      variants=tuple(args.variants.split(",")), command=shlex.join(["python", "experiments/ghost_bn.py", *argv]))
  print(render(args.out))


if __name__ == "__main__":
  main()


def headline(out_dir: pathlib.Path) -> dict[str, str]:
  """Header figures for docs/results.md: validation accuracy and loss per BatchNorm variant."""
  table = _common.load_results(out_dir)[1]["table"]
  lr = max(row["lr"] for row in table)
  rows = [row for row in table if row["lr"] == lr]
  acc = ", ".join(f"{r['variant']} {r['val_accuracy']['mean']:.4f}" for r in rows)
  loss = ", ".join(f"{r['variant']} {r['val_loss']['mean']:.4f}" for r in rows)
  return {f"Validation accuracy at batch 1024, lr {lr:g} (mean of seeds)": acc,
          f"Validation loss at batch 1024, lr {lr:g} (mean of seeds)": loss}
