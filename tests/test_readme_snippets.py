"""Every ```python block of the README runs as written, in order, in one namespace (as a reader
pasting them into one session would), from an empty working directory: the snippets load the
shipped teacher, so nothing in them stands for a file the reader does not have."""

import pathlib
import re

REPO = pathlib.Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)


def _blocks() -> list[tuple[int, str]]:
  text = (REPO / "README.md").read_text()
  return [(text[:match.start()].count("\n") + 1, match.group(1))
          for match in BLOCK.finditer(text)]


def test_the_readme_snippets_run_as_written(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  blocks = _blocks()
  assert len(blocks) >= 5
  namespace: dict = {}
  for line, source in blocks:
    exec(compile(source, f"README.md:{line}", "exec"), namespace)  # noqa: S102
  # What the snippets promise, checked on what they made.
  small = namespace["small_config"]
  assert (small.num_layers, small.hidden_size, small.intermediate_size) == (3, 96, 256)
  assert (tmp_path / "scores" / "scores.npz").is_file()
  assert (tmp_path / "exported" / "tokenizer.json").is_file()
  assert namespace["logits"].shape == (*namespace["tokens"].shape, namespace["config"].vocab_size)
  assert 0 < namespace["metrics"]["val_ce"] < 10
