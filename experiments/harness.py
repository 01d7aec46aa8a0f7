"""The shared harness of the experiment scripts (`import harness as H`: experiments/ is on
sys.path under `python experiments/NAME.py`, experiments/report.py and tests/experiments): the
command line and XLA environment, settings (configs/experiments/<name>.py), trainer configs and
checkpoints, the run's metadata and results.json, markdown tables, plots, and the hand-written
text of docs/results.md (docs/results_prose.md).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import importlib.util
import itertools
import json
import os
import pathlib
import platform
import re
import shlex
import subprocess
import sys
import time
from typing import Any

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
PROSE = ROOT / "docs" / "results_prose.md"
QUICK_NOTE = ("*Quick mode: a miniature run; its numbers only show that the pipeline works (the "
              "text below describes the saved full run).*")


def ints(text: str) -> tuple[int, ...]:
  return tuple(int(x) for x in text.split(","))


def strs(text: str) -> tuple[str, ...]:
  return tuple(text.split(","))


def cli(doc: str, name: str, argv=None, *, script: str | None = None, devices: int | None = None,
        options=(), drop=()) -> tuple[argparse.Namespace, str]:
  """Parses `--out DIR --quick` and `options` ((flag, argparse kwargs), ...), then sets the
  environment for JAX: `devices` simulated CPU devices in XLA_FLAGS, JAX_PLATFORMS=cpu.

  Returns (args, the command as run: `python experiments/<script> ARGS`, without flags in drop).
  """
  parser = argparse.ArgumentParser(description=doc.splitlines()[0])
  parser.add_argument("--out", type=pathlib.Path, default=RESULTS / name, help="results directory")
  parser.add_argument("--quick", action="store_true", help="a miniature run of the section")
  for flag, kwargs in options:
    parser.add_argument(flag, **kwargs)
  args = parser.parse_args(argv)
  set_xla_flags(devices)
  argv = sys.argv[1:] if argv is None else argv
  return args, shlex.join(["python", f"experiments/{script or name + '.py'}",
                           *[a for a in argv if a not in drop]])


def set_xla_flags(devices: int | None = None, *flags: str) -> None:
  """Adds `flags` (and a simulated CPU device count) to XLA_FLAGS; must run before JAX starts.
  Also makes mpxla importable (PYTHONPATH, an installed package, else this checkout)."""
  if "jax" in sys.modules and (devices or flags):
    raise RuntimeError("XLA_FLAGS must be set before jax is imported (XLA reads them once).")
  old = os.environ.get("XLA_FLAGS", "").split()
  if devices:
    old = [f for f in old if not f.startswith("--xla_force_host_platform_device_count=")]
    flags = (f"--xla_force_host_platform_device_count={devices}", *flags)
  os.environ["XLA_FLAGS"] = " ".join(dict.fromkeys(old + list(flags)))
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  if importlib.util.find_spec("mpxla") is None:
    sys.path.append(str(ROOT))


def settings(name: str, quick: bool, **given) -> dict[str, Any]:
  """configs/experiments/<name>.py:quick|full as a dict, updated with the non-None `given`.

  `steps` also sets `eval_every` to steps // evals (evals: the config's number of evaluations).
  """
  spec = importlib.util.spec_from_file_location(name, ROOT / f"configs/experiments/{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  s = module.get_config("quick" if quick else "full")
  s = s.to_dict() if hasattr(s, "to_dict") else dict(s)
  if given.get("steps") and "evals" in s:
    s["eval_every"] = max(1, given["steps"] // s["evals"])
  s.update({k: v for k, v in given.items() if v is not None})
  return {k: (list(v) if isinstance(v, tuple) else v) for k, v in s.items()}


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  """{'model': {'d_ff': 8}} -> {'model.d_ff': 8}."""
  out = {}
  for k, v in tree.items():
    out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
  return out


def begin(name: str, quick: bool, out_dir, devices: int | None = None, **given):
  """(out_dir as a Path, the settings, the clock) of a run; checks the device count first."""
  if devices:
    import jax

    if jax.device_count() != devices:
      raise RuntimeError(
          f"{name} needs {devices} devices, found {jax.device_count()}: run it as a script "
          f"(main() sets XLA_FLAGS=--xla_force_host_platform_device_count={devices}) or set "
          "that flag before importing jax.")
  return pathlib.Path(out_dir), settings(name, quick, **given), clock()


def check_choice(kind: str, values, allowed) -> None:
  """Raises ValueError unless `values` is a nonempty selection of `allowed`."""
  if not values or any(v not in allowed for v in values):
    raise ValueError(f"{kind}={tuple(values or ())!r}: choose from {tuple(allowed)}.")


def trainer_config(spec: str, *overrides: dict[str, Any]):
  """mpxla.train's config of `spec` (path[:variant]) with overrides, nested or dotted (optim.lr)."""
  from mpxla.train import config as config_lib

  c = config_lib.load(str(ROOT / spec))
  with c.unlocked():
    for tree in overrides:
      for key, value in flatten(tree).items():
        *parents, leaf = key.split(".")
        node = c
        for p in parents:
          node = node[p]
        node[leaf] = list(value) if isinstance(value, tuple) else value
  return c


