"""Parquet, Arrow (IPC files, streams, save_to_disk directories) and weighted mixtures of sources:
the same tokens as the text path, pre-tokenized ids, mixture shares, exact resume, reading a unit
at a time, one-line errors, and a parquet mixture feeding distillation."""

import itertools
import json

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import pytest

from test_data import _assert_same
from minitron_jax.inputs import columnar_source, data
from minitron_jax.models import model
from minitron_jax.run import plan, run_config, validate
from minitron_jax.training import distill
from minitron_jax.models import config as config_lib
from minitron_jax.errors import ConfigError
from minitron_jax.objectives.losses import LossConfig
from minitron_jax.inputs.tokenizer import ByteTokenizer

TEXTS = ["alpha\n", "a longer document " * 5, "x", "", "tail text é\n", "more " * 9, "b\n",
         "the last one"]


def _write_arrow(path, table: pa.Table, rows_per_batch: int, stream: bool):
  with pa.OSFile(str(path), "wb") as sink:
    writer = (ipc.new_stream if stream else ipc.new_file)(sink, table.schema)
    for batch in table.to_batches(max_chunksize=rows_per_batch):
      writer.write_batch(batch)
    writer.close()


def _save_to_disk(directory, table: pa.Table, shards: int = 2, rows_per_batch: int = 3):
  """The layout `datasets.Dataset.save_to_disk` writes: Arrow stream shards named in state.json,
  beside dataset_info.json."""
  directory.mkdir(parents=True)
  names = [f"data-{i:05d}-of-{shards:05d}.arrow" for i in range(shards)]
  for i, name in enumerate(names):
    lo, hi = i * len(table) // shards, (i + 1) * len(table) // shards
    _write_arrow(directory / name, table.slice(lo, hi - lo), rows_per_batch, stream=True)
  (directory / "state.json").write_text(json.dumps({
      "_data_files": [{"filename": name} for name in names], "_fingerprint": "0",
      "_format_type": None, "_split": None}))
  (directory / "dataset_info.json").write_text(json.dumps({"features": {}}))
  return directory


KIND = {"parquet": "parquet", "arrow_file": "arrow", "arrow_stream": "arrow",
        "save_to_disk": "arrow"}


def _write(layout: str, directory, table: pa.Table) -> str:
  """The table in `layout`, 3 rows to a row group / record batch; returns what `paths` names."""
  directory.mkdir(parents=True, exist_ok=True)
  if layout == "parquet":
    pq.write_table(table, directory / "part.parquet", row_group_size=3)
    return str(directory / "*.parquet")
  if layout in ("arrow_file", "arrow_stream"):
    _write_arrow(directory / "part.arrow", table, 3, stream=layout == "arrow_stream")
    return str(directory / "part.arrow")
  return str(_save_to_disk(directory / "saved", table))


def _batches(config, n=None, **kwargs):
  iterator = data.make_iterator(config, ByteTokenizer(), **kwargs)
  return list(iterator if n is None else itertools.islice(iterator, n))


def _tokens(batches):
  return np.concatenate([b["tokens"][b["segment_ids"] > 0] for b in batches])


@pytest.mark.parametrize("layout", ["parquet", "arrow_file", "arrow_stream", "save_to_disk"])
def test_the_same_tokens_as_the_text_path(tmp_path, layout):
  for i, text in enumerate(TEXTS):
    (tmp_path / f"doc{i:02d}.txt").write_text(text)
  as_text = data.DataConfig(source="text", paths=str(tmp_path / "*.txt"), seq_len=16,
                            batch_size=3, validation_percent=0, shuffle=False)
  # A null row reads as an empty document, skipped like the empty one.
  table = pa.table({"text": TEXTS + [None], "id": list(range(len(TEXTS) + 1))})
  columnar = as_text.replace(source=KIND[layout], paths=_write(layout, tmp_path / layout, table))
  _assert_same(_batches(columnar, training=False), _batches(as_text, training=False))
  _assert_same(_batches(columnar, 12), _batches(as_text, 12))  # in order, repeated


def test_save_to_disk_dataset_dict_splits(tmp_path):
  train = pa.table({"text": [f"train {i}" for i in range(40)]})
  held_out = pa.table({"text": ["held out 0", "held out 1"]})
  both = tmp_path / "both"
  _save_to_disk(both / "train", train)
  _save_to_disk(both / "validation", held_out, shards=1)
  (both / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "validation"]}))
  config = data.DataConfig(source=f"arrow:{both}")
  assert list(data.documents(config, "train")) == [f"train {i}" for i in range(40)]
  assert list(data.documents(config, "validation")) == ["held out 0", "held out 1"]

  # Without a validation split, validation_percent of the train split, chosen by hash.
  only = tmp_path / "only"
  _save_to_disk(only / "train", train)
  (only / "dataset_dict.json").write_text(json.dumps({"splits": ["train"]}))
  config = data.DataConfig(source="arrow", paths=str(only), validation_percent=20)
  picked = [list(data.documents(config, split)) for split in data.SPLITS]
  assert picked[1] and sorted(picked[0] + picked[1]) == sorted(train["text"].to_pylist())
  with pytest.raises(ConfigError, match=r"has no split train_split='training'; splits there"):
    data.documents(config.replace(train_split="training"))


