"""The trainer's recipes are mpxla.nn's registry: every model recipe has a trainer recipe."""

import math

from mpxla import nn as mnn
from mpxla.train import recipes
from mpxla.train.monitor import read_metrics
from mpxla.train.trainer import Trainer


def test_trainer_recipes_are_the_nn_registry():
  assert set(recipes.RECIPES) == set(mnn.RECIPES)
  assert set(recipes.FP8_STATE_RECIPES) <= set(recipes.RECIPES)


def test_fp8_block_trains(tiny_config, tmp_path):
  dense = {"model.attention_impl": "'dense_jax'"}
  Trainer(tiny_config(total_steps="2", recipe="'fp8_block'", **dense), tmp_path / "block").run()
  Trainer(tiny_config(total_steps="2", **dense), tmp_path / "bf16").run()
  block = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "block") if "loss" in r}
  bf16 = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "bf16") if "loss" in r}
  assert sorted(block) == [1, 2] and all(math.isfinite(v) for v in block.values())
  # Same initial weights and batch: the FP8 block-scaled forward is close to bf16's, not equal.
  assert block[1] != bf16[1] and abs(block[1] - bf16[1]) < 0.01 * bf16[1], (block, bf16)
