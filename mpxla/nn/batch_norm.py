"""BatchNorm with an explicit statistic scope (global, local, ghost), for Linen and NNX.

    y = (x - mean) / sqrt(var + epsilon) * scale + bias

mean and var (biased) are taken over every axis but the feature axes, within a group of
examples along axis 0 (the batch) that the scope picks:

  stat_scope='global'   the whole global batch. Under `jax.jit` with a sharded batch a plain
                        reduction is global; inside `shard_map` pass `axis_name` (the batch
                        mesh axes) and the sums are psum-ed (one collective of the feature
                        size, two with the default two-pass variance).
  stat_scope='local'    each device's shard (no communication). Inside `shard_map` that is the
                        per-device batch; under jit it needs the mesh (`jax.set_mesh`) and
                        `axis_name` to know the shard count.
  ghost_batch_size=g    virtual batches of g consecutive examples (Ghost BatchNorm, Hoffer
                        et al. 2017). g may be smaller than a device's shard (no
                        communication) or a multiple of it (groups span g / shard devices:
                        one psum of [groups, features]).

Running averages (collection 'batch_stats', names 'mean' and 'var' as in Flax) move by
the average over groups of the group statistics (over every device's groups inside
`shard_map`), so they are identical on every device:
    ra <- momentum * ra + (1 - momentum) * mean_over_groups(stat)
With a mask the average weights each group by its unmasked fraction (a fully padded group
counts for nothing; a step with everything masked leaves ra unchanged).
Statistics are float32 whatever the input dtype. `mask` (broadcastable to x; False = a
padded example) removes entries from the statistics. The batch axis is axis 0 and must
not be a feature axis.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from mpxla.parallel import stats
from mpxla.parallel.stats import AxisName
from mpxla.quant.sharding import auto_regroup, input_mesh, varying_axes

Initializer = Callable[..., jax.Array]


def feature_axes_of(ndim: int, axis: int | Sequence[int]) -> tuple[int, ...]:
  """Sorted non-negative feature axes; axis 0 (the batch) is not allowed."""
  out = stats.normalize_axes(ndim, axis, "BatchNorm axis")
  if 0 in out:
    raise ValueError(
        f"BatchNorm axis={axis!r} includes axis 0, the batch axis the statistics run over; "
        "put the batch first and the features elsewhere (default axis=-1)."
    )
  return out


def batch_statistics(
    x: jax.Array,
    feature_axes: Sequence[int],
    *,
    scope: str = "global",
    ghost_batch_size: int | None = None,
    axis_name: AxisName = None,
    mask: jax.Array | None = None,
    fast_variance: bool = False,
) -> tuple[jax.Array, jax.Array, stats.GroupPlan, jax.Array | None]:
  """Group statistics for BatchNorm: (mean, var) float32 [groups, *features], the plan and
  each group's unmasked fraction [groups, *features] (None without a mask)."""
  if scope == "global" and ghost_batch_size is None:
    stats.check_global(x, axis_name, "BatchNorm(stat_scope='global')")
  if scope == "local" and axis_name is None and not varying_axes(x):
    raise ValueError(
        "BatchNorm(stat_scope='local') outside shard_map needs axis_name=<the batch mesh "
        "axes> (under `jax.set_mesh(mesh)`) to know the device shards; pass axis_name=() if "
        "the batch is not split (then 'local' is the whole batch)."
    )
  with input_mesh(x):  # the shard counts, also without jax.set_mesh
    plan = stats.plan_groups(
        x.shape[0], scope=scope, ghost_batch_size=ghost_batch_size, axis_name=axis_name)
  mean, var = stats.grouped_mean_and_var(
      x, plan, feature_axes, where=mask, fast_variance=fast_variance)
  share = None
  if mask is not None:  # each group's unmasked share: the weight of its statistics
    w = jnp.broadcast_to(jnp.asarray(mask), x.shape).astype(jnp.float32)
    share = stats.grouped_mean_and_var(w, plan, feature_axes)[0]
  return mean, var, plan, share


