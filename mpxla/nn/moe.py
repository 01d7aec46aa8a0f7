"""A top-k router and a small mixture-of-experts SwiGLU MLP, for Linen and NNX.

Router: logits = x @ W_r (float32), probs = softmax(logits), the k largest probs pick the
experts; their weights are the probs, renormalized to sum to 1 if `normalize_weights`.

MoE MLP: y = sum_{j<k} w_j * E_{i_j}(x) with SwiGLU experts
E_e(x) = (silu(x @ G_e) * (x @ U_e)) @ D_e. Dispatch is dense: every expert runs on every
token and the combine weights (zero off the top k) select, so the result is exact and
any sharding works (experts shard over the 'expert' mesh axis with `partitioned=True`), at
num_experts times the FLOPs of one expert: meant for small models and tests, not for
large expert counts.

The layer adds the load-balancing loss of mpxla.parallel.moe (scope `lbl_scope`, over the
batch axes `axis_name`) to the 'intermediates' collection as 'aux_loss' (Linen `sow`,
NNX `nnx.Intermediate`); it is a per-device share inside shard_map (see
mpxla.parallel.moe). With `accumulate_counts=True` the expert counts of the current
optimizer step accumulate in a buffer (Linen collection 'moe_counts', NNX `ExpertCounts`
variables) across gradient-accumulation micro-steps; zero it after every optimizer step
(`mpxla.parallel.moe.reset_count_buffer` on the collection, `reset_expert_counts` for NNX).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from mpxla.parallel import moe as pmoe
from mpxla.parallel.stats import AxisName

Initializer = Callable[..., jax.Array]
_default_init = nn.initializers.lecun_normal()


def top_k_route(
    logits: jax.Array, k: int, *, normalize_weights: bool = True
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(weights [..., k] float32, indices [..., k] int32, probs [..., E] float32)."""
  num_experts = logits.shape[-1]
  if not isinstance(k, int) or not 1 <= k <= num_experts:
    raise ValueError(f"top_k must be an int in [1, {num_experts}] (the experts), got {k!r}.")
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  weights, indices = _top_k(probs, k)
  if normalize_weights:
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
  return weights, indices.astype(jnp.int32), probs


def _top_k(probs, k):
  """jax.lax.top_k's result (ties: lower index first), as k argmax passes for small k.

  XLA's SPMD partitioner gathers a batch-sharded operand for TopK; argmax partitions along
  the batch, so the router needs no collective under jit.
  """
  if k > 8:
    return jax.lax.top_k(probs, k)
  vals, idxs = [], []
  p = probs
  for _ in range(k):
    i = jnp.argmax(p, axis=-1)
    vals.append(jnp.take_along_axis(probs, i[..., None], axis=-1)[..., 0])
    idxs.append(i)
    p = jnp.where(jax.nn.one_hot(i, p.shape[-1], dtype=jnp.bool_), -jnp.inf, p)
  return jnp.stack(vals, -1), jnp.stack(idxs, -1)


def combine_weights(weights: jax.Array, indices: jax.Array, num_experts: int) -> jax.Array:
  """Dense [..., E] combine weights: weight of expert e for each token (0 if not routed)."""
  return jnp.sum(jax.nn.one_hot(indices, num_experts, dtype=weights.dtype) * weights[..., None],
                 axis=-2)


def experts_swiglu(x, gate_ExDxF, up_ExDxF, down_ExFxD, combine_E, dtype):
  """sum_e combine_e * (silu(x G_e) * (x U_e)) D_e, every expert on every token."""
  xd = x.astype(dtype)
  g = jnp.einsum("...d,edf->...ef", xd, gate_ExDxF.astype(dtype))
  u = jnp.einsum("...d,edf->...ef", xd, up_ExDxF.astype(dtype))
  h = jax.nn.silu(g) * u
  out = jnp.einsum("...ef,efd->...ed", h, down_ExFxD.astype(dtype))
  return jnp.einsum("...ed,...e->...d", out, combine_E.astype(dtype))


