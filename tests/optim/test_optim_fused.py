"""The fused Pallas update of adamw_fp8 (mpxla/optim/_fused.py) in interpret mode on CPU
against the XLA path: updates, codes, k16, amax, step and count bit-identical; both lowerings (Triton, Mosaic) pass without a
device; impl selection and errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mpxla.optim as mo
from mpxla.optim import _fused


def _gpt_shapes(layers=1, d=128, vocab=500, ctx=64):
  """A GPT-2-like pytree (tied embeddings, LayerNorm scales), plus odd leaves: a last axis
  that is not a multiple of 128 (200), rows not a multiple of the block, a 1-D leaf, a last
  axis under 128 (group 64: the XLA fallback), a small uncompressed leaf."""
  shapes = {"wte": (vocab, d), "wpe": (ctx, d), "ln_f": (d,)}
  for i in range(layers):
    shapes[f"h{i}"] = {"ln1": (d,), "qkv": (d, 3 * d), "proj": (d, d), "fc": (d, 4 * d),
                       "mlp_proj": (4 * d, d)}
  shapes["odd"] = {"tail": (37, 200), "flat": (5000,), "narrow": (96, 64)}
  return shapes


def _tree(shapes, seed, scale_spread=True, dtype=jnp.float32):
  rng = np.random.default_rng(seed)

  def one(s):
    x = rng.normal(size=s)
    if scale_spread:  # Per-row scales over four decades, as gradients have.
      x = x * 10.0 ** rng.uniform(-4, 0, size=s[:-1] + (1,))
    return jnp.asarray(x, dtype)

  return jax.tree.map(one, shapes, is_leaf=lambda s: isinstance(s, tuple))


def _assert_identical(a, b):
  """Every leaf equal bit for bit (FP8 codes compared as bytes)."""
  la, ta = jax.tree_util.tree_flatten_with_path(a)
  lb, tb = jax.tree.flatten(b)
  assert ta == tb
  for (path, x), y in zip(la, lb, strict=False):
    where = jax.tree_util.keystr(path)
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype, where
    if x.dtype.itemsize == 1:
      x, y = x.view(np.uint8), y.view(np.uint8)
    np.testing.assert_array_equal(x, y, err_msg=where)


def _compare(shapes, steps, layout, block_rows, kw=None, params_dtype=jnp.float32):
  """Each step from the XLA path's state: the fused step's updates, codes, metadata, step and
  count equal the XLA path's bit for bit."""
  kw = dict(learning_rate=1e-3, weight_decay=0.1) | (kw or {})
  ref = mo.adamw_fp8(**kw, impl="xla")
  fused = mo.adamw_fp8(**kw, impl=f"pallas_{layout}", interpret=True)
  if block_rows is not None:
    fused = _fused.fused_adamw_fp8(**kw, layout=layout, interpret=True, block_rows=block_rows)
  params = _tree(shapes, 0, scale_spread=False, dtype=params_dtype)
  state = ref.init(params)
  _assert_identical(state, fused.init(params))
  up_ref, up_fused = jax.jit(ref.update), jax.jit(fused.update)
  for step in range(steps):
    grads = _tree(shapes, step + 1)
    u_ref, s_ref = up_ref(grads, state, params)
    u_fused, s_fused = up_fused(grads, state, params)
    _assert_identical((u_ref, s_ref), (u_fused, s_fused))
    params = optax.apply_updates(params, u_ref)
    state = s_ref
  return s_fused


@pytest.mark.slow  # default tier: the GPU layout on the schedule, mask and one-leaf cases
def test_gpu_layout_bit_identical_gpt_shaped():
  """Stochastic rounding (the default), 3 steps; blocks of 16 rows (partial last blocks)."""
  shapes = _gpt_shapes(vocab=260)
  shapes["h0"] = {"ln1": shapes["h0"]["ln1"], "qkv": shapes["h0"]["qkv"]}
  state = _compare(shapes, 2, "gpu", 16)
  adam = state[0]
  assert mo.is_compressed(adam.mu["wte"]) and adam.mu["wte"].rounding == "stochastic"
  assert int(adam.mu["wte"].step) == 2 and int(adam.count) == 2
  assert not mo.is_compressed(adam.mu["ln_f"])  # 128 elements: stays float32
  assert adam.mu["odd"]["narrow"].group_size == 64  # XLA fallback leaf