def test_pretokenized_ids_pass_through(tmp_path):
  ids = [[1, 2, 3], [4], [], [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21]]
  pq.write_table(pa.table({"input_ids": pa.array(ids, pa.list_(pa.int32()))}),
                 tmp_path / "ids.parquet", row_group_size=2)
  _write_arrow(tmp_path / "ids.arrow", pa.table({"input_ids": pa.array(ids, pa.large_list(
      pa.int64()))}), 3, stream=True)
  expected = np.concatenate([np.asarray(d, np.int32) for d in ids if d])
  for source in (f"parquet:{tmp_path / 'ids.parquet'}#input_ids",
                 f"arrow:{tmp_path / 'ids.arrow'}#input_ids"):
    config = data.DataConfig(source=source, seq_len=8, batch_size=2, validation_percent=0)
    batches = _batches(config, training=False)
    np.testing.assert_array_equal(_tokens(batches), expected)  # no eos added, nothing changed
    assert all(b["tokens"].dtype == np.int32 for b in batches)

  pq.write_table(pa.table({"input_ids": [[1, 300]]}), tmp_path / "wide.parquet")
  config = data.DataConfig(source="parquet", paths=str(tmp_path / "wide.parquet"),
                           text_field="input_ids", validation_percent=0, read_threads=0)
  with pytest.raises(ConfigError, match=r"token id 300; tokenizer 'bytes' allows \[0, 256\)"):
    _batches(config, training=False)


def _letters(tmp_path, letter: str, layout: str) -> str:
  """Documents of one repeated letter (one row a letter's source), of varied lengths."""
  table = pa.table({"text": [letter * (3 + i % 11) for i in range(60)]})
  return _write(layout, tmp_path / letter, table)


def _row_sources(batches) -> list[str]:
  """Each row's source letter: a component's rows hold only its own documents."""
  rows = [b["tokens"][i][b["segment_ids"][i] > 0] for b in batches for i in range(len(b["tokens"]))]
  return [chr(set(r.tolist()).pop()) for r in rows if len(set(r.tolist())) == 1]


def test_mixture_weights_are_token_shares_and_deterministic(tmp_path):
  web, code = _letters(tmp_path, "w", "parquet"), _letters(tmp_path, "c", "arrow_stream")
  config = data.DataConfig(source=f"parquet:{web}@0.7,arrow:{code}@0.3", seq_len=16,
                           batch_size=4)
  batches = _batches(config, 150)
  sources = _row_sources(batches)
  assert len(sources) == 600  # every row is one component's
  assert sources.count("w") / 600 == pytest.approx(0.7, abs=0.01)
  _assert_same(batches, _batches(config, 150))  # deterministic
  # Relative weights; a different seed reorders the documents, not the shares.
  _assert_same(batches, _batches(config.replace(source=f"parquet:{web}@7,arrow:{code}@3"), 150))
  reseeded = _batches(config.replace(seed=5), 150)
  assert _row_sources(reseeded) == sources
  assert not np.array_equal(np.stack([b["positions"] for b in reseeded]),
                            np.stack([b["positions"] for b in batches]))
  # Validation: one in-order pass of each component's validation share, mixed the same way.
  held_out = _row_sources(_batches(config.replace(validation_percent=30), split="validation"))
  assert set(held_out) == {"w", "c"}


def test_a_mixture_of_jsonl_and_parquet(tmp_path):
  (tmp_path / "notes").mkdir()
  (tmp_path / "notes" / "a.jsonl").write_text("".join(
      json.dumps({"body": "j" * (4 + i % 5)}) + "\n" for i in range(30)))
  web = _letters(tmp_path, "w", "parquet")
  config = data.DataConfig(source=f"jsonl:{tmp_path / 'notes' / '*.jsonl'}#body@1,parquet:{web}@1",
                           seq_len=8, batch_size=2)
  sources = _row_sources(_batches(config, 40))
  assert sources.count("j") == sources.count("w") == 40
  data.check_source(config)


