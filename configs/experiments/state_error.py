"""Optimizer-state quantization error (COAT's Table 1 layout) from real AdamW moments.

Command:  python experiments/state_error.py                  (get_config("full"): the parity
          run's bf16 seed-0 moments, experiments/results/parity/runs/moments_bf16_s0.npz; 30 s)
          python experiments/state_error.py --quick --out DIR (get_config("quick"): the moments of
          a tiny GPT trained here for 20 steps)
Expected (docs/results.md section 3): expansion lowers E4M3/E4M3's normalized MSE of
m/(sqrt(v)+eps) about 100x (0.0396 -> 0.000374); HiF8 without expansion stays 32x above it.

Input: the float32 moments m (mu) and v (nu) of the parity run's bf16 seed-0 model after its last
step (`<parity>/runs/moments_bf16_s0.npz`, written by experiments/parity.py). In quick mode, or
if that file is missing, a tiny GPT is trained for a few steps here and its moments are used.

Each moment goes through mpxla.optim's codec (compress -> decompress, groups of 128 along each
leaf's last axis, every leaf compressed) in E4M3, E5M2 or HiF8, with or without COAT's dynamic
range expansion. A cell of the table is the error of the update direction

  u = m / (sqrt(v) + eps),   eps = 1e-8 (the config's AdamW eps; raw moments, no bias correction)

  MSE = mean((u_q - u)^2) over all elements,   normalized MSE = MSE / mean(u^2),

u_q from the dequantized moments, u in float64 from the float32 moments. Also the distribution of
the expansion exponent k (stored as k16 = 16 k) over the groups of m and of v.
"""

import ml_collections


def get_config(arg: str = "full") -> ml_collections.ConfigDict:
  if arg not in ("full", "quick"):
    raise ValueError(f"get_config({arg!r}): use 'full' or 'quick'.")
  return ml_collections.ConfigDict(dict(
      formats=("e4m3", "e5m2", "hif8"), group_size=128, eps=1e-8, train_steps=20,
      tiny=dict(model=dict(d_model=128, n_layers=1, d_ff=256, attention_impl="dense_jax"),
                data=dict(seq_len=64, batch_size=8), optim=dict(warmup_steps=5, decay_steps=20))))
