"""Ghost BatchNorm at a large global batch: a CNN on the 8x8 digits, 8 simulated CPU devices
(settings and method: configs/experiments/ghost_bn.py).

    python experiments/ghost_bn.py [--out DIR] [--steps 60] [--seeds 0,1,2]
        [--variants global,local,ghost] [--quick]
"""

from __future__ import annotations

import functools
import itertools
import shutil

import harness as H

NAME = "ghost_bn"
TITLE = "6. Ghost BatchNorm at a large global batch (CNN, digits, 8 devices)"
CONFIG = "configs/cnn_digits.py"
VARIANTS = ("global", "local", "ghost")
DEVICES = 8
COLORS = {"global": "black", "local": "tab:blue", "ghost": "tab:red"}


def train_one(lr: float, seed: int, variant: str, s: dict, runs_dir) -> dict:
  """Trains one run with mpxla.train.Trainer (fresh workdir) -> its record."""
  from mpxla.train import monitor
  from mpxla.train.trainer import Trainer

  workdir = runs_dir / f"{variant}_lr{lr:.1e}_s{seed}"
  shutil.rmtree(workdir, ignore_errors=True)
  config = H.trainer_config(f"{CONFIG}:{variant}", H.schedule(s["steps"], warmup_cap=None), {
      "seed": seed, "eval_every": s["eval_every"], "log_every": s["eval_every"],
      "data.batch_size": s["batch"], "optim.lr": float(lr)},
      {"model.widths": s["widths"]} if s["widths"] else {})
  start = H.clock()
  summary = Trainer(config, workdir).run()
  records = monitor.read_metrics(workdir)
  end = H.clock()
  return {"variant": variant, "seed": seed, "lr": float(lr),
          "bn_scope": config.model.bn_scope, "ghost_batch_size": config.model.ghost_batch_size,
          "val": [(r["step"], r["val_accuracy"], r["val_loss"])
                  for r in records if "val_loss" in r],
          "train": [(r["step"], r["loss"], r["accuracy"]) for r in records if "loss" in r],
          **{k: summary[k] for k in ("final_val_accuracy", "final_val_loss", "final_train_loss")},
          "wall_s": round(end[0] - start[0], 1), "cpu_s": round(end[1] - start[1], 1)}


def aggregate(runs: list[dict]) -> list[dict]:
  """One row per (lr, variant): final and halfway validation and final train loss over seeds."""
  rows = []
  for lr, v in itertools.product(sorted({r["lr"] for r in runs}), VARIANTS):
    sel = [r for r in runs if r["lr"] == lr and r["variant"] == v]
    if sel:
      mid = len(sel[0]["val"]) // 2 - 1  # the evaluation halfway through
      rows.append({"lr": lr, "variant": v, "seeds": [r["seed"] for r in sel],
                   **{k: H.stats([r[f"final_{k}"] for r in sel])
                      for k in ("val_accuracy", "val_loss", "train_loss")},
                   "mid_step": sel[0]["val"][mid][0],
                   "mid_val_accuracy": H.stats([r["val"][mid][1] for r in sel]),
                   "mid_val_loss": H.stats([r["val"][mid][2] for r in sel])})
  return rows


def run(out_dir, quick: bool = False, *, steps: int | None = None, seeds=None,
        variants=VARIANTS, command: str | None = None) -> dict:
  """Trains every (lr, variant, seed) and writes out_dir/results.json."""
  H.check_choice("variants", variants, VARIANTS)
  out_dir, s, start = H.begin(NAME, quick, out_dir, DEVICES, steps=steps, seeds=seeds)
  from mpxla.data.digits import Digits

  runs = H.sweep(functools.partial(train_one, s=s, runs_dir=out_dir / "runs"), NAME,
                 lambda r: f"lr {r['lr']:.2e} {r['variant']:6s} seed {r['seed']}: val acc "
                 f"{r['final_val_accuracy']:.4f} loss {r['final_val_loss']:.4f} "
                 f"({r['cpu_s']} CPU s)", lr=s["lrs"], seed=s["seeds"], variant=variants)
  ghost = [r["ghost_batch_size"] for r in runs if r["variant"] == "ghost"]
  return H.save(out_dir, {
      "name": NAME, "quick": quick, "config": CONFIG, "variants": list(variants), "settings": s,
      "devices": DEVICES, "per_device_batch": s["batch"] // DEVICES,
      "n_train": len(Digits("train")), "n_val": len(Digits("validation")), "runs": runs,
      "table": aggregate(runs), "ghost_batch_size": ghost[0] if ghost else None,
      **H.metadata(start, command or f"python experiments/ghost_bn.py --out {out_dir}"
                   + (" --quick" if quick else ""))})


