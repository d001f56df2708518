"""How orbax writes our jax.Arrays: replicas split the writing of an array only where each
replica's part is at least MIN_REPLICA_SLICE_BYTES.

Orbax's default on CPU and TPU splits every replicated array among its replicas, slicing it on
device first, and each slice shape is a program XLA compiles. A norm scale or a tiny test model
gains nothing from that: on 8 CPU devices the search and distillation checkpoints of one
paper-config smoke test compiled 168 slice programs (5 s of its 66 s). Arrays large enough for
parallel writing to pay are still split.
"""

from __future__ import annotations

from absl import logging
import jax
import orbax.checkpoint as ocp

MIN_REPLICA_SLICE_BYTES = 1 << 20

_configured = False


def configure() -> None:
  """Registers the array handler (once per process) before a checkpoint is saved."""
  global _configured
  if _configured:
    return
  default = ocp.type_handlers.get_type_handler(jax.Array)
  handler = ocp.type_handlers.ArrayHandler(
      min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES,
      # The default handler's per-host array metadata, kept as it was.
      array_metadata_store=getattr(default, "_array_metadata_store", None))
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)  # orbax warns on every override, a deliberate one too
  try:
    ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)
  finally:
    logging.set_verbosity(verbosity)
  _configured = True