def _lbl(probs, indices, num_experts, scope, axis_name, mask, buffer):
  if buffer is None:
    return pmoe.load_balancing_loss(probs, indices, num_experts, scope, axis_name=axis_name,
                                    mask=mask), None
  if scope != "global":
    raise ValueError(f"accumulate_counts needs lbl_scope='global', got {scope!r}.")
  return pmoe.load_balancing_loss_with_buffer(probs, indices, num_experts, buffer,
                                              axis_name=axis_name, mask=mask)


class TopKRouter(nn.Module):
  """Linen top-k router: x [..., D] -> (weights [..., k], indices [..., k], probs [..., E])."""

  num_experts: int
  top_k: int = 2
  normalize_weights: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  kernel_init: Initializer = _default_init
  partitioned: bool = False

  @nn.compact
  def __call__(self, x):
    init = self.kernel_init
    if self.partitioned:
      init = nn.with_logical_partitioning(init, ("embed", None))
    w = self.param("kernel", init, (x.shape[-1], self.num_experts), self.param_dtype)
    dtype = self.dtype or jnp.result_type(x.dtype, self.param_dtype)
    logits = jnp.dot(x.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32)
    return top_k_route(logits, self.top_k, normalize_weights=self.normalize_weights)


class MoE(nn.Module):
  """Linen MoE SwiGLU MLP: x [..., D] -> y [..., D]; sows 'intermediates'/'aux_loss'.

  Attributes:
    num_experts, d_ff, top_k: experts, expert hidden size, experts per token.
    dtype, param_dtype: compute and parameter dtypes.
    lbl_scope: 'global' | 'micro_batch' | 'sequence' (mpxla.parallel.moe).
    axis_name: the batch mesh axes (mpxla.parallel.stats).
    accumulate_counts: keep the gradient-accumulation count buffer ('moe_counts').
    normalize_weights: renormalize the top-k weights to sum to 1.
    partitioned: attach logical axis names ('exp', 'embed', 'mlp') to the kernels.
  """

  num_experts: int
  d_ff: int
  top_k: int = 2
  dtype: Any = None
  param_dtype: Any = jnp.float32
  lbl_scope: str = "global"
  axis_name: AxisName = None
  accumulate_counts: bool = False
  normalize_weights: bool = True
  kernel_init: Initializer = _default_init
  partitioned: bool = False

  @nn.compact
  def __call__(self, x, mask=None):
    d, e, f = x.shape[-1], self.num_experts, self.d_ff
    weights, indices, probs = TopKRouter(
        e, self.top_k, self.normalize_weights, self.dtype, self.param_dtype, self.kernel_init,
        self.partitioned, name="router")(x)

    def kernel(name, shape, names):
      init = self.kernel_init
      if self.partitioned:
        init = nn.with_logical_partitioning(init, names)
      return self.param(name, init, shape, self.param_dtype)

    gate = kernel("gate", (e, d, f), ("exp", "embed", "mlp"))
    up = kernel("up", (e, d, f), ("exp", "embed", "mlp"))
    down = kernel("down", (e, f, d), ("exp", "mlp", "embed"))
    buffer = None
    if self.accumulate_counts:
      buf = self.variable("moe_counts", "counts", pmoe.init_count_buffer, e)
      if self.is_mutable_collection("moe_counts") and not self.is_initializing():
        buffer = buf
    loss, new_counts = _lbl(probs, indices, e, self.lbl_scope, self.axis_name, mask,
                            None if buffer is None else buffer.value)
    if buffer is not None:
      buffer.value = new_counts
    self.sow("intermediates", "aux_loss", loss)
    dtype = self.dtype or jnp.result_type(x.dtype, self.param_dtype)
    y = experts_swiglu(x, gate, up, down, combine_weights(weights, indices, e), dtype)
    return y.astype(dtype)


