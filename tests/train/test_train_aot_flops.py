"""`--aot`'s JSON holds the compiled train step's FLOPs per device (XLA's cost analysis)."""

import json
import os
import subprocess
import sys

import pytest

from mpxla.train.trainer import Trainer

TINY = ["--config.model.d_model=32", "--config.model.n_layers=2", "--config.model.n_heads=2",
        "--config.model.n_kv_heads=1", "--config.model.d_ff=64",
        "--config.model.attention_impl='dense_jax'", "--config.data.seq_len=32",
        "--config.data.batch_size=8", "--config.progress=False"]


class _Compiled:
  def __init__(self, cost):
    self.cost = cost

  def cost_analysis(self):
    return self.cost


@pytest.mark.parametrize("cost,want", [({"flops": 12.0, "bytes accessed": 3.0}, 12.0),
                                       ([{"flops": 7}], 7.0), ([], None), (None, None),
                                       ({"bytes accessed": 1.0}, None)])
def test_compiled_flops_reads_every_return_shape(cost, want):
  assert Trainer.compiled_flops(_Compiled(cost)) == want


def test_aot_json_has_the_step_flops_per_device():
  # 8 data-parallel devices (simulated by --aot), 8 x 31 tokens: 31 per device.
  r = subprocess.run([sys.executable, "-m", "mpxla.train", "--config=configs/gpt_tiny.py", "--aot",
                      *TINY, "--config.mesh.data=8"], capture_output=True, text=True,
                     timeout=180, env={**os.environ, "XLA_FLAGS": ""})
  assert r.returncode == 0, r.stderr[-2000:]
  out = json.loads(r.stdout[r.stdout.index("{"):])
  # Matmul parameters: per layer q, out 32x32, k, v 32x16, gate/up/down 32x64; lm head 32x256.
  matmul_params = 2 * (2 * 32 * 32 + 2 * 32 * 16 + 3 * 32 * 64) + 32 * 256
  forward_backward = 6 * matmul_params * 31  # 2 (multiply-add) x 3 (forward, dx, dw)
  assert forward_backward <= out["flops"] <= 3 * forward_backward, out["flops"]
  assert out["params"] > 0  # the memory breakdown is still there
