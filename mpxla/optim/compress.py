"""FP8-compressed optimizer states: `compress_states`, `compress`, `decompress`.

A compressed state is the inner transform's state with each large floating-point
leaf replaced by a `CompressedArray`, a pytree node (registered with
jax.tree_util) holding 8-bit codes plus per-group metadata. Optax wrappers that
tree_map over states (`apply_if_finite`, `MultiSteps`, `masked`, ...) and
`optax.inject_hyperparams` therefore work unchanged, and Orbax checkpoints the
codes and metadata as ordinary arrays.

Layout of a leaf x of shape (..., n): groups of g = min(group_size, n)
consecutive elements along the last axis; the last axis is zero-padded to
n_pad = ceil(n / g) * g (never truncated). `codes` has shape (..., n_pad), `k16`
(uint8, 16 * k) and `amax` (float32) have shape (..., n_pad / g). All three keep
x's leading axes, so a parameter sharded along its first axis (FSDP) gives codes
and metadata sharded the same way and groups never straddle shards. If the last
axis itself is sharded, groups stay within a shard when n_pad / shards is a
multiple of g; otherwise XLA moves data between shards (the results are the
same, only slower).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mpxla.formats import get_format
from mpxla.optim import expansion as expansion_lib

KeyPath = tuple[Any, ...]
Overrides = (
    Mapping[str, Mapping[str, Any]] | Callable[[KeyPath, Any], Mapping[str, Any] | None] | None
)

_OVERRIDE_KEYS = ("fmt", "expansion", "group_size", "min_size", "compress")


@dataclasses.dataclass(frozen=True, repr=False)
class CompressedArray:
  """An array stored as 8-bit codes with per-group metadata (see module docstring).

  Attributes:
    codes: (..., n_pad) codes in fmt's storage dtype.
    k16: (..., n_pad / group_size) uint8, 16 * k; None without expansion.
    amax: (..., n_pad / group_size) float32, each group's max |x|.
    shape: the original shape.
    dtype: the original dtype (decoding returns it).
    fmt: format name ('e4m3', 'e5m2', 'hif8').
    group_size: elements per group along the last axis.
    expansion: whether the codes use dynamic range expansion.
  """

  codes: jax.Array
  k16: jax.Array | None
  amax: jax.Array
  shape: tuple[int, ...]
  dtype: np.dtype
  fmt: str
  group_size: int
  expansion: bool

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def size(self) -> int:
    return math.prod(self.shape)

  @property
  def nbytes(self) -> int:
    """Bytes stored: codes + k16 + amax."""
    return sum(_nbytes(a) for a in (self.codes, self.k16, self.amax) if a is not None)

  @property
  def config(self) -> LeafConfig:
    return LeafConfig(self.fmt, self.expansion, self.group_size, 0, True)

  def decode(self) -> jax.Array:
    """The array (original shape and dtype)."""
    return decode_leaf(self)

  def __repr__(self) -> str:
    return (
        f"CompressedArray(shape={self.shape}, dtype={np.dtype(self.dtype).name}, "
        f"fmt={self.fmt!r}, group_size={self.group_size}, expansion={self.expansion})"
    )


jax.tree_util.register_dataclass(
    CompressedArray,
    data_fields=["codes", "k16", "amax"],
    meta_fields=["shape", "dtype", "fmt", "group_size", "expansion"],
)


class LeafConfig(NamedTuple):
  """How one state leaf is stored (defaults of `compress`, then overrides)."""

  fmt: str = "e4m3"
  expansion: bool = True
  group_size: int = 128
  min_size: int = 4096
  compress: bool = True


def is_compressed(x: Any) -> bool:
  """True for a `CompressedArray` node."""
  return isinstance(x, CompressedArray)


def _nbytes(a: Any) -> int:
  return math.prod(a.shape) * np.dtype(a.dtype).itemsize


def nbytes(tree: Any) -> int:
  """Bytes held by the arrays of a (possibly compressed) pytree."""
  return sum(_nbytes(a) for a in jax.tree.leaves(tree) if hasattr(a, "dtype"))


def _check_config(cfg: LeafConfig) -> LeafConfig:
  fmt = get_format(cfg.fmt).name
  if not (isinstance(cfg.group_size, int) and cfg.group_size >= 1):
    raise ValueError(f"group_size must be a positive int, got {cfg.group_size!r}.")
  if not (isinstance(cfg.min_size, int) and cfg.min_size >= 0):
    raise ValueError(f"min_size must be a non-negative int, got {cfg.min_size!r}.")
  return cfg._replace(fmt=fmt, expansion=bool(cfg.expansion), compress=bool(cfg.compress))


def _apply(cfg: LeafConfig, changes: Mapping[str, Any] | None, where: str) -> LeafConfig:
  if changes is None:
    return cfg
  if not isinstance(changes, Mapping):
    raise TypeError(f"overrides for {where} must be a dict or None, got {type(changes).__name__}.")
  unknown = set(changes) - set(_OVERRIDE_KEYS)
  if unknown:
    raise ValueError(
        f"overrides for {where} have unknown keys {sorted(unknown)}; allowed: {_OVERRIDE_KEYS}."
    )
  return cfg._replace(**changes)


def _key_name(k: Any) -> str:
  for attr in ("name", "key", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def _leaf_config(path: KeyPath, leaf: Any, base: LeafConfig, overrides: Overrides) -> LeafConfig:
  """base, then the overrides that name an entry of `path` (outer first) or the callable's."""
  cfg = base
  where = jax.tree_util.keystr(path) or "<root>"
  if callable(overrides):
    cfg = _apply(cfg, overrides(path, leaf), where)
  elif overrides is not None:
    for name in (_key_name(k) for k in path):
      if name in overrides:
        cfg = _apply(cfg, overrides[name], f"{name!r}")
  return _check_config(cfg)


