"""Ready-made optimizers with FP8-compressed states."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import optax

from mpxla.optim.compress import LeafConfig, Overrides, compress_states


def adamw_fp8(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-4,
    mask: Any | Callable[[optax.Params], Any] | None = None,
    *,
    config: LeafConfig | Mapping[str, Any] | None = None,
    overrides: Overrides = None,
) -> optax.GradientTransformationExtraArgs:
  """AdamW with FP8 moments: `compress_states(optax.adamw(...), config, overrides=...)`.

  Moments m, v follow optax.adamw (m = b1 m + (1 - b1) g, v = b2 v + (1 - b2) g^2,
  u = -lr (m_hat / (sqrt(v_hat) + eps) + weight_decay * p)) and are stored
  compressed between steps.

  Args:
    learning_rate: a float or an Optax schedule.
    b1, b2, eps, weight_decay, mask: as in `optax.adamw`.
    config: the storage settings, a `LeafConfig` or a dict of its fields
      (e.g. `{'fmt': 'e5m2', 'rounding': 'nearest'}`); default `LeafConfig()`.
    overrides: per-leaf settings, as in `compress`.

  Returns:
    An `optax.GradientTransformationExtraArgs`. Under `optax.inject_hyperparams`
    the numeric arguments become hyperparameters and `config` stays static.
  """
  inner = optax.adamw(
      learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=mask
  )
  return compress_states(inner, config, overrides=overrides)