def _mixture(tmp_path, **changes) -> data.DataConfig:
  web, code = _letters(tmp_path, "w", "parquet"), _letters(tmp_path, "c", "save_to_disk")
  return data.DataConfig(**{**dict(source=f"parquet:{web}@0.6,arrow:{code}@0.4", seq_len=16,
                                   batch_size=3), **changes})


def test_resume_from_a_checkpointed_state_continues_exactly(tmp_path):
  config = _mixture(tmp_path, num_epochs=3)
  reference = _batches(config, 40)
  for k in (0, 5, 17, 33):  # 33: past the first epoch of the smaller component
    iterator = data.make_iterator(config, ByteTokenizer())
    _assert_same(list(itertools.islice(iterator, k)), reference[:k])
    state = json.loads(json.dumps(iterator.get_state()))  # orbax stores the state as JSON
    resumed = data.make_iterator(config, ByteTokenizer())
    resumed.set_state(state)
    _assert_same(list(itertools.islice(resumed, 7)), reference[k:k + 7])

  iterator = data.make_iterator(config, ByteTokenizer())
  list(itertools.islice(iterator, 9))
  with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
    manager.save(9, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator)))
    manager.wait_until_finished()
  resumed = data.make_iterator(config, ByteTokenizer())
  with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
    manager.restore(9, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(resumed)))
  _assert_same(list(itertools.islice(resumed, 6)), reference[9:15])


def test_two_hosts_read_disjoint_documents(tmp_path):
  texts = [f"{i:03d}" for i in range(50)]  # 3 bytes each: a row of 3 tokens is one document
  paths = _write("parquet", tmp_path, pa.table({"text": texts}))
  config = data.DataConfig(source="parquet", paths=paths, seq_len=3, batch_size=1,
                           validation_percent=0, num_epochs=1)
  for training in (False, True):
    halves = [[bytes(b["tokens"][0].astype(np.uint8)).decode() for b in data.make_iterator(
        config, ByteTokenizer(), training=training, shard_index=i, shard_count=2)] for i in (0, 1)]
    assert not set(halves[0]) & set(halves[1])
    assert sorted(halves[0] + halves[1]) == texts


