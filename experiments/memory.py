"""Memory breakdown, ahead of time: the real train step compiled for an 8-device FSDP mesh, and
Llama-2-7B on one device. Settings: configs/experiments/memory.py. Commands (repository root):
  python experiments/memory.py [--jobs=2] [--resume | --add]  # -> experiments/results/memory/
  python experiments/memory.py --quick --out DIR    # miniature: a tiny model, every recipe
  python experiments/memory.py --config=configs/llama_memory.py:1b --recipe=coat --json
      [--mesh=fsdp=8] [--batch=N (sequences per device)] [--explain]

One measurement compiles `mpxla.train.Trainer(config)`'s train step for simulated CPU devices
with abstract inputs only (`Trainer.aot`); --explain (always in the section run) adds what is live
at the peak (`monitor.peak_composition`). The method: docs/results.md, section 1.
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import os
import pathlib
import re
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

import harness as H

NAME = "memory"
TITLE = "1. Memory breakdown (AOT, 8-device FSDP)"
CONFIG = "configs/llama_memory.py"
RECIPES = ("bf16", "fp8_linear", "coat", "hif8", "bf16_sr", "coat_sr")
AXES = ("data", "fsdp", "tensor", "expert")
DEVICES = 8
FLAGS = ("--xla_cpu_enable_concurrency_optimized_scheduler=false",  # memory-minimizing schedule
         # LLVM code generation only: buffer assignment comes before it (same bytes, checked)
         "--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true")
KEYS = ("params", "grads", "optimizer", "activations", "peak")


def setup_env(devices: int, dump_dir: pathlib.Path | None = None) -> None:
  """XLA_FLAGS for `devices` simulated CPU devices, the memory-minimizing schedule and (optional)
  buffer live-range dumps of the train step. Must run before JAX is imported."""
  os.environ["XLA_FLAGS"] = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                                     if not f.startswith("--xla_dump_to="))
  dump = (f"--xla_dump_to={dump_dir}", "--xla_dump_hlo_module_re=.*train_step.*")
  H.set_xla_flags(devices, *FLAGS, *(dump if dump_dir else ()))
  os.environ["JAX_PLATFORMS"] = "cpu"
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # the SPMD partitioner's warnings flood stderr


def parse_mesh(text: str | None) -> dict[str, int] | None:
  """'fsdp=8' or 'data=2,fsdp=4' -> {'data': 2, 'fsdp': 4} (axes not named have size 1)."""
  if not text:
    return None
  items = [re.fullmatch(r"\s*(data|fsdp|tensor|expert)\s*=\s*(\d+)\s*", x) for x in text.split(",")]
  if not all(m and int(m[2]) >= 1 for m in items):
    raise ValueError(f"--mesh={text!r}: use AXIS=N[,AXIS=N] with AXIS in data, fsdp, tensor, "
                     "expert and N a positive integer, e.g. --mesh=fsdp=8.")
  mesh = {m[1]: int(m[2]) for m in items}
  return {a: mesh.get(a, 1) for a in AXES}


def resolve_mesh(mesh: dict[str, int]) -> dict[str, int]:
  """Mesh sizes with an axis of -1 filled so that the mesh has `DEVICES` devices."""
  known = math.prod(s for s in mesh.values() if s != -1)
  return {a: (DEVICES // known if s == -1 else s) for a, s in mesh.items()}


def load_config(spec: str, recipe: str, per_device_batch: int | None = None,
                mesh: dict[str, int] | None = None):
  """(the config of `spec` with the recipe, the resolved mesh and the per-device batch set, the
  number of devices the batch is split over); imports no JAX."""
  from mpxla.train import config as config_lib

  config = config_lib.load(spec)
  config.recipe = recipe
  config.mesh = type(config.mesh)(resolve_mesh(dict(mesh or config.mesh)))
  batch_devices = math.prod(config.mesh.get(a, 1) for a in ("data", "fsdp", "expert"))
  if per_device_batch is None:
    per_device_batch = config.data.batch_size // batch_devices
  if per_device_batch < 1:
    raise ValueError(f"--batch={per_device_batch}: need at least one sequence per device.")
  config.data.batch_size = per_device_batch * batch_devices
  return config, batch_devices


def measure(spec: str, recipe: str, per_device_batch: int | None = None,
            mesh: dict[str, int] | None = None, explain: bool = False) -> dict[str, Any]:
  """Compiles the config's train step ahead of time; returns the per-device breakdown in bytes
  (and what is live at the peak with `explain`, if XLA_FLAGS dump the buffers: `setup_env`)."""
  import jax

  from mpxla.train import monitor
  from mpxla.train.trainer import Trainer

  config, batch_devices = load_config(spec, recipe, per_device_batch, mesh)
  need = math.prod(dict(config.mesh).values())
  if jax.device_count() < need:
    raise RuntimeError(f"the mesh {dict(config.mesh)} needs {need} devices, JAX has "
                       f"{jax.device_count()}; run `python experiments/memory.py` (its main() sets "
                       f"--xla_force_host_platform_device_count) or set XLA_FLAGS yourself.")
  m = re.search(r"--xla_dump_to=(\S+)", os.environ.get("XLA_FLAGS", ""))
  dump = pathlib.Path(m[1]) if m else None
  if dump:
    shutil.rmtree(dump, ignore_errors=True)
  start = H.clock()
  trainer = Trainer(config, pathlib.Path(tempfile.gettempdir()) / "mpxla-memory-aot")
  state = trainer.abstract_state()
  breakdown = trainer.aot()  # compiles; params/optimizer/model_state are per-device shard bytes
  wall, cpu = time.time() - start[0], time.process_time() - start[1]
  out = {
      "config": spec, "recipe": recipe, "mesh": {k: int(v) for k, v in trainer.mesh.shape.items()},
      "devices": int(trainer.mesh.size), "batch_global": int(config.data.batch_size),
      "batch_per_device": int(config.data.batch_size // batch_devices),
      "seq_len": int(config.data.seq_len),
      "n_params": int(sum(math.prod(p.shape) for p in jax.tree.leaves(state["params"]))),
      **{k: breakdown[k] for k in (*KEYS, "model_state", "other", "step_arguments",
                                   "step_outputs", "step_temp", "step_aliased")},
      "compile_wall_s": round(wall, 1), "compile_cpu_s": round(cpu, 1),
      "all_gather_bytes": breakdown["all_gather_bytes"]}
  if dump:
    if explain:
      out["peak_composition"] = monitor.peak_composition(dump)
    shutil.rmtree(dump, ignore_errors=True)
  return out


def _measure_subprocess(spec: str, recipe: str, batch: int, explain: bool,
                        src: pathlib.Path, mesh: str | None = None) -> dict[str, Any]:
  """`measure` in a fresh process (the CLI's --json) importing mpxla from `src`."""
  cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), f"--config={spec}",
         f"--recipe={recipe}", f"--batch={batch}", "--json"] + (["--explain"] if explain else []) \
      + ([f"--mesh={mesh}"] if mesh else [])
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [str(src)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
  proc = subprocess.run(cmd, cwd=H.ROOT, env=env, capture_output=True, text=True)
  if proc.returncode != 0:
    raise RuntimeError(f"{shlex.join(cmd)} failed:\n{proc.stderr[-3000:]}")
  return json.loads(proc.stdout)


def largest_batch(peak_at: Callable[[int], int], budget: float, points: dict[int, int],
                  fixed: float | None = None, max_compiles: int = 8) -> dict[str, Any]:
  """The largest per-device batch b with peak_at(b) <= budget, by affine extrapolation from
  `points` ({batch: peak}, at least one; `fixed`: the batch-independent bytes if known), verified
  by compiling b and b + 1 (docs/results_prose.md, memory/method)."""
  points, compiles, predicted = dict(points), 0, None
  if len(points) == 1:
    (b0, p0), = points.items()
    if fixed is not None and p0 > fixed:
      second = math.floor((budget - fixed) / ((p0 - fixed) / b0))
    else:
      second = 2 * b0 if p0 <= budget else b0 // 2
    second = max(1, second if second != b0 else b0 + 1)
    points[second] = int(peak_at(second))
    compiles = 1
  while compiles < max_compiles:
    lo = max((b for b, p in points.items() if p <= budget), default=0)
    hi = min((b for b, p in points.items() if p > budget), default=None)
    if hi == lo + 1:
      break
    near = sorted(points, key=lambda b: (abs(points[b] - budget), -b))[:2]
    (b1, p1), (b2, p2) = sorted((b, points[b]) for b in near)
    slope = (p2 - p1) / (b2 - b1)
    guess = math.floor(b1 + (budget - p1) / slope) if slope > 0 else 2 * max(lo, 1)
    predicted = guess if predicted is None else predicted
    guess = max(guess, lo + 1)
    guess = guess if hi is None else min(guess, hi - 1)
    points[guess] = int(peak_at(guess))
    compiles += 1
  best = max((b for b, p in points.items() if p <= budget), default=0)
  return {"budget": budget, "largest_batch": best, "peak_at_largest": points.get(best),
          "predicted": predicted, "compiles": compiles,
          "verified": best + 1 in points and points[best + 1] > budget,
          "points": {str(b): points[b] for b in sorted(points)}}


def _extrapolate(pts: dict[tuple[int, int], dict], layers: int, budget: float) -> dict[str, Any]:
  """The row of the model with `layers` layers at the smallest batch, from compiles of fewer
  layers {(layers, batch): measurement}: every byte count is affine in the number of layers
  (identical layers, unrolled), the peak affine in the batch (slope from the two batches, itself
  affine in the layers). 'search' holds the largest batch whose extrapolated peak fits."""
  (l1, b1), (l2, b2) = min(pts), max(pts)
  keys = (*KEYS, "n_params", "model_state", "other")
  line = lambda b, k: pts[l1, b][k] + (layers - l1) * (  # noqa: E731
      pts[l2, b][k] - pts[l1, b][k]) / (l2 - l1)
  row = {**{k: v for k, v in pts[l2, b1].items() if not k.startswith("step_")},
         **{k: round(line(b1, k)) for k in keys}, "size": pts[l1, b1]["config"]
         .split(":")[1].split("@")[0], "n_layers": layers, "compiled_layers": [l1, l2]}
  slope = (line(b2, "peak") - row["peak"]) / (b2 - b1) if b2 != b1 else None
  best = max(0, math.floor(b1 + (budget - row["peak"]) / slope)) if slope else 0
  row["search"] = {
      "budget": budget, "largest_batch": best, "extrapolated": True, "verified": False,
      "peak_at_largest": round(row["peak"] + (best - b1) * slope) if best else None,
      "points": {f"{n}x{b}": r["peak"] for (n, b), r in pts.items()},
      "compile_cpu_s": {f"{n}x{b}": r["compile_cpu_s"] for (n, b), r in pts.items()}}
  return row


def run(out_dir: pathlib.Path, quick: bool = False, resume: bool = False, jobs: int = 1,
        add: bool = False, command: str = "python experiments/memory.py") -> dict:
  """Every size x recipe at the table batch, the largest batch of some, then the single-device
  rows (fewer layers, extrapolated: `_extrapolate`). jobs > 1: that many compiles at once, each
  in a subprocess (`--json`), as are the single-device compiles. Every measurement is appended
  to OUT/runs/measurements.jsonl; resume reuses those of the same source hash. add keeps what
  OUT/results.json has and measures only the rest."""
  import jax

  import mpxla.train.trainer  # all of the step's code, as `H.source_hash` sees it now
  from mpxla.train import config as config_lib

  src = out_dir / "runs" / "src"  # a copy of that mpxla, which the subprocesses import
  shutil.rmtree(src, ignore_errors=True)
  shutil.copytree(pathlib.Path(mpxla.__file__).parent, src / "mpxla",
                  ignore=shutil.ignore_patterns("__pycache__"))
  source = H.source_hash(src, CONFIG)
  cache_path, lock = out_dir / "runs" / "measurements.jsonl", threading.Lock()
  saved = cache_path.read_text().splitlines() if resume and cache_path.exists() else []
  cache = {(r["config"], r["recipe"], r["batch_per_device"], r.get("mesh_arg")): r
           for r in map(json.loads, saved) if r.get("source") == source}
  if not resume:
    cache_path.unlink(missing_ok=True)
  log = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731

  def measure_cached(spec, recipe, b, explain=False, mesh=None):
    r = cache.get((spec, recipe, b, mesh))
    if r is None or (explain and "peak_composition" not in r):
      r = measure(spec, recipe, b, explain=explain) if jobs == 1 and not mesh else \
          _measure_subprocess(spec, recipe, b, explain, src, mesh)  # a mesh: its own devices
      r.update(source=source, mesh_arg=mesh)
      with lock:
        cache[(spec, recipe, b, mesh)] = r
        with cache_path.open("a") as f:
          f.write(json.dumps(r) + "\n")
    return dict(r)

  def cpu_time():  # this process and its subprocesses
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + ru.ru_utime + ru.ru_stime

  wall, cpu = time.time(), cpu_time()
  st = H.settings(NAME, quick)
  sizes, batch, budget = st["sizes"], st["batch"], st["budget"]
  old = H.load(out_dir)[1] if add and (out_dir / "results.json").exists() else {}
  kept = {(r["size"], r["recipe"]): r for r in old.get("rows", []) + old.get("single", [])}
  kept.update({(s["size"], s["recipe"], "search"): s for s in old.get("searches", [])})

  def table_row(size, recipe):
    row = {**measure_cached(f"{CONFIG}:{size}", recipe, batch, explain=True), "size": size}
    log(f"{size:>5} {recipe:<10} peak {row['peak'] / 1e9:7.2f} GB "
        f"(compile {row['compile_cpu_s']:.0f} s CPU)")
    return row

  def search_batch(size, recipe):
    row = next(r for r in rows if r["size"] == size and r["recipe"] == recipe)

    def peak_at(b):
      log(f"  search {size} {recipe}: batch {b}")
      return measure_cached(f"{CONFIG}:{size}", recipe, b)["peak"]

    fixed = row["peak"] - row["activations"]  # state, grads, batch: no activations
    result = largest_batch(peak_at, budget, {row["batch_per_device"]: row["peak"]}, fixed)
    log(f"{size:>5} {recipe:<10} largest batch {result['largest_batch']} per device "
        f"(predicted {result['predicted']}, {result['compiles']} compiles)")
    return {**result, "size": size, "recipe": recipe}

  def single_row(recipe):  # one device, extrapolated from fewer layers
    size, (l1, l2), (b1, b2) = st["single_size"], st["single_layers"], st["single_batches"]
    n, pts = config_lib.load(f"{CONFIG}:{size}").model.n_layers, {}
    for b in (b1, b2):  # b2 only if b1 fits
      pts.update({(k, b): measure_cached(f"{CONFIG}:{size}@{k}", recipe, b, (k, b) == (l2, b1),
                                         st["single_mesh"]) for k in (l1, l2)})
      if _extrapolate(pts, n, budget)["peak"] > budget:
        break
    return _extrapolate(pts, n, budget)

  with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
    # Largest models first, so that the searches (which need them) can start early.
    todo = [(size, recipe) for size in reversed(sizes) for recipe in RECIPES
            if recipe in st["recipes"] or size in st["sr_sizes"]]
    done = dict(zip(todo, pool.map(lambda a: kept.get(a) or table_row(*a), todo), strict=True))
    rows = [done[k] for k in sorted(done, key=lambda k: (sizes.index(k[0]), RECIPES.index(k[1])))]
    todo = [(size, recipe) for size in st["search_sizes"] for recipe in st["search_recipes"]]
    searches = list(pool.map(lambda a: kept.get((*a, "search")) or search_batch(*a), todo))
    single = list(pool.map(lambda r: kept.get((st["single_size"], r)) or single_row(r),
                           st["single_recipes"]))
  meta = {**H.metadata((wall, cpu), command), "wall_s": round(time.time() - wall, 1),
          "cpu_s": round(cpu_time() - cpu, 1), "compiles": len(cache),
          "compile_cpu_s": round(sum(r["compile_cpu_s"] for r in cache.values()), 1)}
  results = {"rows": rows, "searches": searches, "single": single}
  if old:  # the first run's provenance stays; this one is listed as an addition
    return H.save(out_dir, {**old, **results, "additions": old.get("additions", []) + [meta]})
  return H.save(out_dir, {
      "name": NAME, "quick": quick, **meta,
      "xla_flags": os.environ.get("XLA_FLAGS", ""), "devices": jax.device_count(),
      "source_hash": source, "table_batch": batch, "budget": budget, **results})


def _unit(rows: list[dict]) -> tuple[float, str]:
  """GB for the real models, MB for the quick miniature."""
  return (1e9, "GB") if max(r["peak"] for r in rows) >= 1e9 else (1e6, "MB")


def _fmt(n: float | None, scale: float) -> str:
  return "-" if n is None else f"{n / scale:.2f}"


def _sizes(res: dict) -> list[str]:
  return list(dict.fromkeys(r["size"] for r in res["rows"]))


def render(out_dir: pathlib.Path) -> str:
  """The markdown of the section from out_dir/results.json (and its PNGs)."""
  out_dir, res = H.load(out_dir)
  rows, sizes = res["rows"], _sizes(res)
  searches = sorted(res["searches"], key=lambda s: (s["size"], RECIPES.index(s["recipe"])))
  scale, unit = _unit(rows)
  by = {(r["size"], r["recipe"]): r for r in rows}
  _plots(out_dir, res, scale, unit)
  git = res.get("git", {})
  tree = (f" at commit {git['commit']}" + (f" with {len(git['modified'])} modified files in mpxla/"
                                            if git.get("modified") else "")) if git else ""
  took = lambda s: f"{s:.0f} s" if s < 120 else f"{s / 60:.0f} min"  # noqa: E731
  lines = [
      f"Command: `{res['command']}` ({took(res['wall_s'])} wall, "
      f"{took(res['cpu_s'])} CPU, {res['compiles']} compiles, on {res['cpu_count']} shared "
      f"CPU cores; JAX {res['jax_version']}, {res['date'][:10]}{tree}). One row alone: `python "
      f"experiments/memory.py --config={CONFIG}:{sizes[-1]} --recipe=coat --json`." + "".join(
          f" Added by `{a['command']}` ({a['date'][:10]}, commit {a['git'].get('commit')}, "
          f"{a['compiles']} compiles, {took(a['compile_cpu_s'])} CPU compiling): the rows "
          "it lacked."
          for a in res.get("additions", [])),
      "", H.prose(NAME, "setup", res.get("quick", False))
      + f" {unit} per device (1 {unit} = 10^{round(math.log10(scale))} bytes):", ""]
  gather = any("all_gather_bytes" in r for r in rows)  # a column since it was measured
  table = []
  for size in sizes:
    base = by.get((size, "bf16"))
    for recipe in (x for x in RECIPES if (size, x) in by):
      r = by[size, recipe]
      table.append([f"{size} ({r['n_params'] / 1e6:,.0f}M)" if recipe == RECIPES[0] else "",
                    f"`{recipe}`"] + [_fmt(r[k], scale) for k in KEYS]
                   + [f"{base['peak'] / r['peak']:.2f}x" if base else "-"]
                   + [_fmt(r.get("all_gather_bytes"), scale)] * gather)
  lines += H.table(["model", "recipe", "params", "grads", "optimizer", "activations", "peak",
                    "bf16 peak / peak"] + ["all-gathered / step"] * gather, table,
                   "|---|---|" + "---:|" * (6 + gather))
  lines += ["", H.prose(NAME, "definitions"), "",
            "![per-device memory by recipe](breakdown.png)", ""]
  if searches:
    base = {s["size"]: s["largest_batch"] for s in searches if s["recipe"] == "bf16"}
    lines += [f"Largest per-device batch (sequences of {rows[0]['seq_len']}) whose peak fits "
              f"{searches[0]['budget'] / 1e9:.0f} GB:", ""]
    lines += H.table(["model", "recipe", "largest batch", f"peak there ({unit})",
                      "first prediction", "compiles", "batch / bf16's"], [
        [s["size"], f"`{s['recipe']}`",
         f"{s['largest_batch']}" + ("" if s["verified"] else " (unverified)"),
         _fmt(s["peak_at_largest"], scale), s["predicted"], s["compiles"],
         f"{s['largest_batch'] / base[s['size']]:.2f}x" if base.get(s["size"]) else "-"]
        for s in searches], "|---|---|---:|---:|---:|---:|---:|")
    lines += ["", H.prose(NAME, "method"), "", "![peak against batch](batch_search.png)", ""]
  lines += _single(res, scale, unit) + _verdict(res, by, searches)
  lines += _composition(by, sizes[-1], scale, unit)
  single = {(f"{r['config'].split(':')[1]}, batch 1", r["recipe"]): r
            for r in res.get("single", [])}
  lines += _composition(single, next(iter(single), [""])[0], scale, unit, ("coat_sr",))
  return "\n".join(lines + [H.prose(NAME, "reading"), ""])


def _static(r: dict) -> float:
  """Bytes per parameter of the parameters, gradients and optimizer states (all devices)."""
  return (r["params"] + r["grads"] + r["optimizer"]) * r["devices"] / r["n_params"]


def _single(res: dict, scale: float, unit: str) -> list[str]:
  """The single-device table: static bytes per parameter, peak, largest batch in the budget."""
  rows = res.get("single") or []
  if not rows:
    return []
  r0 = rows[0]
  lines = [f"{r0['size']} ({r0['n_params'] / 1e6:,.0f}M parameters, {r0['n_layers']} layers) on "
           "one device (no FSDP), extrapolated from "
           f"{' and '.join(map(str, r0['compiled_layers']))} layers (below), "
           f"{unit}; peak at {r0['batch_per_device']} x {r0['seq_len']} tokens:", ""]
  lines += H.table(
      ["recipe", "params", "grads", "optimizer", "static bytes / param", "activations", "peak",
       "largest batch", f"peak there ({unit})", "compiles", "compile CPU (min)"],
      [[f"`{r['recipe']}`"] + [_fmt(r[k], scale) for k in KEYS[:3]] + [f"{_static(r):.2f}"]
       + [_fmt(r[k], scale) for k in KEYS[3:]]
       + [f"{s['largest_batch']}" + ("" if s["verified"] else " (extrapolated)"),
          _fmt(s["peak_at_largest"], scale), len(s["points"]),
          f"{sum(s['compile_cpu_s'].values()) / 60:.1f}"]
       for r, s in ((r, r["search"]) for r in rows)], "|---|" + "---:|" * 10)
  return lines + ["", H.prose(NAME, "single"), ""]


def headline(out_dir: pathlib.Path) -> dict[str, str]:
  """Headline figures for the report's header table (label -> value)."""
  res = H.load(out_dir)[1]
  by = {(r["size"], r["recipe"]): r for r in res["rows"]}
  size, out = _sizes(res)[-1], {}
  b, c = by.get((size, "bf16")), by.get((size, "coat"))
  if b and c:
    scale, unit = _unit(res["rows"])
    out[f"Peak per device, {size} at {b['batch_per_device']} x {b['seq_len']} tokens "
        "(bf16 -> coat; goal 1.6x)"] = (f"{b['peak'] / scale:.1f} -> {c['peak'] / scale:.1f} "
                                        f"{unit} ({b['peak'] / c['peak']:.2f}x)")
  s = {x["recipe"]: x for x in res["searches"] if x["size"] == size}
  if "bf16" in s and "coat" in s and s["bf16"]["largest_batch"]:
    out[f"Largest batch per device in {s['coat']['budget'] / 1e9:.0f} GB, {size} "
        "(bf16 -> coat; goal 2x)"] = (
            f"{s['bf16']['largest_batch']} -> {s['coat']['largest_batch']} "
            f"({s['coat']['largest_batch'] / s['bf16']['largest_batch']:.2f}x)")
  return out


def _verdict(res, by, searches) -> list[str]:
  """The goals (bf16 / coat peak and batch, coat_sr's static memory and peak): met or missed."""
  met = lambda ok: "met" if ok else "missed"  # noqa: E731
  lines = ["**Goal** (COAT: 1.54x lower peak for Llama-2-7B, twice the batch): `coat` peak at "
           "least 1.6x below `bf16` at the same batch, and at least twice the batch.", ""]
  for size in _sizes(res):
    if (b := by.get((size, "bf16"))) and (c := by.get((size, "coat"))):
      ratio = b["peak"] / c["peak"]
      lines.append(f"- {size}: bf16 / coat peak = **{ratio:.2f}x** ({met(ratio >= 1.6)}); "
                   f"activations {b['activations'] / c['activations']:.2f}x, optimizer states "
                   f"{b['optimizer'] / c['optimizer']:.2f}x.")
  bf16 = {s["size"]: s["largest_batch"] for s in searches if s["recipe"] == "bf16"}
  for s in searches:
    if s["recipe"] == "coat" and bf16.get(s["size"]):
      b, ratio = bf16[s["size"]], s["largest_batch"] / bf16[s["size"]]
      lines.append(f"- {s['size']} batch in {s['budget'] / 1e9:.0f} GB: {b} -> "
                   f"{s['largest_batch']} sequences per device = **{ratio:.2f}x** "
                   f"({met(ratio >= 2)}).")
  single = {r["recipe"]: r for r in res.get("single", [])}
  if r := single.get("coat_sr"):  # goals of training without float32 master weights
    b = r["search"]["largest_batch"]
    lines += [f"- `coat_sr` static memory, {r['size']}: **{_static(r):.2f}** bytes per parameter "
              f"(goal <= 6.2: {met(_static(r) <= 6.2)}); on one device it fits **{b}** sequences "
              f"(goal >= 4: {met(b >= 4)})."]
  for size in _sizes(res):
    if (b := by.get((size, "bf16"))) and (c := by.get((size, "coat_sr"))):
      lines.append(f"- {size}: bf16 / coat_sr peak = **{b['peak'] / c['peak']:.2f}x** (goal 2.4x:"
                   f" {met(b['peak'] / c['peak'] >= 2.4)}).")
  return lines + [""]


def _composition(by, size, scale, unit, top=("bf16", "coat")) -> list[str]:
  """What is live at the peak of `size`'s rows by category, and the largest groups of `top`'s."""
  rows = [(recipe, by[(size, recipe)]["peak_composition"]) for recipe in RECIPES
          if (size, recipe) in by and by[(size, recipe)].get("peak_composition")]
  if not rows:
    return []
  cats = ("arguments", "forward", "backward", "optimizer & other")
  lines = [
      f"What is live at the peak ({size}; from XLA's buffer live ranges, each buffer attributed "
      "to the JAX op that produced it: `forward` = kept from the forward pass for the backward, "
      f"`backward` = created by the backward pass), {unit} per device:", ""]
  lines += H.table(["recipe", "live at peak", *cats], [
      [f"`{recipe}`", _fmt(comp["live_bytes"], scale)]
      + [_fmt(comp["by_category"].get(c, 0), scale) for c in cats] for recipe, comp in rows],
      "|---|---:|" + "---:|" * len(cats))
  lines += ["", "The largest groups of buffers live at the peak (layer indices folded):", ""]
  lines += H.table(["recipe", "category", "produced by", "shape", "buffers", unit], [
      [f"`{recipe}`", g["category"], f"`{g['op']}`", f"`{g['shape']}`", g["buffers"],
       _fmt(g["bytes"], scale)] for recipe, comp in rows if recipe in top for g in comp["top"][:8]],
      "|---|---|---|---|---:|---:|")
  return lines + [""]


def _plots(out_dir: pathlib.Path, res: dict, scale: float, unit: str) -> None:
  """breakdown.png (stacked bars per size) and, with searches, batch_search.png."""
  plt = H.pyplot()
  rows, sizes = res["rows"], _sizes(res)
  fig, axes = plt.subplots(1, len(sizes), figsize=(4 * len(sizes), 3.6), dpi=100, squeeze=False)
  for ax, size in zip(axes[0], sizes, strict=True):
    sub = [r for r in rows if r["size"] == size]
    bottom = [0.0] * len(sub)
    for part in ("params", "grads", "optimizer", "activations", "other"):
      vals = [max(r[part], 0) / scale for r in sub]
      ax.bar([r["recipe"] for r in sub], vals, bottom=bottom, label=part)
      bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    ax.set_title(f"{size}: {sub[0]['batch_per_device']} x {sub[0]['seq_len']} tokens / device")
    ax.set_ylabel(f"{unit} per device")
    ax.tick_params(axis="x", labelsize=8)
    ax.grid(axis="y", alpha=0.3)
  axes[0][0].legend(fontsize=7)
  H.save_figure(fig, out_dir / "breakdown.png", dpi=100)
  if not res["searches"]:
    return
  fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
  for s in res["searches"]:
    batches, peaks = zip(*sorted((int(b), p / scale) for b, p in s["points"].items()), strict=True)
    ax.plot(batches, peaks, "o-", label=f"{s['size']} {s['recipe']} (max {s['largest_batch']})")
  ax.axhline(res["searches"][0]["budget"] / scale, color="k", ls="--", lw=1, label="budget")
  H.style(ax, "sequences per device", f"peak {unit} per device", legend=False)
  ax.legend(fontsize=7)
  H.save_figure(fig, out_dir / "batch_search.png", dpi=100)


def main(argv: list[str] | None = None) -> int:
  args, command = H.cli(__doc__, NAME, argv, drop=("--resume",), options=(
      ("--jobs", dict(type=int, default=1, help="compiles at once (each in a subprocess)")),
      ("--resume", dict(action="store_true", help="reuse OUT/runs/measurements.jsonl")),
      ("--add", dict(action="store_true", help="measure only what OUT/results.json lacks")),
      ("--config", dict(help="one measurement: configs/FILE.py[:variant]")),
      ("--recipe", dict(default="bf16", choices=RECIPES)),
      ("--mesh", dict(help="AXIS=N[,AXIS=N] (default: the config's mesh), e.g. fsdp=8")),
      ("--batch", dict(type=int, help="sequences per device (default: the config's batch)")),
      ("--json", dict(action="store_true", help="print the measurement as one JSON object")),
      ("--explain", dict(action="store_true", help="add what is live at the peak"))))
  if not args.config:
    if args.json:
      sys.exit("memory.py: error: --json measures one config: --config=configs/FILE.py[:variant]")
    if args.jobs < 1:
      sys.exit(f"memory.py: error: --jobs={args.jobs}: need at least 1.")
    setup_env(DEVICES, args.out / "runs" / "xla_dump")  # each measure() empties it after use
    run(args.out, args.quick, args.resume, args.jobs, args.add, command)
    print(f"$ {command}\n\n{render(args.out)}")
    return 0
  try:
    mesh = parse_mesh(args.mesh)
    config = load_config(args.config, args.recipe, args.batch, mesh)[0]
  except ValueError as e:  # config_lib.ConfigError too
    sys.exit(f"memory.py: error: {e}")
  dump = pathlib.Path(tempfile.mkdtemp(prefix="mpxla-memory-")) if args.explain else None
  setup_env(math.prod(dict(config.mesh).values()), dump)
  try:
    r = measure(args.config, args.recipe, args.batch, mesh, explain=args.explain)
  finally:
    if dump:
      shutil.rmtree(dump, ignore_errors=True)
  print(json.dumps(r) if args.json else
        f"{args.config} {args.recipe}: {r['batch_per_device']} x {r['seq_len']} tokens per "
        f"device, mesh {r['mesh']}; GB per device:\n"
        + "  ".join(f"{k} {r[k] / 1e9:.3f}" for k in KEYS))
  return 0


if __name__ == "__main__":
  sys.exit(main())
