"""The trainer's recipes are mpxla.nn's registry: every model recipe has a trainer recipe."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mpxla import nn as mnn
from mpxla import optim as mo
from mpxla.train import checkpoint, recipes
from mpxla.train.monitor import read_metrics
from mpxla.train.trainer import Trainer


def test_trainer_recipes_are_the_nn_registry():
  assert set(recipes.RECIPES) == set(mnn.RECIPES)
  assert set(recipes.FP8_STATE_RECIPES) <= set(recipes.RECIPES)


@pytest.mark.slow  # several trainer compiles
def test_fp8_block_trains(tiny_config, tmp_path):
  dense = {"model.attention_impl": "'dense_jax'"}
  Trainer(tiny_config(total_steps="2", recipe="'fp8_block'", **dense), tmp_path / "block").run()
  Trainer(tiny_config(total_steps="2", **dense), tmp_path / "bf16").run()
  block = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "block") if "loss" in r}
  bf16 = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "bf16") if "loss" in r}
  assert sorted(block) == [1, 2] and all(math.isfinite(v) for v in block.values())
  # Same initial weights and batch: the FP8 block-scaled forward is close to bf16's, not equal.
  assert block[1] != bf16[1] and abs(block[1] - bf16[1]) < 0.01 * bf16[1], (block, bf16)


@pytest.mark.parametrize("recipe", ["bf16_sr", "coat_sr"])
def test_bf16_parameter_recipes_keep_no_float32_copy(recipe, tiny_config):
  state = Trainer(tiny_config(recipe=f"'{recipe}'"), "/nonexistent").abstract_state()
  params = jax.tree.leaves(state["params"])
  assert params and all(p.dtype == jnp.bfloat16 for p in params)
  moments = [x for x in jax.tree.leaves(state["opt_state"]) if x.size >= mo.LeafConfig().min_size]
  if recipe == "coat_sr":  # every state array of a compressed size is 8-bit codes
    assert moments and all(x.dtype.itemsize == 1 for x in moments), {x.dtype for x in moments}
  else:  # the bf16 baseline's float32 moments (computed in float32 from BF16 gradients)
    assert moments and all(x.dtype == jnp.float32 for x in moments)


@pytest.mark.slow  # several trainer compiles
def test_coat_sr_trains_and_resumes_bit_exactly(tiny_config, tmp_path):
  dense = {"model.attention_impl": "'dense_jax'", "recipe": "'coat_sr'"}
  Trainer(tiny_config(**dense), tmp_path / "full").run()
  Trainer(tiny_config(total_steps="3", **dense), tmp_path / "split").run()
  Trainer(tiny_config(**dense), tmp_path / "split").run()
  a = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "full") if "loss" in r}
  b = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "split") if "loss" in r}
  assert sorted(a) == sorted(b) == list(range(1, 7))
  assert a == b  # bit-identical at every step: the rounding bits come from the step
  assert a[6] < a[1]
  # Its checkpoint restores onto an FSDP layout bit for bit (BF16 params, FP8 moments).
  abstract = {n: Trainer(tiny_config(**dense, **mesh), tmp_path / "split").abstract_state()
              for n, mesh in (("fsdp", {"mesh.data": "2", "mesh.fsdp": "4"}), ("data", {}))}
  restored = {}
  for n, state in abstract.items():
    ckpt = checkpoint.Checkpointer(tmp_path / "split" / "checkpoints", keep=3)
    restored[n], _ = ckpt.restore(6, state)
    ckpt.close()
  for x, y in zip(jax.tree.leaves(restored["fsdp"]), jax.tree.leaves(restored["data"]),
                  strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert any("fsdp" in str(x.sharding.spec) for x in jax.tree.leaves(restored["fsdp"]["params"]))
