"""Ready-made optimizers with FP8-compressed states."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import optax

from mpxla.optim import _fused
from mpxla.optim.compress import LeafConfig, Overrides, compress_states, make_config

IMPLS = ("auto", "xla", "pallas_gpu", "pallas_tpu")


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
    impl: str = "auto",
    interpret: bool = False,
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
    impl: 'auto' (default): the fused Pallas update kernel (`mpxla.optim._fused`) on GPU
      and TPU when the config is the kernel's (E4M3 with expansion and groups of 128, the
      default), the XLA path otherwise and on CPU. 'xla': always
      `compress_states(optax.adamw(...))`. 'pallas_gpu' / 'pallas_tpu': the kernel with
      that platform's layout (Triton / Mosaic); raises if the config is not the kernel's.
      Both paths keep the same state and give the same results (bit for bit in interpret
      mode; see docs/optim.md, "Fused update kernel").
    interpret: run the Pallas kernel in interpret mode (CPU; for tests).

  Returns:
    An `optax.GradientTransformationExtraArgs`. Under `optax.inject_hyperparams`
    the numeric arguments become hyperparameters and `config` stays static.
  """
  if impl not in IMPLS:
    raise ValueError(f"adamw_fp8: impl must be one of {IMPLS}, got {impl!r}")
  if impl == "auto":
    platform = jax.default_backend()
    fits = _fused.kernel_config(make_config(config))
    impl = {"gpu": "pallas_gpu", "tpu": "pallas_tpu"}.get(platform, "xla") if fits else "xla"
  elif impl != "xla":
    if not _fused.kernel_config(make_config(config)):
      raise ValueError(f"adamw_fp8: impl={impl!r} needs fmt='e4m3', expansion=True and "
                       "group_size=128; use impl='auto'/'xla' for other settings")
  if impl != "xla":
    return _fused.fused_adamw_fp8(
        learning_rate, b1, b2, eps, weight_decay, mask=mask, config=config, overrides=overrides,
        layout=impl.removeprefix("pallas_"), interpret=interpret)
  inner = optax.adamw(
      learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=mask
  )
  return compress_states(inner, config, overrides=overrides)
