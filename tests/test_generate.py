"""Generation with a KV cache: transformers' greedy tokens for every family, a full forward's
argmax, sampling, stop sequences and strings, a sharded batch, and refused arguments.

Every family's reference is a tiny random transformers model (hidden 48, 3 layers); a batch of
three prompts of 5, 9 and 2 tokens is left padded, and 8 new tokens take the longest row to 17,
past every sliding window here (4 or 5), so windows, soft caps and MoE routing all act on cached
steps. Each test reuses the programs an earlier one compiled where it can (same batch shape).
"""

import functools
import tempfile

import jax
import numpy as np
import pytest

from hf_reference import hf_config, hf_model, torch
from test_gemma import OPTIONS as GEMMA_OPTIONS
from minitron_jax.checkpoints import hf
from minitron_jax.inputs import tokenizer
from minitron_jax.models import generate, model, partitioning, sharding
from minitron_jax.errors import ConfigError

PROMPTS = [[5, 9, 100, 3, 7], [11, 12, 13, 14, 15, 16, 17, 18, 19], [42, 1]]
NEW = 8
# What each family's reference sets beyond hf_config's defaults.
FAMILIES = {
    "llama": {},
    "mistral": dict(sliding_window=4),
    "qwen2": dict(use_sliding_window=True, sliding_window=4, max_window_layers=1),
    "qwen3": {},
    "nemotron": {},
    **GEMMA_OPTIONS,  # windows, soft caps, query scaling, local RoPE (test_gemma.py)
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=24,
                    sliding_window=5),
}


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
  """transformers' generate on these tiny models is a long chain of small ops: a second torch
  thread only spins (40x the CPU time on a busy 2-core machine). Restored for later modules."""
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(threads)


@functools.cache
def _loaded(family: str):
  """(the transformers reference, our config, our params), loaded through hf.load."""
  reference = hf_model(hf_config(family, **FAMILIES[family]))
  if family.startswith("gemma"):
    # Embeddings tied and scaled by sqrt(hidden) dominate a random Gemma's residual, so it echoes
    # its input token forever, as a model with a broken cache would too: shrink them.
    with torch.no_grad():
      reference.model.embed_tokens.weight.mul_(0.1)
  with tempfile.TemporaryDirectory() as directory:
    reference.save_pretrained(directory)
    config, params = hf.load(directory)
  return reference, config, params


def _greedy(family: str) -> list[list[int]]:
  _, config, params = _loaded(family)
  return generate.generate(config, params, PROMPTS, max_new_tokens=NEW)


def _transformers_greedy(reference) -> list[list[int]]:
  width = max(map(len, PROMPTS))
  tokens, mask = np.zeros((len(PROMPTS), width), np.int64), np.zeros((len(PROMPTS), width), int)
  for row, prompt in enumerate(PROMPTS):
    tokens[row, width - len(prompt):], mask[row, width - len(prompt):] = prompt, 1
  with torch.no_grad():
    out = reference.generate(torch.tensor(tokens), attention_mask=torch.tensor(mask),
                             do_sample=False, max_new_tokens=NEW, min_new_tokens=NEW,
                             pad_token_id=0, eos_token_id=None)
  return out[:, width:].tolist()


def _full_forward_logits(config, params, rows: list[list[int]]) -> list[np.ndarray]:
  """Each row's logits [len, V] from one uncached forward of the right-padded batch."""
  width = max(map(len, rows))
  tokens, segments = np.zeros((len(rows), width), np.int32), np.zeros((len(rows), width), np.int32)
  for row, ids in enumerate(rows):
    tokens[row, :len(ids)], segments[row, :len(ids)] = ids, 1
  logits = np.asarray(model.apply(config, params, tokens, segment_ids=segments))
  return [logits[row, :len(ids)] for row, ids in enumerate(rows)]


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_matches_transformers_on_a_left_padded_batch(family):
  reference, config, _ = _loaded(family)
  ours = _greedy(family)
  assert ours == _transformers_greedy(reference)
  assert len({tuple(row) for row in ours}) == len(ours) and len(set(ours[1])) > 2  # not echoes
  if family == "mixtral":
    assert config.is_moe
  if family in ("qwen2", "gemma2", "gemma3"):
    assert len(set(config.layer_windows())) == 2  # windowed and global layers mixed


@pytest.mark.parametrize("family", ["mistral", "gemma2", "mixtral"])
def test_cached_decode_equals_a_full_forward_argmax(family):
  _, config, params = _loaded(family)
  greedy = _greedy(family)
  full = _full_forward_logits(config, params, [p + g for p, g in zip(PROMPTS, greedy)])
  for prompt, new, logits in zip(PROMPTS, greedy, full):
    np.testing.assert_array_equal(np.argmax(logits[len(prompt) - 1:-1], axis=-1), new)


