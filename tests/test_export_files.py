"""An export is a whole model directory: the tokenizer (copied from a Hugging Face source, written
for a GGUF's embedded one and for the byte tokenizer) loads in `transformers.AutoTokenizer` and
encodes as ours, generation_config.json holds the special ids, lm-eval's own hf backend runs on it
with no extra flags, and the shipped teacher states the context it was trained for."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from minitron_jax.checkpoints import hf
from minitron_jax.core.assets import STDLIB_TEACHER
from minitron_jax.inputs import tokenizer
from minitron_jax.models import config as config_lib
from minitron_jax.models import model

transformers = pytest.importorskip("transformers")

ROOT = pathlib.Path(__file__).resolve().parents[1]
EOS = "<|endoftext|>"
TEXTS = ["The cat sat on the mat.", "A dog ran in the park.", "def f(x):\n    return x * 2\n",
         "Question: what is red? Answer: the apple."] * 8
PROBES = ["The cat ran in the park.", "  indented\tand tabbed\n", "unicode: é ü 中文 ✓",
          "\x00 nul and <|endoftext|> in text"]


def _tiny(vocab_size: int):
  config = config_lib.tiny("llama", vocab_size=vocab_size, max_position_embeddings=64)
  return config, model.init(config, 0)


def _assert_auto_tokenizer_encodes_as(directory: pathlib.Path, ours) -> None:
  theirs = transformers.AutoTokenizer.from_pretrained(directory)
  for text in PROBES:
    assert theirs(text)["input_ids"] == ours.encode(text), text


def test_a_byte_tokenizer_export_is_complete(tmp_path):
  config, params = _tiny(256)
  hf.save(tmp_path / "hf", config, params, tokenizer=tokenizer.ByteTokenizer())
  names = {p.name for p in (tmp_path / "hf").iterdir()}
  assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
          "generation_config.json"} <= names
  _assert_auto_tokenizer_encodes_as(tmp_path / "hf", tokenizer.ByteTokenizer())
  theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
  assert len(theirs) == 256 and theirs.model_max_length == 64
  assert theirs.decode(theirs(PROBES[2])["input_ids"]) == PROBES[2]
  # Ours reads the written file back as the same byte encoding.
  assert tokenizer.load_tokenizer(tmp_path / "hf").encode(PROBES[2]) == list(
      PROBES[2].encode("utf-8"))
  assert json.loads((tmp_path / "hf" / "generation_config.json").read_text()) == {}
  # Without a tokenizer: the weights alone, as before.
  hf.save(tmp_path / "bare", config, params)
  assert not (tmp_path / "bare" / "tokenizer.json").exists()


def test_a_hugging_face_tokenizer_is_copied_with_its_side_files(tmp_path):
  bpe = tokenizer.train_bpe_tokenizer(TEXTS, 300, tmp_path / "bpe", eos_token=EOS)
  source = tmp_path / "source"
  transformers.PreTrainedTokenizerFast(
      tokenizer_file=str(bpe.path), eos_token=EOS, pad_token=EOS,
      chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}").save_pretrained(source)
  ours = tokenizer.load_tokenizer(source)
  config, params = _tiny(304)
  hf.save(tmp_path / "hf", config, params, tokenizer=ours)
  for name in ("tokenizer.json", "tokenizer_config.json"):
    assert (tmp_path / "hf" / name).read_bytes() == (source / name).read_bytes()
  _assert_auto_tokenizer_encodes_as(tmp_path / "hf", ours)
  theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
  assert theirs.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "hi"
  generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
  assert generation == {"eos_token_id": ours.eos_id, "pad_token_id": ours.eos_id}


def test_a_gguf_tokenizer_is_written_as_tokenizer_json(tmp_path):
  from gguf_reference import bpe_tokenizer_fields, write_gguf

  import hf_reference

  bpe = tokenizer.train_bpe_tokenizer(TEXTS, 300, tmp_path / "bpe", eos_token=EOS)
  fields = bpe_tokenizer_fields(json.loads(bpe.path.read_text()), pre="gpt-2", add_bos=True,
                                eos=EOS, bos=EOS)
  template = "{% for m in messages %}<{{ m['content'] }}>{% endfor %}"

  def with_template(writer):
    fields(writer)
    writer.add_chat_template(template)

  source = hf_reference.hf_model(hf_reference.hf_config("llama", vocab_size=304))
  write_gguf(tmp_path / "m.gguf", source, "llama", tokenizer=with_template)
  ours = tokenizer.load_tokenizer(tmp_path / "m.gguf")
  assert ours.encode("The cat")[0] == ours.eos_id  # the GGUF asks for a BOS first
  config, params = hf.load(tmp_path / "m.gguf")
  hf.save(tmp_path / "hf", config, params, tokenizer=ours)
  _assert_auto_tokenizer_encodes_as(tmp_path / "hf", ours)
  theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
  assert theirs.eos_token == EOS and theirs.bos_token == EOS
  assert theirs.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "<hi>"
  generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
  assert generation == {"bos_token_id": ours.eos_id, "eos_token_id": ours.eos_id,
                        "pad_token_id": ours.eos_id}


def test_the_shipped_teacher_states_its_trained_context_and_loads_whole():
  config, _ = hf.load(STDLIB_TEACHER)
  assert config.max_position_embeddings == 128  # its training windows (train_tiny_teacher.py)
  _assert_auto_tokenizer_encodes_as(STDLIB_TEACHER, tokenizer.ByteTokenizer())
  assert transformers.AutoConfig.from_pretrained(STDLIB_TEACHER).max_position_embeddings == 128


def test_lm_eval_hf_backend_runs_on_an_export_as_it_is_and_agrees_with_ours(tmp_path):
  import lm_eval
  from lm_eval.tasks import TaskManager

  from test_lm_eval import MC_YAML  # the same multiple-choice task shape, named minitron_mc

  from minitron_jax.evaluation.lm_eval_backend import MinitronLM

  config, params = _tiny(256)
  hf.save(tmp_path / "hf", config, params, tokenizer=tokenizer.ByteTokenizer())
  docs = [dict(question=f"{t[:12]}", choices=[t[12:20], t[4:12], "zz"], gold=i % 3)
          for i, t in enumerate(TEXTS[:4])]
  (tmp_path / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
  (tmp_path / "minitron_mc.yaml").write_text(MC_YAML.format(path=tmp_path / "mc.jsonl"))
  manager = TaskManager(include_path=str(tmp_path))

  def accuracy(**kwargs):
    results = lm_eval.simple_evaluate(tasks=["minitron_mc"], task_manager=manager,
                                      log_samples=True, bootstrap_iters=0, **kwargs)
    samples = sorted(results["samples"]["minitron_mc"], key=lambda s: s["doc_id"])
    return [s["acc"] for s in samples]

  theirs = accuracy(model="hf", model_args=f"pretrained={tmp_path / 'hf'},dtype=float32",
                    device="cpu", batch_size=2)
  ours = accuracy(model=MinitronLM(tmp_path / "hf", batch_size=2))
  assert theirs == ours and len(ours) == 4


def test_lm_eval_quiet_git_and_help(tmp_path, capfd, monkeypatch):
  from minitron_jax.evaluation import lm_eval_backend

  monkeypatch.chdir(tmp_path)  # not a git repository: git would say so on stderr
  assert lm_eval_backend._git_commit_quietly() is None
  assert "fatal" not in capfd.readouterr().err
  result = subprocess.run([sys.executable, "-m", "minitron_jax.main", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0 and "--workdir" in result.stdout, result.stderr[-2000:]


OFFLINE_YAML = """task: needs_the_hub
dataset_path: nobody/no_such_dataset_here
test_split: test
output_type: multiple_choice
doc_to_text: "{{question}}"
doc_to_choice: "{{choices}}"
doc_to_target: "{{gold}}"
"""


def test_a_task_whose_dataset_is_not_here_is_one_line(tmp_path):
  (tmp_path / "needs_the_hub.yaml").write_text(OFFLINE_YAML)
  result = subprocess.run(
      [sys.executable, "-m", "minitron_jax.lm_eval", f"--model_path={STDLIB_TEACHER}",
       "--tasks=needs_the_hub", f"--include_path={tmp_path}"],
      cwd=ROOT, capture_output=True, text=True, timeout=300,
      env={k: v for k, v in os.environ.items() if not k.startswith("HF_")})
  assert result.returncode == 2, result.stderr[-3000:]
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert len(lines) == 1, lines
  assert "task 'needs_the_hub'" in lines[0] and "--include_path" in lines[0]
