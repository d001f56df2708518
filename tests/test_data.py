"""The data pipeline: tokenizers, sources, packing invariants, determinism and resumable state."""

from __future__ import annotations

import itertools
import json
import time

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds

from minitron_jax.inputs import corpus, data, stdlib_dataset
from minitron_jax.errors import ConfigError
from minitron_jax.inputs.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer, train_bpe_tokenizer


@pytest.fixture(scope="module")
def stdlib_dir(tmp_path_factory):
  """One stdlib TFDS build shared by the module (the default cache is never touched)."""
  path = tmp_path_factory.mktemp("tfds")
  start = time.perf_counter()
  stdlib_dataset.prepare(path)
  assert time.perf_counter() - start < 30
  return str(path)


def _stdlib_config(stdlib_dir, **changes) -> data.DataConfig:
  fields = dict(source="stdlib", data_dir=stdlib_dir, seq_len=32, batch_size=2, read_threads=0)
  return data.DataConfig(**{**fields, **changes})


def _write_docs(directory, texts) -> list[str]:
  paths = []
  for i, text in enumerate(texts):
    path = directory / f"doc{i:02d}.txt"
    path.write_text(text)
    paths.append(str(path))
  return paths


def _pack_list(docs, seq_len):
  examples = grain.MapDataset.source(docs).map(
      lambda d: {"tokens": np.asarray(d, np.int32)}).to_iter_dataset()
  return data.pack(examples, seq_len)


def _assert_packed(rows, docs):
  """Segments start at 1 and count up, positions restart per segment, padding only at the tail,
  and the tokens are the documents' tokens, each exactly once and in order."""
  rows = list(rows)
  seen = []
  for row in rows:
    tokens, segments, positions = row["tokens"], row["segment_ids"], row["positions"]
    assert segments[0] == 1
    valid = segments > 0
    n = int(valid.sum())
    assert valid[:n].all() and not valid[n:].any()  # padding only at the end
    assert (tokens[n:] == 0).all() and (positions[n:] == 0).all()
    steps = np.diff(segments[:n])
    assert set(steps.tolist()) <= {0, 1}
    starts = np.r_[True, steps == 1]
    assert (positions[:n][starts] == 0).all()
    assert (np.diff(positions[:n])[~starts[1:]] == 1).all()
    for s in range(1, segments.max() + 1):
      seen.append(tokens[segments == s])
  flat = np.concatenate(seen) if seen else np.zeros(0)
  np.testing.assert_array_equal(flat, np.concatenate([np.asarray(d) for d in docs]))
  return rows


def test_byte_tokenizer():
  tok = load_tokenizer("bytes")
  assert isinstance(tok, ByteTokenizer)
  assert (tok.vocab_size, tok.eos_id, tok.name) == (256, None, "bytes")
  assert tok.encode("aé") == [97, 195, 169]
  assert tok.decode(tok.encode("déf x():\n")) == "déf x():\n"


def test_bpe_tokenizer_trains_and_loads(tmp_path):
  texts = [f.read_text() for f in corpus.stdlib_files()[:4]]
  trained = train_bpe_tokenizer(texts, vocab_size=320, path=tmp_path / "tok")
  assert (tmp_path / "tok" / "tokenizer.json").is_file()
  for spec in (tmp_path / "tok", tmp_path / "tok" / "tokenizer.json"):
    tok = load_tokenizer(str(spec))
    assert isinstance(tok, HFTokenizer)
    assert tok.vocab_size == trained.vocab_size <= 320
    assert tok.eos_id == 0
    text = "def f(x):\n    return x + 'é'\n"
    ids = tok.encode(text)
    assert ids == trained.encode(text) and len(ids) < len(text.encode())
    assert tok.decode(ids) == text
  assert load_tokenizer(str(tmp_path / "tok"), eos_token="Ġ").eos_id == tok.token_to_id("Ġ")
  with pytest.raises(ConfigError, match="eos_token='<nope>'"):
    load_tokenizer(str(tmp_path / "tok"), eos_token="<nope>")
  with pytest.raises(ConfigError, match="vocab_size=100"):
    train_bpe_tokenizer(texts, vocab_size=100, path=tmp_path / "small")