def test_sampling_is_reproducible_and_stays_in_the_top_k():
  # Mistral: its greedy and full-forward programs are compiled above.
  _, config, params = _loaded("mistral")
  sample = functools.partial(generate.generate, config, params, PROMPTS, max_new_tokens=NEW,
                             temperature=1.5)
  first = sample(key=jax.random.key(1))
  assert sample(key=jax.random.key(1)) == first
  assert sample(key=jax.random.key(2)) != first
  greedy = _greedy("mistral")
  assert first != greedy  # a hot temperature strays from the argmax somewhere
  assert sample(key=jax.random.key(3), top_k=1) == greedy
  assert sample(key=jax.random.key(4), top_p=1e-6) == greedy  # the most likely token alone
  top3 = sample(key=jax.random.key(5), top_k=3, top_p=0.9)
  full = _full_forward_logits(config, params, [p + g for p, g in zip(PROMPTS, top3)])
  for prompt, new, logits in zip(PROMPTS, top3, full):
    ranks = np.argsort(-logits[len(prompt) - 1:-1], axis=-1)[:, :3]
    assert all(token in allowed for token, allowed in zip(new, ranks)), (new, ranks)


def _through_first(tokens: list[int], stop: list[int]) -> list[int]:
  for end in range(len(stop), len(tokens) + 1):
    if tokens[end - len(stop):end] == stop:
      return tokens[:end]
  return tokens


def test_stop_sequences_end_each_row_where_they_first_appear():
  _, config, params = _loaded("llama")
  full = _greedy("llama")
  stops = [full[0][2:4], [full[1][5]]]
  ours = generate.generate(config, params, PROMPTS, max_new_tokens=NEW, stop_sequences=stops)
  expected = [min((_through_first(row, s) for s in stops), key=len) for row in full]
  assert ours == expected
  assert len(ours[0]) <= 4 and len(ours[1]) <= 6


def test_stop_strings_cut_the_text():
  _, config, params = _loaded("llama")  # vocab 128: every id is an ASCII byte
  chars = tokenizer.ByteTokenizer()
  prompts = ["".join(map(chr, p)) for p in PROMPTS]
  full = generate.generate_text(config, params, chars, prompts, max_new_tokens=NEW)
  assert full == [chars.decode(row) for row in _greedy("llama")]
  stop = full[0][3:5]
  cut = generate.generate_text(config, params, chars, prompts, max_new_tokens=NEW,
                               stop_strings=[stop])
  assert cut == [text[:text.find(stop)] if stop in text else text for text in full]
  assert cut[0] == full[0][:full[0].find(stop)]


def test_a_batch_split_over_the_mesh_generates_the_same_tokens():
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices (tests/conftest.py sets --xla_force_host_platform_device_count)")
  _, config, params = _loaded("qwen3")
  mesh = partitioning.make_mesh(partitioning.MeshConfig(data=2, fsdp=2, tensor=2))
  with jax.set_mesh(mesh):
    ours = generate.generate(config, sharding.shard_params(config, params, mesh),
                             PROMPTS + PROMPTS[:1], max_new_tokens=NEW)
  full = _greedy("qwen3")
  assert ours == full + full[:1]


@pytest.mark.parametrize("arguments,message", [
    (dict(max_new_tokens=0), "max_new_tokens=0 must be a positive integer"),
    (dict(temperature=-1.0), "temperature=-1.0 must be >= 0"),
    (dict(temperature=1.0, top_k=0, key=jax.random.key(0)), "top_k=0 must be a positive"),
    (dict(temperature=1.0, top_p=1.5, key=jax.random.key(0)), "top_p=1.5 must be in (0, 1]"),
    (dict(top_k=5), "need temperature > 0"),
    (dict(temperature=0.7), "pass key=jax.random.key(seed)"),
    (dict(prompts=[[1, 2], []]), "a prompt is []; allowed: a non-empty sequence of token ids"),
    (dict(prompts=[[1, 128]]), "a prompt holds token id 128; allowed: ids in [0, 128)"),
    (dict(prompts=["ab"]), "a prompt is 'ab'; allowed"),
    (dict(prompts=[]), "prompts is empty"),
    (dict(stop_sequences=[[3, -1]]), "a stop sequence holds token id -1"),
    (dict(max_new_tokens=250), "exceeds max_position_embeddings=256"),
])
def test_bad_arguments_are_refused_in_one_line(arguments, message):
  _, config, params = _loaded("llama")
  arguments = dict(dict(prompts=PROMPTS, max_new_tokens=NEW), **arguments)
  with pytest.raises(ConfigError) as error:
    generate.generate(config, params, arguments.pop("prompts"), **arguments)
  assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("arguments,message", [
    (dict(stop_strings=[""]), "stop string '' must be a non-empty string"),
    (dict(prompts="ab"), "prompts='ab'... is one string; allowed: a list of strings"),
])
def test_bad_text_arguments_are_refused_in_one_line(arguments, message):
  _, config, params = _loaded("llama")
  arguments = dict(dict(prompts=["ab"], max_new_tokens=2), **arguments)
  with pytest.raises(ConfigError) as error:
    generate.generate_text(config, params, tokenizer.ByteTokenizer(), arguments.pop("prompts"),
                           **arguments)
  assert message in str(error.value) and "\n" not in str(error.value)
