"""FP8-compressed optimizer states: `compress_states`, `compress`, `decompress`.

A compressed state is the inner transform's state with each compressed leaf
replaced by a `CompressedArray`, a pytree node (registered with jax.tree_util)
holding 8-bit codes plus per-group metadata. Optax wrappers that tree_map over
states (`apply_if_finite`, `MultiSteps`, `masked`, ...) and
`optax.inject_hyperparams` therefore work unchanged, and Orbax checkpoints the
codes and metadata as ordinary arrays.

Which leaves are compressed: floating-point array leaves (not complex, wider
than 8 bits, ndim >= 1, at least `min_size` elements, smaller once compressed)
that hold *moments*. A leaf's kind is read from its path (`classify`): the
outermost attribute name on it (a NamedTuple or dataclass field of a state) that
is in `MOMENT_FIELDS` or `EXACT_FIELDS` decides; a path with neither counts as a
moment. `overrides` with `compress=True` / `False` force either way.

Layout of a leaf x of shape (..., n): groups of g = min(group_size, n)
consecutive elements along the last axis; the last axis is zero-padded to
n_pad = ceil(n / g) * g (never truncated). `codes` has shape (..., n_pad), `k16`
(uint8, 16 * k) and `amax` (float32) have shape (..., n_pad / g). All three keep
x's leading axes, so a parameter sharded along its first axis (FSDP) gives codes
and metadata sharded the same way and groups never straddle shards. If the last
axis itself is sharded, groups stay within a shard when n_pad / shards is a
multiple of g; otherwise XLA moves data between shards (the results are the
same, only slower).

Rounding: a leaf's first encode (`compress`, `init`) rounds to nearest; `update`
re-encodes with the leaf's `rounding`. Stochastic rounding (the default for E4M3
and E5M2) is unbiased, so a moment whose per-step change is below half a code
step still follows its EMA in expectation instead of stalling. Its bits are a
hash of each element's index, a hash of the leaf's path and the leaf's own
counter `step` (a uint32 scalar stored in the `CompressedArray`, advanced by each
update): no PRNG key is stored, and a restored state continues bit for bit.
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
from flax import serialization

from mpxla.formats import _bits, _random, get_format
from mpxla.optim import expansion as expansion_lib

KeyPath = tuple[Any, ...]
Overrides = (
    Mapping[str, Mapping[str, Any]] | Callable[[KeyPath, Any], Mapping[str, Any] | None] | None
)

# State fields holding moments: running statistics of the gradients (EMAs, running sums
# and maxima) that the update reads through smooth functions; FP8 with expansion suits them.
MOMENT_FIELDS = frozenset({
    "mu", "nu", "nu_max",  # Adam family, Lion, SM3, Novograd, Muon, Sophia, RMSProp
    "trace", "ema",  # momentum (SGD, LARS, Signum), EMAs
    "sum_of_squares", "grad_sum_sq",  # Adagrad, MADGRAD
    "e_g", "e_x",  # AdaDelta
    "v_row", "v_col", "v",  # Adafactor (and Adan's, Mechanic's v)
    "m", "n", "m1", "m2",  # Adan, AdEMAMix, Mechanic
    "exp_avg", "exp_avg_sq",  # D-Adaptation, Prodigy, MoMo
    "mean_grads_ema", "variance_grads_ema",
})
# State fields that must stay exact: iterates and stored parameters, gradient copies
# and accumulators, curvature memories, line-search values, per-parameter step sizes.
EXACT_FIELDS = frozenset({
    # L-BFGS and its line searches.
    "params", "updates", "diff_params_memory", "diff_updates_memory", "weights_memory",
    "learning_rate", "value", "grad", "info", "stepsize", "stepsize_guess", "slope",
    "value_init", "slope_init", "low", "value_low", "slope_low", "high", "value_high",
    "slope_high", "cubic_ref", "value_cubic_ref", "safe_stepsize", "safe_value", "safe_grad",
    "new_value", "new_grad",
    # Iterates and anchors: schedule-free's z, initial points, Lookahead's weights.
    "z", "x0", "init_params", "params0", "init_particles", "fast", "slow",
    # Gradients, kept for one step or summed: MultiSteps, apply_every, aggregation.
    "acc_grads", "grad_acc", "avg_grad", "mean_grads", "sum_sq_diff_grads",
    "g", "previous_gradient", "prev_updates", "cumulative_gradients", "subgradients",
    "grad_sum", "s",
    # Per-parameter step sizes and other non-statistics.
    "step_sizes", "scale", "reward", "projector", "cache", "measurement", "measurements",
})

_ROUNDINGS = ("nearest", "stochastic")


class LeafConfig(NamedTuple):
  """How state leaves are stored: the settings of `compress` / `compress_states`.

  Attributes:
    fmt: 'e4m3', 'e5m2' or 'hif8'.
    expansion: COAT's dynamic range expansion (else plain per-group absmax scaling).
    group_size: elements per group along the last axis (a shorter last axis is one group).
    min_size: leaves with fewer elements stay as they are.
    compress: None: by the leaf's kind (`classify`: moments are compressed); True /
      False: force (True still needs a floating leaf of min_size that gets smaller).
    rounding: how `update` re-encodes a leaf: 'nearest' (ties to even) or
      'stochastic' (unbiased, E4M3 / E5M2 only; see `expansion.encode`); None:
      'stochastic' for E4M3 / E5M2, 'nearest' for HiF8. The first encode
      (`compress`, `init`) always rounds to nearest.
  """

  fmt: str = "e4m3"
  expansion: bool = True
  group_size: int = 128
  min_size: int = 4096
  compress: bool | None = None
  rounding: str | None = None


_SETTINGS = LeafConfig._fields


@dataclasses.dataclass(frozen=True, repr=False)
class CompressedArray:
  """An array stored as 8-bit codes with per-group metadata (see module docstring).

  Attributes:
    codes: (..., n_pad) codes in fmt's storage dtype.
    k16: (..., n_pad / group_size) uint8, 16 * k; None without expansion.
    amax: (..., n_pad / group_size) float32, each group's max |x|.
    step: uint32 scalar, the encode counter stochastic rounding draws from; None
      with round to nearest.
    shape: the original shape.
    dtype: the original dtype (decoding returns it).
    fmt: format name ('e4m3', 'e5m2', 'hif8').
    group_size: elements per group along the last axis.
    expansion: whether the codes use dynamic range expansion.
  """

  codes: jax.Array
  k16: jax.Array | None
  amax: jax.Array
  step: jax.Array | None
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
  def rounding(self) -> str:
    return "nearest" if self.step is None else "stochastic"

  @property
  def nbytes(self) -> int:
    """Bytes stored: codes + k16 + amax (+ step)."""
    return sum(_nbytes(a) for a in (self.codes, self.k16, self.amax, self.step) if a is not None)

  @property
  def config(self) -> LeafConfig:
    return LeafConfig(self.fmt, self.expansion, self.group_size, 0, True, self.rounding)

  def decode(self) -> jax.Array:
    """The array (original shape and dtype)."""
    return decode_leaf(self)

  def __repr__(self) -> str:
    return (
        f"CompressedArray(shape={self.shape}, dtype={np.dtype(self.dtype).name}, "
        f"fmt={self.fmt!r}, group_size={self.group_size}, expansion={self.expansion}, "
        f"rounding={self.rounding!r})"
    )


_ARRAY_FIELDS = ("codes", "k16", "amax", "step")
jax.tree_util.register_dataclass(
    CompressedArray,
    data_fields=list(_ARRAY_FIELDS),
    meta_fields=["shape", "dtype", "fmt", "group_size", "expansion"],
)


def _to_state_dict(c: CompressedArray) -> dict[str, Any]:
  return {k: getattr(c, k) for k in _ARRAY_FIELDS if getattr(c, k) is not None}


def _from_state_dict(target: CompressedArray, state: dict[str, Any]) -> CompressedArray:
  fields = [k for k in _ARRAY_FIELDS if getattr(target, k) is not None]
  return dataclasses.replace(target, **{
      k: serialization.from_state_dict(getattr(target, k), state[k]) for k in fields})


# flax.serialization (to_bytes / from_bytes): the arrays; the static fields come from the target.
serialization.register_serialization_state(CompressedArray, _to_state_dict, _from_state_dict)


def is_compressed(x: Any) -> bool:
  """True for a `CompressedArray` node."""
  return isinstance(x, CompressedArray)


def _nbytes(a: Any) -> int:
  return math.prod(a.shape) * a.dtype.itemsize


def nbytes(tree: Any) -> int:
  """Bytes held by the arrays of a (possibly compressed) pytree."""
  return sum(_nbytes(a) for a in jax.tree.leaves(tree) if hasattr(a, "dtype"))


def _key_name(k: Any) -> str:
  for attr in ("name", "key", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def classify(path: KeyPath) -> str:
  """'moment' or 'exact': the kind of the state leaf at `path` (a jax.tree_util key path).

  The outermost attribute entry of the path (a NamedTuple or dataclass field:
  `GetAttrKey`) named in MOMENT_FIELDS or EXACT_FIELDS decides; other attribute
  names (containers such as 'inner_state', counters) are skipped, and dict keys and
  sequence indices (parameter names, chain positions) never count. A path with no
  known field is a 'moment', so arrays passed to `compress` directly are compressed.
  Outermost first: a state field is always outside the parameter tree it holds.
  """
  for k in path:
    if isinstance(k, jax.tree_util.GetAttrKey):
      if k.name in MOMENT_FIELDS:
        return "moment"
      if k.name in EXACT_FIELDS:
        return "exact"
  return "moment"


def _settings_error(where: str, keys: Any) -> ValueError:
  return ValueError(f"{where}: unknown keys {sorted(keys)}; allowed: {list(_SETTINGS)}.")


def make_config(config: LeafConfig | Mapping[str, Any] | None = None,
                **settings: Any) -> LeafConfig:
  """`config` (default LeafConfig(); a dict gives its fields) with `settings` replaced, checked."""
  if isinstance(config, Mapping):
    config, settings = None, {**config, **settings}
  unknown = set(settings) - set(_SETTINGS)
  if unknown:
    raise _settings_error("compress_states", unknown)
  return _check_config((config or LeafConfig())._replace(**settings), "compress_states")


def _check_config(cfg: LeafConfig, where: str) -> LeafConfig:
  fmt = get_format(cfg.fmt).name
  if not (isinstance(cfg.group_size, int) and cfg.group_size >= 1):
    raise ValueError(f"{where}: group_size must be a positive int, got {cfg.group_size!r}.")
  if not (isinstance(cfg.min_size, int) and cfg.min_size >= 0):
    raise ValueError(f"{where}: min_size must be a non-negative int, got {cfg.min_size!r}.")
  if cfg.compress not in (None, True, False):
    raise ValueError(f"{where}: compress must be None, True or False, got {cfg.compress!r}.")
  if cfg.rounding is not None and cfg.rounding not in _ROUNDINGS:
    raise ValueError(
        f"{where}: rounding must be one of {_ROUNDINGS} or None, got {cfg.rounding!r}.")
  if cfg.rounding == "stochastic" and not _bits.supports(fmt):
    raise ValueError(
        f"{where}: rounding='stochastic' supports fmt 'e4m3' and 'e5m2', not {fmt!r}; "
        "use rounding='nearest' with it."
    )
  return cfg._replace(fmt=fmt, expansion=bool(cfg.expansion))


def _rounding(cfg: LeafConfig) -> str:
  """cfg.rounding, with None resolved: 'stochastic' for E4M3 / E5M2, 'nearest' for HiF8."""
  if cfg.rounding is not None:
    return cfg.rounding
  return "stochastic" if _bits.supports(cfg.fmt) else "nearest"


def _apply(cfg: LeafConfig, changes: Mapping[str, Any] | None, where: str) -> LeafConfig:
  if changes is None:
    return cfg
  if not isinstance(changes, Mapping):
    raise TypeError(f"overrides for {where} must be a dict or None, got {type(changes).__name__}.")
  if set(changes) - set(_SETTINGS):
    raise _settings_error(f"overrides for {where}", set(changes) - set(_SETTINGS))
  return cfg._replace(**changes)


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
  return cfg if cfg is base else _check_config(cfg, f"overrides for {where}")


def _storage(shape: tuple[int, ...], group_size: int) -> tuple[int, int]:
  """(g, n_pad) for a leaf of `shape`: the group size and padded last axis."""
  n = shape[-1]
  g = max(1, min(group_size, n))
  return g, -(-n // g) * g


def _is_array(leaf: Any) -> bool:
  return isinstance(leaf, (jax.Array, np.ndarray, jax.ShapeDtypeStruct))


def _compressible(path: KeyPath, leaf: Any, cfg: LeafConfig) -> bool:
  """Whether `leaf` (an array or ShapeDtypeStruct) at `path` is stored compressed under cfg.

  Non-array leaves, PRNG keys, integers, booleans and complex numbers never are.
  """
  if not _is_array(leaf) or not jnp.issubdtype(leaf.dtype, jnp.floating):
    return False
  wanted = classify(path) == "moment" if cfg.compress is None else cfg.compress
  if not wanted or leaf.dtype.itemsize <= 1:
    return False
  size = math.prod(leaf.shape)
  if len(leaf.shape) == 0 or size < max(cfg.min_size, 1):
    return False
  g, n_pad = _storage(tuple(leaf.shape), cfg.group_size)
  meta = (1 if cfg.expansion else 0) + 4
  stored = math.prod(leaf.shape[:-1]) * (n_pad + (n_pad // g) * meta)
  return stored < size * leaf.dtype.itemsize  # Never store more than the original.


def _plan(state: Any, base: LeafConfig, overrides: Overrides) -> Any:
  """The LeafConfig of each leaf to compress, None for the others (CompressedArray: kept)."""

  def one(path, leaf):
    if is_compressed(leaf):
      return leaf.config
    cfg = _leaf_config(path, leaf, base, overrides)
    return cfg if _compressible(path, leaf, cfg) else None

  return jax.tree_util.tree_map_with_path(one, state, is_leaf=is_compressed)


def encode_leaf(
    x: jax.Array, cfg: LeafConfig, *, step: jax.Array | None = None, salt: int = 0
) -> CompressedArray:
  """Compresses one array; groups along its last axis (see module docstring).

  step None is a first encode: round to nearest (a stochastic leaf stores step 0).
  Otherwise a leaf with cfg.rounding == 'stochastic' draws its bits from (salt, step)
  and stores `step`.
  """
  shape, dtype = tuple(x.shape), np.dtype(x.dtype)
  g, n_pad = _storage(shape, cfg.group_size)
  lead = shape[:-1]
  xp = jnp.pad(x, [(0, 0)] * len(lead) + [(0, n_pad - shape[-1])])
  grouped = (*lead, n_pad // g, g)
  stored_step, bits = None, None
  if _rounding(cfg) == "stochastic":
    if step is None:
      stored_step = jnp.zeros((), jnp.uint32)
    else:
      stored_step = jnp.asarray(step, jnp.uint32)
      bits = _random.counter_bits(grouped, stored_step, salt)
  enc = expansion_lib.encode(xp.reshape(grouped), cfg.fmt, expansion=cfg.expansion, bits=bits)
  return CompressedArray(
      codes=enc.codes.reshape(*lead, n_pad),
      k16=None if enc.k16 is None else enc.k16[..., 0],
      amax=enc.amax[..., 0],
      step=stored_step,
      shape=shape,
      dtype=dtype,
      fmt=cfg.fmt,
      group_size=g,
      expansion=cfg.expansion,
  )


@jax.custom_jvp
def _not_differentiable(amax: jax.Array) -> jax.Array:
  return amax


@_not_differentiable.defjvp
def _not_differentiable_jvp(primals, tangents):
  raise ValueError(
      "differentiating through FP8-compressed optimizer states is not supported: the codes "
      "are integers, so the derivative would flow only through each group's amax (wrong, "
      "not approximate). Differentiate the update w.r.t. its gradients and parameters with "
      "the state held fixed, or keep these states uncompressed.")


def decode_leaf(c: CompressedArray, dtype: Any = None) -> jax.Array:
  """The decoded array, in `dtype` (default: the original dtype).

  Leading axes are read from the codes, so states batched by jax.vmap decode too.
  Differentiating the result w.r.t. the state raises a ValueError (see `_not_differentiable`).
  """
  lead, n_pad = c.codes.shape[:-1], c.codes.shape[-1]
  g = c.group_size
  enc = expansion_lib.Encoded(
      codes=c.codes.reshape(*lead, n_pad // g, g),
      k16=None if c.k16 is None else c.k16[..., None],
      amax=_not_differentiable(c.amax)[..., None],
  )
  x = expansion_lib.decode(enc, c.fmt, jnp.float32).reshape(*lead, n_pad)[..., : c.shape[-1]]
  return x.astype(c.dtype if dtype is None else dtype)


def compress(
    state: Any, config: LeafConfig | None = None, *, overrides: Overrides = None, **settings: Any
) -> Any:
  """Compresses the moment leaves of an Optax state (see the module docstring for which).

  The codes round to nearest (the first encode); a leaf whose rounding is
  'stochastic' stores step 0 and is re-encoded stochastically by `compress_states`.

  Leaves already compressed, non-moment leaves (`classify`), small leaves, non-float
  leaves (integers, booleans, complex, PRNG keys), scalars and non-array leaves stay
  as they are, as do leaves whose compressed form would not be smaller. Use it to
  move a running job's plain state onto FP8 (pass the same settings as to
  `compress_states`).

  Args:
    state: any pytree (an Optax state).
    config: a LeafConfig (default LeafConfig()).
    overrides: per-leaf changes to the settings (any LeafConfig field, e.g.
      {'nu': {'rounding': 'nearest'}, 'acc_grads': {'compress': True}}), either a dict
      {name: changes} applied when `name` is an entry of the leaf's path (a state
      field such as 'mu', 'nu', 'acc_grads' or a parameter name; outer entries
      first, inner ones win), or a callable (path, leaf) -> changes | None.
    **settings: LeafConfig fields replacing config's (fmt, expansion, group_size,
      min_size, compress, rounding).

  Returns:
    The state with `CompressedArray` nodes in place of the compressed leaves.
  """
  base = make_config(config, **settings)
  leaves, treedef = jax.tree.flatten(state, is_leaf=is_compressed)
  plan = treedef.flatten_up_to(_plan(state, base, overrides))
  out = []
  for x, cfg in zip(leaves, plan, strict=True):
    if not is_compressed(x) and cfg is not None:
      # The barrier stops XLA from constant-folding the codec when state is a
      # compile-time constant (e.g. the zeros of inner.init under jit), which is very slow.
      x = encode_leaf(jax.lax.optimization_barrier(x), cfg)
    out.append(x)
  return jax.tree.unflatten(treedef, out)


def decompress(state: Any, dtype: Any = None) -> Any:
  """The state with every `CompressedArray` decoded (to its original dtype, or `dtype`)."""
  return jax.tree.map(
      lambda x: decode_leaf(x, dtype) if is_compressed(x) else x, state, is_leaf=is_compressed
  )


def _where(path: KeyPath) -> str:
  return jax.tree_util.keystr(path) or "<root>"


def _check_like(updates: Any, params: Any) -> None:
  """updates and params have the same tree structure and leaf shapes (else: which leaf)."""
  if jax.tree.structure(updates) != jax.tree.structure(params):
    raise ValueError(
        "compress_states: updates and params have different tree structures: "
        f"{jax.tree.structure(updates)} vs {jax.tree.structure(params)}."
    )
  for (path, u), p in zip(jax.tree_util.tree_flatten_with_path(updates)[0],
                          jax.tree.leaves(params), strict=True):
    if _is_array(u) and _is_array(p) and tuple(u.shape) != tuple(p.shape):
      raise ValueError(
          f"compress_states: updates{_where(path)} has shape {tuple(u.shape)} but "
          f"params{_where(path)} has shape {tuple(p.shape)}; pass updates shaped like params."
      )


def _check_plain_leaves(state: Any, base: LeafConfig, overrides: Overrides) -> None:
  """No leaf that this transform would compress arrives uncompressed (a state from elsewhere)."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(state, is_leaf=is_compressed)
  plan = treedef.flatten_up_to(_plan(state, base, overrides))
  plain = [(p, x) for (p, x), c in zip(flat, plan, strict=True) if c is not None
           and not is_compressed(x)]
  if plain:
    shown = "; ".join(f"{_where(p)}: expected compressed, got uncompressed {tuple(x.shape)}"
                      for p, x in plain[:3])
    raise ValueError(
        f"compress_states: the state does not match this transform ({shown}). Pass the state "
        "made by this transform's init, or mpxla.optim.compress(state) with the same settings."
    )


