"""Block-sparse attention with on-device block masks.

    from mpxla import attention as A
    o = A.attention(q, k, v, mask=A.causal() & A.document(segment_ids))   # [B, T, H, D]

- `attention(q, k, v, *, mask, scale, softcap, impl, ...)`: 'xla' (gathered blocks, custom
  VJP), 'pallas_gpu' (Triton), 'pallas_tpu' (Mosaic), 'reference' (dense), 'auto'.
- Masks: `causal()`, `sliding_window(left, right=0)`, `chunked(size)`, `document(ids)`,
  `prefix_lm(prefix_len)`, `from_fn(mask_fn)`, combined with `&` and `|`.
- `BlockMask` / `make_block_mask`: per query block, the partial and full key blocks (and the
  transposed lists), built inside jit from index ranges.
- `permute_kv` / `sparse_attention`: importance-ordered keys within segments and a
  threshold-selected BlockMask (PBS-Attn style).
- `rotary_embedding`, `Attention` (Linen) and `NNXAttention` (NNX) layers (`NnxAttention`:
  the same class under its older name).
- `RESIDUAL_NAMES`: checkpoint names of the saved output and log-sum-exp, for
  `jax.checkpoint_policies.save_only_these_names` (the attention forward is then not recomputed).
"""

from mpxla.attention.api import attention
from mpxla.attention.block_mask import BlockMask, make_block_mask
from mpxla.attention.layers import Attention, NNXAttention, NnxAttention, rotary_embedding
from mpxla.attention.masks import (
    Mask,
    causal,
    chunked,
    document,
    from_fn,
    prefix_lm,
    sliding_window,
)
from mpxla.attention.permute import Permuted, permute_kv, sparse_attention
from mpxla.attention.xla import RESIDUAL_NAMES

# NNX layers are spelled NNX... across mpxla (PEP 8 capitalizes acronyms, as Flax's ToNNX).

__all__ = [
    "Attention",
    "BlockMask",
    "Mask",
    "NNXAttention",
    "NnxAttention",
    "Permuted",
    "RESIDUAL_NAMES",
    "attention",
    "causal",
    "chunked",
    "document",
    "from_fn",
    "make_block_mask",
    "permute_kv",
    "prefix_lm",
    "rotary_embedding",
    "sliding_window",
    "sparse_attention",
]
