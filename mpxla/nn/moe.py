"""A top-k router and a mixture-of-experts SwiGLU MLP, for Linen and NNX.

Router: logits = x @ W_r (float32), probs = softmax(logits), the k largest probs pick the
experts; their weights are the probs, renormalized to sum to 1 if `normalize_weights`.

MoE MLP: y_t = sum_{j<k} keep_{t,j} * w_{t,j} * E_{i_{t,j}}(x_t) with SwiGLU experts
E_e(x) = (silu(x @ G_e) * (x @ U_e)) @ D_e.

Dispatch (`dispatch=`):

  'sparse' (default)  the (token, slot) pairs of a dispatch group are sorted by expert
                      (stable `argsort`: batch order inside an expert), each expert's
                      contiguous rows go through its SwiGLU as one grouped matmul
                      (`group_sizes_E` = pairs per expert), the rows are scaled by their
                      router weight and scatter-added back to their tokens. Cost:
                      k * T * 3 * D * F multiply-adds, independent of E (times E
                      where XLA lowers 'ragged_dot' densely, see `grouped_matmul`).
  'dense'             the reference: every expert on every token, the combine weights
                      (zero off the top k) select; E times the FLOPs of one expert.

Grouped matmul of the sparse dispatch (`grouped_matmul=`):

  'ragged_dot' (default)  `jax.lax.ragged_dot`: TPU's native grouped matmul. XLA:CPU,
                          and XLA:GPU unless a grouped GEMM is enabled (JAX's
                          `jax_ragged_dot_use_gpu_pallas_triton_lowering`, XLA's cuDNN
                          ragged-dot fusion), lower it as a masked dense dot over all E
                          groups (the FLOPs of 'dense'; docs/nn.md).
  'blocks'                each expert's rows padded to a multiple of `block_size` rows;
                          block n multiplies [block_size, D] by its expert's [D, F]
                          (gathered): FLOPs (k T + E block_size) * D * F per matmul on every
                          backend, but the gathered weights take N = k T / B + E
                          expert-weight copies (B = block_size). `block_size=None`
                          picks the largest power of two <= k S / (16 E) (at most 128):
                          padding adds <= 1/16 of the rows, about 17 E weight copies.
  'pallas_gpu'            the same block layout through a Pallas/Triton grouped matmul
                          (`mpxla.nn._gmm_gpu`) that reads each block's expert weight in
                          place: the FLOPs of 'blocks' without weight copies. Blocks of
                          `block_size` rows, a power of two >= 16 (None: the 'blocks' rule,
                          at least 16); under a mesh whose batch axes split the groups the
                          kernels run per batch shard (`shard_map`: XLA cannot split a
                          custom call). For GPUs; on other backends it runs in Pallas
                          interpret mode (correct, slow: for tests). Not yet timed on a GPU
                          (the device check's MoE section does), hence not the default.
FP8 expert matmuls (`fp8`) run with 'ragged_dot' only; the other two raise.

Dispatch groups: with x of rank >= 3 ([B, ..., D]) every row of the leading axis is its own
group (sorted independently, vmapped), so a batch sharded over its leading axis never
moves; a rank-2 x [S, D] is one group. Dropless results do not depend on the grouping.

Expert parallelism (`expert_axis`, default 'expert'): when the context mesh
(`jax.set_mesh`, else x's sharding type) has that axis with size N > 1 and not Manual, the
sparse dispatch shards the E experts over it (E / N per device) and moves each device's
pairs to their experts' devices by padded all-to-all inside `jax.shard_map`
(mpxla.parallel.experts: R = T_l k rows per destination dropless, min(T_l k, G_l (E / N) C)
with a capacity); the batch stays split over the batch axes. E must be a multiple of N and
x's leading axis of the batch shards (ValueError otherwise). None: replicated experts.

Capacity (`capacity_factor`, None = dropless): each expert takes at most
C = ceil(capacity_factor * S * k / E) pairs per group of S tokens; pairs are admitted in
batch order (token-major, then slot), so the later tokens are dropped first. A dropped pair
contributes nothing (its token keeps the other slots). Masked (padding) tokens take no
capacity: with a capacity they are not dispatched (their output is 0); dropless they are
computed as any token. The fraction of unmasked pairs dropped (of this call, this device)
goes to 'intermediates' as 'dropped_fraction'. The 'dense' reference applies the same drops.

The layer adds the load-balancing loss of mpxla.parallel.moe (scope `lbl_scope`, over the
batch axes `axis_name`) to the 'intermediates' collection as 'aux_loss' (Linen `sow`,
NNX `nnx.Intermediate`); it is a per-device share inside shard_map (see
mpxla.parallel.moe). Its counts are the routed pairs before any drop. With
`accumulate_counts=True` the expert counts of the current optimizer step accumulate in a
buffer (Linen collection 'moe_counts', NNX `ExpertCounts` variables) across
gradient-accumulation micro-steps; zero it after every optimizer step
(`mpxla.parallel.moe.reset_count_buffer` on the collection, `reset_expert_counts` for NNX).
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from mpxla.nn import _gmm_gpu
from mpxla.nn.fp8_dot import DotConfig
from mpxla.nn.fp8_grouped import fp8_grouped_matmul
from mpxla.parallel import experts as pexperts
from mpxla.parallel import moe as pmoe
from mpxla.parallel.experts import combine_pairs, sort_pairs
from mpxla.parallel.stats import AxisName
from mpxla.quant.sharding import auto_regroup, per_batch_shard

Initializer = Callable[..., jax.Array]
_default_init = nn.initializers.lecun_normal()


def top_k_route(
    logits: jax.Array, k: int, *, normalize_weights: bool = True
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(weights [..., k] float32, indices [..., k] int32, probs [..., E] float32)."""
  num_experts = logits.shape[-1]
  if not isinstance(k, numbers.Integral) or isinstance(k, bool) or not 1 <= k <= num_experts:
    raise ValueError(f"top_k must be an int in [1, {num_experts}] (the experts), got {k!r}.")
  k = int(k)
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
  """Dense reference: sum_e combine_e * (silu(x G_e) * (x U_e)) D_e, every expert on every token."""
  xd = x.astype(dtype)
  g = jnp.einsum("...d,edf->...ef", xd, gate_ExDxF.astype(dtype))
  u = jnp.einsum("...d,edf->...ef", xd, up_ExDxF.astype(dtype))
  h = jax.nn.silu(g) * u
  out = jnp.einsum("...ef,efd->...ed", h, down_ExFxD.astype(dtype))
  return jnp.einsum("...ed,...e->...d", out, combine_E.astype(dtype))


