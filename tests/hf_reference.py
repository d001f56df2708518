"""Tiny random `transformers` models built in process: the independent numerical reference."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "nemotron")
_CONFIG_CLASSES = {
    "llama": "LlamaConfig",
    "mistral": "MistralConfig",
    "qwen2": "Qwen2Config",
    "qwen3": "Qwen3Config",
    "nemotron": "NemotronConfig",
    "gemma": "GemmaConfig",
    "gemma2": "Gemma2Config",
    "gemma3": "Gemma3TextConfig",
    "mixtral": "MixtralConfig",
    "qwen2_moe": "Qwen2MoeConfig",
    "qwen3_moe": "Qwen3MoeConfig",
}


def hf_config(family: str, *, num_key_value_heads: int = 2, head_dim: int | None = 16, **overrides):
  """hidden 48 with 4 heads of head_dim 16: head_dim != hidden/heads unless head_dim is None."""
  fields = dict(vocab_size=128, hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=num_key_value_heads,
                max_position_embeddings=256, initializer_range=0.1)
  if head_dim is not None:
    fields["head_dim"] = head_dim
  fields.update(overrides)
  return getattr(transformers, _CONFIG_CLASSES[family])(**fields)


def hf_model(config, seed: int = 0):
  """A random model whose norms and biases are far from their identity init, so they matter."""
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
  with torch.no_grad():
    for param in model.parameters():
      param.add_(0.1 * torch.randn_like(param))
  return model


def hf_logits(model, tokens: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
  with torch.no_grad():
    mask = None if attention_mask is None else torch.tensor(attention_mask)
    return model(torch.tensor(tokens), attention_mask=mask).logits.float().numpy()


def load_saved_reference(directory, hf_cfg, tokens: np.ndarray):
  """A seeded transformers model of `hf_cfg`, saved under `directory` and loaded by hf.load:
  (the reference model, our config, our params, our float32 logits of `tokens`)."""
  import jax.numpy as jnp

  from minitron_jax.checkpoints import hf
  from minitron_jax.models import model

  reference = hf_model(hf_cfg)
  reference.save_pretrained(directory)
  config, params = hf.load(directory)
  logits = np.asarray(model.apply(config, params, jnp.asarray(tokens)))
  return reference, config, params, logits


def fp32_tolerance(num_layers: int, width: int) -> float:
  """The relative tolerance of float32 logits against transformers' for a model `num_layers`
  deep whose longest sum runs over `width` terms (the MLP's down projection).

  Both compute in float32 (eps 1.2e-7) but sum in different orders (XLA fuses, tiles and
  vectorises by its optimisation level and the CPU; torch by its kernels): a sum of n terms
  differs by ~ sqrt(n) eps, and the residual stream adds each layer's difference like a random
  walk, so logits differ by ~ sqrt(num_layers x width) eps. Measured at 0.3-0.5 of that: random
  3-layer width-96 models 0.7-1.2e-6; SmolLM2-135M (30 layers, width 1536; estimate 2.6e-5)
  3.6e-6 to 1.0e-5 by XLA's optimisation level and machine, which failed a fixed 1e-5 once.
  1e-5 stays the floor for the tiny test models: a real mistake (a wrong scale, a missing term)
  moves logits by 1e-3 or more.
  """
  return max(1e-5, float(np.finfo(np.float32).eps) * (num_layers * width) ** 0.5)


def assert_close_relative(actual, expected, tolerance: float):
  """max |actual - expected| <= tolerance * max |expected| (elementwise rtol is meaningless near 0)."""
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  assert actual.shape == expected.shape, (actual.shape, expected.shape)
  error = np.max(np.abs(actual - expected)) / np.max(np.abs(expected))
  assert error <= tolerance, f"relative error {error:.3g} > {tolerance}"


def assert_export_round_trip(directory, config, params, tokens: np.ndarray, logits: np.ndarray,
                             tolerance: float = 1e-5):
  """hf.save -> transformers computes our logits; hf.load of the export gives back our model."""
  import jax.numpy as jnp

  from minitron_jax.checkpoints import hf
  from minitron_jax.models import model

  hf.save(directory, config, params)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
  assert_close_relative(hf_logits(reloaded, tokens), logits, tolerance)
  again_config, again_params = hf.load(directory)
  assert again_config == config
  np.testing.assert_array_equal(
      np.asarray(model.apply(again_config, again_params, jnp.asarray(tokens))), logits)