@pytest.mark.slow  # ~15 s in interpret mode; the default tier lowers this layout to Mosaic
def test_tpu_layout_bit_identical_gpt_shaped():
  state = _compare({"wte": (260, 128), "t": (37, 200), "b": (128,)}, 1, "tpu", 32)
  assert mo.is_compressed(state[0].mu["wte"]) and int(state[0].count) == 1


def test_bit_identical_nearest_schedule_bf16_params():
  """Round to nearest, a learning-rate schedule, default block sizes; BF16 parameters (their
  moments are BF16 too, so every leaf takes the XLA fallback, which matches as well)."""
  sched = optax.warmup_cosine_decay_schedule(0.0, 1e-3, 2, 10)
  nearest = _compare({"w": (40, 384), "t": (37, 200)}, 2, "gpu", None,
                     kw=dict(learning_rate=sched, config={"rounding": "nearest"}))
  assert nearest[0].mu["w"].rounding == "nearest" and int(nearest[0].count) == 2
  bf16 = _compare({"w": (64, 128), "b": (128,)}, 1, "gpu", None,
                  kw=dict(learning_rate=sched, config={"rounding": "nearest"}),
                  params_dtype=jnp.bfloat16)
  assert int(bf16[0].count) == 1


def test_bit_identical_inject_hyperparams_and_one_leaf():
  """Hyperparameters as arrays (inject_hyperparams), and a one-leaf tree (its own XLA form)."""
  _compare({"w": (40, 384)}, 1, "gpu", 8)
  kw = dict(learning_rate=1e-3, weight_decay=0.1)
  inject = optax.inject_hyperparams(mo.adamw_fp8, static_args=("impl", "interpret"))
  ref = inject(**kw, impl="xla")
  fused = inject(**kw, impl="pallas_gpu", interpret=True)
  shapes = {"w": (40, 384), "t": (37, 200), "b": (128,)}
  params = _tree(shapes, 0)
  s_ref = ref.init(params)
  for step in range(2):
    grads = _tree(shapes, step + 1)
    u_ref, s_new = jax.jit(ref.update)(grads, s_ref, params)
    u_fused, s_fused = jax.jit(fused.update)(grads, s_ref, params)
    _assert_identical((u_ref, s_new), (u_fused, s_fused))
    s_ref = s_new


def test_bit_identical_with_weight_decay_mask():
  """The trainer's mask (decay on matrices only) as a callable, and as a tree with a weight
  decay schedule: masked-out leaves still take the kernel, without the decay."""
  shapes = {"w": (40, 384), "t": (37, 200), "b": (384,)}
  matrices = lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)  # noqa: E731
  state = _compare(shapes, 1, "gpu", 8, kw=dict(mask=matrices))
  assert isinstance(state[1], optax.MaskedState)
  wd_sched = optax.linear_schedule(0.1, 0.01, 10)
  state = _compare(shapes, 1, "tpu", 8, kw=dict(
      mask={"w": False, "t": True, "b": False}, weight_decay=wd_sched))
  assert int(state[1].inner_state.count) == 1