class ExpertCounts(nnx.Variable):
  """NNX variable type of the gradient-accumulation expert-count buffer."""


def reset_expert_counts(model: nnx.Module) -> None:
  """Zeros every `ExpertCounts` buffer of an NNX model (after each optimizer step)."""
  for _, v in nnx.iter_graph(model):
    if isinstance(v, ExpertCounts):
      v[...] = jnp.zeros_like(v[...])


def _nnx_param(rngs, init, shape, dtype, names, partitioned):
  value = init(rngs.params(), shape, dtype)
  if partitioned:
    return nnx.Param(value, out_sharding=names, eager_sharding=False)
  return nnx.Param(value)


class NNXTopKRouter(nnx.Module):
  """NNX top-k router (see `TopKRouter`)."""

  def __init__(self, in_features: int, num_experts: int, top_k: int = 2, *,
               normalize_weights: bool = True, dtype: Any = None,
               param_dtype: Any = jnp.float32, kernel_init: Initializer = _default_init,
               partitioned: bool = False, rngs: nnx.Rngs):
    self.kernel = _nnx_param(rngs, kernel_init, (in_features, num_experts), param_dtype,
                             ("embed", None), partitioned)
    self.top_k = top_k
    self.normalize_weights = normalize_weights
    self.dtype = dtype
    self.param_dtype = param_dtype

  def __call__(self, x):
    dtype = self.dtype or jnp.result_type(x.dtype, self.param_dtype)
    logits = jnp.dot(x.astype(dtype), self.kernel[...].astype(dtype),
                     preferred_element_type=jnp.float32)
    return top_k_route(logits, self.top_k, normalize_weights=self.normalize_weights)


class NNXMoE(nnx.Module):
  """NNX MoE SwiGLU MLP (see `MoE`); the loss goes to `nnx.Intermediate` 'aux_loss'."""

  def __init__(self, in_features: int, num_experts: int, d_ff: int, top_k: int = 2, *,
               dtype: Any = None, param_dtype: Any = jnp.float32, lbl_scope: str = "global",
               axis_name: AxisName = None, accumulate_counts: bool = False,
               normalize_weights: bool = True, kernel_init: Initializer = _default_init,
               partitioned: bool = False, rngs: nnx.Rngs):
    e, d, f = num_experts, in_features, d_ff
    self.router = NNXTopKRouter(d, e, top_k, normalize_weights=normalize_weights, dtype=dtype,
                                param_dtype=param_dtype, kernel_init=kernel_init,
                                partitioned=partitioned, rngs=rngs)
    self.gate = _nnx_param(rngs, kernel_init, (e, d, f), param_dtype, ("exp", "embed", "mlp"),
                           partitioned)
    self.up = _nnx_param(rngs, kernel_init, (e, d, f), param_dtype, ("exp", "embed", "mlp"),
                         partitioned)
    self.down = _nnx_param(rngs, kernel_init, (e, f, d), param_dtype, ("exp", "mlp", "embed"),
                           partitioned)
    self.counts = ExpertCounts(pmoe.init_count_buffer(e)) if accumulate_counts else nnx.data(
        None)
    self.num_experts = e
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.lbl_scope = lbl_scope
    self.axis_name = axis_name

  def __call__(self, x, mask=None):
    e = self.num_experts
    weights, indices, probs = self.router(x)
    buffer = None if self.counts is None else self.counts[...]
    loss, new_counts = _lbl(probs, indices, e, self.lbl_scope, self.axis_name, mask, buffer)
    if self.counts is not None:
      self.counts[...] = new_counts
    self.sow(nnx.Intermediate, "aux_loss", loss)
    dtype = self.dtype or jnp.result_type(x.dtype, self.param_dtype)
    y = experts_swiglu(x, self.gate[...], self.up[...], self.down[...],
                       combine_weights(weights, indices, e), dtype)
    return y.astype(dtype)
