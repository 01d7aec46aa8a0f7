"""The trainer: one loop for every config and recipe.

    lock the workdir; check the config; restore the latest good checkpoint (or init)
    state = {'step', 'params', 'opt_state', 'model_state'}   (sharded over the mesh)
    for step in range(start, total_steps):
      batch = next(data)            # deterministic in (seed, step), this process's rows
      state, metrics = train_step(state, batch)   # metrics say which state leaves are finite
      stop on a non-finite loss or state (before logging or saving that step)
      log / evaluate / checkpoint / save and stop on SIGTERM

Resume is exact: the data iterator's state is its step, the model has no dropout, and
stochastic rounding bits are derived from (seed, step) and, for FP8 moments, from each leaf's
own step counter, so N steps in one go and N/2 + resume + N/2 give the same bits. What happens
on every fault (damaged checkpoints, signals, full disks, a second trainer) is in
docs/train.md, "Faults".
"""

from __future__ import annotations

import functools
import json
import math
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mpxla import nn as mnn
from mpxla import optim as mo
from mpxla import parallel
from mpxla.data import BatchIterator, make_source
from mpxla.nn import fp8_stats
from mpxla.train import checkpoint, monitor, preemption, recipes
from mpxla.train import config as config_lib
from mpxla.train.config import to_json
from mpxla.train.lock import WorkdirLock, WorkdirLocked
from mpxla.train.tasks import make_task

FP8_STATE = mnn.COLLECTION  # 'fp8_state': delayed-scaling amax histories (recipe fp8_delayed)


class NonFiniteLoss(RuntimeError):
  """The training loss became NaN or inf."""


class NonFiniteState(RuntimeError):
  """A parameter, optimizer state or model state leaf became NaN or inf."""


