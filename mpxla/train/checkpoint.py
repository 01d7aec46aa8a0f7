"""Orbax checkpoints of a run: train state, data iterator state, and the config that made them.

A workdir belongs to one config. `check_compatible` refuses to reuse a workdir whose
saved config differs in anything but the run-length and logging keys, so a
checkpoint is never overwritten by an incompatible run.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import orbax.checkpoint as ocp

# Keys that may change between a run and its resumption (run length, logging, and the
# mesh: a run may resume on another device layout; the global batch stays the same).
RESUMABLE_KEYS = ("total_steps", "log_every", "checkpoint_every", "eval_every", "keep_checkpoints",
                  "progress", "eval_batches", "plot", "mesh.data", "mesh.fsdp", "mesh.tensor",
                  "mesh.expert")


# Keys added to the configs after workdirs were made, with the value those runs used: a key
# absent on one side counts as this value (so old workdirs still resume).
ADDED_KEYS = {"model.moe_lbl_scope": "global", "model.moe_axis_name": None}


class IncompatibleWorkdir(RuntimeError):
  """The workdir holds a run made with a different config."""


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, prefix + k + "."))
    else:
      out[prefix + k] = v
  return out


def check_compatible(workdir: pathlib.Path, config_dict: dict) -> None:
  """Raises IncompatibleWorkdir if workdir/config.json differs beyond RESUMABLE_KEYS."""
  saved_path = workdir / "config.json"
  if not saved_path.exists():
    return
  saved = {**ADDED_KEYS, **_flatten(json.loads(saved_path.read_text()))}
  new = {**ADDED_KEYS, **_flatten(json.loads(json.dumps(config_dict, default=str)))}
  diff = sorted(k for k in set(saved) | set(new)
                if k not in RESUMABLE_KEYS and saved.get(k, "<absent>") != new.get(k, "<absent>"))
  if diff:
    lines = "\n".join(f"  {k}: saved {saved.get(k, '<absent>')!r}, now {new.get(k, '<absent>')!r}"
                      for k in diff[:20])
    raise IncompatibleWorkdir(
        f"{workdir} holds a run with a different config; refusing to overwrite its "
        f"checkpoints.\n{lines}\nUse a new --workdir, or pass the saved values to resume.")


class Checkpointer:
  """Saves and restores {'state': pytree, 'data': json} every `every` steps, keeping `keep`."""

  def __init__(self, directory: pathlib.Path, keep: int, async_save: bool = True):
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                           create=True)
    self.manager = ocp.CheckpointManager(directory.absolute(), options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_state: dict, force: bool = False) -> None:
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)), force=force)

  def restore(self, step: int, abstract_state) -> tuple[Any, dict]:
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    return out["state"], out["data"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
