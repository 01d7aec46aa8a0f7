"""scikit-learn's bundled 8x8 digits (1797 images): an image set that needs no download."""

from __future__ import annotations

import numpy as np


class Digits:
  """Random-access split of the digits: {'image': float32 [8, 8, 1] in [0, 1], 'label': int32}.

  Validation holds every image whose index is 0 mod 10 (180 images), train the rest.
  """

  def __init__(self, split: str = "train"):
    from sklearn.datasets import load_digits  # the `data` dependency

    if split not in ("train", "validation"):
      raise ValueError(f"split={split!r}; use 'train' or 'validation'.")
    d = load_digits()
    idx = np.arange(len(d.target))
    keep = (idx % 10 == 0) if split == "validation" else (idx % 10 != 0)
    self.images = (d.images[keep] / 16.0).astype(np.float32)[..., None]
    self.labels = d.target[keep].astype(np.int32)

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    return {"image": self.images[i], "label": self.labels[i]}
