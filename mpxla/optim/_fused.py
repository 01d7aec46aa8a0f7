"""Fused Pallas kernel for `adamw_fp8`'s update: decode, AdamW, re-encode in one pass.

The XLA path (`compress_states(optax.adamw(...))`) decodes each FP8 moment in three fusions
(the group reduction, the encoder, the update) because XLA will not keep a decoded tile
between them. This kernel works on tiles of whole groups, (block_rows, 128) elements of a
leaf viewed as (rows, last axis): it decodes m and v once, applies optax.adamw's arithmetic
op for op (`_adamw_math`: scale_by_adam, add_decayed_weights, scale_by_learning_rate, with
the bias corrections, weight decay and step size computed outside exactly as Optax does),
reduces each group of the new moments, re-encodes them with the same codec
(`expansion.encode_in_range`, nearest or stochastic rounding with the same counter bits) and
writes the parameter update. Codes and metadata are updated in place (aliased).

In interpret mode on CPU the result is bit-identical to the XLA path: codes, k16, amax, step,
count and updates (tests/optim/test_optim_fused.py).

Where it is used (`adamw_fp8(impl=...)`): 'auto' takes it on GPU ('pallas_gpu', Triton) and
TPU ('pallas_tpu', Mosaic) and the XLA path elsewhere, and also the XLA path when the base
config is not E4M3 + expansion with groups of 128. A weight-decay `mask` (as optax.adamw's)
selects, per leaf, whether the kernel adds the decay. Within the fused
update, a leaf goes through the kernel when both its moments are compressed with exactly
that codec (E4M3, expansion, group 128, float32 originals), its gradient is float32 and its
parameter float32 or bfloat16 (float32 when the weight decay is an array or schedule); the
other leaves (small uncompressed leaves, last axes under 128, overridden settings) get the
same arithmetic in XLA, leaf by leaf, bit-identical to the XLA path too.

Under a mesh that splits the state (a context mesh with an axis other than 'data' of size > 1,
FSDP for instance, or Explicit shardings on the leaf) every leaf takes the XLA path: a Pallas
kernel is one custom call that XLA's SPMD partitioner cannot split, so it would gather each
leaf whole onto every device; the XLA path updates each device's shard. Inside `shard_map`
the kernel runs on the device's own leaves.

Layouts. GPU: grid (row blocks, groups), tiles (block_rows, 128), metadata blocks
(block_rows, 1). TPU: the same grid with the metadata as full-width (block_rows, groups)
blocks revisited along the group axis ('arbitrary'), since Mosaic needs the last block dim
to be a multiple of 128 or the whole axis; column j is read and written by a lane select.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mpxla.formats import _random, get_format
from mpxla.optim import expansion as ex
from mpxla.optim.compress import (
    CompressedArray,
    LeafConfig,
    _check_plain_leaves,
    compress_states,
    decode_leaf,
    encode_leaf,
    is_compressed,
    make_config,
)
from mpxla.quant.sharding import explicit_sharding, input_mesh

GROUP = 128
_FMT = "e4m3"
LAYOUTS = ("gpu", "tpu")
_BLOCK_ROWS = {"gpu": 32, "tpu": 256}
_N_SCALARS = 16  # A power of two (Triton block).


def kernel_config(cfg: LeafConfig) -> bool:
  """Whether leaves stored with `cfg` use the kernel's codec (E4M3, expansion, groups of 128)."""
  return get_format(cfg.fmt).name == _FMT and cfg.expansion and cfg.group_size == GROUP


# ---------------------------------------------------------------------------------------------
# Hyperparameters: Python numbers stay constants (as in Optax); arrays go to a float32 vector.


class _Hyper(NamedTuple):
  """optax.adamw's per-step scalars; each a Python number (constant) or an index into `scal`."""

  c1: Any  # 1 - b1
  b1: Any
  c2: Any  # 1 - b2
  b2: Any
  bc1: Any  # 1 - b1 ** count, float32 (its reciprocal with `reciprocal`)
  bc2: Any
  eps: Any
  eps_root: Any
  wd: Any  # None: add_decayed_weights skips (a Python zero)
  lr: Any  # the step size: -learning_rate
  reciprocal: bool = False  # the form XLA gives a one-leaf tree (see `_adamw_math`)
  opaque: bool = False  # interpret mode: hide the scalar divisor from XLA (see `_adamw_math`)