def test_block_shuffle_is_a_new_permutation_every_epoch():
  shuffled = columnar_source.BlockShuffleMapDataset(grain.MapDataset.range(103), block_size=10,
                                                   seed=3)
  epochs = [[shuffled[e * 103 + i] for i in range(103)] for e in range(3)]
  for order in epochs:
    assert sorted(order) == list(range(103))
    # Consecutive documents come from one block of 10 (the short last block aside).
    assert sum(a // 10 != b // 10 for a, b in zip(order, order[1:])) == 10
  assert epochs[0] != epochs[1] != epochs[2] and epochs[0] != list(range(103))


@pytest.mark.parametrize("layout", ["parquet", "arrow_file", "arrow_stream"])
def test_a_reader_decodes_one_unit_at_a_time(tmp_path, monkeypatch, layout):
  table = pa.table({"text": [f"document {i} " * (1 + i % 4) for i in range(60)],
                    "other": [f"never read {i}" for i in range(60)]})
  paths = _write(layout, tmp_path, table)  # 20 units of 3 rows

  def whole_file(*args, **kwargs):
    raise AssertionError("a whole file was read")
  monkeypatch.setattr(pq, "read_table", whole_file)
  monkeypatch.setattr(pq.ParquetFile, "read", whole_file)
  monkeypatch.setattr(ipc.RecordBatchFileReader, "read_all", whole_file)
  monkeypatch.setattr(ipc.RecordBatchStreamReader, "read_all", whole_file)
  reads = []
  read = columnar_source.ColumnarSource._read

  def counted(self, unit):
    array, selected = read(self, unit)
    reads.append((unit, len(array), array.type))
    return array, selected
  monkeypatch.setattr(columnar_source.ColumnarSource, "_read", counted)

  config = data.DataConfig(source=KIND[layout], paths=paths, seq_len=16, batch_size=2,
                           validation_percent=0, num_epochs=2, read_threads=0)
  _batches(config, training=False)  # in order: each unit once
  assert sorted(unit for unit, _, _ in reads) == list(range(20))
  assert all(rows == 3 and kind == pa.string() for _, rows, kind in reads)  # one column, 3 rows
  reads.clear()
  assert len(_tokens(_batches(config))) > 0  # two shuffled epochs
  assert len(reads) <= 2 * 2 * 20  # a global shuffle would decode a unit per document (120)


def test_bad_inputs_are_one_line(tmp_path):
  good = tmp_path / "good.parquet"
  pq.write_table(pa.table({"text": ["a", "b"], "n": [1, 2]}), good)
  (tmp_path / "notes.parquet").write_text("not parquet at all")
  truncated = tmp_path / "truncated.parquet"
  truncated.write_bytes(good.read_bytes()[:-20])
  (tmp_path / "garbage.arrow").write_bytes(b"\x00\x01" * 40)
  (tmp_path / "empty").mkdir()
  cases = {
      ("parquet", str(tmp_path / "notes.parquet"), "text"):
          f"{tmp_path / 'notes.parquet'} is not a parquet file",
      ("parquet", str(truncated), "text"): f"{truncated} is not a parquet file",
      ("arrow", str(tmp_path / "garbage.arrow"), "text"):
          f"{tmp_path / 'garbage.arrow'} is not an Arrow IPC file or stream",
      ("parquet", str(good), "body"):
          f"{good} has no column 'body'; columns there: ['text', 'n']",
      ("parquet", str(good), "n"):
          f"{good}: column 'n' holds int64; allowed: text (string) or token ids",
      ("parquet", str(tmp_path / "none" / "*.parquet"), "text"): "matched no files",
      ("arrow", str(tmp_path / "empty"), "text"): "is a directory without state.json",
  }
  for (kind, path, column), message in cases.items():
    config = data.DataConfig(source=kind, paths=path, text_field=column)
    for check in (data.check_source, data.documents):  # before the run, and when reading
      with pytest.raises(ConfigError) as caught:
        check(config)
      assert message in str(caught.value) and "\n" not in str(caught.value)

  web = str(good)
  specs = {
      f"parquet:{web}@0.7,arrow:{web}": "give every component a weight",
      f"parquet:{web}@-1": "weight '-1' must be a positive number",
      f"parquet:{web}@lots": "weight 'lots' must be a positive number",
      f"csv:{web}@1": "kind 'csv' is not supported; allowed: ('stdlib', 'tfds', 'text'",
      "stdlib:/somewhere@1": "stdlib takes no path",
      "parquet": "data source='parquet' needs paths",
      "csv": "data source='csv' is not supported",
  }
  for source, message in specs.items():
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
      data.DataConfig(source=source)
  with pytest.raises(ConfigError, match=r"validation_paths=\('v',\) serve one source"):
    data.DataConfig(source=f"parquet:{web}@1,parquet:{web}@1", validation_paths="v")
  with pytest.raises(ConfigError, match=r"data paths=\('p',\) are not used"):
    data.DataConfig(source=f"parquet:{web}@1,parquet:{web}@1", paths="p")
  with pytest.raises(ConfigError, match="mixes 2 sources"):
    data.documents(data.DataConfig(source=f"parquet:{web}@1,parquet:{web}@1"))


def test_a_parquet_mixture_feeds_distillation(tmp_path):
  """The run's settings accept the mixture (validate), and its batches go through distillation's
  train step."""
  web, code = _letters(tmp_path, "w", "parquet"), _letters(tmp_path, "c", "save_to_disk")
  cfg = run_config.base_config()
  cfg.stages = ("check",)
  cfg.data.source = f"parquet:{web}@0.7,arrow:{code}@0.3"
  cfg.distill.update(batch_size=4, seq_len=16)
  assert validate.validate(cfg, tmp_path / "unused") == []
  stream = plan.data_config(cfg.data, batch_size=cfg.distill.batch_size,
                            seq_len=cfg.distill.seq_len)
  cfg.data.source = f"parquet:{web}#n@0.7,arrow:{code}@0.3"
  assert validate.validate(cfg, tmp_path / "unused") == [
      f"data: {tmp_path / 'w' / 'part.parquet'} has no column 'n'; columns there: ['text']"]

  teacher_config = config_lib.tiny("llama", num_layers=1)
  student_config = teacher_config.replace(intermediate_size=64)
  distiller = distill.Distiller(student_config, teacher_config, LossConfig(),
                                distill.OptimizerConfig(warmup_steps=1), 3)
  # The models and the train step traced, not compiled (that costs 15-30 s on 2 cores): the
  # batches' shapes and dtypes meet the step all the way to its metrics; training itself is
  # tests/test_distill.py's.
  state = jax.eval_shape(lambda: distiller.init_state(model.init(student_config, 1)))
  teacher = jax.eval_shape(lambda: model.init(teacher_config, 0))
  batches = data.make_iterator(stream, ByteTokenizer())
  for _ in range(2):
    batch = next(batches)
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
        k: ((4, 16), np.int32) for k in data.BATCH_KEYS}
    state, metrics = jax.eval_shape(distiller.train_step, state, teacher,
                                    {k: jnp.asarray(v) for k, v in batch.items()})
    assert metrics["loss"].shape == () and metrics["loss"].dtype == jnp.float32
