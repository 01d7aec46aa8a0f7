"""Models built from stock Flax layers: a Llama-style GPT and a small BatchNorm CNN."""

from mpxla.models.cnn import CNN, CNNConfig
from mpxla.models.gpt import GPT, GPTConfig

__all__ = ["CNN", "CNNConfig", "GPT", "GPTConfig"]