def _is_static(x) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool)


def _pack(values: dict) -> tuple[_Hyper, jax.Array | None, tuple]:
  """(hyper with array entries replaced by ('dyn', i), float32 vector of them, their dtypes)."""
  dyn, out = [], {}
  for name, v in values.items():
    if v is None or _is_static(v):
      out[name] = v
    else:
      out[name] = ("dyn", len(dyn))
      dyn.append(jnp.asarray(v))
  dtypes = tuple(d.dtype for d in dyn)
  vec = None
  if dyn:
    vec = jnp.stack([d.astype(jnp.float32).reshape(()) for d in dyn])
    vec = jnp.pad(vec, (0, _N_SCALARS - vec.shape[0]))
  return _Hyper(**out), vec, dtypes


def _resolve(hp: _Hyper, scal_ref) -> _Hyper:
  return _Hyper(*(scal_ref[v[1]] if isinstance(v, tuple) else v for v in hp[:-2]),
                *hp[-2:])


def _bias_correction(decay, count, reciprocal):
  """1 - decay ** count in float32 as optax.tree_utils.tree_bias_correction computes it (or
  its reciprocal, see `_adamw_math`)."""
  bc = _bc_jit(decay, count).astype(jnp.float32)
  return 1 / bc if reciprocal else bc


@functools.partial(jax.jit, inline=True)
def _bc_jit(decay, count):
  return 1 - decay**count


def _adamw_math(g, p, m, v, hp: _Hyper):
  """optax.adamw's update of one leaf, op for op: (update, new m, new v)."""
  mu = hp.c1 * (g**1) + hp.b1 * m  # optax.tree.update_moment(order=1)
  nu = hp.c2 * (g**2) + hp.b2 * v  # optax.tree.update_moment_per_elem_norm(order=2)
  # Optax writes (mu / bc1) / (sqrt(nu / bc2 + eps_root) + eps); XLA:CPU's algebraic
  # simplifier rewrites it before it runs, to mu / (bc1 * (...)) when the bias correction is
  # shared by several leaves and to (mu * (1 / bc1)) / (sqrt(nu * (1 / bc2) + ...) + ...)
  # for a one-leaf tree. The kernel writes out the form the XLA path compiles to.
  if hp.reciprocal:
    u = (mu * hp.bc1) / (jnp.sqrt(nu * hp.bc2 + hp.eps_root) + hp.eps)
  else:
    bc2 = hp.bc2
    if hp.opaque:
      # In interpret mode the kernel body is XLA too, and its simplifier would turn this one
      # division by a broadcast scalar (used once per tile) into a multiplication by the
      # reciprocal, which the XLA path (the scalar shared by every leaf) does not do.
      bc2 = jax.lax.optimization_barrier(jnp.full(nu.shape, bc2, nu.dtype))
    u = mu / (hp.bc1 * (jnp.sqrt(nu / bc2 + hp.eps_root) + hp.eps))
  if hp.wd is not None:
    u = u + hp.wd * p  # add_decayed_weights
  return hp.lr * u, mu, nu  # scale_by_learning_rate


# ---------------------------------------------------------------------------------------------
# The kernel.


class _Spec(NamedTuple):
  hp: _Hyper
  n: int  # the leaf's last axis
  n_pad: int
  block_rows: int
  stochastic_m: bool
  stochastic_v: bool
  layout: str


def _group_range(x):
  """(amax, amin) of each row of a (rows, 128) tile, as `ex.group_range` (max/min are exact)."""
  ax = jnp.abs(x)
  nz = jnp.where(ax > 0, ax, np.float32(np.finfo(np.float32).max))
  return jnp.max(ax, axis=-1, keepdims=True), jnp.min(nz, axis=-1, keepdims=True)


def _decode(enc: ex.Encoded):
  """`ex.decode` of a tile, with sign(q) as selects (Mosaic's sign lowering needs a TPU).

  Codes are finite, so the selects equal jnp.sign (+-0 stay +-0) and the values are the same.
  """
  fmt = get_format(_FMT)
  params = ex._decode_params(enc.k16, enc.amax, fmt)  # pylint: disable=protected-access
  q = ex._from_codes(enc.codes, fmt)  # pylint: disable=protected-access
  mag = ex._magnitude(jnp.abs(q), enc.amax, params, fmt)  # pylint: disable=protected-access
  sign = jnp.where(q > 0, 1.0, jnp.where(q < 0, -1.0, q))
  return mag * sign


