"""FP8 activations: saved-for-backward bytes, compiled temp bytes and error per recipe.

Command: python experiments/fp8_activations.py [--quick]   (4 CPU-minutes; --quick: smaller shapes)
Models (stock Flax Linen layers wrapped with `mpxla.nn.quantize`): (a) 12 SwiGLU MLP blocks,
(b) a Llama block (and 4) with injected attention: Flax's `dot_product_attention` (the stock
baseline) or `mpxla.attention.attention(..., impl='xla')`. Columns and results: docs/nn.md,
"Measured". XLA_FLAGS gets --xla_cpu_enable_concurrency_optimized_scheduler=false (the
memory-minimizing schedule accelerators use) before JAX is imported.
"""

from __future__ import annotations

import os
import sys

import harness as H

H.set_xla_flags(None, "--xla_cpu_enable_concurrency_optimized_scheduler=false")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax._src.ad_checkpoint import saved_residuals  # noqa: E402

from mpxla import attention as mpxla_attention  # noqa: E402
from mpxla import nn as mnn  # noqa: E402


def residual_init(n_residual: int):
  """Init of the projections into the residual stream: LeCun variance / (their number) (GPT-2)."""
  return nn.initializers.variance_scaling(1.0 / n_residual, "fan_in", "truncated_normal")


class SwiGLUBlock(nn.Module):
  d_ff: int
  dtype: str
  n_residual: int = 1  # projections into the residual stream in the whole model

  @nn.compact
  def __call__(self, x):
    h = nn.RMSNorm(dtype=self.dtype, name="norm")(x)
    gate = nn.Dense(self.d_ff, use_bias=False, dtype=self.dtype, name="gate")(h)
    up = nn.Dense(self.d_ff, use_bias=False, dtype=self.dtype, name="up")(h)
    down = nn.Dense(x.shape[-1], use_bias=False, dtype=self.dtype,
                    kernel_init=residual_init(self.n_residual), name="down")
    return x + down(jax.nn.silu(gate) * up)


class MLPStack(nn.Module):
  """(a): `n` SwiGLU blocks."""

  n: int
  d_ff: int
  dtype: str

  @nn.compact
  def __call__(self, x):
    for i in range(self.n):
      x = SwiGLUBlock(self.d_ff, self.dtype, self.n, name=f"block_{i}")(x)
    return x


def rotary(x_BxTxHxE):
  """mpxla's rotary embedding (rotate-half) at positions 0..T-1."""
  return mpxla_attention.rotary_embedding(x_BxTxHxE, jnp.arange(x_BxTxHxE.shape[1]))


def stock_attention(q, k, v):
  mask = nn.make_causal_mask(jnp.ones(q.shape[:2], bool))
  return nn.dot_product_attention(q, k, v, mask=mask, dtype=q.dtype)


def flash_attention(q, k, v):
  return mpxla_attention.attention(q, k, v, mask=mpxla_attention.causal(), impl="xla")


class LlamaBlock(nn.Module):
  """(b): pre-norm attention with rotary embeddings and a SwiGLU MLP; attention injectable."""

  n_heads: int
  d_ff: int
  dtype: str
  attention_fn: object = flash_attention
  n_blocks: int = 1

  @nn.compact
  def __call__(self, x_BxTxD):
    D = x_BxTxD.shape[-1]
    E = D // self.n_heads
    proj = lambda name: nn.DenseGeneral((self.n_heads, E), use_bias=False,  # noqa: E731
                                        dtype=self.dtype, name=name)
    h = nn.RMSNorm(dtype=self.dtype, name="attn_norm")(x_BxTxD)
    q, k, v = rotary(proj("query")(h)), rotary(proj("key")(h)), proj("value")(h)
    o_BxTxHxE = self.attention_fn(q, k, v)
    out = nn.DenseGeneral(D, axis=(-2, -1), use_bias=False, dtype=self.dtype,
                          kernel_init=residual_init(2 * self.n_blocks), name="out")
    x_BxTxD = x_BxTxD + out(o_BxTxHxE)
    mlp = SwiGLUBlock(self.d_ff, self.dtype, 2 * self.n_blocks, name="mlp")
    return mlp(x_BxTxD)  # x + mlp(rms(x))


class LlamaStack(nn.Module):
  """(b) stacked: `n` Llama blocks."""

  n: int
  n_heads: int
  d_ff: int
  dtype: str
  attention_fn: object = flash_attention

  @nn.compact
  def __call__(self, x):
    for i in range(self.n):
      x = LlamaBlock(self.n_heads, self.d_ff, self.dtype, self.attention_fn, self.n,
                     name=f"layer_{i}")(x)
    return x


def activation_bytes(loss, params, x):
  """(activation bytes, weight-copy bytes) kept for the backward pass."""
  weight_sizes = {p.size for p in jax.tree.leaves(params) if p.ndim >= 2}
  acts = weights = 0
  for aval, where in saved_residuals(loss, params, x):
    if where.startswith("from the argument"):
      continue
    nbytes = int(np.prod(aval.shape)) * aval.dtype.itemsize
    if int(np.prod(aval.shape)) in weight_sizes:  # a (cast or FP8) copy of a weight
      weights += nbytes
    else:
      acts += nbytes
  return acts, weights


