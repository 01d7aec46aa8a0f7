"""Data: packing, caching, deterministic process-sharded batches, digits and TFDS (mocked)."""

import os
import zlib

import numpy as np
import pytest

from mpxla.data import BatchIterator, MappedSource, corpus


def test_pack_rows_matches_a_loop_reference():
  docs = [b"abc", b"defgh", b"ij", b"klmnopq"]
  tokens, segs = corpus.pack_rows(docs, seq_len=3)
  stream = b"".join(docs)
  owner = [i for i, d in enumerate(docs) for _ in d]
  assert tokens.shape == (len(stream) // 4, 4)
  for r in range(tokens.shape[0]):
    assert bytes(tokens[r]) == stream[4 * r: 4 * r + 4]
    first = owner[4 * r]
    assert list(segs[r]) == [owner[4 * r + j] - first + 1 for j in range(4)]
  row = corpus.decode_row(corpus.encode_row(tokens[1], segs[1]))
  np.testing.assert_array_equal(row["tokens"], tokens[1])
  np.testing.assert_array_equal(row["segment_ids"], segs[1])


def test_prepare_splits_by_path_and_caches(tmp_path):
  root = tmp_path / "lib"
  for i in range(30):
    (root / f"pkg{i % 3}").mkdir(parents=True, exist_ok=True)
    (root / f"pkg{i % 3}" / f"m{i}.py").write_text(f"x = {i}\n" * (5 + i))
  (root / "site-packages").mkdir()
  (root / "site-packages" / "skip.py").write_text("nope\n" * 100)
  paths = corpus.prepare(7, val_percent=30, cache_dir=tmp_path / "cache", root=root)
  from array_record.python.array_record_data_source import ArrayRecordDataSource

  rows = {s: [corpus.decode_row(r) for r in ArrayRecordDataSource(p)] for s, p in paths.items()}
  files = corpus.stdlib_files(root)
  assert len(files) == 30  # site-packages excluded
  for split in ("train", "validation"):
    docs = [p.read_bytes() for rel, p in files
            if (zlib.crc32(rel.encode()) % 100 < 30) == (split == "validation")]
    want, _ = corpus.pack_rows(docs, 7)
    got = np.stack([r["tokens"] for r in rows[split]])
    np.testing.assert_array_equal(got, want)
  assert b"nope" not in b"".join(bytes(r["tokens"].astype(np.uint8)) for r in rows["train"])
  mtime = os.path.getmtime(paths["train"])
  assert corpus.prepare(7, val_percent=30, cache_dir=tmp_path / "cache", root=root) == paths
  assert os.path.getmtime(paths["train"]) == mtime  # reused, not rebuilt


def _source(n=50):
  return MappedSource(list(range(n)), lambda i: {"x": np.array([i, 10 * i])})


@pytest.mark.parametrize("processes", [1, 2, 4])
def test_process_shards_assemble_the_same_global_batch(processes):
  ref = BatchIterator(_source(), 8, seed=3)
  its = [BatchIterator(_source(), 8, seed=3, process_index=p, process_count=processes)
         for p in range(processes)]
  seen = []
  for _ in range(15):  # crosses two epochs of 50 rows
    want = next(ref)["x"]
    got = np.concatenate([next(it)["x"] for it in its])
    np.testing.assert_array_equal(got, want)
    seen.append(want[:, 0])
  first_epoch = np.concatenate(seen)[:48]
  assert len(set(first_epoch.tolist())) == 48  # a permutation within the epoch
  assert not np.array_equal(first_epoch, np.arange(48))  # and shuffled


def test_state_resumes_exactly_and_seed_matters():
  it = BatchIterator(_source(), 4, seed=1)
  for _ in range(7):
    next(it)
  state = it.get_state()
  rest = [next(it)["x"] for _ in range(5)]
  it2 = BatchIterator(_source(), 4, seed=1)
  it2.set_state(state)
  for want in rest:
    np.testing.assert_array_equal(next(it2)["x"], want)
  other = BatchIterator(_source(), 4, seed=2)
  assert not np.array_equal(next(other)["x"], next(BatchIterator(_source(), 4, seed=1))["x"])


def test_bad_input_errors_and_finite_eval():
  with pytest.raises(ValueError, match="multiple of the process count"):
    BatchIterator(_source(), 6, process_count=4)
  with pytest.raises(ValueError, match="empty"):
    BatchIterator([], 2)
  it = BatchIterator(_source(10), 4, shuffle=False, num_batches=2)
  batches = [b["x"][:, 0].tolist() for b in it]
  assert batches == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_digits_split():
  from mpxla.data.digits import Digits

  tr, va = Digits("train"), Digits("validation")
  assert len(tr) + len(va) == 1797 and len(va) == 180
  ex = tr[0]
  assert ex["image"].shape == (8, 8, 1) and ex["image"].dtype == np.float32
  assert 0.0 <= tr.images.min() and tr.images.max() <= 1.0
  assert set(np.unique(va.labels)) == set(range(10))


def test_tfds_sources_with_mock_data():
  tfds = pytest.importorskip("tensorflow_datasets")
  from mpxla.data.tfds_source import tfds_source

  with tfds.testing.mock_data(num_examples=12):
    images = tfds_source("mnist", "train", kind="image")
    b = next(BatchIterator(images, 4, seed=0))
    assert b["image"].shape == (4, 28, 28, 1) and b["image"].dtype == np.float32
    assert b["image"].max() <= 1.0 and b["label"].dtype == np.int32
    text = tfds_source("lm1b", "train", kind="text", seq_len=16)
    ex = text[0]
    assert ex["tokens"].shape == (17,)
    n = int(ex["segment_ids"].sum())
    raw = tfds.data_source("lm1b", split="train")[0]["text"]
    raw = raw.encode() if isinstance(raw, str) else raw
    assert bytes(ex["tokens"][:n].astype(np.uint8)) == raw[:17]
    assert np.all(ex["tokens"][n:] == 0)


@pytest.mark.parametrize("processes", [1, 2])
def test_single_pass_counts_every_example_once(processes):
  its = [BatchIterator(_source(10), 4, single_pass=True, process_index=p, process_count=processes)
         for p in range(processes)]
  rows, valid = [], []
  for batches in zip(*its, strict=True):
    rows.append(np.concatenate([b["x"][:, 0] for b in batches]))
    valid.append(np.concatenate([b["valid"] for b in batches]))
  rows, valid = np.concatenate(rows), np.concatenate(valid)
  assert len(rows) == 12  # three batches of 4, the last padded with two filler rows
  np.testing.assert_array_equal(rows[valid == 1], np.arange(10))
  np.testing.assert_array_equal(valid, [1] * 10 + [0, 0])
  np.testing.assert_array_equal(rows[valid == 0], [0, 0])
