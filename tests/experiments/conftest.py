"""The section scripts import their sibling experiments/harness.py: put experiments/ on sys.path."""

import pathlib
import sys

_EXPERIMENTS = str(pathlib.Path(__file__).resolve().parents[2] / "experiments")
if _EXPERIMENTS not in sys.path:
  sys.path.insert(0, _EXPERIMENTS)
