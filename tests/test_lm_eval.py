"""lm-evaluation-harness through our backend (lm_eval_backend.py) against the harness's own `hf`
backend and our evaluator, on a tiny random Llama saved with a small BPE tokenizer, and local
tasks written here (nothing is downloaded)."""

from __future__ import annotations

import json
import os
import pathlib

import numpy as np
import pytest

# The harness reads its datasets through `datasets`, which must never reach a hub here.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed (the `test` extra)")
import hf_reference  # noqa: E402  (skips this module without torch and transformers)

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from minitron_jax.evaluation import evaluate  # noqa: E402
from minitron_jax.inputs import tokenizer  # noqa: E402
from minitron_jax import lm_eval as cli  # noqa: E402
from minitron_jax.errors import ConfigError  # noqa: E402
from minitron_jax.evaluation.evaluate import MultipleChoiceExample  # noqa: E402
from minitron_jax.evaluation.lm_eval_backend import MinitronLM, rolling_windows  # noqa: E402

EOS = "<|endoftext|>"
TEXTS = ["The cat sat on the mat.", "A dog ran in the park.", "Question: what is red?",
         "Answer: the apple is red.", "Birds fly over the sea and the hills.",
         "One two three four five six seven."] * 20
MC = [dict(question="What sits on the mat?", choices=["the cat", "a dog", "the sea"], gold=0),
      dict(question="What is red?", choices=["the sky", "the apple"], gold=1),
      dict(question="Where do birds fly?", choices=["over the sea", "in a park", "under it"],
           gold=0),
      dict(question="What ran?", choices=["a dog", "the hills", "seven", "one"], gold=0),
      dict(question="Count:", choices=["one two three", "red apple"], gold=0),
      dict(question="Which is an animal?", choices=["mat", "bird", "park"], gold=1)]
GEN = [dict(prompt="The cat sat", answer=" on the mat."),
       dict(prompt="Question: what", answer=""), dict(prompt="One two", answer=" three"),
       dict(prompt="Birds fly over the sea and", answer="")]
MC_YAML = """task: minitron_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{gold}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""
GEN_YAML = """task: minitron_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["."]
  max_gen_toks: 10
  do_sample: false
metric_list:
  - metric: exact_match
"""


def _jsonl(path: pathlib.Path, records) -> None:
  path.write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """(model directory, task directory, a TaskManager that knows the local tasks)."""
  import transformers

  root = tmp_path_factory.mktemp("lm_eval")
  model_dir, task_dir = root / "model", root / "tasks"
  task_dir.mkdir()
  bpe = tokenizer.train_bpe_tokenizer(TEXTS, 300, root / "bpe", eos_token=EOS)
  config = hf_reference.hf_config("llama", vocab_size=304, bos_token_id=bpe.eos_id,
                                  eos_token_id=bpe.eos_id, pad_token_id=bpe.eos_id)
  hf_reference.hf_model(config).save_pretrained(model_dir)
  transformers.PreTrainedTokenizerFast(tokenizer_file=str(bpe.path), eos_token=EOS,
                                       pad_token=EOS).save_pretrained(model_dir)
  _jsonl(task_dir / "mc.jsonl", MC)
  _jsonl(task_dir / "gen.jsonl", GEN)
  (task_dir / "minitron_mc.yaml").write_text(MC_YAML.format(path=task_dir / "mc.jsonl"))
  (task_dir / "minitron_gen.yaml").write_text(GEN_YAML.format(path=task_dir / "gen.jsonl"))
  return model_dir, task_dir, TaskManager(include_path=str(task_dir))


@pytest.fixture(scope="module")
def ours(setup):
  return MinitronLM(setup[0], batch_size=4)


def _evaluate(model, task_manager, **kwargs):
  return lm_eval.simple_evaluate(model=model, tasks=["minitron_mc", "minitron_gen"],
                                 task_manager=task_manager, log_samples=True, bootstrap_iters=0,
                                 **kwargs)


def _samples(results, task):
  return sorted(results["samples"][task], key=lambda s: s["doc_id"])


@pytest.fixture(scope="module")
def both(setup, ours):
  """The harness's results through our backend and through its hf backend."""
  model_dir, _, task_manager = setup
  return (_evaluate(ours, task_manager),
          _evaluate("hf", task_manager, model_args=f"pretrained={model_dir},dtype=float32",
                    device="cpu", batch_size=4))


