"""Ghost BatchNorm at a large global batch: configs/cnn_digits.py:VARIANT on 8 CPU devices.

Command:  python experiments/ghost_bn.py                  (get_config("full"): global batch 1024,
          60 steps, 3 seeds, lr 3e-3 and 3e-3 * sqrt(8); about 6 CPU-min, 19 min wall)
          python experiments/ghost_bn.py --quick --out DIR (get_config("quick"): a narrow CNN,
          batch 128, 3 steps)
Expected (docs/results.md section 6): every run ends between 98% and 100% validation accuracy;
ghost batches of 16 give the lowest validation loss in every seed at both learning rates.

Method: each run is mpxla's own Trainer (`configs/cnn_digits.py:VARIANT`) in this process on 8
simulated CPU devices (mesh data=8), global batch 1024 images (128 per device; the training set has 1617 images), for the variants

  global  BatchNorm statistics over the whole global batch of 1024
  local   statistics per device shard (128 images)
  ghost   statistics per ghost batch of 16 consecutive images (64 groups)

at two learning rates: the config's 3e-3 and 3e-3 * sqrt(8) ~ 8.5e-3 (square-root scaling for an
8x larger batch than the config's 128, as Hoffer et al. 2017 pair with ghost batches). The
warmup/cosine schedule is stretched to the step count. Validation (the 180 held-out images, one
exact pass, BatchNorm with running averages) runs every `eval_every` steps; the table gives final
accuracy and loss with mean and spread over seeds.
"""

import ml_collections


def get_config(arg: str = "full") -> ml_collections.ConfigDict:
  if arg == "full":
    return ml_collections.ConfigDict(dict(
        batch=1024, steps=60, eval_every=6, evals=10, seeds=(0, 1, 2),
        lrs=(3e-3, 3e-3 * 8 ** 0.5), widths=None))
  if arg == "quick":
    return ml_collections.ConfigDict(dict(
        batch=128, steps=3, eval_every=3, evals=10, seeds=(0,), lrs=(3e-3,), widths=[8]))
  raise ValueError(f"get_config({arg!r}): use 'full' or 'quick'.")
