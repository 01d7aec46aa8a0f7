"""python -m mpxla.train --config=configs/NAME.py[:variant] --workdir=DIR [--config.key=value ...] [--aot]

Trains (resuming from the latest checkpoint in DIR), or with --aot compiles the train
step for the config and mesh without running it and prints the memory breakdown and the
step's compiled FLOPs per device (JSON).
"""

from __future__ import annotations

from mpxla.train import preemption

preemption.install()  # first: a SIGTERM during start-up is remembered, not fatal

import argparse  # noqa: E402
import errno  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402

# Causes of OSError that are the file system's, reported as one line (no traceback).
_FS_ERRNOS = {errno.EROFS: "read-only file system", errno.ENOSPC: "no space left on device",
              errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
              errno.EDQUOT: "disk quota exceeded"}
_FS_TEXTS = {"Read-only file system": errno.EROFS, "No space left on device": errno.ENOSPC,
             "Permission denied": errno.EACCES, "Disk quota exceeded": errno.EDQUOT}


def parse(argv: list[str]):
  parser = argparse.ArgumentParser(prog="python -m mpxla.train", description=__doc__.split("\n\n")[1])
  parser.add_argument("--config", required=True, help="configs/NAME.py[:variant]")
  parser.add_argument("--workdir", help="where checkpoints, metrics and plots go (required unless --aot)")
  parser.add_argument("--aot", action="store_true", help="compile only; print the memory breakdown and "
                      "the step's compiled FLOPs per device as JSON")
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


def filesystem_error(e: BaseException, workdir: str | None) -> str | None:
  """'cannot write PATH: CAUSE' if a file-system fault is behind `e` (any link of its chain)."""
  chain = []
  while e is not None and e not in chain:
    chain.append(e)
    e = e.__cause__ or e.__context__
  codes = [x.errno if isinstance(x, OSError) and x.errno in _FS_ERRNOS else
           next((c for text, c in _FS_TEXTS.items() if text in str(x)), None) for x in chain]
  code = next((c for c in codes if c is not None), None)
  if code is None:
    return None
  paths = [getattr(x, "filename", None) or re.search(r'file "([^"]+)"', str(x)) for x in chain]
  path = next((p if isinstance(p, str) else p.group(1) for p in paths if p), workdir)
  return f"cannot write {path}: {_FS_ERRNOS[code]}. Nothing already saved was removed."


def _drop_orbax_errors(record: logging.LogRecord) -> bool:
  return not (record.levelno >= logging.ERROR and "orbax" in record.pathname)


def _drop_unretrieved_checkpoint_writes(record: logging.LogRecord) -> bool:
  """Drops asyncio's 'exception was never retrieved' for a failed checkpoint write (it comes
  when the event loop is collected, and the failure is reported on its own)."""
  text = record.getMessage()
  return not ("never retrieved" in text and "OCDBT" in text)


def _quiet_closed_loops(unraisable) -> None:
  """Drops 'Event loop is closed' from TensorStore callbacks that finish after Orbax closed
  their event loop (after a failed read or write, which is reported on its own)."""
  if not (isinstance(unraisable.exc_value, RuntimeError)
          and str(unraisable.exc_value) == "Event loop is closed"):
    sys.__unraisablehook__(unraisable)


def _simulate_devices_for_aot(config) -> None:
  """--aot on CPU: simulate as many host devices as the mesh names (before JAX starts)."""
  sizes = [int(v) for v in dict(config.get("mesh", {})).values() if isinstance(v, int) and v > 0]
  n = math.prod(sizes) if sizes else 1
  flags = os.environ.get("XLA_FLAGS", "")
  if n > 1 and "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()


def main(argv: list[str] | None = None) -> int:
  args, overrides = parse(sys.argv[1:] if argv is None else argv)
  from mpxla.train import config as config_lib

  try:
    config = config_lib.load(args.config)
    for key, value in overrides:
      config_lib.override(config, key, value)
    config_lib.resolve(config)
  except config_lib.ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if args.aot:
    _simulate_devices_for_aot(config)
  try:
    return _main(args, config)
  except config_lib.ConfigError as e:  # found when the trainer meets the mesh
    print(f"error: {e}", file=sys.stderr)
    return 2
  except Exception as e:
    message = filesystem_error(e, args.workdir)
    if message is None:
      raise
    print(f"error: {message}", file=sys.stderr)
    return 1


def _main(args, config) -> int:
  # Orbax logs failures of its background save threads (and of reads) as errors with a
  # traceback; each of them also reaches the trainer as an exception, reported in one line.
  logging.getLogger("absl").addFilter(_drop_orbax_errors)
  logging.getLogger("asyncio").addFilter(_drop_unretrieved_checkpoint_writes)
  sys.unraisablehook = _quiet_closed_loops
  import jax

  if os.environ.get("MPXLA_CPU_COLLECTIVES"):  # e.g. 'gloo' for CPU processes on one machine
    jax.config.update("jax_cpu_collectives_implementation", os.environ["MPXLA_CPU_COLLECTIVES"])
  from mpxla.parallel import initialize

  initialize()
  from mpxla.train.checkpoint import IncompatibleWorkdir, NoGoodCheckpoint
  from mpxla.train.lock import WorkdirLocked
  from mpxla.train.trainer import NonFiniteLoss, NonFiniteState, Trainer

  trainer = Trainer(config, args.workdir or "/tmp/mpxla-aot", name=args.config)
  if args.aot:
    print(json.dumps(trainer.aot(), indent=2))
    return 0
  try:
    trainer.run()
  except (IncompatibleWorkdir, NoGoodCheckpoint, WorkdirLocked, NonFiniteLoss,
          NonFiniteState) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
