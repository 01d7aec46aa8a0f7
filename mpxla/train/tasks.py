"""Tasks: the model, its inputs and its loss for each kind of config (language model, images).

A task turns a data batch into model inputs and a weighted loss. Losses are
sum(weight * loss) / sum(weight) over the *global* batch (under jit with a sharded
batch the sums are global), so padding and uneven documents weigh nothing.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from mpxla.models.cnn import CNN, CNNConfig
from mpxla.models.gpt import GPT, GPTConfig


def _fields(cls, cfg) -> dict[str, Any]:
  names = {f.name for f in dataclasses.fields(cls)}
  unknown = set(cfg) - names
  if unknown:
    raise ValueError(f"model config keys {sorted(unknown)} are not fields of {cls.__name__}.")
  return {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}


@dataclasses.dataclass
class LMTask:
  """Next-token prediction on packed byte sequences with segment ids."""

  model: nn.Module
  seq_len: int
  aux_loss_weight: float = 0.01
  unit, unit_short = "tokens", "tok"  # what metrics['weight'] counts (logged as tokens_per_s)

  @classmethod
  def from_config(cls, config):
    model_cfg = dict(config.model)
    model_cfg.pop("name")
    return cls(GPT(GPTConfig(**_fields(GPTConfig, model_cfg))), config.data.seq_len,
               config.get("aux_loss_weight", 0.01))

  def dummy_batch(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    shape = (batch_size, self.seq_len + 1)
    return {"tokens": jax.ShapeDtypeStruct(shape, jnp.int32),
            "segment_ids": jax.ShapeDtypeStruct(shape, jnp.int32)}

  def init(self, key, batch) -> dict[str, Any]:
    return self.model.init(key, batch["tokens"][:, :-1], batch["segment_ids"][:, :-1])

  @staticmethod
  def _weights(batch) -> jax.Array:
    segs = batch["segment_ids"]
    # A target counts when it continues the same (non-padding) document.
    return ((segs[:, :-1] == segs[:, 1:]) & (segs[:, 1:] > 0)).astype(jnp.float32)

  def loss(self, params, model_state, batch, train: bool):
    """Returns (loss, (metrics, new_model_state))."""
    mutable = list(model_state) + ["intermediates"]
    logits, new_state = self.model.apply(
        {"params": params, **model_state}, batch["tokens"][:, :-1],
        batch["segment_ids"][:, :-1], mutable=mutable)
    inter = new_state.pop("intermediates", {})
    w = self._weights(batch)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["tokens"][:, 1:])
    weight_sum = jnp.maximum(jnp.sum(w), 1.0)
    ce_loss = jnp.sum(ce * w) / weight_sum
    aux = sum((jnp.sum(v) for v in jax.tree.leaves(_find(inter, "aux_loss"))), jnp.float32(0))
    loss = ce_loss + (self.aux_loss_weight * aux if train else 0.0)
    metrics = {"loss": ce_loss, "aux_loss": aux, "loss_sum": jnp.sum(ce * w), "weight": jnp.sum(w)}
    return loss, (metrics, new_state)


@dataclasses.dataclass
class ImageTask:
  """Classification with softmax cross-entropy; BatchNorm state in 'batch_stats'."""

  model: nn.Module
  image_shape: tuple[int, ...]
  unit, unit_short = "images", "img"

  @classmethod
  def from_config(cls, config):
    model_cfg = dict(config.model)
    model_cfg.pop("name")
    return cls(CNN(CNNConfig(**_fields(CNNConfig, model_cfg))), tuple(config.data.image_shape))

  def dummy_batch(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    return {"image": jax.ShapeDtypeStruct((batch_size, *self.image_shape), jnp.float32),
            "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32)}

  def init(self, key, batch) -> dict[str, Any]:
    return self.model.init(key, batch["image"], train=False)

  def loss(self, params, model_state, batch, train: bool):
    variables = {"params": params, **model_state}
    if train:
      logits, new_state = self.model.apply(variables, batch["image"], train=True,
                                           mutable=list(model_state))
    else:
      logits, new_state = self.model.apply(variables, batch["image"], train=False), model_state
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
    w = batch.get("valid", jnp.ones_like(ce))  # evaluation pads its last batch
    n = jnp.sum(w)
    loss = jnp.sum(ce * w) / jnp.maximum(n, 1.0)
    metrics = {"loss": loss, "accuracy": jnp.sum(correct * w) / jnp.maximum(n, 1.0),
               "loss_sum": jnp.sum(ce * w), "weight": n, "correct": jnp.sum(correct * w)}
    return loss, (metrics, new_state)


def _find(tree, name: str) -> list[Any]:
  """All values stored under key `name` anywhere in a nested dict."""
  found = []
  if isinstance(tree, dict):
    for k, v in tree.items():
      found += [v] if k == name else _find(v, name)
  return found


def make_task(config):
  kind = config.model.name
  if kind == "gpt":
    return LMTask.from_config(config)
  if kind == "cnn":
    return ImageTask.from_config(config)
  raise ValueError(f"model.name={kind!r}; use 'gpt' or 'cnn'.")
