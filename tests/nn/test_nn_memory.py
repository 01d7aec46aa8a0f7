"""Compiled temp bytes of the gradient: 'coat' against stock BF16 layers (the issue's goal).

Temp bytes depend on XLA's schedule; as in experiments/fp8_activations.py they are measured
with the memory-minimizing one (`--xla_cpu_enable_concurrency_optimized_scheduler=false`),
which must be set before JAX starts: the measurement runs in a subprocess with the
experiment's own models (stock Flax Linen layers).
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]

SCRIPT = """
import json, sys
sys.path.insert(0, {experiments!r})
import fp8_activations as E  # sets XLA_FLAGS before importing JAX
import jax
from mpxla import nn as mnn

B, T, D, H, F = 4, 256, 256, 4, 688
x = jax.random.normal(jax.random.key(0), (B, T, D))
stock = E.LlamaBlock(H, F, "bfloat16", E.stock_attention)
flash = E.LlamaBlock(H, F, "bfloat16", E.flash_attention)
params = stock.init(jax.random.key(1), x)["params"]
out = {{}}
for name, model in [("bf16", stock), ("coat", mnn.quantize(flash, "coat"))]:
  loss = E._loss_fn(model, x)
  grad = jax.jit(jax.grad(loss)).lower(params, x).compile()
  out[name] = [grad.memory_analysis().temp_size_in_bytes, E.activation_bytes(loss, params, x)[0]]
print(json.dumps(out))
"""


@pytest.mark.slow
def test_llama_block_coat_halves_gradient_temp_bytes():
  """One Llama block [4, 256, 256] (RMSNorm, rotary attention, SwiGLU): 'coat' with
  mpxla.attention needs at most half the temp bytes and saved bytes of stock BF16."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  script = SCRIPT.format(experiments=str(ROOT / "experiments"))
  proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                        timeout=600, cwd=ROOT, env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  (bf16_temp, bf16_saved), (coat_temp, coat_saved) = out["bf16"], out["coat"]
  assert 2 * coat_temp <= bf16_temp, out
  assert 2 * coat_saved <= bf16_saved, out
