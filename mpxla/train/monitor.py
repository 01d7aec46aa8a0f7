"""Watching a run: metrics.jsonl, TensorBoard events, a progress bar, memory and summary tables
(with what is live at the peak, and the bytes all-gathered), a loss plot and FP8 heatmaps."""

from __future__ import annotations

import collections
import json
import pathlib
import re
import sys
from typing import Any

import jax
import numpy as np


class MetricsWriter:
  """Appends one JSON object per call to workdir/metrics.jsonl and mirrors scalars to TensorBoard."""

  def __init__(self, workdir: pathlib.Path, enabled: bool = True):
    self.enabled = enabled
    self.path = workdir / "metrics.jsonl"
    self._tb = None
    if enabled:
      try:
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(str(workdir / "tensorboard"))
      except ImportError:  # TensorBoard is optional; metrics.jsonl is always written
        self._tb = None

  def truncate_after(self, step: int) -> None:
    """Drops records past `step` (a resumed run rewrites them, so the file has no duplicates)
    and lines that are not whole records (a full disk can leave a torn last line)."""
    if self.enabled and self.path.exists():
      keep = [r for r in read_metrics(self.path.parent, warn=True) if r["step"] <= step]
      self.path.write_text("".join(json.dumps(r) + "\n" for r in keep))

  def write(self, step: int, **scalars: float) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
    with self.path.open("a") as f:
      f.write(json.dumps(record) + "\n")
    if self._tb is not None:
      for k, v in scalars.items():
        self._tb.add_scalar(k, float(v), int(step))

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def read_metrics(workdir, warn: bool = False) -> list[dict[str, float]]:
  """The records of workdir/metrics.jsonl; lines that are not whole records are skipped."""
  path = pathlib.Path(workdir) / "metrics.jsonl"
  if not path.exists():
    return []
  records = []
  for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
    try:
      record = json.loads(line) if line.strip() else None
    except json.JSONDecodeError:
      record = None
    if isinstance(record, dict) and isinstance(record.get("step"), int):
      records.append(record)
    elif line.strip() and warn:
      print(f"warning: {path}:{n} is not a whole record (torn write?); dropped: {line[:80]!r}",
            file=sys.stderr)
  return records


def progress_bar(total: int, initial: int, enabled: bool):
  from tqdm import tqdm

  return tqdm(total=total, initial=initial, disable=not enabled, dynamic_ncols=True,
              file=sys.stderr, unit="step", mininterval=1.0)


def tree_bytes(tree) -> tuple[int, int]:
  """(total bytes, bytes on the first device) of a pytree of arrays.

  Abstract leaves (`jax.ShapeDtypeStruct` with a sharding, as in `Trainer.abstract_state()`)
  count their shard shape, so an ahead-of-time breakdown gives per-device bytes too.
  """
  total = per_device = 0
  dev = jax.devices()[0]
  for x in jax.tree.leaves(tree):
    total += x.size * x.dtype.itemsize
    shards = getattr(x, "addressable_shards", None)
    sharding = getattr(x, "sharding", None)
    if shards is not None:
      per_device += sum(s.data.size * s.data.dtype.itemsize for s in shards if s.device == dev)
    elif sharding is not None:  # abstract: the largest shard (shards of uneven splits differ)
      per_device += int(np.prod(sharding.shard_shape(x.shape))) * x.dtype.itemsize
    else:
      per_device += x.size * x.dtype.itemsize
  return total, per_device


def memory_breakdown(state, compiled) -> dict[str, int]:
  """Bytes per device of a compiled train step and its (donated) state.

  params, optimizer, model_state: the per-device shards of the state. From XLA's buffer
  assignment (where the backend gives one): step_arguments, step_outputs, step_temp,
  step_aliased, and
    grads       = the params' per-device bytes (a gradient has its parameter's shape, dtype
                  and sharding; it lives in the temps),
    activations = step_temp - grads (saved activations, transients, gathered weights,
                  optimizer temporaries),
    peak        = arguments + outputs + temp - aliased,
    other       = peak - params - grads - optimizer - activations - model_state (the batch
                  and the metrics).
  """
  ma = compiled.memory_analysis()
  out = {
      "params": tree_bytes(state["params"])[1],
      "optimizer": tree_bytes(state["opt_state"])[1],
      "model_state": tree_bytes(state["model_state"])[1],
  }
  if ma is not None:
    out.update(step_arguments=int(ma.argument_size_in_bytes), step_outputs=int(ma.output_size_in_bytes),
               step_temp=int(ma.temp_size_in_bytes), step_aliased=int(ma.alias_size_in_bytes))
    out["grads"] = out["params"]
    out["activations"] = out["step_temp"] - out["grads"]
    out["peak"] = (out["step_arguments"] + out["step_outputs"] + out["step_temp"]
                   - out["step_aliased"])
    out["other"] = out["peak"] - sum(out[k] for k in ("params", "grads", "optimizer",
                                                      "activations", "model_state"))
  return out


