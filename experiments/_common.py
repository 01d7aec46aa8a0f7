"""Helpers shared by the section scripts of experiments/ (a sibling module: `import _common`).

experiments/ is on sys.path when a script runs (`python experiments/NAME.py`), under
experiments/report.py, and in tests/experiments (its conftest).
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import numpy as np


def stats(values) -> dict[str, float]:
  """mean, sample std (0 for one value), min, max and count of `values`, in float64."""
  v = np.asarray(values, np.float64)
  return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else 0.0,
          "min": float(v.min()), "max": float(v.max()), "n": int(v.size)}


def require_devices(script: str, n: int) -> None:
  """Raises RuntimeError naming the fix unless jax sees exactly n devices."""
  import jax  # pylint: disable=import-outside-toplevel

  if jax.device_count() != n:
    raise RuntimeError(
        f"{script} needs {n} devices, found {jax.device_count()}: run it as a script "
        f"(main() sets XLA_FLAGS=--xla_force_host_platform_device_count={n}) or set that "
        "flag before importing jax.")


def settings(quick: bool, quick_settings: dict[str, Any], full_settings: dict[str, Any], *,
             steps: int | None, seeds, evals: int) -> dict[str, Any]:
  """The quick or full settings, with `steps` (evaluating `evals` times) and `seeds` if given."""
  s = dict(quick_settings if quick else full_settings)
  if steps:
    s.update(steps=steps, eval_every=max(1, steps // evals))
  if seeds:
    s["seeds"] = tuple(seeds)
  return s


def load_results(out_dir) -> tuple[pathlib.Path, dict[str, Any]]:
  """(out_dir as a Path, the dict in out_dir/results.json)."""
  out_dir = pathlib.Path(out_dir)
  return out_dir, json.loads((out_dir / "results.json").read_text())


def save_figure(fig, path, dpi: int = 90, rect=None) -> None:
  """Lays out `fig` (inside `rect` if given), writes it to `path` and closes it."""
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  fig.tight_layout(**({} if rect is None else {"rect": rect}))
  fig.savefig(path, dpi=dpi)
  plt.close(fig)
