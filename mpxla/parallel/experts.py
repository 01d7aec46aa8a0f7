"""Expert parallelism: MoE experts sharded over a mesh axis, tokens moved by all-to-all.

With N devices on the expert axis and E experts, device j of that axis holds the E_l = E / N
experts [j E_l, (j + 1) E_l) (the experts' weights sharded on their leading axis). Inside
`jax.shard_map` every device, with its own tokens (the batch split over the batch axes, the
expert axis among them):

  1. sorts its (token, slot) pairs by expert (`sort_pairs`; dropped pairs last), so the
     pairs for destination j are the contiguous run [start_j, start_j + n_j),
     n_j = sum of the group sizes of j's experts;
  2. packs them into a send buffer [N, R, D] (`pack_rows`: row r of slot j is sorted pair
     start_j + r for r < n_j, zeros after) and exchanges it with one `all_to_all` over the
     expert axis, with the [N, E_l] group sizes (a second, int32 all-to-all);
  3. runs the local experts on the [N, R, D] received rows, source i's rows a dispatch group
     with group sizes [E_l] (`expert_fn`, e.g. a grouped matmul);
  4. sends the results back (the same all-to-all), reads each pair's row from its
     destination's slot (`unpack_rows`), scales by the router weight and scatter-adds the
     rows onto their tokens (`combine_pairs`).

Padding rule (R = rows each device sends each destination, static): dropless,
R = T_l * K (T_l local tokens, K slots: every pair may go to one device); with a capacity of
C pairs per expert per dispatch group and G_l whole groups on the device,
R = min(T_l K, G_l E_l C) (`peer_rows`). Buffers hold N R rows, so dropless expert
parallelism moves and computes N times the rows of a balanced routing (the price of static
shapes without `ragged_all_to_all`, which XLA:CPU does not implement); a capacity factor of
about 1 brings R down to about T_l K / N. No token is ever all-gathered: the
collectives are the two all-to-alls each way (and the int32 group sizes).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from mpxla.parallel.mesh import batch_axes as mesh_batch_axes
from mpxla.quant.sharding import explicit_sharding, input_mesh

ExpertFn = Callable[[Any, jax.Array, jax.Array], jax.Array]


def sort_pairs(indices_SxK, keep_SxK, num_experts):
  """(order_M, group_sizes_E): pairs (M = S K, token-major) stably sorted by expert, dropped
  pairs last; group_sizes_E[e] = kept pairs of expert e."""
  key_M = jnp.where(keep_SxK, indices_SxK, num_experts).reshape(-1)
  order_M = jnp.argsort(key_M, stable=True)
  return order_M, jnp.sum(jax.nn.one_hot(key_M, num_experts, dtype=jnp.int32), axis=0)


def combine_pairs(y_MxD, order_M, token_M, w_SxK, keep_SxK):
  """y_t = sum_{sorted rows r of token t} keep_r w_r y_r: [S, D] (a scatter-add)."""
  keep_M = keep_SxK.reshape(-1)[order_M]
  w_M = w_SxK.reshape(-1)[order_M].astype(y_MxD.dtype)
  y_MxD = jnp.where(keep_M[:, None], y_MxD * w_M[:, None], 0)
  return jnp.zeros((keep_SxK.shape[0], y_MxD.shape[-1]), y_MxD.dtype).at[token_M].add(y_MxD)


def peer_rows(tokens_local: int, top_k: int, experts_local: int, capacity: int | None = None,
              groups_local: int = 1) -> int:
  """R = T_l K (dropless) or min(T_l K, G_l E_l C) rows per (source, destination) device."""
  worst = tokens_local * top_k
  if capacity is None:
    return max(worst, 1)
  return max(min(worst, groups_local * experts_local * capacity), 1)


def destination_runs(group_sizes_E, peers):
  """(start_N, count_N): destination j's pairs are sorted rows [start_j, start_j + count_j)."""
  count_N = jnp.sum(group_sizes_E.reshape(peers, -1), axis=-1)
  return jnp.cumsum(count_N) - count_N, count_N


