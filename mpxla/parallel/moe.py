"""MoE load-balancing loss with an explicit scope (Qiu et al. 2025, "Demons in the Detail").

    LBL = N_E * sum_i f_i * P_i,    f_i = c_i / sum_j c_j,    P_i = mean_t p_{t,i}

c_i counts the (token, slot) pairs routed to expert i (a top-k router routes each token
to k experts, so sum_j c_j = k * T and f sums to 1), p_{t,i} is the router probability of
token t for expert i, T the number of (unmasked) tokens. A uniform router gives LBL = 1.

Scopes (the set of tokens f and P are computed over):

  'global'       the global batch. Only the N_E counts are all-reduced (never the
                 token-by-expert matrix): P stays local and the data-parallel mean of the
                 per-device values is exactly the global-batch LBL (see below).
  'micro_batch'  each device's micro-batch; the loss is the mean over micro-batches.
  'sequence'     each sequence ([B, T, N_E] input); the loss is the mean over sequences.

Views (as mpxla.parallel.stats): under `jax.jit` with global arrays a plain reduction is
global ('micro_batch' then needs the device shards: the batch axes as `axis_name` on the
context mesh of `jax.set_mesh(mesh)` or the mesh of router_probs' sharding, or
`num_micro_batches`). Inside `shard_map` pass the batch axes: the
result is the loss of the scope, the same value on every device, and its gradient is
right under JAX's default `check_vma=True`. For 'global' device d computes its share

    L_d = N_E * D * sum_i f_i * S_i^d / T,      S_i^d = sum_{t on d} p_{t,i},  D devices,

with f and T = sum_j c_j / k from the all-reduced counts (exact with padding and uneven
token counts per device), and the loss is mean_d L_d: collectives are the N_E int32
counts and one scalar. `return_share=True` returns L_d instead (only the counts are
all-reduced): for training steps that take one `pmean` of the summed per-device losses.
The gradient never crosses devices through the counts (they are integers).

Gradient accumulation (the paper's Algorithm 1): keep a count buffer
(`init_count_buffer`), call `load_balancing_loss_with_buffer` in every micro-step: f uses
the counts of all micro-steps so far (the global batch at the last one), P the current
micro-step. `reset_count_buffer` after each optimizer step.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from mpxla.parallel.stats import AxisName, batch_view, check_global
from mpxla.quant.sharding import auto_regroup, input_mesh

LBLScope = Literal["global", "micro_batch", "sequence"]


def expert_counts(
    expert_indices: jax.Array, num_experts: int, *, mask: jax.Array | None = None
) -> jax.Array:
  """c_i: number of (token, slot) pairs routed to each expert, int32 [num_experts] (local)."""
  hot = jax.nn.one_hot(expert_indices, num_experts, dtype=jnp.int32)  # [..., K, E]
  if mask is not None:
    hot = hot * jnp.asarray(mask, jnp.int32)[..., None, None]
  return jnp.sum(hot, axis=tuple(range(hot.ndim - 1)))


def init_count_buffer(num_experts: int) -> jax.Array:
  """An empty count buffer for gradient accumulation: int32 zeros [num_experts]."""
  return jnp.zeros((num_experts,), jnp.int32)


def reset_count_buffer(buffer):
  """Zeros a buffer, or every buffer of a tree (e.g. Linen's 'moe_counts' collection)."""
  return jax.tree.map(jnp.zeros_like, buffer)


def _check(router_probs, expert_indices, num_experts, mask, scope):
  if not isinstance(num_experts, int) or num_experts < 1:
    raise ValueError(f"num_experts must be a positive int, got {num_experts!r}.")
  if router_probs.shape[-1] != num_experts:
    raise ValueError(
        f"router_probs has {router_probs.shape[-1]} experts on its last axis but "
        f"num_experts={num_experts}."
    )
  if expert_indices.shape[:-1] != router_probs.shape[:-1]:
    raise ValueError(
        f"expert_indices {expert_indices.shape} must be router_probs {router_probs.shape} "
        "with the expert axis replaced by the top-k axis."
    )
  if not jnp.issubdtype(expert_indices.dtype, jnp.integer):
    raise TypeError(f"expert_indices must be integers, got {expert_indices.dtype}.")
  if mask is not None and jnp.shape(mask) != router_probs.shape[:-1]:
    raise ValueError(
        f"mask has shape {jnp.shape(mask)}, expected the token shape {router_probs.shape[:-1]}."
    )
  if scope == "sequence" and router_probs.ndim != 3:
    raise ValueError(
        f"scope='sequence' needs router_probs of shape [batch, length, experts], got "
        f"{router_probs.shape}."
    )
  if scope not in ("global", "micro_batch", "sequence"):
    raise ValueError(
        f"scope must be 'global', 'micro_batch' or 'sequence', got scope={scope!r}."
    )


def _prob_sums(router_probs, mask, axes):
  p = router_probs.astype(jnp.float32)
  if mask is not None:  # a padding token adds nothing, also where its probabilities are NaN
    m = jnp.asarray(mask, jnp.float32)[..., None]
    p = jnp.where(m != 0, p * m, 0.0)
  return jnp.sum(p, axis=axes)


def _lbl(counts, prob_sums, k, num_experts):
  """N_E * sum_i (c_i / sum c) * (S_i / T), T = sum c / k; 0 if there are no tokens."""
  c = counts.astype(jnp.float32)
  total = jnp.sum(c, axis=-1, keepdims=True)
  safe = jnp.where(total > 0, total, 1.0)
  # f_i * P_i = (c_i / total) * (S_i * k / total)
  return num_experts * k * jnp.sum(c * prob_sums, axis=-1) / jnp.squeeze(safe * safe, -1)


def load_balancing_loss(
    router_probs: jax.Array,
    expert_indices: jax.Array,
    num_experts: int,
    scope: LBLScope = "global",
    *,
    axis_name: AxisName = None,
    mask: jax.Array | None = None,
    num_micro_batches: int | None = None,
    return_share: bool = False,
) -> jax.Array:
  """N_E * sum_i f_i * P_i over `scope` (see the module doc), float32 scalar.

  Args:
    router_probs: [..., N_E] router probabilities (softmax over experts) per token.
    expert_indices: [..., k] int experts each token is routed to (top-k).
    num_experts: N_E.
    scope: 'global', 'micro_batch' or 'sequence'.
    axis_name: batch axes (see mpxla.parallel.stats): inside shard_map the axes to
      all-reduce the counts over; under jit the axes whose size gives the micro-batches.
    mask: [...] token mask (0/False: padding, not counted).
    num_micro_batches: 'micro_batch' under jit only: split the batch (axis 0) into this
      many micro-batches instead of reading the device shards from the mesh.
    return_share: inside shard_map, return this device's share (the loss is the mean of
      the shares over `axis_name`) and skip the final scalar pmean.
  """
  loss, _ = _loss_and_counts(router_probs, expert_indices, num_experts, scope, axis_name,
                             mask, num_micro_batches, None, return_share)
  return loss


def load_balancing_loss_with_buffer(
    router_probs: jax.Array,
    expert_indices: jax.Array,
    num_experts: int,
    buffer: jax.Array,
    *,
    axis_name: AxisName = None,
    mask: jax.Array | None = None,
    return_share: bool = False,
) -> tuple[jax.Array, jax.Array]:
  """Global-scope LBL of one gradient-accumulation micro-step; returns (loss, new buffer).

  f uses `buffer + this micro-step's global counts` (Algorithm 1 of the paper); the new
  buffer is that sum. P and T are this micro-step's.
  """
  if buffer.shape != (num_experts,):
    raise ValueError(f"buffer has shape {buffer.shape}, expected ({num_experts},).")
  return _loss_and_counts(router_probs, expert_indices, num_experts, "global", axis_name, mask,
                          None, buffer, return_share)


def _loss_and_counts(router_probs, expert_indices, num_experts, scope, axis_name, mask,
                     num_micro_batches, buffer, return_share):
  _check(router_probs, expert_indices, num_experts, mask, scope)
  check_global(router_probs, axis_name, f"load_balancing_loss(scope={scope!r})")
  with input_mesh(router_probs):  # the micro-batch count, also without jax.set_mesh
    view = batch_view(axis_name)
  loss, counts = _shares(router_probs, expert_indices, num_experts, scope, view, axis_name,
                         mask, num_micro_batches, buffer)
  if view.manual and not return_share:
    loss = jax.lax.pmean(loss, view.manual)
  return loss, counts


def _shares(router_probs, expert_indices, num_experts, scope, view, axis_name, mask,
            num_micro_batches, buffer):
  k = expert_indices.shape[-1]
  if scope == "global":
    counts = expert_counts(expert_indices, num_experts, mask=mask)
    if view.manual:
      counts = jax.lax.psum(counts, view.manual)  # the LBL's one N_E-sized collective
    tokens = jnp.sum(counts) / k  # this micro-step's global (unmasked) tokens
    f_counts = counts if buffer is None else counts + buffer
    ftot = jnp.sum(f_counts).astype(jnp.float32)
    f = f_counts.astype(jnp.float32) / jnp.where(ftot > 0, ftot, 1.0)
    s = _prob_sums(router_probs, mask, tuple(range(router_probs.ndim - 1)))
    t = jnp.where(tokens > 0, tokens, 1.0).astype(jnp.float32)
    loss = num_experts * view.manual_size * jnp.sum(f * s) / t
    return loss, f_counts
  if scope == "sequence":
    hot = jax.nn.one_hot(expert_indices, num_experts, dtype=jnp.int32)  # [B, T, K, E]
    if mask is not None:
      hot = hot * jnp.asarray(mask, jnp.int32)[..., None, None]
    counts = jnp.sum(hot, axis=(1, 2))  # [B, E]
    per_seq = _lbl(counts, _prob_sums(router_probs, mask, (1,)), k, num_experts)
    return jnp.mean(per_seq), None
  # micro_batch: groups of the batch axis 0 in this view.
  if num_micro_batches is not None:
    if view.manual:
      raise ValueError("num_micro_batches is for the jit (global) view; inside shard_map "
                       "each device's shard is its micro-batch.")
    groups = num_micro_batches
  elif view.shards is None or axis_name is None:
    raise ValueError(
        f"scope='micro_batch' under jit needs the number of micro-batches: call under "
        f"`jax.set_mesh(mesh)` with axis_name=<batch axes> (got {axis_name!r}), pass "
        "num_micro_batches, or run inside shard_map."
    )
  else:
    groups = view.shards
  b = router_probs.shape[0]
  if not isinstance(groups, int) or groups < 1 or b % groups:
    raise ValueError(f"the batch of {b} does not split into {groups} micro-batches.")
  mask = None if mask is None else jnp.asarray(mask)

  def per_group(probs, idx, m):
    probs = probs.reshape(groups, -1, num_experts)
    idx = idx.reshape(groups, -1, k)
    m = None if m is None else m.reshape(groups, -1)
    hot = jax.nn.one_hot(idx, num_experts, dtype=jnp.int32)
    if m is not None:
      hot = hot * m.astype(jnp.int32)[..., None, None]
    counts = jnp.sum(hot, axis=(1, 2))  # [G, E]
    return jnp.mean(_lbl(counts, _prob_sums(probs, m, (1,)), k, num_experts))

  return auto_regroup(per_group, router_probs, expert_indices, mask, out_specs=P()), None