def test_load_tokenizer_errors(tmp_path):
  with pytest.raises(ConfigError, match="does not exist"):
    load_tokenizer(str(tmp_path / "missing.json"))
  with pytest.raises(ConfigError, match="without tokenizer.json"):
    load_tokenizer(str(tmp_path))
  (tmp_path / "tokenizer.json").write_text("{not json")
  with pytest.raises(ConfigError, match="could not be read"):
    load_tokenizer(str(tmp_path))


def test_packing_invariants():
  rng = np.random.default_rng(0)
  # Short documents, one of exactly seq_len, and one spanning several rows.
  lengths = [3, 6, 2, 8, 5, 29, 1, 7, 4]
  docs = [rng.integers(1, 1000, n) for n in lengths]
  rows = _assert_packed(_pack_list(docs, seq_len=8), docs)
  assert len(rows) == -(-sum(lengths) // 8)  # concat-then-split: only the last row pads
  assert all(r["tokens"].shape == (8,) and r["tokens"].dtype == np.int32 for r in rows)


def test_pipeline_batches_hold_every_document_once(tmp_path):
  texts = ["alpha\n", "a longer document " * 5, "x", "", "tail text\n"]
  config = data.DataConfig(source="text", paths=(str(tmp_path / "*.txt"),), seq_len=16,
                           batch_size=3)
  _write_docs(tmp_path, texts)
  batches = list(data.make_iterator(config, ByteTokenizer(), "train", training=False))
  for batch in batches:
    assert set(batch) == set(data.BATCH_KEYS)
    assert all(v.shape == (3, 16) and v.dtype == np.int32 for v in batch.values())
  rows = [{k: b[k][i] for k in b} for b in batches for i in range(3)]
  rows = [r for r in rows if r["segment_ids"].any()]  # drop the all-padding rows of the last batch
  _assert_packed(rows, [list(t.encode()) for t in texts if t])


def test_eos_ends_every_document(tmp_path):
  tok = train_bpe_tokenizer([f.read_text() for f in corpus.stdlib_files()[:2]], 300, tmp_path)
  texts = ["one\n", "two two\n", "three three three\n"]
  config = data.DataConfig(source="text", paths=(str(tmp_path / "docs" / "*"),), seq_len=8,
                           batch_size=1)
  (tmp_path / "docs").mkdir()
  _write_docs(tmp_path / "docs", texts)
  rows = [b for b in data.make_iterator(config, tok, training=False)]
  tokens = np.concatenate([b["tokens"][b["segment_ids"] > 0] for b in rows])
  expected = np.concatenate([tok.encode(t) + [tok.eos_id] for t in texts])
  np.testing.assert_array_equal(tokens, expected)


def test_stdlib_tfds_dataset(stdlib_dir):
  builder = stdlib_dataset.prepare(stdlib_dir)  # second call: cached
  assert builder.is_prepared() and builder.info.file_format.value == "array_record"
  names = {"train": set(), "validation": set()}
  for split in stdlib_dataset.SPLITS:
    source = tfds.data_source(f"{stdlib_dataset.NAME}/{stdlib_dataset.config_name()}",
                              split=split, data_dir=stdlib_dir, download=False)
    assert len(source) > 0
    for record in source:
      assert record["text"]
      names[split].add(record["name"].decode())
  expected = {split: {f.name for f in corpus.stdlib_files() if corpus.split_of(f) == split}
              for split in names}
  assert names == expected


def test_stdlib_batches_and_validation(stdlib_dir):
  config = _stdlib_config(stdlib_dir)
  batch = next(data.make_iterator(config, ByteTokenizer()))
  assert batch["tokens"].shape == (2, 32) and (batch["segment_ids"][:, 0] == 1).all()
  first = data.validation_batches(config, ByteTokenizer(), num_batches=3)
  second = data.validation_batches(config.replace(seed=7), ByteTokenizer(), num_batches=3)
  assert len(first) == 3
  for a, b in zip(first, second):  # validation ignores the seed: never shuffled
    for key in data.BATCH_KEYS:
      np.testing.assert_array_equal(a[key], b[key])


def _take(iterator, n):
  return list(itertools.islice(iterator, n))


def _assert_same(batches_a, batches_b):
  assert len(batches_a) == len(batches_b)
  for a, b in zip(batches_a, batches_b):
    for key in data.BATCH_KEYS:
      np.testing.assert_array_equal(a[key], b[key])


def test_deterministic_and_seeded(stdlib_dir):
  config = _stdlib_config(stdlib_dir, read_threads=2)
  _assert_same(_take(data.make_iterator(config, ByteTokenizer()), 3),
               _take(data.make_iterator(config, ByteTokenizer()), 3))
  other = _take(data.make_iterator(config.replace(seed=1), ByteTokenizer()), 1)
  assert not np.array_equal(other[0]["tokens"], _take(data.make_iterator(config, ByteTokenizer()),
                                                        1)[0]["tokens"])


def test_each_epoch_is_a_new_permutation(tmp_path):
  # Documents of exactly seq_len bytes fill one row each, so rows identify documents.
  texts = [f"{i:07d}\n" for i in range(8)]
  _write_docs(tmp_path, texts)
  config = data.DataConfig(source="text", paths=(str(tmp_path / "*.txt"),), seq_len=8,
                           batch_size=1, num_epochs=2, read_threads=0)
  batches = data.make_iterator(config, ByteTokenizer())
  rows = [bytes(b["tokens"][0].astype(np.uint8)).decode() for b in batches]
  assert len(rows) == 16
  assert sorted(rows[:8]) == sorted(texts) == sorted(rows[8:])
  assert rows[:8] != rows[8:] and rows[:8] != texts


def test_state_survives_json_at_every_step():
  """get_state -> JSON -> set_state resumes exactly, including at document boundaries."""
  rng = np.random.default_rng(1)
  docs = [rng.integers(1, 1000, n) for n in [3, 5, 2, 6, 13, 4, 1, 7, 8, 2, 3]]
  full = list(_pack_list(docs, 6))
  for k in range(len(full)):
    iterator = iter(_pack_list(docs, 6))
    _take(iterator, k)
    state = json.loads(json.dumps(iterator.get_state()))
    restored = iter(_pack_list(docs, 6))
    restored.set_state(state)
    _assert_same(list(restored), full[k:])


@pytest.mark.parametrize("kind", ["stdlib", "aligned"])
def test_orbax_checkpoint_resumes(stdlib_dir, tmp_path, kind):
  if kind == "stdlib":
    config, k = _stdlib_config(stdlib_dir, read_threads=2), 3
  else:  # every row ends on a document boundary: the packer's state holds no partial document
    _write_docs(tmp_path, [f"{i:07d}\n" for i in range(10)])
    config, k = data.DataConfig(source="text", paths=(str(tmp_path / "*.txt"),), seq_len=8,
                                batch_size=2), 2
  reference = _take(data.make_iterator(config, ByteTokenizer()), k + 3)
  iterator = data.make_iterator(config, ByteTokenizer())
  _assert_same(_take(iterator, k), reference[:k])
  with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
    manager.save(k, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator)))
    manager.wait_until_finished()
  _take(iterator, 2)  # moving on after the save must not change what was saved
  resumed = data.make_iterator(config, ByteTokenizer())
  with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
    manager.restore(manager.latest_step(),
                    args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(resumed)))
  _assert_same(_take(resumed, 3), reference[k:])


