"""Named recipes: which matmuls run in FP8 and how activations are saved for the backward.

| recipe         | matmuls (x, w / grad)          | saved activations                              |
|----------------|--------------------------------|------------------------------------------------|
| `bf16`         | as the model computes them     | as JAX saves them (nothing quantized)          |
| `fp8_linear`   | E4M3 / E5M2, per-tensor JIT    | matmul inputs in FP8 (TransformerEngine-like)  |
| `fp8_delayed`  | E4M3 / E5M2, per-tensor delayed| matmul inputs in FP8                           |
| `fp8_block`    | E4M3 / E5M2, 1x128 and 128x128 | matmul inputs in FP8 (DeepSeek-V3-like)        |
| `mxfp8`        | E4M3 / E5M2, MX blocks of 32 with E8M0 scales | matmul inputs in MXFP8 (OCP Microscaling) |
| `coat`         | E4M3 / E5M2, per-tensor JIT    | everything in FP8: matmul inputs per tensor, norm inputs and linear outputs in 1x16 E4M3 |
| `hif8`         | E4M3 / E5M2, per-tensor JIT    | as `coat`, with the 1x16 groups stored as HiF8 codes |
| `bf16_sr`, `coat_sr` | as `bf16`, `coat`        | as `bf16`, `coat` (the trainer stores their parameters in BF16, no float32 master copy) |

`Recipe` is a frozen dataclass: derive variants with `dataclasses.replace(get_recipe('coat'),
linear=DotConfig(scaling='block'))`.
"""

from __future__ import annotations

import dataclasses

from mpxla import formats
from mpxla.nn.fp8_dot import DotConfig


@dataclasses.dataclass(frozen=True)
class Recipe:
  """What `mpxla.nn.quantize` does to each matched layer.

  Attributes:
    name: label used in reports.
    linear: FP8 matmul config for Dense/DenseGeneral/Einsum layers (None: keep them as built).
    activations: format of FP8-saved activations ('e4m3' or 'hif8'), or None. When set,
      norms save their input as 1 x `group` FP8, linear outputs flow on in FP8 (1 x `group`),
      and the wrapped model runs under `jax.checkpoint` saving only FP8 tensors, so the
      elementwise glue between layers is recomputed from them in the backward pass.
    group: group size of the FP8-saved activations (COAT: 16).
  """

  name: str
  linear: DotConfig | None = None
  activations: str | None = None
  group: int = 16

  def __post_init__(self):
    if self.activations is not None:
      formats.get_format(self.activations)
    if self.group < 1:
      raise ValueError(f"group={self.group} must be >= 1.")

  @property
  def quantizes(self) -> bool:
    return self.linear is not None or self.activations is not None


RECIPES: dict[str, Recipe] = {
    "bf16": Recipe("bf16"),
    "fp8_linear": Recipe("fp8_linear", linear=DotConfig()),
    "fp8_delayed": Recipe("fp8_delayed", linear=DotConfig(scaling="delayed")),
    "fp8_block": Recipe("fp8_block", linear=DotConfig(scaling="block")),
    "mxfp8": Recipe("mxfp8", linear=DotConfig(scaling="mx")),
    "coat": Recipe("coat", linear=DotConfig(), activations="e4m3"),
    "hif8": Recipe("hif8", linear=DotConfig(), activations="hif8"),
    # Model side of the trainer's recipes without float32 master weights (mpxla.train.recipes).
    "bf16_sr": Recipe("bf16_sr"),
    "coat_sr": Recipe("coat_sr", linear=DotConfig(), activations="e4m3"),
}


def get_recipe(recipe: str | Recipe | None) -> Recipe | None:
  """A `Recipe` from its name (or itself); None stays None (high precision)."""
  if recipe is None or isinstance(recipe, Recipe):
    return recipe
  if isinstance(recipe, str) and recipe in RECIPES:
    return RECIPES[recipe]
  raise ValueError(f"recipe={recipe!r}; use one of {sorted(RECIPES)} or an mpxla.nn.Recipe.")
