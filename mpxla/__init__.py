"""mpxla: memory-efficient FP8 training in JAX and Flax.

Subpackages (imported explicitly; importing `mpxla` itself does nothing else):

- `mpxla.formats`: 8-bit number formats (E4M3, E5M2, HiF8) and exact casts.
- `mpxla.quant`: scaled quantization (`QTensor`, granularities, amax scaling).
"""

__version__ = "0.1.0"
