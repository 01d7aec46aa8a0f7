"""Global vs micro-batch load balancing: a small MoE GPT (configs/gpt_tiny.py) on 8 CPU devices.

Command:  python experiments/moe_balance.py                  (get_config("full"): both LBL scopes,
          3 seeds, 400 steps; about 10 CPU-min, 40 min wall)
          python experiments/moe_balance.py --quick --out DIR (get_config("quick"): one tiny MoE
          layer, 3 steps)
Expected (docs/results.md section 4): global-batch balancing gives a higher I(expert; domain) in
every (seed, layer) pair, about 1.6x the micro-batch value, with no measurable loss difference.

Method: each run is mpxla's own Trainer on `configs/gpt_tiny.py` (bf16 recipe) turned into a small MoE
GPT (8 experts, top-2, an MoE MLP in every second layer) on 8 simulated CPU devices
(mesh data=8, global batch 16 sequences, so each device's micro-batch is 2 sequences of 128
bytes), with the load-balancing loss (Qiu et al. 2025; mpxla.parallel.moe)

    LBL = N_E * sum_i f_i * P_i      (weight `aux_loss_weight` = 0.01, the config's)

computed over `config.model.moe_lbl_scope` = 'micro_batch' (each device's 2 sequences, the
loss averaged over devices) or 'global' (the whole batch of 16 sequences).

After training, the final checkpoint runs over an evenly spaced sample of validation rows with
the routers' outputs captured (Flax `capture_intermediates` on `mpxla.nn.moe.TopKRouter`), and
every token gets a domain: the validation split is the stdlib files packed in path order
(mpxla.data.corpus), so each token's source file, hence its top-level stdlib package, is known
exactly (checked against the packed rows). Domains are the top-level packages holding at least
`MIN_DOMAIN_SHARE` of the validation bytes, the top-level modules ('<modules>'), and 'other'.
Per MoE layer, counting the k routed (token, slot) pairs of every token:

    share[d, e] = c[d, e] / sum_e' c[d, e']          (each domain's row sums to 1)
    H(E | d)    = -sum_e share[d, e] log2 share[d, e]  in [0, log2 N_E]
    I(E; D)     = H(E) - sum_d p(d) H(E | d)          (mutual information expert / domain, bits)

plus I(E; byte class) of the input byte (space, letter, digit, punctuation, other) as a yardstick,
the LBL of the sample at both scopes, and the validation loss per domain.
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
