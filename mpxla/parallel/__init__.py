"""Global-batch statistics across devices and hosts (docs/parallel.md).

- `mesh`: `MeshConfig`, `make_mesh` (axes data/fsdp/tensor/expert), `DEFAULT_RULES`
  (logical axes), `state_shardings`, `global_batch` (per-process rows -> global arrays).
- `distributed`: `initialize()` for multi-host (JAX_*, SLURM, TPU VM; no-op on one host).
- `stats`: global/local/ghost mean, variance and FP8 amax/scale; the `axis_name` views.
- `metrics`: weighted means, token counts, gradient norm, `Average`.
- `moe`: `load_balancing_loss` with scope 'global' | 'micro_batch' | 'sequence' and the
  gradient-accumulation count buffer.
- `experts`: expert parallelism (experts sharded over 'expert', tokens by all-to-all).
"""

from mpxla.parallel import distributed, experts, mesh, metrics, moe, stats
from mpxla.parallel.distributed import DistributedSpec, initialize
from mpxla.parallel.mesh import (
    BATCH_AXES,
    DEFAULT_RULES,
    MESH_AXES,
    MeshConfig,
    batch_axes,
    batch_sharding,
    global_batch,
    make_mesh,
    state_shardings,
)
from mpxla.parallel.metrics import Average, count, global_norm, weighted_mean
from mpxla.parallel.moe import (
    init_count_buffer,
    load_balancing_loss,
    load_balancing_loss_with_buffer,
    reset_count_buffer,
)
from mpxla.parallel.stats import (
    global_amax,
    global_mean,
    global_mean_and_var,
    global_scale,
    global_sum,
)

__all__ = [
    "BATCH_AXES",
    "DEFAULT_RULES",
    "MESH_AXES",
    "Average",
    "DistributedSpec",
    "MeshConfig",
    "batch_axes",
    "batch_sharding",
    "count",
    "distributed",
    "experts",
    "global_amax",
    "global_batch",
    "global_mean",
    "global_mean_and_var",
    "global_norm",
    "global_scale",
    "global_sum",
    "init_count_buffer",
    "initialize",
    "load_balancing_loss",
    "load_balancing_loss_with_buffer",
    "make_mesh",
    "mesh",
    "metrics",
    "moe",
    "reset_count_buffer",
    "state_shardings",
    "stats",
    "weighted_mean",
]
