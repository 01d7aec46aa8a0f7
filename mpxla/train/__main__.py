"""python -m mpxla.train --config=configs/NAME.py[:variant] --workdir=DIR [--config.key=value ...] [--aot]

Trains (resuming from the latest checkpoint in DIR), or with --aot compiles the train
step for the config and mesh without running it and prints the memory breakdown.
"""

from __future__ import annotations

import argparse
import json
import sys


def parse(argv: list[str]):
  parser = argparse.ArgumentParser(prog="python -m mpxla.train", description=__doc__.split("\n\n")[1])
  parser.add_argument("--config", required=True, help="configs/NAME.py[:variant]")
  parser.add_argument("--workdir", help="where checkpoints, metrics and plots go (required unless --aot)")
  parser.add_argument("--aot", action="store_true", help="compile only; print the memory breakdown as JSON")
  args, rest = parser.parse_known_args(argv)
  overrides = []
  for item in rest:
    if not item.startswith("--config.") or "=" not in item:
      parser.error(f"unrecognized argument {item!r} (overrides look like --config.key=value)")
    key, _, value = item[len("--config."):].partition("=")
    overrides.append((key, value))
  if not args.aot and not args.workdir:
    parser.error("--workdir is required (or pass --aot)")
  return args, overrides


def main(argv: list[str] | None = None) -> int:
  args, overrides = parse(sys.argv[1:] if argv is None else argv)
  from mpxla.train import config as config_lib

  try:
    config = config_lib.load(args.config)
    for key, value in overrides:
      config_lib.override(config, key, value)
  except config_lib.ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2

  import os

  import jax

  if os.environ.get("MPXLA_CPU_COLLECTIVES"):  # e.g. 'gloo' for CPU processes on one machine
    jax.config.update("jax_cpu_collectives_implementation", os.environ["MPXLA_CPU_COLLECTIVES"])
  from mpxla.parallel import initialize

  initialize()
  from mpxla.train.checkpoint import IncompatibleWorkdir
  from mpxla.train.trainer import NonFiniteLoss, Trainer

  trainer = Trainer(config, args.workdir or "/tmp/mpxla-aot")
  if args.aot:
    print(json.dumps(trainer.aot(), indent=2))
    return 0
  try:
    trainer.run()
  except (IncompatibleWorkdir, NonFiniteLoss) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
