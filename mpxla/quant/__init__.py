"""Scaled quantization: `QTensor`, granularities, just-in-time and delayed scales, and MX
(`quantize_mx`: blocks of 32 with E8M0 scales, OCP Microscaling).

Modules beside the public names below: `sharding` (mesh axes under jit and shard_map) and
`tracing` (checkpoint names, the remat policy and the `after` scheduling hint), shared by
mpxla.nn, mpxla.attention and mpxla.parallel.
"""

from mpxla.quant.granularity import PerBlock, PerGroup, PerTensor, as_granularity
from mpxla.quant.mx import MX_BLOCK, quantize_mx
from mpxla.quant.qtensor import (
    QTensor,
    dequantize,
    quantize,
    quantize_with_amax,
    scale_values,
    scales_shape,
)
from mpxla.quant.scaling import (
    amax,
    amax_from_history,
    init_amax_history,
    scale_from_amax,
    update_amax_history,
)

__all__ = [
    "MX_BLOCK",
    "PerBlock",
    "PerGroup",
    "PerTensor",
    "QTensor",
    "amax",
    "amax_from_history",
    "as_granularity",
    "dequantize",
    "init_amax_history",
    "quantize",
    "quantize_mx",
    "quantize_with_amax",
    "scale_from_amax",
    "scale_values",
    "scales_shape",
    "update_amax_history",
]