def _tile(spec: _Spec, hp: _Hyper, seeds, g, p, m_enc, v_enc):
  """One (rows, 128) tile: (update, (codes, k16, amax) of m, the same of v)."""
  i, j = pl_program_ids()
  shape = g.shape
  col = j * GROUP + jax.lax.broadcasted_iota(jnp.int32, shape, 1)
  row = i * spec.block_rows + jax.lax.broadcasted_iota(jnp.int32, shape, 0)
  m = _decode(m_enc)
  v = _decode(v_enc)
  u, mu, nu = _adamw_math(g, p, m, v, hp)
  valid = col < spec.n  # The padded tail of the last axis encodes zeros.
  index = row.astype(jnp.uint32) * np.uint32(spec.n_pad) + col.astype(jnp.uint32)
  outs = []
  for x, stochastic, seed in ((mu, spec.stochastic_m, seeds[0]), (nu, spec.stochastic_v,
                                                                   seeds[1])):
    x = jnp.where(valid, x, 0.0)
    bits = _random.hash32(index * np.uint32(0x9E3779B9) + seed) if stochastic else None
    amax, amin = _group_range(x)
    enc = ex.encode_in_range(x, amax, amin, _FMT, bits=bits)
    outs.append((jax.lax.bitcast_convert_type(enc.codes, jnp.uint8), enc.k16, enc.amax))
  return u, outs[0], outs[1]


def pl_program_ids():
  from jax.experimental import pallas as pl  # pylint: disable=import-outside-toplevel
  return pl.program_id(0), pl.program_id(1)


def _seeds(seed_ref):
  return tuple(jax.lax.bitcast_convert_type(seed_ref[k], jnp.uint32) for k in range(2))


def _kernel_gpu(scal_ref, seed_ref, g_ref, p_ref, mc, mk, ma, vc, vk, va,
                u_ref, mc_o, mk_o, ma_o, vc_o, vk_o, va_o, *, spec: _Spec):
  hp = _resolve(spec.hp, scal_ref)
  m_enc = ex.Encoded(mc[...], mk[...], ma[...])
  v_enc = ex.Encoded(vc[...], vk[...], va[...])
  u, m_out, v_out = _tile(spec, hp, _seeds(seed_ref), g_ref[...], p_ref[...], m_enc, v_enc)
  u_ref[...] = u.astype(u_ref.dtype)
  for refs, vals in (((mc_o, mk_o, ma_o), m_out), ((vc_o, vk_o, va_o), v_out)):
    for r, x in zip(refs, vals, strict=True):
      r[...] = x


def _column(ref, lane):
  """Column `lane` of a (rows, groups) metadata block, (rows, 1), by an exact select-and-sum."""
  x = ref[...]
  wide = jnp.float32 if x.dtype == jnp.float32 else jnp.int32
  col = jnp.sum(jnp.where(lane, x.astype(wide), 0), axis=1, keepdims=True)
  return col.astype(x.dtype)


def _kernel_tpu(scal_ref, seed_ref, g_ref, p_ref, mc, mk, ma, vc, vk, va,
                u_ref, mc_o, mk_o, ma_o, vc_o, vk_o, va_o, *, spec: _Spec):
  hp = _resolve(spec.hp, scal_ref)
  _, j = pl_program_ids()
  lane = jax.lax.broadcasted_iota(jnp.int32, mk.shape, 1) == j
  m_enc = ex.Encoded(mc[...], _column(mk, lane), _column(ma, lane))
  v_enc = ex.Encoded(vc[...], _column(vk, lane), _column(va, lane))
  u, m_out, v_out = _tile(spec, hp, _seeds(seed_ref), g_ref[...], p_ref[...], m_enc, v_enc)
  u_ref[...] = u.astype(u_ref.dtype)
  for (c_o, k_o, a_o), (codes, k16, amax) in (((mc_o, mk_o, ma_o), m_out),
                                              ((vc_o, vk_o, va_o), v_out)):
    c_o[...] = codes
    # The metadata blocks stay resident along j (same block index): fill column j.
    k_o[...] = jnp.where(lane, k16, k_o[...])
    a_o[...] = jnp.where(lane, amax, a_o[...])


