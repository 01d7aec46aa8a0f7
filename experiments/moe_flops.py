"""Compiled FLOPs of an MoE layer's forward + backward vs a dense SwiGLU MLP.

Command:  .venv/bin/python experiments/moe_flops.py [--tokens 4096 --d 256 --d-ff 512 --top-k 2]

For E = 8, 16, 64 experts (top_k = 2, expert hidden size d_ff) the table gives XLA's
`cost_analysis()['flops']` of jit(grad(sum(y * r))) w.r.t. the parameters and the input, for:
a dense SwiGLU MLP with the same active parameters (hidden size top_k * d_ff), the MoE with
dense dispatch (every expert on every token), and the sparse dispatch with each grouped
matmul ('ragged_dot', 'blocks'). Only lowering and compiling: nothing is run. The input is
one dispatch group [tokens, d] (rank 2).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from mpxla.nn.moe import MoE

EXPERTS = (8, 16, 64)


def flops(fn, *args) -> float:
  """XLA's FLOPs count of the compiled jit(fn)(*args)."""
  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"])


def swiglu_mlp(p, x):
  """Dense SwiGLU: (silu(x G) * (x U)) D."""
  return (jax.nn.silu(x @ p["gate"]) * (x @ p["up"])) @ p["down"]


def mlp_step_flops(tokens, d, hidden) -> float:
  p = {"gate": jnp.zeros((d, hidden)), "up": jnp.zeros((d, hidden)),
       "down": jnp.zeros((hidden, d))}
  x = jnp.zeros((tokens, d))
  r = jnp.ones((tokens, d))
  step = jax.grad(lambda p_, x_: jnp.sum(swiglu_mlp(p_, x_) * r), argnums=(0, 1))
  return flops(step, p, x)


def moe_step_flops(tokens, d, d_ff, num_experts, top_k, **kw) -> float:
  model = MoE(num_experts=num_experts, d_ff=d_ff, top_k=top_k, **kw)
  x = jax.ShapeDtypeStruct((tokens, d), jnp.float32)
  params = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
  r = jnp.ones((tokens, d))

  def loss(p_, x_):
    y, _ = model.apply({"params": p_}, x_, mutable=["intermediates"])
    return jnp.sum(y * r)

  return flops(jax.grad(loss, argnums=(0, 1)), params, x)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--tokens", type=int, default=4096)
  ap.add_argument("--d", type=int, default=256)
  ap.add_argument("--d-ff", type=int, default=512)
  ap.add_argument("--top-k", type=int, default=2)
  a = ap.parse_args(argv)
  mlp = mlp_step_flops(a.tokens, a.d, a.top_k * a.d_ff)
  print(f"{a.tokens} tokens, d={a.d}, expert d_ff={a.d_ff}, top_k={a.top_k}; forward + backward "
        f"GFLOPs (XLA:{jax.default_backend().upper()} cost_analysis); dense MLP "
        f"(d_ff={a.top_k * a.d_ff}): {mlp / 1e9:.3f}\n")
  print("| E | dense dispatch | sparse 'ragged_dot' | sparse 'blocks' | 'blocks' / dense MLP "
        "| 'blocks' / dense dispatch | 'ragged_dot' / dense MLP |")
  print("|---|---|---|---|---|---|---|")
  for e in EXPERTS:
    common = (a.tokens, a.d, a.d_ff, e, a.top_k)
    dense = moe_step_flops(*common, dispatch="dense")
    ragged = moe_step_flops(*common, grouped_matmul="ragged_dot")
    blocks = moe_step_flops(*common, grouped_matmul="blocks")
    print(f"| {e} | {dense / 1e9:.3f} | {ragged / 1e9:.3f} | {blocks / 1e9:.3f} | "
          f"{blocks / mlp:.2f}x | {blocks / dense:.3f}x | {ragged / mlp:.2f}x |")


if __name__ == "__main__":
  main()