def schedule(steps: int, warmup_cap: int | None = 30) -> dict[str, int]:
  """Trainer overrides running `steps` steps: the warmup/cosine schedule stretched to them."""
  warm = max(1, steps // 10)
  return {"total_steps": steps, "checkpoint_every": steps, "keep_checkpoints": 1,
          "progress": False, "plot": False, "optim.decay_steps": steps,
          "optim.warmup_steps": min(warmup_cap, warm) if warmup_cap else warm}


def restore(workdir, trainer=None, one_device: bool = False):
  """(trainer, step, state) of the latest checkpoint of a trainer workdir that reads and verifies
  (Trainer.abstract_state, Checkpointer.restore_latest); the trainer is built from the workdir's
  config.json unless given, with one_device on whatever devices this process has."""
  import ml_collections

  from mpxla.train import checkpoint
  from mpxla.train.trainer import Trainer

  workdir = pathlib.Path(workdir)
  if trainer is None:
    config = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
    for k in config.mesh if one_device else ():
      config.mesh[k] = -1 if k == "data" else 1
    trainer = Trainer(config, workdir)
  ckpt = checkpoint.Checkpointer(workdir / "checkpoints", keep=1, async_save=False)
  try:
    found = ckpt.restore_latest(trainer.abstract_state(), lambda saved, step: None, print)
  finally:
    ckpt.close()
  if found is None:
    raise FileNotFoundError(f"no checkpoint in {workdir / 'checkpoints'}")
  return trainer, found[0], found[1]


def param_leaves(config) -> list[tuple[tuple, Any]]:
  """[(key path, ShapeDtypeStruct)] of the parameters of a trainer config's model (no compute)."""
  import jax

  from mpxla.train.tasks import make_task

  task = make_task(config)
  batch = jax.tree.map(lambda s: jax.numpy.zeros(s.shape, s.dtype), task.dummy_batch(1))
  return jax.tree_util.tree_flatten_with_path(
      jax.eval_shape(task.init, jax.random.key(0), batch)["params"])[0]


def sweep(fn, tag: str, describe, **axes) -> list[dict[str, Any]]:
  """fn(**point) for every point of the grid `axes` (first axis outermost), logged by describe."""
  out = []
  for values in itertools.product(*axes.values()):
    rec = fn(**dict(zip(axes, values, strict=True)))
    out.append(rec)
    print(f"[{tag}] {describe(rec)}", flush=True)
  return out


def stats(values) -> dict[str, float]:
  """mean, sample std (0 for one value), min, max and count of `values`, in float64."""
  v = np.asarray(values, np.float64)
  return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else 0.0,
          "min": float(v.min()), "max": float(v.max()), "n": int(v.size)}


def clock() -> tuple[float, float]:
  return time.time(), time.process_time()


def metadata(start: tuple[float, float], command: str, **extra) -> dict[str, Any]:
  """The run's command, versions, date, wall and CPU seconds since `start`, git state, source."""
  import jax

  return {"command": command, "jax_version": jax.__version__, "python": platform.python_version(),
          "cpu_count": os.cpu_count(),
          "date": datetime.datetime.now().isoformat(timespec="seconds"),
          "wall_time_s": round(time.time() - start[0], 1),
          "cpu_time_s": round(time.process_time() - start[1], 1), "git": git_state(),
          "source_hash": source_hash(), **extra}


