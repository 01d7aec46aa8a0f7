"""FP8 matmul: `dot_general` / `einsum` with E4M3 inputs, E5M2 gradients and a custom VJP.

    y = fp8_dot_general(x, w, (((1,), (0,)), ((), ())))        # x [M, K] @ w [K, N]

Forward: x and w are quantized to E4M3 (`DotConfig.fwd_fmt`), the dot runs on the FP8 codes
with float32 accumulation (`preferred_element_type=float32`) and the scales are applied to
the float32 result, which is returned in the compute dtype (`preferred_element_type`, else
the inputs' promoted dtype). The custom VJP saves the FP8 codes and scales, never x or w.

Backward: the output gradient g is quantized to E5M2 (`bwd_fmt`); dx = g . w^T and
dw = x^T . g run on FP8 codes (E5M2 x E4M3) with float32 accumulation.

Scaling (`DotConfig.scaling`), per layer:

  'tensor'   per-tensor just-in-time: the scale of x, w and g comes from their current amax
             (COAT's default).
  'delayed'  per-tensor delayed: the amax is the max of a history of past amaxes (as in
             TransformerEngine and Flax); pass `state=init_delayed_state(config)`. The
             updated histories come back as the *gradient* of `state` (see `mpxla.nn.delayed`).
  'block'    DeepSeek-V3 blockwise: x in 1 x 128 groups along the contraction, w in
             128 x 128 tiles; g in 1 x 128 groups for dx; for dw, x (dequantized from its
             saved codes) and g are requantized in 128 x 1 groups along the tokens. Scales
             that vary along the contraction cannot be factored out of the dot, so the
             contraction runs as a `lax.scan` over its 128-wide blocks, each an FP8 dot whose
             float32 partial sum is scaled and accumulated (memory: one output, not one per block).
  'mx'       MXFP8 (OCP Microscaling, `mpxla.quant.quantize_mx`): x and w in blocks of 32 along
             the contraction with E8M0 (power-of-two, uint8) scales; for dx, g and w in blocks
             along N, for dw, x and g in blocks along the tokens (x and w requantized from
             their saved codes). The dots run on the dequantized blocks in float32 (what an
             MX GEMM computes; no CPU or Hopper GEMM takes MX operands natively).

Global amax: under `jax.jit` the amax of a sharded array is already global. Inside
`shard_map` set `DotConfig.axis_name` (per-tensor scaling) to take a `pmax` over devices.
An inf or NaN input gives a NaN scale, so the output (or the gradient) is NaN: it shows.

Operand roles: `lhs` is the activation and `rhs` the weight (this only matters for 'block').
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from mpxla import formats, parallel, quant
from mpxla.nn import flow, fp8_stats
from mpxla.quant.sharding import explicit_sharding, match_varying, varying_axes
from mpxla.quant.tracing import after, tag, zero_cotangent

DimensionNumbers = tuple[tuple[Sequence[int], Sequence[int]], tuple[Sequence[int], Sequence[int]]]
SCALINGS = ("tensor", "delayed", "block", "mx")


@dataclasses.dataclass(frozen=True)
class DotConfig:
  """How one matmul is quantized.

  Attributes:
    scaling: 'tensor' (just-in-time), 'delayed' (amax history), 'block' (1x128 / 128x128)
      or 'mx' (MXFP8: blocks of 32, E8M0 scales; `margin` and `block` do not apply).
    fwd_fmt: format of x and w in the forward pass (E4M3).
    bwd_fmt: format of the output gradient in the backward pass (E5M2).
    margin: headroom in powers of two (s = amax * 2^margin / fmt.max).
    history: length of the amax history ('delayed').
    block: group/tile size ('block').
    axis_name: mesh axes for a global per-tensor amax inside `shard_map`.
    gather_weight: per-tensor scaling under `jit` with a mesh (FSDP): the weight is cast to
      FP8 shard by shard (one global amax) and its codes are all-gathered as uint8, so the
      gather moves 1 byte per element (no backend can widen it), in the forward and again in
      the backward; the matmul consumes the gathered codes. Replicates the weight over the
      whole mesh: for FSDP/data parallelism, not with tensor parallelism.
  """

  scaling: str = "tensor"
  fwd_fmt: str = "e4m3"
  bwd_fmt: str = "e5m2"
  margin: float = 0.0
  history: int = 16
  block: int = 128
  axis_name: str | tuple[str, ...] | None = None
  gather_weight: bool = False

  def __post_init__(self):
    if self.scaling not in SCALINGS:
      raise ValueError(f"scaling={self.scaling!r}; use one of {SCALINGS}.")
    for name in ("fwd_fmt", "bwd_fmt"):
      fmt = formats.get_format(getattr(self, name))
      if not fmt.is_float8:
        raise ValueError(
            f"{name}={fmt.name!r}: FP8 matmuls need a float8 storage dtype (e4m3 or e5m2); "
            "HiF8 is for saved activations (Recipe.activations='hif8').")
    if self.history < 1 or self.block < 1:
      raise ValueError(f"history={self.history} and block={self.block} must be >= 1.")
    if self.axis_name is not None and self.scaling in ("block", "mx"):
      raise ValueError(f"axis_name applies to per-tensor scaling; {self.scaling!r} scales "
                       "are local.")
    if isinstance(self.axis_name, list):
      object.__setattr__(self, "axis_name", tuple(self.axis_name))


def init_delayed_state(config: DotConfig) -> dict[str, jax.Array]:
  """Zero amax histories of x ('lhs'), w ('rhs') and the output gradient ('grad')."""
  return {k: quant.init_amax_history(config.history) for k in ("lhs", "rhs", "grad")}


# Transposes of dot_general (as in JAX's own transpose rules), for the backward pass.


def _ranges_like(*xs):
  start = 0
  for x in xs:
    yield tuple(range(start, start + len(x)))
    start += len(x)


def _remaining(n, *removed):
  gone = {i for r in removed for i in r}
  return [i for i in range(n) if i not in gone]


def _out_sharding_like(like, dims):
  """dot_general's out_sharding for a cotangent of `like` whose axes come in `dims` order.

  On a mesh with Explicit axes JAX cannot infer it when sharded axes are contracted (dw of a
  batch-sharded x); it is `like`'s sharding. None elsewhere (sharding propagation decides).
  """
  s = jax.typeof(like).sharding
  mesh = getattr(s, "mesh", None)
  if mesh is None or AxisType.Explicit not in mesh.axis_types:
    return None
  spec = tuple(s.spec) + (None,) * (like.ndim - len(s.spec))
  return NamedSharding(mesh, P(*(spec[d] for d in dims)))


def _transpose_lhs(g, y, dn, x_ndim, swap_ans=False, like=None):
  """d lhs of dot_general(x, y, dn) given the output cotangent g (float32 result).

  `like`: an array with x's sharding (x or its FP8 codes), needed on Explicit meshes.
  """
  (x_contract, y_contract), (x_batch, y_batch) = dn
  x_kept = _remaining(x_ndim, x_contract, x_batch)
  y_kept = _remaining(y.ndim, y_contract, y_batch)
  if swap_ans:
    ans_batch, ans_y, _ = _ranges_like(x_batch, y_kept, x_kept)
  else:
    ans_batch, _, ans_y = _ranges_like(x_batch, x_kept, y_kept)
  dims = ((ans_y, tuple(y_kept)), (ans_batch, tuple(y_batch)))
  x_contract_sorted_by_y = list(np.take(x_contract, np.argsort(y_contract)).astype(int))
  order = list(x_batch) + x_kept + x_contract_sorted_by_y
  out = jax.lax.dot_general(g, y, dims, preferred_element_type=jnp.float32,
                            out_sharding=None if like is None else _out_sharding_like(like, order))
  return jax.lax.transpose(out, tuple(int(a) for a in np.argsort(order)))


def _transpose_rhs(g, x, dn, y_ndim, like=None):
  (x_contract, y_contract), (x_batch, y_batch) = dn
  swapped = ((y_contract, x_contract), (y_batch, x_batch))
  return _transpose_lhs(g, x, swapped, y_ndim, swap_ans=True, like=like)


# Per-tensor scaling ('tensor' and 'delayed').


@dataclasses.dataclass(frozen=True)
class _Spec:
  dn: tuple
  config: DotConfig
  out_dtype: Any
  lhs_dtype: Any
  rhs_dtype: Any


def _quantize_tensor(x, fmt, config: DotConfig, history=None):
  """(per-tensor QTensor of x, x's current amax). With an amax `history` (delayed scaling) the
  scale comes from its max, or from the current amax while the history is all zero; a
  non-finite current amax (inf or NaN in x) makes the scale NaN either way."""
  x = jax.lax.stop_gradient(x)
  current = quant.amax(x, "tensor", axis_name=config.axis_name)
  a = current
  if history is not None:
    past = quant.amax_from_history(history)
    a = jnp.where(jnp.isfinite(current), jnp.where(past > 0, past, current), jnp.nan)
  return quant.quantize_with_amax(x, fmt, "tensor", a, margin=config.margin), current


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _tensor_dot(spec: _Spec, lhs, rhs, lq, rq, state, amaxes, probe):
  return _tensor_dot_fwd(spec, lhs, rhs, lq, rq, state, amaxes, probe)[0]


def _history_amax(state, key):
  return None if state is None else quant.amax_from_history(state[key])


def _gathered(codes, config: DotConfig):
  """The weight's codes all-gathered over the mesh's 'fsdp' axis as uint8 inside `shard_map`
  (`gather_weight`), so the collective moves 1 byte per element on every backend.

  The shard layout is the codes' own on Explicit meshes, else the trainer's rule for
  parameters (`parallel.fsdp_spec`: the largest dimension divisible by the axis); codes laid
  out otherwise are first resharded to it by XLA (correct, one more collective).
  """
  mesh = jax.sharding.get_abstract_mesh()
  if (not config.gather_weight or mesh.empty or mesh.manual_axes
      or mesh.shape.get("fsdp", 1) == 1):
    return codes
  if explicit_sharding(codes):
    spec = jax.typeof(codes).sharding.spec
  else:
    spec = parallel.mesh.fsdp_spec(codes.shape, mesh.shape["fsdp"])
  entries = tuple(spec) + (None,) * (codes.ndim - len(tuple(spec)))
  if "fsdp" not in entries:
    return codes
  dim = entries.index("fsdp")

  def gather(u8):
    return jax.lax.all_gather(u8, "fsdp", axis=dim, tiled=True)

  u8 = jax.lax.bitcast_convert_type(codes, jnp.uint8)
  # The tiled all-gather is the same on every device (JAX types it as varying).
  out = jax.shard_map(gather, mesh=mesh, in_specs=P(*entries), out_specs=P(),
                      check_vma=False)(u8)
  return jax.lax.bitcast_convert_type(out, codes.dtype)


def _tensor_dot_fwd(spec, lhs, rhs, lq, rq, state, amaxes, probe):
  out = jax.lax.dot_general(lq.codes, _gathered(rq.codes, spec.config), spec.dn,
                            preferred_element_type=jnp.float32)
  out = (out * (lq.scales * rq.scales)).astype(spec.out_dtype)
  stats = None
  if probe is not None:  # fp8_stats: the input and weight rows, from this forward pass
    stats = [fp8_stats.tensor_stats(x, q.codes, q.scales, spec.config.fwd_fmt,
                                    quant.amax(x, "tensor"), _history_amax(state, key))
             for x, q, key in ((lhs, lq, "lhs"), (rhs, rq, "rhs"))]
  return out, (lq, rq, state, amaxes, stats)


def _codes_after(q, *deps):
  """q's codes, computed after `deps` (`tracing.after`), for the backward's FP8 dots.

  The saved codes depend on the gradient's scale, so they are not merged with the forward's
  float32 upcast of the same codes; and dx waits for dw, so dw is not left to the end of the
  backward pass with the codes of every layer alive until then (docs/xla_cpu.md).
  """
  return after(q.codes, *deps)


def _tensor_dot_bwd(spec, res, g):
  """dw = x8^T g8 first, then dx = g8 w8^T, on FP8 codes (see `_codes_after`)."""
  lq, rq, state, amaxes, stats = res
  c = spec.config
  g = after(g, rq.scales)  # read twice (amax, cast): materialized as it is, not widened
  gq, g_amax = _quantize_tensor(g, c.bwd_fmt, c, None if state is None else state["grad"])
  d_probe = None
  if stats is not None:  # the gradient of the fp8_stats probe is the statistics
    d_probe = jnp.stack([*stats, fp8_stats.tensor_stats(
        g, gq.codes, gq.scales, c.bwd_fmt, g_amax, _history_amax(state, "grad"))])
  gq = flow.stored(gq)
  drhs = _transpose_rhs(gq.codes, _codes_after(lq, gq.scales), spec.dn, rq.codes.ndim,
                        like=rq.codes) * (gq.scales * lq.scales)
  drhs = after(drhs.astype(spec.rhs_dtype), gq.scales)  # complete before dx starts
  dlhs = _transpose_lhs(_codes_after(gq, drhs), _gathered(_codes_after(rq, gq.scales), c),
                        spec.dn, lq.codes.ndim, like=lq.codes) * (gq.scales * rq.scales)
  if state is None:
    new_state = None
  else:  # Overwrite-with-gradient: the "gradient" of the histories is their next value.
    new_state = {
        "lhs": quant.update_amax_history(state["lhs"], amaxes[0]),
        "rhs": quant.update_amax_history(state["rhs"], amaxes[1]),
        "grad": quant.update_amax_history(state["grad"], g_amax),
    }
  return (dlhs.astype(spec.lhs_dtype), drhs, zero_cotangent(lq),
          zero_cotangent(rq), new_state, zero_cotangent(amaxes), d_probe)


_tensor_dot.defvjp(_tensor_dot_fwd, _tensor_dot_bwd)


# Blockwise scaling ('block'): canonical [B, M, K] x [B, K, N] form.


def _to_3d(x, batch, first, second):
  """Transposes x to batch + first + second axes and merges each group: [B, F, S]."""
  xt = jax.lax.transpose(x, tuple(batch) + tuple(first) + tuple(second))
  size = lambda axes: math.prod(x.shape[a] for a in axes)  # noqa: E731
  return xt.reshape(size(batch), size(first), size(second))


def _grouped_dot(a, sa, b, sb, group: int):
  """sum_k a[B,M,K] b[B,K,N] with per-K-group scales sa [B,M,nK], sb [B,nK,N] -> float32 [B,M,N].

  One FP8 dot per K-group (a `lax.scan`), each scaled by sa x sb and accumulated in float32.
  """
  B, M, K = a.shape
  N = b.shape[2]
  nk = math.ceil(K / group)
  if nk * group != K:
    a = jax.lax.pad(a, jnp.zeros((), a.dtype), [(0, 0, 0), (0, 0, 0), (0, nk * group - K, 0)])
    b = jax.lax.pad(b, jnp.zeros((), b.dtype), [(0, 0, 0), (0, nk * group - K, 0), (0, 0, 0)])
  a_k = jnp.moveaxis(a.reshape(B, M, nk, group), 2, 0)  # [nK, B, M, G]
  b_k = jnp.moveaxis(b.reshape(B, nk, group, N), 1, 0)  # [nK, B, G, N]
  sa_k = jnp.moveaxis(sa, 2, 0)  # [nK, B, M]
  sb_k = jnp.moveaxis(sb, 1, 0)  # [nK, B, N]
  dims = (((2,), (1,)), ((0,), (0,)))

  def step(acc, xs):
    ak, bk, sak, sbk = xs
    part = jax.lax.dot_general(ak, bk, dims, preferred_element_type=jnp.float32)
    return acc + part * sak[:, :, None] * sbk[:, None, :], None

  acc, _ = jax.lax.scan(step, jnp.zeros((B, M, N), jnp.float32), (a_k, b_k, sa_k, sb_k))
  return acc


def _repeat_to(s, axis, size, block):
  """Expands per-block scales along `axis` to one scale per element (`size` of them)."""
  s = jnp.repeat(s, block, axis=axis)
  return jax.lax.slice_in_dim(s, 0, size, axis=axis)


@dataclasses.dataclass(frozen=True)
class _BlockSpec:
  config: DotConfig
  out_dtype: Any
  lhs_dtype: Any
  rhs_dtype: Any


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _block_dot(spec: _BlockSpec, lhs3, rhs3, lq, rq):
  return _block_dot_fwd(spec, lhs3, rhs3, lq, rq)[0]


def _block_dot_fwd(spec, lhs3, rhs3, lq, rq):
  bs = spec.config.block
  n = rhs3.shape[2]
  out = _grouped_dot(lq.codes, lq.scales, rq.codes, _repeat_to(rq.scales, 2, n, bs), bs)
  return out.astype(spec.out_dtype), (lq, rq)


def _block_dot_bwd(spec, res, g3):
  """dw first, then dx (as `_tensor_dot_bwd`, see `_codes_after`)."""
  lq, rq = res
  c, bs = spec.config, spec.config.block
  K = lq.codes.shape[2]
  g3 = after(g3, rq.scales)  # read three times: materialized as it is, not widened
  # dw = x^T . g: both in bs x 1 groups along the tokens M (x requantized from its codes).
  gq_m = quant.quantize(g3, c.bwd_fmt, quant.PerGroup(bs, axis=1))  # scales [B, nM, N]
  lq = dataclasses.replace(lq, codes=_codes_after(lq, gq_m.scales))
  x_hat = quant.dequantize(lq, jnp.float32)
  xq = quant.quantize(x_hat, c.fwd_fmt, quant.PerGroup(bs, axis=1))  # scales [B, nM, K]
  drhs = _grouped_dot(jnp.swapaxes(xq.codes, 1, 2), jnp.swapaxes(xq.scales, 1, 2),
                      gq_m.codes, gq_m.scales, bs)
  drhs = after(drhs.astype(spec.rhs_dtype), gq_m.scales)
  # dx = g . w^T: g in 1 x bs groups along N; w's bs x bs tiles serve transposed.
  gq = flow.stored(quant.quantize(g3, c.bwd_fmt, quant.PerGroup(bs, axis=-1)))
  gq = dataclasses.replace(gq, codes=_codes_after(gq, drhs))
  rq = dataclasses.replace(rq, codes=_codes_after(rq, gq.scales))
  w_t = jnp.swapaxes(rq.codes, 1, 2)  # [B, N, K]
  sw_t = _repeat_to(jnp.swapaxes(rq.scales, 1, 2), 2, K, bs)  # [B, nN, K]
  dlhs = _grouped_dot(gq.codes, gq.scales, w_t, sw_t, bs)
  return (dlhs.astype(spec.lhs_dtype), drhs, zero_cotangent(lq),
          zero_cotangent(rq))


_block_dot.defvjp(_block_dot_fwd, _block_dot_bwd)


def _block_dot_general(lhs, rhs, dn, config: DotConfig, out_dtype):
  """'block' and 'mx' scaling, on the [B, M, K] x [B, K, N] form."""
  (lc, rc), (lb, rb) = dn
  l_free, r_free = _remaining(lhs.ndim, lb, lc), _remaining(rhs.ndim, rb, rc)
  lhs3 = _to_3d(lhs, lb, l_free, lc)  # [B, M, K]
  rhs3 = _to_3d(rhs, rb, rc, r_free)  # [B, K, N]
  x, w, bs = jax.lax.stop_gradient(lhs3), jax.lax.stop_gradient(rhs3), config.block
  if config.scaling == "mx":
    lq, rq = quant.quantize_mx(x, config.fwd_fmt, 2), quant.quantize_mx(w, config.fwd_fmt, 1)
  else:
    lq = quant.quantize(x, config.fwd_fmt, quant.PerGroup(bs))
    rq = quant.quantize(w, config.fwd_fmt, quant.PerBlock((bs, bs)))
  lq, rq = flow.residual(lq), flow.residual(rq)
  spec = _BlockSpec(config, np.dtype(out_dtype), np.dtype(lhs.dtype), np.dtype(rhs.dtype))
  lhs3, rhs3 = match_varying(lhs3, rhs3)
  dot = _mx_dot if config.scaling == "mx" else _block_dot
  out3 = dot(spec, lhs3, rhs3, lq, rq)
  # dot_general's output order: batch, lhs free, rhs free.
  return out3.reshape([lhs.shape[i] for i in (*lb, *l_free)] + [rhs.shape[i] for i in r_free])


# MX scaling ('mx'): canonical [B, M, K] x [B, K, N] form, blocks of 32 along the contraction.


def _mx_matmul(a, a_axis, b, b_axis, dims, fmts):
  """dot_general of a and b, each MX-quantized along its contracted axis, in float32."""
  aq = quant.dequantize(quant.quantize_mx(a, fmts[0], axis=a_axis), jnp.float32)
  bq = quant.dequantize(quant.quantize_mx(b, fmts[1], axis=b_axis), jnp.float32)
  return jax.lax.dot_general(aq, bq, dims, preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _mx_dot(spec: _BlockSpec, lhs3, rhs3, lq, rq):
  return _mx_dot_fwd(spec, lhs3, rhs3, lq, rq)[0]


def _mx_dot_fwd(spec, lhs3, rhs3, lq, rq):
  out = jax.lax.dot_general(quant.dequantize(lq, jnp.float32), quant.dequantize(rq, jnp.float32),
                            (((2,), (1,)), ((0,), (0,))), preferred_element_type=jnp.float32)
  return out.astype(spec.out_dtype), (lq, rq)


def _mx_dot_bwd(spec, res, g3):
  """dw = x^T g over the tokens M, dx = g w^T over N; each operand in blocks along its
  contraction (x and w from their saved codes)."""
  lq, rq = res
  c = spec.config
  g3 = g3.astype(jnp.float32)
  x_hat, w_hat = quant.dequantize(lq, jnp.float32), quant.dequantize(rq, jnp.float32)
  drhs = _mx_matmul(x_hat, 1, g3, 1, (((1,), (1,)), ((0,), (0,))), (c.fwd_fmt, c.bwd_fmt))
  dlhs = _mx_matmul(g3, 2, w_hat, 2, (((2,), (2,)), ((0,), (0,))), (c.bwd_fmt, c.fwd_fmt))
  return (dlhs.astype(spec.lhs_dtype), drhs.astype(spec.rhs_dtype), zero_cotangent(lq),
          zero_cotangent(rq))


_mx_dot.defvjp(_mx_dot_fwd, _mx_dot_bwd)


def fp8_dot_general(
    lhs: jax.Array,
    rhs: jax.Array,
    dimension_numbers: DimensionNumbers,
    precision: Any = None,
    preferred_element_type: Any = None,
    out_sharding: Any = None,
    *,
    config: DotConfig = DotConfig(),
    state: dict[str, jax.Array] | None = None,
    stats_probe: jax.Array | None = None,
) -> jax.Array:
  """`jax.lax.dot_general` on FP8 codes with a custom VJP (see the module docstring).

  Args:
    lhs: activation (any float dtype); rhs: weight.
    dimension_numbers: as in `jax.lax.dot_general`.
    precision: ignored (the operands are FP8); accepted for drop-in use.
    preferred_element_type: output dtype (default: the promoted dtype of lhs and rhs).
    out_sharding: accepted for drop-in use (Flax passes None); the result follows jit's
      sharding propagation.
    config: the `DotConfig`.
    state: 'delayed' only: `{'lhs', 'rhs', 'grad'}` amax histories; the gradient with
      respect to `state` is the updated state.
    stats_probe: per-tensor scaling only: a zero float32 [3, 5] array whose gradient is the
      statistics of the input, weight and output gradient (`mpxla.nn.fp8_stats`).
  """
  del precision, out_sharding
  lhs, rhs = jnp.asarray(lhs), jnp.asarray(rhs)
  for name, a in (("lhs", lhs), ("rhs", rhs)):
    if not jnp.issubdtype(a.dtype, jnp.floating):
      raise TypeError(f"fp8_dot_general needs floating {name}, got {a.dtype}.")
  out_dtype = jnp.result_type(lhs, rhs) if preferred_element_type is None else (
      preferred_element_type)
  (lc, rc), (lb, rb) = dimension_numbers
  dn = ((tuple(int(i) for i in lc), tuple(int(i) for i in rc)),
        (tuple(int(i) for i in lb), tuple(int(i) for i in rb)))
  if config.scaling in ("block", "mx"):
    if stats_probe is not None:
      raise ValueError(f"stats_probe is for per-tensor scaling, not {config.scaling!r}.")
    if state is not None:
      raise ValueError(f"state= is for scaling='delayed'; {config.scaling!r} scaling keeps "
                       "no state.")
    return _block_dot_general(lhs, rhs, dn, config, out_dtype)
  if config.scaling == "delayed":
    if state is None:
      raise ValueError(
          "scaling='delayed' needs state=init_delayed_state(config) (amax histories); the "
          "gradient with respect to state is its next value (see mpxla.nn.delayed).")
    state = {k: jnp.asarray(state[k], jnp.float32) for k in ("lhs", "rhs", "grad")}
    lq, lhs_amax = _quantize_tensor(lhs, config.fwd_fmt, config, state["lhs"])
    rq, rhs_amax = _quantize_tensor(rhs, config.fwd_fmt, config, state["rhs"])
    lq, rq, amaxes = flow.residual(lq), flow.residual(rq), tag((lhs_amax, rhs_amax))
  else:
    if state is not None:
      raise ValueError("state= is for scaling='delayed'; 'tensor' scaling keeps no state.")
    amaxes = None
    lq = flow.quantize_once(lhs, config.fwd_fmt, "tensor", margin=config.margin,
                            axis_name=config.axis_name)
    rq = flow.quantize_once(rhs, config.fwd_fmt, "tensor", margin=config.margin,
                            axis_name=config.axis_name)
  spec = _Spec(dn, config, np.dtype(out_dtype), np.dtype(lhs.dtype), np.dtype(rhs.dtype))
  lhs, rhs = match_varying(lhs, rhs)
  if state is not None and varying_axes(lhs) - varying_axes(state["lhs"]) and (
      config.axis_name is None):
    raise ValueError(
        "scaling='delayed' inside shard_map needs DotConfig(axis_name=...) so that every "
        "device computes the same global amaxes (the state is the same on every device).")
  return _tensor_dot(spec, lhs, rhs, lq, rq, state, amaxes, stats_probe)


def einsum_dimension_numbers(subscripts: str, lhs_ndim: int, rhs_ndim: int):
  """(dimension_numbers, output permutation) of a two-operand einsum as one dot_general.

  Supports explicit outputs ('...->...'), ellipses, batch, contracted and free indices; an
  index that appears in one operand only and not in the output (a plain sum) is refused.
  """
  spec = subscripts.replace(" ", "")
  if "->" not in spec or spec.count(",") != 1:
    raise ValueError(f"einsum {subscripts!r}: need exactly two operands and an explicit '->'.")
  ins, out = spec.split("->")
  lhs_s, rhs_s = ins.split(",")
  used = set(spec) - set(".,->")
  free_letters = iter(c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
                      if c not in used)
  n_ell = {}
  for s, nd in ((lhs_s, lhs_ndim), (rhs_s, rhs_ndim)):
    if "..." in s:
      n_ell[s] = nd - len(s.replace("...", ""))
  width = max(n_ell.values(), default=0)
  ell = "".join(next(free_letters) for _ in range(width))
  expand = lambda s: s.replace("...", ell[width - n_ell.get(s, 0):])  # noqa: E731
  lhs_s, rhs_s, out = expand(lhs_s), expand(rhs_s), out.replace("...", ell)
  if len(lhs_s) != lhs_ndim or len(rhs_s) != rhs_ndim:
    raise ValueError(f"einsum {subscripts!r} does not match operands of rank {lhs_ndim}, {rhs_ndim}.")
  for s in (lhs_s, rhs_s, out):
    if len(set(s)) != len(s):
      raise ValueError(f"einsum {subscripts!r}: repeated indices within an operand are not supported.")
  for c in lhs_s + rhs_s:
    if c not in out and not (c in lhs_s and c in rhs_s):
      raise ValueError(f"einsum {subscripts!r}: index {c!r} is summed within one operand; "
                       "sum it before the FP8 einsum.")
  contract = [c for c in lhs_s if c in rhs_s and c not in out]
  batch = [c for c in out if c in lhs_s and c in rhs_s]
  dn = ((tuple(lhs_s.index(c) for c in contract), tuple(rhs_s.index(c) for c in contract)),
        (tuple(lhs_s.index(c) for c in batch), tuple(rhs_s.index(c) for c in batch)))
  names = batch + [c for c in lhs_s if c not in contract and c not in batch] + [
      c for c in rhs_s if c not in contract and c not in batch]
  return dn, tuple(names.index(c) for c in out)


def fp8_einsum(subscripts: str, lhs: jax.Array, rhs: jax.Array, *, precision: Any = None,
               preferred_element_type: Any = None, out_sharding: Any = None,
               config: DotConfig = DotConfig(),
               state: dict[str, jax.Array] | None = None,
               stats_probe: jax.Array | None = None) -> jax.Array:
  """Two-operand einsum as one `fp8_dot_general` (lhs: activation, rhs: weight)."""
  lhs, rhs = jnp.asarray(lhs), jnp.asarray(rhs)
  dn, perm = einsum_dimension_numbers(subscripts, lhs.ndim, rhs.ndim)
  out = fp8_dot_general(lhs, rhs, dn, precision, preferred_element_type, out_sharding,
                        config=config, state=state, stats_probe=stats_probe)
  return out if perm == tuple(range(out.ndim)) else jax.lax.transpose(out, perm)