def test_multiple_choice_equals_the_hf_backend_and_our_evaluator(both, ours):
  mine, theirs = both
  for metric in ("acc,none", "acc_norm,none"):
    assert mine["results"]["minitron_mc"][metric] == theirs["results"]["minitron_mc"][metric]
  # Every choice's log-likelihood, not only the argmax: float32 on both sides.
  for a, b in zip(_samples(mine, "minitron_mc"), _samples(theirs, "minitron_mc")):
    np.testing.assert_allclose([r[0][0] for r in a["resps"]], [r[0][0] for r in b["resps"]],
                               rtol=1e-4, atol=1e-4)
    assert [r[0][1] for r in a["resps"]] == [r[0][1] for r in b["resps"]]  # is_greedy
  examples = [MultipleChoiceExample(f"Question: {d['question']}\nAnswer:",
                                    tuple(" " + c for c in d["choices"]), d["gold"]) for d in MC]
  own = evaluate.score_multiple_choice(ours.config, ours.params, ours.tokenizer, examples,
                                       batch_size=4)
  assert mine["results"]["minitron_mc"]["acc,none"] == pytest.approx(own["accuracy"])
  assert mine["results"]["minitron_mc"]["acc_norm,none"] == pytest.approx(own["accuracy_norm"])
  ll = [s.loglikelihoods for s in own["per_example"]]
  assert [tuple(r[0][0] for r in s["resps"]) for s in _samples(mine, "minitron_mc")] == ll


def test_generate_until_equals_the_hf_backend_greedy(both):
  mine, theirs = both
  texts = [s["resps"][0][0] for s in _samples(mine, "minitron_gen")]
  assert texts == [s["resps"][0][0] for s in _samples(theirs, "minitron_gen")]
  assert any(texts) and all("." not in t for t in texts)  # generated, and cut at the stop
  assert (mine["results"]["minitron_gen"]["exact_match,none"]
          == theirs["results"]["minitron_gen"]["exact_match,none"])


def _rolling(model, texts):
  return model.loglikelihood_rolling([
      Instance(request_type="loglikelihood_rolling", doc={}, arguments=(t,), idx=i)
      for i, t in enumerate(texts)])


@pytest.fixture(scope="module")
def short(setup, ours):
  """Our backend and the hf backend on the same model, both with max_length 16 tokens."""
  from lm_eval.models.huggingface import HFLM

  return (MinitronLM(config=ours.config, params=ours.params, tokenizer=ours.tokenizer,
                     batch_size=4, max_length=16),
          HFLM(pretrained=str(setup[0]), dtype="float32", device="cpu", batch_size=4,
               max_length=16))


def test_loglikelihood_rolling_equals_our_perplexity_and_the_hf_backend(ours, short):
  texts = [" ".join(TEXTS[:6]), "Birds fly."]
  rolling = _rolling(ours, texts)
  for text, total in zip(texts, rolling):
    ids = [ours.tokenizer.eos_id] + ours.tokenizer.encode(text)
    result = evaluate.perplexity(ours.config, ours.params, [np.asarray([ids])])
    assert result["tokens"] == len(ids) - 1
    assert total == pytest.approx(-result["loss"] * result["tokens"], rel=1e-5)
  # Windows shorter than the text: each token scored once, with the harness's contexts.
  assert len(ours.tokenizer.encode(texts[0])) > 2 * 16
  np.testing.assert_allclose(_rolling(short[0], texts), _rolling(short[1], texts), rtol=1e-4)
  assert _rolling(short[0], texts)[0] != pytest.approx(rolling[0])  # the windows cut context


def test_generation_cuts_long_prompts_from_the_left_as_the_hf_backend(short):
  requests = [Instance(request_type="generate_until", doc={}, idx=i,
                       arguments=(text, dict(until=["."], max_gen_toks=10)))
              for i, text in enumerate([" ".join(TEXTS[:4]), "The cat", " ".join(TEXTS[2:5])])]
  texts = short[0].generate_until(requests)
  assert texts == short[1].generate_until(requests) and any(texts)


def test_a_mesh_in_context_splits_the_batches_and_changes_nothing(ours):
  import jax

  from minitron_jax.models import partitioning

  pairs = [(f"Question: {d['question']}\nAnswer:", " " + c) for d in MC for c in d["choices"]]
  scoring = [Instance(request_type="loglikelihood", doc={}, arguments=pair, idx=i)
             for i, pair in enumerate(pairs)]
  generating = [Instance(request_type="generate_until", doc={}, idx=i,
                         arguments=(d["prompt"], dict(until=["."], max_gen_toks=6)))
                for i, d in enumerate(GEN)]
  with jax.set_mesh(partitioning.make_mesh(partitioning.MeshConfig(data=2, fsdp=2, tensor=2))):
    split = MinitronLM(config=ours.config, params=ours.params, tokenizer=ours.tokenizer,
                       batch_size=4)
    assert len(jax.tree.leaves(split.params)[0].sharding.device_set) == 8
    scored, generated = split.loglikelihood(scoring), split.generate_until(generating)
  np.testing.assert_allclose([s for s, _ in scored], [s for s, _ in ours.loglikelihood(scoring)],
                             rtol=1e-5)
  assert generated == ours.generate_until(generating)


def test_rolling_windows_score_every_token_once():
  ids = list(range(10, 20))
  windows = rolling_windows(ids, 0, 4)
  assert [(w.tolist(), n) for w, n in windows] == [
      ([0, 10, 11, 12, 13], 4), ([13, 14, 15, 16, 17], 4), ([15, 16, 17, 18, 19], 2)]
  assert rolling_windows([5], 0, 4)[0][0].tolist() == [0, 5]


