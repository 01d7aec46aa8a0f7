"""mpxla: memory-efficient FP8 training in JAX and Flax.

Subpackages (import them explicitly; importing `mpxla` itself does nothing else):

- `mpxla.formats`: 8-bit number formats (E4M3, E5M2, HiF8) and exact casts.
- `mpxla.quant`: scaled quantization (`QTensor`, granularities, amax and scales), and the
  helpers nn, attention and parallel share (`quant.tracing`, `quant.sharding`).
- `mpxla.optim`: Optax optimizers with FP8 states (`compress_states`, `adamw_fp8`).
- `mpxla.attention`: block-sparse attention with on-device block masks, XLA and Pallas paths.
- `mpxla.parallel`: meshes, multi-host start-up, global-batch statistics and metrics.
- `mpxla.nn`: `quantize(model, recipe)` for unmodified Flax models (FP8 matmuls and saved
  activations), BatchNorm and MoE layers with global statistics.
- `mpxla.models`: a Llama-style GPT and a BatchNorm CNN from stock Flax layers.
- `mpxla.data`: the embedded corpus, digits and TFDS sources and the batch iterator.
- `mpxla.train`: the trainer (checkpoints, resume, metrics) and its command line.

Imports flow one way: formats <- quant <- {optim, attention, parallel} <- nn <- models <-
train, and data stands alone (tests/test_architecture.py checks it).
"""

__version__ = "0.1.0"
