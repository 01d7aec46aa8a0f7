"""Orbax checkpoints of a run: train state, data iterator state, config and fingerprint.

Each checkpoint step holds four items: `state` (the train state), `data` (the iterator's
state), `config` (the resolved config that made it) and `fingerprint` (per leaf: shape, dtype
and two checksums of the raw bits, computed on device from the state that was saved).

A workdir belongs to one config. `check_compatible` refuses a config that differs from the
saved one in anything but the run-length, logging and mesh keys, so a checkpoint is never
overwritten by an incompatible run. `Checkpointer.restore_latest` restores the newest
checkpoint that reads and verifies (fingerprint, finiteness); one that does not is moved
aside to `WORKDIR/corrupt/` (never deleted) and the previous one is tried.
"""

from __future__ import annotations

import json
import pathlib
import shutil
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

# Keys that may change between a run and its resumption (run length, logging, where the data
# cache lives, and the mesh: a run may resume on another device layout; the global batch
# stays the same).
RESUMABLE_KEYS = ("total_steps", "log_every", "checkpoint_every", "eval_every", "keep_checkpoints",
                  "progress", "eval_batches", "plot", "data.cache_dir", "mesh.data", "mesh.fsdp",
                  "mesh.tensor", "mesh.expert", "fp8_stats_every")


# Keys added to the configs after workdirs were made, with the value those runs used: a key
# absent on one side counts as this value (so old workdirs still resume).
ADDED_KEYS = {"model.moe_lbl_scope": "global", "model.moe_axis_name": None}


class IncompatibleWorkdir(RuntimeError):
  """The workdir holds a run made with a different config."""


class NoGoodCheckpoint(RuntimeError):
  """Checkpoints exist, but none of them reads and verifies."""


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, prefix + k + "."))
    else:
      out[prefix + k] = v
  return out


def check_compatible(saved_config: dict | None, config_dict: dict, where: str) -> None:
  """Raises IncompatibleWorkdir if `saved_config` differs beyond RESUMABLE_KEYS.

  `where` names the saved config's origin (a config.json or a checkpoint) in the message.
  """
  if saved_config is None:
    return
  saved = {**ADDED_KEYS, **_flatten(saved_config)}
  new = {**ADDED_KEYS, **_flatten(json.loads(json.dumps(config_dict, default=str)))}
  diff = sorted(k for k in set(saved) | set(new)
                if k not in RESUMABLE_KEYS and saved.get(k, "<absent>") != new.get(k, "<absent>"))
  if diff:
    lines = "\n".join(f"  {k}: saved {saved.get(k, '<absent>')!r}, now {new.get(k, '<absent>')!r}"
                      for k in diff[:20])
    raise IncompatibleWorkdir(
        f"{where} holds a run with a different config; refusing to overwrite its "
        f"checkpoints.\n{lines}\nUse a new --workdir, or pass the saved values to resume.")


def read_config(workdir: pathlib.Path) -> dict | None:
  """workdir/config.json, or None when there is none."""
  path = workdir / "config.json"
  if not path.exists():
    return None
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise IncompatibleWorkdir(f"{path} is not valid JSON ({e}); mend or remove it "
                              "(the config saved in each checkpoint is then used).") from e


# --- fingerprints ------------------------------------------------------------------------

def _words(x: jax.Array) -> jax.Array:
  """The raw bits of x as uint32 words (one per element; two per 64-bit or complex element)."""
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if jnp.issubdtype(x.dtype, jnp.complexfloating):
    x = jnp.stack([jnp.real(x), jnp.imag(x)], axis=-1)
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  bits = x.dtype.itemsize * 8
  if bits == 64:  # bitcast to two 32-bit halves (a new last axis)
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  return jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{bits}")).astype(jnp.uint32)


def _checksums(x: jax.Array) -> jax.Array:
  """uint32[2]: sum of the words and sum of word * (2 * flat_index + 1), both mod 2^32.

  Integer sums wrap exactly in any order, so the result does not depend on the sharding.
  """
  w = _words(x)
  index = jnp.zeros(w.shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(w.ndim)):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, w.shape, axis) * jnp.uint32(stride)
    stride = (stride * w.shape[axis]) % 2**32
  return jnp.stack([jnp.sum(w, dtype=jnp.uint32),
                    jnp.sum(w * (2 * index + 1), dtype=jnp.uint32)])


@jax.jit
def _device_checksums(tree) -> list[jax.Array]:
  return [_checksums(x) for x in jax.tree.leaves(tree)]


def fingerprint(tree) -> dict[str, dict]:
  """{leaf path: {'shape', 'dtype', 'sum'}} of a pytree of arrays, checksums computed on device."""
  sums = jax.device_get(_device_checksums(tree))
  paths = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(p): {"shape": list(x.shape), "dtype": str(x.dtype),
                                   "sum": [int(v) for v in s]}
          for (p, x), s in zip(paths, sums, strict=True)}


def compare_shapes(saved: dict[str, dict], abstract) -> list[str]:
  """Leaves whose path, shape or dtype differ between a fingerprint and an abstract state."""
  want = {jax.tree_util.keystr(p): (list(x.shape), str(x.dtype))
          for p, x in jax.tree_util.tree_flatten_with_path(abstract)[0]}
  have = {k: (v["shape"], v["dtype"]) for k, v in saved.items()}
  return [f"{k}: saved {have.get(k, '<absent>')}, now {want.get(k, '<absent>')}"
          for k in sorted(set(want) | set(have)) if want.get(k) != have.get(k)]


