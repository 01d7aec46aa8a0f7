"""Batch statistics with an explicit scope, correct under `jax.jit` and inside `shard_map`.

One argument says where the batch is split, `axis_name`: the mesh axes (or `vmap`/`pmap`
axis names) the batch axis is sharded over, in the order of the batch's PartitionSpec,
e.g. `('data', 'fsdp')`. What it means depends on the view the code is traced in:

  * `shard_map` body (the axes are Manual): each device sees its own shard, so a global
    statistic needs a collective; the helpers `psum`/`pmax` over these axes.
  * `jax.jit` with global arrays (the axes are Auto/Explicit axes of the context mesh: the
    one of `jax.set_mesh`, or else the one in the input's type, see
    `mpxla.quant.sharding.input_mesh`; or not bound at all): a plain reduction is already
    global and no collective is written; the axis sizes give the number of device shards,
    which the per-device ('local') scopes need.

So the same model code runs in both views. Scopes:

  'global'  statistics over the whole global batch (every device gets the same value)
  'local'   statistics over each device's shard of the batch
  ghost g   statistics over virtual batches of g consecutive examples (smaller or larger
            than one device's shard: larger groups span g / shard devices)

Reductions accumulate in float32. Variance is two-pass by default (mean first, then the
mean squared deviation: no cancellation); `fast_variance=True` takes E[x^2] - E[x]^2
(clamped at 0) with one collective instead of two.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Literal

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from mpxla import quant
from mpxla.formats import Format
from mpxla.quant.sharding import auto_regroup, varying_axes

AxisName = str | Sequence[str] | None
Scope = Literal["global", "local"]


def axis_names(axis_name: AxisName) -> tuple[str, ...]:
  """`axis_name` as a tuple of names: None -> (), 'data' -> ('data',)."""
  if axis_name is None:
    return ()
  if isinstance(axis_name, str):
    return (axis_name,)
  names = tuple(axis_name)
  if not all(isinstance(n, str) for n in names):
    raise TypeError(f"axis_name must be a str or a sequence of str, got {axis_name!r}.")
  if len(set(names)) != len(names):
    raise ValueError(f"axis_name={axis_name!r} names an axis twice.")
  return names


@dataclasses.dataclass(frozen=True)
class BatchView:
  """How the batch is split as seen from the current trace.

  Attributes:
    manual: batch axes split across devices in this view (bound by `shard_map`, `pmap` or
      `vmap`): a global statistic needs a collective over them.
    manual_size: number of devices along `manual` (1 if none).
    shards: number of device shards of the batch *inside* this view (the sizes of the
      batch axes that are Auto/Explicit axes of the context mesh), or None when an axis
      is neither bound nor in the context mesh (the count is unknown).
  """

  manual: tuple[str, ...]
  manual_size: int
  shards: int | None


def batch_view(axis_name: AxisName) -> BatchView:
  """Classifies the batch axes `axis_name` for the current trace (see the module doc)."""
  names = axis_names(axis_name)
  mesh = jax.sharding.get_abstract_mesh()
  manual: list[str] = []
  shards: int | None = 1
  for name in names:
    if not mesh.empty and name in mesh.axis_names:
      if name in mesh.manual_axes:
        manual.append(name)
      elif shards is not None:
        shards *= mesh.shape[name]
    elif _is_bound(name):
      manual.append(name)
    else:
      shards = None
  size = jax.lax.axis_size(tuple(manual)) if manual else 1
  return BatchView(tuple(manual), int(size), shards)


def check_global(x: jax.Array, axis_name: AxisName, what: str) -> None:
  """Raises if a global statistic of `x` would silently be per device.

  Inside `shard_map`, `axis_name=None` with an `x` that varies over manual mesh axes means
  the caller forgot the batch axes. `axis_name=()` says "no batch axes" on purpose.
  """
  if axis_name is None:
    v = varying_axes(x)
    if v:
      raise ValueError(
          f"{what}: the input is split over mesh axes {sorted(v)} inside shard_map but "
          "axis_name=None, so the statistic would be per device. Pass axis_name=<the batch "
          "axes, e.g. ('data', 'fsdp')> for the global batch, or axis_name=() to keep it "
          "per device on purpose."
      )


def _is_bound(name: str) -> bool:
  try:
    jax.lax.axis_size(name)
  except NameError:
    return False
  return True


def psum(x, axis_name: AxisName):
  """Sum over the manual batch axes of `axis_name` (a no-op in a global view)."""
  manual = batch_view(axis_name).manual
  return jax.lax.psum(x, manual) if manual else x


def pmean(x, axis_name: AxisName):
  """Mean over the manual batch axes of `axis_name` (a no-op in a global view)."""
  manual = batch_view(axis_name).manual
  return jax.lax.pmean(x, manual) if manual else x


def pmax(x, axis_name: AxisName):
  """Max over the manual batch axes of `axis_name` (a no-op in a global view)."""
  manual = batch_view(axis_name).manual
  return jax.lax.pmax(x, manual) if manual else x


def normalize_axes(ndim: int, axis: int | Sequence[int] | None,
                   name: str = "axis") -> tuple[int, ...]:
  """`axis` (None: all) as sorted non-negative axes; ValueError naming `name` if one is
  out of range or repeated."""
  if axis is None:
    return tuple(range(ndim))
  axes = (axis,) if isinstance(axis, int) else tuple(axis)
  out = []
  for a in axes:
    if not -ndim <= a < ndim:
      raise ValueError(f"{name}={axis!r}: axis {a} is out of range for an input of rank {ndim}.")
    out.append(a % ndim)
  if len(set(out)) != len(out):
    raise ValueError(f"{name}={axis!r} repeats an axis.")
  return tuple(sorted(out))


def _mask(x: jax.Array, where: jax.Array | None) -> jax.Array | None:
  if where is None:
    return None
  where = jnp.asarray(where)
  try:
    return jnp.broadcast_to(where, x.shape).astype(jnp.float32)
  except ValueError:
    raise ValueError(
        f"where has shape {where.shape}, which does not broadcast to x's shape {x.shape}."
    ) from None


def _check_batch_axis(axes, view: BatchView, axis_name, what: str) -> None:
  """Inside shard_map the devices hold different rows: a reduction that keeps axis 0 has
  nothing to combine across them."""
  if view.manual and 0 not in axes:
    raise ValueError(
        f"{what}: axis={axes} leaves out the batch axis 0, but axis_name={axis_name!r} "
        "combines the devices' batch shards inside shard_map (each holds other rows): "
        "include axis 0, or pass axis_name=() to reduce each device's rows on their own.")


def weighted(xf, w):
  """xf * w with masked-out entries exactly 0 (NaN or inf there does not reach the sums)."""
  return xf if w is None else jnp.where(w != 0, xf, 0.0) * w


def _count(x, axes, w, view: BatchView):
  """Number of (unmasked) elements reduced per output entry, float32."""
  if w is None:
    return jnp.float32(math.prod(x.shape[a] for a in axes) * view.manual_size)
  return jax.lax.psum(jnp.sum(w, axes), view.manual) if view.manual else jnp.sum(w, axes)


def global_sum(
    x: jax.Array, axis=None, *, axis_name: AxisName = None, where: jax.Array | None = None
) -> jax.Array:
  """Sum over `axis` of the global batch (float32), masked by `where`."""
  check_global(x, axis_name, "global_sum")
  axes = normalize_axes(x.ndim, axis)
  _check_batch_axis(axes, batch_view(axis_name), axis_name, "global_sum")
  w = _mask(x, where)
  xf = x.astype(jnp.float32)
  return psum(jnp.sum(weighted(xf, w), axes), axis_name)


def global_mean(
    x: jax.Array, axis=None, *, axis_name: AxisName = None, where: jax.Array | None = None
) -> jax.Array:
  """Mean over `axis` of the global batch (float32); entries with nothing unmasked give 0."""
  check_global(x, axis_name, "global_mean")
  axes = normalize_axes(x.ndim, axis)
  view = batch_view(axis_name)
  _check_batch_axis(axes, view, axis_name, "global_mean")
  w = _mask(x, where)
  xf = x.astype(jnp.float32)
  s = jnp.sum(weighted(xf, w), axes)
  if w is None:
    s = jax.lax.psum(s, view.manual) if view.manual else s
    return s / _count(x, axes, None, view)
  sn = jnp.stack([s, jnp.sum(w, axes)])  # one collective for sums and counts
  sn = jax.lax.psum(sn, view.manual) if view.manual else sn
  return sn[0] / jnp.maximum(sn[1], 1.0)


def global_mean_and_var(
    x: jax.Array,
    axis=None,
    *,
    axis_name: AxisName = None,
    where: jax.Array | None = None,
    fast_variance: bool = False,
) -> tuple[jax.Array, jax.Array]:
  """Mean and (biased) variance over `axis` of the global batch, float32.

  var = mean((x - mean)^2) (two collectives), or with `fast_variance`
  max(mean(x^2) - mean^2, 0) (one collective). Entries with nothing unmasked give 0, 0.
  """
  check_global(x, axis_name, "global_mean_and_var")
  axes = normalize_axes(x.ndim, axis)
  view = batch_view(axis_name)
  _check_batch_axis(axes, view, axis_name, "global_mean_and_var")
  w = _mask(x, where)
  xf = x.astype(jnp.float32)
  red = lambda v: jax.lax.psum(v, view.manual) if view.manual else v  # noqa: E731
  keep = lambda m: jnp.expand_dims(m, axes)  # noqa: E731
  xf = xf if w is None else jnp.where(w != 0, xf, 0.0)  # NaN in padding: not summed
  wx = weighted(xf, w)
  if fast_variance:
    parts = [jnp.sum(wx, axes), jnp.sum(wx * xf, axes)]
    if w is not None:
      parts.append(jnp.sum(w, axes))
    parts = red(jnp.stack(parts))
    n = _count(x, axes, None, view) if w is None else jnp.maximum(parts[2], 1.0)
    mean = parts[0] / n
    return mean, jnp.maximum(parts[1] / n - mean * mean, 0.0)
  if w is None:
    n = _count(x, axes, None, view)
    mean = red(jnp.sum(xf, axes)) / n
  else:
    sn = red(jnp.stack([jnp.sum(wx, axes), jnp.sum(w, axes)]))
    n = jnp.maximum(sn[1], 1.0)
    mean = sn[0] / n
  d = xf - keep(mean)
  dd = d * d if w is None else d * d * w
  return mean, red(jnp.sum(dd, axes)) / n


def global_amax(
    x: jax.Array, *, axis_name: AxisName = None, where: jax.Array | None = None
) -> jax.Array:
  """max |x| over the whole (sharded) tensor: the same float32 scalar on every device.

  Uses `mpxla.quant.amax(x, 'tensor', axis_name=...)`. Inside `shard_map`, `axis_name`
  must cover every mesh axis `x` is split over (checked where JAX tracks it), otherwise
  devices would disagree on the scale. `where` (broadcastable to x) leaves out padding.
  No gradient flows through it (stop_gradient).
  """
  view = batch_view(axis_name)
  missing = varying_axes(x) - set(view.manual)
  if missing:
    raise ValueError(
        f"x varies over mesh axes {sorted(missing)} that axis_name={axis_name!r} does not "
        f"name: devices would get different amaxes. Pass axis_name="
        f"{tuple(view.manual) + tuple(sorted(missing))!r}."
    )
  x = jax.lax.stop_gradient(x)  # scales are constants to autodiff (pmax has no JVP)
  if where is not None:
    x = jnp.where(_mask(x, where) > 0, x, jnp.zeros((), x.dtype))
  return quant.amax(x, "tensor", axis_name=view.manual or None)


def global_scale(
    x: jax.Array,
    fmt: str | Format,
    margin: float = 0.0,
    *,
    axis_name: AxisName = None,
    where: jax.Array | None = None,
) -> jax.Array:
  """Per-tensor FP8 scale from the global amax: `quant.scale_from_amax(global_amax(x), ...)`."""
  return quant.scale_from_amax(global_amax(x, axis_name=axis_name, where=where), fmt, margin)


# Grouped statistics: 'local' (one group per device shard) and ghost batches.


@dataclasses.dataclass(frozen=True)
class GroupPlan:
  """How the batch (axis 0) of this view is cut into statistic groups.

  Attributes:
    groups: groups within this view's batch (the batch reshapes to [groups, b // groups]).
    span: devices along the manual batch axes that share one group (1: a group is local;
      `manual_size`: one global group, a psum; in between: ghost batches across devices).
    manual: the manual batch axes (see `BatchView`).
    manual_size: number of devices along `manual`.
  """

  groups: int
  span: int
  manual: tuple[str, ...]
  manual_size: int


def plan_groups(
    batch: int,
    *,
    scope: Scope = "global",
    ghost_batch_size: int | None = None,
    axis_name: AxisName = None,
) -> GroupPlan:
  """Groups for `scope` ('global'/'local') or ghost batches of `ghost_batch_size` examples.

  `batch` is the batch size seen in this view (the per-device batch inside `shard_map`).
  Raises ValueError for sizes that do not tile the batch.
  """
  view = batch_view(axis_name)
  m = view.manual_size
  if ghost_batch_size is not None:
    g = ghost_batch_size
    if not isinstance(g, int) or g < 1:
      raise ValueError(f"ghost_batch_size must be a positive int, got {g!r}.")
    if scope != "global":
      raise ValueError(
          f"ghost_batch_size={g} already sets the statistic groups; leave scope (BatchNorm's "
          f"stat_scope) at 'global' (got {scope!r})."
      )
    if g <= batch:
      if batch % g:
        raise ValueError(
            f"ghost_batch_size={g} does not divide the batch of {batch} examples "
            f"(per device{' along ' + str(view.manual) if view.manual else ''}); pick a "
            "divisor or pad the batch."
        )
      return GroupPlan(batch // g, 1, view.manual, m)
    if not view.manual:
      raise ValueError(f"ghost_batch_size={g} is larger than the batch of {batch} examples.")
    if g % batch or (m * batch) % g:
      raise ValueError(
          f"ghost_batch_size={g} must be a multiple of the per-device batch ({batch}) that "
          f"divides the global batch ({m * batch} over {m} devices along {view.manual}) when "
          "it is larger than one device's shard."
      )
    return GroupPlan(1, g // batch, view.manual, m)
  if scope == "global":
    return GroupPlan(1, m, view.manual, m)
  if scope == "local":
    if view.shards is None:
      raise ValueError(
          f"scope='local' needs the number of device shards of the batch, but "
          f"axis_name={axis_name!r} is neither bound here (shard_map/pmap/vmap) nor an axis "
          "of the context mesh. Call under `jax.set_mesh(mesh)` or inside `shard_map`."
      )
    if batch % view.shards:
      raise ValueError(
          f"the batch of {batch} examples does not divide into {view.shards} device shards "
          f"along {axis_names(axis_name)}."
      )
    return GroupPlan(view.shards, 1, view.manual, m)
  raise ValueError(f"scope must be 'global' or 'local', got scope={scope!r}.")


def _group_psum(v: jax.Array, plan: GroupPlan) -> jax.Array:
  """Sums `v` over the `plan.span` consecutive devices of this device's group."""
  if plan.manual and plan.span == plan.manual_size:  # one group over all devices
    return jax.lax.psum(v, plan.manual)
  if plan.span == 1:
    return v
  # Each device writes its partial sums into its group's row; one psum of
  # [num_groups, *v.shape] gives every group's total (smaller than an all-gather).
  num_groups = plan.manual_size // plan.span
  gid = jax.lax.axis_index(plan.manual) // plan.span
  rows = jnp.zeros((num_groups, *v.shape), v.dtype).at[gid].set(v)
  return jax.lax.psum(rows, plan.manual)[gid]


