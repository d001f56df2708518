"""Load, prune and prune again (two search candidates) a Hugging Face directory on an fsdp=8 mesh,
as one of several processes, and report what this process held; for the multi-process tests.

  python tests/sharded_job.py MODEL_DIR SCORES_DIR OUT_DIR [COORDINATOR NUM_PROCESSES PROCESS_ID]

Writes OUT_DIR/process_<i>.json (bytes read from the files, bytes of every weight this process's
devices hold, against the whole model's) and, from the primary process, OUT_DIR/<target>.npz:
each pruned model, gathered here only to compare it with one process's.
"""

import json
import pathlib
import sys

import jax
import numpy as np

from minitron_jax.checkpoints import hf, hf_slices
from minitron_jax.compress import importance, prune
from minitron_jax.core import distributed
from minitron_jax.models import partitioning, sharding

TARGETS = {"narrow": dict(hidden_size=32, intermediate_size=64),
           "shallow": dict(num_layers=1, num_attention_heads=4)}


def held(params) -> tuple[int, int]:
  """(bytes this process's devices hold, counting each distinct slice once; the whole model's)."""
  mine = whole = 0
  for leaf in jax.tree.leaves(params):
    whole += leaf.nbytes
    slices = {str(shard.index): shard.data.nbytes for shard in leaf.addressable_shards}
    mine += sum(slices.values())
  return mine, whole


def run(model_dir: pathlib.Path, scores_dir: pathlib.Path, out: pathlib.Path) -> dict:
  mesh = partitioning.make_mesh(partitioning.MeshConfig(data=1, fsdp=8))
  config = hf.load_config(model_dir)
  read = []
  config, params = hf_slices.load(model_dir, sharding.param_shardings(config, mesh),
                                  on_read=lambda name, box, size: read.append(size))
  report = {"read": sum(read), "file_bytes": held(params)[1], "loaded": held(params)}
  scores = importance.Scores.load(scores_dir)
  for name, target in TARGETS.items():
    pruned_config, pruned = prune.prune(
        config, params, scores, target,
        shardings=lambda c: sharding.param_shardings(c, mesh))
    report[name] = held(pruned)
    flat = {jax.tree_util.keystr(path): np.asarray(value) for path, value in
            jax.tree_util.tree_flatten_with_path(distributed.to_host(pruned))[0]}
    if distributed.is_primary():
      np.savez(out / f"{name}.npz", **flat)
      (out / f"{name}.json").write_text(json.dumps(pruned_config.to_dict()))
  (out / f"process_{jax.process_index()}.json").write_text(json.dumps(report))
  return report


if __name__ == "__main__":
  model_dir, scores_dir, out_dir = map(pathlib.Path, sys.argv[1:4])
  if len(sys.argv) > 4:
    distributed.initialize(sys.argv[4], int(sys.argv[5]), int(sys.argv[6]))
    # Tiny leaves: a block this small makes the gather of every leaf but the norms run in
    # several blocks (as a real model's leaves do), compared with one process's plain copy.
    distributed.GATHER_BLOCK_BYTES = 512
  run(model_dir, scores_dir, out_dir)
