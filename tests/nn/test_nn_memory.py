"""Compiled temp bytes of the gradient: 'coat' against stock BF16 layers (the issue's goal).

Temp bytes depend on XLA's schedule; they are measured with the memory-minimizing one
(`--xla_cpu_enable_concurrency_optimized_scheduler=false`, as experiments/fp8_activations.py
does), which must be set before JAX starts: the measurement runs in a subprocess, on a Llama
block of stock Flax Linen layers defined in SCRIPT.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]

SCRIPT = """
import json
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax._src.ad_checkpoint import saved_residuals
from mpxla import attention as A
from mpxla import nn as mnn


def swiglu(x, d_ff, dtype, name):
  h = nn.RMSNorm(dtype=dtype, name=name + "_norm")(x)
  dense = lambda n, f: nn.Dense(f, use_bias=False, dtype=dtype, name=f"{{name}}_{{n}}")
  return x + dense("down", x.shape[-1])(jax.nn.silu(dense("gate", d_ff)(h)) * dense("up", d_ff)(h))


class LlamaBlock(nn.Module):  # pre-norm rotary attention (injectable) and a SwiGLU MLP
  n_heads: int
  d_ff: int
  dtype: str
  attention_fn: object

  @nn.compact
  def __call__(self, x):
    d, e = x.shape[-1], x.shape[-1] // self.n_heads
    proj = lambda n: nn.DenseGeneral((self.n_heads, e), use_bias=False, dtype=self.dtype, name=n)
    rope = lambda y: A.rotary_embedding(y, jnp.arange(y.shape[1]))
    h = nn.RMSNorm(dtype=self.dtype, name="attn_norm")(x)
    o = self.attention_fn(rope(proj("query")(h)), rope(proj("key")(h)), proj("value")(h))
    x = x + nn.DenseGeneral(d, axis=(-2, -1), use_bias=False, dtype=self.dtype, name="out")(o)
    return swiglu(x, self.d_ff, self.dtype, "mlp")


def stock(q, k, v):
  mask = nn.make_causal_mask(jnp.ones(q.shape[:2], bool))
  return nn.dot_product_attention(q, k, v, mask=mask, dtype=q.dtype)


def flash(q, k, v):
  return A.attention(q, k, v, mask=A.causal(), impl="xla")


def loss_fn(model, x):
  dtype = jnp.dtype(getattr(model, "module", model).dtype)
  variables = jax.eval_shape(model.init, jax.random.key(0), x.astype(dtype))
  others = {{k: jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), v)
            for k, v in variables.items() if k != "params"}}
  apply = lambda p, x: model.apply({{"params": p, **others}}, x.astype(dtype))
  return lambda p, x: jnp.mean(jnp.square(apply(p, x).astype(jnp.float32)))


def saved_bytes(loss, params, x):  # activations kept for the backward, without weight copies
  weight_sizes = {{p.size for p in jax.tree.leaves(params) if p.ndim >= 2}}
  return sum(int(np.prod(a.shape)) * a.dtype.itemsize for a, where in saved_residuals(loss, params, x)
             if not where.startswith("from the argument") and int(np.prod(a.shape)) not in weight_sizes)


B, T, D, H, F = 4, 256, 256, 4, 688
x = jax.random.normal(jax.random.key(0), (B, T, D))
stock_block = LlamaBlock(H, F, "bfloat16", stock)
params = stock_block.init(jax.random.key(1), x)["params"]
out = {{}}
for name, model in [("bf16", stock_block), ("coat", mnn.quantize(LlamaBlock(H, F, "bfloat16", flash), "coat"))]:
  loss = loss_fn(model, x)
  grad = jax.jit(jax.grad(loss)).lower(params, x).compile()
  out[name] = [grad.memory_analysis().temp_size_in_bytes, saved_bytes(loss, params, x)]
print(json.dumps(out))
"""


@pytest.mark.slow
def test_llama_block_coat_halves_gradient_temp_bytes():
  """One Llama block [4, 256, 256] (RMSNorm, rotary attention, SwiGLU): 'coat' with
  mpxla.attention needs at most half the temp bytes and saved bytes of stock BF16."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_cpu_enable_concurrency_optimized_scheduler=false"}
  script = SCRIPT.format()
  proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                        timeout=600, cwd=ROOT, env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  (bf16_temp, bf16_saved), (coat_temp, coat_saved) = out["bf16"], out["coat"]
  assert 2 * coat_temp <= bf16_temp, out
  assert 2 * coat_saved <= bf16_saved, out