@pytest.mark.slow  # default tier: the GPU layout on the schedule, mask and one-leaf cases
def test_kernel_leaf_selection():
  g = jnp.zeros((8, 512))
  opt = mo.adamw_fp8(1e-3)
  state = opt.init({"w": g, "n": jnp.zeros((64, 64)), "b": jnp.zeros((64,))})[0]
  hp, _, dtypes = _fused._pack(dict(c1=0.1, b1=0.9, c2=1e-3, b2=0.999, bc1=1.0, bc2=1.0,
                                    eps=1e-8, eps_root=0.0, wd=0.1, lr=-1e-3))
  assert _fused._kernel_leaf(g, g, state.mu["w"], state.nu["w"], hp, dtypes)
  assert _fused._kernel_leaf(g, g.astype(jnp.bfloat16), state.mu["w"], state.nu["w"], hp, dtypes)
  assert not _fused._kernel_leaf(g.astype(jnp.bfloat16), g, state.mu["w"], state.nu["w"], hp,
                                 dtypes)
  n = jnp.zeros((64, 64))
  assert not _fused._kernel_leaf(n, n, state.mu["n"], state.nu["n"], hp, dtypes)  # group 64
  b = jnp.zeros((64,))
  assert not _fused._kernel_leaf(b, b, state.mu["b"], state.nu["b"], hp, dtypes)  # float32


def test_impl_selection_and_errors():
  on_cpu = mo.adamw_fp8(1e-3)  # 'auto' on CPU: the XLA path
  params = {"w": jnp.zeros((64, 128))}
  assert jax.default_backend() == "cpu"
  assert on_cpu.update.__qualname__.startswith("compress_states")
  fused = mo.adamw_fp8(1e-3, impl="pallas_gpu")
  assert fused.update.__qualname__.startswith("fused_adamw_fp8")
  assert mo.adamw_fp8(1e-3, mask={"w": True}).update.__qualname__.startswith("compress_states")
  with pytest.raises(ValueError, match="impl must be one of"):
    mo.adamw_fp8(1e-3, impl="triton")
  masked = mo.adamw_fp8(1e-3, impl="pallas_gpu", mask={"w": True})
  assert masked.update.__qualname__.startswith("fused_adamw_fp8")
  with pytest.raises(ValueError, match="needs fmt='e4m3'"):
    mo.adamw_fp8(1e-3, impl="pallas_tpu", config={"fmt": "e5m2"})
  # A state from elsewhere gets the XLA path's error.
  with pytest.raises(ValueError, match="expected compressed"):
    fused.update(params, optax.adamw(1e-3).init(params), params)


def _lowered(layout, platform):
  shapes = {"a": (256, 384), "b": (64, 200), "small": (16, 64)}
  params = {k: jnp.zeros(s) for k, s in shapes.items()}
  opt = mo.adamw_fp8(1e-3, impl=f"pallas_{layout}")
  state = jax.eval_shape(opt.init, params)
  return jax.jit(opt.update).trace(params, state, params).lower(
      lowering_platforms=(platform,)).as_text()


def test_gpu_kernel_lowers_to_triton():
  """One Triton call per kernel leaf (a, b; 'small' stays in XLA): no GPU needed."""
  assert _lowered("gpu", "cuda").count("__gpu$xla.gpu.triton") == 2


def test_tpu_kernel_lowers_to_mosaic():
  assert _lowered("tpu", "tpu").count("tpu_custom_call") == 2


@pytest.mark.slow
def test_bit_identical_gpt_small_width():
  """d = 768 (GPT-2 small's width), 2 layers, vocab 2000, both layouts, default blocks; and
  the whole small GPT-shaped tree with blocks of 16 rows."""
  shapes = _gpt_shapes(layers=2, d=768, vocab=2000, ctx=256)
  for layout in ("gpu", "tpu"):
    assert int(_compare(shapes, 2, layout, None)[0].count) == 2
  assert int(_compare(_gpt_shapes(), 3, "gpu", 16)[0].count) == 3


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU: compiles and runs the "
                    "Triton kernel (interpret mode is tested above)")
def test_gpu_kernel_on_device():
  assert _device_agreement("gpu") >= 0.999


@pytest.mark.skipif(jax.default_backend() != "tpu", reason="needs a TPU: compiles and runs the "
                    "Mosaic kernel (interpret mode is tested above)")