def format_bytes(n: float) -> str:
  for unit in ("B", "KiB", "MiB", "GiB"):
    if abs(n) < 1024 or unit == "GiB":
      return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
    n /= 1024
  return str(n)


def table(title: str, rows: dict[str, Any]) -> str:
  width = max(len(k) for k in rows)
  lines = [title] + [f"  {k.ljust(width)}  {v}" for k, v in rows.items()]
  return "\n".join(lines)


def plot_losses(workdir: pathlib.Path, records: list[dict[str, float]],
                title: str = "") -> pathlib.Path | None:
  """Training and validation loss against step, saved as workdir/loss.png."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  train = [(r["step"], r["loss"]) for r in records if "loss" in r]
  val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
  if not train and not val:
    return None
  fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
  if train:
    ax.plot(*np.array(train).T, label="train loss", lw=1)
  if val:
    ax.plot(*np.array(val).T, "o-", label="validation loss", lw=1.5)
  ax.set_xlabel("step")
  ax.set_ylabel("loss")
  ax.grid(alpha=0.3)
  ax.legend()
  if title:
    ax.set_title(title, fontsize=9)
  fig.tight_layout()
  path = workdir / "loss.png"
  fig.savefig(path)
  plt.close(fig)
  return path


def _fp8_series(records: list[dict[str, float]], stat: str):
  """(steps, tensor names '<layer>/<tensor>', values [tensors, steps]) of one FP8 statistic."""
  rows = [r for r in records if any(k.startswith("fp8/") for k in r)]
  names = sorted({k[4:-len(stat) - 1] for r in rows for k in r
                  if k.startswith("fp8/") and k.endswith("/" + stat)})
  values = np.array([[r.get(f"fp8/{n}/{stat}", np.nan) for r in rows] for n in names])
  return [r["step"] for r in rows], names, values


def plot_fp8_heatmap(workdir: pathlib.Path, records: list[dict[str, float]]) -> pathlib.Path | None:
  """Underflow and saturation of every FP8 tensor (rows) at every logged step (columns),
  saved as workdir/fp8_heatmap.png; None when the run logged no FP8 statistics."""
  steps, names, under = _fp8_series(records, "underflow")
  if not names:
    return None
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  _, _, sat = _fp8_series(records, "saturated")
  fig, axes = plt.subplots(1, 2, figsize=(11, 2 + 0.16 * len(names)), dpi=100, sharey=True)
  for ax, values, label in ((axes[0], under, "underflow (nonzero -> 0)"),
                            (axes[1], sat, "saturated (clipped at max)")):
    im = ax.imshow(values, aspect="auto", cmap="magma", vmin=0, interpolation="nearest")
    ax.set_title(label, fontsize=9)
    ax.set_xticks(range(len(steps)), [str(s) for s in steps], fontsize=7, rotation=90)
    ax.set_xlabel("step")
    fig.colorbar(im, ax=ax, fraction=0.04)
  axes[0].set_yticks(range(len(names)), names, fontsize=6)
  fig.tight_layout()
  path = workdir / "fp8_heatmap.png"
  fig.savefig(path)
  plt.close(fig)
  return path


def fp8_worst_table(stats: dict[str, float], step: int, top: int = 10) -> str:
  """The `top` FP8 tensors with the largest underflow or saturation (then amax) at `step`."""
  tensors = sorted({k.rsplit("/", 1)[0] for k in stats})
  key = lambda t: (max(stats[f"{t}/underflow"], stats[f"{t}/saturated"]),  # noqa: E731
                   stats[f"{t}/amax"])
  worst = sorted(tensors, key=key, reverse=True)[:top]
  width = max(len(t) for t in worst)
  lines = [f"FP8 statistics at step {step} (the last logged), worst {len(worst)} tensors:",
           f"  {'tensor'.ljust(width)}  {'amax':>10}  {'scale':>10}  {'underflow':>9}  "
           f"{'saturated':>9}  {'amax/hist':>9}"]
  lines += [f"  {t.ljust(width)}  {stats[f'{t}/amax']:10.3g}  {stats[f'{t}/scale']:10.3g}  "
            f"{stats[f'{t}/underflow']:9.2%}  {stats[f'{t}/saturated']:9.2%}  "
            f"{stats[f'{t}/amax_ratio']:9.3g}" for t in worst]
  return "\n".join(lines)


_ALL_GATHER = re.compile(r"= (\w+)\[([\d,]*)\]\{[^}]*\} all-gather(?:-start)?\(")


def all_gathers(hlo_text: str) -> list[tuple[str, tuple[int, ...]]]:
  """(element type, result shape) of every all-gather in a compiled module's text."""
  return [(t, tuple(int(d) for d in dims.split(",") if d))
          for t, dims in _ALL_GATHER.findall(hlo_text)]


