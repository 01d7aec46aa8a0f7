"""FP8-compressed optimizer states (COAT-style dynamic range expansion) for Optax.

- `compress_states(inner, ...)`: wraps any Optax transform; its moment state
  leaves (`classify`) are stored as 8-bit codes plus per-group metadata.
- `adamw_fp8(...)`: `compress_states(optax.adamw(...))`.
- `compress(state, ...)` / `decompress(state)`: convert a plain Optax state to
  the compressed form and back.
- `expansion`: the per-group codec (pure functions).
- `apply_updates_stochastic(params, updates, step)` and `upcast_arithmetic(inner)`: training
  bf16 parameters without float32 master weights (stochastic rounding of p + u);
  `clip_by_global_norm`: Optax's clipping without a stored clipped copy of the gradients.
"""

from mpxla.optim import expansion
from mpxla.optim.compress import (
    EXACT_FIELDS,
    MOMENT_FIELDS,
    CompressedArray,
    LeafConfig,
    classify,
    compress,
    compress_states,
    decompress,
    is_compressed,
    nbytes,
)
from mpxla.optim.recipes import adamw_fp8
from mpxla.optim.updates import apply_updates_stochastic, clip_by_global_norm, upcast_arithmetic

__all__ = [
    "EXACT_FIELDS",
    "MOMENT_FIELDS",
    "CompressedArray",
    "LeafConfig",
    "adamw_fp8",
    "apply_updates_stochastic",
    "classify",
    "clip_by_global_norm",
    "compress",
    "compress_states",
    "decompress",
    "expansion",
    "is_compressed",
    "nbytes",
    "upcast_arithmetic",
]
