"""The original checkpoint is read once: the first stage saves it as a sharded model of our own
in the dtype that holds it exactly, later stages restore that, and every number a stage computes
is the one reading the checkpoint itself in float32 gives."""

import json
import os
import pathlib
import sys

import jax
import numpy as np
import pytest

from minitron_jax.checkpoints import checkpoint, converted, hf, hf_slices
from minitron_jax.compress import importance
from minitron_jax.models import config as config_lib, model, partitioning, sharding
from minitron_jax.run import pipeline, registry

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "configs"))
import default  # noqa: E402  (configs/ is not a package)


def _saved(directory: pathlib.Path, dtype: str) -> pathlib.Path:
  config = config_lib.tiny("llama", num_layers=3)
  hf.save(directory, config, model.init(config, 0), dtype=dtype)
  return directory


def _leaves(tree) -> dict:
  return {jax.tree_util.keystr(path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_the_stored_dtype_is_read_from_the_headers(tmp_path):
  assert hf_slices.stored_dtype(_saved(tmp_path / "bf16", "bfloat16")) == "bfloat16"
  assert hf_slices.stored_dtype(_saved(tmp_path / "f32", "float32")) == "float32"
  assert hf_slices.stored_dtype(tmp_path / "any.gguf") == "float32"  # dequantised


def test_a_checkpoint_is_converted_once_then_restored_until_it_changes(tmp_path, monkeypatch):
  checkpoint_dir = _saved(tmp_path / "hf", "bfloat16")
  mesh = partitioning.make_mesh(partitioning.MeshConfig(fsdp=2, tensor=2))
  shardings = lambda config: sharding.param_shardings(config, mesh)  # noqa: E731
  copy = tmp_path / "work" / "original"
  want_config, want = hf.load(checkpoint_dir)  # float32 on the host

  lines = []
  config, params = converted.load(checkpoint_dir, copy, shardings, lines.append)
  assert config.param_dtype == "bfloat16" and any("converted once" in line for line in lines)
  assert config == want_config.replace(param_dtype="bfloat16")
  assert json.loads((copy / converted.SOURCE_FILE).read_text())["param_dtype"] == "bfloat16"

  reads = []
  real_load = hf_slices.load
  monkeypatch.setattr(hf_slices, "load", lambda *a, **k: reads.append(a) or real_load(*a, **k))
  restored_config, restored = converted.load(checkpoint_dir, copy, shardings, lines.append)
  assert not reads and restored_config == config
  want, restored, wanted_shardings = _leaves(want), _leaves(restored), _leaves(shardings(config))
  assert want.keys() == restored.keys()
  for key, leaf in restored.items():
    assert leaf.dtype == jax.numpy.bfloat16, key  # kept as stored: half the bytes
    assert leaf.sharding.is_equivalent_to(wanted_shardings[key], leaf.ndim), key
    np.testing.assert_array_equal(np.asarray(leaf, np.float32), want[key], err_msg=key)

  weights = next(checkpoint_dir.glob("*.safetensors"))
  stat = weights.stat()
  os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
  assert not converted.is_current(copy, checkpoint_dir)
  converted.load(checkpoint_dir, copy, shardings, lines.append)
  assert len(reads) == 1 and converted.is_current(copy, checkpoint_dir)


def _run(checkpoint_dir: pathlib.Path, workdir: pathlib.Path, stages) -> list[str]:
  config = default.get_config("")
  config.stages = stages
  config.model.hf_path = str(checkpoint_dir)
  config.data.batch_size, config.data.seq_len, config.eval_batches = 2, 32, 1
  config.importance.num_samples, config.importance.batch_size = 4, 4
  config.importance.seq_len, config.importance.drop_loss_batches = 32, 1
  config.prune.target = dict(num_layers=2, hidden_size=48, intermediate_size=96)
  config.distill.steps, config.distill.eval_every = 2, 2
  lines = []
  pipeline.run(config, workdir, log=lines.append)
  return lines


def test_stages_on_a_bfloat16_checkpoint_compute_what_its_float32_copy_gives(tmp_path):
  """The copy stays bfloat16 (the model computes in float32 from it exactly), and so do its
  slices; what is trained is float32; every number equals reading the checkpoint in float32."""
  bf16 = _saved(tmp_path / "bf16", "bfloat16")
  f32 = tmp_path / "f32"
  config, params = hf.load(bf16)  # the bfloat16 values, widened exactly
  hf.save(f32, config, params, dtype="float32")
  stages = ("importance", "prune", "distill")
  lines = _run(bf16, tmp_path / "run_bf16", stages)
  _run(f32, tmp_path / "run_f32", stages)
  assert sum("converted once" in line for line in lines) == 1  # later stages restored it

  mesh = partitioning.make_mesh(partitioning.MeshConfig())
  copy_config, copy = converted.load(bf16, registry.original_copy(tmp_path / "run_bf16"),
                                     lambda c: sharding.param_shardings(c, mesh))
  assert copy_config.param_dtype == "bfloat16"
  assert {leaf.dtype for leaf in jax.tree.leaves(copy)} == {jax.numpy.dtype("bfloat16")}

  want_scores = importance.Scores.load(tmp_path / "run_f32" / "importance")
  got_scores = importance.Scores.load(tmp_path / "run_bf16" / "importance")
  assert want_scores.stats.keys() == got_scores.stats.keys()
  for name, value in want_scores.stats.items():
    np.testing.assert_array_equal(got_scores.stats[name], value, err_msg=name)
  for n, value in want_scores.block_importance.items():
    np.testing.assert_array_equal(got_scores.block_importance[n], value)
  for stage in ("prune", "distill"):
    want = json.loads((tmp_path / "run_f32" / stage / "summary.json").read_text())
    got = json.loads((tmp_path / "run_bf16" / stage / "summary.json").read_text())
    keys = [k for k in want if "loss" in k or k in ("val_ce", "pruned_params")]
    assert keys and {k: got[k] for k in keys} == {k: want[k] for k in keys}, stage
  # Slices of the bfloat16 copy stay bfloat16 (exactly the float32 run's values); what is
  # trained is float32.
  for stage, dtype in (("prune", "bfloat16"), ("distill", "float32")):
    got_config, got = checkpoint.load_model(tmp_path / "run_bf16" / stage / "model")
    assert got_config.param_dtype == dtype, stage
    _, want = checkpoint.load_model(tmp_path / "run_f32" / stage / "model")
    for key, leaf in _leaves(got).items():
      assert leaf.dtype == jax.numpy.dtype(dtype), (stage, key)
      np.testing.assert_array_equal(np.asarray(leaf, np.float32), np.asarray(_leaves(want)[key]),
                                    err_msg=f"{stage} {key}")

if __name__ == "__main__":
  sys.exit(pytest.main([__file__, "-q"]))
