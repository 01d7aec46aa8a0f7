"""FP8 expert matmuls: `quantize` reaches the MoE's grouped matmuls (Linen and NNX)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax._src.ad_checkpoint import saved_residuals

from mpxla import nn as mnn
from mpxla.nn.moe import MoE, NNXMoE

D, F, E, K = 32, 64, 8, 2
X = jnp.asarray(np.random.default_rng(0).standard_normal((4, 24, D)), jnp.float32)
R = jnp.sin(jnp.arange(D, dtype=jnp.float32))


class MoEBlock(nn.Module):
  @nn.compact
  def __call__(self, x):
    return MoE(num_experts=E, d_ff=F, top_k=K, dtype=x.dtype, name="moe")(x)


class MLP(nn.Module):  # a dense SwiGLU MLP with the MoE's active parameters (d_ff = K F)
  @nn.compact
  def __call__(self, x):
    h = jax.nn.silu(nn.Dense(K * F, name="gate")(x)) * nn.Dense(K * F, name="up")(x)
    return nn.Dense(D, name="down")(h)


def _grads(model, params):
  return jax.grad(lambda p, x: jnp.sum(model.apply({"params": p}, x) * R), argnums=(0, 1))(
      params, X)


def _cos(a, b):
  a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
  return a @ b / np.linalg.norm(a) / np.linalg.norm(b)


@pytest.mark.slow  # ~25 s; FP8 experts vs numpy stay in test_nn_fp8_grouped
def test_fp8_experts_are_as_close_to_float32_as_a_dense_fp8_mlp():
  moe, mlp = MoEBlock(), MLP()
  pm, pd = moe.init(jax.random.key(0), X)["params"], mlp.init(jax.random.key(1), X)["params"]
  qmoe, qmlp = mnn.quantize(moe, "fp8_linear"), mnn.quantize(mlp, "fp8_linear")
  assert mnn.describe(qmoe, X)["moe"].startswith("fp8 MoE experts")
  (gm, xm), (gm8, xm8) = _grads(moe, pm), _grads(qmoe, pm)
  (gd, xd), (gd8, xd8) = _grads(mlp, pd), _grads(qmlp, pd)
  dense_cos = min([_cos(gd[k]["kernel"], gd8[k]["kernel"]) for k in gd] + [_cos(xd, xd8)])
  moe_cos = {k: _cos(gm["moe"][k], gm8["moe"][k]) for k in ("gate", "up", "down")}
  moe_cos["x"] = _cos(xm, xm8)
  assert min(moe_cos.values()) >= dense_cos - 0.01, (moe_cos, dense_cos)
  assert max(moe_cos.values()) < 1.0  # the experts did run in FP8
  np.testing.assert_array_equal(gm8["moe"]["router"]["kernel"] != 0, True)


def test_coat_saves_only_fp8_codes_of_the_experts():
  moe = MoEBlock()
  x = X.astype(jnp.bfloat16)
  params = moe.init(jax.random.key(0), x)["params"]
  q = mnn.quantize(moe, "coat")
  saved = saved_residuals(lambda p, x: q.apply({"params": p}, x).astype(jnp.float32).sum(),
                          params, x)
  big = [(str(a.dtype), a.shape) for a, _ in saved if a.size >= x.size // 4]
  # The expert inputs, their hidden activations and the weights: 1-byte codes; besides them
  # only the layer's own input (an argument of the remat'd call).
  assert sorted(t for t, _ in big) == ["bfloat16"] + ["uint8"] * (len(big) - 1), big
  assert ("uint8", (E, D, F)) in big and ("uint8", (4, 24 * K, F)) in big


def test_nnx_moe_gets_fp8_experts():
  layer = NNXMoE(D, E, F, K, rngs=nnx.Rngs(0))
  q = mnn.quantize(layer, "fp8_linear")
  assert q.fp8 is not None and layer.fp8 is None
  y, y8 = layer(X), q(X)
  assert 0 < float(jnp.linalg.norm(y8 - y) / jnp.linalg.norm(y)) < 0.1


def test_fp8_experts_with_another_grouped_matmul_raise():
  """FP8 expert matmuls are ragged_dot only: 'blocks' or 'pallas_gpu' say so, never run
  unquantized in silence."""
  for impl in ("blocks", "pallas_gpu"):
    moe = mnn.quantize(MoE(num_experts=E, d_ff=F, top_k=K, grouped_matmul=impl), "fp8_linear")
    with pytest.raises(ValueError, match="grouped_matmul='ragged_dot'"):
      jax.eval_shape(lambda x, m=moe: m.init_with_output(jax.random.key(0), x), X)
