"""mpxla.nn: FP8 linear layers and FP8-saved activations for JAX and Flax (Linen and NNX).

Models:
  quantize(model, recipe, rules=..., keep=...)   unmodified Linen or NNX models
  describe(qmodel, *args)                         which layers got what
  Recipe, RECIPES, get_recipe                     'bf16', 'fp8_linear', 'fp8_delayed',
                                                  'fp8_block', 'coat', 'hif8'
  COLLECTION, Fp8State, all_finite,               delayed-scaling state (see mpxla.nn.delayed)
  split_variables
Pure-function cores (no Flax needed):
  fp8_dot_general, fp8_einsum, DotConfig,         FP8 matmul with a custom VJP ('tensor' /
  init_delayed_state                              'delayed' / 'block')
  fp8_saved, gelu, silu, swiglu, geglu,           non-linear ops saving their inputs as 1x16 FP8
  layer_norm, rms_norm
  flow                                            the precision flow: quantize-once scope,
                                                  group-scaled amax, FP8 output point
Layers with global-batch statistics (docs/parallel.md):
  BatchNorm, NNXBatchNorm                         stat_scope 'global' | 'local', ghost batches
  MoE, NNXMoE, TopKRouter, NNXTopKRouter,         top-k MoE with the global load-balancing loss
  top_k_route

See docs/nn.md.
"""

from mpxla.nn import flow
from mpxla.nn.batch_norm import BatchNorm, NNXBatchNorm
from mpxla.nn.delayed import COLLECTION, Fp8State, all_finite, split_variables
from mpxla.nn.fp8_act import fp8_saved, geglu, gelu, layer_norm, rms_norm, silu, swiglu
from mpxla.nn.fp8_dot import DotConfig, fp8_dot_general, fp8_einsum, init_delayed_state
from mpxla.nn.moe import MoE, NNXMoE, NNXTopKRouter, TopKRouter, top_k_route
from mpxla.nn.recipes import RECIPES, Recipe, get_recipe
from mpxla.nn.wrap import describe, quantize

__all__ = [
    "COLLECTION",
    "RECIPES",
    "BatchNorm",
    "DotConfig",
    "Fp8State",
    "MoE",
    "NNXBatchNorm",
    "NNXMoE",
    "NNXTopKRouter",
    "Recipe",
    "TopKRouter",
    "all_finite",
    "describe",
    "flow",
    "fp8_dot_general",
    "fp8_einsum",
    "fp8_saved",
    "geglu",
    "gelu",
    "get_recipe",
    "init_delayed_state",
    "layer_norm",
    "quantize",
    "rms_norm",
    "silu",
    "split_variables",
    "swiglu",
    "top_k_route",
]
