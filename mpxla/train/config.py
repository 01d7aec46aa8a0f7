"""Configs: `ml_collections` ConfigDicts in Python files, with command-line overrides.

    --config=configs/gpt_tiny.py[:variant]   calls get_config('variant') in that file
    --config.optim.lr=1e-3                   overrides a key (parsed as a Python literal)

An unknown key fails with the close matches; a value of the wrong type fails naming
the key and both types. Every config has `seed`, `recipe`, `total_steps`, `log_every`,
`checkpoint_every` and `eval_every`. `resolve` checks the ranges of the run's numbers
(`RANGES`) and fills the keys that follow others (`optim.decay_steps=None` follows
`total_steps`).
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import math
import pathlib

import ml_collections

REQUIRED = ("seed", "recipe", "total_steps", "log_every", "checkpoint_every", "eval_every")


class ConfigError(ValueError):
  """A config that cannot be loaded or overridden as asked."""


def load(spec: str) -> ml_collections.ConfigDict:
  """Loads 'path/to/config.py[:arg]' by calling its get_config(arg)."""
  path, _, arg = spec.partition(":")
  file = pathlib.Path(path)
  if not file.is_file():
    raise ConfigError(f"--config={spec!r}: no such file {path!r}.")
  module_spec = importlib.util.spec_from_file_location(f"_mpxla_config_{file.stem}", file)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"{path} defines no get_config().")
  config = module.get_config(arg) if arg else module.get_config()
  missing = [k for k in REQUIRED if k not in config]
  if missing:
    raise ConfigError(f"{path} lacks the required keys {missing}.")
  return config


def _all_keys(config, prefix="") -> list[str]:
  keys = []
  for k, v in config.items():
    keys.append(prefix + k)
    if isinstance(v, ml_collections.ConfigDict):
      keys += _all_keys(v, prefix + k + ".")
  return keys


def _parse(text: str):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text  # a bare string


def override(config: ml_collections.ConfigDict, key: str, text: str) -> None:
  """Sets config[key] (dotted) from its command-line text, type-checked."""
  *parents, leaf = key.split(".")
  node = config
  for i, part in enumerate(parents + [leaf]):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      close = difflib.get_close_matches(key, _all_keys(config), n=3, cutoff=0.6)
      hint = f" Did you mean {', '.join('--config.' + c for c in close)}?" if close else ""
      raise ConfigError(f"--config.{key}: unknown key {'.'.join((parents + [leaf])[: i + 1])!r}.{hint}")
    if i < len(parents):
      node = node[part]
  old, value = node[leaf], _parse(text)
  if isinstance(old, bool) and not isinstance(value, bool):
    raise ConfigError(f"--config.{key}={text}: expected True or False.")
  if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
    value = float(value)
  if old is not None and not isinstance(value, type(old)):
    raise ConfigError(f"--config.{key}={text}: expected {type(old).__name__}, got {type(value).__name__}.")
  with node.ignore_type():
    node[leaf] = value


# key: (lowest allowed value, what it means). Keys absent from a config are not checked.
RANGES = {
    "total_steps": (1, "the number of training steps"),
    "log_every": (1, "steps between logged metrics"),
    "eval_every": (1, "steps between evaluations"),
    "checkpoint_every": (1, "steps between checkpoints"),
    "keep_checkpoints": (1, "checkpoints kept on disk"),
    "eval_batches": (0, "validation batches per evaluation; 0 = one exact pass"),
    "fp8_stats_every": (0, "steps between FP8 statistics (mpxla.nn.fp8_stats); 0 = off"),
    "data.batch_size": (1, "the global batch size"),
    "data.seq_len": (1, "tokens per sequence"),
    "optim.warmup_steps": (0, "learning-rate warmup steps"),
    "optim.decay_steps": (1, "steps of the cosine decay; None follows total_steps"),
}
POSITIVE_FLOATS = ("optim.lr",)
# key: (lowest, highest, whether the highest is allowed, what it means) for real numbers.
FLOAT_RANGES = {
    "seed": (0, 2**32 - 1, True, "the seed (data order, initialization, rounding bits)"),
    "optim.grad_clip": (0.0, math.inf, False, "the global-norm clip (0 or None: off)"),
    "optim.weight_decay": (0.0, math.inf, False, "the decoupled weight decay"),
    "optim.final_lr_fraction": (0.0, math.inf, False, "the final learning rate / lr"),
    "optim.b1": (0.0, 1.0, False, "Adam's first-moment decay"),
    "optim.b2": (0.0, 1.0, False, "Adam's second-moment decay"),
    "optim.eps": (0.0, math.inf, False, "Adam's epsilon"),
    "data.val_percent": (1, 99, True, "the percent of documents held out for validation"),
}


def resolve(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A checked copy with `optim.decay_steps=None` replaced by `total_steps`.

  Raises ConfigError naming the key and its allowed range when a number is out of range.
  """
  config = ml_collections.ConfigDict(config.to_dict())
  optim = config.get("optim")
  if optim is not None and "decay_steps" in optim and optim.decay_steps is None:
    with optim.ignore_type():
      optim.decay_steps = config.total_steps
  flat = {k: _get(config, k) for k in _all_keys(config)}
  for key, (low, what) in RANGES.items():
    value = flat.get(key)
    if key not in flat or (value is None and key == "optim.decay_steps"):
      continue
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
      raise ConfigError(f"--config.{key}={value!r}: {what} must be an integer >= {low}.")
  for key in POSITIVE_FLOATS:
    value = flat.get(key)
    if key in flat and (isinstance(value, bool) or not isinstance(value, (int, float))
                        or not math.isfinite(value) or value <= 0):
      raise ConfigError(f"--config.{key}={value!r}: must be a finite number > 0.")
  for key, (low, high, closed, what) in FLOAT_RANGES.items():
    value = flat.get(key)
    if key not in flat or (value is None and key == "optim.grad_clip"):
      continue
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
        low <= value and (value <= high if closed else value < high)):
      interval = f"[{low}, {high}{']' if closed else ')'}"
      raise ConfigError(f"--config.{key}={value!r}: {what} must be in {interval}.")
  return config


def _get(config, dotted: str):
  node = config
  for part in dotted.split("."):
    node = node[part]
  return node


def to_json(config: ml_collections.ConfigDict) -> str:
  return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str)
