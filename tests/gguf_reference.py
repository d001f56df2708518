"""Writes small GGUF files from tiny `transformers` models the way llama.cpp's converter does.

The writer is the `gguf` package's own; the name map and the Q/K row permutation follow llama.cpp's
convert_hf_to_gguf.py, written here independently of the loader under test. Quantisation is
blockwise along each row, and the permutation only reorders rows, so a quantised permuted weight
dequantises to the permuted dequantised weight: `effective_state_dict` is the exact float model a
file encodes, with no inverse permutation needed.
"""

from __future__ import annotations

import pathlib

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")

Q = gguf.GGMLQuantizationType
# Types the gguf package can write from floats; K-quants it only reads (see random_block_bytes).
QUANTIZABLE = (Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1)
K_QUANTS = (Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K)

_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_TOP_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight":
              "output_norm.weight", "lm_head.weight": "output.weight"}


def gguf_name(hf_name: str) -> str:
  if hf_name in _TOP_NAMES:
    return _TOP_NAMES[hf_name]
  _, _, layer, rest = hf_name.split(".", 3)
  return f"blk.{layer}.{_LAYER_NAMES[rest]}"


def llama_cpp_permute(weights: np.ndarray, heads: int) -> np.ndarray:
  """convert_hf_to_gguf.py's LlamaModel.permute: HF's half-split RoPE rows -> interleaved."""
  return (weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
          .swapaxes(1, 2).reshape(weights.shape))


def random_block_bytes(rows: int, columns: int, qtype, seed: int = 0) -> np.ndarray:
  """Valid random blocks of `qtype`: every byte < 0x3C, so each fp16 scale is finite and < 1."""
  block, size = gguf.GGML_QUANT_SIZES[qtype]
  rng = np.random.RandomState(seed)
  return rng.randint(0, 0x3C, size=(rows, columns // block * size)).astype(np.uint8)


def _encode(array: np.ndarray, qtype, seed: int):
  """(bytes or floats to store, raw_dtype or None, what the file decodes to)."""
  if qtype == Q.F32:
    return array, None, array
  if qtype == Q.F16:
    stored = array.astype(np.float16)
    return stored, None, stored.astype(np.float32)
  stored = (random_block_bytes(*array.shape, qtype, seed) if qtype in K_QUANTS
            else gguf.quants.quantize(array, qtype))
  return stored, qtype, gguf.quants.dequantize(stored, qtype).astype(np.float32)


def write_gguf(path: pathlib.Path, model, arch: str, qtype=Q.F32, *, tokenizer=None,
               rope_freqs: np.ndarray | None = None, name: str = "tiny") -> dict:
  """Writes `model` as a GGUF file; returns the HF state dict the file encodes (float32)."""
  config = model.config
  heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
  head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
  writer = gguf.GGUFWriter(str(path), arch)
  writer.add_name(name)
  writer.add_block_count(config.num_hidden_layers)
  writer.add_context_length(config.max_position_embeddings)
  writer.add_embedding_length(config.hidden_size)
  writer.add_feed_forward_length(config.intermediate_size)
  writer.add_head_count(heads)
  writer.add_head_count_kv(kv_heads)
  writer.add_key_length(head_dim)
  writer.add_value_length(head_dim)
  writer.add_rope_dimension_count(head_dim)
  writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
  writer.add_layer_norm_rms_eps(config.rms_norm_eps)
  writer.add_vocab_size(config.vocab_size)
  if tokenizer is not None:
    tokenizer(writer)
  if rope_freqs is not None:
    writer.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
  effective = {}
  tied = getattr(config, "tie_word_embeddings", False)
  for index, (hf_name, tensor) in enumerate(model.state_dict().items()):
    if tied and hf_name == "lm_head.weight":
      continue
    array = tensor.detach().float().numpy()
    # llama.cpp keeps 1-D tensors (norms, biases) in F32 whatever the file type.
    stored, raw, decoded = _encode(array, qtype if array.ndim == 2 else Q.F32, seed=index)
    if arch == "llama" and (".q_proj." in hf_name or ".k_proj." in hf_name):
      n = heads if ".q_proj." in hf_name else kv_heads
      stored = llama_cpp_permute(stored, n)
    writer.add_tensor(gguf_name(hf_name), stored, raw_dtype=raw)
    effective[hf_name] = decoded
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return effective


def with_state(model, state: dict):
  """`model` with its weights replaced by `state` (tied lm_head follows the embedding)."""
  model.load_state_dict({k: torch.tensor(v) for k, v in state.items()}, strict=False)
  return model.eval()


def bpe_tokenizer_fields(hf_tokenizer_json: dict, *, pre: str, add_bos: bool = False,
                         eos: str | None = None, bos: str | None = None):
  """A writer callback storing a byte-level BPE tokenizer.json as llama.cpp does."""
  vocab = hf_tokenizer_json["model"]["vocab"]
  tokens = [t for t, _ in sorted(vocab.items(), key=lambda item: item[1])]
  merges = [m if isinstance(m, str) else " ".join(m) for m in hf_tokenizer_json["model"]["merges"]]
  special = {t["content"] for t in hf_tokenizer_json.get("added_tokens", []) if t["special"]}
  types = [3 if t in special else 1 for t in tokens]

  def write(writer) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_merges(merges)
    writer.add_token_types(types)
    writer.add_add_bos_token(add_bos)
    if eos is not None:
      writer.add_eos_token_id(tokens.index(eos))
    if bos is not None:
      writer.add_bos_token_id(tokens.index(bos))
  return write
