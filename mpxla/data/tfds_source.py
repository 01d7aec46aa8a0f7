"""Named TFDS datasets as random-access sources (`tfds.data_source`, ArrayRecord; no TensorFlow).

On a pod, prepare the dataset once (`tfds build NAME --file_format=array_record`) into a
shared `data_dir`; every process then reads its own rows through `BatchIterator`.
Tests use `tfds.testing.mock_data`; nothing here downloads unless the dataset is missing.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mpxla.data.pipeline import MappedSource


def image_example(ex: dict[str, Any]) -> dict[str, np.ndarray]:
  """uint8 image -> float32 in [0, 1]; label -> int32."""
  return {"image": np.asarray(ex["image"], np.float32) / 255.0,
          "label": np.asarray(ex["label"], np.int32)}


def text_example(ex: dict[str, Any], seq_len: int, key: str = "text") -> dict[str, np.ndarray]:
  """Text -> byte tokens [seq_len + 1] (truncated, zero-padded) and segment ids (1 = text, 0 = pad)."""
  text = ex[key]
  data = text.encode() if isinstance(text, str) else bytes(text)
  tokens = np.frombuffer(data[: seq_len + 1], np.uint8).astype(np.int32)
  n = len(tokens)
  out = np.zeros(seq_len + 1, np.int32)
  out[:n] = tokens
  segs = np.zeros(seq_len + 1, np.int32)
  segs[:n] = 1
  return {"tokens": out, "segment_ids": segs}


def tfds_source(name: str, split: str, *, kind: str, seq_len: int | None = None,
                data_dir: str | None = None, text_key: str = "text"):
  """`tfds.data_source(name, split)` mapped to mpxla's example layout ('image' or 'text')."""
  import tensorflow_datasets as tfds  # the `data` extra

  source = tfds.data_source(name, split=split, data_dir=data_dir)
  if kind == "image":
    return MappedSource(source, image_example)
  if kind == "text":
    if not seq_len:
      raise ValueError("kind='text' needs seq_len.")
    return MappedSource(source, lambda ex: text_example(ex, seq_len, text_key))
  raise ValueError(f"kind={kind!r}; use 'image' or 'text'.")
