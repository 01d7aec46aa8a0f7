"""Ready-made optimizers with FP8-compressed states."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optax

from mpxla.optim.compress import compress_states


def adamw_fp8(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-4,
    mask: Any | Callable[[optax.Params], Any] | None = None,
    **compression: Any,
) -> optax.GradientTransformationExtraArgs:
  """AdamW with FP8 moments: `compress_states(optax.adamw(...), **compression)`.

  Moments m, v follow optax.adamw (m = b1 m + (1 - b1) g, v = b2 v + (1 - b2) g^2,
  u = -lr (m_hat / (sqrt(v_hat) + eps) + weight_decay * p)) and are stored
  compressed between steps.

  Args:
    learning_rate: a float or an Optax schedule.
    b1, b2, eps, weight_decay, mask: as in `optax.adamw`.
    **compression: `compress_states` keywords (config, overrides and the
      LeafConfig fields fmt, expansion, group_size, min_size, compress, rounding).
      Works under `optax.inject_hyperparams`, which passes them back as
      `compression={...}`.

  Returns:
    An `optax.GradientTransformationExtraArgs`.
  """
  nested = compression.pop("compression", None)
  if nested is not None:  # Re-call by optax.inject_hyperparams: compression={...}.
    compression = {**nested, **compression}
  inner = optax.adamw(
      learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=mask
  )
  return compress_states(inner, **compression)
