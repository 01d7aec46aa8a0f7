"""FSDP with FP8 optimizer states: the compressed moments' codes and per-group scales are
sharded like their parameter with whole groups on every device, so the optimizer update
moves nothing between devices; (slow) the compiled step's only all-gathers are the model's
weights."""

import re

import jax
import pytest

from mpxla.optim import is_compressed
from mpxla.parallel.mesh import LAST_AXIS_TILE, fsdp_spec
from mpxla.train.trainer import Trainer

# d_ff 384 on 8 devices: 48 columns per device, less than a group of 128.
FSDP = {"model.attention_impl": "'dense_jax'", "mesh.data": "1", "mesh.fsdp": "8",
        "model.d_model": "128", "model.n_heads": "4", "model.n_kv_heads": "2",
        "model.d_ff": "384", "recipe": "'coat'"}


def _sharded_dim(spec, ndim):
  entries = tuple(spec) + (None,) * (ndim - len(tuple(spec)))
  return next((i for i, a in enumerate(entries) if a == "fsdp"), None)


@pytest.mark.parametrize("shape, dim", [
    ((128, 384), 0),            # last axis largest, 48 per device: not whole tiles
    ((768, 2048), 1),           # 256 per device: the largest dimension, as before
    ((12, 64, 768), 1),         # the attention output kernel: 96 per device on the last axis
    ((7, 1001), None),          # no dimension divisible by 8: replicated
    ((6, 1000), 1),             # the last axis is the only divisible one: used anyway
    ((2048,), 0), ((100, 10), None),  # 1-D; under 1024 elements: replicated
])
def test_fsdp_spec_keeps_whole_tiles_on_the_last_axis(shape, dim):
  spec = fsdp_spec(shape, 8)
  assert _sharded_dim(spec, len(shape)) == dim, spec
  if dim == len(shape) - 1 and len(shape) > 1 and any(s % 8 == 0 for s in shape[:-1]):
    assert (shape[-1] // 8) % LAST_AXIS_TILE == 0


def test_compressed_moments_shard_whole_groups_like_their_parameters(tiny_config):
  trainer = Trainer(tiny_config(**FSDP), "/nonexistent")
  abstract, sh = trainer._abstract_init(), trainer.state_shardings
  params = dict(jax.tree_util.tree_flatten_with_path(abstract["params"])[0])
  param_sh = dict(jax.tree_util.tree_flatten_with_path(sh["params"])[0])
  states = jax.tree_util.tree_flatten_with_path(abstract["opt_state"], is_leaf=is_compressed)[0]
  state_sh = jax.tree_util.tree_flatten_with_path(sh["opt_state"], is_leaf=is_compressed)[0]
  checked = 0
  for (path, c), (_, s) in zip(states, state_sh, strict=True):
    if not is_compressed(c):
      continue
    ppath = next(path[i:] for i in range(len(path)) if path[i:] in params)
    p = params[ppath]
    dim = _sharded_dim(param_sh[ppath].spec, p.ndim)
    assert s.codes.spec == param_sh[ppath].spec, (ppath, s.codes.spec)
    if dim == p.ndim - 1:  # the grouped axis: whole groups per device
      assert (p.shape[-1] // 8) % c.group_size == 0, (ppath, p.shape, c.group_size)
    for field in ("amax", "k16"):  # per-group scales: on the same devices as their groups
      meta = getattr(s, field)
      assert _sharded_dim(meta.spec, p.ndim) == dim, (ppath, field, meta.spec, dim)
    checked += 1
  # mu and nu of the 4 attention and 3 MLP kernels of each of the 2 layers, the embedding, head
  assert checked == 2 * (2 * 7 + 2), checked
  mlp_up = param_sh[next(k for k in params if "up" in jax.tree_util.keystr(k))]
  assert _sharded_dim(mlp_up.spec, 2) == 0  # [128, 384]: 48 columns per device would split


@pytest.mark.slow  # one 8-device compile of the train step (~40 s)
def test_fsdp_coat_step_all_gathers_only_weights(tiny_config):
  hlo = Trainer(tiny_config(**FSDP), "/nonexistent").compile_train_step().as_text()
  gathers = [line for line in hlo.splitlines()
             if re.search(r" all-gather(-start)?\(", line)]
  assert gathers
  # An all-gather outside the model's forward and backward belongs to the optimizer update.
  outside = [g for g in gathers if not re.search(r'op_name="[^"]*\bGPT\b', g)]
  assert not outside, outside[:5]


class _StateOf:
  """What `Trainer.state_shardings` reads: an fsdp=8 mesh and the state's init function."""

  def __init__(self, params):
    from mpxla import optim, parallel

    self.mesh = parallel.make_mesh({"data": 1, "fsdp": 8})
    self.params, self.tx = params, optim.adamw_fp8(1e-3)

  def _init_fn(self, key, boxed_params=False):
    if boxed_params:
      return self.params
    return {"step": jax.numpy.zeros((), "int32"), "params": self.params,
            "opt_state": self.tx.init(self.params), "model_state": {}}

  def _abstract_init(self):
    return jax.eval_shape(self._init_fn, jax.random.key(0))


def _moment_specs(params):
  """{parameter path: (its spec, {field: spec} of its first moment)}."""
  stub = _StateOf(params)
  sh = Trainer.state_shardings.func(stub)
  out = {}
  for path, s in jax.tree_util.tree_flatten_with_path(sh["params"])[0]:
    mu = sh["opt_state"][0].mu
    for k in path:
      mu = mu[k.key]
    out["/".join(k.key for k in path)] = (s.spec, {f: getattr(mu, f).spec
                                                   for f in ("codes", "k16", "amax")})
  return out


def test_moments_follow_their_own_parameter_when_names_repeat():
  """Flax names a Dense_0 in every module: a nested parameter's moments follow it, not the
  top-level parameter whose path is a suffix of theirs."""
  zeros = jax.numpy.zeros
  specs = _moment_specs({"Dense_0": {"kernel": zeros((256, 1024))},
                         "Block_0": {"Dense_0": {"kernel": zeros((1024, 256))}}})
  top, nested = specs["Dense_0/kernel"], specs["Block_0/Dense_0/kernel"]
  assert tuple(top[0]) == (None, "fsdp") and tuple(nested[0]) == ("fsdp", None)
  for spec, fields in (top, nested):
    for field, s in fields.items():
      assert tuple(s) == tuple(spec), (field, s, spec)


def test_groups_split_by_the_parameter_are_replicated_with_their_scales():
  """A last axis whose shards are not whole groups of 128 (1000 / 8 = 125, padded to 1024;
  1536 / 8 = 192): codes and per-group scales are replicated together (one layout), not
  split where the groups are not the parameter's."""
  zeros = jax.numpy.zeros
  specs = _moment_specs({"a": zeros((5, 1000)), "b": zeros((7, 1536)), "c": zeros((3, 4096))})
  for name in ("a", "b"):
    spec, fields = specs[name]
    assert tuple(spec) == (None, "fsdp")  # the parameter itself: the fallback last axis
    for field, s in fields.items():
      assert not any(tuple(s)), (name, field, s)
  spec, fields = specs["c"]  # 512 per device: four whole groups
  for field, s in fields.items():
    assert tuple(s) == (None, "fsdp"), (field, s)
