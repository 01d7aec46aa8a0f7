"""Real multi-process runs: 2 processes x 2 CPU devices over gloo vs 1 process x 4 devices.

Every subprocess has a timeout, and each worker has its own watchdog, so a failure ends the
test in bounded time instead of hanging the suite.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

WORKER = pathlib.Path(__file__).with_name("_mp_worker.py")
REPO = pathlib.Path(__file__).resolve().parents[2]
TIMEOUT_S = 120  # per subprocess; a healthy run takes a few seconds after start-up


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def env_for(devices: int, coordinator=None, num_processes=None, process_id=None) -> dict:
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("JAX_COORDINATOR", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
                              "SLURM_", "TPU_"))}
  # LLVM -O0 compiles the CPU programs ~35% faster; every run here uses the same flags.
  env["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count={devices} "
                      "--xla_backend_optimization_level=0")
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
  if coordinator is not None:
    env["JAX_COORDINATOR_ADDRESS"] = coordinator
    env["JAX_NUM_PROCESSES"] = str(num_processes)
    env["JAX_PROCESS_ID"] = str(process_id)
  return env


def start(out, mode, env, watchdog_s=TIMEOUT_S - 10, init_timeout_s=30):
  return subprocess.Popen([sys.executable, str(WORKER), str(out), mode, str(watchdog_s),
                           str(init_timeout_s)],
                          env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)


def finish(procs, timeout):
  """Waits for every process; kills them all and fails on a timeout or a bad exit."""
  deadline = time.monotonic() + timeout
  outputs = []
  try:
    for p in procs:
      outputs.append(p.communicate(timeout=max(1.0, deadline - time.monotonic())))
  except subprocess.TimeoutExpired:
    for p in procs:
      p.kill()
    pytest.fail(f"worker timed out after {timeout} s")
  for p, (out, err) in zip(procs, outputs, strict=True):
    assert p.returncode == 0, f"worker exited with {p.returncode}:\n{out}\n{err[-3000:]}"


def test_two_processes_equal_one_process(tmp_path):
  port = free_port()
  coord = f"127.0.0.1:{port}"
  ref = start(tmp_path / "ref.json", "train", env_for(4))
  workers = [start(tmp_path / f"p{i}.json", "train", env_for(2, coord, 2, i)) for i in range(2)]
  finish([ref, *workers], TIMEOUT_S)
  single = json.loads((tmp_path / "ref.json").read_text())
  multi = [json.loads((tmp_path / f"p{i}.json").read_text()) for i in range(2)]

  assert (single["process_count"], single["device_count"], single["source"]) == (1, 4, "single")
  for m in multi:
    assert (m["process_count"], m["device_count"], m["source"]) == (2, 4, "env")
  assert multi[0] == multi[1]  # every host sees the same replicated results, bit for bit
  for view in ("shard_map", "jit"):
    for step, (got, want) in enumerate(zip(multi[0][view], single[view], strict=True)):
      for key in ("loss", "mse", "lbl", "gnorm", "amax", "host_mean_y", "bn_mean", "bn_var"):
        np.testing.assert_allclose(got[key], want[key], rtol=1e-6, atol=1e-7,
                                   err_msg=f"{view} step {step}: {key}")
  # The two views agree too (the same model, one with explicit psums, one under jit).
  for a, b in zip(single["shard_map"], single["jit"], strict=True):
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-6)
  # The padding (x = 1e3 in 3 rows of process 0) never reaches a statistic.
  assert max(r["amax"] for r in single["jit"]) < 100
  # Independent check of the host-level metric over uneven per-process rows.
  rng = np.random.default_rng(100)
  x = rng.standard_normal((16, 8)).astype(np.float32)
  y = (x[:, 0] * 2 - x[:, 1] + 0.1 * rng.standard_normal(16)).astype(np.float32)
  valid = np.r_[0:5, 8:16]
  np.testing.assert_allclose(multi[0]["jit"][0]["host_mean_y"], y[valid].mean(), rtol=1e-6)


def test_killed_worker_ends_the_other_in_bounded_time(tmp_path):
  coord = f"127.0.0.1:{free_port()}"
  procs = [start(tmp_path / f"p{i}.json", "loop", env_for(2, coord, 2, i)) for i in range(2)]
  try:
    deadline = time.monotonic() + TIMEOUT_S
    while not all((tmp_path / f"p{i}.json").exists() for i in range(2)):
      if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
        pytest.fail("workers did not start: " + "".join(p.communicate(timeout=5)[1][-2000:]
                                                         for p in procs if p.poll() is not None))
      time.sleep(0.2)
    procs[1].kill()  # SIGKILL mid-run, while process 0 keeps issuing collectives
    t0 = time.monotonic()
    _, err = procs[0].communicate(timeout=60)
    elapsed = time.monotonic() - t0
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  assert procs[0].returncode != 0
  assert elapsed < 40, elapsed  # heartbeat timeout 5 s; the watchdog would take far longer
  assert "another task died" in err or "stopped sending heartbeats" in err, err[-3000:]


def test_missing_peer_at_start_up_fails_in_bounded_time(tmp_path):
  coord = f"127.0.0.1:{free_port()}"
  proc = start(tmp_path / "p0.json", "train", env_for(2, coord, 2, 0), init_timeout_s=3)
  t0 = time.monotonic()
  try:
    _, err = proc.communicate(timeout=60)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode != 0 and time.monotonic() - t0 < 40
  assert "DEADLINE_EXCEEDED" in err or "timed out" in err.lower(), err[-3000:]


MOE_TRAIN = ["-m", "mpxla.train", "--config=configs/gpt_tiny.py:moe", "--config.model.d_model=32",
             "--config.model.n_layers=2", "--config.model.n_heads=2", "--config.model.n_kv_heads=1",
             "--config.model.d_ff=64", "--config.model.moe_d_ff=32",
             "--config.model.attention_impl='dense_jax'", "--config.model.dtype='float32'",
             "--config.data.seq_len=32", "--config.data.batch_size=8", "--config.total_steps=3",
             "--config.log_every=1", "--config.eval_every=100", "--config.eval_batches=1",
             "--config.checkpoint_every=100", "--config.progress=False", "--config.plot=False",
             "--config.optim.warmup_steps=1", "--config.mesh.data=1", "--config.mesh.expert=4"]


def train_moe(workdir, env, cache):
  env = {**env, "MPXLA_CPU_COLLECTIVES": "gloo", "MPXLA_CACHE": str(cache)}
  return subprocess.Popen([sys.executable, *MOE_TRAIN, f"--workdir={workdir}"], env=env,
                          cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_expert_parallel_moe_gpt_two_processes_equal_one_process(tmp_path):
  """The MoE GPT, experts over 'expert' = 4 devices across 2 processes (the all-to-alls cross
  them over gloo): the losses and gradient norms of 3 steps equal 1 process x 4 devices'
  (`python -m mpxla.train` in each; slow: ~2.5 min on 2 busy cores)."""
  coord = f"127.0.0.1:{free_port()}"
  ref = train_moe(tmp_path / "ref", env_for(4), tmp_path / "cache_ref")
  workers = [train_moe(tmp_path / "multi", env_for(2, coord, 2, i), tmp_path / f"cache{i}")
             for i in range(2)]
  finish([ref, *workers], TIMEOUT_S * 2)
  read = lambda w: [json.loads(line) for line in  # noqa: E731
                    (w / "metrics.jsonl").read_text().splitlines()]
  single = [r for r in read(tmp_path / "ref") if "loss" in r]
  multi = [r for r in read(tmp_path / "multi") if "loss" in r]
  assert [r["step"] for r in single] == [r["step"] for r in multi] == [1, 2, 3]
  for a, b in zip(multi, single, strict=True):
    for key in ("loss", "grad_norm"):
      np.testing.assert_allclose(a[key], b[key], rtol=1e-5, err_msg=f"step {a['step']}: {key}")
  assert single[-1]["loss"] < single[0]["loss"]