def _skeleton(state: Any) -> dict[str, Any]:
  """{path: (shape, compressed) for arrays, else None}."""
  return {
      jax.tree_util.keystr(p): ((tuple(x.shape), is_compressed(x)) if hasattr(x, "shape")
                                else None)
      for p, x in jax.tree_util.tree_flatten_with_path(state, is_leaf=is_compressed)[0]
  }


def _mismatch(state: Any, expected: Any) -> ValueError | None:
  """A ValueError naming the first differences between a state and the expected one."""
  gs, es = _skeleton(state), _skeleton(expected)
  missing = [p for p in es if p not in gs]
  extra = [p for p in gs if p not in es]
  changed = [p for p in es if p in gs and gs[p] != es[p]]
  parts = []
  if missing:
    parts.append(f"missing leaves {missing[:3]}")
  if extra:
    parts.append(f"unexpected leaves {extra[:3]}")

  def say(entry):
    if entry is None:
      return "not an array"
    return f"{'compressed' if entry[1] else 'uncompressed'}, shape {entry[0]}"

  for p in changed[:3]:
    parts.append(f"{p or '<root>'}: expected {say(es[p])}, got {say(gs[p])}")
  if not parts:
    return None
  return ValueError(
      "compress_states: the state does not match these updates/params "
      f"({'; '.join(parts)}). Pass the state made by this transform's init (or by "
      "mpxla.optim.compress with the same settings) for params of the same structure."
  )


