"""Configs: `ml_collections` ConfigDicts in Python files, with command-line overrides.

    --config=configs/gpt_tiny.py[:variant]   calls get_config('variant') in that file
    --config.optim.lr=1e-3                   overrides a key (parsed as a Python literal)

An unknown key fails with the close matches; a value of the wrong type fails naming
the key and both types. Every config has `seed`, `recipe`, `total_steps`, `log_every`,
`checkpoint_every` and `eval_every`.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import json
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


def to_json(config: ml_collections.ConfigDict) -> str:
  return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str)