def verify(state, saved: dict[str, dict]) -> str | None:
  """None if `state` matches its saved fingerprint and is finite; else what is wrong."""
  now = fingerprint(state)
  for path, entry in saved.items():
    if path not in now or now[path]["sum"] != entry["sum"]:
      return f"leaf {path} does not match its checksum"
  return first_non_finite(state)


def finite_flags(tree) -> jax.Array:
  """bool[n]: whether each floating leaf of `tree` is all finite (one fused reduction in a step)."""
  flags = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
           if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.stack(flags) if flags else jnp.ones((0,), bool)


def floating_paths(tree) -> list[str]:
  """The paths of the floating leaves, in the order of `finite_flags`."""
  return [jax.tree_util.keystr(p) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
          if jnp.issubdtype(x.dtype, jnp.inexact)]


def first_non_finite(tree) -> str | None:
  """'leaf PATH is not finite' for the first floating leaf with a NaN or inf; None if none."""
  flags = np.asarray(jax.device_get(jax.jit(finite_flags)(tree)))
  if flags.all():
    return None
  return f"leaf {floating_paths(tree)[int(np.argmin(flags))]} is not finite"


# --- the manager ---------------------------------------------------------------------------

class Checkpointer:
  """Saves and restores {'state', 'data', 'config', 'fingerprint'}, keeping the last `keep`."""

  def __init__(self, directory: pathlib.Path, keep: int, async_save: bool = True,
               is_main: bool = True):
    self.directory = directory.absolute()
    self.is_main = is_main
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                           create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_state: dict, config_dict: dict,
           force: bool = False) -> None:
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
        config=ocp.args.JsonSave(config_dict),
        fingerprint=ocp.args.JsonSave(fingerprint(state))), force=force)

  def _json_items(self, step: int) -> dict[str, Any]:
    """The small JSON items `config` and `fingerprint` of checkpoint `step`, where present
    (checkpoints made before they existed lack them)."""
    names = [n for n in ("config", "fingerprint") if (self.directory / str(step) / n).is_dir()]
    if not names:
      return {}
    return dict(self.manager.restore(step, args=ocp.args.Composite(
        **{n: ocp.args.JsonRestore() for n in names})))

  def restore(self, step: int, abstract_state) -> tuple[Any, dict]:
    """(state, data state) of checkpoint `step`, unverified."""
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    return out["state"], out["data"]

  def restore_latest(self, abstract_state, check_config: Callable[[dict | None, int], None],
                     log: Callable[[str], None]) -> tuple[int, Any, dict] | None:
    """(step, state, data state) of the newest checkpoint that reads and verifies.

    `check_config(saved_config, step)` raises IncompatibleWorkdir for a checkpoint made by
    another config; that error propagates and nothing is moved. A checkpoint that cannot be
    read, whose shapes differ from its own fingerprint, whose checksums differ, or that holds
    a non-finite value is moved to `WORKDIR/corrupt/` and the previous one is tried. Returns
    None when there are no checkpoints; raises NoGoodCheckpoint when none is left.
    """
    moved = []
    while (step := self.latest_step()) is not None:
      try:
        items = self._json_items(step)
        check_config(items.get("config"), step)
        saved = items.get("fingerprint")
        if saved is not None and (diff := compare_shapes(saved, abstract_state)):
          raise IncompatibleWorkdir(
              f"checkpoint {step} in {self.directory} holds other shapes than this config's "
              "state:\n  " + "\n  ".join(diff[:10]))
        state, data_state = self.restore(step, abstract_state)
        problem = verify(state, saved) if saved is not None else first_non_finite(state)
        if saved is None:
          log(f"checkpoint {step} has no fingerprint (made by an older mpxla): restored "
              "without checksum verification.")
      except IncompatibleWorkdir:
        raise
      except Exception as e:  # any failure to read: the checkpoint is unusable
        problem = f"cannot be read: {type(e).__name__}: {_first_line(e)}"
      if problem is None:
        return step, state, data_state
      moved.append(self.move_aside(step))
      log(f"checkpoint {step} {problem}; moved it to {moved[-1]} and trying the previous one.")
    if moved:
      raise NoGoodCheckpoint(
          f"no good checkpoint left in {self.directory}: {len(moved)} unusable one(s) moved to "
          f"{moved[-1].parent}. Start a new --workdir, or move a checkpoint back to resume "
          "from it.")
    return None

  def move_aside(self, step: int) -> pathlib.Path:
    """Moves checkpoint `step` to WORKDIR/corrupt/STEP[-N] (never deletes it)."""
    target_dir = self.directory.parent / "corrupt"
    target = target_dir / str(step)
    if self.is_main:
      target_dir.mkdir(exist_ok=True)
      n = 0
      while target.exists():
        n += 1
        target = target_dir / f"{step}-{n}"
      shutil.move(str(self.directory / str(step)), str(target))
    _sync("mpxla_move_aside")
    self.manager.reload()
    return target

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _first_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return text[0][:300] if text else repr(e)


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)

