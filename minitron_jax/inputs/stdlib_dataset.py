"""The embedded corpus (the standard library's own source) as a real TFDS array_record dataset.

Going through TFDS means the default run reads its data exactly the way a user's dataset is read
(`tfds.data_source` -> grain), so the embedded default exercises the production path rather than
a special case.

TensorFlow is not installed, and it need not be: tensorflow-datasets 4.9 serialises examples with
its own protobuf code and writes array_record through the `array_record` package, so an ordinary
`tfds.core.GeneratorBasedBuilder` with `file_format="array_record"` prepares and reads back without
TF. Preparing takes well under a second; the result is cached under
`data_dir/minitron_stdlib/<python version>/1.0.0` (default data_dir: `default_data_dir()`).

One example per top-level `*.py` file: `text` (the source) and `name` (the file name). The split
is `corpus.split_of` (a hash of the file name), so it matches the byte-window calibration data.
The builder config is named after the interpreter version, because each version ships different
source; two interpreters sharing a cache never read each other's files.
"""

from __future__ import annotations

import os
import pathlib
import sys
import tempfile

from etils import epath

from minitron_jax.core import optional
from minitron_jax.inputs import corpus

tfds = optional.module("tensorflow_datasets", "the embedded stdlib corpus (data source 'stdlib')")

NAME = "minitron_stdlib"
SPLITS = ("train", "validation")
DATA_DIR_ENV = "MINITRON_DATA_DIR"


def default_data_dir() -> pathlib.Path:
  """$MINITRON_DATA_DIR, else ~/.cache/minitron_jax/tfds."""
  if os.environ.get(DATA_DIR_ENV):
    return pathlib.Path(os.environ[DATA_DIR_ENV]).expanduser()
  return pathlib.Path("~/.cache/minitron_jax/tfds").expanduser()


def config_name() -> str:
  """The builder config for this interpreter, e.g. 'py3_11_7'."""
  return "py{}_{}_{}".format(*sys.version_info[:3])


class MinitronStdlib(tfds.core.GeneratorBasedBuilder):
  """This interpreter's standard library source, one example per top-level *.py file."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "One example per top-level stdlib *.py file; split by corpus.split_of."}
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(
      name=config_name(), description=f"Python {sys.version.split()[0]} standard library")]
  # TFDS 4.9.10 finds a packaged builder's source through `importlib_resources`, a backport it only
  # declares for Python < 3.9, so the lookup fails on 3.11 without it. The path is only used to look
  # for a checksums file (there is none: nothing is downloaded), so give it directly.
  code_path = epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({"name": tfds.features.Text(),
                                             "text": tfds.features.Text()}),
        supervised_keys=None,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing is downloaded
    files = corpus.stdlib_files()
    if not files:
      raise FileNotFoundError("no standard library source found to build the stdlib dataset")
    return {split: self._generate_examples(files, split) for split in SPLITS}

  def _generate_examples(self, files, split):
    for path in files:
      if corpus.split_of(path) == split:
        yield path.name, {"name": path.name,
                          "text": path.read_bytes().decode("utf-8", errors="replace")}


def prepare(data_dir: str | os.PathLike | None = None) -> MinitronStdlib:
  """The prepared builder, building the array_record files first if `data_dir` lacks them."""
  data_dir = pathlib.Path(data_dir).expanduser() if data_dir else default_data_dir()
  builder = MinitronStdlib(data_dir=str(data_dir), file_format="array_record")
  if not builder.is_prepared():
    # TFDS writes into an `incomplete.*` folder and renames it, so readers never see a partial
    # dataset; the download folder is a throwaway because nothing is downloaded.
    with tempfile.TemporaryDirectory() as downloads:
      try:
        builder.download_and_prepare(download_dir=downloads)
      except OSError:
        # Another process may have finished the same build first; only then is this fine.
        builder = MinitronStdlib(data_dir=str(data_dir), file_format="array_record")
        if not builder.is_prepared():
          raise
  return builder


def data_source(split: str, data_dir: str | os.PathLike | None = None):
  """A random-access TFDS source of {'name': bytes, 'text': bytes} records for `split`."""
  builder = prepare(data_dir)
  return tfds.data_source(f"{NAME}/{config_name()}", split=split, data_dir=builder.data_dir_root,
                          download=False)