def update_running(ra_F: jax.Array, stats_GxF, plan: stats.GroupPlan, share_GxF, momentum):
  """momentum * ra + (1 - momentum) * the groups' statistics averaged with weights `share`
  (their unmasked fraction; equal without a mask), the same on every device; ra unchanged
  where every group is fully masked."""
  stat_GxF = jax.lax.stop_gradient(stats_GxF)
  w_GxF = jnp.ones_like(stat_GxF) if share_GxF is None else jax.lax.stop_gradient(share_GxF)
  num, den = jnp.sum(w_GxF * stat_GxF, axis=0), jnp.sum(w_GxF, axis=0)
  if plan.manual and plan.span < plan.manual_size:
    num, den = jax.lax.psum((num, den), plan.manual)
  new = momentum * ra_F + (1 - momentum) * (num / jnp.where(den > 0, den, 1.0))
  return jnp.where(den > 0, new, ra_F)


def normalize(
    x: jax.Array,
    mean_GxF: jax.Array,
    var_GxF: jax.Array,
    scale: jax.Array | None,
    bias: jax.Array | None,
    feature_axes: Sequence[int],
    epsilon: float,
    dtype: Any,
) -> jax.Array:
  """(x - mean) * rsqrt(var + eps) * scale + bias per group, in float32, cast to `dtype`."""
  f = lambda *a: _normalize(*a, feature_axes, epsilon, dtype)  # noqa: E731
  # Regrouping runs in Auto mode on Explicit meshes; y keeps x's sharding.
  return auto_regroup(f, x, mean_GxF, var_GxF, scale, bias,
                      out_specs=jax.typeof(x).sharding.spec)


def _normalize(x, mean_GxF, var_GxF, scale, bias, feature_axes, epsilon, dtype):
  groups = mean_GxF.shape[0]
  xg = x.reshape(groups, x.shape[0] // groups, *x.shape[1:]).astype(jnp.float32)
  bshape = [groups] + [1] * x.ndim
  for a in feature_axes:
    bshape[a + 1] = x.shape[a]
  mul = jax.lax.rsqrt(var_GxF + jnp.float32(epsilon))
  if scale is not None:
    mul = mul * scale.astype(jnp.float32)
  y = (xg - mean_GxF.reshape(bshape)) * mul.reshape(bshape)
  if bias is not None:
    y = y + jnp.broadcast_to(bias.astype(jnp.float32), mean_GxF.shape).reshape(bshape)
  return y.reshape(x.shape).astype(dtype)


def _out_dtype(x, dtype, param_dtype):
  return dtype if dtype is not None else jnp.result_type(x.dtype, param_dtype)


class BatchNorm(nn.Module):
  """Linen BatchNorm with stat_scope='global'|'local' and ghost_batch_size (module doc).

  Attributes:
    use_running_average: normalize with the running averages (eval) instead of the batch.
    axis: feature axis or axes (not 0).
    momentum: running-average decay.
    epsilon: added to the variance.
    dtype: output dtype (default: x's dtype promoted with param_dtype).
    param_dtype: dtype of scale and bias.
    use_bias, use_scale, bias_init, scale_init: the affine part.
    stat_scope: 'global' or 'local' (Linen reserves the name `scope`).
    axis_name: the batch mesh axes (see mpxla.parallel.stats); () = none on purpose.
    ghost_batch_size: examples per virtual batch (leave stat_scope at 'global').
    fast_variance: one-pass E[x^2] - E[x]^2 (one collective instead of two).
  """

  use_running_average: bool | None = None
  axis: int | Sequence[int] = -1
  momentum: float = 0.99
  epsilon: float = 1e-5
  dtype: Any = None
  param_dtype: Any = jnp.float32
  use_bias: bool = True
  use_scale: bool = True
  bias_init: Initializer = nn.initializers.zeros
  scale_init: Initializer = nn.initializers.ones
  stat_scope: str = "global"
  axis_name: AxisName = None
  ghost_batch_size: int | None = None
  fast_variance: bool = False

  @nn.compact
  def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
    use_ra = nn.merge_param("use_running_average", self.use_running_average,
                            use_running_average)
    faxes = feature_axes_of(x.ndim, self.axis)
    fshape = tuple(x.shape[a] for a in faxes)
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros(fshape, jnp.float32))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones(fshape, jnp.float32))
    scale = self.param("scale", self.scale_init, fshape, self.param_dtype) if self.use_scale \
        else None
    bias = self.param("bias", self.bias_init, fshape, self.param_dtype) if self.use_bias \
        else None
    if use_ra:
      mean, var = ra_mean.value[None], ra_var.value[None]
    else:
      mean, var, plan, share = batch_statistics(
          x, faxes, scope=self.stat_scope, ghost_batch_size=self.ghost_batch_size,
          axis_name=self.axis_name, mask=mask, fast_variance=self.fast_variance)
      if not self.is_initializing():
        ra_mean.value = update_running(ra_mean.value, mean, plan, share, self.momentum)
        ra_var.value = update_running(ra_var.value, var, plan, share, self.momentum)
    return normalize(x, mean, var, scale, bias, faxes, self.epsilon,
                     _out_dtype(x, self.dtype, self.param_dtype))