def test_command_line(setup, tmp_path, capsys, monkeypatch):
  model_dir, task_dir, task_manager = setup
  # The harness's whole index is built once, by the fixture.
  monkeypatch.setattr(lm_eval.tasks, "TaskManager", lambda **_: task_manager)
  output = tmp_path / "results.json"
  assert cli.main([f"--model_path={model_dir}", "--tasks=minitron_mc", f"--include_path={task_dir}",
                   "--limit=3", "--batch_size=4", f"--output_path={output}"]) == 0
  saved = json.loads(output.read_text())
  assert saved["results"]["minitron_mc"]["alias"] == "minitron_mc"
  assert "minitron_mc" in capsys.readouterr().out
  assert cli.main([f"--model_path={tmp_path / 'nothing'}", "--tasks=minitron_mc"]) == 2
  assert "is not a model" in capsys.readouterr().err
  assert cli.main([f"--model_path={model_dir}", "--tasks=minitron_mc,no_such_task",
                   f"--include_path={task_dir}"]) == 2
  assert "no_such_task" in capsys.readouterr().err


def test_bad_arguments_are_one_line(setup, ours, tmp_path):
  with pytest.raises(ConfigError, match="batch_size"):
    MinitronLM(setup[0], batch_size="auto")
  with pytest.raises(ConfigError, match="holds no tokenizer"):
    from minitron_jax.checkpoints import checkpoint

    checkpoint.save_model(tmp_path / "saved", ours.config, ours.params)
    MinitronLM(tmp_path / "saved")
  saved = MinitronLM(tmp_path / "saved", tokenizer=str(setup[0]))
  assert saved.config == ours.config
  with pytest.raises(ConfigError, match="num_beams"):
    ours.generate_until([Instance(request_type="generate_until", doc={}, idx=0,
                                  arguments=("The", dict(until=["."], num_beams=2)))])


def test_a_gguf_file_scores_as_its_hugging_face_directory(setup, ours, tmp_path):
  import transformers
  from gguf_reference import bpe_tokenizer_fields, write_gguf

  source = transformers.AutoModelForCausalLM.from_pretrained(setup[0]).eval()
  fields = bpe_tokenizer_fields(json.loads(ours.tokenizer.path.read_text()), pre="gpt-2", eos=EOS)
  write_gguf(tmp_path / "m.gguf", source, "llama", tokenizer=fields)
  from_gguf = MinitronLM(tmp_path / "m.gguf", batch_size=4)
  pairs = [Instance(request_type="loglikelihood", doc={}, arguments=(d["prompt"], " the"), idx=i)
           for i, d in enumerate(GEN)]
  assert [from_gguf.tokenizer.encode(d["prompt"]) for d in GEN] == [
      ours.tokenizer.encode(d["prompt"]) for d in GEN]
  np.testing.assert_allclose([s for s, _ in from_gguf.loglikelihood(pairs)],
                             [s for s, _ in ours.loglikelihood(pairs)], rtol=1e-5)


@pytest.mark.parametrize("mode", ["line", "context"])
def test_our_tasks_written_for_the_harness_score_exactly_as_our_evaluator(tmp_path, mode):
  from minitron_jax.models import config as config_lib
  from minitron_jax.evaluation import lm_eval_tasks, stdlib_tasks
  from minitron_jax.models import model

  config = config_lib.tiny("llama")
  params = model.init(config, 0)
  tok = tokenizer.load_tokenizer("bytes")
  examples = stdlib_tasks.next_line_task(12, 3, seed=1, mode=mode)
  if mode == "line":  # a context ending in spaces: the harness moves them to the scored text
    examples.append(MultipleChoiceExample("Answer:  ", ("yes", "no", "maybe"), 2))
  lm_eval_tasks.write_task("ours", examples, tmp_path)
  results = lm_eval.simple_evaluate(
      model=MinitronLM(config=config, params=params, tokenizer=tok, batch_size=8,
                       max_length=128),
      tasks=["ours"], task_manager=lm_eval_tasks.task_manager(tmp_path, ["ours"]),
      log_samples=True, bootstrap_iters=0)
  own = evaluate.score_multiple_choice(config, params, tok, examples, batch_size=8,
                                       max_length=128)
  harness = [[r[0][0] for r in s["resps"]] for s in _samples(results, "ours")]
  np.testing.assert_allclose(harness, [s.loglikelihoods for s in own["per_example"]], rtol=1e-6)
  scores = lm_eval_tasks.flat_scores(results)
  assert scores["ours/acc"] == pytest.approx(own["accuracy"])
  if mode == "line":  # per-byte normalisation; in context mode the harness divides by contexts
    assert scores["ours/acc_bytes"] == pytest.approx(own["accuracy_norm"])