def test_local_text_and_jsonl_sources(tmp_path):
  _write_docs(tmp_path, ["first file\n", "second file\n"])
  (tmp_path / "notes.md").write_text("not matched")
  text = data.documents(data.DataConfig(source="text", paths=str(tmp_path / "*.txt"),
                                        validation_percent=0))
  assert list(text) == ["first file\n", "second file\n"]

  lines = [{"body": "line one"}, {"body": "line two", "id": 2}, {"body": "línea tres"}]
  jsonl = tmp_path / "a.jsonl"
  jsonl.write_text("\n".join(json.dumps(x) for x in lines[:2]) + "\n\n" + json.dumps(lines[2]))
  nested = tmp_path / "nested.jsonl"
  nested.write_text(json.dumps({"meta": {"text": "deep"}}) + "\n")
  config = data.DataConfig(source="jsonl", paths=(str(jsonl),), text_field="body",
                           validation_paths=(str(nested),))
  assert list(data.documents(config, "train")) == ["line one", "line two", "línea tres"]
  assert list(data.documents(config.replace(text_field="meta/text"), "validation")) == ["deep"]

  # Without validation_paths, documents split by a hash of their key: disjoint and complete.
  many = tmp_path / "many.jsonl"
  many.write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(200)))
  split_config = data.DataConfig(source="jsonl", paths=(str(many),), validation_percent=10)
  train = list(data.documents(split_config, "train"))
  validation = list(data.documents(split_config, "validation"))
  assert validation and sorted(train + validation) == sorted(f"doc {i}" for i in range(200))

  # Two hosts read disjoint halves.
  halves = [list(data.make_iterator(split_config.replace(seq_len=4, batch_size=1), ByteTokenizer(),
                                    "validation", shard_index=i, shard_count=2)) for i in (0, 1)]
  tokens = [np.concatenate([b["tokens"][b["segment_ids"] > 0] for b in h]) for h in halves]
  assert sorted(tokens[0].tolist() + tokens[1].tolist()) == sorted(
      np.frombuffer("".join(validation).encode(), np.uint8).tolist())