def _storage(shape: tuple[int, ...], group_size: int) -> tuple[int, int]:
  """(g, n_pad) for a leaf of `shape`: the group size and padded last axis."""
  n = shape[-1]
  g = max(1, min(group_size, n))
  return g, -(-n // g) * g


def _is_array(leaf: Any) -> bool:
  return isinstance(leaf, (jax.Array, np.ndarray, jax.ShapeDtypeStruct))


def _compressible(leaf: Any, cfg: LeafConfig) -> bool:
  """Whether `leaf` (an array or ShapeDtypeStruct) is stored compressed under cfg."""
  if not cfg.compress or not _is_array(leaf):
    return False
  dtype = np.dtype(leaf.dtype)
  if not jnp.issubdtype(dtype, jnp.floating) or dtype.itemsize <= 1:
    return False
  size = math.prod(leaf.shape)
  if len(leaf.shape) == 0 or size < max(cfg.min_size, 1):
    return False
  g, n_pad = _storage(tuple(leaf.shape), cfg.group_size)
  meta = (1 if cfg.expansion else 0) + 4
  stored = math.prod(leaf.shape[:-1]) * (n_pad + (n_pad // g) * meta)
  return stored < size * dtype.itemsize  # Never store more than the original.


def _plan(state: Any, base: LeafConfig, overrides: Overrides) -> Any:
  """The LeafConfig of each leaf to compress, None for the others (CompressedArray: kept)."""

  def one(path, leaf):
    if is_compressed(leaf):
      return leaf.config
    cfg = _leaf_config(path, leaf, base, overrides)
    return cfg if _compressible(leaf, cfg) else None

  return jax.tree_util.tree_map_with_path(one, state, is_leaf=is_compressed)


def encode_leaf(x: jax.Array, cfg: LeafConfig) -> CompressedArray:
  """Compresses one array; groups along its last axis (see module docstring)."""
  shape, dtype = tuple(x.shape), np.dtype(x.dtype)
  g, n_pad = _storage(shape, cfg.group_size)
  lead = shape[:-1]
  xp = jnp.pad(x, [(0, 0)] * len(lead) + [(0, n_pad - shape[-1])])
  enc = expansion_lib.encode(xp.reshape(*lead, n_pad // g, g), cfg.fmt, expansion=cfg.expansion)
  return CompressedArray(
      codes=enc.codes.reshape(*lead, n_pad),
      k16=None if enc.k16 is None else enc.k16[..., 0],
      amax=enc.amax[..., 0],
      shape=shape,
      dtype=dtype,
      fmt=cfg.fmt,
      group_size=g,
      expansion=cfg.expansion,
  )


def decode_leaf(c: CompressedArray, dtype: Any = None) -> jax.Array:
  """The decoded array, in `dtype` (default: the original dtype).

  Leading axes are read from the codes, so states batched by jax.vmap decode too.
  """
  lead, n_pad = c.codes.shape[:-1], c.codes.shape[-1]
  g = c.group_size
  enc = expansion_lib.Encoded(
      codes=c.codes.reshape(*lead, n_pad // g, g),
      k16=None if c.k16 is None else c.k16[..., None],
      amax=c.amax[..., None],
  )
  x = expansion_lib.decode(enc, c.fmt, jnp.float32).reshape(*lead, n_pad)[..., : c.shape[-1]]
  return x.astype(c.dtype if dtype is None else dtype)


def compress(
    state: Any,
    *,
    fmt: str = "e4m3",
    expansion: bool = True,
    group_size: int = 128,
    min_size: int = 4096,
    overrides: Overrides = None,
) -> Any:
  """Compresses the floating-point leaves of an Optax state that have >= min_size elements.

  Leaves already compressed, smaller leaves, integer/bool leaves, scalars and
  non-array leaves stay as they are, as do leaves whose compressed form would
  not be smaller. Use it to move a running job's plain state onto FP8 (pass the
  same arguments as to `compress_states`).

  Args:
    state: any pytree (an Optax state).
    fmt: 'e4m3', 'e5m2' or 'hif8'.
    expansion: use COAT's dynamic range expansion (else plain per-group absmax).
    group_size: elements per group along the last axis (a smaller last axis is
      one group).
    min_size: leaves with fewer elements stay uncompressed.
    overrides: per-leaf changes to the above (keys 'fmt', 'expansion',
      'group_size', 'min_size', and 'compress'=False to keep a leaf as is), either
      a dict {name: changes} applied when `name` is an entry of the leaf's path
      (a state field such as 'mu', 'nu', 'acc_grads' or a parameter name; outer
      entries first, inner ones win), or a callable (path, leaf) -> changes | None.

  Returns:
    The state with `CompressedArray` nodes in place of the compressed leaves.
  """
  base = _check_config(LeafConfig(fmt, expansion, group_size, min_size, True))
  leaves, treedef = jax.tree.flatten(state, is_leaf=is_compressed)
  plan = treedef.flatten_up_to(_plan(state, base, overrides))
  # The barrier stops XLA from constant-folding the codec when state is a
  # compile-time constant (e.g. the zeros of inner.init under jit), which is very slow.
  out = [
      x if is_compressed(x) or cfg is None else encode_leaf(jax.lax.optimization_barrier(x), cfg)
      for x, cfg in zip(leaves, plan, strict=True)
  ]
  return jax.tree.unflatten(treedef, out)


def decompress(state: Any, dtype: Any = None) -> Any:
  """The state with every `CompressedArray` decoded (to its original dtype, or `dtype`)."""
  return jax.tree.map(
      lambda x: decode_leaf(x, dtype) if is_compressed(x) else x, state, is_leaf=is_compressed
  )


def _skeleton(state: Any, plan: Any) -> tuple[dict[str, Any], Any]:
  """({path: shape if compressed (per plan) else None}, treedef with CompressedArray leaves)."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(state, is_leaf=is_compressed)
  cfgs = treedef.flatten_up_to(plan)
  skel = {
      jax.tree_util.keystr(p): (tuple(x.shape) if c is not None else None)
      for (p, x), c in zip(flat, cfgs, strict=True)
  }
  return skel, treedef


def _structure_error(got: Any, expected: Any, plan: Any) -> ValueError | None:
  """A ValueError naming the first differences between a state and the expected one."""
  gs, gdef = _skeleton(got, jax.tree.map(lambda x: x.config if is_compressed(x) else None,
                                         got, is_leaf=is_compressed))
  try:
    es, edef = _skeleton(expected, plan)
  except (ValueError, TypeError):
    return None
  if gs == es and gdef == edef:
    return None
  missing = [p for p in es if p not in gs]
  extra = [p for p in gs if p not in es]
  changed = [p for p in es if p in gs and gs[p] != es[p]]
  parts = []
  if missing:
    parts.append(f"missing leaves {missing[:3]}")
  if extra:
    parts.append(f"unexpected leaves {extra[:3]}")
  for p in changed[:3]:
    want = f"compressed, shape {es[p]}" if es[p] is not None else "uncompressed"
    have = f"compressed, shape {gs[p]}" if gs[p] is not None else "uncompressed"
    parts.append(f"{p or '<root>'}: expected {want}, got {have}")
  detail = "; ".join(parts) or f"treedef {gdef} != {edef}"
  return ValueError(
      "compress_states: the state does not match these updates/params "
      f"({detail}). Pass the state made by this transform's init (or by "
      "mpxla.optim.compress with the same settings) for params of the same structure."
  )


def _recompress_like(template: Any, new_state: Any) -> Any:
  """Encodes the leaves of new_state that are compressed in `template`, with their settings."""
  old, treedef = jax.tree.flatten(template, is_leaf=is_compressed)
  try:
    new = treedef.flatten_up_to(new_state)
  except (ValueError, TypeError) as e:
    raise ValueError(
        "compress_states: the inner transform returned a state whose structure differs "
        f"from its input state: {e}"
    ) from e
  out = []
  for o, n in zip(old, new, strict=True):
    if is_compressed(o):
      if tuple(n.shape) != o.shape:
        raise ValueError(f"compress_states: a state leaf changed shape from {o.shape} to {n.shape}.")
      n = encode_leaf(n.astype(o.dtype), o.config)
    out.append(n)
  return jax.tree.unflatten(treedef, out)


def compress_states(
    inner: optax.GradientTransformation,
    *,
    fmt: str = "e4m3",
    expansion: bool = True,
    group_size: int = 128,
    min_size: int = 4096,
    overrides: Overrides = None,
) -> optax.GradientTransformationExtraArgs:
  """Wraps `inner` so that its large floating-point state leaves are stored in FP8.

  update decodes the state, runs inner.update, and re-encodes each leaf that was
  compressed (same settings); everything else passes through. The results equal
  inner's on the decoded state. See `compress` for the arguments.

  Args:
    inner: any Optax transformation (anything with init and update).
    fmt, expansion, group_size, min_size, overrides: as in `compress`.

  Returns:
    An `optax.GradientTransformationExtraArgs`.
  """
  settings = dict(
      fmt=fmt, expansion=expansion, group_size=group_size, min_size=min_size, overrides=overrides
  )
  base = _check_config(LeafConfig(fmt, expansion, group_size, min_size, True))
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    return compress(inner.init(params), **settings)

  def update_fn(updates, state, params=None, **extra_args):
    if params is not None and jax.tree.structure(updates) != jax.tree.structure(params):
      raise ValueError(
          "compress_states: updates and params have different tree structures: "
          f"{jax.tree.structure(updates)} vs {jax.tree.structure(params)}."
      )
    try:
      expected = jax.eval_shape(inner.init, updates if params is None else params)
    except Exception:  # pylint: disable=broad-except
      expected = None  # inner.init needs concrete values: skip the structure check.
    if expected is not None:
      err = _structure_error(state, expected, _plan(expected, base, overrides))
      if err is not None:
        raise err
    new_updates, new_plain = inner.update(updates, decompress(state), params, **extra_args)
    return new_updates, _recompress_like(state, new_plain)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