def _pallas_update(g2, p2, m: tuple, v: tuple, scal, seeds, spec: _Spec, u_dtype, interpret):
  """pallas_call over a leaf viewed as (rows, n): returns (u, m's (codes, k16, amax), v's)."""
  from jax.experimental import pallas as pl  # pylint: disable=import-outside-toplevel

  rows, n = g2.shape
  ng = spec.n_pad // GROUP
  br = spec.block_rows
  grid = (pl.cdiv(rows, br), ng)
  tile = pl.BlockSpec((br, GROUP), lambda i, j: (i, j))
  if spec.layout == "gpu":
    meta = pl.BlockSpec((br, 1), lambda i, j: (i, j))
    scalar_specs = [pl.BlockSpec((_N_SCALARS,), lambda i, j: (0,))] * 2
    kernel, params = _kernel_gpu, None
    if not interpret:
      from jax.experimental.pallas import triton as pltriton  # pylint: disable=import-outside-toplevel
      params = pltriton.CompilerParams(num_warps=4, num_stages=1)
  else:
    from jax.experimental.pallas import tpu as pltpu  # pylint: disable=import-outside-toplevel
    meta = pl.BlockSpec((br, ng), lambda i, j: (i, 0))
    scalar_specs = [pl.BlockSpec(memory_space=pltpu.SMEM)] * 2
    kernel = _kernel_tpu
    params = None if interpret else pltpu.CompilerParams(
        dimension_semantics=("parallel", "arbitrary"))
  in_specs = scalar_specs + [tile, tile] + [tile, meta, meta] * 2
  out_specs = [tile] + [tile, meta, meta] * 2
  out_shape = [jax.ShapeDtypeStruct((rows, n), u_dtype)] + [
      jax.ShapeDtypeStruct(a.shape, a.dtype) for a in (*m, *v)]
  # Codes and metadata are updated in place (inputs 4..9 -> outputs 1..6).
  aliases = {4 + k: 1 + k for k in range(6)}
  outs = pl.pallas_call(
      functools.partial(kernel, spec=spec), grid=grid, in_specs=in_specs, out_specs=out_specs,
      out_shape=out_shape, input_output_aliases=aliases, interpret=interpret,
      compiler_params=params, name="mpxla_adamw_fp8_update",
  )(scal, seeds, g2, p2, *m, *v)
  return outs[0], tuple(outs[1:4]), tuple(outs[4:7])


# ---------------------------------------------------------------------------------------------
# Per leaf.


def _whole_on_each_device(x) -> bool:
  """Whether `x` is not split across devices: no mesh axis in its type (Explicit sharding),
  and no axis of size > 1 besides 'data' (data parallelism replicates the state) in the
  context mesh, else the mesh in x's type, unless Manual (inside `shard_map` every leaf is a
  device's own)."""
  if explicit_sharding(x):
    return False
  with input_mesh(x):
    mesh = jax.sharding.get_abstract_mesh()
  return mesh.empty or all(size == 1 or name == "data" or name in mesh.manual_axes
                           for name, size in mesh.shape.items())


