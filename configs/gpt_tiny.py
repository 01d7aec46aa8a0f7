"""The default: a tiny Llama-style GPT on the embedded standard-library corpus (bytes).

Command:  .venv/bin/python -m mpxla.train --config=configs/gpt_tiny.py --workdir=workdirs/gpt_tiny
          (or `bash launch/local.sh`; variants: configs/gpt_tiny.py:coat, :fp8_linear, :fp8_delayed, :fp8_block, :hif8)
          MoE: configs/gpt_tiny.py:moe (8 experts of d_ff 192, top 2, every other layer; sparse
          dispatch, dropless), combined with a recipe as :coat,moe. Expert parallelism on 8
          (simulated) devices: --config.mesh.data=1 --config.mesh.expert=8.
Hardware: 2 CPU cores, about 2 minutes (85 s of training, ~8000 tokens/s).
Expected (recipe bf16, seed 0): validation loss 2.15 nats/byte after 300 steps (train 1.96);
see docs/train.md.
"""

import ml_collections


def get_config(variant: str = "bf16") -> ml_collections.ConfigDict:
  """variant: a recipe name, 'moe', or both comma-separated ('coat,moe')."""
  parts = [p.strip() for p in variant.split(",") if p.strip()]
  moe = "moe" in parts
  recipes = [p for p in parts if p != "moe"]
  if len(recipes) > 1:
    raise ValueError(f"variant {variant!r} names more than one recipe: {recipes}.")
  recipe = recipes[0] if recipes else "bf16"
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.recipe = recipe
  c.total_steps = 300
  c.log_every = 10
  c.eval_every = 100
  c.eval_batches = 8
  c.checkpoint_every = 100
  c.keep_checkpoints = 3
  c.progress = True
  c.plot = True
  c.fp8_stats_every = 0  # > 0: per-layer FP8 statistics every N steps (docs/nn.md)

  c.model = ml_collections.ConfigDict(dict(
      name="gpt", vocab_size=256, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=384,
      rope_theta=10_000.0, dtype="bfloat16", attention_impl="auto", attention_block=64,
      num_experts=0, moe_top_k=2, moe_every=2, moe_d_ff=0, moe_lbl_scope="global",
      moe_axis_name=None))
  if moe:
    c.model.update(num_experts=8, moe_top_k=2, moe_every=2, moe_d_ff=192)
    c.model.moe_dispatch = "sparse"
    c.model.moe_grouped_matmul = "ragged_dot"  # 'pallas_gpu' on a GPU: docs/nn.md
  c.aux_loss_weight = 0.01

  c.data = ml_collections.ConfigDict(dict(name="stdlib_bytes", seq_len=128, batch_size=16,
                                          val_percent=5))
  # decay_steps=None: the cosine decay lasts total_steps (an override of total_steps follows).
  c.optim = ml_collections.ConfigDict(dict(
      lr=3e-3, warmup_steps=30, decay_steps=None, final_lr_fraction=0.1, b1=0.9, b2=0.95,
      eps=1e-8, weight_decay=0.1, grad_clip=1.0))
  # expert > 1 shards the MoE experts over 'expert' (tokens by all-to-all; docs/parallel.md).
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, expert=1))
  return c