def test_config_and_source_errors(tmp_path):
  with pytest.raises(ConfigError, match="source='csv' is not supported"):
    data.DataConfig(source="csv")
  with pytest.raises(ConfigError, match="seq_len=0"):
    data.DataConfig(seq_len=0)
  with pytest.raises(ConfigError, match="needs tfds_name"):
    data.DataConfig(source="tfds")
  with pytest.raises(ConfigError, match="needs paths"):
    data.DataConfig(source="text")
  with pytest.raises(ConfigError, match=r"fields \['colour'\] are unknown"):
    data.DataConfig.from_dict({"source": "stdlib", "colour": "red"})
  with pytest.raises(ConfigError, match="split='test'"):
    data.documents(data.DataConfig(), "test")
  with pytest.raises(ConfigError, match="matched no files"):
    data.documents(data.DataConfig(source="text", paths=(str(tmp_path / "*.txt"),)))
  # A registered TFDS dataset that is not prepared, and a name nobody knows: never downloaded.
  with pytest.raises(ConfigError, match="'mnist' is not prepared"):
    data.documents(data.DataConfig(source="tfds", tfds_name="mnist", data_dir=str(tmp_path)))
  with pytest.raises(ConfigError, match="neither a registered TFDS dataset"):
    data.documents(data.DataConfig(source="tfds", tfds_name="no_such_corpus",
                                   data_dir=str(tmp_path)))
  bad = tmp_path / "bad.jsonl"
  bad.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"body": "no text"}) + "\n")
  config = data.DataConfig(source="jsonl", paths=(str(bad),), validation_percent=0, seq_len=4,
                           batch_size=1)
  with pytest.raises(ConfigError, match="text_field='text' is not in .*bad.jsonl"):
    list(data.make_iterator(config, ByteTokenizer(), training=False))


def test_tfds_source_reads_a_prepared_dataset(stdlib_dir):
  name = f"{stdlib_dataset.NAME}/{stdlib_dataset.config_name()}"
  config = data.DataConfig(source="tfds", tfds_name=name, data_dir=stdlib_dir,
                           train_split="train[:3]")
  docs = data.documents(config)
  assert len(docs) == 3 and all(isinstance(d, str) and d for d in docs)
  with pytest.raises(ConfigError, match="text_field='body'"):
    data.documents(config.replace(text_field="body"))
  with pytest.raises(ConfigError, match="split='test'"):
    data.documents(config.replace(train_split="test"))