def errors(out, grads, ref_out, ref_grads):
  rel = float(jnp.linalg.norm(out - ref_out) / jnp.linalg.norm(ref_out))
  cos = []
  for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
    g, r = np.asarray(g, np.float64).ravel(), np.asarray(r, np.float64).ravel()
    cos.append(float(g @ r / (np.linalg.norm(g) * np.linalg.norm(r))))
  return rel, min(cos)


def _apply_fn(model, x_example):
  """apply(params, x) with the model's other collections (delayed-scaling state) fixed."""
  dtype = jnp.dtype(getattr(model, "module", model).dtype)
  variables = jax.eval_shape(model.init, jax.random.key(0), x_example.astype(dtype))
  others = {k: jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), v)
            for k, v in variables.items() if k != "params"}
  return lambda params, x: model.apply({"params": params, **others}, x.astype(dtype))


def _loss_fn(model, x_example):
  apply = _apply_fn(model, x_example)
  return lambda params, x: jnp.mean(jnp.square(apply(params, x).astype(jnp.float32)))


def run(model, params, x):
  """(output, gradients, compiled temp bytes of the gradient)."""
  out = jax.jit(_apply_fn(model, x))(params, x).astype(jnp.float32)
  grad = jax.jit(jax.grad(_loss_fn(model, x))).lower(params, x).compile()
  return out, grad(params, x), grad.memory_analysis().temp_size_in_bytes


def measure(title, rows, params, x, ref):
  """rows: [(label, model)]; the first row is the baseline."""
  ref_out, ref_grads, _ = run(ref, params, x)
  lines = [f"\n{title}",
           "| recipe | saved (MB) | saved ratio | weights (MB) | temp (MB) | temp ratio | "
           "out rel err | min grad cos |",
           "|---|---|---|---|---|---|---|---|"]
  base = None
  for label, model in rows:
    loss = _loss_fn(model, x)
    acts, weights = activation_bytes(loss, params, x)
    out, grads, temp = run(model, params, x)
    rel, cos = errors(out, grads, ref_out, ref_grads)
    base = base or (acts, temp)
    lines.append(f"| {label} | {acts / 1e6:.2f} | {base[0] / acts:.2f}x | {weights / 1e6:.2f} | "
                 f"{temp / 1e6:.2f} | {base[1] / temp:.2f}x | {rel:.4f} | {cos:.4f} |")
    print(lines[-1] if len(lines) > 4 else "\n".join(lines), flush=True)
  return "\n".join(lines)


RECIPES = ("fp8_linear", "fp8_delayed", "fp8_block", "coat", "hif8")


def main(quick: bool = False):
  print("Command: python experiments/fp8_activations.py" + (" --quick" if quick else ""))
  print(f"JAX {jax.__version__}, backend {jax.default_backend()}, XLA_FLAGS={os.environ['XLA_FLAGS']}")
  key = jax.random.key(0)
  # (a) 12 SwiGLU MLP blocks.
  B, T, D, F = (2, 64, 128, 384) if quick else (4, 128, 256, 688)
  x = jax.random.normal(key, (B, T, D))
  stack = MLPStack(12, F, "bfloat16")
  params = stack.init(jax.random.key(1), x)["params"]
  rows = [("bf16 (stock)", stack)] + [(r, mnn.quantize(stack, r)) for r in RECIPES]
  measure(f"(a) 12 SwiGLU MLP blocks, x [{B}, {T}, {D}], d_ff {F}", rows, params, x,
          MLPStack(12, F, "float32"))
  # (b) a Llama block, and a stack of 4.
  B, T, D, H, F = (2, 128, 128, 2, 384) if quick else (4, 256, 256, 4, 688)
  x = jax.random.normal(key, (B, T, D))
  for n in (1, 4):
    def make(dtype, attn, n=n):
      return LlamaBlock(H, F, dtype, attn) if n == 1 else LlamaStack(n, H, F, dtype, attn)

    stock, flash = make("bfloat16", stock_attention), make("bfloat16", flash_attention)
    params = stock.init(jax.random.key(1), x)["params"]
    rows = [("bf16 (stock attention)", stock), ("bf16 + mpxla.attention", flash)]
    rows += [(f"{r} + mpxla.attention", mnn.quantize(flash, r))
             for r in ("fp8_linear", "coat", "hif8")]
    rows += [("coat + stock attention", mnn.quantize(stock, "coat"))]
    what = "one Llama block" if n == 1 else f"{n} Llama blocks"
    measure(f"(b) {what}, x [{B}, {T}, {D}], {H} heads, d_ff {F}", rows, params, x,
            make("float32", stock_attention))


if __name__ == "__main__":
  main(quick="--quick" in sys.argv[1:])
