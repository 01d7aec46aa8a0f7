"""Multi-host start-up: one `initialize()` that reads the usual environments.

Sources, in order (the first that applies wins):

  1. explicit arguments to `initialize`;
  2. JAX_COORDINATOR_ADDRESS ("host:port"), JAX_NUM_PROCESSES, JAX_PROCESS_ID
     (all three, or JAX_COORDINATOR_ADDRESS alone on a SLURM/TPU cluster);
  3. SLURM (SLURM_JOB_ID, SLURM_STEP_NODELIST, SLURM_NTASKS, SLURM_PROCID,
     SLURM_LOCALID; SLURM_NTASKS > 1): JAX's SLURM detection picks the coordinator
     (the first node of the step, port from the job id or JAX_COORDINATOR_PORT);
  4. a multi-host Cloud TPU VM or GKE TPU slice (TPU_WORKER_HOSTNAMES or
     TPU_PROCESS_ADDRESSES listing more than one host, or MEGASCALE_COORDINATOR_ADDRESS
     for multi-slice): JAX's TPU detection;
  5. otherwise one host: nothing to do (no-op).

Must run before any other JAX call. Timeouts are explicit so that a missing peer ends
in an error, never a hang: `initialization_timeout` bounds the start-up barrier and
`heartbeat_timeout` bounds how long the survivors of a dead process wait (JAX then
terminates them with "the JAX distributed service detected fatal errors").
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence

import jax


@dataclasses.dataclass(frozen=True)
class DistributedSpec:
  """What `initialize` starts. `coordinator_address` etc. are None where JAX detects them."""

  source: str  # 'args', 'env', 'slurm', 'tpu' or 'single'
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  cluster_detection_method: str | None = None

  @property
  def multi_process(self) -> bool:
    return self.source != "single"


def _int(environ: Mapping[str, str], key: str) -> int | None:
  v = environ.get(key)
  if v is None or v == "":
    return None
  try:
    return int(v)
  except ValueError:
    raise ValueError(f"environment variable {key}={v!r} is not an integer.") from None


def _check(spec: DistributedSpec) -> DistributedSpec:
  n, i, addr = spec.num_processes, spec.process_id, spec.coordinator_address
  if n is not None and n < 1:
    raise ValueError(f"num_processes must be >= 1, got {n} (from {spec.source}).")
  if n is not None and i is not None and not 0 <= i < n:
    raise ValueError(f"process_id must be in [0, {n}), got {i} (from {spec.source}).")
  if addr is not None and (":" not in addr or not addr.rsplit(":", 1)[1].isdigit()):
    raise ValueError(
        f"coordinator address {addr!r} (from {spec.source}) must be 'host:port', e.g. "
        "'10.0.0.1:1234'."
    )
  return spec


def resolve(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    environ: Mapping[str, str] | None = None,
) -> DistributedSpec:
  """Works out what `initialize` would start, from arguments and `environ` (default os.environ)."""
  env = os.environ if environ is None else environ
  given = (coordinator_address, num_processes, process_id)
  if any(v is not None for v in given):
    if num_processes == 1:
      return DistributedSpec("single", num_processes=1, process_id=0)
    if None in given:
      raise ValueError(
          "initialize(coordinator_address, num_processes, process_id) needs all three when "
          f"any is given; got {dict(zip(('coordinator_address', 'num_processes', 'process_id'), given, strict=True))}."
      )
    return _check(DistributedSpec("args", *given))

  addr = env.get("JAX_COORDINATOR_ADDRESS") or None
  n, i = _int(env, "JAX_NUM_PROCESSES"), _int(env, "JAX_PROCESS_ID")
  slurm_keys = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
                "SLURM_LOCALID")
  on_slurm = all(k in env for k in slurm_keys) and (_int(env, "SLURM_NTASKS") or 1) > 1
  hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES") or ""
  on_tpu = len([h for h in hosts.split(",") if h.strip()]) > 1 or bool(
      env.get("MEGASCALE_COORDINATOR_ADDRESS"))

  if n is not None or i is not None:
    if n == 1:
      return DistributedSpec("single", num_processes=1, process_id=0)
    if addr is None or n is None or i is None:
      raise ValueError(
          "set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID together; got "
          f"JAX_COORDINATOR_ADDRESS={addr!r}, JAX_NUM_PROCESSES={n!r}, JAX_PROCESS_ID={i!r}."
      )
    return _check(DistributedSpec("env", addr, n, i))
  if on_slurm:
    return _check(DistributedSpec(
        "slurm", addr, _int(env, "SLURM_NTASKS"), _int(env, "SLURM_PROCID"), "slurm"))
  if on_tpu:
    return _check(DistributedSpec("tpu", addr))
  if addr is not None:
    raise ValueError(
        f"JAX_COORDINATOR_ADDRESS={addr!r} is set but neither JAX_NUM_PROCESSES/"
        "JAX_PROCESS_ID nor a SLURM or multi-host TPU environment says how many processes "
        "there are."
    )
  return DistributedSpec("single", num_processes=1, process_id=0)


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    local_device_ids: int | Sequence[int] | None = None,
    initialization_timeout: int = 300,
    heartbeat_timeout: int = 100,
) -> DistributedSpec:
  """Starts JAX's distributed runtime where the environment asks for it; else a no-op.

  Idempotent: if the runtime is already up, returns without starting it again. Returns the
  resolved `DistributedSpec` (`.multi_process` is False on one host).
  """
  spec = resolve(coordinator_address, num_processes, process_id)
  if not spec.multi_process or jax.distributed.is_initialized():
    return spec
  jax.distributed.initialize(
      spec.coordinator_address,
      spec.num_processes,
      spec.process_id,
      local_device_ids=local_device_ids,
      cluster_detection_method=spec.cluster_detection_method,
      initialization_timeout=initialization_timeout,
      heartbeat_timeout_seconds=heartbeat_timeout,
  )
  return spec
