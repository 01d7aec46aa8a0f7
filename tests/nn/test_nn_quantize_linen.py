"""`mpxla.nn.quantize` on an unmodified Linen model built from stock layers."""

import dataclasses
import re
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.ad_checkpoint import saved_residuals

from mpxla import nn as mnn

D, F, HEADS, VOCAB, LAYERS = 32, 64, 2, 50, 1
# Projections into the residual stream start small (GPT-2: variance / number of them).
SMALL_INIT = nn.initializers.variance_scaling(0.25, "fan_in", "truncated_normal")
BLOCK16 = dataclasses.replace(mnn.RECIPES["fp8_block"],
                              linear=mnn.DotConfig(scaling="block", block=16))


class Block(nn.Module):
  """Stock layers only: RMSNorm, MultiHeadDotProductAttention, LayerNorm, Dense, Einsum,
  DenseGeneral, jax.nn.gelu and silu."""

  dtype: str

  @nn.compact
  def __call__(self, x):
    h = nn.RMSNorm(dtype=self.dtype, name="attn_norm")(x)
    x = x + nn.MultiHeadDotProductAttention(
        HEADS, dtype=self.dtype, use_bias=False, out_kernel_init=SMALL_INIT,
        name="attn")(h, mask=nn.make_causal_mask(x[..., 0]))
    h = nn.LayerNorm(dtype=self.dtype, name="mlp_norm")(x)
    gate = nn.Dense(F, dtype=self.dtype, name="gate")(h)
    up = nn.Einsum((D, F), "btd,df->btf", dtype=self.dtype, name="up")(h)
    down = nn.DenseGeneral(D, dtype=self.dtype, kernel_init=SMALL_INIT, name="down")
    return x + down(jax.nn.gelu(gate) * jax.nn.silu(up))


class Model(nn.Module):
  dtype: str = "bfloat16"

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(VOCAB, D, embedding_init=nn.initializers.normal(1.0), name="embed")(tokens)
    x = x.astype(self.dtype)
    for i in range(LAYERS):
      x = Block(self.dtype, name=f"layer_{i}")(x)
    x = nn.RMSNorm(dtype=self.dtype, name="final_norm")(x)
    return nn.Dense(VOCAB, dtype=self.dtype, name="lm_head")(x).astype(jnp.float32)


TOKENS = jax.random.randint(jax.random.key(0), (2, 12), 0, VOCAB)  # 24 tokens: no size as a weight
KEEP = ("embed", "lm_head")


def loss_fn(model, others=None, with_logits=False):
  def loss(params, tokens):
    logits = model.apply({"params": params, **(others or {})}, tokens)
    value = jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0])
    return (value, logits) if with_logits else value
  return loss


def logits_and_grads(model, params, others=None):
  """One compiled function for both."""
  f = jax.value_and_grad(loss_fn(model, others, with_logits=True), has_aux=True)
  (_, logits), grads = jax.jit(f)(params, TOKENS)
  return logits, grads


@pytest.fixture(scope="module")
def reference():
  params = Model().init(jax.random.key(1), TOKENS)["params"]
  return params, *logits_and_grads(Model("float32"), params)


def cosines(grads, ref_grads):
  out = {}
  for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads),
                          strict=True):
    g, r = np.asarray(g, np.float64).ravel(), np.asarray(r, np.float64).ravel()
    out[jax.tree_util.keystr(path)] = g @ r / (np.linalg.norm(g) * np.linalg.norm(r))
  return out


# Stated tolerances against float32 on this model: output (logits) relative L2 error and
# per-parameter gradient cosine similarity.
TOLERANCE = {"bf16": (0.01, 0.9999), "fp8_linear": (0.05, 0.99), "fp8_delayed": (0.05, 0.99),
             "fp8_block": (0.05, 0.99), "coat": (0.06, 0.99), "hif8": (0.06, 0.99),
             "mxfp8": (0.05, 0.99)}


@pytest.mark.parametrize("recipe", ["fp8_linear", "fp8_delayed", pytest.param(
    "fp8_block", marks=pytest.mark.slow), "coat", "hif8", pytest.param(
    "mxfp8", marks=pytest.mark.slow)])  # block: ~10 s of scan compilation; mxfp8 ~15 s (its matmul: test_nn_mx_dot.py)
def test_recipe_matches_float32(recipe, reference):
  params, ref_out, ref_grads = reference
  qmodel = mnn.quantize(Model(), BLOCK16 if recipe == "fp8_block" else recipe, keep=KEEP)
  variables = qmodel.init(jax.random.key(1), TOKENS)
  others = {k: v for k, v in variables.items() if k != "params"}
  assert set(others) == ({mnn.COLLECTION} if recipe == "fp8_delayed" else set())
  out, grads = logits_and_grads(qmodel, params, others)
  rel_tol, cos_tol = TOLERANCE[recipe]
  assert float(jnp.linalg.norm(out - ref_out) / jnp.linalg.norm(ref_out)) < rel_tol
  cos = cosines(grads, ref_grads)
  assert min(cos.values()) > cos_tol, {k: v for k, v in cos.items() if v <= cos_tol}


def test_same_variables_as_the_original():
  original = Model().init(jax.random.key(3), TOKENS)
  for recipe in ("coat", "fp8_linear"):
    quantized = mnn.quantize(Model(), recipe).init(jax.random.key(3), TOKENS)
    assert jax.tree.structure(quantized) == jax.tree.structure(original)
    jax.tree.map(np.testing.assert_array_equal, quantized, original)


