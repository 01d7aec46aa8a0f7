"""FP8 activations: saved-for-backward bytes, compiled temp bytes and error per recipe, of stock
Flax Linen layers wrapped with `mpxla.nn.quantize` (columns and results: docs/nn.md, "Measured").
XLA_FLAGS gets --xla_cpu_enable_concurrency_optimized_scheduler=false before JAX is imported.

  python experiments/fp8_activations.py [--quick]   (4 CPU-minutes; --quick: smaller shapes)
"""

from __future__ import annotations

import functools
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

RECIPES = ("fp8_linear", "fp8_delayed", "fp8_block", "coat", "hif8")


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
    gate, up = (nn.Dense(self.d_ff, use_bias=False, dtype=self.dtype, name=n)(h)
                for n in ("gate", "up"))
    down = nn.Dense(x.shape[-1], use_bias=False, dtype=self.dtype,
                    kernel_init=residual_init(self.n_residual), name="down")
    return x + down(jax.nn.silu(gate) * up)


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
    proj = lambda name: nn.DenseGeneral((self.n_heads, D // self.n_heads),  # noqa: E731
                                        use_bias=False, dtype=self.dtype, name=name)
    rotary = lambda t: mpxla_attention.rotary_embedding(t, jnp.arange(t.shape[1]))  # noqa: E731
    h = nn.RMSNorm(dtype=self.dtype, name="attn_norm")(x_BxTxD)
    o_BxTxHxE = self.attention_fn(rotary(proj("query")(h)), rotary(proj("key")(h)),
                                  proj("value")(h))
    out = nn.DenseGeneral(D, axis=(-2, -1), use_bias=False, dtype=self.dtype,
                          kernel_init=residual_init(2 * self.n_blocks), name="out")
    mlp = SwiGLUBlock(self.d_ff, self.dtype, 2 * self.n_blocks, name="mlp")
    return mlp(x_BxTxD + out(o_BxTxHxE))  # x + mlp(rms(x))


class Stack(nn.Module):
  """`n` blocks: (a) SwiGLU blocks 'block_I' (n_heads None), (b) Llama blocks 'layer_I'."""

  n_heads: int | None
  d_ff: int
  dtype: str
  attention_fn: object = flash_attention
  n: int = 1

  @nn.compact
  def __call__(self, x):
    for i in range(self.n):
      x = (SwiGLUBlock(self.d_ff, self.dtype, self.n, name=f"block_{i}") if self.n_heads is None
           else LlamaBlock(self.n_heads, self.d_ff, self.dtype, self.attention_fn, self.n,
                           name=f"layer_{i}"))(x)
    return x


def run(model, params, x):
  """(output, gradients, compiled temp bytes of the gradient, activation bytes, weight-copy bytes)
  of the mean square loss, the model's other collections (delayed-scaling state) at zeros; the
  bytes are those kept for the backward pass (weight copies: the weight-shaped ones)."""
  dtype = jnp.dtype(getattr(model, "module", model).dtype)
  variables = jax.eval_shape(model.init, jax.random.key(0), x.astype(dtype))
  others = {k: jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), v)
            for k, v in variables.items() if k != "params"}
  apply = lambda params, x: model.apply({"params": params, **others}, x.astype(dtype))  # noqa: E731
  loss = lambda params, x: jnp.mean(jnp.square(apply(params, x).astype(jnp.float32)))  # noqa: E731
  grad = jax.jit(jax.grad(loss)).lower(params, x).compile()
  weight_sizes = {p.size for p in jax.tree.leaves(params) if p.ndim >= 2}
  saved = [(int(np.prod(aval.shape)), aval.dtype.itemsize)
           for aval, where in saved_residuals(loss, params, x)
           if not where.startswith("from the argument")]
  weights = sum(n * b for n, b in saved if n in weight_sizes)  # (cast or FP8) copies of weights
  return (jax.jit(apply)(params, x).astype(jnp.float32), grad(params, x),
          grad.memory_analysis().temp_size_in_bytes, sum(n * b for n, b in saved) - weights,
          weights)


def measure(title, rows, params, x, ref):
  """Prints the table of rows [(label, model)] (the first row is the baseline) vs `ref`: the
  output's relative error and the minimum cosine similarity of the gradients."""
  ref_out, ref_grads, *_ = run(ref, params, x)
  print(f"\n{title}\n" + "\n".join(H.table([
      "recipe", "saved (MB)", "saved ratio", "weights (MB)", "temp (MB)", "temp ratio",
      "out rel err", "min grad cos"], [])), flush=True)
  base = None
  for label, model in rows:
    out, grads, temp, acts, weights = run(model, params, x)
    cos = []
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
      g, r = np.asarray(g, np.float64).ravel(), np.asarray(r, np.float64).ravel()
      cos.append(float(g @ r / (np.linalg.norm(g) * np.linalg.norm(r))))
    rel = float(jnp.linalg.norm(out - ref_out) / jnp.linalg.norm(ref_out))
    base = base or (acts, temp)
    print(f"| {label} | {acts / 1e6:.2f} | {base[0] / acts:.2f}x | {weights / 1e6:.2f} | "
          f"{temp / 1e6:.2f} | {base[1] / temp:.2f}x | {rel:.4f} | {min(cos):.4f} |", flush=True)


def main(quick: bool = False):
  print("Command: python experiments/fp8_activations.py" + (" --quick" if quick else ""))
  print(f"JAX {jax.__version__}, backend {jax.default_backend()}, "
        f"XLA_FLAGS={os.environ['XLA_FLAGS']}")
  key = jax.random.key(0)
  # (a) 12 SwiGLU MLP blocks.
  B, T, D, F = (2, 64, 128, 384) if quick else (4, 128, 256, 688)
  x = jax.random.normal(key, (B, T, D))
  stack = Stack(None, F, "bfloat16", n=12)
  params = stack.init(jax.random.key(1), x)["params"]
  rows = [("bf16 (stock)", stack)] + [(r, mnn.quantize(stack, r)) for r in RECIPES]
  measure(f"(a) 12 SwiGLU MLP blocks, x [{B}, {T}, {D}], d_ff {F}", rows, params, x,
          Stack(None, F, "float32", n=12))
  # (b) a Llama block, and a stack of 4.
  B, T, D, NH, F = (2, 128, 128, 2, 384) if quick else (4, 256, 256, 4, 688)
  x = jax.random.normal(key, (B, T, D))
  for n in (1, 4):
    make = LlamaBlock if n == 1 else functools.partial(Stack, n=n)
    stock, flash = (make(NH, F, "bfloat16", attn) for attn in (stock_attention, flash_attention))
    rows = [("bf16 (stock attention)", stock), ("bf16 + mpxla.attention", flash)]
    rows += [(f"{r} + mpxla.attention", mnn.quantize(flash, r))
             for r in ("fp8_linear", "coat", "hif8")]
    rows += [("coat + stock attention", mnn.quantize(stock, "coat"))]
    what = "one Llama block" if n == 1 else f"{n} Llama blocks"
    measure(f"(b) {what}, x [{B}, {T}, {D}], {NH} heads, d_ff {F}", rows,
            stock.init(jax.random.key(1), x)["params"], x, make(NH, F, "float32", stock_attention))


if __name__ == "__main__":
  main(quick="--quick" in sys.argv[1:])