DISPATCHES = ("sparse", "dense")
GROUPED_MATMULS = ("ragged_dot", "blocks", "pallas_gpu")


def check_dispatch_args(dispatch, grouped_matmul, capacity_factor, block_size):
  """ValueError naming the argument for an unknown dispatch or a bad capacity / block size."""
  if dispatch not in DISPATCHES:
    raise ValueError(f"dispatch must be one of {DISPATCHES}, got {dispatch!r}.")
  if grouped_matmul not in GROUPED_MATMULS:
    raise ValueError(f"grouped_matmul must be one of {GROUPED_MATMULS}, got {grouped_matmul!r}.")
  if capacity_factor is not None and not (
      isinstance(capacity_factor, numbers.Real) and not isinstance(capacity_factor, bool)
      and capacity_factor > 0):
    raise ValueError(f"capacity_factor must be None (dropless) or a number > 0 (a Python or "
                     f"NumPy scalar; inf: no drops), got {capacity_factor!r}.")
  if block_size is not None and not (isinstance(block_size, int) and block_size >= 1):
    raise ValueError(f"block_size must be None or a positive int, got {block_size!r}.")
  if grouped_matmul == "pallas_gpu" and block_size is not None:
    _gmm_gpu.check_block_rows(block_size)


def expert_capacity(capacity_factor: float, tokens: int, top_k: int, num_experts: int) -> int:
  """C = min(ceil(capacity_factor * tokens * top_k / num_experts), tokens) pairs per expert
  (an expert takes at most one pair per token: C = tokens drops nothing)."""
  c = float(capacity_factor) * tokens * top_k / num_experts
  return tokens if c >= tokens else int(math.ceil(c))


