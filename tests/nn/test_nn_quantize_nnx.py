"""`mpxla.nn.quantize` on an unmodified NNX model built from stock layers."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax._src.ad_checkpoint import saved_residuals

from mpxla import nn as mnn

D, F, HEADS, VOCAB, LAYERS = 32, 64, 2, 50, 1
# Projections into the residual stream start small (GPT-2: variance / number of them).
SMALL_INIT = nnx.initializers.variance_scaling(0.25, "fan_in", "truncated_normal")


class Block(nnx.Module):
  def __init__(self, dtype, rngs):
    self.attn_norm = nnx.RMSNorm(D, dtype=dtype, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(HEADS, D, dtype=dtype, decode=False, use_bias=False,
                                       out_kernel_init=SMALL_INIT, rngs=rngs)
    self.mlp_norm = nnx.LayerNorm(D, dtype=dtype, rngs=rngs)
    self.gate = nnx.Linear(D, F, dtype=dtype, rngs=rngs)
    self.up = nnx.Einsum("btd,df->btf", (D, F), (F,), dtype=dtype, rngs=rngs)
    self.down = nnx.LinearGeneral(F, D, dtype=dtype, kernel_init=SMALL_INIT, rngs=rngs)

  def __call__(self, x):
    x = x + self.attn(self.attn_norm(x), mask=nnx.make_causal_mask(x[..., 0]))
    h = self.mlp_norm(x)
    return x + self.down(jax.nn.gelu(self.gate(h)) * jax.nn.silu(self.up(h)))


class Model(nnx.Module):
  def __init__(self, dtype="bfloat16", seed=1):
    rngs = nnx.Rngs(seed)
    self.dtype = dtype
    self.embed = nnx.Embed(VOCAB, D, embedding_init=nnx.initializers.normal(1.0), rngs=rngs)
    self.layers = nnx.List([Block(dtype, rngs) for _ in range(LAYERS)])
    self.final_norm = nnx.RMSNorm(D, dtype=dtype, rngs=rngs)
    self.lm_head = nnx.Linear(D, VOCAB, dtype=dtype, rngs=rngs)

  def __call__(self, tokens):
    x = self.embed(tokens).astype(self.dtype)
    for layer in self.layers:
      x = layer(x)
    return self.lm_head(self.final_norm(x)).astype(jnp.float32)


TOKENS = jax.random.randint(jax.random.key(0), (2, 12), 0, VOCAB)  # 24 tokens: no size as a weight
KEEP = ("embed", "lm_head")


def loss(model, tokens=TOKENS, with_logits=False):
  logits = model(tokens)
  value = jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0])
  return (value, logits) if with_logits else value


def logits_and_grads(model):
  """One compiled function for both."""
  f = nnx.value_and_grad(lambda m: loss(m, with_logits=True), has_aux=True)
  (_, logits), grads = nnx.jit(f)(model)
  return logits, nnx.state(grads, nnx.Param)


@pytest.fixture(scope="module")
def reference():
  return logits_and_grads(Model("float32"))


def test_same_state_paths_and_values_original_untouched():
  model = Model()
  before = nnx.state(model)
  qmodel = mnn.quantize(model, "coat", keep=KEEP)
  assert isinstance(qmodel, Model) and qmodel is not model
  assert type(model) is Model and type(model.layers[0].attn_norm) is nnx.RMSNorm
  assert jax.tree.structure(nnx.state(qmodel, nnx.Param)) == jax.tree.structure(
      nnx.state(model, nnx.Param))
  jax.tree.map(np.testing.assert_array_equal, nnx.state(qmodel, nnx.Param),
               nnx.state(model, nnx.Param))
  jax.tree.map(np.testing.assert_array_equal, nnx.state(model), before)
  call = nnx.jit(lambda m: m(TOKENS))
  np.testing.assert_array_equal(call(model), call(Model()))  # the original still works


@pytest.mark.parametrize("recipe", ["fp8_linear", "fp8_delayed", "coat", "hif8"])
def test_recipe_matches_float32(recipe, reference):
  ref_out, ref_grads = reference
  qmodel = mnn.quantize(Model(), recipe, keep=KEEP)
  out, grads = logits_and_grads(qmodel)
  assert float(jnp.linalg.norm(out - ref_out) / jnp.linalg.norm(ref_out)) < 0.06
  for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
    g, r = np.asarray(g, np.float64).ravel(), np.asarray(r, np.float64).ravel()
    assert g @ r / (np.linalg.norm(g) * np.linalg.norm(r)) > 0.99


def test_hlo_has_f8_dots_and_coat_saves_less():
  qmodel = mnn.quantize(Model(), "coat", keep=KEEP)
  graphdef, params, rest = nnx.split(qmodel, nnx.Param, ...)

  def pure_loss(params):
    return loss(nnx.merge(graphdef, params, rest))

  text = jax.jit(jax.grad(pure_loss)).lower(params).as_text()
  types = [re.search(r": \((.*)\) ->", line).group(1)
           for line in text.splitlines() if "stablehlo.dot_general" in line]
  assert sum("f8E4M3FN" in t for t in types) == 7 * 3 * LAYERS  # q, k, v, out, gate, up, down
  base_graphdef, base_params, base_rest = nnx.split(Model(), nnx.Param, ...)

  def base_loss(params):
    return loss(nnx.merge(base_graphdef, params, base_rest))

  def act_bytes(f, p):
    return sum(a.size * a.dtype.itemsize for a, d in saved_residuals(f, p)
               if not d.startswith("from the argument") and a.size not in (D * F, D * D, D * VOCAB))

  assert act_bytes(base_loss, base_params) / act_bytes(pure_loss, params) > 3.0


def test_delayed_state_is_not_a_param_and_updates_through_grad():
  qmodel = mnn.quantize(Model(), "fp8_delayed", keep=KEEP)
  histories = nnx.state(qmodel, mnn.Fp8State)
  assert len(jax.tree.leaves(histories)) == 7 * 3 * LAYERS
  optimizer = nnx.Optimizer(qmodel, optax.adamw(1e-3), wrt=nnx.Param)
  assert not jax.tree.leaves(nnx.state(optimizer.opt_state, mnn.Fp8State))

  @nnx.jit
  def step(model, optimizer):
    diff = nnx.DiffState(0, nnx.Any(nnx.Param, mnn.Fp8State))
    grads = nnx.grad(loss, argnums=diff)(model)
    optimizer.update(model, nnx.filter_state(grads, nnx.Param))
    nnx.update(model, nnx.filter_state(grads, mnn.Fp8State))

  step(qmodel, optimizer)
  step(qmodel, optimizer)
  h = nnx.state(qmodel, mnn.Fp8State)
  gate = h["layers"][0]["gate"]["dot_general"]
  assert float(gate["lhs_amax_history"][0]) > 0 and float(gate["lhs_amax_history"][1]) > 0
  assert float(gate["grad_amax_history"][0]) > 0 and float(gate["grad_amax_history"][2]) == 0
  assert bool(mnn.all_finite(h))


def test_describe_and_rules():
  report = mnn.describe(mnn.quantize(Model(), "coat", keep=KEEP))
  assert report["lm_head"].startswith("kept")
  assert report["layers/0/attn/query"].startswith("fp8 LinearGeneral")
  assert report["layers/0/up"].startswith("fp8 Einsum")
  assert report["layers/0/attn_norm"] == "fp8-saved norm (1x16 e4m3)"
  rules = [(r"mlp_norm", dataclasses.replace(mnn.RECIPES["coat"], activations="hif8"))]
  report = mnn.describe(mnn.quantize(Model(), "coat", rules=rules))
  assert report["layers/0/mlp_norm"] == "fp8-saved norm (1x16 hif8)"
  assert report["layers/0/attn_norm"] == "fp8-saved norm (1x16 e4m3)"
  with pytest.warns(UserWarning, match="matched no module"):
    mnn.quantize(Model(), "coat", rules=[("nothing_here", None)])
  with pytest.raises(ValueError, match="no layer was quantized"):
    mnn.quantize(Model(), "coat", keep=(".*",))
