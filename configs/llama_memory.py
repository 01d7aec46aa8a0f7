"""Llama-style GPTs of about 125M, 350M, 1B and 7B parameters for the AOT memory breakdown.

Command:  .venv/bin/python experiments/memory.py --config=configs/llama_memory.py:1b --recipe=coat --json
          (variants 125m, 350m, 1b, 7b, tiny; the whole section: .venv/bin/python experiments/memory.py)
          .venv/bin/python experiments/memory.py --config=configs/llama_memory.py:7b --recipe=coat_sr --json
Hardware: no accelerator: the train step is compiled ahead of time for 8 simulated CPU devices
(FSDP over all 8) and nothing is allocated. One compile on 2 CPU cores: 20-40 s (bf16), 50-75 s
(fp8_linear), 2.5-8 min (coat, hif8) of CPU; the whole section about 55 min of CPU.
Expected (4 sequences of 2048 per device; GB = 1e9 bytes per device; docs/results.md section 1):
1b: params 0.51, grads 0.51, optimizer 1.03 (bf16) / 0.27 (coat), peak 26.3 (bf16) / 11.2 (coat);
largest batch in 80 GB: 13 (bf16) / 26 (coat) sequences per device.

| variant | d_model | layers | heads | d_ff | vocab | parameters    |
|---------|---------|--------|-------|------|-------|---------------|
| 125m    |     768 |     12 |    12 | 2048 | 32000 |   134,105,856 |
| 350m    |    1024 |     24 |    16 | 2560 | 32000 |   354,993,152 |
| 1b      |    2048 |     18 |    16 | 5376 | 32000 | 1,027,680,256 |
| 7b      |    4096 |     32 |    32 |11008 | 32000 | 6,738,415,616 |
| tiny    |     128 |      1 |     4 |  384 | 32000 |     8,405,376 |

(`tiny`: sequence length 256 and 2 sequences per device, for `--quick` and the tests. `7b`:
Llama-2-7B's shape, single-device mode: mesh data=1, fsdp=1 (no FSDP) and 1 sequence of 2048;
`--mesh=fsdp=8` shards it like the others, `--batch=N` sets the sequences. A suffix `@N` keeps
N layers, e.g. `7b@4`: the 32-layer 7b step needs more than the 23 GB of this machine's memory
to compile, so memory.py extrapolates 7b from `7b@4` and `7b@8`.)

Multi-head attention (n_kv_heads = n_heads, as Llama-2), untied embedding and output head,
d_ff = 8/3 d_model rounded down to a multiple of 256, sequence length 2048, bfloat16 compute with
float32 master weights. The data section names the embedded byte corpus only so that the config
is complete (tokens < 256 fit any vocabulary); these configs exist for compiling, not training.
The recipe defaults to bf16; experiments/memory.py sets it from --recipe.
"""

import ml_collections

SIZES = {
    "125m": dict(d_model=768, n_layers=12, n_heads=12, d_ff=2048),
    "350m": dict(d_model=1024, n_layers=24, n_heads=16, d_ff=2560),
    "1b": dict(d_model=2048, n_layers=18, n_heads=16, d_ff=5376),
    # Llama-2-7B's shape, on ONE device by default (no FSDP; --mesh=fsdp=8 shards it).
    "7b": dict(d_model=4096, n_layers=32, n_heads=32, d_ff=11008, batch=1, fsdp=1),
    # The quick-mode miniature (and the tests): same code path, seconds to compile.
    "tiny": dict(d_model=128, n_layers=1, n_heads=4, d_ff=384, seq_len=256, batch=2),
}
SEQ_LEN = 2048
PER_DEVICE_BATCH = 4
FSDP = 8


def get_config(variant: str = "125m") -> ml_collections.ConfigDict:
  variant, _, layers = variant.partition("@")  # '7b@4': 7b's layers cut to 4
  if variant not in SIZES or (layers and not layers.isdigit()):
    raise ValueError(f"variant {variant!r}; use one of {sorted(SIZES)}, optionally @LAYERS.")
  size = dict(SIZES[variant], **({"n_layers": int(layers)} if layers else {}))
  seq_len, batch = size.pop("seq_len", SEQ_LEN), size.pop("batch", PER_DEVICE_BATCH)
  fsdp = size.pop("fsdp", FSDP)
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.recipe = "bf16"
  c.total_steps = 1000
  c.log_every = 10
  c.eval_every = 500
  c.eval_batches = 8
  c.checkpoint_every = 500
  c.keep_checkpoints = 2
  c.progress = True
  c.plot = True
  c.model = ml_collections.ConfigDict(dict(
      name="gpt", vocab_size=32000, n_kv_heads=size["n_heads"], rope_theta=10_000.0,
      dtype="bfloat16", attention_impl="auto", attention_block=128, num_experts=0, moe_top_k=2,
      moe_every=2, moe_d_ff=0, **size))
  c.aux_loss_weight = 0.01
  c.data = ml_collections.ConfigDict(dict(name="stdlib_bytes", seq_len=seq_len,
                                          batch_size=batch * fsdp, val_percent=5))
  c.optim = ml_collections.ConfigDict(dict(
      lr=3e-4, warmup_steps=100, decay_steps=1000, final_lr_fraction=0.1, b1=0.9, b2=0.95,
      eps=1e-8, weight_decay=0.1, grad_clip=1.0))
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=fsdp, tensor=1))
  return c
