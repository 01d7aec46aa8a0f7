"""A Llama-style GPT in Flax Linen, built from stock layers.

RMSNorm -> attention (rotary embeddings, grouped-query heads, causal & document mask)
-> residual -> RMSNorm -> SwiGLU MLP (or an MoE layer) -> residual. Every matmul is a
stock `nn.Dense`/`nn.DenseGeneral` and every norm a stock `nn.RMSNorm`, so
`mpxla.nn.quantize` applies to the model unmodified.

Shapes: B batch, T tokens, D model width, H heads, K kv heads, E head dim, F MLP width.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from mpxla.attention.layers import attend


@dataclasses.dataclass(frozen=True)
class GPTConfig:
  vocab_size: int = 256
  d_model: int = 128
  n_layers: int = 4
  n_heads: int = 4
  n_kv_heads: int = 2
  d_ff: int = 384
  rope_theta: float = 10_000.0
  dtype: str = "bfloat16"  # compute dtype; parameters stay float32
  attention_impl: str = "auto"  # mpxla.attention impl ('auto', 'xla', ...), or 'dense_jax'
  attention_block: int = 128
  num_experts: int = 0  # > 0: MoE MLP in every `moe_every`-th layer
  moe_top_k: int = 2
  moe_every: int = 2
  moe_d_ff: int = 0  # 0: d_ff
  moe_lbl_scope: str = "global"  # load-balancing statistics: 'global' | 'micro_batch' | 'sequence'
  # The batch's mesh axes (mpxla.parallel.stats), e.g. ('data', 'fsdp', 'expert'):
  # 'micro_batch' under jit needs them (and `jax.set_mesh`) to find each device's shard.
  moe_axis_name: str | tuple[str, ...] | None = None
  moe_dispatch: str = "sparse"  # 'sparse' (sorted tokens, grouped matmuls) | 'dense' (reference)
  moe_capacity_factor: float | None = None  # None: dropless
  moe_grouped_matmul: str = "ragged_dot"  # 'ragged_dot' | 'blocks' | 'pallas_gpu' (nn/moe.py)

  def __post_init__(self):
    if self.d_model % self.n_heads:
      raise ValueError(f"d_model={self.d_model} must be a multiple of n_heads={self.n_heads}.")
    if self.n_heads % self.n_kv_heads:
      raise ValueError(f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}.")


class Attention(nn.Module):
  """Grouped-query attention with per-head projections ([D, H, E] kernels, [H, E, D] out)
  around `mpxla.attention.layers.attend` (rotary embeddings, causal & document mask)."""

  config: GPTConfig

  @nn.compact
  def __call__(self, x_BxTxD, positions_BxT, segment_ids_BxT):
    c = self.config
    E = c.d_model // c.n_heads
    dense = lambda heads, name: nn.DenseGeneral(  # noqa: E731
        (heads, E), use_bias=False, dtype=c.dtype, name=name)
    # 'dense_jax': the dense reference (every score computed; small models and tests).
    impl = "reference" if c.attention_impl == "dense_jax" else c.attention_impl
    out_BxTxHxE = attend(
        dense(c.n_heads, "query")(x_BxTxD), dense(c.n_kv_heads, "key")(x_BxTxD),
        dense(c.n_kv_heads, "value")(x_BxTxD), positions=positions_BxT, mask=None,
        segment_ids=segment_ids_BxT, rope_theta=c.rope_theta, causal=True, impl=impl,
        block_q=c.attention_block, block_kv=c.attention_block, softcap=None, interpret=False)
    return nn.DenseGeneral(c.d_model, axis=(-2, -1), use_bias=False, dtype=c.dtype,
                           name="out")(out_BxTxHxE)


class SwiGLU(nn.Module):
  d_ff: int
  dtype: str

  @nn.compact
  def __call__(self, x_BxTxD):
    gate_BxTxF = nn.Dense(self.d_ff, use_bias=False, dtype=self.dtype, name="gate")(x_BxTxD)
    up_BxTxF = nn.Dense(self.d_ff, use_bias=False, dtype=self.dtype, name="up")(x_BxTxD)
    h_BxTxF = jax.nn.silu(gate_BxTxF) * up_BxTxF
    return nn.Dense(x_BxTxD.shape[-1], use_bias=False, dtype=self.dtype, name="down")(h_BxTxF)


class Block(nn.Module):
  config: GPTConfig
  moe: bool = False

  @nn.compact
  def __call__(self, x_BxTxD, positions_BxT, segment_ids_BxT):
    c = self.config
    h = nn.RMSNorm(dtype=c.dtype, name="attn_norm")(x_BxTxD)
    x_BxTxD = x_BxTxD + Attention(c, name="attn")(h, positions_BxT, segment_ids_BxT)
    h = nn.RMSNorm(dtype=c.dtype, name="mlp_norm")(x_BxTxD)
    if self.moe:
      from mpxla.nn.moe import MoE

      moe = MoE(num_experts=c.num_experts, top_k=c.moe_top_k, d_ff=c.moe_d_ff or c.d_ff,
                dtype=c.dtype, lbl_scope=c.moe_lbl_scope, axis_name=_axes(c.moe_axis_name),
                dispatch=c.moe_dispatch, capacity_factor=c.moe_capacity_factor,
                grouped_matmul=c.moe_grouped_matmul, partitioned=True, name="moe")  # experts over 'expert' (state_shardings)
      return x_BxTxD + moe(h, mask=segment_ids_BxT > 0)  # padding takes no expert capacity
    return x_BxTxD + SwiGLU(c.d_ff, c.dtype, name="mlp")(h)


class GPT(nn.Module):
  """tokens [B, T] (+ segment ids, positions) -> float32 logits [B, T, vocab]."""

  config: GPTConfig

  @nn.compact
  def __call__(self, tokens_BxT, segment_ids_BxT=None, positions_BxT=None):
    c = self.config
    if segment_ids_BxT is None:
      segment_ids_BxT = jnp.ones_like(tokens_BxT)
    if positions_BxT is None:
      positions_BxT = document_positions(segment_ids_BxT)
    x_BxTxD = nn.Embed(c.vocab_size, c.d_model, name="embed")(tokens_BxT).astype(c.dtype)
    for i in range(c.n_layers):
      moe = c.num_experts > 0 and (i % c.moe_every == c.moe_every - 1)
      x_BxTxD = Block(c, moe=moe, name=f"layer_{i}")(x_BxTxD, positions_BxT, segment_ids_BxT)
    x_BxTxD = nn.RMSNorm(dtype=c.dtype, name="final_norm")(x_BxTxD)
    logits_BxTxV = nn.Dense(c.vocab_size, use_bias=False, dtype=c.dtype, name="lm_head")(x_BxTxD)
    return logits_BxTxV.astype(jnp.float32)


def _axes(names):
  return tuple(names) if isinstance(names, list | tuple) else names


def document_positions(segment_ids_BxT: jax.Array) -> jax.Array:
  """Position of each token within its document (restarts where the segment id changes)."""
  T = segment_ids_BxT.shape[1]
  idx_BxT = jnp.broadcast_to(jnp.arange(T), segment_ids_BxT.shape)
  starts = jnp.concatenate(
      [jnp.ones_like(segment_ids_BxT[:, :1], bool),
       segment_ids_BxT[:, 1:] != segment_ids_BxT[:, :-1]], axis=1)
  start_idx_BxT = jax.lax.cummax(jnp.where(starts, idx_BxT, 0), axis=1)
  return idx_BxT - start_idx_BxT
