"""Data: deterministic, process-sharded batches from the embedded corpus, digits or TFDS.

`make_source(config, split)` picks a source by `config.name`:
  'stdlib_bytes'   the embedded text corpus (mpxla.data.corpus; no download)
  'digits'         scikit-learn's bundled 8x8 digits (no download)
  'tfds:NAME'      a named TFDS dataset through `tfds.data_source` (kind from config.kind)
"""

from __future__ import annotations

from mpxla.data.pipeline import BatchIterator, MappedSource


def make_source(config, split: str):
  """A random-access source of examples for `config.name` and `split`."""
  name = config.name
  if name == "stdlib_bytes":
    from array_record.python.array_record_data_source import ArrayRecordDataSource

    from mpxla.data import corpus

    paths = corpus.prepare(config.seq_len, config.get("val_percent", 5), config.get("cache_dir"))
    return MappedSource(ArrayRecordDataSource(paths[split]), corpus.decode_row)
  if name == "digits":
    from mpxla.data.digits import Digits

    return Digits(split)
  if name.startswith("tfds:"):
    from mpxla.data.tfds_source import tfds_source

    return tfds_source(name[5:], config.get("tfds_split", {}).get(split, split), kind=config.kind,
                       seq_len=config.get("seq_len"), data_dir=config.get("data_dir"))
  raise ValueError(f"data.name={name!r}; use 'stdlib_bytes', 'digits' or 'tfds:NAME'.")


__all__ = ["BatchIterator", "MappedSource", "make_source"]
