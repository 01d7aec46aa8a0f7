"""Worker for test_parallel_multiprocess.py: a few training steps of a BatchNorm + MoE model.

    python _mp_worker.py OUT_JSON MODE [WATCHDOG_S [INIT_TIMEOUT_S]]

MODE 'train': 3 steps in a shard_map train step and 3 in a jit train step, on a
(data=2, fsdp=2) mesh over every device of every process; the global batch of 16 rows is
split by process (process p holds rows [8p, 8p + 8)), with uneven padding per process.
MODE 'loop': train-free psum steps forever, writing OUT_JSON after the first one (the
parent kills a peer and checks that this process ends in bounded time).

Multi-process runs get JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID from
the parent (read by mpxla.parallel.initialize); without them it is one process. A
faulthandler watchdog ends the process (exit 1, with a traceback) after WATCHDOG_S.
"""

import faulthandler
import json
import sys

OUT, MODE = sys.argv[1], sys.argv[2]
WATCHDOG_S = float(sys.argv[3]) if len(sys.argv) > 3 else 60.0
INIT_TIMEOUT_S = int(sys.argv[4]) if len(sys.argv) > 4 else 30
faulthandler.dump_traceback_later(WATCHDOG_S, exit=True)

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")

from mpxla.nn.batch_norm import BatchNorm  # noqa: E402
from mpxla.nn.moe import MoE  # noqa: E402
from mpxla.parallel import (  # noqa: E402
    Average,
    MeshConfig,
    global_amax,
    global_batch,
    global_norm,
    initialize,
    make_mesh,
    weighted_mean,
)

spec = initialize(initialization_timeout=INIT_TIMEOUT_S, heartbeat_timeout=5)
PID, NPROC = jax.process_index(), jax.process_count()
MESH = make_mesh(MeshConfig(data=2, fsdp=2))
AX = ("data", "fsdp")
GLOBAL_B, LR, STEPS = 16, 0.1, 3


class Net(nn.Module):
  @nn.compact
  def __call__(self, x, mask, train: bool):
    h = nn.Dense(16)(x)
    h = BatchNorm(axis_name=AX, momentum=0.9)(h, use_running_average=not train,
                                              mask=mask[:, None])
    amax = global_amax(h, axis_name=AX, where=mask[:, None])  # FP8 amax of this activation
    h = h + MoE(num_experts=4, d_ff=16, top_k=2, axis_name=AX)(nn.relu(h), mask=mask)
    return nn.Dense(1)(h)[:, 0], amax


MODEL = Net()


def batch(step):
  """The global batch of `step` (same on every process) and this process's rows of it."""
  rng = np.random.default_rng(100 + step)
  x = rng.standard_normal((GLOBAL_B, 8)).astype(np.float32)
  y = (x[:, 0] * 2 - x[:, 1] + 0.1 * rng.standard_normal(GLOBAL_B)).astype(np.float32)
  mask = np.ones(GLOBAL_B, bool)
  mask[5:8] = False  # process 0 (rows 0-7) has 5 real rows, process 1 has 8
  x[~mask] = 1e3  # padding garbage must not leak into any statistic
  rows = slice(PID * GLOBAL_B // NPROC, (PID + 1) * GLOBAL_B // NPROC)
  return {"x": x[rows], "y": y[rows], "mask": mask[rows]}


def step_fn(params, batch_stats, x, y, mask):
  def loss_fn(p):
    (pred, amax), new = MODEL.apply({"params": p, "batch_stats": batch_stats}, x, mask, True,
                                    mutable=["batch_stats", "intermediates"])
    mse = weighted_mean((pred - y) ** 2, mask, axis_name=AX)
    lbl = new["intermediates"]["MoE_0"]["aux_loss"][0]
    return mse + 0.01 * lbl, (new["batch_stats"], amax, mse, lbl)

  (loss, (new_stats, amax, mse, lbl)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  gnorm = global_norm(grads)
  params = jax.tree.map(lambda p, g: p - LR * g, params, grads)
  return params, new_stats, {"loss": loss, "mse": mse, "lbl": lbl, "gnorm": gnorm,
                             "amax": amax}


def train():
  init_b = global_batch(batch(0), MESH)
  with jax.set_mesh(MESH):
    variables = jax.jit(lambda b: MODEL.init(jax.random.key(0), b["x"], b["mask"], False))(init_b)
  views = {
      "shard_map": jax.jit(jax.shard_map(step_fn, mesh=MESH,
                                         in_specs=(P(), P(), P(AX), P(AX), P(AX)),
                                         out_specs=(P(), P(), P()))),
      "jit": jax.jit(step_fn),
  }
  out = {"process_count": NPROC, "device_count": jax.device_count(), "source": spec.source}
  for view, fn in views.items():
    params, stats = variables["params"], variables["batch_stats"]
    log = []
    for step in range(STEPS):
      local = batch(step)
      b = global_batch(local, MESH)
      with jax.set_mesh(MESH):
        params, stats, m = fn(params, stats, b["x"], b["y"], b["mask"])
      rec = {k: float(v) for k, v in m.items()}
      rec["bn_mean"] = np.asarray(stats["BatchNorm_0"]["mean"]).tolist()
      rec["bn_var"] = np.asarray(stats["BatchNorm_0"]["var"]).tolist()
      # A host-side metric over uneven per-process data: mean target of the real rows.
      avg = Average.from_values(local["y"], local["mask"]).across_processes()
      rec["host_mean_y"] = float(avg.compute())
      log.append(rec)
    out[view] = log
  return out


def loop():
  f = jax.jit(jax.shard_map(lambda v: jax.lax.psum(v, AX), mesh=MESH, in_specs=P(AX),
                            out_specs=P()))
  x = global_batch(np.ones((4 // NPROC, 1), np.float32), MESH)
  np.asarray(f(x))
  with open(OUT, "w") as fh:
    json.dump({"ready": True}, fh)
  while True:
    np.asarray(f(x))


if __name__ == "__main__":
  result = train() if MODE == "train" else loop()
  with open(OUT, "w") as fh:
    json.dump(result, fh)
  print(f"process {PID}: done", flush=True)
