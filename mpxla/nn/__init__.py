"""mpxla.nn: FP8 linear layers and FP8-saved activations for JAX and Flax (Linen and NNX).

Pure-function cores (no Flax needed):
  fp8_dot_general, fp8_einsum      FP8 matmul with a custom VJP ('tensor' / 'delayed' / 'block')
  gelu, silu, swiglu, geglu,       non-linear ops saving their inputs as 1x16 FP8
  layer_norm, rms_norm
  flow                             quantize-once scope, checkpoint names, group-scaled amax
Models:
  quantize(model, recipe, rules=..., keep=...)   unmodified Linen or NNX models
  describe(qmodel, *args)                         which layers got what
  Recipe, RECIPES, get_recipe                     'bf16', 'fp8_linear', 'fp8_delayed',
                                                  'fp8_block', 'coat', 'hif8'
  COLLECTION, Fp8State, all_finite                delayed-scaling state (see mpxla.nn.delayed)
Layers with global-batch statistics (docs/parallel.md):
  BatchNorm, NNXBatchNorm                         stat_scope 'global' | 'local', ghost batches
  MoE, NNXMoE, TopKRouter, NNXTopKRouter          top-k MoE with the global load-balancing loss

See docs/nn.md.
"""

from mpxla.nn import flow
from mpxla.nn.batch_norm import BatchNorm, NNXBatchNorm
from mpxla.nn.delayed import COLLECTION, Fp8State, all_finite, split_variables
from mpxla.nn.flow import group_amax, group_scaled_quantize, output_point, tensor_amax_from_groups
from mpxla.nn.fp8_act import fp8_saved, geglu, gelu, layer_norm, rms_norm, silu, swiglu
from mpxla.nn.fp8_dot import DotConfig, fp8_dot_general, fp8_einsum, init_delayed_state
from mpxla.nn.moe import MoE, NNXMoE, NNXTopKRouter, TopKRouter, top_k_route
from mpxla.nn.recipes import RECIPES, Recipe, get_recipe
from mpxla.nn.wrap import describe, quantize

__all__ = [
    "COLLECTION",
    "BatchNorm",
    "MoE",
    "NNXBatchNorm",
    "NNXMoE",
    "NNXTopKRouter",
    "TopKRouter",
    "top_k_route",
    "RECIPES",
    "DotConfig",
    "Fp8State",
    "Recipe",
    "all_finite",
    "describe",
    "flow",
    "fp8_dot_general",
    "fp8_einsum",
    "fp8_saved",
    "geglu",
    "gelu",
    "get_recipe",
    "group_amax",
    "group_scaled_quantize",
    "init_delayed_state",
    "layer_norm",
    "output_point",
    "quantize",
    "rms_norm",
    "silu",
    "split_variables",
    "swiglu",
    "tensor_amax_from_groups",
]
