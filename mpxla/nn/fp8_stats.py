"""FP8 numerics you can see: per-layer statistics of every quantized tensor, as values.

Inside `collecting()`, each FP8 matmul with per-tensor scaling ('tensor', 'delayed') reads a
*probe*: a zero float32 [3, 5] variable in the Linen collection `COLLECTION` ('fp8_stats').
The probe is an input of the FP8 matmul whose gradient is the statistics, rows
TENSORS = (input, weight, grad) and columns STATS:

  amax        max |x| of the tensor this step
  scale       the scale used (s: x ~= codes * s)
  saturated   fraction of elements with |x| / s above the format's max (clipped)
  underflow   fraction of nonzero elements whose code is 0 (flushed)
  amax_ratio  delayed scaling: this step's amax / the history's amax (1 for 'tensor')

so the forward pass fills the input and weight rows and the backward pass the gradient row:
nothing leaves the step but arrays (no host callback). Outside `collecting()` (or without
probes) layers compute exactly as before. `probe_shapes(apply_fn)` gives the probes a model
needs; `flatten(grads)` names the values `<layer path>/<tensor>/<stat>`.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mpxla import formats

COLLECTION = "fp8_stats"
TENSORS = ("input", "weight", "grad")
STATS = ("amax", "scale", "saturated", "underflow", "amax_ratio")
PROBE = "probe"
_local = threading.local()


@contextlib.contextmanager
def collecting() -> Iterator[None]:
  """FP8 layers traced inside read (and, where the collection is mutable, create) probes."""
  before = getattr(_local, "on", False)
  _local.on = True
  try:
    yield
  finally:
    _local.on = before


def enabled() -> bool:
  return getattr(_local, "on", False)


def tensor_stats(x: jax.Array, codes: jax.Array, scale: jax.Array, fmt,
                 current_amax: jax.Array, history_amax: jax.Array | None = None) -> jax.Array:
  """The STATS of one quantized tensor (float32 [5])."""
  fmt = formats.get_format(fmt)
  a = jnp.abs(jax.lax.stop_gradient(x)).astype(jnp.float32)
  n = jnp.maximum(jnp.float32(x.size), 1.0)
  # Clipped: beyond the largest code by more than rounding (the amax element maps to it).
  saturated = jnp.sum(a * (1.0 / scale) > fmt.max * (1 + 2.0 ** -20)) / n
  zero_code = formats.upcast(codes, fmt, jnp.float32) == 0
  underflow = jnp.sum((a > 0) & zero_code) / jnp.maximum(jnp.sum(a > 0), 1.0)
  ratio = jnp.float32(1.0) if history_amax is None else jnp.where(
      history_amax > 0, current_amax / history_amax, 1.0)
  return jnp.stack([current_amax, scale, saturated, underflow, ratio]).astype(jnp.float32)


def probe_shapes(apply_fn: Callable[..., tuple[Any, dict]], *args, **kwargs) -> Any:
  """Zero probes for a model: `apply_fn(*args, mutable=[COLLECTION], **kwargs)` traced under
  `collecting()` creates them (abstractly); returns the collection filled with zeros."""
  def run():
    with collecting():
      return apply_fn(*args, mutable=[COLLECTION], **kwargs)[1].get(COLLECTION, {})

  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(run))


def flatten(stats: Any) -> dict[str, float]:
  """{'<layer path>/<tensor>/<stat>': value} from the gradient of the probes."""
  out = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(stats):
    keys = [getattr(k, "key", getattr(k, "name", str(k))) for k in path]
    if keys and keys[-1] == PROBE:
      keys = keys[:-1]
    layer = "/".join(str(k) for k in keys)
    values = np.asarray(leaf, np.float64)
    for i, t in enumerate(TENSORS):
      for j, s in enumerate(STATS):
        out[f"{layer}/{t}/{s}"] = float(values[i, j])
  return out