def git_state() -> dict[str, Any]:
  """The commit and the files of mpxla/ that differ from it (the figures depend on both)."""
  def git(*args):
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=30).stdout

  try:
    status = git("status", "--porcelain", "--", "mpxla").splitlines()
    return {"commit": git("rev-parse", "--short", "HEAD").strip(),
            "modified": [ln.strip() for ln in status]}
  except (OSError, subprocess.SubprocessError):
    return {}


def source_hash(src: pathlib.Path = ROOT, *extra: str) -> str:
  """sha256 (12 hex digits) of src/mpxla/**/*.py and the files `extra` (paths under ROOT)."""
  h = hashlib.sha256()
  for path in sorted((src / "mpxla").rglob("*.py")):
    h.update(str(path.relative_to(src)).encode() + b"\0" + path.read_bytes())
  for name in extra:
    h.update(name.encode() + b"\0" + (ROOT / name).read_bytes())
  return h.hexdigest()[:12]


def save(out_dir, results: dict[str, Any], indent: int | None = 1) -> dict[str, Any]:
  pathlib.Path(out_dir).mkdir(parents=True, exist_ok=True)
  (pathlib.Path(out_dir) / "results.json").write_text(json.dumps(results, indent=indent))
  return results


def load(out_dir) -> tuple[pathlib.Path, dict[str, Any]]:
  """(out_dir as a Path, the dict in out_dir/results.json)."""
  out_dir = pathlib.Path(out_dir)
  return out_dir, json.loads((out_dir / "results.json").read_text())


def show(path) -> str:
  """path relative to the repository root when inside it, else absolute."""
  path = pathlib.Path(path).resolve()
  return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def table(header, rows, rule: str | None = None) -> list[str]:
  """A markdown table: header cells, rows of cells, and the rule row (default |---| per cell)."""
  line = lambda cells: "| " + " | ".join(str(c) for c in cells) + " |"  # noqa: E731
  return [line(header), rule or "|" + "---|" * len(header)] + [line(r) for r in rows]


def command_block(res: dict[str, Any], how: str) -> list[str]:
  """'Command (HOW, jax V, DATE):' and the command in a code block."""
  return [f"Command ({how}, jax {res['jax_version']}, {res['date'][:10]}):", "", "```",
          res["command"], "```", ""]


def pm(st: dict[str, float], fmt: str = ".4f", spread: bool = False) -> str:
  """'mean ± std' of a stats() dict (and ' (min .. max)' with spread)."""
  out = f"{st['mean']:{fmt}} ± {st['std']:{fmt}}"
  return out + (f" ({st['min']:{fmt}} .. {st['max']:{fmt}})" if spread else "")


def pyplot():
  """matplotlib.pyplot on the Agg backend."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt


def band(ax, x, ys, color, label=None, alpha=0.15, **kwargs) -> None:
  """The mean over the rows of ys against x, shaded from their min to their max."""
  ys = np.asarray(ys, np.float64)
  ax.plot(x, ys.mean(0), color=color, label=label, **kwargs)
  ax.fill_between(x, ys.min(0), ys.max(0), color=color, alpha=alpha)


def style(ax, xlabel=None, ylabel=None, title=None, legend: bool = True, **kwargs) -> None:
  """Labels, a light grid and the legend (if anything is labelled) of an axis."""
  if xlabel:
    ax.set_xlabel(xlabel)
  if ylabel:
    ax.set_ylabel(ylabel)
  if title:
    ax.set_title(title, **kwargs)
  ax.grid(alpha=0.3)
  if legend and ax.get_legend_handles_labels()[0]:
    ax.legend()


def save_figure(fig, path, dpi: int = 90, rect=None) -> None:
  """Lays out `fig` (inside `rect` if given), writes it to `path` and closes it."""
  fig.tight_layout(**({} if rect is None else {"rect": rect}))
  fig.savefig(path, dpi=dpi)
  pyplot().close(fig)


def prose(name: str, slot: str, quick: bool = False) -> str:
  """The hand-written block `<!-- prose NAME/SLOT -->` of docs/results_prose.md (stripped);
  quick: preceded by a note that the numbers are a miniature's."""
  blocks = re.split(r"^<!-- prose (\S+) -->$", PROSE.read_text(), flags=re.M)
  text = dict(zip(blocks[1::2], blocks[2::2], strict=True)).get(f"{name}/{slot}")
  if text is None:
    raise KeyError(f"{PROSE} has no block '<!-- prose {name}/{slot} -->'")
  return (QUICK_NOTE + "\n\n" if quick else "") + text.strip()