def plot(res: dict, path) -> None:
  """Per lr: validation accuracy and loss per variant (mean over seeds, band min..max), and the
  validation loss of each variant minus `global`, paired by seed."""
  lrs = sorted({r["lr"] for r in res["runs"]})
  fig, axes = H.pyplot().subplots(len(lrs), 3, figsize=(13.5, 3.3 * len(lrs)), squeeze=False)
  for ax, lr in zip(axes, lrs, strict=True):
    base = {r["seed"]: r["val"] for r in res["runs"] if r["lr"] == lr and r["variant"] == "global"}
    for v in res["variants"]:
      sel = [r for r in res["runs"] if r["lr"] == lr and r["variant"] == v]
      steps = [x[0] for x in sel[0]["val"]]
      for j in (0, 1):  # accuracy, loss
        H.band(ax[j], steps, [[x[j + 1] for x in r["val"]] for r in sel], COLORS[v],
               f"{v} ({len(sel)} seeds)")
      if v != "global" and base:
        H.band(ax[2], steps, [[x[2] - b[2] for x, b in zip(r["val"], base[r["seed"]], strict=True)]
                              for r in sel], COLORS[v], f"{v} - global")
    ax[2].axhline(0.0, color="black", lw=0.8)
    H.style(ax[2], "step", "validation loss difference",
            f"lr {lr:.2g}: paired by seed (band min..max)")
    ax[0].set_ylim(0.8, 1.0)
    ax[1].set_yscale("log")
    for j, label in enumerate(("validation accuracy", "validation loss")):
      H.style(ax[j], "step", label, f"lr {lr:.2g}, global batch {res['settings']['batch']}")
  H.save_figure(fig, path, dpi=75)


def render(out_dir) -> str:
  """The section's markdown (and its plot) from out_dir/results.json."""
  out_dir, res = H.load(out_dir)
  s, variants = res["settings"], res["variants"]
  plot(res, out_dir / "ghost_bn_val.png")
  cols = ("val_accuracy", "val_loss", "mid_val_accuracy", "mid_val_loss", "train_loss")
  by = {(x["lr"], x["seed"], x["variant"]): x for x in res["runs"]}

  def final(r):
    return f"{r['final_val_accuracy']:.4f} / {r['final_val_loss']:.4f}" if r else "-"

  return "\n".join(H.command_block(res, f"{res['cpu_time_s'] / 60:.1f} CPU-min, "
                                   f"{res['wall_time_s'] / 60:.1f} min wall on "
                                   f"{res['cpu_count']} shared CPU cores") + [
      H.prose(NAME, "setup", res["quick"]), "",
      "![validation accuracy and loss](ghost_bn_val.png)", "",
      f"Final (step {s['steps']}) and halfway (step "
      f"{res['table'][0]['mid_step'] if res['table'] else '-'}) validation; mean ± std over seeds "
      "(ddof=1), (min .. max):", "",
      *H.table(["lr", "BN statistics", "val accuracy", "val loss", "halfway val accuracy",
                "halfway val loss", "final train loss"],
               [[f"{row['lr']:.2g}", f"`{row['variant']}`"]
                + [H.pm(row[k], spread=True) for k in cols] for row in res["table"]]),
      "", "Per seed (final val accuracy / loss):", "",
      *H.table(["lr", "seed"] + [f"`{v}`" for v in variants],
               [[f"{lr:.2g}", seed] + [final(by.get((lr, seed, v))) for v in variants]
                for lr in sorted({r["lr"] for r in res["runs"]}) for seed in s["seeds"]]),
      "", H.prose(NAME, "reading")]) + "\n"


def headline(out_dir) -> dict[str, str]:
  """Header figures for docs/results.md: validation accuracy and loss per BatchNorm variant."""
  table = H.load(out_dir)[1]["table"]
  lr = max(row["lr"] for row in table)
  rows = [row for row in table if row["lr"] == lr]
  return {f"Validation {name} at batch 1024, lr {lr:g} (mean of seeds)":
          ", ".join(f"{r['variant']} {r[key]['mean']:.4f}" for r in rows)
          for name, key in (("accuracy", "val_accuracy"), ("loss", "val_loss"))}


def main(argv: list[str] | None = None) -> None:
  args, command = H.cli(__doc__, NAME, argv, devices=DEVICES, options=(
      ("--steps", dict(type=int, help="steps per run (60)")),
      ("--seeds", dict(type=H.ints, help="comma-separated seeds (0,1,2)")),
      ("--variants", dict(type=H.strs, default=VARIANTS, help="comma-separated"))))
  run(args.out, args.quick, steps=args.steps, seeds=args.seeds, variants=args.variants,
      command=command)
  print(render(args.out))


if __name__ == "__main__":
  main()