def pack_rows(x_MxD, start_N, count_N, rows):
  """Send buffer [N, R, D]: buf[j, r] = x[start_j + r] if r < count_j else 0."""
  r_R = jnp.arange(rows)
  src_NxR = start_N[:, None] + r_R[None, :]
  valid_NxR = r_R[None, :] < count_N[:, None]
  src_NxR = jnp.where(valid_NxR, src_NxR, x_MxD.shape[0])  # out of range -> fill 0
  return x_MxD.at[src_NxR].get(mode="fill", fill_value=0)


def unpack_rows(y_NxRxD, start_N, count_N, pairs):
  """Sorted rows [M, D]: row p = y[j, p - start_j] for p in destination j's run, else 0."""
  peers, rows, _ = y_NxRxD.shape
  p_M = jnp.arange(pairs)
  end_N = start_N + count_N
  dest_M = jnp.minimum(jnp.sum(p_M[:, None] >= end_N[None, :], axis=-1), peers - 1)
  r_M = p_M - start_N[dest_M]
  valid_M = (p_M < end_N[-1]) & (r_M < rows)
  flat_M = jnp.where(valid_M, dest_M * rows + r_M, peers * rows)
  return y_NxRxD.reshape(peers * rows, -1).at[flat_M].get(mode="fill", fill_value=0)


def exchange(x_NxR, axis_name):
  """all_to_all over `axis_name`: out[i] = what device i sent this device (in[j] goes to j)."""
  return jax.lax.all_to_all(x_NxR, axis_name, 0, 0)


def local_expert_parallel(expert_fn: ExpertFn, params_local, x_TxD, weights_TxK, indices_TxK,
                          keep_TxK, *, num_experts: int, axis_name: str, peers: int,
                          rows: int):
  """The body on one device (inside shard_map): y_TxD = sum_j keep w E_{i}(x) (module doc)."""
  k = indices_TxK.shape[-1]
  order_M, group_sizes_E = sort_pairs(indices_TxK, keep_TxK, num_experts)
  token_M = order_M // k
  start_N, count_N = destination_runs(group_sizes_E, peers)
  send_NxRxD = pack_rows(x_TxD[token_M], start_N, count_N, rows)
  recv_NxRxD = exchange(send_NxRxD, axis_name)
  recv_sizes_NxEl = exchange(group_sizes_E.reshape(peers, -1), axis_name)
  out_NxRxD = expert_fn(params_local, recv_NxRxD, recv_sizes_NxEl)
  back_NxRxD = exchange(out_NxRxD.astype(x_TxD.dtype), axis_name)
  y_MxD = unpack_rows(back_NxRxD, start_N, count_N, order_M.shape[0])
  return combine_pairs(y_MxD, order_M, token_M, weights_TxK, keep_TxK)


def context_expert_mesh(x: jax.Array, axis_name: str | None):
  """The mesh to shard experts on: the context mesh (`jax.set_mesh`, else x's type) if it
  has `axis_name` with size > 1 and not Manual (inside shard_map the experts stay local);
  else None."""
  if axis_name is None:
    return None
  with input_mesh(x):
    mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or axis_name not in mesh.axis_names or mesh.shape[axis_name] == 1:
    return None
  kind = dict(zip(mesh.axis_names, mesh.axis_types, strict=True))[axis_name]
  return None if kind == AxisType.Manual else mesh


def check_expert_mesh(mesh, axis_name: str, num_experts: int, leading: int, batch: tuple):
  """ValueError naming the fix if the experts or the batch do not split over the mesh."""
  peers = mesh.shape[axis_name]
  if num_experts % peers:
    raise ValueError(
        f"num_experts={num_experts} is not a multiple of the mesh's {axis_name!r} axis "
        f"({peers} devices): use a multiple of {peers} experts, an {axis_name!r} axis whose "
        f"size divides {num_experts}, or expert_axis=None (replicated experts).")
  shards = math.prod(mesh.shape[a] for a in batch)
  if leading % shards:
    raise ValueError(
        f"expert parallelism splits the leading (batch) axis of x, {leading} rows, over the "
        f"batch axes {batch} ({shards} devices): use a batch that is a multiple of {shards}.")