def _recompress_like(template: Any, new_state: Any) -> Any:
  """Encodes the leaves of new_state that are compressed in `template`, with their settings.

  Stochastic leaves advance their step by one and draw their bits from it.
  """
  flat, treedef = jax.tree_util.tree_flatten_with_path(template, is_leaf=is_compressed)
  try:
    new = treedef.flatten_up_to(new_state)
  except (ValueError, TypeError) as e:
    raise ValueError(
        "compress_states: the inner transform returned a state whose structure differs "
        f"from its input state: {e}"
    ) from e
  out = []
  for (path, o), n in zip(flat, new, strict=True):
    if is_compressed(o):
      if tuple(n.shape) != o.shape:
        raise ValueError(
            f"compress_states: state leaf {_where(path)} changed shape from {o.shape} to "
            f"{tuple(n.shape)} in the inner update. If this runs inside shard_map: compressed "
            "states record their global shape, so a shard_map body (which sees local shards) "
            "cannot update them; run the optimizer update under jax.jit on sharded arrays "
            "instead (docs/parallel.md, 'Meshes and contexts')."
        )
      step = None if o.step is None else o.step + 1
      n = encode_leaf(n.astype(o.dtype), o.config, step=step, salt=_random.path_salt(path))
    out.append(n)
  return jax.tree.unflatten(treedef, out)