def all_gather_bytes(hlo_text: str) -> int:
  """Bytes the all-gathers of a compiled (per-device) module deliver to each device."""
  size = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "bf16": 2, "f16": 2,
          "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}
  return sum(size.get(t, 4) * int(np.prod(shape)) for t, shape in all_gathers(hlo_text))


_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+) = (.+?) ([\w\-]+)\(([^)]*)\)(.*)$")


def peak_composition(dump_dir, top: int = 10) -> dict[str, Any] | None:
  """Buffers live at the peak of the last train-step compile dumped in `dump_dir`, by producer.

  For a compile made with XLA_FLAGS `--xla_dump_to=DIR --xla_dump_hlo_module_re=.*train_step.*`
  (`experiments/memory.py --explain` sets them). Reads XLA's `*-live-range.txt` (the heap
  simulation's peak) and the optimized HLO: each live buffer is named by the JAX op that
  produced it (its `op_name`, or the nearest operand's for fusions XLA created without one)
  and put in a category: 'arguments' (state and batch),
  'forward' (jvp: kept for the backward pass), 'backward' (transpose(jvp)), 'optimizer & other'.
  Layer indices are folded ('layer_*'). Returns None if nothing was dumped.
  """
  ranges = sorted(pathlib.Path(dump_dir).glob("*train_step*-live-range.txt"))
  if not ranges:
    return None
  live_range = ranges[-1].read_text()
  hlo_path = pathlib.Path(str(ranges[-1]).replace("-live-range.txt", ".txt"))
  instrs = {}
  for line in hlo_path.read_text().splitlines():
    m = _INSTR.match(line)
    if m:
      op = re.search(r'op_name="([^"]*)"', m.group(5))
      instrs[m.group(1)] = (re.sub(r"\{[^}]*\}", "", m.group(2)), m.group(3), op and op.group(1),
                            re.findall(r"%([\w.\-]+)", m.group(4)))
  start = live_range.index("(peak):")
  peak_lines = live_range[start:live_range.find("Stack trace", start)]

  def producer(name: str) -> str | None:
    frontier, seen = [name], set()
    for _ in range(6):  # breadth-first through operands until a named op
      nxt = []
      for n in frontier:
        if n in seen or n not in instrs:
          continue
        seen.add(n)
        if instrs[n][2]:
          return instrs[n][2]
        nxt += instrs[n][3]
      frontier = nxt
    return None

  groups: dict[str, dict[str, Any]] = {}
  categories = collections.Counter()
  for m in re.finditer(r"^\s+([\w.\-]+)\{([\d,]*)\}: (\d+) bytes", peak_lines, re.M):
    name, index, nbytes = m.group(1), m.group(2), int(m.group(3))
    shape, opcode, _, _ = instrs.get(name, ("?", None, None, []))
    if shape.startswith("(") and index:
      parts = shape[1:-1].split(", ")
      shape = parts[int(index.split(",")[0])] if int(index.split(",")[0]) < len(parts) else shape
    if opcode == "parameter":
      category, what = "arguments", "state and batch"
    else:
      op = producer(name)
      if op is None:
        category, what = "optimizer & other", "(unnamed)"
      else:
        op = re.sub(r"^jit\([^)]*\)/", "", op).replace("\\'", "'")
        op = re.sub(r"layer_\d+", "layer_*", op)
        category = ("backward" if "transpose(jvp" in op else "forward" if "jvp(" in op
                    else "optimizer & other")
        what = op
    categories[category] += nbytes
    g = groups.setdefault(f"{category}|{what}|{shape}",
                          {"category": category, "op": what, "shape": shape, "buffers": 0,
                           "bytes": 0})
    g["buffers"] += 1
    g["bytes"] += nbytes
  ranked = sorted(groups.values(), key=lambda g: -g["bytes"])
  return {"live_bytes": sum(categories.values()), "by_category": dict(categories.most_common()),
          "top": ranked[:top]}