def expert_parallel(expert_fn: ExpertFn, params, x, weights, indices, keep, *, num_experts: int,
                    mesh, axis_name: str = "expert", batch_axes: tuple[str, ...] | None = None,
                    rows: Callable[[int], int] | int | None = None, check_vma: bool = True):
  """y [..., D] = sum_j keep_j w_j E_{i_j}(x) with experts sharded over `axis_name`.

  Args:
    expert_fn: (params_local, x_NxRxD, group_sizes_NxEl) -> y_NxRxD: the local experts on
      N dispatch groups of R rows sorted by local expert (rows past the sizes give 0).
    params: pytree of expert weights, each with the E experts on its leading axis.
    x [B, ..., D], weights / indices [B, ..., K] (float / int32), keep [B, ..., K] bool.
    mesh: the (abstract) mesh, e.g. `context_expert_mesh(x, axis_name)`.
    batch_axes: the mesh axes B is split over (default: mpxla's batch axes of the mesh);
      `axis_name` is added if missing.
    rows: R, or a function of the local tokens T_l giving it (default: T_l K, dropless).
    check_vma: `jax.shard_map`'s (False for expert_fn running Pallas kernels).

  The leading axis of x is split over the batch axes (whole rows per device), the experts
  over `axis_name`; runs in `jax.shard_map` over every mesh axis that is not Manual already
  (inside a `shard_map` over e.g. 'data', x is that device's rows), inputs resharded first
  when the mesh has Explicit axes.
  """
  free = tuple(a for a, t in zip(mesh.axis_names, mesh.axis_types, strict=True)
               if t != AxisType.Manual)  # axes already Manual (an outer shard_map) stay so
  batch = mesh_batch_axes(mesh) if batch_axes is None else tuple(batch_axes)
  batch = tuple(a for a in batch if a in free)
  if axis_name not in batch:  # the expert axis splits the tokens too (each peer its own)
    batch += (axis_name,)
  check_expert_mesh(mesh, axis_name, num_experts, x.shape[0], batch)
  peers = mesh.shape[axis_name]
  shards = math.prod(mesh.shape[a] for a in batch)
  d, k = x.shape[-1], indices.shape[-1]
  tokens_local = math.prod(x.shape[:-1]) // shards
  if rows is None:
    rows = peer_rows(tokens_local, k, num_experts // peers)
  elif callable(rows):
    rows = rows(tokens_local)

  def body(params_l, x_l, w_l, i_l, keep_l):
    y = local_expert_parallel(
        expert_fn, params_l, x_l.reshape(-1, d), w_l.reshape(-1, k), i_l.reshape(-1, k),
        keep_l.reshape(-1, k), num_experts=num_experts, axis_name=axis_name, peers=peers,
        rows=rows)
    return y.reshape(x_l.shape)

  bspec = P(batch)
  pspec = jax.tree.map(lambda _: P(axis_name), params)
  in_specs = (pspec, bspec, bspec, bspec, bspec)
  args = (params, x, weights, indices, keep)
  explicit = any(explicit_sharding(a) for a in jax.tree.leaves(args))
  if explicit or any(t == AxisType.Explicit for t in mesh.axis_types):
    args = jax.tree.map(lambda s, a: jax.sharding.reshard(a, NamedSharding(mesh, s)), in_specs,
                        args, is_leaf=lambda s: isinstance(s, P))
  out_spec = getattr(jax.typeof(x).sharding, "spec", None)
  y = jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=bspec,
                    axis_names=set(free), check_vma=check_vma)(*args)
  if explicit and out_spec is not None and tuple(out_spec) != tuple(bspec):
    y = jax.sharding.reshard(y, NamedSharding(mesh, out_spec))
  return y