def compress_states(
    inner: optax.GradientTransformation,
    config: LeafConfig | None = None,
    *,
    overrides: Overrides = None,
    **settings: Any,
) -> optax.GradientTransformationExtraArgs:
  """Wraps `inner` so that its moment state leaves are stored in FP8.

  update decodes the state, runs inner.update, and re-encodes each leaf that was
  compressed (same settings); everything else passes through. The results equal
  inner's on the decoded state. See `compress` for the arguments and the module
  docstring for which leaves are compressed.

  Args:
    inner: any Optax transformation (anything with init and update).
    config, overrides, **settings: as in `compress` (settings: fmt, expansion,
      group_size, min_size, compress, rounding).

  Returns:
    An `optax.GradientTransformationExtraArgs`.
  """
  base = make_config(config, **settings)
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    from flax import nnx  # nnx.Optimizer passes Variables: their values are the parameters

    return compress(inner.init(nnx.as_pure(params)), base, overrides=overrides)

  def update_fn(updates, state, params=None, **extra_args):
    if params is not None:
      _check_like(updates, params)
    _check_plain_leaves(state, base, overrides)
    try:
      new_updates, new_plain = inner.update(updates, decompress(state), params, **extra_args)
    except Exception as e:
      # Only on failure: compare the state with what init makes for these params, and
      # name the differing leaves (else the inner error stands).
      err = _diagnose(state, updates if params is None else params)
      if err is None:
        raise
      raise err from e
    return new_updates, _recompress_like(state, new_plain)

  def _diagnose(state, params):
    try:
      expected = jax.eval_shape(init_fn, params)
    except Exception:  # pylint: disable=broad-except
      return None  # init needs concrete values: no diagnosis, the original error stands.
    return _mismatch(state, expected)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
