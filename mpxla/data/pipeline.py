"""Deterministic, process-sharded batches from any random-access source (grain).

Global batch b holds the rows `order[b*B : (b+1)*B]` of the source, where `order`
is the source shuffled by `seed` and repeated (reshuffled each epoch). Process p of
P holds rows `[p*B/P, (p+1)*B/P)` of each global batch, so the global batch is the
same for any number of processes, and the iterator's whole state is the batch
index: resume is exact, and the state is a small JSON object saved in checkpoints.

`single_pass=True` (evaluation) reads the source once in order: the last batch is
filled with zero rows, and every batch carries `valid` (1 for real rows, 0 for filler)
so that weighted metrics count each example exactly once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import grain
import numpy as np


class MappedSource:
  """A random-access source with a per-example function applied on read."""

  def __init__(self, source: Sequence[Any], fn: Callable[[Any], Any]):
    self._source, self._fn = source, fn

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, i: int) -> Any:
    return self._fn(self._source[i])


class BatchIterator:
  """Iterates over this process's share of deterministic global batches."""

  def __init__(
      self,
      source: Sequence[Any],
      global_batch: int,
      *,
      seed: int = 0,
      shuffle: bool = True,
      transform: Callable[[Any], dict[str, np.ndarray]] | None = None,
      process_index: int = 0,
      process_count: int = 1,
      num_batches: int | None = None,
      single_pass: bool = False,
  ):
    if global_batch % process_count:
      raise ValueError(
          f"global_batch={global_batch} does not divide over {process_count} processes; "
          "choose a batch size that is a multiple of the process count."
      )
    if len(source) == 0:
      raise ValueError("the data source is empty.")
    ds = grain.MapDataset.source(source)
    if transform is not None:
      ds = ds.map(transform)
    self._size = len(ds)
    self._single_pass = single_pass
    if single_pass:
      self._ds = ds
      num_batches = -(-self._size // global_batch)
    else:
      self._ds = ds.shuffle(seed=seed).repeat() if shuffle else ds.repeat()
    self.global_batch = global_batch
    self.local_batch = global_batch // process_count
    self._offset = process_index * self.local_batch
    self.num_batches = num_batches
    self.step = 0

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self.num_batches is not None and self.step >= self.num_batches:
      raise StopIteration
    start = self.step * self.global_batch + self._offset
    self.step += 1
    if not self._single_pass:
      rows = [self._ds[i] for i in range(start, start + self.local_batch)]
      return {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    ids = range(start, start + self.local_batch)
    template = self._ds[0]
    rows = [self._ds[i] if i < self._size else {k: np.zeros_like(v) for k, v in template.items()}
            for i in ids]
    batch = {k: np.stack([r[k] for r in rows]) for k in template}
    batch["valid"] = np.array([i < self._size for i in ids], np.float32)
    return batch

  def get_state(self) -> dict[str, int]:
    return {"step": self.step}

  def set_state(self, state: dict[str, int]) -> None:
    self.step = int(state["step"])
