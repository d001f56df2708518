"""Multi-process runs on JAX's distributed runtime: one controller process per host.

Every process runs the same program on the same global arrays (params and batches span the whole
mesh), so every stage computes the same thing whether one process drives 8 devices or 2 drive 4
each. What differs is the edge: a process can only hand the host what its own devices hold
(`to_host` gathers the rest), and files are written once, by the primary process (`is_primary`),
into a work directory that every process sees (a shared file system, as orbax needs anyway).
Processes meet at `barrier`s so a file written by one is there when another reads it.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from minitron_jax.errors import ConfigError

# Launchers that start one process per host and that jax.distributed.initialize() recognises.
_CLUSTER_SIZE_VARIABLES = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")


def cluster_detected() -> bool:
  """True under a multi-process launcher JAX detects by itself (SLURM, Open MPI, a TPU pod)."""
  for name in _CLUSTER_SIZE_VARIABLES:
    value = os.environ.get(name, "")
    if value.isdigit() and int(value) > 1:
      return True
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")  # set on every host of a multi-host slice
  return len([h for h in hosts.split(",") if h]) > 1


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
  """Joins the distributed runtime; returns whether this is a multi-process run.

  With an address, the three values say everything (a GPU cluster launched by hand or any
  launcher); without one, JAX reads them from the cluster environment when `cluster_detected()`,
  and a lone process initialises nothing. CPU processes talk through gloo, which is how the test
  suite runs two processes on one machine.
  """
  explicit = (coordinator_address, num_processes, process_id)
  if any(v is not None for v in explicit) and not all(v is not None for v in explicit):
    raise ConfigError("--coordinator_address, --num_processes and --process_id go together; got "
                      f"coordinator_address={coordinator_address!r}, "
                      f"num_processes={num_processes!r}, process_id={process_id!r}")
  if coordinator_address is not None:
    if num_processes < 1:
      raise ConfigError(f"--num_processes={num_processes} must be at least 1")
    if not 0 <= process_id < num_processes:
      raise ConfigError(f"--process_id={process_id} must be in [0, {num_processes})")
    if ":" not in coordinator_address:
      raise ConfigError(f"--coordinator_address={coordinator_address!r} must be host:port")
  elif not cluster_detected():
    return False
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if coordinator_address is None:
    jax.distributed.initialize()
  else:
    jax.distributed.initialize(coordinator_address, num_processes=num_processes,
                               process_id=process_id)
  return jax.process_count() > 1


def is_primary() -> bool:
  """The process that writes reports, JSON, score files and Hugging Face exports."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Every process waits here until all arrive (nothing to do in a one-process run)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def primary_says(flag: bool) -> bool:
  """The primary process's `flag`, on every process (a collective: all must call it), so that
  all act on one process's decision."""
  if jax.process_count() == 1:
    return flag
  return bool(multihost_utils.broadcast_one_to_all(np.int32(flag)))


# process_allgather replicates what it gathers onto every device of every process before the
# host copy is taken: a whole [V, D] embedding on each of a host's 8 devices. Gathered in blocks
# of leading rows, what the devices hold at once stays under this.
GATHER_BLOCK_BYTES = 64 * 1024**2


def _leaf_to_host(leaf: Any) -> Any:
  if not isinstance(leaf, jax.Array):
    return leaf
  if leaf.is_fully_addressable or leaf.is_fully_replicated:
    return np.asarray(jax.device_get(leaf))
  # Collectives: every process must reach them, which the same program on every process does.
  if leaf.ndim == 0 or leaf.nbytes <= GATHER_BLOCK_BYTES:
    return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
  rows = max(1, GATHER_BLOCK_BYTES * leaf.shape[0] // leaf.nbytes)
  whole = np.empty(leaf.shape, leaf.dtype)
  for start in range(0, leaf.shape[0], rows):
    whole[start:start + rows] = multihost_utils.process_allgather(leaf[start:start + rows],
                                                                  tiled=True)
  return whole


def to_host(tree: Any) -> Any:
  """The tree with every jax.Array as a whole numpy array, on every process."""
  return jax.tree.map(_leaf_to_host, tree)


def put(array: Any, sharding: jax.sharding.Sharding) -> jax.Array:
  """`array` placed with `sharding`; a host or process-local array must be alike on every
  process (a batch, loaded weights).

  Each process hands its own devices only their slices; unlike `jax.device_put` in a
  multi-process run, nothing is compared across processes first (an all-gather per batch).
  """
  if jax.process_count() == 1 or (isinstance(array, jax.Array)
                                   and not array.is_fully_addressable):
    return jax.device_put(array, sharding)
  array = np.asarray(array)
  return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])