def test_tpu_kernel_on_device():
  assert _device_agreement("tpu") >= 0.999


def _device_agreement(layout):
  """The fraction of codes equal to the XLA path's after one step on device (the kernel's
  log2/division may differ from XLA's by an ulp); updates checked within 1e-5 relative."""
  shapes = _gpt_shapes(layers=2, d=768, vocab=2000, ctx=256)
  ref = mo.adamw_fp8(1e-3, weight_decay=0.1, impl="xla")
  fused = mo.adamw_fp8(1e-3, weight_decay=0.1, impl=f"pallas_{layout}")
  params = _tree(shapes, 0, scale_spread=False)
  grads = _tree(shapes, 1)
  s = ref.init(params)
  u_ref, s_ref = jax.jit(ref.update)(grads, s, params)
  u_fused, s_fused = jax.jit(fused.update)(grads, s, params)
  for a, b in zip(jax.tree.leaves(u_ref), jax.tree.leaves(u_fused), strict=False):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-12)
  codes = [(np.asarray(a.codes).view(np.uint8), np.asarray(b.codes).view(np.uint8))
           for a, b in zip(jax.tree.leaves(s_ref, is_leaf=mo.is_compressed),
                           jax.tree.leaves(s_fused, is_leaf=mo.is_compressed), strict=False)
           if mo.is_compressed(a)]
  return sum(int((a == b).sum()) for a, b in codes) / sum(a.size for a, _ in codes)


def test_split_leaves_take_the_xla_path():
  """A kernel is one custom call, which XLA's partitioner would run on whole, gathered leaves:
  under a mesh that splits the state (fsdp, or Explicit shardings) no leaf reaches it; under
  data parallelism alone (replicated state) and without a mesh both kernel leaves do."""
  def triton_calls(shape, names, axis_type=jax.sharding.AxisType.Auto, spec=None):
    mesh = jax.make_mesh(shape, names, axis_types=(axis_type,) * len(names))
    params = {k: jnp.zeros(s) for k, s in {"a": (256, 384), "b": (64, 200)}.items()}
    opt = mo.adamw_fp8(1e-3, impl="pallas_gpu")
    with jax.set_mesh(mesh):
      if spec is not None:
        params = jax.device_put(params, jax.sharding.NamedSharding(mesh, spec))
      state = jax.eval_shape(opt.init, params)
      text = jax.jit(opt.update).trace(params, state, params).lower(
          lowering_platforms=("cuda",)).as_text()
    return text.count("__gpu$xla.gpu.triton")

  assert triton_calls((8,), ("fsdp",)) == 0
  assert triton_calls((2, 4), ("data", "fsdp")) == 0
  assert triton_calls((8,), ("data",)) == 2
  explicit = jax.sharding.AxisType.Explicit
  assert triton_calls((8,), ("data",), explicit, jax.sharding.PartitionSpec("data")) == 0
  assert triton_calls((8,), ("data",), explicit) == 2


def test_split_leaves_take_the_xla_path_without_set_mesh():
  """Leaves placed on an Auto mesh, no `jax.set_mesh`: the mesh in their type decides."""
  def triton_calls(names, spec):
    mesh = jax.make_mesh((8,), names, axis_types=(jax.sharding.AxisType.Auto,))
    put = lambda x: jax.device_put(x, jax.sharding.NamedSharding(mesh, spec))  # noqa: E731
    params = {k: put(jnp.zeros(s)) for k, s in {"a": (256, 384), "b": (64, 200)}.items()}
    opt = mo.adamw_fp8(1e-3, impl="pallas_gpu")
    state = jax.eval_shape(opt.init, params)
    text = jax.jit(opt.update).trace(params, state, params).lower(
        lowering_platforms=("cuda",)).as_text()
    return text.count("__gpu$xla.gpu.triton")

  assert triton_calls(("fsdp",), jax.sharding.PartitionSpec("fsdp")) == 0
  assert triton_calls(("data",), jax.sharding.PartitionSpec()) == 2