class Trainer:
  """Builds everything a run needs from its config; `run()` trains, `aot()` only compiles."""

  def __init__(self, config, workdir: str | pathlib.Path, name: str = ""):
    self.config = config = config_lib.resolve(config)
    self.workdir = pathlib.Path(workdir)
    self.title = f"{name or 'run'} · recipe {config.recipe} · {self.workdir}"
    self.is_main = jax.process_index() == 0
    self.mesh = parallel.make_mesh(dict(config.mesh))
    self.task = make_task(config)
    fsdp_only = self.mesh.shape["fsdp"] > 1 and self.mesh.shape["tensor"] == 1
    self.task.model = recipes.wrap_model(self.task.model, config.recipe, gather_weight=fsdp_only)
    self.tx = recipes.make_optimizer(config)
    self.batch_size = config.data.batch_size
    shards = math.prod(self.mesh.shape[a] for a in parallel.batch_axes(self.mesh))
    if self.batch_size % shards:
      raise config_lib.ConfigError(
          f"--config.data.batch_size={self.batch_size}: the global batch must split evenly "
          f"over the mesh's batch axes {parallel.batch_axes(self.mesh)} ({shards} devices); "
          f"use a multiple of {shards}.")
    self._batch_sharding = NamedSharding(self.mesh, P(parallel.batch_axes(self.mesh)))
    self._compiled = None

  # --- state -----------------------------------------------------------------------------

  def _init_fn(self, key, boxed_params=False):
    batch = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), self.task.dummy_batch(self.batch_size))
    variables = self.task.init(key, batch)
    if boxed_params:  # the parameters with their logical axis names, for state_shardings
      return variables["params"]
    from flax.core import meta

    variables = meta.unbox(variables)  # the state holds plain arrays
    dtype = recipes.param_dtype(self.config.recipe)
    params = jax.tree.map(lambda p: p.astype(dtype) if jnp.issubdtype(p.dtype, jnp.floating)
                          else p, variables.pop("params"))
    return {"step": jnp.zeros((), jnp.int32), "params": params,
            "opt_state": self.tx.init(params), "model_state": dict(variables)}

  def _abstract_init(self):
    with jax.set_mesh(self.mesh):  # layers that name mesh axes see the mesh (as in the steps)
      return jax.eval_shape(self._init_fn, jax.random.key(0))

  @functools.cached_property
  def state_shardings(self):
    """Each parameter's sharding: from its logical names if boxed
    (`nn.with_logical_partitioning`: the MoE experts over 'expert'), else `shard_unannotated`.
    Optimizer-state leaves whose path ends with a parameter's (the longest such path) follow
    it: the same sharding at the same shape; a field of a container there keeps the
    parameter's mesh axes on its dimensions of the parameter's sizes, and a compressed
    moment's last (grouped) dimension keeps them where every shard holds whole groups
    (`mo.CompressedArray.group_size`). Every other leaf follows `shard_unannotated`."""
    from flax.linen import LogicallyPartitioned

    abstract = self._abstract_init()
    shardings = parallel.state_shardings(abstract, self.mesh, shard_unannotated=True)
    with jax.set_mesh(self.mesh):
      boxed = jax.eval_shape(functools.partial(self._init_fn, boxed_params=True),
                             jax.random.key(0))
    is_box = lambda x: isinstance(x, LogicallyPartitioned)  # noqa: E731
    leaves = jax.tree_util.tree_flatten_with_path(boxed, is_leaf=is_box)[0]
    boxed_sh = jax.tree.leaves(parallel.state_shardings(boxed, self.mesh, shard_unannotated=True))
    plain_sh = jax.tree.leaves(shardings["params"])
    named = {tuple(path): (b.value.shape if is_box(b) else b.shape, s if is_box(b) else plain)
             for (path, b), s, plain in zip(leaves, boxed_sh, plain_sh, strict=True)}
    lengths = sorted({len(p) for p in named}, reverse=True)  # the most specific path first
    group_size = {tuple(path): c.group_size for path, c in jax.tree_util.tree_flatten_with_path(
        abstract["opt_state"], is_leaf=mo.is_compressed)[0] if mo.is_compressed(c)}

    def kept(axes, dim, pdim, group):  # the last dimension of compressed codes and scales
      if group is None or axes is None:
        return axes if dim == pdim else None
      shard = pdim // parallel.mesh.spec_size(axes, self.mesh)
      return axes if pdim % group == 0 and shard % group == 0 else None

    def follow(path, leaf, sharding):
      shape = getattr(leaf, "shape", None)
      for n in lengths:
        for field in (0, 1):  # the leaf itself, or a field of a container (e.g. codes)
          pshape, s = named.get(tuple(path[len(path) - n - field:len(path) - field]), (None, None))
          if pshape is None or len(path) < n + field or shape is None:
            continue
          if not field and shape == pshape:
            return s
          if field and len(shape) == len(pshape):
            spec = tuple(s.spec) + (None,) * (len(shape) - len(s.spec))
            group = group_size.get(tuple(path[:-1]))
            return NamedSharding(s.mesh, P(*[
                kept(a, d, pd, group if i == len(shape) - 1 else None)
                for i, (a, d, pd) in enumerate(zip(spec, shape, pshape, strict=True))]))
      return sharding

    return {**shardings, **{k: jax.tree_util.tree_map_with_path(follow, abstract[k], shardings[k])
                            for k in ("params", "opt_state")}}

  def init_state(self):
    key = jax.random.key(self.config.seed)
    init = jax.jit(self._init_fn, out_shardings=self.state_shardings)
    with jax.set_mesh(self.mesh):
      return init(key)

  def abstract_state(self):
    abstract = self._abstract_init()
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        abstract, self.state_shardings)

  # --- steps -----------------------------------------------------------------------------

  def _train_step(self, state, batch, probes=None):
    """One update, and whether every floating leaf of the new state is finite (per leaf);
    with fp8_stats `probes`, also the FP8 statistics (their gradient) as metrics['fp8']."""
    if probes is None:
      new_state, metrics = self._update(state, batch)
    else:
      new_state, metrics = self._update(state, batch, probes)
    return new_state, {**metrics, "state_finite": checkpoint.finite_flags(new_state)}

  def _update(self, state, batch, probes=None):
    def loss_fn(params, fp8_state, probes):
      model_state = state["model_state"]
      if fp8_state is not None:
        model_state = {**model_state, FP8_STATE: fp8_state}
      if probes is None:
        return self.task.loss(params, model_state, batch, train=True)
      with fp8_stats.collecting():
        loss, (metrics, new) = self.task.loss(
            params, {**model_state, fp8_stats.COLLECTION: probes}, batch, train=True)
      return loss, (metrics, {k: v for k, v in new.items() if k != fp8_stats.COLLECTION})

    # Delayed-scaling amax histories: the gradient with respect to them is their next value
    # (docs/nn.md); kept as they were if any of it is not finite. That of the fp8_stats
    # probes is the step's FP8 statistics (mpxla.nn.fp8_stats).
    fp8_state = state["model_state"].get(FP8_STATE)
    (_, (metrics, model_state)), (grads, new_fp8, stats) = jax.value_and_grad(
        loss_fn, argnums=(0, 1, 2), has_aux=True)(state["params"], fp8_state, probes)
    if probes is not None:
      metrics = {**metrics, "fp8": stats}
    if fp8_state is not None:
      model_state = {**model_state, FP8_STATE: jax.lax.cond(
          mnn.all_finite(new_fp8), lambda: new_fp8, lambda: fp8_state)}
    updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
    # = optax.apply_updates for float32 parameters; BF16 ones are rounded stochastically.
    params = mo.apply_updates_stochastic(state["params"], updates, state["step"],
                                         seed=self.config.seed)
    new_state = {"step": state["step"] + 1, "params": params, "opt_state": opt_state,
                 "model_state": model_state}
    metrics = {**metrics, "grad_norm": optax.tree.norm(grads),
               "lr": recipes.schedule(self.config.optim)(state["step"])}
    return new_state, metrics

  def compile_train_step(self):
    if self._compiled is None:
      self._compiled = self._compile(self._train_step)
    return self._compiled

  def _compile(self, fn, *extra):
    batch = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=self._batch_sharding),
                         self.task.dummy_batch(self.batch_size))
    replicated = NamedSharding(self.mesh, P())
    step = jax.jit(fn, in_shardings=(self.state_shardings, self._batch_sharding,
                                     *(replicated for _ in extra)),
                   out_shardings=(self.state_shardings, None), donate_argnums=0)
    with jax.set_mesh(self.mesh):  # layers that name mesh axes (local BatchNorm) see the mesh
      return step.lower(self.abstract_state(), batch, *extra).compile()

  @functools.cached_property
  def _stats_step(self):
    """(compiled step, zero probes) of the FP8-statistics step, or None when the run logs none
    (`fp8_stats_every` 0, or a recipe with no per-tensor-scaled FP8 matmul)."""
    if not self.config.get("fp8_stats_every", 0):
      return None
    batch = self.task.dummy_batch(self.batch_size)

    def probe_tree(state, batch):
      with fp8_stats.collecting():
        _, (_, new) = self.task.loss(state["params"], {**state["model_state"],
                                                       fp8_stats.COLLECTION: {}}, batch, True)
      return new.get(fp8_stats.COLLECTION, {})

    with jax.set_mesh(self.mesh):
      shapes = jax.eval_shape(probe_tree, self.abstract_state(), batch)
    if not jax.tree.leaves(shapes):
      self._log("fp8_stats_every: this recipe has no FP8 matmul with per-tensor scaling; no "
                "FP8 statistics are logged.")
      return None
    probes = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)
    return self._compile(self._train_step, probes), probes

  @functools.cached_property
  def _eval_step(self):
    def step(state, batch):
      _, (metrics, _) = self.task.loss(state["params"], state["model_state"], batch, train=False)
      return {k: v for k, v in metrics.items() if k in ("loss_sum", "weight", "correct")}

    jitted = jax.jit(step, in_shardings=(self.state_shardings, self._batch_sharding))

    def run(state, batch):
      with jax.set_mesh(self.mesh):
        return jitted(state, batch)

    return run

  # --- data ------------------------------------------------------------------------------

  def _iterator(self, split: str, train: bool) -> BatchIterator:
    """Training: shuffled, endless. Evaluation: `eval_batches` in order (0: one exact pass)."""
    source = make_source(self.config.data, split)
    n_eval = self.config.get("eval_batches", 0)
    return BatchIterator(source, self.batch_size, seed=self.config.seed, shuffle=train,
                         process_index=jax.process_index(), process_count=jax.process_count(),
                         num_batches=None if train else (n_eval or None),
                         single_pass=not train and not n_eval)

  def _global(self, local_batch: dict[str, np.ndarray]):
    return parallel.global_batch(local_batch, self.mesh)

  def evaluate(self, state) -> dict[str, float]:
    totals: dict[str, float] = {}
    for batch in self._iterator("validation", train=False):
      for k, v in self._eval_step(state, self._global(batch)).items():
        totals[k] = totals.get(k, 0.0) + float(v)
    out = {"val_loss": totals["loss_sum"] / max(totals["weight"], 1.0)}
    if "correct" in totals:
      out["val_accuracy"] = totals["correct"] / max(totals["weight"], 1.0)
    return out

  # --- the run ---------------------------------------------------------------------------

  @staticmethod
  def compiled_flops(compiled) -> float | None:
    """XLA's FLOP count of a compiled program (`cost_analysis()['flops']`: one device's
    partitioned program), None where the backend gives none. JAX versions return a dict,
    a list of one dict per program, or None."""
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):
      cost = cost[0] if cost else None
    flops = None if cost is None else cost.get("flops")
    return None if flops is None else float(flops)

  def aot(self) -> dict[str, Any]:
    """Compiles the train step without running it; returns the per-device memory breakdown,
    the step's compiled FLOPs per device ('flops', `compiled_flops`) and the bytes its
    all-gathers deliver to each device ('all_gather_bytes')."""
    compiled = self.compile_train_step()
    return {**monitor.memory_breakdown(self.abstract_state(), compiled),
            "flops": self.compiled_flops(compiled),
            "all_gather_bytes": monitor.all_gather_bytes(compiled.as_text())}

  def run(self) -> dict[str, Any]:
    """Trains from the latest good checkpoint to `total_steps` (docs/train.md, Faults)."""
    with preemption.catch_sigterm() as stop:
      self.workdir.mkdir(parents=True, exist_ok=True)
      lock = WorkdirLock(self.workdir, warn=self._log) if self.is_main else None
      refused = None
      if lock is not None:
        try:
          lock.acquire()
        except WorkdirLocked as e:
          refused = e
      if _agree(refused is not None):  # every process stops if process 0 was refused
        raise refused or WorkdirLocked(f"{self.workdir} is in use by another trainer.")
      try:
        return self._run(stop)
      finally:
        if lock is not None:
          lock.release()

  def _run(self, stop) -> dict[str, Any]:
    c = self.config
    config_dict = json.loads(to_json(c))
    config_path = self.workdir / "config.json"
    saved = checkpoint.read_config(self.workdir)
    checkpoint.check_compatible(saved, config_dict, str(self.workdir))

    def check_config(stored: dict | None, step: int) -> None:
      if saved is None:  # no config.json: the config saved in the checkpoint decides
        checkpoint.check_compatible(stored, config_dict, f"checkpoint {step} in {self.workdir}")

    ckpt = checkpoint.Checkpointer(self.workdir / "checkpoints", c.keep_checkpoints,
                                   is_main=self.is_main)
    try:
      restored = ckpt.restore_latest(self.abstract_state(), check_config, self._log)
      data = self._iterator("train", train=True)
      if restored is None:
        start = 0
      else:
        start, state, data_state = restored
        data.set_state(data_state)
      if start >= c.total_steps:
        self._log(f"already complete at step {start} (total_steps={c.total_steps}) in "
                  f"{self.workdir}; nothing to do.")
        return self._previous_summary(start)
      if start:
        self._log(f"resumed from step {start} in {self.workdir}")
      if _agree(stop.requested):
        return self._stopped_before_first_step(start)
      compiled = self.compile_train_step()
      _ = self._stats_step  # compiled before the first step (None unless fp8_stats_every)
      if _agree(stop.requested):
        return self._stopped_before_first_step(start)
      if restored is None:
        state = self.init_state()
      if self.is_main:
        config_path.write_text(to_json(c))
      return self._loop(state, data, start, compiled, ckpt, config_dict, stop)
    finally:
      ckpt.close()

  def _stopped_before_first_step(self, start: int) -> dict[str, Any]:
    saved = f"the latest checkpoint is still step {start}" if start else "no checkpoint exists"
    self._log(f"SIGTERM before the first step: nothing saved ({saved}); exiting.")
    return {"preempted_at": start, "saved": False}

  def _previous_summary(self, step: int) -> dict[str, Any]:
    try:
      previous = json.loads((self.workdir / "summary.json").read_text())
    except (OSError, ValueError):
      previous = {}
    return {**previous, "steps": step, "resumed_from": step, "already_complete": True}

  def _loop(self, state, data, start, compiled, ckpt, config_dict, stop) -> dict[str, Any]:
    c = self.config
    writer = monitor.MetricsWriter(self.workdir, enabled=self.is_main)
    writer.truncate_after(start)
    if start == 0 or c.get("print_memory_on_resume", False):
      mem = monitor.memory_breakdown(state, compiled)
      self._log(monitor.table("memory per device:", {k: monitor.format_bytes(v) for k, v in mem.items()}))
    bar = monitor.progress_bar(c.total_steps, start, self.is_main and c.get("progress", True))
    unit = self.task.unit
    t_start, t_window, count_window, steps_window = time.time(), time.time(), 0.0, 0
    history, postfix = [], {}
    try:
      every = c.get("fp8_stats_every", 0)
      for step in range(start, c.total_steps):
        batch = self._global(next(data))
        if every and (step + 1) % every == 0 and self._stats_step is not None:
          stats_compiled, probes = self._stats_step
          state, metrics = stats_compiled(state, batch, probes)
        else:
          state, metrics = compiled(state, batch)
        metrics = jax.device_get(metrics)
        done = step + 1
        fp8 = fp8_stats.flatten(metrics.pop("fp8")) if "fp8" in metrics else None
        if fp8:
          self._fp8_last = (done, fp8)  # shown if this or a later step stops on a NaN
        self._check_finite(metrics, done, ckpt)
        if fp8:
          writer.write(done, **{f"fp8/{k}": v for k, v in fp8.items()})
        count_window += float(metrics["weight"])
        steps_window += 1
        bar.update(1)
        if done % c.log_every == 0 or done == c.total_steps:
          dt = time.time() - t_window
          record = {"loss": metrics["loss"], "grad_norm": metrics["grad_norm"], "lr": metrics["lr"],
                    "step_time": dt / steps_window, f"{unit}_per_s": count_window / dt}
          if "accuracy" in metrics:
            record["accuracy"] = metrics["accuracy"]
          writer.write(done, **record)
          history.append({"step": done, **record})
          postfix.update(loss=f"{float(metrics['loss']):.4f}",
                         **{f"{self.task.unit_short}_s": f"{count_window / dt:,.0f}"})
          bar.set_postfix(postfix, refresh=False)
          t_window, count_window, steps_window = time.time(), 0.0, 0
        if done % c.eval_every == 0 or done == c.total_steps:
          ev = self.evaluate(state)
          writer.write(done, **ev)
          history.append({"step": done, **ev})
          postfix["val_loss"] = f"{ev['val_loss']:.4f}"
          bar.set_postfix(postfix, refresh=False)
        if _agree(stop.requested):
          ckpt.save(done, state, data.get_state(), config_dict, force=True)
          ckpt.wait()
          self._log(f"SIGTERM: saved step {done} to {self.workdir / 'checkpoints'}; exiting.")
          return {"preempted_at": done, "saved": True}
        if done % c.checkpoint_every == 0 or done == c.total_steps:
          ckpt.save(done, state, data.get_state(), config_dict)
      ckpt.wait()
    finally:
      bar.close()
      writer.close()
    return self._summary(history, time.time() - t_start, start, c.total_steps)

  def _check_finite(self, metrics, step: int, ckpt) -> None:
    """Stops before anything of a non-finite step is logged or saved."""
    loss = float(metrics["loss"])
    last = (f"The last good checkpoint is step {ckpt.latest_step()} in "
            f"{self.workdir / 'checkpoints'}; nothing of step {step} was saved.")
    if not math.isfinite(loss) or not np.asarray(metrics["state_finite"]).all():
      self._log_worst_fp8()
    if not math.isfinite(loss):
      raise NonFiniteLoss(f"loss is {loss} at step {step}; stopping. {last}")
    flags = np.asarray(metrics["state_finite"])
    if not flags.all():
      leaf = checkpoint.floating_paths(self.abstract_state())[int(np.argmin(flags))]
      raise NonFiniteState(f"after step {step} the train state's leaf {leaf} is not finite "
                           f"(the loss, {loss:.4g}, still is); stopping. {last}")

  _fp8_last: tuple[int, dict[str, float]] | None = None

  def _log_worst_fp8(self, top: int = 10) -> None:
    """The FP8 tensors closest to trouble at the last statistics step, as a console table."""
    if self._fp8_last is None:
      return
    step, stats = self._fp8_last
    self._log(monitor.fp8_worst_table(stats, step, top))

  def _summary(self, history, wall, start, last_step) -> dict[str, Any]:
    records = monitor.read_metrics(self.workdir) if self.is_main else history
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val_loss" in r]
    summary = {"steps": last_step, "resumed_from": start, "wall_time_s": round(wall, 1),
               "final_train_loss": train[-1]["loss"] if train else None,
               "final_val_loss": val[-1]["val_loss"] if val else None}
    if val and "val_accuracy" in val[-1]:
      summary["final_val_accuracy"] = val[-1]["val_accuracy"]
    rate = f"{self.task.unit}_per_s"
    if train and all(rate in r for r in train):
      summary[rate] = round(float(np.median([r[rate] for r in train])), 1)
    if self.is_main:
      if self.config.get("plot", True):
        path = monitor.plot_losses(self.workdir, records, title=self.title)
        summary["plot"] = str(path) if path else None
        path = monitor.plot_fp8_heatmap(self.workdir, records)
        if path:
          summary["fp8_heatmap"] = str(path)
      (self.workdir / "summary.json").write_text(json.dumps(summary, indent=2))
      self._log(monitor.table("summary:", summary))
    return summary

  def _log(self, text: str) -> None:
    if self.is_main:
      print(text, flush=True)


def _agree(flag: bool) -> bool:
  """True on every process if it is True on any (e.g. a SIGTERM: all must save the same step)."""
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils

  return bool(np.max(multihost_utils.process_allgather(np.int32(flag))))
