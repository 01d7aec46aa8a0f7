"""FSDP with an FP8 recipe: the weights' all-gathers in the compiled step move 1-byte codes."""

import numpy as np
import pytest

from mpxla.train import monitor
from mpxla.train.trainer import Trainer

FSDP = {"model.attention_impl": "'dense_jax'", "mesh.data": "1", "mesh.fsdp": "8"}


@pytest.mark.slow  # two 8-device compiles; the matmul-level HLO test is in tests/nn
def test_fsdp_fp8_step_gathers_weights_as_uint8(tiny_config):
  fp8 = Trainer(tiny_config(recipe="'fp8_linear'", **FSDP), "/nonexistent")
  params = fp8.abstract_state()["params"]
  kernels = {tuple(p["kernel"].shape) for name in ("query", "key", "value", "out")
             for p in [params["layer_0"]["attn"][name]]}
  kernels |= {tuple(params["layer_0"]["mlp"][n]["kernel"].shape) for n in ("gate", "up", "down")}
  gathers = monitor.all_gathers(fp8.compile_train_step().as_text())
  weight_gathers = [(t, s) for t, s in gathers if s in kernels]
  assert weight_gathers and all(t == "u8" for t, _ in weight_gathers), gathers
  bf16 = monitor.all_gathers(Trainer(tiny_config(**FSDP), "/nonexistent")
                             .compile_train_step().as_text())
  assert any(s in kernels and t in ("f32", "bf16") for t, s in bf16)  # what FP8 replaces
  assert monitor.all_gather_bytes("%a = u8[4,8]{1,0} all-gather(%b), dims={0}\\n"
                                  "%c = f32[2]{0} all-gather-start(%d)") == 32 + 8
  assert np.prod((4, 8)) == 32