def capacity_keep(indices_SxK, valid_S, num_experts, capacity):
  """keep [S, K] bool: the pair's rank among its expert's valid pairs (token-major) < C.

  capacity=None keeps every pair (padding included); otherwise invalid tokens are dropped
  and take no capacity.
  """
  if capacity is None:
    return jnp.ones(indices_SxK.shape, bool)
  valid_SxK = jnp.broadcast_to(valid_S[:, None], indices_SxK.shape)
  hot_MxE = jax.nn.one_hot(indices_SxK.reshape(-1), num_experts, dtype=jnp.int32)
  hot_MxE = hot_MxE * valid_SxK.reshape(-1, 1).astype(jnp.int32)
  rank_M = jnp.sum(jnp.cumsum(hot_MxE, axis=0) * hot_MxE, axis=-1) - 1
  return (valid_SxK.reshape(-1) & (rank_M < capacity)).reshape(indices_SxK.shape)


def auto_block_size(rows: int, num_experts: int) -> int:
  """The largest power of two <= rows / (16 E), in [1, 128]: padding <= rows / 16."""
  target = max(rows // (16 * num_experts), 1)
  return min(1 << (target.bit_length() - 1), 128)


def block_layout(group_sizes_E, rows, block):
  """(pos_M, expert_N): sorted row -> padded row, expert of each of N = ceil(rows/B) + E blocks.

  Expert e's rows [s_e, s_e + n_e) go to [p_e, p_e + n_e), p_e = sum_{e'<e} ceil(n_e'/B) B.
  Rows past sum(n) (dropped pairs) map out of range; unused blocks get expert E - 1.
  """
  e = group_sizes_E.shape[0]
  nblocks = -(-rows // block) + e
  padded_E = (group_sizes_E + block - 1) // block * block
  start_E = jnp.cumsum(group_sizes_E) - group_sizes_E
  pstart_E = jnp.cumsum(padded_E) - padded_E
  row_M = jnp.arange(rows)
  expert_M = jnp.sum(row_M[:, None] >= jnp.cumsum(group_sizes_E)[None, :], axis=-1)
  safe_M = jnp.minimum(expert_M, e - 1)
  pos_M = jnp.where(expert_M < e, pstart_E[safe_M] + row_M - start_E[safe_M], nblocks * block)
  bend_E = jnp.cumsum(padded_E) // block
  expert_N = jnp.minimum(jnp.sum(jnp.arange(nblocks)[:, None] >= bend_E[None, :], -1), e - 1)
  return pos_M, expert_N


_GROUPED_DIMS = jax.lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(([2], [1]), ([], [])), lhs_ragged_dimensions=[1],
    rhs_group_dimensions=[0])


def ragged_matmul(x_GxMxK, w_ExKxN, group_sizes_GxE):
  """out[g, r] = x[g, r] @ w[e] for row r in group e of dispatch group g (`ragged_dot`)."""
  return jax.lax.ragged_dot_general(x_GxMxK, w_ExKxN, group_sizes_GxE, _GROUPED_DIMS)


def grouped_swiglu(x_GxMxD, gate_ExDxF, up_ExDxF, down_ExFxD, group_sizes_GxE, *,
                   impl="ragged_dot", block_size=None, fp8=None):
  """Rows sorted by expert: row r of expert group e -> (silu(x_r G_e) * (x_r U_e)) D_e.

  G dispatch groups, each with its own group sizes; rows past sum(group_sizes) give 0.
  fp8: a `DotConfig` for FP8 expert matmuls (`fp8_grouped_matmul`; 'ragged_dot' only).
  """
  if fp8 is not None and impl != "ragged_dot":
    raise ValueError(f"FP8 expert matmuls (the MoE's fp8, set by mpxla.nn.quantize) run with "
                     f"grouped_matmul='ragged_dot' only, got {impl!r}.")
  if impl == "ragged_dot":
    mm = ragged_matmul if fp8 is None else functools.partial(
        fp8_grouped_matmul, config=fp8, preferred_element_type=x_GxMxD.dtype)
    g = mm(x_GxMxD, gate_ExDxF, group_sizes_GxE)
    u = mm(x_GxMxD, up_ExDxF, group_sizes_GxE)
    return mm(jax.nn.silu(g) * u, down_ExFxD, group_sizes_GxE)
  ng, rows, d = x_GxMxD.shape
  e = gate_ExDxF.shape[0]
  block = block_size or auto_block_size(rows, e)
  if impl == "pallas_gpu":
    block = block_size or max(16, block)
  nblocks = -(-rows // block) + e
  pos_GxM, expert_GxN = jax.vmap(lambda gs: block_layout(gs, rows, block))(group_sizes_GxE)
  xb = jax.vmap(lambda x, p: jnp.zeros((nblocks * block, d), x.dtype).at[p].set(x, mode="drop"))(
      x_GxMxD, pos_GxM)

  def swiglu(xb_GxPxD, expert_GxN, gate, up, down):
    n, expert_N = xb_GxPxD.shape[0], expert_GxN.reshape(-1)
    if impl == "blocks":
      def mm(a_PxK, w_ExKxN):  # block n times its expert's weight, gathered per block
        a_NxBxK = a_PxK.reshape(-1, block, a_PxK.shape[-1])
        return jnp.einsum("nbk,nkf->nbf", a_NxBxK, w_ExKxN[expert_N]).reshape(
            -1, w_ExKxN.shape[-1])
    else:
      mm = functools.partial(_gmm_gpu.gmm, expert_N=expert_N, block_rows=block,
                             interpret=jax.default_backend() != "gpu")
    xb_PxD = xb_GxPxD.reshape(-1, d)
    h_PxF = jax.nn.silu(mm(xb_PxD, gate)) * mm(xb_PxD, up)
    return mm(h_PxF, down).reshape(n, nblocks * block, d)

  wts = (gate_ExDxF, up_ExDxF, down_ExFxD)
  if impl == "blocks":
    out_GxPxD = swiglu(xb, expert_GxN, *wts)
  else:  # the kernels per batch shard of the dispatch groups (XLA cannot split a kernel)
    out_GxPxD = per_batch_shard(swiglu, xb, expert_GxN, *wts, batch=ng,
                                split=(True, True, False, False, False))
  return jax.vmap(lambda o, p: o.at[p].get(mode="fill", fill_value=0))(out_GxPxD, pos_GxM)


def sparse_swiglu(x_GxSxD, weights_GxSxK, indices_GxSxK, keep_GxSxK, gate_ExDxF, up_ExDxF,
                  down_ExFxD, *, impl="ragged_dot", block_size=None, fp8=None):
  """y_t = sum_j keep_tj w_tj E_{i_tj}(x_t), per dispatch group, by sorting pairs by expert.

  In each group the pairs (t, j), M = S K of them, are ordered by expert (`sort_pairs`),
  x_{t(r)} gathered, put through `grouped_swiglu`, scaled by w and scatter-added back to
  their tokens (the inverse permutation).
  """
  k = indices_GxSxK.shape[-1]
  order_GxM, group_sizes_GxE = jax.vmap(sort_pairs, (0, 0, None))(
      indices_GxSxK, keep_GxSxK, gate_ExDxF.shape[0])
  token_GxM = order_GxM // k
  x_GxMxD = jnp.take_along_axis(x_GxSxD, token_GxM[..., None], axis=1)
  y_GxMxD = grouped_swiglu(x_GxMxD, gate_ExDxF, up_ExDxF, down_ExFxD, group_sizes_GxE,
                           impl=impl, block_size=block_size, fp8=fp8)

  return jax.vmap(combine_pairs)(y_GxMxD, order_GxM, token_GxM, weights_GxSxK, keep_GxSxK)


def moe_experts(x, weights, indices, mask, gate_ExDxF, up_ExDxF, down_ExFxD, *, dtype,
                dispatch="sparse", capacity_factor=None, grouped_matmul="ragged_dot",
                block_size=None, expert_axis=None, fp8=None):
  """The expert part of the MoE layer: (y [..., D] in `dtype`, dropped pairs, valid pairs).

  x [..., D], weights/indices [..., K], mask [...] or None. Groups: see the module doc.
  The sparse dispatch is expert-parallel (`mpxla.parallel.experts`) when the context mesh
  has `expert_axis` with size > 1 (see the module doc).
  """
  e = gate_ExDxF.shape[0]
  lead, d, k = x.shape[:-1], x.shape[-1], indices.shape[-1]
  grouped = x.ndim >= 3
  g = lead[0] if grouped else 1
  s = math.prod(lead) // g if g else 0
  valid = jnp.ones(lead, bool) if mask is None else jnp.asarray(mask, bool)
  capacity = None if capacity_factor is None else expert_capacity(capacity_factor, s, k, e)
  wts = (gate_ExDxF.astype(dtype), up_ExDxF.astype(dtype), down_ExFxD.astype(dtype))
  mesh = pexperts.context_expert_mesh(x, expert_axis) if dispatch == "sparse" else None
  if mesh is not None:
    y, dropped = _parallel_experts(x.astype(dtype), weights, indices, valid, wts, mesh,
                                   expert_axis, g, s, capacity, grouped_matmul, block_size, fp8)
    return y, dropped, jnp.sum(valid) * k

  def run(x_, w_, i_, v_, wts):
    x_g, w_g = x_.reshape(g, s, d).astype(dtype), w_.reshape(g, s, k)
    i_g, v_g = i_.reshape(g, s, k), v_.reshape(g, s)
    keep = jax.vmap(capacity_keep, (0, 0, None, None))(i_g, v_g, e, capacity)
    if dispatch == "dense":
      combine = combine_weights(jnp.where(keep, w_g, 0), i_g, e)
      y = experts_swiglu(x_g, *wts, combine, dtype)
    else:
      y = sparse_swiglu(x_g, w_g, i_g, keep, *wts, impl=grouped_matmul, block_size=block_size,
                        fp8=fp8)
    dropped = jnp.sum(v_g[..., None] & ~keep) if capacity is not None else jnp.int32(0)
    return y.reshape(*lead, d).astype(dtype), dropped

  spec = getattr(jax.typeof(x).sharding, "spec", None)
  out_specs = (P(*spec) if spec is not None else P(), P())
  y, dropped = auto_regroup(run, x, weights, indices, valid, wts, out_specs=out_specs)
  return y, dropped, jnp.sum(valid) * k


def _parallel_experts(x, weights, indices, valid, wts, mesh, axis, g, s, capacity, impl,
                      block_size, fp8):
  """(y, dropped pairs) with the experts sharded over `axis` (mpxla.parallel.experts).

  The capacity's keep mask is computed per dispatch group first (as without expert
  parallelism); R = `peer_rows(T_l, K, E_l, C, G_l)` with G_l = T_l / S whole groups (x of
  rank >= 3) or 1 (rank 2).
  """
  e, k = wts[0].shape[0], indices.shape[-1]
  lead = indices.shape[:-1]
  if capacity is None:
    keep, dropped = jnp.ones(indices.shape, bool), jnp.int32(0)
  else:
    def keeps(i_, v_):
      i_g, v_g = i_.reshape(g, s, k), v_.reshape(g, s)
      keep_g = jax.vmap(capacity_keep, (0, 0, None, None))(i_g, v_g, e, capacity)
      return keep_g.reshape(*lead, k), jnp.sum(v_g[..., None] & ~keep_g)

    spec = getattr(jax.typeof(indices).sharding, "spec", None)
    keep, dropped = auto_regroup(keeps, indices, valid,
                                 out_specs=(P(*spec) if spec is not None else P(), P()))
  peers = mesh.shape[axis] if e % mesh.shape[axis] == 0 else 1  # else: the check raises
  per_group = len(lead) >= 2

  def rows(tokens_local):
    groups_local = tokens_local // s if per_group else 1
    return pexperts.peer_rows(tokens_local, k, e // peers, capacity, groups_local)

  def expert_fn(wts_local, x_NxRxD, group_sizes_NxEl):
    return grouped_swiglu(x_NxRxD, *wts_local, group_sizes_NxEl, impl=impl,
                          block_size=block_size, fp8=fp8)

  y = pexperts.expert_parallel(expert_fn, wts, x, weights, indices, keep, num_experts=e,
                               mesh=mesh, axis_name=axis, rows=rows,
                               check_vma=impl != "pallas_gpu")  # kernels: no vma types
  return y, dropped


def dropped_fraction(dropped, pairs):
  """dropped / pairs as float32 (0 when there are no valid pairs)."""
  return dropped.astype(jnp.float32) / jnp.maximum(pairs, 1).astype(jnp.float32)


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
    dispatch: 'sparse' (sorted tokens, grouped matmuls; default) | 'dense' (reference).
    capacity_factor: None (dropless) or > 0: C = ceil(capacity_factor * S * k / E).
    grouped_matmul: 'ragged_dot' | 'blocks' | 'pallas_gpu' (the sparse dispatch's grouped
      matmul).
    block_size: rows per block of 'blocks' (None: automatic).
    expert_axis: the mesh axis the experts are sharded over when the context mesh has it
      with size > 1 (expert parallelism, sparse dispatch); None: experts never sharded.
    fp8: a `DotConfig`: the experts' grouped matmuls run on FP8 codes with per-expert scales
      (`mpxla.nn.fp8_grouped`; sparse dispatch with 'ragged_dot'). `mpxla.nn.quantize` sets
      it under FP8 recipes.
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
  dispatch: str = "sparse"
  capacity_factor: float | None = None
  grouped_matmul: str = "ragged_dot"
  block_size: int | None = None
  expert_axis: str | None = "expert"
  fp8: DotConfig | None = None

  @nn.compact
  def __call__(self, x, mask=None):
    check_dispatch_args(self.dispatch, self.grouped_matmul, self.capacity_factor,
                        self.block_size)
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
    y, dropped, pairs = moe_experts(
        x, weights, indices, mask, gate, up, down, dtype=dtype, dispatch=self.dispatch,
        capacity_factor=self.capacity_factor, grouped_matmul=self.grouped_matmul,
        block_size=self.block_size, expert_axis=self.expert_axis, fp8=self.fp8)
    if self.capacity_factor is not None:
      self.sow("intermediates", "dropped_fraction", dropped_fraction(dropped, pairs))
    return y


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
  """NNX MoE SwiGLU MLP (see `MoE`); the loss goes to `nnx.Intermediate` 'aux_loss'
  (and, with a capacity, 'dropped_fraction')."""

  def __init__(self, in_features: int, num_experts: int, d_ff: int, top_k: int = 2, *,
               dtype: Any = None, param_dtype: Any = jnp.float32, lbl_scope: str = "global",
               axis_name: AxisName = None, accumulate_counts: bool = False,
               normalize_weights: bool = True, kernel_init: Initializer = _default_init,
               partitioned: bool = False, dispatch: str = "sparse",
               capacity_factor: float | None = None, grouped_matmul: str = "ragged_dot",
               block_size: int | None = None, expert_axis: str | None = "expert",
               fp8: DotConfig | None = None, rngs: nnx.Rngs):
    check_dispatch_args(dispatch, grouped_matmul, capacity_factor, block_size)
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
    self.dispatch = dispatch
    self.capacity_factor = capacity_factor
    self.grouped_matmul = grouped_matmul
    self.block_size = block_size
    self.expert_axis = expert_axis
    self.fp8 = fp8

  def __call__(self, x, mask=None):
    e = self.num_experts
    weights, indices, probs = self.router(x)
    buffer = None if self.counts is None else self.counts[...]
    loss, new_counts = _lbl(probs, indices, e, self.lbl_scope, self.axis_name, mask, buffer)
    if self.counts is not None:
      self.counts[...] = new_counts
    self.sow(nnx.Intermediate, "aux_loss", loss)
    dtype = self.dtype or jnp.result_type(x.dtype, self.param_dtype)
    y, dropped, pairs = moe_experts(
        x, weights, indices, mask, self.gate[...], self.up[...], self.down[...], dtype=dtype,
        dispatch=self.dispatch, capacity_factor=self.capacity_factor,
        grouped_matmul=self.grouped_matmul, block_size=self.block_size,
        expert_axis=self.expert_axis, fp8=self.fp8)
    if self.capacity_factor is not None:
      self.sow(nnx.Intermediate, "dropped_fraction", dropped_fraction(dropped, pairs))
    return y
