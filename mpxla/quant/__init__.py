"""Scaled quantization: `QTensor`, granularities, just-in-time and delayed scales."""

from mpxla.quant.granularity import PerBlock, PerGroup, PerTensor, as_granularity
from mpxla.quant.qtensor import QTensor, dequantize, quantize, scales_shape
from mpxla.quant.scaling import (
    amax,
    amax_from_history,
    init_amax_history,
    scale_from_amax,
    update_amax_history,
)

__all__ = [
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
    "scale_from_amax",
    "scales_shape",
    "update_amax_history",
]
