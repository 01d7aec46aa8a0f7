"""Global vs micro-batch load balancing: a small MoE GPT (configs/gpt_tiny.py) on 8 CPU devices.

Command:  python experiments/moe_balance.py                  (get_config("full"): both LBL scopes,
          3 seeds, 400 steps; about 10 CPU-min, 40 min wall; --reuse re-analyses finished runs)
          python experiments/moe_balance.py --quick --out DIR (get_config("quick"): one tiny MoE
          layer, 3 steps)
Expected (docs/results.md section 4): global-batch balancing gives a higher I(expert; domain) in
every (seed, layer) pair, about 1.6x the micro-batch value, with no measurable loss difference.
"""

import ml_collections

MODEL = dict(d_model=64, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=192, num_experts=8,
             moe_top_k=2, moe_every=2, moe_d_ff=64)


def get_config(arg: str = "full") -> ml_collections.ConfigDict:
  if arg == "full":
    return ml_collections.ConfigDict(dict(
        model=MODEL, seq_len=128, batch_size=16, steps=400, seeds=(0, 1, 2), eval_every=50,
        evals=8, eval_batches=8, eval_rows=512, eval_batch=64))
  if arg == "quick":
    return ml_collections.ConfigDict(dict(
        model=dict(MODEL, d_model=32, n_layers=1, moe_every=1, n_heads=2, n_kv_heads=1, d_ff=64,
                   moe_d_ff=32, attention_impl="dense_jax"),
        seq_len=32, batch_size=16, steps=3, seeds=(0,), eval_every=3, evals=8, eval_batches=1,
        eval_rows=64, eval_batch=64))
  raise ValueError(f"get_config({arg!r}): use 'full' or 'quick'.")
