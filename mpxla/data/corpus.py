"""The embedded text corpus: the running interpreter's standard-library sources as bytes.

Needs no download. Documents are the `.py` files under `sysconfig`'s stdlib path
(site-packages excluded), sorted by relative path; a file is in validation iff
crc32(relative path) % 100 < `val_percent`. Tokens are bytes (vocabulary 256).
Each split is packed once into rows of `seq_len + 1` tokens (documents concatenated
in path order and cut into rows; `segment_ids` number the documents within a row from
1) and cached as ArrayRecord files under `cache_dir`, keyed by a fingerprint of the
files, so a different interpreter gets its own cache.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import sysconfig
import zlib

import numpy as np

VOCAB_SIZE = 256


def default_cache_dir() -> pathlib.Path:
  """$MPXLA_CACHE, else ~/.cache/mpxla."""
  return pathlib.Path(os.environ.get("MPXLA_CACHE", pathlib.Path.home() / ".cache" / "mpxla"))


def stdlib_files(root: str | os.PathLike | None = None) -> list[tuple[str, pathlib.Path]]:
  """(relative path, path) of every stdlib .py file, sorted by relative path."""
  root = pathlib.Path(root or sysconfig.get_paths()["stdlib"])
  files = [(p.relative_to(root).as_posix(), p) for p in root.rglob("*.py")
           if "site-packages" not in p.parts and "dist-packages" not in p.parts]
  return sorted(files)


def is_validation(rel_path: str, val_percent: int) -> bool:
  return zlib.crc32(rel_path.encode()) % 100 < val_percent


def pack_rows(docs: list[bytes], seq_len: int) -> tuple[np.ndarray, np.ndarray]:
  """Concatenates documents and cuts them into [rows, seq_len + 1] tokens and segment ids."""
  width = seq_len + 1
  tokens = np.frombuffer(b"".join(docs), np.uint8)
  doc_ids = np.repeat(np.arange(len(docs), dtype=np.int64), [len(d) for d in docs])
  rows = len(tokens) // width  # the tail shorter than one row is dropped (< seq_len tokens)
  tokens = tokens[: rows * width].reshape(rows, width)
  doc_ids = doc_ids[: rows * width].reshape(rows, width)
  segment_ids = (doc_ids - doc_ids[:, :1] + 1).astype(np.uint16)
  return tokens, segment_ids


def encode_row(tokens: np.ndarray, segment_ids: np.ndarray) -> bytes:
  return tokens.astype(np.uint8).tobytes() + segment_ids.astype("<u2").tobytes()


def decode_row(record: bytes) -> dict[str, np.ndarray]:
  """A record -> {'tokens': int32 [seq_len + 1], 'segment_ids': int32 [seq_len + 1]}."""
  width = len(record) // 3
  tokens = np.frombuffer(record, np.uint8, count=width)
  segs = np.frombuffer(record, "<u2", count=width, offset=width)
  return {"tokens": tokens.astype(np.int32), "segment_ids": segs.astype(np.int32)}


def prepare(seq_len: int, val_percent: int = 5, cache_dir=None, root=None) -> dict[str, str]:
  """Packs and caches both splits once; returns {'train': path, 'validation': path}."""
  from array_record.python import array_record_module  # the `data` dependency

  files = stdlib_files(root)
  if not files:
    raise FileNotFoundError(f"no .py files under {root or sysconfig.get_paths()['stdlib']}")
  h = hashlib.sha256()
  for rel, p in files:
    h.update(rel.encode() + b"\0" + str(p.stat().st_size).encode() + b"\0")
  key = f"stdlib-{h.hexdigest()[:12]}-L{seq_len}-v{val_percent}"
  out = pathlib.Path(cache_dir or default_cache_dir()) / key
  paths = {s: str(out / f"{s}.array_record") for s in ("train", "validation")}
  if all(os.path.exists(p) for p in paths.values()):
    return paths
  out.mkdir(parents=True, exist_ok=True)
  for split in ("train", "validation"):
    docs = [p.read_bytes() for rel, p in files if is_validation(rel, val_percent) == (split == "validation")]
    tokens, segs = pack_rows(docs, seq_len)
    tmp = paths[split] + f".tmp{os.getpid()}"
    writer = array_record_module.ArrayRecordWriter(tmp, "group_size:1")
    for t, s in zip(tokens, segs, strict=True):
      writer.write(encode_row(t, s))
    writer.close()
    os.replace(tmp, paths[split])  # atomic: concurrent processes never see a partial file
  return paths
