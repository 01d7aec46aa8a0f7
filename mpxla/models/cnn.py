"""A small convolutional network with BatchNorm, for 8x8 digits or small images.

conv(3x3) -> BatchNorm -> relu, twice per stage, average pooling between stages, then a
dense classifier. BatchNorm statistics are global, local or per ghost batch
(`mpxla.nn.batch_norm.BatchNorm`); the 'batch_stats' collection holds the running averages.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class CNNConfig:
  num_classes: int = 10
  widths: tuple[int, ...] = (32, 64)
  dtype: str = "float32"
  bn_scope: str = "global"  # 'global' | 'local'
  ghost_batch_size: int = 0  # > 0: statistics per virtual batch of this many examples
  bn_axis_name: str | tuple[str, ...] | None = None  # the batch's mesh axes (mpxla.parallel.stats)
  bn_momentum: float = 0.9  # running averages settle within a few hundred steps


class CNN(nn.Module):
  """images [B, H, W, C] -> float32 logits [B, num_classes]."""

  config: CNNConfig

  @nn.compact
  def __call__(self, images_BxHxWxC, train: bool = False):
    from mpxla.nn.batch_norm import BatchNorm

    c = self.config
    x = images_BxHxWxC.astype(c.dtype)
    for s, width in enumerate(c.widths):
      if s:
        x = nn.avg_pool(x, (2, 2), strides=(2, 2))
      for j in range(2):
        x = nn.Conv(width, (3, 3), use_bias=False, dtype=c.dtype, name=f"conv{s}_{j}")(x)
        x = BatchNorm(stat_scope=c.bn_scope, ghost_batch_size=c.ghost_batch_size or None,
                      axis_name=_axes(c.bn_axis_name), momentum=c.bn_momentum, dtype=c.dtype,
                      name=f"bn{s}_{j}")(x, use_running_average=not train)
        x = jax.nn.relu(x)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(c.num_classes, dtype=c.dtype, name="head")(x).astype(jnp.float32)


def _axes(names):
  return tuple(names) if isinstance(names, list | tuple) else names
