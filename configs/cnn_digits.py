"""A BatchNorm CNN on scikit-learn's bundled 8x8 digits (no download).

Command:  .venv/bin/python -m mpxla.train --config=configs/cnn_digits.py --workdir=workdirs/cnn
          variants: configs/cnn_digits.py:local, :ghost (ghost batches of 16)
Hardware: 2 CPU cores, under a minute.
Expected: validation accuracy ~0.97 after 300 steps (global statistics; see docs/train.md).
"""

import ml_collections


def get_config(variant: str = "global") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.recipe = "bf16"  # the CNN computes in float32 (model.dtype); states are plain AdamW
  c.total_steps = 300
  c.log_every = 20
  c.eval_every = 100
  c.eval_batches = 0  # one exact pass over the 180 validation images
  c.checkpoint_every = 100
  c.keep_checkpoints = 2
  c.progress = True
  c.plot = True
  c.fp8_stats_every = 0  # > 0: per-layer FP8 statistics every N steps (docs/nn.md)
  c.model = ml_collections.ConfigDict(dict(
      name="cnn", num_classes=10, widths=[32, 64], dtype="float32",
      bn_scope="local" if variant == "local" else "global",
      ghost_batch_size=16 if variant == "ghost" else 0,
      # 'local' statistics are per device: name the batch's mesh axes.
      bn_axis_name=["data", "fsdp", "expert"] if variant == "local" else None))
  c.data = ml_collections.ConfigDict(dict(name="digits", batch_size=128, image_shape=[8, 8, 1]))
  # decay_steps=None: the cosine decay lasts total_steps (an override of total_steps follows).
  c.optim = ml_collections.ConfigDict(dict(
      lr=3e-3, warmup_steps=20, decay_steps=None, final_lr_fraction=0.1, b1=0.9, b2=0.999,
      eps=1e-8, weight_decay=1e-4, grad_clip=0.0))
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  return c