def test_bf16_returns_the_model_itself():
  model = Model()
  assert mnn.quantize(model, "bf16") is model


def f8_dot_types(hlo_text):
  types = [re.search(r": \((.*)\) ->", line).group(1)
           for line in hlo_text.splitlines() if "stablehlo.dot_general" in line]
  return [t for t in types if "f8E" in t], [t for t in types if "f8E" not in t]


def test_hlo_has_f8_dots_for_quantized_layers_only(reference):
  params = reference[0]
  qmodel = mnn.quantize(Model(), "coat", keep=KEEP)
  f8, other = f8_dot_types(jax.jit(jax.grad(loss_fn(qmodel))).lower(params, TOKENS).as_text())
  # q, k, v, out, gate, up, down: 7 FP8 matmuls, 3 dots each (forward, dx, dw), none recomputed.
  assert len(f8) == 7 * 3 * LAYERS
  assert sum("f8E5M2" in t for t in f8) == 7 * 2 * LAYERS
  # In high precision: lm_head (3 dots); the attention's q.k and p.v, their 4 backward dots,
  # and q.k once more: the probabilities are recomputed in the backward, not saved.
  assert len(other) == 3 + 7 * LAYERS


def activation_bytes(model, params):
  weight_sizes = {p.size for p in jax.tree.leaves(params) if p.ndim >= 2}
  return sum(a.size * a.dtype.itemsize for a, d in saved_residuals(loss_fn(model), params, TOKENS)
             if not d.startswith("from the argument") and a.size not in weight_sizes)


def test_saved_activation_bytes(reference):
  params = reference[0]
  base = activation_bytes(Model(), params)
  linear = activation_bytes(mnn.quantize(Model(), "fp8_linear", keep=KEEP), params)
  coat = activation_bytes(mnn.quantize(Model(), "coat", keep=KEEP), params)
  assert base / coat > 3.0, (base, coat)
  assert coat < linear < base


def test_coat_saves_only_fp8_tensors_and_kept_inputs(reference):
  params = reference[0]
  qmodel = mnn.quantize(Model(), "coat", keep=KEEP)
  for aval, where in saved_residuals(loss_fn(qmodel), params, TOKENS):
    if where.startswith("from the argument") or aval.size <= 2 * 16:
      continue
    assert "mpxla_fp8" in where or "mpxla_keep" in where or aval.dtype == jnp.float32 and \
        aval.shape == (2, 12, VOCAB), (aval, where)  # the float32 logits of the loss


def test_describe_rules_and_errors():
  model = Model()
  report = mnn.describe(mnn.quantize(model, "coat", keep=KEEP), TOKENS)
  assert "embed" not in report  # nn.Embed is no matmul: nothing to do (and `keep` says no more)
  assert report["lm_head"].startswith("kept")
  assert report["layer_0/attn/query"].startswith("fp8 DenseGeneral (tensor, output 1x16")
  assert report["layer_0/up"].startswith("fp8 Einsum")
  assert report["layer_0/mlp_norm"] == "fp8-saved norm (1x16 e4m3)"
  rules = [(r"down$", "fp8_linear"), (r"attn/", None)]
  report = mnn.describe(mnn.quantize(model, "coat", rules=rules), TOKENS)
  assert report["layer_0/down"] == "fp8 DenseGeneral (tensor)"
  assert report["layer_0/attn/out"].startswith("kept")
  with pytest.warns(UserWarning, match="'nothing_here' matched no module"):
    mnn.describe(mnn.quantize(model, "coat", rules=[("nothing_here", None)]), TOKENS)
  with pytest.raises(ValueError, match="no layer was quantized"):
    mnn.quantize(model, "coat", keep=(".*",)).init(jax.random.key(0), TOKENS)
  with pytest.raises(ValueError, match="recipe="):
    mnn.quantize(model, "fp4")
  with pytest.raises(ValueError, match="regular expression"):
    mnn.quantize(model, "coat", keep=("(",))
  with pytest.raises(TypeError, match="flax"):
    mnn.quantize(lambda x: x, "coat")


class Dense2(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(4, name="d")(nn.Dense(8, name="c")(x))


def test_model_without_matmuls_is_refused_and_shared_delayed_layer_too():
  class NormOnly(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.relu(x)

  with pytest.raises(ValueError, match="no layer was quantized"):
    mnn.quantize(NormOnly(), "fp8_linear").init(jax.random.key(0), jnp.ones((2, 4)))

  class Twice(nn.Module):
    @nn.compact
    def __call__(self, x):
      layer = nn.Dense(4, name="shared")
      return layer(layer(x))

  with pytest.raises(ValueError, match="called twice"):
    mnn.quantize(Twice(), "fp8_delayed").init(jax.random.key(0), jnp.ones((2, 4)))
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    mnn.quantize(Twice(), "fp8_linear").init(jax.random.key(0), jnp.ones((2, 4)))  # fine


def test_nonfinite_input_shows_in_the_output(reference):
  params = reference[0]
  qmodel = mnn.quantize(Model(), "coat")
  bad = jax.tree.map(lambda p: p, params)
  bad["layer_0"]["gate"]["kernel"] = bad["layer_0"]["gate"]["kernel"].at[0, 0].set(jnp.inf)
  out = jax.jit(qmodel.apply)({"params": bad}, TOKENS)
  assert bool(jnp.all(jnp.isnan(out)))