def grouped_mean_and_var(
    x: jax.Array,
    plan: GroupPlan,
    feature_axes: Sequence[int],
    *,
    where: jax.Array | None = None,
    fast_variance: bool = False,
) -> tuple[jax.Array, jax.Array]:
  """Mean and biased variance per group of `plan`, float32 of shape [groups, *features].

  Reduces over every axis but `feature_axes` (axis 0, the batch, must not be one), within
  each group of `plan`. Under a mesh with Explicit axes the grouping runs in Auto mode
  (`jax.sharding.auto_axes`), the statistics come out replicated.
  """
  f = lambda v, w: _grouped_mean_and_var(v, plan, feature_axes, w, fast_variance)  # noqa: E731
  return auto_regroup(f, x, where, out_specs=(P(), P()))


def _grouped_mean_and_var(x, plan, feature_axes, where, fast_variance):
  b = x.shape[0]
  fshape = tuple(x.shape[a] for a in feature_axes)
  xg = x.reshape(plan.groups, b // plan.groups, *x.shape[1:])
  axes = tuple(a + 1 for a in range(x.ndim) if a not in feature_axes)
  w = _mask(x, where)
  wg = None if w is None else w.reshape(xg.shape)
  xf = xg.astype(jnp.float32)
  keep = lambda m: jnp.expand_dims(m.reshape((plan.groups, *fshape)), axes)  # noqa: E731
  out = lambda m: m.reshape((plan.groups, *fshape))  # noqa: E731
  xf = xf if wg is None else jnp.where(wg != 0, xf, 0.0)  # NaN in padding: not summed
  wx = xf if wg is None else xf * wg
  if wg is None:
    n = jnp.float32(math.prod(xg.shape[a] for a in axes) * plan.span)
  if fast_variance:
    parts = [jnp.sum(wx, axes), jnp.sum(wx * xf, axes)]
    if wg is not None:
      parts.append(jnp.sum(wg, axes))
    parts = _group_psum(jnp.stack(parts), plan)
    if wg is not None:
      n = jnp.maximum(parts[2], 1.0)
    mean = parts[0] / n
    return out(mean), out(jnp.maximum(parts[1] / n - mean * mean, 0.0))
  if wg is None:
    mean = _group_psum(jnp.sum(xf, axes), plan) / n
  else:
    sn = _group_psum(jnp.stack([jnp.sum(wx, axes), jnp.sum(wg, axes)]), plan)
    n = jnp.maximum(sn[1], 1.0)
    mean = sn[0] / n
  d = xf - keep(mean)
  dd = d * d if wg is None else d * d * wg
  return out(mean), out(_group_psum(jnp.sum(dd, axes), plan) / n)