class NNXBatchNorm(nnx.Module):
  """NNX BatchNorm with stat_scope='global'|'local' and ghost_batch_size (module doc).

  Same arguments as the Linen `BatchNorm` plus `num_features` (the size of the feature
  axes, an int or a tuple) and `rngs`. Running averages are `nnx.BatchStat` variables
  `mean` and `var`; `nnx.view(model, use_running_average=True)` (or the call argument)
  switches to them.
  """

  def __init__(
      self,
      num_features: int | Sequence[int],
      *,
      use_running_average: bool = False,
      axis: int | Sequence[int] = -1,
      momentum: float = 0.99,
      epsilon: float = 1e-5,
      dtype: Any = None,
      param_dtype: Any = jnp.float32,
      use_bias: bool = True,
      use_scale: bool = True,
      bias_init: Initializer = nnx.initializers.zeros,
      scale_init: Initializer = nnx.initializers.ones,
      stat_scope: str = "global",
      axis_name: AxisName = None,
      ghost_batch_size: int | None = None,
      fast_variance: bool = False,
      rngs: nnx.Rngs,
  ):
    fshape = (num_features,) if isinstance(num_features, int) else tuple(num_features)
    self.mean = nnx.BatchStat(jnp.zeros(fshape, jnp.float32))
    self.var = nnx.BatchStat(jnp.ones(fshape, jnp.float32))
    self.scale = nnx.Param(scale_init(rngs.params(), fshape, param_dtype)) if use_scale \
        else nnx.data(None)
    self.bias = nnx.Param(bias_init(rngs.params(), fshape, param_dtype)) if use_bias \
        else nnx.data(None)
    self.num_features = fshape
    self.use_running_average = use_running_average
    self.axis = axis
    self.momentum = momentum
    self.epsilon = epsilon
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.stat_scope = stat_scope
    self.axis_name = axis_name
    self.ghost_batch_size = ghost_batch_size
    self.fast_variance = fast_variance

  def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
    use_ra = self.use_running_average if use_running_average is None else use_running_average
    faxes = feature_axes_of(x.ndim, self.axis)
    fshape = tuple(x.shape[a] for a in faxes)
    if fshape != self.num_features:
      raise ValueError(
          f"NNXBatchNorm was built for features {self.num_features} but x {x.shape} has "
          f"{fshape} on axis={self.axis!r}."
      )
    scale = self.scale[...] if self.scale is not None else None
    bias = self.bias[...] if self.bias is not None else None
    if use_ra:
      mean, var = self.mean[...][None], self.var[...][None]
    else:
      mean, var, plan, share = batch_statistics(
          x, faxes, scope=self.stat_scope, ghost_batch_size=self.ghost_batch_size,
          axis_name=self.axis_name, mask=mask, fast_variance=self.fast_variance)
      self.mean[...] = update_running(self.mean[...], mean, plan, share, self.momentum)
      self.var[...] = update_running(self.var[...], var, plan, share, self.momentum)
    return normalize(x, mean, var, scale, bias, faxes, self.epsilon,
                     _out_dtype(x, self.dtype, self.param_dtype))

  def set_view(self, use_running_average: bool | None = None):
    """Hook for `nnx.view(model, use_running_average=...)`."""
    if use_running_average is not None:
      self.use_running_average = use_running_average