def _kernel_leaf(g, p, mu, nu, hp: _Hyper, dyn_dtypes) -> bool:
  """Whether this leaf goes through the kernel (see the module docstring)."""
  if not (is_compressed(mu) and is_compressed(nu) and p is not None):
    return False
  if not (_whole_on_each_device(g) and _whole_on_each_device(p)):
    return False  # A kernel is one custom call: XLA would gather a split leaf whole.
  for c in (mu, nu):
    if not (kernel_config(c.config) and c.dtype == np.float32 and c.k16 is not None
            and c.shape == tuple(g.shape) and len(c.shape) >= 1
            and c.codes.shape == (*c.shape[:-1], -(-c.shape[-1] // GROUP) * GROUP)):
      return False
  if g.dtype != jnp.float32 or tuple(p.shape) != tuple(g.shape):
    return False
  if any(d != jnp.float32 for d in dyn_dtypes):
    return False
  if p.dtype == jnp.bfloat16:
    return hp.wd is None or _is_static(hp.wd)
  return p.dtype == jnp.float32


def _seed(c: CompressedArray, salt: int):
  """counter_bits' seed for the leaf's next step (as `compress._recompress_like` draws it)."""
  step = c.step + 1
  return _random.hash32(_random.hash32(jnp.uint32(salt)) ^ step.astype(jnp.uint32))


def _fused_leaf(g, p, mu, nu, hp, scal, salts, layout, interpret, block_rows):
  shape = tuple(g.shape)
  n = shape[-1]
  rows = math.prod(shape[:-1])
  n_pad = mu.codes.shape[-1]
  ng = n_pad // GROUP
  stoch = (mu.step is not None, nu.step is not None)
  zero = jnp.zeros((), jnp.uint32)
  seeds = [(_seed(c, s) if c.step is not None else zero) for c, s in zip((mu, nu), salts, strict=True)]
  seeds = jnp.pad(jax.lax.bitcast_convert_type(jnp.stack(seeds), jnp.int32),
                  (0, _N_SCALARS - 2))
  if scal is None:
    scal = jnp.zeros((_N_SCALARS,), jnp.float32)

  def parts(c):
    return (jax.lax.bitcast_convert_type(c.codes, jnp.uint8).reshape(rows, n_pad),
            c.k16.reshape(rows, ng), c.amax.reshape(rows, ng))

  u_dtype = jax.eval_shape(lambda a, b: _adamw_math(a, b, a, a, _static_probe(hp))[0],
                           g, p).dtype
  spec = _Spec(hp, n, n_pad, block_rows or _BLOCK_ROWS[layout], *stoch, layout)
  u, m_new, v_new = _pallas_update(g.reshape(rows, n), p.reshape(rows, n), parts(mu), parts(nu),
                                   scal, seeds, spec, u_dtype, interpret)

  def rebuild(c, new):
    codes, k16, amax = new
    lead = shape[:-1]
    return CompressedArray(
        codes=jax.lax.bitcast_convert_type(codes, c.codes.dtype).reshape(*lead, n_pad),
        k16=k16.reshape(*lead, ng), amax=amax.reshape(*lead, ng),
        step=None if c.step is None else c.step + 1, shape=c.shape, dtype=c.dtype, fmt=c.fmt,
        group_size=c.group_size, expansion=c.expansion)

  return u.reshape(shape), rebuild(mu, m_new), rebuild(nu, v_new)


def _static_probe(hp: _Hyper) -> _Hyper:
  """hp with each array entry replaced by a float32 scalar (for eval_shape of the update)."""
  return _Hyper(*(jnp.float32(0) if isinstance(v, tuple) else v for v in hp[:-2]),
                *hp[-2:])


def _xla_leaf(g, p, mu, nu, hp_values: _Hyper, salts):
  """The same leaf through XLA: decode, `_adamw_math`, encode (compress_states' own steps)."""
  m = decode_leaf(mu) if is_compressed(mu) else mu
  v = decode_leaf(nu) if is_compressed(nu) else nu
  u, m2, v2 = _adamw_math(g, p, m, v, hp_values)
  if not is_compressed(nu):
    v2 = v2.astype(nu.dtype)  # optax.tree.cast_like(nu, state.nu)

  def back(o, x, salt):
    if not is_compressed(o):
      return x
    step = None if o.step is None else o.step + 1
    return encode_leaf(x.astype(o.dtype), o.config, step=step, salt=salt)

  return u, back(mu, m2, salts[0]), back(nu, v2, salts[1])


# ---------------------------------------------------------------------------------------------
# The transform.


def fused_adamw_fp8(
    learning_rate, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-4, *,
    mask=None, config=None, overrides=None, layout: str = "gpu", interpret: bool = False,
    block_rows: int | None = None,
) -> optax.GradientTransformationExtraArgs:
  """adamw_fp8 with the fused kernel; same state and results as the XLA path."""
  if layout not in LAYOUTS:
    raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
  inner = optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                      mask=mask)
  xla = compress_states(inner, config, overrides=overrides)
  base = make_config(config)

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args  # optax.adamw takes none.
    if not _looks_like_adamw(updates, state, params):
      return xla.update(updates, state, params)  # Its checks and messages.
    _check_plain_leaves(state, base, overrides)
    adam, wd_state, lr_state = state
    count_inc = optax.safe_increment(adam.count)
    if callable(weight_decay):
      # optax.masked keeps add_decayed_weights' own state under `inner_state`.
      wd_inner = wd_state.inner_state if mask is not None else wd_state
      wd = weight_decay(wd_inner.count)
      wd_inner = wd_inner._replace(count=optax.safe_increment(wd_inner.count))
      wd_state = wd_state._replace(inner_state=wd_inner) if mask is not None else wd_inner
    else:
      wd = None if _is_static(weight_decay) and weight_decay == 0.0 else weight_decay
    if callable(learning_rate):
      lr = jnp.asarray(-1 * learning_rate(lr_state.count), jnp.float32)
      lr_state = lr_state._replace(count=optax.safe_increment(lr_state.count))
    else:
      lr = -1 * learning_rate
    reciprocal = len(jax.tree.leaves(updates)) == 1
    values = dict(c1=1 - b1, b1=b1, c2=1 - b2, b2=b2,
                  bc1=_bias_correction(b1, count_inc, reciprocal),
                  bc2=_bias_correction(b2, count_inc, reciprocal), eps=eps, eps_root=0.0, wd=wd,
                  lr=lr)
    hp, scal, dyn_dtypes = _pack(values)
    hp = hp._replace(reciprocal=reciprocal, opaque=interpret)
    hp_values = _Hyper(**values, reciprocal=reciprocal)

    g_flat, treedef = jax.tree.flatten(updates)
    p_flat = treedef.flatten_up_to(params)
    decays = _decay_flags(mask, updates, treedef)
    mu_paths = jax.tree_util.tree_flatten_with_path(adam.mu, is_leaf=is_compressed)[0]
    nu_paths = jax.tree_util.tree_flatten_with_path(adam.nu, is_leaf=is_compressed)[0]
    u_out, mu_out, nu_out = [], [], []
    for g, p, (mp, mu), (np_, nu), decay in zip(g_flat, p_flat, mu_paths, nu_paths, decays,
                                                strict=True):
      salts = (_salt((jax.tree_util.SequenceKey(0), jax.tree_util.GetAttrKey("mu"), *mp)),
               _salt((jax.tree_util.SequenceKey(0), jax.tree_util.GetAttrKey("nu"), *np_)))
      leaf_hp = hp if decay else hp._replace(wd=None)
      if _kernel_leaf(g, p, mu, nu, leaf_hp, dyn_dtypes):
        u, m2, v2 = _fused_leaf(g, p, mu, nu, leaf_hp, scal, salts, layout, interpret,
                                block_rows)
      else:
        leaf_values = hp_values if decay else hp_values._replace(wd=None)
        u, m2, v2 = _xla_leaf(g, p, mu, nu, leaf_values, salts)
      u_out.append(u)
      mu_out.append(m2)
      nu_out.append(v2)
    new_adam = adam._replace(count=count_inc, mu=jax.tree.unflatten(treedef, mu_out),
                             nu=jax.tree.unflatten(treedef, nu_out))
    return jax.tree.unflatten(treedef, u_out), (new_adam, wd_state, lr_state)

  return optax.GradientTransformationExtraArgs(xla.init, update_fn)


def _decay_flags(mask, updates, treedef) -> list[bool]:
  """Per leaf of `updates`, whether weight decay applies: optax.masked's reading of `mask`
  (a tree of bools, or a prefix of one, or a callable of the updates)."""
  if mask is None:
    return [True] * treedef.num_leaves
  tree = mask(updates) if callable(mask) else mask
  full = jax.tree.map(lambda m, sub: jax.tree.map(lambda _: bool(m), sub), tree, updates)
  return treedef.flatten_up_to(full)


def _salt(path) -> int:
  return _random.path_salt(path)


def _looks_like_adamw(updates, state, params) -> bool:
  """The fused path's preconditions on the call (else the XLA path handles it, or raises)."""
  if params is None or not (isinstance(state, tuple) and len(state) == 3):
    return False
  adam = state[0]
  if not isinstance(adam, optax.ScaleByAdamState):
    return False
  struct = jax.tree.structure(updates)
  if jax.tree.structure(params) != struct:
    return False
  for tree in (adam.mu, adam.nu):
    if jax.tree.structure(tree, is_leaf=is_compressed) != struct:
      return False
  for g, p in zip(jax.tree.leaves(updates), jax.tree.leaves(params), strict=True):
    if tuple(np.shape(g)) != tuple(np.shape(p)):
      return False
  return True
